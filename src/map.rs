//! One call on the pool: feeding inputs into the rings and taking results out.
//!
//! The coordinator runs in the caller's thread, inside [`Map::next`]: each call first hands out
//! as many inputs as the input rings take without waiting (each to the worker with the fewest
//! items in flight), then waits for the result it returns. Memory is bounded by the rings: an
//! input that fits nowhere stays in the iterator until a worker frees room.
//!
//! Ordered output needs no reorder buffer: a worker handles its inputs in FIFO order, so the
//! result of item `k` is the next unread frame of the worker `k` went to (DESIGN.md).

use std::borrow::Borrow;
use std::collections::VecDeque;
use std::marker::PhantomData;
use std::time::{Duration, Instant};

use shmexec_shm::{FrameKind, Grant};

use crate::archive::{Encode, Prewritten, Sample, encode_into, encoded_len};
use crate::error::{BoxError, Error, Result};
use crate::output::OutputRef;
use crate::pool::Pool;
use crate::protocol::{START_SEQ, read_report};
use crate::stats::CallStats;
use crate::task::Task;

/// How long one wait for a result lasts before the coordinator feeds the rings again and checks
/// for a caller who holds too many results. A result that arrives ends the wait at once.
const WAIT_SLICE: Duration = Duration::from_millis(1);

/// Items between two health checks while results flow without waiting.
const HEALTH_CHECK_ITEMS: u32 = 16;

/// A source of inputs for one call: says how big the next archive is, then writes it into a
/// reserved slot.
pub trait Feed {
    /// Gets the next input ready and returns its archive size; `None` when there are no more.
    /// An `Err` is that input's error (it is skipped). After `Some(Ok(_))` the next call must be
    /// `write`.
    fn prepare(&mut self) -> Option<Result<usize, String>>;
    /// Writes the prepared input into `slot` (of the size `prepare` gave); returns the archive
    /// length.
    fn write(&mut self, slot: &mut [u8]) -> Result<usize, String>;
    /// Drops the prepared input (it does not fit any ring).
    fn skip(&mut self);
    /// Whether `write` copies the payload from the caller's memory.
    const COPIES: bool;
}

/// Inputs serialized from the caller's values: one copy into the ring ([`Pool::map`]).
pub struct SerializeFeed<I: Iterator, In> {
    iter: I,
    pending: Option<I::Item>,
    _in: PhantomData<fn(In)>,
}

impl<I: Iterator, In> SerializeFeed<I, In> {
    pub(crate) fn new(iter: I) -> Self {
        SerializeFeed {
            iter,
            pending: None,
            _in: PhantomData,
        }
    }
}

impl<I, In> Feed for SerializeFeed<I, In>
where
    I: Iterator,
    I::Item: Borrow<In>,
    In: Encode,
{
    const COPIES: bool = true;

    fn prepare(&mut self) -> Option<Result<usize, String>> {
        let item = self.iter.next()?;
        let len = encoded_len(item.borrow()).map_err(|e| e.to_string());
        if len.is_ok() {
            self.pending = Some(item);
        }
        Some(len)
    }

    fn skip(&mut self) {
        self.pending = None;
    }

    fn write(&mut self, slot: &mut [u8]) -> Result<usize, String> {
        let item = self.pending.take().ok_or("no input prepared")?;
        encode_into(item.borrow(), slot).map_err(|e| e.to_string())
    }
}

/// Inputs written in place by the caller's fill function: no copy ([`Pool::map_in_place`]).
pub struct FillFeed<L, F, E> {
    lens: L,
    fill: F,
    pending: Option<Prewritten<E>>,
    index: u64,
}

impl<L, F, E> FillFeed<L, F, E> {
    pub(crate) fn new(lens: L, fill: F) -> Self {
        FillFeed {
            lens,
            fill,
            pending: None,
            index: 0,
        }
    }
}

