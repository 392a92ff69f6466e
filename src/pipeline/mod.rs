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
//! Stages placed otherwise (`.workers(n)`, `.serial()`, `.alone()`, or ending a group as a
//! saved, branched or time-checked stage does) start a group of their own, which reads the
//! frames of the group before it in place; [`Pipeline::plan`] says which stages run where.
//!
//! **Joins.** [`Stages::join`] adds a stage that reads each output of the stage before it with
//! every output an earlier main-line stage gave for the same input ([`Join`]): events with the
//! peaks of their chunk, both read in place.
//!
//! **Errors.** A stage's error, panic or bad input fails the item there: its later stages do
//! not run, and the item's place in the results holds [`Error::Stage`](crate::Error::Stage), which names the stage
//! and holds the error (with the item's sequence number). The failure model of the pool holds
//! for the whole chain: a crash re-runs the item, a timeout gives it up.
//!
//! **Statistics.** [`Pipeline::stats`] counts, per stage, the items and bytes in and out and the
//! time spent in it (not in the stages after it), readable while the pipeline runs, and says
//! which stage takes the most time: the one to speed up or give more workers.

mod builder;
mod counters;
mod fuse;
mod group;
mod hop;
mod join;
mod live;
mod report;
mod run;
mod save;
mod stages;
mod state;
mod timecheck;

use std::borrow::Borrow;
use std::marker::PhantomData;

use crate::archive::{Decode, Encode, Record, Records, Sample};
use crate::call::feed::{Feed, FillFeed, SerializeFeed, SliceFeed};
use crate::call::source::Source;
use crate::error::{BoxError, Result};
use crate::pool::Pool;
use crate::stats::PoolStats;
use crate::store::StageKey;

pub use builder::Stages;
use counters::StageCounters;
use group::Groups;
pub use join::Join;
pub use live::PipelineSender;
pub(crate) use report::Introspect;
use report::stats;
pub use report::{PipelineStats, Plan, StageStats};
pub use run::{BRANCH_ERRORS, CacheHit, Run};
use save::Lineage;
pub use state::Stateful;

/// The most bytes a [`Stateful`] stage's state takes, serialized.
pub const MAX_STATE_BYTES: usize = 64 << 10;

/// A pipeline whose workers are running: [`run`](Pipeline::run) it over chunks, read its
/// [`stats`](Pipeline::stats). Dropping it stops the workers.
pub struct Pipeline<In, Out = In> {
    groups: Groups,
    plan: Plan,
    /// Each group's counters (indexed by pipeline-wide stage numbers).
    counters: Vec<StageCounters>,
    /// Each stage's version, configuration and store.
    lineage: Vec<Lineage>,
    /// The first main-line stage a branch reads, if any: a cached stage after it cannot serve
    /// a run, as the branch would lose its inputs.
    first_branch: Option<usize>,
    validate: bool,
    _types: PhantomData<fn(In) -> Out>,
}

impl<In: Encode<Archived: Decode>> Pipeline<In, In> {
    /// Starts listing the stages of a pipeline over chunks of type `In`.
    pub fn builder() -> Stages<In, In> {
        Stages::empty()
    }
}

impl<E, Out> Pipeline<Vec<E>, Out>
where
    E: Sample,
    Vec<E>: Encode<Archived: Decode>,
    Out: Encode<Archived: Decode>,
{
    /// [`run`](Pipeline::run) over chunks the caller writes straight into the first group's
    /// input rings (a digitizer's readout): `fill(index, samples)` for each length, no copy
    /// ([`Pool::map_in_place`]).
    pub fn run_in_place<'a, L, G>(&'a mut self, lens: L, fill: G) -> Run<'a, Vec<E>, Out>
    where
        L: IntoIterator<Item = usize>,
        L::IntoIter: 'a,
        G: FnMut(u64, &mut [E]) -> std::result::Result<(), BoxError> + 'a,
    {
        let feed = FillFeed::<_, _, Vec<E>>::new(lens.into_iter(), fill);
        self.run_feed(Box::new(feed))
    }

    /// [`run`](Pipeline::run) over slices of memory the caller holds, each copied once into a
    /// ring ([`Pool::map_slices`]).
    pub fn run_slices<'a, I>(&'a mut self, slices: I) -> Run<'a, Vec<E>, Out>
    where
        I: IntoIterator<Item = &'a [E]>,
        I::IntoIter: 'a,
    {
        let feed = SliceFeed::<_, Vec<E>>::new(slices.into_iter());
        self.run_feed(Box::new(feed))
    }
}

