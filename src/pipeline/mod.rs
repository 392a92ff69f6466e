//! Pipelines: chains of stages (map, filter, flat_map, each) over a stream of chunks, as in a
//! DAQ chain raw records -> records -> peaks -> events.
//!
//! ```no_run
//! use shmexec::pipeline::Pipeline;
//! use shmexec::{Pool, Samples};
//!
//! let mut pipeline = Pipeline::<Vec<f32>>::builder()
//!     // Each stage is a task (any `Task`, or a closure); its input is the stage before's output.
//!     .map_fn("baseline", |chunk| {
//!         let s = chunk.samples();
//!         let mean = s.iter().sum::<f32>() / s.len().max(1) as f32;
//!         s.iter().map(|x| x - mean).collect::<Vec<f32>>()
//!     })
//!     .filter("loud", |chunk| chunk.samples().iter().any(|&x| x > 3.0))
//!     .map_fn("peak", |chunk| chunk.samples().iter().cloned().fold(f32::MIN, f32::max))
//!     .build(Pool::builder().workers(2))?;
//! println!("{}", pipeline.plan()); // baseline + loud + peak: fused, 2 workers
//! let chunks: Vec<Vec<f32>> = (0..16).map(|i| vec![i as f32; 1 << 16]).collect();
//! for peak in pipeline.run(&chunks) {
//!     println!("{}", peak?.to_native());
//! }
//! println!("{}", pipeline.stats());
//! # Ok::<(), shmexec::Error>(())
//! ```
//!
//! **Fusion.** Adjacent stages run in the same worker process, one after the other on each
//! item (strax's chain optimization): a stage's output is written once, into a buffer of the
//! worker, and the next stage reads it there in place. Nothing between two fused stages goes
//! through the coordinator or a ring, so an intermediate costs no copy beyond its own
//! serialization, and on a machine with few cores no worker of one stage waits for another's.
//! Today every stage of a pipeline is fused into one group run by the pool's workers;
//! [`Pipeline::plan`] says so.
//!
//! **Errors.** A stage's error, panic or bad input fails the item there: its later stages do
//! not run, and the item's place in the results holds [`Error::Stage`], which names the stage
//! and holds the error (with the item's sequence number). The failure model of the pool holds
//! for the whole chain: a crash re-runs the item, a timeout gives it up.
//!
//! **Statistics.** [`Pipeline::stats`] counts, per stage, the items and bytes in and out and the
//! time spent in it (not in the stages after it), readable while the pipeline runs, and says
//! which stage takes the most time: the one to speed up or give more workers.

mod counters;
mod fuse;
mod stages;

use std::borrow::Borrow;
use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use rkyv::Archived;

use crate::archive::{Decode, Encode};
use crate::call::Map;
use crate::error::{BoxError, Error, Result};
use crate::pool::{Builder, Pool, Start};
use crate::task::bytes::ByteTask;
use crate::task::{Task, Token, flat_map_fn, from_fn};
use counters::StageCounters;
pub(crate) use fuse::StageFailure;
use fuse::{Chain, Stage};

/// A pipeline's stages, being listed; see the [module documentation](self).
///
/// `In` is the type of the chunks the pipeline takes, `Out` the output type of its last stage.
pub struct Stages<In, Out> {
    stages: Vec<Stage>,
    _types: PhantomData<fn(In) -> Out>,
}

/// A pipeline whose workers are running: [`run`](Pipeline::run) it over chunks, read its
/// [`stats`](Pipeline::stats). Dropping it stops the workers.
pub struct Pipeline<In, Out = In>
where
    In: Encode<Archived: Decode>,
    Out: Encode<Archived: Decode>,
{
    pool: Pool<Fused<In, Out>>,
    plan: Plan,
    counters: StageCounters,
}

impl<In: Encode<Archived: Decode>> Pipeline<In, In> {
    /// Starts listing the stages of a pipeline over chunks of type `In`.
    pub fn builder() -> Stages<In, In> {
        Stages {
            stages: Vec::new(),
            _types: PhantomData,
        }
    }
}

