//! The engine of one call: its state, and steps that never block.
//!
//! A call (a `map`, a stream) is a [`Call`] value beside the pool's supervisor. Its steps each
//! return at once:
//! - [`Call::place`]: put one input where the dispatch rule finds room, or say there is none;
//! - [`Call::poll`]: collect what the workers published and hand out what is ready (in input
//!   order, or as it comes);
//! - [`Call::tick`]: supervise the workers (deaths, deadlines, respawns) every few items;
//! - [`Call::ready`] / [`Call::stalled`]: the condition a waiter sleeps on, and what to report
//!   when a wait slice ends with nothing to do.
//!
//! Waiting is a separate layer ([`super::wait`]) that front ends ([`super::map::Map`],
//! [`super::stream`]) call between steps.
//!
//! Ordered collection needs no reorder buffer: a worker answers its inputs in FIFO order, so
//! the result of item `k` is the next unread frame of the worker `k` went to.

use std::collections::VecDeque;
use std::time::Instant;

use super::collect::Took;
use super::dispatch;
use crate::error::{Error, Result};
use crate::output::OutputRef;
use crate::pool::{Life, Supervisor, WorkerSlot};
use crate::stats::CallStats;
use crate::task::Task;

/// Items handed out between two health checks while results flow without waiting.
const HEALTH_CHECK_ITEMS: u32 = 16;

/// Where the result of an item of this call comes from.
enum Route {
    Worker(usize),
    Failed(Error),
}

/// What [`Call::place`] did with an input.
pub(crate) enum Placed {
    /// It is item `seq` of the pool: in the input ring of `worker`, or (`None`) failed in
    /// place (too large, not encodable), its error waiting in the call's order.
    Item { seq: u64, worker: Option<usize> },
    /// No worker has room now; the input stays with the caller.
    NoRoom,
}

/// A result handed out by [`Call::poll_from`].
pub(crate) struct Polled<O> {
    /// The item of this pool it is of (the item's place in the call, for an error failed in
    /// place or passed on from an earlier pool, whose own number may be another pool's).
    pub(crate) seq: u64,
    /// The worker whose output ring holds it (`None`: an error made without one).
    pub(crate) worker: Option<usize>,
    pub(crate) result: Result<OutputRef<O>>,
}

impl<O> Polled<O> {
    fn failed(seq: u64, e: Error) -> Self {
        Polled {
            seq,
            worker: None,
            result: Err(e),
        }
    }
}

/// The state of one call; see the module documentation.
pub(crate) struct Call {
    ordered: bool,
    /// Items of this call not yet handed out, in sequence order (ordered calls; unordered ones
    /// keep only failures here).
    routes: VecDeque<(u64, Route)>,
    /// Unordered calls: the worker to look at first.
    next_poll: usize,
    started: Instant,
    pub(super) stats: CallStats,
    respawns_before: u64,
    /// `stats.items` right after the last `OutputsHeld` error was handed out.
    held_error: Option<u64>,
    /// `OutputsHeld` errors handed out (they count in `stats.items` but stand for no input).
    held_reports: u64,
    /// The last clock reading of this step (a placement's), which a result handed out in the
    /// same step takes as its delivery time instead of reading the clock again; cleared by
    /// [`Call::waited`].
    pub(super) clock: Option<u64>,
    /// Inputs whose outputs (or error) were all handed out: in an ordered call, a prefix of
    /// the call's inputs.
    inputs_done: u64,
    since_check: u32,
}

impl Call {
    pub(crate) fn new<T: Task>(sup: &Supervisor<T>, ordered: bool) -> Call {
        Call {
            ordered,
            routes: VecDeque::new(),
            next_poll: 0,
            started: Instant::now(),
            stats: CallStats::default(),
            respawns_before: sup.totals.respawns,
            held_error: None,
            held_reports: 0,
            clock: None,
            inputs_done: 0,
            since_check: 0,
        }
    }

    /// Figures of this call so far.
    pub(crate) fn stats<T: Task>(&self, sup: &Supervisor<T>) -> CallStats {
        CallStats {
            elapsed: self.started.elapsed(),
            respawns: sup.totals.respawns - self.respawns_before,
            ..self.stats.clone()
        }
    }

