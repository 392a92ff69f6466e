//! [`Pool`] and its [`Builder`]: forking the workers, shutting them down.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shmexec_shm::{
    ChildProcess, Consumer, ExitStatus, FrameKind, Peer, Producer, Ring, Segment, WaitStrategy,
    Waiter,
};

use crate::error::{Error, Result};
use crate::pin::{self, Pinning};
use crate::protocol::{START_SEQ, read_report};
use crate::queue::{Expected, Queue};
use crate::stats::{Field, PoolStats, StatsBlock, WorkerStats};
use crate::task::{Task, WorkerInfo};
use crate::worker;

/// How often the coordinator looks for dead workers while it waits.
const HEALTH_CHECK_EVERY: Duration = Duration::from_millis(5);

/// Default bytes of each ring (one input and one output ring per worker).
pub const DEFAULT_RING_BYTES: usize = 64 << 20;

/// Default input bytes queued to one worker; see [`Builder::queue_bytes`].
pub const DEFAULT_QUEUE_BYTES: usize = 8 << 20;

/// The warm window of the coordinator's input producers (`shmexec_shm::Producer::
/// set_warm_window`): with the short queues above, chunks keep reusing the first few MiB of an
/// input ring (a quarter of a small one) while they are in cache instead of walking all of it.
///
/// Output rings keep walking the whole ring: there the run-ahead matters more. In an ordered
/// call the coordinator waits on one worker while the others' results pile up, and after an
/// early wrap a worker could only run a window ahead until the coordinator stepped past the
/// padding (measured: work descriptors ran about 15 % slower with it).
pub(crate) fn warm_window(ring: &Ring) -> u64 {
    (8u64 << 20).min(ring.capacity() as u64 / 4)
}

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
    max_retries: u32,
    chunk_timeout: Option<Duration>,
    start: Start,
    validate_outputs: bool,
    shared_bytes: usize,
    queue_bytes: u64,
}

