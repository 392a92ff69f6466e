//! Streams that own their pool give it back (`StreamReceiver::into_pool`), sends that do not
//! wait (`try_send_in_place`), and waits for room that end (`wait_for_room`): what a binding
//! that drives a pool from another language's loop builds on.

use std::time::Duration;

use shmexec::{Error, Samples};

mod support;

fn len_task() -> impl shmexec::Task<Input = (Vec<u8>, ()), Output = u64> {
    shmexec::from_fn::<(Vec<u8>, ()), _, _>(|c| {
        std::thread::sleep(Duration::from_millis(2));
        c.0.samples().iter().map(|&b| b as u64).sum::<u64>()
    })
}

#[test]
fn an_owned_stream_gives_its_pool_back() {
    let serial = support::serial();
    let pool = support::builder(&serial)
        .ring_bytes(8 << 20)
        .workers(2)
        .build(len_task())
        .unwrap();
    let pids = pool.pids();
    let (tx, rx) = pool.into_stream();
    for i in 0..10u8 {
        tx.send_in_place::<u8, ()>(100, &(), |b| {
            b.fill(i);
            Ok(())
        })
        .unwrap();
    }
    // While the sender lives the pool cannot come back: the receiver is returned intact.
    let Err(rx) = rx.into_pool() else {
        panic!("the sender still lives: the pool cannot come back yet");
    };
    assert_eq!(rx.recv().unwrap().unwrap().to_native(), 0);
    drop(tx);
    let mut pool = rx.into_pool().ok().expect("the sender is gone");
    // The same workers, and the results still in flight were discarded, not handed to the
    // next call.
    assert_eq!(pool.pids(), pids);
    let sums: Vec<u64> = pool
        .map(vec![(vec![1u8; 7], ()), (vec![2u8; 3], ())])
        .map(|r| r.unwrap().to_native())
        .collect();
    assert_eq!(sums, vec![7, 6]);
    // Unordered owned streams too.
    let (tx, rx) = pool.into_stream_unordered();
    tx.try_send_in_place::<u8, ()>(4, &(), |b| {
        b.fill(5);
        Ok(())
    })
    .unwrap()
    .expect("an idle pool has room");
    drop(tx);
    assert_eq!(rx.recv().unwrap().unwrap().to_native(), 20);
    assert!(rx.recv().is_none());
    assert!(rx.into_pool().is_ok());
}

#[test]
fn try_send_in_place_does_not_wait_and_wait_for_room_ends() {
    let task = shmexec::from_fn::<(Vec<u8>, ()), _, _>(|c| {
        std::thread::sleep(Duration::from_millis(300));
        c.0.samples().len() as u64
    });
    let serial = support::serial();
    let pool = support::builder(&serial)
        .ring_bytes(8 << 20)
        .workers(1)
        .queue_bytes(64 << 10)
        .build(task)
        .unwrap();
    let (tx, rx) = pool.into_stream();
    let mut placed = 0;
    let mut filled = 0;
    while tx
        .try_send_in_place::<u8, ()>(60 << 10, &(), |_| {
            filled += 1;
            Ok(())
        })
        .unwrap()
        .is_some()
    {
        placed += 1;
        assert!(
            placed < 100,
            "a queue of 64 KiB takes a few 60 KiB items, not 100"
        );
    }
    // The refused send did not run its fill.
    assert_eq!(filled, placed);
    assert!(
        !tx.wait_for_room(60 << 10, Duration::from_millis(20))
            .unwrap()
    );
    assert!(tx.wait_for_room(60 << 10, Duration::from_secs(10)).unwrap());
    drop(tx);
    assert_eq!(rx.count(), placed);
}

#[test]
fn waiting_for_room_behind_held_results_is_an_error() {
    let task = shmexec::from_fn::<(Vec<u8>, ()), _, _>(|c| c.0.samples().to_vec());
    let serial = support::serial();
    let mut pool = support::builder(&serial)
        .workers(1)
        .ring_bytes(1 << 20)
        .build(task)
        .unwrap();
    // An earlier call's results, kept: they fill the worker's output ring.
    let mut held = Vec::new();
    for r in pool.map(vec![(vec![1u8; 100 << 10], ()); 40]) {
        match r {
            Ok(out) => held.push(out),
            Err(Error::OutputsHeld { .. }) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(!held.is_empty());
    let (tx, rx) = pool.into_stream();
    let mut sent = 0;
    let outcome = loop {
        match tx.try_send_in_place::<u8, ()>(100 << 10, &(), |_| Ok(())) {
            Ok(Some(_)) => {
                sent += 1;
                assert!(sent < 100);
                continue;
            }
            Ok(None) => {}
            Err(e) => panic!("{e}"),
        }
        match tx.wait_for_room(100 << 10, Duration::from_secs(2)) {
            Ok(true) => continue,
            other => break other,
        }
    };
    if sent == 0 {
        // Nothing of this stream in flight: the sender is told.
        assert!(
            matches!(outcome, Err(Error::OutputsHeld { .. })),
            "{outcome:?}"
        );
    } else {
        // Its first items queued behind the held results: the receiver is told.
        assert!(matches!(outcome, Ok(false)), "{outcome:?}");
        let got = rx.recv_timeout(Duration::from_secs(10));
        assert!(
            matches!(
                got,
                std::task::Poll::Ready(Some(Err(Error::OutputsHeld { .. })))
            ),
            "{:?}",
            got.map(|r| r.map(|r| r.map(|o| o.seq())))
        );
    }
    // Dropping the held results lets both go on.
    drop(held);
    drop(tx);
    let results: Vec<_> = rx.map(|r| r.unwrap().deserialize().unwrap()).collect();
    assert_eq!(results.len(), sent);
}
