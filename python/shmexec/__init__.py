"""shmexec: a process pool for numpy arrays that never pickles one.

Worker processes run a function over a stream of chunks (numpy arrays of any dtype, or
tuples/dicts/objects holding them); chunks and results travel through shared-memory rings, so
a 64 MiB array is copied once into a ring and read there in place, never pickled or pushed
through a pipe. Results come in input order (or as they finish), memory is bounded by the
rings, a crashed worker is replaced, and nothing is left behind: no process, no /dev/shm file.

>>> import numpy as np, shmexec
>>> from mypackage.dsp import baseline     # a function defined in a module  # doctest: +SKIP
>>> with shmexec.Pool(baseline, workers=2) as pool:                          # doctest: +SKIP
...     for out in pool.map(np.zeros(1 << 20, np.float32) for _ in range(100)):
...         print(out.mean())
"""

from ._errors import (
    ChunkTimeout,
    InitError,
    InvalidItem,
    ItemError,
    ItemTooLarge,
    OutputsHeld,
    PoolBroken,
    PoolError,
    ShmexecError,
    StoreError,
    TaskError,
    WorkerCrashed,
)
from ._pipeline import Pipeline, PipelineStream, Run
from ._pool import Pool, Results, Stream
from ._store import SavedStream, StageKey, Store
from ._worker import worker_index

__all__ = [
    "Pool",
    "Results",
    "Stream",
    "Pipeline",
    "Run",
    "PipelineStream",
    "Store",
    "StageKey",
    "SavedStream",
    "StoreError",
    "worker_index",
    "ShmexecError",
    "ItemError",
    "TaskError",
    "WorkerCrashed",
    "ChunkTimeout",
    "ItemTooLarge",
    "InvalidItem",
    "OutputsHeld",
    "InitError",
    "PoolBroken",
    "PoolError",
]
__version__ = "0.1.0"