impl<R, Out> Pipeline<Records<R>, Out>
where
    R: Record,
    Out: Encode<Archived: Decode>,
{
    /// [`run`](Pipeline::run) over chunks of records the caller writes straight into the
    /// first group's input rings: `fill(index, records)` for each length, no copy
    /// ([`Pool::map_records_in_place`]).
    pub fn run_records_in_place<'a, L, G>(
        &'a mut self,
        lens: L,
        fill: G,
    ) -> Run<'a, Records<R>, Out>
    where
        L: IntoIterator<Item = usize>,
        L::IntoIter: 'a,
        G: FnMut(u64, &mut [R]) -> std::result::Result<(), BoxError> + 'a,
    {
        let feed = FillFeed::<_, _, Records<R>>::new(lens.into_iter(), fill);
        self.run_feed(Box::new(feed))
    }

    /// [`run`](Pipeline::run) over slices of the caller's records (a run's raw records read
    /// into one buffer, cut into chunks), each copied once into a ring.
    pub fn run_record_slices<'a, I>(&'a mut self, slices: I) -> Run<'a, Records<R>, Out>
    where
        I: IntoIterator<Item = &'a [R]>,
        I::IntoIter: 'a,
    {
        let feed = SliceFeed::<_, Records<R>>::new(slices.into_iter());
        self.run_feed(Box::new(feed))
    }
}

