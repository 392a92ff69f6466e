//! What a stream's two halves share: the pool (borrowed or owned), the call's engine, and the
//! two flags that end the stream, behind a mutex held only for a step.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::Instant;

use shmexec_shm::{WaitStrategy, Waiter};

use crate::call::engine::Call;
use crate::call::wait::{self, STREAM_SLICE};
use crate::error::{Error, Result};
use crate::pool::{Pool, Supervisor, WorkerSlot};
use crate::stats::{CallStats, Doorbell, PoolStats};
use crate::task::Task;

/// The pool a stream drives: borrowed ([`Pool::stream`]) or owned ([`Pool::into_stream`]).
pub(super) enum PoolRef<'p, T: Task> {
    Borrowed(&'p mut Pool<T>),
    Owned(Box<Pool<T>>),
    /// Given back by [`StreamReceiver::into_pool`](super::StreamReceiver::into_pool), as the
    /// state is dropped: nothing reads the state after that.
    Taken,
}

pub(super) struct State<'p, T: Task> {
    pub(super) pool: PoolRef<'p, T>,
    pub(super) call: Call,
    /// The sender is gone: the stream ends after the last result.
    pub(super) closed: bool,
    /// The stream is over for the receiver (every result handed out, or a pool error), or the
    /// receiver is gone.
    pub(super) ended: bool,
    /// The receiver is gone (a sender then gets `StreamClosed`, not the pool's error).
    pub(super) receiver_gone: bool,
}

impl<T: Task> State<'_, T> {
    pub(super) fn parts(&mut self) -> (&mut Supervisor<T>, &mut Call) {
        let sup = match &mut self.pool {
            PoolRef::Borrowed(p) => &mut p.rt,
            PoolRef::Owned(p) => &mut p.rt,
            PoolRef::Taken => unreachable!("the pool is taken only as the state is dropped"),
        };
        (sup, &mut self.call)
    }

    /// The pool of an owned stream, its call's results still to come discarded as a dropped
    /// `Map`'s are; `None` for a borrowed one.
    pub(super) fn take_pool(&mut self) -> Option<Pool<T>> {
        if !matches!(self.pool, PoolRef::Owned(_)) {
            return None;
        }
        self.parts().0.abandon_all();
        match std::mem::replace(&mut self.pool, PoolRef::Taken) {
            PoolRef::Owned(pool) => Some(*pool),
            _ => unreachable!("checked above"),
        }
    }
}

impl<T: Task> Drop for State<'_, T> {
    fn drop(&mut self) {
        if matches!(self.pool, PoolRef::Taken) {
            return;
        }
        // Results still to come belong to nobody now: the pool discards them as they arrive.
        self.parts().0.abandon_all();
    }
}

pub(super) struct Shared<'p, T: Task> {
    pub(super) state: Mutex<State<'p, T>>,
    pub(super) bell: Doorbell,
    pub(super) wait: WaitStrategy,
    pub(super) queue_bytes: u64,
}

impl<'p, T: Task> Shared<'p, T> {
    pub(super) fn new(pool: PoolRef<'p, T>, ordered: bool) -> Arc<Self> {
        let sup = match &pool {
            PoolRef::Borrowed(p) => &p.rt,
            PoolRef::Owned(p) => &p.rt,
            PoolRef::Taken => unreachable!("a stream starts with its pool"),
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

    pub(super) fn lock(&self) -> MutexGuard<'_, State<'p, T>> {
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

    pub(super) fn stats(&self) -> CallStats {
        let mut st = self.lock();
        let (sup, call) = st.parts();
        call.stats(sup)
    }

    pub(super) fn pool_stats(&self) -> PoolStats {
        self.lock().parts().0.stats()
    }

    pub(super) fn worker_pids(&self) -> Vec<i32> {
        let mut st = self.lock();
        st.parts().0.slots.iter().map(WorkerSlot::pid).collect()
    }

    /// Waits on the doorbell until `cond` holds or `until` passes (`Ok(false)`).
    pub(super) fn wait(
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
