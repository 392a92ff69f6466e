//! The pool: its public handle ([`Pool`]), its configuration ([`Builder`], resolved once into
//! one value) and its runtime (the supervisor: worker slots, start, health, respawn, shutdown).
//!
//! Calls ([`crate::call`]) are built on top: this module never imports them.

mod config;
mod memory;
pub(crate) mod queue;
mod slot;
mod start;
pub(crate) mod supervisor;

pub use config::{Builder, DEFAULT_QUEUE_BYTES, DEFAULT_RING_BYTES, Start};
pub(crate) use slot::{Life, WorkerSlot};
pub(crate) use supervisor::Supervisor;

use crate::error::Result;
use crate::stats::PoolStats;
use crate::task::Task;

/// A pool of worker processes running one [`Task`].
///
/// ```no_run
/// use shmexec::{Pool, Samples};
///
/// let task = shmexec::from_fn::<Vec<f32>, _, _>(|chunk| chunk.samples().iter().sum::<f32>());
/// let mut pool = Pool::builder().workers(2).build(task)?;
/// let chunks: Vec<Vec<f32>> = (0..8).map(|i| vec![i as f32; 1 << 20]).collect();
/// for (i, sum) in pool.map(&chunks).enumerate() {
///     assert_eq!(sum?.to_native(), (i << 20) as f32);
/// }
/// # Ok::<(), shmexec::Error>(())
/// ```
///
/// Dropping the pool asks every worker to stop, runs `finish` in each and reaps them (killing
/// any that do not answer within the shutdown timeout).
pub struct Pool<T: Task> {
    pub(crate) rt: Supervisor<T>,
}

impl<T: Task> std::fmt::Debug for Pool<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("workers", &self.rt.slots.len())
            .field("broken", &self.rt.broken)
            .finish()
    }
}

impl Pool<crate::task::TryFnTask<(), (), fn(&()) -> Result<(), crate::BoxError>>> {
    /// Starts configuring a pool.
    pub fn builder() -> Builder {
        Builder::default()
    }
}

impl Builder {
    /// Starts the workers (fork or spawn), runs `Task::init` in each, and returns when all are
    /// ready.
    pub fn build<T: Task>(self, task: T) -> Result<Pool<T>> {
        self.build_with(|_| Ok(task))
    }

    /// [`build`](Builder::build) with a task made from the resolved settings (a pipeline's
    /// counters are sized by the number of workers).
    pub(crate) fn build_with<T: Task>(
        self,
        make: impl FnOnce(&config::Config) -> Result<T>,
    ) -> Result<Pool<T>> {
        crate::spawn::refuse_if_unserved();
        let config = self.into_config()?;
        let task = make(&config)?;
        Ok(Pool {
            rt: Supervisor::start(config, task)?,
        })
    }
}

impl<T: Task> Pool<T> {
    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.rt.slots.len()
    }

    /// Process ids of the workers, in worker order (they change when a dead worker is
    /// replaced; 0 for a worker that has no process now: waiting to be started again, or given
    /// up).
    pub fn pids(&self) -> Vec<i32> {
        self.rt.slots.iter().map(WorkerSlot::pid).collect()
    }

    /// The largest input archive a worker's ring takes.
    pub fn max_input_bytes(&self) -> usize {
        self.rt.max_input_bytes()
    }

    /// Counters of every worker and of the coordinator since the pool started.
    pub fn stats(&self) -> PoolStats {
        self.rt.stats()
    }
}
