//! Tasks with zero, one or many outputs per input: every output once, in input order, also
//! when workers are killed in the middle of an item.

mod support;

use std::time::{Duration, Instant};

use shmexec::{BoxError, OutputSink, Samples, Task};
use support::{assert_no_children, builder, kill, serial};

/// How many outputs input `i` has: 0, 1 or 3, mixed.
fn count(i: u64) -> u64 {
    [0, 1, 3][(i % 3) as usize]
}

fn expected(inputs: impl Iterator<Item = u64>) -> Vec<u64> {
    inputs
        .flat_map(|i| (0..count(i)).map(move |j| i * 10 + j))
        .collect()
}

fn mixed_task() -> impl Task<Input = u64, Output = u64> {
    shmexec::flat_map_fn::<u64, _, _, _>(|&i| {
        let i = i.to_native();
        (0..count(i)).map(move |j| i * 10 + j)
    })
}

#[test]
fn zero_one_and_three_outputs_come_once_in_input_order() {
    let guard = serial();
    {
        let mut pool = builder(&guard).workers(2).build(mixed_task()).unwrap();
        let got: Vec<u64> = pool
            .map(0..3000u64)
            .map(|r| r.unwrap().to_native())
            .collect();
        assert_eq!(got, expected(0..3000));
        // Unordered: the same outputs, each item's in order.
        let mut got: Vec<u64> = pool
            .map_unordered(0..3000u64)
            .map(|r| r.unwrap().to_native())
            .collect();
        got.sort_unstable();
        let mut want = expected(0..3000);
        want.sort_unstable();
        assert_eq!(got, want);
        // A stream, too.
        let got = std::thread::scope(|s| {
            let (tx, rx) = pool.stream();
            s.spawn(move || {
                for i in 0..600u64 {
                    tx.send(&i).unwrap();
                }
            });
            rx.map(|r| r.unwrap().to_native()).collect::<Vec<_>>()
        });
        assert_eq!(got, expected(0..600));
        // A call whose inputs have no output at all ends.
        assert_eq!(pool.map((0..100u64).map(|i| i * 3)).count(), 0);
    }
    assert_no_children();
}

/// Three outputs per input, a little apart, so that kills land in the middle of items.
struct Slow;

impl Task for Slow {
    type Input = u64;
    type Output = u64;
    fn process(&mut self, _: &rkyv::Archived<u64>) -> Result<u64, BoxError> {
        Err("produce only".into())
    }
    fn produce(
        &mut self,
        i: &rkyv::Archived<u64>,
        out: &mut OutputSink<'_>,
    ) -> Result<(), BoxError> {
        let i = i.to_native();
        for j in 0..count(i) {
            std::thread::sleep(Duration::from_micros(100));
            out.emit(&(i * 10 + j))?;
        }
        Ok(())
    }
}

#[test]
fn outputs_survive_kills_in_the_middle_of_an_item() {
    let guard = serial();
    {
        let mut pool = builder(&guard)
            .workers(2)
            .max_attempts(50)
            .build(Slow)
            .unwrap();
        for ordered in [true, false] {
            let start = Instant::now();
            let n = 1500u64;
            let mut got = Vec::new();
            let mut it = if ordered {
                pool.map(0..n)
            } else {
                pool.map_unordered(0..n)
            };
            let mut kills = 0;
            while let Some(r) = it.next() {
                got.push(r.unwrap().to_native());
                if got.len() % 150 == 75 {
                    kill(it.worker_pids()[kills % 2]);
                    kills += 1;
                }
                assert!(start.elapsed() < Duration::from_secs(60), "stuck");
            }
            let respawns = it.stats().respawns;
            drop(it);
            assert!(kills >= 5 && respawns >= kills as u64, "{kills} {respawns}");
            let want = expected(0..n);
            if !ordered {
                got.sort_unstable();
            }
            let mut sorted_want = want.clone();
            sorted_want.sort_unstable();
            assert_eq!(got, if ordered { want } else { sorted_want });
        }
    }
    assert_no_children();
}

