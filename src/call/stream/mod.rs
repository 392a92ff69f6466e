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

mod receiver;
mod sender;
mod shared;

use std::sync::Arc;

pub use receiver::StreamReceiver;
pub use sender::StreamSender;
use shared::{PoolRef, Shared};

use crate::pool::Pool;
use crate::task::Task;

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

    /// [`Pool::into_stream`] whose results come as workers finish them, not in input order.
    pub fn into_stream_unordered(self) -> (StreamSender<'static, T>, StreamReceiver<'static, T>)
    where
        T: 'static,
    {
        halves(Shared::new(PoolRef::Owned(Box::new(self)), false))
    }
}

fn halves<'p, T: Task>(shared: Arc<Shared<'p, T>>) -> (StreamSender<'p, T>, StreamReceiver<'p, T>) {
    (
        StreamSender::new(Arc::clone(&shared)),
        StreamReceiver::new(shared),
    )
}
