//! The ring between real processes: a forked child on the other end of real shared memory,
//! real SIGKILLs. Every test takes `support::serial()` first (see `support/mod.rs`) and ends by
//! checking that no child outlived it.

mod support;

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use shmexec_shm::{Error, ExitStatus, FrameKind, Peer, Ring, Segment, WaitStrategy};
use support::{assert_no_children, serial, spawn, stream};

const LONG: Duration = Duration::from_secs(60);

/// A few `AtomicU32` flags in their own shared segment, for staging a test across the fork.
struct Flags {
    seg: Arc<Segment>,
}

impl Flags {
    fn new() -> Flags {
        Flags {
            seg: Arc::new(Segment::new(4096).unwrap()),
        }
    }

    fn get(&self, i: usize) -> &AtomicU32 {
        self.seg
            .atomic_u32(4 * i)
            .expect("flag index inside the segment")
    }

    /// Waits (sleeping) until flag `i` is non-zero; false after `timeout`.
    fn wait(&self, i: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.get(i).load(Ordering::Acquire) == 0 {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }
}

fn suicide_after(delay: Duration) -> ! {
    std::thread::sleep(delay);
    let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    unreachable!("SIGKILL cannot be caught")
}

#[test]
fn hundred_thousand_log_uniform_frames_arrive_checked_and_in_order() {
    let guard = serial();
    let frames = 100_000;
    let (summary, _) = stream::run(frames, 0x5eed, 8 << 20, |f| spawn(&guard, f), |_| ()).unwrap();
    assert_eq!(summary.frames, frames);
    assert_eq!(summary.misordered, 0);
    assert_eq!(summary.corrupt, 0);
    assert!(summary.checksum_ok, "{summary:?}");
    // Log-uniform sizes: most frames small, some close to 1 MiB.
    assert!(summary.bytes > frames * 1000, "{summary:?}");
    assert_no_children();
}

#[test]
fn full_ring_blocks_the_producer_until_the_consumer_drains_it() {
    let guard = serial();
    let ring = Ring::create(64 << 10).unwrap();
    let flags = Flags::new();
    const GO: usize = 0;
    const DRAINING: usize = 1;
    const FRAME: usize = 4000;
    let parent = std::process::id() as i32;
    let child_ring = ring.clone();
    let child_flags = Flags {
        seg: flags.seg.clone(),
    };
    let mut child = spawn(&guard, move || {
        let mut rx = child_ring.consumer(Peer::process(parent).unwrap()).unwrap();
        if !child_flags.wait(GO, LONG) {
            return 10;
        }
        child_flags.get(DRAINING).store(1, Ordering::Release);
        let mut n = 0;
        loop {
            let f = rx.peek_timeout(LONG).unwrap();
            if f.kind() == FrameKind::End {
                return if n > 0 { 0 } else { 11 };
            }
            if f.len() != FRAME || f.iter().any(|&b| b != f.seq() as u8) {
                return 12;
            }
            n += 1;
            f.release();
        }
    })
    .unwrap();

    let mut tx = ring.producer(child.peer().unwrap()).unwrap();
    let mut queued = 0u64;
    loop {
        let seq = tx.next_seq();
        let Some(mut g) = tx.try_reserve(FRAME).unwrap() else {
            break;
        };
        g.fill(seq as u8);
        g.commit();
        queued += 1;
    }
    // The ring is full.
    assert!(
        queued >= 10,
        "only {queued} frames of {FRAME} B fit in 64 KiB"
    );
    assert!(tx.try_reserve(FRAME).unwrap().is_none());
    assert!(matches!(
        tx.reserve_timeout(FRAME, Duration::from_millis(50)),
        Err(Error::Timeout { .. })
    ));
    assert_eq!(flags.get(DRAINING).load(Ordering::Acquire), 0);

    flags.get(GO).store(1, Ordering::Release);
    // Blocks until the consumer frees a frame, then succeeds.
    let seq = tx.next_seq();
    let mut g = tx.reserve_timeout(FRAME, LONG).unwrap();
    assert_eq!(
        flags.get(DRAINING).load(Ordering::Acquire),
        1,
        "space appeared before the consumer started draining"
    );
    g.fill(seq as u8);
    g.commit();
    tx.send_end().unwrap();
    assert_eq!(
        child.wait_timeout(LONG).unwrap(),
        Some(ExitStatus::Exited(0))
    );
    assert_no_children();
}

#[test]
fn a_blocked_producer_sees_its_killed_consumer_before_the_deadline() {
    let guard = serial();
    for strategy in [
        WaitStrategy::Spin,
        WaitStrategy::Park,
        WaitStrategy::Adaptive,
    ] {
        let ring = Ring::create(8192).unwrap();
        let flags = Flags::new();
        let (child_ring, child_flags) = (
            ring.clone(),
            Flags {
                seg: flags.seg.clone(),
            },
        );
        let mut child = spawn(&guard, move || {
            let _rx = child_ring.consumer(Peer::unwatched()).unwrap();
            child_flags.get(0).store(1, Ordering::Release);
            suicide_after(Duration::from_millis(100))
        })
        .unwrap();
        assert!(flags.wait(0, LONG));
        let mut tx = ring.producer(child.peer().unwrap()).unwrap();
        tx.set_wait_strategy(strategy);
        while tx.try_reserve(1000).unwrap().is_some_and(|g| {
            g.commit();
            true
        }) {}
        let deadline = Duration::from_secs(20);
        let started = Instant::now();
        let err = tx.reserve_timeout(1000, deadline).unwrap_err();
        assert!(
            matches!(err, Error::PeerGone { pid: Some(_) }),
            "{strategy:?}: {err}"
        );
        assert!(started.elapsed() < deadline);
        assert_eq!(
            child.wait_timeout(LONG).unwrap(),
            Some(ExitStatus::Signaled(libc_sigkill()))
        );
    }
    assert_no_children();
}

fn libc_sigkill() -> i32 {
    rustix::process::Signal::KILL.as_raw()
}

#[test]
fn a_waiting_consumer_gets_every_frame_of_a_killed_producer_then_an_error() {
    let guard = serial();
    for strategy in [
        WaitStrategy::Spin,
        WaitStrategy::Park,
        WaitStrategy::Adaptive,
    ] {
        let ring = Ring::create(1 << 16).unwrap();
        let child_ring = ring.clone();
        let mut child = spawn(&guard, move || {
            let mut tx = child_ring.producer(Peer::unwatched()).unwrap();
            for i in 0..3u8 {
                tx.send(&[i; 100]).unwrap();
            }
            suicide_after(Duration::from_millis(100))
        })
        .unwrap();
        let mut rx = ring.consumer(child.peer().unwrap()).unwrap();
        rx.set_wait_strategy(strategy);
        for i in 0..3u8 {
            let f = rx.peek_timeout(LONG).unwrap();
            assert_eq!(&*f, &[i; 100]);
            f.release();
        }
        let deadline = Duration::from_secs(20);
        let started = Instant::now();
        let err = rx.peek_timeout(deadline).unwrap_err();
        assert!(matches!(err, Error::PeerGone { .. }), "{strategy:?}: {err}");
        assert!(started.elapsed() < deadline);
        assert!(!child.is_alive());
        child.wait_timeout(LONG).unwrap().unwrap();
    }
    assert_no_children();
}

#[test]
fn too_large_frames_and_impossible_segments_are_errors() {
    let guard = serial();
    let ring = Ring::create(1 << 16).unwrap();
    // No consumer at all: an impossible frame must fail at once, not wait for space.
    let mut tx = ring.producer(Peer::unwatched()).unwrap();
    let err = tx.reserve(ring.max_payload() + 1).unwrap_err();
    assert!(
        matches!(err, Error::FrameTooLarge { max, .. } if max == ring.max_payload()),
        "{err}"
    );
    assert!(err.to_string().contains("larger than the ring"));
    assert!(tx.reserve(ring.max_payload()).is_ok());

    let err = Segment::new(1 << 60).unwrap_err();
    assert!(matches!(err, Error::OutOfMemory { .. }), "{err}");
    assert!(matches!(
        Segment::new(0),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        Ring::create(1 << 60),
        Err(Error::OutOfMemory { .. })
    ));
    assert!(matches!(
        Ring::create(64),
        Err(Error::InvalidArgument { .. })
    ));
    drop(guard);
}

#[test]
fn no_file_appears_in_dev_shm() {
    let guard = serial();
    let before = support::dev_shm_listing();
    {
        let rings: Vec<Ring> = (0..4).map(|_| Ring::create(1 << 20).unwrap()).collect();
        let child_rings = rings.clone();
        let mut child = spawn(&guard, move || {
            let mut tx = child_rings[0].producer(Peer::unwatched()).unwrap();
            tx.send(b"hello").map(|_| 0).unwrap_or(1)
        })
        .unwrap();
        let mut rx = rings[0].consumer(child.peer().unwrap()).unwrap();
        assert_eq!(&*rx.peek_timeout(LONG).unwrap(), b"hello");
        assert!(child.wait_timeout(LONG).unwrap().unwrap().success());
        assert_eq!(support::dev_shm_listing(), before, "while the rings exist");
    }
    assert_eq!(
        support::dev_shm_listing(),
        before,
        "after the rings are dropped"
    );
    assert_no_children();
}

#[test]
fn a_segment_reopened_from_its_descriptor_shares_the_bytes() {
    let guard = serial();
    let ring = Ring::create(4096).unwrap();
    let fd = ring.segment().fd().try_clone_to_owned().unwrap();
    let mut child = spawn(&guard, move || {
        // What a re-executed child does with an inherited descriptor.
        let seg = Arc::new(Segment::from_fd(fd).unwrap());
        let ring = Ring::attach(seg, 0).unwrap();
        let mut tx = ring.producer(Peer::unwatched()).unwrap();
        tx.send(b"via fd").map(|_| 0).unwrap_or(1)
    })
    .unwrap();
    let mut rx = ring.consumer(child.peer().unwrap()).unwrap();
    assert_eq!(&*rx.peek_timeout(LONG).unwrap(), b"via fd");
    assert!(child.wait_timeout(LONG).unwrap().unwrap().success());
    assert!(ring.segment().fd().as_fd().try_clone_to_owned().is_ok());
    assert_no_children();
}

#[test]
fn fork_refuses_a_multi_threaded_process() {
    let _guard = serial();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let t = std::thread::spawn(move || rx.recv());
    let err = shmexec_shm::fork(|| 0).unwrap_err();
    assert!(
        matches!(err, Error::MultiThreaded { threads } if threads >= 2),
        "{err}"
    );
    tx.send(()).unwrap();
    t.join().unwrap().unwrap();
    assert_no_children();
}

#[test]
fn ping_pong_crosses_processes_in_every_wait_strategy() {
    let guard = serial();
    for strategy in [
        WaitStrategy::Spin,
        WaitStrategy::Park,
        WaitStrategy::Adaptive,
    ] {
        let (down, up) = (
            Ring::create(1 << 14).unwrap(),
            Ring::create(1 << 14).unwrap(),
        );
        let (d, u) = (down.clone(), up.clone());
        let parent = std::process::id() as i32;
        let mut child = spawn(&guard, move || {
            let mut rx = d.consumer(Peer::process(parent).unwrap()).unwrap();
            let mut tx = u.producer(Peer::process(parent).unwrap()).unwrap();
            rx.set_wait_strategy(strategy);
            tx.set_wait_strategy(strategy);
            loop {
                let f = match rx.peek_timeout(LONG) {
                    Ok(f) => f,
                    Err(Error::Closed) => return 0,
                    Err(_) => return 20,
                };
                // Answer with the payload's bytes incremented, under the same sequence number.
                let Ok(mut g) = tx.reserve_timeout(f.len(), LONG) else {
                    return 21;
                };
                for (out, inp) in g.iter_mut().zip(f.iter()) {
                    *out = inp.wrapping_add(1);
                }
                g.set_seq(f.seq());
                g.commit();
                f.release();
            }
        })
        .unwrap();
        let mut tx = down.producer(child.peer().unwrap()).unwrap();
        let mut rx = up.consumer(child.peer().unwrap()).unwrap();
        tx.set_wait_strategy(strategy);
        rx.set_wait_strategy(strategy);
        for i in 0..2000u64 {
            let len = (i as usize * 13) % 300;
            let mut g = tx.reserve_timeout(len, LONG).unwrap();
            g.fill(i as u8);
            g.commit();
            let reply = rx.peek_timeout(LONG).unwrap();
            assert_eq!(reply.seq(), i, "{strategy:?}");
            assert_eq!(reply.len(), len);
            assert!(
                reply.iter().all(|&b| b == (i as u8).wrapping_add(1)),
                "{strategy:?} round {i}"
            );
            reply.release();
        }
        drop(tx); // the child sees Closed and exits 0
        assert_eq!(
            child.wait_timeout(LONG).unwrap(),
            Some(ExitStatus::Exited(0)),
            "{strategy:?}"
        );
    }
    assert_no_children();
}