/// How worker processes start; see [`Builder::spawn`] and [`crate::spawn`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Start {
    /// `fork`: the workers are copies of this process (refused while other threads run).
    #[default]
    Fork,
    /// This program started again, serving the task registered under this name with
    /// [`crate::spawn::serve`].
    Spawn(String),
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
            max_retries: 2,
            chunk_timeout: None,
            start: Start::Fork,
            validate_outputs: true,
            shared_bytes: 0,
            queue_bytes: DEFAULT_QUEUE_BYTES as u64,
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

    /// Bytes of each input ring alone. It must hold the largest input; how much of it is
    /// queued at a time is [`Builder::queue_bytes`].
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

    /// How many times one item may kill its worker before it is given up as
    /// [`Error::WorkerCrashed`] (default 2). A dead worker is always replaced (same core, `init`
    /// run again) and the items it had not finished are delivered to its successor, so one
    /// poison chunk costs a few respawns, not the run.
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// A deadline per chunk (default none): a worker still on one chunk after `t` is killed and
    /// replaced, and that item is [`Error::ChunkTimeout`] (it is not retried). Checked every
    /// few milliseconds while the coordinator waits or hands out results.
    pub fn chunk_timeout(mut self, t: Duration) -> Self {
        self.chunk_timeout = Some(t);
        self
    }

    /// How many input bytes the coordinator queues to one worker before it waits for a result
    /// (default 8 MiB; at least two items are always queued, whatever their size). Only items
    /// the worker has not finished count: results waiting for the caller do not (they wait in
    /// the output ring, which bounds them), so in an ordered call the other workers go on while
    /// one works on a slow item. The input
    /// ring holds more, and used to be filled: but a coordinator 16 chunks ahead writes each
    /// chunk into memory last touched a ring's lap ago, and the worker reads it long after it
    /// left the caches. A short queue keeps the chunk warm from the coordinator's write to the
    /// worker's read, and the input ring then starts again at its beginning whenever that is
    /// free (`shmexec_shm::Producer::set_warm_window`), so the same few MiB of ring are reused
    /// while they are in cache. Small chunks still queue by the hundred. Measured on 2 cores in
    /// the README (copying input and a serial source, 4 MiB and 64 KiB chunks).
    pub fn queue_bytes(mut self, bytes: usize) -> Self {
        self.queue_bytes = bytes as u64;
        self
    }

    /// Gives the pool a shared region of `bytes` (default 0: none), mapped in every worker: the
    /// program writes its chunks there with [`Pool::shared_mut`] and sends
    /// [`crate::shared::Span`]s, which workers read in place. The memory is allocated when the
    /// pool is built (an `Err` if there is not enough). See [`crate::shared`].
    pub fn shared_bytes(mut self, bytes: usize) -> Self {
        self.shared_bytes = bytes;
        self
    }

    /// Starts workers by running this program again instead of forking, serving the task that
    /// `main` registered under `name` with [`crate::spawn::serve`]. Safe in a process that runs
    /// other threads; see [`crate::spawn`] for when to use which.
    pub fn spawn(mut self, name: &str) -> Self {
        self.start = Start::Spawn(name.to_owned());
        self
    }

    /// Skips the validation (rkyv's bytecheck) of each output before the caller reads it.
    /// Validation walks the archive once (for a `Vec` of numbers, a bounds check); skipping it
    /// saves that for tasks whose outputs are many small objects.
    ///
    /// # Safety
    ///
    /// Every output frame must be a valid archive of the task's output type. shmexec's own
    /// workers write them so, but a worker whose memory is corrupted (a buggy C extension, say)
    /// could publish anything, and reading an invalid archive is undefined behaviour.
    pub unsafe fn trust_outputs(mut self) -> Self {
        self.validate_outputs = false;
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
        if self.check_threads && self.start == Start::Fork {
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
        let shared = match self.shared_bytes {
            0 => None,
            bytes => Some(Arc::new(Segment::new(bytes)?)),
        };
        // The coordinator's own waits: under `SourceFirst` its idle time belongs to the workers
        // beside it, so it parks instead of spinning.
        let coordinator_wait = match (&self.pinning, self.wait) {
            (Pinning::SourceFirst, WaitStrategy::Adaptive) => WaitStrategy::Park,
            (_, wait) => wait,
        };
        let mut workers = Vec::with_capacity(n);
        for (index, core) in cores.into_iter().enumerate() {
            let (input, output) = rings(self.input_ring_bytes, self.output_ring_bytes)?;
            let low_priority = pin::low_priority(&self.pinning, core, &allowed);
            let info = WorkerInfo {
                index,
                workers: n,
                core,
                low_priority,
            };
            let siblings: Vec<i32> = workers.iter().map(|w: &WorkerSlot| w.child.pid()).collect();
            let child = start_worker(
                &self.start,
                &siblings,
                &mut task,
                info,
                &input,
                &output,
                &stats,
                shared.as_ref(),
                self.wait,
            )?;
            let pid = child.pid();
            let mut tx = input.producer(Peer::process(pid)?)?;
            let mut rx = output.consumer(Peer::process(pid)?)?;
            tx.set_wait_strategy(coordinator_wait);
            tx.set_warm_window(warm_window(&input));
            rx.set_wait_strategy(coordinator_wait);
            workers.push(WorkerSlot {
                child,
                tx,
                rx,
                input,
                output,
                core,
                low_priority,
                expect: Queue::default(),
                live: 0,
                respawns: 0,
                watching: (0, Instant::now()),
            });
        }
        let mut pool = Pool {
            workers,
            stats,
            next_seq: 0,
            broken: None,
            totals: PoolStats::default(),
            shutdown_timeout: self.shutdown_timeout,
            task,
            wait: self.wait,
            check_threads: self.check_threads && self.start == Start::Fork,
            start: self.start,
            validate_outputs: self.validate_outputs,
            max_retries: self.max_retries,
            crashes: HashMap::new(),
            last_health_check: Instant::now(),
            chunk_timeout: self.chunk_timeout,
            shared,
            queue_bytes: self.queue_bytes,
            doorbell_waiter: Waiter::new(coordinator_wait),
        };
        pool.await_start(self.start_timeout)?;
        Ok(pool)
    }
}

/// Starts one worker over its rings: a fork running `task` (the child's copy of it), or a
/// spawned process serving the named task.
#[allow(clippy::too_many_arguments)]
fn start_worker<T: Task>(
    start: &Start,
    siblings: &[i32],
    task: &mut T,
    info: WorkerInfo,
    input: &Ring,
    output: &Ring,
    stats: &StatsBlock,
    shared: Option<&Arc<Segment>>,
    wait: WaitStrategy,
) -> Result<ChildProcess> {
    if let Start::Spawn(name) = start {
        let output_offset = Ring::footprint(input.capacity());
        return crate::spawn::spawn_worker(
            name,
            &info,
            input,
            output_offset,
            stats,
            shared.map(|s| &**s),
            wait,
        );
    }
    let setup = worker::Setup {
        info,
        input,
        output,
        stats,
        shared: shared.cloned(),
        wait,
    };
    let siblings = siblings.to_vec();
    let task = move || {
        crate::hygiene::close_pool_descriptors(&siblings);
        worker::run(task, setup)
    };
    // SAFETY: `fork_unchecked` requires that the child not depend on locks held by other
    // threads: every caller has checked that this process has one thread, or the user vouched
    // for it with the unsafe `Builder::allow_threads`.
    unsafe { shmexec_shm::fork_unchecked(task) }
        .map_err(|e| Error::Start(format!("fork failed: {e}")))
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
    /// The rings themselves, for a successor after a crash.
    input: Ring,
    output: Ring,
    pub(crate) core: Option<usize>,
    /// See [`WorkerInfo::low_priority`]; a successor after a crash gets the same.
    low_priority: bool,
    /// Items handed to this worker whose results are still to come.
    pub(crate) expect: Queue,
    /// The `live` entries of `expect`.
    pub(crate) live: usize,
    pub(crate) respawns: u64,
    /// The worker's `Field::Current` as last seen and since when (for the chunk timeout).
    watching: (u64, Instant),
}

