//! [`Builder`]: the pool's settings, checked once and turned into one [`Config`] value that the
//! supervisor owns for the pool's life.

use std::fmt::Debug;
use std::time::Duration;

use shmexec_shm::WaitStrategy;

use crate::error::{Error, Result};
use crate::pin::{self, Pinning};
use crate::stats::Doorbell;
use crate::task::WorkerInfo;

/// Default bytes of each ring (one input and one output ring per worker).
pub const DEFAULT_RING_BYTES: usize = 64 << 20;

/// Default input bytes queued to one worker; see [`Builder::queue_bytes`].
pub const DEFAULT_QUEUE_BYTES: usize = 8 << 20;

/// How worker processes start; see [`Builder::spawn`] and [`crate::spawn`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Start {
    /// `fork`: the workers are copies of this process (refused while other threads run).
    #[default]
    Fork,
    /// This program started again, serving the task registered under this name with
    /// [`crate::spawn::serve`].
    Spawn(String),
    /// Another program (`program` run with `args`) that serves the task `name` with
    /// [`crate::spawn::serve`]; see [`Builder::spawn_program`].
    SpawnProgram {
        /// The task's name, as the program's `serve` call has it.
        name: String,
        /// The program file.
        program: std::path::PathBuf,
        /// Its arguments (after its name, which is `program`).
        args: Vec<std::ffi::OsString>,
    },
}

/// Configures and starts a [`crate::Pool`]; see [`crate::Pool::builder`].
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
    max_attempts: u32,
    max_start_attempts: u32,
    restart_backoff: Duration,
    chunk_timeout: Option<Duration>,
    start: Start,
    validate_outputs: bool,
    shared_bytes: usize,
    queue_bytes: u64,
    item_timing: bool,
    /// The names of the fused pipeline stages the workers run, if any (set by the pipeline).
    stage_names: Vec<String>,
    /// A doorbell shared with other pools (a pipeline's groups), if any.
    doorbell: Option<Doorbell>,
}

/// Everything the supervisor needs, resolved from a [`Builder`] once (core plan included).
#[derive(Debug)]
pub(crate) struct Config {
    /// The core of each worker (its length is the number of workers).
    pub(crate) cores: Vec<Option<usize>>,
    /// Which of them run at the lowest priority (beside the coordinator).
    pub(crate) low_priority: Vec<bool>,
    pub(crate) input_ring_bytes: usize,
    pub(crate) output_ring_bytes: usize,
    /// How workers wait.
    pub(crate) wait: WaitStrategy,
    /// How the coordinator waits: under `SourceFirst` its idle time belongs to the workers
    /// beside it, so it parks instead of spinning.
    pub(crate) coordinator_wait: WaitStrategy,
    pub(crate) start_timeout: Duration,
    pub(crate) shutdown_timeout: Duration,
    /// Whether a fork is refused while this process runs other threads.
    pub(crate) check_threads: bool,
    pub(crate) max_attempts: u32,
    /// Starts in a row that may fail for one worker before it is given up.
    pub(crate) max_start_attempts: u32,
    /// The wait before the second of those starts; it doubles for each further one.
    pub(crate) restart_backoff: Duration,
    pub(crate) chunk_timeout: Option<Duration>,
    pub(crate) start: Start,
    pub(crate) validate_outputs: bool,
    pub(crate) shared_bytes: usize,
    pub(crate) queue_bytes: u64,
    /// Whether the coordinator stamps each item's submission and delivery.
    pub(crate) item_timing: bool,
    /// The names of the fused pipeline stages the workers run (empty for a plain pool): error
    /// reports name a stage by its index here.
    pub(crate) stage_names: Vec<String>,
    /// The doorbell the workers ring, when it is shared with other pools (the groups of one
    /// pipeline, so that their coordinator waits on one word for all of them).
    pub(crate) doorbell: Option<Doorbell>,
}

impl Config {
    /// What worker `index` is told about itself (`Task::init`); a successor gets the same.
    pub(crate) fn worker_info(&self, index: usize) -> WorkerInfo {
        WorkerInfo {
            index,
            workers: self.cores.len(),
            core: self.cores[index],
            low_priority: self.low_priority[index],
        }
    }
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
            max_attempts: 2,
            max_start_attempts: 4,
            restart_backoff: Duration::from_millis(50),
            chunk_timeout: None,
            start: Start::Fork,
            validate_outputs: true,
            shared_bytes: 0,
            queue_bytes: DEFAULT_QUEUE_BYTES as u64,
            item_timing: true,
            stage_names: Vec::new(),
            doorbell: None,
        }
    }
}

impl Builder {
    /// The names of the fused stages a pipeline's workers run.
    pub(crate) fn stage_names(mut self, names: Vec<String>) -> Self {
        self.stage_names = names;
        self
    }

