#!/usr/bin/env python3
"""strax's own pulse processing run through shmexec.Pool, against strax's own processor, same
input, one run, side by side.

    pip install strax ./python
    python examples/strax_compare.py                  # about 250 MB of raw_records, 5 rounds
    python examples/strax_compare.py --total-mb 64 --rounds 1

Input: synthetic raw_records (``strax.raw_record_dtype()``, 110 samples per record): 8
channels of non-overlapping pulses of 1 to 6 records each, a baseline near 16000 ADC counts
with noise, and negative-going hits; deterministic from --seed, cut into chunks of
--chunk-mb (no pulse crosses a chunk boundary), all made before timing.

Two chains, the pulse processing of straxen's PulseProcessing and the hit finding that
follows it, made only of strax's functions:
  records  raw_to_records -> sort_by_time -> zero_out_of_bounds -> baseline -> integrate;
           the output is the records (a little larger than the input).
  hits     records, then find_hits -> sort_by_time; the output is the hits (small).

Engines, each one giving one array of the whole run (the chunks' outputs concatenated):
  sequential   the chain on every chunk in this process (the reference).
  shmexec      shmexec.Pool(chain, workers=2).map(chunks): each raw_records chunk is copied
               once into a worker's ring and read there in place; the output is read in
               place in the worker's output ring and copied once into the run's array.
  strax_thread strax.Context(...).get_array(run, target, processor="threaded_mailbox",
               max_workers=2): a source plugin that hands out the same in-memory chunks in
               this process, and a plugin per chain (Records, Hits: parallel="process", on
               raw_records) whose compute is the chain; strax computes it on its thread pool
               of 2 (strax's functions are numba, nogil).
  strax_mp     the same with allow_multiprocess=True: the plugin's computations go to a
               ProcessPoolExecutor(2) (fork, made by strax for every get_array); each chunk
               and the plugin are pickled to a worker, the output pickled back.
Every engine's output is checked for exact equality (bytes and dtype) with the sequential
one. Every engine is warmed up (numba JIT, worker start) before timing; the rounds are
interleaved. Prints MB/s of raw_records for each, the ratios, and one JSON line.
"""
import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import sys
import time

import numpy as np
import strax

import shmexec

CHANNELS = 8
SAMPLES = strax.DEFAULT_RECORD_LENGTH  # per record
DT = 10  # ns per sample
BASELINE_SAMPLES = 40
MIN_AMPLITUDE = 15
RAW = np.dtype(strax.raw_record_dtype(SAMPLES))
RUN_ID = "0"


# --- The chains: strax's functions only. Top level, so that workers can import them. -------

def to_records(raw_records):
    """raw_records -> records, as straxen's PulseProcessing does (without its data reduction)."""
    r = strax.raw_to_records(raw_records)
    r = strax.sort_by_time(r)
    strax.zero_out_of_bounds(r)
    strax.baseline(r, baseline_samples=BASELINE_SAMPLES, flip=True)
    strax.integrate(r)
    return r


def to_hits(raw_records):
    """raw_records -> records -> hits."""
    hits = strax.find_hits(to_records(raw_records), min_amplitude=MIN_AMPLITUDE)
    return strax.sort_by_time(hits)


CHAINS = {"records": to_records, "hits": to_hits}


def warm_up():
    """A worker's initializer: compiles strax's numba functions (raw_to_records's copy
    function is made and compiled anew in every process) before the first real chunk."""
    raw = Generator(seed=1, chunk_records=2_000).chunk(0)[2]
    to_hits(raw)


# --- Synthetic raw_records. -----------------------------------------------------------------

