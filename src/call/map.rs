//! [`Map`]: a call as a blocking iterator, and the `Pool` methods that make one.
//!
//! Each `next()` places every input that finds room, hands out the next result if it is ready,
//! and otherwise waits (spin, then park on the pool's doorbell) until a result comes or a
//! worker has room for the input the iterator holds. Memory is bounded by the rings: an input
//! that fits nowhere stays in the caller's iterator until a worker frees room.

use std::borrow::Borrow;

use super::engine::Call;
use super::feed::{Feed, FillFeed, SerializeFeed, SliceFeed};
use super::source::Source;
use super::wait::{self, MAP_SLICE};
use crate::archive::{Record, Records, Sample};
use crate::error::{BoxError, Error, Result};
use crate::output::OutputRef;
use crate::pool::{Pool, Supervisor};
use crate::stats::{CallStats, Doorbell};
use crate::task::Task;

/// The iterator of one call: results in input order ([`Pool::map`]) or as they come
/// ([`Pool::map_unordered`]). Dropping it midway is fine: results still in flight are discarded
/// by the pool.
pub struct Map<'a, T: Task> {
    pool: &'a mut Pool<T>,
    source: Source<'a>,
    call: Call,
    /// The pool's doorbell, kept so that a wait costs no reference count.
    bell: Doorbell,
    ended: bool,
}

impl<'a, T: Task> Map<'a, T> {
    fn new(pool: &'a mut Pool<T>, feed: Box<dyn Feed + 'a>, ordered: bool) -> Self {
        let call = Call::new(&pool.rt, ordered);
        let bell = pool.rt.doorbell();
        Map {
            pool,
            source: Source::new(feed),
            call,
            bell,
            ended: false,
        }
    }

    /// Figures of this call so far.
    pub fn stats(&self) -> CallStats {
        self.call.stats(&self.pool.rt)
    }

    /// Process ids of the pool's workers now (they change when a dead worker is replaced; 0
    /// for one that has no process now, see [`Pool::pids`](crate::Pool::pids)).
    pub fn worker_pids(&self) -> Vec<i32> {
        self.pool.pids()
    }

    /// The next result, waiting for it; `Ok(None)` when the call is done.
    fn step(&mut self) -> Result<Option<Result<OutputRef<T::Output>>>> {
        // The caller ran since the last step: no clock reading of before counts as now.
        self.call.waited();
        self.call.tick(&mut self.pool.rt)?;
        loop {
            self.source.pump(&mut self.call, &mut self.pool.rt)?;
            let sup: &mut Supervisor<T> = &mut self.pool.rt;
            if let Some(r) = self.call.poll(sup)? {
                return Ok(Some(r));
            }
            if !self.source.feeding() && self.call.pending(sup) == 0 {
                return self.source.take_refused().map_or(Ok(None), Err);
            }
            let (call, prepared) = (&self.call, self.source.prepared());
            let woke = wait_slice(sup, &self.bell, |sup| call.ready(sup, prepared))?;
            self.call.waited();
            if woke {
                // Woken for room while the result it waits for is late (its worker may be
                // dead): such wake-ups can go on for as long as the other workers keep up, so
                // they count toward the health check too.
                self.call.tick(&mut self.pool.rt)?;
            } else {
                let unplaced = self.source.unplaced();
                if let Some(e) = self.call.stalled(&mut self.pool.rt, unplaced, true)? {
                    return Ok(Some(Err(e)));
                }
            }
        }
    }
}

impl<T: Task> Iterator for Map<'_, T> {
    type Item = Result<OutputRef<T::Output>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.ended {
            return None;
        }
        if let Some(reason) = &self.pool.rt.broken {
            self.ended = true;
            return Some(Err(Error::Broken(reason.clone())));
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

impl<T: Task> Drop for Map<'_, T> {
    fn drop(&mut self) {
        // Results still to come belong to nobody now: the pool discards them as they arrive.
        self.pool.rt.abandon_all();
    }
}

