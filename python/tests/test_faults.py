"""Fault tests: what a worker's death, a hang, Ctrl-C, a kill from outside, threads and odd
items do to a pool. Nothing may hang, crash the caller, lose or repeat an item, or leave a
process or a /dev/shm file behind.

Every wait is bounded: a scenario that could hang the caller (signals, kills of the caller)
runs in a subprocess under ``subprocess.run(timeout=...)``, and every test in this process
runs under ``faulthandler.dump_traceback_later``, which prints every thread's stack and ends
the run if a test hangs.
"""

import faulthandler
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import faultfns
import shmexec

HERE = os.path.dirname(os.path.abspath(__file__))
#: Seconds one test may take before the run is ended with every thread's stack.
HANG_GUARD = 60


#: Names in /dev/shm that are not shmexec's: CPython's multiprocessing.shared_memory and
#: semaphores, which other programs on this machine (a benchmark against multiprocessing) make
#: while these tests run. shmexec's memory is anonymous (memfd) and never has a name there.
_NOT_OURS = ("psm_", "sem.", "wnsm_")


def shm_files():
    try:
        return {n for n in os.listdir("/dev/shm") if not n.startswith(_NOT_OURS)}
    except FileNotFoundError:
        return set()


def alive(pid):
    """Whether process ``pid`` exists and is not a zombie (a container's init may be slow to
    reap orphans: a zombie holds no memory and runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def wait_gone(pids, grace=5.0):
    """The pids of ``pids`` still alive after at most ``grace`` seconds."""
    deadline = time.monotonic() + grace
    left = [p for p in pids if p]
    while left and time.monotonic() < deadline:
        left = [p for p in left if alive(p)]
        if left:
            time.sleep(0.05)
    return left


@pytest.fixture(scope="module", autouse=True)
def no_shm_leftovers():
    """/dev/shm is the same at the end of this module as at its start (shmexec's memory is
    anonymous: a name there would be a leak)."""
    before = shm_files()
    yield
    gc.collect()
    after = shm_files()
    assert after - before == set(), f"new files in /dev/shm: {sorted(after - before)}"


@pytest.fixture(autouse=True)
def hang_guard():
    faulthandler.dump_traceback_later(HANG_GUARD, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def arrays(values, size=16, dtype=np.int64):
    return [np.full(size, v, dtype) for v in values]


def run_script(body, timeout=30, signal_after=None, **popen):
    """Runs ``body`` (dedented) as a script with this directory on ``sys.path``; returns
    (returncode, stdout, stderr). With ``signal_after=(line, sig)``, sends ``sig`` once the
    script has printed a line starting with ``line``."""
    code = "import sys; sys.path.insert(0, %r)\n" % HERE + textwrap.dedent(body)
    if signal_after is None:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=timeout, cwd=HERE)
        return p.returncode, p.stdout, p.stderr
    marker, sig = signal_after
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=HERE)
    lines = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            line = p.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith(marker):
                p.send_signal(sig)
                break
            if time.monotonic() > deadline:
                raise TimeoutError("the script never printed " + marker)
        sent = time.monotonic()
        out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        return p.returncode, "".join(lines) + out, err, time.monotonic() - sent
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()


def printed_pids(out, tag="PIDS"):
    for line in out.splitlines():
        if line.startswith(tag + " "):
            return [int(v) for v in line.split()[1:]]
    raise AssertionError(f"no {tag} line in {out!r}")


# 1. A segfault in C code.


def test_a_segfault_fails_its_item_alone_and_the_pool_goes_on():
    data = arrays(range(8))
    with shmexec.Pool(faultfns.segv_on_three, workers=2, max_attempts=2) as p:
        before = set(p.pids())
        out = list(p.map(data, errors="yield"))
        assert len(out) == 8
        assert isinstance(out[3], shmexec.WorkerCrashed), out[3]
        assert out[3].index == 3
        for i, o in enumerate(out):
            if i != 3:
                np.testing.assert_array_equal(o, data[i] * 2)
        st = p.stats()
        # Two attempts, two deaths, two replacements.
        assert st["respawns"] >= 2
        assert set(p.pids()) != before and all(p.pids())
        # Raised in its place by default, the iterator going on after it.
        it = p.map(data)
        got = [int(next(it)[0]) for _ in range(3)]
        with pytest.raises(shmexec.WorkerCrashed) as e:
            next(it)
        assert e.value.index == 3
        got += [int(r[0]) for r in it]
        assert got == [0, 2, 4, 8, 10, 12, 14]
        # The next call is as good as new.
        assert [int(r[0]) for r in p.map(arrays([1, 2]))] == [2, 4]
        pids = p.pids()
    assert wait_gone(pids) == []


def test_a_crash_with_one_attempt_is_not_retried():
    with shmexec.Pool(faultfns.exit_on_three, workers=1, max_attempts=1) as p:
        out = list(p.map(arrays(range(6)), errors="yield"))
        assert isinstance(out[3], shmexec.WorkerCrashed) and out[3].index == 3
        assert [int(o[0]) for i, o in enumerate(out) if i != 3] == [0, 2, 4, 8, 10]
        assert p.stats()["respawns"] == 1


# 2. os._exit and a kill from outside.


def test_os_exit_once_is_retried_on_a_replacement(tmp_path):
    items = [{"x": np.full(4, i), "dir": str(tmp_path), "fail": i in (2, 5)} for i in range(8)]
    with shmexec.Pool(faultfns.exit_once, workers=2, max_attempts=2) as p:
        out = [int(r[0]) for r in p.map(items)]
        assert out == [2 * i for i in range(8)]
        assert p.stats()["respawns"] >= 2
    assert sorted(os.listdir(tmp_path)) == ["exited-2", "exited-5"]


def test_os_exit_every_time_is_worker_crashed():
    with shmexec.Pool(faultfns.exit_on_three, workers=2, max_attempts=2) as p:
        out = list(p.map(arrays(range(6)), errors="yield"))
        assert isinstance(out[3], shmexec.WorkerCrashed) and out[3].index == 3
        assert "item 3 crashed its worker 2 times" in str(out[3])
        assert sum(isinstance(o, Exception) for o in out) == 1


def test_errors_of_a_later_call_name_the_item_by_its_place_in_that_call():
    """The native errors number items over the pool's life; the caller knows an item by its
    place in its own call (``index``), and the message must say the same."""
    with shmexec.Pool(faultfns.exit_on_three, workers=1, max_attempts=1) as p:
        for _ in range(2):
            out = list(p.map(arrays(range(5)), errors="yield"))
            assert out[3].index == 3 and str(out[3]).startswith("item 3 "), str(out[3])
    with shmexec.Pool(faultfns.sleep_forever_on_three, workers=1, chunk_timeout=0.3) as p:
        for _ in range(2):
            out = list(p.map(arrays(range(5)), errors="yield"))
            assert isinstance(out[3], shmexec.ChunkTimeout)
            assert out[3].index == 3 and str(out[3]).startswith("item 3 "), str(out[3])
    with shmexec.Pool(faultfns.double, workers=1, ring_bytes=1 << 20) as p:
        for _ in range(2):
            items = [np.ones(1 << 18) if i == 3 else np.ones(4) for i in range(5)]
            out = list(p.map(items, errors="yield"))
            assert isinstance(out[3], shmexec.ItemTooLarge)
            assert out[3].index == 3 and str(out[3]).startswith("item 3 "), str(out[3])
            # In the Python pool's terms, not the Rust builder's.
            assert "input_ring_bytes" in str(out[3]) and "Builder" not in str(out[3])


def _kill_when_written(pidfile, killed, times=1, timeout=20.0):
    """SIGKILLs the process named in ``pidfile`` once it is written, ``times`` times (each a
    process not killed before: the item's next attempt)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(killed) < times:
        try:
            with open(pidfile) as f:
                pid = int(f.read())
        except (FileNotFoundError, ValueError):
            pid = None
        if pid is None or pid in killed:
            time.sleep(0.01)
            continue
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_worker_killed_from_outside_mid_item_is_retried(tmp_path, workers):
    pidfile = str(tmp_path / "pid")
    items = [{"x": np.full(4, i)} for i in range(6)]
    items[2] = {"x": np.full(4, 2), "pidfile": pidfile, "sleep": 1.0}
    killed = []
    killer = threading.Thread(target=_kill_when_written, args=(pidfile, killed))
    with shmexec.Pool(faultfns.slow_with_pid, workers=workers, max_attempts=2) as p:
        killer.start()
        out = [int(r[0]) for r in p.map(items)]
        killer.join(timeout=20)
        assert len(killed) == 1
        assert out == [0, 2, 4, 6, 8, 10]
        assert killed[0] not in p.pids()
        assert p.stats()["respawns"] >= 1
        # The retry ran on a replacement: the pid file names it now.
        with open(pidfile) as f:
            assert int(f.read()) != killed[0]
        assert [int(r[0]) for r in p.map(items[:2])] == [0, 2]


def test_an_item_killed_from_outside_on_every_attempt_is_worker_crashed(tmp_path):
    """A kill from outside during an item is a crash charged to that item: killed on both of
    its attempts (max_attempts=2), it fails with WorkerCrashed; the others come."""
    pidfile = str(tmp_path / "pid")
    items = [{"x": np.full(4, i)} for i in range(5)]
    items[1] = {"x": np.full(4, 1), "pidfile": pidfile, "sleep": 1.0}
    killed = []
    killer = threading.Thread(target=_kill_when_written, args=(pidfile, killed, 2))
    with shmexec.Pool(faultfns.slow_with_pid, workers=2, max_attempts=2) as p:
        killer.start()
        out = list(p.map(items, errors="yield"))
        killer.join(timeout=20)
        assert len(killed) == 2
        assert isinstance(out[1], shmexec.WorkerCrashed) and out[1].index == 1, out[1]
        assert [int(o[0]) for i, o in enumerate(out) if i != 1] == [0, 4, 6, 8]


def test_an_idle_worker_killed_from_outside_is_replaced():
    with shmexec.Pool(faultfns.pid, workers=2) as p:
        victim = p.pids()[0]
        os.kill(victim, signal.SIGKILL)
        assert wait_gone([victim]) == []
        seen = {int(r[0]) for r in p.map(arrays(range(20)))}
        assert victim not in seen
        assert len(seen) >= 1
        assert victim not in p.pids()


def test_a_worker_that_kills_itself_fails_its_item():
    with shmexec.Pool(faultfns.self_sigkill, workers=1, max_attempts=2) as p:
        out = list(p.map(arrays([0, 1]), errors="yield"))
        assert [type(o) for o in out] == [shmexec.WorkerCrashed] * 2
        assert [o.index for o in out] == [0, 1]


@pytest.mark.parametrize("ordered", [True, False])
def test_crashes_here_and_there_lose_and_repeat_nothing(tmp_path, ordered):
    fail = {3, 4, 11, 17, 18, 29}
    items = [{"x": np.full(4, i), "dir": str(tmp_path), "fail": i in fail} for i in range(40)]
    with shmexec.Pool(faultfns.exit_once, workers=2, max_attempts=2) as p:
        results = p.map(items) if ordered else p.imap_unordered(items)
        got = [int(r[0]) // 2 for r in results]
        assert p.stats()["respawns"] >= len(fail)
    assert (got if ordered else sorted(got)) == list(range(40))


def test_workers_killed_again_and_again_from_outside(tmp_path):
    """A killer kills whichever worker started an item last, six times, each once the
    replacement before it has started an item: every result still comes once, in order."""
    log = str(tmp_path / "log")
    open(log, "w").close()
    items = [{"x": np.full(4, i), "log": log, "sleep": 0.02} for i in range(100)]
    kills = []
    done = threading.Event()

    def killer():
        seen = set()
        while len(kills) < 6 and not done.is_set():
            with open(log) as f:
                pids = [int(v) for v in f.read().split()]
            fresh = [q for q in pids if q not in seen]
            if fresh:
                seen.update(fresh)
                victim = fresh[-1]
                try:
                    os.kill(victim, signal.SIGKILL)
                    kills.append(victim)
                except ProcessLookupError:
                    pass
                time.sleep(0.1)
            time.sleep(0.01)

    t = threading.Thread(target=killer)
    with shmexec.Pool(faultfns.note_pid_then_sleep, workers=2, max_attempts=10) as p:
        t.start()
        try:
            got = [int(r[0]) // 2 for r in p.map(items)]
        finally:
            done.set()
            t.join(10)
        assert got == list(range(100))
        assert len(kills) >= 3
        assert p.stats()["respawns"] >= len(kills)
        assert not set(kills) & set(p.pids())


def test_a_stopped_worker_is_a_chunk_timeout(tmp_path):
    pidfile = str(tmp_path / "pid")
    items = [{"x": np.full(4, i)} for i in range(4)]
    items[1] = {"x": np.full(4, 1), "pidfile": pidfile, "sleep": 0.5}
    stopped = []

    def stop_it():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not stopped:
            try:
                with open(pidfile) as f:
                    q = int(f.read())
            except (FileNotFoundError, ValueError):
                time.sleep(0.01)
                continue
            os.kill(q, signal.SIGSTOP)
            stopped.append(q)

    t = threading.Thread(target=stop_it)
    with shmexec.Pool(faultfns.slow_with_pid, workers=2, chunk_timeout=1.0) as p:
        t.start()
        out = list(p.map(items, errors="yield"))
        t.join(20)
        assert stopped
        assert isinstance(out[1], shmexec.ChunkTimeout), out[1]
        assert [int(o[0]) for i, o in enumerate(out) if i != 1] == [0, 4, 6]
    assert wait_gone(stopped) == []


# 3. chunk_timeout.


def test_a_chunk_that_never_ends_times_out_alone():
    with shmexec.Pool(faultfns.sleep_forever_on_three, workers=2, chunk_timeout=0.5) as p:
        out = list(p.map(arrays(range(6)), errors="yield"))
        assert isinstance(out[3], shmexec.ChunkTimeout), out[3]
        assert out[3].index == 3
        assert [int(o[0]) for i, o in enumerate(out) if i != 3] == [0, 2, 4, 8, 10]
        assert p.stats()["respawns"] >= 1
        assert [int(r[0]) for r in p.map(arrays([7]))] == [14]


def test_a_crash_or_a_timeout_while_a_result_is_written_in_place():
    """Pool(fn, out=...): the worker dies (3) or hangs (5) with its result's slot reserved in
    its output ring, half written; the replacement takes the ring over cleanly."""
    with shmexec.Pool(faultfns.write_into_or_die, workers=1, out="like_input", chunk_timeout=0.5,
                      ring_bytes=1 << 20, max_attempts=1) as p:
        for _ in range(2):
            out = list(p.map([np.full(1 << 14, i, np.int64) for i in range(8)], errors="yield"))
            assert isinstance(out[3], shmexec.WorkerCrashed) and out[3].index == 3, out[3]
            assert isinstance(out[5], shmexec.ChunkTimeout) and out[5].index == 5, out[5]
            for i, o in enumerate(out):
                if i not in (3, 5):
                    assert int(o.min()) == int(o.max()) == 3 * i, i
            del out, o


# 4. Ctrl-C and a killed caller.

_SLOW_MAP = """
    import os, time
    import numpy as np
    import shmexec, faultfns

    if __name__ == "__main__":
        pool = shmexec.Pool(faultfns.sleep_first, workers=2)
        print("PIDS", *pool.pids(), flush=True)
        try:
            for i, r in enumerate(pool.map(np.full(4, 0.15) for _ in range(1000))):
                if i == 1:
                    print("RUNNING", flush=True)
        except KeyboardInterrupt:
            print("INTERRUPTED", flush=True)
            if not {again}:
                raise
        {after_interrupt}
"""


def test_ctrl_c_ends_the_caller_and_its_workers():
    shm = shm_files()
    rc, out, err, took = run_script(_SLOW_MAP.format(again=False, after_interrupt="pass"),
                                    signal_after=("RUNNING", signal.SIGINT))
    assert "INTERRUPTED" in out, (out, err)
    assert "KeyboardInterrupt" in err
    assert rc != 0
    assert took < 5, f"the caller took {took:.1f} s to exit after SIGINT"
    assert wait_gone(printed_pids(out)) == []
    assert shm_files() - shm == set()


def test_after_ctrl_c_the_pool_still_works():
    # After the except block (whose traceback holds the interrupted call) the pool takes the
    # next call.
    after = """
            import gc; gc.collect()
            print("AGAIN", [int(r[0]) for r in pool.map(np.zeros(4) + i for i in range(3))], flush=True)
            pool.close()
            print("CLOSED", flush=True)
    """
    body = _SLOW_MAP.format(again=True,
                            after_interrupt=textwrap.indent(textwrap.dedent(after), " " * 8).strip())
    rc, out, err, took = run_script(body, signal_after=("RUNNING", signal.SIGINT))
    assert "AGAIN [0, 1, 2]" in out, (out, err)
    assert "CLOSED" in out
    assert wait_gone(printed_pids(out)) == []


def test_ctrl_c_while_the_workers_start(tmp_path):
    """Ctrl-C while Pool(...) waits for its workers (a slow import, an initializer that hangs)
    raises KeyboardInterrupt at once, not after start_timeout; the workers that were starting
    are gone by start_timeout + shutdown_timeout, the caller still running."""
    rc, out, err, took = run_script(f"""
        import os, threading, time
        import shmexec, faultfns

        seen = []

        def watch():
            while len(os.listdir({str(tmp_path)!r})) < 2:
                time.sleep(0.01)
            seen.append(time.monotonic())
            print("INIT-RUNNING", flush=True)

        if __name__ == "__main__":
            threading.Thread(target=watch, daemon=True).start()
            try:
                shmexec.Pool(faultfns.double, workers=2, initializer=faultfns.init_note_pid_then_hang,
                             initargs=({str(tmp_path)!r},), start_timeout=3, shutdown_timeout=0.5)
            except KeyboardInterrupt:
                print("INTERRUPTED", time.monotonic() - seen[0], flush=True)
            pids = [int(n.split("-")[1]) for n in os.listdir({str(tmp_path)!r})]
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and any(os.path.exists(f"/proc/{{p}}") for p in pids):
                time.sleep(0.05)
            print("WORKERS-GONE", all(not os.path.exists(f"/proc/{{p}}") for p in pids), flush=True)
    """, signal_after=("INIT-RUNNING", signal.SIGINT))
    assert "INTERRUPTED" in out, (out, err)
    took = float(out.split("INTERRUPTED")[1].split()[0])
    assert took < 2.0, f"Ctrl-C took {took:.1f} s to stop a pool's start"
    assert "WORKERS-GONE True" in out, (out, err)


def test_a_sigkilled_caller_takes_its_workers_down():
    shm = shm_files()
    rc, out, err, took = run_script(_SLOW_MAP.format(again=False, after_interrupt="pass"),
                                    signal_after=("RUNNING", signal.SIGKILL))
    assert rc == -signal.SIGKILL
    pids = printed_pids(out)
    assert len(pids) == 2
    assert wait_gone(pids) == [], "workers outlived their SIGKILLed caller"
    assert shm_files() - shm == set()


def test_a_sigterm_caller_takes_its_workers_down():
    rc, out, err, took = run_script(_SLOW_MAP.format(again=False, after_interrupt="pass"),
                                    signal_after=("RUNNING", signal.SIGTERM))
    assert rc == -signal.SIGTERM
    assert wait_gone(printed_pids(out)) == []


def test_a_caller_that_exits_without_closing_leaves_nothing():
    rc, out, err = run_script("""
        import numpy as np, shmexec, faultfns
        if __name__ == "__main__":
            pool = shmexec.Pool(faultfns.double, workers=2)
            it = pool.map(np.ones(4) for _ in range(100))
            next(it)
            print("PIDS", *pool.pids(), flush=True)
            # No close, an iterator half read: the interpreter's exit must clean up.
    """)
    assert rc == 0, err
    assert wait_gone(printed_pids(out)) == []


def test_os_exit_of_the_caller_leaves_no_worker():
    rc, out, err = run_script("""
        import os, numpy as np, shmexec, faultfns
        if __name__ == "__main__":
            pool = shmexec.Pool(faultfns.double, workers=2)
            list(pool.map([np.ones(4)]))
            print("PIDS", *pool.pids(), flush=True)
            os._exit(0)
    """)
    assert rc == 0, err
    assert wait_gone(printed_pids(out)) == []


def test_a_forked_child_neither_uses_nor_shuts_down_its_parents_pool():
    """``os.fork()`` of a caller that has a pool (a pre-fork server, a plain fork) gives the
    child a copy of the pool object. The child must not be able to use it, and its exit (the
    interpreter's shutdown drops every object) must neither stop the parent's workers nor
    release the parent's held results in the shared rings."""
    rc, out, err = run_script("""
        import gc, os, sys
        import numpy as np, shmexec, faultfns

        def child(pool, held):
            try:
                pool.map([np.ones(2)])
                print("CHILD-USED-IT", flush=True)
            except RuntimeError as e:
                print("CHILD-REFUSED", "fork" in str(e), flush=True)
            del held
            gc.collect()
            sys.exit(0)  # a normal exit: the interpreter's shutdown runs

        if __name__ == "__main__":
            pool = shmexec.Pool(faultfns.double, workers=1, ring_bytes=1 << 20)
            pids = pool.pids()
            (held,) = pool.map([np.full(8192, 21, np.int64)])  # 64 KiB, held
            pid = os.fork()
            if pid == 0:
                child(pool, held)
            assert os.waitpid(pid, 0)[1] == 0
            assert pool.pids() == pids, "the child's exit took the parent's workers"
            # More results than the ring holds beside `held`: the ring stays pinned by it
            # (OutputsHeld), unless the child released it, and then they overwrite it.
            try:
                for r in pool.map(np.full(8192, 1, np.int64) for _ in range(24)):
                    assert int(r[0]) == 2
            except shmexec.OutputsHeld:
                pass
            assert int(held.min()) == int(held.max()) == 42, "a held result was overwritten"
            del held, r
            # Forked while a call is half read: the child's copy of the call drops too.
            it = pool.map(np.full(2, i) for i in range(6))
            assert int(next(it)[0]) == 0
            pid = os.fork()
            if pid == 0:
                it = None
                child(pool, None)
            assert os.waitpid(pid, 0)[1] == 0
            assert [int(r[0]) for r in it] == [2, 4, 6, 8, 10]
            assert [int(r[0]) for r in pool.map([np.ones(2)])] == [2]
            pool.close()
            print("PARENT-OK", flush=True)
    """)
    assert out.count("CHILD-REFUSED True") == 2, (out, err)
    assert "PARENT-OK" in out, (out, err)
    assert "panicked" not in err, err


# 5. Backpressure.


def test_the_input_is_pulled_lazily_behind_a_slow_consumer():
    item = 64 << 10
    ring = 1 << 20
    workers = 2
    pulled = [0]

    def source():
        for i in range(10_000):
            pulled[0] += 1
            yield np.full(item // 8, i, np.int64)

    # Every item in flight lies in an input ring (or its queue) or, done, in an output ring.
    bound = workers * (2 * ring) // item + 2 * workers + 4
    with shmexec.Pool(faultfns.ident, workers=workers, ring_bytes=ring, queue_bytes=ring // 4) as p:
        it = p.map(source())
        ahead = []
        for i in range(60):
            r = next(it)
            assert int(r[0]) == i
            del r
            time.sleep(0.01)
            ahead.append(pulled[0] - (i + 1))
        it.close()
    assert max(ahead) <= bound, (max(ahead), bound)
    assert pulled[0] < 60 + bound


def test_a_stream_submit_waits_for_room_instead_of_queueing_everything():
    with shmexec.Pool(faultfns.ident, workers=1, ring_bytes=1 << 20, queue_bytes=256 << 10) as p:
        with p.stream() as s:
            sent = 0
            while s.submit(np.zeros(8 << 10), timeout=0.2) is not None:
                sent += 1
                assert sent < 200, "submit never ran out of room"
            assert sent > 0
            got = 0
            for r in s:
                got += 1
                del r
                if got == sent:
                    break
            s.close_input()
        assert got == sent


# 6. Threads.


def test_a_pool_made_while_other_threads_run_and_hold_a_lock():
    lock = threading.Lock()
    stop = threading.Event()
    held = threading.Event()

    def spin():
        with lock:
            held.set()
            x = 0
            while not stop.is_set():
                x += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        assert held.wait(10)
        with shmexec.Pool(faultfns.double, workers=2) as p:
            assert [int(r[0]) for r in p.map(arrays(range(10)))] == [2 * i for i in range(10)]
    finally:
        stop.set()
        t.join(10)


def test_a_pool_made_in_a_thread_that_then_ends():
    box = {}

    def make():
        box["pool"] = shmexec.Pool(faultfns.pid, workers=2)
        box["pids"] = box["pool"].pids()

    t = threading.Thread(target=make)
    t.start()
    t.join(30)
    assert not t.is_alive()
    p = box.pop("pool")
    try:
        # The thread that made the pool is gone: its workers are not (the death signal fires
        # when the parent *thread* exits).
        time.sleep(0.2)
        assert p.pids() == box["pids"]
        assert all(alive(pid) for pid in box["pids"])
        seen = {int(r[0]) for r in p.map(arrays(range(20)))}
        assert seen <= set(box["pids"])
        assert p.stats()["respawns"] == 0
    finally:
        p.close()
    assert wait_gone(box["pids"]) == []


def test_a_pool_used_entirely_inside_a_thread():
    box = {}

    def work():
        try:
            with shmexec.Pool(faultfns.segv_on_three, workers=2) as p:
                box["out"] = list(p.map(arrays(range(6)), errors="yield"))
                box["pids"] = p.pids()
        except BaseException as e:  # reported below
            box["error"] = e

    t = threading.Thread(target=work)
    t.start()
    t.join(40)
    assert not t.is_alive()
    assert "error" not in box, box.get("error")
    assert isinstance(box["out"][3], shmexec.WorkerCrashed)
    assert wait_gone(box["pids"]) == []


def test_a_replacement_started_after_the_making_thread_ended_survives(tmp_path):
    box = {}
    t = threading.Thread(target=lambda: box.update(pool=shmexec.Pool(faultfns.exit_once, workers=1)))
    t.start()
    t.join(30)
    p = box.pop("pool")
    try:
        items = [{"x": np.full(4, i), "dir": str(tmp_path), "fail": i == 1} for i in range(4)]
        assert [int(r[0]) for r in p.map(items)] == [0, 2, 4, 6]
        assert [int(r[0]) for r in p.map(items)] == [0, 2, 4, 6]
    finally:
        p.close()


def test_two_threads_calling_map_at_once():
    with shmexec.Pool(faultfns.sleep_first, workers=2) as p:
        started = threading.Event()
        box = {}

        def first():
            it = p.map(np.full(4, 0.3) for _ in range(4))
            started.set()
            box["first"] = len(list(it))

        t = threading.Thread(target=first)
        t.start()
        assert started.wait(10)
        with pytest.raises(RuntimeError, match="another call"):
            p.map(arrays([0]))
        t.join(30)
        assert box["first"] == 4
        assert len(list(p.map(np.zeros(4) for _ in range(2)))) == 2


@pytest.mark.parametrize("fn, item", [(faultfns.sleep_first, 0.3),
                                      (faultfns.sleep_forever_on_three, 3)])
def test_close_from_another_thread_while_a_call_waits(fn, item):
    """close() ends a call another thread waits on, even one whose item never ends: the
    waiter gets an error, the workers go."""
    p = shmexec.Pool(fn, workers=1, shutdown_timeout=0.5)
    pids = p.pids()
    box = {}
    started = threading.Event()

    def consume():
        try:
            it = p.map(np.full(4, item) for _ in range(1000))
            started.set()
            box["n"] = sum(1 for _ in it)
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=consume)
    t.start()
    assert started.wait(10)
    time.sleep(0.5)
    p.close()
    t.join(10)
    assert not t.is_alive(), "a call waiting when its pool closed never returned"
    assert isinstance(box.get("error"), RuntimeError), box
    assert "closed" in str(box["error"])
    assert wait_gone(pids) == []


def test_close_from_another_thread_while_a_submit_waits_for_room():
    p = shmexec.Pool(faultfns.sleep_forever_on_three, workers=1, shutdown_timeout=0.5,
                     ring_bytes=1 << 20, queue_bytes=64 << 10)
    pids = p.pids()
    s = p.stream()
    box = {"sent": 0}

    def produce():
        try:
            while True:
                s.submit(np.full(1024, 3))
                box["sent"] += 1
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=produce)
    t.start()
    deadline = time.monotonic() + 10
    while box["sent"] < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    p.close()
    t.join(10)
    assert not t.is_alive(), "a submit waiting for room when its pool closed never returned"
    assert isinstance(box.get("error"), RuntimeError) and "closed" in str(box["error"]), box
    with pytest.raises(RuntimeError, match="closed"):
        s.receive(timeout=1)
    assert wait_gone(pids) == []


# 7. No leftovers.


def test_close_leaves_no_worker_and_no_grandchild(tmp_path):
    pidfile = str(tmp_path / "child")
    p = shmexec.Pool(faultfns.spawn_grandchild, workers=2)
    pids = p.pids()
    out = list(p.map([{"x": np.ones(2), "pidfile": pidfile}]))
    with open(pidfile) as f:
        grandchild = int(f.read())
    np.testing.assert_array_equal(out[0], np.ones(2))
    del out
    p.close()
    assert p.closed
    p.close()  # idempotent
    assert wait_gone(pids + [grandchild]) == []


def test_a_crashed_worker_takes_its_children_with_it(tmp_path):
    pidfile = str(tmp_path / "child")
    with shmexec.Pool(faultfns.spawn_grandchild, workers=1, max_attempts=1) as p:
        out = list(p.map([{"x": np.ones(2), "pidfile": pidfile, "crash": True}], errors="yield"))
        assert isinstance(out[0], shmexec.WorkerCrashed)
        with open(pidfile) as f:
            grandchild = int(f.read())
        assert wait_gone([grandchild]) == []


def test_a_dropped_pool_leaves_no_worker():
    p = shmexec.Pool(faultfns.double, workers=2)
    pids = p.pids()
    list(p.map(arrays(range(3))))
    del p
    gc.collect()
    assert wait_gone(pids) == []


@pytest.mark.parametrize("how", ["kill", "crash", "timeout"])
def test_held_results_survive_their_worker_being_replaced(tmp_path, how):
    """Results are views into their worker's output ring: a replacement of that worker must
    not reuse the ring under results the caller still holds."""
    size = 1 << 12
    with shmexec.Pool(faultfns.exit_once if how == "crash" else faultfns.slow_with_pid,
                      workers=1, ring_bytes=1 << 20, max_attempts=2, chunk_timeout=1.0) as p:
        held = list(p.map({"x": np.full(size, i), "dir": str(tmp_path)} for i in range(8)))
        victim = p.pids()[0]
        if how == "kill":
            os.kill(victim, signal.SIGKILL)
            assert wait_gone([victim]) == []
        elif how == "crash":
            list(p.map([{"x": np.full(4, 99), "dir": str(tmp_path), "fail": True}]))
        else:
            out = list(p.map([{"x": np.full(4, 99), "sleep": 30.0}], errors="yield"))
            assert isinstance(out[0], shmexec.ChunkTimeout)
        # The replacement writes its own results, with other values (as many as the ring
        # holds beside the held ones: held results pin the ring from the oldest on).
        for r in p.map({"x": np.full(size, -7), "dir": str(tmp_path)} for _ in range(12)):
            assert int(r[0]) == -14
        assert p.pids()[0] != victim
        for i, r in enumerate(held):
            assert r.shape == (size,)
            assert int(r.min()) == int(r.max()) == 2 * i, f"held result {i} was overwritten"


def test_results_outlive_their_pool():
    p = shmexec.Pool(faultfns.double, workers=2)
    held = list(p.map(arrays(range(5), size=1 << 12)))
    p.close()
    # The frames are the results' own: reading them after the pool is gone is safe.
    for i, r in enumerate(held):
        assert int(r.sum()) == 2 * i * (1 << 12)


# 8. Initializer and finalizer.


def test_the_finalizer_runs_in_each_worker_at_close(tmp_path):
    with shmexec.Pool(faultfns.double, workers=2, initializer=faultfns.init_remember_dir,
                      initargs=(str(tmp_path),), finalizer=faultfns.final_write_file) as p:
        list(p.map(arrays(range(4))))
        pids = set(p.pids())
    assert sorted(os.listdir(tmp_path)) == ["final-0", "final-1"]
    written = {int((tmp_path / n).read_text()) for n in os.listdir(tmp_path)}
    assert written == pids


def test_a_finalizer_that_hangs_is_killed_after_the_shutdown_timeout():
    p = shmexec.Pool(faultfns.double, workers=1, finalizer=faultfns.final_hang, shutdown_timeout=1.0)
    pids = p.pids()
    t = time.monotonic()
    p.close()
    assert time.monotonic() - t < 20
    assert wait_gone(pids) == []


def test_a_finalizer_that_raises_does_not_break_close():
    p = shmexec.Pool(faultfns.double, workers=1, finalizer=faultfns.final_raises)
    pids = p.pids()
    assert [int(r[0]) for r in p.map(arrays([1]))] == [2]
    p.close()
    assert wait_gone(pids) == []


def test_large_initargs_reach_every_worker_and_its_replacements(tmp_path):
    """A lookup table in initargs (8 MB here) is more than a command line takes: it still
    reaches each worker, and a replacement after a crash, and no descriptor is left open."""
    table = np.arange(1 << 20, dtype=np.float64)
    fds = set(os.listdir("/proc/self/fd"))
    with shmexec.Pool(faultfns.lookup_or_exit, workers=2, initializer=faultfns.init_table,
                      initargs=(table,)) as p:
        items = [{"x": np.arange(i, i + 5), "dir": str(tmp_path), "fail": i == 3}
                 for i in range(6)]
        for i, r in enumerate(p.map(items)):
            np.testing.assert_array_equal(r, table[i:i + 5])
        assert p.stats()["respawns"] >= 1
        (r,) = p.map([{"x": np.array([(1 << 20) - 1])}])
        assert r[0] == (1 << 20) - 1
        del r  # a result holds its ring (and the ring's descriptor) while it lives
    gc.collect()
    extra = set(os.listdir("/proc/self/fd")) - fds
    assert not extra, [os.readlink(f"/proc/self/fd/{f}") for f in extra if os.path.exists(f"/proc/self/fd/{f}")]


@pytest.mark.parametrize("init", [faultfns.init_exit, faultfns.init_segv])
def test_an_initializer_that_kills_its_process_is_an_init_error(init):
    t = time.monotonic()
    with pytest.raises(shmexec.InitError):
        shmexec.Pool(faultfns.double, workers=2, initializer=init, max_start_attempts=1)
    assert time.monotonic() - t < 30


def test_an_initializer_that_hangs_is_an_init_error_after_the_start_timeout():
    with pytest.raises(shmexec.InitError):
        shmexec.Pool(faultfns.double, workers=1, initializer=faultfns.init_hang,
                     max_start_attempts=1, start_timeout=1.0, shutdown_timeout=0.5)


# 9. What else a user does.


def test_empty_inputs():
    with shmexec.Pool(faultfns.double, workers=2) as p:
        assert list(p.map([])) == []
        assert list(p.imap_unordered(x for x in [])) == []
        with p.stream() as s:
            s.close_input()
            assert list(s) == []
        assert [int(r[0]) for r in p.map(arrays([1]))] == [2]


def test_callables_of_every_kind_and_a_pool_inside_a_worker():
    import functools

    kinds = [(functools.partial(faultfns.times, 3), 3), (faultfns.Scale(4), 4),
             (faultfns.Scale(2).method, 3), (faultfns.nested_pool, 2)]
    for fn, k in kinds:
        with shmexec.Pool(fn, workers=1) as p:
            assert [r.tolist() for r in p.map([np.ones(2)])] == [[k, k]], fn


def test_odd_results_come_back_as_they_were():
    with shmexec.Pool(faultfns.return_odd_things, workers=1) as p:
        (r,) = p.map([np.arange(3)])
        assert type(r["scalar"]) is np.float32 and r["scalar"] == 3.5
        assert r["zero_d"].shape == () and int(r["zero_d"]) == 7
        np.testing.assert_array_equal(r["strided"], [0, 3, 6, 9])
        np.testing.assert_array_equal(r["fortran"], np.ones((3, 2)))
        assert r["empty"].shape == (0, 5) and r["bool"].dtype == bool
        np.testing.assert_array_equal(r["same_twice"][1], np.arange(3))


def test_an_exception_whose_str_raises():
    with shmexec.Pool(faultfns.raise_bad_str, workers=1) as p:
        out = list(p.map(arrays([0, 1]), errors="yield"))
    assert all(isinstance(o, shmexec.TaskError) for o in out)
    assert "BadStr" in out[0].traceback
    assert [o.index for o in out] == [0, 1]


@pytest.mark.parametrize("fn, remote", [(faultfns.raise_keyboard_interrupt, "KeyboardInterrupt"),
                                        (faultfns.raise_system_exit, "SystemExit")])
def test_base_exceptions_in_the_function_are_task_errors(fn, remote):
    with shmexec.Pool(fn, workers=1) as p:
        pids = p.pids()
        out = list(p.map(arrays([0, 1]), errors="yield"))
        assert all(isinstance(o, shmexec.TaskError) for o in out), out
        assert out[0].remote_type == remote
        assert p.pids() == pids  # the worker went on


def test_an_unpicklable_result_is_a_task_error():
    with shmexec.Pool(faultfns.return_lambda, workers=1) as p:
        out = list(p.map(arrays([0]), errors="yield"))
        assert isinstance(out[0], shmexec.TaskError)
        assert out[0].index == 0
        assert "pickle" in out[0].traceback.lower()


def test_a_result_whose_skeleton_is_larger_than_the_ring():
    with shmexec.Pool(faultfns.return_huge_skeleton, workers=1, ring_bytes=1 << 20) as p:
        out = list(p.map(arrays([0, 1]), errors="yield"))
        assert all(isinstance(o, shmexec.ItemError) for o in out), out
        assert isinstance(out[0], shmexec.ItemTooLarge), out[0]
        assert "output_ring_bytes" in str(out[0])
        assert [o.index for o in out] == [0, 1]
    with shmexec.Pool(faultfns.return_huge_array, workers=1, ring_bytes=1 << 20) as p:
        out = list(p.map(arrays([0, 1]), errors="yield"))
        assert [type(o) for o in out] == [shmexec.ItemTooLarge] * 2, out
        assert [o.index for o in out] == [0, 1]
    with shmexec.Pool(faultfns.return_big_list, workers=1, ring_bytes=4 << 20) as p:
        (r,) = p.map([np.arange(100_000, dtype=np.float64)])
        assert r[-1] == 99_999.0 and len(r) == 100_000


def test_an_unpicklable_item_fails_in_its_place():
    def gen():
        yield np.zeros(2)

    items = [np.full(3, 0), np.full(3, 1), gen(), np.full(3, 3)]
    with shmexec.Pool(faultfns.double, workers=1) as p:
        out = list(p.map(items, errors="yield"))
        assert len(out) == 4, out
        assert [int(o[0]) for i, o in enumerate(out) if i != 2] == [0, 2, 6]
        assert isinstance(out[2], shmexec.InvalidItem), out[2]
        assert out[2].index == 2
        # Raised in its place, after the results before it.
        it = p.map(items)
        assert int(next(it)[0]) == 0
        assert int(next(it)[0]) == 2
        with pytest.raises(shmexec.InvalidItem) as e:
            next(it)
        assert e.value.index == 2
        assert [int(r[0]) for r in it] == [6]
        assert [int(r[0]) for r in p.map(arrays([5]))] == [10]


def test_an_input_that_raises_midway_raises_in_its_place():
    def source():
        yield np.full(2, 0)
        yield np.full(2, 1)
        raise ValueError("the source broke")

    with shmexec.Pool(faultfns.double, workers=2) as p:
        it = p.map(source())
        got = []
        with pytest.raises(ValueError, match="the source broke"):
            for r in it:
                got.append(int(r[0]))
        # Every result before the failure came first.
        assert got == [0, 2]
        assert list(it) == []
        assert [int(r[0]) for r in p.map(arrays([4]))] == [8]


def test_object_arrays_are_pickled_and_work():
    items = [np.array(["a", None, 3, {"k": i}], dtype=object) for i in range(3)]
    with shmexec.Pool(faultfns.describe_input, workers=1) as p:
        out = list(p.map(items))
    for i, o in enumerate(out):
        assert o["type"] == "ndarray" and o["dtype"] == "object"
        assert o["value"] == ["a", None, 3, {"k": i}]
    with shmexec.Pool(faultfns.return_object_array, workers=1) as p:
        (r,) = p.map([np.arange(3)])
        assert r.dtype == object and list(r) == [("o", 0), ("o", 1), ("o", 2)]


def test_mutating_the_input_is_a_task_error():
    with shmexec.Pool(faultfns.mutate_input, workers=1) as p:
        out = list(p.map(arrays([0, 1]), errors="yield"))
        assert all(isinstance(o, shmexec.TaskError) for o in out)
        assert out[0].remote_type == "ValueError"
        assert "read-only" in out[0].traceback
    with shmexec.Pool(faultfns.describe_input, workers=1) as p:
        (d,) = p.map([np.zeros(3)])
        assert d["writeable"] is False


def test_a_results_iterator_after_close():
    p = shmexec.Pool(faultfns.double, workers=1)
    it = p.map(arrays(range(20)))
    first = next(it)
    p.close()
    with pytest.raises(RuntimeError, match="closed"):
        next(it)
    with pytest.raises(RuntimeError, match="closed"):
        p.map(arrays([0]))
    with pytest.raises(RuntimeError, match="closed"):
        p.stats()
    it.close()
    assert int(first[0]) == 0
    # A finished iterator after close just ends.
    p2 = shmexec.Pool(faultfns.double, workers=1)
    it2 = p2.map(arrays([1]))
    assert [int(r[0]) for r in it2] == [2]
    p2.close()
    assert list(it2) == []


def test_a_stream_after_close():
    p = shmexec.Pool(faultfns.double, workers=1)
    s = p.stream()
    s.submit(np.ones(2))
    p.close()
    with pytest.raises(RuntimeError, match="closed"):
        s.submit(np.ones(2))
    with pytest.raises((RuntimeError, StopIteration)):
        s.receive(timeout=1)


def test_deleting_the_pool_while_iterating():
    p = shmexec.Pool(faultfns.double, workers=2)
    pids = p.pids()
    it = p.map(arrays(range(10)))
    assert int(next(it)[0]) == 0
    del p
    gc.collect()
    # The iterator keeps its pool: the rest still comes.
    assert [int(r[0]) for r in it] == [2 * i for i in range(1, 10)]
    del it
    gc.collect()
    assert wait_gone(pids) == []


def test_a_pool_made_inline_for_one_map():
    # The Pool object has no name: only the iterator holds it.
    got = [int(r[0]) for r in shmexec.Pool(faultfns.double, workers=2).map(arrays(range(6)))]
    assert got == [0, 2, 4, 6, 8, 10]
