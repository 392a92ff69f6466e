//! [`Pool`] and its [`Builder`]: forking the workers, shutting them down.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shmexec_shm::{ChildProcess, Consumer, FrameKind, Peer, Producer, Ring, Segment, WaitStrategy};

use crate::error::{Error, Result};
use crate::pin::{self, Pinning};
use crate::protocol::{START_SEQ, read_report};
use crate::stats::{Field, PoolStats, StatsBlock, WorkerStats};
use crate::task::{Task, WorkerInfo};
use crate::worker;

/// Default bytes of each ring (one input and one output ring per worker).
pub const DEFAULT_RING_BYTES: usize = 64 << 20;

/// Configures and starts a [`Pool`]; see [`Pool::builder`].
#[derive(Debug, Clone)]
pub struct Builder {
    workers: Option<usize>,
    pinning: Pinning,
    input_ring_bytes: usize,
    output_ring_bytes: usize,
    wait: WaitStrategy,
    start_timeout: Duration,
    shutdown_timeout: Duration,
    check_threads: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            workers: None,
            pinning: Pinning::Auto,
            input_ring_bytes: DEFAULT_RING_BYTES,
            output_ring_bytes: DEFAULT_RING_BYTES,
            wait: WaitStrategy::Adaptive,
            start_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(5),
            check_threads: true,
        }
    }
}

impl Builder {
    /// Number of worker processes (default: the cores this process may use).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = Some(n);
        self
    }

    /// How workers are pinned to cores (default [`Pinning::Auto`]).
    pub fn pinning(mut self, pinning: Pinning) -> Self {
        self.pinning = pinning;
        self
    }

    /// Bytes of each worker's input ring and of its output ring (default 64 MiB each). This
    /// bounds memory: the coordinator never has more in flight than the rings hold, and the
    /// largest input or output archive is this minus 64 bytes. Several chunks per ring keep the
    /// workers busy while the coordinator hands out results.
    pub fn ring_bytes(mut self, bytes: usize) -> Self {
        self.input_ring_bytes = bytes;
        self.output_ring_bytes = bytes;
        self
    }

    /// Bytes of each input ring alone.
    pub fn input_ring_bytes(mut self, bytes: usize) -> Self {
        self.input_ring_bytes = bytes;
        self
    }

    /// Bytes of each output ring alone.
    pub fn output_ring_bytes(mut self, bytes: usize) -> Self {
        self.output_ring_bytes = bytes;
        self
    }

    /// How the coordinator and the workers wait for each other (default adaptive: spin while
    /// chunks keep coming, sleep on a futex after a quiet spell).
    pub fn wait_strategy(mut self, wait: WaitStrategy) -> Self {
        self.wait = wait;
        self
    }

    /// How long `build` waits for every worker's `Task::init` (default 60 s).
    pub fn start_timeout(mut self, t: Duration) -> Self {
        self.start_timeout = t;
        self
    }

    /// How long dropping the pool waits for workers to finish before killing them (default 5 s).
    pub fn shutdown_timeout(mut self, t: Duration) -> Self {
        self.shutdown_timeout = t;
        self
    }

    /// Lets [`Builder::build`] fork although this process runs other threads.
    ///
    /// `build` forks, and a forked child holds only the thread that forked: a lock another
    /// thread held at that moment (Rust's stdout/stderr locks, a mutex in your own code, an
    /// allocator that does not reset its locks at fork) stays locked forever in the worker. By
    /// default `build` refuses to fork from a multi-threaded process.
    ///
    /// # Safety
    ///
    /// While `build` runs, no other thread of this process may hold a lock that the task or the
    /// worker loop takes (including the stdout/stderr locks used by `println!` and panics).
    /// Test harnesses qualify when the other test threads are parked on a common lock.
    pub unsafe fn allow_threads(mut self) -> Self {
        self.check_threads = false;
        self
    }

    /// Forks the workers, runs `Task::init` in each, and returns when all are ready.
    pub fn build<T: Task>(self, mut task: T) -> Result<Pool<T>> {
        let allowed = pin::allowed_cores()?;
        let n = self.workers.unwrap_or(allowed.len());
        if n == 0 {
            return Err(Error::InvalidArgument(
                "a pool needs at least one worker".into(),
            ));
        }
        let cores = pin::plan(&self.pinning, n, &allowed)?;
        if self.check_threads {
            let threads = shmexec_shm::process::thread_count();
            if threads > 1 {
                return Err(Error::Start(format!(
                    "this process runs {threads} threads and fork keeps only one, so a lock held \
                     by another thread could stay locked in every worker. Build the pool before \
                     starting threads (rayon, tokio, ...), or see Builder::allow_threads"
                )));
            }
        }
        let stats = StatsBlock::new(n)?;
        let mut workers = Vec::with_capacity(n);
        for (index, core) in cores.into_iter().enumerate() {
            let (input, output) = rings(self.input_ring_bytes, self.output_ring_bytes)?;
            let info = WorkerInfo {
                index,
                workers: n,
                core,
            };
            let child = {
                let setup = worker::Setup {
                    info,
                    input: &input,
                    output: &output,
                    stats: &stats,
                    wait: self.wait,
                };
                let task = &mut task;
                // SAFETY: `fork_unchecked` requires that the child not depend on locks held by
                // other threads: either this process has one thread (checked above) or the
                // caller vouched for it with the unsafe `allow_threads`.
                unsafe { shmexec_shm::fork_unchecked(move || worker::run(task, setup)) }
                    .map_err(|e| Error::Start(format!("fork failed: {e}")))?
            };
            let pid = child.pid();
            let mut tx = input.producer(Peer::process(pid)?)?;
            let mut rx = output.consumer(Peer::process(pid)?)?;
            tx.set_wait_strategy(self.wait);
            rx.set_wait_strategy(self.wait);
            workers.push(WorkerSlot {
                child,
                tx,
                rx,
                core,
                in_flight: 0,
                stale: 0,
            });
        }
        let mut pool = Pool {
            workers,
            stats,
            next_seq: 0,
            broken: None,
            totals: PoolStats::default(),
            shutdown_timeout: self.shutdown_timeout,
            _task: PhantomData,
        };
        pool.await_start(self.start_timeout)?;
        Ok(pool)
    }
}