impl<L, F, E> Feed for FillFeed<L, F, E>
where
    L: Iterator<Item = usize>,
    F: FnMut(u64, &mut [E]) -> Result<(), BoxError>,
    E: Sample,
{
    const COPIES: bool = false;

    fn prepare(&mut self) -> Option<Result<usize, String>> {
        let len = self.lens.next()?;
        let p = Prewritten::<E>::new(len);
        let n = p.archive_len();
        self.pending = Some(p);
        Some(Ok(n))
    }

    fn skip(&mut self) {
        self.pending = None;
        self.index += 1;
    }

    fn write(&mut self, slot: &mut [u8]) -> Result<usize, String> {
        let p = self.pending.take().ok_or("no input prepared")?;
        let index = self.index;
        self.index += 1;
        let data: &mut [E] = bytemuck::try_cast_slice_mut(&mut slot[..p.data_len()])
            .map_err(|e| format!("slot not aligned for the samples: {e:?}"))?;
        (self.fill)(index, data).map_err(|e| e.to_string())?;
        p.finish(slot).map_err(|e| e.to_string())
    }
}

/// Where the result of an item in flight comes from.
enum Route {
    Worker(usize),
    Failed(Error),
}

/// The iterator of one call: results in input order ([`Pool::map`]) or as they come
/// ([`Pool::map_unordered`]). Dropping it midway is fine: results still in flight are discarded
/// by the pool.
pub struct Map<'p, T: Task, F> {
    pool: &'p mut Pool<T>,
    feed: F,
    ordered: bool,
    /// Items in flight, in sequence order (ordered calls; unordered ones keep only failures).
    queue: VecDeque<(u64, Route)>,
    /// Archive size of the input the feed holds ready, waiting for ring space.
    prepared: Option<usize>,
    feeding: bool,
    ended: bool,
    next_poll: usize,
    started: Instant,
    stats: CallStats,
    respawns_before: u64,
    /// `stats.items` right after the last `OutputsHeld` error was handed out.
    held_error: Option<u64>,
    /// Items handed out since the last health check.
    since_check: u32,
}

impl<'p, T: Task, F: Feed> Map<'p, T, F> {
    pub(crate) fn new(pool: &'p mut Pool<T>, feed: F, ordered: bool) -> Self {
        let respawns_before = pool.totals.respawns;
        Map {
            pool,
            feed,
            ordered,
            queue: VecDeque::new(),
            prepared: None,
            feeding: true,
            ended: false,
            next_poll: 0,
            started: Instant::now(),
            stats: CallStats::default(),
            respawns_before,
            held_error: None,
            since_check: 0,
        }
    }

    /// Figures of this call so far.
    pub fn stats(&self) -> CallStats {
        CallStats {
            elapsed: self.started.elapsed(),
            respawns: self.pool.totals.respawns - self.respawns_before,
            ..self.stats.clone()
        }
    }

    /// Process ids of the pool's workers now (they change when a dead worker is replaced).
    pub fn worker_pids(&self) -> Vec<i32> {
        self.pool.pids()
    }

    fn in_flight(&self) -> usize {
        self.pool.workers.iter().map(|w| w.live).sum()
    }

    fn take_seq(&mut self) -> u64 {
        let seq = self.pool.next_seq;
        self.pool.next_seq += 1;
        seq
    }

