//! Errors are values: panics, task errors, oversized inputs and outputs, failing `init`, held
//! outputs, abandoned calls and dead workers, each with real processes.

mod support;

use std::time::{Duration, Instant};

use shmexec::{BoxError, Error, Pinning, Samples, Task, WorkerInfo};
use support::{assert_no_children, builder, kill, open_fds, serial, small_output_rings};

#[test]
fn panics_and_task_errors_are_item_errors_and_the_pool_goes_on() {
    let guard = serial();
    {
        let task = shmexec::try_from_fn::<u64, _, _>(|&n| match n.to_native() {
            13 => Err("unlucky".into()),
            n if n % 50 == 7 => panic!("chunk {n} is cursed"),
            n => Ok(n * 2),
        });
        let mut pool = builder(&guard).workers(2).build(task).unwrap();
        for round in 0..2 {
            let results: Vec<_> = pool.map(0..200u64).collect();
            assert_eq!(results.len(), 200);
            for (i, r) in results.into_iter().enumerate() {
                let seq = 200 * round + i as u64;
                match (i, r) {
                    (13, Err(e @ Error::Task { .. })) => {
                        assert!(e.is_item() && e.seq() == Some(seq), "{e:?}");
                        let Error::Task { seq: s, message } = e else {
                            unreachable!()
                        };
                        assert_eq!((s, message.as_str()), (seq, "unlucky"))
                    }
                    (i, Err(Error::Panic { seq: s, message })) if i % 50 == 7 => {
                        assert_eq!(s, seq);
                        assert_eq!(message, format!("chunk {i} is cursed"));
                    }
                    (i, Ok(o)) => assert_eq!(o.to_native(), 2 * i as u64),
                    (i, Err(e)) => panic!("item {i}: unexpected {e}"),
                }
            }
        }
        let errors: u64 = pool.stats().workers.iter().map(|w| w.errors).sum();
        assert_eq!(errors, 2 * 5);
    }
    assert_no_children();
}

