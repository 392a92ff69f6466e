//! Settings are checked: a value outside its documented range is an `InvalidArgument` from
//! `build` that names the setting and its range, and no size or duration a caller passes (to
//! the builder, to a call, to shm's constructors) overflows, panics or truncates a chunk.

mod support;

use std::time::Duration;

use shmexec::shm::{Ring, Segment};
use shmexec::{Builder, Error, Samples};
use support::{assert_no_children, builder, serial};

/// Builds with `settings` applied and returns the `InvalidArgument` message.
fn refused(settings: impl FnOnce(Builder) -> Builder) -> String {
    let guard = serial();
    let task = shmexec::from_fn::<u64, _, _>(|&n| n.to_native());
    let r = settings(builder(&guard).workers(1)).build(task);
    let message = match r {
        Err(Error::InvalidArgument(message)) => message,
        Err(other) => panic!("expected InvalidArgument, got {other}"),
        Ok(_) => panic!("expected InvalidArgument, the pool was built"),
    };
    assert_no_children();
    message
}

#[test]
fn ring_sizes_outside_4_kib_to_1_tib_are_refused() {
    assert_eq!(
        refused(|b| b.ring_bytes(usize::MAX)),
        "ring_bytes is 18446744073709551615; it must be between 4 KiB and 1 TiB"
    );
    assert_eq!(
        refused(|b| b.ring_bytes(4095)),
        "ring_bytes is 4095; it must be between 4 KiB and 1 TiB"
    );
    assert_eq!(
        refused(|b| b.input_ring_bytes((1 << 40) + 1)),
        "input_ring_bytes is 1099511627777; it must be between 4 KiB and 1 TiB"
    );
    assert_eq!(
        refused(|b| b.output_ring_bytes(0)),
        "output_ring_bytes is 0; it must be between 4 KiB and 1 TiB"
    );
}

#[test]
fn worker_counts_outside_1_to_4096_are_refused() {
    assert_eq!(
        refused(|b| b.workers(1 << 40)),
        "workers is 1099511627776; it must be between 1 and 4096"
    );
    assert_eq!(
        refused(|b| b.workers(4097)),
        "workers is 4097; it must be between 1 and 4096"
    );
    assert_eq!(
        refused(|b| b.workers(0)),
        "workers is 0; it must be between 1 and 4096"
    );
}

#[test]
fn timeouts_past_a_year_or_zero_where_zero_means_nothing_are_refused() {
    let m = refused(|b| b.start_timeout(Duration::MAX));
    assert!(
        m.starts_with("start_timeout is ") && m.ends_with("it must be between 1 ms and one year"),
        "{m}"
    );
    assert_eq!(
        refused(|b| b.start_timeout(Duration::ZERO)),
        "start_timeout is 0ns; it must be between 1 ms and one year"
    );
    let m = refused(|b| b.shutdown_timeout(Duration::MAX));
    assert!(
        m.starts_with("shutdown_timeout is ") && m.ends_with("it must be at most one year"),
        "{m}"
    );
    assert_eq!(
        refused(|b| b.chunk_timeout(Duration::ZERO)),
        "chunk_timeout is 0ns; it must be between 1 ms and one year"
    );
    let m = refused(|b| b.chunk_timeout(Duration::from_secs(400 * 86_400)));
    assert!(m.starts_with("chunk_timeout is 34560000s"), "{m}");
}

#[test]
fn attempts_queue_and_shared_sizes_outside_their_ranges_are_refused() {
    assert_eq!(
        refused(|b| b.max_attempts(0)),
        "max_attempts is 0; it must be between 1 and 1000"
    );
    assert_eq!(
        refused(|b| b.max_attempts(u32::MAX)),
        "max_attempts is 4294967295; it must be between 1 and 1000"
    );
    assert_eq!(
        refused(|b| b.queue_bytes(0)),
        "queue_bytes is 0; it must be between 1 byte and 1 TiB"
    );
    assert_eq!(
        refused(|b| b.queue_bytes(usize::MAX)),
        "queue_bytes is 18446744073709551615; it must be between 1 byte and 1 TiB"
    );
    assert_eq!(
        refused(|b| b.shared_bytes(usize::MAX)),
        "shared_bytes is 18446744073709551615; it must be at most 64 TiB (0: no region)"
    );
    assert!(refused(|b| b.spawn("")).starts_with("spawn's task name is \"\""));
    assert!(refused(|b| b.spawn("a\0b")).contains("NUL"));
}

#[test]
fn the_edges_of_each_range_build_and_run() {
    let guard = serial();
    {
        let task = shmexec::from_fn::<u64, _, _>(|&n| n.to_native() * 3);
        let year = Duration::from_secs(365 * 86_400);
        let mut pool = builder(&guard)
            .workers(2)
            .ring_bytes(4 << 10)
            .queue_bytes(1 << 40)
            .start_timeout(year)
            .shutdown_timeout(Duration::ZERO)
            .chunk_timeout(year)
            .max_attempts(1000)
            .build(task)
            .expect("a pool at the edges of every range");
        let out: Vec<u64> = pool
            .map(0..500u64)
            .map(|r| r.expect("a result").to_native())
            .collect();
        assert_eq!(out, (0..500u64).map(|n| n * 3).collect::<Vec<_>>());
    }
    assert_no_children();
}

#[test]
fn ring_sizes_that_are_not_multiples_of_a_page_build_and_run() {
    let guard = serial();
    {
        for (input, output) in [(5000, 4096), (4096 + 64, 70_001), (1 << 20 | 1, 12_345)] {
            let task = shmexec::from_fn::<u64, _, _>(|&n| vec![n.to_native(); 100]);
            let mut pool = builder(&guard)
                .workers(2)
                .input_ring_bytes(input)
                .output_ring_bytes(output)
                .build(task)
                .unwrap_or_else(|e| panic!("rings of {input} and {output} bytes: {e}"));
            let sums: Vec<u64> = pool
                .map(0..300u64)
                .map(|r| r.unwrap().iter().map(|x| x.to_native()).sum())
                .collect();
            assert_eq!(sums, (0..300u64).map(|n| n * 100).collect::<Vec<_>>());
        }
    }
    assert_no_children();
}

