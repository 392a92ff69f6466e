"""The exceptions of shmexec. Every error of an item is raised from the results iterator in
that item's place (or, with ``errors="yield"``, given in its place), and the pool goes on."""

from __future__ import annotations


#: The first line of a worker's failure text when a stage of a pipeline raised: it names the
#: stage (``shmexec._worker._failure`` writes it, ``shmexec._pipeline`` reads it).
STAGE_MARK = "shmexec stage: "


def check_errors(errors: str) -> str:
    if errors not in ("raise", "yield"):
        raise ValueError(f"errors must be 'raise' or 'yield', got {errors!r}")
    return errors


class ShmexecError(Exception):
    """Base class of every shmexec error."""


class ItemError(ShmexecError):
    """An error of one item. ``index`` is the item's position in its call's input (``None``
    when the error is not one item's); in a ``Pipeline``, ``stage`` names the stage it failed
    in (for a crash or a timeout, the stages of the group that ran it, joined by " + ")."""

    stage: str | None = None

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


class TaskError(ItemError):
    """The function raised on this item. ``traceback`` is the worker's traceback text;
    ``remote_type`` the exception's type name as the worker saw it."""

    def __init__(self, message: str, index: int | None = None, traceback: str = ""):
        super().__init__(message, index)
        self.traceback = traceback
        last = traceback.strip().splitlines()[-1] if traceback.strip() else ""
        self.remote_type = last.split(":", 1)[0] if last else ""

    def __str__(self) -> str:
        return f"{self.args[0]}\n\nRemote traceback:\n{self.traceback}"


class WorkerCrashed(ItemError):
    """The item killed its worker (a segfault in a C extension, ``os._exit``, the OOM killer)
    as many times as the pool's ``max_attempts``, or was queued to a worker that could not be
    started again. The worker was replaced; the pool goes on."""


class ChunkTimeout(ItemError):
    """The item ran past the pool's ``chunk_timeout``; its worker was killed and replaced."""


class ItemTooLarge(ItemError):
    """The item (or its result) does not fit its worker's ring: raise ``input_ring_bytes``
    (``output_ring_bytes``) or split the chunk."""


class InvalidItem(ItemError):
    """The item could not be written, or a result frame did not read back."""


class OutputsHeld(ShmexecError):
    """A worker's output ring is full of results the caller still holds (numpy arrays that
    point into it, collected in a list, say): the call ends here, not in a wait for ever.
    Drop them and start again, keeping copies (``numpy.array(x)``) or passing ``copy=True``
    to ``map``."""


class InitError(ShmexecError):
    """A worker could not start: the function could not be found in a fresh interpreter, or
    the initializer raised. The message holds the worker's traceback."""


class PoolBroken(ShmexecError):
    """The pool cannot go on (every worker given up, a transport failure)."""


class StoreError(ShmexecError):
    """A saved stream could not be written or read (the file system, or a damaged stream:
    the message names the path and what to do)."""


class PoolError(ShmexecError):
    """Any other failure of the pool (out of memory at start, a bad setting, the system)."""


_KINDS = {
    "crashed": WorkerCrashed,
    "timeout": ChunkTimeout,
    "too_large": ItemTooLarge,
    "invalid": InvalidItem,
}


class RaisesAlone:
    """An iterator whose ``_next()`` gives ``(item, None)``, or ``(None, exc)`` for an
    item's error, which ``__next__`` raises from a frame that no longer names the iterator:
    the error's traceback keeps that frame (and none below, ``_next`` having returned), and a
    caller that keeps the error (``except ... as e``, a test's ``pytest.raises``) would
    otherwise keep the call, and its pool, busy."""

    def _next(self):
        raise NotImplementedError

    def __next__(self):
        item, exc = self._next()
        if exc is None:
            return item
        del self
        raise exc


def caused_by(err: BaseException, cause: BaseException) -> BaseException:
    """``err`` with ``cause`` as its ``__cause__``, without the cause's traceback. That
    traceback holds the frame that caught it, whose locals (the call, the run) then live as
    long as ``err`` does: raised later, and held by a caller's ``except`` or a test's
    ``pytest.raises``, it would keep the pool busy. The cause's type and message say enough
    (it comes from pickling or unpickling, in shmexec's frames)."""
    err.__cause__ = cause.with_traceback(None)
    return err


def make(kind: str, index: int | None, message: str) -> ShmexecError:
    """The exception for an error of ``kind`` (as the native side sorts them)."""
    if kind == "task":
        last = message.strip().splitlines()[-1] if message.strip() else "the function raised"
        where = f"item {index}" if index is not None else "an item"
        return TaskError(f"{where}: {last}", index, message)
    if kind in _KINDS:
        return _KINDS[kind](message, index)
    if kind == "outputs_held":
        return OutputsHeld(message)
    if kind == "init":
        return InitError(message)
    if kind == "broken":
        return PoolBroken(message)
    if kind == "store":
        return StoreError(message)
    if kind == "setting":
        return ValueError(message)
    return PoolError(message)