impl WorkerSlot {
    /// Records an item of `bytes` input bytes handed to this worker.
    pub(crate) fn push(&mut self, seq: u64, bytes: u64) {
        let end = self.tx.written();
        self.expect.push(Expected {
            seq,
            live: true,
            bytes,
            end,
        });
        self.live += 1;
    }

    /// Whether this worker has enough queued to take no more now: at least two items it has not
    /// finished (one to work on, one ready behind it) and `limit` bytes of them.
    ///
    /// Finished items whose results the caller has not taken yet do not count. In an ordered
    /// call the coordinator waits for the oldest item's worker while the others finish theirs;
    /// counting those would leave the fast workers idle until the slow one answered (measured on
    /// 2 cores with a serial source: 12 % of the machine idle and workers waiting for input
    /// another 10 %). Their results are bounded by the output ring instead: a worker whose
    /// output ring is full stops, and its inputs then count here.
    pub(crate) fn queue_full(&mut self, limit: u64) -> shmexec_shm::Result<bool> {
        // What was known finished gives an upper bound on the queue: only when that bound says
        // full is the worker's side of the ring looked at.
        let full = |(items, bytes): (usize, u64)| items >= 2 && bytes >= limit;
        if !full(self.expect.unfinished()) {
            return Ok(false);
        }
        let released = self.tx.released()?;
        self.expect.refresh(released);
        Ok(full(self.expect.unfinished()))
    }

    /// The current call ended: results still to come are discarded when they arrive.
    pub(crate) fn abandon(&mut self) {
        self.expect.abandon();
        self.live = 0;
    }
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
    /// The task as it was before any worker ran it: respawned workers fork from it.
    task: T,
    wait: WaitStrategy,
    check_threads: bool,
    start: Start,
    pub(crate) validate_outputs: bool,
    max_retries: u32,
    /// Items that crashed a worker: how often, and the last signal.
    crashes: HashMap<u64, Crash>,
    last_health_check: Instant,
    chunk_timeout: Option<Duration>,
    /// The shared region, if the builder asked for one.
    pub(crate) shared: Option<Arc<Segment>>,
    /// See [`Builder::queue_bytes`].
    pub(crate) queue_bytes: u64,
    /// How the coordinator waits on the workers' doorbell ([`Pool::await_result_or_room`]).
    doorbell_waiter: Waiter,
}

