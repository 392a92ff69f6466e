//! The one error type of the executor.

use std::time::Duration;

use shmexec_shm::memory::Bytes;

/// What went wrong with one item of a call, or with the pool.
///
/// Item errors ([`Error::Task`], [`Error::Panic`], [`Error::InputTooLarge`], ...) are returned in
/// that item's place and the call goes on; pool errors ([`Error::WorkerDied`], [`Error::Broken`])
/// end the call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The task returned `Err` for this item.
    #[error("task failed on item {seq}: {message}")]
    Task { seq: u64, message: String },

    /// The task panicked on this item; the worker caught it and goes on.
    #[error("task panicked on item {seq}: {message}")]
    Panic { seq: u64, message: String },

    /// The serialized input does not fit a worker's input ring.
    #[error(
        "input {seq} is {len} bytes serialized, larger than an input ring can carry ({max} bytes): \
         raise Builder::ring_bytes or split the chunk"
    )]
    InputTooLarge { seq: u64, len: usize, max: usize },

    /// The serialized output does not fit the worker's output ring.
    #[error(
        "output {seq} is {len} bytes serialized, larger than an output ring can carry ({max} \
         bytes): raise Builder::ring_bytes"
    )]
    OutputTooLarge { seq: u64, len: usize, max: usize },

    /// The input could not be serialized (or, for in-place input, the fill function failed).
    #[error("input {seq} could not be written: {reason}")]
    Encode { seq: u64, reason: String },

    /// A worker's output frame is not a valid archive of the output type.
    #[error("output {seq} is not a valid archive: {reason}")]
    InvalidOutput { seq: u64, reason: String },

    /// The worker could not read the input frame as an archive of the input type.
    #[error("input {seq} is not a valid archive: {reason}")]
    InvalidInput { seq: u64, reason: String },

    /// The caller holds so many outputs of one worker that its output ring is full: the worker
    /// cannot write the next one. Drop the held [`crate::OutputRef`]s (or keep owned copies with
    /// [`crate::OutputRef::deserialize`]) and call `next()` again: nothing is lost.
    #[error(
        "worker {worker}'s output ring is full of {held} outputs ({bytes} bytes) that the caller \
         still holds: drop them or keep deserialize()d copies, then call next() again"
    )]
    OutputsHeld {
        worker: usize,
        held: usize,
        bytes: usize,
    },

    /// The call ended before it ran every input, for the reason given. `results` inputs had
    /// all their outputs (or their error) handed out: in an ordered call, its first `results`
    /// inputs. `outputs` counts the outputs handed out (the same number for a task with one
    /// output per input; an input whose outputs were only partly handed out counts among the
    /// inputs not run). `not_run` is how many inputs were not run, when the call knows how
    /// many its iterator still had. Drop the results that block it, then run those inputs
    /// again.
    #[error(
        "the call ended after the results of {results} inputs ({outputs} outputs) with {} not \
         run: {reason}; drop the held results (or keep deserialize()d copies) and run the rest \
         again (in an ordered call, the inputs from index {results} on)",
        match not_run { Some(n) => format!("{n} inputs"), None => "the remaining inputs".to_owned() }
    )]
    CallEnded {
        results: u64,
        outputs: u64,
        not_run: Option<u64>,
        reason: String,
    },

    /// The stream's receiving half is gone, so nothing more can be sent.
    #[error("the stream's receiver is gone: nothing more can be sent")]
    StreamClosed,

    /// `Task::init` failed (or panicked) in a worker, so the pool was not built.
    #[error("worker {worker} failed to start: {message}")]
    Init { worker: usize, message: String },

    /// This item killed its worker `crashes` times (the pool's `max_retries`), so it is given
    /// up; the pool respawned the worker and goes on. `signal` is the signal that killed the
    /// worker the last time, if one did.
    #[error("item {seq} crashed its worker {crashes} times{}; given up", match signal { Some(s) => format!(" (last by signal {s})"), None => String::new() })]
    WorkerCrashed {
        seq: u64,
        signal: Option<i32>,
        crashes: u32,
    },

    /// The worker spent longer than the pool's chunk timeout on this item: it was killed and
    /// replaced, and the item is given up.
    #[error(
        "item {seq} ran past the chunk timeout of {after:?}; its worker was killed and replaced"
    )]
    ChunkTimeout { seq: u64, after: Duration },

    /// This item was queued to a worker that died and could not be started again
    /// ([`crate::Builder::max_start_attempts`]); it was not run. The other workers go on.
    #[error("item {seq} was not run: worker {worker} {reason}; run it again")]
    WorkerLost {
        seq: u64,
        worker: usize,
        reason: String,
    },

    /// A worker process died and could not be replaced.
    #[error("worker {worker} (pid {pid}) died{}: {status}", match seq { Some(s) => format!(" while item {s} was in flight"), None => String::new() })]
    WorkerDied {
        worker: usize,
        pid: i32,
        seq: Option<u64>,
        status: String,
    },

    /// An earlier failure left the pool unusable.
    #[error("the pool is unusable after an earlier failure: {0}")]
    Broken(String),

    /// A worker did not answer in time (start-up or shutdown).
    #[error("worker {worker} did not {what} within {after:?}")]
    Timeout {
        worker: usize,
        what: &'static str,
        after: Duration,
    },

    /// A [`crate::shared::Span`] reaches beyond the pool's shared region.
    #[error(
        "span of {len} samples from sample {start} reaches beyond the shared region ({region} \
         samples): raise Builder::shared_bytes or fix the span"
    )]
    SpanOutOfRange { start: u64, len: u64, region: u64 },

    /// A [`crate::shared::Span`] was read in a process without a shared region: a worker of a
    /// pool built without [`crate::Builder::shared_bytes`], or the coordinator.
    #[error(
        "no shared region here: spans are read in the workers of a pool built with \
         Builder::shared_bytes (the coordinator reads the region with Pool::shared)"
    )]
    NoSharedRegion,

    /// The pool's shared memory does not fit the memory this process may still take: a memory
    /// cgroup's limit (a container's), the machine's available RAM or `RLIMIT_AS`, whichever
    /// leaves the least (`limit` names it). Checked before anything is allocated, so that the
    /// build fails instead of the kernel's OOM killer ending the process. `needed` counts every
    /// worker's rings, the counters, the shared region and a margin for the processes
    /// themselves; `parts` spells that sum out.
    #[error(
        "not enough memory for the pool: it needs {} ({parts}), but {limit} leaves {}; lower \
         Builder::ring_bytes (or input_ring_bytes / output_ring_bytes), Builder::workers or \
         Builder::shared_bytes, or raise that limit",
        Bytes(*needed), Bytes(*available)
    )]
    OutOfMemory {
        needed: u64,
        available: u64,
        limit: String,
        parts: String,
    },

    /// A builder setting is impossible (no cores, an unknown core, zero workers...).
    #[error("invalid setting: {0}")]
    InvalidArgument(String),

    /// `fork` was refused or failed; see the message for what to do.
    #[error("cannot start workers: {0}")]
    Start(String),

    /// A chunk a stage gave breaks strax's time laws ([`crate::time`]): a record outside its
    /// chunk or out of order, or a chunk that overlaps or leaves a gap after the one before
    /// (checked by [`crate::pipeline::Stages::check_time`]). It comes in the chunk's place,
    /// inside [`Error::Stage`] naming the stage.
    #[error("item {seq}: {error}")]
    Time {
        seq: u64,
        error: crate::time::TimeError,
    },

    /// An item failed in a stage of a [pipeline](crate::pipeline): `error` is what went wrong
    /// there (a task's error or panic, an output too large, ...) and `stage` the stage's name.
    /// The item's later stages did not run: the error takes its place in the results.
    #[error("stage '{stage}': {error}")]
    Stage { stage: String, error: Box<Error> },

    /// A saved stream could not be written or read (see [`crate::store`]).
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),

    /// The shared-memory transport failed (out of memory for the rings, a corrupt frame...).
    #[error(transparent)]
    Transport(#[from] shmexec_shm::Error),
}

