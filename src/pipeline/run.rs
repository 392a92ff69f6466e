//! [`Run`]: one pass of a pipeline over its inputs, as a blocking iterator of results in input
//! order.
//!
//! Each step never waits until it has done what it can: it places inputs into the first group
//! (as [`crate::Map`] does), moves each group's results on to the next group as hops (or, for
//! an item that failed, its error in its place), lets go of upstream frames whose downstream
//! items are done, and hands out the last group's next result. Only then it waits, on the one
//! doorbell all the groups' workers ring, for a result, room, or a released frame.
//!
//! Backpressure needs no rule of its own: a group's result is taken only when the next group
//! has room for its hop, and its frame stays held while the next group works on it, so a slow
//! group fills the rings of the one before it, whose workers then wait, up to the source.

use std::marker::PhantomData;
use std::sync::Arc;

use shmexec_shm::HeldFrame;

use super::group::{Groups, Origin, Pin};
use super::hop::{HOP_LEN, Hop};
use super::join;
use super::save::Saving;
use super::{Introspect, PipelineStats};
use crate::archive::{Decode, Encode};
use crate::call::dispatch;
use crate::call::engine::{Call, Placed, Polled};
use crate::call::source::Source;
use crate::call::wait::{self, MAP_SLICE, STREAM_SLICE};
use crate::error::{Error, Result};
use crate::output::OutputRef;
use crate::store::SavedStream;

/// How many branch errors a run keeps (it counts them all): a branch that fails every item of
/// a stream that runs for weeks must not fill the coordinator's memory.
pub const BRANCH_ERRORS: usize = 64;

/// An item on its way from one group to the groups that read its outputs.
struct Moving {
    what: Item,
    /// The input it came from.
    input: u64,
    /// The groups it is still to be placed in (each, once).
    to: Vec<usize>,
}

/// What moves.
enum Item {
    /// A result frame, held in the output ring of worker `worker` of the group before (shared
    /// by every group it goes to).
    Frame {
        worker: usize,
        frame: Arc<HeldFrame>,
    },
    /// The error that takes the item's place, numbered by its input.
    Failed(Error),
}

/// The results of a pipeline's pass over its inputs, in input order; see
/// [`crate::pipeline::Pipeline::run`]. Dropping it midway is fine: what is in flight is
/// discarded by the groups.
pub struct Run<'p, In, Out> {
    groups: &'p mut Groups,
    introspect: Introspect<'p>,
    /// The inputs, and the group they go to (the first, or the one after a stage served from
    /// its cache); `None` for a run whose last stage is served from its cache.
    source: Option<Source<'p>>,
    entry: usize,
    /// The entry group's sequence number at the start: a run that enters after a cached stage
    /// numbers its items by saved chunk from there.
    base: u64,
    /// One call per group.
    calls: Vec<Call>,
    /// `waiting[g]`: a result of group `g` taken but not yet placed in every group that reads
    /// group `g`'s outputs.
    waiting: Vec<Option<Moving>>,
    /// Errors of items in branches (whose outputs are not handed out), the first
    /// [`BRANCH_ERRORS`] of them, and how many there were.
    branch_errors: Vec<Error>,
    branch_failures: u64,
    /// `down[g]`: branch group `g` can take no more items (every worker given up): items
    /// for it fail there, and the rest of the pipeline goes on.
    down: Vec<bool>,
    /// `savers[g]`: the saved stage that ends group `g`, being written.
    savers: Vec<Option<Saving>>,
    /// The stage this run was served from, if its outputs were saved already.
    cache: Option<CacheHit>,
    /// A saved stream handed out as the results, and the next chunk of it.
    served: Option<(SavedStream, usize)>,
    /// The stages whose streams this run committed.
    saved: Vec<String>,
    /// The input whose error was handed out last: its later outputs (and errors) are not
    /// handed out, as fused stages would not have made them.
    failed_input: Option<u64>,
    /// Whether results are handed out in input order; if not, the inputs that failed in this
    /// run (their outputs may come after their error).
    ordered: bool,
    failed_inputs: std::collections::HashSet<u64>,
    /// Results handed out.
    handed_out: u64,
    /// Whether the last group's outputs are checked as archives of `Out`.
    validate: bool,
    /// How long one wait lasts before the groups are supervised: longer for a live source,
    /// which may be idle for long.
    slice: std::time::Duration,
    ended: bool,
    _types: PhantomData<fn(In) -> Out>,
}

