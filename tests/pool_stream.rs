//! Streams: a sending and a receiving half on different threads, results as soon as ready.

mod support;

use std::task::Poll;
use std::time::{Duration, Instant};

use shmexec::{Error, Pool, Samples, Task};
use support::{assert_no_children, builder, serial};

fn sum_task() -> impl Task<Input = Vec<u32>, Output = u64> + Send {
    shmexec::from_fn::<Vec<u32>, _, _>(|c| c.samples().iter().map(|&x| x as u64).sum::<u64>())
}

fn chunk(i: u32) -> Vec<u32> {
    (0..1000 + (i % 7) * 100).map(|k| k ^ i).collect()
}

fn expected(i: u32) -> u64 {
    chunk(i).iter().map(|&x| x as u64).sum()
}

#[test]
fn ordered_stream_across_threads_gives_every_result_in_order() {
    let guard = serial();
    {
        let mut pool = builder(&guard).workers(2).build(sum_task()).unwrap();
        let got = std::thread::scope(|s| {
            let (tx, rx) = pool.stream();
            s.spawn(move || {
                for i in 0..500 {
                    tx.send(&chunk(i)).unwrap();
                }
            });
            s.spawn(move || {
                let mut got = Vec::new();
                while let Some(r) = rx.recv() {
                    got.push(r.unwrap().to_native());
                }
                got
            })
            .join()
            .unwrap()
        });
        assert_eq!(got, (0..500).map(expected).collect::<Vec<_>>());
        // The pool goes on with an ordinary call afterwards.
        let n = pool.map((0..20).map(chunk)).count();
        assert_eq!(n, 20);
    }
    assert_no_children();
}

#[test]
fn unordered_stream_gives_the_same_multiset() {
    let guard = serial();
    {
        let mut pool = builder(&guard).workers(3).build(sum_task()).unwrap();
        let mut got: Vec<(u64, u64)> = std::thread::scope(|s| {
            let (tx, rx) = pool.stream_unordered();
            let sent = s.spawn(move || {
                (0..300)
                    .map(|i| tx.send(&chunk(i)).unwrap())
                    .collect::<Vec<_>>()
            });
            let got: Vec<(u64, u64)> = rx
                .map(|r| r.unwrap())
                .map(|o| (o.seq(), o.to_native()))
                .collect();
            let seqs = sent.join().unwrap();
            assert_eq!(seqs.len(), 300);
            got
        });
        got.sort();
        let first = got[0].0;
        let want: Vec<(u64, u64)> = (0..300).map(|i| (first + i as u64, expected(i))).collect();
        assert_eq!(got, want);
    }
    assert_no_children();
}

#[test]
fn a_result_is_handed_out_before_the_next_input_arrives() {
    let guard = serial();
    {
        let mut pool = builder(&guard).workers(2).build(sum_task()).unwrap();
        let (tx, rx) = pool.stream();
        // One input at a time, on one thread: each result must come without a next input (a
        // live source that pauses must not hold back what is ready).
        for i in 0..50 {
            let seq = tx.send(&chunk(i)).unwrap();
            let start = Instant::now();
            let r = loop {
                match rx.recv_timeout(Duration::from_secs(10)) {
                    Poll::Ready(r) => break r,
                    Poll::Pending => {
                        assert!(start.elapsed() < Duration::from_secs(10), "no result")
                    }
                }
            };
            let out = r.expect("not ended").expect("a result");
            assert_eq!((out.seq(), out.to_native()), (seq, expected(i)));
        }
        // Nothing more is in flight: no result now, and none within a short wait.
        assert!(rx.try_recv().is_pending());
        assert!(rx.recv_timeout(Duration::from_millis(20)).is_pending());
        drop(tx);
        assert!(rx.recv().is_none(), "closing the sender ends the stream");
        assert!(matches!(rx.try_recv(), Poll::Ready(None)));
    }
    assert_no_children();
}

#[test]
fn try_send_says_when_full_and_send_waits_for_room() {
    let guard = serial();
    {
        let task = shmexec::from_fn::<Vec<u32>, _, _>(|c| {
            std::thread::sleep(Duration::from_millis(20));
            c.len() as u64
        });
        let mut pool = builder(&guard)
            .workers(1)
            .queue_bytes(1)
            .build(task)
            .unwrap();
        let (tx, rx) = pool.stream();
        let mut accepted = 0;
        let full = loop {
            match tx.try_send(&chunk(1)).unwrap() {
                Some(_) => accepted += 1,
                None => break true,
            }
            assert!(accepted < 10_000, "never full");
        };
        assert!(full && accepted >= 2, "{accepted}");
        assert!(
            tx.send_timeout(&chunk(1), Duration::ZERO)
                .unwrap()
                .is_none()
        );
        // A blocking send gets through once the worker finishes an item.
        let seq = tx.send_timeout(&chunk(1), Duration::from_secs(10)).unwrap();
        assert!(seq.is_some());
        drop(tx);
        let n = std::iter::from_fn(|| rx.recv())
            .inspect(|r| assert!(r.is_ok(), "{r:?}"))
            .count();
        assert_eq!(n, accepted + 1);
    }
    assert_no_children();
}