    /// Items of this call that are in flight or waiting to be handed out.
    pub(crate) fn pending<T: Task>(&self, sup: &Supervisor<T>) -> u64 {
        if self.ordered {
            self.routes.len() as u64
        } else {
            (self.routes.len() + sup.slots.iter().map(|w| w.live).sum::<usize>()) as u64
        }
    }

    /// The caller waited (or let time pass) since this call's last clock reading: the next
    /// result reads the clock for its delivery time.
    pub(crate) fn waited(&mut self) {
        self.clock = None;
    }

    /// Says whether the pool is broken (every step), and supervises the workers every
    /// [`HEALTH_CHECK_ITEMS`] steps: results that keep arriving never make a wait end, and the
    /// check itself reads the clock.
    pub(crate) fn tick<T: Task>(&mut self, sup: &mut Supervisor<T>) -> Result<()> {
        if let Some(reason) = &sup.broken {
            return Err(Error::Broken(reason.clone()));
        }
        self.since_check += 1;
        if self.since_check >= HEALTH_CHECK_ITEMS {
            self.since_check = 0;
            sup.supervise()?;
        }
        Ok(())
    }

    /// The first item of this ordered call not wholly handed out yet, if any.
    pub(crate) fn front_seq(&self) -> Option<u64> {
        self.routes.front().map(|(seq, _)| *seq)
    }

    /// The worker whose next result an ordered call waits for.
    fn head_worker(&self) -> Option<usize> {
        match self.routes.front() {
            Some((_, Route::Worker(w))) if self.ordered => Some(*w),
            _ => None,
        }
    }

    /// Records an item that failed before this pool (in an earlier group of a pipeline): it
    /// takes a sequence number here, and its error its place in the call's order.
    pub(crate) fn pass_error<T: Task>(&mut self, sup: &mut Supervisor<T>, e: Error) -> u64 {
        let seq = sup.take_seq();
        self.routes.push_back((seq, Route::Failed(e)));
        seq
    }

    /// Records an input that failed before reaching a worker: its error takes its place.
    pub(crate) fn fail_input<T: Task>(&mut self, sup: &mut Supervisor<T>, reason: String) -> u64 {
        let seq = sup.take_seq();
        self.routes
            .push_back((seq, Route::Failed(Error::Encode { seq, reason })));
        seq
    }

    /// Places one input of `len` archive bytes, written by `write` into the reserved slot, at
    /// the worker the dispatch rule picks. Never waits.
    pub(crate) fn place<T: Task>(
        &mut self,
        sup: &mut Supervisor<T>,
        len: usize,
        copies: bool,
        write: &mut dyn FnMut(&mut [u8]) -> Result<usize, String>,
    ) -> Result<Placed> {
        let max = sup.max_input_bytes();
        if len > max {
            let seq = sup.take_seq();
            let e = Error::InputTooLarge { seq, len, max };
            self.routes.push_back((seq, Route::Failed(e)));
            return Ok(Placed::Item { seq, worker: None });
        }
        let (limit, timed) = (sup.config().queue_bytes, sup.config().item_timing);
        let seq = sup.peek_seq();
        let Some((w, mut grant)) = dispatch::reserve(&mut sup.slots, len, limit)? else {
            // No room for good once every worker was given up.
            sup.check_usable()?;
            return Ok(Placed::NoRoom);
        };
        // On error the slot is given back unpublished (the grant is dropped).
        let written = write(&mut grant);
        // Stamped before the commit: once it is published the worker may start at once.
        let mut submitted_ns = 0;
        if let Ok(n) = written {
            if timed {
                submitted_ns = shmexec_shm::clock::now_ns();
                self.clock = Some(submitted_ns);
            }
            grant.truncate(n).set_seq(seq);
            grant.commit();
        }
        sup.take_seq();
        let worker = written.is_ok().then_some(w);
        match written {
            Ok(n) => {
                sup.slots[w].push(seq, n as u64, submitted_ns);
                let totals = &mut sup.totals;
                totals.items += 1;
                totals.input_bytes += n as u64;
                if copies {
                    totals.input_bytes_copied += n as u64;
                }
                self.stats.input_bytes += n as u64;
                if self.ordered {
                    self.routes.push_back((seq, Route::Worker(w)));
                }
            }
            Err(reason) => self
                .routes
                .push_back((seq, Route::Failed(Error::Encode { seq, reason }))),
        }
        Ok(Placed::Item { seq, worker })
    }

