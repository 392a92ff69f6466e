//! Memory limits with a real memory cgroup: a pool too large for its cgroup is an error from
//! `build`, and a task that leaks gets its worker killed by the OOM killer, not the coordinator.
//!
//! Each test makes a memory cgroup of its own and runs this binary again inside it, for one
//! `child_*` test (see `support::cgroup`): the child joins the cgroup before it execs, so it is
//! charged from its first allocation. Where no cgroup can be made (not root, no memory
//! controller, a read-only mount) the tests say why and pass.

mod support;

use std::time::Instant;

use shmexec::shm::memory::{self, Limit};
use shmexec::{Error, Pool};
use support::cgroup::{self, Cgroup, Version, assert_child_passed, child_cgroup};
use support::{builder, serial};

/// A memory cgroup of `limit` bytes and no swap for this test, or `None` (said on stderr) where
/// none can be made.
fn cgroup_or_skip(limit: u64) -> Option<Cgroup> {
    cgroup::or_skip("memory", |cgroup| {
        let (limit_file, swap) = match cgroup.version() {
            Version::V1 => ("memory.limit_in_bytes", "memory.swappiness"),
            Version::V2 => ("memory.max", "memory.swap.max"),
        };
        cgroup.write(limit_file, &limit.to_string())?;
        // No swap, so that a leak meets the OOM killer instead of filling a swap device. Where
        // swap cannot be set there is none to use, or the limit counts it (memsw) too.
        let _ = cgroup.write(swap, "0");
        if cgroup.version() == Version::V1 {
            let _ = cgroup.write("memory.memsw.limit_in_bytes", &limit.to_string());
        }
        Ok(())
    })
}

/// The OOM kills in `cgroup` so far.
fn oom_kills(cgroup: &Cgroup) -> Option<u64> {
    let file = match cgroup.version() {
        Version::V1 => "memory.oom_control",
        Version::V2 => "memory.events",
    };
    cgroup::read_number(cgroup.dir(), file, Some("oom_kill"))
}

#[test]
fn headroom_reports_the_cgroup_limit_from_inside() {
    let _guard = serial();
    let Some(cgroup) = cgroup_or_skip(200 << 20) else {
        return;
    };
    assert_child_passed(&cgroup.run("child_headroom_reports_the_cgroup_limit"));
}

#[test]
fn child_headroom_reports_the_cgroup_limit() {
    let Some(name) = child_cgroup() else { return };
    let room = memory::headroom();
    println!(
        "headroom: {} under {}",
        memory::Bytes(room.available),
        room.limit
    );
    match &room.limit {
        Limit::Cgroup {
            path, max, usage, ..
        } => {
            assert!(path.ends_with(&format!("/{name}")), "{path}");
            assert_eq!(*max, 200 << 20);
            assert!(*usage > 0 && room.available <= *max, "{room:?}");
        }
        other => panic!("the tightest limit is {other}, not the test cgroup"),
    }
    assert!(room.limit.to_string().contains(&name), "{}", room.limit);
}

#[test]
fn a_pool_larger_than_its_cgroup_is_an_error_from_build() {
    let _guard = serial();
    let Some(cgroup) = cgroup_or_skip(200 << 20) else {
        return;
    };
    assert_child_passed(&cgroup.run("child_a_pool_larger_than_its_cgroup"));
    assert_eq!(oom_kills(&cgroup).unwrap_or(0), 0, "nothing was OOM-killed");
}

