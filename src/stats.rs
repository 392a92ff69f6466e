//! Counters: per worker (kept in shared memory, written by the worker with relaxed atomic adds,
//! so they cost a few nanoseconds per chunk and can stay on) and per call.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use shmexec_shm::{Segment, Signal};

use crate::error::Result;

/// Two cache lines of counters per worker, so workers never share a line; slot 0 holds the
/// pool-wide words (the doorbell), worker `w` slot `w + 1`.
const SLOT: usize = 128;

#[derive(Clone, Copy)]
#[repr(usize)]
pub(crate) enum Field {
    Chunks = 0,
    BytesIn = 8,
    BytesOut = 16,
    BusyNs = 24,
    Errors = 32,
    /// Not a counter: [`crate::wire::STOP`] asks the worker to stop before its next chunk
    /// (pool shutdown), so dropping a pool does not wait for a full input ring to be worked
    /// off. Any other non-zero value is corruption, and ignored.
    Stop = 40,
    /// Not a counter: the sequence number + 1 of the item the worker is working on (0: none),
    /// so that the coordinator knows which item a dead worker died on.
    Current = 48,
    /// Not a counter: the sequence number + 1 of an item the worker must not run but report as
    /// given up (it crashed its worker `max_retries` times).
    Skip = 56,
    /// Bytes of the shared region the worker read through spans (`Span::get`).
    RegionBytes = 64,
    /// Not a counter: [`crate::wire::READY`] once the worker's `init` succeeded (0 before), so
    /// that a death is charged to the worker's start or to its items without reading its exit
    /// code, which the task can set too.
    State = 72,
    /// Not a counter: items below this seq belong to calls that ended (their results would be
    /// discarded), so the worker closes them without running them. Honoured only beside a
    /// matching `DiscardCheck` (see [`crate::wire::discard_check`]), so that garbage here can
    /// never make a worker skip an item of a live call.
    Discard = 80,
    DiscardCheck = 88,
}

/// The shared counters of all workers of a pool.
#[derive(Clone)]
pub(crate) struct StatsBlock {
    seg: Arc<Segment>,
    /// Where the doorbell is: line 0 of `seg`, or of another pool's segment when several
    /// pools share one coordinator wait (the groups of a pipeline).
    bell: Arc<Segment>,
}

impl StatsBlock {
    /// Counters for `workers` workers, whose doorbell is `bell` if given (else their own).
    pub(crate) fn new(workers: usize, bell: Option<&Doorbell>) -> Result<StatsBlock> {
        let seg = Arc::new(Segment::new(Self::footprint(workers))?);
        let bell = bell.map_or_else(|| Arc::clone(&seg), |b| Arc::clone(&b.seg));
        Ok(StatsBlock { seg, bell })
    }

    /// A doorbell of its own, for pools to share (`Config::doorbell`).
    pub(crate) fn lone_doorbell() -> Result<Doorbell> {
        Ok(Doorbell {
            seg: Arc::new(Segment::new(SLOT)?),
        })
    }

    /// Bytes of the segment for `workers` workers' counters.
    pub(crate) fn footprint(workers: usize) -> usize {
        (workers + 1) * SLOT
    }

    /// The counters of a pool whose segment this (spawned) worker received.
    pub(crate) fn from_segment(seg: Arc<Segment>) -> StatsBlock {
        StatsBlock {
            bell: Arc::clone(&seg),
            seg,
        }
    }

    pub(crate) fn segment(&self) -> &Arc<Segment> {
        &self.seg
    }

    fn word(&self, worker: usize, field: Field) -> Option<&AtomicU64> {
        self.seg.atomic_u64((worker + 1) * SLOT + field as usize)
    }

    /// The coordinator's doorbell: every worker rings it when it lets go of an input (its
    /// result is out, and its queue has room), so that a coordinator waiting for one worker's
    /// result also wakes when another worker could take more input (`crate::call::wait`).
    pub(crate) fn doorbell(&self) -> Doorbell {
        Doorbell {
            seg: Arc::clone(&self.bell),
        }
    }

    pub(crate) fn add(&self, worker: usize, field: Field, v: u64) {
        if let Some(w) = self.word(worker, field) {
            w.fetch_add(v, Ordering::Relaxed);
        }
    }

    pub(crate) fn set(&self, worker: usize, field: Field, v: u64) {
        if let Some(w) = self.word(worker, field) {
            w.store(v, Ordering::Relaxed);
        }
    }

    pub(crate) fn get(&self, worker: usize, field: Field) -> u64 {
        self.word(worker, field)
            .map_or(0, |w| w.load(Ordering::Relaxed))
    }
}

/// A handle on the pool's doorbell (line 0 of the counters' segment) that borrows nothing, so a
/// waiter can hold it while its condition looks at the pool.
#[derive(Clone)]
pub(crate) struct Doorbell {
    seg: Arc<Segment>,
}

impl std::fmt::Debug for Doorbell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Doorbell")
    }
}

impl Doorbell {
    /// The signal; `None` only for a segment too small to hold it, which `StatsBlock::new`
    /// never makes.
    pub(crate) fn signal(&self) -> Option<&Signal> {
        self.seg.signal(0)
    }

    /// Wakes whoever waits on the doorbell (after the store that they should see).
    pub(crate) fn ring(&self) {
        if let Some(s) = self.signal() {
            s.notify();
        }
    }
}

