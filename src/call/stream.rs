//! Streams: a call whose inputs arrive live, with a sending half and a receiving half that can
//! live on different threads ([`Pool::stream`]).
//!
//! Both halves drive one engine (`call::engine::Call`) behind a mutex that is held only for
//! a step, never across a wait: [`StreamSender::send`] places the input if a worker has room,
//! [`StreamReceiver::recv`] hands out the next result as soon as it is ready, without waiting
//! for the next input. Each half waits on the pool's doorbell, which workers ring as they
//! finish an item and the sender rings as it places one, so a result that is ready reaches the
//! receiver within a wake-up, however bursty the source.
//!
//! ```no_run
//! use shmexec::{Pool, Samples};
//!
//! let task = shmexec::from_fn::<Vec<i16>, _, _>(|c| c.samples().iter().map(|&s| s as i64).sum::<i64>());
//! let mut pool = Pool::builder().workers(2).build(task)?; // before any thread starts
//! std::thread::scope(|s| {
//!     let (tx, rx) = pool.stream();
//!     s.spawn(move || {
//!         for i in 0..100 {
//!             let chunk = vec![i as i16; 1 << 19]; // a digitizer's chunk
//!             tx.send(&chunk).expect("the pool is broken");
//!         } // dropping the sender ends the stream after the last result
//!     });
//!     s.spawn(move || {
//!         while let Some(sum) = rx.recv() {
//!             println!("{}", sum.expect("item error").to_native());
//!         }
//!     });
//! });
//! # Ok::<(), shmexec::Error>(())
//! ```

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::task::Poll;
use std::time::{Duration, Instant};

use shmexec_shm::{WaitStrategy, Waiter};

use super::dispatch;
use super::engine::{Call, Placed};
use super::wait::{self, STREAM_SLICE};
use crate::archive::{
    Encode, Prewritten, Ref, Sample, encode_into, encode_into_at, encoded_len, encoded_len_at,
};
use crate::error::{BoxError, Error, Result};
use crate::output::OutputRef;
use crate::pool::{Pool, Supervisor};
use crate::stats::{CallStats, Doorbell};
use crate::task::Task;

/// The pool a stream drives: borrowed ([`Pool::stream`]) or owned ([`Pool::into_stream`]).
enum PoolRef<'p, T: Task> {
    Borrowed(&'p mut Pool<T>),
    Owned(Box<Pool<T>>),
}

struct State<'p, T: Task> {
    pool: PoolRef<'p, T>,
    call: Call,
    /// The sender is gone: the stream ends after the last result.
    closed: bool,
    /// The stream is over for the receiver (every result handed out, or a pool error), or the
    /// receiver is gone.
    ended: bool,
    /// The receiver is gone (a sender then gets `StreamClosed`, not the pool's error).
    receiver_gone: bool,
}

impl<T: Task> State<'_, T> {
    fn parts(&mut self) -> (&mut Supervisor<T>, &mut Call) {
        let sup = match &mut self.pool {
            PoolRef::Borrowed(p) => &mut p.rt,
            PoolRef::Owned(p) => &mut p.rt,
        };
        (sup, &mut self.call)
    }
}

impl<T: Task> Drop for State<'_, T> {
    fn drop(&mut self) {
        // Results still to come belong to nobody now: the pool discards them as they arrive.
        self.parts().0.abandon_all();
    }
}

struct Shared<'p, T: Task> {
    state: Mutex<State<'p, T>>,
    bell: Doorbell,
    wait: WaitStrategy,
    queue_bytes: u64,
}

