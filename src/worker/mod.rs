//! The loop a worker process runs, from fork to exit.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use shmexec_shm::{FrameKind, Peer, Producer, Ring, Segment, WaitStrategy};

use crate::pin;
use crate::stats::{Field, StatsBlock};
use crate::task::WorkerInfo;
use crate::task::bytes::{ByteTask, ItemFailure};
use crate::task::sink::{Outcome, OutputSink, send_empty, send_report};
use crate::wire::{
    Code, EXIT_COORDINATOR_GONE, EXIT_INIT_FAILED, EXIT_OK, READY, Report, SKIP_SILENTLY,
    START_SEQ, STOP, StageFailure, discard_check, panic_message,
};

/// Everything a worker needs, prepared by the coordinator before the fork.
pub(crate) struct Setup<'a> {
    pub(crate) info: WorkerInfo,
    pub(crate) input: &'a Ring,
    pub(crate) output: &'a Ring,
    pub(crate) stats: &'a StatsBlock,
    /// The pool's shared region, if it has one.
    pub(crate) shared: Option<Arc<Segment>>,
    pub(crate) wait: WaitStrategy,
}

/// Tells the coordinator that this process will not serve (its start-up report is an `Init`
/// error with `message`), for a spawned process that finds it is not the worker the pool
/// expects. Returns the exit code.
pub(crate) fn refuse(setup: Setup<'_>, message: String) -> i32 {
    let coordinator = shmexec_shm::process::parent_pid();
    let Ok(mut tx) = Peer::process(coordinator).and_then(|peer| setup.output.producer(peer)) else {
        return EXIT_COORDINATOR_GONE;
    };
    let _ = send_report(&mut tx, START_SEQ, 0, Report::new(Code::Init, message));
    EXIT_INIT_FAILED
}

/// How much a worker raises its OOM score adjustment over the coordinator's (capped at the
/// kernel's 1000). When a cgroup or the machine runs out of memory, the kernel kills the process
/// with the highest score: its resident memory plus the adjustment in thousandths of the memory
/// it could use. The coordinator maps every ring, so by resident memory alone it is often the
/// largest process of the pool even while a worker leaks; +500 (half the memory) makes the
/// leaking worker the one killed, which the pool replaces and whose item it retries, instead of
/// the coordinator that holds every result. Not 1000: at the cap a worker would be killed first
/// for any shortage, even one caused by a much larger process beside the pool.
const OOM_SCORE_RAISE: i32 = 500;

/// Raises its OOM score, maps the shared region read-only, pins, runs `init`, then tells the coordinator how it went
/// (the start-up frame). `Err` is the exit code.
fn start_up(task: &mut dyn ByteTask, setup: &Setup<'_>, tx: &mut Producer) -> Result<(), i32> {
    let info = &setup.info;
    // Best effort: where /proc is read-only the worker is merely not preferred.
    let _ = shmexec_shm::memory::raise_oom_score(OOM_SCORE_RAISE);
    let started = setup
        .shared
        .clone()
        .map_or(Ok(()), crate::shared::install)
        .and_then(|()| info.core.map_or(Ok(()), pin::pin_to))
        .and_then(|()| {
            if info.low_priority {
                pin::lower_priority()
            } else {
                Ok(())
            }
        })
        .map_err(|e| e.to_string())
        .and_then(
            |()| match catch_unwind(AssertUnwindSafe(|| task.init(info))) {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("init failed: {e}")),
                Err(p) => Err(format!("init panicked: {}", panic_message(&*p))),
            },
        );
    if let Err(message) = started {
        let _ = send_report(tx, START_SEQ, 0, Report::new(Code::Init, message));
        return Err(EXIT_INIT_FAILED);
    }
    // SYNC POINT with `Supervisor::on_death`, which reads `State` once this process is dead:
    // from here on a death is charged to the items, not to the start.
    setup.stats.set(info.index, Field::State, READY);
    send_empty(tx, FrameKind::End, START_SEQ, 0).map_err(|_| EXIT_COORDINATOR_GONE)
}

