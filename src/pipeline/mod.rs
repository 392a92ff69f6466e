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
mod group;
mod hop;
mod live;
mod run;
mod save;
mod stages;
mod state;
mod timecheck;

use std::borrow::Borrow;
use std::collections::VecDeque;
use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use rkyv::Archived;

use crate::archive::{Decode, Encode};
use crate::archive::{Record, Records, Sample};
use crate::call::feed::{Feed, FillFeed, SerializeFeed, SliceFeed};
use crate::call::source::Source;
use crate::error::{BoxError, Error, Result};
use crate::pool::{Builder, Pool, Start};
use crate::stats::{PoolStats, StatsBlock};
use crate::store::{StageKey, Store};
use crate::task::bytes::ByteTask;
use crate::task::{Task, Token, flat_map_fn, from_fn};
use crate::time::{Interval, TimeRange};
use counters::StageCounters;
use fuse::{Chain, Stage};
use group::{GroupTask, GroupWorker, Groups};
use hop::HopReader;
pub use live::PipelineSender;
pub use run::{BRANCH_ERRORS, CacheHit, Run};
use save::Lineage;
pub use state::Stateful;

/// The most bytes a [`Stateful`] stage's state takes, serialized.
pub const MAX_STATE_BYTES: usize = 64 << 10;

/// Where a stage runs: with the pool's workers, fused with its neighbours (the default), or in
/// workers of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Placement {
    /// Its own worker count (else the pool's).
    workers: Option<usize>,
    /// One worker that sees every item in input order.
    serial: bool,
    /// Fused with no neighbour.
    alone: bool,
}

impl Placement {
    /// Whether a stage placed so can be fused with the stage before it, placed `before`
    /// (`saved`: whether that one is saved, which ends its group).
    fn fuses_with(&self, before: &Placement, saved: bool) -> bool {
        !self.alone && !before.alone && !saved && self == before
    }
}

/// A stage as listed: its task, where it runs, what makes its key and where it is saved.
struct Spec {
    stage: Stage,
    place: Placement,
    lineage: Lineage,
    /// A stateful stage's state slots.
    state: Option<shmexec_shm::Snapshots>,
    /// Whether a branch consumes its outputs (which ends its group, as their frames pass the
    /// coordinator).
    forks: bool,
    /// The time check of its outputs, if any (it ends its group too).
    check: Option<Box<dyn timecheck::TimeCheck>>,
}

impl Spec {
    /// Whether the stage's outputs must pass the coordinator as frames: saved, read by a
    /// branch, or checked.
    fn ends_group(&self) -> bool {
        self.lineage.store.is_some() || self.forks || self.check.is_some()
    }
}

/// A branch: stages that consume the outputs of main-line stage `after`, beside the stages
/// after it.
struct Branch {
    after: usize,
    specs: Vec<Spec>,
}

/// A pipeline's stages, being listed; see the [module documentation](self).
///
/// `In` is the type of the chunks the pipeline takes, `Out` the output type of its last stage.
pub struct Stages<In, Out> {
    stages: Vec<Spec>,
    branches: Vec<Branch>,
    /// A placement method called before any stage was added.
    misuse: Option<String>,
    _types: PhantomData<fn(In) -> Out>,
}

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