    /// Hands out inputs until the rings are full or the inputs run out. Never waits.
    fn feed(&mut self) -> Result<()> {
        while self.feeding {
            // An input stays prepared in the feed while no ring has room for it.
            let len = match self.prepared {
                Some(len) => len,
                None => match self.feed.prepare() {
                    None => {
                        self.feeding = false;
                        return Ok(());
                    }
                    Some(Err(reason)) => {
                        let seq = self.take_seq();
                        self.fail(seq, Error::Encode { seq, reason });
                        continue;
                    }
                    Some(Ok(len)) => len,
                },
            };
            self.prepared = Some(len);
            let max = self.pool.max_input_bytes();
            if len > max {
                self.prepared = None;
                self.feed.skip();
                let seq = self.take_seq();
                self.fail(seq, Error::InputTooLarge { seq, len, max });
                continue;
            }
            // Least-loaded first (ties to the lower index), then any other with room.
            let workers = self.pool.workers.len();
            let least = (0..workers)
                .min_by_key(|&w| self.pool.workers[w].expect.unfinished().0)
                .unwrap_or(0);
            let seq = self.pool.next_seq;
            let mut placed = None;
            let limit = self.pool.queue_bytes;
            for w in std::iter::once(least).chain((0..workers).filter(|&w| w != least)) {
                let slot = &mut self.pool.workers[w];
                if slot.queue_full(limit)? {
                    continue;
                }
                let Some(grant) = slot.tx.try_reserve(len)? else {
                    continue;
                };
                self.prepared = None;
                placed = Some((w, write_input(&mut self.feed, grant, seq)));
                break;
            }
            let Some((w, written)) = placed else {
                return Ok(()); // every ring or queue is full: try again after the next result
            };
            self.pool.next_seq += 1;
            match written {
                Ok(n) => {
                    self.pool.workers[w].push(seq, n as u64);
                    let totals = &mut self.pool.totals;
                    totals.items += 1;
                    totals.input_bytes += n as u64;
                    if F::COPIES {
                        totals.input_bytes_copied += n as u64;
                    }
                    self.stats.input_bytes += n as u64;
                    if self.ordered {
                        self.queue.push_back((seq, Route::Worker(w)));
                    }
                }
                Err(reason) => self.fail(seq, Error::Encode { seq, reason }),
            }
        }
        Ok(())
    }

    /// Records an item that failed before reaching a worker; it is returned in its place.
    fn fail(&mut self, seq: u64, e: Error) {
        self.queue.push_back((seq, Route::Failed(e)));
    }

    /// Marks the pool unusable and ends the call with `e`.
    fn broken(&mut self, e: Error) -> Error {
        self.pool.broken.get_or_insert_with(|| e.to_string());
        self.ended = true;
        e
    }

