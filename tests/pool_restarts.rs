//! Supervision with real processes and signals: successors that fail to start are retried with
//! a backoff and then given up (no fork storm, no hang), a task's own `exit` is a crash of its
//! item, a stopped worker is caught by the chunk timeout, a pause of the whole program loses no
//! item, and garbage in shared memory costs an item at most, never the pool.

mod support;

use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shmexec::{BoxError, Error, Task, WorkerInfo};
use support::{assert_no_children, builder, kill, serial, watchdog};

/// A per-test directory for the files the task's processes share with the test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shmexec-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Doubles its input. Its `init` logs each start and misbehaves as the file `mode` says; the
/// item [`EXIT_ITEM`] makes it call `exit(1)`.
#[derive(Clone)]
struct Flaky {
    dir: PathBuf,
}

const EXIT_ITEM: u64 = 1_000_007;

impl Task for Flaky {
    type Input = u64;
    type Output = u64;
    fn init(&mut self, _: &WorkerInfo) -> Result<(), BoxError> {
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("starts"))?;
        writeln!(log, "{}", std::process::id())?;
        match std::fs::read_to_string(self.dir.join("mode"))
            .ok()
            .as_deref()
        {
            Some("err") => Err("no detector connection".into()),
            Some("abort") => std::process::abort(),
            Some("exit0") => std::process::exit(0),
            Some("exit1") => std::process::exit(1),
            Some("hang") => loop {
                std::thread::sleep(Duration::from_secs(1));
            },
            _ => Ok(()),
        }
    }
    fn process(&mut self, n: &rkyv::Archived<u64>) -> Result<u64, BoxError> {
        let n = n.to_native();
        if n == EXIT_ITEM {
            std::process::exit(1);
        }
        Ok(n * 2)
    }
}

fn starts(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("starts")).map_or(0, |s| s.lines().count())
}

