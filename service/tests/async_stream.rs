//! The async stream halves on tokio: every result once and in order, a receiver awaiting an
//! idle source, backpressure through the `Sink` and `Stream` traits, a gone receiver, halves
//! dropped while their watchers wait.
//!
//! Building a pool forks, and a runtime has threads: each test builds its pool first, holding
//! [`serial`], and only then starts its runtime, which is gone before the guard is.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_core::Stream;
use futures_sink::Sink;
use shmexec::{Builder, Error, Pool, Samples, Task};
use tokio::runtime::Runtime;

static FORK_LOCK: Mutex<()> = Mutex::new(());

/// Serialises the pool-building tests of this binary. Hold the guard for the whole test.
fn serial() -> MutexGuard<'static, ()> {
    FORK_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A builder that may fork in the test harness, with small rings (full rings get covered).
fn builder(_serial: &MutexGuard<'static, ()>) -> Builder {
    // SAFETY: the caller holds FORK_LOCK: every other test thread of this binary is blocked on
    // it, no runtime or watcher thread of another test is left (each is gone before its test
    // lets go of the lock), and libtest's main thread waits on its result channel, so no
    // thread holds a lock the workers take while `build` forks.
    unsafe { Pool::builder().allow_threads() }.ring_bytes(1 << 20)
}

/// Asserts that this process has no child left: the pool went with its last half.
fn assert_no_children() {
    let r = rustix::process::waitpid(None, rustix::process::WaitOptions::NOHANG);
    assert!(
        matches!(r, Err(rustix::io::Errno::CHILD)),
        "a child process outlived its test: waitpid says {r:?}"
    );
}

fn sum_task() -> impl Task<Input = Vec<u32>, Output = u64> + Send + 'static {
    shmexec::from_fn::<Vec<u32>, _, _>(|c| c.samples().iter().map(|&x| x as u64).sum::<u64>())
}

fn chunk(i: u32, len: u32) -> Vec<u32> {
    (0..len + (i % 7) * 100).map(|k| k ^ i).collect()
}

fn expected(i: u32, len: u32) -> u64 {
    chunk(i, len).iter().map(|&x| x as u64).sum()
}

/// A runtime on the test's own thread: a half that blocked it would stall the other half.
fn current_thread() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

/// Checks `(seq, value)` pairs: consecutive sequence numbers, chunk `i`'s sum at place `i`.
fn check_in_order(got: &[(u64, u64)], n: u32, len: u32) {
    assert_eq!(got.len(), n as usize, "one result per input");
    let first = got[0].0;
    for (i, &(seq, value)) in got.iter().enumerate() {
        assert_eq!(seq, first + i as u64, "result {i} out of order");
        assert_eq!(value, expected(i as u32, len), "result {i} wrong");
    }
}

/// CPU time this process has used, user and system, from /proc/self/stat.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name, which is in parentheses: utime and stime are the 12th and
    // 13th, in clock ticks (100 a second on Linux).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

#[test]
fn every_result_arrives_once_in_order() {
    let guard = serial();
    {
        let pool = builder(&guard).workers(2).build(sum_task()).unwrap();
        let (mut tx, mut rx) = pool.into_async_stream();
        let got = current_thread().block_on(async move {
            let producer = tokio::spawn(async move {
                for i in 0..300 {
                    tx.send(chunk(i, 1000)).await.unwrap();
                }
                tx.close().await.unwrap();
            });
            let mut got = Vec::new();
            while let Some(r) = rx.recv().await {
                let out = r.unwrap();
                got.push((out.seq(), out.to_native()));
            }
            producer.await.unwrap();
            got
        });
        check_in_order(&got, 300, 1000);
    }
    assert_no_children();
}