/// What one worker has done since the pool started.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStats {
    /// The worker's index in the pool.
    pub index: usize,
    /// Its process id.
    pub pid: i32,
    /// The core it is pinned to, if any.
    pub core: Option<usize>,
    /// Chunks processed (including failed ones).
    pub chunks: u64,
    /// Input archive bytes read.
    pub bytes_in: u64,
    /// Output archive bytes written.
    pub bytes_out: u64,
    /// Bytes of the shared region read through spans.
    pub region_bytes_read: u64,
    /// Time spent in `Task::process` and serializing its output.
    pub busy: Duration,
    /// Chunks that ended in an error (task `Err`, panic, output too large).
    pub errors: u64,
    /// Times this worker's process died (any cause) and was replaced.
    pub respawns: u64,
}

/// Pool-wide figures: the workers' counters and what the coordinator moved.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolStats {
    /// One entry per worker.
    pub workers: Vec<WorkerStats>,
    /// Items submitted.
    pub items: u64,
    /// Input bytes put into the rings.
    pub input_bytes: u64,
    /// Of those, bytes the coordinator copied (serialized from the caller's memory). Bytes a
    /// source wrote in place ([`crate::Pool::map_in_place`]) are not copies.
    pub input_bytes_copied: u64,
    /// Output bytes handed to the caller (in place, no copy).
    pub output_bytes: u64,
    /// Worker processes that died and were replaced.
    pub respawns: u64,
}

impl PoolStats {
    /// What happened between `earlier` (a value this pool's [`crate::Pool::stats`] returned
    /// before) and `self`: every counter as a difference; a worker's pid and core as now.
    pub fn since(&self, earlier: &PoolStats) -> PoolStats {
        let workers = self
            .workers
            .iter()
            .map(
                |w| match earlier.workers.iter().find(|e| e.index == w.index) {
                    Some(e) => WorkerStats {
                        chunks: w.chunks.saturating_sub(e.chunks),
                        bytes_in: w.bytes_in.saturating_sub(e.bytes_in),
                        bytes_out: w.bytes_out.saturating_sub(e.bytes_out),
                        region_bytes_read: w.region_bytes_read.saturating_sub(e.region_bytes_read),
                        busy: w.busy.saturating_sub(e.busy),
                        errors: w.errors.saturating_sub(e.errors),
                        respawns: w.respawns.saturating_sub(e.respawns),
                        ..w.clone()
                    },
                    None => w.clone(),
                },
            )
            .collect();
        PoolStats {
            workers,
            items: self.items.saturating_sub(earlier.items),
            input_bytes: self.input_bytes.saturating_sub(earlier.input_bytes),
            input_bytes_copied: self
                .input_bytes_copied
                .saturating_sub(earlier.input_bytes_copied),
            output_bytes: self.output_bytes.saturating_sub(earlier.output_bytes),
            respawns: self.respawns.saturating_sub(earlier.respawns),
        }
    }

    /// Bytes the coordinator copied per byte of input the workers read: 1 for serialized
    /// inputs, 0 for in-place ones, and for spans of the shared region the few bytes of each
    /// span against the region bytes it names.
    pub fn copies_per_input_byte(&self) -> f64 {
        let region: u64 = self.workers.iter().map(|w| w.region_bytes_read).sum();
        let read = self.input_bytes + region;
        if read == 0 {
            0.0
        } else {
            self.input_bytes_copied as f64 / read as f64
        }
    }
}

/// Figures of one call (`map`, `map_unordered`, `for_each`) so far.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallStats {
    /// Results handed out (values and errors).
    pub items: u64,
    /// Input bytes put into the rings by this call.
    pub input_bytes: u64,
    /// Output bytes handed out.
    pub output_bytes: u64,
    /// Time since the call started.
    pub elapsed: Duration,
    /// Worker processes that died and were replaced during this call.
    pub respawns: u64,
}

impl CallStats {
    /// Input megabytes (10^6 bytes) per second.
    pub fn input_mbps(&self) -> f64 {
        self.input_bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// When one item passed each stage, in nanoseconds of the machine's monotonic clock (one time
/// line for all the pool's processes; see `shmexec_shm::clock`). Each result carries it
/// ([`crate::OutputRef::timing`]); reading it costs nothing, and taking it costs two clock reads
/// per item in the worker (shared with its busy time) and one or two in the coordinator
/// (`Builder::item_timing` turns those off).
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timing {
    /// The input was written into a worker's ring.
    pub submitted_ns: u64,
    /// The worker started on it.
    pub started_ns: u64,
    /// The worker finished this output (published it).
    pub finished_ns: u64,
    /// The result was handed to the caller. (In a step that placed an input just before,
    /// that placement's clock reading stands for it, when it is not earlier than
    /// `finished_ns`: one clock read per item instead of two.)
    pub delivered_ns: u64,
}

fn between(from: u64, to: u64) -> Duration {
    Duration::from_nanos(to.saturating_sub(from))
}

impl Timing {
    /// From submission to the worker's start: time queued in the ring.
    pub fn queued(&self) -> Duration {
        between(self.submitted_ns, self.started_ns)
    }

    /// From the worker's start to this output: time computing it.
    pub fn run(&self) -> Duration {
        between(self.started_ns, self.finished_ns)
    }

    /// From the output to its hand-over: time waiting for the caller (or for earlier items).
    pub fn waited(&self) -> Duration {
        between(self.finished_ns, self.delivered_ns)
    }

    /// From submission to hand-over.
    pub fn total(&self) -> Duration {
        between(self.submitted_ns, self.delivered_ns)
    }
}
