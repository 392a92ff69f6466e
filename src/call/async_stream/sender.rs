//! [`AsyncSender`]: the sending half as a `Sink` (see the parent module for the protocol).

use super::*;

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

/// The sending half of a stream as a [`Sink`] of owned inputs; see the
/// [module doc](crate::call::async_stream). Built by [`Pool::into_async_stream`] or
/// [`AsyncSender::new`].
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