/// Waits one slice on the pool's doorbell, with the pool's own waiter, until `ready` holds
/// (`Ok(true)`) or the slice ends (`Ok(false)`).
fn wait_slice<T: Task>(
    sup: &mut Supervisor<T>,
    bell: &Doorbell,
    mut ready: impl FnMut(&mut Supervisor<T>) -> shmexec_shm::Result<bool>,
) -> Result<bool> {
    let Some(signal) = bell.signal() else {
        return Err(Error::Broken("the pool's doorbell is missing".into()));
    };
    let mut waiter = std::mem::take(&mut sup.doorbell_waiter);
    let woke = wait::until(signal, &mut waiter, MAP_SLICE, || ready(sup));
    sup.doorbell_waiter = waiter;
    woke
}

/// Waits until every item handed to a worker by an abandoned call is answered, discarding the
/// results.
pub(crate) fn settle<T: Task>(sup: &mut Supervisor<T>) -> Result<()> {
    let mut call = Call::new(sup, true);
    while sup.unanswered() > 0 {
        call.poll(sup)?;
        if sup.unanswered() == 0 {
            break;
        }
        let woke = wait_slice(sup, &sup.doorbell(), |sup| call.ready(sup, None));
        if !woke? && let Some(e) = call.stalled(sup, Some(0), true)? {
            return Err(e);
        }
    }
    Ok(())
}

