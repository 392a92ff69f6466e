//! What a worker runs: the [`Task`] trait and closure tasks.

use std::marker::PhantomData;

use rkyv::Archived;

use crate::archive::{Decode, Encode, Sample};
use crate::error::BoxError;
pub mod bytes;
pub mod sink;

use bytes::ByteTask;
use sink::OutputSink;

/// The argument of [`Task::into_worker`]: a type no one outside this crate can name, so the
/// method can be neither called nor overridden there.
mod hook {
    pub struct Token(pub(crate) ());
}
pub(crate) use hook::Token;

/// Facts about the worker a task runs in, given to [`Task::init`] and [`Task::finish`].
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    /// 0-based index of the worker in its pool.
    pub index: usize,
    /// Number of workers in the pool.
    pub workers: usize,
    /// The core the worker is pinned to, if any.
    pub core: Option<usize>,
    /// Whether it runs at the lowest priority, beside the coordinator
    /// ([`Pinning::SourceFirst`](crate::Pinning::SourceFirst)).
    pub low_priority: bool,
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

    /// Gets each output back after it was serialized into the ring, to reuse its buffers: a
    /// task that returns a fresh 4 MiB `Vec` per chunk pays an allocation and page faults per
    /// chunk, one that keeps the `Vec` here and refills it does not. The default drops it.
    fn recycle(&mut self, _output: Self::Output) {}

    /// Runs once in each worker when the pool shuts down cleanly.
    fn finish(&mut self, _worker: &WorkerInfo) {}

    /// How the output gets into the ring; the worker calls this, not `process`. The default
    /// runs [`process`](Task::process), serializes its value into a slot of exactly its size
    /// (one copy, made in the worker) and hands the value to [`recycle`](Task::recycle).
    /// [`ArrayOutput`] overrides it to write samples straight into the ring.
    fn produce(
        &mut self,
        input: &Archived<Self::Input>,
        out: &mut OutputSink<'_>,
    ) -> Result<(), BoxError> {
        let value = self.process(input)?;
        out.serialize(&value);
        self.recycle(value);
        Ok(())
    }

    /// What a worker runs: the task behind a check that each input is an archive of
    /// `Self::Input`. A pipeline's fused stages override it with their chain.
    #[doc(hidden)]
    fn into_worker(self, _: hook::Token) -> impl ByteTask
    where
        Self: Sized,
    {
        bytes::Typed(self)
    }
}

/// A task whose output is an array of samples (plus a little metadata) that it writes straight
/// into the worker's output ring: no allocation and no copy on the way out. Run it with
/// [`ArrayOutput`]; the output arrives as a `(Vec<Sample>, Meta)` archive.
///
/// ```
/// use shmexec::{ArrayOutput, ArrayTask, BoxError, Samples};
///
/// /// Scales a waveform by 0.5 and counts the samples above 1.0.
/// struct Halve;
///
/// impl ArrayTask for Halve {
///     type Input = Vec<f32>;
///     type Sample = f32;
///     type Meta = u64;
///     fn output_len(&mut self, input: &rkyv::Archived<Vec<f32>>) -> usize {
///         input.len()
///     }
///     fn process(&mut self, input: &rkyv::Archived<Vec<f32>>, out: &mut [f32]) -> Result<u64, BoxError> {
///         let mut above = 0;
///         for (o, &x) in out.iter_mut().zip(input.samples()) {
///             *o = x * 0.5;
///             above += u64::from(*o > 1.0);
///         }
///         Ok(above)
///     }
/// }
/// let task = ArrayOutput(Halve); // a `Task` with Output = (Vec<f32>, u64)
/// ```
pub trait ArrayTask {
    /// The chunk type the coordinator sends.
    type Input: Encode<Archived: Decode>;
    /// The output's sample type.
    type Sample: Sample;
    /// What goes with the samples (a count, a time range...).
    type Meta: Encode<Archived: Decode>;

    /// See [`Task::init`].
    fn init(&mut self, _worker: &WorkerInfo) -> Result<(), BoxError> {
        Ok(())
    }

    /// How many output samples `input` gives: the slot is reserved before `process` runs.
    fn output_len(&mut self, input: &Archived<Self::Input>) -> usize;

    /// Writes the output samples into `out` (inside the ring, `output_len` long) and returns
    /// the metadata. An `Err` or a panic becomes that item's error; nothing is published.
    fn process(
        &mut self,
        input: &Archived<Self::Input>,
        out: &mut [Self::Sample],
    ) -> Result<Self::Meta, BoxError>;