    /// Takes the next result of worker `w` (waiting for it), feeding the rings between waits.
    /// `Ok(None)`: nothing arrived (for [`Wait::Poll`] and [`Wait::Slice`]).
    fn take_from(&mut self, w: usize, wait: Wait) -> Result<Option<Result<OutputRef<T::Output>>>> {
        loop {
            // Inputs wait for room: sleep until this result comes or any worker could take one,
            // whichever is first (`Pool::await_result_or_room`). Only a blocking take feeds:
            // a `Slice` take may be draining an abandoned call's results, and must not place
            // this call's items behind them (it would return and drop their results).
            let mut slice_over = false;
            if let (Some(len), Wait::Block) = (self.prepared, wait) {
                match self
                    .pool
                    .await_result_or_room(w, len, Instant::now() + WAIT_SLICE)
                {
                    Ok(true) => {
                        // Other workers' items may keep waking this wait before its slice ends:
                        // look after the health here too, or a dead worker `w` would go unseen.
                        if let Err(e) = self.pool.check_health() {
                            return Err(self.broken(e));
                        }
                        self.feed()?;
                        continue;
                    }
                    Err(shmexec_shm::Error::Timeout { .. }) => slice_over = true,
                    // The result is there, or an error that reading the ring reports below.
                    Ok(false) | Err(_) => {}
                }
            }
            let slot = &mut self.pool.workers[w];
            // A result that is already there costs no clock read.
            let ready = slot.rx.try_peek().map(|f| f.is_some());
            let waited = match (wait, ready) {
                (_, Ok(true)) | (Wait::Poll, _) | (_, Err(_)) => slot.rx.try_peek(),
                (Wait::Block, Ok(false)) if slice_over => {
                    Err(shmexec_shm::Error::Timeout { waited: WAIT_SLICE })
                }
                (Wait::Slice | Wait::Block, Ok(false)) => {
                    slot.rx.peek_until(Instant::now() + WAIT_SLICE).map(Some)
                }
            };
            let frame = match waited {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(None),
                Err(shmexec_shm::Error::Timeout { .. }) => {
                    // A slice is too short for the ring's own liveness checks: look here, at
                    // every worker (a few ms apart).
                    if let Err(e) = self.pool.check_health() {
                        return Err(self.broken(e));
                    }
                    let slot = &mut self.pool.workers[w];
                    if slot.rx.blocked_by_held() {
                        let (held, bytes) = slot.rx.held();
                        // Asked again with nothing handed out since the last time (`collect()`
                        // of every result, say): repeating the error forever would be a hang,
                        // so the call ends.
                        if self.held_error == Some(self.stats.items) {
                            self.ended = true;
                        }
                        // `items` counts this error once it is returned.
                        self.held_error = Some(self.stats.items + 1);
                        return Err(Error::OutputsHeld {
                            worker: w,
                            held,
                            bytes,
                        });
                    }
                    if wait == Wait::Slice {
                        return Ok(None);
                    }
                    self.feed()?;
                    continue;
                }
                Err(shmexec_shm::Error::PeerGone { .. } | shmexec_shm::Error::Closed) => {
                    // Everything it published has been read: replace it and wait on.
                    if let Err(e) = self.pool.respawn(w) {
                        return Err(self.broken(e));
                    }
                    continue;
                }
                Err(e) => return Err(self.broken(e.into())),
            };
            let (seq, kind) = (frame.seq(), frame.kind());
            if seq == START_SEQ {
                // A respawned worker's start-up report.
                let report = (kind == FrameKind::Error).then(|| read_report(w, seq, &frame));
                frame.release();
                match report {
                    None => continue,
                    Some(e) => return Err(self.broken(e)),
                }
            }
            let due = slot.expect.front().map(|e| e.seq);
            match due {
                // Published twice (its first worker died before releasing the input).
                Some(due) if seq < due => {
                    frame.release();
                    continue;
                }
                Some(due) if seq == due => {}
                _ => {
                    let e =
                        Error::Broken(format!("worker {w} returned item {seq}, expected {due:?}"));
                    return Err(self.broken(e));
                }
            }
            // The result is here: the item leaves the worker's queue (field by field, as the
            // frame still borrows the ring).
            let done = slot.expect.pop_front();
            if !done.is_some_and(|e| e.live) {
                frame.release(); // an abandoned call's result
                continue;
            }
            slot.live -= 1;
            let result = match kind {
                FrameKind::Data => {
                    self.stats.output_bytes += frame.len() as u64;
                    self.pool.totals.output_bytes += frame.len() as u64;
                    OutputRef::new(frame.hold(), self.pool.validate_outputs)
                }
                FrameKind::Error => {
                    let mut e = read_report(w, seq, &frame);
                    frame.release();
                    if let Error::WorkerCrashed {
                        signal, crashes, ..
                    } = &mut e
                    {
                        let record = self.pool.crash_record(seq);
                        (*crashes, *signal) = (record.count, record.signal);
                        if let Some(after) = record.timed_out {
                            e = Error::ChunkTimeout { seq, after };
                        }
                    }
                    Err(e)
                }
                FrameKind::End => {
                    let e = Error::Broken(format!("worker {w} ended its output unasked"));
                    return Err(self.broken(e));
                }
            };
            return Ok(Some(result));
        }
    }

    /// Waits until every item handed to a worker (by this call or an abandoned one) is
    /// answered, discarding the abandoned ones' results.
    pub(crate) fn settle(&mut self) -> Result<()> {
        while self.pool.workers.iter().any(|w| !w.expect.is_empty()) {
            self.wait_for_room()?;
        }
        Ok(())
    }

    /// While inputs remain but none could be placed and nothing of this call is in flight, the
    /// rings are full of an abandoned call's items: wait a slice for them to drain.
    fn wait_for_room(&mut self) -> Result<()> {
        let stale = |w: &crate::pool::WorkerSlot| w.expect.len() > w.live;
        match (0..self.pool.workers.len()).find(|&w| stale(&self.pool.workers[w])) {
            Some(w) => self.take_from(w, Wait::Slice).map(|_| ()),
            None => {
                std::thread::sleep(WAIT_SLICE);
                Ok(())
            }
        }
    }

