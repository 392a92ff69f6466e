//! The coordinator's side of one worker: its process, its rings, and the items handed to it
//! that it has not answered yet.

use std::time::Instant;

use shmexec_shm::{ChildProcess, Consumer, Producer, Ring};

use super::queue::{Expected, Queue};

/// Where a worker's process stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Life {
    /// A process runs: starting (its `Field::State` is not `READY` yet) or serving.
    Up,
    /// Its process died; the successor starts at `at` (a backoff after failed starts).
    Down { at: Instant },
    /// Given up after too many failed starts in a row: its items fail with `WorkerLost`.
    Failed,
}

/// What the chunk timeout watches of a worker: its `Field::Current` and its input ring's
/// released position (either moving is progress), and since when (on the supervisor's
/// watch clock) they have not moved.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Watch {
    pub(crate) current: u64,
    pub(crate) released: u64,
    pub(crate) since: std::time::Duration,
}

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
    /// For the chunk timeout.
    pub(crate) watching: Watch,
    pub(crate) life: Life,
    /// Starts in a row that failed (see `Builder::max_start_attempts`).
    pub(crate) failed_starts: u32,
    /// When the running process was started (the supervisor's watch clock), for the start
    /// timeout.
    pub(crate) launched: std::time::Duration,
    /// The input ring's released position when it was started: a worker that moved it
    /// finished an item.
    pub(crate) released_at_launch: u64,
    /// Why the supervisor killed the running process, if it did.
    pub(crate) kill_reason: Option<String>,
    /// What went wrong the last time it died or could not be started, for the errors of a
    /// worker given up.
    pub(crate) why: Option<String>,
    /// The last start-up report of a successor that refused to serve (`init` failed).
    pub(crate) init_error: Option<String>,
    /// Items whose input frames end at or before this input ring position have lost their
    /// output (a corrupt output ring was reset), and why.
    pub(crate) lost_outputs: Option<(u64, String)>,
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

    /// Whether the oldest item's output is lost, and why: its input was released (which the
    /// worker does only after publishing the item's closing frame), yet no frame is left to
    /// read. A header or stamp overwritten in the output ring does that.
    ///
    /// SYNC POINT with the worker's release of an input after the closing frame is published:
    /// the released position is loaded (Acquire) before the ring is looked at again, so a
    /// closing frame published before that release is seen.
    pub(crate) fn lost_output(&mut self) -> Option<String> {
        let front = self.expect.front().copied()?;
        if self.life != Life::Up {
            return None;
        }
        let released = self.tx.released().ok()?;
        if front.end > released || !matches!(self.rx.try_peek(), Ok(None)) {
            return None;
        }
        Some(format!(
            "the worker released the input of item {} but no output frame of it can be read",
            front.seq
        ))
    }

    /// The pid of its running process; 0 while it has none (its successor waits for a
    /// backoff, or it was given up): the last one was reaped, and its pid may be reused.
    pub(crate) fn pid(&self) -> i32 {
        if self.life == Life::Up {
            self.child.pid()
        } else {
            0
        }
    }

    /// The item a `Field::Current` value of this worker names (seq + 1; 0 is none), if it is
    /// one queued to this worker: any other value is garbage and names nothing.
    pub(crate) fn current_item(&self, current: u64) -> Option<u64> {
        current
            .checked_sub(1)
            .filter(|&seq| self.expect.contains(seq))
    }

    /// The item a dead worker's `Current` value names if that item was answered already (its
    /// closing frame read) but its input not released (`released`, the input ring's released
    /// position): the worker died after its closing frame, and its successor runs the item
    /// again first, its outputs dropped. Such a death is the item's too: one that kills every
    /// worker there must be given up, not rerun for ever.
    pub(crate) fn answered_item(&self, current: u64, released: u64) -> Option<u64> {
        let seq = current.checked_sub(1)?;
        self.expect
            .last_closed()
            .filter(|e| e.seq == seq && released < e.end)
            .map(|e| e.seq)
    }

    /// Why this worker was given up, for the errors of its items.
    pub(crate) fn given_up(&self) -> String {
        let mut reason = format!(
            "died and failed to start {} times in a row",
            self.failed_starts
        );
        if let Some(why) = &self.why {
            reason.push_str(&format!(" (last: {why})"));
        }
        if let Some(e) = &self.init_error {
            reason.push_str(&format!("; its last start-up report: {e}"));
        }
        reason
    }

    /// The current call ended: results still to come are discarded when they arrive.
    pub(crate) fn abandon(&mut self) {
        self.expect.abandon();
        self.live = 0;
    }
}