    /// See [`Task::finish`].
    fn finish(&mut self, _worker: &WorkerInfo) {}
}

/// Runs an [`ArrayTask`] as a [`Task`] whose output is `(Vec<Sample>, Meta)`.
pub struct ArrayOutput<A>(pub A);

impl<A: ArrayTask> Task for ArrayOutput<A> {
    type Input = A::Input;
    type Output = (Vec<A::Sample>, A::Meta);

    fn init(&mut self, worker: &WorkerInfo) -> Result<(), BoxError> {
        self.0.init(worker)
    }

    /// Only for direct calls: the worker uses `produce`, which writes in place.
    fn process(&mut self, input: &Archived<A::Input>) -> Result<Self::Output, BoxError> {
        let mut out = vec![bytemuck::Zeroable::zeroed(); self.0.output_len(input)];
        let meta = self.0.process(input, &mut out)?;
        Ok((out, meta))
    }

    fn produce(
        &mut self,
        input: &Archived<A::Input>,
        out: &mut OutputSink<'_>,
    ) -> Result<(), BoxError> {
        let n = self.0.output_len(input);
        let task = &mut self.0;
        out.emit_samples_last(n, |samples| task.process(input, samples))
    }

    fn finish(&mut self, worker: &WorkerInfo) {
        self.0.finish(worker)
    }
}

/// A task from a closure that cannot fail (a panic still becomes that item's error). Name the
/// input type, the rest is inferred:
///
/// ```
/// use shmexec::Samples;
/// let task = shmexec::from_fn::<Vec<f32>, _, _>(|chunk| chunk.samples().iter().sum::<f32>());
/// ```
pub fn from_fn<In, Out, F>(
    mut f: F,
) -> TryFnTask<In, Out, impl FnMut(&Archived<In>) -> Result<Out, BoxError>>
where
    In: Encode<Archived: Decode>,
    Out: Encode<Archived: Decode>,
    F: FnMut(&Archived<In>) -> Out,
{
    try_from_fn(move |input: &Archived<In>| Ok(f(input)))
}

/// A task made of a closure; see [`from_fn`] and [`try_from_fn`].
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

/// A task from a closure that gives any number of outputs per input: every item of the
/// iterator it returns is one output, in order, and an input whose iterator is empty has no
/// output at all (a filter; an `Option` is an iterator too). Each output is published as soon
/// as it is written, and the caller receives them in input order (all of input `k`'s outputs
/// before input `k + 1`'s), each as its own [`crate::OutputRef`].
///
/// ```
/// use shmexec::Samples;
/// // One output per sample above threshold: its index.
/// let task = shmexec::flat_map_fn::<Vec<f32>, _, _, _>(|chunk| {
///     let above: Vec<u64> = chunk.samples().iter().enumerate()
///         .filter(|(_, x)| **x > 1.0).map(|(i, _)| i as u64).collect();
///     above
/// });
/// ```
pub fn flat_map_fn<In, Out, I, F>(f: F) -> FlatMapTask<In, Out, F>
where
    In: Encode<Archived: Decode>,
    Out: Encode<Archived: Decode>,
    I: IntoIterator<Item = Out>,
    F: FnMut(&Archived<In>) -> I,
{
    FlatMapTask {
        f,
        _types: PhantomData,
    }
}

/// A task made of a closure with 0..n outputs per input; see [`flat_map_fn`].
pub struct FlatMapTask<In, Out, F> {
    f: F,
    _types: PhantomData<fn(In) -> Out>,
}

impl<In, Out, I, F> Task for FlatMapTask<In, Out, F>
where
    In: Encode<Archived: Decode>,
    Out: Encode<Archived: Decode>,
    I: IntoIterator<Item = Out>,
    F: FnMut(&Archived<In>) -> I,
{
    type Input = In;
    type Output = Out;

    /// Only for direct calls: the first output, or an error if there is none (the worker uses
    /// `produce`, which publishes every output).
    fn process(&mut self, input: &Archived<In>) -> Result<Out, BoxError> {
        (self.f)(input)
            .into_iter()
            .next()
            .ok_or_else(|| "this input has no output".into())
    }

    fn produce(&mut self, input: &Archived<In>, out: &mut OutputSink<'_>) -> Result<(), BoxError> {
        let mut outputs = (self.f)(input).into_iter().peekable();
        while let Some(value) = outputs.next() {
            if outputs.peek().is_some() {
                out.emit(&value)?;
            } else {
                out.emit_last(&value)?;
            }
        }
        Ok(())
    }
}