/// One worker's input and output ring, in a segment of their own.
fn rings(input: usize, output: usize) -> Result<(Ring, Ring)> {
    let in_len = Ring::footprint(input);
    let seg = Arc::new(Segment::new(in_len + Ring::footprint(output))?);
    let a = Ring::init_in(Arc::clone(&seg), 0, input)?;
    let b = Ring::init_in(seg, in_len, output)?;
    Ok((a, b))
}

/// The coordinator's side of one worker.
pub(crate) struct WorkerSlot {
    pub(crate) child: ChildProcess,
    /// Producer of the worker's input ring.
    pub(crate) tx: Producer,
    /// Consumer of the worker's output ring.
    pub(crate) rx: Consumer,
    pub(crate) core: Option<usize>,
    /// Items handed to this worker whose results the current call has not taken yet.
    pub(crate) in_flight: usize,
    /// Results of an abandoned call still to come from this worker, to be discarded.
    pub(crate) stale: usize,
}

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
pub struct Pool<T: Task> {
    pub(crate) workers: Vec<WorkerSlot>,
    stats: StatsBlock,
    pub(crate) next_seq: u64,
    pub(crate) broken: Option<String>,
    pub(crate) totals: PoolStats,
    shutdown_timeout: Duration,
    _task: PhantomData<fn(T)>,
}

impl<T: Task> std::fmt::Debug for Pool<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("workers", &self.workers.len())
            .field("next_seq", &self.next_seq)
            .field("broken", &self.broken)
            .finish()
    }
}