/// Runs in the forked child; the return value is its exit code.
pub(crate) fn run(task: &mut dyn ByteTask, setup: Setup<'_>) -> i32 {
    let coordinator = shmexec_shm::process::parent_pid();
    let (peer_in, peer_out) = match (Peer::process(coordinator), Peer::process(coordinator)) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return EXIT_COORDINATOR_GONE,
    };
    let (Ok(mut rx), Ok(mut tx)) = (
        setup.input.consumer(peer_in),
        setup.output.producer(peer_out),
    ) else {
        return EXIT_COORDINATOR_GONE;
    };
    rx.set_wait_strategy(setup.wait);
    tx.set_wait_strategy(setup.wait);
    let info = &setup.info;

    if let Err(code) = start_up(task, &setup, &mut tx) {
        return code;
    }

    // Rung after each input is released (so after its result is published): that is what a
    // coordinator waiting on the doorbell loads (`crate::call::wait`).
    let bell = setup.stats.doorbell();
    loop {
        // No deadline: the wait itself watches the coordinator (or launcher), and a frame that
        // is already there costs no clock read.
        let Ok(frame) = rx.peek() else {
            return EXIT_COORDINATOR_GONE;
        };
        if frame.kind() == FrameKind::End {
            frame.release();
            break;
        }
        // Shutdown with a queue left: the input stays unreleased, like any item not run. Only
        // the one `STOP` value counts (see `wire::STOP`).
        if setup.stats.get(info.index, Field::Stop) == STOP {
            break;
        }
        let seq = frame.seq();
        let w = info.index;
        // SYNC POINT with `Supervisor::abandon_all`: an item of a call that ended is closed
        // unrun (its result would be discarded); see `wire::discard_check`.
        let below = setup.stats.get(w, Field::Discard);
        if seq < below && setup.stats.get(w, Field::DiscardCheck) == discard_check(below) {
            if send_empty(&mut tx, FrameKind::Done, seq, 0).is_err() {
                return EXIT_COORDINATOR_GONE;
            }
            frame.release();
            bell.ring();
            continue;
        }
        // One clock read at the start and one per output (in the sink) serve both the busy time
        // and the results' timing.
        let started_ns = shmexec_shm::clock::now_ns();
        // SYNC POINT with `Supervisor::on_death`, which sets `Skip` before it starts this
        // process (the fork orders the store before this load).
        let skip = setup.stats.get(w, Field::Skip);
        if skip == seq.wrapping_add(1) || skip == seq.wrapping_add(1) | SKIP_SILENTLY {
            // It crashed its workers too often: report it given up instead of running it, or,
            // if its outputs were handed out already, let it go without a word.
            if skip & SKIP_SILENTLY == 0
                && send_report(&mut tx, seq, 0, Report::new(Code::Crashed, "")).is_err()
            {
                return EXIT_COORDINATOR_GONE;
            }
            frame.release();
            bell.ring();
            setup.stats.set(w, Field::Skip, 0);
            continue;
        }
        // SYNC POINT with `Supervisor::respawn`, which reads `Current` once this process is
        // dead (seen through its pidfd): the last value stored here names the item it died on.
        setup.stats.set(w, Field::Current, seq.wrapping_add(1));
        // Counted before the result is published, so that a caller who has every result also
        // sees every chunk in the stats.
        setup.stats.add(w, Field::Chunks, 1);
        setup.stats.add(w, Field::BytesIn, frame.len() as u64);
        let mut before_publish = |n: usize, finished_ns: u64| {
            setup.stats.add(w, Field::BytesOut, n as u64);
            setup
                .stats
                .add(w, Field::RegionBytes, crate::shared::take_region_read());
            setup
                .stats
                .add(w, Field::BusyNs, finished_ns.saturating_sub(started_ns));
        };
        let mut sink = OutputSink::new(&mut tx, seq, started_ns, &mut before_publish);
        let produced = match catch_unwind(AssertUnwindSafe(|| task.run(&frame, &mut sink))) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(ItemFailure::InvalidInput(e))) => Err(Report::new(Code::InvalidInput, e)),
            Ok(Err(ItemFailure::Failed(e))) => Err(match e.downcast::<StageFailure>() {
                Ok(failure) => failure.0,
                Err(e) => Report::new(Code::Task, e.to_string()),
            }),
            Err(p) => Err(Report::new(Code::Panic, panic_message(&*p))),
        };
        let (outcome, parts) = sink.into_outcome();
        // How the item is closed: the sink's own failure is the precise report (an output too
        // large says its size; the task saw only that `emit` failed).
        let close = match (outcome, produced) {
            (Some(Outcome::Gone), _) => return EXIT_COORDINATOR_GONE,
            (Some(Outcome::Report(report)), _)
            | (None | Some(Outcome::Open | Outcome::Downstream), Err(report)) => Some(report),
            // Closed by its last output: an error after it has no item left to report on.
            (Some(Outcome::Closed), _) => None,
            (None | Some(Outcome::Open | Outcome::Downstream), Ok(())) => {
                if send_empty(&mut tx, FrameKind::Done, seq, parts).is_err() {
                    return EXIT_COORDINATOR_GONE;
                }
                None
            }
        };
        let ok = close.is_none();
        if let Some(report) = close {
            setup.stats.add(w, Field::Errors, 1);
            let busy = shmexec_shm::clock::now_ns().saturating_sub(started_ns);
            setup.stats.add(w, Field::BusyNs, busy);
            if send_report(&mut tx, seq, parts, report).is_err() {
                return EXIT_COORDINATOR_GONE;
            }
        }
        // SYNC POINT with the successor's restore of a serial stage's state
        // (`pipeline::state`): the item is closed and its input not yet released, so a death
        // from here on reruns it, and a state saved here is the state after it.
        // A stage that cannot save its state ends the worker: its successor runs the item again
        // from the state before it.
        if catch_unwind(AssertUnwindSafe(|| task.item_closed(seq, ok))).is_err() {
            return EXIT_COORDINATOR_GONE;
        }
        // What an item read of the region without publishing (it failed) counts too.
        setup
            .stats
            .add(w, Field::RegionBytes, crate::shared::take_region_read());
        // Only now, with the output published, is the input released: a worker that dies
        // before this point leaves the chunk in its input ring for a successor.
        frame.release();
        // SYNC POINT with the coordinator's doorbell waits (`call::wait::until`): the release
        // above (a Release store of the input ring's tail) comes before this notify, so a
        // waiter that wakes finds the room, and the result published before it.
        bell.ring();
        setup.stats.set(w, Field::Current, 0);
    }
    let _ = catch_unwind(AssertUnwindSafe(|| task.finish(info)));
    let _ = send_empty(&mut tx, FrameKind::End, 0, 0);
    EXIT_OK
}