    /// Whether a waiter has something to do: a result of this call (or an abandoned call's,
    /// to discard) is there to collect, or (with `len`) a worker has room for an input of that
    /// size. Loads the rings' indices only; safe to call in a spin loop.
    pub(crate) fn ready<T: Task>(
        &self,
        sup: &mut Supervisor<T>,
        len: Option<usize>,
    ) -> shmexec_shm::Result<bool> {
        if matches!(self.routes.front(), Some((_, Route::Failed(_)))) {
            return Ok(true);
        }
        let head = self.head_worker();
        for (w, slot) in sup.slots.iter_mut().enumerate() {
            let wanted = if self.ordered {
                head == Some(w) || slot.has_stale_front()
            } else {
                !slot.expect.is_empty()
            };
            if wanted && has_news(slot)? {
                return Ok(true);
            }
        }
        match len {
            Some(len) => {
                let limit = sup.config().queue_bytes;
                dispatch::has_room(&mut sup.slots, len, limit)
            }
            None => Ok(false),
        }
    }

    /// The next result that is ready, without waiting: `Ok(None)` if there is none now. An
    /// `Err` is the pool's (the call cannot go on); an item's error is `Ok(Some(Err(_)))`.
    pub(crate) fn poll<T: Task>(
        &mut self,
        sup: &mut Supervisor<T>,
    ) -> Result<Option<Result<OutputRef<T::Output>>>> {
        Ok(self.poll_from(sup)?.map(|p| p.result))
    }

    /// [`Call::poll`], saying which item of this pool the result is of and which worker's
    /// ring holds it.
    pub(crate) fn poll_from<T: Task>(
        &mut self,
        sup: &mut Supervisor<T>,
    ) -> Result<Option<Polled<T::Output>>> {
        let r = if self.ordered {
            self.poll_ordered(sup)?
        } else {
            self.poll_unordered(sup)?
        };
        if r.is_some() {
            self.stats.items += 1;
        }
        Ok(r)
    }

    fn poll_ordered<T: Task>(
        &mut self,
        sup: &mut Supervisor<T>,
    ) -> Result<Option<Polled<T::Output>>> {
        // Results of an abandoned call sit in front of this call's: discard them, so that their
        // workers' rings make room.
        for w in 0..sup.slots.len() {
            if sup.slots[w].has_stale_front() {
                self.take(sup, w, true)?;
            }
        }
        loop {
            let (seq, w) = match self.routes.front() {
                None => return Ok(None),
                Some((_, Route::Failed(_))) => {
                    let Some((seq, Route::Failed(e))) = self.routes.pop_front() else {
                        unreachable!("the front is a failure")
                    };
                    self.inputs_done += 1;
                    return Ok(Some(Polled::failed(seq, e)));
                }
                Some((seq, Route::Worker(w))) => (*seq, *w),
            };
            let (r, last) = match self.take(sup, w, false)? {
                None => return Ok(None),
                Some(Took::Closed) => {
                    self.routes.pop_front(); // no (more) output: on to the next item
                    self.inputs_done += 1;
                    continue;
                }
                Some(Took::Output(r, last)) => (r, last),
            };
            if last {
                self.routes.pop_front();
                self.inputs_done += 1;
            }
            if let Ok(out) = &r
                && out.seq() != seq
            {
                let e = Error::Broken(format!(
                    "worker {w} returned item {} where {seq} was due",
                    out.seq()
                ));
                return Err(sup.break_with(e));
            }
            return Ok(Some(Polled {
                seq,
                worker: Some(w),
                result: r,
            }));
        }
    }