impl Pool<crate::task::TryFnTask<(), (), fn(&()) -> Result<(), crate::BoxError>>> {
    /// Starts configuring a pool.
    pub fn builder() -> Builder {
        Builder::default()
    }
}

impl<T: Task> Pool<T> {
    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Process ids of the workers, in worker order.
    pub fn pids(&self) -> Vec<i32> {
        self.workers.iter().map(|w| w.child.pid()).collect()
    }

    /// The largest input archive a worker's ring takes.
    pub fn max_input_bytes(&self) -> usize {
        self.workers.first().map_or(0, |w| w.tx.max_payload())
    }

    /// Counters of every worker and of the coordinator since the pool started.
    pub fn stats(&self) -> PoolStats {
        let mut s = self.totals.clone();
        s.workers = self
            .workers
            .iter()
            .enumerate()
            .map(|(i, w)| WorkerStats {
                index: i,
                pid: w.child.pid(),
                core: w.core,
                chunks: self.stats.get(i, Field::Chunks),
                bytes_in: self.stats.get(i, Field::BytesIn),
                bytes_out: self.stats.get(i, Field::BytesOut),
                busy: Duration::from_nanos(self.stats.get(i, Field::BusyNs)),
                errors: self.stats.get(i, Field::Errors),
            })
            .collect();
        s
    }

    /// Waits for every worker's start-up frame.
    fn await_start(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for (i, w) in self.workers.iter_mut().enumerate() {
            let pid = w.child.pid();
            let frame = w.rx.peek_until(deadline).map_err(|e| match e {
                shmexec_shm::Error::Timeout { .. } => Error::Timeout {
                    worker: i,
                    what: "start",
                    after: timeout,
                },
                other => died(&mut w.child, i, pid, None, &other),
            })?;
            let result = match frame.kind() {
                FrameKind::End if frame.seq() == START_SEQ => Ok(()),
                FrameKind::Error => Err(read_report(i, START_SEQ, &frame)),
                k => Err(Error::Start(format!(
                    "worker {i} sent a {k:?} frame instead of its start-up report"
                ))),
            };
            frame.release();
            result?;
        }
        Ok(())
    }

    /// Asks every worker to finish, waits for them (up to the shutdown timeout), kills the rest.
    fn shut_down(&mut self) {
        for (i, w) in self.workers.iter_mut().enumerate() {
            self.stats.set(i, Field::Stop, 1);
            if let Ok(Some(mut g)) = w.tx.try_reserve(0) {
                g.set_kind(FrameKind::End);
                g.commit();
            }
        }
        let deadline = Instant::now() + self.shutdown_timeout;
        for w in &mut self.workers {
            // Discard results nobody will take, until the worker's goodbye.
            loop {
                match w.rx.peek_until(deadline) {
                    Ok(f) if f.kind() == FrameKind::End => {
                        f.release();
                        break;
                    }
                    Ok(f) => f.release(),
                    Err(_) => break,
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if !matches!(w.child.wait_timeout(left), Ok(Some(_))) {
                let _ = w.child.kill();
                let _ = w.child.wait();
            }
        }
    }
}

/// The error for a worker found dead (or its ring closed) while waiting on it.
pub(crate) fn died(
    child: &mut ChildProcess,
    worker: usize,
    pid: i32,
    seq: Option<u64>,
    cause: &shmexec_shm::Error,
) -> Error {
    let status = match child.wait_timeout(Duration::from_millis(100)) {
        Ok(Some(s)) => format!("{s:?}"),
        Ok(None) => format!("still running, but {cause}"),
        Err(e) => format!("{cause} ({e})"),
    };
    Error::WorkerDied {
        worker,
        pid,
        seq,
        status,
    }
}

impl<T: Task> Drop for Pool<T> {
    fn drop(&mut self) {
        self.shut_down();
    }
}
