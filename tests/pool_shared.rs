//! The shared region: spans read in place by real workers, against the region's contents as
//! the coordinator sees them.

mod support;

use std::time::Duration;

use shmexec::shared::Span;
use shmexec::{Error, Pool, Task};
use support::{Rng, assert_no_children, builder, kill, open_fds, serial};

/// Per span: the sum and the count of samples above 1.0.
fn reference(samples: &[f32]) -> (f64, u64) {
    (
        samples.iter().map(|&x| x as f64).sum(),
        samples.iter().filter(|&&x| x > 1.0).count() as u64,
    )
}

fn span_task() -> impl Task<Input = Span<f32>, Output = (f64, u64)> {
    shmexec::try_from_fn::<Span<f32>, _, _>(|span| Ok(reference(span.get()?)))
}

/// A pool of 2 workers whose task sleeps `delay` per span, with a region of `bytes`.
fn slow_pool(
    guard: &std::sync::MutexGuard<'static, ()>,
    delay: Duration,
    bytes: usize,
) -> Pool<impl Task<Input = Span<f32>, Output = (f64, u64)>> {
    let slow = shmexec::try_from_fn::<Span<f32>, _, _>(move |span| {
        std::thread::sleep(delay);
        Ok(reference(span.get()?))
    });
    builder(guard)
        .workers(2)
        .shared_bytes(bytes)
        .build(slow)
        .unwrap()
}

/// What each span should give, from the region's contents.
fn expected(region: &[f32], spans: &[Span<f32>]) -> Vec<(f64, u64)> {
    spans
        .iter()
        .map(|s| reference(&region[s.start()..s.start() + s.len()]))
        .collect()
}

fn random_spans(rng: &mut Rng, n: usize, region: usize) -> Vec<Span<f32>> {
    (0..n)
        .map(|_| {
            let start = rng.below(region as u64 + 1) as usize;
            let len = rng.below((region - start) as u64 + 1) as usize;
            Span::new(start, len)
        })
        .collect()
}

fn fill(pool: &mut Pool<impl Task>, salt: usize) {
    for (i, x) in pool.shared_mut::<f32>().unwrap().iter_mut().enumerate() {
        *x = ((i * 31 + salt) % 97) as f32 / 32.0;
    }
}

/// Every span's result, in order, as the workers computed it and as the coordinator does.
fn check(pool: &mut Pool<impl Task<Input = Span<f32>, Output = (f64, u64)>>, spans: &[Span<f32>]) {
    let got: Vec<(f64, u64)> = pool
        .map(spans)
        .map(|r| {
            let r = r.unwrap();
            (r.0.to_native(), r.1.to_native())
        })
        .collect();
    assert_eq!(got, expected(pool.shared::<f32>().unwrap(), spans));
}

#[test]
fn spans_are_read_in_place_and_see_each_refill() {
    let guard = serial();
    let fds = open_fds();
    {
        let region = 1 << 20; // samples
        let mut pool = builder(&guard)
            .workers(3)
            .shared_bytes(region * 4)
            .build(span_task())
            .unwrap();
        assert_eq!(pool.shared::<f32>().unwrap().len(), region);
        assert_eq!(pool.shared::<u8>().unwrap().len(), region * 4);
        let mut rng = Rng(11);
        for (round, n) in [0usize, 1, 40, 300].into_iter().enumerate() {
            // Each round rewrites the whole region: the workers must see the new contents.
            fill(&mut pool, round);
            let mut spans = random_spans(&mut rng, n, region);
            if n > 1 {
                spans[0] = Span::new(0, region); // all of it
                spans[1] = Span::new(region, 0); // empty, at the very end
            }
            check(&mut pool, &spans);
        }
        let stats = pool.stats();
        assert_eq!(stats.items, 341);
        // Only the spans travel: 16-byte descriptors, however long the span.
        assert!(
            stats.input_bytes < 341 * 64,
            "{} input bytes",
            stats.input_bytes
        );
        // And the region bytes they name are what the workers read: a copy of a few bytes per
        // span, against every sample read in place.
        let region_read: u64 = stats.workers.iter().map(|w| w.region_bytes_read).sum();
        assert!(
            region_read > 100 * stats.input_bytes,
            "{region_read} region bytes read"
        );
        assert!(
            stats.copies_per_input_byte() < 0.01,
            "{}",
            stats.copies_per_input_byte()
        );
    }
    assert_no_children();
    assert_eq!(open_fds(), fds, "descriptors leaked");
}

#[test]
fn a_span_beyond_the_region_is_that_items_error() {
    let guard = serial();
    {
        let mut pool = builder(&guard)
            .workers(2)
            .shared_bytes(4096)
            .build(span_task())
            .unwrap();
        fill(&mut pool, 0);
        let spans = [
            Span::new(0, 1024),
            Span::new(1000, 25), // one sample too many
            Span::new(usize::MAX, 2),
            Span::new(1024, 0),
        ];
        let results: Vec<_> = pool.map(spans).collect();
        assert!(results[0].is_ok());
        for r in &results[1..3] {
            match r {
                Err(Error::Task { message, .. }) => {
                    assert!(message.contains("beyond the shared region"), "{message}")
                }
                other => panic!("expected a task error, got {other:?}"),
            }
        }
        assert!(results[3].is_ok());
    }
    assert_no_children();
}