    fn poll_unordered<T: Task>(
        &mut self,
        sup: &mut Supervisor<T>,
    ) -> Result<Option<Polled<T::Output>>> {
        if let Some((seq, Route::Failed(e))) = self.routes.pop_front() {
            self.inputs_done += 1;
            return Ok(Some(Polled::failed(seq, e)));
        }
        // Whoever has a result ready, starting after the last one served.
        let n = sup.slots.len();
        for k in 0..n {
            let w = (self.next_poll + k) % n;
            while !sup.slots[w].expect.is_empty() {
                match self.take(sup, w, false)? {
                    None => break,
                    Some(Took::Closed) => self.inputs_done += 1,
                    Some(Took::Output(r, last)) => {
                        self.inputs_done += u64::from(last);
                        self.next_poll = w + 1;
                        // An output, or an item error of this pool's: both carry their item.
                        let seq = match &r {
                            Ok(out) => out.seq(),
                            Err(e) => e.seq().unwrap_or(u64::MAX),
                        };
                        return Ok(Some(Polled {
                            seq,
                            worker: Some(w),
                            result: r,
                        }));
                    }
                }
            }
        }
        Ok(None)
    }

    /// After a wait slice that found nothing to do: supervises the workers, and reports a
    /// caller who holds so many results that a worker this call waits on cannot write the
    /// next one. `Ok(Some(e))` is that item-level report (the call goes on once the caller
    /// drops some). With `end_on_repeat` (a blocking iterator, whose caller cannot be holding
    /// them on another thread), asked again with nothing handed out in between, the call cannot
    /// go on and the report is [`Error::CallEnded`] naming what was not run (`unplaced`: inputs
    /// the caller still had, if known).
    pub(crate) fn stalled<T: Task>(
        &mut self,
        sup: &mut Supervisor<T>,
        unplaced: Option<u64>,
        end_on_repeat: bool,
    ) -> Result<Option<Error>> {
        sup.supervise()?;
        let head = self.head_worker();
        let blocked = (0..sup.slots.len()).find(|&w| {
            let slot = &sup.slots[w];
            // With nothing of its own in flight, an ordered call waits for an abandoned call's
            // results to drain (that frees its rings).
            let waited_on = if self.ordered {
                head == Some(w) || (self.routes.is_empty() && slot.has_stale_front())
            } else {
                slot.live > 0
            };
            waited_on && slot.rx.blocked_by_held()
        });
        let Some(w) = blocked else {
            return Ok(None);
        };
        let (held, bytes) = sup.slots[w].rx.held();
        if end_on_repeat && self.held_error == Some(self.stats.items) {
            // Asked again with nothing handed out since: repeating the error forever would be
            // a hang (`collect()` of every result), so the call ends and says what it did not
            // run.
            let (results, outputs) = (self.inputs_done, self.stats.items - self.held_reports);
            let not_run = unplaced.map(|rest| rest + self.pending(sup));
            return Err(Error::CallEnded {
                results,
                outputs,
                not_run,
                reason: format!(
                    "worker {w}'s output ring is full of {held} results ({bytes} bytes) that the \
                     caller still holds, and it was asked for more without dropping any"
                ),
            });
        }
        // `items` counts this error once it is handed out.
        self.held_error = Some(self.stats.items + 1);
        self.stats.items += 1;
        self.held_reports += 1;
        Ok(Some(Error::OutputsHeld {
            worker: w,
            held,
            bytes,
        }))
    }
}

/// Whether collecting from worker `slot` would find something: a frame, a death to handle (its
/// ring closed), or, for a worker given up, its items' errors. A worker waiting for its
/// successor has nothing until it runs.
fn has_news(slot: &mut WorkerSlot) -> shmexec_shm::Result<bool> {
    if slot.life == Life::Failed {
        return Ok(!slot.expect.is_empty());
    }
    match slot.rx.try_peek() {
        Ok(frame) => Ok(frame.is_some()),
        Err(shmexec_shm::Error::PeerGone { .. } | shmexec_shm::Error::Closed) => {
            Ok(slot.life == Life::Up)
        }
        Err(e) => Err(e),
    }
}