    fn next_ordered(&mut self) -> Option<Result<OutputRef<T::Output>>> {
        while self.queue.is_empty() {
            if !self.feeding {
                return None;
            }
            if let Err(e) = self.wait_for_room().and_then(|()| self.feed()) {
                return Some(Err(e));
            }
        }
        let (seq, route) = self.queue.front()?;
        let (seq, w) = match route {
            Route::Failed(_) => {
                let Some((_, Route::Failed(e))) = self.queue.pop_front() else {
                    unreachable!("front is a failure")
                };
                return Some(Err(e));
            }
            Route::Worker(w) => (*seq, *w),
        };
        match self.take_from(w, Wait::Block) {
            Ok(Some(r)) => {
                self.queue.pop_front();
                match &r {
                    Ok(out) if out.seq() != seq => Some(Err(self.broken(Error::Broken(format!(
                        "worker {w} returned item {} where {seq} was due",
                        out.seq()
                    ))))),
                    _ => Some(r),
                }
            }
            Ok(None) => unreachable!("a blocking take returns a result or an error"),
            Err(e) => Some(Err(e)),
        }
    }

    fn next_unordered(&mut self) -> Option<Result<OutputRef<T::Output>>> {
        if let Some((_, Route::Failed(e))) = self.queue.pop_front() {
            return Some(Err(e));
        }
        let n = self.pool.workers.len();
        loop {
            if self.in_flight() == 0 {
                if !self.feeding {
                    return None;
                }
                if let Err(e) = self.wait_for_room().and_then(|()| self.feed()) {
                    return Some(Err(e));
                }
                if let Some((_, Route::Failed(e))) = self.queue.pop_front() {
                    return Some(Err(e));
                }
                continue;
            }
            // Whoever has a result ready, starting after the last one served.
            for k in 0..n {
                let w = (self.next_poll + k) % n;
                if self.pool.workers[w].live == 0 {
                    continue;
                }
                match self.take_from(w, Wait::Poll) {
                    Ok(Some(r)) => {
                        self.next_poll = w + 1;
                        return Some(r);
                    }
                    Ok(None) => {}
                    Err(e) => return Some(Err(e)),
                }
            }
            // Nothing ready: wait on the busiest worker, one slice at a time.
            let w = (0..n).max_by_key(|&w| self.pool.workers[w].live)?;
            match self.take_from(w, Wait::Slice) {
                Ok(Some(r)) => return Some(r),
                Ok(None) => {}
                Err(e) => return Some(Err(e)),
            }
            if let Err(e) = self.feed() {
                return Some(Err(e));
            }
        }
    }
}

/// How long [`Map::take_from`] waits.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Not at all.
    Poll,
    /// One slice.
    Slice,
    /// Until a result comes, feeding the rings between slices.
    Block,
}

/// Writes the prepared input into a reserved slot and publishes it as item `seq`; on error the
/// slot is given back unpublished.
fn write_input<F: Feed>(feed: &mut F, mut grant: Grant<'_>, seq: u64) -> Result<usize, String> {
    let n = feed.write(&mut grant)?;
    grant.truncate(n).set_seq(seq);
    grant.commit();
    Ok(n)
}

impl<T: Task, F: Feed> Iterator for Map<'_, T, F> {
    type Item = Result<OutputRef<T::Output>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.ended {
            return None;
        }
        if let Some(reason) = &self.pool.broken {
            self.ended = true;
            return Some(Err(Error::Broken(reason.clone())));
        }
        // Results that keep arriving never make a wait time out, and health checks run when
        // one does: look here too, every few items (the check itself reads the clock).
        self.since_check += 1;
        if self.since_check >= HEALTH_CHECK_ITEMS {
            self.since_check = 0;
            if let Err(e) = self.pool.check_health() {
                return Some(Err(self.broken(e)));
            }
        }
        if let Err(e) = self.feed() {
            return Some(Err(self.broken(e)));
        }
        let r = if self.ordered {
            self.next_ordered()
        } else {
            self.next_unordered()
        };
        if r.is_some() {
            self.stats.items += 1;
        }
        r
    }
}

impl<T: Task, F> Drop for Map<'_, T, F> {
    fn drop(&mut self) {
        // Results still to come belong to nobody now: the pool discards them as they arrive.
        for w in &mut self.pool.workers {
            w.abandon();
        }
    }
}

