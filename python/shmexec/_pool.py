"""``shmexec.Pool``: a pool of worker processes that run a function over numpy chunks passed
through shared memory."""

from __future__ import annotations

import multiprocessing.spawn
import os
import pickle
import re
import sys
import threading
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from . import _codec, _errors, _native

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BOOT = (
    "import sys; sys.path.insert(0, {root!r}); "
    "from shmexec._worker import main; main()"
)
#: One wait of the results iterator while it holds an input no worker has room for.
_SLICE = 0.05


#: The largest setup (hex) passed to a worker in its command line; a larger one travels in an
#: inherited file (see ``_setup_file``).
_SETUP_IN_ARGS = 32 << 10


def _setup_file(setup: bytes) -> int:
    """An anonymous file (memfd) holding ``setup``, inheritable: a worker reads it through the
    descriptor number in its command line (``shmexec._worker.main``). Inheritable means that
    another program this process starts with ``close_fds=False`` (``os.system``) gets it too,
    which costs it nothing but the memory, so only setups too large for a command line take
    this way."""
    fd = os.memfd_create("shmexec-setup", 0)
    try:
        with os.fdopen(os.dup(fd), "wb") as f:
            f.write(setup)
        os.set_inheritable(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_importable(name: str, f: Callable | None) -> None:
    if f is None:
        return
    if not callable(f):
        raise TypeError(f"{name} must be callable, got {type(f).__name__}")
    module = getattr(f, "__module__", None)
    main = sys.modules.get("__main__")
    if module == "__main__" and not getattr(main, "__file__", None):
        raise TypeError(
            f"{name} {getattr(f, '__qualname__', f)!r} is defined in an interactive session "
            "(Jupyter, the REPL): a worker is a fresh interpreter and cannot find it there. "
            "Define it in a module (a .py file beside the notebook) and import it."
        )
    try:
        pickle.dumps(f)
    except Exception as e:
        raise TypeError(
            f"{name} {getattr(f, '__qualname__', f)!r} cannot be found by a worker process "
            f"by its name ({e}): use a function defined at the top level of a module, not a "
            "lambda or a function defined inside another"
        ) from None


def _undecodable(e: Exception, index: int | None) -> _errors.InvalidItem:
    """The error of a result that does not read back: most often an object of a class the
    worker could import and this process cannot (one defined in a module only the worker
    imported), or a damaged frame."""
    where = f"the result of item {index}" if index is not None else "a result"
    err = _errors.InvalidItem(
        f"{where} does not read back in this process: {type(e).__name__}: {e} (return numpy "
        "arrays and objects of classes this process can import)",
        index,
    )
    return _errors.caused_by(err, e)


class Pool:
    """Worker processes that run ``fn`` on every item of a stream, items passing through
    shared memory.

    ``fn`` gets each input item with its numpy arrays as read-only views into shared memory
    (nothing is pickled or copied on the way in beyond the one copy into the ring) and returns
    the result item, whose arrays are copied once into the worker's output ring. The caller
    receives results whose arrays point into that ring; a result's memory is freed when its
    last array is gone. An item is a numpy array (any dtype, structured ones included), or any
    picklable object holding arrays: a tuple, a dict, a dataclass, with small metadata.

    Workers are fresh Python processes (``sys.executable``), never forks of the caller, so a
    pool is safe to make from any program: one with threads, a Jupyter kernel. As with
    ``multiprocessing``'s spawn, ``fn``, ``initializer`` and ``finalizer`` must be importable by
    name: defined at the top level of a module (or of the main script, which then needs an
    ``if __name__ == "__main__":`` guard).

    >>> import numpy as np, shmexec
    >>> from mymodule import find_hits          # doctest: +SKIP
    >>> with shmexec.Pool(find_hits, workers=2) as pool:   # doctest: +SKIP
    ...     for hits in pool.map(chunks):
    ...         total += len(hits)

    Parameters:
        fn: the function run on every item, in a worker.
        workers: number of worker processes (default: one per core this process may use).
        initializer: called with ``*initargs`` once in each worker before its first item (a
            connection, a lookup table); an exception makes ``Pool(...)`` raise ``InitError``.
        finalizer: called once in each worker when the pool closes.
        ring_bytes: size of each worker's input and output ring (default 64 MiB). An item
            must fit its ring: larger ones fail with ``ItemTooLarge``.
        input_ring_bytes, output_ring_bytes: the two sizes apart.
        queue_bytes: input bytes queued to one worker at most (backpressure; default 8 MiB).
        max_attempts: times an item may crash its worker before it is given up
            (``WorkerCrashed``); default 2.
        chunk_timeout: seconds an item may run before its worker is killed and replaced and
            the item fails with ``ChunkTimeout`` (default: none).
        start_timeout: seconds a worker may take to start (import, initializer); default 60.
        shutdown_timeout: seconds ``close()`` waits for workers before killing them.
        pin: ``"auto"`` (pin workers to cores where one is left for the caller), ``"off"``,
            ``"spread"``.
        wait: how workers and the caller wait for each other: ``"adaptive"`` (spin briefly,
            then sleep on a futex), ``"park"`` (sleep at once: fewer cycles burnt where
            processes outnumber cores), ``"spin"``.
        errors: ``"raise"`` (an item's error is raised from the iterator in its place; the
            iterator goes on at the next item when called again) or ``"yield"`` (the exception
            object is yielded in the item's place).
        out: the function writes its result array in place, in the output ring: it is called
            as ``fn(x, out)`` with ``out`` a writable array, and the result is ``out``, or
            ``(out, returned)`` when it returns something other than ``None`` (small
            metadata: a count). ``out="like_input"`` gives ``out`` the input's shape and
            dtype; a function ``out(x) -> (shape, dtype)`` (importable, as ``fn``) any other.
            Saves the copy of the result into the ring.
        shared_bytes: size of the pool's shared region (default 0: none), memory every
            worker maps. Make input arrays there (``Pool.shared``) and an input array that
            lies in it is sent as its place, not copied into a ring: the one copy left for
            chunks the program holds in memory.
    """

    def __init__(
        self,
        fn: Callable[[Any], Any],
        workers: int | None = None,
        *,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple = (),
        finalizer: Callable[[], Any] | None = None,
        ring_bytes: int = 64 << 20,
        input_ring_bytes: int | None = None,
        output_ring_bytes: int | None = None,
        queue_bytes: int = 8 << 20,
        max_attempts: int = 2,
        max_start_attempts: int = 4,
        chunk_timeout: float | None = None,
        start_timeout: float = 60.0,
        shutdown_timeout: float = 5.0,
        pin: str = "auto",
        errors: str = "raise",
        out: str | Callable[[Any], tuple] | None = None,
        wait: str = "adaptive",
        shared_bytes: int = 0,
    ):
        from . import _worker

        self._native = None
        if _worker.BOOTSTRAPPING:
            raise RuntimeError(
                "a shmexec.Pool is being made while a worker imports the main module: guard "
                "the main script's work with `if __name__ == '__main__':`"
            )
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        _errors.check_errors(errors)
        if workers is not None and (not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        if type(shared_bytes) is not int or not 0 <= shared_bytes < 1 << 63:
            raise ValueError(f"shared_bytes must be a non-negative int, got {shared_bytes!r}")
        _check_importable("fn", fn)
        _check_importable("initializer", initializer)
        _check_importable("finalizer", finalizer)
        if out is not None and out != "like_input":
            _check_importable("out", out)
        try:
            calls = pickle.dumps((fn, initializer, tuple(initargs), finalizer, out))
        except Exception as e:
            raise TypeError(f"initargs cannot be pickled for the workers: {e}") from None
        prep = multiprocessing.spawn.get_preparation_data("shmexec-worker")
        # multiprocessing's own processes authenticate with it; these talk through rings.
        prep.pop("authkey", None)
        setup = pickle.dumps({"prep": prep, "calls": calls, "in_place": out is not None})
        self.errors = errors
        self._lock = threading.Lock()
        self._setup_fd: int | None = None
        if 2 * len(setup) <= _SETUP_IN_ARGS:
            arg = setup.hex()
        else:
            # Too large for the command line (Linux takes at most 128 KiB in one argument; a
            # lookup table in initargs is more): an anonymous file every worker inherits,
            # replacements included, for as long as the pool lives.
            self._setup_fd = _setup_file(setup)
            arg = f"fd:{self._setup_fd}:{len(setup)}"
        try:
            self._native = _native.NativePool(
                sys.executable,
                ["-c", _BOOT.format(root=_ROOT), arg],
                workers,
                input_ring_bytes or ring_bytes,
                output_ring_bytes or ring_bytes,
                queue_bytes,
                max_attempts,
                max_start_attempts,
                start_timeout,
                chunk_timeout,
                shutdown_timeout,
                pin,
                wait,
                shared_bytes,
            )
        except BaseException:
            self._close_setup()
            raise

    @property
    def workers(self) -> int:
        """Number of worker processes."""
        return self._native.workers

    def map(self, iterable: Iterable, *, errors: str | None = None, copy: bool = False) -> "Results":
        """Runs the function on every item of ``iterable``; results in input order, each as
        soon as it and those before it are ready. Lazy and bounded: items are taken from
        ``iterable`` only as workers have room. ``len()`` of the result is the input's, where
        it has one (for progress bars). ``copy=True`` gives results that own their memory
        (one more copy), for collecting many."""
        return Results(self, iterable, True, errors or self.errors, copy)

    imap = map

    def imap_unordered(
        self, iterable: Iterable, *, errors: str | None = None, copy: bool = False
    ) -> "Results":
        """``map``, with results as workers finish them (not in input order)."""
        return Results(self, iterable, False, errors or self.errors, copy)

    def stream(self, *, ordered: bool = True, errors: str | None = None, copy: bool = False) -> "Stream":
        """A live stream: ``submit()`` items from one thread (a producer, a digitizer's
        reader) and iterate the results on another. See ``Stream``."""
        return Stream(self, ordered, errors or self.errors, copy)

    def shared(self, dtype=np.uint8) -> np.ndarray:
        """The pool's shared region (``Pool(fn, shared_bytes=...)``) as a writable array of
        ``dtype``, of one dimension (and a subarray dtype's own): make input chunks there
        (generate them in it, ``file.readinto`` a slice of it) and send slices of it. An input
        array that lies in the region reaches its worker as a read-only view of the same
        memory: no byte of it is copied.

        The region is the program's to manage: a chunk must not be changed while an item that
        holds it is in flight (the worker would read the new values; a retried item reads the
        region again). Arrays over it stay valid after the pool is closed.

        >>> pool = shmexec.Pool(fn, workers=2, shared_bytes=64 << 20)   # doctest: +SKIP
        >>> region = pool.shared(np.float32)
        >>> chunks = [region[i << 20:(i + 1) << 20] for i in range(16)]
        >>> for i, c in enumerate(chunks):
        ...     c[:] = i                        # or: source.readinto(c)
        >>> results = list(pool.map(chunks))
        """
        region = None if self.closed else self._native.region
        if region is None:
            if self.closed:
                raise RuntimeError("this pool is closed")
            raise ValueError(
                "this pool has no shared region: make it with Pool(fn, shared_bytes=N)"
            )
        dtype = np.dtype(dtype)
        if dtype.itemsize == 0 or dtype.hasobject:
            raise ValueError(f"the region holds samples of a plain dtype, not {dtype}")
        return np.frombuffer(region, dtype=dtype, count=len(region) // dtype.itemsize)

    def stats(self) -> dict:
        """Counters since the pool started: totals (``items``, ``input_bytes``,
        ``output_bytes``, ``respawns``) and ``workers``, a list with each worker's ``pid``,
        ``items``, ``bytes_in``, ``bytes_out``, ``busy_seconds``, ``errors``, ``respawns``."""
        return self._native.stats()

    def pids(self) -> list[int]:
        """Process ids of the workers now (they change when a dead worker is replaced)."""
        return self._native.pids()

    def close(self) -> None:
        """Stops the workers (each finishes its item and runs the finalizer; after
        ``shutdown_timeout`` it is killed). A call still running ends. Idempotent."""
        if self._native is not None:
            self._native.close()
        self._close_setup()

    def _close_setup(self) -> None:
        fd, self._setup_fd = getattr(self, "_setup_fd", None), None
        if fd is not None:
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self._native is None or self._native.closed

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.workers} workers"
        return f"<shmexec.Pool {state}>"


class _Call:
    """What ``Results`` and ``Stream`` share: the native call, and results made Python."""

    def __init__(self, pool: Pool, ordered: bool, errors: str, copy: bool):
        if pool.closed:
            raise RuntimeError("this pool is closed")
        self._call = pool._native.start(ordered)
        #: The ring bytes an encoded item takes (one in the shared region takes none).
        self._ring_bytes = pool._native.item_bytes
        # The call keeps its pool: a pool nobody else names (`Pool(fn).map(xs)`, a `del pool`
        # while iterating) is closed by its __del__, which would end the call midway.
        self._pool: Pool | None = pool
        self._errors = errors
        self._copy = copy
        self._base: int | None = None
        #: Inputs that never got a sequence number (they could not be encoded): the positions
        #: of the inputs sent after them are their sequence numbers plus this.
        self._skipped = 0

    def _index(self, seq):
        if seq is None or self._base is None:
            return None
        return seq - self._base + self._skipped

    def _sent(self, seq: int) -> None:
        if self._base is None:
            self._base = seq

    def _outcome(self, r):
        """A result tuple of the native call as ``(item, None)``, or ``(None, exc)`` for an
        error to raise (with errors="yield", an item's exception is its item)."""
        if r[0] == "ok":
            _, seq, skeleton, arrays, frame = r
            try:
                return _codec.decode(frame, skeleton, arrays, self._copy), None
            except Exception as e:
                exc = _undecodable(e, self._index(seq))
                return (exc, None) if self._errors == "yield" else (None, exc)
        _, kind, seq, message = r
        index = self._index(seq)
        if kind != "task" and index is not None and index != seq:
            # The native message names the item by its number in the pool's life ("item 8"
            # in a second call); the caller knows it by its place in this call.
            message = re.sub(rf"\b(item|input|output) {seq}\b", rf"\g<1> {index}", message)
        exc = _errors.make(kind, index, message)
        if self._errors == "yield" and isinstance(exc, _errors.ItemError):
            return exc, None
        return None, exc

    def _result(self, r):
        """``_outcome``'s item, or its error raised."""
        item, exc = self._outcome(r)
        if exc is not None:
            raise exc
        return item

    def close(self) -> None:
        """Ends the call; results still in flight are discarded. The pool is ready for the
        next call."""
        call, self._call = self._call, None
        if call is not None:
            call.finish()
        # Last: if this was the pool's last reference, the pool closes now, idle.
        self._pool = None


class Results(_Call, _errors.RaisesAlone):
    """The results of ``Pool.map`` / ``imap_unordered``: an iterator. An item's error is
    raised in its place; calling ``next()`` again goes on with the next item. Closing it (or
    dropping it) midway discards what is in flight."""

    def __init__(self, pool, iterable, ordered, errors, copy):
        try:
            self._len = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            self._len = None
        self._it = iter(iterable)
        super().__init__(pool, ordered, errors, copy)
        self._pending = None
        #: A result collected ahead (by ``_feed``), handed out next.
        self._ready = None
        self._exhausted = False
        self._in_flight = 0
        #: Inputs taken from the iterable so far (the next one's position).
        self._taken = 0
        #: An error found on the input side (an item that cannot be encoded, the iterable
        #: raising), given in its place once every result before it was handed out:
        #: ``(exception, is_item_error)``.
        self._failed: tuple[BaseException, bool] | None = None

    def __iter__(self) -> Iterator:
        return self

    def __len__(self) -> int:
        if self._len is None:
            raise TypeError("the input of this map has no len()")
        return self._len

    def _feed(self) -> None:
        """Places every input that finds room; keeps the first that finds none. An input
        that fails (the iterable raises, an item cannot be encoded) stops the feeding: its
        error waits in ``_failed`` for the results before it."""
        call = self._call
        while not self._exhausted and self._failed is None:
            if self._pending is None:
                if self._in_flight and self._ready is None:
                    # A result ready goes to the caller before the input (a live source,
                    # slow) is read again.
                    self._ready = call.recv(0)
                    if self._ready is not None:
                        return
                try:
                    item = next(self._it)
                except StopIteration:
                    self._exhausted = True
                    call.close_input()
                    return
                except Exception as e:
                    # The input ends here; the error comes after the results before it.
                    self._exhausted = True
                    call.close_input()
                    self._failed = (e, False)
                    return
                index = self._taken
                self._taken += 1
                try:
                    self._pending = _codec.encode(item)
                except Exception as e:
                    message = f"item {index} cannot be sent to a worker: {e}"
                    err = _errors.caused_by(_errors.InvalidItem(message, index), e)
                    self._failed = (err, True)
                    return
            seq = call.try_send(*self._pending)
            if seq is None:
                return
            self._pending = None
            self._sent(seq)
            self._in_flight += 1

    def _next(self):
        """``__next__``'s ``(item, None)``, or ``(None, exc)`` for the error to raise."""
        call = self._call
        if call is None:
            raise StopIteration
        if self._pool is not None and self._pool.closed:
            self.close()
            raise RuntimeError("the pool of this call was closed")
        while True:
            self._feed()
            if self._failed is not None and self._in_flight == 0:
                # Every result before the failed input was handed out: its error now.
                exc, of_item = self._failed
                self._failed = None
                if of_item:
                    self._skipped += 1
                    if self._errors == "yield":
                        return exc, None
                else:
                    self.close()
                return None, exc
            if self._exhausted and self._in_flight == 0:
                self.close()
                raise StopIteration
            if self._pending is not None and self._in_flight == 0:
                # No worker has room and nothing is in flight (workers restarting): wait for
                # room, not for a result.
                call.wait_for_room(self._ring_bytes(*self._pending), _SLICE)
                continue
            r, self._ready = self._ready or call.recv(), None
            if r[0] == "end":
                self.close()
                raise StopIteration
            self._in_flight -= 1
            if r[0] == "err" and r[2] is None:
                # The pool's error, not an item's: the call is over.
                self.close()
            return self._outcome(r)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class Stream(_Call):
    """A live stream on a pool (``Pool.stream()``): ``submit()`` from one thread, iterate
    the results (or ``receive()``) on another; ``close_input()`` ends it after the last
    result. ``close()`` (or leaving the ``with`` block) ends it at once, discarding results
    still in flight.

    >>> def produce(s):                                # doctest: +SKIP
    ...     for chunk in source():
    ...         s.submit(chunk)
    ...     s.close_input()
    >>> with pool.stream() as s:                       # doctest: +SKIP
    ...     threading.Thread(target=produce, args=(s,)).start()
    ...     for result in s:
    ...         handle(result)
    """

    def submit(self, item, timeout: float | None = None) -> int | None:
        """Hands ``item`` to a worker, waiting while every worker's queue is full (the
        interpreter's lock released). Returns the item's index in the stream, or ``None`` if
        ``timeout`` seconds passed without room."""
        call = self._call
        if call is None:
            raise RuntimeError("this stream is closed")
        skeleton, arrays = _codec.encode(item)
        size = self._ring_bytes(skeleton, arrays)
        while True:
            with self._lock:
                seq = call.try_send(skeleton, arrays)
                if seq is not None:
                    self._sent(seq)
                    return self._index(seq)
            if timeout is not None and timeout <= 0:
                return None
            step = _SLICE if timeout is None else min(_SLICE, timeout)
            call.wait_for_room(size, step)
            if timeout is not None:
                timeout -= step

    def close_input(self) -> None:
        """Ends the input: the results of what was submitted still come, then the end."""
        if self._call is not None:
            self._call.close_input()

    def receive(self, timeout: float | None = None):
        """The next result, waiting at most ``timeout`` seconds (``None``: for as long as it
        takes). Raises ``StopIteration`` at the end, ``TimeoutError`` when the time runs out."""
        call = self._call
        if call is None:
            raise StopIteration
        r = call.recv(timeout)
        if r is None:
            raise TimeoutError(f"no result within {timeout} s")
        if r[0] == "end":
            self.close()
            raise StopIteration
        return self._result(r)

    def __init__(self, pool, ordered, errors, copy):
        super().__init__(pool, ordered, errors, copy)
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        return self.receive()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