#[test]
fn without_a_region_spans_and_views_are_errors() {
    let guard = serial();
    {
        let mut pool = builder(&guard).workers(1).build(span_task()).unwrap();
        assert!(matches!(pool.shared::<f32>(), Err(Error::NoSharedRegion)));
        assert!(matches!(
            pool.shared_mut::<f32>(),
            Err(Error::NoSharedRegion)
        ));
        match pool.map([Span::<f32>::new(0, 1)]).next() {
            Some(Err(Error::Task { message, .. })) => {
                assert!(message.contains("no shared region"), "{message}")
            }
            other => panic!("expected a task error, got {other:?}"),
        }
        // And a pool whose region cannot be allocated is an error from build.
        let huge = builder(&guard)
            .workers(1)
            .shared_bytes(1 << 46)
            .build(span_task());
        assert!(matches!(huge, Err(Error::OutOfMemory { .. })), "{huge:?}");
    }
    assert_no_children();
}

#[test]
fn shared_mut_waits_for_the_items_of_an_abandoned_call() {
    let guard = serial();
    {
        // 19 items of 40 ms on 2 workers are left after the first: ~380 ms of work, far more
        // than the moment between dropping the call and the first check.
        let mut pool = slow_pool(&guard, Duration::from_millis(40), 1 << 16);
        fill(&mut pool, 1);
        let spans: Vec<Span<f32>> = (0..20).map(|i| Span::new(i * 100, 100)).collect();
        let mut call = pool.map(&spans);
        assert!(call.next().unwrap().is_ok());
        drop(call); // the other items are still queued or running in the workers
        let done = |pool: &Pool<_>| pool.stats().workers.iter().map(|w| w.chunks).sum::<u64>();
        // Busy time is added as an item's result is published: it stops moving once no worker
        // runs an item.
        let busy = |pool: &Pool<_>| {
            pool.stats()
                .workers
                .iter()
                .map(|w| w.busy)
                .sum::<Duration>()
        };
        assert!(done(&pool) < 20, "the slow items finished too soon to test");
        fill(&mut pool, 2);
        let after = busy(&pool);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            busy(&pool),
            after,
            "shared_mut returned while workers still read"
        );
        // The items not started when the call was dropped were closed unrun.
        assert!(done(&pool) < 20, "{}", done(&pool));
        check(&mut pool, &spans);
    }
    assert_no_children();
}

#[test]
fn a_replacement_worker_reads_the_region_too() {
    let guard = serial();
    {
        let mut pool = slow_pool(&guard, Duration::from_millis(5), 1 << 20);
        fill(&mut pool, 3);
        let spans: Vec<Span<f32>> = (0..60).map(|i| Span::new(i * 4000, 4000)).collect();
        let victim = pool.pids()[0];
        let region: Vec<f32> = pool.shared::<f32>().unwrap().to_vec();
        let got: Vec<(f64, u64)> = pool
            .map(&spans)
            .enumerate()
            .map(|(i, r)| {
                if i == 5 {
                    kill(victim);
                }
                let r = r.unwrap();
                (r.0.to_native(), r.1.to_native())
            })
            .collect();
        assert_eq!(got, expected(&region, &spans));
        assert_eq!(pool.stats().respawns, 1);
    }
    assert_no_children();
}

#[test]
fn a_worker_that_writes_into_the_region_dies_and_the_region_stays_intact() {
    let guard = serial();
    {
        // The item whose span starts at sample 300 writes into it: a stray pointer in a C
        // extension, say. Workers map the region read-only, so that worker dies with SIGSEGV.
        let vandal = shmexec::try_from_fn::<Span<f32>, _, _>(|span| {
            let samples = span.get()?;
            if span.start() == 300 {
                // SAFETY: none; this deliberately writes through a shared slice into memory
                // mapped read-only, to check that the fault kills the worker instead of
                // changing the bytes. The test expects the process to die here.
                unsafe { std::ptr::write_volatile(samples.as_ptr().cast_mut(), -1.0) };
            }
            Ok(reference(samples))
        });
        let mut pool = builder(&guard)
            .workers(2)
            .max_attempts(2)
            .shared_bytes(4096)
            .build(vandal)
            .unwrap();
        fill(&mut pool, 4);
        let before = pool.shared::<f32>().unwrap().to_vec();
        let spans: Vec<Span<f32>> = (0..8).map(|i| Span::new(i * 100, 100)).collect();
        let results: Vec<_> = pool.map(&spans).collect();
        for (i, r) in results.iter().enumerate() {
            match (i, r) {
                (3, Err(Error::WorkerCrashed { signal, .. })) => {
                    assert_eq!(*signal, Some(libc::SIGSEGV))
                }
                (3, other) => panic!("the vandal item gave {other:?}"),
                (_, r) => assert!(r.is_ok(), "item {i}: {r:?}"),
            }
        }
        assert_eq!(pool.shared::<f32>().unwrap(), &before[..]);
        assert_eq!(pool.stats().respawns, 2);
    }
    assert_no_children();
}
