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

use shmexec_shm::HeldFrame;

use super::group::{Groups, Origin};
use super::hop::{HOP_LEN, Hop};
use crate::archive::{Decode, Encode};
use crate::call::dispatch;
use crate::call::engine::{Call, Placed, Polled};
use crate::call::source::Source;
use crate::call::wait::{self, MAP_SLICE};
use crate::error::{Error, Result};
use crate::output::OutputRef;

/// An item on its way from one group to the next.
enum Moving {
    /// A result frame, held in the output ring of worker `worker` of the group before.
    Frame {
        worker: usize,
        frame: HeldFrame,
        input: u64,
    },
    /// The error that takes the item's place, numbered by its input.
    Failed { error: Error, input: u64 },
}

/// The results of a pipeline's pass over its inputs, in input order; see
/// [`crate::pipeline::Pipeline::run`]. Dropping it midway is fine: what is in flight is
/// discarded by the groups.
pub struct Run<'p, In, Out> {
    groups: &'p mut Groups,
    source: Source<'p>,
    /// One call per group.
    calls: Vec<Call>,
    /// `waiting[g]`: a result of group `g` taken but not yet placed in group `g + 1`.
    waiting: Vec<Option<Moving>>,
    /// Whether the last group's outputs are checked as archives of `Out`.
    validate: bool,
    ended: bool,
    _types: PhantomData<fn(In) -> Out>,
}