impl<T: Task> Pool<T> {
    /// Runs the task on every input and returns the results in input order.
    ///
    /// Inputs are serialized into the workers' input rings (one copy; give `&values` or values).
    /// Each result is an [`OutputRef`] read in place from the output ring, or the item's
    /// [`Error`] (a task error or panic, an input too large for a ring...) in its place. The
    /// call is lazy: inputs are handed out as the iterator is driven, never more than the rings
    /// hold.
    pub fn map<'a, I>(&'a mut self, inputs: I) -> Map<'a, T>
    where
        I: IntoIterator,
        I::IntoIter: 'a,
        I::Item: Borrow<T::Input>,
    {
        let feed = SerializeFeed::<_, T::Input>::new(inputs.into_iter());
        Map::new(self, Box::new(feed), true)
    }

    /// [`Pool::map`] that yields results as workers finish them, not in input order (one slow
    /// chunk does not hold back the others' results). [`OutputRef::seq`] tells which is which.
    pub fn map_unordered<'a, I>(&'a mut self, inputs: I) -> Map<'a, T>
    where
        I: IntoIterator,
        I::IntoIter: 'a,
        I::Item: Borrow<T::Input>,
    {
        let feed = SerializeFeed::<_, T::Input>::new(inputs.into_iter());
        Map::new(self, Box::new(feed), false)
    }

    /// The pool's shared region as samples of `S` (see [`crate::shared`]): what the program
    /// wrote there with [`Pool::shared_mut`]. An `Err` if the pool has no region.
    pub fn shared<S: Sample>(&self) -> Result<&[S]> {
        Ok(crate::shared::view(
            self.rt.shared.as_deref().ok_or(Error::NoSharedRegion)?,
        ))
    }

    /// The memory of the pool's shared region, for a language binding that lends it to arrays
    /// of its own (Python's numpy): an `Arc`, so the mapping outlives the pool for as long as
    /// such an array does. The segment gives out only its address; a write through it while a
    /// worker reads those bytes is the writer's own `unsafe` promise to break, which
    /// [`Pool::shared_mut`] keeps for Rust callers.
    #[doc(hidden)]
    pub fn shared_segment(&self) -> Option<std::sync::Arc<shmexec_shm::Segment>> {
        self.rt.shared.clone()
    }

    /// The pool's shared region as samples of `S`, to write chunks into before handing out
    /// [`crate::shared::Span`]s of them. Waits first until no worker reads the region (the
    /// items of a call dropped before its end are finished), so it can return an error of
    /// those items' workers (a death it could not repair, outputs still held...).
    pub fn shared_mut<S: Sample>(&mut self) -> Result<&mut [S]> {
        if self.rt.shared.is_none() {
            return Err(Error::NoSharedRegion);
        }
        settle(&mut self.rt)?;
        let region = self.rt.shared.as_mut().ok_or(Error::NoSharedRegion)?;
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
    pub fn map_in_place<'a, E, L, G>(&'a mut self, lens: L, fill: G) -> Map<'a, T>
    where
        T: Task<Input = Vec<E>>,
        E: Sample,
        L: IntoIterator<Item = usize>,
        L::IntoIter: 'a,
        G: FnMut(u64, &mut [E]) -> Result<(), BoxError> + 'a,
    {
        let feed = FillFeed::<_, _, Vec<E>>::new(lens.into_iter(), fill);
        Map::new(self, Box::new(feed), true)
    }

    /// [`Pool::map_in_place`] for chunks of [records](crate::archive::records): for each length
    /// in `lens`, `fill(index, records)` writes that many records straight into a worker's
    /// input ring, and the worker receives a [`Records<R>`] archive that it reads in place.
    ///
    /// ```no_run
    /// use bytemuck::{Pod, Zeroable};
    /// use shmexec::{Pool, Records};
    ///
    /// #[derive(Clone, Copy, Pod, Zeroable)]
    /// #[repr(C)]
    /// struct Hit { time: i64, area: f32, channel: i16, _pad: i16 }
    ///
    /// let task = shmexec::from_fn::<Records<Hit>, _, _>(|c| {
    ///     c.records().iter().map(|h| h.area as f64).sum::<f64>()
    /// });
    /// let mut pool = Pool::builder().workers(2).build(task)?;
    /// for area in pool.map_records_in_place(vec![10_000; 8], |i, hits: &mut [Hit]| {
    ///     hits.fill(Hit { time: i as i64, area: 0.5, channel: 3, _pad: 0 });
    ///     Ok(())
    /// }) {
    ///     assert_eq!(area?.to_native(), 5000.0);
    /// }
    /// # Ok::<(), shmexec::Error>(())
    /// ```
    pub fn map_records_in_place<'a, R, L, G>(&'a mut self, lens: L, fill: G) -> Map<'a, T>
    where
        T: Task<Input = Records<R>>,
        R: Record,
        L: IntoIterator<Item = usize>,
        L::IntoIter: 'a,
        G: FnMut(u64, &mut [R]) -> Result<(), BoxError> + 'a,
    {
        let feed = FillFeed::<_, _, Records<R>>::new(lens.into_iter(), fill);
        Map::new(self, Box::new(feed), true)
    }

    /// [`Pool::map`] over slices of memory the caller already holds (a file read into one
    /// buffer, a digitizer's DMA area): each slice is copied once into a worker's input ring
    /// as the `Vec<E>` archive the task reads, with no `Vec` made per chunk.
    ///
    /// ```no_run
    /// use shmexec::{Pool, Samples};
    /// let task = shmexec::from_fn::<Vec<i16>, _, _>(|c| c.samples().iter().map(|&s| s as i64).sum::<i64>());
    /// let mut pool = Pool::builder().workers(2).build(task)?;
    /// let file: Vec<i16> = vec![3; 8 << 20]; // read from disk, say
    /// for sum in pool.map_slices(file.chunks(1 << 20)) {
    ///     assert_eq!(sum?.to_native(), 3 << 20);
    /// }
    /// # Ok::<(), shmexec::Error>(())
    /// ```
    pub fn map_slices<'a, E, I>(&'a mut self, slices: I) -> Map<'a, T>
    where
        T: Task<Input = Vec<E>>,
        E: Sample,
        I: IntoIterator<Item = &'a [E]>,
        I::IntoIter: 'a,
    {
        let feed = SliceFeed::<_, Vec<E>>::new(slices.into_iter());
        Map::new(self, Box::new(feed), true)
    }

    /// [`Pool::map_slices`] for [records](crate::archive::records): each slice of the caller's
    /// records is copied once into a worker's input ring as the [`Records<R>`] archive the task
    /// reads (a run's records read into one buffer, cut into chunks).
    pub fn map_record_slices<'a, R, I>(&'a mut self, slices: I) -> Map<'a, T>
    where
        T: Task<Input = Records<R>>,
        R: Record,
        I: IntoIterator<Item = &'a [R]>,
        I::IntoIter: 'a,
    {
        let feed = SliceFeed::<_, Records<R>>::new(slices.into_iter());
        Map::new(self, Box::new(feed), true)
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
