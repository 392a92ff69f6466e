//! A pool used from a program that already runs four busy threads, with the `spawn` start
//! method: workers are this program started again, so no thread's lock is copied into them.
//!
//! This test binary has its own `main` (`harness = false` in Cargo.toml) because a spawned
//! worker runs `main` from the top, and `serve` must come first. It answers nextest's
//! `--list` itself.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shmexec::shared::Span;
use shmexec::{Error, Pool, Samples, Task};

const NAME: &str = "spawn_from_a_threaded_program";

fn sum_task() -> impl Task<Input = Vec<i32>, Output = i64> {
    shmexec::from_fn::<Vec<i32>, _, _>(|c| {
        std::thread::sleep(Duration::from_micros(200));
        c.samples().iter().map(|&x| x as i64).sum::<i64>()
    })
}

/// Sums a span of the pool's shared region, read in place.
fn span_sum_task() -> impl Task<Input = Span<i32>, Output = i64> {
    shmexec::try_from_fn::<Span<i32>, _, _>(|s| Ok(s.get()?.iter().map(|&x| x as i64).sum::<i64>()))
}

fn main() {
    // In a spawned worker this runs the worker loop and never returns.
    shmexec::spawn::serve("sum", sum_task);
    shmexec::spawn::serve("span_sum", span_sum_task);

    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        if !args.iter().any(|a| a == "--ignored") {
            println!("{NAME}: test");
        }
        return;
    }
    if args
        .iter()
        .skip(1)
        .any(|a| !a.starts_with('-') && !NAME.contains(a.as_str()))
    {
        return; // a filter that excludes this test
    }
    spawn_from_a_threaded_program();
    println!("test {NAME} ... ok");
}

fn spawn_from_a_threaded_program() {
    // Four threads that keep taking a lock, printing and allocating: what a fork would copy
    // in whatever state they happen to be.
    let stop = Arc::new(AtomicBool::new(false));
    let lock = Arc::new(Mutex::new(0u64));
    let spins = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (stop, lock, spins) = (stop.clone(), lock.clone(), spins.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let mut g = lock.lock().unwrap();
                    *g += 1;
                    let v: Vec<u64> = (0..64).collect();
                    std::hint::black_box(&v);
                    drop(g);
                    spins.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    assert!(shmexec::shm::process::thread_count() >= 5);

    // Fork is refused here...
    match Pool::builder().workers(2).build(sum_task()) {
        Err(e @ Error::Start(_)) => assert!(e.to_string().contains("threads"), "{e}"),
        other => panic!("fork from a threaded process: {other:?}"),
    }
    // ... spawn works, and so does replacing a killed worker.
    {
        let mut pool = Pool::builder()
            .workers(2)
            .ring_bytes(1 << 20)
            .spawn("sum")
            .build(sum_task())
            .expect("spawned pool");
        let inputs: Vec<Vec<i32>> = (0..400).map(|i| vec![i; 100]).collect();
        let start = Instant::now();
        for (i, r) in pool.map(&inputs).enumerate() {
            assert_eq!(r.unwrap().to_native(), 100 * i as i64);
            assert!(start.elapsed() < Duration::from_secs(60), "stuck");
        }
        let victim = pool.pids()[0];
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(victim).unwrap(),
            rustix::process::Signal::KILL,
        )
        .unwrap();
        let sums: Vec<i64> = pool.map(&inputs).map(|r| r.unwrap().to_native()).collect();
        assert_eq!(sums, (0..400).map(|i| 100 * i as i64).collect::<Vec<_>>());
        assert_eq!(pool.stats().respawns, 1);
        assert_ne!(pool.pids()[0], victim);
    }
    // A spawned worker maps the shared region from its inherited descriptor.
    {
        let mut pool = Pool::builder()
            .workers(2)
            .ring_bytes(1 << 20)
            .shared_bytes(400 * 100 * 4)
            .spawn("span_sum")
            .build(span_sum_task())
            .expect("spawned pool with a shared region");
        for (i, x) in pool.shared_mut::<i32>().unwrap().iter_mut().enumerate() {
            *x = (i / 100) as i32;
        }
        let sums: Vec<i64> = pool
            .map((0..400).map(|i| Span::new(i * 100, 100)))
            .map(|r| r.unwrap().to_native())
            .collect();
        assert_eq!(sums, (0..400).map(|i| 100 * i as i64).collect::<Vec<_>>());
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    assert!(spins.load(Ordering::Relaxed) > 0);
    let r = rustix::process::waitpid(None, rustix::process::WaitOptions::NOHANG);
    assert!(
        matches!(r, Err(rustix::io::Errno::CHILD)),
        "a worker outlived the pool: {r:?}"
    );
}