impl<'p, In, Out> Run<'p, In, Out>
where
    In: Encode<Archived: Decode>,
    Out: Encode<Archived: Decode>,
{
    pub(crate) fn new(groups: &'p mut Groups, source: Source<'p>, validate: bool) -> Self {
        let calls = groups
            .pools
            .iter()
            .map(|p| Call::new(&p.rt, true))
            .collect();
        let waiting = (1..groups.pools.len()).map(|_| None).collect();
        Run {
            groups,
            source,
            calls,
            waiting,
            validate,
            ended: false,
            _types: PhantomData,
        }
    }

    fn last_group(&self) -> usize {
        self.calls.len() - 1
    }

    /// Takes group `g`'s results and places them in group `g + 1`, as long as both can.
    fn advance(&mut self, g: usize) -> Result<()> {
        loop {
            if let Some(moving) = self.waiting[g].take()
                && let Some(back) = self.hand_on(g + 1, moving)?
            {
                self.waiting[g] = Some(back);
                return Ok(());
            }
            let Some(polled) = self.calls[g].poll_from(&mut self.groups.pools[g].rt)? else {
                return Ok(());
            };
            let Polled {
                seq,
                worker,
                result,
            } = polled;
            let origin = self.groups.origin(g, seq);
            self.waiting[g] = Some(match (result, worker) {
                (Ok(out), Some(worker)) => Moving::Frame {
                    worker,
                    frame: out.into_frame(),
                    input: origin.input,
                },
                (Err(e), _) if e.is_item() => Moving::Failed {
                    error: numbered(e, origin),
                    input: origin.input,
                },
                (Err(e), _) => return Err(e),
                (Ok(_), None) => {
                    return Err(Error::Broken(format!(
                        "group {g} handed out a result without its worker"
                    )));
                }
            });
        }
    }

    /// Places `moving` in group `h`: a hop to its frame, or its error in its place. Gives it
    /// back if no worker of `h` has room.
    fn hand_on(&mut self, h: usize, moving: Moving) -> Result<Option<Moving>> {
        let sup = &mut self.groups.pools[h].rt;
        match moving {
            Moving::Frame {
                worker,
                frame,
                input,
            } => {
                let hop = Hop::to(worker, &frame);
                let placed =
                    self.calls[h].place(sup, HOP_LEN, false, &mut |slot| Ok(hop.write(slot)))?;
                let (seq, at) = match placed {
                    Placed::NoRoom => {
                        return Ok(Some(Moving::Frame {
                            worker,
                            frame,
                            input,
                        }));
                    }
                    Placed::Item { seq, worker } => (seq, worker),
                };
                if let Some(w) = at {
                    self.groups.pins[h][w].push_back((seq, frame));
                }
                self.groups.origins[h].push_back(Origin {
                    seq,
                    input,
                    passed: false,
                });
            }
            Moving::Failed { error, input } => {
                let seq = self.calls[h].pass_error(sup, error);
                self.groups.origins[h].push_back(Origin {
                    seq,
                    input,
                    passed: true,
                });
            }
        }
        Ok(None)
    }

    /// The last group's result, as the pipeline's.
    fn deliver(&mut self, polled: Polled<()>) -> Result<OutputRef<Out>> {
        let last = self.last_group();
        let origin = self.groups.origin(last, polled.seq);
        match polled.result {
            Ok(out) => out.retype::<Out>(origin.input, self.validate),
            Err(e) => Err(numbered(e, origin)),
        }
    }

    /// Whether every input was placed and every item handed out.
    fn done(&self) -> bool {
        !self.source.feeding()
            && self.waiting.iter().all(Option::is_none)
            && self
                .calls
                .iter()
                .zip(&self.groups.pools)
                .all(|(c, p)| c.pending(&p.rt) == 0)
    }

    /// Whether a step would find something to do: room for the source's next input, a result
    /// a group can hand on (or the caller take), room for a waiting hop.
    fn ready(&mut self) -> shmexec_shm::Result<bool> {
        let last = self.last_group();
        let pools = &mut self.groups.pools;
        if let Some(len) = self.source.prepared() {
            let limit = pools[0].rt.config().queue_bytes;
            if dispatch::has_room(&mut pools[0].rt.slots, len, limit)? {
                return Ok(true);
            }
        }
        for g in 0..=last {
            let free = g == last || self.waiting[g].is_none();
            if free && self.calls[g].ready(&mut pools[g].rt, None)? {
                return Ok(true);
            }
            if g < last && self.waiting[g].is_some() {
                let limit = pools[g + 1].rt.config().queue_bytes;
                if dispatch::has_room(&mut pools[g + 1].rt.slots, HOP_LEN, limit)? {
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
        let woke = wait::until(signal, &mut waiter, MAP_SLICE, || self.ready());
        self.groups.pools[0].rt.doorbell_waiter = waiter;
        woke
    }

    /// Supervises every group (each call's own count).
    fn tick(&mut self) -> Result<()> {
        for (call, pool) in self.calls.iter_mut().zip(&mut self.groups.pools) {
            call.waited();
            call.tick(&mut pool.rt)?;
        }
        Ok(())
    }

    /// The next result, waiting for it; `Ok(None)` when the pass is done.
    fn step(&mut self) -> Result<Option<Result<OutputRef<Out>>>> {
        self.tick()?;
        let last = self.last_group();
        loop {
            self.source
                .pump(&mut self.calls[0], &mut self.groups.pools[0].rt)?;
            for g in 0..last {
                self.advance(g)?;
            }
            self.groups.release_pins();
            if let Some(polled) = self.calls[last].poll_from(&mut self.groups.pools[last].rt)? {
                return Ok(Some(self.deliver(polled)));
            }
            if self.done() {
                return self.source.take_refused().map_or(Ok(None), Err);
            }
            if self.wait()? {
                // Woken for room or for an earlier group's results while the result due is
                // late: those count toward the health check too.
                self.tick()?;
            } else {
                for pool in &mut self.groups.pools[..last] {
                    pool.rt.supervise()?;
                }
                let unplaced = self.source.unplaced();
                let sup = &mut self.groups.pools[last].rt;
                if let Some(e) = self.calls[last].stalled(sup, unplaced, true)? {
                    return Ok(Some(Err(e)));
                }
            }
        }
    }
}

/// An item's error, numbered by the input it came from (once: an error passed on from an
/// earlier group already is).
fn numbered(e: Error, origin: Origin) -> Error {
    if origin.passed {
        e
    } else {
        e.with_seq(origin.input)
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
    }
}
