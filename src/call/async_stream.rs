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
const WATCH_SLICE: Duration = Duration::from_millis(10);

/// One result of a stream, as [`StreamReceiver::recv`] gives it.
type Next<O> = Option<Result<OutputRef<O>>>;

/// Locks `m`; nothing under these locks panics half-way through a change, so a poisoned lock
/// holds consistent data.
fn lock<S>(m: &Mutex<S>) -> MutexGuard<'_, S> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Stores `cx`'s waker in `slot` unless the one there wakes the same task.
fn register(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// Starts a watcher thread running `body`, then `died` if `body` panicked (so that a task
/// waiting on it is told, not left pending).
fn spawn_watcher(
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

// ---------------------------------------------------------------------------------------------
// Receiving half
// ---------------------------------------------------------------------------------------------

struct RxState<O> {
    /// The task to wake when the watcher has something.
    waker: Option<Waker>,
    /// The watcher owns the next receive: the task must not call `try_recv`.
    watching: bool,
    /// What the watcher received, for the task's next poll.
    got: Option<Next<O>>,
    /// The adapter is gone (the watcher ends), or the watcher is (the stream ends after its
    /// error).
    stop: bool,
}

struct RxShared<T: Task + 'static> {
    rx: StreamReceiver<'static, T>,
    state: Mutex<RxState<T::Output>>,
    /// Rung when the watcher is wanted (`watching` set) or must end (`stop`).
    wanted: Condvar,
}

/// The receiving half of a stream as a [`Stream`] of results, in input order; see the
/// [module doc](self). Built by [`Pool::into_async_stream`] or [`AsyncReceiver::new`].
///
/// The stream ends (`None`) once the sender is closed and every result was handed out, or
/// after an error of the pool (handed out first), like [`StreamReceiver::recv`]. Dropping it
/// ends the stream for the sender ([`Error::StreamClosed`]).
pub struct AsyncReceiver<T: Task + 'static> {
    shared: Arc<RxShared<T>>,
    watcher: Option<JoinHandle<()>>,
}

impl<T> AsyncReceiver<T>
where
    T: Task + Send + 'static,
{
    /// Wraps `rx`, starting its watcher thread (which sleeps until a poll has to wait).
    ///
    /// # Panics
    ///
    /// If the thread cannot be started, as [`std::thread::spawn`].
    pub fn new(rx: StreamReceiver<'static, T>) -> AsyncReceiver<T> {
        let shared = Arc::new(RxShared {
            rx,
            state: Mutex::new(RxState {
                waker: None,
                watching: false,
                got: None,
                stop: false,
            }),
            wanted: Condvar::new(),
        });
        let (theirs, told) = (Arc::clone(&shared), Arc::clone(&shared));
        let watcher = spawn_watcher(
            "shmexec-recv-watch",
            move || watch_results(&theirs),
            move |e| {
                let mut st = lock(&told.state);
                st.got = Some(Some(Err(e)));
                (st.watching, st.stop) = (false, true);
                if let Some(waker) = st.waker.take() {
                    drop(st);
                    waker.wake();
                }
            },
        );
        AsyncReceiver {
            shared,
            watcher: Some(watcher),
        }
    }

    /// The next result, waiting for it without blocking the thread: [`Stream::poll_next`] as
    /// a future (no `StreamExt` needed).
    pub async fn recv(&mut self) -> Next<T::Output> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// [`Stream::poll_next`] on a receiver that is not pinned (it is `Unpin`).
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Next<T::Output>> {
        let shared = &*self.shared;
        let mut st = lock(&shared.state);
        if let Some(next) = st.got.take() {
            return Poll::Ready(next);
        }
        if st.stop {
            return Poll::Ready(None);
        }
        if !st.watching {
            // Check: the watcher is idle, so this is the only receive.
            if let Poll::Ready(next) = shared.rx.try_recv() {
                return Poll::Ready(next);
            }
            // Register and hand the wait over; the watcher's first step checks again.
            st.watching = true;
            shared.wanted.notify_one();
        }
        register(&mut st.waker, cx);
        Poll::Pending
    }
}

/// The receiving watcher: while the task waits (`watching`), receives with `recv_timeout`
/// slice by slice and hands the first result over; sleeps otherwise; ends on `stop`.
fn watch_results<T: Task + 'static>(shared: &RxShared<T>) {
    let mut st = lock(&shared.state);
    loop {
        while !st.watching && !st.stop {
            st = shared
                .wanted
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if st.stop {
            return;
        }
        drop(st);
        let polled = shared.rx.recv_timeout(WATCH_SLICE);
        st = lock(&shared.state);
        if let Poll::Ready(next) = polled {
            st.got = Some(next);
            st.watching = false;
            if let Some(waker) = st.waker.take() {
                drop(st);
                waker.wake();
                st = lock(&shared.state);
            }
        }
    }
}

