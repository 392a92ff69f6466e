//! The launcher (the single-threaded process that forks a pool's workers) stopped or killed:
//! calls end with the pool's error, both halves of a stream see it, and dropping the pool
//! stays bounded.

mod support;

use std::time::{Duration, Instant};

use shmexec::Error;
use support::{assert_no_children, builder, kill, serial};

/// The parent of a worker: its launcher.
fn parent_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // The command name may hold spaces: the fields after it follow the last ')'.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    rest.split(' ')
        .nth(1)
        .expect("ppid")
        .parse()
        .expect("a pid")
}

fn signal(pid: i32, sig: rustix::process::Signal) {
    rustix::process::kill_process(rustix::process::Pid::from_raw(pid).unwrap(), sig).unwrap();
}

#[test]
fn a_killed_launcher_ends_a_stream_with_the_pools_error_on_both_halves() {
    let guard = serial();
    {
        let task = shmexec::from_fn::<u64, _, _>(|&n| n.to_native());
        let mut pool = builder(&guard).workers(2).build(task).unwrap();
        let launcher = parent_of(pool.pids()[0]);
        assert_ne!(launcher, std::process::id() as i32);
        let (tx, rx) = pool.stream();
        tx.send(&1).unwrap();
        assert_eq!(rx.recv().unwrap().unwrap().to_native(), 1);
        kill(launcher);
        kill(rx.worker_pids()[0]);
        let start = Instant::now();
        // Items go on being sent until the death is seen; the receiver then gets the pool's
        // error, and so does the sender: not "the receiver is gone".
        let mut pool_error = None;
        for i in 0..1000u64 {
            if let Err(e) = tx.send(&i) {
                pool_error = Some(e);
                break;
            }
            if let std::task::Poll::Ready(Some(Err(e))) = rx.try_recv() {
                assert!(!e.is_item(), "{e}");
                pool_error = tx.send(&i).err();
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // The half that finds the death first gets what failed (the launch of a successor);
        // later calls, on either half, `Broken` with that reason.
        let e = pool_error.expect("the dead launcher is noticed");
        assert!(matches!(e, Error::Start(_) | Error::Broken(_)), "{e}");
        assert!(e.to_string().contains("launcher"), "{e}");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
    }
    assert_no_children();
}

#[test]
fn dropping_a_pool_whose_launcher_is_stopped_is_bounded() {
    let guard = serial();
    {
        let task = shmexec::from_fn::<u64, _, _>(|&n| n.to_native());
        let pool = builder(&guard)
            .workers(2)
            .shutdown_timeout(Duration::from_secs(1))
            .build(task)
            .unwrap();
        let launcher = parent_of(pool.pids()[0]);
        signal(launcher, rustix::process::Signal::STOP);
        let start = Instant::now();
        drop(pool);
        // The workers exit on their own; the launcher gets its exit request, cannot answer, and
        // is killed after a short wait.
        assert!(
            start.elapsed() < Duration::from_secs(6),
            "{:?}",
            start.elapsed()
        );
    }
    assert_no_children();
}

/// The children of `pid`, from `/proc`.
fn children_of(pid: i32) -> Vec<i32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let alive = std::fs::read_to_string(format!("/proc/{p}/stat"))
            .is_ok_and(|s| !s[s.rfind(')').unwrap_or(0) + 2..].starts_with('Z'));
        if alive && std::fs::metadata(format!("/proc/{p}")).is_ok() && parent_of(p) == pid {
            found.push(p);
        }
    }
    found
}

#[test]
fn a_launcher_stopped_past_its_deadline_leaves_no_stray_worker() {
    let guard = serial();
    {
        let task = shmexec::from_fn::<u64, _, _>(|&n| n.to_native());
        let mut pool = builder(&guard).workers(2).build(task).unwrap();
        let launcher = parent_of(pool.pids()[0]);
        assert!(pool.map(0..100u64).all(|r| r.is_ok()));
        signal(launcher, rustix::process::Signal::STOP);
        kill(pool.pids()[1]);
        // The dead worker's reaping, then its successor's launch, wait for the launcher past
        // their 2 s deadlines; the launcher then serves the launch the pool gave up on.
        let resume = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(7));
            signal(launcher, rustix::process::Signal::CONT);
        });
        let got: Vec<u64> = pool
            .map(0..2000u64)
            .map(|r| r.unwrap().to_native())
            .collect();
        resume.join().unwrap();
        assert_eq!(got, (0..2000).collect::<Vec<_>>());
        // The launches served late were killed: once the pool settles, the launcher's only
        // live children are the two workers.
        let t = Instant::now();
        loop {
            assert!(pool.map(0..200u64).all(|r| r.is_ok()));
            let mut pids = pool.pids();
            pids.sort_unstable();
            let mut children = children_of(launcher);
            children.sort_unstable();
            if children == pids && pids.iter().all(|&p| p != 0) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "launcher children {children:?}, workers {pids:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // No storm: a few failed starts while the launcher was stopped, not thousands.
        let respawns = pool.stats().respawns;
        assert!(respawns <= 8, "{respawns}");
    }
    assert_no_children();
}
