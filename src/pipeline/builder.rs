//! Listing a pipeline's stages ([`Stages`]) and starting it: stages split into groups of fused
//! neighbours, each group a pool of its own, built in an order where a group's upstream exists
//! before its workers are forked (they map its rings).

use std::collections::VecDeque;
use std::marker::PhantomData;

use rkyv::Archived;

use crate::archive::{Decode, Encode, Record, Records};
use crate::error::{BoxError, Error, Result};
use crate::pool::{Builder, Start};
use crate::stats::StatsBlock;
use crate::store::Store;
use crate::task::bytes::ByteTask;
use crate::task::{Task, Token, flat_map_fn, from_fn};
use crate::time::{Interval, TimeRange};

use super::counters::StageCounters;
use super::fuse::{Chain, Stage};
use super::group::{GroupTask, GroupWorker, Groups};
use super::hop::HopReader;
use super::join::{self, Join, JoinRun};
use super::report::{GroupPlan, Plan};
use super::save::Lineage;
use super::{MAX_STATE_BYTES, Pipeline, Stateful, stages, state, timecheck};

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
    /// The name of its output type (`std::any::type_name`), which a join checks its side by.
    out_type: &'static str,
    /// A join stage's side and task (its rings are given at build).
    join: Option<JoinSpec>,
    /// Whether a join reads its outputs as its side (which ends its group).
    joined: bool,
}

/// What a join stage reads beside the stage before it.
struct JoinSpec {
    /// The side stage's name.
    side: String,
    /// The type name of [`Join::Side`].
    side_type: &'static str,
    task: Option<Box<dyn JoinRun>>,
}

impl Spec {
    /// Whether the stage's outputs must pass the coordinator as frames: saved, read by a
    /// branch, or checked.
    fn ends_group(&self) -> bool {
        self.lineage.store.is_some() || self.forks || self.check.is_some() || self.joined
    }
}

/// A branch: stages that consume the outputs of main-line stage `after`, beside the stages
/// after it.
struct Branch {
    after: usize,
    specs: Vec<Spec>,
}

/// A pipeline's stages, being listed; see the [module documentation](crate::pipeline).
///
/// `In` is the type of the chunks the pipeline takes, `Out` the output type of its last stage.
pub struct Stages<In, Out> {
    stages: Vec<Spec>,
    branches: Vec<Branch>,
    /// A placement method called before any stage was added.
    misuse: Option<String>,
    _types: PhantomData<fn(In) -> Out>,
}

