//! Fused stages: a chain of stages run in one worker process, each output of a stage handed
//! to the next as soon as it is written, with no frame and no hop between them.
//!
//! A stage writes its outputs into a buffer the chain owns (its *room*, 64-byte aligned like a
//! ring slot, kept and grown across items), and the next stage reads each one there, in place,
//! through the same byte-level interface ([`ByteTask`]) a worker runs: the sink a stage writes to
//! is either the worker's output ring (the last stage) or the next stage
//! ([`NextStage`]). A filter passes its input on with no copy at all.
//!
//! Failures name their stage: a stage's error, panic or bad input becomes a report with the
//! stage's index ([`StageFailure`]), the item's later stages do not run, and the caller gets
//! [`crate::Error::Stage`] in the item's place.

use std::panic::{AssertUnwindSafe, catch_unwind};

use rkyv::util::AlignedVec;

use super::counters::{Counter, StageCounters};
use crate::archive::MAX_ARCHIVE;
use crate::error::BoxError;
use crate::task::WorkerInfo;
use crate::task::bytes::{ByteTask, ItemFailure};
use crate::task::sink::{NextStage, Outcome, OutputSink};
use crate::wire::{Code, Report, StageFailure, panic_message};

/// The failure of stage `stage`, reported as `report` says.
fn failure(stage: u32, mut report: Report) -> ItemFailure {
    report.stage = Some(stage);
    ItemFailure::Failed(Box::new(StageFailure(report)))
}

/// One stage of a chain: its task and its name (for `init` errors).
pub(crate) struct Stage {
    pub(crate) name: String,
    pub(crate) task: Box<dyn ByteTask>,
}

/// The stages of one fused group, as the [`ByteTask`] its workers run.
pub(crate) struct Chain {
    /// Index of the first stage in the pipeline (stage numbers in reports are pipeline-wide).
    first: u32,
    stages: Vec<Stage>,
    /// One room per stage but the last: where that stage's outputs are written.
    rooms: Vec<AlignedVec<64>>,
    counters: StageCounters,
    /// This worker's index (set in `init`).
    worker: usize,
}

impl Chain {
    pub(crate) fn new(first: u32, stages: Vec<Stage>, counters: StageCounters) -> Chain {
        let rooms = (1..stages.len()).map(|_| AlignedVec::new()).collect();
        Chain {
            first,
            stages,
            rooms,
            counters,
            worker: 0,
        }
    }
}

impl ByteTask for Chain {
    fn init(&mut self, worker: &WorkerInfo) -> Result<(), BoxError> {
        self.worker = worker.index;
        for stage in &mut self.stages {
            match catch_unwind(AssertUnwindSafe(|| stage.task.init(worker))) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("stage '{}': {e}", stage.name).into()),
                Err(p) => {
                    let message = panic_message(&*p);
                    return Err(format!("stage '{}': init panicked: {message}", stage.name).into());
                }
            }
        }
        Ok(())
    }

    fn run(&mut self, input: &[u8], out: &mut OutputSink<'_>) -> Result<(), ItemFailure> {
        if self.stages.len() > 1 {
            // Each output of the stage before runs the last stage again: none of them closes
            // the item, the worker does once the whole chain is through.
            out.keep_open();
        }
        let at = Position {
            stage: self.first,
            worker: self.worker,
            counters: &self.counters,
        };
        run_from(at, &mut self.stages, &mut self.rooms, input, out)
    }

    fn item_closed(&mut self, seq: u64, ok: bool) {
        for stage in &mut self.stages {
            stage.task.item_closed(seq, ok);
        }
    }

    fn finish(&mut self, worker: &WorkerInfo) {
        for stage in &mut self.stages {
            // One stage's panic must not keep the others from finishing.
            let _ = catch_unwind(AssertUnwindSafe(|| stage.task.finish(worker)));
        }
    }
}

/// Where in the pipeline a stage runs: its pipeline-wide index and the counters it adds to.
#[derive(Clone, Copy)]
struct Position<'c> {
    stage: u32,
    worker: usize,
    counters: &'c StageCounters,
}

impl Position<'_> {
    fn next(self) -> Self {
        Position {
            stage: self.stage + 1,
            ..self
        }
    }

    fn add(&self, counter: Counter, v: u64) {
        self.counters
            .add(self.worker, self.stage as usize, counter, v);
    }
}