    /// Workers that ring `bell`, shared with other pools, instead of a doorbell of their own.
    pub(crate) fn doorbell(mut self, bell: Doorbell) -> Self {
        self.doorbell = Some(bell);
        self
    }

    /// Outputs handed out as frames, not checked as archives: a pipeline group whose outputs
    /// only the next group's workers read (and check).
    pub(crate) fn frames_only(mut self) -> Self {
        self.validate_outputs = false;
        self
    }

    /// Whether outputs are checked as archives of the output type.
    pub(crate) fn validates_outputs(&self) -> bool {
        self.validate_outputs
    }
}

impl Builder {
    /// Number of worker processes (default: the cores this process may use), between 1 and
    /// 4096: each worker is a process with two rings and a pidfd, and more than a few thousand
    /// of them only share the same cores.
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
    ///
    /// Between 4 KiB (a page: room for a frame and its padding) and 1 TiB; the memory is
    /// allocated at `build`, which fails with an out-of-memory error where the machine lacks it.
    pub fn ring_bytes(mut self, bytes: usize) -> Self {
        self.input_ring_bytes = bytes;
        self.output_ring_bytes = bytes;
        self
    }

    /// Bytes of each input ring alone (the range of [`Builder::ring_bytes`]). It must hold the
    /// largest input; how much of it is queued at a time is [`Builder::queue_bytes`].
    pub fn input_ring_bytes(mut self, bytes: usize) -> Self {
        self.input_ring_bytes = bytes;
        self
    }

    /// Bytes of each output ring alone (the range of [`Builder::ring_bytes`]).
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

    /// How long a worker may take to start: its process and `Task::init` (default 60 s),
    /// between 1 ms and one year (no worker starts in no time, and a longer wait is a hang).
    /// `build` fails with [`Error::Timeout`] past it; a successor past it is killed, and that
    /// counts as a failed start ([`Builder::max_start_attempts`]).
    pub fn start_timeout(mut self, t: Duration) -> Self {
        self.start_timeout = t;
        self
    }

    /// How long dropping the pool waits for workers to finish before killing them (default 5 s),
    /// at most one year; zero kills them at once.
    pub fn shutdown_timeout(mut self, t: Duration) -> Self {
        self.shutdown_timeout = t;
        self
    }

    /// How many times one item may be tried (each try that kills its worker counts) before it
    /// is given up as [`Error::WorkerCrashed`] (default 2). A dead worker is always replaced
    /// (same core, `init` run again) and the items it had not finished are delivered to its
    /// successor, so one poison chunk costs a few respawns, not the run.
    ///
    /// Between 1 (no retry) and 1000: each try costs a respawn and its `init`.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// How many successors in a row may fail to start for one worker before the pool gives
    /// that worker up (default 4). A successor fails to start when it dies (or is killed by
    /// the start timeout) before it is ready: its `init` failed, hung, exited or crashed, or
    /// its fork failed. A worker that finished an item starts the count again; a death at work
    /// is charged to its item instead ([`Builder::max_attempts`]).
    /// The first successor starts at once, the next after [`Builder::restart_backoff`], each
    /// further one after twice the wait before it. A worker given up fails the items queued to
    /// it ([`Error::WorkerLost`]); the other workers go on, and the pool is unusable once every
    /// worker is given up. Between 1 and 1000.
    pub fn max_start_attempts(mut self, n: u32) -> Self {
        self.max_start_attempts = n;
        self
    }

    /// The wait before the second successor in a row of a worker that keeps failing to start
    /// (default 50 ms, at most 10 s; it doubles for each further one, up to 10 s); see
    /// [`Builder::max_start_attempts`].
    pub fn restart_backoff(mut self, first: Duration) -> Self {
        self.restart_backoff = first;
        self
    }

    /// A deadline per chunk (default none): a worker still on one chunk after `t` is killed and
    /// replaced, and that item is [`Error::ChunkTimeout`] (it is not retried). A worker that
    /// leaves queued chunks untouched for `t` (stopped, or hung between chunks) is killed and
    /// replaced too; its chunks go to the successor.
    ///
    /// The deadline counts the time the pool is driven: while a call or a stream half waits on
    /// it or steps it, with at most a tenth of `t` (and at most 250 ms) counted for any longer
    /// gap between two steps. So a pause of the whole program (Ctrl-Z, a container pause, a
    /// debugger) costs no chunk that had a tenth of its time left, and a worker waiting for the
    /// caller to take its results is not counted as slow. A program that drives the pool less
    /// often than that (a `try_recv` every second, say) sees the deadline counted slower.
    ///
    /// Between 1 ms and one year (the check runs every few ms, so a shorter one means "kill
    /// every worker that takes a chunk").
    pub fn chunk_timeout(mut self, t: Duration) -> Self {
        self.chunk_timeout = Some(t);
        self
    }

