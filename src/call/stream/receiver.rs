//! [`StreamReceiver`]: the receiving half of a stream.

use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use shmexec_shm::Waiter;

use super::shared::Shared;
use crate::error::Result;
use crate::output::OutputRef;
use crate::pool::Pool;
use crate::stats::{CallStats, PoolStats};
use crate::task::Task;

/// The receiving half of a stream; see [`Pool::stream`](crate::Pool::stream).
pub struct StreamReceiver<'p, T: Task> {
    shared: Arc<Shared<'p, T>>,
}

impl<'p, T: Task> StreamReceiver<'p, T> {
    pub(super) fn new(shared: Arc<Shared<'p, T>>) -> Self {
        StreamReceiver { shared }
    }
}

impl<T: Task> StreamReceiver<'_, T> {
    /// The next result, waiting for it: in input order for [`Pool::stream`](crate::Pool::stream), as they come for
    /// [`Pool::stream_unordered`](crate::Pool::stream_unordered). `None` once the sender is gone and every result was handed
    /// out, or after an error of the pool (which is handed out first).
    pub fn recv(&self) -> Option<Result<OutputRef<T::Output>>> {
        // Without a deadline the wait ends only with a result, the end or an error.
        match self.recv_until(None) {
            Poll::Ready(r) => r,
            Poll::Pending => unreachable!("a wait without a deadline returns a result"),
        }
    }

    /// [`recv`](Self::recv) that does not wait: `Poll::Pending` if no result is ready now.
    pub fn try_recv(&self) -> Poll<Option<Result<OutputRef<T::Output>>>> {
        self.recv_until(Some(Instant::now()))
    }

    /// [`recv`](Self::recv) that waits at most `timeout`: `Poll::Pending` if nothing came. A
    /// timeout past the clock's range waits as `recv` does.
    pub fn recv_timeout(&self, timeout: Duration) -> Poll<Option<Result<OutputRef<T::Output>>>> {
        self.recv_until(Instant::now().checked_add(timeout))
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
            if (closed || sup.all_given_up()) && call.pending(sup) == 0 {
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
        // A reading the sender took is of its own time, not of this hand-over.
        call.waited();
        let polled = call.tick(sup).and_then(|()| call.poll(sup));
        match polled {
            Ok(Some(r)) => Some(Some(r)),
            Ok(None) if closed && call.pending(sup) == 0 => {
                st.ended = true;
                Some(None)
            }
            // Nothing in flight and no worker left to run more: the stream cannot go on, and
            // says why, whether or not the sender is still there.
            Ok(None) if call.pending(sup) == 0 && sup.all_given_up() => {
                let why = sup.check_usable().err();
                st.ended = true;
                Some(why.map(Err))
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

impl<T: Task + 'static> StreamReceiver<'static, T> {
    /// Ends a stream made by [`Pool::into_stream`](crate::Pool::into_stream) and gives its pool
    /// back, for the next call or stream: results still to come are discarded by the pool as
    /// a dropped [`Map`](crate::Map)'s are (their workers skip what they have not started).
    /// Workers, rings and their processes carry on; nothing restarts.
    ///
    /// `Err(self)` while the sending half lives (drop or [`close`] it first), or for a stream
    /// that borrows its pool ([`Pool::stream`](crate::Pool::stream)).
    ///
    /// [`close`]: super::StreamSender::close
    ///
    /// ```no_run
    /// use shmexec::{Pool, Samples};
    ///
    /// let task = shmexec::from_fn::<Vec<u8>, _, _>(|c| c.samples().len() as u64);
    /// let pool = Pool::builder().workers(2).build(task)?;
    /// let (tx, rx) = pool.into_stream();
    /// tx.send(&vec![0u8; 1024])?;
    /// drop(tx);
    /// assert_eq!(rx.recv().unwrap()?.to_native(), 1024);
    /// let mut pool = rx.into_pool().ok().expect("the sender is gone");
    /// assert_eq!(pool.map(vec![vec![0u8; 8]]).next().unwrap()?.to_native(), 8);
    /// # Ok::<(), shmexec::Error>(())
    /// ```
    pub fn into_pool(self) -> std::result::Result<Pool<T>, Self> {
        // The two halves hold the only references: one left means the sender is gone, and
        // nobody can make another.
        if Arc::strong_count(&self.shared) != 1 {
            return Err(self);
        }
        let Some(pool) = self.shared.lock().take_pool() else {
            return Err(self);
        };
        Ok(pool)
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