/// Runs `stages[0]` on `input`, its outputs through the rest of the chain and the last stage's
/// into `out`.
fn run_from(
    at: Position<'_>,
    stages: &mut [Stage],
    rooms: &mut [AlignedVec<64>],
    input: &[u8],
    out: &mut OutputSink<'_>,
) -> Result<(), ItemFailure> {
    let Some((stage, later)) = stages.split_first_mut() else {
        return Ok(());
    };
    let started = shmexec_shm::clock::now_ns();
    at.add(Counter::Items, 1);
    at.add(Counter::BytesIn, input.len() as u64);
    let (result, outputs, bytes, downstream_ns) = match rooms.split_first_mut() {
        None => {
            let (parts, bytes) = (out.published_parts(), out.published_bytes());
            let result = run_stage(at, &mut *stage.task, input, out);
            // A report the sink made itself (an output too large for the ring) names this stage.
            out.blame_stage(at.stage);
            let outputs = u64::from(out.published_parts() - parts);
            (result, outputs, out.published_bytes() - bytes, 0)
        }
        Some((room, later_rooms)) => {
            let (seq, started_ns) = (out.seq(), out.started_ns());
            let mut next = Link {
                at: at.next(),
                stages: later,
                rooms: later_rooms,
                room,
                room_len: 0,
                out,
                failure: None,
                spent_ns: 0,
            };
            let mut sink = OutputSink::to_stage(&mut next, seq, started_ns);
            let result = run_stage(at, &mut *stage.task, input, &mut sink);
            let (outputs, bytes) = (u64::from(sink.published_parts()), sink.published_bytes());
            let (outcome, _) = sink.into_outcome();
            // A later stage's failure is the item's; this stage only saw its output refused.
            let result = match (next.failure.take(), outcome) {
                (Some(later_failure), _) => Err(later_failure),
                (None, Some(Outcome::Report(report))) => Err(failure(at.stage, report)),
                (None, _) => result,
            };
            (result, outputs, bytes, next.spent_ns)
        }
    };
    at.add(Counter::Outputs, outputs);
    at.add(Counter::BytesOut, bytes);
    let busy = shmexec_shm::clock::now_ns().saturating_sub(started) - downstream_ns;
    at.add(Counter::BusyNs, busy);
    if result.is_err() {
        at.add(Counter::Errors, 1);
    }
    result
}

/// Runs one stage's task, its failures (and panics) made into reports that name it.
fn run_stage(
    at: Position<'_>,
    task: &mut dyn ByteTask,
    input: &[u8],
    out: &mut OutputSink<'_>,
) -> Result<(), ItemFailure> {
    match catch_unwind(AssertUnwindSafe(|| task.run(input, out))) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(ItemFailure::InvalidInput(e))) => {
            Err(failure(at.stage, Report::new(Code::InvalidInput, e)))
        }
        Ok(Err(ItemFailure::Failed(e))) => match e.downcast::<StageFailure>() {
            // A later stage's, passed on by a task that returned what `emit` gave it.
            Ok(later) => Err(ItemFailure::Failed(later)),
            Err(e) => Err(failure(at.stage, Report::new(Code::Task, e.to_string()))),
        },
        Err(p) => Err(failure(
            at.stage,
            Report::new(Code::Panic, panic_message(&*p)),
        )),
    }
}

/// The rest of a chain, as the sink of the stage before it sees it.
struct Link<'l, 'o> {
    at: Position<'l>,
    stages: &'l mut [Stage],
    rooms: &'l mut [AlignedVec<64>],
    room: &'l mut AlignedVec<64>,
    /// The length of the slot the stage before reserved last.
    room_len: usize,
    out: &'l mut OutputSink<'o>,
    /// The first failure of a later stage for this item.
    failure: Option<ItemFailure>,
    /// Time spent in later stages, which is not the stage before's busy time.
    spent_ns: u64,
}

impl Link<'_, '_> {
    fn run(&mut self, input: Option<&[u8]>, n: usize) -> Result<(), ()> {
        let started = shmexec_shm::clock::now_ns();
        let input = match input {
            Some(bytes) => bytes,
            None => &self.room[..n],
        };
        let result = run_from(self.at, self.stages, self.rooms, input, self.out);
        self.spent_ns += shmexec_shm::clock::now_ns().saturating_sub(started);
        result.map_err(|f| {
            self.failure.get_or_insert(f);
        })
    }
}

impl NextStage for Link<'_, '_> {
    fn max_payload(&self) -> usize {
        MAX_ARCHIVE
    }

    fn grow(&mut self, len: usize) {
        if self.room.len() < len {
            self.room.resize(len, 0);
        }
        self.room_len = len;
    }

    fn room(&self) -> &[u8] {
        &self.room[..self.room_len]
    }

    fn room_mut(&mut self) -> &mut [u8] {
        &mut self.room[..self.room_len]
    }

    fn deliver(&mut self, n: usize) -> Result<(), ()> {
        self.run(None, n)
    }

    fn forward(&mut self, bytes: &[u8]) -> Result<(), ()> {
        self.run(Some(bytes), bytes.len())
    }
}
