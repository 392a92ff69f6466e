//! `map`, `map_unordered`, `map_in_place` and `for_each` against a sequential run, with real
//! worker processes and real shared memory.

mod support;

use shmexec::{Error, Pool, Samples};
use support::{Rng, assert_no_children, builder, open_fds, serial};

/// The reference transform: per chunk, the sum and the count of samples above 1.0.
fn reference(chunk: &[f32]) -> (f64, u64) {
    (
        chunk.iter().map(|&x| x as f64).sum(),
        chunk.iter().filter(|&&x| x > 1.0).count() as u64,
    )
}

/// Runs `input` through `pool` (a task computing [`reference`]) and checks every result, in
/// order.
fn assert_matches_reference(
    pool: &mut shmexec::Pool<impl shmexec::Task<Input = Vec<f32>, Output = (f64, u64)>>,
    input: &[Vec<f32>],
) {
    let got: Vec<(f64, u64)> = pool
        .map(input)
        .map(|r| {
            let r = r.unwrap();
            (r.0.to_native(), r.1.to_native())
        })
        .collect();
    let want: Vec<(f64, u64)> = input.iter().map(|c| reference(c)).collect();
    assert_eq!(got, want, "{} chunks", input.len());
}

fn chunks(rng: &mut Rng, n: usize, max_len: u64) -> Vec<Vec<f32>> {
    (0..n)
        .map(|i| {
            let len = rng.below(max_len + 1) as usize;
            (0..len)
                .map(|j| ((i * 31 + j) % 97) as f32 / 32.0)
                .collect()
        })
        .collect()
}

#[test]
fn ordered_results_equal_a_sequential_run() {
    let guard = serial();
    let fds = open_fds();
    {
        let task = shmexec::from_fn::<Vec<f32>, _, _>(|c| reference(c.samples()));
        let mut pool = builder(&guard).workers(3).build(task).unwrap();
        let mut rng = Rng(7);
        for n in [0usize, 1, 2, 17, 300] {
            let input = chunks(&mut rng, n, 20_000);
            assert_matches_reference(&mut pool, &input);
        }
        let stats = pool.stats();
        assert_eq!(stats.items, 320);
        assert_eq!(stats.workers.iter().map(|w| w.chunks).sum::<u64>(), 320);
        assert_eq!(stats.copies_per_input_byte(), 1.0);
    }
    assert_no_children();
    assert_eq!(open_fds(), fds, "the pool left descriptors open");
}

#[test]
fn unordered_and_for_each_yield_the_same_multiset() {
    let guard = serial();
    {
        let task = shmexec::from_fn::<Vec<f32>, _, _>(|c| reference(c.samples()).1);
        let mut pool = builder(&guard).workers(2).build(task).unwrap();
        let input = chunks(&mut Rng(11), 200, 50_000);
        let mut want: Vec<(u64, u64)> = input
            .iter()
            .enumerate()
            .map(|(i, c)| (i as u64, reference(c).1))
            .collect();
        let mut got: Vec<(u64, u64)> = pool
            .map_unordered(&input)
            .map(|r| r.map(|o| (o.seq(), o.to_native())).unwrap())
            .collect();
        got.sort();
        assert_eq!(got, want);
        // Sequence numbers go on across calls.
        for w in &mut want {
            w.0 += 200;
        }
        let mut seen = Vec::new();
        pool.for_each(&input, |r| {
            let o = r.unwrap();
            seen.push((o.seq(), o.to_native()));
        });
        seen.sort();
        assert_eq!(seen, want);
    }
    assert_no_children();
}

#[test]
fn short_queues_keep_every_call_correct() {
    let guard = serial();
    {
        // One byte of queue: every worker holds two items at most, whatever the ring holds, so
        // feeding stops on the queue, not the ring, on every item.
        let task = shmexec::from_fn::<Vec<f32>, _, _>(|c| reference(c.samples()));
        let mut pool = builder(&guard)
            .workers(3)
            .queue_bytes(1)
            .build(task)
            .unwrap();
        let mut rng = Rng(23);
        let input = chunks(&mut rng, 150, 30_000);
        assert_matches_reference(&mut pool, &input);
        let mut got: Vec<u64> = pool
            .map_unordered(&input)
            .map(|r| r.unwrap().seq())
            .collect();
        got.sort();
        assert_eq!(got, (150..300).collect::<Vec<u64>>());
        // A call dropped midway leaves items queued; the next call waits them out.
        let mut call = pool.map(&input);
        assert!(call.next().unwrap().is_ok());
        drop(call);
        assert_matches_reference(&mut pool, &input);
    }
    assert_no_children();
}

