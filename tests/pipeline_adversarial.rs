//! Adversarial tests of pipelines: runs dropped midway, results held against small rings,
//! workers killed in every group, hung and failing stages in later groups, degenerate inputs
//! and outputs, many groups, and leaks. Every test is deterministic (no timing assertions);
//! those that could hang run under a watchdog that aborts with a message.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use shmexec::pipeline::{Pipeline, Stages};
use shmexec::{BoxError, Error, OutputSink, Task, WorkerInfo};
use support::{assert_no_children, builder, kill, scratch, serial, shm_mappings, watchdog};

type Guard = std::sync::MutexGuard<'static, ()>;

/// What the four-stage pipeline of [`four_groups`] gives for input `n`.
fn f4(n: u64) -> u64 {
    ((n + 1) * 3 + 7) * 2
}

/// a (pool's 2 workers) -> b (1 worker of its own) -> c (serial) -> d (alone, 2 workers): four
/// groups. `b` sleeps `b_us` microseconds per item, so that items are in flight everywhere.
fn four_groups(guard: &Guard, b_us: u64, pool: shmexec::Builder) -> Pipeline<u64, u64> {
    let _ = guard;
    Pipeline::<u64>::builder()
        .map_fn("a", |&n| n.to_native() + 1)
        .map_fn("b", move |&n| {
            if b_us > 0 {
                std::thread::sleep(Duration::from_micros(b_us));
            }
            n.to_native() * 3
        })
        .workers(1)
        .map_fn("c", |&n| n.to_native() + 7)
        .serial()
        .map_fn("d", |&n| n.to_native() * 2)
        .alone()
        .build(pool)
        .expect("pipeline")
}

/// Checks one complete run of `inputs` (every result Ok, its value, consecutive numbers above
/// `last_seq`); returns the last number.
fn check_full_run(
    p: &mut Pipeline<u64, u64>,
    inputs: std::ops::Range<u64>,
    last_seq: Option<u64>,
) -> u64 {
    let got: Vec<(u64, u64)> = p
        .run(inputs.clone())
        .map(|r| {
            let r = r.unwrap_or_else(|e| panic!("a full run failed: {e}"));
            (r.seq(), r.to_native())
        })
        .collect();
    assert_eq!(got.len() as u64, inputs.end - inputs.start);
    let first = got[0].0;
    if let Some(last) = last_seq {
        assert!(first > last, "numbers go back: {first} after {last}");
    }
    for (i, (&(seq, v), n)) in got.iter().zip(inputs).enumerate() {
        assert_eq!(seq, first + i as u64, "numbered without gaps");
        assert_eq!(v, f4(n), "input {n}");
    }
    got.last().unwrap().0
}

#[test]
fn runs_dropped_midway_leave_the_next_run_whole() {
    let guard = serial();
    let _dog = watchdog(120, "runs_dropped_midway_leave_the_next_run_whole");
    {
        let mut p = four_groups(&guard, 200, builder(&guard).workers(2));
        assert_eq!(p.plan().workers(), vec![2, 1, 1, 2]);
        let mut base = 0u64;
        let mut last = None;
        for round in 0..40u64 {
            let take = (round * 5) % 13;
            {
                let mut run = p.run(base..base + 60);
                for i in 0..take {
                    let r = run.next().expect("a result").expect("ok");
                    assert_eq!(r.to_native(), f4(base + i));
                    if let Some(l) = last {
                        assert!(r.seq() > l);
                    }
                    last = Some(r.seq());
                }
            }
            base += 60;
            last = Some(check_full_run(&mut p, base..base + 25, last));
            base += 25;
        }
    }
    assert_no_children();
}

#[test]
fn runs_dropped_at_once_and_after_every_result_many_times() {
    let guard = serial();
    let _dog = watchdog(
        120,
        "runs_dropped_at_once_and_after_every_result_many_times",
    );
    {
        // No sleep: items race through the four groups.
        let mut p = four_groups(&guard, 0, builder(&guard).workers(2).ring_bytes(1 << 16));
        let mut last = None;
        let mut base = 0;
        for round in 0..150u64 {
            {
                let mut run = p.run(base..base + 200);
                for _ in 0..round % 4 {
                    run.next().unwrap().unwrap();
                }
            }
            base += 200;
            if round % 10 == 9 {
                last = Some(check_full_run(&mut p, base..base + 50, last));
                base += 50;
            }
        }
        check_full_run(&mut p, base..base + 500, last);
    }
    assert_no_children();
}

/// u64 -> 10 KB chunks in a middle group -> a copy of each in the last: with 64 KiB rings, a
/// few held results fill the last group's output rings.
fn big_outputs(guard: &Guard) -> Pipeline<u64, Vec<u8>> {
    Pipeline::<u64>::builder()
        .map_fn("first", |&n| n.to_native())
        .map_fn("widen", |&n| vec![n.to_native() as u8; 10_000])
        .alone()
        .map_fn("copy", |v| v.as_slice().to_vec())
        .alone()
        .build(builder(guard).workers(2).ring_bytes(1 << 16))
        .expect("pipeline")
}

#[test]
fn holding_every_result_ends_the_run_instead_of_hanging() {
    let guard = serial();
    let _dog = watchdog(60, "holding_every_result_ends_the_run_instead_of_hanging");
    {
        let mut p = big_outputs(&guard);
        let results: Vec<_> = p.run(0..100u64).collect();
        let ok: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert!(
            !ok.is_empty() && ok.len() < 100,
            "{} results held",
            ok.len()
        );
        for (i, o) in ok.iter().enumerate() {
            assert_eq!(o.seq(), i as u64);
            assert_eq!(o.as_slice(), &vec![i as u8; 10_000][..]);
        }
        assert!(
            results
                .iter()
                .any(|r| matches!(r, Err(Error::OutputsHeld { .. }))),
            "no OutputsHeld"
        );
        assert!(
            matches!(results.last(), Some(Err(Error::CallEnded { .. }))),
            "{:?}",
            results.last()
        );
        drop(results);
        // Nothing is left behind that a later run waits for.
        let got: Vec<Vec<u8>> = p
            .run(0..50u64)
            .map(|r| r.unwrap().as_slice().to_vec())
            .collect();
        assert_eq!(got.len(), 50);
        for (i, v) in got.iter().enumerate() {
            assert_eq!(v, &vec![i as u8; 10_000]);
        }
    }
    assert_no_children();
}

#[test]
fn dropping_held_results_after_outputs_held_loses_nothing() {
    let guard = serial();
    let _dog = watchdog(60, "dropping_held_results_after_outputs_held_loses_nothing");
    {
        let mut p = big_outputs(&guard);
        let mut held = Vec::new();
        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut reports = 0;
        for r in p.run(0..200u64) {
            match r {
                Ok(o) => held.push(o),
                Err(Error::OutputsHeld { .. }) => {
                    reports += 1;
                    got.extend(held.drain(..).map(|o| o.as_slice().to_vec()));
                }
                Err(e) => panic!("{e}"),
            }
        }
        got.extend(held.drain(..).map(|o| o.as_slice().to_vec()));
        assert!(reports > 0, "the rings never filled");
        assert_eq!(got.len(), 200);
        for (i, v) in got.iter().enumerate() {
            assert_eq!(v, &vec![i as u8; 10_000], "item {i}");
        }
    }
    assert_no_children();
}

