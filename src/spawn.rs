//! The `spawn` start method: workers that are fresh processes (the current program, run again)
//! instead of forks, for hosts that run threads (a tokio service, a program with a thread pool).
//!
//! A forked child keeps only the thread that forked, so a lock held by any other thread at
//! that moment stays locked in the worker forever; `fork` is therefore refused in a
//! multi-threaded process. With `spawn`, the coordinator starts the program again
//! (`/proc/self/exe`) with the pool's shared memory inherited as descriptors and the task named
//! in the environment; the program's `main` calls [`serve`] first, which sees that it is a
//! worker, builds the task, and runs the worker loop until the pool shuts down.
//!
//! ```no_run
//! use shmexec::{Pool, Samples};
//!
//! fn sum_task() -> impl shmexec::Task<Input = Vec<f32>, Output = f32> {
//!     shmexec::from_fn::<Vec<f32>, _, _>(|c| c.samples().iter().sum::<f32>())
//! }
//!
//! fn main() -> Result<(), shmexec::Error> {
//!     // First thing in main: in a worker this never returns.
//!     shmexec::spawn::serve("sum", sum_task);
//!     // ... threads may run from here on ...
//!     let mut pool = Pool::builder().workers(2).spawn("sum").build(sum_task())?;
//!     for s in pool.map(vec![vec![1.0f32; 1024]; 4]) {
//!         println!("{}", s?.to_native());
//!     }
//!     Ok(())
//! }
//! ```
//!
//! Which to use: `fork` (the default) is faster to start and needs nothing in `main`, and is
//! right for programs that build their pool before starting threads (benchmarks, batch jobs,
//! services that build their pools first thing in `main`): its workers, replacements
//! included, are forked by the pool's launcher, a single-threaded copy of the program made at
//! `build`, so threads started after `build` never matter. `spawn` is right for programs that
//! already run threads when they build a pool (a pool built inside a tokio service, a plugin
//! loaded late).
//!
//! Lifetimes. Every spawned worker, replacements included, is started by the pool's spawner
//! thread (`shmexec_shm::spawner`), which lives as long as the pool: the kernel's death signal
//! (`PR_SET_PDEATHSIG`) fires when the thread that created a child exits, so a worker started by
//! the thread that happened to drive the pool (a tokio blocking thread, a scoped thread) would
//! die with that thread. The spawner also holds the program file open from `build` and runs it
//! through that descriptor, so a replacement started after the program was upgraded or deleted
//! on disk runs the program the pool started with.
//!
//! What a task starts. A spawned worker leads a process group of its own, and the pool kills
//! that group when it reaps the worker (after a death, before the replacement starts) and when
//! it drops the worker: a child a task started (`Command::spawn`, a forked helper) dies with its
//! worker and does not keep the rings mapped after the pool is gone. The coordinator cannot be
//! a child subreaper for them (as a forked pool's launcher is): that is a setting of the whole
//! host process, which would then inherit, and have to reap, the orphans of every child it
//! ever starts. Limits, and the price of the group: a process that leaves the group (`setsid`,
//! `setpgid`) escapes; so does every group member if the coordinator dies without dropping the
//! pool (the workers die by their death signal, nobody kills their groups); and the workers
//! are out of the terminal's job control: Ctrl-C and Ctrl-Z reach the coordinator, not them (a
//! stopped coordinator leaves its workers idle; an interrupted one takes them down with it),
//! and a worker that reads the terminal, or writes to it under `stty tostop`, is stopped by
//! SIGTTIN or SIGTTOU (their standard input is `/dev/null`).

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use shmexec_shm::{ChildProcess, Ring, Segment, Spawner, WaitStrategy};

use crate::error::{Error, Result};
use crate::stats::StatsBlock;
use crate::task::{Task, WorkerInfo};
use crate::wire::EXIT_BAD_SETUP;
use crate::worker;