impl<T: Task> Pool<T> {
    /// Runs the task on every input and returns the results in input order.
    ///
    /// Inputs are serialized into the workers' input rings (one copy; give `&values` or values).
    /// Each result is an [`OutputRef`] read in place from the output ring, or the item's
    /// [`Error`] (a task error or panic, an input too large for a ring...) in its place. The
    /// call is lazy: inputs are handed out as the iterator is driven, never more than the rings
    /// hold.
    pub fn map<I>(&mut self, inputs: I) -> Map<'_, T, SerializeFeed<I::IntoIter, T::Input>>
    where
        I: IntoIterator,
        I::Item: Borrow<T::Input>,
    {
        Map::new(self, SerializeFeed::new(inputs.into_iter()), true)
    }

    /// [`Pool::map`] that yields results as workers finish them, not in input order (one slow
    /// chunk does not hold back the others' results). [`OutputRef::seq`] tells which is which.
    pub fn map_unordered<I>(
        &mut self,
        inputs: I,
    ) -> Map<'_, T, SerializeFeed<I::IntoIter, T::Input>>
    where
        I: IntoIterator,
        I::Item: Borrow<T::Input>,
    {
        Map::new(self, SerializeFeed::new(inputs.into_iter()), false)
    }

    /// The pool's shared region as samples of `S` (see [`crate::shared`]): what the program
    /// wrote there with [`Pool::shared_mut`]. An `Err` if the pool has no region.
    pub fn shared<S: Sample>(&self) -> Result<&[S]> {
        Ok(crate::shared::view(
            self.shared.as_deref().ok_or(Error::NoSharedRegion)?,
        ))
    }

    /// The pool's shared region as samples of `S`, to write chunks into before handing out
    /// [`crate::shared::Span`]s of them. Waits first until no worker reads the region (the
    /// items of a call dropped before its end are finished), so it can return an error of
    /// those items' workers (a death it could not repair, outputs still held...).
    pub fn shared_mut<S: Sample>(&mut self) -> Result<&mut [S]> {
        if self.shared.is_none() {
            return Err(Error::NoSharedRegion);
        }
        Map::new(
            &mut *self,
            SerializeFeed::<_, T::Input>::new(std::iter::empty::<T::Input>()),
            true,
        )
        .settle()?;
        let region = self.shared.as_mut().ok_or(Error::NoSharedRegion)?;
        Ok(crate::shared::view_mut(region))
    }

    /// Zero-copy input: for each length in `lens`, reserves room for that many samples in a
    /// worker's input ring and calls `fill(index, samples)` to write them there (read a
    /// digitizer or a file straight into shared memory). The worker receives a `Vec<E>` archive.
    /// Results come in input order, as with [`Pool::map`]; a `fill` error becomes that item's
    /// [`Error::Encode`].
    ///
    /// ```no_run
    /// use shmexec::{Pool, Samples};
    /// let task = shmexec::from_fn::<Vec<i16>, _, _>(|c| c.samples().iter().map(|&s| s as i64).sum::<i64>());
    /// let mut pool = Pool::builder().workers(2).build(task)?;
    /// let sums: Vec<i64> = pool
    ///     .map_in_place(vec![1 << 20; 8], |i, samples: &mut [i16]| {
    ///         samples.fill(i as i16); // a digitizer would DMA here
    ///         Ok(())
    ///     })
    ///     .map(|r| r.map(|s| s.to_native()))
    ///     .collect::<Result<_, _>>()?;
    /// # Ok::<(), shmexec::Error>(())
    /// ```
    pub fn map_in_place<E, L, G>(
        &mut self,
        lens: L,
        fill: G,
    ) -> Map<'_, T, FillFeed<L::IntoIter, G, E>>
    where
        T: Task<Input = Vec<E>>,
        E: Sample,
        L: IntoIterator<Item = usize>,
        G: FnMut(u64, &mut [E]) -> Result<(), BoxError>,
    {
        Map::new(self, FillFeed::new(lens.into_iter(), fill), true)
    }

    /// Runs the task on every input and calls `f` with each result as it comes (not in input
    /// order). Each [`OutputRef`] is dropped after `f` returns, so nothing piles up in the rings.
    pub fn for_each<I, G>(&mut self, inputs: I, mut f: G)
    where
        I: IntoIterator,
        I::Item: Borrow<T::Input>,
        G: FnMut(Result<OutputRef<T::Output>>),
    {
        for r in self.map_unordered(inputs) {
            f(r);
        }
    }
}