    /// How many input bytes the coordinator queues to one worker before it waits for a result
    /// (default 8 MiB; at least two items are always queued, whatever their size). Only items
    /// the worker has not finished count: results waiting for the caller do not (they wait in
    /// the output ring, which bounds them), so in an ordered call the other workers go on while
    /// one works on a slow item.
    ///
    /// The input ring holds more, but a coordinator a ring's lap ahead writes each chunk into
    /// memory that has left the caches by the time the worker reads it. A short queue keeps the
    /// chunk warm from the coordinator's write to the worker's read, and the input ring starts
    /// again at its beginning whenever that is free
    /// (`shmexec_shm::Producer::set_warm_window`), so the same few MiB are reused while they are
    /// in cache. Small chunks still queue by the hundred. Figures: `docs/benchmarks.md`.
    ///
    /// Between 1 byte (only the two items always queued) and 1 TiB (the most a ring holds).
    pub fn queue_bytes(mut self, bytes: usize) -> Self {
        self.queue_bytes = bytes as u64;
        self
    }

    /// Whether each result's [`crate::Timing`] includes when its input was submitted and when
    /// it was delivered (default on). That is one or two clock reads per item in the coordinator:
    /// nothing beside a chunk of kilobytes, but for items of a few bytes, whose whole cost is a
    /// few hundred nanoseconds, a measurable part of it (`docs/benchmarks.md`). The worker's
    /// half (started, finished) is always there: it shares its clock reads with the busy time.
    pub fn item_timing(mut self, on: bool) -> Self {
        self.item_timing = on;
        self
    }

    /// Gives the pool a shared region of `bytes` (default 0: none), mapped in every worker: the
    /// program writes its chunks there with [`crate::Pool::shared_mut`] and sends
    /// [`crate::shared::Span`]s, which workers read in place. The memory is allocated when the
    /// pool is built (an `Err` if there is not enough). See [`crate::shared`].
    ///
    /// At most 64 TiB (half of a 47-bit address space); 0 means no region.
    pub fn shared_bytes(mut self, bytes: usize) -> Self {
        self.shared_bytes = bytes;
        self
    }

    /// Starts workers by running this program again instead of forking, serving the task that
    /// `main` registered under `name` with [`crate::spawn::serve`]. Safe in a process that runs
    /// other threads; see [`crate::spawn`] for when to use which. The name must not be empty
    /// nor hold a NUL byte (it travels in an environment variable).
    pub fn spawn(mut self, name: &str) -> Self {
        self.start = Start::Spawn(name.to_owned());
        self
    }