const ENV_TASK: &str = "SHMEXEC_SPAWN_TASK";
const ENV_WORKER: &str = "SHMEXEC_SPAWN_WORKER";
/// The input and output types of the pool's task, as [`task_types`] writes them.
const ENV_TYPES: &str = "SHMEXEC_SPAWN_TYPES";

/// Set once [`serve`] took this process as a worker: a pool it builds later (in `init`, say)
/// is its own, not a sign that no `serve` matched.
static SERVING: AtomicBool = AtomicBool::new(false);

/// What a spawned worker proves it serves: its task's input and output types. Within one
/// program (the coordinator runs the same executable) equal types give equal names.
pub(crate) fn task_types<T: Task>() -> String {
    format!(
        "{} -> {}",
        std::any::type_name::<T::Input>(),
        std::any::type_name::<T::Output>()
    )
}

/// The value of an absent field in the worker spec: no core to pin to, no shared region.
const NONE: u64 = u64::MAX;

/// Runs the worker loop and exits if this process was spawned as a worker of the task `name`
/// (built by `make`); returns at once otherwise. Call it first in `main`, once per task the
/// program's pools spawn.
pub fn serve<T: Task>(name: &str, make: impl FnOnce() -> T) {
    if std::env::var(ENV_TASK).ok().as_deref() != Some(name) {
        return;
    }
    SERVING.store(true, Ordering::Relaxed);
    let code = match attach() {
        Ok(attached) => {
            let setup = attached.setup();
            let serves = task_types::<T>();
            if attached.types != serves {
                worker::refuse(
                    setup,
                    format!(
                        "the task this program serves as {name:?} takes {serves}, but the pool \
                         was built for {}: build it with the task that `serve({name:?}, ..)` \
                         makes",
                        attached.types
                    ),
                )
            } else {
                let mut task = make().into_worker(crate::task::Token(()));
                worker::run(&mut task, setup)
            }
        }
        Err(e) => {
            eprintln!("shmexec: spawned worker of {name:?} cannot start: {e}");
            EXIT_BAD_SETUP
        }
    };
    std::process::exit(code);
}

/// Called first thing in `Builder::build`: a process spawned as a worker that gets here ran no
/// [`serve`] for its task's name (a misspelt name, a `serve` call missing or placed after other
/// work in `main`), and is running the program's own `main` by mistake. It tells the pool so
/// and exits, instead of doing the program's work a second time.
pub(crate) fn refuse_if_unserved() {
    if SERVING.load(Ordering::Relaxed) {
        return;
    }
    let Ok(name) = std::env::var(ENV_TASK) else {
        return;
    };
    let code = match attach() {
        Ok(attached) => {
            let setup = attached.setup();
            worker::refuse(
                setup,
                format!(
                    "this program has no shmexec::spawn::serve({name:?}, ..) before it builds a \
                     pool: call serve for every task name it spawns, first thing in main"
                ),
            )
        }
        Err(e) => {
            eprintln!("shmexec: spawned worker of {name:?} cannot start: {e}");
            EXIT_BAD_SETUP
        }
    };
    std::process::exit(code);
}

/// What a spawned worker finds in its environment.
struct Attached {
    info: WorkerInfo,
    input: Ring,
    output: Ring,
    stats: StatsBlock,
    shared: Option<Arc<Segment>>,
    wait: WaitStrategy,
    /// The pool's task types ([`task_types`]).
    types: String,
}

impl Attached {
    /// What the worker loop needs, over the attached rings.
    fn setup(&self) -> worker::Setup<'_> {
        worker::Setup {
            info: self.info.clone(),
            input: &self.input,
            output: &self.output,
            stats: &self.stats,
            shared: self.shared.clone(),
            wait: self.wait,
        }
    }
}