impl<'p, T: Task> Shared<'p, T> {
    fn new(pool: PoolRef<'p, T>, ordered: bool) -> Arc<Self> {
        let sup = match &pool {
            PoolRef::Borrowed(p) => &p.rt,
            PoolRef::Owned(p) => &p.rt,
        };
        let call = Call::new(sup, ordered);
        let (bell, wait, queue_bytes) = (
            sup.doorbell(),
            sup.config().coordinator_wait,
            sup.config().queue_bytes,
        );
        Arc::new(Shared {
            state: Mutex::new(State {
                pool,
                call,
                closed: false,
                ended: false,
                receiver_gone: false,
            }),
            bell,
            wait,
            queue_bytes,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<'p, T>> {
        // Nothing under the lock panics half-way through a change of the state (the engine's
        // steps are all-or-nothing per item), so a poisoned lock holds consistent data.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Evaluates a waiter's condition on the state, if nobody else is using it; a state in use
    /// counts as "look again" (the other half is taking a step that may be what we wait for).
    fn check(
        &self,
        cond: impl FnOnce(&mut State<'p, T>) -> shmexec_shm::Result<bool>,
    ) -> shmexec_shm::Result<bool> {
        match self.state.try_lock() {
            Ok(mut st) => cond(&mut st),
            Err(TryLockError::Poisoned(p)) => cond(&mut p.into_inner()),
            Err(TryLockError::WouldBlock) => Ok(true),
        }
    }

    fn stats(&self) -> CallStats {
        let mut st = self.lock();
        let (sup, call) = st.parts();
        call.stats(sup)
    }

    fn worker_pids(&self) -> Vec<i32> {
        let mut st = self.lock();
        st.parts().0.slots.iter().map(|w| w.child.pid()).collect()
    }

    /// Waits on the doorbell until `cond` holds or `until` passes (`Ok(false)`).
    fn wait(
        &self,
        waiter: &mut Waiter,
        until: Option<Instant>,
        mut cond: impl FnMut(&mut State<'p, T>) -> shmexec_shm::Result<bool>,
    ) -> Result<bool> {
        let Some(signal) = self.bell.signal() else {
            return Err(Error::Broken("the pool's doorbell is missing".into()));
        };
        let slice = match until {
            Some(d) => STREAM_SLICE.min(d.saturating_duration_since(Instant::now())),
            None => STREAM_SLICE,
        };
        wait::until(signal, waiter, slice, || self.check(&mut cond))
    }
}

/// The submitting half of a stream; see [`Pool::stream`]. Dropping it (or [`close`]) ends the
/// stream once every result is handed out.
///
/// [`close`]: StreamSender::close
pub struct StreamSender<'p, T: Task> {
    shared: Arc<Shared<'p, T>>,
}

/// The receiving half of a stream; see [`Pool::stream`].
pub struct StreamReceiver<'p, T: Task> {
    shared: Arc<Shared<'p, T>>,
}

impl<T: Task> StreamSender<'_, T> {
    /// Hands `input` to a worker, waiting while every worker's queue is full (backpressure:
    /// the receiver is behind, or the workers are). Returns the input's sequence number (see
    /// [`OutputRef::seq`]); an input that cannot be run (too large for a ring, not
    /// serializable) still gets one, and its error arrives at the receiver in its place.
    ///
    /// An `Err` is the pool's (it cannot go on) or [`Error::StreamClosed`] (the receiver is
    /// gone).
    pub fn send(&self, input: &T::Input) -> Result<u64> {
        loop {
            if let Some(seq) =
                self.send_until(input, Some(Instant::now() + Duration::from_secs(3600)))?
            {
                return Ok(seq);
            }
        }
    }

    /// [`send`](Self::send) that does not wait: `Ok(None)` if no worker has room now.
    pub fn try_send(&self, input: &T::Input) -> Result<Option<u64>> {
        self.send_until(input, Some(Instant::now()))
    }

    /// [`send`](Self::send) that waits at most `timeout` for room: `Ok(None)` if none came.
    pub fn send_timeout(&self, input: &T::Input, timeout: Duration) -> Result<Option<u64>> {
        self.send_until(input, Some(Instant::now() + timeout))
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
                if let Placed::Item(seq) = call.place(sup, len, copies, write)? {
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
        let samples = Prewritten::<E>::new(n);
        let data = samples.data_len();
        let pair = (samples, Ref(meta));
        let len = encoded_len_at(&pair, data).map_err(|e| e.to_string());
        let mut fill = Some(fill);
        let mut write = |slot: &mut [u8]| -> Result<usize, String> {
            let fill = fill.take().ok_or("the slot was filled already")?;
            let samples: &mut [E] = bytemuck::try_cast_slice_mut(&mut slot[..data])
                .map_err(|e| format!("slot not aligned for the samples: {e:?}"))?;
            fill(samples).map_err(|e| e.to_string())?;
            encode_into_at(&pair, slot, data).map_err(|e| e.to_string())
        };
        loop {
            let until = Some(Instant::now() + Duration::from_secs(3600));
            if let Some(seq) = self.place_until(len.clone(), false, &mut write, until)? {
                return Ok(seq);
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

    /// Process ids of the pool's workers now (they change when a dead worker is replaced).
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

impl<T: Task> StreamReceiver<'_, T> {
    /// The next result, waiting for it: in input order for [`Pool::stream`], as they come for
    /// [`Pool::stream_unordered`]. `None` once the sender is gone and every result was handed
    /// out, or after an error of the pool (which is handed out first).
    pub fn recv(&self) -> Option<Result<OutputRef<T::Output>>> {
        loop {
            if let Poll::Ready(r) =
                self.recv_until(Some(Instant::now() + Duration::from_secs(3600)))
            {
                return r;
            }
        }
    }

    /// [`recv`](Self::recv) that does not wait: `Poll::Pending` if no result is ready now.
    pub fn try_recv(&self) -> Poll<Option<Result<OutputRef<T::Output>>>> {
        self.recv_until(Some(Instant::now()))
    }

    /// [`recv`](Self::recv) that waits at most `timeout`: `Poll::Pending` if nothing came.
    pub fn recv_timeout(&self, timeout: Duration) -> Poll<Option<Result<OutputRef<T::Output>>>> {
        self.recv_until(Some(Instant::now() + timeout))
    }

    fn recv_until(&self, deadline: Option<Instant>) -> Poll<Option<Result<OutputRef<T::Output>>>> {
        let shared = &*self.shared;
        let mut waiter = Waiter::new(shared.wait);
        loop {
            if let Some(r) = self.step() {
                return Poll::Ready(r);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Poll::Pending;
            }
            let woke = self.wait_ready(&mut waiter, deadline);
            let stalled = woke.and_then(|woke| {
                if woke {
                    return Ok(None);
                }
                let mut st = shared.lock();
                let (sup, call) = st.parts();
                call.stalled(sup, None, false)
            });
            match stalled {
                Ok(None) => {}
                Ok(Some(e)) => return Poll::Ready(Some(Err(e))),
                Err(e) => {
                    shared.lock().ended = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    /// Waits (one slice at most, or until `deadline`) until a result is ready, the stream ended
    /// or the sender closed it with nothing left: whatever [`recv`](Self::recv) would not wait
    /// for. `Ok(false)` if none came. For adapters (async) that wait on a thread of their own.
    pub(crate) fn wait_ready(
        &self,
        waiter: &mut Waiter,
        deadline: Option<Instant>,
    ) -> Result<bool> {
        self.shared.wait(waiter, deadline, |st| {
            if st.ended {
                return Ok(true);
            }
            let closed = st.closed;
            let (sup, call) = st.parts();
            if closed && call.pending(sup) == 0 {
                return Ok(true);
            }
            call.ready(sup, None)
        })
    }

    /// One step: the next result if it is ready, the end, or a pool error (`Some(_)`); `None`
    /// when the caller should wait.
    fn step(&self) -> Option<Option<Result<OutputRef<T::Output>>>> {
        let mut st = self.shared.lock();
        if st.ended {
            return Some(None);
        }
        let closed = st.closed;
        let (sup, call) = st.parts();
        let polled = call.tick(sup).and_then(|()| call.poll(sup));
        match polled {
            Ok(Some(r)) => Some(Some(r)),
            Ok(None) if closed && call.pending(sup) == 0 => {
                st.ended = true;
                Some(None)
            }
            Ok(None) => None,
            Err(e) => {
                st.ended = true;
                Some(Some(Err(e)))
            }
        }
    }

    /// Figures of this stream so far.
    pub fn stats(&self) -> CallStats {
        self.shared.stats()
    }

    /// Process ids of the pool's workers now (they change when a dead worker is replaced).
    pub fn worker_pids(&self) -> Vec<i32> {
        self.shared.worker_pids()
    }
}

impl<T: Task> Iterator for StreamReceiver<'_, T> {
    type Item = Result<OutputRef<T::Output>>;

    fn next(&mut self) -> Option<Self::Item> {
        self.recv()
    }
}

impl<T: Task> Drop for StreamReceiver<'_, T> {
    fn drop(&mut self) {
        // A sender waiting for room would wait for nobody: it gets `StreamClosed`.
        let mut st = self.shared.lock();
        st.ended = true;
        st.receiver_gone = true;
        drop(st);
        self.shared.bell.ring();
    }
}

impl<T: Task> Pool<T> {
    /// Starts a stream: a sending and a receiving half that may live on different threads
    /// (use [`std::thread::scope`], or [`Pool::into_stream`] for halves that own the pool).
    /// Results come in input order, each as soon as it and those before it are ready; see
    /// [`crate::call::stream`] for an example.
    pub fn stream(&mut self) -> (StreamSender<'_, T>, StreamReceiver<'_, T>) {
        halves(Shared::new(PoolRef::Borrowed(self), true))
    }

    /// [`Pool::stream`] whose results come as workers finish them, not in input order.
    pub fn stream_unordered(&mut self) -> (StreamSender<'_, T>, StreamReceiver<'_, T>) {
        halves(Shared::new(PoolRef::Borrowed(self), false))
    }

    /// [`Pool::stream`] whose halves own the pool (`'static`, for a service's long-lived
    /// threads or tasks). The pool shuts down when both halves are dropped.
    pub fn into_stream(self) -> (StreamSender<'static, T>, StreamReceiver<'static, T>)
    where
        T: 'static,
    {
        halves(Shared::new(PoolRef::Owned(Box::new(self)), true))
    }
}

fn halves<'p, T: Task>(shared: Arc<Shared<'p, T>>) -> (StreamSender<'p, T>, StreamReceiver<'p, T>) {
    (
        StreamSender {
            shared: Arc::clone(&shared),
        },
        StreamReceiver { shared },
    )
}
