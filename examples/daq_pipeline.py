#!/usr/bin/env python3
"""A strax-like chain of stages in Python on shmexec.Pipeline: raw chunks -> peaks -> events ->
numbered events, over the synthetic digitizer data of examples/quickstart.py, checked against
the same functions run one after the other in this process.

- ``find_peaks`` (quickstart.py's): baseline, low-pass filter and threshold peak finding per
  channel; two workers. Saved: its outputs go to a store under a key made of the source's key
  (the synthetic run) and the stage's name, version and settings, and the second run with the
  same key reads them back where the files are mapped and runs no ``find_peaks`` at all.
- ``events``: peaks of all channels less than EVENT_GAP_NS apart make one event (time, end,
  peaks, area); a group of its own (the saved stage ends its group).
- ``number``: numbers the events over the run, in chunk order: a stateful stage on one worker
  whose state (the next number) travels with each chunk.

    python examples/daq_pipeline.py [--chunks N] [--store DIR]

Exits non-zero if any chunk differs from the sequential run. Needs numpy and shmexec
(pip install ./python).
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quickstart  # noqa: E402  (the digitizer and the peak finder)

import shmexec  # noqa: E402

EVENT_GAP_NS = 2_000
EVENT = np.dtype([("time_ns", "<u8"), ("end_ns", "<u8"), ("peaks", "<u4"), ("area", "<i8")])
NUMBERED = np.dtype([("number", "<u8"), ("time_ns", "<u8"), ("area", "<i8")])


def events(peaks):
    """Peaks (sorted by time) less than EVENT_GAP_NS apart, over all channels, as one event."""
    if len(peaks) == 0:
        return np.zeros(0, EVENT)
    t = peaks["time_ns"].astype(np.int64)
    starts = np.flatnonzero(np.concatenate(([True], np.diff(t) > EVENT_GAP_NS)))
    out = np.zeros(len(starts), EVENT)
    out["time_ns"] = t[starts]
    out["end_ns"] = np.maximum.reduceat(t + peaks["width"] * quickstart.NS_PER_SAMPLE, starts)
    out["peaks"] = np.diff(np.append(starts, len(peaks)))
    out["area"] = np.add.reduceat(peaks["area"], starts)
    return out


def number(next_number, evts):
    """Numbers a chunk's events on from the chunk before's (the state: the next number)."""
    out = np.zeros(len(evts), NUMBERED)
    out["number"] = np.arange(next_number, next_number + len(evts))
    out["time_ns"] = evts["time_ns"]
    out["area"] = evts["area"]
    return next_number + len(evts), out


def pipeline(store):
    return (shmexec.Pipeline(workers=2)
            .map(quickstart.find_peaks, version="1",
                 config=f"threshold {quickstart.THRESHOLD} taps {len(quickstart.TAPS)}")
            .save(store)
            .map(events, config=f"gap {EVENT_GAP_NS}")
            .stateful(number, initial=0))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--store", default=None, help="store directory (default: a temporary one)")
    a = ap.parse_args()
    digitizer = quickstart.Digitizer()
    mb = a.chunks * quickstart.CHANNELS * quickstart.SAMPLES_PER_CHANNEL * 2 / 1e6

    t = time.perf_counter()
    reference, n = [], 0
    for i in range(a.chunks):
        n, numbered = number(n, events(quickstart.find_peaks(digitizer.chunk(i))))
        reference.append(numbered)
    seq_s = time.perf_counter() - t

    with tempfile.TemporaryDirectory() as tmp:
        store = shmexec.Store(a.store or tmp)
        source = shmexec.StageKey("raw_chunks", "synthetic", f"seed 0 chunks {a.chunks}")
        with pipeline(store) as pipe:
            print(f"daq_pipeline: {a.chunks} chunks ({mb:.0f} MB); groups:")
            for g in pipe.plan():
                print(f"  {' + '.join(g['stages'])}: {g['workers']} worker(s)"
                      f"{', serial' if g['serial'] else ''}")
            store.remove(pipe.keys(source)["find_peaks"])  # the first run computes
            timings, mismatches = [], 0
            for round in range(2):
                t = time.perf_counter()
                run = pipe.run((digitizer.chunk(i) for i in range(a.chunks)), key=source)
                for i, got in enumerate(run):
                    mismatches += not np.array_equal(got, reference[i])
                timings.append(time.perf_counter() - t)
                print(f"  run {round}: {mb / timings[-1]:.0f} MB/s, served from "
                      f"{run.cache or 'nothing'}, saved {run.saved or 'nothing'}, "
                      f"next number {run.states['number']}")
            for g in pipe.stats():
                busy = sum(w["busy_seconds"] for w in g["workers"])
                print(f"  {' + '.join(g['stages'])}: {g['items']} items, busy {busy:.1f} s")
    events_total = int(sum(len(r) for r in reference))
    print(f"sequential {mb / seq_s:.0f} MB/s; pipeline {mb / timings[0]:.0f} MB/s "
          f"({seq_s / timings[0]:.2f}x); served from the store {mb / timings[1]:.0f} MB/s "
          "(of raw chunks not read)")
    print(f"chunks={a.chunks} events={events_total} matches_sequential={mismatches == 0}")
    if mismatches or events_total == 0:
        sys.exit(f"{mismatches} chunks differ from the sequential run")


if __name__ == "__main__":
    main()