#[test]
fn item_errors_arrive_in_place_and_a_gone_receiver_stops_the_sender() {
    let guard = serial();
    {
        let task = shmexec::try_from_fn::<Vec<u32>, _, _>(|c| {
            if c.len() == 3 {
                Err("three is bad".into())
            } else {
                Ok(c.len() as u64)
            }
        });
        let mut pool = builder(&guard)
            .workers(2)
            .ring_bytes(1 << 16)
            .build(task)
            .unwrap();
        let (tx, rx) = pool.stream();
        tx.send(&vec![1; 2]).unwrap();
        tx.send(&vec![1; 3]).unwrap();
        tx.send(&vec![1; 1 << 20]).unwrap(); // larger than a 64 KiB ring
        tx.send(&vec![1; 5]).unwrap();
        assert_eq!(rx.recv().unwrap().unwrap().to_native(), 2);
        assert!(matches!(rx.recv(), Some(Err(Error::Task { .. }))));
        assert!(matches!(rx.recv(), Some(Err(Error::InputTooLarge { .. }))));
        assert_eq!(rx.recv().unwrap().unwrap().to_native(), 5);
        drop(rx);
        assert!(matches!(tx.send(&vec![1; 2]), Err(Error::StreamClosed)));
    }
    assert_no_children();
}

#[test]
fn owned_halves_run_on_plain_threads_and_shut_the_pool_down() {
    let guard = serial();
    {
        let pool: Pool<_> = builder(&guard).workers(2).build(sum_task()).unwrap();
        let pids = pool.pids();
        let (tx, rx) = pool.into_stream();
        let producer = std::thread::spawn(move || {
            for i in 0..200 {
                tx.send(&chunk(i)).unwrap();
            }
        });
        let consumer =
            std::thread::spawn(move || rx.map(|r| r.unwrap().to_native()).collect::<Vec<_>>());
        producer.join().unwrap();
        let got = consumer.join().unwrap();
        assert_eq!(got, (0..200).map(expected).collect::<Vec<_>>());
        // Both halves are gone, so is the pool: its workers were reaped.
        for pid in pids {
            assert!(
                rustix::process::test_kill_process(rustix::process::Pid::from_raw(pid).unwrap())
                    .is_err()
            );
        }
    }
    assert_no_children();
}

#[test]
fn a_live_source_writes_chunks_in_place_with_their_time_range() {
    let guard = serial();
    {
        // The task sums the samples and returns the chunk's time range with the sum.
        let task = shmexec::from_fn::<(Vec<i16>, (u64, u64)), _, _>(|c| {
            let sum: i64 = c.0.samples().iter().map(|&s| s as i64).sum();
            (c.1.0.to_native(), c.1.1.to_native(), sum)
        });
        let mut pool = builder(&guard).workers(2).build(task).unwrap();
        let (tx, rx) = pool.stream();
        for i in 0..100u64 {
            let range = (i * 1000, (i + 1) * 1000);
            tx.send_in_place(4096 + i as usize, &range, |s: &mut [i16]| {
                s.fill(i as i16);
                Ok(())
            })
            .unwrap();
        }
        // A source that fails to fill its slot: that item's error, in its place.
        tx.send_in_place(16, &(0u64, 0u64), |_: &mut [i16]| {
            Err("digitizer timeout".into())
        })
        .unwrap();
        drop(tx);
        for i in 0..100u64 {
            let out = rx.recv().unwrap().unwrap();
            let want = (i * 1000, (i + 1) * 1000, (4096 + i as i64) * i as i64);
            assert_eq!(out.deserialize().unwrap(), want);
        }
        match rx.recv() {
            Some(Err(Error::Encode { reason, .. })) => {
                assert!(reason.contains("digitizer"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert!(rx.recv().is_none());
        drop(rx);
        // Written in place: the coordinator copied nothing.
        assert_eq!(pool.stats().input_bytes_copied, 0);
    }
    assert_no_children();
}
