//! Chaos run: stream chunks through a pool while killing random workers with SIGKILL, and check
//! that every result arrives exactly once, in order, and right.
//!
//! ```text
//! cargo run --release --example chaos -- --kills 100 --chunks 20000 [--workers 2] [--seed 1]
//! ```
//!
//! Each chunk is 256 KiB of `f32` samples (20,000 chunks: 5 GB); the task returns their sum and count above 1.0, and
//! the run compares each result with the same function run here. Kills land at random items
//! of the stream, so at random points of whatever the workers are doing (processing, waiting,
//! writing a result). Each kill waits until the previous one was noticed. The last line:
//!
//! ```text
//! kills=K delivered=N lost=0 duplicated=0 misordered=0 errors=E max_detect_ms=M
//! ```
//!
//! `errors` counts items given up because random kills hit them `max_attempts` (3) times;
//! `max_detect_ms` is the longest time from a kill to the pool having replaced the worker, as
//! seen from here (an upper bound: it is read between results).

use std::time::Instant;

use shmexec::{Error, Pool, Samples};

const SAMPLES: usize = 65_536;

fn chunk(i: u64) -> Vec<f32> {
    (0..SAMPLES)
        .map(|j| ((i as usize * 7 + j * 13) % 1000) as f32 / 400.0)
        .collect()
}

fn digest(x: &[f32]) -> (f64, u64) {
    (
        x.iter().map(|&v| v as f64).sum(),
        x.iter().filter(|&&v| v > 1.0).count() as u64,
    )
}

struct Args {
    kills: u64,
    chunks: u64,
    workers: usize,
    seed: u64,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        kills: 100,
        chunks: 20_000,
        workers: 2,
        seed: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or(format!("{flag} needs a value"))?;
        let n: u64 = v.parse().map_err(|e| format!("{flag} {v}: {e}"))?;
        match flag.as_str() {
            "--kills" => a.kills = n,
            "--chunks" => a.chunks = n,
            "--workers" => a.workers = n as usize,
            "--seed" => a.seed = n.max(1),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.chunks == 0 || a.workers == 0 {
        return Err("--chunks and --workers must be at least 1".into());
    }
    Ok(a)
}

fn main() {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("usage: chaos --kills K --chunks N [--workers W] [--seed S]: {e}");
            std::process::exit(2);
        }
    };
    let task = shmexec::from_fn::<Vec<f32>, _, _>(|c| digest(c.samples()));
    let mut pool = Pool::builder()
        .workers(a.workers)
        .ring_bytes(16 << 20)
        .max_attempts(3)
        .build(task)
        .unwrap_or_else(|e| {
            eprintln!("chaos: {e}");
            std::process::exit(1)
        });

    // Random kill points (xorshift), sorted, at most one per item.
    let mut x = a.seed;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut at: Vec<u64> = (0..a.kills).map(|_| rnd() % a.chunks).collect();
    at.sort_unstable();
    at.dedup();
    let mut next_kill = at.into_iter().peekable();

    let (mut delivered, mut duplicated, mut misordered, mut errors, mut wrong) = (0u64, 0, 0, 0, 0);
    let (mut kills, mut max_detect_ms, mut last_seq) = (0u64, 0f64, None::<u64>);
    let mut seen = vec![false; a.chunks as usize];
    let mut pending: Option<(Instant, u64)> = None; // kill time, respawns before
    let workers = pool.workers();
    let mut victims = 0;
    let mut it = pool.map((0..a.chunks).map(chunk));
    let mut i = 0u64;
    while let Some(r) = it.next() {
        let respawns = it.stats().respawns;
        if let Some((t, before)) = pending {
            if respawns > before {
                max_detect_ms = f64::max(max_detect_ms, t.elapsed().as_secs_f64() * 1e3);
                pending = None;
            }
        }
        let seq = match &r {
            Ok(o) => o.seq(),
            Err(Error::WorkerCrashed { seq, .. }) => *seq,
            Err(e) => {
                eprintln!("chaos: item {i}: {e}");
                std::process::exit(1);
            }
        };
        delivered += 1;
        if last_seq.is_some_and(|l| seq <= l) {
            misordered += 1;
        }
        last_seq = Some(seq);
        match seen.get_mut(seq as usize) {
            Some(s) if *s => duplicated += 1,
            Some(s) => *s = true,
            None => misordered += 1,
        }
        match r {
            Ok(o) => {
                let want = digest(&chunk(seq));
                if (o.0.to_native(), o.1.to_native()) != want {
                    wrong += 1;
                }
            }
            Err(_) => errors += 1,
        }
        // Kill the next victim once the previous kill has been noticed.
        while pending.is_none() && next_kill.peek().is_some_and(|&k| k <= i) {
            next_kill.next();
            victims = (victims + 1) % workers;
            // Workers are replaced as they die: take the victim's current pid.
            let pid = it.worker_pids().get(victims).copied();
            if let Some(pid) = pid.and_then(rustix::process::Pid::from_raw) {
                if rustix::process::kill_process(pid, rustix::process::Signal::KILL).is_ok() {
                    kills += 1;
                    pending = Some((Instant::now(), respawns));
                }
            }
        }
        i += 1;
    }
    drop(it);
    let lost = seen.iter().filter(|s| !**s).count();
    let stats = pool.stats();
    drop(pool);
    println!(
        "workers={} respawns={} wrong_results={wrong}",
        a.workers, stats.respawns
    );
    println!(
        "kills={kills} delivered={delivered} lost={lost} duplicated={duplicated} \
         misordered={misordered} errors={errors} max_detect_ms={max_detect_ms:.1}"
    );
    if lost > 0 || duplicated > 0 || misordered > 0 || wrong > 0 || delivered != a.chunks {
        std::process::exit(1);
    }
}