impl<In, Out> Pipeline<In, Out>
where
    In: Encode<Archived: Decode>,
    Out: Encode<Archived: Decode>,
{
    /// Runs the pipeline over `inputs`: each result (the last stage's outputs, or an item's
    /// error in its place) in input order. A result's [`crate::OutputRef::seq`] and an error's
    /// [`Error::seq`](crate::Error::seq) are the number of the input it came from (counting on from one run to
    /// the next). The pass is lazy and bounded as [`Pool::map`] is: inputs are taken as the
    /// rings have room, and a slow stage holds back the ones before it.
    pub fn run<'a, I>(&'a mut self, inputs: I) -> Run<'a, In, Out>
    where
        I: IntoIterator,
        I::IntoIter: 'a,
        I::Item: Borrow<In>,
    {
        let feed = SerializeFeed::<_, In>::new(inputs.into_iter());
        self.run_feed(Box::new(feed))
    }

    /// [`run`](Pipeline::run) with results handed out as the last group's workers finish
    /// them, not in input order: a slow item there does not hold back the results after it
    /// ([`crate::OutputRef::seq`] says which input each is of). The groups before the last hand
    /// their results on in order.
    pub fn run_unordered<'a, I>(&'a mut self, inputs: I) -> Run<'a, In, Out>
    where
        I: IntoIterator,
        I::IntoIter: 'a,
        I::Item: Borrow<In>,
    {
        let feed = SerializeFeed::<_, In>::new(inputs.into_iter());
        let mut run = self.new_run(false);
        run.feed(0, Source::new(Box::new(feed)));
        run
    }

    /// A run with no inputs yet.
    fn new_run(&mut self, ordered: bool) -> Run<'_, In, Out> {
        Run::new(
            &mut self.groups,
            Introspect {
                plan: &self.plan,
                counters: &self.counters,
            },
            self.validate,
            ordered,
        )
    }

    /// An ordered run over the inputs `feed` makes.
    fn run_feed<'a>(&'a mut self, feed: Box<dyn Feed + 'a>) -> Run<'a, In, Out> {
        let mut run = self.new_run(true);
        run.feed(0, Source::new(feed));
        run
    }

    /// A run fed live: chunks sent through the [`PipelineSender`] (from another thread, as they
    /// arrive) go through the pipeline, and the [`Run`] hands out their results in input order,
    /// each as soon as it is ready. Dropping the sender ends the run once every chunk sent is
    /// handed out.
    ///
    /// ```no_run
    /// use shmexec::pipeline::Pipeline;
    /// use shmexec::{Pool, Samples};
    ///
    /// let mut p = Pipeline::<Vec<i16>>::builder()
    ///     .map_fn("sum", |c| c.samples().iter().map(|&s| s as i64).sum::<i64>())
    ///     .build(Pool::builder().workers(2))?; // before any thread starts
    /// std::thread::scope(|s| {
    ///     let (tx, run) = p.stream();
    ///     s.spawn(move || {
    ///         for i in 0..100 {
    ///             tx.send(vec![i as i16; 1 << 19]).expect("the run is gone"); // a digitizer's chunk
    ///         }
    ///     });
    ///     for sum in run {
    ///         println!("{}", sum.expect("item error").to_native());
    ///     }
    /// });
    /// # Ok::<(), shmexec::Error>(())
    /// ```
    pub fn stream(&mut self) -> (PipelineSender<In>, Run<'_, In, Out>)
    where
        In: 'static,
    {
        let (tx, feed) = live::live::<In>(self.groups.bell.clone());
        let mut run = self.new_run(true);
        run.feed(0, Source::new(Box::new(feed)));
        run.live();
        (tx, run)
    }

    /// [`run`](Pipeline::run) for the inputs that `source` names (a DAQ run's raw data: its
    /// name, and what tells this run from others, as its version or configuration), with the
    /// saved stages ([`Stages::save`]) saved or served from their store. Each stage's key is
    /// its name, version and configuration on top of the key of the stage before it, down to
    /// `source`: the same inputs through the same stages give the same keys, and a change
    /// anywhere upstream gives new ones.
    ///
    /// If the last saved stage whose outputs are in its store is stage `s`, the run skips
    /// stages `0..=s` and never takes an item of `inputs`: the stages after `s` read the
    /// saved chunks, mapped, in place ([`Run::cache`] says so). Every saved stage after it
    /// is saved as it runs; its stream is committed when the run ends with every item handed
    /// on and none failed.
    pub fn run_keyed<'a, I>(&'a mut self, source: &StageKey, inputs: I) -> Result<Run<'a, In, Out>>
    where
        I: IntoIterator,
        I::IntoIter: 'a,
        I::Item: Borrow<In>,
    {
        let keys = self.keys(source);
        let mut hit = None;
        // Only main-line stages before every branch point can serve a run.
        let main = self.plan.groups[self.groups.results]
            .stages
            .last()
            .map_or(0, |&s| s + 1);
        let servable = self.first_branch.map_or(main, |b| b.min(main));
        for (s, l) in self.lineage.iter().enumerate().take(servable).rev() {
            if let Some(store) = &l.store
                && let Some(stream) = store.load(&keys[s])?
            {
                hit = Some((s, stream));
                break;
            }
        }
        let group_of = |stage: usize| self.plan.group_of[stage];
        let computed_from = hit.as_ref().map_or(0, |(s, _)| s + 1);
        let mut savers = Vec::new();
        for (s, l) in self.lineage.iter().enumerate().skip(computed_from) {
            if let Some(store) = &l.store {
                let saving = save::Saving::start(&self.plan.stages[s], store, &keys[s])?;
                savers.push((group_of(s), saving));
            }
        }
        let entry = hit.as_ref().map(|(s, _)| group_of(*s) + 1);
        let hit = hit.map(|(s, stream)| (self.plan.stages[s].clone(), stream));
        let mut run = self.new_run(true);
        for (g, saving) in savers {
            run.save(g, saving);
        }
        match hit {
            None => {
                let feed = SerializeFeed::<_, In>::new(inputs.into_iter());
                run.feed(0, Source::new(Box::new(feed)));
            }
            Some((stage, stream)) => {
                let chunks = stream.chunks();
                run.loaded(stage, chunks);
                let entry = entry.unwrap_or(0);
                if entry < run.groups() {
                    run.feed(entry, Source::new(Box::new(save::SavedFeed::new(stream))));
                } else {
                    run.serve(stream);
                }
            }
        }
        Ok(run)
    }

    /// The key of each stage for the inputs `source` names (see [`Pipeline::run_keyed`]).
    pub fn keys(&self, source: &StageKey) -> Vec<StageKey> {
        save::keys(&self.plan.stages, &self.lineage, source)
    }

    /// Which stages run where.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The pool statistics of each group of fused stages (its workers' counters, respawns,
    /// what the coordinator copied), in group order.
    pub fn group_stats(&self) -> Vec<PoolStats> {
        self.groups.pools.iter().map(Pool::stats).collect()
    }

    /// What each stage did so far (readable while the pipeline runs).
    pub fn stats(&self) -> PipelineStats {
        stats(&self.plan, &self.counters, &self.groups)
    }
}
