//! A tokio service over shmexec's async stream halves: one task produces a chunk at a fixed
//! interval (a digitizer) and sends it through the [`AsyncSender`](shmexec::AsyncSender);
//! another awaits the results from the [`AsyncReceiver`](shmexec::AsyncReceiver) and checks
//! each against the chunk's known sum. Neither blocks a runtime thread.
//!
//! ```text
//! cargo run --release -p shmexec-service-example -- [chunks (500)] [interval_ms (2)]
//! ```
//!
//! Prints one line and exits 0 when every result came once, in order, and right.

use std::time::{Duration, Instant};

use shmexec::{Pool, Samples, Task};

/// Samples per chunk.
const CHUNK_SAMPLES: usize = 1 << 16;

/// Chunk `i`: a ramp that depends on `i`, so that a result in the wrong place shows.
fn chunk(i: u64) -> Vec<i16> {
    (0..CHUNK_SAMPLES)
        .map(|k| ((k as u64 * 7 + i * 13) % 2001) as i16 - 1000)
        .collect()
}

fn expected(i: u64) -> i64 {
    chunk(i).iter().map(|&s| s as i64).sum()
}

fn sum_task() -> impl Task<Input = Vec<i16>, Output = i64> + Send + 'static {
    shmexec::from_fn::<Vec<i16>, _, _>(|c| c.samples().iter().map(|&s| s as i64).sum::<i64>())
}

fn arg(n: usize, default: u64) -> u64 {
    std::env::args()
        .nth(n)
        .map(|a| a.parse().expect("arguments: [chunks] [interval_ms]"))
        .unwrap_or(default)
}

fn main() {
    let (chunks, interval_ms) = (arg(1, 500), arg(2, 2).max(1));
    // The pool forks its workers: build it while this process has one thread, before the
    // runtime starts its own.
    let pool = Pool::builder()
        .workers(2)
        .build(sum_task())
        .expect("start the pool");
    let (mut tx, mut rx) = pool.into_async_stream();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .expect("start the runtime");
    let started = Instant::now();
    let outcome = runtime.block_on(async move {
        let producer = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(interval_ms));
            for i in 0..chunks {
                tick.tick().await;
                tx.send(chunk(i)).await?;
            }
            tx.close().await
        });
        let checker = tokio::spawn(async move {
            let (mut results, mut wrong, mut first) = (0u64, 0u64, None);
            while let Some(result) = rx.recv().await {
                let out = result?;
                let first = *first.get_or_insert(out.seq());
                if out.seq() != first + results || out.to_native() != expected(results) {
                    wrong += 1;
                }
                results += 1;
            }
            Ok::<_, shmexec::Error>((results, wrong))
        });
        let sent = producer.await.expect("the producer panicked");
        let checked = checker.await.expect("the checker panicked");
        sent.and(checked)
    });
    let secs = started.elapsed().as_secs_f64();
    match outcome {
        Ok((results, 0)) if results == chunks => {
            println!(
                "service: {chunks} chunks sent every {interval_ms} ms, {results} results in order \
                 and correct, {secs:.2} s"
            );
        }
        Ok((results, wrong)) => {
            println!(
                "service: {chunks} chunks sent, {results} results, {wrong} wrong, {secs:.2} s"
            );
            std::process::exit(1);
        }
        Err(e) => {
            println!("service: failed after {secs:.2} s: {e}");
            std::process::exit(1);
        }
    }
}