impl<In, Out> Stages<In, Out> {
    fn empty() -> Self {
        Stages {
            stages: Vec::new(),
            branches: Vec::new(),
            misuse: None,
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
        let stage = Stage {
            name: name.to_owned(),
            task,
        };
        self.stages.push(Spec {
            stage,
            place: Placement::default(),
            lineage: Lineage::default(),
            state: None,
            forks: false,
            check: None,
        });
        Stages {
            stages: self.stages,
            branches: self.branches,
            misuse: self.misuse,
            _types: PhantomData,
        }
    }

    /// Changes the stage added last.
    fn placed(mut self, what: &str, change: impl FnOnce(&mut Spec)) -> Self {
        match self.stages.last_mut() {
            Some(spec) => change(spec),
            None => {
                self.misuse
                    .get_or_insert(format!("{what}() was called before any stage was added"));
            }
        }
        self
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

    /// Adds a stage that keeps state from one item to the next ([`Stateful`]): a serial stage
    /// (one worker, every item in input order) whose state is saved after each item, so that a
    /// successor of a worker that died goes on from it: its items are counted exactly once, in
    /// order. Each run starts from the default state (a DAQ run's events are numbered from 0).
    /// The state takes at most [`MAX_STATE_BYTES`] serialized.
    pub fn stateful<S>(self, name: &str, task: S) -> Stages<In, S::Output>
    where
        S: Stateful<Input = Out> + 'static,
    {
        match shmexec_shm::Snapshots::new(MAX_STATE_BYTES) {
            Ok(slots) => {
                let stage = Box::new(state::StatefulStage::new(task, slots.clone()));
                self.then(name, stage)
                    .placed("stateful", |s| s.state = Some(slots))
                    .serial()
            }
            Err(e) => {
                let mut next = self.then(
                    name,
                    Box::new(stages::Each::<Out, _>::new(|_: &Archived<Out>| Ok(()))),
                );
                next.misuse.get_or_insert(format!(
                    "cannot make the state slots of stage '{name}': {e}"
                ));
                next
            }
        }
    }

    /// Adds a branch: the stages `make` lists consume the outputs of the stage added last, beside
    /// the stages that follow it here (strax's mailboxes: one output, several consumers). Each
    /// output frame is read in place by both lines and let go once every consumer is done with
    /// it, so the slowest consumer sets the pace. A branch ends in a sink (`each`) or a saved
    /// stage: its last stage's outputs are not handed out, and its items' errors are kept by
    /// the run ([`Run::branch_errors`]). The stage added last ends its group.
    ///
    /// ```no_run
    /// use shmexec::pipeline::Pipeline;
    /// use shmexec::{Pool, Samples};
    ///
    /// let mut p = Pipeline::<Vec<f32>>::builder()
    ///     .map_fn("peaks", |c| c.samples().iter().copied().filter(|&x| x > 3.0).collect::<Vec<f32>>())
    ///     .branch(|peaks| peaks.each("monitor", |p| { println!("{} peaks", p.len()); Ok(()) }))
    ///     .map_fn("events", |p| p.len() as u64)
    ///     .build(Pool::builder().workers(2))?;
    /// # Ok::<(), shmexec::Error>(())
    /// ```
    pub fn branch<B>(mut self, make: impl FnOnce(Stages<Out, Out>) -> Stages<Out, B>) -> Self {
        let Some(after) = self.stages.len().checked_sub(1) else {
            self.misuse
                .get_or_insert("branch() was called before any stage was added".to_owned());
            return self;
        };
        let branch = make(Stages::empty());
        if let Some(misuse) = branch.misuse {
            self.misuse.get_or_insert(misuse);
        } else if branch.stages.is_empty() {
            self.misuse
                .get_or_insert("a branch needs at least one stage".to_owned());
        } else if !branch.branches.is_empty() {
            self.misuse
                .get_or_insert("a branch cannot have branches of its own".to_owned());
        }
        self.stages[after].forks = true;
        self.branches.push(Branch {
            after,
            specs: branch.stages,
        });
        self
    }

    /// Runs the stage added last on `n` workers of its own (fused with neighbours that run on
    /// `n` workers too), instead of the pool's. A stage that is much slower or faster than the
    /// rest gets the share of the cores it needs this way.
    pub fn workers(self, n: usize) -> Self {
        self.placed("workers", |s| s.place.workers = Some(n))
    }

    /// Runs the stage added last on one worker that sees every item in input order (strax's
    /// event numbering, a saver writing one file), while the other stages run in parallel.
    /// Adjacent serial stages share that worker.
    pub fn serial(self) -> Self {
        self.placed("serial", |s| {
            s.place.serial = true;
            s.place.workers = Some(1);
        })
    }

    /// Runs the stage added last in workers of its own, fused with no neighbour.
    pub fn alone(self) -> Self {
        self.placed("alone", |s| s.place.alone = true)
    }

    /// The version of the stage added last (default `"0"`): part of its key, so outputs saved
    /// by another version are not taken for its own. Change it when the stage's code changes
    /// what it computes.
    pub fn version(self, version: &str) -> Self {
        self.placed("version", |s| s.lineage.version = version.to_owned())
    }

    /// The configuration of the stage added last (thresholds, gains...), as bytes: part of its
    /// key, so a run with another configuration computes the stage again. An archive of a
    /// settings value works (`rkyv::to_bytes`), or any stable encoding.
    pub fn config(self, config: impl AsRef<[u8]>) -> Self {
        let config = config.as_ref().to_vec();
        self.placed("config", |s| s.lineage.config = config)
    }

    /// Saves the outputs of the stage added last in `store`, under its key (its name, version,
    /// configuration, and the keys of the stages before it down to the source's: see
    /// [`Pipeline::run_keyed`]), and serves a later run with the same key from there instead
    /// of running it and the stages before it. The stage ends its group (its outputs pass the
    /// coordinator as frames, whose bytes are what is saved).
    pub fn save(self, store: &Store) -> Self {
        let store = store.clone();
        self.placed("save", |s| s.lineage.store = Some(store))
    }

    /// Starts the pipeline's workers with the pool settings of `pool` (workers, ring sizes,
    /// timeouts, failure policy), one set of workers per group of fused stages
    /// ([`Pipeline::plan`]). Fails as [`crate::Builder::build`] does, and with
    /// [`Error::InvalidArgument`] for a pipeline without stages, a stage without a name, two
    /// stages of one name, or a pool that spawns its workers (a pipeline's workers are forked,
    /// so that each group maps the rings of the group before it).
    pub fn build(self, pool: Builder) -> Result<Pipeline<In, Out>> {
        if let Some(misuse) = self.misuse {
            return Err(Error::InvalidArgument(misuse));
        }
        // Every stage, main line first, then each branch's: stage numbers index this order.
        let main = self.stages.len();
        let all = || {
            self.stages
                .iter()
                .chain(self.branches.iter().flat_map(|b| b.specs.iter()))
        };
        let names: Vec<String> = all().map(|s| s.stage.name.clone()).collect();
        let mut lineage: Vec<Lineage> = all().map(|s| s.lineage.clone()).collect();
        check_names(&names)?;
        // Each stage reads the one before it on its line; a branch's first, the stage it follows.
        let mut next = main;
        for (i, l) in lineage.iter_mut().enumerate().take(main) {
            l.input = i.checked_sub(1);
        }
        for b in &self.branches {
            for k in 0..b.specs.len() {
                lineage[next + k].input = Some(if k == 0 { b.after } else { next + k - 1 });
            }
            next += b.specs.len();
        }
        let first_branch = self.branches.iter().map(|b| b.after).min();
        let validate = pool.validates_outputs();
        let bell = StatsBlock::lone_doorbell()?;
        let mut groups = Groups {
            pools: Vec::new(),
            pins: Vec::new(),
            origins: Vec::new(),
            bell: bell.clone(),
            labels: Vec::new(),
            states: Vec::new(),
            parent: Vec::new(),
            children: Vec::new(),
            results: 0,
            checks: Vec::new(),
        };
        let mut counters = Vec::new();
        let mut plan = Plan {
            stages: names.clone(),
            groups: Vec::new(),
        };
        // The main line, then each branch, hung from the group of the stage it follows.
        let mut lines = vec![(None, 0, self.stages)];
        let mut first_of_branch = main;
        for b in self.branches {
            let n = b.specs.len();
            lines.push((Some(b.after), first_of_branch, b.specs));
            first_of_branch += n;
        }
        let mut group_of_stage = vec![0; names.len()];
        for (after, offset, specs) in lines {
            let mut parent = after.map(|a| group_of_stage[a]);
            let is_main = after.is_none();
            for (first, mut group) in split_groups(specs) {
                let first = first + offset;
                let g = groups.pools.len();
                let place = group[0].place;
                groups
                    .states
                    .push(group.iter().filter_map(|s| s.state.clone()).collect());
                let check = group.last_mut().and_then(|s| s.check.take());
                groups.checks.push(check);
                let stages: Vec<Stage> = group.into_iter().map(|s| s.stage).collect();
                let count = stages.len();
                let mut builder = pool
                    .clone()
                    .stage_names(names.clone())
                    .doorbell(bell.clone())
                    .frames_only();
                if let Some(n) = place.workers {
                    builder = builder.workers(n);
                }
                let upstream = parent.map(|p| groups.pools[p].rt.output_rings.clone());
                let mut made = None;
                let built = builder.build_with(|config| {
                    if let Start::Spawn(_) = config.start {
                        return Err(Error::InvalidArgument(
                            "a pipeline's workers start by fork: spawned workers cannot run its \
                         stages"
                                .to_owned(),
                        ));
                    }
                    let c = StageCounters::new(config.cores.len(), names.len())?;
                    made = Some(c.clone());
                    let chain = Chain::new(first as u32, stages, c);
                    let worker = match upstream {
                        None => GroupWorker::First(chain),
                        Some(upstream) => GroupWorker::Next(HopReader { upstream, chain }),
                    };
                    Ok(GroupTask { worker })
                })?;
                let workers = built.workers();
                groups
                    .pins
                    .push((0..workers).map(|_| VecDeque::new()).collect());
                groups.origins.push(VecDeque::new());
                groups.labels.push(names[first..first + count].join(" + "));
                groups.pools.push(built);
                groups.parent.push(parent);
                groups.children.push(Vec::new());
                if let Some(p) = parent {
                    groups.children[p].push(g);
                }
                if is_main {
                    groups.results = g;
                }
                group_of_stage[first..first + count].fill(g);
                counters.push(made.expect("the group was built with its counters"));
                plan.groups.push(GroupPlan {
                    stages: (first..first + count).collect(),
                    workers,
                    serial: place.serial,
                    after: parent,
                });
                parent = Some(g);
            }
        }
        Ok(Pipeline {
            groups,
            plan,
            counters,
            lineage,
            first_branch,
            validate,
            _types: PhantomData,
        })
    }
}

/// The stages split into groups of fused neighbours, each with the index of its first stage.
fn split_groups(stages: Vec<Spec>) -> Vec<(usize, Vec<Spec>)> {
    let mut groups: Vec<(usize, Vec<Spec>)> = Vec::new();
    for (i, spec) in stages.into_iter().enumerate() {
        match groups.last_mut() {
            Some((_, group))
                if spec.place.fuses_with(
                    &group[group.len() - 1].place,
                    group[group.len() - 1].ends_group(),
                ) =>
            {
                group.push(spec);
            }
            _ => groups.push((i, vec![spec])),
        }
    }
    groups
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

impl<In, T> Stages<In, (Records<T>, TimeRange)>
where
    In: Encode<Archived: Decode> + 'static,
    T: Record + Interval,
    (Records<T>, TimeRange): Encode<Archived: Decode>,
{
    /// Holds the time chunks the stage added last gives (`(Records<T>, TimeRange)`) to strax's
    /// laws as they pass the coordinator: every record inside its chunk and sorted by start,
    /// each chunk starting where the one before ended ([`crate::time`]). A chunk that breaks
    /// one is an [`Error::Time`] in its place, inside [`Error::Stage`] naming the stage, that
    /// says which chunk and which record; each run's first chunk may start anywhere. The stage
    /// ends its group (its outputs are read in order as frames).
    pub fn check_time(self) -> Self {
        self.placed("check_time", |s| {
            s.check = Some(Box::new(timecheck::Checker::<T>::new(&s.stage.name)));
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

impl<In, Out> Pipeline<In, Out>
where
    In: Encode<Archived: Decode>,
    Out: Encode<Archived: Decode>,
{
    /// Runs the pipeline over `inputs`: each result (the last stage's outputs, or an item's
    /// error in its place) in input order. A result's [`crate::OutputRef::seq`] and an error's
    /// [`Error::seq`] are the number of the input it came from (counting on from one run to
    /// the next). The pass is lazy and bounded as [`Pool::map`] is: inputs are taken as the
    /// rings have room, and a slow stage holds back the ones before it.
    pub fn run<'a, I>(&'a mut self, inputs: I) -> Run<'a, In, Out>
    where
        I: IntoIterator,
        I::IntoIter: 'a,
        I::Item: Borrow<In>,
    {
        let feed = SerializeFeed::<_, In>::new(inputs.into_iter());
        let mut run = Run::new(
            &mut self.groups,
            Introspect {
                plan: &self.plan,
                counters: &self.counters,
            },
            self.validate,
        );
        run.feed(0, Source::new(Box::new(feed)));
        run
    }

    /// A run over the inputs `feed` makes.
    fn run_feed<'a>(&'a mut self, feed: Box<dyn Feed + 'a>) -> Run<'a, In, Out> {
        let mut run = Run::new(
            &mut self.groups,
            Introspect {
                plan: &self.plan,
                counters: &self.counters,
            },
            self.validate,
        );
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
        let mut run = Run::new(
            &mut self.groups,
            Introspect {
                plan: &self.plan,
                counters: &self.counters,
            },
            self.validate,
        );
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
        let group_of = |stage: usize| {
            self.plan
                .groups
                .iter()
                .position(|g| g.stages.contains(&stage))
                .unwrap_or(0)
        };
        let computed_from = hit.as_ref().map_or(0, |(s, _)| s + 1);
        let mut savers = Vec::new();
        for (s, l) in self.lineage.iter().enumerate().skip(computed_from) {
            if let Some(store) = &l.store {
                let saving = save::Saving::start(&self.plan.stages[s], store, &keys[s])?;
                savers.push((group_of(s), saving));
            }
        }
        let entry = hit.as_ref().map(|(s, _)| group_of(*s) + 1);
        let stage_names = self.plan.stages.clone();
        let mut run = Run::new(
            &mut self.groups,
            Introspect {
                plan: &self.plan,
                counters: &self.counters,
            },
            self.validate,
        );
        for (g, saving) in savers {
            run.save(g, saving);
        }
        match hit {
            None => {
                let feed = SerializeFeed::<_, In>::new(inputs.into_iter());
                run.feed(0, Source::new(Box::new(feed)));
            }
            Some((s, stream)) => {
                let chunks = stream.chunks();
                run.loaded(stage_names[s].clone(), chunks);
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

/// What each stage did so far: the counters of each group, and what its pool saw.
fn stats(plan: &Plan, counters: &[StageCounters], groups: &Groups) -> PipelineStats {
    let group_of = |stage: usize| {
        plan.groups
            .iter()
            .position(|g| g.stages.contains(&stage))
            .unwrap_or(0)
    };
    // Items each group's workers have not finished (queued or running), as the supervisor
    // last saw their input rings.
    let queued: Vec<u64> = groups
        .pools
        .iter()
        .map(|p| {
            p.rt.slots
                .iter()
                .map(|w| w.expect.unfinished().0 as u64)
                .sum()
        })
        .collect();
    let stages = plan
        .stages
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let group = group_of(i);
            let c = counters[group].stage(i);
            StageStats {
                queued: queued[group],
                name: name.clone(),
                group,
                workers: plan.groups[group].workers,
                items: c.items,
                bytes_in: c.bytes_in,
                outputs: c.outputs,
                bytes_out: c.bytes_out,
                busy: c.busy,
                errors: c.errors,
            }
        })
        .collect();
    let copied = groups
        .pools
        .iter()
        .skip(1)
        .map(|p| p.stats().input_bytes_copied)
        .sum();
    PipelineStats {
        stages,
        copied_between_groups: copied,
    }
}

/// What a run needs to report its pipeline's statistics while it holds the groups.
pub(crate) struct Introspect<'p> {
    plan: &'p Plan,
    counters: &'p [StageCounters],
}

impl Introspect<'_> {
    pub(crate) fn stats(&self, groups: &Groups) -> PipelineStats {
        stats(self.plan, self.counters, groups)
    }
}

/// Which stages of a pipeline run together, and on how many workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    stages: Vec<String>,
    groups: Vec<GroupPlan>,
}

/// One group of fused stages.
#[derive(Debug, Clone, PartialEq, Eq)]
struct GroupPlan {
    stages: Vec<usize>,
    workers: usize,
    serial: bool,
    /// The group whose outputs it reads (the one before it, or a branch's source).
    after: Option<usize>,
}

impl Plan {
    /// The stages, in order.
    pub fn stages(&self) -> &[String] {
        &self.stages
    }

    /// The groups of stages fused into one worker process each, in order (the main line's,
    /// then each branch's).
    pub fn fused(&self) -> Vec<Vec<String>> {
        self.groups
            .iter()
            .map(|g| g.stages.iter().map(|&i| self.stages[i].clone()).collect())
            .collect()
    }

    /// The worker processes of each group, in order.
    pub fn workers(&self) -> Vec<usize> {
        self.groups.iter().map(|g| g.workers).collect()
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fused = self.fused();
        for (i, (g, names)) in self.groups.iter().zip(&fused).enumerate() {
            let kind = match (names.len(), g.serial) {
                (_, true) => "serial, ",
                (1, false) => "",
                _ => "fused, ",
            };
            let s = if g.workers == 1 { "" } else { "s" };
            write!(f, "{}: {kind}{} worker{s}", names.join(" + "), g.workers)?;
            match g.after {
                Some(a) if a + 1 != i => {
                    writeln!(f, ", a branch reading {}", fused[a].join(" + "))?
                }
                _ => writeln!(f)?,
            }
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
    /// The group of fused stages it runs in (see [`Plan::fused`]).
    pub group: usize,
    /// The workers of that group.
    pub workers: usize,
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
    /// Items its group's workers have been handed and not finished yet (queued, or being
    /// run), as the coordinator last saw: a group whose queues stay full while the next
    /// group's stay empty is the bottleneck.
    pub queued: u64,
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
    /// Payload bytes the coordinator copied to move items between groups: none, as a group
    /// reads the frames of the one before where they lie (the coordinator writes a 32-byte
    /// hop per item instead). Counted from the rings, not assumed.
    pub copied_between_groups: u64,
}

impl PipelineStats {
    /// The stage that limits the pipeline so far: the one with the most busy time per worker
    /// of its group (fused stages share their workers' time; a group's workers share its
    /// stages' load). The one to speed up, or to give more workers. `None` before any item ran.
    pub fn bottleneck(&self) -> Option<&StageStats> {
        self.stages
            .iter()
            .filter(|s| s.busy > Duration::ZERO)
            .max_by_key(|s| s.busy / s.workers.max(1) as u32)
    }

    /// The counters since `earlier` (an earlier reading of the same pipeline): over a window
    /// of a running pipeline, its [`bottleneck`](PipelineStats::bottleneck) is the stage that
    /// limits it now. Queue fills are the latest reading's.
    pub fn since(&self, earlier: &PipelineStats) -> PipelineStats {
        let stages = self
            .stages
            .iter()
            .zip(&earlier.stages)
            .map(|(now, then)| StageStats {
                name: now.name.clone(),
                group: now.group,
                workers: now.workers,
                items: now.items - then.items,
                bytes_in: now.bytes_in - then.bytes_in,
                outputs: now.outputs - then.outputs,
                bytes_out: now.bytes_out - then.bytes_out,
                busy: now.busy.saturating_sub(then.busy),
                errors: now.errors - then.errors,
                queued: now.queued,
            })
            .collect();
        PipelineStats {
            stages,
            copied_between_groups: self.copied_between_groups - earlier.copied_between_groups,
        }
    }
}

impl fmt::Display for PipelineStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bottleneck = self.bottleneck().map(|s| s.name.as_str());
        writeln!(
            f,
            "{:<16} {:>5} {:>9} {:>12} {:>9} {:>12} {:>10} {:>7} {:>7}",
            "stage",
            "group",
            "items",
            "bytes in",
            "outputs",
            "bytes out",
            "busy s",
            "errors",
            "queued"
        )?;
        for s in &self.stages {
            let mark = if Some(s.name.as_str()) == bottleneck {
                "  <- most time"
            } else {
                ""
            };
            writeln!(
                f,
                "{:<16} {:>5} {:>9} {:>12} {:>9} {:>12} {:>10.3} {:>7} {:>7}{mark}",
                s.name,
                s.group,
                s.items,
                s.bytes_in,
                s.outputs,
                s.bytes_out,
                s.busy.as_secs_f64(),
                s.errors,
                s.queued
            )?;
        }
        Ok(())
    }
}