#[test]
fn results_held_across_runs_and_the_pipeline_keep_their_bytes() {
    let guard = serial();
    let _dog = watchdog(
        60,
        "results_held_across_runs_and_the_pipeline_keep_their_bytes",
    );
    let kept;
    {
        let mut p = big_outputs(&guard);
        let mut run = p.run(0..100u64);
        let a = run.next().unwrap().unwrap();
        let b = run.next().unwrap().unwrap();
        drop(run);
        // A second run, with two results of the first still held in the last group's rings:
        // it may say so (the rings free bytes in order), but never hands out wrong bytes.
        let mut k = 0u8;
        for r in p.run(0..30u64) {
            match r {
                Ok(o) => {
                    assert_eq!(o.as_slice(), &vec![k; 10_000][..]);
                    k += 1;
                }
                Err(Error::OutputsHeld { .. } | Error::CallEnded { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(a.as_slice(), &vec![0u8; 10_000][..]);
        assert_eq!(b.as_slice(), &vec![1u8; 10_000][..]);
        kept = (a, b);
    }
    // The pipeline is gone; the held results still read their bytes.
    assert_eq!(kept.0.as_slice(), &vec![0u8; 10_000][..]);
    assert_eq!(kept.1.as_slice(), &vec![1u8; 10_000][..]);
    drop(kept);
    assert_no_children();
}

#[test]
fn killing_a_worker_of_each_group_mid_run_loses_and_repeats_nothing() {
    let guard = serial();
    let _dog = watchdog(
        180,
        "killing_a_worker_of_each_group_mid_run_loses_and_repeats_nothing",
    );
    {
        let mut p = four_groups(&guard, 300, builder(&guard).workers(2));
        let mut kills = 0u64;
        let mut per_group = [0u64; 4];
        let mut last = None;
        let mut base = 0;
        for round in 0..12usize {
            let g = round % 4;
            let stats = p.group_stats();
            let w = (round / 4) % stats[g].workers.len();
            let pid = stats[g].workers[w].pid;
            let n = 60;
            let mut got = Vec::new();
            for (i, r) in p.run(base..base + n).enumerate() {
                if i == 10 + round {
                    kill(pid);
                }
                let r = r.unwrap_or_else(|e| panic!("round {round}: {e}"));
                got.push((r.seq(), r.to_native()));
            }
            kills += 1;
            per_group[g] += 1;
            assert_eq!(got.len() as u64, n, "round {round}");
            let first = got[0].0;
            if let Some(l) = last {
                assert!(first > l);
            }
            for (i, &(seq, v)) in got.iter().enumerate() {
                assert_eq!(seq, first + i as u64, "round {round}");
                assert_eq!(v, f4(base + i as u64), "round {round} item {i}");
            }
            last = Some(got.last().unwrap().0);
            base += n;
            // Until the death was seen and the worker replaced.
            loop {
                let respawns: Vec<u64> = p.group_stats().iter().map(|s| s.respawns).collect();
                let total: u64 = respawns.iter().sum();
                assert!(total <= kills, "round {round}: {respawns:?}");
                if total == kills {
                    assert_eq!(respawns, per_group.to_vec(), "round {round}");
                    break;
                }
                last = Some(check_full_run(&mut p, base..base + 4, last));
                base += 4;
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    assert_no_children();
}

#[test]
fn killing_every_worker_of_every_group_at_once_loses_and_repeats_nothing() {
    let guard = serial();
    let _dog = watchdog(180, "killing_every_worker_of_every_group_at_once");
    {
        let mut p = four_groups(&guard, 300, builder(&guard).workers(2));
        let mut last = None;
        let mut base = 0;
        for round in 0..4u64 {
            let pids: Vec<i32> = p
                .group_stats()
                .iter()
                .flat_map(|s| s.workers.iter().map(|w| w.pid).collect::<Vec<_>>())
                .collect();
            assert_eq!(pids.len(), 6);
            let mut got = Vec::new();
            for (i, r) in p.run(base..base + 80).enumerate() {
                if i == 20 {
                    pids.iter().for_each(|&pid| kill(pid));
                }
                let r = r.unwrap_or_else(|e| panic!("round {round}: {e}"));
                got.push((r.seq(), r.to_native()));
            }
            assert_eq!(got.len(), 80);
            for (i, &(_, v)) in got.iter().enumerate() {
                assert_eq!(v, f4(base + i as u64), "round {round} item {i}");
            }
            base += 80;
            loop {
                let total: u64 = p.group_stats().iter().map(|s| s.respawns).sum();
                assert!(total <= 6 * (round + 1));
                if total == 6 * (round + 1) {
                    break;
                }
                last = Some(check_full_run(&mut p, base..base + 4, last));
                base += 4;
                std::thread::sleep(Duration::from_millis(10));
            }
            last = Some(check_full_run(&mut p, base..base + 40, last));
            base += 40;
        }
    }
    assert_no_children();
}

/// A middle stage that emits `n % 4 * 3` outputs per input (`n * 100 + k`), and kills its
/// worker after the second output the first time it sees an input that is 5 mod 8 (a marker
/// file per input says it did).
struct CrashMidItem {
    dir: PathBuf,
}

impl Task for CrashMidItem {
    type Input = u64;
    type Output = u64;
    fn process(&mut self, _: &rkyv::Archived<u64>) -> Result<u64, BoxError> {
        unreachable!("produce is overridden")
    }
    fn produce(
        &mut self,
        n: &rkyv::Archived<u64>,
        out: &mut OutputSink<'_>,
    ) -> Result<(), BoxError> {
        let n = n.to_native();
        let count = n % 4 * 3;
        for k in 0..count {
            if k == 2 && n % 8 == 5 {
                let marker = self.dir.join(format!("crashed-{n}"));
                if !marker.exists() {
                    std::fs::write(&marker, b"")?;
                    // Let the coordinator hand the first outputs on before the death.
                    std::thread::sleep(Duration::from_millis(20));
                    std::process::abort();
                }
            }
            out.emit(&(n * 100 + k))?;
        }
        Ok(())
    }
}

fn crash_mid_item_want(inputs: std::ops::Range<u64>) -> Vec<u64> {
    inputs
        .flat_map(|n| (0..n % 4 * 3).map(move |k| (n * 100 + k) * 2))
        .collect()
}

#[test]
fn a_crash_after_some_outputs_in_a_middle_group_hands_each_output_on_once() {
    let guard = serial();
    let _dog = watchdog(120, "a_crash_after_some_outputs_in_a_middle_group");
    let dir = scratch("midcrash");
    {
        let mut p = Pipeline::<u64>::builder()
            .map_fn("first", |&n| n.to_native())
            .map("burst", CrashMidItem { dir: dir.clone() })
            .alone()
            .map_fn("last", |&n| n.to_native() * 2)
            .alone()
            .build(builder(&guard).workers(2).max_attempts(3))
            .unwrap();
        let got: Vec<(u64, u64)> = p
            .run(0..40u64)
            .map(|r| {
                let r = r.unwrap();
                (r.seq(), r.to_native())
            })
            .collect();
        let values: Vec<u64> = got.iter().map(|g| g.1).collect();
        assert_eq!(values, crash_mid_item_want(0..40));
        for &(seq, v) in &got {
            assert_eq!(seq, v / 200, "each output numbered by its input");
        }
        // 5, 13, 21, 29, 37 crashed once each (5 % 4 * 3 = 3 outputs: a crash at the third).
        assert_eq!(p.group_stats()[1].respawns, 5);
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

#[test]
fn a_crash_after_some_outputs_in_the_last_group_hands_each_output_on_once() {
    let guard = serial();
    let _dog = watchdog(120, "a_crash_after_some_outputs_in_the_last_group");
    let dir = scratch("lastcrash");
    {
        let mut p = Pipeline::<u64>::builder()
            .map_fn("first", |&n| n.to_native())
            .workers(1)
            .map("burst", CrashMidItem { dir: dir.clone() })
            .build(builder(&guard).workers(2).max_attempts(3))
            .unwrap();
        let got: Vec<u64> = p
            .run(0..40u64)
            .map(|r| r.unwrap().to_native() * 2)
            .collect();
        assert_eq!(got, crash_mid_item_want(0..40));
        assert_eq!(p.group_stats()[1].respawns, 5);
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

#[test]
fn a_stage_hung_on_one_item_in_a_middle_group_times_out_and_the_rest_go_on() {
    let guard = serial();
    let _dog = watchdog(120, "a_stage_hung_on_one_item_in_a_middle_group");
    {
        let mut p = Pipeline::<u64>::builder()
            .map_fn("first", |&n| n.to_native() + 1)
            .map_fn("hang", |&n| {
                if n.to_native() == 6 {
                    loop {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                n.to_native() * 10
            })
            .alone()
            .map_fn("last", |&n| n.to_native() + 3)
            .alone()
            .build(
                builder(&guard)
                    .workers(2)
                    .chunk_timeout(Duration::from_millis(400)),
            )
            .unwrap();
        let results: Vec<_> = p.run(0..30u64).collect();
        assert_eq!(results.len(), 30);
        for (i, r) in results.iter().enumerate() {
            let i = i as u64;
            if i == 5 {
                let e = r.as_ref().expect_err("item 5 hangs");
                assert_eq!(e.seq(), Some(5), "{e}");
                let inner = match e {
                    Error::Stage { error, .. } => &**error,
                    other => other,
                };
                assert!(matches!(inner, Error::ChunkTimeout { seq: 5, .. }), "{e:?}");
            } else {
                let v = r.as_ref().unwrap_or_else(|e| panic!("item {i}: {e}"));
                assert_eq!(v.seq(), i);
                assert_eq!(v.to_native(), (i + 1) * 10 + 3);
            }
        }
        assert_eq!(p.group_stats()[1].respawns, 1);
        // The next run is whole.
        let again: Vec<u64> = p.run(10..20u64).map(|r| r.unwrap().to_native()).collect();
        assert_eq!(
            again,
            (10..20).map(|i| (i + 1) * 10 + 3).collect::<Vec<_>>()
        );
    }
    assert_no_children();
}

/// A timeout (or a crash given up) in a group of one stage could say which stage hung: it
/// comes as a bare `ChunkTimeout`, so in a pipeline of several groups the caller cannot tell.
#[test]
fn a_timeout_in_a_middle_group_names_its_stage() {
    let guard = serial();
    let _dog = watchdog(120, "a_timeout_in_a_middle_group_names_its_stage");
    {
        let mut p = Pipeline::<u64>::builder()
            .map_fn("first", |&n| n.to_native())
            .map_fn("hang", |&n| {
                if n.to_native() == 2 {
                    loop {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                n.to_native()
            })
            .alone()
            .map_fn("last", |&n| n.to_native())
            .alone()
            .build(
                builder(&guard)
                    .workers(1)
                    .chunk_timeout(Duration::from_millis(300)),
            )
            .unwrap();
        let e = p.run(0..5u64).nth(2).unwrap().unwrap_err();
        assert!(
            matches!(&e, Error::Stage { stage, .. } if stage == "hang"),
            "the error does not name the stage that hung: {e:?}"
        );
    }
    assert_no_children();
}

/// A stage whose `init` fails (or panics, with `panic`).
struct BadInit {
    panic: bool,
}

impl Task for BadInit {
    type Input = u64;
    type Output = u64;
    fn init(&mut self, _: &WorkerInfo) -> Result<(), BoxError> {
        if self.panic {
            panic!("init panics on purpose");
        }
        Err("init fails on purpose".into())
    }
    fn process(&mut self, n: &rkyv::Archived<u64>) -> Result<u64, BoxError> {
        Ok(n.to_native())
    }
}

#[test]
fn an_init_failing_in_a_later_group_fails_the_build_and_leaves_nothing() {
    let guard = serial();
    let _dog = watchdog(60, "an_init_failing_in_a_later_group");
    let maps = shm_mappings();
    let fds = support::open_fds();
    for (panic, alone) in [(false, true), (true, true), (false, false), (true, false)] {
        // (A panic's error does not name its stage: `bug_an_init_panic_names_its_stage`.)
        let stages = Pipeline::<u64>::builder()
            .map_fn("first", |&n| n.to_native())
            .map_fn("second", |&n| n.to_native())
            .workers(1);
        let stages = stages.map("fragile", BadInit { panic });
        let stages = if alone { stages.alone() } else { stages };
        let built = stages
            .map_fn("last", |&n| n.to_native())
            .alone()
            .build(builder(&guard).workers(2));
        let e = built.err().expect("the build fails");
        let text = e.to_string();
        assert!(matches!(e, Error::Init { .. }), "{e:?}");
        if !panic {
            assert!(
                text.contains("fragile"),
                "the error does not name the stage: {text}"
            );
        }
        assert!(text.contains("on purpose"), "{text}");
        assert_no_children();
    }
    assert_eq!(shm_mappings(), maps);
    assert_eq!(support::open_fds(), fds);
}

#[test]
fn filters_that_drop_everything_and_empty_runs_in_any_group() {
    let guard = serial();
    let _dog = watchdog(60, "filters_that_drop_everything");
    {
        let mut p = Pipeline::<u64>::builder()
            .filter("none", |_| false)
            .map_fn("after", |&n| n.to_native())
            .alone()
            .build(builder(&guard).workers(2))
            .unwrap();
        assert_eq!(p.run(0..100u64).count(), 0);
        assert_eq!(p.run(std::iter::empty::<u64>()).count(), 0);
        assert_eq!(p.run(0..1u64).count(), 0);
        assert_eq!(p.stats().stages[1].items, 0);
    }
    {
        let mut p = Pipeline::<u64>::builder()
            .map_fn("before", |&n| n.to_native())
            .filter("none", |_| false)
            .alone()
            .map_fn("after", |&n| n.to_native())
            .serial()
            .build(builder(&guard).workers(2))
            .unwrap();
        assert_eq!(p.plan().fused().len(), 3);
        for _ in 0..5 {
            assert_eq!(p.run(0..100u64).count(), 0);
            assert_eq!(p.run(std::iter::empty::<u64>()).count(), 0);
        }
    }
    {
        // Only in the last group.
        let mut p = Pipeline::<u64>::builder()
            .map_fn("before", |&n| n.to_native())
            .workers(1)
            .filter("odd", |n| n.to_native() % 2 == 1)
            .alone()
            .build(builder(&guard).workers(2))
            .unwrap();
        assert_eq!(p.run(std::iter::empty::<u64>()).count(), 0);
        let one: Vec<u64> = p.run(1..2u64).map(|r| r.unwrap().to_native()).collect();
        assert_eq!(one, vec![1]);
        let got: Vec<(u64, u64)> = p
            .run(0..200u64)
            .map(|r| {
                let r = r.unwrap();
                (r.seq(), r.to_native())
            })
            .collect();
        // Numbered by their input: the first run took one input.
        let want: Vec<(u64, u64)> = (0..200u64)
            .filter(|n| n % 2 == 1)
            .map(|n| (n + 1, n))
            .collect();
        assert_eq!(got, want);
    }
    assert_no_children();
}

#[test]
fn flat_maps_with_none_or_hundreds_of_outputs_in_middle_groups() {
    let guard = serial();
    let _dog = watchdog(120, "flat_maps_with_none_or_hundreds_of_outputs");
    {
        let mut p = Pipeline::<u64>::builder()
            .map_fn("first", |&n| n.to_native())
            .flat_map("fan", |&n| {
                let n = n.to_native();
                let count = if n % 5 == 0 { 300 } else { n % 3 };
                (0..count).map(move |k| n * 1000 + k)
            })
            .alone()
            .filter("drop7", |&x| x.to_native() % 7 != 0)
            .workers(1)
            .flat_map("twice", |&x| [x.to_native(), x.to_native() + 1])
            .alone()
            .build(builder(&guard).workers(2).ring_bytes(1 << 16))
            .unwrap();
        assert_eq!(p.plan().fused().len(), 4);
        let want = |inputs: std::ops::Range<u64>| -> Vec<(u64, u64)> {
            inputs
                .flat_map(|n| {
                    let count = if n % 5 == 0 { 300 } else { n % 3 };
                    (0..count).map(move |k| (n, n * 1000 + k))
                })
                .filter(|(_, x)| x % 7 != 0)
                .flat_map(|(n, x)| [(n, x), (n, x + 1)])
                .collect()
        };
        let got: Vec<(u64, u64)> = p
            .run(0..60u64)
            .map(|r| {
                let r = r.unwrap();
                (r.seq(), r.to_native())
            })
            .collect();
        assert_eq!(got, want(0..60));
        // Drop a run in the middle of one input's 300 outputs, then run again.
        {
            let mut run = p.run(0..60u64);
            for _ in 0..100 {
                run.next().unwrap().unwrap();
            }
        }
        let got: Vec<u64> = p.run(0..30u64).map(|r| r.unwrap().to_native()).collect();
        assert_eq!(
            got,
            want(0..30).into_iter().map(|g| g.1).collect::<Vec<_>>()
        );
    }
    {
        // A middle flat_map that never gives anything.
        let mut p = Pipeline::<u64>::builder()
            .map_fn("first", |&n| n.to_native())
            .flat_map("nothing", |_| Vec::<u64>::new())
            .alone()
            .map_fn("last", |&n| n.to_native())
            .alone()
            .build(builder(&guard).workers(2))
            .unwrap();
        assert_eq!(p.run(0..100u64).count(), 0);
        assert_eq!(p.stats().stages[2].items, 0);
    }
    assert_no_children();
}

/// Emits one `Vec<u8>` of `n` bytes (all `n as u8`), written as the archive it is.
fn sized(n: u64) -> Vec<u8> {
    vec![n as u8; n as usize]
}

#[test]
fn outputs_near_and_above_the_ring_size_in_a_middle_group() {
    let guard = serial();
    let _dog = watchdog(
        120,
        "outputs_near_and_above_the_ring_size_in_a_middle_group",
    );
    {
        let mut p = Pipeline::<u64>::builder()
            .map_fn("first", |&n| n.to_native())
            .map_fn("big", |&n| sized(n.to_native()))
            .alone()
            .map_fn("measure", |v| {
                (v.len() as u64, v.iter().map(|&b| b as u64).sum::<u64>())
            })
            .alone()
            .build(builder(&guard).workers(2).ring_bytes(1 << 16))
            .unwrap();
        let sizes: Vec<u64> = [
            1000,
            30_000,
            60_000,
            65_000,
            65_300,
            65_400,
            65_440,
            65_450,
            65_460,
            65_470,
            65_480,
            65_490,
            65_500,
            65_520,
            65_536,
            70_000,
            1 << 20,
        ]
        .iter()
        .cycle()
        .take(17 * 6)
        .copied()
        .collect();
        let mut fits = None;
        for (i, r) in p.run(&sizes).enumerate() {
            let n = sizes[i];
            match r {
                Ok(v) => {
                    assert_eq!(v.seq(), i as u64);
                    assert_eq!(
                        (v.0.to_native(), v.1.to_native()),
                        (n, n * (n as u8 as u64))
                    );
                    assert!(n < 65_536, "{n} bytes went through a 64 KiB ring");
                    fits = fits.max(Some(n));
                }
                Err(Error::Stage { stage, error }) => {
                    assert_eq!(stage, "big", "{error}");
                    assert!(matches!(*error, Error::OutputTooLarge { .. }), "{error}");
                    assert_eq!(error.seq(), Some(i as u64));
                    assert!(n > 60_000, "{n} bytes did not fit");
                }
                Err(e) => panic!("item {i} ({n} bytes): {e}"),
            }
        }
        assert!(fits.unwrap() >= 65_000, "{fits:?}");
    }
    assert_no_children();
}

#[test]
fn inputs_too_large_for_the_first_ring_fail_in_their_place() {
    let guard = serial();
    let _dog = watchdog(60, "inputs_too_large_for_the_first_ring");
    {
        let mut p = Pipeline::<Vec<u8>>::builder()
            .map_fn("len", |v| v.len() as u64)
            .map_fn("double", |&n| n.to_native() * 2)
            .alone()
            .map_fn("plus", |&n| n.to_native() + 1)
            .serial()
            .build(builder(&guard).workers(2).ring_bytes(1 << 16))
            .unwrap();
        let inputs: Vec<Vec<u8>> = (0..40u64)
            .map(|i| {
                vec![
                    1;
                    if i % 3 == 1 {
                        100_000
                    } else {
                        i as usize * 100
                    }
                ]
            })
            .collect();
        for _ in 0..3 {
            let results: Vec<_> = p.run(&inputs).collect();
            assert_eq!(results.len(), 40);
            let first = results[0].as_ref().unwrap().seq();
            for (i, r) in results.iter().enumerate() {
                match r {
                    Ok(v) => {
                        assert_ne!(i % 3, 1);
                        assert_eq!(v.seq(), first + i as u64);
                        assert_eq!(v.to_native(), i as u64 * 200 + 1);
                    }
                    Err(e) => {
                        assert_eq!(i % 3, 1, "{e}");
                        assert!(matches!(e, Error::InputTooLarge { .. }), "{e:?}");
                        assert_eq!(e.seq(), Some(first + i as u64), "{e}");
                    }
                }
            }
        }
    }
    assert_no_children();
}

#[test]
fn six_groups_of_one_worker_each() {
    let guard = serial();
    let _dog = watchdog(120, "six_groups_of_one_worker_each");
    {
        let mut p = Pipeline::<u64>::builder()
            .map_fn("s0", |&n| n.to_native() + 1)
            .alone()
            .flat_map("s1", |&n| [n.to_native(), n.to_native() + 1_000_000])
            .alone()
            .filter("s2", |&n| n.to_native() % 3 != 0)
            .alone()
            .map_fn("s3", |&n| n.to_native() * 2)
            .alone()
            .map_fn("s4", |&n| vec![n.to_native(); 3])
            .alone()
            .map_fn("s5", |v| v.iter().map(|x| x.to_native()).sum::<u64>())
            .alone()
            .build(builder(&guard).workers(1).ring_bytes(1 << 16))
            .unwrap();
        assert_eq!(p.plan().workers(), vec![1; 6]);
        let want = |r: std::ops::Range<u64>| -> Vec<u64> {
            r.flat_map(|n| [n + 1, n + 1 + 1_000_000])
                .filter(|x| x % 3 != 0)
                .map(|x| x * 2 * 3)
                .collect()
        };
        for round in 0..4u64 {
            let got: Vec<u64> = p
                .run(round * 1000..round * 1000 + 600)
                .map(|r| r.unwrap().to_native())
                .collect();
            assert_eq!(got, want(round * 1000..round * 1000 + 600));
            {
                let mut run = p.run(0..600u64);
                for _ in 0..round * 7 {
                    run.next().unwrap().unwrap();
                }
            }
        }
        let stats = p.stats();
        assert_eq!(stats.copied_between_groups, 0);
    }
    assert_no_children();
}

/// A stage whose `finish` panics (and whose items pass through).
struct PanicFinish;

impl Task for PanicFinish {
    type Input = u64;
    type Output = u64;
    fn process(&mut self, n: &rkyv::Archived<u64>) -> Result<u64, BoxError> {
        Ok(n.to_native())
    }
    fn finish(&mut self, _: &WorkerInfo) {
        panic!("finish panics on purpose");
    }
}

#[test]
fn panics_in_finish_in_any_group_do_not_hold_up_the_drop() {
    let guard = serial();
    let _dog = watchdog(60, "panics_in_finish_in_any_group");
    for shape in 0..3 {
        let stages = Pipeline::<u64>::builder().map("p0", PanicFinish);
        let stages = match shape {
            0 => stages.map("p1", PanicFinish).map("p2", PanicFinish),
            1 => stages
                .map("p1", PanicFinish)
                .alone()
                .map("p2", PanicFinish)
                .alone(),
            _ => stages
                .map("p1", PanicFinish)
                .workers(1)
                .map("p2", PanicFinish)
                .serial(),
        };
        let mut p = stages.build(builder(&guard).workers(2)).unwrap();
        let got: Vec<u64> = p.run(0..50u64).map(|r| r.unwrap().to_native()).collect();
        assert_eq!(got, (0..50).collect::<Vec<_>>());
        drop(p);
        assert_no_children();
    }
}

#[test]
fn building_and_dropping_pipelines_leaks_no_memory_maps_fds_or_children() {
    let guard = serial();
    let _dog = watchdog(120, "building_and_dropping_pipelines_leaks");
    // Once first: whatever the harness opens lazily is open by then.
    drop(four_groups(&guard, 0, builder(&guard).workers(2)));
    let maps = shm_mappings();
    let fds = support::open_fds();
    for round in 0..10u64 {
        let mut p = four_groups(&guard, 0, builder(&guard).workers(2).ring_bytes(1 << 16));
        check_full_run(&mut p, 0..50, None);
        {
            let mut run = p.run(0..100u64);
            for _ in 0..round {
                run.next().unwrap().unwrap();
            }
            // Dropped with the pipeline's items in flight.
        }
        if round % 2 == 0 {
            // A result held across the pipeline's drop.
            let held = p.run(0..3u64).next().unwrap().unwrap();
            drop(p);
            assert_eq!(held.to_native(), f4(0));
            drop(held);
        } else {
            drop(p);
        }
        assert_no_children();
        assert_eq!(shm_mappings(), maps, "round {round}");
        assert_eq!(support::open_fds(), fds, "round {round}");
    }
}

/// Counts its starts in `dir`; the first start of each worker succeeds, every later one fails.
struct StartsOnce {
    dir: PathBuf,
}

impl Task for StartsOnce {
    type Input = u64;
    type Output = u64;
    fn init(&mut self, w: &WorkerInfo) -> Result<(), BoxError> {
        let marker = self.dir.join(format!("started-{}", w.index));
        if marker.exists() {
            return Err("a successor cannot start".into());
        }
        std::fs::write(&marker, b"")?;
        Ok(())
    }
    fn process(&mut self, n: &rkyv::Archived<u64>) -> Result<u64, BoxError> {
        // Slow from item 6 on: the kill after the sixth result finds items not run yet.
        let n = n.to_native();
        std::thread::sleep(Duration::from_micros(if (6..100).contains(&n) {
            20_000
        } else {
            300
        }));
        Ok(n * 2)
    }
}

#[test]
fn a_middle_group_whose_only_worker_is_given_up_ends_runs_instead_of_hanging() {
    let guard = serial();
    let _dog = watchdog(60, "a_middle_group_whose_only_worker_is_given_up");
    let dir = scratch("givenup");
    {
        let mut p = Pipeline::<u64>::builder()
            .map_fn("first", |&n| n.to_native())
            .map("once", StartsOnce { dir: dir.clone() })
            .workers(1)
            .map_fn("last", |&n| n.to_native() + 1)
            .alone()
            .build(
                builder(&guard)
                    .workers(2)
                    .max_start_attempts(1)
                    .restart_backoff(Duration::from_millis(1)),
            )
            .unwrap();
        let pid = p.group_stats()[1].workers[0].pid;
        let mut ok = 0;
        let mut errors = Vec::new();
        for (i, r) in p.run(0..100u64).enumerate() {
            if i == 5 {
                kill(pid);
            }
            match r {
                Ok(v) => {
                    assert!(errors.is_empty(), "a result after an error");
                    assert_eq!(v.to_native(), i as u64 * 2 + 1);
                    ok += 1;
                }
                Err(e) => errors.push(e),
            }
        }
        assert!(ok >= 6, "{ok}");
        assert!(!errors.is_empty());
        // Later runs fail at once rather than hang.
        for _ in 0..3 {
            let results: Vec<_> = p.run(0..10u64).collect();
            assert!(!results.is_empty());
            assert!(results.iter().all(|r| r.is_err()), "{results:?}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

#[test]
fn a_middle_group_with_one_worker_given_up_goes_on_with_the_other() {
    let guard = serial();
    let _dog = watchdog(60, "a_middle_group_with_one_worker_given_up");
    let dir = scratch("givenup2");
    {
        let mut p = Pipeline::<u64>::builder()
            .map_fn("first", |&n| n.to_native())
            .map("once", StartsOnce { dir: dir.clone() })
            .alone()
            .map_fn("last", |&n| n.to_native() + 1)
            .alone()
            .build(builder(&guard).workers(2).max_start_attempts(1))
            .unwrap();
        let pid = p.group_stats()[1].workers[1].pid;
        let mut lost = 0;
        for (i, r) in p.run(0..100u64).enumerate() {
            if i == 5 {
                kill(pid);
            }
            match r {
                Ok(v) => {
                    assert_eq!(v.seq(), i as u64);
                    assert_eq!(v.to_native(), i as u64 * 2 + 1);
                }
                Err(e) => {
                    assert_eq!(e.seq(), Some(i as u64), "{e}");
                    let inner = match &e {
                        Error::Stage { error, .. } => &**error,
                        other => other,
                    };
                    assert!(
                        matches!(
                            inner,
                            Error::WorkerLost { .. } | Error::WorkerCrashed { .. }
                        ),
                        "{e:?}"
                    );
                    lost += 1;
                }
            }
        }
        assert!(lost >= 1);
        // The other worker takes every later item.
        let got: Vec<u64> = p.run(0..50u64).map(|r| r.unwrap().to_native()).collect();
        assert_eq!(got, (0..50u64).map(|n| n * 2 + 1).collect::<Vec<_>>());
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

/// A stage that emits `n % 4` outputs and then, for some inputs, fails or panics.
struct Burst;

impl Task for Burst {
    type Input = u64;
    type Output = u64;
    fn process(&mut self, _: &rkyv::Archived<u64>) -> Result<u64, BoxError> {
        unreachable!("produce is overridden")
    }
    fn produce(
        &mut self,
        n: &rkyv::Archived<u64>,
        out: &mut OutputSink<'_>,
    ) -> Result<(), BoxError> {
        let n = n.to_native();
        for k in 0..n % 4 {
            out.emit(&(n * 10 + k))?;
        }
        match n % 11 {
            4 => Err(format!("{n} fails after its outputs").into()),
            6 => panic!("{n} panics after its outputs"),
            _ => Ok(()),
        }
    }
}

/// What a result is, as compared between placements.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Ok(u64, u64),
    Err(Option<u64>, String, String),
}

fn seen(r: shmexec::Result<shmexec::OutputRef<u64>>) -> Seen {
    match r {
        Ok(v) => Seen::Ok(v.seq(), v.to_native()),
        Err(Error::Stage { stage, error }) => {
            let kind = format!("{error:?}");
            let kind = kind.split([' ', '{', '(']).next().unwrap().to_owned();
            Seen::Err(error.seq(), stage, kind)
        }
        Err(e) => Seen::Err(e.seq(), String::new(), format!("{e:?}")),
    }
}

/// Places the stage added last as `how` says: 0 fused, 1 alone, 2 one worker, 3 serial.
fn place<I, O>(s: Stages<I, O>, how: u32) -> Stages<I, O>
where
    I: shmexec::Encode<Archived: shmexec::Decode> + 'static,
    O: shmexec::Encode<Archived: shmexec::Decode> + 'static,
{
    match how {
        0 => s,
        1 => s.alone(),
        2 => s.workers(1),
        _ => s.serial(),
    }
}

/// Whether stage `last` of [`variant`] fails on `x` (an output `n * 10 + k` of `burst`).
fn last_fails(x: u64) -> bool {
    let (n, k) = (x / 10, x % 10);
    n % 4 > 0 && k == n % 4 - 1 && n % 11 != 4 && n % 11 != 6 && n % 3 == 1
}

fn variant(guard: &Guard, how: [u32; 4]) -> Pipeline<u64, u64> {
    let s = Pipeline::<u64>::builder().map(
        "check",
        shmexec::try_from_fn::<u64, _, _>(|&n| match n.to_native() {
            n if n % 13 == 7 => Err(format!("{n} refused").into()),
            n => Ok(n),
        }),
    );
    let s = place(s, how[0]);
    let s = place(s.map("burst", Burst), how[1]);
    let s = place(s.filter("odd", |&x| x.to_native() % 2 == 1), how[2]);
    let s = place(
        s.map(
            "last",
            shmexec::try_from_fn::<u64, _, _>(|&x| match x.to_native() {
                // Only an item's last output, of an item whose burst does not fail after it:
                // fused and split placements then agree (see `bug_` tests for the rest).
                x if last_fails(x) => Err(format!("{x} fails last").into()),
                x => Ok(x + 5),
            }),
        ),
        how[3],
    );
    s.build(builder(guard).workers(2).ring_bytes(1 << 16))
        .unwrap()
}

#[test]
fn placements_give_the_same_results_as_fused_stages_errors_included() {
    let guard = serial();
    let _dog = watchdog(120, "placements_give_the_same_results");
    {
        let reference: Vec<Seen> = variant(&guard, [0; 4]).run(0..300u64).map(seen).collect();
        assert!(
            reference
                .iter()
                .any(|s| matches!(s, Seen::Err(_, st, _) if st == "last"))
        );
        assert!(
            reference
                .iter()
                .any(|s| matches!(s, Seen::Err(_, st, _) if st == "burst"))
        );
        for how in [
            [0, 1, 0, 0],
            [1, 1, 1, 1],
            [2, 0, 3, 1],
            [0, 0, 0, 1],
            [3, 2, 1, 0],
            [2, 2, 2, 2],
        ] {
            let mut p = variant(&guard, how);
            let got: Vec<Seen> = p.run(0..300u64).map(seen).collect();
            assert_eq!(got.len(), reference.len(), "{how:?}");
            for (k, (g, r)) in got.iter().zip(&reference).enumerate() {
                assert_eq!(g, r, "{how:?}, result {k}");
            }
        }
    }
    assert_no_children();
}

#[test]
fn an_item_that_always_crashes_a_middle_group_is_given_up_under_its_input_number() {
    let guard = serial();
    let _dog = watchdog(60, "an_item_that_always_crashes_a_middle_group");
    {
        let mut p = Pipeline::<u64>::builder()
            .filter("not3", |&n| n.to_native() % 10 != 3)
            .map_fn("poison", |&n| {
                if n.to_native() == 17 {
                    std::process::abort();
                }
                n.to_native()
            })
            .alone()
            .map_fn("last", |&n| n.to_native() + 1)
            .alone()
            .build(builder(&guard).workers(2).max_attempts(2))
            .unwrap();
        let results: Vec<_> = p.run(0..40u64).collect();
        let inputs: Vec<u64> = (0..40).filter(|n| n % 10 != 3).collect();
        assert_eq!(results.len(), inputs.len());
        for (r, &n) in results.iter().zip(&inputs) {
            match r {
                Ok(v) => {
                    assert_ne!(n, 17);
                    assert_eq!((v.seq(), v.to_native()), (n, n + 1));
                }
                Err(e) => {
                    assert_eq!(n, 17, "{e}");
                    assert_eq!(e.seq(), Some(17), "numbered by its input: {e}");
                    let inner = match e {
                        Error::Stage { error, .. } => &**error,
                        other => other,
                    };
                    assert!(
                        matches!(inner, Error::WorkerCrashed { crashes: 2, .. }),
                        "{e:?}"
                    );
                }
            }
        }
        assert_eq!(p.group_stats()[1].respawns, 2);
    }
    assert_no_children();
}

#[test]
fn misplaced_and_impossible_placements_are_refused() {
    let guard = serial();
    let early = Pipeline::<u64>::builder()
        .alone()
        .map_fn("a", |&n| n.to_native())
        .build(builder(&guard));
    assert!(matches!(early, Err(Error::InvalidArgument(m)) if m.contains("alone")));
    let early = Pipeline::<u64>::builder()
        .serial()
        .map_fn("a", |&n| n.to_native())
        .build(builder(&guard));
    assert!(matches!(early, Err(Error::InvalidArgument(_))));
    let zero = Pipeline::<u64>::builder()
        .map_fn("a", |&n| n.to_native())
        .map_fn("b", |&n| n.to_native())
        .workers(0)
        .build(builder(&guard).workers(2));
    assert!(
        matches!(zero, Err(Error::InvalidArgument(_))),
        "{:?}",
        zero.err()
    );
    let empty_name = Pipeline::<u64>::builder()
        .map_fn("a", |&n| n.to_native())
        .map_fn("", |&n| n.to_native())
        .alone()
        .build(builder(&guard).workers(2));
    assert!(matches!(empty_name, Err(Error::InvalidArgument(_))));
    assert_no_children();
}

#[test]
fn the_tightest_queue_still_runs_every_group() {
    let guard = serial();
    let _dog = watchdog(60, "the_tightest_queue_still_runs_every_group");
    {
        let mut p = four_groups(
            &guard,
            0,
            builder(&guard)
                .workers(2)
                .queue_bytes(1)
                .ring_bytes(1 << 16),
        );
        let mut last = None;
        for round in 0..5 {
            last = Some(check_full_run(
                &mut p,
                round * 1000..round * 1000 + 300,
                last,
            ));
        }
    }
    assert_no_children();
}

/// u64 -> two 10 KB chunks per input in a middle group -> a copy of each in the last.
fn two_big_outputs_each(guard: &Guard) -> Pipeline<u64, Vec<u8>> {
    Pipeline::<u64>::builder()
        .map_fn("first", |&n| n.to_native())
        .flat_map("fan", |&n| {
            let n = n.to_native() as u8;
            [vec![n; 10_000], vec![n; 10_000]]
        })
        .alone()
        .map_fn("copy", |v| v.as_slice().to_vec())
        .alone()
        .build(builder(guard).workers(2).ring_bytes(1 << 16))
        .expect("pipeline")
}

/// `CallEnded` counts what was handed out and what was not run in the pipeline's inputs: its
/// documented meaning ("the inputs from index `results` on" are the ones to run again).
#[test]
fn call_ended_counts_pipeline_inputs() {
    let guard = serial();
    let _dog = watchdog(60, "call_ended_counts_pipeline_inputs");
    {
        let mut p = two_big_outputs_each(&guard);
        let results: Vec<_> = p.run(0..100u64).collect();
        let ok = results.iter().filter(|r| r.is_ok()).count() as u64;
        let Some(Err(Error::CallEnded {
            results: done,
            outputs,
            not_run,
            ..
        })) = results.last()
        else {
            panic!("{:?}", results.last());
        };
        assert_eq!(*outputs, ok);
        // Two outputs per input: the inputs whose outputs were all handed out.
        assert_eq!(*done, ok / 2, "results counts the last group's items");
        assert_eq!(
            *not_run,
            Some(100 - ok / 2),
            "not_run misses what earlier groups hold"
        );
    }
    assert_no_children();
}

/// Same as above with one output per input: only `not_run` is off (items in earlier groups).
#[test]
fn call_ended_not_run_counts_what_earlier_groups_hold() {
    let guard = serial();
    let _dog = watchdog(60, "call_ended_not_run_counts_what_earlier_groups_hold");
    {
        let mut p = big_outputs(&guard);
        let results: Vec<_> = p.run(0..100u64).collect();
        let ok = results.iter().filter(|r| r.is_ok()).count() as u64;
        let Some(Err(Error::CallEnded {
            results: done,
            not_run,
            ..
        })) = results.last()
        else {
            panic!("{:?}", results.last());
        };
        assert_eq!(*done, ok);
        assert_eq!(*not_run, Some(100 - ok), "results {done}");
    }
    assert_no_children();
}

/// Fused, a later stage's failure fails the item: the stage before sees its `emit` refused and
/// gives nothing more. Split into groups, the same stages give one error per output of the item
/// (and the outputs after it): where a stage runs changes the results.
#[test]
fn a_failing_input_fails_once_whatever_the_placement() {
    let guard = serial();
    let _dog = watchdog(60, "a_failing_input_fails_once_whatever_the_placement");
    let build = |split: bool| {
        let s = Pipeline::<u64>::builder().flat_map("fan", |&n| [n.to_native(), n.to_native()]);
        let s = if split { s.alone() } else { s };
        s.map(
            "picky",
            shmexec::try_from_fn::<u64, _, _>(|&n| match n.to_native() {
                3 => Err("3 is refused".into()),
                n => Ok(n),
            }),
        )
        .build(builder(&guard).workers(1))
        .unwrap()
    };
    let fused: Vec<Seen> = build(false).run(0..5u64).map(seen).collect();
    let split: Vec<Seen> = build(true).run(0..5u64).map(seen).collect();
    let err3 = Seen::Err(Some(3), "picky".into(), "Task".into());
    assert_eq!(fused.iter().filter(|s| **s == err3).count(), 1, "{fused:?}");
    assert_eq!(split, fused);
    drop(guard);
}

/// A panic in a stage's `init` fails the build as an `Err` does, but its error does not say
/// which stage (an `Err` does: "stage 'x': ...").
#[test]
fn an_init_panic_names_its_stage() {
    let guard = serial();
    let built = Pipeline::<u64>::builder()
        .map_fn("first", |&n| n.to_native())
        .map("fragile", BadInit { panic: true })
        .map_fn("last", |&n| n.to_native())
        .build(builder(&guard).workers(1));
    let e = built.err().expect("the build fails");
    assert!(e.to_string().contains("fragile"), "{e}");
    assert_no_children();
}

#[test]
fn killing_workers_blocked_behind_held_frames_loses_nothing() {
    let guard = serial();
    let _dog = watchdog(120, "killing_workers_blocked_behind_held_frames");
    {
        // 10 KB outputs into 64 KiB rings, read by a slow single worker: the middle group's
        // workers wait on output rings full of frames the coordinator holds for the last group.
        let mut p = Pipeline::<u64>::builder()
            .map_fn("first", |&n| n.to_native())
            .map_fn("widen", |&n| vec![n.to_native() as u8; 10_000])
            .alone()
            .map_fn("slow", |v| {
                std::thread::sleep(Duration::from_millis(2));
                v.iter().map(|&b| b as u64).sum::<u64>()
            })
            .workers(1)
            .build(builder(&guard).workers(2).ring_bytes(1 << 16))
            .unwrap();
        let mut kills = 0;
        for round in 0..4usize {
            let stats = p.group_stats();
            let pids = [
                stats[1].workers[0].pid,
                stats[1].workers[1].pid,
                stats[2].workers[0].pid,
            ];
            let mut got = Vec::new();
            for (i, r) in p.run(0..80u64).enumerate() {
                if i == 5 + round {
                    kill(pids[round % 3]);
                }
                got.push(
                    r.unwrap_or_else(|e| panic!("round {round} item {i}: {e}"))
                        .to_native(),
                );
            }
            kills += 1;
            assert_eq!(
                got,
                (0..80u64)
                    .map(|n| (n as u8 as u64) * 10_000)
                    .collect::<Vec<_>>()
            );
            while p.group_stats().iter().map(|s| s.respawns).sum::<u64>() < kills {
                let n = p.run(0..3u64).filter(|r| r.is_ok()).count();
                assert_eq!(n, 3);
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    assert_no_children();
}

#[test]
fn a_worker_of_the_last_group_killed_while_results_are_held_loses_nothing() {
    let guard = serial();
    let _dog = watchdog(
        60,
        "a_worker_of_the_last_group_killed_while_results_are_held",
    );
    {
        let mut p = big_outputs(&guard);
        let pids: Vec<i32> = p.group_stats()[2].workers.iter().map(|w| w.pid).collect();
        let mut held = Vec::new();
        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut killed = false;
        for r in p.run(0..80u64) {
            match r {
                Ok(o) => held.push(o),
                Err(Error::OutputsHeld { worker, .. }) => {
                    if !killed {
                        kill(pids[worker]);
                        killed = true;
                    }
                    got.extend(held.drain(..).map(|o| o.as_slice().to_vec()));
                }
                Err(e) => panic!("{e}"),
            }
        }
        got.extend(held.drain(..).map(|o| o.as_slice().to_vec()));
        assert!(killed);
        assert_eq!(got.len(), 80);
        for (i, v) in got.iter().enumerate() {
            assert_eq!(v, &vec![i as u8; 10_000], "item {i}");
        }
    }
    assert_no_children();
}

#[test]
fn an_input_iterator_that_panics_leaves_the_pipeline_usable() {
    let guard = serial();
    let _dog = watchdog(60, "an_input_iterator_that_panics");
    {
        let mut p = four_groups(&guard, 100, builder(&guard).workers(2));
        for round in 0..5u64 {
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let inputs = (0..100u64).inspect(move |&n| {
                    if n == 20 + round * 7 {
                        panic!("the source fails at {n}");
                    }
                });
                for r in p.run(inputs) {
                    r.unwrap();
                }
            }));
            assert!(caught.is_err());
            check_full_run(&mut p, 0..40, None);
        }
    }
    assert_no_children();
}

#[test]
fn dropping_a_pipeline_whose_middle_stage_hangs_does_not_hang() {
    let guard = serial();
    let _dog = watchdog(90, "dropping_a_pipeline_whose_middle_stage_hangs");
    {
        let mut p = Pipeline::<u64>::builder()
            .map_fn("first", |&n| n.to_native())
            .map_fn("hang", |&n| {
                if n.to_native() == 3 {
                    loop {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                n.to_native()
            })
            .alone()
            .map_fn("last", |&n| n.to_native())
            .alone()
            .build(
                builder(&guard)
                    .workers(2)
                    .shutdown_timeout(Duration::from_millis(500)),
            )
            .unwrap();
        let mut run = p.run(0..50u64);
        for i in 0..3u64 {
            assert_eq!(run.next().unwrap().unwrap().to_native(), i);
        }
        // Item 3 hangs; the run is dropped with it in flight, then the pipeline.
    }
    assert_no_children();
}

#[test]
fn a_run_dropped_with_a_hung_item_in_a_middle_group_leaves_the_next_run_whole() {
    let guard = serial();
    let _dog = watchdog(90, "a_run_dropped_with_a_hung_item_in_a_middle_group");
    // Each hang leaves a file here when it starts: whether a dropped run's hung item starts at
    // all (or is closed unrun, under the discard mark) is the workers' race.
    let hangs = std::env::temp_dir().join(format!("shmexec-adv-hangs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&hangs);
    std::fs::create_dir_all(&hangs).unwrap();
    {
        let dir = hangs.clone();
        let mut p = Pipeline::<u64>::builder()
            .map_fn("first", |&n| n.to_native())
            .map_fn("hang", move |&n| {
                if n.to_native() == 1_000_003 {
                    let mark = dir.join(format!(
                        "{}-{}",
                        std::process::id(),
                        shmexec::shm::clock::now_ns()
                    ));
                    std::fs::write(mark, b"").unwrap();
                    loop {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                n.to_native() * 2
            })
            .alone()
            .map_fn("last", |&n| n.to_native() + 1)
            .alone()
            .build(
                builder(&guard)
                    .workers(2)
                    .chunk_timeout(Duration::from_millis(300)),
            )
            .unwrap();
        for round in 0..3u64 {
            {
                let mut run = p.run(1_000_000..1_000_050u64);
                for i in 0..3u64 {
                    assert_eq!(
                        run.next().unwrap().unwrap().to_native(),
                        (1_000_000 + i) * 2 + 1
                    );
                }
            }
            let got: Vec<u64> = p
                .run(0..40u64)
                .map(|r| {
                    r.unwrap_or_else(|e| panic!("round {round}: {e}"))
                        .to_native()
                })
                .collect();
            assert_eq!(got, (0..40u64).map(|n| n * 2 + 1).collect::<Vec<_>>());
        }
        // Each hung worker is killed once its timeout is counted (while the pipeline is driven).
        loop {
            let started = std::fs::read_dir(&hangs).unwrap().count() as u64;
            let respawns: Vec<u64> = p.group_stats().iter().map(|s| s.respawns).collect();
            assert!(
                respawns[1] <= started && respawns[0] == 0 && respawns[2] == 0,
                "{respawns:?}, {started} hangs started"
            );
            if respawns[1] == started {
                break;
            }
            assert_eq!(
                p.run(0..2u64)
                    .map(|r| r.unwrap().to_native())
                    .collect::<Vec<_>>(),
                [1, 3]
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    std::fs::remove_dir_all(&hangs).unwrap();
    assert_no_children();
}
