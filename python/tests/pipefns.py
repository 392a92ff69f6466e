"""Stage functions of the pipeline tests: a worker imports them by name, so they live in a
module."""

import os

import numpy as np

RECORD = np.dtype([("time", "<i8"), ("length", "<i4"), ("area", "<f4")])


def to_records(raw):
    """A chunk of samples as records: one per 8 samples, its area their sum."""
    blocks = raw.reshape(-1, 8)
    r = np.zeros(len(blocks), RECORD)
    r["time"] = np.arange(len(blocks)) * 8 + int(raw[0])
    r["length"] = 8
    r["area"] = blocks.sum(axis=1)
    return r


def loud(records):
    return records[records["area"] > 100]


def has_records(records):
    return len(records) > 0


def split_halves(records):
    n = len(records) // 2
    return [records[:n], records[n:]]


def summarize(records):
    return {"n": len(records), "area": float(records["area"].sum())}


def number(next_number, summary):
    """Numbers summaries on from the chunk before (a serial stage's state)."""
    return next_number + 1, (next_number, summary["n"])


def fail_on_seven(records):
    if len(records) and int(records["time"][0]) == 7000:
        raise ValueError("chunk seven")
    return records


def crash_once(state, x):
    """Crashes its worker the first time it sees input 3 (a marker file says it did)."""
    marker = os.environ.get("SHMEXEC_TEST_MARKER")
    if marker and int(x[0]) == 3 and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(9)
    return state + int(x[0]), state


def raise_on_two(state, x):
    if int(x[0]) == 2:
        raise RuntimeError("two")
    return state + [int(x[0])], len(state)


def bad_stateful(state, x):
    return x


def identity(x):
    return x


def pid(x):
    return np.array([os.getpid()])


def slow(x):
    import time

    time.sleep(0.05)
    return x


CALLS = os.environ.get("SHMEXEC_TEST_CALLS")


def counted_records(raw):
    """to_records, noting each call in a file (how many chunks a run computed)."""
    if CALLS:
        with open(CALLS, "a") as f:
            f.write("x\n")
    return to_records(raw)


def big(x):
    """300 KB out: three fill a 1 MiB ring."""
    return np.full(300_000 // 8, int(x[0]), np.int64)


def count_with_array_state(state, x):
    """An array state, changed in place."""
    if state is None:
        state = np.zeros(300_000 // 8, np.int64)
    state += 1
    return state, int(state[0])


def wait_for_file(x):
    import time

    while not os.path.exists(os.environ["SHMEXEC_TEST_MARKER"]):
        time.sleep(0.01)
    return x


def count(state, x):
    return state + 1, (state, int(x[0]))


def even(x):
    return int(x[0]) % 2 == 0


def plus1(x):
    return x + 1
