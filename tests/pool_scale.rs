//! A pool of hundreds of workers: building, running and dropping it costs time in proportion
//! to the workers, not to their square.

mod support;

use std::time::{Duration, Instant};

use shmexec::Pinning;
use support::{assert_no_children, builder, serial};

#[test]
fn a_pool_of_256_workers_builds_runs_every_item_in_order_and_drops() {
    const WORKERS: usize = 256;
    const ITEMS: u64 = 4000;
    let guard = serial();
    {
        // A short sleep per item: the coordinator places items faster than any worker answers,
        // so every worker gets some (the least busy takes the next).
        let task = shmexec::from_fn::<u64, _, _>(|&n| {
            std::thread::sleep(Duration::from_millis(2));
            n.to_native() * 2 + 1
        });
        let started = Instant::now();
        let mut pool = builder(&guard)
            .workers(WORKERS)
            .pinning(Pinning::Off)
            .ring_bytes(64 << 10)
            .build(task)
            .expect("a pool of 256 workers");
        let built = started.elapsed();
        assert_eq!(pool.workers(), WORKERS);
        let out: Vec<u64> = pool
            .map(0..ITEMS)
            .map(|r| r.expect("a result").to_native())
            .collect();
        assert_eq!(out, (0..ITEMS).map(|n| n * 2 + 1).collect::<Vec<_>>());
        let stats = pool.stats();
        let idle: Vec<usize> = (stats.workers.iter())
            .filter(|w| w.chunks == 0)
            .map(|w| w.index)
            .collect();
        assert!(idle.is_empty(), "workers that ran nothing: {idle:?}");
        assert_eq!(stats.workers.iter().map(|w| w.chunks).sum::<u64>(), ITEMS);
        let dropping = Instant::now();
        drop(pool);
        eprintln!(
            "{WORKERS} workers: built in {built:?}, ran {ITEMS} items, dropped in {:?}",
            dropping.elapsed()
        );
    }
    assert_no_children();
}
