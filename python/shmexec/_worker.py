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
        fn, initializer, initargs, finalizer, out = pickle.loads(setup["calls"])
    finally:
        BOOTSTRAPPING = False
    from . import _codec

    _state.update(fn=fn, finalizer=finalizer, encode=_codec.encode, decode=_codec.decode)
    _state.update(out=out, encode_around=_codec.encode_around, room=_codec.room)
    _state["info"] = (index, workers)
    if initializer is not None:
        initializer(*initargs)


def _failure(e: BaseException) -> str:
    """What the caller hears of an item that raised ``e``: the traceback, after a line naming
    the pipeline stage that raised, where one did (``shmexec._pipeline``)."""
    text = traceback.format_exc()
    stage = getattr(e, "_shmexec_stage", None)
    if isinstance(stage, str):
        from ._errors import STAGE_MARK

        return f"{STAGE_MARK}{stage}\n{text}"
    return text


def _run(frame, skeleton, arrays):
    try:
        x = _state["decode"](frame, skeleton, arrays)
        y = _state["fn"](x)
        del x
        return _state["encode"](y)
    except BaseException as e:  # the item fails, the worker goes on
        return _failure(e)


def _prepare(frame, skeleton, arrays):
    """For a function that writes its result in place: decodes the input and returns the
    size of the result array (``out(x)`` gives its shape and dtype)."""
    try:
        x = _state["decode"](frame, skeleton, arrays)
        spec = _state["out"]
        shape, dtype = (x.shape, x.dtype) if spec == "like_input" else spec(x)
        import numpy as np

        dtype = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        _state["pending"] = (x, shape, dtype)
        n = dtype.itemsize
        for d in shape:
            n *= d
        return n
    except BaseException:
        _state.pop("pending", None)
        return traceback.format_exc()


def _run_into(room):
    """Runs ``fn(x, out)`` with ``out`` an array over ``room`` (in the output ring); returns
    the skeleton of the result, ``out`` or ``(out, returned)``."""
    try:
        x, shape, dtype = _state.pop("pending")
        out = _state["room"](room, dtype, shape)
        returned = _state["fn"](x, out)
        del x
        result = out if returned is None or returned is out else (out, returned)
        return _state["encode_around"](result, out)
    except BaseException:
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


def _read_setup(arg: str) -> bytes:
    """The pool's setup: the hex in ``arg``, or ``fd:N:LEN``, the ``LEN`` bytes of the
    inherited file ``N`` (a setup too large for a command line; see ``shmexec._pool``)."""
    if not arg.startswith("fd:"):
        return bytes.fromhex(arg)
    import os

    _, fd, size = arg.split(":")
    fd, size = int(fd), int(size)
    try:
        parts = []
        got = 0
        while got < size:
            # pread: the file's offset is shared with every other worker of the pool.
            part = os.pread(fd, size - got, got)
            if not part:
                raise RuntimeError(f"the pool's setup file ends after {got} of {size} bytes")
            parts.append(part)
            got += len(part)
    finally:
        os.close(fd)
    return b"".join(parts)


def main() -> None:
    from . import _native

    _state["setup"] = setup = pickle.loads(_read_setup(sys.argv[1]))
    del sys.argv[1:]
    if setup["in_place"]:
        _native.serve(_init, _prepare, _finish, _run_into)
    else:
        _native.serve(_init, _run, _finish)