/// A stage whose outputs a run took from its store instead of computing them; see
/// [`crate::pipeline::Pipeline::run_keyed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheHit {
    /// The saved stage. It and every stage before it did not run.
    pub stage: String,
    /// The saved chunks the run read.
    pub chunks: usize,
}

impl<'p, In, Out> Run<'p, In, Out>
where
    In: Encode<Archived: Decode>,
    Out: Encode<Archived: Decode>,
{
    /// A run with no inputs yet: give it a [`feed`](Run::feed), or a stream to
    /// [`serve`](Run::serve). With `ordered` false the main line's last group hands out its
    /// results as its workers finish them (every earlier group hands its own on in order).
    pub(crate) fn new(
        groups: &'p mut Groups,
        introspect: Introspect<'p>,
        validate: bool,
        ordered: bool,
    ) -> Self {
        let results = groups.results;
        // Time laws are checked in order: a checked last stage hands out in order.
        let ordered = ordered || groups.checks[results].is_some();
        let calls = groups
            .pools
            .iter()
            .enumerate()
            .map(|(g, p)| Call::new(&p.rt, ordered || g != results))
            .collect();
        let n = groups.pools.len();
        for check in groups.checks.iter_mut().flatten() {
            check.restart();
        }
        // Stateful stages start this run from their default state: its items in each group
        // begin at the group's next sequence number (set before any is handed out).
        for (pool, states) in groups.pools.iter().zip(&groups.states) {
            for slots in states {
                slots.set_epoch(pool.rt.peek_seq());
            }
        }
        Run {
            groups,
            introspect,
            source: None,
            entry: 0,
            base: 0,
            calls,
            waiting: (0..n).map(|_| None).collect(),
            branch_errors: Vec::new(),
            branch_failures: 0,
            down: vec![false; n],
            savers: (0..n).map(|_| None).collect(),
            cache: None,
            served: None,
            saved: Vec::new(),
            failed_input: None,
            ordered,
            failed_inputs: std::collections::HashSet::new(),
            handed_out: 0,
            validate,
            slice: MAP_SLICE,
            ended: false,
            _types: PhantomData,
        }
    }

    /// The number of groups.
    pub(crate) fn groups(&self) -> usize {
        self.calls.len()
    }

    /// Feeds `source` into group `entry`.
    pub(crate) fn feed(&mut self, entry: usize, source: Source<'p>) {
        self.base = self.groups.pools[entry].rt.peek_seq();
        self.entry = entry;
        self.source = Some(source);
    }

    /// Waits in slices fit for a live source, which may be idle for long.
    pub(crate) fn live(&mut self) {
        self.slice = STREAM_SLICE;
    }

    /// Saves the outputs of group `g`'s last stage.
    pub(crate) fn save(&mut self, g: usize, saving: Saving) {
        self.savers[g] = Some(saving);
    }

    /// Records that the run is served from `stage`'s saved `chunks`.
    pub(crate) fn loaded(&mut self, stage: String, chunks: usize) {
        self.cache = Some(CacheHit { stage, chunks });
    }

    /// Hands out `stream`'s chunks as the results: the last stage is served from its cache.
    pub(crate) fn serve(&mut self, stream: SavedStream) {
        self.served = Some((stream, 0));
    }

    /// What each stage of the pipeline did so far, read while the run goes on (as
    /// [`crate::pipeline::Pipeline::stats`], which the run's borrow of the pipeline keeps out
    /// of reach meanwhile).
    pub fn stats(&self) -> PipelineStats {
        self.introspect.stats(self.groups)
    }

    /// Errors of items in branches ([`crate::pipeline::Stages::branch`]), whose outputs are
    /// not handed out: the first [`BRANCH_ERRORS`] of them, in the order they came.
    pub fn branch_errors(&self) -> &[Error] {
        &self.branch_errors
    }

    /// How many items failed in branches so far (also those past [`BRANCH_ERRORS`]).
    pub fn branch_failures(&self) -> u64 {
        self.branch_failures
    }

    /// The stage this run took from its store instead of running it (and the stages before
    /// it), if any.
    pub fn cache(&self) -> Option<&CacheHit> {
        self.cache.as_ref()
    }

    /// The saved stages whose streams this run committed to their store (known once the run
    /// has handed out its last result).
    pub fn saved(&self) -> &[String] {
        &self.saved
    }

    /// Where item `seq` of group `g` came from.
    fn origin(&mut self, g: usize, seq: u64) -> Origin {
        if g == self.entry && g > 0 {
            return Origin {
                seq,
                input: seq - self.base,
                passed: false,
            };
        }
        if !self.ordered && g == self.groups.results {
            return self.unordered_origin(g, seq);
        }
        self.groups.origin(g, seq)
    }

    /// [`Run::origin`] for results that come in any order: the item's entry is looked up, not
    /// popped, and the entries of items no longer in flight are dropped now and then.
    fn unordered_origin(&mut self, g: usize, seq: u64) -> Origin {
        let found = self.groups.peek_origin(g, seq).unwrap_or(Origin {
            seq,
            input: seq,
            passed: false,
        });
        if self.groups.origins[g].len() > 1024 {
            // Items older than every item in flight (in a worker's queue, or failed and not
            // handed out yet) are done with.
            let in_flight = self.groups.pools[g]
                .rt
                .slots
                .iter()
                .filter_map(|w| w.expect.front().map(|e| e.seq))
                .chain(self.calls[g].front_seq())
                .min()
                .unwrap_or(u64::MAX);
            self.groups.origins[g].retain(|o| o.seq >= in_flight.min(seq));
        }
        found
    }

    /// Holds a result of group `g` to its last stage's time laws, if they are checked: a chunk
    /// that breaks one becomes its error.
    fn time_check(&mut self, g: usize, result: Result<OutputRef<()>>) -> Result<OutputRef<()>> {
        match (&mut self.groups.checks[g], result) {
            (Some(check), Ok(out)) => check.check(out.bytes(), out.seq()).map(|()| out),
            (Some(check), Err(e)) => {
                // Its chunk is missing from the stream: the next one may start anywhere.
                check.restart();
                Err(e)
            }
            (None, result) => result,
        }
    }

    /// Hands a result of group `g` to its saver, if its last stage is saved.
    fn pass_to_saver(&mut self, g: usize, result: &Result<OutputRef<()>>) -> Result<()> {
        let Some(saving) = &mut self.savers[g] else {
            return Ok(());
        };
        match result {
            Ok(out) => {
                if let Err(e) = saving.output(out.bytes()) {
                    // A branch's store failing costs the branch its stream, not the run.
                    if self.groups.main[g] {
                        return Err(e);
                    }
                    saving.item_failed(&e);
                    self.branch_failed(e);
                }
            }
            Err(e) => saving.item_failed(e),
        }
        Ok(())
    }

    /// Whether group `g` or a group it reads from (a branch's source) is down: its stream
    /// lacks items.
    fn lacks_items(&self, mut g: usize) -> bool {
        loop {
            if self.down[g] {
                return true;
            }
            match self.groups.parent[g] {
                Some(p) => g = p,
                None => return false,
            }
        }
    }

    /// Commits the streams of the saved stages, once every item was handed out.
    fn commit(&mut self) -> Result<()> {
        for g in 0..self.savers.len() {
            if self.lacks_items(g) {
                continue; // a branch that went down: its stream is not complete
            }
            if let Some(saving) = &mut self.savers[g]
                && saving.finish()?
            {
                self.saved.push(saving.stage.clone());
            }
        }
        Ok(())
    }

    /// Takes group `g`'s results and places them in every group that reads them, as long as
    /// all can; a branch's last group's results are consumed here (their errors kept).
    fn advance(&mut self, g: usize) -> Result<()> {
        loop {
            if let Some(mut moving) = self.waiting[g].take() {
                self.hand_on(&mut moving)?;
                if !moving.to.is_empty() {
                    self.waiting[g] = Some(moving);
                    return Ok(());
                }
            }
            let Some(polled) = self.calls[g].poll_from(&mut self.groups.pools[g].rt)? else {
                return Ok(());
            };
            let Polled {
                seq,
                worker,
                result,
            } = polled;
            let result = self.time_check(g, result);
            self.pass_to_saver(g, &result)?;
            let origin = self.origin(g, seq);
            let to = self.groups.children[g].clone();
            let what = match (result, worker) {
                (Ok(out), Some(worker)) => match out.into_frame() {
                    Some(frame) => Item::Frame {
                        worker,
                        frame: Arc::new(frame),
                    },
                    None => {
                        return Err(Error::Broken(format!(
                            "group {g} handed out a result that is not in a ring"
                        )));
                    }
                },
                (Err(e), _) if e.is_item() => {
                    Item::Failed(numbered(e, origin, &self.groups.labels[g]))
                }
                (Err(e), _) => return Err(e),
                (Ok(_), None) => {
                    return Err(Error::Broken(format!(
                        "group {g} handed out a result without its worker"
                    )));
                }
            };
            if let Item::Frame { worker, frame } = &what {
                // A join's side: its frames wait for the join's items of the same input.
                for h in 0..self.groups.join_side.len() {
                    if self.groups.join_side[h] == Some(g) {
                        self.groups.side_frames[h]
                            .entry(origin.input)
                            .or_default()
                            .push((*worker, Arc::clone(frame)));
                    }
                }
            }
            if to.is_empty() {
                // The last group of a branch: its outputs are consumed, its errors kept.
                if let Item::Failed(e) = what {
                    self.branch_failed(e);
                }
                continue;
            }
            self.waiting[g] = Some(Moving {
                what,
                input: origin.input,
                to,
            });
        }
    }

    /// A pool-level error of group `g`: for a branch, the branch is down (recorded once, its
    /// later items fail there) and the run goes on; for the main line, the run ends with it.
    fn group_failed(&mut self, g: usize, e: Error) -> Result<()> {
        if self.groups.main[g] {
            return Err(e);
        }
        if !self.down[g] {
            self.down[g] = true;
            self.branch_failed(e);
            // No worker of it reads a held frame any more: the frames held for it go back.
            self.groups.pools[g].rt.give_up_all();
        }
        Ok(())
    }

    /// Records an item's failure in a branch (whose results are not handed out).
    fn branch_failed(&mut self, e: Error) {
        self.branch_failures += 1;
        if self.branch_errors.len() < BRANCH_ERRORS {
            self.branch_errors.push(e);
        }
    }

    /// Places `moving` in each group it is still to go to that has room: a hop to its frame,
    /// or its error in its place. What finds no room stays in `moving.to`.
    fn hand_on(&mut self, moving: &mut Moving) -> Result<()> {
        let mut left = Vec::new();
        for h in std::mem::take(&mut moving.to) {
            if self.down[h] {
                // A branch that is down: the item fails there (counted, not kept).
                self.branch_failures += 1;
                continue;
            }
            let (seq, passed) = match &moving.what {
                Item::Frame { worker, frame } => {
                    let hop = Hop::to(*worker, frame);
                    let mut held = vec![Arc::clone(frame)];
                    let mut sides = Vec::new();
                    let join = self.groups.join_side[h];
                    if let Some(side) = join {
                        // A join's item: the base frame and every side frame of its input,
                        // once the side group gave them all.
                        if !self.side_complete(side, moving.input) {
                            left.push(h);
                            continue;
                        }
                        let frames = self.groups.side_frames[h].get(&moving.input);
                        for (w, f) in frames.into_iter().flatten() {
                            sides.push(Hop::to(*w, f));
                            held.push(Arc::clone(f));
                        }
                    }
                    let len = match join {
                        Some(_) => join::descriptor_len(sides.len()),
                        None => HOP_LEN,
                    };
                    let sup = &mut self.groups.pools[h].rt;
                    let placed = match self.calls[h].place(sup, len, false, &mut |slot| {
                        Ok(match join {
                            Some(_) => join::write_descriptor(&hop, &sides, slot),
                            None => hop.write(slot),
                        })
                    }) {
                        Ok(placed) => placed,
                        // A branch that cannot take items (every worker given up) fails
                        // its items; the main line goes on.
                        Err(e) if !self.groups.main[h] => {
                            self.group_failed(h, e)?;
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    match placed {
                        Placed::NoRoom => {
                            left.push(h);
                            continue;
                        }
                        Placed::Item { seq, worker } => {
                            if let Some(w) = worker {
                                let end = sup.slots[w].expect.back().map_or(0, |e| e.end);
                                for frame in held {
                                    self.groups.pins[h][w].push_back(Pin { end, _frame: frame });
                                }
                            }
                            (seq, false)
                        }
                    }
                }
                Item::Failed(error) => {
                    let sup = &mut self.groups.pools[h].rt;
                    (self.calls[h].pass_error(sup, error.item_copy()), true)
                }
            };
            self.groups.origins[h].push_back(Origin {
                seq,
                input: moving.input,
                passed,
            });
        }
        moving.to = left;
        Ok(())
    }

    /// The input of the item at the front of group `g`'s call (the oldest not wholly handed
    /// on), if any.
    fn front_input(&self, g: usize) -> Option<u64> {
        let seq = self.calls[g].front_seq()?;
        if g == self.entry && g > 0 {
            return Some(seq - self.base);
        }
        Some(self.groups.peek_origin(g, seq).map_or(seq, |o| o.input))
    }

    /// Whether side group `side` gave every output of `input`: its results come in input
    /// order, so once its oldest item is of a later input (or it has none), it did.
    fn side_complete(&self, side: usize, input: u64) -> bool {
        self.front_input(side).is_none_or(|front| front > input)
    }

    /// Lets go of the side frames no join item can need any more: those of the inputs older
    /// than every item in flight from the side group to the join's base group (their base
    /// items were all handed to the join, filtered out, or failed).
    fn prune_side_frames(&mut self) {
        for h in 0..self.groups.join_side.len() {
            let Some(side) = self.groups.join_side[h] else {
                continue;
            };
            if self.groups.side_frames[h].is_empty() {
                continue;
            }
            let base = self.groups.parent[h].unwrap_or(side);
            let oldest = (side..=base)
                .flat_map(|g| {
                    let waiting = self.waiting[g].as_ref().map(|m| m.input);
                    self.front_input(g).into_iter().chain(waiting)
                })
                .min();
            match oldest {
                None => self.groups.side_frames[h].clear(),
                Some(oldest) => {
                    let kept = self.groups.side_frames[h].split_off(&oldest);
                    self.groups.side_frames[h] = kept;
                }
            }
        }
    }

    /// The main line's last group's result, as the pipeline's; `None` for one of an input whose error was
    /// handed out already.
    fn deliver(&mut self, polled: Polled<()>) -> Result<Option<Result<OutputRef<Out>>>> {
        let last = self.groups.results;
        let result = self.time_check(last, polled.result);
        self.pass_to_saver(last, &result)?;
        let origin = self.origin(last, polled.seq);
        if self.failed_input == Some(origin.input) || self.failed_inputs.contains(&origin.input) {
            return Ok(None);
        }
        let result = match result {
            Ok(out) => out.retype::<Out>(origin.input, self.validate),
            Err(e) if e.is_item() => Err(numbered(e, origin, &self.groups.labels[last])),
            Err(e) => return Err(e),
        };
        if result.is_err() {
            if self.ordered {
                self.failed_input = Some(origin.input);
            } else {
                self.failed_inputs.insert(origin.input);
            }
        }
        self.handed_out += 1;
        Ok(Some(result))
    }

    /// The input number of the first input of this run.
    fn first_input(&self) -> u64 {
        if self.entry == 0 { self.base } else { 0 }
    }

    /// The first input of this run not wholly handed out (its outputs, or its error), and the
    /// end of the inputs placed so far.
    fn progress(&self) -> (u64, u64) {
        let entry = self.entry;
        let placed = self.groups.pools[entry].rt.peek_seq() - self.base + self.first_input();
        let mut first = placed;
        for (g, call) in self.calls.iter().enumerate().skip(entry) {
            let Some(seq) = call.front_seq() else {
                continue;
            };
            let input = if g == entry && g > 0 {
                Some(seq - self.base)
            } else {
                self.groups.peek_origin(g, seq).map(|o| o.input)
            };
            first = first.min(input.unwrap_or(first));
        }
        for moving in self.waiting.iter().flatten() {
            first = first.min(moving.input);
        }
        (first, placed)
    }

    /// `CallEnded` of the last group, in the pipeline's terms: the inputs whose results were
    /// all handed out, and how many were not run (in every group, or not placed yet).
    fn ended(&self, e: Error) -> Error {
        let Error::CallEnded { reason, .. } = e else {
            return e;
        };
        let (first, placed) = self.progress();
        let unplaced = self.source.as_ref().and_then(Source::unplaced);
        Error::CallEnded {
            results: first - self.first_input(),
            outputs: self.handed_out,
            not_run: unplaced.map(|rest| rest + (placed - first)),
            reason,
        }
    }

    /// Whether every input was placed and every item handed out.
    fn done(&self) -> bool {
        !self.source.as_ref().is_some_and(Source::feeding)
            && self.waiting.iter().all(Option::is_none)
            && self
                .calls
                .iter()
                .zip(&self.groups.pools)
                .zip(&self.down)
                .all(|((c, p), &down)| down || c.pending(&p.rt) == 0)
    }

    /// Whether a step would find something to do: room for the source's next input, a result
    /// a group can hand on (or the caller take), room for a waiting hop.
    fn ready(&mut self) -> shmexec_shm::Result<bool> {
        // A downstream worker released a hop (it rings after that, maybe after its closing
        // frame was read): the frame it held can go back to its producer.
        if self.groups.releasable()? {
            return Ok(true);
        }
        let pools = &mut self.groups.pools;
        let entry = self.entry;
        if let Some(len) = self.source.as_ref().and_then(Source::prepared) {
            let limit = pools[entry].rt.config().queue_bytes;
            if dispatch::has_room(&mut pools[entry].rt.slots, len, limit)? {
                return Ok(true);
            }
        }
        if self.source.as_ref().is_some_and(Source::has_input) {
            return Ok(true);
        }
        for g in entry..self.groups.pools.len() {
            if self.down[g] {
                continue;
            }
            let Some(moving) = &self.waiting[g] else {
                if self.calls[g].ready(&mut self.groups.pools[g].rt, None)? {
                    return Ok(true);
                }
                continue;
            };
            for &h in &moving.to {
                let mut len = HOP_LEN;
                if let Some(side) = self.groups.join_side[h] {
                    // A join's item waits for its side first.
                    if !self.side_complete(side, moving.input) {
                        continue;
                    }
                    let frames = self.groups.side_frames[h].get(&moving.input);
                    len = join::descriptor_len(frames.map_or(0, Vec::len));
                }
                let pool = &mut self.groups.pools[h];
                let limit = pool.rt.config().queue_bytes;
                if dispatch::has_room(&mut pool.rt.slots, len, limit)? {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Waits one slice on the groups' doorbell for [`Run::ready`].
    fn wait(&mut self) -> Result<bool> {
        let bell = self.groups.bell.clone();
        let Some(signal) = bell.signal() else {
            return Err(Error::Broken("the pipeline's doorbell is missing".into()));
        };
        let mut waiter = std::mem::take(&mut self.groups.pools[0].rt.doorbell_waiter);
        let slice = self.slice;
        let woke = wait::until(signal, &mut waiter, slice, || self.ready());
        self.groups.pools[0].rt.doorbell_waiter = waiter;
        woke
    }

    /// Supervises every group (each call's own count).
    fn tick(&mut self) -> Result<()> {
        for g in 0..self.calls.len() {
            if self.down[g] {
                continue;
            }
            self.calls[g].waited();
            if let Err(e) = self.calls[g].tick(&mut self.groups.pools[g].rt) {
                self.group_failed(g, e)?;
            }
        }
        Ok(())
    }

    /// The next result, waiting for it; `Ok(None)` when the pass is done.
    fn step(&mut self) -> Result<Option<Result<OutputRef<Out>>>> {
        if let Some((stream, next)) = &mut self.served {
            if *next == stream.chunks() {
                return Ok(None);
            }
            let i = *next;
            *next += 1;
            // A chunk that does not read is an error in its place, as an input would be.
            return Ok(Some(match stream.chunk(i) {
                Ok(chunk) => OutputRef::from_chunk(chunk, i as u64, self.validate),
                Err(e) => Err(Error::InvalidOutput {
                    seq: i as u64,
                    reason: e.to_string(),
                }),
            }));
        }
        self.tick()?;
        let (entry, last) = (self.entry, self.groups.results);
        loop {
            if let Some(source) = &mut self.source {
                source.pump(&mut self.calls[entry], &mut self.groups.pools[entry].rt)?;
            }
            // Parents before children: groups are numbered so.
            for g in entry..self.calls.len() {
                if g != last
                    && !self.down[g]
                    && let Err(e) = self.advance(g)
                {
                    self.group_failed(g, e)?;
                }
            }
            self.prune_side_frames();
            self.groups.release_pins();
            if let Some(polled) = self.calls[last].poll_from(&mut self.groups.pools[last].rt)? {
                match self.deliver(polled)? {
                    Some(result) => return Ok(Some(result)),
                    None => continue,
                }
            }
            if self.done() {
                if let Some(e) = self.source.as_mut().and_then(Source::take_refused) {
                    return Err(e);
                }
                self.commit()?;
                return Ok(None);
            }
            if self.wait()? {
                // Woken for room or for an earlier group's results while the result due is
                // late: those count toward the health check too.
                self.tick()?;
            } else {
                for g in 0..self.calls.len() {
                    if g != last
                        && !self.down[g]
                        && let Err(e) = self.groups.pools[g].rt.supervise()
                    {
                        self.group_failed(g, e)?;
                    }
                }
                let unplaced = self.source.as_ref().and_then(Source::unplaced);
                let sup = &mut self.groups.pools[last].rt;
                match self.calls[last].stalled(sup, unplaced, true) {
                    Ok(Some(e)) => return Ok(Some(Err(e))),
                    Ok(None) => {}
                    Err(e) => return Err(self.ended(e)),
                }
            }
        }
    }
}

/// An item's error out of a group labelled `label`, numbered by the input it came from and
/// naming the group's stages if the error does not name its stage itself (a crash given up, a
/// timeout: in fused stages, the group's stages, as which of them ran is not known): once, as
/// an error passed on from an earlier group already is.
fn numbered(e: Error, origin: Origin, label: &str) -> Error {
    if origin.passed {
        return e;
    }
    let e = e.with_seq(origin.input);
    match e {
        // Named already, or about the input itself (too large for the first ring, not
        // serializable, a saved chunk that does not read): no stage ran.
        Error::Stage { .. } | Error::InputTooLarge { .. } | Error::Encode { .. } => e,
        e => Error::Stage {
            stage: label.to_owned(),
            error: Box::new(e),
        },
    }
}

impl<In, Out> Iterator for Run<'_, In, Out>
where
    In: Encode<Archived: Decode>,
    Out: Encode<Archived: Decode>,
{
    type Item = Result<OutputRef<Out>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.ended {
            return None;
        }
        match self.step() {
            Ok(Some(r)) => Some(r),
            Ok(None) => {
                self.ended = true;
                None
            }
            Err(e) => {
                self.ended = true;
                Some(Err(e))
            }
        }
    }
}

impl<In, Out> Drop for Run<'_, In, Out> {
    fn drop(&mut self) {
        // Results still to come belong to nobody now: each group discards them as they arrive.
        // The frames held for later groups stay held until those items are answered.
        for pool in &mut self.groups.pools {
            pool.rt.abandon_all();
        }
        // The join items placed hold their side frames in their pins.
        for frames in &mut self.groups.side_frames {
            frames.clear();
        }
    }
}
