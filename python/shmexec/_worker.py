"""A worker process of a ``shmexec.Pool``: a fresh interpreter started by the pool (never a
fork of the caller's), which imports the function as ``multiprocessing``'s spawn does and
serves the pool until it is done with it.

Started as ``python -c "..." SETUP``; SETUP is the hex of a pickle holding the caller's
``multiprocessing.spawn`` preparation data (``sys.path``, working directory, main module) and
the pickled function, initializer and finalizer.
"""

from __future__ import annotations

import pickle
import sys
import traceback

#: True while this process imports what the pool needs (the main module among them): a pool
#: made then would be made again by every worker, for ever.
BOOTSTRAPPING = False

_state: dict = {}


def _init(index: int, workers: int) -> None:
    global BOOTSTRAPPING
    setup = _state.pop("setup")
    try:
        BOOTSTRAPPING = True
        import multiprocessing.spawn

        multiprocessing.spawn.prepare(setup["prep"])
        fn, initializer, initargs, finalizer = pickle.loads(setup["calls"])
    finally:
        BOOTSTRAPPING = False
    from . import _codec

    _state.update(fn=fn, finalizer=finalizer, encode=_codec.encode, decode=_codec.decode)
    _state["info"] = (index, workers)
    if initializer is not None:
        initializer(*initargs)


def _run(frame, skeleton, arrays):
    try:
        x = _state["decode"](frame, skeleton, arrays)
        y = _state["fn"](x)
        del x
        return _state["encode"](y)
    except BaseException:  # the item fails, the worker goes on
        return traceback.format_exc()


def _finish() -> None:
    try:
        if _state.get("finalizer") is not None:
            _state["finalizer"]()
    finally:
        # The worker exits without the interpreter's shutdown: flush what was printed.
        sys.stdout.flush()
        sys.stderr.flush()


def worker_index() -> int | None:
    """The index of this worker in its pool (0-based), or ``None`` outside a worker: for an
    initializer that sets up one resource per worker."""
    info = _state.get("info")
    return info[0] if info else None


def main() -> None:
    from . import _native

    _state["setup"] = pickle.loads(bytes.fromhex(sys.argv[1]))
    del sys.argv[1:]
    _native.serve(_init, _run, _finish)
