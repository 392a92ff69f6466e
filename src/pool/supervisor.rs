//! The pool's runtime: the worker processes, their rings and the items they hold, and the
//! policy that keeps them running (start, health checks, respawn, shutdown).
//!
//! The supervisor owns everything that outlives one call: each worker's slot (process, rings,
//! the items handed to it and not yet answered), the shared counters, how workers start (the
//! launcher, which holds the task as it was at `build`, or the spawn name) and the record of
//! items that killed workers.
//! A call ([`crate::call`]) borrows it and never blocks inside it: every method here returns at
//! once, except start-up and shutdown, which have their own deadlines.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::marker::PhantomData;

use shmexec_shm::{ChildProcess, ExitStatus, FrameKind, Launcher, Peer, Ring, Segment, Waiter};

use super::config::{Config, Start};
use super::queue::Queue;
use super::slot::WorkerSlot;
use super::start::{Starter, rings, warm_window, worker_main};
use crate::error::{Error, Result};
use crate::stats::{Doorbell, Field, PoolStats, StatsBlock, WorkerStats};
use crate::task::Task;
use crate::wire::{EXIT_INIT_FAILED, START_SEQ, read_report};

/// How often the coordinator looks for dead workers while it waits.
const HEALTH_CHECK_EVERY: Duration = Duration::from_millis(5);

/// What the pool knows of an item that killed (or hung) its worker.
#[derive(Clone, Copy, Default)]
pub(crate) struct Crash {
    pub(crate) count: u32,
    pub(crate) signal: Option<i32>,
    /// Set when the worker was killed for overrunning the chunk timeout.
    pub(crate) timed_out: Option<Duration>,
}

/// The pool's runtime; see the module documentation.
pub(crate) struct Supervisor<T: Task> {
    pub(crate) slots: Vec<WorkerSlot>,
    stats: StatsBlock,
    config: Config,
    /// `None` only once the pool has shut down.
    starter: Option<Starter>,
    /// The task itself lives in the launcher (fork) or is made by each worker (spawn).
    _task: PhantomData<fn() -> T>,
    /// The sequence number the next input gets (all calls of the pool count on).
    next_seq: u64,
    /// Why the pool cannot go on, once something could not be repaired.
    pub(crate) broken: Option<String>,
    pub(crate) totals: PoolStats,
    /// Items that crashed a worker: how often, and the last signal.
    crashes: HashMap<u64, Crash>,
    last_health_check: Instant,
    /// The shared region, if the builder asked for one.
    pub(crate) shared: Option<Arc<Segment>>,
    /// How the coordinator waits on the workers' doorbell.
    pub(crate) doorbell_waiter: Waiter,
}

impl<T: Task> Supervisor<T> {
    /// Starts every worker (fork or spawn), runs `init` in each and waits until all are ready.
    pub(crate) fn start(config: Config, task: T) -> Result<Supervisor<T>> {
        let n = config.cores.len();
        let stats = StatsBlock::new(n)?;
        let shared = match config.shared_bytes {
            0 => None,
            bytes => Some(Arc::new(Segment::new(bytes)?)),
        };
        // Every ring exists before the launcher is forked: it maps them all.
        let rings = (0..n)
            .map(|_| rings(config.input_ring_bytes, config.output_ring_bytes))
            .collect::<Result<Vec<_>>>()?;
        let starter = match &config.start {
            Start::Spawn(name) => Starter::spawn(name)?,
            Start::Fork => {
                if config.check_threads {
                    let threads = shmexec_shm::process::thread_count();
                    if threads > 1 {
                        return Err(Error::Start(format!(
                            "this process runs {threads} threads and fork keeps only one, so a \
                             lock held by another thread could stay locked in every worker. \
                             Build the pool before starting threads (rayon, tokio, ...), or use \
                             Builder::spawn, or see Builder::allow_threads"
                        )));
                    }
                }
                let main = worker_main(&config, task, rings.clone(), stats.clone(), shared.clone());
                // SAFETY: `start_unchecked` requires that no other thread hold a lock the
                // launcher or the workers take: this process has one thread (checked above), or
                // the user vouched for it with the unsafe `Builder::allow_threads`.
                let launcher = unsafe { Launcher::start_unchecked(main) }
                    .map_err(|e| Error::Start(format!("cannot fork the launcher: {e}")))?;
                Starter::Launcher(launcher)
            }
        };
        let mut sup = Supervisor {
            slots: Vec::with_capacity(n),
            stats,
            doorbell_waiter: Waiter::new(config.coordinator_wait),
            config,
            starter: Some(starter),
            _task: PhantomData,
            next_seq: 0,
            broken: None,
            totals: PoolStats::default(),
            crashes: HashMap::new(),
            last_health_check: Instant::now(),
            shared,
        };
        for (index, (input, output)) in rings.into_iter().enumerate() {
            let child = sup.start_worker(index, &input)?;
            let pid = child.pid();
            let mut tx = input.producer(Peer::process(pid)?)?;
            let mut rx = output.consumer(Peer::process(pid)?)?;
            tx.set_wait_strategy(sup.config.coordinator_wait);
            tx.set_warm_window(warm_window(&input));
            rx.set_wait_strategy(sup.config.coordinator_wait);
            sup.slots.push(WorkerSlot {
                child,
                tx,
                rx,
                input,
                expect: Queue::default(),
                next_part: 0,
                live: 0,
                respawns: 0,
                watching: (0, Instant::now()),
            });
        }
        sup.await_start()?;
        Ok(sup)
    }

