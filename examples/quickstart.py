#!/usr/bin/env python3
"""The main job, in Python: a DAQ pipeline step on synthetic detector data (the numpy twin of
examples/quickstart.rs).

A digitizer gives chunks of raw records: 8 channels of int16 waveform samples (10 ns per
sample), each chunk covering a time range. Per chunk, every channel gets its baseline
subtracted (mean of its first 64 samples) and a threshold peak finder on the smoothed signal
turns pulses into peaks (time, channel, width, height, area), sorted by time. Chunks go to two
worker processes through shared memory (shmexec.Pool.map); the peaks come back in chunk order
and are checked against a sequential run of the same function.

    python examples/quickstart.py

No flags. About 200 MB in a few seconds; exits non-zero if any chunk differs. Needs numpy and
shmexec (pip install ./python).
"""
import sys
import time

import numpy as np

import shmexec

CHANNELS = 8
SAMPLES_PER_CHANNEL = 256 * 1024
CHUNKS = 48  # 4 MiB each
NS_PER_SAMPLE = 10
BASELINE_SAMPLES = 64
THRESHOLD = 40  # ADC counts above baseline
# Low-pass filter taps: peaks are found on the smoothed signal, so that noise does not split them.
TAPS = np.array([0.02, 0.04, 0.07, 0.10, 0.12, 0.15, 0.15, 0.12, 0.10, 0.07, 0.04, 0.02],
                np.float32)
PEAK = np.dtype([("time_ns", "<u8"), ("channel", "<u2"), ("width", "<u4"), ("height", "<i4"),
                 ("area", "<i8")])


def find_peaks(chunk):
    """Baseline subtraction, low-pass filter and threshold peak finding for one chunk (a dict
    with ``start_ns`` and ``samples``, CHANNELS x SAMPLES_PER_CHANNEL int16). Runs in a worker,
    on ``samples`` read in place in shared memory."""
    wave = chunk["samples"]
    base = wave[:, :BASELINE_SAMPLES].sum(axis=1, dtype=np.int32) // BASELINE_SAMPLES
    # PMT pulses go negative: the signal is the baseline minus the sample.
    x = base[:, None] - wave.astype(np.int32)
    signal = x.astype(np.float32)
    smooth = np.zeros_like(signal)
    for k, tap in enumerate(TAPS):  # causal FIR: smooth[i] = sum_k TAPS[k] * signal[i - k]
        smooth[:, k:] += tap * signal[:, : signal.shape[1] - k]
    above = np.zeros((CHANNELS, SAMPLES_PER_CHANNEL + 2), np.int8)
    above[:, 1:-1] = smooth > THRESHOLD
    edges = np.diff(above, axis=1)
    ch, starts = np.nonzero(edges == 1)  # row-major: by channel, then time
    _, ends = np.nonzero(edges == -1)
    # Each peak's samples are flat[lo:hi]; reduceat over the pairs (lo, hi) reduces each one
    # (one sample of padding, for a peak that ends at the end of the chunk).
    flat = np.append(x.reshape(-1), 0)
    lo = ch * SAMPLES_PER_CHANNEL + starts
    bounds = np.stack([lo, lo + ends - starts], axis=1).reshape(-1)
    peaks = np.empty(len(starts), PEAK)
    peaks["time_ns"] = chunk["start_ns"] + starts * NS_PER_SAMPLE
    peaks["channel"] = ch
    peaks["width"] = ends - starts
    if len(bounds):
        peaks["height"] = np.maximum.reduceat(flat, bounds)[::2]
        peaks["area"] = np.add.reduceat(flat, bounds, dtype=np.int64)[::2]
    return peaks[np.lexsort((peaks["channel"], peaks["time_ns"]))]


class Digitizer:
    """Synthetic digitizer: a deterministic baseline with noise and pulses, chunk by chunk."""

    def __init__(self, seed=0x9E3779B97F4A7C15):
        rng = np.random.default_rng(seed)
        self.noise = rng.integers(-8, 9, 65_536 + SAMPLES_PER_CHANNEL).astype(np.int16)
        t = np.arange(60.0)  # a PMT-like pulse: fast rise, slower fall
        self.pulse = (-400.0 * (1.0 - np.exp(-t / 2.0)) * np.exp(-t / 12.0)).astype(np.int16)

    def chunk(self, index):
        samples = np.empty((CHANNELS, SAMPLES_PER_CHANNEL), np.int16)
        for ch in range(CHANNELS):
            offset = (index * 7919 + ch * 104_729) % 65_536
            samples[ch] = 15_000 + 100 * ch + self.noise[offset:offset + SAMPLES_PER_CHANNEL]
            # ~40 pulses per channel per chunk, never in the baseline window.
            at = 1_000 + (index * 31 + ch * 17) % 3_000
            while at + len(self.pulse) < SAMPLES_PER_CHANNEL:
                samples[ch, at:at + len(self.pulse)] += self.pulse
                at += 5_000 + (at * 13 + index) % 3_000
        start_ns = index * SAMPLES_PER_CHANNEL * NS_PER_SAMPLE
        return {"start_ns": start_ns, "end_ns": start_ns + SAMPLES_PER_CHANNEL * NS_PER_SAMPLE,
                "samples": samples}


def main():
    digitizer = Digitizer()
    chunk_bytes = CHANNELS * SAMPLES_PER_CHANNEL * 2
    total_mb = CHUNKS * chunk_bytes / 1e6
    with shmexec.Pool(find_peaks, workers=2) as pool:
        print(f"quickstart: {CHUNKS} chunks of {CHANNELS} channels x {SAMPLES_PER_CHANNEL} int16 "
              f"samples ({total_mb:.0f} MB), {pool.workers} worker processes")

        # Sequential reference first: the same function, in this process.
        t = time.perf_counter()
        reference = [find_peaks(digitizer.chunk(i)) for i in range(CHUNKS)]
        seq_s = time.perf_counter() - t

        # The pool: chunks are made on the fly and copied once into the workers' rings.
        t = time.perf_counter()
        peaks = mismatches = out_of_order = last_time = 0
        for i, found in enumerate(pool.map(digitizer.chunk(i) for i in range(CHUNKS))):
            mismatches += not (found.dtype == PEAK and np.array_equal(found, reference[i]))
            times = found["time_ns"]
            out_of_order += int(np.count_nonzero(np.diff(times.astype(np.int64)) < 0))
            out_of_order += bool(len(times) and int(times[0]) < last_time)
            last_time = int(times[-1]) if len(times) else last_time
            peaks += len(found)
            del found  # a result's memory in the ring is freed when its last array is gone
        pool_s = time.perf_counter() - t
        stats = pool.stats()

    for w in stats["workers"]:
        print(f"  worker pid {w['pid']}: {w['items']} chunks, {w['bytes_in'] / 1e6:.0f} MB in, "
              f"busy {w['busy_seconds']:.1f} s")
    print(f"sequential {total_mb / seq_s:.0f} MB/s, shmexec {total_mb / pool_s:.0f} MB/s "
          f"({seq_s / pool_s:.2f}x)")
    ok = mismatches == 0 and out_of_order == 0 and peaks > 0
    print(f"chunks={CHUNKS} mb={total_mb:.0f} peaks={peaks} matches_sequential={mismatches == 0} "
          f"time_ordered={out_of_order == 0} mbps={total_mb / pool_s:.0f}")
    if not ok:
        sys.exit(f"{mismatches} chunks differ, {out_of_order} peaks out of order")


if __name__ == "__main__":
    main()
