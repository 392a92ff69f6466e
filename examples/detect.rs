//! Detection latency: how long from a worker's death (SIGKILL) to its successor starting.
//!
//! ```text
//! cargo run --release --example detect -- [--kills 200] [--workers 2] [--busy 0]
//! ```
//!
//! A pool streams 64 KiB chunks (about a millisecond of work each) while a thread kills one
//! worker at a time, at random moments 20-60 ms apart. Each worker's `init` notes when it runs
//! (CLOCK_MONOTONIC, the clock of both processes), so the latency of a kill is the time from
//! the `kill` call to its successor's `init`: noticing the death, reaping it, the fork, and the
//! successor's start. `--busy N` runs N threads that spin beside the pool the whole time, to
//! see where the outliers go on a loaded machine. The last line:
//!
//! ```text
//! kills=K p50_ms=A p99_ms=B max_ms=C lost=0
//! ```

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use shmexec::shm::clock::now_ns;
use shmexec::{BoxError, Pool, Samples, Task, WorkerInfo};

/// Sums its chunk; its `init` appends `index pid time_ns` to `log`.
#[derive(Clone)]
struct Noted {
    log: PathBuf,
}

impl Task for Noted {
    type Input = Vec<f32>;
    type Output = f64;
    fn init(&mut self, info: &WorkerInfo) -> Result<(), BoxError> {
        let t = now_ns();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        writeln!(f, "{} {} {t}", info.index, std::process::id())?;
        Ok(())
    }
    fn process(&mut self, c: &rkyv::Archived<Vec<f32>>) -> Result<f64, BoxError> {
        // About a millisecond: a few passes over 16,384 samples.
        let mut s = 0.0f64;
        for k in 0..16 {
            s += c
                .samples()
                .iter()
                .map(|&v| f64::from(v) * f64::from(k))
                .sum::<f64>();
        }
        Ok(s)
    }
}

/// The starts logged so far: (index, pid, time).
fn starts(log: &PathBuf) -> Vec<(usize, i32, u64)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split(' ');
            Some((
                it.next()?.parse().ok()?,
                it.next()?.parse().ok()?,
                it.next()?.parse().ok()?,
            ))
        })
        .collect()
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| {
            v.parse().unwrap_or_else(|e| {
                eprintln!("detect: {name} {v}: {e}");
                std::process::exit(2)
            })
        })
}

fn main() {
    let (kills, workers, busy) = (
        arg("--kills", 200),
        arg("--workers", 2) as usize,
        arg("--busy", 0),
    );
    let log = std::env::temp_dir().join(format!("shmexec-detect-{}", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let mut pool = Pool::builder()
        .workers(workers)
        .ring_bytes(4 << 20)
        .max_attempts(1000)
        .build(Noted { log: log.clone() })
        .unwrap_or_else(|e| {
            eprintln!("detect: {e}");
            std::process::exit(1)
        });
    let done = Arc::new(AtomicBool::new(false));
    let spinners: Vec<_> = (0..busy)
        .map(|_| {
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !done.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
            })
        })
        .collect();
    let killer = {
        let (done, log) = (Arc::clone(&done), log.clone());
        std::thread::spawn(move || {
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            let mut latencies = Vec::new();
            for k in 0..kills {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                std::thread::sleep(Duration::from_millis(20 + x % 40));
                let index = (k as usize) % workers;
                let before = starts(&log);
                let Some(&(_, pid, _)) = before.iter().rev().find(|s| s.0 == index) else {
                    eprintln!("detect: kill {k}: no start of worker {index} logged yet");
                    continue;
                };
                let t = now_ns();
                let Some(p) = rustix::process::Pid::from_raw(pid) else {
                    continue;
                };
                if rustix::process::kill_process(p, rustix::process::Signal::KILL).is_err() {
                    continue;
                }
                // Wait (up to 10 s) for the successor's start.
                let seen = (0..50_000).find_map(|_| {
                    let now = starts(&log);
                    let next = now[before.len()..].iter().find(|s| s.0 == index).copied();
                    if next.is_none() {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    next
                });
                match seen {
                    Some((_, _, started)) => latencies.push(started.saturating_sub(t)),
                    None => eprintln!("detect: kill {k}: no successor within 10 s"),
                }
            }
            done.store(true, Ordering::Relaxed);
            latencies
        })
    };
    let mut delivered = 0u64;
    let chunk: Vec<f32> = (0..16_384).map(|i| (i % 100) as f32).collect();
    let inputs = std::iter::from_fn(|| (!done.load(Ordering::Relaxed)).then(|| chunk.clone()));
    for r in pool.map(inputs) {
        match r {
            Ok(_) | Err(shmexec::Error::WorkerCrashed { .. }) => delivered += 1,
            Err(e) => {
                eprintln!("detect: {e}");
                std::process::exit(1);
            }
        }
    }
    let mut latencies = killer.join().expect("the killer thread");
    for s in spinners {
        let _ = s.join();
    }
    let _ = std::fs::remove_file(&log);
    if latencies.is_empty() {
        eprintln!("detect: no kill was measured (no worker start was logged in {log:?})");
        std::process::exit(1);
    }
    latencies.sort_unstable();
    let ms = |q: f64| {
        let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies.get(i).map_or(f64::NAN, |&ns| ns as f64 / 1e6)
    };
    println!(
        "workers={workers} busy={busy} delivered={delivered} respawns={}",
        pool.stats().respawns
    );
    println!(
        "kills={} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} lost={}",
        latencies.len(),
        ms(0.5),
        ms(0.99),
        ms(1.0),
        kills as usize - latencies.len()
    );
}
