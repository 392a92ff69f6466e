//! Per-stage counters, in shared memory: each worker adds to its own line for each stage it
//! runs (relaxed atomic adds, a few nanoseconds per item), and the coordinator reads them at any
//! time, so an online service can watch its pipeline while it runs.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use shmexec_shm::Segment;

use crate::error::Result;

/// A cache line of counters per (worker, stage), so workers never share a line.
const LINE: usize = 64;

#[derive(Clone, Copy)]
#[repr(usize)]
pub(crate) enum Counter {
    Items = 0,
    BytesIn = 8,
    Outputs = 16,
    BytesOut = 24,
    BusyNs = 32,
    Errors = 40,
}

/// The counters of every stage of a pipeline in every worker.
#[derive(Clone)]
pub(crate) struct StageCounters {
    seg: Arc<Segment>,
    workers: usize,
    stages: usize,
}

impl StageCounters {
    pub(crate) fn new(workers: usize, stages: usize) -> Result<StageCounters> {
        let len = workers.max(1) * stages.max(1) * LINE;
        Ok(StageCounters {
            seg: Arc::new(Segment::new(len)?),
            workers,
            stages,
        })
    }

    fn offset(&self, worker: usize, stage: usize, counter: Counter) -> Option<usize> {
        (worker < self.workers && stage < self.stages)
            .then(|| (worker * self.stages + stage) * LINE + counter as usize)
    }

    pub(crate) fn add(&self, worker: usize, stage: usize, counter: Counter, v: u64) {
        if let Some(word) = self
            .offset(worker, stage, counter)
            .and_then(|o| self.seg.atomic_u64(o))
        {
            word.fetch_add(v, Ordering::Relaxed);
        }
    }

    /// The sum of `counter` of `stage` over all workers.
    fn sum(&self, stage: usize, counter: Counter) -> u64 {
        (0..self.workers)
            .filter_map(|w| self.offset(w, stage, counter))
            .filter_map(|o| self.seg.atomic_u64(o))
            .map(|word| word.load(Ordering::Relaxed))
            .sum()
    }

    /// What `stage` did so far, over all workers.
    pub(crate) fn stage(&self, stage: usize) -> Counts {
        Counts {
            items: self.sum(stage, Counter::Items),
            bytes_in: self.sum(stage, Counter::BytesIn),
            outputs: self.sum(stage, Counter::Outputs),
            bytes_out: self.sum(stage, Counter::BytesOut),
            busy: Duration::from_nanos(self.sum(stage, Counter::BusyNs)),
            errors: self.sum(stage, Counter::Errors),
        }
    }
}

/// One stage's counters, summed over its workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) items: u64,
    pub(crate) bytes_in: u64,
    pub(crate) outputs: u64,
    pub(crate) bytes_out: u64,
    pub(crate) busy: Duration,
    pub(crate) errors: u64,
}
