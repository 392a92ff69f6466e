"""``shmexec.Pipeline``: stages of Python functions over a stream of chunks, each stage's
input the output of the one before, run by worker processes.

Adjacent stages with the same placement are *fused*: they run one after the other in the
same worker, in one call, the output of one handed to the next as the Python object it is
(nothing between them is copied or pickled). A stage placed otherwise (``workers=``,
``serial=True``, ``alone=True``, a ``stateful`` stage) starts a *group*: a ``Pool`` of its
own. A result of one group reaches the next as any pool's input does: its arrays copied once,
by the caller, from the upstream output ring into a downstream input ring.

How a run moves (``Run``): the caller's thread takes inputs and places them into the first
group; one thread per group collects that group's results, in input order, and hands each
on (into the next group, or to the caller). Every hand-off is recorded in order in a queue
per group (a *tag*: an item placed, or an error that ends an input's way early), so the
results leave in input order and an input that failed in any stage gives its error in its
place. Each group's backpressure holds the group before it: a full downstream ring stops the
thread that feeds it, whose upstream results then stay in their ring, which stops that
group's workers, and so on back to the caller.
"""

from __future__ import annotations

import collections
import copy as _copy
import os
import pickle
import queue
import re
import threading
import time
import warnings
import weakref
from typing import Any, Callable, Iterable, Iterator

from . import _codec, _errors
from ._pool import _SLICE, Pool, _Call, _check_importable, _undecodable
from ._store import SavedStream, StageKey, Store

_MAP, _FILTER, _FLAT = "map", "filter", "flat_map"
#: Inputs a stateful group may have waiting (each holds its upstream frame, or an input).
_STATEFUL_QUEUE = 2
#: Results waiting for the caller (each holds its frame in the last group's output ring).
_OUT_QUEUE = 4
#: The settings of ``Pool`` that a pipeline passes on to each of its groups.
_POOL_OPTIONS = frozenset(
    "initializer initargs finalizer ring_bytes input_ring_bytes output_ring_bytes queue_bytes "
    "max_attempts max_start_attempts chunk_timeout start_timeout shutdown_timeout pin "
    "wait".split()
)


def _mark(e: BaseException, stage: str) -> None:
    try:
        e._shmexec_stage = stage  # type: ignore[attr-defined]
    except Exception:  # an exception type without attributes: the group's name serves
        pass


class _Chain:
    """What a group's workers run: its fused stages one after the other. With a filter or a
    flat_map among them the result is the list of outputs (0..n per input)."""

    def __init__(self, stages: list[tuple[str, Callable, str]], many: bool):
        self.stages = stages
        self.many = many

    def __call__(self, x):
        if not self.many:
            # One output per stage: no list to build.
            for _, fn, name in self.stages:
                try:
                    x = fn(x)
                except BaseException as e:
                    _mark(e, name)
                    raise
            return x
        items = [x]
        del x
        for kind, fn, name in self.stages:
            try:
                if kind == _MAP:
                    items = [fn(i) for i in items]
                elif kind == _FILTER:
                    items = [i for i in items if fn(i)]
                else:
                    items = [o for i in items for o in fn(i)]
            except BaseException as e:
                _mark(e, name)
                raise
        return items


class _Stateful:
    """What the worker of a stateful stage runs: ``fn(state, x) -> (state, y)`` on the pair
    the caller sent. The state travels with each input and its result (its arrays raw, the
    rest pickled), so the worker keeps nothing: an item rerun after a crash runs from the
    same state, and a failed item leaves the caller's state as it was."""

    def __init__(self, fn: Callable, name: str):
        self.fn = fn
        self.name = name

    def __call__(self, pair):
        state, x = pair
        try:
            # The state arrived as read-only views of the input: the function may change its
            # own copy in place.
            out = self.fn(_copy.deepcopy(state), x)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(
                    f"a stateful stage returns (state, output), got {type(out).__name__}"
                )
            return out
        except BaseException as e:
            _mark(e, self.name)
            raise


class _Spec:
    def __init__(self, kind, fn, name, workers, serial, alone, initial, version, config):
        self.kind, self.fn, self.name = kind, fn, name
        self.workers, self.serial, self.alone = workers, serial, alone
        self.initial = initial
        self.version, self.config = version, config
        #: The store its outputs are saved in (``Pipeline.save``): the stage ends its group.
        self.store: Store | None = None

    def fuses_with(self, before: "_Spec") -> bool:
        return (
            not self.alone
            and not before.alone
            and before.store is None
            and self.kind != "stateful"
            and before.kind != "stateful"
            and (self.workers, self.serial) == (before.workers, before.serial)
        )


class _Group:
    """A group of fused stages and its pool."""

    def __init__(self, specs: list[_Spec], default_workers):
        self.specs = specs
        self.names = [s.name for s in specs]
        self.label = " + ".join(self.names)
        self.stateful = specs[0].kind == "stateful"
        first = specs[0]
        self.serial = first.serial or self.stateful
        self.workers = 1 if self.serial else (first.workers or default_workers)
        self.many = any(s.kind in (_FILTER, _FLAT) for s in specs)
        #: Where the group's results are saved (its last stage's store), if anywhere.
        self.store = specs[-1].store
        self.pool: Pool | None = None

    def task(self):
        if self.stateful:
            return _Stateful(self.specs[0].fn, self.specs[0].name)
        return _Chain([(s.kind, s.fn, s.name) for s in self.specs], self.many)


