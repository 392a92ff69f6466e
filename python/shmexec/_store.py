"""``shmexec.Store``: saved outputs of pipeline stages, by key, read back where they are
mapped.

A stage's outputs are saved under its ``StageKey`` (its name, version and configuration, and
the keys of the stages before it down to the run's source key), one chunk file per input, each
holding the result exactly as it lay in shared memory (its arrays' raw bytes and a small
pickle of the rest). A stream becomes visible under its key only once its run went through
every input without a failed item (files written under a temporary name, synced, renamed: a
crash leaves nothing half-written under the key). Reading a chunk maps its file: its arrays
are read-only numpy views of the page cache, no copy.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from . import _codec, _native

#: The key of a stage's output stream: ``StageKey(name, version="", config=b"", inputs=())``;
#: ``config`` is bytes or a str that does not change between runs of the same settings.
#: ``key.id`` is 64 hex digits over all of it, ``key.history()`` the stages that make it.
StageKey = _native.StageKey


class Store:
    """A directory of saved stage outputs (made if missing), shared safely by several
    processes: two runs saving one key both succeed, and a reader sees a stream whole or not
    at all.

    >>> store = shmexec.Store("/data/cache")                       # doctest: +SKIP
    >>> pipe = (shmexec.Pipeline(workers=2)
    ...         .map(to_records).map(find_peaks, version="2", config="threshold 3")
    ...         .save(store)
    ...         .stateful(number, initial=0))
    >>> run = pipe.run(chunks, key=shmexec.StageKey("raw_records", "run 42"))
    >>> # A later run with the same key reads the saved peaks and skips the stages before.
    """

    def __init__(self, path: str | os.PathLike):
        self._native = _native.NativeStore(os.fspath(path))

    @property
    def path(self) -> str:
        return os.fspath(self._native.path)

    def load(self, key: StageKey) -> "SavedStream | None":
        """The complete stream saved under ``key``, or ``None``. Raises ``StoreError`` for a
        directory under the key that the store did not complete (it says what to do)."""
        saved = self._native.load(key)
        return None if saved is None else SavedStream(saved)

    def remove(self, key: StageKey) -> bool:
        """Removes the stream of ``key``; ``False`` if there was none."""
        return self._native.remove(key)

    def remove_stale_partials(self) -> list[str]:
        """Removes what writers that died (a killed run) left in the store: temporary
        directories whose process is gone. Returns their paths. Process ids are this
        machine's: not for a store that processes of other machines (a shared file system)
        or containers write at the same time."""
        return [os.fspath(p) for p in self._native.remove_stale_partials()]

    def __repr__(self) -> str:
        return f"<shmexec.Store {self.path!r}>"


class SavedStream:
    """A saved stream: ``len()`` chunks, one per input that reached the stage in the run that
    saved it; each chunk is that input's output (where the stage's group filters or
    flattens, the list of its outputs). A run served from it numbers its items by chunk.
    Iterating (or indexing) reads each chunk where it is mapped: its arrays are read-only
    views that hold the mapping; its checksum is checked first."""

    def __init__(self, native):
        self._native = native

    def __len__(self) -> int:
        return len(self._native)

    @property
    def name(self) -> str:
        return self._native.name

    @property
    def id(self) -> str:
        return self._native.id

    def history(self) -> list[tuple[str, str, str]]:
        """``(name, version, id)`` of every stage that made it, inputs first."""
        return self._native.history()

    def __getitem__(self, index: int) -> Any:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"chunk {index} of a stream of {len(self)}")
        skeleton, arrays, frame = self._native.chunk(index)
        return _codec.decode(frame, skeleton, arrays)

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"<shmexec.SavedStream {self.name!r}: {len(self)} chunks>"
