"""Functions the fault tests' pools run (a worker imports them by name, so they live in a
module). Items that steer a function are dicts ``{"x": array, ...}`` or arrays whose first
element says what to do."""

import ctypes
import os
import signal
import subprocess
import sys
import time

import numpy as np

import shmexec

STATE = {}
KEPT = []


def ident(x):
    return x


def double(x):
    return x * 2


def segv_on_three(x):
    """Dies of SIGSEGV in C code (a null read through ctypes) on the item whose value is 3."""
    if int(x[0]) == 3:
        ctypes.string_at(0)
    return x * 2


def exit_on_three(x):
    if int(x[0]) == 3:
        os._exit(3)
    return x * 2


def exit_once(d):
    """``os._exit(3)`` the first time it sees its item (a marker file in ``d["dir"]``
    remembers), the item's value on the next try."""
    marker = os.path.join(d["dir"], f"exited-{int(d['x'][0])}")
    if d.get("fail") and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        os._exit(3)
    return d["x"] * 2


def slow_with_pid(d):
    """Writes its pid to ``d["pidfile"]`` (once the file is written in full), then sleeps
    ``d["sleep"]`` seconds: a target for a kill from outside."""
    if d.get("pidfile"):
        tmp = d["pidfile"] + f".{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(str(os.getpid()))
        os.replace(tmp, d["pidfile"])
    time.sleep(d.get("sleep", 0.0))
    return d["x"] * 2


def sleep_forever_on_three(x):
    if int(x[0]) == 3:
        while True:
            time.sleep(60)
    return x * 2


def sleep_first(x):
    """Sleeps ``x[0]`` seconds, returns ``x``."""
    time.sleep(float(x[0]))
    return x


def pid(x):
    return np.array([os.getpid()], dtype=np.int64)


class BadStr(Exception):
    def __str__(self):
        raise RuntimeError("str() of this exception raises")

    def __repr__(self):
        raise RuntimeError("repr() of this exception raises")


def raise_bad_str(x):
    raise BadStr()


def raise_keyboard_interrupt(x):
    raise KeyboardInterrupt()


def raise_system_exit(x):
    sys.exit(7)


def return_lambda(x):
    return lambda: x


def return_huge_skeleton(x):
    # 4 MiB of Python ints and bytes, pickled with the skeleton: more than the test's rings.
    return {"blob": b"\0" * (4 << 20), "x": x}


def return_big_list(x):
    return [float(v) for v in x]


def return_object_array(x):
    out = np.empty(len(x), dtype=object)
    for i, v in enumerate(x):
        out[i] = ("o", v)
    return out


def mutate_input(x):
    x[0] = 99
    return x


def describe_input(x):
    """What the function saw: the type and, for arrays, dtype and writability."""
    if isinstance(x, np.ndarray):
        return {"type": "ndarray", "dtype": str(x.dtype), "writeable": bool(x.flags.writeable),
                "value": x.tolist() if x.dtype == object else None}
    return {"type": type(x).__name__}


def spawn_grandchild(d):
    """Starts a long ``sleep`` (a grandchild of the pool's process), writes its pid, and
    dies: the grandchild must not outlive the pool."""
    p = subprocess.Popen(["sleep", "120"])
    with open(d["pidfile"], "w") as f:
        f.write(str(p.pid))
    if d.get("crash"):
        os._exit(5)
    return d["x"]


def self_sigkill(x):
    os.kill(os.getpid(), signal.SIGKILL)


# Initializers and finalizers.


def init_remember_dir(path):
    STATE["dir"] = path


def final_write_file():
    with open(os.path.join(STATE["dir"], f"final-{shmexec.worker_index()}"), "w") as f:
        f.write(str(os.getpid()))


def init_exit():
    os._exit(4)


def init_segv():
    ctypes.string_at(0)


def init_hang():
    while True:
        time.sleep(60)


def final_hang():
    while True:
        time.sleep(60)


def final_raises():
    raise RuntimeError("finalizer failed on purpose")


def init_table(table):
    STATE["table"] = table


def lookup_or_exit(d):
    """The table's sum at ``d["x"]``; ``os._exit`` first if ``d["fail"]`` (once, as
    ``exit_once``)."""
    if d.get("fail"):
        marker = os.path.join(d["dir"], "exited")
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(3)
    return STATE["table"][d["x"]]


def note_pid_then_sleep(d):
    """Appends its pid to ``d["log"]`` (one line per item started), sleeps ``d["sleep"]``."""
    with open(d["log"], "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(d["sleep"])
    return d["x"] * 2


def init_note_pid_then_hang(path):
    with open(os.path.join(path, f"init-{os.getpid()}"), "w") as f:
        f.write(str(os.getpid()))
    while True:
        time.sleep(60)


def nested_pool(x):
    """Runs a pool of its own inside a worker."""
    with shmexec.Pool(double, workers=1) as p:
        return next(iter(p.map([x])))


class Scale:
    def __init__(self, k, table=None):
        self.k = k
        self.table = table

    def __call__(self, x):
        return x * self.k

    def method(self, x):
        return x * (self.k + 1)


def times(k, x):
    return x * k


def return_huge_array(x):
    return np.zeros(1 << 18)


def return_odd_things(x):
    return {"scalar": np.float32(3.5), "zero_d": np.array(7), "strided": np.arange(10)[::3],
            "fortran": np.asfortranarray(np.ones((3, 2))), "same_twice": (x, x),
            "empty": np.zeros((0, 5)), "bool": np.array([True, False])}


def write_into_or_die(x, out):
    """Writes ``x * 3`` into ``out``; on the item whose value is 3, dies half-way (a crash
    while its result's slot is reserved in the output ring); on 5 it hangs there."""
    out[: len(out) // 2] = x[: len(out) // 2] * 3
    if int(x[0]) == 3:
        os._exit(9)
    if int(x[0]) == 5:
        while True:
            time.sleep(60)
    out[len(out) // 2:] = x[len(out) // 2:] * 3