/// The pattern of every error that is about one item, binding its sequence number to `$seq`:
/// the one list of them.
macro_rules! item_error {
    ($seq:ident) => {
        Error::Task { seq: $seq, .. }
            | Error::Panic { seq: $seq, .. }
            | Error::InputTooLarge { seq: $seq, .. }
            | Error::OutputTooLarge { seq: $seq, .. }
            | Error::Encode { seq: $seq, .. }
            | Error::InvalidOutput { seq: $seq, .. }
            | Error::InvalidInput { seq: $seq, .. }
            | Error::WorkerCrashed { seq: $seq, .. }
            | Error::WorkerLost { seq: $seq, .. }
            | Error::ChunkTimeout { seq: $seq, .. }
            | Error::Time { seq: $seq, .. }
    };
}

impl Error {
    /// Whether this is one item's error, returned in that item's place while the call goes on
    /// (a task's `Err` or panic, an input or output too large, an item given up after crashes
    /// or a timeout, ...), rather than one that concerns the pool or the whole call.
    pub fn is_item(&self) -> bool {
        self.seq().is_some()
    }

    /// The same error about item `seq` instead (a pipeline numbers an error by the input it
    /// came from, whichever stage it happened in).
    pub(crate) fn with_seq(mut self, to: u64) -> Error {
        if let Some(seq) = self.seq_mut() {
            *seq = to;
        }
        self
    }