    /// [`spawn`](Self::spawn) with another program as the workers: `program args..` runs, and
    /// must call [`crate::spawn::serve`] for `name` before anything else, with a task of the
    /// same input and output types as the pool's (the worker checks, and refuses to start
    /// otherwise). For a worker executable of its own, or an interpreter that runs a
    /// language binding's worker (the Python binding starts `python -c ..` this way). The
    /// program file is opened at `build`, and every worker, replacements included, runs that
    /// file, as `spawn` does with this program's. It runs as `/proc/self/fd/N`, so it must be
    /// a binary (an ELF executable, such as an interpreter), not a `#!` script, whose
    /// interpreter could not open that path; give an absolute path, which `argv[0]` repeats.
    pub fn spawn_program(
        mut self,
        name: &str,
        program: impl Into<std::path::PathBuf>,
        args: impl IntoIterator<Item = impl Into<std::ffi::OsString>>,
    ) -> Self {
        self.start = Start::SpawnProgram {
            name: name.to_owned(),
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
        };
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
    /// (Replacements for dead workers are forked later by the pool's launcher, a copy of this
    /// process made at `build`: threads started after `build` never matter.)
    pub unsafe fn allow_threads(mut self) -> Self {
        self.check_threads = false;
        self
    }

    /// Checks every setting against its range (one line per setting, the ranges in
    /// [`limits`]), so that nothing later computes with a value it cannot take: a size that
    /// overflows, a deadline past the clock's end. `workers` is the number the pool will have
    /// (the default resolved).
    fn check(&self, workers: usize) -> Result<()> {
        use limits::*;
        WORKERS.check("workers", workers as u64)?;
        let (input, output) = (self.input_ring_bytes as u64, self.output_ring_bytes as u64);
        if input == output {
            RING_BYTES.check("ring_bytes", input)?;
        }
        RING_BYTES.check("input_ring_bytes", input)?;
        RING_BYTES.check("output_ring_bytes", output)?;
        QUEUE_BYTES.check("queue_bytes", self.queue_bytes)?;
        SHARED_BYTES.check("shared_bytes", self.shared_bytes as u64)?;
        START_TIMEOUT.check("start_timeout", self.start_timeout)?;
        SHUTDOWN_TIMEOUT.check("shutdown_timeout", self.shutdown_timeout)?;
        if let Some(t) = self.chunk_timeout {
            CHUNK_TIMEOUT.check("chunk_timeout", t)?;
        }
        MAX_ATTEMPTS.check("max_attempts", u64::from(self.max_attempts))?;
        MAX_START_ATTEMPTS.check("max_start_attempts", u64::from(self.max_start_attempts))?;
        RESTART_BACKOFF.check("restart_backoff", self.restart_backoff)?;
        if let Start::Spawn(name) | Start::SpawnProgram { name, .. } = &self.start {
            if name.is_empty() || name.contains('\0') {
                return Err(Error::InvalidArgument(format!(
                    "spawn's task name is {name:?}; it must be non-empty and hold no NUL byte"
                )));
            }
        }
        Ok(())
    }

    /// Checks the settings and resolves them (the core plan) into the value the pool keeps.
    pub(crate) fn into_config(self) -> Result<Config> {
        let allowed = pin::allowed_cores()?;
        let n = self.workers.unwrap_or(allowed.len());
        self.check(n)?;
        let cores = pin::plan(&self.pinning, n, &allowed)?;
        let low_priority = cores
            .iter()
            .map(|&c| pin::low_priority(&self.pinning, c, &allowed))
            .collect();
        let coordinator_wait = match (&self.pinning, self.wait) {
            (Pinning::SourceFirst, WaitStrategy::Adaptive) => WaitStrategy::Park,
            (_, wait) => wait,
        };
        Ok(Config {
            cores,
            low_priority,
            input_ring_bytes: self.input_ring_bytes,
            output_ring_bytes: self.output_ring_bytes,
            wait: self.wait,
            coordinator_wait,
            start_timeout: self.start_timeout,
            shutdown_timeout: self.shutdown_timeout,
            check_threads: self.check_threads && self.start == Start::Fork,
            max_attempts: self.max_attempts,
            max_start_attempts: self.max_start_attempts,
            restart_backoff: self.restart_backoff,
            chunk_timeout: self.chunk_timeout,
            start: self.start,
            validate_outputs: self.validate_outputs,
            shared_bytes: self.shared_bytes,
            queue_bytes: self.queue_bytes,
            item_timing: self.item_timing,
            stage_names: self.stage_names,
            doorbell: self.doorbell,
        })
    }
}

/// The range of each setting, stated once: [`Builder::check`] holds every setting to its
/// range, and each setting's documentation says the same in words.
mod limits {
    use super::*;

    const KIB: u64 = 1 << 10;
    const TIB: u64 = 1 << 40;
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

    pub(super) const WORKERS: Limit<u64> = Limit::new(1, 4096, "between 1 and 4096");
    pub(super) const RING_BYTES: Limit<u64> = Limit::new(4 * KIB, TIB, "between 4 KiB and 1 TiB");
    pub(super) const QUEUE_BYTES: Limit<u64> = Limit::new(1, TIB, "between 1 byte and 1 TiB");
    pub(super) const SHARED_BYTES: Limit<u64> =
        Limit::new(0, 64 * TIB, "at most 64 TiB (0: no region)");
    pub(super) const START_TIMEOUT: Limit<Duration> =
        Limit::new(Duration::from_millis(1), YEAR, "between 1 ms and one year");
    pub(super) const SHUTDOWN_TIMEOUT: Limit<Duration> =
        Limit::new(Duration::ZERO, YEAR, "at most one year");
    pub(super) const CHUNK_TIMEOUT: Limit<Duration> =
        Limit::new(Duration::from_millis(1), YEAR, "between 1 ms and one year");
    pub(super) const MAX_ATTEMPTS: Limit<u64> = Limit::new(1, 1000, "between 1 and 1000");
    pub(super) const MAX_START_ATTEMPTS: Limit<u64> = Limit::new(1, 1000, "between 1 and 1000");
    pub(super) const RESTART_BACKOFF: Limit<Duration> =
        Limit::new(Duration::ZERO, Duration::from_secs(10), "at most 10 s");

    /// The inclusive range of one setting, and how its error states it.
    pub(super) struct Limit<T> {
        min: T,
        max: T,
        says: &'static str,
    }

    impl<T: PartialOrd + Debug> Limit<T> {
        const fn new(min: T, max: T, says: &'static str) -> Self {
            Limit { min, max, says }
        }

        /// `Err(InvalidArgument)` naming `setting`, its value and its range, if `value` is out
        /// of it.
        pub(super) fn check(&self, setting: &str, value: T) -> Result<()> {
            if value < self.min || value > self.max {
                return Err(Error::InvalidArgument(format!(
                    "{setting} is {value:?}; it must be {}",
                    self.says
                )));
            }
            Ok(())
        }
    }
}