impl<T> Stream for AsyncReceiver<T>
where
    T: Task + Send + 'static,
{
    type Item = Result<OutputRef<T::Output>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_recv(cx)
    }
}

impl<T: Task + 'static> Drop for AsyncReceiver<T> {
    fn drop(&mut self) {
        lock(&self.shared.state).stop = true;
        self.shared.wanted.notify_one();
        if let Some(watcher) = self.watcher.take() {
            // At most the rest of a slice; then the stream's receiver goes with the last `Arc`.
            let _ = watcher.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sending half
// ---------------------------------------------------------------------------------------------

struct TxState<I> {
    /// The input `start_send` took that no worker has yet (the task's, while not `watching`).
    kept: Option<I>,
    /// The watcher holds the kept input and is placing it: the task must not send.
    watching: bool,
    /// The sequence number of the last input placed.
    placed: Option<u64>,
    /// The watcher's send failed: the error for the task's next poll.
    failed: Option<Error>,
    /// The task to wake when the watcher is done.
    waker: Option<Waker>,
    /// The adapter is closing or gone: the watcher ends. Or the watcher is gone (then every
    /// send fails after its error).
    stop: bool,
}

struct TxShared<T: Task + 'static> {
    tx: StreamSender<'static, T>,
    state: Mutex<TxState<T::Input>>,
    /// Rung when the watcher is wanted (`watching` set) or must end (`stop`).
    wanted: Condvar,
}

/// The sending half of a stream as a [`Sink`] of owned inputs; see the [module doc](self).
/// Built by [`Pool::into_async_stream`] or [`AsyncSender::new`].
///
/// It keeps one input: [`Sink::start_send`] takes it, and [`Sink::poll_ready`] /
/// [`Sink::poll_flush`] are ready once a worker has it (backpressure: they wait while every
/// worker's queue is full). [`Sink::poll_close`] (or [`AsyncSender::close`]) flushes, then
/// ends the stream: the receiver gets every result still to come, then `None`. Dropping the
/// sender ends the stream too, discarding an input it still keeps.
///
/// Errors are [`StreamSender::send`]'s: the pool's, or [`Error::StreamClosed`] once the
/// receiver is gone; using the sink after `poll_close` is [`Error::InvalidArgument`].
pub struct AsyncSender<T: Task + 'static> {
    /// `None` once closed.
    shared: Option<Arc<TxShared<T>>>,
    watcher: Option<JoinHandle<()>>,
}

