//! [`AsyncReceiver`]: the receiving half as a `Stream` (see the parent module for the protocol).

use super::*;

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
/// [module doc](crate::call::async_stream). Built by [`Pool::into_async_stream`] or
/// [`AsyncReceiver::new`].
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
