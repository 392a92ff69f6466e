//! Async adapters over a stream (feature `async`): [`AsyncSender`], a [`Sink`] of owned inputs,
//! and [`AsyncReceiver`], a [`Stream`] of results, for tokio or any other executor. Neither
//! blocks the thread that polls it: each half steps the stream without waiting
//! ([`StreamSender::try_send`], [`StreamReceiver::try_recv`]) and, when it has to wait, hands
//! the wait to a watcher thread of its own, which blocks on the pool's doorbell and wakes the
//! task.
//!
//! ```no_run
//! use shmexec::{Pool, Samples};
//!
//! let task =
//!     shmexec::from_fn::<Vec<i16>, _, _>(|c| c.samples().iter().map(|&s| s as i64).sum::<i64>());
//! // Build the pool (it forks) before the runtime starts its threads.
//! let pool = Pool::builder().workers(2).build(task)?;
//! let (mut tx, mut rx) = pool.into_async_stream();
//! // Two futures for the runtime, e.g. one `tokio::spawn` each:
//! let produce = async move {
//!     for i in 0..100 {
//!         tx.send(vec![i as i16; 1 << 19]).await?; // waits (without blocking) for room
//!     }
//!     tx.close().await // the receiver gets every result still to come, then `None`
//! };
//! let consume = async move {
//!     while let Some(sum) = rx.recv().await {
//!         println!("{}", sum?.to_native());
//!     }
//!     Ok::<(), shmexec::Error>(())
//! };
//! # drop((produce, consume));
//! # Ok::<(), shmexec::Error>(())
//! ```
//!
//! The `service/` crate of the repository runs this on tokio, with a producer at a fixed rate.
//!
//! # Who receives, who sends
//!
//! Each half has a watcher thread and a small state under a mutex: the task's [`Waker`], a
//! `watching` flag, and what the watcher got (a result, or the outcome of placing an input).
//! `watching` says who owns the step: while it is false only the task steps the stream (a
//! `try_recv`, a `try_send` of the kept input); while it is true only the watcher does, with
//! the blocking `recv_timeout` / `send_timeout`, one slice (`WATCH_SLICE`, 10 ms) at a time.
//! The task sets it, the watcher clears it when it has something. So results are taken by one
//! party at a time, in order, and the blocking calls' supervision between slices (a dead
//! worker respawned, results the caller holds too long reported) works for the async halves
//! too; a watcher that only waited for readiness (`wait_ready`, `wait_room`) would leave the
//! task pending forever on a dead worker. With nothing to watch the watcher sleeps on a
//! condvar; a dropped adapter stops it and joins it, which waits at most the rest of a slice.
//!
//! # No lost wake-up
//!
//! A task that returns `Pending` is woken exactly when its watcher has something, because the
//! three steps check, register, check again are ordered by the adapter's mutex: the task
//! checks (`try_recv` finds nothing, or `try_send` finds no room), then, under the same lock
//! acquisition, stores its waker and sets `watching`; the watcher's first step after it sees
//! `watching` is a fresh check of the stream (`recv_timeout` and `send_timeout` step before
//! they wait, and their doorbell wait re-checks after arming, see `shmexec_shm::signal`). A
//! result or room that comes after the task's check is therefore seen by the watcher's check,
//! never by nobody. The watcher publishes what it got, clears `watching` and takes the waker
//! under the lock; a task polled again meanwhile either finds the result (it locked after the
//! watcher) or has put its newer waker in place before the watcher takes it (it locked before).
//! Either way no `Pending` is left without a waker that will be called.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::Duration;

use futures_core::Stream;
use futures_sink::Sink;

use super::stream::{StreamReceiver, StreamSender};
use crate::error::{Error, Result};
use crate::output::OutputRef;
use crate::pool::Pool;
use crate::task::Task;

/// How long a watcher's blocking step waits before it looks whether its adapter is gone: the
/// longest a dropped adapter's `drop` waits for its watcher to finish.
pub(super) const WATCH_SLICE: Duration = Duration::from_millis(10);

/// One result of a stream, as [`StreamReceiver::recv`] gives it.
pub(super) type Next<O> = Option<Result<OutputRef<O>>>;

/// Locks `m`; nothing under these locks panics half-way through a change, so a poisoned lock
/// holds consistent data.
pub(super) fn lock<S>(m: &Mutex<S>) -> MutexGuard<'_, S> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Stores `cx`'s waker in `slot` unless the one there wakes the same task.
pub(super) fn register(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// Starts a watcher thread running `body`, then `died` if `body` panicked (so that a task
/// waiting on it is told, not left pending).
pub(super) fn spawn_watcher(
    name: &str,
    body: impl FnOnce() + Send + 'static,
    died: impl FnOnce(Error) + Send + 'static,
) -> JoinHandle<()> {
    let run = move || {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).is_err() {
            died(Error::Broken("the stream's watcher thread panicked".into()));
        }
    };
    std::thread::Builder::new()
        .name(name.into())
        .spawn(run)
        .expect("failed to start a stream watcher thread")
}

mod receiver;
mod sender;

pub use receiver::AsyncReceiver;
pub use sender::AsyncSender;

impl<T> Pool<T>
where
    T: Task + Send + 'static,
    T::Input: Send + 'static,
{
    /// [`Pool::into_stream`] as async halves: a [`Sink`] of inputs and a [`Stream`] of results
    /// in input order, for a runtime's tasks; see [`crate::call::async_stream`]. Build the pool
    /// before the runtime starts threads (building forks). The pool shuts down when both
    /// halves are dropped.
    pub fn into_async_stream(self) -> (AsyncSender<T>, AsyncReceiver<T>) {
        let (tx, rx) = self.into_stream();
        (AsyncSender::new(tx), AsyncReceiver::new(rx))
    }
}
