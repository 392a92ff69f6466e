//! Stateful stages: state carried from one item to the next (strax's event numbers, which
//! increment without gaps across chunks), on a serial stage's one worker, that survives the
//! worker's death exactly once, in order.
//!
//! After each item is closed and before its input is released, the stage saves its state,
//! tagged with the item's sequence number, into one of two slots in shared memory
//! ([`shmexec_shm::Snapshots`]). A successor (a worker started after the one before died) that
//! finds item `k` first in its ring restores the newest state saved after an item *before*
//! `k` and runs `k` again:
//! - died while running `k`, or after publishing its outputs but before saving: the newest
//!   state is the one after `k - 1`; `k` runs again from it and gives the same outputs (the
//!   pool drops the ones already handed out);
//! - died after saving `k`'s state but before releasing `k`: the state after `k` is there, but
//!   it is not *before* `k`; the other slot still holds the state after `k - 1`, which is the
//!   one used.
//!
//! An item that fails (an error or a panic in the stage, or a later stage of the same worker)
//! leaves the state as it was before it: the stage goes back to its last saved state, so a
//! failed chunk takes no event numbers.
//!
//! Each run of the pipeline starts from the default state (a DAQ run's events are numbered from
//! 0): before a run hands out its first item, the coordinator sets the slots' epoch to that
//! item's number, and state saved before it is not restored for the run's items.

use rkyv::Archived;
use rkyv::api::high::HighDeserializer;
use rkyv::util::AlignedVec;
use shmexec_shm::Snapshots;

use crate::archive::{Decode, Encode, RkyvError, decode, encode_into, encoded_len};
use crate::error::BoxError;
use crate::task::WorkerInfo;
use crate::task::bytes::{ByteTask, ItemFailure};
use crate::task::sink::OutputSink;

/// A stage that keeps state from one item to the next; add it with
/// [`Stages::stateful`](crate::pipeline::Stages::stateful). It runs on one worker, which sees
/// every item in input order. Its state is saved, in shared memory, after each item is closed
/// and before its input is let go; a successor of a worker that died restores the newest state
/// from before the item it runs again, so every item changes the state exactly once, in order.
/// An item that fails changes nothing, and each run of the pipeline starts from
/// `State::default()`. (The protocol, and why each place a worker can die at is covered:
/// `src/wire/PROTOCOL.md`, "Serial state".)
///
/// ```
/// use shmexec::pipeline::Stateful;
/// use shmexec::{BoxError, Samples};
///
/// /// Numbers the events of each chunk on from the last chunk's: no gaps, no repeats, even
/// /// when its worker is killed.
/// struct NumberEvents;
///
/// impl Stateful for NumberEvents {
///     type Input = Vec<f32>;        // one value per event
///     type Output = Vec<u64>;       // each event's number
///     type State = u64;             // the next number
///     fn process(
///         &mut self,
///         next: &mut u64,
///         events: &rkyv::Archived<Vec<f32>>,
///     ) -> Result<Vec<u64>, BoxError> {
///         let numbers = (*next..*next + events.len() as u64).collect();
///         *next += events.len() as u64;
///         Ok(numbers)
///     }
/// }
/// ```
pub trait Stateful {
    /// The items it takes.
    type Input: Encode<Archived: Decode>;
    /// What it gives for each.
    type Output: Encode<Archived: Decode>;
    /// The state, saved (serialized) after every item: keep it small, a few counters or the
    /// last record of a chunk.
    type State: Encode<Archived: Decode + rkyv::Deserialize<Self::State, HighDeserializer<RkyvError>>>
        + Default;

    /// See [`crate::Task::init`].
    fn init(&mut self, _worker: &WorkerInfo) -> Result<(), BoxError> {
        Ok(())
    }

    /// Handles one item with the state as the item before left it.
    fn process(
        &mut self,
        state: &mut Self::State,
        input: &Archived<Self::Input>,
    ) -> Result<Self::Output, BoxError>;

    /// See [`crate::Task::finish`].
    fn finish(&mut self, _worker: &WorkerInfo) {}
}

/// A [`Stateful`] task as the byte-level task of its stage.
pub(crate) struct StatefulStage<S: Stateful> {
    task: S,
    state: S::State,
    slots: Snapshots,
    /// The run whose state this is (its epoch: see `Snapshots::set_epoch`), once restored
    /// from the slots (done before the worker's first item of a run, when it knows which item
    /// that is).
    restored: Option<u64>,
}

