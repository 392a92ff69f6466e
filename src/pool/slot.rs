//! The coordinator's side of one worker: its process, its rings, and the items handed to it
//! that it has not answered yet.

use std::time::Instant;

use shmexec_shm::{ChildProcess, Consumer, Producer, Ring};

use super::queue::{Expected, Queue};

/// The coordinator's side of one worker.
pub(crate) struct WorkerSlot {
    pub(crate) child: ChildProcess,
    /// Producer of the worker's input ring.
    pub(crate) tx: Producer,
    /// Consumer of the worker's output ring.
    pub(crate) rx: Consumer,
    /// The segment of both rings (the input ring first), for a spawned successor after a crash.
    pub(crate) input: Ring,
    /// Items handed to this worker whose results are still to come.
    pub(crate) expect: Queue,
    /// Outputs of the oldest item in `expect` taken so far: its next output's part.
    pub(crate) next_part: u32,
    /// The `live` entries of `expect`.
    pub(crate) live: usize,
    pub(crate) respawns: u64,
    /// The worker's `Field::Current` as last seen and since when (for the chunk timeout).
    pub(crate) watching: (u64, Instant),
}

impl WorkerSlot {
    /// Records an item of `bytes` input bytes handed to this worker at `submitted_ns` (0: not
    /// timed).
    pub(crate) fn push(&mut self, seq: u64, bytes: u64, submitted_ns: u64) {
        let end = self.tx.written();
        self.expect.push(Expected {
            seq,
            live: true,
            bytes,
            end,
            submitted_ns,
        });
        self.live += 1;
    }

    /// Whether this worker has enough queued to take no more now: at least two items it has not
    /// finished (one to work on, one ready behind it) and `limit` bytes of them.
    ///
    /// Finished items whose results the caller has not taken yet do not count. In an ordered
    /// call the coordinator waits for the oldest item's worker while the others finish theirs;
    /// counting those would leave the fast workers idle until the slow one answered. Their
    /// results are bounded by the output ring instead: a worker whose output ring is full
    /// stops, and its inputs then count here.
    pub(crate) fn queue_full(&mut self, limit: u64) -> shmexec_shm::Result<bool> {
        // What was known finished gives an upper bound on the queue: only when that bound says
        // full is the worker's side of the ring looked at.
        let full = |(items, bytes): (usize, u64)| items >= 2 && bytes >= limit;
        if !full(self.expect.unfinished()) {
            return Ok(false);
        }
        let released = self.tx.released()?;
        self.expect.refresh(released);
        Ok(full(self.expect.unfinished()))
    }

    /// Whether the oldest item handed to this worker belongs to an abandoned call.
    pub(crate) fn has_stale_front(&self) -> bool {
        self.expect.front().is_some_and(|e| !e.live)
    }

    /// The current call ended: results still to come are discarded when they arrive.
    pub(crate) fn abandon(&mut self) {
        self.expect.abandon();
        self.live = 0;
    }
}
