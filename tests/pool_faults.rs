//! Faults with real signals: a dead coordinator takes its workers with it; a worker killed
//! while blocked on a full output ring is replaced without losing or repeating a result.

mod support;

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use shmexec::{Error, Pool};
use support::{assert_no_children, builder, dev_shm_listing, kill, serial, small_output_rings};

/// True once `pid` no longer exists or is a zombie nobody reaped yet.
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 2..].split_whitespace().next().map(|s| s == "Z"))
            .unwrap_or(true),
    }
}

#[test]
fn workers_die_within_a_second_of_a_killed_coordinator() {
    let guard = serial();
    let shm_before = dev_shm_listing();
    let (r, w) = rustix::pipe::pipe().unwrap();
    // SAFETY: as in `support::builder`: we hold the fork lock. The child is single-threaded
    // after the fork, so it builds its pool with the checked fork.
    let mut coordinator = unsafe {
        let w = &w;
        shmexec::shm::fork_unchecked(move || {
            let task = shmexec::from_fn::<u64, _, _>(|&n| n.to_native());
            let Ok(pool) = Pool::builder().workers(2).ring_bytes(1 << 20).build(task) else {
                return 1;
            };
            let line = format!("{:?}\n", pool.pids());
            if rustix::io::write(w, line.as_bytes()).is_err() {
                return 1;
            }
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    }
    .unwrap();
    drop(w);
    let mut line = String::new();
    BufReader::new(std::fs::File::from(r))
        .read_line(&mut line)
        .unwrap();
    let pids: Vec<i32> = line
        .trim()
        .trim_matches(|c| c == '[' || c == ']')
        .split(", ")
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "{line:?}");
    assert!(pids.iter().all(|&p| !gone(p)));

    coordinator.kill().unwrap();
    let killed = Instant::now();
    coordinator.wait().unwrap();
    while !pids.iter().all(|&p| gone(p)) {
        assert!(
            killed.elapsed() < Duration::from_secs(1),
            "workers {pids:?} outlived their coordinator by a second"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(dev_shm_listing(), shm_before);
    drop(coordinator);
    drop(guard);
}

#[test]
fn a_worker_killed_while_blocked_on_a_full_output_ring_loses_nothing() {
    let guard = serial();
    {
        let mut pool = small_output_rings(&guard);
        let mut it = pool.map(0..60u64);
        let mut held = Vec::new();
        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut killed = false;
        let start = Instant::now();
        while let Some(r) = it.next() {
            assert!(start.elapsed() < Duration::from_secs(30), "stuck");
            match r {
                Ok(o) => held.push(o),
                Err(Error::OutputsHeld { worker, .. }) => {
                    if !killed {
                        // That worker is blocked in `reserve` on its full output ring: kill it
                        // there, then let the ring drain.
                        kill(it.worker_pids()[worker]);
                        killed = true;
                    }
                    got.extend(held.drain(..).map(|o| o.deserialize().unwrap()));
                }
                Err(e) => panic!("{e}"),
            }
        }
        got.extend(held.drain(..).map(|o| o.deserialize().unwrap()));
        assert!(killed, "the output rings never filled");
        assert_eq!(it.stats().respawns, 1);
        drop(it);
        assert_eq!(got.len(), 60);
        for (i, o) in got.iter().enumerate() {
            assert_eq!(o, &vec![i as u8; 10_000], "item {i}");
        }
    }
    assert_no_children();
}

#[test]
fn a_chunk_past_its_deadline_is_an_error_and_its_worker_is_replaced() {
    let guard = serial();
    {
        let task = shmexec::from_fn::<u64, _, _>(|&n| {
            if n.to_native() == 5 {
                std::thread::sleep(Duration::from_secs(60)); // a hung detector read, say
            }
            n.to_native()
        });
        let mut pool = builder(&guard)
            .workers(2)
            .chunk_timeout(Duration::from_millis(200))
            .build(task)
            .unwrap();
        let start = Instant::now();
        let r: Vec<_> = pool.map(0..20u64).collect();
        assert!(start.elapsed() < Duration::from_secs(30));
        for (i, r) in r.iter().enumerate() {
            match (i, r) {
                (5, Err(e @ Error::ChunkTimeout { seq: 5, after })) => {
                    assert_eq!(*after, Duration::from_millis(200));
                    assert!(e.to_string().contains("chunk timeout"), "{e}");
                }
                (i, Ok(o)) if i != 5 => assert_eq!(o.to_native(), i as u64),
                (i, other) => panic!("item {i}: {other:?}"),
            }
        }
        assert_eq!(pool.stats().respawns, 1);
    }
    assert_no_children();
}

#[test]
fn forked_workers_keep_no_descriptor_of_the_pool() {
    let guard = serial();
    {
        // Each worker lists what its descriptors point to.
        let task = shmexec::from_fn::<u64, _, _>(|_| {
            let mut links: Vec<String> = std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .map(|l| l.to_string_lossy().into_owned())
                .collect();
            links.sort();
            links
        });
        let mut pool = builder(&guard).workers(3).build(task).unwrap();
        for r in pool.map(0..30u64) {
            let links: Vec<String> = r.unwrap().iter().map(|l| l.to_string()).collect();
            assert!(
                !links.iter().any(|l| l.starts_with("/memfd:shmexec")),
                "a worker holds ring descriptors: {links:?}"
            );
            // Its own two pidfds watching the coordinator, no sibling's.
            let pidfds = links.iter().filter(|l| *l == "anon_inode:[pidfd]").count();
            assert_eq!(pidfds, 2, "{links:?}");
        }
    }
    assert_no_children();
}