impl<S: Stateful> StatefulStage<S> {
    pub(crate) fn new(task: S, slots: Snapshots) -> Self {
        StatefulStage {
            task,
            state: S::State::default(),
            slots,
            restored: None,
        }
    }

    /// The state saved after the newest item before `seq` (the default if there is none).
    fn restore(&mut self, seq: u64) -> Result<(), String> {
        self.state = match self.slots.latest_before(seq) {
            None => S::State::default(),
            Some((taken, bytes)) => {
                let mut aligned = AlignedVec::<16>::with_capacity(bytes.len());
                aligned.extend_from_slice(&bytes);
                let archived = decode::<Archived<S::State>>(&aligned).map_err(|e| {
                    format!("the state saved after item {taken} is not readable: {e}")
                })?;
                rkyv::deserialize::<S::State, RkyvError>(archived).map_err(|e| {
                    format!("the state saved after item {taken} is not readable: {e}")
                })?
            }
        };
        Ok(())
    }

    /// Restores the state for item `seq` unless this worker has it already: on its first item
    /// of a run (its successor's first item, a new run's first).
    fn ensure_restored(&mut self, seq: u64) -> Result<(), String> {
        // A new run starts from the default state; an item of the run before (in flight as the
        // new one started) goes on from its own.
        let epoch = self.slots.epoch();
        let run = if seq >= epoch { epoch } else { 0 };
        if self.restored != Some(run) {
            self.restore(seq)?;
            self.restored = Some(run);
        }
        Ok(())
    }

    /// Saves the state after item `seq`.
    fn save(&mut self, seq: u64) -> Result<(), String> {
        let buf = self.serialized()?;
        self.slots.write(seq, &buf).map_err(|e| e.to_string())
    }

    /// The state, serialized; an error if it does not fit a slot. Checked after each item, so
    /// that a state grown too large fails its item (and is rolled back) instead of failing the
    /// save after the item's outputs are out.
    fn serialized(&self) -> Result<AlignedVec<16>, String> {
        let len = encoded_len(&self.state).map_err(|e| e.to_string())?;
        let max = self.slots.capacity();
        if len > max {
            return Err(format!(
                "the stage's state would be {len} bytes serialized, more than the {max} a \
                 stateful stage keeps (MAX_STATE_BYTES): keep it smaller"
            ));
        }
        let mut buf = AlignedVec::<16>::with_capacity(len);
        buf.resize(len, 0);
        let n = encode_into(&self.state, &mut buf).map_err(|e| e.to_string())?;
        buf.resize(n, 0);
        Ok(buf)
    }
}

impl<S: Stateful> ByteTask for StatefulStage<S> {
    fn init(&mut self, worker: &WorkerInfo) -> Result<(), BoxError> {
        self.task.init(worker)
    }

    fn run(&mut self, input: &[u8], out: &mut OutputSink<'_>) -> Result<(), ItemFailure> {
        self.ensure_restored(out.seq())
            .map_err(|e| ItemFailure::Failed(e.into()))?;
        let input = decode::<Archived<S::Input>>(input)
            .map_err(|e| ItemFailure::InvalidInput(e.to_string()))?;
        let value = self.task.process(&mut self.state, input)?;
        // Before the output goes out: a state that no longer fits fails the item here.
        self.serialized()
            .map_err(|e| ItemFailure::Failed(e.into()))?;
        out.emit_last(&value)?;
        Ok(())
    }

    fn item_closed(&mut self, seq: u64, ok: bool) {
        // An item that never reached the stage (a fused filter before it dropped it) saves the
        // state it had, which a successor's first such item must restore first.
        if let Err(e) = self.ensure_restored(seq) {
            panic!("{e}");
        }
        if !ok {
            // The item (in this stage or a later one) had no effect: back to the state after
            // the item before it.
            if let Err(e) = self.restore(seq) {
                panic!("{e}");
            }
        }
        if let Err(e) = self.save(seq) {
            panic!("cannot save the state after item {seq}: {e}");
        }
    }

    fn finish(&mut self, worker: &WorkerInfo) {
        self.task.finish(worker)
    }
}
