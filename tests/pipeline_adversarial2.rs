//! Adversarial tests of pipelines, second round: stateful stages under random kills, branches
//! (slow, hung, failing, killed, dropped), saved stages under kills and broken stores, and
//! statistics read while a run goes on. Every test is deterministic in what it asserts (no
//! timing assertions: kills land at random moments, but every outcome they may give is
//! checked); those that could hang run under a watchdog that aborts with a message.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use shmexec::pipeline::{BRANCH_ERRORS, MAX_STATE_BYTES, Pipeline, Stateful};
use shmexec::store::{StageKey, Store};
use shmexec::{BoxError, Error, WorkerInfo};
use support::{Rng, assert_no_children, builder, scratch, serial, shm_mappings, watchdog};

type Guard = std::sync::MutexGuard<'static, ()>;

/// Writes this process's pid into `dir/name`, atomically (a killer thread reads it).
fn write_pid(dir: &Path, name: &str) {
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    std::fs::write(&tmp, std::process::id().to_string()).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// The parent of `pid`, from /proc.
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

/// Whether `pid` is a worker of this process (its parent, a launcher, is our child): a pid
/// read from a file may be stale, and must never name another process.
fn is_our_grandchild(pid: i32) -> bool {
    parent_of(pid)
        .and_then(parent_of)
        .is_some_and(|pp| pp == std::process::id() as i32)
}

/// SIGKILL, ignoring a process that is gone already.
fn kill_quietly(pid: i32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

/// A thread that kills the worker whose pid is in `pidfile`, at random moments: after each
/// kill it waits for the successor to write its pid, then 0..`max_us` more.
struct Killer {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<u64>>,
}

impl Killer {
    fn start(pidfile: PathBuf, kills: u64, max_us: u64, seed: u64) -> Killer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut rng = Rng(seed | 1);
            let mut killed = 0u64;
            let mut last = 0i32;
            while killed < kills && !flag.load(Ordering::Relaxed) {
                let pid: i32 = std::fs::read_to_string(&pidfile)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
                if pid == 0 || pid == last {
                    std::thread::sleep(Duration::from_micros(100));
                    continue;
                }
                std::thread::sleep(Duration::from_micros(rng.below(max_us)));
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                if is_our_grandchild(pid) {
                    kill_quietly(pid);
                    killed += 1;
                }
                last = pid;
            }
            killed
        });
        Killer {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops it; the number of kills it made.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

impl Drop for Killer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The results of `run`, each of which must be `Ok`.
fn count_ok<T>(run: impl Iterator<Item = shmexec::Result<T>>) -> usize {
    let mut n = 0;
    for r in run {
        r.unwrap_or_else(|e| panic!("result {n}: {e}"));
        n += 1;
    }
    n
}

/// Busy for `us` microseconds (a window for kills to land in).
fn spin(us: u64) {
    let until = Instant::now() + Duration::from_micros(us);
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

/// A pool that never gives up on an item or a worker because of the kills of a test.
fn patient(guard: &Guard) -> shmexec::Builder {
    builder(guard)
        .workers(2)
        .max_attempts(1000)
        .max_start_attempts(1000)
        .restart_backoff(Duration::from_millis(1))
}

fn mix(digest: u64, i: u64) -> u64 {
    (digest ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .rotate_left(17)
        .wrapping_mul(0xff51_afd7_ed55_8ccd)
}

/// Chunk `i` holds `i % 7` events.
fn events(i: u64) -> u64 {
    i % 7
}

/// Numbers events on from the chunk before, and folds every chunk it saw into a digest (so an
/// item counted twice, or skipped, changes every later output): the output is
/// `[digest, numbers...]`. Writes its pid in `dir/pid` at init; busy `spin_us` per item; fails
/// the chunks `fails` says.
struct Numberer {
    dir: PathBuf,
    spin_us: u64,
    fails: fn(u64) -> bool,
}

impl Stateful for Numberer {
    type Input = u64;
    type Output = Vec<u64>;
    type State = (u64, u64);
    fn init(&mut self, _: &WorkerInfo) -> Result<(), BoxError> {
        write_pid(&self.dir, "pid");
        Ok(())
    }
    fn process(
        &mut self,
        state: &mut (u64, u64),
        chunk: &rkyv::Archived<u64>,
    ) -> Result<Vec<u64>, BoxError> {
        let i = chunk.to_native();
        let (next, digest) = *state;
        let n = events(i);
        spin(self.spin_us);
        let mut out = vec![mix(digest, i)];
        out.extend(next..next + n);
        *state = (next + n, mix(digest, i));
        if (self.fails)(i) {
            return Err(format!("chunk {i} is bad").into());
        }
        Ok(out)
    }
}

/// What [`Numberer`] gives for each of `chunks` (those it does not fail), run in order from the
/// default state.
fn numberer_reference(chunks: impl IntoIterator<Item = u64>) -> Vec<(u64, Vec<u64>)> {
    let (mut next, mut digest) = (0u64, 0u64);
    chunks
        .into_iter()
        .map(|i| {
            digest = mix(digest, i);
            let mut out = vec![digest];
            out.extend(next..next + events(i));
            next += events(i);
            (i, out)
        })
        .collect()
}

fn never(_: u64) -> bool {
    false
}

#[test]
fn a_stateful_worker_killed_at_random_moments_numbers_every_event_once_in_every_run() {
    let guard = serial();
    let _dog = watchdog(240, "stateful_killed_at_random_moments");
    let dir = scratch("state-kills");
    {
        let mut p = Pipeline::<u64>::builder()
            .map_fn("chunks", |&n| n.to_native())
            .stateful(
                "number",
                Numberer {
                    dir: dir.clone(),
                    spin_us: 100,
                    fails: never,
                },
            )
            .build(patient(&guard))
            .unwrap();
        assert_eq!(p.plan().workers(), vec![2, 1]);
        let mut total_kills = 0;
        for round in 0..4u64 {
            let n = 300u64;
            let killer = Killer::start(dir.join("pid"), 25, 3000, 7 + round);
            let got: Vec<(u64, Vec<u64>)> = p
                .run(0..n)
                .map(|r| {
                    let r = r.unwrap_or_else(|e| panic!("round {round}: {e}"));
                    (r.seq(), r.iter().map(|x| x.to_native()).collect())
                })
                .collect();
            total_kills += killer.stop();
            let base = round * n;
            let want: Vec<(u64, Vec<u64>)> = numberer_reference(0..n)
                .into_iter()
                .map(|(i, v)| (base + i, v))
                .collect();
            assert_eq!(got.len(), want.len(), "round {round}");
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g, w, "round {round}");
            }
        }
        assert!(total_kills > 0);
        eprintln!(
            "kills: {total_kills}, respawns: {:?}",
            p.group_stats()
                .iter()
                .map(|s| s.respawns)
                .collect::<Vec<_>>()
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

/// Chunks failing in the first group (before the serial one).
fn fails_upstream(i: u64) -> bool {
    i % 13 == 5
}

fn fails_in_stage(i: u64) -> bool {
    i % 17 == 3
}

fn dropped_by_filter(i: u64) -> bool {
    i % 3 == 0
}

#[test]
fn a_stateful_stage_behind_a_fused_filter_with_upstream_failures_survives_random_kills() {
    let guard = serial();
    let _dog = watchdog(240, "stateful_behind_filter_killed");
    let dir = scratch("state-filter-kills");
    {
        let mut p = Pipeline::<u64>::builder()
            .map(
                "chunks",
                shmexec::try_from_fn::<u64, _, _>(|&n| {
                    let n = n.to_native();
                    if fails_upstream(n) {
                        Err(format!("{n} fails upstream").into())
                    } else {
                        Ok(n)
                    }
                }),
            )
            .filter("not_threes", |n| !dropped_by_filter(n.to_native()))
            .serial()
            .stateful(
                "number",
                Numberer {
                    dir: dir.clone(),
                    spin_us: 150,
                    fails: fails_in_stage,
                },
            )
            .build(patient(&guard))
            .unwrap();
        assert_eq!(
            p.plan().fused(),
            vec![vec!["chunks"], vec!["not_threes", "number"]]
        );
        let mut base = 0;
        for round in 0..3u64 {
            let n = 400u64;
            let killer = Killer::start(dir.join("pid"), 30, 4000, 99 + round);
            let mut got = Vec::new();
            for r in p.run(base..base + n) {
                match r {
                    Ok(v) => got.push((v.seq(), v.iter().map(|x| x.to_native()).collect())),
                    Err(e) => {
                        let seq = e.seq().expect("a numbered error");
                        let i = seq; // inputs are their own numbers here
                        if fails_upstream(i) {
                            assert!(
                                matches!(&e, Error::Stage { stage, .. } if stage == "chunks"),
                                "{e}"
                            );
                        } else {
                            assert!(fails_in_stage(i), "round {round}: unexpected {e}");
                            assert!(
                                matches!(&e, Error::Stage { stage, .. } if stage == "number"),
                                "{e}"
                            );
                        }
                    }
                }
            }
            killer.stop();
            // Each run numbers from 0, over the chunks that reached the stage and did not fail.
            let kept = (base..base + n).filter(|&i| !fails_upstream(i) && !dropped_by_filter(i));
            let mut want = Vec::new();
            let (mut next, mut digest) = (0u64, 0u64);
            for i in kept {
                let d = mix(digest, i);
                let mut out = vec![d];
                out.extend(next..next + events(i));
                if !fails_in_stage(i) {
                    want.push((i, out));
                    next += events(i);
                    digest = d;
                }
            }
            assert_eq!(got.len(), want.len(), "round {round}");
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g, w, "round {round}");
            }
            base += n;
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

#[test]
fn runs_of_a_stateful_stage_dropped_midway_under_kills_leave_each_next_run_numbered_from_0() {
    let guard = serial();
    let _dog = watchdog(240, "stateful_runs_dropped_midway");
    let dir = scratch("state-dropped");
    {
        let mut p = Pipeline::<u64>::builder()
            .map_fn("chunks", |&n| n.to_native())
            .stateful(
                "number",
                Numberer {
                    dir: dir.clone(),
                    spin_us: 50,
                    fails: never,
                },
            )
            .build(patient(&guard).ring_bytes(1 << 16))
            .unwrap();
        let killer = Killer::start(dir.join("pid"), 40, 20_000, 5);
        for round in 0..30u64 {
            {
                let mut run = p.run(0..200u64);
                for _ in 0..round % 7 {
                    run.next().unwrap().unwrap();
                }
            }
            let got: Vec<Vec<u64>> = p
                .run(1000..1040u64)
                .map(|r| {
                    r.unwrap_or_else(|e| panic!("round {round}: {e}"))
                        .iter()
                        .map(|x| x.to_native())
                        .collect()
                })
                .collect();
            let want: Vec<Vec<u64>> = numberer_reference(1000..1040)
                .into_iter()
                .map(|(_, v)| v)
                .collect();
            assert_eq!(got, want, "round {round}");
        }
        killer.stop();
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

/// A state that grows by `grow` bytes an item: its serialized size passes
/// [`MAX_STATE_BYTES`] after a few items. The output is the count of items before it.
struct Growing {
    grow: usize,
}

impl Stateful for Growing {
    type Input = u64;
    type Output = u64;
    type State = (u64, Vec<u8>);
    fn process(
        &mut self,
        state: &mut (u64, Vec<u8>),
        _: &rkyv::Archived<u64>,
    ) -> Result<u64, BoxError> {
        let count = state.0;
        state.0 += 1;
        state.1.extend(std::iter::repeat_n(7u8, self.grow));
        Ok(count)
    }
}

/// What happens today: item 3's output (its closing frame) is handed out, then
/// `StatefulStage::item_closed` cannot save the state (`Snapshots::write` says
/// `FrameTooLarge`, worded as a ring that should be made larger) and panics; the worker exits
/// before releasing the item, its successor runs item 3 again from the state after item 2, and
/// dies the same way, thousands of times a second: the death is never charged to item 3 (it
/// has left the worker's queue), so it is never given up, and the run never ends. (Holding
/// the results instead ends the run with a misleading `OutputsHeld`.)
#[test]

fn a_state_that_outgrows_its_slots_fails_its_items_instead_of_hanging() {
    let guard = serial();
    let _dog = watchdog(30, "a_state_that_outgrows_its_slots");
    {
        let grow = 16 << 10;
        let mut p = Pipeline::<u64>::builder()
            .map_fn("chunks", |&n| n.to_native())
            .stateful("grow", Growing { grow })
            .build(builder(&guard).workers(2))
            .unwrap();
        let results: Vec<shmexec::Result<u64>> =
            p.run(0..10u64).map(|r| r.map(|v| v.to_native())).collect();
        for (i, r) in results.iter().enumerate() {
            match r {
                Ok(v) => eprintln!("{i}: ok {v}"),
                Err(e) => eprintln!("{i}: {e}"),
            }
        }
        eprintln!("respawns {:?}", p.group_stats()[1].respawns);
        // Items whose state fits are numbered 0, 1, 2...; the first whose state does not fit
        // (the 4th: 4 * 16 KiB plus the archive's own bytes pass 64 KiB)...
        let fits = (0..10u64)
            .take_while(|&k| (k as usize + 1) * grow + 16 <= MAX_STATE_BYTES)
            .count();
        let ok: Vec<u64> = results
            .iter()
            .filter_map(|r| r.as_ref().ok().copied())
            .collect();
        // No count is handed out twice: an item whose state was not saved must not be handed
        // out as if it had counted.
        let mut sorted = ok.clone();
        sorted.dedup();
        assert_eq!(sorted, ok, "a count handed out twice: {ok:?}");
        assert_eq!(&ok[..fits], &(0..fits as u64).collect::<Vec<_>>()[..]);
    }
    assert_no_children();
}

/// A stage over `u64`s that writes its pid in `dir/pid-<tag>-<worker>` at init and gives
/// `outs(n)` for input `n`, each output after `spin_us` of work (so that kills land between
/// outputs too).
struct Tracked {
    dir: PathBuf,
    tag: &'static str,
    spin_us: u64,
    outs: fn(u64) -> Vec<u64>,
}

impl shmexec::Task for Tracked {
    type Input = u64;
    type Output = u64;
    fn init(&mut self, w: &WorkerInfo) -> Result<(), BoxError> {
        write_pid(&self.dir, &format!("pid-{}-{}", self.tag, w.index));
        Ok(())
    }
    fn process(&mut self, _: &rkyv::Archived<u64>) -> Result<u64, BoxError> {
        unreachable!("produce is overridden")
    }
    fn produce(
        &mut self,
        n: &rkyv::Archived<u64>,
        out: &mut shmexec::OutputSink<'_>,
    ) -> Result<(), BoxError> {
        for v in (self.outs)(n.to_native()) {
            spin(self.spin_us);
            out.emit(&v)?;
        }
        Ok(())
    }
}

fn tracked(dir: &Path, tag: &'static str, spin_us: u64, outs: fn(u64) -> Vec<u64>) -> Tracked {
    Tracked {
        dir: dir.to_owned(),
        tag,
        spin_us,
        outs,
    }
}

fn one(n: u64) -> Vec<u64> {
    vec![n * 3 + 1]
}

/// 0 to 4 outputs per input.
fn fan(n: u64) -> Vec<u64> {
    (0..n % 5).map(|k| n * 100 + k).collect()
}

fn identity(n: u64) -> Vec<u64> {
    vec![n]
}

/// The key of stage `name` of `p` for `source`.
fn key_of<I, O>(p: &Pipeline<I, O>, source: &StageKey, name: &str) -> StageKey
where
    I: shmexec::Encode<Archived: shmexec::Decode>,
    O: shmexec::Encode<Archived: shmexec::Decode>,
{
    let i = p.plan().stages().iter().position(|s| s == name).unwrap();
    p.keys(source)[i].clone()
}

/// The values of a saved stream of `u64`s, in order.
fn saved_values(store: &Store, key: &StageKey) -> Vec<u64> {
    let stream = store
        .load(key)
        .unwrap()
        .unwrap_or_else(|| panic!("no stream saved under {}", key.name()));
    (0..stream.chunks())
        .map(|i| {
            stream
                .chunk(i)
                .unwrap()
                .archive::<u64>()
                .unwrap()
                .to_native()
        })
        .collect()
}

/// Starts a killer for each `(tag, worker)`.
fn killers(dir: &Path, which: &[(&str, usize)], kills: u64, max_us: u64, seed: u64) -> Vec<Killer> {
    which
        .iter()
        .enumerate()
        .map(|(i, (tag, w))| {
            Killer::start(
                dir.join(format!("pid-{tag}-{w}")),
                kills,
                max_us,
                seed.wrapping_mul(31).wrapping_add(i as u64),
            )
        })
        .collect()
}

#[test]
fn a_slow_branch_sets_the_pace_and_the_main_line_gets_every_result_once_in_order() {
    let guard = serial();
    let _dog = watchdog(120, "a_slow_branch_sets_the_pace");
    let dir = scratch("slow-branch");
    let store = Store::open(dir.join("store")).unwrap();
    {
        let mut p = Pipeline::<u64>::builder()
            .map_fn("wide", |&n| vec![n.to_native(); 512])
            .branch(|b| {
                b.map_fn("slow", |v: &rkyv::Archived<Vec<u64>>| {
                    std::thread::sleep(Duration::from_micros(400));
                    v[0].to_native()
                })
                .workers(1)
                .save(&store)
            })
            .map_fn("first", |v: &rkyv::Archived<Vec<u64>>| v[0].to_native() + 1)
            .build(builder(&guard).workers(2).ring_bytes(1 << 16))
            .unwrap();
        let key = StageKey::new("raw", "slow branch", b"");
        let mut run = p.run_keyed(&key, 0..400u64).unwrap();
        let got: Vec<(u64, u64)> = run
            .by_ref()
            .map(|r| {
                let r = r.unwrap();
                (r.seq(), r.to_native())
            })
            .collect();
        assert_eq!(got, (0..400u64).map(|n| (n, n + 1)).collect::<Vec<_>>());
        assert_eq!(run.branch_failures(), 0);
        assert_eq!(run.saved(), ["slow"]);
        drop(run);
        assert_eq!(
            saved_values(&store, &key_of(&p, &key, "slow")),
            (0..400).collect::<Vec<u64>>()
        );
        let stats = p.stats();
        assert_eq!(stats.stages[1].items, 400, "{stats}");
        assert_eq!(stats.stages[2].items, 400, "{stats}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

#[test]
fn a_branch_stage_that_hangs_times_out_in_the_branch_and_the_main_line_goes_on() {
    let guard = serial();
    let _dog = watchdog(120, "a_branch_stage_that_hangs");
    {
        let mut p = Pipeline::<u64>::builder()
            .map_fn("src", |&n| n.to_native())
            .branch(|b| {
                b.each("hangs", |n| {
                    if matches!(n.to_native(), 7 | 30) {
                        std::thread::sleep(Duration::from_secs(3600));
                    }
                    Ok(())
                })
                .workers(1)
            })
            .map_fn("main", |&n| n.to_native() * 2)
            .build(
                builder(&guard)
                    .workers(2)
                    .ring_bytes(1 << 16)
                    .chunk_timeout(Duration::from_millis(300)),
            )
            .unwrap();
        for round in 0..2u64 {
            let base = round * 50;
            let mut run = p.run(0..50u64);
            let got: Vec<(u64, u64)> = run
                .by_ref()
                .map(|r| {
                    let r = r.unwrap_or_else(|e| panic!("round {round}: {e}"));
                    (r.seq(), r.to_native())
                })
                .collect();
            assert_eq!(
                got,
                (0..50u64).map(|n| (base + n, n * 2)).collect::<Vec<_>>()
            );
            assert_eq!(run.branch_failures(), 2, "{:?}", run.branch_errors());
            let seqs: Vec<Option<u64>> = run.branch_errors().iter().map(|e| e.seq()).collect();
            assert_eq!(seqs, vec![Some(base + 7), Some(base + 30)]);
            for e in run.branch_errors() {
                assert!(
                    matches!(e, Error::Stage { stage, error } if stage == "hangs"
                        && matches!(**error, Error::ChunkTimeout { .. })),
                    "{e:?}"
                );
            }
        }
    }
    assert_no_children();
}

#[test]
fn a_branch_that_fails_every_item_keeps_a_bounded_list_and_counts_them_all() {
    let guard = serial();
    let _dog = watchdog(120, "a_branch_that_fails_every_item");
    {
        let mut p = Pipeline::<u64>::builder()
            .map_fn("src", |&n| n.to_native())
            .branch(|b| b.each("fails", |n| Err(format!("no {}", n.to_native()).into())))
            .map_fn("main", |&n| n.to_native() + 1)
            .build(builder(&guard).workers(2).ring_bytes(1 << 16))
            .unwrap();
        for round in 0..2u64 {
            let n = 1000u64;
            let mut run = p.run(0..n);
            let mut count = 0u64;
            let mut most = 0usize;
            while let Some(r) = run.next() {
                assert_eq!(r.unwrap().to_native(), count + 1);
                count += 1;
                assert!(run.branch_errors().len() <= BRANCH_ERRORS);
                most = most.max(run.branch_errors().len());
            }
            assert_eq!(count, n);
            assert_eq!(run.branch_failures(), n, "round {round}");
            assert_eq!(run.branch_errors().len(), BRANCH_ERRORS);
            let seqs: Vec<u64> = run
                .branch_errors()
                .iter()
                .map(|e| e.seq().unwrap())
                .collect();
            assert_eq!(
                seqs,
                (round * n..round * n + BRANCH_ERRORS as u64).collect::<Vec<_>>()
            );
            assert!(
                run.branch_errors()[0].to_string().contains("no 0"),
                "{}",
                run.branch_errors()[0]
            );
        }
    }
    assert_no_children();
}

#[test]
fn kills_in_the_main_line_and_a_saved_branch_lose_and_repeat_nothing() {
    let guard = serial();
    let _dog = watchdog(240, "kills_in_the_main_line_and_a_saved_branch");
    let dir = scratch("branch-kills");
    let store = Store::open(dir.join("store")).unwrap();
    {
        let mut p = Pipeline::<u64>::builder()
            .map("src", tracked(&dir, "src", 30, identity))
            .branch(|b| {
                b.map("b1", tracked(&dir, "b1", 60, one))
                    .workers(1)
                    .map("bsave", tracked(&dir, "bsave", 20, identity))
                    .workers(1)
                    .save(&store)
            })
            .map("main", tracked(&dir, "main", 40, one))
            .alone()
            .build(patient(&guard).ring_bytes(1 << 16))
            .unwrap();
        assert_eq!(
            p.plan().fused(),
            vec![vec!["src"], vec!["main"], vec!["b1", "bsave"]]
        );
        for round in 0..3u64 {
            let n = 300u64;
            let key = StageKey::new("raw", format!("round {round}"), b"");
            let ks = killers(
                &dir,
                &[("src", 0), ("src", 1), ("main", 1), ("b1", 0)],
                12,
                6000,
                round + 1,
            );
            let mut run = p.run_keyed(&key, 0..n).unwrap();
            let got: Vec<(u64, u64)> = run
                .by_ref()
                .map(|r| {
                    let r = r.unwrap_or_else(|e| panic!("round {round}: {e}"));
                    (r.seq(), r.to_native())
                })
                .collect();
            let kills: u64 = ks.into_iter().map(Killer::stop).sum();
            let base = round * n;
            assert_eq!(
                got,
                (0..n).map(|i| (base + i, i * 3 + 1)).collect::<Vec<_>>(),
                "round {round}"
            );
            assert_eq!(run.branch_failures(), 0, "{:?}", run.branch_errors());
            assert_eq!(run.saved(), ["bsave"], "round {round}");
            drop(run);
            let keys = p.keys(&key);
            assert_eq!(
                saved_values(&store, &keys[3]),
                (0..n).map(|i| i * 3 + 1).collect::<Vec<_>>(),
                "round {round} ({kills} kills)"
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

#[test]
fn a_branch_off_a_flat_map_under_kills_sees_every_output_once_in_order() {
    let guard = serial();
    let _dog = watchdog(240, "a_branch_off_a_flat_map");
    let dir = scratch("branch-flat");
    let store = Store::open(dir.join("store")).unwrap();
    {
        let mut p = Pipeline::<u64>::builder()
            .map("fan", tracked(&dir, "fan", 40, fan))
            .branch(|b| b.map_fn("copy", |&n| n.to_native()).workers(1).save(&store))
            .map_fn("plus", |&n| n.to_native() + 1)
            .build(patient(&guard).ring_bytes(1 << 16))
            .unwrap();
        for round in 0..3u64 {
            let n = 200u64;
            let key = StageKey::new("raw", format!("flat {round}"), b"");
            let ks = killers(&dir, &[("fan", 0), ("fan", 1)], 15, 5000, 40 + round);
            let mut run = p.run_keyed(&key, 0..n).unwrap();
            let got: Vec<(u64, u64)> = run
                .by_ref()
                .map(|r| {
                    let r = r.unwrap_or_else(|e| panic!("round {round}: {e}"));
                    (r.seq(), r.to_native())
                })
                .collect();
            for k in ks {
                k.stop();
            }
            let want: Vec<u64> = (0..n).flat_map(fan).collect();
            let values: Vec<u64> = got.iter().map(|&(_, v)| v).collect();
            assert_eq!(
                values,
                want.iter().map(|v| v + 1).collect::<Vec<_>>(),
                "round {round}"
            );
            // Each output's number is its input's.
            for &(seq, v) in &got {
                assert_eq!(seq - round * n, (v - 1) / 100, "round {round}");
            }
            assert_eq!(run.saved(), ["copy"]);
            drop(run);
            assert_eq!(
                saved_values(&store, &key_of(&p, &key, "copy")),
                want,
                "round {round}"
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

#[test]
fn runs_with_a_branch_dropped_midway_leave_the_next_run_whole() {
    let guard = serial();
    let _dog = watchdog(180, "runs_with_a_branch_dropped_midway");
    let dir = scratch("branch-dropped");
    let store = Store::open(dir.join("store")).unwrap();
    {
        let mut p = Pipeline::<u64>::builder()
            .map_fn("wide", |&n| vec![n.to_native(); 300])
            .branch(|b| {
                b.map_fn("slow", |v: &rkyv::Archived<Vec<u64>>| {
                    spin(80);
                    v[0].to_native()
                })
                .workers(1)
                .save(&store)
            })
            .map_fn("first", |v: &rkyv::Archived<Vec<u64>>| v[0].to_native())
            .build(builder(&guard).workers(2).ring_bytes(1 << 16))
            .unwrap();
        for round in 0..25u64 {
            {
                let key = StageKey::new("raw", format!("dropped {round}"), b"");
                let mut run = p.run_keyed(&key, 0..300u64).unwrap();
                for i in 0..(round * 3) % 11 {
                    assert_eq!(run.next().unwrap().unwrap().to_native(), i);
                }
                // Dropped with items in flight in both lines.
                if round % 2 == 0 {
                    assert!(run.saved().is_empty());
                }
            }
            let key = StageKey::new("raw", format!("whole {round}"), b"");
            let mut run = p.run_keyed(&key, 1000..1060u64).unwrap();
            let got: Vec<u64> = run
                .by_ref()
                .map(|r| {
                    r.unwrap_or_else(|e| panic!("round {round}: {e}"))
                        .to_native()
                })
                .collect();
            assert_eq!(got, (1000..1060).collect::<Vec<u64>>(), "round {round}");
            assert_eq!(run.saved(), ["slow"], "round {round}");
            drop(run);
            assert_eq!(
                saved_values(&store, &key_of(&p, &key, "slow")),
                (1000..1060).collect::<Vec<u64>>(),
                "round {round}"
            );
        }
        // Nothing of a dropped run was committed.
        assert_eq!(store.streams().unwrap().len(), 25);
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

/// `peaks` (the pool's 2 workers, pids tracked) saved, then `events` (alone).
fn saved_peaks(guard: &Guard, dir: &Path, store: &Store) -> Pipeline<u64, u64> {
    Pipeline::<u64>::builder()
        .map("peaks", tracked(dir, "peaks", 40, one))
        .save(store)
        .map_fn("events", |&n| n.to_native() * 2)
        .alone()
        .build(patient(guard).ring_bytes(1 << 16))
        .unwrap()
}

#[test]
fn kills_during_a_saving_run_commit_exactly_the_outputs_in_order() {
    let guard = serial();
    let _dog = watchdog(240, "kills_during_a_saving_run");
    let dir = scratch("save-kills");
    let store = Store::open(dir.join("store")).unwrap();
    {
        let mut p = saved_peaks(&guard, &dir, &store);
        for round in 0..4u64 {
            let n = 250u64;
            let key = StageKey::new("raw", format!("kills {round}"), b"");
            let ks = killers(&dir, &[("peaks", 0), ("peaks", 1)], 15, 4000, 70 + round);
            let mut run = p.run_keyed(&key, 0..n).unwrap();
            let got: Vec<u64> = run
                .by_ref()
                .map(|r| {
                    r.unwrap_or_else(|e| panic!("round {round}: {e}"))
                        .to_native()
                })
                .collect();
            for k in ks {
                k.stop();
            }
            assert_eq!(got, (0..n).map(|i| (i * 3 + 1) * 2).collect::<Vec<_>>());
            assert_eq!(run.saved(), ["peaks"]);
            drop(run);
            let want: Vec<u64> = (0..n).map(|i| i * 3 + 1).collect();
            assert_eq!(saved_values(&store, &key_of(&p, &key, "peaks")), want);
            // Served from there: the same results, numbered from 0.
            let mut run = p.run_keyed(&key, std::iter::empty::<u64>()).unwrap();
            assert_eq!(run.cache().unwrap().chunks, n as usize);
            let again: Vec<(u64, u64)> = run
                .by_ref()
                .map(|r| {
                    let r = r.unwrap();
                    (r.seq(), r.to_native())
                })
                .collect();
            assert_eq!(
                again,
                got.iter()
                    .enumerate()
                    .map(|(i, &v)| (i as u64, v))
                    .collect::<Vec<_>>()
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

/// The temporary directories of writers in `store` (names with a dot: a stream's have none).
fn partials(store: &Store) -> Vec<PathBuf> {
    std::fs::read_dir(store.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains('.'))
        .map(|e| e.path())
        .collect()
}

#[test]
fn a_store_that_breaks_mid_run_ends_the_run_with_an_error_naming_it() {
    let guard = serial();
    let _dog = watchdog(120, "a_store_that_breaks_mid_run");
    let dir = scratch("store-breaks");
    let store = Store::open(dir.join("store")).unwrap();
    {
        let mut p = saved_peaks(&guard, &dir, &store);
        let key = StageKey::new("raw", "breaks", b"");
        let mut run = p.run_keyed(&key, 0..300u64).unwrap();
        let mut ok = 0u64;
        let mut error = None;
        for r in run.by_ref() {
            match r {
                Ok(v) => {
                    assert_eq!(v.to_native(), (ok * 3 + 1) * 2);
                    ok += 1;
                    if ok == 50 {
                        // The writer's directory becomes unwritable: as root a chmod does
                        // nothing, so it is replaced by a file.
                        let temps = partials(&store);
                        assert_eq!(temps.len(), 1, "{temps:?}");
                        std::fs::remove_dir_all(&temps[0]).unwrap();
                        std::fs::write(&temps[0], b"in the way").unwrap();
                    }
                }
                Err(e) => {
                    assert!(error.is_none(), "a second error: {e}");
                    error = Some(e);
                }
            }
        }
        let e = error.expect("the run ended without an error");
        eprintln!("after {ok} results: {e}");
        assert!(matches!(e, Error::Store(_)), "{e:?}");
        assert!(
            e.to_string().contains(&*store.path().to_string_lossy()),
            "{e}"
        );
        // Whether the saver was still writing chunks (the run ends there) or had written them
        // all (the commit fails) depends on how far ahead the first group ran.
        assert!((50..=300).contains(&ok), "{ok}");
        assert!(run.saved().is_empty());
        drop(run);
        assert!(store.load(&key_of(&p, &key, "peaks")).unwrap().is_none());
        for t in partials(&store) {
            let _ = std::fs::remove_file(&t);
        }
        // The pipeline and the store go on.
        let mut run = p.run_keyed(&key, 0..100u64).unwrap();
        assert_eq!(count_ok(run.by_ref()), 100);
        assert_eq!(run.saved(), ["peaks"]);
        drop(run);
        assert_eq!(
            saved_values(&store, &key_of(&p, &key, "peaks")),
            (0..100u64).map(|i| i * 3 + 1).collect::<Vec<_>>()
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

#[test]
fn a_store_directory_removed_mid_run_ends_the_run_with_an_error() {
    let guard = serial();
    let _dog = watchdog(120, "a_store_directory_removed_mid_run");
    let dir = scratch("store-removed");
    let store = Store::open(dir.join("store")).unwrap();
    {
        let mut p = saved_peaks(&guard, &dir, &store);
        let key = StageKey::new("raw", "removed", b"");
        let mut run = p.run_keyed(&key, 0..300u64).unwrap();
        let mut results = 0;
        let mut errors = Vec::new();
        for r in run.by_ref() {
            results += 1;
            if results == 20 {
                std::fs::remove_dir_all(store.path()).unwrap();
            }
            if let Err(e) = r {
                errors.push(e.to_string());
            }
        }
        // One error, last: at the chunk being written, or at the commit.
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(results <= 301, "{results}");
        assert!(run.saved().is_empty());
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert_no_children();
}

/// `peaks` saved, and, if `last`, `events` saved too (then a hit serves its chunks).
fn both_saved(guard: &Guard, store: &Store, last: bool) -> Pipeline<u64, u64> {
    let s = Pipeline::<u64>::builder()
        .map_fn("peaks", |&n| n.to_native() * 3 + 1)
        .save(store)
        .map_fn("events", |&n| n.to_native() * 2);
    let s = if last { s.save(store) } else { s };
    s.build(builder(guard).workers(2).ring_bytes(1 << 16))
        .unwrap()
}

/// Deletes chunk `index` of the stream of `key`.
fn delete_chunk(store: &Store, key: &StageKey, index: usize) -> PathBuf {
    let stream = store.load(key).unwrap().unwrap();
    let path = stream.path().join(stream.chunk_infos()[index].file());
    std::fs::remove_file(&path).unwrap();
    path
}

#[test]
fn a_cached_run_whose_chunk_file_was_deleted_fails_that_chunk_in_its_place() {
    let guard = serial();
    let _dog = watchdog(60, "a_cached_run_whose_chunk_file_was_deleted");
    let dir = scratch("deleted-chunk");
    let store = Store::open(dir.join("store")).unwrap();
    {
        let mut p = both_saved(&guard, &store, false);
        let key = StageKey::new("raw", "deleted", b"");
        assert_eq!(p.run_keyed(&key, 0..10u64).unwrap().count(), 10);
        let gone = delete_chunk(&store, &key_of(&p, &key, "peaks"), 3);
        for _ in 0..2 {
            let results: Vec<_> = p
                .run_keyed(&key, std::iter::empty::<u64>())
                .unwrap()
                .map(|r| r.map(|v| v.to_native()))
                .collect();
            assert_eq!(results.len(), 10);
            for (i, r) in results.iter().enumerate() {
                match r {
                    Err(e) if i == 3 => {
                        assert!(e.to_string().contains(&*gone.to_string_lossy()), "{e}");
                        assert_eq!(e.seq(), Some(3), "{e}");
                    }
                    Ok(v) => assert_eq!(*v, (i as u64 * 3 + 1) * 2),
                    Err(e) => panic!("chunk {i}: {e}"),
                }
            }
        }
        // Every chunk deleted: every item fails, the run ends.
        let stream = store.load(&key_of(&p, &key, "peaks")).unwrap().unwrap();
        for info in stream.chunk_infos() {
            let _ = std::fs::remove_file(stream.path().join(info.file()));
        }
        let results: Vec<_> = p
            .run_keyed(&key, std::iter::empty::<u64>())
            .unwrap()
            .collect();
        assert_eq!(results.len(), 10);
        assert!(results.iter().all(|r| r.is_err()));
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

#[test]

fn a_served_last_stage_whose_chunk_file_was_deleted_fails_that_chunk_in_its_place() {
    let guard = serial();
    let _dog = watchdog(60, "a_served_last_stage_whose_chunk_file_was_deleted");
    let dir = scratch("deleted-served");
    let store = Store::open(dir.join("store")).unwrap();
    {
        let mut p = both_saved(&guard, &store, true);
        let key = StageKey::new("raw", "deleted", b"");
        let mut run = p.run_keyed(&key, 0..10u64).unwrap();
        assert_eq!(run.by_ref().count(), 10);
        assert_eq!(run.saved(), ["peaks", "events"]);
        drop(run);
        let gone = delete_chunk(&store, &key_of(&p, &key, "events"), 3);
        let mut run = p.run_keyed(&key, std::iter::empty::<u64>()).unwrap();
        assert_eq!(run.cache().unwrap().stage, "events");
        let results: Vec<_> = run.by_ref().map(|r| r.map(|v| v.to_native())).collect();
        // As when the saved stage is not the last: chunk 3 fails in its place, numbered, and
        // the other nine are served.
        assert_eq!(results.len(), 10, "{results:?}");
        for (i, r) in results.iter().enumerate() {
            match r {
                Err(e) if i == 3 => {
                    assert!(e.to_string().contains(&*gone.to_string_lossy()), "{e}");
                    assert_eq!(e.seq(), Some(3), "{e}");
                }
                Ok(v) => assert_eq!(*v, (i as u64 * 3 + 1) * 2),
                Err(e) => panic!("chunk {i}: {e}"),
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

#[test]
fn two_pipelines_saving_one_key_after_each_other_and_interleaved_agree() {
    let guard = serial();
    let _dog = watchdog(60, "two_pipelines_saving_one_key");
    let dir = scratch("two-savers");
    let store = Store::open(dir.join("store")).unwrap();
    {
        let mut a = both_saved(&guard, &store, false);
        let mut b = both_saved(&guard, &store, false);
        let want: Vec<u64> = (0..40u64).map(|n| (n * 3 + 1) * 2).collect();
        let collect = |run: shmexec::pipeline::Run<'_, u64, u64>| -> Vec<u64> {
            run.map(|r| r.unwrap().to_native()).collect()
        };
        // One after the other: the second is served what the first saved.
        let key = StageKey::new("raw", "sequential", b"");
        let run = a.run_keyed(&key, 0..40u64).unwrap();
        assert!(run.cache().is_none());
        assert_eq!(collect(run), want);
        let run = b.run_keyed(&key, 0..40u64).unwrap();
        assert_eq!(run.cache().map(|c| c.stage.as_str()), Some("peaks"));
        assert_eq!(collect(run), want);
        // Interleaved: both miss, both save; the first to finish provides the stream and the
        // other's commit finds it there.
        let key = StageKey::new("raw", "interleaved", b"");
        let mut ra = a.run_keyed(&key, 0..40u64).unwrap();
        let mut rb = b.run_keyed(&key, 0..40u64).unwrap();
        assert!(ra.cache().is_none() && rb.cache().is_none());
        let mut got_a: Vec<u64> = ra
            .by_ref()
            .take(10)
            .map(|r| r.unwrap().to_native())
            .collect();
        let got_b: Vec<u64> = rb.by_ref().map(|r| r.unwrap().to_native()).collect();
        assert_eq!(got_b, want);
        assert_eq!(rb.saved(), ["peaks"]);
        got_a.extend(ra.by_ref().map(|r| r.unwrap().to_native()));
        assert_eq!(got_a, want);
        assert_eq!(ra.saved(), ["peaks"]);
        drop((ra, rb));
        assert_eq!(
            saved_values(&store, &key_of(&a, &key, "peaks")),
            (0..40u64).map(|n| n * 3 + 1).collect::<Vec<_>>()
        );
        assert_eq!(store.streams().unwrap().len(), 2);
        assert!(partials(&store).is_empty(), "{:?}", partials(&store));
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

#[test]
fn a_stateful_stage_after_a_cached_stage_numbers_from_0_in_every_served_run_under_kills() {
    let guard = serial();
    let _dog = watchdog(240, "a_stateful_stage_after_a_cached_stage");
    let dir = scratch("cache-state");
    let store = Store::open(dir.join("store")).unwrap();
    {
        let mut p = Pipeline::<u64>::builder()
            .map_fn("peaks", |&n| n.to_native())
            .save(&store)
            .stateful(
                "number",
                Numberer {
                    dir: dir.clone(),
                    spin_us: 100,
                    fails: never,
                },
            )
            .build(patient(&guard).ring_bytes(1 << 16))
            .unwrap();
        let key = StageKey::new("raw", "cache + state", b"");
        let n = 200u64;
        let want: Vec<Vec<u64>> = numberer_reference(0..n)
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        for round in 0..5u64 {
            let killer = (round >= 2).then(|| Killer::start(dir.join("pid"), 15, 3000, round));
            let mut run = p.run_keyed(&key, 0..n).unwrap();
            assert_eq!(run.cache().is_some(), round > 0, "round {round}");
            let got: Vec<Vec<u64>> = run
                .by_ref()
                .map(|r| {
                    r.unwrap_or_else(|e| panic!("round {round}: {e}"))
                        .iter()
                        .map(|x| x.to_native())
                        .collect()
                })
                .collect();
            drop(run);
            if let Some(k) = killer {
                k.stop();
            }
            assert_eq!(got, want, "round {round}");
            // A plain run in between: its own numbering from 0, and the next served run's too.
            let plain: Vec<Vec<u64>> = p
                .run(500..520u64)
                .map(|r| r.unwrap().iter().map(|x| x.to_native()).collect())
                .collect();
            let want_plain: Vec<Vec<u64>> = numberer_reference(500..520)
                .into_iter()
                .map(|(_, v)| v)
                .collect();
            assert_eq!(plain, want_plain, "round {round}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

#[test]
fn a_saved_stateful_stage_under_kills_saves_the_sequential_numbering() {
    let guard = serial();
    let _dog = watchdog(240, "a_saved_stateful_stage_under_kills");
    let dir = scratch("saved-state");
    let store = Store::open(dir.join("store")).unwrap();
    {
        let mut p = Pipeline::<u64>::builder()
            .map_fn("chunks", |&n| n.to_native())
            .stateful(
                "number",
                Numberer {
                    dir: dir.clone(),
                    spin_us: 100,
                    fails: never,
                },
            )
            .save(&store)
            .build(patient(&guard).ring_bytes(1 << 16))
            .unwrap();
        for round in 0..3u64 {
            let key = StageKey::new("raw", format!("saved state {round}"), b"");
            let n = 250u64;
            let want: Vec<Vec<u64>> = numberer_reference(0..n)
                .into_iter()
                .map(|(_, v)| v)
                .collect();
            let killer = Killer::start(dir.join("pid"), 20, 3000, 300 + round);
            let mut run = p.run_keyed(&key, 0..n).unwrap();
            let got: Vec<Vec<u64>> = run
                .by_ref()
                .map(|r| r.unwrap().iter().map(|x| x.to_native()).collect())
                .collect();
            killer.stop();
            assert_eq!(got, want, "round {round}");
            assert_eq!(run.saved(), ["number"]);
            drop(run);
            let stream = store.load(&key_of(&p, &key, "number")).unwrap().unwrap();
            let saved: Vec<Vec<u64>> = (0..stream.chunks())
                .map(|i| {
                    let c = stream.chunk(i).unwrap();
                    c.archive::<Vec<u64>>()
                        .unwrap()
                        .iter()
                        .map(|x| x.to_native())
                        .collect()
                })
                .collect();
            assert_eq!(saved, want, "round {round}");
            // Served: the same.
            let run = p.run_keyed(&key, std::iter::empty::<u64>()).unwrap();
            let served: Vec<Vec<u64>> = run
                .map(|r| r.unwrap().iter().map(|x| x.to_native()).collect())
                .collect();
            assert_eq!(served, want);
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

/// Every counter of `now` is at least `then`'s.
fn assert_monotonic(
    then: &shmexec::pipeline::PipelineStats,
    now: &shmexec::pipeline::PipelineStats,
) {
    for (a, b) in then.stages.iter().zip(&now.stages) {
        assert!(
            b.items >= a.items,
            "{}: items {} -> {}",
            a.name,
            a.items,
            b.items
        );
        assert!(b.bytes_in >= a.bytes_in, "{}: bytes_in", a.name);
        assert!(
            b.outputs >= a.outputs,
            "{}: outputs {} -> {}",
            a.name,
            a.outputs,
            b.outputs
        );
        assert!(b.bytes_out >= a.bytes_out, "{}: bytes_out", a.name);
        assert!(b.busy >= a.busy, "{}: busy", a.name);
        assert!(b.errors >= a.errors, "{}: errors", a.name);
    }
    assert!(now.copied_between_groups >= then.copied_between_groups);
}

#[test]
fn stats_read_constantly_during_a_run_with_kills_never_go_back() {
    let guard = serial();
    let _dog = watchdog(240, "stats_read_constantly");
    let dir = scratch("stats");
    {
        let mut p = Pipeline::<u64>::builder()
            .map("fan", tracked(&dir, "fan", 20, fan))
            .branch(|b| {
                b.each("sink", |n| {
                    if n.to_native() % 7 == 0 {
                        Err("sevens".into())
                    } else {
                        Ok(())
                    }
                })
                .workers(1)
            })
            .map("main", tracked(&dir, "main", 20, one))
            .alone()
            .stateful(
                "number",
                Numberer {
                    dir: dir.clone(),
                    spin_us: 10,
                    fails: fails_in_stage,
                },
            )
            .build(patient(&guard).ring_bytes(1 << 16))
            .unwrap();
        let mut last = p.stats();
        for round in 0..3u64 {
            let ks = killers(&dir, &[("fan", 0), ("main", 1)], 10, 5000, 500 + round);
            let killer = Killer::start(dir.join("pid"), 10, 5000, 600 + round);
            let mut run = p.run(0..300u64);
            let mut reads = 0;
            loop {
                let now = run.stats();
                assert_monotonic(&last, &now);
                let _ = now.since(&last);
                last = now;
                reads += 1;
                match run.next() {
                    Some(r) => {
                        if let Err(e) = r {
                            assert!(
                                matches!(&e, Error::Stage { stage, .. } if stage == "number"),
                                "{e}"
                            );
                        }
                    }
                    None => break,
                }
            }
            for k in ks {
                k.stop();
            }
            killer.stop();
            assert!(reads > 300);
            drop(run);
            let after = p.stats();
            assert_monotonic(&last, &after);
            last = after;
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

#[test]
fn pipelines_with_branches_state_and_saved_stages_leak_no_maps_fds_or_children() {
    let guard = serial();
    let _dog = watchdog(180, "pipelines_with_branches_leak");
    let dir = scratch("leaks");
    let store = Store::open(dir.join("store")).unwrap();
    let make = |guard: &Guard| {
        Pipeline::<u64>::builder()
            .map_fn("wide", |&n| vec![n.to_native(); 100])
            .save(&store)
            .branch(|b| {
                b.map_fn("head", |v: &rkyv::Archived<Vec<u64>>| v[0].to_native())
                    .workers(1)
                    .save(&store)
            })
            .map_fn("len", |v: &rkyv::Archived<Vec<u64>>| v.len() as u64)
            .stateful(
                "number",
                Numberer {
                    dir: dir.clone(),
                    spin_us: 0,
                    fails: never,
                },
            )
            .build(builder(guard).workers(2).ring_bytes(1 << 16))
            .unwrap()
    };
    drop(make(&guard));
    let maps = shm_mappings();
    let fds = support::open_fds();
    for round in 0..8u64 {
        let mut p = make(&guard);
        let key = StageKey::new("raw", format!("leaks {round}"), b"");
        assert_eq!(count_ok(p.run_keyed(&key, 0..50u64).unwrap()), 50);
        {
            let mut run = p
                .run_keyed(&StageKey::new("raw", "never done", b""), 0..100u64)
                .unwrap();
            for _ in 0..round {
                run.next().unwrap().unwrap();
            }
        }
        if round % 2 == 0 {
            let held = p.run(0..3u64).next().unwrap().unwrap();
            drop(p);
            assert_eq!(held.len(), 1 + events(100) as usize);
            drop(held);
        } else {
            drop(p);
        }
        assert_no_children();
        assert_eq!(shm_mappings(), maps, "round {round}");
        assert_eq!(support::open_fds(), fds, "round {round}");
    }
    assert!(partials(&store).is_empty(), "{:?}", partials(&store));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A stage fused after a stateful one (in its serial worker) that publishes its output (the
/// item's closing frame) and then, the first time it sees the output whose first number is
/// `at`, dies before the worker saves the state of the stage before.
struct DiesAfterClosing {
    dir: PathBuf,
    at: u64,
}

impl shmexec::Task for DiesAfterClosing {
    type Input = Vec<u64>;
    type Output = Vec<u64>;
    fn process(&mut self, _: &rkyv::Archived<Vec<u64>>) -> Result<Vec<u64>, BoxError> {
        unreachable!("produce is overridden")
    }
    fn produce(
        &mut self,
        v: &rkyv::Archived<Vec<u64>>,
        out: &mut shmexec::OutputSink<'_>,
    ) -> Result<(), BoxError> {
        let v: Vec<u64> = v.iter().map(|x| x.to_native()).collect();
        out.emit_last(&v)?;
        let marker = self.dir.join("died");
        if v.get(1) == Some(&self.at) && !marker.exists() {
            std::fs::write(&marker, b"")?;
            std::process::abort();
        }
        Ok(())
    }
}

#[test]
fn an_item_given_up_after_its_output_was_handed_out_is_followed_by_its_error_and_counts_nothing() {
    let guard = serial();
    let _dog = watchdog(60, "an_item_given_up_after_its_output_was_handed_out");
    let dir = scratch("closed-then-given-up");
    {
        // Chunk 5's events are numbered from 10 (0 + 1 + 2 + 3 + 4 before it). In a fused
        // chain the last stage's `emit_last` is not the item's closing frame (the worker
        // closes it once the chain is through), so the death after it is a death mid-item.
        let mut p = Pipeline::<u64>::builder()
            .stateful(
                "number",
                Numberer {
                    dir: dir.clone(),
                    spin_us: 0,
                    fails: never,
                },
            )
            .map(
                "after",
                DiesAfterClosing {
                    dir: dir.clone(),
                    at: 10,
                },
            )
            .serial()
            .build(builder(&guard).workers(2).max_attempts(1))
            .unwrap();
        assert_eq!(p.plan().fused().len(), 1);
        let mut run = p.run(0..12u64);
        let mut results: Vec<(u64, Option<Vec<u64>>)> = Vec::new();
        loop {
            if results.len() == 5 {
                // Nobody drives the pipeline while the worker publishes chunk 5 and dies: the
                // death is charged to chunk 5, which is given up (one attempt).
                std::thread::sleep(Duration::from_millis(300));
            }
            let Some(r) = run.next() else { break };
            results.push(match r {
                Ok(v) => (v.seq(), Some(v.iter().map(|x| x.to_native()).collect())),
                Err(e) => {
                    assert!(matches!(&e, Error::Stage { error, .. } if matches!(**error, Error::WorkerCrashed { .. })), "{e}");
                    (e.seq().unwrap(), None)
                }
            });
        }
        drop(run);
        assert!(dir.join("died").exists());
        // Chunk 5's output was handed out before the death; then its error follows it, in its
        // place: the item failed, and its state does not count. So the numbers of the items
        // that did not fail go on without a gap or a repeat.
        let failed: Vec<u64> = results
            .iter()
            .filter(|r| r.1.is_none())
            .map(|r| r.0)
            .collect();
        assert_eq!(failed, vec![5]);
        let seqs: Vec<u64> = results.iter().map(|r| r.0).collect();
        assert_eq!(seqs, [0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10, 11]);
        let numbers: Vec<u64> = results
            .iter()
            .filter(|r| !failed.contains(&r.0))
            .flat_map(|r| r.1.as_ref().unwrap()[1..].to_vec())
            .collect();
        let want: u64 = (0..12).filter(|i| !failed.contains(i)).map(events).sum();
        assert_eq!(numbers, (0..want).collect::<Vec<_>>());
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

#[test]
fn a_stateful_stage_in_a_saved_branch_under_kills_saves_the_sequential_numbering() {
    let guard = serial();
    let _dog = watchdog(240, "a_stateful_stage_in_a_saved_branch");
    let dir = scratch("branch-state");
    let store = Store::open(dir.join("store")).unwrap();
    {
        let mut p = Pipeline::<u64>::builder()
            .map_fn("chunks", |&n| n.to_native())
            .branch(|b| {
                b.stateful(
                    "number",
                    Numberer {
                        dir: dir.clone(),
                        spin_us: 80,
                        fails: never,
                    },
                )
                .save(&store)
            })
            .map_fn("main", |&n| n.to_native() + 1)
            .build(patient(&guard).ring_bytes(1 << 16))
            .unwrap();
        for round in 0..3u64 {
            let key = StageKey::new("raw", format!("branch state {round}"), b"");
            let n = 250u64;
            let killer = Killer::start(dir.join("pid"), 20, 3000, 900 + round);
            let mut run = p.run_keyed(&key, 0..n).unwrap();
            let got: Vec<u64> = run.by_ref().map(|r| r.unwrap().to_native()).collect();
            killer.stop();
            assert_eq!(got, (1..=n).collect::<Vec<_>>());
            assert_eq!(run.branch_failures(), 0);
            assert_eq!(run.saved(), ["number"]);
            drop(run);
            let stream = store.load(&key_of(&p, &key, "number")).unwrap().unwrap();
            let saved: Vec<Vec<u64>> = (0..stream.chunks())
                .map(|i| {
                    let c = stream.chunk(i).unwrap();
                    c.archive::<Vec<u64>>()
                        .unwrap()
                        .iter()
                        .map(|x| x.to_native())
                        .collect()
                })
                .collect();
            let want: Vec<Vec<u64>> = numberer_reference(0..n)
                .into_iter()
                .map(|(_, v)| v)
                .collect();
            assert_eq!(saved, want, "round {round}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

/// A stage fused after the stateful one that fails the items whose digest is 0 mod 5: the
/// state must not count them.
fn later_fails(v: &[u64]) -> bool {
    v[0] % 5 == 0
}

#[test]
fn items_failing_in_a_later_fused_stage_change_no_state_under_random_kills() {
    let guard = serial();
    let _dog = watchdog(240, "items_failing_in_a_later_fused_stage");
    let dir = scratch("later-fails");
    {
        let mut p = Pipeline::<u64>::builder()
            .map_fn("chunks", |&n| n.to_native())
            .stateful(
                "number",
                Numberer {
                    dir: dir.clone(),
                    spin_us: 60,
                    fails: never,
                },
            )
            .map(
                "check",
                shmexec::try_from_fn::<Vec<u64>, _, _>(|v| {
                    let v: Vec<u64> = v.iter().map(|x| x.to_native()).collect();
                    spin(40);
                    if later_fails(&v) {
                        Err("digest 0 mod 5".into())
                    } else {
                        Ok(v)
                    }
                }),
            )
            .serial()
            .build(patient(&guard))
            .unwrap();
        assert_eq!(
            p.plan().fused(),
            vec![vec!["chunks"], vec!["number", "check"]]
        );
        for round in 0..3u64 {
            let n = 300u64;
            let killer = Killer::start(dir.join("pid"), 25, 3000, 1234 + round);
            let got: Vec<Option<Vec<u64>>> = p
                .run(0..n)
                .map(|r| match r {
                    Ok(v) => Some(v.iter().map(|x| x.to_native()).collect()),
                    Err(e) => {
                        assert!(
                            matches!(&e, Error::Stage { stage, .. } if stage == "check"),
                            "{e}"
                        );
                        None
                    }
                })
                .collect();
            killer.stop();
            let (mut next, mut digest) = (0u64, 0u64);
            let mut want = Vec::new();
            for i in 0..n {
                let d = mix(digest, i);
                let mut out = vec![d];
                out.extend(next..next + events(i));
                if later_fails(&out) {
                    want.push(None);
                } else {
                    want.push(Some(out));
                    next += events(i);
                    digest = d;
                }
            }
            assert!(want.iter().any(Option::is_none));
            assert_eq!(got, want, "round {round}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

/// Starts once per worker index; every successor fails its init.
struct StartsOnce {
    dir: PathBuf,
}

impl shmexec::Task for StartsOnce {
    type Input = u64;
    type Output = ();
    fn init(&mut self, w: &WorkerInfo) -> Result<(), BoxError> {
        let marker = self.dir.join(format!("started-{}", w.index));
        if marker.exists() {
            return Err("a successor cannot start".into());
        }
        std::fs::write(&marker, b"")?;
        write_pid(&self.dir, &format!("pid-once-{}", w.index));
        Ok(())
    }
    fn process(&mut self, _: &rkyv::Archived<u64>) -> Result<(), BoxError> {
        Ok(())
    }
}

#[test]

fn a_branch_whose_only_worker_is_given_up_does_not_stop_the_main_line() {
    let guard = serial();
    let _dog = watchdog(120, "a_branch_whose_only_worker_is_given_up");
    let dir = scratch("branch-given-up");
    {
        let mut p = Pipeline::<u64>::builder()
            .map_fn("src", |&n| n.to_native())
            .branch(|b| b.map("once", StartsOnce { dir: dir.clone() }).workers(1))
            .map_fn("main", |&n| n.to_native() * 2)
            .build(
                builder(&guard)
                    .workers(2)
                    .max_start_attempts(2)
                    .restart_backoff(Duration::from_millis(1)),
            )
            .unwrap();
        let pid: i32 = std::fs::read_to_string(dir.join("pid-once-0"))
            .unwrap()
            .parse()
            .unwrap();
        support::kill(pid);
        for round in 0..3u64 {
            let mut run = p.run(0..100u64);
            let results: Vec<_> = run.by_ref().map(|r| r.map(|v| v.to_native())).collect();
            // The branch's items fail (its worker is gone); the main line's do not.
            let ok: Vec<u64> = results
                .iter()
                .filter_map(|r| r.as_ref().ok().copied())
                .collect();
            assert_eq!(
                ok,
                (0..100).map(|n| n * 2).collect::<Vec<_>>(),
                "round {round}: {:?}",
                results
                    .last()
                    .map(|r| r.as_ref().map_err(|e| e.to_string()))
            );
            assert_eq!(run.branch_failures(), 100, "round {round}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

/// A one-stage task that gives `n` for `n` as its last output (the closing frame), and then,
/// on input `at`, dies: at most `times` times (marker files count them).
struct DiesAfterLast {
    dir: PathBuf,
    at: u64,
    times: usize,
}

impl shmexec::Task for DiesAfterLast {
    type Input = u64;
    type Output = u64;
    fn process(&mut self, _: &rkyv::Archived<u64>) -> Result<u64, BoxError> {
        unreachable!("produce is overridden")
    }
    fn produce(
        &mut self,
        n: &rkyv::Archived<u64>,
        out: &mut shmexec::OutputSink<'_>,
    ) -> Result<(), BoxError> {
        let n = n.to_native();
        out.emit_last(&n)?;
        if n == self.at {
            let died = std::fs::read_dir(&self.dir)?.count();
            if died < self.times {
                std::fs::write(self.dir.join(format!("died-{died}")), b"")?;
                std::process::abort();
            }
        }
        Ok(())
    }
}

#[test]

fn a_worker_that_always_dies_after_its_closing_frame_is_given_up_instead_of_respawned_forever() {
    let guard = serial();
    let _dog = watchdog(20, "a_worker_that_always_dies_after_its_closing_frame");
    let dir = scratch("always-dies-after-last");
    {
        let mut p = Pipeline::<u64>::builder()
            .map(
                "dies",
                DiesAfterLast {
                    dir: dir.clone(),
                    at: 3,
                    times: usize::MAX,
                },
            )
            .build(builder(&guard).workers(1))
            .unwrap();
        let results: Vec<_> = p.run(0..6u64).map(|r| r.map(|v| v.to_native())).collect();
        eprintln!("{results:?}, respawns {}", p.group_stats()[0].respawns);
        // Item 3 was answered (its output is out); whatever is reported for it, the other
        // items come through and the run ends.
        let ok: Vec<u64> = results
            .iter()
            .filter_map(|r| r.as_ref().ok().copied())
            .collect();
        assert_eq!(ok, (0..6).collect::<Vec<_>>());
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

#[test]
fn an_item_whose_worker_dies_after_its_closing_frame_is_handed_out_once() {
    let guard = serial();
    let _dog = watchdog(20, "an_item_whose_worker_dies_after_its_closing_frame");
    let dir = scratch("dies-once-after-last");
    {
        let mut p = Pipeline::<u64>::builder()
            .map(
                "dies",
                DiesAfterLast {
                    dir: dir.clone(),
                    at: 3,
                    times: 1,
                },
            )
            .build(builder(&guard).workers(1).max_attempts(1))
            .unwrap();
        let mut run = p.run(0..6u64);
        let mut results = Vec::new();
        loop {
            if results.len() == 3 {
                // The worker publishes 3 and dies while nobody drives the pool.
                std::thread::sleep(Duration::from_millis(300));
            }
            let Some(r) = run.next() else { break };
            results.push(
                r.map(|v| (v.seq(), v.to_native()))
                    .map_err(|e| e.to_string()),
            );
        }
        drop(run);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "it died once");
        assert_eq!(results.len(), 6, "{results:#?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

#[test]
fn a_failure_after_the_saved_stage_does_not_spoil_its_stream_but_stopping_at_the_last_result_does()
{
    let guard = serial();
    let _dog = watchdog(60, "a_failure_after_the_saved_stage");
    let dir = scratch("fail-after-saved");
    let store = Store::open(dir.join("store")).unwrap();
    {
        let mut p = Pipeline::<u64>::builder()
            .map_fn("peaks", |&n| n.to_native() * 3 + 1)
            .save(&store)
            .map(
                "events",
                shmexec::try_from_fn::<u64, _, _>(|&n| match n.to_native() {
                    40 => Err("peak 40 is bad".into()),
                    n => Ok(n * 2),
                }),
            )
            .build(builder(&guard).workers(2))
            .unwrap();
        let key = StageKey::new("raw", "fails after", b"");
        let mut run = p.run_keyed(&key, 0..20u64).unwrap();
        let results: Vec<_> = run.by_ref().collect();
        assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1);
        assert_eq!(results[13].as_ref().unwrap_err().seq(), Some(13));
        // The saved stage's outputs are all there: committed.
        assert_eq!(run.saved(), ["peaks"]);
        drop(run);
        assert_eq!(
            saved_values(&store, &key_of(&p, &key, "peaks")),
            (0..20u64).map(|n| n * 3 + 1).collect::<Vec<_>>()
        );
        // A caller that takes exactly the results it expects and stops there has had every
        // result, but the stream is committed only by the `next()` that says the run is over.
        let key = StageKey::new("raw", "taken exactly", b"");
        let mut run = p.run_keyed(&key, 0..20u64).unwrap();
        assert_eq!(run.by_ref().take(20).count(), 20);
        assert!(run.saved().is_empty());
        drop(run);
        assert!(store.load(&key_of(&p, &key, "peaks")).unwrap().is_none());
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}