#[test]
fn a_slow_item_does_not_stall_the_other_workers() {
    // Item 0 blocks its worker until item MARK has run. In an ordered call the coordinator waits
    // for item 0 all that time; the other worker must go on taking inputs meanwhile, although
    // nobody reads its results yet (they wait in its output ring), or item MARK never runs.
    const MARK: u64 = 12;
    let guard = serial();
    let marker = std::env::temp_dir().join(format!("shmexec-slow-item-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    {
        let path = marker.clone();
        let task = shmexec::from_fn::<u64, _, _>(move |x| {
            let x = x.to_native();
            if x == MARK {
                std::fs::write(&path, b"").expect("the marker file can be written");
            }
            if x != 0 {
                return x;
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !path.exists() {
                if std::time::Instant::now() > deadline {
                    return u64::MAX; // item MARK never ran: the other worker was left idle
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            0
        });
        // A queue of one byte: each worker is handed two unfinished items at most.
        let mut pool = builder(&guard)
            .workers(2)
            .queue_bytes(1)
            .build(task)
            .unwrap();
        let got: Vec<u64> = pool.map(0..30u64).map(|r| r.unwrap().to_native()).collect();
        assert_eq!(got, (0..30).collect::<Vec<u64>>());
    }
    let _ = std::fs::remove_file(&marker);
    assert_no_children();
}

#[test]
fn in_place_input_is_zero_copy_and_correct() {
    let guard = serial();
    {
        let task = shmexec::from_fn::<Vec<i16>, _, _>(|c| {
            c.samples().iter().map(|&s| s as i64).sum::<i64>()
        });
        let mut pool = builder(&guard).workers(2).build(task).unwrap();
        let lens: Vec<usize> = (0..100).map(|i| (i * 977) % 40_000).collect();
        let sample = |i: u64, j: usize| ((i as usize * 7 + j) % 2000) as i16 - 1000;
        let got: Vec<i64> = pool
            .map_in_place(lens.clone(), |i, s: &mut [i16]| {
                for (j, x) in s.iter_mut().enumerate() {
                    *x = sample(i, j);
                }
                Ok(())
            })
            .map(|r| r.unwrap().to_native())
            .collect();
        let want: Vec<i64> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| sample(i as u64, j) as i64).sum())
            .collect();
        assert_eq!(got, want);
        let stats = pool.stats();
        assert!(stats.input_bytes > 0);
        assert_eq!(stats.input_bytes_copied, 0);
        assert_eq!(stats.copies_per_input_byte(), 0.0);
        // A failing fill is that item's error, in its place.
        let r: Vec<_> = pool
            .map_in_place([10, 10, 10], |i, _| {
                if i == 1 {
                    Err("no data".into())
                } else {
                    Ok(())
                }
            })
            .collect();
        assert!(r[0].is_ok() && r[2].is_ok());
        assert!(matches!(&r[1], Err(Error::Encode { reason, .. }) if reason.contains("no data")));
    }
    assert_no_children();
}

#[test]
fn pool_builds_with_defaults() {
    let _guard = serial();
    {
        let task = shmexec::from_fn::<u64, _, _>(|&n| n.to_native() + 1);
        // SAFETY: as in `support::builder`.
        let mut pool = unsafe { Pool::builder().allow_threads() }
            .build(task)
            .unwrap();
        assert!(pool.workers() >= 1);
        let out: Vec<u64> = pool
            .map(0..1000u64)
            .map(|r| r.unwrap().to_native())
            .collect();
        assert_eq!(out, (1..1001).collect::<Vec<_>>());
    }
    assert_no_children();
}

/// Writes `x * 2` for each input sample straight into the ring; the metadata is the sum, and a
/// label long enough (for `long` inputs) to need more room than reserved after the samples.
struct Doubler;

impl shmexec::ArrayTask for Doubler {
    type Input = Vec<i32>;
    type Sample = i32;
    type Meta = (i64, String);
    fn output_len(&mut self, x: &rkyv::Archived<Vec<i32>>) -> usize {
        x.len()
    }
    fn process(
        &mut self,
        x: &rkyv::Archived<Vec<i32>>,
        out: &mut [i32],
    ) -> Result<(i64, String), shmexec::BoxError> {
        let x = x.samples();
        match x.first() {
            Some(&-1) => return Err("negative marker".into()),
            Some(&-2) => panic!("panic marker"),
            _ => {}
        }
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v * 2;
        }
        let label = if x.len() == 3 {
            "x".repeat(10_000)
        } else {
            String::from("ok")
        };
        Ok((x.iter().map(|&v| v as i64).sum(), label))
    }
}

#[test]
fn array_outputs_are_written_in_place_and_fail_cleanly() {
    let guard = serial();
    {
        let mut pool = builder(&guard)
            .workers(2)
            .build(shmexec::ArrayOutput(Doubler))
            .unwrap();
        let inputs: Vec<Vec<i32>> = vec![
            (0..50_000).collect(),
            vec![],
            vec![-1, 5],
            vec![7, 8, 9], // its metadata outgrows the room reserved after the samples
            vec![-2],
            (0..100).rev().collect(),
        ];
        let r: Vec<_> = pool.map(&inputs).collect();
        for (i, (x, r)) in inputs.iter().zip(&r).enumerate() {
            match x.first() {
                Some(&-1) => assert!(matches!(r, Err(Error::Task { .. })), "{r:?}"),
                Some(&-2) => assert!(matches!(r, Err(Error::Panic { .. })), "{r:?}"),
                _ => {
                    let o = r.as_ref().unwrap();
                    let want: Vec<i32> = x.iter().map(|v| v * 2).collect();
                    assert_eq!(o.0.samples(), &want[..], "item {i}");
                    assert_eq!(o.1.0.to_native(), x.iter().map(|&v| v as i64).sum::<i64>());
                    let label_len = if x.len() == 3 { 10_000 } else { 2 };
                    assert_eq!(o.1.1.len(), label_len);
                    let owned: (Vec<i32>, (i64, String)) = o.deserialize().unwrap();
                    assert_eq!(owned.0, want);
                }
            }
        }
    }
    assert_no_children();
}

#[test]
fn trusted_outputs_skip_validation_and_read_the_same() {
    let guard = serial();
    {
        let task = shmexec::from_fn::<Vec<f32>, _, _>(|c| reference(c.samples()));
        // SAFETY: shmexec's own workers write valid archives and this task has no unsafe code.
        let mut pool = unsafe { builder(&guard).workers(2).trust_outputs() }
            .build(task)
            .unwrap();
        let input = chunks(&mut Rng(3), 50, 10_000);
        assert_matches_reference(&mut pool, &input);
    }
    assert_no_children();
}

#[test]
fn slices_of_one_buffer_are_inputs_copied_once() {
    let guard = serial();
    {
        let task = shmexec::from_fn::<Vec<f32>, _, _>(|c| reference(c.samples()));
        let mut pool = builder(&guard).workers(2).build(task).unwrap();
        let buffer: Vec<f32> = (0..300_000).map(|j| (j % 97) as f32 / 32.0).collect();
        let chunks: Vec<&[f32]> = buffer.chunks(7_777).collect();
        let got: Vec<(f64, u64)> = pool
            .map_slices(chunks.iter().copied())
            .map(|r| {
                let o = r.unwrap();
                (o.0.to_native(), o.1.to_native())
            })
            .collect();
        let want: Vec<(f64, u64)> = chunks.iter().map(|c| reference(c)).collect();
        assert_eq!(got, want);
        let stats = pool.stats();
        assert_eq!(stats.copies_per_input_byte(), 1.0);
    }
    assert_no_children();
}

#[test]
fn every_result_says_when_it_passed_each_stage_and_stats_give_deltas() {
    let guard = serial();
    {
        let task = shmexec::from_fn::<u64, _, _>(|&n| {
            std::thread::sleep(std::time::Duration::from_millis(2));
            n.to_native()
        });
        let mut pool = builder(&guard).workers(2).build(task).unwrap();
        let before = pool.stats();
        for r in pool.map(0..20u64) {
            let t = r.unwrap().timing();
            assert!(t.submitted_ns > 0, "{t:?}");
            assert!(
                t.submitted_ns <= t.started_ns
                    && t.started_ns <= t.finished_ns
                    && t.finished_ns <= t.delivered_ns,
                "{t:?}"
            );
            assert!(t.run() >= std::time::Duration::from_millis(2), "{t:?}");
            assert_eq!(t.total(), t.queued() + t.run() + t.waited());
        }
        let mid = pool.stats();
        assert_eq!(pool.map(0..5u64).count(), 5);
        let delta = pool.stats().since(&mid);
        assert_eq!(delta.items, 5);
        assert_eq!(delta.workers.iter().map(|w| w.chunks).sum::<u64>(), 5);
        assert_eq!(mid.since(&before).items, 20);
        drop(pool);
        // Without the coordinator's half: only the worker's stamps.
        let task = shmexec::from_fn::<u64, _, _>(|&n| n.to_native());
        let mut pool = builder(&guard)
            .workers(1)
            .item_timing(false)
            .build(task)
            .unwrap();
        let t = pool.map([1u64]).next().unwrap().unwrap().timing();
        assert_eq!((t.submitted_ns, t.delivered_ns), (0, 0), "{t:?}");
        assert!(t.started_ns > 0 && t.finished_ns >= t.started_ns, "{t:?}");
    }
    assert_no_children();
}