impl<In, Out> Stages<In, Out> {
    pub(super) fn empty() -> Self {
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
            out_type: std::any::type_name::<Next>(),
            join: None,
            joined: false,
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

    /// Adds a join (fan-in): a stage that reads each output of the stage before it (the *base*:
    /// events) with every output that the earlier main-line stage named `side` gave for the same
    /// pipeline input (peaks), as strax's `event_basics` reads events and the peaks of their
    /// chunk ([`Join`]). Both come from the same input chunk, so they cover the same time range.
    ///
    /// The side stage ends its group and the join starts one (both read frames the coordinator
    /// holds: each side frame until every join item of its input is done with it); the stages
    /// after the join may fuse with it. Building fails with [`Error::InvalidArgument`] if no
    /// stage before the join, other than the stage right before it, is named `side`, or if its
    /// output type is not [`Join::Side`]. A side stage's outputs for one input must fit in its
    /// output ring together. A cached stage at or after the side stage does not serve runs.
    ///
    /// ```no_run
    /// use shmexec::pipeline::{Join, Pipeline};
    /// use shmexec::{BoxError, Pool, Samples};
    ///
    /// /// Each event with the sum of its chunk's peaks.
    /// struct Basics;
    /// impl Join for Basics {
    ///     type Base = u64;
    ///     type Side = Vec<f32>;
    ///     type Output = (u64, f32);
    ///     fn process(
    ///         &mut self,
    ///         events: &rkyv::Archived<u64>,
    ///         peaks: &[&rkyv::Archived<Vec<f32>>],
    ///     ) -> Result<(u64, f32), BoxError> {
    ///         let sum = peaks.iter().flat_map(|p| p.samples()).sum();
    ///         Ok((events.to_native(), sum))
    ///     }
    /// }
    ///
    /// let mut p = Pipeline::<Vec<f32>>::builder()
    ///     .map_fn("peaks", |c| c.samples().iter().copied().filter(|&x| x > 3.0).collect::<Vec<f32>>())
    ///     .map_fn("events", |p| p.len() as u64)
    ///     .join("event_basics", "peaks", Basics)
    ///     .build(Pool::builder().workers(2))?;
    /// # Ok::<(), shmexec::Error>(())
    /// ```
    pub fn join<J>(self, name: &str, side: &str, task: J) -> Stages<In, J::Output>
    where
        J: Join<Base = Out> + 'static,
    {
        let spec = JoinSpec {
            side: side.to_owned(),
            side_type: std::any::type_name::<J::Side>(),
            task: Some(Box::new(join::Typed(task))),
        };
        // The task that runs is made at build, with the rings it reads.
        let placeholder = Box::new(stages::Each::<Out, _>::new(|_: &Archived<Out>| {
            Err("a join stage ran without its rings".into())
        }));
        let mut next = self.then(name, placeholder);
        if let Some(last) = next.stages.last_mut() {
            last.join = Some(spec);
        }
        next
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
    /// the run ([`Run::branch_errors`](crate::pipeline::Run::branch_errors)). The stage added last ends its group.
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
    pub fn build(mut self, pool: Builder) -> Result<Pipeline<In, Out>> {
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
        if self.branches.iter().any(|b| b.after + 1 == main) {
            return Err(Error::InvalidArgument(
                "a branch reads a stage that the main line goes on from: add it before the last \
                 stage (the last stage's outputs are the pipeline's results)"
                    .to_owned(),
            ));
        }
        let joins = check_joins(&mut self.stages, &self.branches)?;
        for &(j, side) in &joins {
            lineage[j].side = Some(side);
        }
        // Neither a branch point nor a join's side can be served from its cache: a cached stage
        // at or after it would leave its readers without inputs.
        let first_branch = self
            .branches
            .iter()
            .map(|b| b.after)
            .chain(joins.iter().map(|&(_, side)| side))
            .min();
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
            main: Vec::new(),
            checks: Vec::new(),
            join_side: Vec::new(),
            side_frames: Vec::new(),
        };
        let mut counters = Vec::new();
        let mut plan = Plan {
            stages: names.clone(),
            groups: Vec::new(),
            group_of: Vec::new(),
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
                // A join reads descriptors: the frames of the group before and of its side's.
                let mut join_side = None;
                if let Some(spec) = group[0].join.as_mut()
                    && let Some(task) = spec.task.take()
                {
                    let side_stage = joins
                        .iter()
                        .find(|&&(j, _)| j == first + offset)
                        .map(|&(_, side)| side)
                        .expect("a join's side was checked");
                    let side = group_of_stage[side_stage];
                    let base = parent.expect("a join is not the first stage");
                    let base_rings = groups.pools[base].rt.output_rings.clone();
                    let side_rings = groups.pools[side].rt.output_rings.clone();
                    group[0].stage.task = task.with_rings(base_rings, side_rings);
                    join_side = Some(side);
                }
                groups.join_side.push(join_side);
                groups.side_frames.push(Default::default());
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
                    if let Start::Spawn(_) | Start::SpawnProgram { .. } = config.start {
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
                        _ if join_side.is_some() => GroupWorker::First(chain),
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
                groups.main.push(is_main);
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
        plan.group_of = group_of_stage;
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
                if spec.join.is_none()
                    && spec.place.fuses_with(
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

/// Checks each join's side (a main-line stage before it, not the stage right before it, whose
/// output type is the join's `Side`) and marks it as ending its group; each join's stage and
/// its side's, main-line numbers.
fn check_joins(stages: &mut [Spec], branches: &[Branch]) -> Result<Vec<(usize, usize)>> {
    if branches
        .iter()
        .flat_map(|b| &b.specs)
        .any(|s| s.join.is_some())
    {
        return Err(Error::InvalidArgument(
            "a branch cannot have joins: a join reads main-line stages".to_owned(),
        ));
    }
    let mut joins = Vec::new();
    for j in 0..stages.len() {
        let Some(spec) = &stages[j].join else {
            continue;
        };
        let join = &stages[j].stage.name;
        let side = match stages.iter().position(|s| s.stage.name == spec.side) {
            Some(k) if k < j => k,
            Some(_) => {
                return Err(Error::InvalidArgument(format!(
                    "join '{join}' reads stage '{}', which comes after it: its side must be an \
                     earlier main-line stage",
                    spec.side
                )));
            }
            None if branches
                .iter()
                .flat_map(|b| &b.specs)
                .any(|s| s.stage.name == spec.side) =>
            {
                return Err(Error::InvalidArgument(format!(
                    "join '{join}' reads stage '{}', which is in a branch: its side must be a \
                     main-line stage",
                    spec.side
                )));
            }
            None => {
                return Err(Error::InvalidArgument(format!(
                    "join '{join}' reads stage '{}', but there is no stage of that name",
                    spec.side
                )));
            }
        };
        if side + 1 == j {
            return Err(Error::InvalidArgument(format!(
                "join '{join}' reads stage '{}', the stage right before it: that is its base \
                 already (use map)",
                spec.side
            )));
        }
        if stages[side].out_type != spec.side_type {
            return Err(Error::InvalidArgument(format!(
                "join '{join}' reads stage '{}' as {}, but that stage gives {}",
                spec.side, spec.side_type, stages[side].out_type
            )));
        }
        stages[side].joined = true;
        joins.push((j, side));
    }
    Ok(joins)
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