/// Reopens an inherited descriptor by number through /proc (safe: no claim of ownership over a
/// raw number is needed, and a wrong number is an error, not undefined behaviour).
fn reopen(fd: i32) -> Result<Arc<Segment>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{fd}"))
        .map_err(|e| Error::Start(format!("cannot reopen inherited descriptor {fd}: {e}")))?;
    Ok(Arc::new(Segment::from_fd(OwnedFd::from(file))?))
}

fn attach() -> Result<Attached> {
    let spec =
        std::env::var(ENV_WORKER).map_err(|_| Error::Start(format!("{ENV_WORKER} is not set")))?;
    let f: Vec<&str> = spec.split_whitespace().collect();
    let num = |i: usize| -> Result<u64> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Error::Start(format!("{ENV_WORKER}={spec:?}: field {i}")))
    };
    let (index, workers, core, wait) = (num(0)?, num(1)?, num(2)?, num(3)?);
    let (coordinator, ring_fd, in_off, out_off, stats_fd, shared_fd) =
        (num(4)?, num(5)?, num(6)?, num(7)?, num(8)?, num(9)?);
    let low_priority = num(10)? != 0;
    // Die with the coordinator, and go now if it is already gone (the death signal, set
    // before exec, survives it).
    if shmexec_shm::process::parent_pid() as u64 != coordinator {
        return Err(Error::Start("the coordinator is gone".into()));
    }
    let rings = reopen(ring_fd as i32)?;
    let input = Ring::attach(Arc::clone(&rings), in_off as usize)?;
    let output = Ring::attach(rings, out_off as usize)?;
    let stats = StatsBlock::from_segment(reopen(stats_fd as i32)?);
    let shared = match shared_fd {
        NONE => None,
        fd => Some(reopen(fd as i32)?),
    };
    // Reopened above: the inherited numbers themselves would pass, open, into every program the
    // task runs.
    let inherited = [ring_fd, stats_fd, shared_fd];
    crate::hygiene::close_inherited(&inherited.map(|fd| fd as i32));
    let types = std::env::var(ENV_TYPES).unwrap_or_default();
    Ok(Attached {
        types,
        info: WorkerInfo {
            index: index as usize,
            workers: workers as usize,
            core: (core != NONE).then_some(core as usize),
            low_priority,
        },
        input,
        output,
        stats,
        shared,
        wait: match wait {
            0 => WaitStrategy::Spin,
            1 => WaitStrategy::Park,
            _ => WaitStrategy::Adaptive,
        },
    })
}

/// Starts a worker of task `name` as a new process running this program, through the pool's
/// `spawner`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn spawn_worker(
    spawner: &Spawner,
    name: &str,
    types: &str,
    info: &WorkerInfo,
    input: &Ring,
    output_offset: usize,
    stats: &StatsBlock,
    shared: Option<&Segment>,
    wait: WaitStrategy,
) -> Result<ChildProcess> {
    let mut keep = vec![input.segment().fd(), stats.segment().fd()];
    keep.extend(shared.map(|s| s.fd()));
    let me = std::process::id();
    // The child gets the kept descriptors under the numbers the spawner gives them.
    let configure = |cmd: &mut std::process::Command, fds: &[i32]| {
        let spec = format!(
            "{} {} {} {} {me} {} 0 {output_offset} {} {} {}",
            info.index,
            info.workers,
            info.core.map_or(NONE, |c| c as u64),
            match wait {
                WaitStrategy::Spin => 0,
                WaitStrategy::Park => 1,
                WaitStrategy::Adaptive => 2,
            },
            fds[0],
            fds[1],
            fds.get(2).map_or(NONE, |&fd| fd as u64),
            u8::from(info.low_priority),
        );
        cmd.env(ENV_TASK, name)
            .env(ENV_WORKER, spec)
            .env(ENV_TYPES, types)
            .stdin(std::process::Stdio::null());
    };
    spawner
        .spawn(&keep, true, configure)
        .map_err(|e| Error::Start(format!("cannot spawn a worker: {e}")))
}
