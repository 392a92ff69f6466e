//! Live sources: a pipeline run fed from another thread as chunks arrive
//! ([`Pipeline::stream`](crate::pipeline::Pipeline::stream)).
//!
//! The sending half hands each chunk over through a short queue (a few chunks: the rings are
//! where chunks wait, this only passes them to the run), then rings the groups' doorbell, so a
//! run waiting for work wakes at once. The run takes chunks from the queue as its first group's
//! rings have room, and serializes each into a ring. A sender that finds the queue full waits
//! for the run to take one: the pipeline's backpressure reaches the source. Dropping the sender
//! ends the run once everything sent is handed out; dropping the run makes the sender's next
//! `send` an error instead of a wait.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::archive::{Encode, encode_into, encoded_len};
use crate::call::feed::Feed;
use crate::error::{Error, Result};
use crate::stats::Doorbell;

/// Chunks handed over and not yet taken by the run.
const QUEUE: usize = 2;

/// The queue between the two halves.
struct Live<In> {
    state: Mutex<State<In>>,
    /// Signalled when the run takes a chunk or goes away.
    taken: Condvar,
    bell: Doorbell,
}

struct State<In> {
    queue: VecDeque<In>,
    /// The sender is gone: no more chunks.
    closed: bool,
    /// The run is gone: nothing more is taken.
    gone: bool,
}

impl<In> Live<In> {
    fn lock(&self) -> MutexGuard<'_, State<In>> {
        // Neither side panics while holding the lock; a poisoned one still holds valid state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The sending half of a live pipeline run: hand it chunks as they arrive, from any thread.
pub struct PipelineSender<In> {
    live: Arc<Live<In>>,
}

impl<In> PipelineSender<In> {
    /// Hands `chunk` to the run, waiting while the run has taken none of the chunks before it
    /// (its rings are full: the pipeline is behind). [`Error::StreamClosed`] if the run is gone.
    pub fn send(&self, chunk: In) -> Result<()> {
        match self.send_until(chunk, None)? {
            None => Ok(()),
            Some(_) => unreachable!("a send without a deadline waits until it is taken"),
        }
    }

    /// [`send`](PipelineSender::send) that waits at most `timeout` for room: `Ok(Some(chunk))`
    /// gives the chunk back if none came. A timeout past the clock's range waits as `send`
    /// does.
    pub fn send_timeout(&self, chunk: In, timeout: Duration) -> Result<Option<In>> {
        self.send_until(chunk, Instant::now().checked_add(timeout))
    }

    fn send_until(&self, chunk: In, deadline: Option<Instant>) -> Result<Option<In>> {
        let mut state = self.live.lock();
        loop {
            if state.gone {
                return Err(Error::StreamClosed);
            }
            if state.queue.len() < QUEUE {
                break;
            }
            state = match deadline {
                None => self
                    .live
                    .taken
                    .wait(state)
                    .unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(Some(chunk));
                    }
                    self.live
                        .taken
                        .wait_timeout(state, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
        state.queue.push_back(chunk);
        drop(state);
        // SYNC POINT with the run's wait (`Run::ready` via `Source::has_input`): the chunk is in
        // the queue (the mutex orders it) before the ring, so a run that wakes finds it.
        self.live.bell.ring();
        Ok(None)
    }
}

impl<In> Drop for PipelineSender<In> {
    fn drop(&mut self) {
        self.live.lock().closed = true;
        self.live.bell.ring();
    }
}

/// The run's side: a [`Feed`] whose inputs arrive live.
pub(crate) struct LiveFeed<In> {
    live: Arc<Live<In>>,
    pending: Option<In>,
}

/// A live source's two halves.
pub(crate) fn live<In>(bell: Doorbell) -> (PipelineSender<In>, LiveFeed<In>) {
    let live = Arc::new(Live {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            closed: false,
            gone: false,
        }),
        taken: Condvar::new(),
        bell,
    });
    (
        PipelineSender {
            live: Arc::clone(&live),
        },
        LiveFeed {
            live,
            pending: None,
        },
    )
}

impl<In: Encode> Feed for LiveFeed<In> {
    fn prepare(&mut self) -> Option<Result<usize, String>> {
        let chunk = self.live.lock().queue.pop_front()?;
        self.live.taken.notify_all();
        let len = encoded_len(&chunk).map_err(|e| e.to_string());
        if len.is_ok() {
            self.pending = Some(chunk);
        }
        Some(len)
    }

    fn write(&mut self, slot: &mut [u8]) -> Result<usize, String> {
        let chunk = self.pending.take().ok_or("no input prepared")?;
        encode_into(&chunk, slot).map_err(|e| e.to_string())
    }

    fn skip(&mut self) {
        self.pending = None;
    }

    fn copies(&self) -> bool {
        true
    }

    fn remaining(&self) -> Option<u64> {
        None
    }

    fn ended(&self) -> bool {
        let state = self.live.lock();
        state.closed && state.queue.is_empty()
    }

    fn has_input(&self) -> bool {
        let state = self.live.lock();
        !state.queue.is_empty() || state.closed
    }
}

impl<In> Drop for LiveFeed<In> {
    fn drop(&mut self) {
        self.live.lock().gone = true;
        self.live.taken.notify_all();
    }
}