impl<T> AsyncSender<T>
where
    T: Task + Send + 'static,
    T::Input: Send + 'static,
{
    /// Wraps `tx`, starting its watcher thread (which sleeps until a send has to wait).
    ///
    /// # Panics
    ///
    /// If the thread cannot be started, as [`std::thread::spawn`].
    pub fn new(tx: StreamSender<'static, T>) -> AsyncSender<T> {
        let shared = Arc::new(TxShared {
            tx,
            state: Mutex::new(TxState {
                kept: None,
                watching: false,
                placed: None,
                failed: None,
                waker: None,
                stop: false,
            }),
            wanted: Condvar::new(),
        });
        let (theirs, told) = (Arc::clone(&shared), Arc::clone(&shared));
        let watcher = spawn_watcher(
            "shmexec-send-watch",
            move || watch_room(&theirs),
            move |e| {
                let mut st = lock(&told.state);
                st.failed = Some(e);
                (st.watching, st.stop) = (false, true);
                if let Some(waker) = st.waker.take() {
                    drop(st);
                    waker.wake();
                }
            },
        );
        AsyncSender {
            shared: Some(shared),
            watcher: Some(watcher),
        }
    }

    /// Hands `input` to a worker, waiting (without blocking the thread) while every worker's
    /// queue is full; returns its sequence number, as [`StreamSender::send`].
    ///
    /// Cancelling it (dropping the future, e.g. on a timeout) after it kept `input` does not
    /// take the input back: the watcher still places it, and the next send or flush waits for
    /// that first (and reports its error, if placing it failed).
    pub async fn send(&mut self, input: T::Input) -> Result<u64> {
        poll_fn(|cx| self.place_kept(cx)).await?;
        self.keep(input)?;
        poll_fn(|cx| self.place_kept(cx)).await?;
        let shared = self.shared.as_ref().ok_or_else(closed)?;
        Ok(lock(&shared.state)
            .placed
            .expect("an input was placed just now"))
    }

    /// Flushes, then ends the stream: [`Sink::poll_close`] as a future.
    pub async fn close(mut self) -> Result<()> {
        poll_fn(|cx| self.poll_shut(cx)).await
    }

    /// Takes `input` to place (`Sink::start_send`); the kept slot must be empty.
    fn keep(&mut self, input: T::Input) -> Result<()> {
        let shared = self.shared.as_ref().ok_or_else(closed)?;
        let mut st = lock(&shared.state);
        if st.watching || st.kept.is_some() {
            return Err(Error::InvalidArgument(
                "start_send before poll_ready said the sink was ready".into(),
            ));
        }
        st.kept = Some(input);
        Ok(())
    }

    /// Places the kept input if there is one (`Sink::poll_ready` and `poll_flush`).
    fn place_kept(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let Some(shared) = self.shared.as_deref() else {
            return Poll::Ready(Err(closed()));
        };
        let mut st = lock(&shared.state);
        if let Some(e) = st.failed.take() {
            return Poll::Ready(Err(e));
        }
        if st.stop {
            return Poll::Ready(Err(Error::Broken(
                "the stream's watcher thread is gone".into(),
            )));
        }
        if !st.watching {
            let Some(input) = st.kept.take() else {
                return Poll::Ready(Ok(()));
            };
            // Check: the watcher is idle, so this is the only send.
            match shared.tx.try_send(&input) {
                Ok(Some(seq)) => {
                    st.placed = Some(seq);
                    return Poll::Ready(Ok(()));
                }
                Err(e) => return Poll::Ready(Err(e)),
                Ok(None) => {}
            }
            // Register and hand the input over; the watcher's first step checks again.
            st.kept = Some(input);
            st.watching = true;
            shared.wanted.notify_one();
        }
        register(&mut st.waker, cx);
        Poll::Pending
    }

    /// `Sink::poll_close`: flushes, stops the watcher, drops the stream's sender.
    fn poll_shut(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        if self.shared.is_none() {
            return Poll::Ready(Ok(()));
        }
        if let Err(e) = std::task::ready!(self.place_kept(cx)) {
            return Poll::Ready(Err(e));
        }
        // Nothing kept and the watcher idle: it ends at once, and the sender goes with the last
        // `Arc`, which closes the stream.
        self.stop_watcher();
        self.shared = None;
        Poll::Ready(Ok(()))
    }
}

fn closed() -> Error {
    Error::InvalidArgument("the async sender was closed".into())
}

/// The sending watcher: while the task waits (`watching`), places the kept input with
/// `send_timeout` slice by slice and reports the outcome; sleeps otherwise; ends on `stop`.
fn watch_room<T: Task + 'static>(shared: &TxShared<T>) {
    let mut st = lock(&shared.state);
    loop {
        while !st.watching && !st.stop {
            st = shared
                .wanted
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if st.stop {
            return;
        }
        let input = st.kept.take().expect("a watched send keeps its input");
        drop(st);
        let sent = loop {
            match shared.tx.send_timeout(&input, WATCH_SLICE) {
                Ok(None) if lock(&shared.state).stop => return,
                Ok(None) => {}
                Ok(Some(seq)) => break Ok(seq),
                Err(e) => break Err(e),
            }
        };
        st = lock(&shared.state);
        match sent {
            Ok(seq) => st.placed = Some(seq),
            Err(e) => st.failed = Some(e),
        }
        st.watching = false;
        if let Some(waker) = st.waker.take() {
            drop(st);
            waker.wake();
            st = lock(&shared.state);
        }
    }
}

impl<T> Sink<T::Input> for AsyncSender<T>
where
    T: Task + Send + 'static,
    T::Input: Send + 'static,
{
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.get_mut().place_kept(cx)
    }

    fn start_send(self: Pin<&mut Self>, input: T::Input) -> Result<()> {
        self.get_mut().keep(input)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.get_mut().place_kept(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.get_mut().poll_shut(cx)
    }
}

impl<T: Task + 'static> AsyncSender<T> {
    /// Ends the watcher and waits for it: at once if it is idle, else within the rest of a
    /// slice (it drops the input it was placing).
    fn stop_watcher(&mut self) {
        if let Some(shared) = &self.shared {
            lock(&shared.state).stop = true;
            shared.wanted.notify_one();
        }
        if let Some(watcher) = self.watcher.take() {
            let _ = watcher.join();
        }
    }
}

impl<T: Task + 'static> Drop for AsyncSender<T> {
    fn drop(&mut self) {
        // Then the stream's sender goes with the last `Arc`, which closes the stream.
        self.stop_watcher();
    }
}

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
