//! The pool's runtime: the worker processes, their rings and the items they hold, and the
//! policy that keeps them running (start, health checks, respawn, shutdown).
//!
//! The supervisor owns everything that outlives one call: each worker's slot (process, rings,
//! the items handed to it and not yet answered), the shared counters, how workers start (the
//! launcher, which holds the task as it was at `build`, or the spawn name) and the record of
//! items that killed workers.
//! A call ([`crate::call`]) borrows it and does not wait inside it: every method here returns at
//! once, except start-up and shutdown, which have their own deadlines, and replacing a dead
//! worker, which reaps it and forks its successor through the launcher (a millisecond or two;
//! at most the launcher's 2 s answer deadline per exchange if the launcher itself is stopped).
//! A backoff between failed starts is never waited for here: the worker is down until then.
//!
//! What a death costs, and the watch clock the timeouts count on, are written down in
//! `src/wire/PROTOCOL.md` ("What a death costs").

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::marker::PhantomData;

use shmexec_shm::{ChildProcess, ExitStatus, FrameKind, Launcher, Peer, Ring, Segment, Waiter};

use super::config::{Config, Start};
use super::queue::Queue;
use super::slot::{Life, Watch, WorkerSlot};
use super::start::{Starter, launcher_setup, rings, warm_window, worker_main};
use crate::error::{Error, Result};
use crate::stats::{Doorbell, Field, PoolStats, StatsBlock, WorkerStats};
use crate::task::Task;
use crate::wire::{READY, SKIP_SILENTLY, START_SEQ, STOP, discard_check, read_report};

/// How often the coordinator looks for dead workers while it waits.
const HEALTH_CHECK_EVERY: Duration = Duration::from_millis(5);

/// The most that one gap between two health checks adds to a watch clock (the clock of the
/// chunk or start timeout), and (`TIMEOUT_SHARE`) at most this share of that timeout. A longer
/// gap means that the coordinator did not run (the whole program was stopped, or descheduled)
/// or was not driven: neither is the worker's fault. The share keeps a short timeout from being
/// used up by the first check after a pause.
const MAX_COUNTED_GAP: Duration = Duration::from_millis(250);
const TIMEOUT_SHARE: u32 = 10;

/// What a gap of `gap` between two health checks adds to the watch clock of `timeout`.
fn counted(gap: Duration, timeout: Duration) -> Duration {
    gap.min(MAX_COUNTED_GAP).min(timeout / TIMEOUT_SHARE)
}

/// The longest wait between two starts of a worker that keeps failing to start.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

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
    pub(crate) config: Config,
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
    /// Time the pool was driven, as the start timeout counts it (see [`MAX_COUNTED_GAP`]).
    watch: Duration,
    /// The same as the chunk timeout counts it.
    chunk_watch: Duration,
    /// The shared region, if the builder asked for one.
    pub(crate) shared: Option<Arc<Segment>>,
    /// How the coordinator waits on the workers' doorbell.
    pub(crate) doorbell_waiter: Waiter,
    /// Each worker's output ring, for the next group of a pipeline to read frames of in place
    /// (its workers are forked after these exist, so they map them too).
    pub(crate) output_rings: Vec<Ring>,
}