#[test]
fn a_receiver_awaiting_an_idle_source_neither_hangs_nor_spins() {
    const IDLE: Duration = Duration::from_secs(1);
    let guard = serial();
    {
        let pool = builder(&guard).workers(2).build(sum_task()).unwrap();
        let (mut tx, mut rx) = pool.into_async_stream();
        let (waited, cpu, got) = current_thread().block_on(async move {
            let producer = tokio::spawn(async move {
                tokio::time::sleep(IDLE).await;
                for i in 0..20 {
                    tx.send(chunk(i, 1000)).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                tx.close().await.unwrap();
            });
            let (t0, cpu0) = (Instant::now(), cpu_time());
            let first = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .expect("the receiver hung")
                .expect("a result")
                .unwrap();
            let (waited, cpu) = (t0.elapsed(), cpu_time() - cpu0);
            let mut got = vec![(first.seq(), first.to_native())];
            drop(first);
            while let Some(r) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .expect("the receiver hung")
            {
                let out = r.unwrap();
                got.push((out.seq(), out.to_native()));
            }
            producer.await.unwrap();
            (waited, cpu, got)
        });
        check_in_order(&got, 20, 1000);
        assert!(waited >= IDLE, "a result before any input: {waited:?}");
        // Waiting costs the watcher a doorbell wait per slice; a poll loop would cost a core.
        assert!(
            cpu < waited / 10,
            "{cpu:?} of CPU time while awaiting an idle source for {waited:?}"
        );
    }
    assert_no_children();
}

#[test]
fn backpressure_through_the_sink_and_stream_traits() {
    // 400 KB chunks: two fill a worker's 1 MiB input ring, and each takes its worker 2 ms, so
    // a sender that sends as fast as it can has to wait for room (whatever the host's speed).
    const N: u32 = 60;
    const LEN: u32 = 100_000;
    let guard = serial();
    {
        let slow = shmexec::from_fn::<Vec<u32>, _, _>(|c| {
            std::thread::sleep(Duration::from_millis(2));
            c.samples().iter().map(|&x| x as u64).sum::<u64>()
        });
        let pool = builder(&guard).workers(2).build(slow).unwrap();
        let (mut tx, mut rx) = pool.into_async_stream();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        let (got, waits) = runtime.block_on(async move {
            let producer = tokio::spawn(async move {
                let mut waits = 0u32;
                for i in 0..N {
                    poll_fn(|cx| {
                        let ready = Pin::new(&mut tx).poll_ready(cx);
                        waits += u32::from(ready.is_pending());
                        ready
                    })
                    .await
                    .unwrap();
                    Pin::new(&mut tx).start_send(chunk(i, LEN)).unwrap();
                }
                poll_fn(|cx| Pin::new(&mut tx).poll_close(cx))
                    .await
                    .unwrap();
                // Closed: the sink says so rather than sending.
                let after = poll_fn(|cx| Pin::new(&mut tx).poll_ready(cx)).await;
                assert!(matches!(after, Err(Error::InvalidArgument(_))), "{after:?}");
                waits
            });
            let mut got = Vec::new();
            while let Some(r) = poll_fn(|cx| Pin::new(&mut rx).poll_next(cx)).await {
                let out = r.unwrap();
                got.push((out.seq(), out.to_native()));
                drop(out);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (got, producer.await.unwrap())
        });
        runtime.shutdown_timeout(Duration::from_secs(10));
        check_in_order(&got, N, LEN);
        assert!(
            waits > 0,
            "the sender never had to wait: the test covers no backpressure"
        );
    }
    assert_no_children();
}

#[test]
fn a_gone_receiver_closes_the_stream_for_the_sender() {
    let guard = serial();
    {
        let pool = builder(&guard).workers(2).build(sum_task()).unwrap();
        let (mut tx, rx) = pool.into_async_stream();
        let sent = current_thread().block_on(async move {
            tx.send(chunk(0, 1000)).await.unwrap();
            drop(rx);
            tx.send(chunk(1, 1000)).await
        });
        assert!(matches!(sent, Err(Error::StreamClosed)), "{sent:?}");
    }
    assert_no_children();
}

#[test]
fn halves_dropped_while_their_watchers_wait_let_go_at_once() {
    // A slow worker: a 1 MiB input ring holds two of these 400 KB chunks, the next waits.
    let slow = shmexec::from_fn::<Vec<u32>, _, _>(|c| {
        std::thread::sleep(Duration::from_millis(100));
        c.len() as u64
    });
    let guard = serial();
    {
        let pool = builder(&guard).workers(1).build(slow).unwrap();
        let (mut tx, mut rx) = pool.into_async_stream();
        let dropped_in = current_thread().block_on(async move {
            // The receiver's watcher waits for a result that no input brought yet.
            let nothing = tokio::time::timeout(Duration::from_millis(20), rx.recv()).await;
            assert!(nothing.is_err(), "a result without an input");
            // The sender's watcher waits for room that the slow worker makes only now and
            // then: a send gives up waiting, its input stays with the watcher.
            let mut sent = 0;
            while tokio::time::timeout(Duration::from_millis(30), tx.send(chunk(sent, 100_000)))
                .await
                .is_ok()
            {
                sent += 1;
                assert!(sent < 100, "the sender never waited");
            }
            let t0 = Instant::now();
            drop(tx);
            drop(rx);
            t0.elapsed()
        });
        assert!(
            dropped_in < Duration::from_secs(1),
            "dropping the halves took {dropped_in:?}"
        );
    }
    assert_no_children();
}

#[test]
fn a_worker_killed_while_the_receiver_awaits_is_noticed() {
    // The watcher receives with the blocking calls' slices, which supervise the workers
    // between them: a death is noticed without a poll from the task.
    let slow = shmexec::from_fn::<Vec<u32>, _, _>(|c| {
        std::thread::sleep(Duration::from_millis(200));
        c.len() as u64
    });
    let guard = serial();
    {
        let pool = builder(&guard).workers(1).build(slow).unwrap();
        let pid = pool.pids()[0];
        let (mut tx, mut rx) = pool.into_async_stream();
        let got = current_thread().block_on(async move {
            for i in 0..3 {
                tx.send(chunk(i, 1000)).await.unwrap();
            }
            tx.close().await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            rustix::process::kill_process(
                rustix::process::Pid::from_raw(pid).unwrap(),
                rustix::process::Signal::KILL,
            )
            .unwrap();
            let mut got = Vec::new();
            while let Some(r) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .expect("the receiver hung after a worker died")
            {
                got.push(r.map(|out| out.to_native()).map_err(|e| e.to_string()));
            }
            got
        });
        // Each input's result or its error, in its place.
        assert_eq!(got.len(), 3, "{got:?}");
    }
    assert_no_children();
}