/// Keeps the samples above a threshold, written in place into a slot reserved for all of them.
struct Above;

impl Task for Above {
    type Input = Vec<f32>;
    type Output = (Vec<f32>, u64);
    fn process(&mut self, _: &rkyv::Archived<Vec<f32>>) -> Result<Self::Output, BoxError> {
        Err("produce only".into())
    }
    fn produce(
        &mut self,
        input: &rkyv::Archived<Vec<f32>>,
        out: &mut OutputSink<'_>,
    ) -> Result<(), BoxError> {
        let x = input.samples();
        out.emit_samples_up_to(x.len(), |slot: &mut [f32]| {
            let mut n = 0;
            for &v in x.iter().filter(|&&v| v > 0.5) {
                slot[n] = v;
                n += 1;
            }
            Ok((n, x.len() as u64))
        })
    }
}

#[test]
fn an_output_of_unknown_length_is_written_in_place_up_to_a_bound() {
    let guard = serial();
    {
        let mut pool = builder(&guard).workers(2).build(Above).unwrap();
        let inputs: Vec<Vec<f32>> = (0..200)
            .map(|i| {
                (0..1000 + i)
                    .map(|k| ((k * 7 + i) % 10) as f32 / 10.0)
                    .collect()
            })
            .collect();
        for (input, r) in inputs.iter().zip(pool.map(&inputs)) {
            let out = r.unwrap();
            let want: Vec<f32> = input.iter().copied().filter(|&v| v > 0.5).collect();
            assert_eq!(out.0.samples(), &want[..]);
            assert_eq!(out.1.to_native(), input.len() as u64);
        }
    }
    assert_no_children();
}

#[test]
fn a_call_ended_by_held_outputs_counts_inputs_not_outputs() {
    let guard = serial();
    {
        // 100 outputs of 10 KB per input: a 64 KiB ring holds six of them.
        let task = shmexec::flat_map_fn::<u64, _, _, _>(|&i| {
            let i = i.to_native() as u8;
            (0..100).map(move |_| vec![i; 10_000])
        });
        let mut pool = builder(&guard)
            .workers(2)
            .ring_bytes(1 << 16)
            .build(task)
            .unwrap();
        let all: Vec<_> = pool.map(0..4u64).collect();
        let outputs = all.iter().filter(|r| r.is_ok()).count() as u64;
        match all.last() {
            Some(Err(
                e @ shmexec::Error::CallEnded {
                    results,
                    outputs: handed,
                    not_run: Some(not_run),
                    ..
                },
            )) => {
                // Input 0's outputs were only partly handed out: no input is done.
                assert_eq!((*results, *handed), (0, outputs), "{e}");
                assert_eq!(results + not_run, 4, "{e}");
                assert!(e.to_string().contains("from index 0"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }
    assert_no_children();
}

/// Reserves room for `max` samples, an impossible number.
struct Huge(usize);

impl Task for Huge {
    type Input = u64;
    type Output = (Vec<f32>, u64);
    fn process(&mut self, _: &rkyv::Archived<u64>) -> Result<Self::Output, BoxError> {
        Err("produce only".into())
    }
    fn produce(
        &mut self,
        _: &rkyv::Archived<u64>,
        out: &mut OutputSink<'_>,
    ) -> Result<(), BoxError> {
        let max = self.0;
        out.emit_samples_up_to(max, |_: &mut [f32]| Ok((max, 0u64)))
    }
}

#[test]
fn an_impossible_output_size_is_an_error_not_a_short_output() {
    let guard = serial();
    {
        for max in [(1usize << 62) + 1000, usize::MAX] {
            let mut pool = builder(&guard).workers(1).build(Huge(max)).unwrap();
            match pool.map([0u64]).next() {
                Some(Err(shmexec::Error::OutputTooLarge { len, .. })) => {
                    assert_eq!(len, usize::MAX)
                }
                other => panic!("{max}: {other:?}"),
            }
        }
    }
    assert_no_children();
}