#[test]
fn a_successor_that_cannot_start_is_retried_with_backoff_then_given_up() {
    let guard = serial();
    let _dog = watchdog(120, "a_successor_that_cannot_start");
    let attempts = 3;
    let (start_timeout, backoff) = (Duration::from_millis(400), Duration::from_millis(20));
    for mode in ["err", "abort", "exit0", "exit1", "hang"] {
        let dir = scratch(&format!("restart-{mode}"));
        {
            let mut pool = builder(&guard)
                .workers(2)
                .max_start_attempts(attempts)
                .restart_backoff(backoff)
                .start_timeout(start_timeout)
                .build(Flaky { dir: dir.clone() })
                .unwrap();
            assert!(pool.map(0..20u64).all(|r| r.is_ok()));
            std::fs::write(dir.join("mode"), mode).unwrap();
            let before = starts(&dir);
            kill(pool.pids()[1]);
            let t = Instant::now();
            let results: Vec<_> = pool.map(0..200u64).collect();
            let elapsed = t.elapsed();
            assert_eq!(
                results.len(),
                200,
                "{mode}: {:?}",
                results
                    .iter()
                    .filter_map(|r| r.as_ref().err())
                    .collect::<Vec<_>>()
            );
            let mut lost = 0;
            for (i, r) in results.iter().enumerate() {
                match r {
                    Ok(v) => assert_eq!(v.to_native(), 2 * i as u64, "{mode}"),
                    Err(Error::WorkerLost { worker: 1, seq, .. }) => {
                        assert_eq!(*seq, 20 + i as u64, "{mode}");
                        lost += 1;
                    }
                    Err(e) => panic!("{mode}: item {i}: {e}"),
                }
            }
            // Every start after the kill failed: exactly `attempts` successors, no storm.
            assert_eq!(
                starts(&dir) - before,
                attempts as usize,
                "{mode}: lost {lost}, {:?}",
                pool.stats().workers[1]
            );
            // Within the start timeouts plus the backoff (0, 20, 40 ms), with room for a slow
            // machine.
            let bound = start_timeout * attempts + backoff * 3 + Duration::from_secs(3);
            assert!(elapsed < bound, "{mode}: {elapsed:?} (lost {lost})");
            let stats = pool.stats();
            assert_eq!(stats.workers[1].respawns, u64::from(attempts), "{mode}");
            // Worker 0 goes on alone.
            std::fs::remove_file(dir.join("mode")).unwrap();
            let again: Vec<u64> = pool.map(0..50u64).map(|r| r.unwrap().to_native()).collect();
            assert_eq!(again, (0..50).map(|n| n * 2).collect::<Vec<_>>(), "{mode}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    assert_no_children();
}

#[test]
fn a_pool_whose_every_worker_is_given_up_ends_the_call_instead_of_hanging() {
    let guard = serial();
    let _dog = watchdog(60, "a_pool_whose_every_worker_is_given_up");
    let dir = scratch("all-given-up");
    {
        let mut pool = builder(&guard)
            .workers(1)
            .max_start_attempts(2)
            .restart_backoff(Duration::from_millis(10))
            .build(Flaky { dir: dir.clone() })
            .unwrap();
        std::fs::write(dir.join("mode"), "err").unwrap();
        kill(pool.pids()[0]);
        let t = Instant::now();
        // More inputs than its ring holds: the call places what fits, hands out what those
        // became, then ends.
        let results: Vec<_> = pool.map(0..50_000u64).collect();
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        let (last, lost) = results.split_last().expect("an error at least");
        assert!(
            matches!(last, Err(Error::Broken(m)) if m.contains("given up")),
            "{last:?}"
        );
        assert!(
            lost.iter()
                .all(|r| matches!(r, Err(Error::WorkerLost { worker: 0, .. }))),
            "{lost:?}"
        );
        // Why: the start-up report of the last successor.
        if let Some(Err(e)) = lost.first() {
            assert!(e.to_string().contains("no detector connection"), "{e}");
        }
        assert!(matches!(
            pool.map([1u64]).next(),
            Some(Err(Error::Broken(_)))
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert_no_children();
}

#[test]
fn a_task_that_calls_exit_costs_its_item_not_the_pool() {
    let guard = serial();
    let _dog = watchdog(60, "a_task_that_calls_exit");
    let dir = scratch("task-exit");
    {
        let mut pool = builder(&guard)
            .workers(2)
            .build(Flaky { dir: dir.clone() })
            .unwrap();
        let inputs = (0..40u64).map(|i| if i == 13 { EXIT_ITEM } else { i });
        for (i, r) in pool.map(inputs).enumerate() {
            match r {
                Ok(v) => assert_eq!(v.to_native(), 2 * i as u64),
                Err(Error::WorkerCrashed { crashes: 2, .. }) => assert_eq!(i, 13),
                Err(e) => panic!("item {i}: {e}"),
            }
        }
        assert!(pool.map(0..10u64).all(|r| r.is_ok()));
        assert_eq!(pool.stats().respawns, 2);
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert_no_children();
}

#[test]
fn a_stopped_idle_worker_is_replaced_by_the_chunk_timeout() {
    let guard = serial();
    let _dog = watchdog(60, "a_stopped_idle_worker");
    let dir = scratch("stopped-idle");
    {
        let mut pool = builder(&guard)
            .workers(2)
            .chunk_timeout(Duration::from_millis(300))
            .build(Flaky { dir: dir.clone() })
            .unwrap();
        let pid = pool.pids()[1];
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid).unwrap(),
            rustix::process::Signal::STOP,
        )
        .unwrap();
        let t = Instant::now();
        let got: Vec<u64> = pool
            .map(0..100u64)
            .map(|r| r.unwrap().to_native())
            .collect();
        assert_eq!(got, (0..100).map(|n| n * 2).collect::<Vec<_>>());
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert_eq!(pool.stats().workers[1].respawns, 1);
        assert_ne!(pool.pids()[1], pid);
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert_no_children();
}

/// Runs `body` in a forked child that leads a process group of its own (its pool's launcher
/// and workers join it), and returns the child, its pid (the group) and a reader of the lines
/// it writes to `out`.
fn group_leader(
    _guard: &std::sync::MutexGuard<'static, ()>,
    body: impl FnOnce(&mut dyn Write) -> i32,
) -> (shmexec::shm::ChildProcess, i32, BufReader<std::fs::File>) {
    let (r, w) = rustix::pipe::pipe().unwrap();
    // SAFETY: we hold the fork lock (`_guard`): every other test thread is blocked on it and
    // libtest's main thread waits on its channel. The child has one thread, so its pool forks
    // with the checked fork.
    let child = unsafe {
        shmexec::shm::fork_unchecked(move || {
            if rustix::process::setpgid(None, None).is_err() {
                return 2;
            }
            let mut out = std::fs::File::from(w);
            body(&mut out)
        })
    }
    .unwrap();
    let pid = child.pid();
    (child, pid, BufReader::new(std::fs::File::from(r)))
}

/// Maps `items` items of `item` each through 2 workers with `chunk_timeout(timeout)` in a
/// process group of its own, stops the whole group `pauses` times for `pause` (the first after
/// 300 ms, then every 300 ms of running), and checks that every item was delivered.
fn paused_run(
    guard: &std::sync::MutexGuard<'static, ()>,
    (timeout, item, items): (Duration, Duration, u64),
    (pauses, pause): (u32, Duration),
) {
    let (mut child, pgid, mut lines) = group_leader(guard, move |out| {
        let task = shmexec::from_fn::<u64, _, _>(move |&n| {
            std::thread::sleep(item);
            n.to_native()
        });
        let Ok(mut pool) = shmexec::Pool::builder()
            .workers(2)
            .ring_bytes(1 << 20)
            .chunk_timeout(timeout)
            .build(task)
        else {
            return 3;
        };
        let _ = writeln!(out, "ready");
        let mut delivered = 0;
        for (i, r) in pool.map(0..items).enumerate() {
            match r {
                Ok(v) if v.to_native() == i as u64 => delivered += 1,
                other => {
                    let _ = writeln!(out, "item {i}: {other:?}");
                }
            }
        }
        let _ = writeln!(out, "delivered {delivered}");
        0
    });
    let mut line = String::new();
    lines.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let group = rustix::process::Pid::from_raw(pgid).unwrap();
    for _ in 0..pauses {
        std::thread::sleep(Duration::from_millis(300));
        rustix::process::kill_process_group(group, rustix::process::Signal::STOP).unwrap();
        std::thread::sleep(pause);
        rustix::process::kill_process_group(group, rustix::process::Signal::CONT).unwrap();
    }
    let mut report = String::new();
    for l in lines.lines() {
        let l = l.unwrap();
        report.push_str(&l);
        report.push('\n');
        if l.starts_with("delivered") {
            break;
        }
    }
    assert_eq!(report, format!("delivered {items}\n"), "{timeout:?}");
    assert_eq!(child.wait().unwrap(), shmexec::shm::ExitStatus::Exited(0));
}

#[test]
fn a_pause_of_the_whole_process_group_loses_no_item() {
    let guard = serial();
    let _dog = watchdog(60, "a_pause_of_the_whole_process_group");
    let ms = Duration::from_millis;
    // One pause of 5 s with 2 s chunk timeouts; then three of 1 s with a 100 ms timeout and
    // items of 30 ms, which the first check after a pause must not use up.
    paused_run(&guard, (ms(2000), ms(100), 40), (1, ms(5000)));
    paused_run(&guard, (ms(100), ms(30), 60), (3, ms(1000)));
    assert_no_children();
}

/// The first mapping of this process whose backing file is a shmexec segment of `len` bytes:
/// its address.
fn segment_of_len(len: usize) -> u64 {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter(|l| l.contains("memfd:shmexec"))
        .find_map(|l| {
            let (range, _) = l.split_once(' ')?;
            let (a, b) = range.split_once('-')?;
            let (a, b) = (
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            );
            (b - a == len as u64).then_some(a)
        })
        .expect("the segment is mapped")
}

/// Writes `bytes` at `addr` of this process, as a stray store (another process's bug, a
/// cosmic ray) would.
fn scribble(addr: u64, bytes: &[u8]) {
    let mut mem = std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/mem")
        .unwrap();
    mem.seek(SeekFrom::Start(addr)).unwrap();
    mem.write_all(bytes).unwrap();
}

#[test]
fn garbage_in_the_stop_and_discard_words_is_ignored() {
    let guard = serial();
    let _dog = watchdog(60, "garbage_in_the_stop_and_discard_words");
    let dir = scratch("stop-word");
    {
        let mut pool = builder(&guard)
            .workers(2)
            .build(Flaky { dir: dir.clone() })
            .unwrap();
        // The counters segment: one page, lines of 128 bytes, worker w at line w + 1, its stop
        // word at byte 40 of its line, its discard mark at byte 80 (`src/stats.rs`).
        let stats = segment_of_len(4096);
        for w in 0..2u64 {
            scribble(stats + (w + 1) * 128 + 40, &0xDEAD_BEEFu64.to_le_bytes());
            scribble(stats + (w + 1) * 128 + 80, &u64::MAX.to_le_bytes());
        }
        let got: Vec<u64> = pool
            .map(0..200u64)
            .map(|r| r.unwrap().to_native())
            .collect();
        assert_eq!(got, (0..200).map(|n| n * 2).collect::<Vec<_>>());
        assert_eq!(pool.stats().respawns, 0);
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert_no_children();
}

#[test]
fn a_corrupt_output_ring_costs_the_items_in_it_not_the_pool() {
    let guard = serial();
    let _dog = watchdog(60, "a_corrupt_output_ring");
    let dir = scratch("corrupt-output");
    {
        let ring = 1usize << 20;
        let mut pool = builder(&guard)
            .workers(1)
            .ring_bytes(ring)
            .build(Flaky { dir: dir.clone() })
            .unwrap();
        let footprint = shmexec::shm::Ring::footprint(ring);
        let (tx, rx) = pool.stream();
        for n in 0..3u64 {
            tx.send(&n).unwrap();
        }
        // Time for the worker to publish all three (microseconds of work); nobody reads them.
        std::thread::sleep(Duration::from_millis(300));
        // Overwrite the output ring's data (the second ring of the worker's segment, after its
        // control block): stamps and headers alike.
        let output_data =
            segment_of_len(2 * footprint) + (footprint + shmexec::shm::CONTROL_LEN) as u64;
        scribble(output_data, &vec![0x5A; 64 << 10]);
        for n in 0..3u64 {
            match rx.recv() {
                Some(Err(Error::InvalidOutput { seq, reason })) => {
                    assert_eq!(seq, n);
                    assert!(reason.contains("corrupt"), "{reason}");
                }
                other => panic!("item {n}: {other:?}"),
            }
        }
        for n in 3..10u64 {
            tx.send(&n).unwrap();
            assert_eq!(rx.recv().unwrap().unwrap().to_native(), 2 * n);
        }
        assert_eq!(tx.stats().respawns, 1);
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert_no_children();
}

#[test]
fn a_death_is_noticed_while_the_other_workers_keep_the_call_busy() {
    let guard = serial();
    let _dog = watchdog(
        60,
        "a_death_is_noticed_while_the_other_workers_keep_the_call_busy",
    );
    {
        // A source slower than the workers: there is always room for the next input, so
        // placing inputs alone could keep the call busy until the source runs out.
        let task = shmexec::from_fn::<u64, _, _>(|&n| n.to_native());
        let mut pool = builder(&guard).workers(2).build(task).unwrap();
        let victim = pool.pids()[1];
        let killed = std::sync::OnceLock::new();
        let source = (0..20_000u64).inspect(|&i| {
            std::thread::sleep(Duration::from_micros(100));
            if i == 2_000 {
                kill(victim);
                let _ = killed.set(Instant::now());
            }
        });
        let mut it = pool.map(source);
        let mut replaced = None;
        let mut i = 0u64;
        while let Some(r) = it.next() {
            assert_eq!(r.unwrap().to_native(), i);
            i += 1;
            if replaced.is_none() && it.stats().respawns == 1 {
                replaced = killed.get().map(Instant::elapsed);
            }
        }
        assert_eq!(i, 20_000);
        // Seen within the health checks' few milliseconds plus a fork, not once the source ran
        // out (seconds later); bounded loosely for a loaded machine.
        let replaced = replaced.expect("the dead worker was replaced");
        assert!(replaced < Duration::from_millis(500), "{replaced:?}");
    }
    assert_no_children();
}

#[test]
fn a_stream_whose_every_worker_is_given_up_says_so_while_its_sender_lives() {
    let guard = serial();
    let _dog = watchdog(60, "a_stream_whose_every_worker_is_given_up");
    let dir = scratch("stream-given-up");
    {
        let mut pool = builder(&guard)
            .workers(1)
            .max_start_attempts(1)
            .build(Flaky { dir: dir.clone() })
            .unwrap();
        std::fs::write(dir.join("mode"), "err").unwrap();
        let victim = pool.pids()[0];
        let (tx, rx) = pool.stream();
        for n in 0..3u64 {
            tx.send(&n).unwrap();
        }
        kill(victim);
        // The sender stays: the receiver must not wait for it.
        let mut got = Vec::new();
        while let Some(r) = rx.recv() {
            got.push(r);
        }
        let (last, before) = got.split_last().expect("an error at least");
        assert!(
            matches!(last, Err(Error::Broken(m)) if m.contains("given up")),
            "{last:?}"
        );
        // Each item sent is accounted for: a result from before the kill, or not run.
        assert_eq!(before.len(), 3, "{before:?}");
        assert!(
            before
                .iter()
                .all(|r| r.is_ok() || matches!(r, Err(Error::WorkerLost { .. }))),
            "{before:?}"
        );
        assert!(matches!(tx.send(&9), Err(Error::Broken(_))));
        drop(tx);
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert_no_children();
}