impl<T: Task> Supervisor<T> {
    /// Starts every worker (fork or spawn), runs `init` in each and waits until all are ready.
    pub(crate) fn start(config: Config, task: T) -> Result<Supervisor<T>> {
        // Before any segment exists: a pool too large for its cgroup is an error, not a kill.
        super::memory::admit(&config)?;
        let n = config.cores.len();
        let stats = StatsBlock::new(n, config.doorbell.as_ref())?;
        let shared = match config.shared_bytes {
            0 => None,
            bytes => Some(Arc::new(Segment::new(bytes)?)),
        };
        // Every ring exists before the launcher is forked: it maps them all.
        let rings = (0..n)
            .map(|_| rings(config.input_ring_bytes, config.output_ring_bytes))
            .collect::<Result<Vec<_>>>()?;
        let starter = match &config.start {
            Start::Spawn(name) => Starter::spawn(name, None)?,
            Start::SpawnProgram {
                name,
                program,
                args,
            } => Starter::spawn(name, Some((program, args)))?,
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
                // SAFETY: `start_with_unchecked` requires that no other thread hold a lock the
                // launcher or the workers take: this process has one thread (checked above), or
                // the user vouched for it with the unsafe `Builder::allow_threads`.
                let launcher = unsafe { Launcher::start_with_unchecked(launcher_setup, main) }
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
            watch: Duration::ZERO,
            chunk_watch: Duration::ZERO,
            shared,
            output_rings: Vec::new(),
        };
        sup.output_rings = rings.iter().map(|(_, output)| output.clone()).collect();
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
                watching: Watch::default(),
                life: Life::Up,
                failed_starts: 0,
                launched: Duration::ZERO,
                released_at_launch: 0,
                kill_reason: None,
                why: None,
                init_error: None,
                lost_outputs: None,
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
                pid: w.pid(),
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

    /// Replaces dead workers (at once, or after a backoff for one that keeps failing to
    /// start), and kills those past the chunk or start timeout. Cheap (a pidfd poll per worker)
    /// and done at most every few milliseconds, whoever drives the pool, so a death is noticed
    /// within a few ms of it mattering, whichever worker the caller waits on.
    ///
    /// An `Err` only for a pool broken earlier: a worker that cannot be started again is
    /// given up (its items fail), and the others go on.
    pub(crate) fn supervise(&mut self) -> Result<()> {
        if let Some(reason) = &self.broken {
            return Err(Error::Broken(reason.clone()));
        }
        let now = Instant::now();
        let gap = now.saturating_duration_since(self.last_health_check);
        if gap < HEALTH_CHECK_EVERY {
            return Ok(());
        }
        self.last_health_check = now;
        self.watch += counted(gap, self.config.start_timeout);
        if let Some(t) = self.config.chunk_timeout {
            self.chunk_watch += counted(gap, t);
        }
        for w in 0..self.slots.len() {
            match self.slots[w].life {
                Life::Failed => {}
                Life::Down { at } if now >= at => self.relaunch(w),
                Life::Down { .. } => {}
                Life::Up if self.slots[w].child.is_alive() => self.check_deadlines(w),
                Life::Up => self.on_death(w),
            }
            // Only the coordinator writes `Stop`, and only at shutdown: anything else there is
            // garbage (the workers ignore it; see `wire::STOP`).
            if self.stats.get(w, Field::Stop) != 0 {
                self.stats.set(w, Field::Stop, 0);
            }
        }
        Ok(())
    }

    /// Marks the pool unusable; returns `e` for the caller to report.
    pub(crate) fn break_with(&mut self, e: Error) -> Error {
        self.broken.get_or_insert_with(|| e.to_string());
        e
    }

    /// Gives up every worker at once, killing its process: a pool that can no longer be used
    /// (a pipeline's branch that failed) must not go on reading what others hold for it.
    pub(crate) fn give_up_all(&mut self) {
        for slot in &mut self.slots {
            if slot.life == Life::Up {
                let _ = slot.child.kill();
                let _ = slot.child.wait_timeout(Duration::from_secs(1));
            }
            slot.life = Life::Failed;
        }
    }

    /// Whether every worker was given up (see `Builder::max_start_attempts`).
    pub(crate) fn all_given_up(&self) -> bool {
        self.slots.iter().all(|s| s.life == Life::Failed)
    }

    /// `Err` when no worker can take input any more: each was given up.
    pub(crate) fn check_usable(&self) -> Result<()> {
        if let Some(reason) = &self.broken {
            return Err(Error::Broken(reason.clone()));
        }
        if self.all_given_up() {
            let why = self.slots.first().map(WorkerSlot::given_up);
            // Not recorded in `broken`: what is in flight is still handed out.
            return Err(Error::Broken(format!(
                "every worker was given up; worker 0 {}",
                why.unwrap_or_default()
            )));
        }
        Ok(())
    }

    /// Kills worker `w` if it is past its start timeout, or past the chunk timeout on one item
    /// or with queued items it does not take (stopped, or hung between items). Both count on
    /// the watch clock, and a worker waiting for room in its output ring (the caller has not
    /// taken its results) is not counted as slow.
    fn check_deadlines(&mut self, w: usize) {
        let (watch, chunk_watch) = (self.watch, self.chunk_watch);
        let (start_timeout, chunk_timeout) = (self.config.start_timeout, self.config.chunk_timeout);
        let started = self.stats.get(w, Field::State) == READY;
        let current = self.stats.get(w, Field::Current);
        let slot = &mut self.slots[w];
        if !started {
            if watch.saturating_sub(slot.launched) > start_timeout {
                slot.kill_reason = Some(format!("did not start within {start_timeout:?}"));
                let _ = slot.child.kill();
            }
            return;
        }
        let Some(limit) = chunk_timeout else {
            return;
        };
        let Ok(released) = slot.tx.released() else {
            return;
        };
        let idle = current == 0 && slot.tx.written() <= released;
        let moved = (current, released) != (slot.watching.current, slot.watching.released);
        if idle || moved || slot.rx.producer_waiting() {
            slot.watching = Watch {
                current,
                released,
                since: chunk_watch,
            };
            return;
        }
        if chunk_watch.saturating_sub(slot.watching.since) <= limit {
            return;
        }
        match slot.current_item(current) {
            // The item is given up when the worker's death is handled (`on_death`).
            Some(seq) => self.crashes.entry(seq).or_default().timed_out = Some(limit),
            None => {
                slot.kill_reason = Some(format!(
                    "left its queued items untouched for {limit:?} (stopped, or hung between items)"
                ));
            }
        }
        let _ = slot.child.kill();
        slot.watching.since = chunk_watch;
    }

    /// Handles the death of worker `w` (seen through its pidfd, or its ring closed): reaps it,
    /// charges the death to the item it was on (which is skipped after `max_attempts`) or, if
    /// it had not started, to its start, and starts a successor: at once, after a backoff, or
    /// never (the worker is given up).
    ///
    /// The successor takes over the same rings: it runs `init`, then reads the input ring from
    /// its tail, that is the item its predecessor died on (inputs are released only after
    /// their output is published) and everything queued behind it. Results already published
    /// stay in the output ring; a result published twice (a death between publishing and
    /// releasing) is dropped by sequence number when it arrives again.
    pub(crate) fn on_death(&mut self, w: usize) {
        let slot = &mut self.slots[w];
        if slot.life != Life::Up {
            return;
        }
        // Its exit status says what it died of (for the errors): a launcher that cannot say
        // in time does not hold up the successor.
        let status = match slot.child.wait_timeout(Duration::from_millis(200)) {
            Ok(Some(s)) => Some(s),
            _ => {
                let _ = slot.child.kill();
                slot.child
                    .wait_timeout(Duration::from_millis(200))
                    .ok()
                    .flatten()
            }
        };
        let signal = match status {
            Some(ExitStatus::Signaled(s)) => Some(s),
            _ => None,
        };
        // SYNC POINT with the worker's `State` and `Current` stores: the worker is dead (seen
        // through its pidfd), so its last stores are visible.
        let started = self.stats.get(w, Field::State) == READY;
        let current = self.stats.get(w, Field::Current);
        self.stats.set(w, Field::Current, 0);
        let released = slot.tx.released().ok();
        let progressed = released.is_some_and(|r| r > slot.released_at_launch);
        // A value that names no item handed to this worker is garbage: nothing is charged. An
        // item answered already but not released is charged too; once given up, its successor
        // lets it go without a frame (`wire::SKIP_SILENTLY`), as its outputs are out.
        let answered = released.and_then(|r| slot.answered_item(current, r));
        let charged = slot
            .current_item(current)
            .map(|seq| (seq, 0))
            .or(answered.map(|seq| (seq, SKIP_SILENTLY)));
        if let Some((seq, how)) = charged {
            let entry = self.crashes.entry(seq).or_default();
            entry.count += 1;
            entry.signal = signal;
            if entry.count >= self.config.max_attempts || entry.timed_out.is_some() {
                // SYNC POINT with the successor's `Skip` load before it runs this item: this
                // store comes before the successor is started.
                self.stats.set(w, Field::Skip, current | how);
            }
        }
        let how = status.map_or_else(|| "died".to_owned(), |s| format!("{s:?}"));
        let why = match slot.kill_reason.take() {
            Some(reason) => format!("killed: it {reason}"),
            None if !started => format!("{how} before it was ready"),
            None => how,
        };
        slot.why = Some(why);
        if progressed {
            slot.failed_starts = 0;
        }
        if !started {
            slot.failed_starts += 1;
        }
        self.schedule(w);
    }

    /// Starts worker `w` again now, or after the backoff its failed starts call for, or gives
    /// it up.
    fn schedule(&mut self, w: usize) {
        let slot = &mut self.slots[w];
        let failed = slot.failed_starts;
        if failed >= self.config.max_start_attempts.max(1) {
            slot.life = Life::Failed;
            return;
        }
        // The first successor starts at once; each one after a failed start waits twice as
        // long as the one before it.
        let backoff = match failed {
            0 => Duration::ZERO,
            n => self
                .config
                .restart_backoff
                .saturating_mul(1u32 << (n - 1).min(20))
                .min(MAX_BACKOFF),
        };
        if backoff.is_zero() {
            self.relaunch(w);
        } else {
            slot.life = Life::Down {
                at: Instant::now() + backoff,
            };
        }
    }

    /// Starts a successor for the dead worker `w`; a start that fails (the fork, the launcher)
    /// counts as a failed start.
    fn relaunch(&mut self, w: usize) {
        // SYNC POINT with the successor's `State` store after its `init`: cleared before it
        // is started.
        self.stats.set(w, Field::State, 0);
        let input = self.slots[w].input.clone();
        let started = self.start_worker(w, &input).and_then(|child| {
            let pid = child.pid();
            Ok((child, Peer::process(pid)?, Peer::process(pid)?))
        });
        let (watch, chunk_watch) = (self.watch, self.chunk_watch);
        let slot = &mut self.slots[w];
        match started {
            Ok((child, tx_peer, rx_peer)) => {
                slot.tx.set_peer(tx_peer);
                slot.rx.set_peer(rx_peer);
                slot.child = child;
                slot.life = Life::Up;
                slot.launched = watch;
                slot.released_at_launch = slot.tx.released().unwrap_or(0);
                slot.watching = Watch {
                    since: chunk_watch,
                    ..Watch::default()
                };
                slot.respawns += 1;
                self.totals.respawns += 1;
            }
            Err(e) => {
                slot.why = Some(format!("could not be started: {e}"));
                slot.failed_starts += 1;
                // Not `Up`: `schedule` starts it again or gives it up.
                slot.life = Life::Down { at: Instant::now() };
                self.schedule(w);
            }
        }
    }

    /// Worker `w`'s output ring cannot be read (a header failed its checks, `reason`), so
    /// nothing behind that point can be found: kills the worker, drops what it published and
    /// nobody read, and starts a successor. The items it had finished lose their output (they
    /// fail with `InvalidOutput`); the others are run again by the successor. Only `Err` if
    /// the ring's own indices are garbage.
    pub(crate) fn reset_output(&mut self, w: usize, reason: &str) -> Result<()> {
        let slot = &mut self.slots[w];
        let _ = slot.child.kill();
        if !slot.child.exits_within(Duration::from_secs(1)) {
            return Err(Error::Broken(format!(
                "worker {w}'s output ring is corrupt ({reason}) and the worker does not die"
            )));
        }
        let released = slot.tx.released()?;
        slot.rx.discard_unread()?;
        slot.lost_outputs = Some((released, reason.to_owned()));
        // Killed for the ring, not for the item it was on: nothing is charged to that item.
        self.stats.set(w, Field::Current, 0);
        self.slots[w].kill_reason = Some(format!("had a corrupt output ring ({reason})"));
        self.on_death(w);
        Ok(())
    }

    /// What the pool knows of an item given up after crashes or a timeout.
    pub(crate) fn crash_record(&self, seq: u64) -> Crash {
        self.crashes.get(&seq).copied().unwrap_or_default()
    }

    /// Results still to come belong to nobody now (their call ended): they are discarded as
    /// they arrive, and workers close the items they have not started without running them,
    /// so the next call does not wait behind them.
    pub(crate) fn abandon_all(&mut self) {
        let below = self.next_seq;
        for (i, w) in self.slots.iter_mut().enumerate() {
            if w.expect.is_empty() {
                continue;
            }
            w.abandon();
            // SYNC POINT with the worker's loads before each item: both words are written
            // here only, and a worker honours a pair only if they match, so a torn read (one
            // old, one new) just runs the item.
            self.stats.set(i, Field::Discard, below);
            self.stats.set(i, Field::DiscardCheck, discard_check(below));
        }
    }

    /// Items of any call handed to a worker and not answered yet.
    pub(crate) fn unanswered(&self) -> usize {
        self.slots.iter().map(|w| w.expect.len()).sum()
    }

    /// Waits for every worker's start-up frame.
    fn await_start(&mut self) -> Result<()> {
        let timeout = self.config.start_timeout;
        let deadline = Instant::now().checked_add(timeout).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "start_timeout {timeout:?} is past the clock's range"
            ))
        })?;
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
                FrameKind::Error => Err(read_report(i, START_SEQ, &frame, &[])),
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
            self.stats.set(i, Field::Stop, STOP);
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
