//! [`StreamSender`]: the submitting half of a stream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shmexec_shm::Waiter;

use super::shared::Shared;
use crate::archive::{
    Array, Encode, Prewritten, Record, Records, Ref, Sample, encode_into, encode_into_at,
    encoded_len, encoded_len_at,
};
use crate::call::dispatch;
use crate::call::engine::Placed;
use crate::error::{BoxError, Error, Result};
use crate::stats::{CallStats, PoolStats};
use crate::task::Task;

/// The submitting half of a stream; see [`Pool::stream`](crate::Pool::stream). Dropping it (or [`close`]) ends the
/// stream once every result is handed out.
///
/// [`close`]: StreamSender::close
pub struct StreamSender<'p, T: Task> {
    shared: Arc<Shared<'p, T>>,
}

impl<'p, T: Task> StreamSender<'p, T> {
    pub(super) fn new(shared: Arc<Shared<'p, T>>) -> Self {
        StreamSender { shared }
    }
}

impl<T: Task> StreamSender<'_, T> {
    /// Hands `input` to a worker, waiting while every worker's queue is full (backpressure:
    /// the receiver is behind, or the workers are). Returns the input's sequence number (see
    /// [`OutputRef::seq`](crate::OutputRef::seq)); an input that cannot be run (too large for a ring, not
    /// serializable) still gets one, and its error arrives at the receiver in its place.
    ///
    /// An `Err` is the pool's (it cannot go on) or [`Error::StreamClosed`] (the receiver is
    /// gone).
    pub fn send(&self, input: &T::Input) -> Result<u64> {
        // Without a deadline the wait ends only with a placement or an error.
        let seq = self.send_until(input, None)?;
        Ok(seq.expect("a send without a deadline places its input"))
    }

    /// [`send`](Self::send) that does not wait: `Ok(None)` if no worker has room now.
    pub fn try_send(&self, input: &T::Input) -> Result<Option<u64>> {
        self.send_until(input, Some(Instant::now()))
    }

    /// [`send`](Self::send) that waits at most `timeout` for room: `Ok(None)` if none came.
    /// A timeout past the clock's range waits as `send` does.
    pub fn send_timeout(&self, input: &T::Input, timeout: Duration) -> Result<Option<u64>> {
        self.send_until(input, Instant::now().checked_add(timeout))
    }

    fn send_until(&self, input: &T::Input, deadline: Option<Instant>) -> Result<Option<u64>> {
        let mut write = |slot: &mut [u8]| encode_into(input, slot).map_err(|e| e.to_string());
        self.place_until(Self::input_len(input), true, &mut write, deadline)
    }

    /// Places one input of archive size `len` (`Err`: it cannot be written, and its error
    /// takes its place), written by `write`, waiting for room until `deadline`.
    fn place_until(
        &self,
        len: Result<usize, String>,
        copies: bool,
        write: &mut dyn FnMut(&mut [u8]) -> Result<usize, String>,
        deadline: Option<Instant>,
    ) -> Result<Option<u64>> {
        let shared = &*self.shared;
        let mut waiter = Waiter::new(shared.wait);
        loop {
            {
                let mut st = shared.lock();
                if let Some(reason) = &st.parts().0.broken {
                    return Err(Error::Broken(reason.clone()));
                }
                if st.receiver_gone || st.ended {
                    // A receiver that ended because every worker was given up: that is why.
                    st.parts().0.check_usable()?;
                    return Err(Error::StreamClosed);
                }
                let (sup, call) = st.parts();
                // Every few steps, like the receiver's: the check reads the clock.
                call.tick(sup)?;
                let len = match &len {
                    Ok(len) => *len,
                    Err(reason) => {
                        let seq = call.fail_input(sup, reason.clone());
                        drop(st);
                        shared.bell.ring();
                        return Ok(Some(seq));
                    }
                };
                if let Placed::Item { seq, .. } = call.place(sup, len, copies, write)? {
                    drop(st);
                    // SYNC POINT with the receiver's `wait_ready`: the item is in the call's
                    // state (stored under the mutex, released above) before this notify; the
                    // receiver may be asleep with nothing in flight.
                    shared.bell.ring();
                    return Ok(Some(seq));
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
            let Ok(len) = len else {
                unreachable!("handled above")
            };
            self.wait_room(&mut waiter, len, deadline)?;
        }
    }

    /// Zero-copy input for a live source: reserves a slot for `n` samples plus `meta` (a chunk's
    /// time range, its timestamp) in a worker's input ring, lets `fill` write the samples there
    /// (a digitizer's read, a file's), and publishes it. The task receives a `(Vec<E>, M)`
    /// archive: the samples in place, and the metadata. Waits for room as
    /// [`send`](Self::send) does; `fill` runs once a slot is reserved, while the stream's
    /// state is held (the receiver hands out nothing meanwhile), so keep it to the write
    /// itself. A `fill` error is that item's [`Error::Encode`].
    ///
    /// ```no_run
    /// use shmexec::{Pool, Samples};
    /// // Each chunk: samples, and the (start, end) of its time range in ns.
    /// let task = shmexec::from_fn::<(Vec<i16>, (u64, u64)), _, _>(|c| {
    ///     (c.1.0.to_native(), c.0.samples().len() as u64)
    /// });
    /// let mut pool = Pool::builder().workers(2).build(task)?;
    /// let (tx, rx) = pool.stream();
    /// tx.send_in_place(1 << 20, &(0u64, 1_000_000u64), |samples: &mut [i16]| {
    ///     samples.fill(7); // the digitizer writes here
    ///     Ok(())
    /// })?;
    /// drop(tx);
    /// let (start, n) = rx.recv().unwrap()?.deserialize()?;
    /// # Ok::<(), shmexec::Error>(())
    /// ```
    pub fn send_in_place<E, M>(
        &self,
        n: usize,
        meta: &M,
        fill: impl FnOnce(&mut [E]) -> Result<(), BoxError>,
    ) -> Result<u64>
    where
        T: Task<Input = (Vec<E>, M)>,
        E: Sample,
        M: Encode,
    {
        let seq = self.send_array_in_place::<Vec<E>, M>(n, meta, fill, None)?;
        Ok(seq.expect("a send without a deadline places its input"))
    }

    /// [`send_in_place`](Self::send_in_place) that does not wait: `Ok(None)` if no worker has
    /// room now (`fill` did not run).
    pub fn try_send_in_place<E, M>(
        &self,
        n: usize,
        meta: &M,
        fill: impl FnOnce(&mut [E]) -> Result<(), BoxError>,
    ) -> Result<Option<u64>>
    where
        T: Task<Input = (Vec<E>, M)>,
        E: Sample,
        M: Encode,
    {
        self.send_array_in_place::<Vec<E>, M>(n, meta, fill, Some(Instant::now()))
    }

    /// [`send_in_place`](Self::send_in_place) for a chunk of `n` [records](crate::archive::records):
    /// `fill` writes them in the input ring, and the task receives a `(Records<R>, M)` archive
    /// whose records it reads in place.
    ///
    /// ```no_run
    /// use bytemuck::{Pod, Zeroable};
    /// use shmexec::{Pool, Records};
    ///
    /// #[derive(Clone, Copy, Pod, Zeroable)]
    /// #[repr(C, packed)]
    /// struct RawRecord { time: i64, length: i32, channel: i16, data: [i16; 5] }
    ///
    /// // Each chunk: records, and the (start, end) of its time range in ns.
    /// let task = shmexec::from_fn::<(Records<RawRecord>, (i64, i64)), _, _>(|c| {
    ///     // A packed field is copied out before it is read (no reference into a packed struct).
    ///     c.0.records().iter().map(|r| { r.data }.iter().map(|&s| s as i64).sum::<i64>()).sum::<i64>()
    /// });
    /// let mut pool = Pool::builder().workers(2).build(task)?;
    /// let (tx, rx) = pool.stream();
    /// tx.send_records_in_place(1000, &(0i64, 1_000_000i64), |records: &mut [RawRecord]| {
    ///     for (i, r) in records.iter_mut().enumerate() {
    ///         *r = RawRecord { time: i as i64 * 1000, length: 5, channel: 0, data: [1; 5] };
    ///     }
    ///     Ok(())
    /// })?;
    /// drop(tx);
    /// assert_eq!(rx.recv().unwrap()?.to_native(), 5000);
    /// # Ok::<(), shmexec::Error>(())
    /// ```
    pub fn send_records_in_place<R, M>(
        &self,
        n: usize,
        meta: &M,
        fill: impl FnOnce(&mut [R]) -> Result<(), BoxError>,
    ) -> Result<u64>
    where
        T: Task<Input = (Records<R>, M)>,
        R: Record,
        M: Encode,
    {
        let seq = self.send_array_in_place::<Records<R>, M>(n, meta, fill, None)?;
        Ok(seq.expect("a send without a deadline places its input"))
    }

    /// Places an archive of `(V, M)` whose `n` elements `fill` writes in the slot, waiting for
    /// room until `deadline` (`Ok(None)`: none came, and `fill` did not run).
    fn send_array_in_place<V: Array, M: Encode>(
        &self,
        n: usize,
        meta: &M,
        fill: impl FnOnce(&mut [V::Elem]) -> Result<(), BoxError>,
        deadline: Option<Instant>,
    ) -> Result<Option<u64>> {
        let elements = match Prewritten::<V>::new(n) {
            Ok(elements) => elements,
            Err(e) => {
                let reason = format!("an in-place chunk of {n} {}: {e}", V::NOUN);
                let mut refuse = |_: &mut [u8]| -> Result<usize, String> { Err("unused".into()) };
                return self.place_until(Err(reason), false, &mut refuse, None);
            }
        };
        let data = elements.data_len();
        let pair = (elements, Ref(meta));
        let len = encoded_len_at(&pair, data).map_err(|e| e.to_string());
        let mut fill = Some(fill);
        let mut write = |slot: &mut [u8]| -> Result<usize, String> {
            let fill = fill.take().ok_or("the slot was filled already")?;
            fill(pair.0.elements(slot)?).map_err(|e| e.to_string())?;
            encode_into_at(&pair, slot, data).map_err(|e| e.to_string())
        };
        self.place_until(len, false, &mut write, deadline)
    }

    /// Waits at most `timeout` until a worker may have room for an input of `len` archive bytes,
    /// or the stream ended: `Ok(true)`, or `Ok(false)` when the time is up. For callers that
    /// must not hold a lock while they wait and then place with a `try_` method (a language
    /// binding releases its interpreter's lock here); another sender may take the room first,
    /// so the `try_` call can still find none.
    ///
    /// With nothing of this stream in flight, a worker whose output ring is full of results
    /// the caller holds (an earlier call's, kept) has no room to give until they are dropped:
    /// that is [`Error::OutputsHeld`], not a wait for ever.
    pub fn wait_for_room(&self, len: usize, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now().checked_add(timeout);
        let mut waiter = Waiter::new(self.shared.wait);
        loop {
            if self.wait_room(&mut waiter, len, deadline)? {
                return Ok(true);
            }
            {
                let mut st = self.shared.lock();
                let (sup, call) = st.parts();
                if call.pending(sup) == 0
                    && let Some(w) = sup.slots.iter().position(|s| s.rx.blocked_by_held())
                {
                    let (held, bytes) = sup.slots[w].rx.held();
                    return Err(Error::OutputsHeld {
                        worker: w,
                        held,
                        bytes,
                    });
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
        }
    }

    /// Waits (one slice at most, or until `deadline`) until a worker has room for an input of
    /// `len` archive bytes or the stream ended; `Ok(false)` if neither came. For adapters
    /// (async) that wait on a thread of their own.
    pub(crate) fn wait_room(
        &self,
        waiter: &mut Waiter,
        len: usize,
        deadline: Option<Instant>,
    ) -> Result<bool> {
        let limit = self.shared.queue_bytes;
        self.shared.wait(waiter, deadline, |st| {
            if st.ended {
                return Ok(true);
            }
            dispatch::has_room(&mut st.parts().0.slots, len, limit)
        })
    }

    /// The archive size of `input` (`Err`: it cannot be serialized; `send` reports that to the
    /// receiver in the input's place).
    pub(crate) fn input_len(input: &T::Input) -> Result<usize, String> {
        encoded_len(input).map_err(|e| e.to_string())
    }

    /// Ends the stream: the receiver gets every result still to come, then `None`.
    pub fn close(self) {}

    /// Figures of this stream so far.
    pub fn stats(&self) -> CallStats {
        self.shared.stats()
    }

    /// Counters of every worker and of the coordinator since the pool started, as
    /// [`Pool::stats`](crate::Pool::stats) gives them.
    pub fn pool_stats(&self) -> PoolStats {
        self.shared.pool_stats()
    }

    /// Process ids of the pool's workers now (they change when a dead worker is replaced; 0
    /// for one that has no process now, see [`Pool::pids`](crate::Pool::pids)).
    pub fn worker_pids(&self) -> Vec<i32> {
        self.shared.worker_pids()
    }
}

impl<T: Task> Drop for StreamSender<'_, T> {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.bell.ring();
    }
}