/// What the pool knows of an item that killed (or hung) its worker.
#[derive(Clone, Copy, Default)]
pub(crate) struct Crash {
    pub(crate) count: u32,
    pub(crate) signal: Option<i32>,
    /// Set when the worker was killed for overrunning the chunk timeout.
    pub(crate) timed_out: Option<Duration>,
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
                respawns: w.respawns,
            })
            .collect();
        s
    }

    /// Replaces dead workers. Cheap (a pidfd poll per worker), and done at most every few
    /// milliseconds while the coordinator waits, so a death is noticed within a few ms of it
    /// mattering, whichever worker the coordinator was waiting on.
    pub(crate) fn check_health(&mut self) -> Result<()> {
        if self.last_health_check.elapsed() < HEALTH_CHECK_EVERY {
            return Ok(());
        }
        let now = Instant::now();
        self.last_health_check = now;
        for w in 0..self.workers.len() {
            if let Some(limit) = self.chunk_timeout {
                let current = self.stats.get(w, Field::Current);
                let slot = &mut self.workers[w];
                if current == 0 || slot.watching.0 != current {
                    slot.watching = (current, now);
                } else if now.duration_since(slot.watching.1) > limit {
                    // Stuck: kill it; the respawn below reports the item instead of rerunning.
                    let seq = current - 1;
                    self.crashes.entry(seq).or_default().timed_out = Some(limit);
                    let _ = slot.child.kill();
                    slot.watching = (0, now);
                }
            }
            if !self.workers[w].child.is_alive() {
                self.respawn(w)?;
            }
        }
        Ok(())
    }

    /// Replaces the dead worker `w`: reaps it, charges the item it died on, and forks a
    /// successor on the same core over the same rings. The successor runs `init`, then takes
    /// the input ring from its tail: the item its predecessor died on (inputs are released only
    /// after their output is published) and everything queued behind it. Results already
    /// published stay in the output ring; a result published twice (a death between publishing
    /// and releasing) is dropped by sequence number when it arrives again.
    pub(crate) fn respawn(&mut self, w: usize) -> Result<()> {
        let slot = &mut self.workers[w];
        let pid = slot.child.pid();
        let status = match slot.child.wait_timeout(Duration::from_millis(200)) {
            Ok(Some(s)) => Some(s),
            _ => {
                let _ = slot.child.kill();
                slot.child.wait().ok()
            }
        };
        let signal = match status {
            Some(ExitStatus::Signaled(s)) => Some(s),
            // A successor whose `init` failed: replacing it again would fail again.
            Some(ExitStatus::Exited(worker::EXIT_INIT_FAILED)) => {
                return Err(Error::Init {
                    worker: w,
                    message: "Task::init failed in a replacement worker".into(),
                });
            }
            _ => None,
        };
        let current = self.stats.get(w, Field::Current);
        self.stats.set(w, Field::Current, 0);
        if let Some(seq) = current.checked_sub(1) {
            let entry = self.crashes.entry(seq).or_default();
            entry.count += 1;
            entry.signal = signal;
            if entry.count >= self.max_retries || entry.timed_out.is_some() {
                self.stats.set(w, Field::Skip, current);
            }
        }
        if self.check_threads {
            let threads = shmexec_shm::process::thread_count();
            if threads > 1 {
                return Err(Error::WorkerDied {
                    worker: w,
                    pid,
                    seq: current.checked_sub(1),
                    status: format!(
                        "{status:?}; it cannot be replaced by a fork because this process now runs \
                         {threads} threads (use Builder::spawn, or see Builder::allow_threads)"
                    ),
                });
            }
        }
        let info = WorkerInfo {
            index: w,
            workers: self.workers.len(),
            core: self.workers[w].core,
            low_priority: self.workers[w].low_priority,
        };
        let siblings: Vec<i32> = self.workers.iter().map(|w| w.child.pid()).collect();
        let slot = &mut self.workers[w];
        let child = start_worker(
            &self.start,
            &siblings,
            &mut self.task,
            info,
            &slot.input,
            &slot.output,
            &self.stats,
            self.shared.as_ref(),
            self.wait,
        )?;
        let new_pid = child.pid();
        slot.tx.set_peer(Peer::process(new_pid)?);
        slot.rx.set_peer(Peer::process(new_pid)?);
        slot.child = child;
        slot.respawns += 1;
        self.totals.respawns += 1;
        Ok(())
    }

    /// Waits until worker `w` has a result to read (`Ok(false)`) or any worker could take an
    /// input of `len` archive bytes (`Ok(true)`: feed it first), or `deadline` passes
    /// ([`shmexec_shm::Error::Timeout`]). Another error: look at worker `w`'s ring, which says
    /// what went wrong.
    ///
    /// Waiting on `w`'s output ring alone would sleep through the other workers running dry:
    /// in an ordered call the coordinator waits for the oldest item while the others finish
    /// theirs and then idle until it wakes (measured on 2 cores with a serial source: the
    /// coordinator and both workers each asleep about a fifth of the run). So every worker rings
    /// the pool's doorbell as it lets go of an input, and the condition here covers both.
    pub(crate) fn await_result_or_room(
        &mut self,
        w: usize,
        len: usize,
        deadline: Instant,
    ) -> shmexec_shm::Result<bool> {
        let Pool {
            workers,
            stats,
            doorbell_waiter,
            queue_bytes,
            ..
        } = self;
        let Some(bell) = stats.doorbell() else {
            return Ok(false);
        };
        let mut room = false;
        // The coordinator's own slice (`deadline`) bounds the wait; liveness is checked between
        // slices, so the doorbell needs no peer of its own.
        bell.wait_until(doorbell_waiter, &Peer::unwatched(), Some(deadline), || {
            if workers[w].rx.try_peek()?.is_some() {
                return Ok(true);
            }
            for slot in workers.iter_mut() {
                // The same conditions as `Map::feed`'s, or a wake-up would find nothing to do.
                if !slot.queue_full(*queue_bytes)? && slot.tx.fits(len)? {
                    room = true;
                    return Ok(true);
                }
            }
            Ok(false)
        })?;
        Ok(room)
    }

    /// What the pool knows of an item given up after crashes or a timeout.
    pub(crate) fn crash_record(&self, seq: u64) -> Crash {
        self.crashes.get(&seq).copied().unwrap_or_default()
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
fn died(
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
