//! What a worker runs: the [`Task`] trait and closure tasks.

use std::marker::PhantomData;

use rkyv::Archived;

use crate::archive::{Decode, Encode};
use crate::error::BoxError;

/// Facts about the worker a task runs in, given to [`Task::init`] and [`Task::finish`].
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    /// 0-based index of the worker in its pool.
    pub index: usize,
    /// Number of workers in the pool.
    pub workers: usize,
    /// The core the worker is pinned to, if any.
    pub core: Option<usize>,
}

/// A function run on every chunk, in a worker process.
///
/// Each worker gets its own copy of the task (the pool forks after it is built), calls
/// [`init`](Task::init) once, [`process`](Task::process) for every chunk it is handed, and
/// [`finish`](Task::finish) when the pool shuts down. State set up in `init` (a file, a
/// connection, a lookup table, scratch buffers) lives for the worker's life, as in btrdb's
/// connection-per-process or pypeln's `on_start`.
///
/// The input arrives as an archived value inside shared memory: read it in place (numeric arrays
/// as slices with [`crate::Samples`]) instead of deserializing. The output is serialized straight
/// into the worker's output ring.
///
/// ```
/// use shmexec::{BoxError, Samples, Task};
///
/// /// Sums the samples above a threshold; the threshold is set per worker in `init`.
/// struct SumAbove { threshold: f32 }
///
/// impl Task for SumAbove {
///     type Input = Vec<f32>;
///     type Output = f64;
///     fn process(&mut self, input: &rkyv::Archived<Vec<f32>>) -> Result<f64, BoxError> {
///         let t = self.threshold;
///         Ok(input.samples().iter().filter(|&&x| x > t).map(|&x| x as f64).sum())
///     }
/// }
/// ```
pub trait Task {
    /// The chunk type the coordinator sends (any rkyv type).
    type Input: Encode<Archived: Decode>;
    /// The result type sent back (any rkyv type).
    type Output: Encode<Archived: Decode>;

    /// Runs once in each worker before its first chunk. An `Err` (or a panic) makes
    /// [`crate::Builder::build`] fail with [`crate::Error::Init`].
    fn init(&mut self, _worker: &WorkerInfo) -> Result<(), BoxError> {
        Ok(())
    }

    /// Handles one chunk. An `Err` or a panic becomes that item's [`crate::Error::Task`] or
    /// [`crate::Error::Panic`]; the worker goes on with the next chunk.
    fn process(&mut self, input: &Archived<Self::Input>) -> Result<Self::Output, BoxError>;

    /// Runs once in each worker when the pool shuts down cleanly.
    fn finish(&mut self, _worker: &WorkerInfo) {}
}

/// A task made of a closure; see [`from_fn`].
pub struct FnTask<In, Out, F> {
    f: F,
    _types: PhantomData<fn(In) -> Out>,
}

/// A task from a closure that cannot fail (a panic still becomes that item's error). Name the
/// input type, the rest is inferred:
///
/// ```
/// use shmexec::Samples;
/// let task = shmexec::from_fn::<Vec<f32>, _, _>(|chunk| chunk.samples().iter().sum::<f32>());
/// ```
pub fn from_fn<In, Out, F>(f: F) -> FnTask<In, Out, F>
where
    In: Encode<Archived: Decode>,
    Out: Encode<Archived: Decode>,
    F: FnMut(&Archived<In>) -> Out,
{
    FnTask {
        f,
        _types: PhantomData,
    }
}

impl<In, Out, F> Task for FnTask<In, Out, F>
where
    In: Encode<Archived: Decode>,
    Out: Encode<Archived: Decode>,
    F: FnMut(&Archived<In>) -> Out,
{
    type Input = In;
    type Output = Out;
    fn process(&mut self, input: &Archived<In>) -> Result<Out, BoxError> {
        Ok((self.f)(input))
    }
}

/// A task from a closure that returns `Result`; see [`try_from_fn`].
pub struct TryFnTask<In, Out, F> {
    f: F,
    _types: PhantomData<fn(In) -> Out>,
}

/// A task from a fallible closure: its `Err` becomes that item's [`crate::Error::Task`].
///
/// ```
/// let task = shmexec::try_from_fn::<u64, _, _>(|&n| {
///     if n.to_native() == 13 { Err("unlucky chunk".into()) } else { Ok(n.to_native() * 2) }
/// });
/// ```
pub fn try_from_fn<In, Out, F>(f: F) -> TryFnTask<In, Out, F>
where
    In: Encode<Archived: Decode>,
    Out: Encode<Archived: Decode>,
    F: FnMut(&Archived<In>) -> Result<Out, BoxError>,
{
    TryFnTask {
        f,
        _types: PhantomData,
    }
}

impl<In, Out, F> Task for TryFnTask<In, Out, F>
where
    In: Encode<Archived: Decode>,
    Out: Encode<Archived: Decode>,
    F: FnMut(&Archived<In>) -> Result<Out, BoxError>,
{
    type Input = In;
    type Output = Out;
    fn process(&mut self, input: &Archived<In>) -> Result<Out, BoxError> {
        (self.f)(input)
    }
}
