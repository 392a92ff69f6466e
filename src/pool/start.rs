//! How workers start: forked by the pool's launcher from a copy of the program made at `build`,
//! or spawned (this program run again); and the rings each one gets.

use std::sync::Arc;

use shmexec_shm::{Launcher, Ring, Segment, Spawner};

use super::config::Config;
use crate::error::{Error, Result};
use crate::stats::StatsBlock;
use crate::task::{Task, WorkerInfo};
use crate::wire::EXIT_BAD_SETUP;
use crate::worker;

/// The warm window of the coordinator's input producers (`shmexec_shm::Producer::
/// set_warm_window`): with short queues, chunks keep reusing the first few MiB of an input ring
/// (a quarter of a small one) while they are in cache instead of walking all of it.
///
/// Output rings keep walking the whole ring: there the run-ahead matters more. In an ordered
/// call the coordinator waits on one worker while the others' results pile up, and after an
/// early wrap a worker could only run a window ahead until the coordinator stepped past the
/// padding.
pub(super) fn warm_window(ring: &Ring) -> u64 {
    (8u64 << 20).min(ring.capacity() as u64 / 4)
}
/// How the supervisor starts a worker `index`.
pub(super) enum Starter {
    /// Forked by the pool's launcher (see `shmexec_shm::launcher`), from a copy of this process
    /// made at `build`, before any thread of the host existed: safe whatever threads the host
    /// runs by the time a replacement is needed.
    Launcher(Launcher),
    /// This program run again (see [`crate::spawn`]) as the task `name`, by `spawner`, the
    /// pool's thread that starts every spawned worker.
    Spawn { name: String, spawner: Spawner },
}

impl Starter {
    /// Spawned workers serving `name`: opens the program file (this program's, or `program`
    /// run with its arguments) and starts the spawner thread.
    pub(super) fn spawn(
        name: &str,
        program: Option<(&std::path::Path, &[std::ffi::OsString])>,
    ) -> Result<Starter> {
        let spawner = match program {
            None => Spawner::start(),
            Some((program, args)) => Spawner::start_program(program, args.to_vec()),
        }
        .map_err(|e| Error::Start(format!("cannot start the spawner thread: {e}")))?;
        Ok(Starter::Spawn {
            name: name.to_owned(),
            spawner,
        })
    }
}

/// The function the launcher runs in each worker it forks: the worker loop over worker
/// `index`'s rings, with the launcher's copy of the task as it was at `build`.
pub(super) fn worker_main<T: Task>(
    config: &Config,
    task: T,
    rings: Vec<(Ring, Ring)>,
    stats: StatsBlock,
    shared: Option<Arc<Segment>>,
) -> impl FnMut(u32) -> i32 {
    let infos: Vec<WorkerInfo> = (0..config.cores.len())
        .map(|i| config.worker_info(i))
        .collect();
    let wait = config.wait;
    let mut task = task.into_worker(crate::task::Token(()));
    move |index: u32| {
        let index = index as usize;
        let (Some((input, output)), Some(info)) = (rings.get(index), infos.get(index)) else {
            return EXIT_BAD_SETUP;
        };
        let setup = worker::Setup {
            info: info.clone(),
            input,
            output,
            stats: &stats,
            shared: shared.clone(),
            wait,
        };
        worker::run(&mut task, setup)
    }
}

/// What the launcher runs once, before it forks any worker: it closes the pool's descriptors
/// there, so that no worker inherits them. (Each worker closing them itself would scan every
/// descriptor of the pool, two per worker, in each worker: a build quadratic in the workers.)
pub(super) fn launcher_setup() {
    // The launcher is forked before any worker exists: it holds no pidfd of one.
    crate::hygiene::close_pool_descriptors(&[]);
}

/// One worker's input and output ring, in a segment of their own.
pub(super) fn rings(input: usize, output: usize) -> Result<(Ring, Ring)> {
    let in_len = Ring::footprint(input);
    // Saturates: sizes no ring can have (the builder refuses them) make a segment refused.
    let seg = Arc::new(Segment::new(
        in_len.saturating_add(Ring::footprint(output)),
    )?);
    let a = Ring::init_in(Arc::clone(&seg), 0, input)?;
    let b = Ring::init_in(seg, in_len, output)?;
    Ok((a, b))
}