    /// The item an item error is about: its sequence number (see [`crate::OutputRef::seq`]).
    pub fn seq(&self) -> Option<u64> {
        match self {
            item_error!(seq) => Some(*seq),
            Error::Stage { error, .. } => error.seq(),
            _ => None,
        }
    }

    /// A copy of an item error, for an item that failed before a pipeline's fan-out (each
    /// consumer gets its error in the item's place); other errors are not copied, but
    /// described (they never travel so).
    pub(crate) fn item_copy(&self) -> Error {
        match self {
            Error::Task { seq, message } => Error::Task {
                seq: *seq,
                message: message.clone(),
            },
            Error::Panic { seq, message } => Error::Panic {
                seq: *seq,
                message: message.clone(),
            },
            Error::InputTooLarge { seq, len, max } => Error::InputTooLarge {
                seq: *seq,
                len: *len,
                max: *max,
            },
            Error::OutputTooLarge { seq, len, max } => Error::OutputTooLarge {
                seq: *seq,
                len: *len,
                max: *max,
            },
            Error::Encode { seq, reason } => Error::Encode {
                seq: *seq,
                reason: reason.clone(),
            },
            Error::InvalidOutput { seq, reason } => Error::InvalidOutput {
                seq: *seq,
                reason: reason.clone(),
            },
            Error::InvalidInput { seq, reason } => Error::InvalidInput {
                seq: *seq,
                reason: reason.clone(),
            },
            Error::WorkerCrashed {
                seq,
                signal,
                crashes,
            } => Error::WorkerCrashed {
                seq: *seq,
                signal: *signal,
                crashes: *crashes,
            },
            Error::WorkerLost {
                seq,
                worker,
                reason,
            } => Error::WorkerLost {
                seq: *seq,
                worker: *worker,
                reason: reason.clone(),
            },
            Error::ChunkTimeout { seq, after } => Error::ChunkTimeout {
                seq: *seq,
                after: *after,
            },
            Error::Time { seq, error } => Error::Time {
                seq: *seq,
                error: error.clone(),
            },
            Error::Stage { stage, error } => Error::Stage {
                stage: stage.clone(),
                error: Box::new(error.item_copy()),
            },
            other => Error::Broken(other.to_string()),
        }
    }

    /// Where an item error keeps its sequence number; `None` for other errors.
    fn seq_mut(&mut self) -> Option<&mut u64> {
        match self {
            item_error!(seq) => Some(seq),
            Error::Stage { error, .. } => error.seq_mut(),
            _ => None,
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The error type a task returns: anything that converts with `?` or `.into()`, including a
/// `&str` or `String` message.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