impl<In, Out> Stages<In, Out>
where
    In: Encode<Archived: Decode> + 'static,
    Out: Encode<Archived: Decode> + 'static,
{
    fn then<Next>(mut self, name: &str, task: Box<dyn ByteTask>) -> Stages<In, Next> {
        self.stages.push(Stage {
            name: name.to_owned(),
            task,
        });
        Stages {
            stages: self.stages,
            _types: PhantomData,
        }
    }

    /// Adds a stage that runs `task` on each item (its `init` and `finish` run once per worker,
    /// as pypeln's `on_start` and `on_done`). A task may give any number of outputs per input
    /// ([`crate::OutputSink::emit`]); each goes on to the next stage.
    pub fn map<T>(self, name: &str, task: T) -> Stages<In, T::Output>
    where
        T: Task<Input = Out> + 'static,
    {
        self.then(name, Box::new(task.into_worker(Token(()))))
    }

    /// Adds a stage that maps each item with a closure.
    pub fn map_fn<O, F>(self, name: &str, f: F) -> Stages<In, O>
    where
        O: Encode<Archived: Decode> + 'static,
        F: FnMut(&Archived<Out>) -> O + 'static,
    {
        self.map(name, from_fn::<Out, O, F>(f))
    }

    /// Adds a stage that gives any number of outputs per item: every item of the iterator `f`
    /// returns goes on to the next stage, in order.
    pub fn flat_map<O, I, F>(self, name: &str, f: F) -> Stages<In, O>
    where
        O: Encode<Archived: Decode> + 'static,
        I: IntoIterator<Item = O>,
        F: FnMut(&Archived<Out>) -> I + 'static,
    {
        self.map(name, flat_map_fn::<Out, O, I, F>(f))
    }

    /// Adds a stage that keeps the items `keep` says yes to and drops the others. A kept item
    /// goes on as the archive it is: to a fused stage after it with no copy at all.
    pub fn filter<F>(self, name: &str, keep: F) -> Stages<In, Out>
    where
        F: FnMut(&Archived<Out>) -> bool + 'static,
    {
        self.then(name, Box::new(stages::Filter::<Out, F>::new(keep)))
    }

    /// Adds a last stage that consumes each item in the worker (writes it somewhere, counts
    /// it...) and gives no output: the pipeline's results are then only the errors, in the
    /// items' places.
    pub fn each<F>(self, name: &str, f: F) -> Stages<In, ()>
    where
        F: FnMut(&Archived<Out>) -> std::result::Result<(), BoxError> + 'static,
    {
        self.then(name, Box::new(stages::Each::<Out, F>::new(f)))
    }

    /// Starts the pipeline's workers with the pool settings of `pool` (workers, ring sizes,
    /// timeouts, failure policy): every stage runs in each worker, fused. Fails as
    /// [`crate::Builder::build`] does, and with [`Error::InvalidArgument`] for a pipeline
    /// without stages, a stage without a name or two stages of one name.
    pub fn build(self, pool: Builder) -> Result<Pipeline<In, Out>> {
        let names: Vec<String> = self.stages.iter().map(|s| s.name.clone()).collect();
        check_names(&names)?;
        let plan = Plan {
            stages: names.clone(),
            workers: 0,
        };
        let mut counters = None;
        let stages = self.stages;
        let pool = pool.stage_names(names.clone()).build_with(|config| {
            if let Start::Spawn(_) = config.start {
                return Err(Error::InvalidArgument(
                    "a pipeline's workers start by fork: spawned workers cannot run its stages"
                        .to_owned(),
                ));
            }
            let c = StageCounters::new(config.cores.len(), names.len())?;
            counters = Some(c.clone());
            Ok(Fused {
                chain: Chain::new(0, stages, c),
                _types: PhantomData,
            })
        })?;
        let counters = counters.expect("the pool was built with its counters");
        Ok(Pipeline {
            plan: Plan {
                workers: pool.workers(),
                ..plan
            },
            pool,
            counters,
        })
    }
}

/// Refuses a pipeline without stages and stage names that are empty or repeated: errors and
/// statistics name stages, so each name must say which one.
fn check_names(names: &[String]) -> Result<()> {
    if names.is_empty() {
        return Err(Error::InvalidArgument(
            "a pipeline needs at least one stage".to_owned(),
        ));
    }
    for (i, name) in names.iter().enumerate() {
        if name.is_empty() {
            return Err(Error::InvalidArgument(format!("stage {i} has no name")));
        }
        if names[..i].contains(name) {
            return Err(Error::InvalidArgument(format!(
                "two stages are named '{name}': stage names must be unique"
            )));
        }
    }
    Ok(())
}

/// The task a pipeline's workers run: its stages, fused. Made only by [`Stages::build`].
pub struct Fused<In, Out> {
    chain: Chain,
    _types: PhantomData<fn(In) -> Out>,
}

impl<In, Out> Task for Fused<In, Out>
where
    In: Encode<Archived: Decode>,
    Out: Encode<Archived: Decode>,
{
    type Input = In;
    type Output = Out;

    /// Never called: the workers run the chain itself (`into_worker`).
    fn process(&mut self, _: &Archived<In>) -> std::result::Result<Out, BoxError> {
        Err("a pipeline's stages run in its workers only".into())
    }

    fn into_worker(self, _: Token) -> impl ByteTask {
        self.chain
    }
}

