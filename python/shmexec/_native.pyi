"""Type stubs of the native half of shmexec (built from python/src). Users call
``shmexec.Pool``; these are the pieces it is built on."""

from typing import Callable, Literal, Sequence

import numpy as np
import numpy.typing as npt

TASK_NAME: str

class ResultFrame:
    """One result, in its worker's output ring: lends its bytes (read-only) through the buffer
    protocol; freed when the last array over it is gone."""

    def __len__(self) -> int: ...

class LentFrame:
    """Ring bytes lent to the function for one call (an input, read-only; or the room of a
    result written in place, writable)."""

    def __len__(self) -> int: ...

ArraysAt = list[tuple[int, int]]
Received = (
    tuple[Literal["ok"], int, bytes, ArraysAt, ResultFrame]
    | tuple[Literal["err"], str, int | None, str]
    | tuple[Literal["end"]]
)

class NativeCall:
    def try_send(self, skeleton: bytes, arrays: Sequence[npt.NDArray[np.uint8]]) -> int | None: ...
    def wait_for_room(self, len: int, timeout: float) -> bool: ...
    def close_input(self) -> None: ...
    def recv(self, timeout: float | None = None) -> Received | None: ...
    def finish(self) -> None: ...

class NativePool:
    def __init__(
        self,
        python: str,
        args: list[str],
        workers: int | None,
        input_ring_bytes: int,
        output_ring_bytes: int,
        queue_bytes: int,
        max_attempts: int,
        max_start_attempts: int,
        start_timeout: float,
        chunk_timeout: float | None,
        shutdown_timeout: float,
        pin: str,
        wait: str = "adaptive",
    ) -> None: ...
    @property
    def workers(self) -> int: ...
    @property
    def max_input_bytes(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def start(self, ordered: bool) -> NativeCall: ...
    def stats(self) -> dict: ...
    def pids(self) -> list[int]: ...
    def close(self) -> None: ...

def serve(
    init: Callable[[int, int], None],
    run: Callable[..., object],
    finish: Callable[[], None],
    run_into: Callable[[LentFrame], object] | None = None,
) -> None: ...