#[test]
fn inputs_and_outputs_larger_than_a_ring_are_clear_errors_in_place() {
    let guard = serial();
    {
        let task = shmexec::from_fn::<Vec<u8>, _, _>(|c| vec![0u8; 3 * c.len()]);
        let mut pool = builder(&guard)
            .workers(2)
            .ring_bytes(1 << 16)
            .build(task)
            .unwrap();
        let inputs = vec![
            vec![1u8; 100],
            vec![2u8; 100_000],
            vec![3u8; 30_000],
            vec![4u8; 10],
        ];
        let r: Vec<_> = pool.map(&inputs).collect();
        assert_eq!(r[0].as_ref().unwrap().len(), 300);
        match &r[1] {
            Err(e @ Error::InputTooLarge { seq: 1, len, max }) => {
                assert!(*len > 100_000 && *max < 1 << 16, "{e}");
                assert!(e.to_string().contains("ring_bytes"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(&r[2], Err(Error::OutputTooLarge { seq: 2, len, .. }) if *len >= 90_000),
            "{:?}",
            r[2]
        );
        assert_eq!(r[3].as_ref().unwrap().len(), 30);
    }
    assert_no_children();
}

/// Records in `init` which worker it is and counts its `init` calls.
struct Probe {
    inits: u32,
    index: usize,
}

impl Task for Probe {
    type Input = u64;
    type Output = (u32, u64, u32, Vec<u32>);
    fn init(&mut self, w: &WorkerInfo) -> Result<(), BoxError> {
        self.inits += 1;
        self.index = w.index;
        if std::env::var("SHMEXEC_TEST_FAIL_INIT").is_ok_and(|v| v == w.index.to_string()) {
            return Err("no detector connection".into());
        }
        // Replacements are forked from a copy of the process made at `build`, so a failure that
        // comes later is seen through the file system.
        if fail_init_marker().exists() && w.index == 1 {
            return Err("the detector connection went away".into());
        }
        Ok(())
    }
    fn process(&mut self, _: &rkyv::Archived<u64>) -> Result<Self::Output, BoxError> {
        let set = rustix::thread::sched_getaffinity(None)?;
        let cores = (0..rustix::thread::CpuSet::MAX_CPU as u32)
            .filter(|&c| set.is_set(c as usize))
            .collect();
        Ok((std::process::id(), self.index as u64, self.inits, cores))
    }
}

#[test]
fn init_runs_once_per_worker_and_workers_are_pinned_where_asked() {
    let guard = serial();
    {
        let allowed = shmexec::pin::allowed_cores().unwrap();
        let cores = vec![*allowed.last().unwrap(), allowed[0]];
        let mut pool = builder(&guard)
            .workers(2)
            .pinning(Pinning::Cores(cores.clone()))
            .build(Probe { inits: 0, index: 0 })
            .unwrap();
        let pids = pool.pids();
        for r in pool.map(0..400u64) {
            let r = r.unwrap();
            let (pid, index, inits, affinity) = (&r.0, &r.1, &r.2, &r.3);
            let index = index.to_native() as usize;
            assert_eq!(pids[index], pid.to_native() as i32);
            assert_eq!(inits.to_native(), 1);
            let affinity: Vec<usize> = affinity.iter().map(|c| c.to_native() as usize).collect();
            assert_eq!(affinity, [cores[index]], "worker {index}");
        }
        let stats = pool.stats();
        assert_eq!(stats.workers[0].core, Some(cores[0]));
        // Unpinned workers may run anywhere allowed.
        drop(pool);
        let mut pool = builder(&guard)
            .workers(2)
            .pinning(Pinning::Off)
            .build(Probe { inits: 0, index: 0 })
            .unwrap();
        let out = pool.map([0u64]).next().unwrap().unwrap();
        assert_eq!(out.3.len(), allowed.len());
    }
    assert_no_children();
}

/// The calling process's nice value.
fn nice() -> i32 {
    // SAFETY: getpriority takes plain integers and touches no memory of ours.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
}

#[test]
fn source_first_lowers_only_the_workers_beside_the_coordinator() {
    let guard = serial();
    {
        let allowed = shmexec::pin::allowed_cores().unwrap();
        let n = allowed.len() + 1; // two workers share the first core
        let task = shmexec::from_fn::<u64, _, _>(|_| {
            let set = rustix::thread::sched_getaffinity(None).expect("affinity");
            let cores: Vec<u32> = (0..rustix::thread::CpuSet::MAX_CPU as u32)
                .filter(|&c| set.is_set(c as usize))
                .collect();
            (std::process::id(), nice(), cores)
        });
        let mut pool = builder(&guard)
            .workers(n)
            .pinning(Pinning::SourceFirst)
            .build(task)
            .unwrap();
        // Twice: the second time after worker 0 was killed, so that its successor is checked.
        for round in 0..2 {
            let mut seen = vec![false; n];
            let mut call = pool.map(0..200u64);
            while let Some(r) = call.next() {
                let r = r.unwrap();
                let pid = r.0.to_native() as i32;
                // The pids as of this result: worker 0's successor after the kill.
                let pids = call.worker_pids();
                let i = pids.iter().position(|&p| p == pid).expect("a worker's pid");
                let affinity: Vec<usize> = r.2.iter().map(|c| c.to_native() as usize).collect();
                assert_eq!(affinity, [allowed[i % allowed.len()]], "worker {i}");
                let want = if i % allowed.len() == 0 { 19 } else { nice() };
                assert_eq!(
                    r.1.to_native(),
                    want,
                    "worker {i}'s nice value, round {round}"
                );
                seen[i] = true;
            }
            assert!(
                seen.iter().all(|&s| s),
                "every worker ran an item: {seen:?}"
            );
            drop(call);
            if round == 0 {
                kill(pool.pids()[0]);
            }
        }
        assert_eq!(pool.stats().respawns, 1);
    }
    assert_no_children();
}

/// A file whose existence makes worker 1's `init` fail (unique to this test process: named
/// once, in the coordinator, before it builds the pool).
fn fail_init_marker() -> &'static std::path::Path {
    static MARKER: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    MARKER.get_or_init(|| {
        std::env::temp_dir().join(format!("shmexec-test-fail-init-{}", std::process::id()))
    })
}

#[test]
fn failing_init_is_an_error_from_build() {
    let guard = serial();
    {
        // SAFETY of set_var: this binary's tests that build pools hold the serial lock, and no
        // other test reads the environment.
        unsafe { std::env::set_var("SHMEXEC_TEST_FAIL_INIT", "1") };
        let r = builder(&guard)
            .workers(2)
            .build(Probe { inits: 0, index: 0 });
        unsafe { std::env::remove_var("SHMEXEC_TEST_FAIL_INIT") };
        match r {
            Err(e @ Error::Init { worker: 1, .. }) => {
                assert!(e.to_string().contains("no detector connection"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        struct PanicInit;
        impl Task for PanicInit {
            type Input = u64;
            type Output = u64;
            fn init(&mut self, _: &WorkerInfo) -> Result<(), BoxError> {
                panic!("bad config")
            }
            fn process(&mut self, n: &rkyv::Archived<u64>) -> Result<u64, BoxError> {
                Ok(n.to_native())
            }
        }
        let r = builder(&guard).workers(1).build(PanicInit);
        assert!(
            matches!(&r, Err(Error::Init { message, .. }) if message.contains("bad config")),
            "{r:?}"
        );
    }
    assert_no_children();
}

#[test]
fn init_failing_in_a_replacement_worker_gives_that_worker_up_and_the_pool_goes_on() {
    let guard = serial();
    {
        fail_init_marker();
        let mut pool = builder(&guard)
            .workers(2)
            .build(Probe { inits: 0, index: 0 })
            .unwrap();
        assert!(pool.map([1u64]).next().unwrap().is_ok());
        std::fs::write(fail_init_marker(), b"").unwrap();
        kill(pool.pids()[1]);
        let start = Instant::now();
        let errors: Vec<Error> = pool.map(0..100u64).filter_map(|r| r.err()).collect();
        std::fs::remove_file(fail_init_marker()).unwrap();
        assert!(start.elapsed() < Duration::from_secs(20));
        // The items queued to worker 1 before its death was seen are not run, and say why.
        assert!(!errors.is_empty());
        for e in &errors {
            assert!(matches!(e, Error::WorkerLost { worker: 1, .. }), "{e:?}");
            assert!(e.is_item());
            assert!(e.to_string().contains("init failed"), "{e}");
        }
        // Worker 0 goes on.
        assert!(pool.map(0..10u64).all(|r| r.is_ok()));
    }
    assert_no_children();
}

#[test]
fn held_outputs_give_a_clear_error_and_lose_nothing() {
    let guard = serial();
    {
        let mut pool = small_output_rings(&guard);
        let it = pool.map(0..100u64);
        let mut held = Vec::new();
        let mut owned: Vec<Vec<u8>> = Vec::new();
        let mut errors = 0;
        let start = Instant::now();
        for r in it {
            assert!(start.elapsed() < Duration::from_secs(30), "stuck");
            match r {
                Ok(o) => held.push(o),
                Err(e @ Error::OutputsHeld { .. }) => {
                    errors += 1;
                    assert!(e.to_string().contains("drop them"), "{e}");
                    // Move what we hold to owned copies and go on.
                    owned.extend(held.drain(..).map(|o| o.deserialize().unwrap()));
                }
                Err(e) => panic!("{e}"),
            }
        }
        owned.extend(held.drain(..).map(|o| o.deserialize().unwrap()));
        assert!(errors > 0, "the rings never filled");
        assert_eq!(owned.len(), 100);
        for (i, o) in owned.iter().enumerate() {
            assert_eq!(o, &vec![i as u8; 10_000]);
        }
    }
    assert_no_children();
}

#[test]
fn dropping_a_call_or_the_pool_midway_leaves_nothing_behind() {
    let guard = serial();
    let fds = open_fds();
    {
        let task = shmexec::from_fn::<Vec<f32>, _, _>(|c| c.samples().iter().sum::<f32>());
        let mut pool = builder(&guard).workers(2).build(task).unwrap();
        let chunks: Vec<Vec<f32>> = (0..50).map(|i| vec![i as f32; 10_000]).collect();
        // Abandon a call after 3 results: the next call still gets its own results, in order.
        let first: Vec<f32> = pool
            .map(&chunks)
            .take(3)
            .map(|r| r.unwrap().to_native())
            .collect();
        assert_eq!(first, [0.0, 10_000.0, 20_000.0]);
        let again: Vec<f32> = pool
            .map(&chunks[..10])
            .map(|r| r.unwrap().to_native())
            .collect();
        assert_eq!(
            again,
            (0..10).map(|i| i as f32 * 10_000.0).collect::<Vec<_>>()
        );
        let mut it = pool.map(&chunks);
        it.next().unwrap().unwrap();
        drop(it);
        // With the abandoned call's items still in flight: workers stop before their queued
        // chunks instead of working them off.
        let start = Instant::now();
        drop(pool);
        // A liveness bound, not a speed check: under the 5 s shutdown timeout means the workers
        // answered rather than being killed.
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "{:?}",
            start.elapsed()
        );
    }
    assert_no_children();
    assert_eq!(open_fds(), fds);
}

#[test]
fn a_killed_worker_is_replaced_and_nothing_is_lost_or_repeated() {
    let guard = serial();
    {
        let task = shmexec::from_fn::<u64, _, _>(|&n| {
            std::thread::sleep(Duration::from_micros(500));
            n.to_native() * 3
        });
        let mut pool = builder(&guard).workers(2).build(task).unwrap();
        let victim = pool.pids()[1];
        let mut got = Vec::new();
        for (i, r) in pool.map(0..2000u64).enumerate() {
            if i == 100 {
                kill(victim);
            }
            got.push(r.unwrap().to_native());
        }
        assert_eq!(got, (0..2000).map(|n| n * 3).collect::<Vec<_>>());
        let stats = pool.stats();
        assert_eq!(stats.respawns, 1);
        assert_eq!(stats.workers[1].respawns, 1);
        assert_ne!(pool.pids()[1], victim);
        // The pool goes on.
        assert_eq!(pool.map([5u64]).next().unwrap().unwrap().to_native(), 15);
    }
    assert_no_children();
}

#[test]
fn a_poison_chunk_is_given_up_after_max_attempts_and_the_run_goes_on() {
    let guard = serial();
    {
        let task = shmexec::from_fn::<u64, _, _>(|&n| {
            if n.to_native() == 13 {
                // A segfaulting C extension, say: the process dies with a signal.
                kill(std::process::id() as i32);
            }
            n.to_native()
        });
        let mut pool = builder(&guard)
            .workers(2)
            .max_attempts(2)
            .build(task)
            .unwrap();
        let r: Vec<_> = pool.map(0..40u64).collect();
        for (i, r) in r.iter().enumerate() {
            if i == 13 {
                match r {
                    Err(
                        e @ Error::WorkerCrashed {
                            seq: 13,
                            signal: Some(9),
                            crashes: 2,
                        },
                    ) => assert!(e.to_string().contains("crashed its worker 2 times"), "{e}"),
                    other => panic!("{other:?}"),
                }
            } else {
                assert_eq!(r.as_ref().unwrap().to_native(), i as u64);
            }
        }
        assert_eq!(pool.stats().respawns, 2);
        // In the unordered call too, each item exactly once.
        let mut seen: Vec<u64> = pool
            .map_unordered(0..40u64)
            .filter_map(|r| r.ok().map(|o| o.to_native()))
            .collect();
        seen.sort();
        assert_eq!(seen, (0..40).filter(|&n| n != 13).collect::<Vec<_>>());
        assert_eq!(pool.stats().respawns, 4);
    }
    assert_no_children();
}

#[test]
fn rings_larger_than_memory_are_an_error_from_build() {
    let guard = serial();
    {
        let task = shmexec::from_fn::<u64, _, _>(|&n| n.to_native());
        let r = builder(&guard).workers(2).ring_bytes(1 << 40).build(task);
        match r {
            Err(e @ Error::OutOfMemory { .. }) => {
                assert!(e.to_string().contains("Builder::ring_bytes"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }
    assert_no_children();
}

#[test]
fn collecting_every_output_of_a_long_stream_ends() {
    let guard = serial();
    {
        let mut pool = small_output_rings(&guard);
        let start = Instant::now();
        let all: Vec<_> = pool.map(0..1000u64).collect();
        assert!(start.elapsed() < Duration::from_secs(30));
        let ok = all.iter().take_while(|r| r.is_ok()).count();
        assert!(ok > 0 && ok < 1000, "{ok}");
        // It ends with the error that says why, then the one that says what was not run: every
        // input from the first missing result on, counted.
        let (last, reports) = all[ok..].split_last().expect("an error ends the call");
        assert!(
            reports
                .iter()
                .all(|r| matches!(r, Err(Error::OutputsHeld { .. }))),
            "{reports:?}"
        );
        assert!(reports.len() <= 1, "{}", reports.len());
        match last {
            Err(
                e @ Error::CallEnded {
                    results,
                    not_run: Some(not_run),
                    ..
                },
            ) => {
                assert_eq!(*results, ok as u64, "{e}");
                assert_eq!(results + not_run, 1000, "{e}");
                let msg = e.to_string();
                assert!(msg.contains("from index"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        drop(all);
        // The pool is fine afterwards.
        let n = pool.map(0..50u64).map(|r| r.unwrap().len()).sum::<usize>();
        assert_eq!(n, 50 * 10_000);
    }
    assert_no_children();
}

#[test]
fn collecting_two_thousand_results_through_1_mib_rings_says_what_was_not_run() {
    let guard = serial();
    {
        // 8 KiB outputs: a 1 MiB output ring holds about 127 of them.
        let task = shmexec::from_fn::<u64, _, _>(|&n| vec![n.to_native() as u8; 8 << 10]);
        let mut pool = builder(&guard).workers(2).build(task).unwrap();
        let all: Vec<_> = pool.map(0..2000u64).collect();
        let ok = all.iter().take_while(|r| r.is_ok()).count();
        match all.last() {
            Some(Err(Error::CallEnded {
                results,
                not_run: Some(not_run),
                ..
            })) => {
                assert_eq!(*results, ok as u64);
                assert_eq!(
                    results + not_run,
                    2000,
                    "every input is either a result or counted"
                );
            }
            other => assert!(ok == 2000, "{ok} results, then {other:?}"),
        }
        // The inputs it did not run, run again once the held results are gone.
        let rest = match all.last() {
            Some(Err(Error::CallEnded { results, .. })) => *results,
            _ => 2000,
        };
        drop(all);
        let n = pool.map(rest..2000u64).filter(|r| r.is_ok()).count() as u64;
        assert_eq!(n, 2000 - rest);
    }
    assert_no_children();
}

#[test]
fn a_dropped_call_does_not_hold_up_the_next_one() {
    let guard = serial();
    {
        let task = shmexec::from_fn::<u64, _, _>(|&n| {
            std::thread::sleep(Duration::from_millis(5));
            n.to_native()
        });
        let mut pool = builder(&guard).workers(2).build(task).unwrap();
        {
            // Thousands of 5 ms items queued (small archives, 1 MiB rings), five taken.
            let mut it = pool.map(0..5_000u64);
            for i in 0..5 {
                assert_eq!(it.next().unwrap().unwrap().to_native(), i);
            }
        }
        let queued_at_drop = pool.stats().workers.iter().map(|w| w.chunks).sum::<u64>();
        let t = Instant::now();
        let got: Vec<u64> = pool
            .map(100..110u64)
            .map(|r| r.unwrap().to_native())
            .collect();
        assert_eq!(got, (100..110).collect::<Vec<_>>());
        // Run behind the abandoned items, this call would take seconds (thousands x 5 ms / 2).
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        let ran = pool.stats().workers.iter().map(|w| w.chunks).sum::<u64>();
        assert!(
            ran < queued_at_drop + 10 + 10,
            "{queued_at_drop} then {ran}"
        );
    }
    assert_no_children();
}