class Pipeline:
    """Stages of Python functions run by worker processes over a stream of chunks, in input
    order, chunks passing through shared memory.

    >>> import shmexec                                       # doctest: +SKIP
    >>> from mydaq import to_records, find_hits, has_hits, number_hits
    >>> pipe = (shmexec.Pipeline(workers=2)
    ...         .map(to_records)                  # fused: one call per chunk in one worker,
    ...         .map(find_hits)                   # records passed on as Python objects
    ...         .filter(has_hits)
    ...         .stateful(number_hits, initial=0))  # serial, in input order, its own worker
    >>> with pipe:
    ...     for numbered in pipe.run(chunks):
    ...         ...

    Stages:
        ``map(fn)``: one output per input. ``filter(fn)``: the input itself where ``fn(x)`` is
        true, nothing otherwise. ``flat_map(fn)``: every item of the iterable ``fn(x)``
        returns. ``stateful(fn, initial)``: ``fn(state, x)`` returns ``(state, y)``; the
        stage runs in one worker, in input order, each run starting from a copy of
        ``initial``. The state travels with each item (keep it small: a count, the end of the
        last chunk, a carry-over array), so a crashed worker's item runs again from the same
        state and a failed item changes nothing.

    Placement (keywords of ``map``, ``filter`` and ``flat_map``): by default a stage runs in
    the pipeline's ``workers``; ``workers=n`` gives it ``n`` of its own, ``serial=True`` one
    worker that sees every item in input order, ``alone=True`` a group of its own. Neighbours
    with the same placement are fused; ``plan()`` says which stages run where. Functions must
    be importable by name, as for ``Pool``.

    Parameters:
        workers: the workers of each group without a count of its own (default: the cores
            this process may use, shared among those groups).
        errors: ``"raise"`` or ``"yield"``, as for ``Pool``.
        **options: any setting of ``Pool`` (``initializer``, ``ring_bytes``,
            ``max_attempts``, ``chunk_timeout``, ``pin``, ...), for every group. ``pin``
            defaults to ``"off"``: groups share the cores.
    """

    def __init__(self, workers: int | None = None, *, errors: str = "raise", **options: Any):
        unknown = set(options) - _POOL_OPTIONS
        if unknown:
            raise TypeError(f"Pipeline() got unknown settings: {', '.join(sorted(unknown))}")
        if workers is not None and (not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        _errors.check_errors(errors)
        options.setdefault("pin", "off")
        self._workers = workers
        self._options = options
        self.errors = errors
        self._specs: list[_Spec] = []
        self._groups: list[_Group] | None = None
        #: The run going on, if any (weak: a run dropped midway closes, and frees the
        #: pipeline for the next).
        self._run: weakref.ref | None = None
        self._closed = False

    # --- stages -------------------------------------------------------------------------

    def _add(self, kind, fn, name, workers=None, serial=False, alone=False, initial=None,
             version="", config=None):
        if self._groups is not None or self._closed:
            raise RuntimeError("stages are added before the pipeline starts")
        if not callable(fn):
            raise TypeError(f"a stage must be callable, got {type(fn).__name__}")
        if workers is not None and (not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        if serial and workers not in (None, 1):
            raise ValueError("a serial stage has one worker")
        name = name or getattr(fn, "__name__", None) or type(fn).__name__
        if any(s.name == name for s in self._specs):
            raise ValueError(
                f"two stages are named {name!r}: stage names must be unique (pass name=)"
            )
        _check_importable(f"stage {name!r}", fn)
        if not isinstance(version, str):
            raise TypeError(f"a stage's version is a str, got {type(version).__name__}")
        if config is not None and not isinstance(config, (bytes, str)):
            raise TypeError(
                f"a stage's config is bytes or a str, got {type(config).__name__} (for a dict, "
                "json.dumps(config, sort_keys=True))"
            )
        self._specs.append(
            _Spec(kind, fn, name, workers, serial, alone, initial, version, config)
        )
        return self

    def map(self, fn: Callable, *, name: str | None = None, workers: int | None = None,
            serial: bool = False, alone: bool = False, version: str = "",
            config: bytes | str | None = None) -> "Pipeline":
        """Adds a stage whose output is ``fn(x)``. ``version`` and ``config`` are part of
        its key and of every later stage's (see ``save``)."""
        return self._add(_MAP, fn, name, workers, serial, alone, None, version, config)

    def filter(self, fn: Callable, *, name: str | None = None, workers: int | None = None,
               serial: bool = False, alone: bool = False, version: str = "",
               config: bytes | str | None = None) -> "Pipeline":
        """Adds a stage that passes on the inputs for which ``fn(x)`` is true."""
        return self._add(_FILTER, fn, name, workers, serial, alone, None, version, config)

    def flat_map(self, fn: Callable, *, name: str | None = None, workers: int | None = None,
                 serial: bool = False, alone: bool = False, version: str = "",
                 config: bytes | str | None = None) -> "Pipeline":
        """Adds a stage whose outputs are the items of ``fn(x)`` (any number, in order)."""
        return self._add(_FLAT, fn, name, workers, serial, alone, None, version, config)

    def stateful(self, fn: Callable, initial: Any = None, *, name: str | None = None,
                 version: str = "", config: bytes | str | None = None) -> "Pipeline":
        """Adds a serial stage with state: ``fn(state, x)`` returns ``(state, y)``; the first
        item of each run sees a copy of ``initial``. ``Run.states`` holds each stateful
        stage's state after the last item it finished (none for a stage a run skipped,
        served from the store)."""
        try:
            pickle.dumps(_copy.deepcopy(initial))
        except Exception as e:
            raise TypeError(
                f"a stateful stage's initial state is copied for each run and sent with each "
                f"item: this one cannot be ({type(e).__name__}: {e})"
            ) from None
        return self._add("stateful", fn, name, initial=initial, version=version, config=config)

    def save(self, store: Store) -> "Pipeline":
        """Saves the outputs of the stage added last in ``store`` under its key, in a run
        given a source key (``run(items, key=...)``), and serves a later run with the same
        key from there, skipping that stage and every stage before it. The stage ends its
        group (its results pass the caller, which writes them). A run that does not go
        through every input without a failed item saves nothing."""
        if self._groups is not None or self._closed:
            raise RuntimeError("stages are added before the pipeline starts")
        if not isinstance(store, Store):
            raise TypeError(f"save() takes a shmexec.Store, got {type(store).__name__}")
        if not self._specs:
            raise ValueError("save() saves the stage added last: add one first")
        self._specs[-1].store = store
        return self

    def keys(self, source: StageKey) -> dict[str, StageKey]:
        """Each stage's key in a run whose source key is ``source``: its name, version and
        config, with the key of the stage before (the first stage's: ``source``)."""
        if not isinstance(source, StageKey):
            raise TypeError(f"a source key is a shmexec.StageKey, got {type(source).__name__}")
        lists = {name for g in self._grouped() if g.many for name in g.names}
        keys, before = {}, source
        for spec in self._specs:
            config = _what_makes(spec, spec.name in lists)
            before = keys[spec.name] = StageKey(spec.name, spec.version, config, [before])
        return keys

    def plan(self) -> list[dict]:
        """The groups: for each, its stages (fused, in one call per item), its workers,
        whether it is serial."""
        return [
            {"stages": list(g.names), "workers": g.workers, "serial": g.serial}
            for g in self._grouped()
        ]

    def _grouped(self) -> list[_Group]:
        if self._groups is not None:
            return self._groups
        if not self._specs:
            raise ValueError("a pipeline needs at least one stage")
        runs: list[list[_Spec]] = []
        for s in self._specs:
            if runs and s.fuses_with(runs[-1][-1]):
                runs[-1].append(s)
            else:
                runs.append([s])
        default = self._workers
        shared = [r for r in runs if not r[0].workers and not r[0].serial and r[0].kind != "stateful"]
        if default is None and len(shared) > 1:
            # The cores this process may use, shared by the groups without a count of their
            # own (each a pool of that many processes, with their rings).
            default = max(1, len(os.sched_getaffinity(0)) // len(shared))
        return [_Group(r, default) for r in runs]

    # --- life ---------------------------------------------------------------------------

    def start(self) -> "Pipeline":
        """Starts every group's workers (``run`` does it on first use). Raises as ``Pool``
        does (``InitError`` for an initializer that fails)."""
        if self._closed:
            raise RuntimeError("this pipeline is closed")
        if self._groups is not None:
            return self
        groups = self._grouped()
        try:
            for g in groups:
                try:
                    g.pool = Pool(g.task(), g.workers, errors="yield", **self._options)
                except _errors.ShmexecError as e:
                    if e.args and isinstance(e.args[0], str):
                        e.args = (f"stages {g.label!r}: {e.args[0]}",) + e.args[1:]
                    raise
        except BaseException:
            for g in groups:
                if g.pool is not None:
                    g.pool.close()
                    g.pool = None
            raise
        self._groups = groups
        return self

    def run(self, iterable: Iterable, *, key: StageKey | None = None, errors: str | None = None,
            copy: bool = False) -> "Run":
        """Runs the stages on every item of ``iterable``: the last stage's outputs, in input
        order, each as soon as it and those before it are ready. Lazy and bounded, as
        ``Pool.map``; ``len()`` is the input's where the input has one and no stage filters
        or flattens. ``copy=True`` gives results that own their memory.

        With ``key`` (the source's ``StageKey``: which run, which raw data), saved stages
        (``save``) are saved, and the run is served from the last saved stage whose stream
        is complete: ``iterable`` is not read, and ``Run.cache`` names that stage.

        ``iterable`` is read on the caller's thread, between results: for a live source
        (chunks that arrive when they arrive) use ``stream()``."""
        self._check_idle()
        errors = _errors.check_errors(errors or self.errors)
        groups = self._groups
        assert groups is not None
        source: Iterable = enumerate(iterable)
        length = _length(iterable) if not any(g.many for g in groups) else None
        writers: list = [None] * len(groups)
        served = None
        if key is not None:
            keys = self.keys(key)
            for i in range(len(groups) - 1, -1, -1):
                g = groups[i]
                if g.store is not None:
                    saved = g.store.load(keys[g.names[-1]])
                    if saved is not None:
                        served = (i, saved)
                        break
            first = 0 if served is None else served[0] + 1
            if served is not None:
                i, saved = served
                rest_many = any(g.many for g in groups[first:])
                length = None if groups[i].many or rest_many else len(saved)
                source = _served(saved, groups[i].many, copy and first == len(groups))
            groups = groups[first:]
            writers = [
                None if g.store is None else (g.store._native.writer(keys[g.names[-1]]), g.names[-1])
                for g in groups
            ]
        run = Run(self, groups, source, length, errors, copy, writers)
        if served is not None:
            run.cache = self._groups[served[0]].names[-1]
        self._run = weakref.ref(run)
        return run

    def stream(self, *, errors: str | None = None, copy: bool = False) -> "PipelineStream":
        """A live run: ``submit()`` chunks from a producer thread as they arrive and iterate
        the results on another, in submission order. See ``PipelineStream``."""
        self._check_idle()
        errors = _errors.check_errors(errors or self.errors)
        stream = PipelineStream(self, self._groups, errors, copy)
        self._run = weakref.ref(stream)
        return stream

    def _check_idle(self) -> None:
        self.start()
        run = self._run() if self._run is not None else None
        if run is not None and not run._over:
            raise RuntimeError(
                "this pipeline runs another call: finish or close it first (one run at a "
                "time)"
            )

    def stats(self) -> list[dict]:
        """Each group's counters (``Pool.stats()``) with its ``stages``."""
        if self._closed:
            return []
        return [
            {"stages": list(g.names), **g.pool.stats()}
            for g in (self._groups or [])
            if g.pool is not None
        ]

    def close(self) -> None:
        """Ends a run still going and stops every worker. Idempotent."""
        self._closed = True
        ref, self._run = self._run, None
        run = ref() if ref is not None else None
        if run is not None:
            run.close()
        for g in self._groups or []:
            if g.pool is not None:
                g.pool.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Pipeline":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        plan = " | ".join(
            f"{' + '.join(g['stages'])} ({g['workers']})" for g in self.plan()
        ) if self._specs else "no stages"
        return f"<shmexec.Pipeline {plan}{' closed' if self._closed else ''}>"


class _LocalQueue:
    """The tag queues of a one-group pipeline, used by the caller's thread alone: a
    ``queue.Queue``'s interface without its locks."""

    def __init__(self, maxsize: int = 0):
        self.items: collections.deque = collections.deque()
        self.maxsize = maxsize

    def put_nowait(self, tag) -> None:
        if self.maxsize and len(self.items) >= self.maxsize:
            raise queue.Full
        self.items.append(tag)

    def put(self, tag, timeout=None) -> None:
        # Never full where the caller's thread puts (only an unbounded queue takes puts).
        self.put_nowait(tag)

    def get_nowait(self):
        if not self.items:
            raise queue.Empty
        return self.items.popleft()

    def qsize(self) -> int:
        return len(self.items)


class _Cancelled(Exception):
    """The run was closed while a thread of it waited."""


class _Flow:
    """What the threads of a run share (not the ``Run`` itself, so that a dropped ``Run`` is
    collected and closes it). ``tags[g]`` is group ``g``'s queue of hand-offs in input
    order: ``("item", index)`` (placed into its pool), ``("val", index, x)`` (for a stateful
    group, which places it itself), ``("err", exc, ends_run)``, ``("end",)``. ``tags[-1]``
    is the caller's: ``("ok", index, result)``, errors and the end. (``Run._feed`` keeps an input it could not place yet as ``("place", index,
    encoded)``.)"""

    def __init__(self, groups: list[_Group], copy: bool, direct: bool, writers: list):
        self.groups = groups
        self.copy = copy
        #: Per group, ``(writer, stage)`` where its results are saved; ``failed``, whether an
        #: input did not get through it (then its stream is not committed).
        self.writers = writers
        self.failed = [False] * len(groups)
        self.saved: list[str] = []
        #: A run of one group runs on the caller's thread alone, as ``Pool.map`` does.
        self.direct = direct
        self.cancel = threading.Event()
        make = _LocalQueue if self.direct else queue.Queue
        # Unbounded: a stateful group's values are bounded where they are put (`room`), so
        # that an error tag or the end never waits for a slot.
        self.tags = [make() for _ in groups] + [make(0 if self.direct else _OUT_QUEUE)]
        self.calls: list[_Call] = []
        self.states: dict[str, Any] = {}
        # Rung whenever something moved: the caller's thread waits on it for room or results.
        self.bell = threading.Condition()
        self.rings = 0
        #: Whether the caller waits for a result: the last group collects one only then,
        #: and only where no tag waits in the caller's queue, so that the results holding
        #: its ring are the caller's, as with ``Pool.map``. Set and cleared under ``bell``.
        self.wanted = False

    def commit(self, g: int) -> None:
        """Group ``g`` saw the run's end: its stream is committed if every input got
        through."""
        with self.bell:  # against abandon() on a thread that closes the run
            w, self.writers[g] = self.writers[g], None
        if w is None:
            return
        writer, stage = w
        if self.failed[g]:
            writer.abandon()
        else:
            writer.finish()
            self.saved.append(stage)

    def save(self, g: int, write: Callable) -> None:
        """Writes a result of group ``g`` into its stream, if it saves one. A write that
        fails (a full disk) costs the stream, not the run: it is abandoned, with a warning."""
        w = self.writers[g]
        if w is None:
            return
        try:
            write(w[0])
        except _errors.StoreError as e:
            with self.bell:
                self.writers[g] = None
            w[0].abandon()
            warnings.warn(f"the outputs of stage {w[1]!r} are not saved: {e}", RuntimeWarning)

    def abandon(self) -> None:
        with self.bell:
            writers = [w for w in self.writers if w is not None]
            self.writers = [None] * len(self.writers)
        for writer, _ in writers:
            writer.abandon()

    def ring(self) -> None:
        if self.direct:  # nobody waits on the bell
            return
        with self.bell:
            self.rings += 1
            self.bell.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        with self.bell:
            if self.rings == seen and not self.cancel.is_set():
                self.bell.wait(timeout)

    def room(self, g: int) -> bool:
        """Whether stateful group ``g`` takes another value now (each waits, copied, for its
        one worker: a few at most)."""
        return self.tags[g].qsize() < _STATEFUL_QUEUE

    def wait_for_demand(self) -> None:
        """Waits until the caller waits for a result that no tag in its queue answers."""
        out = self.tags[-1]
        with self.bell:
            while not self.wanted or out.qsize():
                if self.cancel.is_set():
                    raise _Cancelled
                self.bell.wait(_SLICE)

    def want(self) -> None:
        """The caller waits for a result (it stays wanted, across a timeout, until one is
        taken: a caller that polls gets the one collected meanwhile)."""
        with self.bell:
            self.wanted = True
            self.bell.notify_all()

    def take_result(self, timeout: float | None):
        """The caller's next tag, or ``None`` (none within ``timeout``; ``None``: none now)."""
        out = self.tags[-1]
        with self.bell:
            if not out.qsize() and timeout:
                self.bell.wait(timeout)
            if not out.qsize():
                return None
            self.wanted = False
            return out.get_nowait()

    def put(self, g: int, tag) -> None:
        """Hands ``tag`` to group ``g`` (``len(groups)``: the caller), waiting while its queue
        is full."""
        q = self.tags[g]
        while True:
            if self.cancel.is_set():
                raise _Cancelled
            try:
                q.put(tag, timeout=_SLICE)
                self.ring()
                return
            except queue.Full:
                continue

    def take(self, g: int):
        q = self.tags[g]
        while True:
            if self.cancel.is_set():
                raise _Cancelled
            try:
                tag = q.get(timeout=_SLICE)
                self.ring()
                return tag
            except queue.Empty:
                continue

    def send(self, g: int, index: int, x) -> bool:
        """Places ``x`` (input ``index``'s) into group ``g``, waiting for room; ``False``
        where the item could not be placed (its error was handed on in its place)."""
        if g == len(self.groups):
            self.put(g, ("ok", index, x))
            return True
        if self.groups[g].stateful:
            # A copy: the value waits for the stateful group's one worker, and a view would
            # hold its frame in the group before's ring meanwhile.
            tag = ("val", index, _copy.deepcopy(x))
            with self.bell:
                while not self.room(g):
                    if self.cancel.is_set():
                        raise _Cancelled
                    self.bell.wait(_SLICE)
            self.put(g, tag)
            return True
        try:
            encoded = _codec.encode(x)
        except Exception as e:
            err = _errors.InvalidItem(
                f"item {index}: the output of stages {self.groups[g - 1].label!r} cannot be "
                f"passed on: {e}",
                index,
            )
            err.stage = self.groups[g - 1].names[-1]
            self.put(g, ("err", err, False))
            return False
        self.place(g, encoded)
        self.put(g, ("item", index))
        return True

    def place(self, g: int, encoded) -> None:
        call = self.calls[g]
        skeleton, arrays = encoded
        size = _codec.size((skeleton, arrays))
        while True:
            if self.cancel.is_set():
                raise _Cancelled
            seq = call._call.try_send(skeleton, arrays)
            if seq is not None:
                call._sent(seq)
                return
            call._call.wait_for_room(size, _SLICE)

    def collect(self, g: int, wait: bool = True):
        """Group ``g``'s next result as the native call gives it, waiting for it (without
        ``wait``: ``None`` if none is ready)."""
        call = self.calls[g]
        while True:
            if self.cancel.is_set():
                raise _Cancelled
            r = call._call.recv(_SLICE if wait else 0)
            if r is not None or not wait:
                return r

    def receive(self, g: int, r=None):
        """Group ``g``'s next result (``r``, if collected already): the value, or the item's
        error (with ``errors="yield"`` a pool's item errors are values; any other is
        raised)."""
        call = self.calls[g]
        if r is None:
            r = self.collect(g)
        if r[0] == "end":
            raise _errors.PoolError(f"group {self.groups[g].label!r} ended early")
        self.ring()
        if r[0] == "ok":
            _, _seq, skeleton, arrays, frame = r
            if not self.groups[g].stateful:
                self.save(g, lambda w: w.write_frame(frame))
            last = g == len(self.groups) - 1
            try:
                return _codec.decode(frame, skeleton, arrays, self.copy and last)
            except Exception as e:
                return _undecodable(e, call._index(r[1]))
        result = call._result(r)
        if isinstance(result, _errors.ItemError):
            # Its number in the pool's life, which its message may name (the call's own
            # numbering may not be known yet: an error can come before `_sent`).
            result._seq = r[2]
        return result


def _restaged(exc: _errors.ItemError, index: int, group: _Group) -> _errors.ItemError:
    """A group's item error as the pipeline's: numbered by the pipeline's input and naming
    its stage."""
    if isinstance(exc, _errors.TaskError):
        text, stage = exc.traceback, group.label
        if text.startswith(_errors.STAGE_MARK):
            first, _, text = text.partition("\n")
            stage = first[len(_errors.STAGE_MARK):]
        last = text.strip().splitlines()[-1] if text.strip() else "the function raised"
        new: _errors.ItemError = _errors.TaskError(
            f"item {index}, stage {stage!r}: {last}", index, text
        )
    else:
        stage = group.label
        message = str(exc.args[0]) if exc.args else str(exc)
        for old in {exc.index, getattr(exc, "_seq", None)} - {None}:
            message = re.sub(rf"\b(item|input|output) {old}\b", rf"\g<1> {index}", message)
        new = type(exc)(f"stages {stage!r}: {message}", index)
    new.stage = stage
    new.__cause__ = exc.__cause__
    return new


class _Mover:
    """What group ``g``'s thread does with each of its tags (in a one-group pipeline, the
    caller's thread does it): collects each placed item's result, in order, and hands it on."""

    def __init__(self, flow: _Flow, g: int):
        self.flow, self.g = flow, g
        self.group = flow.groups[g]
        self.state = None
        if self.group.stateful:
            self.state = _copy.deepcopy(self.group.specs[0].initial)
            flow.states[self.group.names[0]] = self.state
        #: The input whose result the group gives next, once it was placed.
        self.waiting: int | None = None
        #: Its result, where the caller's thread collected it ahead (a one-group run).
        self.ready = None

    def step(self, tag) -> bool:
        """Follows one tag; ``False`` once the group's part of the run is over."""
        flow, g, group = self.flow, self.g, self.group
        kind = tag[0]
        if kind == "end":
            if g + 1 < len(flow.groups) and not flow.groups[g + 1].stateful:
                flow.calls[g + 1]._call.close_input()
            try:
                flow.commit(g)
            except Exception as e:  # the store failed: in order, after the results before
                flow.put(g + 1, ("err", e, True))
                return False
            flow.put(g + 1, tag)
            return False
        if kind == "err":
            flow.failed[g] = True
            flow.put(g + 1, tag)
            return True
        index = tag[1]
        if group.stateful:
            try:
                encoded = _codec.encode((self.state, tag[2]))
            except Exception as e:
                err = _errors.InvalidItem(
                    f"item {index}: the input of stateful stage {group.label!r} with its "
                    f"state cannot be sent: {e}",
                    index,
                )
                err.stage = group.label
                flow.failed[g] = True
                flow.put(g + 1, ("err", err, False))
                return True
            del tag
            flow.place(g, encoded)
            del encoded
        self.waiting = index
        return self.finish()

    def finish(self) -> bool:
        """Collects the result of the input placed last and hands it on."""
        flow, g, group = self.flow, self.g, self.group
        index = self.waiting
        assert index is not None
        last = g + 1 == len(flow.groups)
        while True:
            if last and not flow.direct and not group.stateful:
                flow.wait_for_demand()
            try:
                ready, self.ready = self.ready, None
                r = flow.receive(g, ready)
                break
            except _Cancelled:
                raise
            except Exception as e:
                # The pool's error, not an item's: the run ends here, in order.
                self.waiting = None
                flow.put(g + 1, ("err", e, True))
                return False
        self.waiting = None
        if isinstance(r, _errors.ItemError):
            flow.failed[g] = True
            flow.put(g + 1, ("err", _restaged(r, index, group), False))
            return True
        if group.stateful:
            # A copy: a view would hold its frame in the group's output ring until the next
            # item, and the ring would fill with frames nobody reads.
            state, r = r
            self.state = _copy.deepcopy(state)
            del state
            flow.states[group.names[0]] = self.state
            # Its frame holds the state beside the output: the output alone is saved.
            flow.save(g, lambda w: w.write_item(*_codec.encode(r)))
            if last:
                # Collected ahead of the caller's asking (the next item needs this one's
                # state): a copy, so that it holds no frame of the ring.
                r = _copy.deepcopy(r)
        for x in r if group.many else (r,):
            flow.send(g + 1, index, x)
        return True


def _move(flow: _Flow, g: int) -> None:
    """Group ``g``'s thread: follows its tags until the run's end (or its close)."""
    try:
        mover = _Mover(flow, g)
        while mover.step(flow.take(g)):
            pass
    except _Cancelled:
        return
    except BaseException as e:  # a bug: the caller hears of it rather than waiting
        try:
            flow.put(len(flow.groups), ("err", e, True))
        except _Cancelled:
            pass


def _what_makes(spec: _Spec, lists: bool) -> bytes:
    """A stage's configuration as its key holds it: beside the user's, what else decides what
    it saves, so that a change to any of it is another stream, never a stale one served: its
    kind, its function (by the name a worker imports it by; a ``partial`` with its
    arguments), a stateful stage's initial state, and the layout of its saved chunks (a list
    of outputs where its group filters or flattens, one output otherwise)."""
    made = [spec.kind.encode(), pickle.dumps(spec.fn), b"list" if lists else b"one"]
    if spec.kind == "stateful":
        made.append(pickle.dumps(spec.initial))
    user = spec.config.encode() if isinstance(spec.config, str) else (spec.config or b"")
    return b"\0".join(made) + b"\0" + user


def _length(iterable) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def _served(saved: SavedStream, many: bool, copy: bool):
    """The inputs a served run feeds the groups after its saved stage: ``(index, value)``,
    each chunk's outputs numbered by the input that made them."""
    for k in range(len(saved)):
        value = saved[k]
        if copy:
            value = _copy.deepcopy(value)
        if many:
            for v in value:
                yield k, v
        else:
            yield k, value


class _Output:
    """What ``Run`` and ``PipelineStream`` share: a run's flow, its threads, and its results as the
    caller gets them."""

    def __init__(self, pipeline: Pipeline, groups: list[_Group], errors: str, copy: bool,
                 direct: bool, writers: list | None = None):
        # The run keeps its pipeline: one nobody else names (`Pipeline().map(f).run(xs)`)
        # would be closed by its __del__ midway.
        self._pipeline: Pipeline | None = pipeline
        self._errors = errors
        self._over = False
        self._closing = threading.RLock()
        self._closed = False
        self._flow = flow = _Flow(groups, copy, direct, writers or [None] * len(groups))
        #: The stage a run was served from (its saved stream), or ``None``.
        self.cache: str | None = None
        #: The stages whose streams this run saved, once it ended.
        self.saved = flow.saved
        #: The state of each stateful stage after the last item it finished (by stage name).
        self.states = flow.states
        self._threads: list[threading.Thread] = []
        self._mover = None
        try:
            for g in groups:
                flow.calls.append(_Call(g.pool, True, "yield", False))
            if flow.direct and groups:
                self._mover = _Mover(flow, 0)
        except BaseException:
            self.close()
            raise
        if not flow.direct:
            self._threads = [
                threading.Thread(target=_move, args=(flow, g), daemon=True, name=f"shmexec-{g}")
                for g in range(len(groups))
            ]
            for t in self._threads:
                t.start()

    def _deliver(self, tag):
        """The caller's tag as ``(result, None)``, or ``(None, exc)`` for the error to raise
        (with errors="yield", an item's exception is its result)."""
        self._flow.ring()
        if tag[0] == "ok":
            return tag[2], None
        if tag[0] == "end":
            self.close()
            raise StopIteration
        _, exc, ends = tag
        if ends:
            self.close()
        elif self._errors == "yield":
            return exc, None
        return None, exc

    def __iter__(self) -> Iterator:
        return self

    def close(self) -> None:
        """Ends the run; what is in flight is discarded. The pipeline is ready for the next
        run once this returns (also where another thread closes it meanwhile)."""
        self._over = True  # first: the loops of other threads look at it
        # Reentrant: letting go of the pipeline below may close it, which closes this run.
        with self._closing:
            if self._closed:
                return
            self._closed = True
            flow = self._flow
            flow.cancel.set()
            with flow.bell:
                flow.bell.notify_all()
            for t in self._threads:
                if t is not threading.current_thread():
                    t.join(5.0)
            for call in flow.calls:
                call.close()
            flow.abandon()
            self._pipeline = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class Run(_Output, _errors.RaisesAlone):
    """The results of ``Pipeline.run``: an iterator, in input order. An item's error is
    raised in its place (``TaskError`` and the others, with ``.index``, the input's position,
    and ``.stage``, the stage it failed in); calling ``next()`` again goes on. Closing it (or
    dropping it) midway discards what is in flight."""

    def __init__(self, pipeline: Pipeline, groups: list[_Group], source: Iterable,
                 length: int | None, errors: str, copy: bool, writers: list):
        self._len = length
        #: ``(index, item)`` pairs: the caller's items, or a saved stream's outputs.
        self._it = iter(source)
        self._pending = None
        self._exhausted = False
        super().__init__(pipeline, groups, errors, copy, len(groups) <= 1, writers)

    def __len__(self) -> int:
        if self._len is None:
            raise TypeError("the input of this run has no len(), or a stage filters or flattens")
        return self._len

    def _feed(self) -> None:
        """Places inputs into the first group while it has room (never waits)."""
        flow = self._flow
        first = flow.groups[0] if flow.groups else None
        out = flow.tags[-1]
        while self._pending is not None or not self._exhausted:
            if self._pending is None:
                if out.qsize() or self._result_ready():
                    # A result is ready: the caller gets it before the source (a live one,
                    # slow) is read again.
                    return
                try:
                    index, item = next(self._it)
                except StopIteration:
                    self._exhausted = True
                    self._pending = ("end",)
                except Exception as e:
                    self._exhausted = True
                    self._pending = ("err", e, True)
                else:
                    if first is None:  # served from the store, every stage skipped
                        self._pending = ("ok", index, item)
                    elif first.stateful:
                        # A copy: the item waits for the group's one worker, and the source
                        # may reuse its buffer meanwhile.
                        self._pending = ("val", index, _copy.deepcopy(item))
                    else:
                        try:
                            self._pending = ("place", index, _codec.encode(item))
                        except Exception as e:
                            self._pending = ("err", _unsendable(e, index, first), False)
            tag = self._pending
            if tag[0] == "place":
                seq = flow.calls[0]._call.try_send(*tag[2])
                if seq is None:
                    return
                flow.calls[0]._sent(seq)
                tag = ("item", tag[1])
            elif tag[0] == "end" and first is not None and not first.stateful:
                flow.calls[0]._call.close_input()
            elif tag[0] == "val" and not flow.room(0):
                return
            flow.tags[0].put_nowait(tag)
            flow.ring()
            self._pending = None

    def _result_ready(self) -> bool:
        """In a one-group run, whether the group has the next result ready (collected
        ahead, for the step that hands it out)."""
        mover = self._mover
        if mover is None or self._flow.tags[0].qsize() == 0:
            return False
        if mover.ready is None and mover.waiting is None:
            mover.ready = self._flow.collect(0, wait=False)
        return mover.ready is not None

    def _step(self) -> None:
        """One step of a one-group pipeline, on the caller's thread: collects the next result
        (waiting for it), or waits for room where nothing is in flight."""
        mover, flow = self._mover, self._flow
        if mover.waiting is not None:
            mover.finish()
            return
        try:
            tag = flow.tags[0].get_nowait()
        except queue.Empty:
            pending = self._pending
            if pending is not None and pending[0] == "place":
                # No worker has room and nothing is in flight (workers restarting).
                skeleton, arrays = pending[2]
                size = _codec.size((skeleton, arrays))
                flow.calls[0]._call.wait_for_room(size, _SLICE)
            return
        mover.step(tag)

    def _next(self):
        """``__next__``'s ``(result, None)``, or ``(None, exc)`` for the error to raise."""
        if self._over:
            raise StopIteration
        flow = self._flow
        flow.want()
        try:
            while True:
                if self._over:  # closed by another thread
                    raise StopIteration
                seen = flow.rings
                self._feed()
                tag = flow.take_result(None)
                if tag is not None:
                    break
                if self._mover is not None:
                    self._step()
                elif not flow.direct:
                    flow.wait(seen, _SLICE)
        except BaseException as e:
            # Ctrl-C, or the input's iterator: nothing is left running. A run closed by
            # another thread meanwhile (its calls ended under this one) is over.
            closed = self._over
            self.close()
            if closed and not isinstance(e, KeyboardInterrupt):
                raise StopIteration from None
            raise
        if self._mover is not None and tag[0] == "ok":
            self._end_if_done()
        return self._deliver(tag)

    def _end_if_done(self) -> None:
        """In a one-group run, follows the end at once when nothing else is left before it
        (so that a saved stream is committed with the last result, not at a later next())."""
        mover, first = self._mover, self._flow.tags[0]
        if mover.waiting is None and first.qsize() == 1 and first.items[0][0] == "end":
            mover.step(first.get_nowait())


class PipelineStream(_Output):
    """A live run (``Pipeline.stream()``): ``submit()`` chunks from one thread (a producer, a
    digitizer's reader), iterate the results (or ``receive()``) on another, in submission
    order; ``close_input()`` ends it after the last result. ``close()`` (or leaving the
    ``with`` block) ends it at once, discarding what is in flight."""

    def __init__(self, pipeline: Pipeline, groups: list[_Group], errors: str, copy: bool):
        super().__init__(pipeline, groups, errors, copy, direct=False)
        self._submitting = threading.Lock()
        self._taken = 0
        self._input_closed = False

    def submit(self, item, timeout: float | None = None) -> int | None:
        """Hands ``item`` to the first stage, waiting while its workers have no room (the
        interpreter's lock released). Returns the item's index in the stream, or ``None`` if
        ``timeout`` seconds passed without room. An item that cannot be sent raises
        ``InvalidItem`` here."""
        flow = self._flow
        first = flow.groups[0]
        deadline = None if timeout is None else time.monotonic() + timeout
        if first.stateful:
            # A copy: the item waits for the group's one worker, and the producer may reuse
            # its buffer meanwhile (as Run._feed).
            tag, encoded = ("val", None, _copy.deepcopy(item)), None
        else:
            try:
                encoded = _codec.encode(item)
            except Exception as e:
                raise _unsendable(e, self._taken, first) from e
        # Placed and tagged under the lock (the tags' order is the placements'); waited for
        # outside it, so that close_input() and other producers are not held up.
        while True:
            with self._submitting:
                if self._over:
                    raise RuntimeError("this stream is closed")
                if self._input_closed:
                    raise RuntimeError("this stream's input is closed")
                index = self._taken
                if encoded is None:
                    placed = flow.room(0)
                    if placed:
                        flow.tags[0].put(("val", index, tag[2]))
                else:
                    call = flow.calls[0]
                    native = call._call
                    if native is None:  # closed by another thread since the check above
                        raise RuntimeError("this stream is closed")
                    seq = native.try_send(*encoded)
                    placed = seq is not None
                    if placed:
                        call._sent(seq)
                        flow.tags[0].put(("item", index))
                if placed:
                    self._taken += 1
                    flow.ring()
                    return index
            if _expired(deadline):
                return None
            if encoded is None:
                with flow.bell:
                    if not flow.room(0) and not self._over:
                        flow.bell.wait(_left(deadline))
            else:
                native = flow.calls[0]._call
                if native is None:
                    raise RuntimeError("this stream is closed")
                native.wait_for_room(_codec.size(encoded), _left(deadline))

    def close_input(self) -> None:
        """Ends the input: the results of what was submitted still come, then the end."""
        flow = self._flow
        with self._submitting:
            if self._over or self._input_closed:
                return
            self._input_closed = True
            if not flow.groups[0].stateful:
                flow.calls[0]._call.close_input()
            flow.tags[0].put(("end",))
            flow.ring()

    def receive(self, timeout: float | None = None):
        """The next result, waiting at most ``timeout`` seconds (``None``: for as long as it
        takes). Raises ``StopIteration`` at the end, ``TimeoutError`` when the time runs out."""
        if self._over:
            raise StopIteration
        flow = self._flow
        deadline = None if timeout is None else time.monotonic() + timeout
        flow.want()
        try:
            while True:
                tag = flow.take_result(_left(deadline))
                if tag is not None:
                    break
                if self._over:
                    raise StopIteration
                if _expired(deadline):
                    raise TimeoutError(f"no result within {timeout} s")
        except KeyboardInterrupt:
            self.close()
            raise
        result, exc = self._deliver(tag)
        if exc is not None:
            raise exc
        return result

    def __next__(self):
        return self.receive()

    def __enter__(self) -> "PipelineStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _left(deadline: float | None) -> float:
    """One wait's length: a slice, or less where the deadline comes first."""
    if deadline is None:
        return _SLICE
    return max(0.0, min(_SLICE, deadline - time.monotonic()))


def _expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _unsendable(e: Exception, index: int, first: _Group) -> _errors.InvalidItem:
    err = _errors.InvalidItem(f"item {index} cannot be sent to a worker: {e}", index)
    _errors.caused_by(err, e)
    err.stage = first.names[0]
    return err