class Generator:
    """Chunks of raw_records, deterministic from a seed: per channel a train of non-overlapping
    pulses (110..660 samples, gaps of 100..2000 samples), baseline 16000 + 50 * channel with
    Gaussian noise (sigma 2 ADC), 0..3 hits per pulse (negative-going, 20..300 ADC, 20
    samples), none in the first BASELINE_SAMPLES samples of a pulse."""

    HIT = np.exp(-np.arange(20) / 4.0) - np.exp(-np.arange(20) / 1.0)

    def __init__(self, seed, chunk_records):
        self.seed = seed
        self.chunk_records = chunk_records
        # Pulses per channel and chunk, for about chunk_records records (4.5 records a pulse on average).
        self.pulses = max(1, int(chunk_records / 4.5 / CHANNELS))
        # A chunk lasts long enough for the longest train of pulses.
        self.span = self.pulses * (660 + 2000) * DT

    def chunk(self, index):
        """(start, end, raw_records) of chunk ``index``."""
        rng = np.random.default_rng([self.seed, index])
        start = index * self.span
        lengths = rng.integers(110, 661, (CHANNELS, self.pulses))
        gaps = rng.integers(100, 2001, (CHANNELS, self.pulses))
        # Pulse start (in samples from the chunk's start): each after the previous one's gap.
        first = np.cumsum(lengths + gaps, axis=1) - lengths
        channel = np.repeat(np.arange(CHANNELS), self.pulses)
        lengths, first = lengths.ravel(), first.ravel()
        n_rec = -(-lengths // SAMPLES)
        rec_pulse = np.repeat(np.arange(len(lengths)), n_rec)  # the pulse of each record
        rec_i = np.arange(len(rec_pulse)) - np.repeat(np.cumsum(n_rec) - n_rec, n_rec)
        rec_len = np.minimum(SAMPLES, lengths[rec_pulse] - rec_i * SAMPLES)

        # The samples of each pulse, its records' data one after the other (one flat array).
        base = 16_000 + 50 * channel[rec_pulse]
        wave = base[:, None] + np.rint(rng.normal(0, 2, (len(rec_pulse), SAMPLES)))
        flat = wave.reshape(-1)
        pulse_at = (np.cumsum(n_rec) - n_rec) * SAMPLES  # flat index of each pulse's sample 0
        hits = rng.integers(0, 4, len(lengths))
        hit_pulse = np.repeat(np.arange(len(lengths)), hits)
        room = lengths[hit_pulse] - BASELINE_SAMPLES - len(self.HIT)
        hit_at = BASELINE_SAMPLES + (rng.random(len(hit_pulse)) * room).astype(np.int64)
        amp = rng.uniform(20, 300, len(hit_pulse)) / self.HIT.max()
        idx = (pulse_at[hit_pulse] + hit_at)[:, None] + np.arange(len(self.HIT))
        np.subtract.at(flat, idx.ravel(), np.rint(amp[:, None] * self.HIT).ravel())
        wave[np.arange(SAMPLES) >= rec_len[:, None]] = 0  # zero-padding after the pulse

        r = np.zeros(len(rec_pulse), RAW)
        r["time"] = start + (first[rec_pulse] + rec_i * SAMPLES) * DT
        r["length"] = rec_len
        r["dt"] = DT
        r["channel"] = channel[rec_pulse]
        r["pulse_length"] = lengths[rec_pulse]
        r["record_i"] = rec_i
        r["data"] = wave
        order = np.lexsort((r["channel"], r["time"]))
        return start, start + self.span, r[order]


# --- strax's own processing: plugins reading the same chunks from memory. -------------------

# The chunks, for the source plugin (a forked process pool inherits them too).
CHUNKS: list = []


class RawRecordsFromMemory(strax.Plugin):
    """The source: hands out the in-memory chunks, in this process (as a DAQ reader would)."""

    provides = "raw_records"
    depends_on: tuple = ()
    dtype = RAW
    parallel = False
    rechunk_on_save = False
    __version__ = "0.0.1"

    def source_finished(self):
        return True

    def is_ready(self, chunk_i):
        return chunk_i < len(CHUNKS)

    def compute(self, chunk_i):
        start, end, data = CHUNKS[chunk_i]
        return self.chunk(start=start, end=end, data=data)


class Records(strax.Plugin):
    """The records chain, as a strax plugin: the same function on the same chunks."""

    provides = "records"
    depends_on = ("raw_records",)
    data_kind = "records"
    dtype = strax.record_dtype(SAMPLES)
    parallel = "process"
    rechunk_on_save = False
    __version__ = "0.0.1"

    def compute(self, raw_records):
        return to_records(raw_records)


class Hits(strax.Plugin):
    """The hits chain, as one plugin on raw_records (the unit of work of the other engines:
    one task per chunk, records kept inside it)."""

    provides = "hits"
    depends_on = ("raw_records",)
    data_kind = "hits"
    dtype = strax.hit_dtype
    parallel = "process"
    rechunk_on_save = False
    __version__ = "0.0.1"

    def compute(self, raw_records):
        return to_hits(raw_records)


def strax_context(multiprocess):
    return strax.Context(
        storage=[],
        register=[RawRecordsFromMemory, Records, Hits],
        allow_multiprocess=multiprocess,
        timeout=600,
    )


# --- The comparison. ------------------------------------------------------------------------

def gather(results, capacity):
    """The results concatenated, each copied once (into an array grown when full)."""
    out, n = None, 0
    for r in results:
        if out is None:
            out = np.empty(max(capacity, len(r)), r.dtype)
        if n + len(r) > len(out):
            out = np.concatenate([out[:n], np.empty(max(len(out), len(r)), out.dtype)])
        out[n:n + len(r)] = r
        n += len(r)
        del r
    return out[:n]


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--total-mb", type=float, default=256, help="raw_records in all, MiB (about)")
    ap.add_argument("--chunk-mb", type=float, default=8, help="raw_records per chunk, MiB (about)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--chains", default="records,hits")
    a = ap.parse_args()

    gen = Generator(a.seed, int(a.chunk_mb * 2**20 / RAW.itemsize))
    n_chunks = max(1, round(a.total_mb / a.chunk_mb))
    t = time.perf_counter()
    CHUNKS[:] = [gen.chunk(i) for i in range(n_chunks)]
    raw_bytes = sum(c[2].nbytes for c in CHUNKS)
    print(f"strax_compare: {n_chunks} chunks, {raw_bytes / 1e6:.0f} MB of raw_records "
          f"({sum(len(c[2]) for c in CHUNKS)} records, {CHANNELS} channels), made in "
          f"{time.perf_counter() - t:.1f} s; {a.workers} workers, strax {strax.__version__}, "
          f"numpy {np.__version__}, Python {sys.version.split()[0]}, {os.cpu_count()} cores")

    chains = a.chains.split(",")
    pools = {}
    t = time.perf_counter()
    for c in chains:
        pools[c] = shmexec.Pool(CHAINS[c], workers=a.workers, initializer=warm_up)
    start_s = time.perf_counter() - t
    print(f"shmexec pools started in {start_s:.1f} s (workers import strax, compile its numba "
          "functions)")
    # No run metadata in memory: strax warns that it assumes the run spans 0..inf, every run.
    logging.getLogger("strax").setLevel(logging.ERROR)
    contexts = {False: strax_context(False), True: strax_context(True)}

    def sequential(chain):
        f = CHAINS[chain]
        return np.concatenate([f(raw) for _, _, raw in CHUNKS])

    n_raw = sum(len(c[2]) for c in CHUNKS)

    def shmexec_map(chain):
        # Each result is read in place in a worker's output ring and copied once into the
        # run's array (as get_array's concatenation copies strax's chunks once); its room in
        # the ring is freed as soon as it is copied.
        return gather(pools[chain].map([raw for _, _, raw in CHUNKS]), n_raw)

    def strax_engine(multiprocess):
        def run(chain):
            # strax prints "Source finished!" at the end of every run: not in the table.
            with contextlib.redirect_stdout(io.StringIO()):
                return contexts[multiprocess].get_array(
                    RUN_ID, chain, processor="threaded_mailbox", max_workers=a.workers,
                    progress_bar=False)
        return run

    engines = {"sequential": sequential, "shmexec": shmexec_map,
               "strax_thread": strax_engine(False), "strax_mp": strax_engine(True)}
    try:
        results = {}
        for chain in chains:
            # Warm-up: numba compiles, processes start; and the exact-equality checks.
            reference = sequential(chain)
            for name, f in engines.items():
                out = f(chain)
                if not same(out, reference):
                    sys.exit(f"{chain}: {name} differs from the sequential run "
                             f"({out.dtype}, {out.shape} vs {reference.dtype}, "
                             f"{reference.shape})")
            print(f"{chain}: {len(reference)} {chain}, {reference.nbytes / 1e6:.0f} MB; every "
                  f"engine's output equals the sequential one")
            times = {k: [] for k in engines}
            for _ in range(a.rounds):
                for name, f in engines.items():
                    t = time.perf_counter()
                    out = f(chain)
                    times[name].append(time.perf_counter() - t)
                    if not same(out, reference):
                        sys.exit(f"{chain}: {name} differs from the sequential run")
                    del out
            results[chain] = times
    finally:
        for p in pools.values():
            p.close()

    line = {"raw_bytes": raw_bytes, "chunks": n_chunks, "workers": a.workers,
            "rounds": a.rounds, "strax": strax.__version__, "cores": os.cpu_count(),
            "exact": True, "shmexec_pools_start_s": round(start_s, 1)}
    print(f"\n{'chain':<8} " + " ".join(f"{k:>13}" for k in engines)
          + "  shmexec/thread  shmexec/mp  (MB/s of raw_records, median)")
    for chain, times in results.items():
        mbps = {k: raw_bytes / 1e6 / statistics.median(v) for k, v in times.items()}
        r_thread = mbps["shmexec"] / mbps["strax_thread"]
        r_mp = mbps["shmexec"] / mbps["strax_mp"]
        print(f"{chain:<8} " + " ".join(f"{v:>13.0f}" for v in mbps.values())
              + f"  {r_thread:>14.2f}  {r_mp:>10.2f}")
        line[chain] = {f"{k}_mbps": round(v, 1) for k, v in mbps.items()}
        line[chain]["shmexec_over_thread"] = round(r_thread, 2)
        line[chain]["shmexec_over_mp"] = round(r_mp, 2)
        line[chain]["spread_mbps"] = {
            k: [round(raw_bytes / 1e6 / s) for s in v] for k, v in times.items()}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
