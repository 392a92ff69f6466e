#!/usr/bin/env python3
"""shmexec's Python binding against Python's process pools, and the Python baselines for the
compare harness (harness/examples/compare.rs): same transform, same input, one run, side by side.

    python examples/compare_python.py --chunk-bytes 4MiB --total-bytes 512MiB --workers 2

Engines:
  numpy-seq   one process, numpy.
  pool-pickle multiprocessing.Pool.imap over numpy chunks: every chunk and every result is
              pickled through a pipe (what strax-like frameworks do today).
  pool-shm    the same pool, but chunks and results pass through multiprocessing.shared_memory
              slots by hand; only slot numbers travel through the pipe (the strongest Python peer).
  shmexec     shmexec.Pool.map: chunks copied once into the rings; the worker writes the
              transformed chunk in place in its output ring and the caller reads (array, count)
              there (needs the shmexec package: pip install ./python).
  shmexec-shared
              the same, with the chunks made in the pool's shared region (Pool.shared) before
              timing instead of in private memory: no copy in, the worker reads each chunk
              where the program put it.

Transform per chunk of float32: subtract the mean of the first 64 samples, scale by 0.5, count
samples above 1.0; the transformed array is the output. The consumer takes the count and one
sample per 4 KiB, as compare.rs does. Prints a table and one JSON line. Needs numpy.
Input is always "memory": all chunks are generated before timing.
"""
import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from multiprocessing import shared_memory

import numpy as np

STRIDE = 1024


def parse_size(s):
    units = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
             "g": 1 << 30, "gib": 1 << 30}
    digits = "".join(c for c in s if c.isdigit())
    return int(digits) * units[s[len(digits):].lower()]


def generate(i, n):
    # Same values as compare.rs's generate(): a cheap integer hash per sample.
    j = np.arange(n, dtype=np.uint32)
    seed = np.uint32((i * 0x9E3779B1) & 0xFFFFFFFF)
    h = seed + j * np.uint32(0x85EBCA6B)
    return (((h >> np.uint32(7)) & np.uint32(0x3FF)).astype(np.float32) / np.float32(256.0))


def transform(x, out):
    mean = np.float32(x[:64].sum(dtype=np.float32) / np.float32(min(64, len(x))))
    np.subtract(x, mean, out=out)
    np.multiply(out, np.float32(0.5), out=out)
    return int(np.count_nonzero(out > 1.0))


def summarize(out, count):
    return count, float(out[::STRIDE].astype(np.float64).sum())


# pool-pickle: the chunk goes in pickled, the result comes back pickled.
def pickled_task(x):
    out = np.empty_like(x)
    c = transform(x, out)
    return out, c


# pool-shm: slots in two shared-memory blocks; the pipe carries slot numbers only.
_shm = {}


def shm_init(in_name, out_name, n):
    _shm["in"] = shared_memory.SharedMemory(name=in_name)
    _shm["out"] = shared_memory.SharedMemory(name=out_name)
    _shm["n"] = n


def shm_task(slot):
    n = _shm["n"]
    x = np.ndarray((n,), np.float32, _shm["in"].buf, slot * n * 4)
    out = np.ndarray((n,), np.float32, _shm["out"].buf, slot * n * 4)
    return slot, transform(x, out)


