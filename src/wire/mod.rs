//! What travels in the frames besides archives: error reports, the start-up frame's sequence
//! number, worker exit codes. The whole protocol between the coordinator, the launcher and the
//! workers (frames, parts, control words, the launch pipes, the spawn spec) is written down in
//! `src/wire/PROTOCOL.md`, beside this file.
//!
//! An `Error` payload is one code byte, two little-endian u64 (sizes, for the size errors), a
//! little-endian u32 naming the stage of a fused pipeline that failed (`u32::MAX`: none) and a
//! UTF-8 message.

use crate::error::Error;

/// Exit codes of a worker process. The coordinator only reports them when a worker dies: a
/// task can call `exit(n)` itself, so they never decide anything (the `State` control word
/// says whether a worker had started).
pub(crate) const EXIT_OK: i32 = 0;
/// `Task::init` failed (it was reported in the start-up frame too).
pub(crate) const EXIT_INIT_FAILED: i32 = 1;
/// The coordinator is gone or closed the rings.
pub(crate) const EXIT_COORDINATOR_GONE: i32 = 3;
/// A spawned worker's environment is not what the coordinator wrote.
pub(crate) const EXIT_BAD_SETUP: i32 = 4;

/// `Field::State` of a worker whose `init` succeeded. A value no stray store makes by chance:
/// anything else (0 while it starts) means it has not started.
pub(crate) const READY: u64 = 0x5245_4144_5921_0001;

/// `Field::Stop` asking a worker to stop. Any other non-zero value is corruption and ignored,
/// so that garbage in the counters segment cannot make a worker drop its queue.
pub(crate) const STOP: u64 = 0x5354_4f50_2121_0001;

/// The check word written beside `Field::Discard`: a worker skips items below a discard mark
/// only if its check word matches, so a stray store cannot discard live items.
pub(crate) fn discard_check(below: u64) -> u64 {
    below ^ 0x4449_5343_4152_4421
}

/// Set in `Field::Skip` beside an item's seq + 1: the item was answered already (its worker died
/// after its closing frame, before letting go of its input, often enough to give it up), so
/// the successor releases its input without publishing anything.
pub(crate) const SKIP_SILENTLY: u64 = 1 << 63;

/// Sequence number of the start-up frame.
pub(crate) const START_SEQ: u64 = u64::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Code {
    Task = 1,
    Panic = 2,
    OutputTooLarge = 3,
    InvalidInput = 4,
    Encode = 5,
    Init = 6,
    /// The coordinator marked this item as given up after crashes (see `Field::Skip`).
    Crashed = 7,
}

const HEAD: usize = 1 + 8 + 8 + 4;

/// The stage word of a report that names no stage.
const NO_STAGE: u32 = u32::MAX;

/// An error report as the worker writes it.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) code: Code,
    pub(crate) a: u64,
    pub(crate) b: u64,
    /// The index of the pipeline stage that failed, when the worker runs fused stages.
    pub(crate) stage: Option<u32>,
    pub(crate) message: String,
}

impl Report {
    pub(crate) fn new(code: Code, message: impl Into<String>) -> Report {
        Report {
            code,
            a: 0,
            b: 0,
            stage: None,
            message: message.into(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        HEAD + self.message.len()
    }

    /// Writes the report into `buf` (at least [`Report::len`] bytes).
    pub(crate) fn write(&self, buf: &mut [u8]) {
        buf[0] = self.code as u8;
        buf[1..9].copy_from_slice(&self.a.to_le_bytes());
        buf[9..17].copy_from_slice(&self.b.to_le_bytes());
        let stage = self.stage.unwrap_or(NO_STAGE);
        buf[17..21].copy_from_slice(&stage.to_le_bytes());
        buf[HEAD..self.len()].copy_from_slice(self.message.as_bytes());
    }
}

/// An item's failure in a stage of a fused chain, as its report (which names the stage). It
/// travels as the `BoxError` of an `ItemFailure::Failed` from the stage to the worker loop,
/// which sends the report as it is.
#[derive(Debug)]
pub(crate) struct StageFailure(pub(crate) Report);

impl std::fmt::Display for StageFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.message)
    }
}

impl std::error::Error for StageFailure {}

/// Turns the payload of an `Error` frame for item `seq` of `worker` into the error it reports,
/// inside an [`Error::Stage`] naming the stage when the report names one of `stages` (the
/// pool's fused pipeline stages, if any). The payload comes from another process, so anything
/// is possible: a malformed one is still an error for that item, with the bytes described.
pub(crate) fn read_report(worker: usize, seq: u64, payload: &[u8], stages: &[String]) -> Error {
    let e = read_error(worker, seq, payload);
    let stage = payload
        .get(17..21)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    match stage.and_then(|i| stages.get(i as usize)) {
        Some(name) => Error::Stage {
            stage: name.clone(),
            error: Box::new(e),
        },
        None => e,
    }
}

fn read_error(worker: usize, seq: u64, payload: &[u8]) -> Error {
    if payload.len() < HEAD {
        return Error::InvalidOutput {
            seq,
            reason: format!("malformed error report of {} bytes", payload.len()),
        };
    }
    let word = |r: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&payload[r]);
        u64::from_le_bytes(b)
    };
    let (a, b) = (word(1..9), word(9..17));
    let message = String::from_utf8_lossy(&payload[HEAD..]).into_owned();
    match payload[0] {
        x if x == Code::Task as u8 => Error::Task { seq, message },
        x if x == Code::Panic as u8 => Error::Panic { seq, message },
        x if x == Code::OutputTooLarge as u8 => Error::OutputTooLarge {
            seq,
            len: a as usize,
            max: b as usize,
        },
        x if x == Code::InvalidInput as u8 => Error::InvalidInput {
            seq,
            reason: message,
        },
        x if x == Code::Encode as u8 => Error::InvalidOutput {
            seq,
            reason: format!("the worker could not serialize it: {message}"),
        },
        x if x == Code::Init as u8 => Error::Init { worker, message },
        // The coordinator fills in the signal and the count from its own records.
        x if x == Code::Crashed as u8 => Error::WorkerCrashed {
            seq,
            signal: None,
            crashes: 0,
        },
        other => Error::InvalidOutput {
            seq,
            reason: format!("error report with unknown code {other}"),
        },
    }
}

/// The message of a caught panic.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}