impl<In, Out> Pipeline<In, Out>
where
    In: Encode<Archived: Decode>,
    Out: Encode<Archived: Decode>,
{
    /// Runs the pipeline over `inputs`: each result (the last stage's outputs, or an item's
    /// error) in input order, as [`Pool::map`] gives them.
    pub fn run<'a, I>(&'a mut self, inputs: I) -> Map<'a, Fused<In, Out>>
    where
        I: IntoIterator,
        I::IntoIter: 'a,
        I::Item: Borrow<In>,
    {
        self.pool.map(inputs)
    }

    /// [`run`](Pipeline::run), with results in the order they are ready.
    pub fn run_unordered<'a, I>(&'a mut self, inputs: I) -> Map<'a, Fused<In, Out>>
    where
        I: IntoIterator,
        I::IntoIter: 'a,
        I::Item: Borrow<In>,
    {
        self.pool.map_unordered(inputs)
    }

    /// The pool that runs the pipeline, for every other way of calling it: live streams
    /// ([`Pool::stream`], [`Pool::into_stream`]), chunks written in place
    /// ([`Pool::map_in_place`], [`Pool::map_records_in_place`]), the pool's own statistics.
    pub fn pool(&mut self) -> &mut Pool<Fused<In, Out>> {
        &mut self.pool
    }

    /// Which stages run where.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// What each stage did so far (readable while the pipeline runs).
    pub fn stats(&self) -> PipelineStats {
        let stages = self
            .plan
            .stages
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let c = self.counters.stage(i);
                StageStats {
                    name: name.clone(),
                    items: c.items,
                    bytes_in: c.bytes_in,
                    outputs: c.outputs,
                    bytes_out: c.bytes_out,
                    busy: c.busy,
                    errors: c.errors,
                }
            })
            .collect();
        PipelineStats { stages }
    }
}

/// Which stages of a pipeline run together: today all of them, fused, in each of the pool's
/// workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    stages: Vec<String>,
    workers: usize,
}

impl Plan {
    /// The stages, in order.
    pub fn stages(&self) -> &[String] {
        &self.stages
    }

    /// The groups of stages fused into one worker process each, in order.
    pub fn fused(&self) -> Vec<Vec<String>> {
        vec![self.stages.clone()]
    }

    /// The worker processes that run each group.
    pub fn workers(&self) -> usize {
        self.workers
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for group in self.fused() {
            let kind = if group.len() > 1 { "fused" } else { "alone" };
            writeln!(f, "{}: {kind}, {} workers", group.join(" + "), self.workers)?;
        }
        Ok(())
    }
}

/// One stage's counters, summed over its workers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct StageStats {
    /// The stage's name.
    pub name: String,
    /// Items the stage started (its inputs).
    pub items: u64,
    /// Bytes of those inputs.
    pub bytes_in: u64,
    /// Outputs it gave.
    pub outputs: u64,
    /// Bytes of those outputs.
    pub bytes_out: u64,
    /// Time its workers spent in it, not counting the fused stages after it.
    pub busy: Duration,
    /// Items it failed on.
    pub errors: u64,
}

impl StageStats {
    /// Input megabytes per second of busy time: what one worker of the stage processes.
    pub fn mbps_per_worker(&self) -> f64 {
        let secs = self.busy.as_secs_f64();
        if secs == 0.0 {
            0.0
        } else {
            self.bytes_in as f64 / 1e6 / secs
        }
    }
}

/// Every stage's counters; see [`Pipeline::stats`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PipelineStats {
    /// The stages, in order.
    pub stages: Vec<StageStats>,
}

impl PipelineStats {
    /// The stage that took the most time so far: in fused stages, where the workers' time
    /// goes; the one to speed up first. `None` before any item ran.
    pub fn bottleneck(&self) -> Option<&StageStats> {
        self.stages
            .iter()
            .filter(|s| s.busy > Duration::ZERO)
            .max_by_key(|s| s.busy)
    }

    /// The counters since `earlier` (an earlier reading of the same pipeline).
    pub fn since(&self, earlier: &PipelineStats) -> PipelineStats {
        let stages = self
            .stages
            .iter()
            .zip(&earlier.stages)
            .map(|(now, then)| StageStats {
                name: now.name.clone(),
                items: now.items - then.items,
                bytes_in: now.bytes_in - then.bytes_in,
                outputs: now.outputs - then.outputs,
                bytes_out: now.bytes_out - then.bytes_out,
                busy: now.busy.saturating_sub(then.busy),
                errors: now.errors - then.errors,
            })
            .collect();
        PipelineStats { stages }
    }
}

impl fmt::Display for PipelineStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bottleneck = self.bottleneck().map(|s| s.name.as_str());
        writeln!(
            f,
            "{:<16} {:>9} {:>12} {:>9} {:>12} {:>10} {:>7}",
            "stage", "items", "bytes in", "outputs", "bytes out", "busy s", "errors"
        )?;
        for s in &self.stages {
            let mark = if Some(s.name.as_str()) == bottleneck {
                "  <- most time"
            } else {
                ""
            };
            writeln!(
                f,
                "{:<16} {:>9} {:>12} {:>9} {:>12} {:>10.3} {:>7}{mark}",
                s.name,
                s.items,
                s.bytes_in,
                s.outputs,
                s.bytes_out,
                s.busy.as_secs_f64(),
                s.errors
            )?;
        }
        Ok(())
    }
}