# shmexec: the worker reads the chunk in place and writes the transformed chunk in place, in
# its output ring (Pool(..., out="like_input")); the result is (out, count).


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunk-bytes", default="4MiB")
    ap.add_argument("--total-bytes", default="512MiB")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--wait", default="adaptive", help="shmexec's wait strategy")
    ap.add_argument("--engines", default="numpy_seq,pool_pickle,pool_shm,shmexec,shmexec_shared",
                    help="comma-separated subset to run")
    a = ap.parse_args()
    chunk_bytes, total_bytes = parse_size(a.chunk_bytes), parse_size(a.total_bytes)
    n = chunk_bytes // 4
    chunks = total_bytes // chunk_bytes
    total = chunks * chunk_bytes
    data = [generate(i, n) for i in range(chunks)]
    print(f"compare_python: {chunks} chunks of {chunk_bytes >> 10} KiB, {a.workers} workers, "
          f"numpy {np.__version__}, Python {sys.version.split()[0]}")

    ctx = mp.get_context("fork")
    slots = 2 * a.workers * 4  # chunks in flight
    shm_in = shared_memory.SharedMemory(create=True, size=slots * chunk_bytes)
    shm_out = shared_memory.SharedMemory(create=True, size=slots * chunk_bytes)
    try:
        import shmexec
    except ImportError:
        shmexec = None
    wanted = a.engines.split(",")
    sx_pool = sx_shared = None
    if shmexec is not None and "shmexec" in wanted:
        sx_pool = shmexec.Pool(transform, workers=a.workers, out="like_input", wait=a.wait)
    if shmexec is not None and "shmexec_shared" in wanted:
        sx_shared = shmexec.Pool(transform, workers=a.workers, out="like_input", wait=a.wait,
                                 shared_bytes=total)
        region = sx_shared.shared(np.float32)
        shared_data = [region[i * n:(i + 1) * n] for i in range(chunks)]
        for d, x in zip(shared_data, data):
            d[:] = x
    pickle_pool = ctx.Pool(a.workers)
    shm_pool = ctx.Pool(a.workers, initializer=shm_init, initargs=(shm_in.name, shm_out.name, n))
    try:
        def numpy_seq():
            out = np.empty(n, np.float32)
            return [summarize(out, transform(x, out)) for x in data]

        def pool_pickle():
            return [summarize(o, c) for o, c in pickle_pool.imap(pickled_task, data, chunksize=1)]

        def pool_shm():
            # Keep `slots` chunks in flight: copy a chunk into a free slot, hand out its number,
            # read the result in place, in order.
            res, pending, nxt = [], [], 0
            xin = np.ndarray((slots, n), np.float32, shm_in.buf)
            xout = np.ndarray((slots, n), np.float32, shm_out.buf)
            while len(res) < chunks:
                while nxt < chunks and len(pending) < slots:
                    slot = nxt % slots
                    xin[slot][:] = data[nxt]
                    pending.append(shm_pool.apply_async(shm_task, (slot,)))
                    nxt += 1
                slot, c = pending.pop(0).get()
                res.append(summarize(xout[slot], c))
            return res

        def shmexec_map():
            return [summarize(o, c) for o, c in sx_pool.map(data)]

        def shmexec_shared():
            return [summarize(o, c) for o, c in sx_shared.map(shared_data)]

        engines = {"numpy_seq": numpy_seq, "pool_pickle": pool_pickle, "pool_shm": pool_shm}
        if sx_pool is not None:
            engines["shmexec"] = shmexec_map
        if sx_shared is not None:
            engines["shmexec_shared"] = shmexec_shared
        if shmexec is None:
            print("shmexec is not installed (pip install ./python): its engines are skipped")
        engines = {k: v for k, v in engines.items() if k in wanted}
        times = {k: [] for k in engines}
        reference = None
        for _ in range(a.rounds):
            for name, f in engines.items():
                t = time.perf_counter()
                r = f()
                times[name].append(time.perf_counter() - t)
                if reference is None:
                    reference = r
                elif r != reference:
                    sys.exit(f"{name} disagrees with numpy_seq")
        mbps = {k: total / 1e6 / statistics.median(v) for k, v in times.items()}
        print(f"{'engine':<16} {'MB/s':>10}")
        for k, v in mbps.items():
            print(f"{k:<16} {v:>10.0f}")
        for mine in ("shmexec", "shmexec_shared"):
            for peer in ("pool_pickle", "pool_shm", "numpy_seq"):
                if mine in mbps and peer in mbps:
                    print(f"{mine} / {peer}: {mbps[mine] / mbps[peer]:.2f}")
        line = {"chunk_bytes": chunk_bytes, "total_bytes": total, "workers": a.workers,
                "input": "memory", "rounds": a.rounds}
        line.update({f"{k}_mbps": round(v, 1) for k, v in mbps.items()})
        line["spread_mbps"] = {k: [round(total / 1e6 / t) for t in v] for k, v in times.items()}
        print(json.dumps(line))
    finally:
        for p in (sx_pool, sx_shared):
            if p is not None:
                p.close()
        pickle_pool.terminate()
        shm_pool.terminate()
        pickle_pool.join()
        shm_pool.join()
        shm_in.close()
        shm_in.unlink()
        shm_out.close()
        shm_out.unlink()


if __name__ == "__main__":
    main()