#[test]
fn in_place_lengths_too_large_for_an_archive_are_item_errors() {
    let guard = serial();
    {
        let task = shmexec::from_fn::<Vec<u32>, _, _>(|c| c.samples().len() as u64);
        let mut pool = builder(&guard).workers(1).build(task).unwrap();
        // Bytes that overflow a usize, all of a usize, and just over what rkyv's 32-bit
        // offsets address (the size a large enough ring would take, and rkyv refuse).
        let huge = [usize::MAX / 2, usize::MAX, (1 << 29) + 1];
        let lens = [huge[0], 3, huge[1], 5, huge[2], 7];
        let results: Vec<_> = pool
            .map_in_place(lens, |_, s: &mut [u32]| {
                s.fill(1);
                Ok(())
            })
            .collect();
        assert_eq!(results.len(), lens.len());
        for (i, r) in results.into_iter().enumerate() {
            match (lens[i], r) {
                (len, Err(Error::Encode { seq, reason })) if huge.contains(&len) => {
                    assert_eq!(seq, i as u64);
                    assert!(
                        reason.contains(&format!("{len} samples")) && reason.contains("split"),
                        "{reason}"
                    );
                }
                (len, Ok(o)) if !huge.contains(&len) => assert_eq!(o.to_native(), len as u64),
                (len, other) => panic!("item {i} of {len} samples: {other:?}"),
            }
        }
    }
    assert_no_children();
}

#[test]
fn a_serialized_input_past_what_an_archive_addresses_is_an_item_error() {
    let guard = serial();
    {
        let task = shmexec::from_fn::<Vec<u8>, _, _>(|c| c.len() as u64);
        let mut pool = builder(&guard).workers(1).build(task).unwrap();
        // Zeroed pages that nothing touches: serializing only counts its bytes.
        let big = vec![0u8; 1 << 31];
        let small = vec![1u8; 10];
        let results: Vec<_> = pool.map([&big, &small]).collect();
        match &results[0] {
            Err(Error::Encode { seq: 0, reason }) => assert!(reason.contains("split"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(results[1].as_ref().unwrap().to_native(), 10);
    }
    assert_no_children();
}

#[test]
fn send_in_place_of_impossible_lengths_is_an_item_error_and_the_stream_goes_on() {
    let guard = serial();
    {
        let task = shmexec::from_fn::<(Vec<i16>, u64), _, _>(|c| {
            c.0.samples().len() as u64 + c.1.to_native()
        });
        let mut pool = builder(&guard).workers(1).build(task).unwrap();
        let (tx, rx) = pool.stream();
        let fill = |s: &mut [i16]| -> Result<(), shmexec::BoxError> {
            s.fill(2);
            Ok(())
        };
        assert_eq!(tx.send_in_place(usize::MAX, &1u64, fill).unwrap(), 0);
        assert_eq!(tx.send_in_place(1 << 30, &2u64, fill).unwrap(), 1);
        assert_eq!(tx.send_in_place(4, &3u64, fill).unwrap(), 2);
        // A timeout past the clock's range waits as `send` does.
        assert_eq!(
            tx.send_timeout(&(vec![1; 2], 4), Duration::MAX).unwrap(),
            Some(3)
        );
        drop(tx);
        for (seq, len) in [(0u64, usize::MAX), (1, 1 << 30)] {
            match rx.recv() {
                Some(Err(Error::Encode { seq: s, reason })) => {
                    assert_eq!(s, seq);
                    assert!(reason.contains(&format!("{len} samples")), "{reason}");
                }
                other => panic!("{other:?}"),
            }
        }
        let std::task::Poll::Ready(Some(Ok(o))) = rx.recv_timeout(Duration::MAX) else {
            panic!("the third item's result")
        };
        assert_eq!(o.to_native(), 7);
        assert_eq!(rx.recv().unwrap().unwrap().to_native(), 6);
        assert!(rx.recv().is_none());
    }
    assert_no_children();
}

#[test]
fn shm_constructors_refuse_impossible_sizes() {
    assert_eq!(Ring::footprint(usize::MAX), usize::MAX);
    for cap in [usize::MAX, usize::MAX - 10, (1 << 62) + 1] {
        let e = Ring::create(cap).unwrap_err();
        assert!(
            matches!(e, shmexec::shm::Error::InvalidArgument { .. }),
            "{cap}: {e}"
        );
        let seg = std::sync::Arc::new(Segment::new(1 << 16).unwrap());
        let e = Ring::init_in(seg, 0, cap).unwrap_err();
        assert!(
            matches!(e, shmexec::shm::Error::InvalidArgument { .. }),
            "{cap}: {e}"
        );
    }
    assert!(Segment::new(usize::MAX).is_err());
}

#[test]
fn waiting_on_a_child_for_ever_is_a_wait_not_a_panic() {
    let guard = serial();
    // SAFETY: the caller holds the fork lock (see `support::builder`): no other thread of this
    // test binary holds a lock the child takes, and the child takes none (it returns at once).
    let mut child = unsafe { shmexec::shm::fork_unchecked(|| 7) }.unwrap();
    assert!(child.exits_within(Duration::MAX));
    assert_eq!(
        child.wait_timeout(Duration::MAX).unwrap(),
        Some(shmexec::shm::ExitStatus::Exited(7))
    );
    drop(guard);
}