    /// Starts worker `index` over its rings (`input` is the first ring of its segment).
    fn start_worker(&self, index: usize, input: &Ring) -> Result<ChildProcess> {
        match &self.starter {
            None => Err(Error::Broken("the pool has shut down".into())),
            Some(Starter::Launcher(launcher)) => launcher.launch(index as u32).map_err(|e| {
                Error::Start(format!("the launcher could not fork worker {index}: {e}"))
            }),
            Some(Starter::Spawn { name, spawner }) => crate::spawn::spawn_worker(
                spawner,
                name,
                &crate::spawn::task_types::<T>(),
                &self.config.worker_info(index),
                input,
                Ring::footprint(input.capacity()),
                &self.stats,
                self.shared.as_deref(),
                self.config.wait,
            ),
        }
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// The pool's doorbell: every worker rings it as it lets go of an input (its result is out
    /// and its queue has room), so one wait covers "a result came" and "a worker has room".
    pub(crate) fn doorbell(&self) -> Doorbell {
        self.stats.doorbell()
    }

    /// The sequence number the next input will get.
    pub(crate) fn peek_seq(&self) -> u64 {
        self.next_seq
    }

    /// Takes the next sequence number.
    pub(crate) fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// The largest input archive a worker's ring takes.
    pub(crate) fn max_input_bytes(&self) -> usize {
        self.slots.first().map_or(0, |w| w.tx.max_payload())
    }

    /// Counters of every worker and of the coordinator since the pool started.
    pub(crate) fn stats(&self) -> PoolStats {
        let mut s = self.totals.clone();
        s.workers = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, w)| WorkerStats {
                index: i,
                pid: w.child.pid(),
                core: self.config.cores[i],
                chunks: self.stats.get(i, Field::Chunks),
                bytes_in: self.stats.get(i, Field::BytesIn),
                bytes_out: self.stats.get(i, Field::BytesOut),
                region_bytes_read: self.stats.get(i, Field::RegionBytes),
                busy: Duration::from_nanos(self.stats.get(i, Field::BusyNs)),
                errors: self.stats.get(i, Field::Errors),
                respawns: w.respawns,
            })
            .collect();
        s
    }

    /// Replaces dead workers and kills those past the chunk timeout. Cheap (a pidfd poll per
    /// worker) and done at most every few milliseconds, whoever drives the pool, so a death is
    /// noticed within a few ms of it mattering, whichever worker the caller waits on.
    ///
    /// An `Err` means a worker could not be replaced: the pool is then broken.
    pub(crate) fn supervise(&mut self) -> Result<()> {
        if let Some(reason) = &self.broken {
            return Err(Error::Broken(reason.clone()));
        }
        if self.last_health_check.elapsed() < HEALTH_CHECK_EVERY {
            return Ok(());
        }
        let now = Instant::now();
        self.last_health_check = now;
        for w in 0..self.slots.len() {
            if let Some(limit) = self.config.chunk_timeout {
                let current = self.stats.get(w, Field::Current);
                let slot = &mut self.slots[w];
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
            if !self.slots[w].child.is_alive() {
                self.respawn(w).map_err(|e| self.break_with(e))?;
            }
        }
        Ok(())
    }

    /// Marks the pool unusable; returns `e` for the caller to report.
    pub(crate) fn break_with(&mut self, e: Error) -> Error {
        self.broken.get_or_insert_with(|| e.to_string());
        e
    }

    /// Replaces the dead worker `w`: reaps it, charges the item it died on, and starts a
    /// successor on the same core over the same rings. The successor runs `init`, then takes
    /// the input ring from its tail: the item its predecessor died on (inputs are released only
    /// after their output is published) and everything queued behind it. Results already
    /// published stay in the output ring; a result published twice (a death between publishing
    /// and releasing) is dropped by sequence number when it arrives again.
    pub(crate) fn respawn(&mut self, w: usize) -> Result<()> {
        let slot = &mut self.slots[w];
        // Its exit status says what it died of. A launcher that cannot say (it does not answer)
        // is asked once: the successor's launch below finds out whether it is there at all.
        let status = match slot.child.wait_timeout(Duration::from_millis(200)) {
            Ok(Some(s)) => Some(s),
            Ok(None) => {
                let _ = slot.child.kill();
                slot.child
                    .wait_timeout(Duration::from_secs(1))
                    .ok()
                    .flatten()
            }
            Err(_) => None,
        };
        let signal = match status {
            Some(ExitStatus::Signaled(s)) => Some(s),
            // A successor whose `init` failed: replacing it again would fail again.
            Some(ExitStatus::Exited(EXIT_INIT_FAILED)) => {
                return Err(Error::Init {
                    worker: w,
                    message: "Task::init failed in a replacement worker".into(),
                });
            }
            _ => None,
        };
        // SYNC POINT with the worker's `Current` store before each item: the worker is dead
        // (reaped above), so its last store is visible.
        let current = self.stats.get(w, Field::Current);
        self.stats.set(w, Field::Current, 0);
        if let Some(seq) = current.checked_sub(1) {
            let entry = self.crashes.entry(seq).or_default();
            entry.count += 1;
            entry.signal = signal;
            if entry.count >= self.config.max_attempts || entry.timed_out.is_some() {
                // SYNC POINT with the successor's `Skip` load before it runs this item: this
                // store comes before the successor is started below.
                self.stats.set(w, Field::Skip, current);
            }
        }
        let input = self.slots[w].input.clone();
        let child = self.start_worker(w, &input)?;
        let slot = &mut self.slots[w];
        let new_pid = child.pid();
        slot.tx.set_peer(Peer::process(new_pid)?);
        slot.rx.set_peer(Peer::process(new_pid)?);
        slot.child = child;
        slot.respawns += 1;
        self.totals.respawns += 1;
        Ok(())
    }

    /// What the pool knows of an item given up after crashes or a timeout.
    pub(crate) fn crash_record(&self, seq: u64) -> Crash {
        self.crashes.get(&seq).copied().unwrap_or_default()
    }

    /// Results still to come belong to nobody now (their call ended): they are discarded as
    /// they arrive.
    pub(crate) fn abandon_all(&mut self) {
        for w in &mut self.slots {
            w.abandon();
        }
    }

    /// Items of any call handed to a worker and not answered yet.
    pub(crate) fn unanswered(&self) -> usize {
        self.slots.iter().map(|w| w.expect.len()).sum()
    }

    /// Waits for every worker's start-up frame.
    fn await_start(&mut self) -> Result<()> {
        let timeout = self.config.start_timeout;
        let deadline = Instant::now() + timeout;
        for (i, w) in self.slots.iter_mut().enumerate() {
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
        for (i, w) in self.slots.iter_mut().enumerate() {
            self.stats.set(i, Field::Stop, 1);
            if let Ok(Some(mut g)) = w.tx.try_reserve(0) {
                g.set_kind(FrameKind::End);
                g.commit();
            }
        }
        let deadline = Instant::now() + self.config.shutdown_timeout;
        for w in &mut self.slots {
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
            // Not reaped here: the launcher reaps its workers as it exits (below), and a spawned
            // worker is reaped when its handle drops.
            if !w.child.exits_within(left) {
                let _ = w.child.kill();
            }
        }
        // Last: the launcher, which reaped the workers above, kills any left and exits.
        self.slots.clear();
        self.starter = None;
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

impl<T: Task> Drop for Supervisor<T> {
    fn drop(&mut self) {
        self.shut_down();
    }
}
