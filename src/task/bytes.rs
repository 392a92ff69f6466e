//! [`ByteTask`]: what a worker really runs. It sees an input frame's bytes and writes zero, one
//! or many outputs for it; the typed [`crate::Task`], [`crate::ArrayTask`] and the closure
//! tasks are adapters on it, and so are tasks that bindings (Python) or fused stages bring.
//! The worker loop is written once, over `dyn ByteTask`.

use rkyv::Archived;

use super::{Task, WorkerInfo};
use crate::archive::decode;
use crate::error::BoxError;
use crate::task::sink::OutputSink;

/// Why an item gave no (more) output.
#[derive(Debug)]
pub enum ItemFailure {
    /// The input bytes are not what the task reads (an invalid archive).
    InvalidInput(String),
    /// The task failed on this item.
    Failed(BoxError),
}

impl From<BoxError> for ItemFailure {
    fn from(e: BoxError) -> Self {
        ItemFailure::Failed(e)
    }
}

/// A task at the level of bytes: object-safe, so the worker loop is not generic.
///
/// Implement [`crate::Task`] instead unless you bring your own input format (a binding's
/// arrays, a fused chain of stages). The outputs must be archives of the pool's output type:
/// the caller validates each before it reads it.
pub trait ByteTask {
    /// Runs once in each worker before its first item; see [`crate::Task::init`].
    fn init(&mut self, _worker: &WorkerInfo) -> Result<(), BoxError> {
        Ok(())
    }

    /// Handles one item: `input` is its frame's payload, 64-byte aligned in shared memory.
    /// Each output is published through `out` as soon as it is written; an item may have none.
    fn run(&mut self, input: &[u8], out: &mut OutputSink<'_>) -> Result<(), ItemFailure>;

    /// Runs after item `seq` is closed (its outputs published, `ok`, or its error) and before
    /// its input is released: a worker that dies before this returns has its item run again
    /// by a successor, one that dies after does not. A stage that keeps state saves it here
    /// ([`crate::pipeline::Stateful`]).
    fn item_closed(&mut self, _seq: u64, _ok: bool) {}

    /// Runs once in each worker when the pool shuts down cleanly.
    fn finish(&mut self, _worker: &WorkerInfo) {}
}

/// A typed [`Task`] run as a [`ByteTask`]: the input is validated as an archive of
/// `T::Input`, then handed to [`Task::produce`].
pub(crate) struct Typed<T>(pub(crate) T);

impl<T: Task> ByteTask for Typed<T> {
    fn init(&mut self, worker: &WorkerInfo) -> Result<(), BoxError> {
        self.0.init(worker)
    }

    fn run(&mut self, input: &[u8], out: &mut OutputSink<'_>) -> Result<(), ItemFailure> {
        let input = decode::<Archived<T::Input>>(input)
            .map_err(|e| ItemFailure::InvalidInput(e.to_string()))?;
        self.0.produce(input, out).map_err(ItemFailure::Failed)
    }

    fn finish(&mut self, worker: &WorkerInfo) {
        self.0.finish(worker)
    }
}