#[test]
fn child_a_pool_larger_than_its_cgroup() {
    let Some(name) = child_cgroup() else { return };
    let guard = serial();
    let task = shmexec::from_fn::<u64, _, _>(|&n| n.to_native());
    // 2 x (64 MiB + 64 MiB) of rings in 200 MiB: without the check, fallocate charges the
    // cgroup past its limit and the OOM killer ends this process.
    let started = Instant::now();
    let r = builder(&guard).workers(2).ring_bytes(64 << 20).build(task);
    match r {
        Err(e @ Error::OutOfMemory { .. }) => {
            let message = e.to_string();
            println!("refused in {:?}: {message}", started.elapsed());
            assert!(message.contains("memory cgroup"), "{message}");
            assert!(message.contains(&name), "{message}");
            assert!(
                message.contains("memory.limit_in_bytes = 200 MiB")
                    || message.contains("memory.max = 200 MiB"),
                "{message}"
            );
            assert!(
                message.contains("2 workers x (64 MiB input ring"),
                "{message}"
            );
            for setting in [
                "Builder::ring_bytes",
                "Builder::workers",
                "Builder::shared_bytes",
            ] {
                assert!(message.contains(setting), "{message}");
            }
        }
        other => panic!("expected Error::OutOfMemory, got {other:?}"),
    }
    // And a pool that fits starts in the same cgroup.
    let task = shmexec::from_fn::<u64, _, _>(|&n| n.to_native() + 1);
    let mut pool = builder(&guard)
        .workers(2)
        .ring_bytes(16 << 20)
        .build(task)
        .expect("a pool of 64 MiB of rings fits 200 MiB");
    let out: Vec<u64> = pool.map(0..10u64).map(|r| r.unwrap().to_native()).collect();
    assert_eq!(out, (1..11).collect::<Vec<_>>());
}

/// The item the leaking task leaks on.
const POISON: u64 = 7;

/// Allocates and touches 64 MiB at a time, keeping all of it, until the OOM killer ends the
/// process.
fn leak() -> ! {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut block = vec![0u8; 64 << 20];
        for page in block.iter_mut().step_by(4096) {
            *page = 1;
        }
        hoard.push(std::hint::black_box(block));
    }
}

#[test]
fn a_task_that_leaks_gets_its_worker_killed_not_the_coordinator() {
    let _guard = serial();
    let Some(cgroup) = cgroup_or_skip(800 << 20) else {
        return;
    };
    let started = Instant::now();
    let out = cgroup.run("child_a_task_that_leaks");
    println!("child ran {:?}", started.elapsed());
    assert_child_passed(&out);
    let kills = oom_kills(&cgroup);
    println!("OOM kills in the cgroup: {kills:?}");
    if let Some(kills) = kills {
        assert!(
            kills >= 2,
            "the poison item should have been OOM-killed twice: {kills}"
        );
    }
}

#[test]
fn child_a_task_that_leaks() {
    if child_cgroup().is_none() {
        return;
    }
    let guard = serial();
    let task = shmexec::from_fn::<u64, _, _>(|&n| {
        let n = n.to_native();
        if n == POISON {
            leak();
        }
        n * 2
    });
    // 2 x (128 MiB + 128 MiB) of rings, all mapped in the coordinator: by resident memory alone
    // it outweighs a worker that leaks the remaining ~280 MiB, so only the workers' raised OOM
    // score makes the OOM killer pick the leaking worker.
    let mut pool: Pool<_> = builder(&guard)
        .workers(2)
        .ring_bytes(128 << 20)
        .build(task)
        .expect("pool");
    let own = memory::oom_score_adj().unwrap_or(0);
    for pid in pool.pids() {
        let adj: i32 = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(adj, (own + 500).min(1000), "worker {pid}");
    }
    println!("after build: {}", memory::headroom().limit);

    let started = Instant::now();
    let results: Vec<_> = pool.map(0..20u64).collect();
    println!("20 items with the leak: {:?}", started.elapsed());
    for (n, r) in results.into_iter().enumerate() {
        let n = n as u64;
        match r {
            Ok(out) => {
                assert_ne!(n, POISON);
                assert_eq!(out.to_native(), n * 2);
            }
            Err(Error::WorkerCrashed {
                seq,
                signal,
                crashes,
            }) => {
                assert_eq!(n, POISON);
                assert_eq!(seq, POISON);
                assert_eq!(signal, Some(9));
                assert_eq!(crashes, 2);
            }
            Err(e) => panic!("item {n}: {e}"),
        }
    }
    assert!(pool.stats().respawns >= 2, "{:?}", pool.stats());
    // The pool goes on.
    let again: Vec<u64> = pool
        .map(100..110u64)
        .map(|r| r.unwrap().to_native())
        .collect();
    assert_eq!(again, (100..110).map(|n| n * 2).collect::<Vec<_>>());
}
