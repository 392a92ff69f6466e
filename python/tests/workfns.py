"""Functions the tests' pools run: a worker imports them by name, so they live in a module."""

import os
import time

import numpy as np

import shmexec

KEPT = []
STATE = {}


def double(x):
    return x * 2


def total(x):
    return np.array([x.sum()])


def records_in_records_out(d):
    r = d["records"]
    out = np.zeros(len(r), dtype=[("time", "<i8"), ("area", "<f4")])
    out["time"] = r["time"] + d["meta"]["shift"]
    out["area"] = r["data"].sum(axis=1)
    return out, {"n": len(r), "tag": d["meta"]["tag"]}


def pair(t):
    a, b, label = t
    return {"sum": a + b, "label": label.upper(), "none": None}


def fail_on_three(x):
    if int(x[0]) == 3:
        raise ValueError(f"three at {x[0]}")
    return x + 1


def keep_input(x):
    KEPT.append(x)
    return x.sum()


def return_input_view(x):
    return x[2:5]


def scalar(x):
    return float(x.sum())


def sleepy(x):
    time.sleep(float(x[0]))
    return x


def set_state(value):
    STATE["value"] = value
    STATE["worker"] = shmexec.worker_index()


def init_fails():
    raise RuntimeError("no database here")


def read_state(x):
    return np.array([STATE["value"], STATE["worker"]], dtype=np.int64)


def write_into(x, out):
    np.multiply(x, 3, out=out)
    return int((out > 10).sum())


def out_half(x):
    return (len(x) // 2,), np.float64


def write_half(x, out):
    out[:] = x[: len(out)].astype(np.float64)


def pid(x):
    return np.array([os.getpid()])


def returns_out(x, out):
    np.subtract(x, 1, out=out)
    return out


def out_vectors(x):
    return (len(x),), np.dtype((np.float64, (3,)))


def write_vectors(x, out):
    out[:] = x[:, None]


def keep_out(x, out):
    out[:] = x
    if not KEPT:
        KEPT.append(out)
    else:
        KEPT[0][:] = -1


def returns_worker_only(x):
    """An object of a class that only the worker can import."""
    import sys
    import types

    m = types.ModuleType("shmexec_only_in_worker")
    exec("class Thing:\n    pass\n", m.__dict__)
    m.Thing.__module__ = "shmexec_only_in_worker"
    sys.modules["shmexec_only_in_worker"] = m
    return (x, m.Thing())


def where_input(x):
    """The input's sum, whether it is writable, and which object lends its memory (the
    shared region, or the item's frame in the ring)."""
    owner = x
    while isinstance(owner, np.ndarray):
        owner = owner.base
    if isinstance(owner, memoryview):
        owner = owner.obj
    return float(x.sum(dtype=np.float64)), x.flags.writeable, type(owner).__name__


def where_parts(d):
    return {k: where_input(v)[2] for k, v in d.items()}


def write_input(x):
    x[0] = 1
    return x


def with_scalar(t):
    """(x * 2, the scalar given) for t = (x, scalar): the pair travels without a pickler."""
    x, s = t
    return x * 2, s
