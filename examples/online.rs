//! Latency on a live source: how long after a chunk is made does its result arrive?
//!
//! A digitizer thread makes 1 MiB chunks (8 channels x 65,536 `i16` samples: baseline noise
//! plus occasional PMT-like pulses, from a seeded PRNG, so every run sees the same data) at a
//! fixed rate, paced by absolute deadlines (chunk `k` is due at `k * period` after the start, so
//! a late chunk does not push the later ones back). Each chunk carries the time it was made.
//! Workers run a threshold peak finder on every channel and return a small summary (peaks and
//! their total area); a consumer thread takes the results in input order and records, per
//! chunk, the time from its creation to its result.
//!
//! Two engines, one after the other, same parameters and same chunks:
//! - `shmexec`: a [`Pool`] of worker processes; the digitizer streams chunks in, the consumer
//!   streams results out (see [`run_shmexec`]).
//! - `threads`: the same work on plain threads: a producer, W workers and a consumer joined by
//!   crossbeam channels, results put back in input order in the consumer.
//!
//! ```text
//! cargo run --release --example online [-- --rate 200 --seconds 3 --workers 2]
//! cargo run --release --example online -- --find-max
//! ```
//!
//! No flags needed: 200 MB/s (10^6 bytes) for 3 s per engine, 2 workers. The last line is JSON:
//! per engine the p50/p99/max latency in ms, `results_while_live` (the share of results that
//! arrived before the digitizer made its last chunk: a live monitor needs it near 1), the
//! chunks, the input rate achieved and whether it kept up (at least 95 % of the rate asked for,
//! p99 under 50 ms); then whether both engines' results are identical (they must be).
//!
//! `--find-max` steps the rate up (100, 200, 400, ... MB/s), prints one JSON line per rate, and
//! a last one with the highest rate at which each engine kept up.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;
use rkyv::{Archive, Deserialize, Serialize};
use shmexec::{BoxError, Pool, Samples, Task};

const CHANNELS: usize = 8;
const SAMPLES_PER_CHANNEL: usize = 65_536;
/// 1 MiB.
const CHUNK_BYTES: usize = CHANNELS * SAMPLES_PER_CHANNEL * std::mem::size_of::<i16>();
/// Chunks a channel between two stages holds before its sender waits (16 MiB, 80 ms at
/// 200 MB/s): a source that outruns the workers is slowed down, and that shows as a lower rate.
const QUEUE_CHUNKS: usize = 16;
const BASELINE_SAMPLES: usize = 64;
/// ADC counts below the baseline (PMT pulses go negative); the noise has sigma ~9 counts.
const THRESHOLD: i32 = 50;
/// Mean gap between pulses in one channel, in samples (~16 per channel per chunk).
const MEAN_PULSE_GAP: f64 = 4_000.0;
const SEED: u64 = 0x5EED_F00D_D161_7153;
/// The pacing loop sleeps until this long before a deadline, then spins.
const SPIN: Duration = Duration::from_micros(100);
/// Keeping up: at least this share of the rate asked for, and a p99 latency under the limit.
const KEEP_UP_RATE: f64 = 0.95;
const KEEP_UP_P99_MS: f64 = 50.0;

/// One chunk as the digitizer delivers it.
#[derive(Archive, Serialize, Deserialize)]
struct Chunk {
    /// When it was made, in ns after the run's start (the consumer's clock: same process).
    created_ns: u64,
    seq: u64,
    /// `CHANNELS` blocks of `SAMPLES_PER_CHANNEL` samples.
    samples: Vec<i16>,
}

/// What the workers send back for one chunk.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy)]
struct Summary {
    seq: u64,
    /// Echoed from the chunk, for the latency.
    created_ns: u64,
    peaks: u32,
    /// Sum over the peaks of the samples' depth below the baseline, in ADC counts.
    area: i64,
}

impl Summary {
    /// What both engines must agree on (`created_ns` differs from run to run).
    fn key(&self) -> (u64, u32, i64) {
        (self.seq, self.peaks, self.area)
    }
}

/// Threshold-crossing peak finder: per channel, baseline from its first samples, then every run
/// of samples that goes deeper than `THRESHOLD` below it is one peak (with hysteresis).
fn find_peaks(seq: u64, created_ns: u64, samples: &[i16]) -> Summary {
    let (mut peaks, mut area) = (0u32, 0i64);
    for wave in samples.chunks_exact(SAMPLES_PER_CHANNEL) {
        let base = wave[..BASELINE_SAMPLES]
            .iter()
            .map(|&s| s as i32)
            .sum::<i32>()
            / BASELINE_SAMPLES as i32;
        let mut open = false;
        for &s in wave {
            let depth = base - s as i32;
            // Opens above the threshold, closes below half of it: noise on a pulse's tail
            // does not split it.
            let inside = if open {
                depth > THRESHOLD / 2
            } else {
                depth > THRESHOLD
            };
            peaks += u32::from(inside && !open);
            if inside {
                area += depth as i64;
            }
            open = inside;
        }
    }
    Summary {
        seq,
        created_ns,
        peaks,
        area,
    }
}

// ---------------------------------------------------------------------------------------------
// The source

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Synthetic digitizer: a noise table made once, read at a different offset per channel and
/// chunk, plus pulses at PRNG-drawn times and heights. Chunk `seq` is always the same.
struct Digitizer {
    noise: Vec<i16>,
    /// Pulse shape of unit height: fast rise, slower fall.
    shape: Vec<f32>,
}

impl Digitizer {
    fn new() -> Digitizer {
        let mut x = SEED;
        let noise = (0..(1 << 18) + SAMPLES_PER_CHANNEL)
            .map(|_| {
                x = splitmix(x);
                // Four uniform 0..15: roughly Gaussian, mean 30, sigma ~9.
                let sum: u64 = (0..4).map(|i| (x >> (16 * i)) & 15).sum();
                sum as i16 - 30
            })
            .collect();
        let peak = (0..60)
            .map(|i| {
                let t = i as f64;
                (1.0 - (-t / 2.0).exp()) * (-t / 12.0).exp()
            })
            .fold(0.0, f64::max);
        let shape = (0..60)
            .map(|i| {
                let t = i as f64;
                ((1.0 - (-t / 2.0).exp()) * (-t / 12.0).exp() / peak) as f32
            })
            .collect();
        Digitizer { noise, shape }
    }

    fn samples(&self, seq: u64) -> Vec<i16> {
        let mut samples = Vec::with_capacity(CHANNELS * SAMPLES_PER_CHANNEL);
        let room = self.noise.len() - SAMPLES_PER_CHANNEL;
        for ch in 0..CHANNELS {
            let mut rng = splitmix(SEED ^ (seq * CHANNELS as u64 + ch as u64));
            let offset = (rng % room as u64) as usize;
            let base = 15_000 + 100 * ch as i16;
            let start = samples.len();
            samples.extend(
                self.noise[offset..offset + SAMPLES_PER_CHANNEL]
                    .iter()
                    .map(|&n| base + n),
            );
            let wave = &mut samples[start..];
            let mut at = BASELINE_SAMPLES as f64;
            loop {
                rng = splitmix(rng);
                // Exponential gaps (Poisson arrivals); the +1 keeps ln finite.
                let u = ((rng >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
                at += -u.ln() * MEAN_PULSE_GAP;
                let i = at as usize;
                if i + self.shape.len() > SAMPLES_PER_CHANNEL {
                    break;
                }
                let height = 60.0 + (rng & 1023) as f32; // 60..1083 counts
                for (w, &f) in wave[i..].iter_mut().zip(&self.shape) {
                    *w -= (height * f) as i16;
                }
            }
        }
        samples
    }

    /// Makes `p.chunks()` chunks at `p.rate_mbps`, handing each to `send` as soon as it is
    /// made. Chunk `k` is due `k * period` after `clock`.
    fn run(&self, p: &Params, clock: Instant, mut send: impl FnMut(Chunk)) -> SourceEnd {
        let period = CHUNK_BYTES as f64 / (p.rate_mbps * 1e6);
        let (mut first_ns, mut last_ns) = (0, 0);
        for seq in 0..p.chunks() {
            wait_until(clock + Duration::from_secs_f64(seq as f64 * period));
            let samples = self.samples(seq);
            let created_ns = clock.elapsed().as_nanos() as u64;
            if seq == 0 {
                first_ns = created_ns;
            }
            last_ns = created_ns;
            send(Chunk {
                created_ns,
                seq,
                samples,
            });
        }
        SourceEnd { first_ns, last_ns }
    }
}

/// When the digitizer made its first and its last chunk (ns after the run's start).
struct SourceEnd {
    first_ns: u64,
    last_ns: u64,
}

/// Sleeps until shortly before `deadline`, then spins (sleep alone wakes up late).
fn wait_until(deadline: Instant) {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        let left = deadline - now;
        if left > SPIN {
            std::thread::sleep(left - SPIN);
        } else {
            std::hint::spin_loop();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Measuring

/// The consumer's record: each result and when it arrived.
struct Recorder {
    clock: Instant,
    results: Vec<Summary>,
    arrived_ns: Vec<u64>,
}

impl Recorder {
    fn new(clock: Instant) -> Recorder {
        Recorder {
            clock,
            results: Vec::new(),
            arrived_ns: Vec::new(),
        }
    }

    fn record(&mut self, s: Summary) {
        self.arrived_ns.push(self.clock.elapsed().as_nanos() as u64);
        self.results.push(s);
    }
}

/// One engine's run at one rate.
struct Run {
    name: &'static str,
    target_mbps: f64,
    /// Sorted.
    latencies_ns: Vec<u64>,
    results_while_live: f64,
    chunks: u64,
    input_mbps: f64,
    results: Vec<Summary>,
}

impl Run {
    fn new(name: &'static str, p: &Params, source: SourceEnd, rec: Recorder) -> Run {
        let mut latencies_ns: Vec<u64> = rec
            .results
            .iter()
            .zip(&rec.arrived_ns)
            .map(|(s, &t)| t.saturating_sub(s.created_ns))
            .collect();
        latencies_ns.sort_unstable();
        let live = rec
            .arrived_ns
            .iter()
            .filter(|&&t| t < source.last_ns)
            .count();
        let chunks = p.chunks();
        // Chunks 0 and n-1 are n-1 periods apart.
        let span_s = (source.last_ns - source.first_ns) as f64 / 1e9;
        Run {
            name,
            target_mbps: p.rate_mbps,
            latencies_ns,
            results_while_live: live as f64 / chunks as f64,
            chunks,
            input_mbps: (chunks - 1) as f64 * CHUNK_BYTES as f64 / 1e6 / span_s,
            results: rec.results,
        }
    }

    /// Nearest-rank percentile, in ms.
    fn percentile_ms(&self, q: f64) -> f64 {
        let n = self.latencies_ns.len();
        if n == 0 {
            return f64::NAN;
        }
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        self.latencies_ns[rank - 1] as f64 / 1e6
    }

    fn keeps_up(&self) -> bool {
        self.results.len() as u64 == self.chunks
            && self.input_mbps >= KEEP_UP_RATE * self.target_mbps
            && self.percentile_ms(0.99) < KEEP_UP_P99_MS
    }

    fn peaks(&self) -> u64 {
        self.results.iter().map(|s| s.peaks as u64).sum()
    }

    fn json(&self) -> String {
        format!(
            "{{\"p50_ms\":{},\"p99_ms\":{},\"max_ms\":{},\"results_while_live\":{},\"chunks\":{},\
             \"results\":{},\"input_mbps\":{},\"keeps_up\":{},\"peaks\":{}}}",
            num(self.percentile_ms(0.50), 3),
            num(self.percentile_ms(0.99), 3),
            num(self.percentile_ms(1.0), 3),
            num(self.results_while_live, 4),
            self.chunks,
            self.results.len(),
            num(self.input_mbps, 1),
            self.keeps_up(),
            self.peaks()
        )
    }

    fn report(&self) {
        eprintln!(
            "  {:<8} {:>6.0} MB/s asked, {:>6.1} achieved  p50 {:>8.3} ms  p99 {:>8.3} ms  \
             max {:>8.3} ms  while live {:>5.1} %  {}",
            self.name,
            self.target_mbps,
            self.input_mbps,
            self.percentile_ms(0.50),
            self.percentile_ms(0.99),
            self.percentile_ms(1.0),
            100.0 * self.results_while_live,
            if self.keeps_up() {
                "keeps up"
            } else {
                "falls behind"
            }
        );
    }
}

/// A JSON number (`null` if it is not finite).
fn num(x: f64, decimals: usize) -> String {
    if x.is_finite() {
        format!("{x:.decimals$}")
    } else {
        "null".into()
    }
}

fn identical(a: &Run, b: &Run) -> bool {
    a.results.len() == b.results.len()
        && a.results
            .iter()
            .zip(&b.results)
            .all(|(x, y)| x.key() == y.key())
}

// ---------------------------------------------------------------------------------------------
// The engines

/// How [`run_shmexec`] drives the pool, for the JSON line.
const SHMEXEC_API: &str = "stream";

/// The shmexec engine: the digitizer thread sends each chunk into the pool's stream as it is
/// made (one copy, into a worker's input ring), and a consumer thread receives the results in
/// input order, each as soon as it is ready.
fn run_shmexec<T>(pool: &mut Pool<T>, p: &Params, src: &Digitizer) -> Run
where
    T: Task<Input = Chunk, Output = Summary> + Send,
{
    let clock = Instant::now();
    std::thread::scope(|s| {
        let (tx, rx) = pool.stream();
        let source = s.spawn(move || src.run(p, clock, |c| tx.send(&c).map(drop).expect("send")));
        let consumer = s.spawn(move || {
            let mut rec = Recorder::new(clock);
            while let Some(r) = rx.recv() {
                rec.record(r.expect("result").deserialize().expect("deserialize"));
            }
            rec
        });
        let end = source.join().expect("digitizer panicked");
        Run::new(
            "shmexec",
            p,
            end,
            consumer.join().expect("consumer panicked"),
        )
    })
}

/// The same on plain threads: producer -> W workers -> consumer, reordered in the consumer.
fn run_threads(p: &Params, src: &Digitizer) -> Run {
    let clock = Instant::now();
    let (chunk_tx, chunk_rx) = bounded::<Chunk>(QUEUE_CHUNKS);
    let (result_tx, result_rx) = bounded::<Summary>(QUEUE_CHUNKS);
    std::thread::scope(|s| {
        let source = s.spawn(move || src.run(p, clock, |c| chunk_tx.send(c).expect("send")));
        for _ in 0..p.workers {
            let (rx, tx) = (chunk_rx.clone(), result_tx.clone());
            s.spawn(move || {
                for c in rx {
                    tx.send(find_peaks(c.seq, c.created_ns, &c.samples))
                        .expect("send result");
                }
            });
        }
        drop((chunk_rx, result_tx));
        let consumer = s.spawn(move || {
            let mut rec = Recorder::new(clock);
            let mut early = BTreeMap::new();
            let mut next = 0;
            for r in result_rx {
                early.insert(r.seq, r);
                while let Some(r) = early.remove(&next) {
                    rec.record(r);
                    next += 1;
                }
            }
            rec
        });
        let end = source.join().expect("digitizer panicked");
        Run::new(
            "threads",
            p,
            end,
            consumer.join().expect("consumer panicked"),
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Main

#[derive(Clone)]
struct Params {
    rate_mbps: f64,
    seconds: f64,
    workers: usize,
}

impl Params {
    fn chunks(&self) -> u64 {
        ((self.rate_mbps * 1e6 * self.seconds / CHUNK_BYTES as f64).round() as u64).max(2)
    }

    fn json(&self) -> String {
        format!(
            "\"rate_mbps\":{},\"seconds\":{},\"workers\":{},\"chunk_bytes\":{CHUNK_BYTES},\
             \"shmexec_api\":\"{SHMEXEC_API}\"",
            self.rate_mbps, self.seconds, self.workers
        )
    }
}

struct Args {
    params: Params,
    find_max: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        params: Params {
            rate_mbps: 200.0,
            seconds: 3.0,
            workers: 2,
        },
        find_max: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--rate" => {
                a.params.rate_mbps = value()?.parse().map_err(|e| format!("--rate: {e}"))?
            }
            "--seconds" => {
                a.params.seconds = value()?.parse().map_err(|e| format!("--seconds: {e}"))?
            }
            "--workers" => {
                a.params.workers = value()?.parse().map_err(|e| format!("--workers: {e}"))?
            }
            "--find-max" => a.find_max = true,
            "-h" | "--help" => {
                return Err(
                    "usage: online [--rate MBPS] [--seconds S] [--workers N] [--find-max]".into(),
                );
            }
            other => return Err(format!("unknown argument {other} (try --help)")),
        }
    }
    let p = &a.params;
    if !(p.rate_mbps > 0.0 && p.seconds > 0.0) || p.workers == 0 {
        return Err("--rate and --seconds must be positive, --workers at least 1".into());
    }
    Ok(a)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args) {
        eprintln!("online: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), BoxError> {
    let digitizer = Digitizer::new();
    let task = shmexec::from_fn::<Chunk, _, _>(|chunk: &rkyv::Archived<Chunk>| -> Summary {
        find_peaks(
            chunk.seq.to_native(),
            chunk.created_ns.to_native(),
            chunk.samples.samples(),
        )
    });
    // Built before any thread starts: it forks.
    let mut pool = Pool::builder().workers(args.params.workers).build(task)?;
    let both = |p: &Params, pool: &mut Pool<_>| {
        let a = run_shmexec(pool, p, &digitizer);
        a.report();
        let b = run_threads(p, &digitizer);
        b.report();
        (a, b)
    };
    let engines = |a: &Run, b: &Run| {
        format!(
            "\"{}\":{},\"{}\":{},\"identical\":{}",
            a.name,
            a.json(),
            b.name,
            b.json(),
            identical(a, b)
        )
    };

    if !args.find_max {
        let p = &args.params;
        eprintln!(
            "online: {} chunks of {CHANNELS} x {SAMPLES_PER_CHANNEL} i16 at {} MB/s, {} workers",
            p.chunks(),
            p.rate_mbps,
            p.workers
        );
        let (a, b) = both(p, &mut pool);
        println!(
            "{{\"example\":\"online\",{},{}}}",
            p.json(),
            engines(&a, &b)
        );
        if !identical(&a, &b) {
            return Err("the engines' results differ".into());
        }
        return Ok(());
    }

    // Double the rate until neither engine keeps up (or 12.8 GB/s).
    let mut best: [Option<f64>; 2] = [None, None];
    let mut differ = false;
    let mut rate = 100.0;
    while rate <= 12_800.0 {
        let p = Params {
            rate_mbps: rate,
            ..args.params.clone()
        };
        let (a, b) = both(&p, &mut pool);
        println!(
            "{{\"example\":\"online\",\"find_max\":true,{},{}}}",
            p.json(),
            engines(&a, &b)
        );
        differ |= !identical(&a, &b);
        for (best, run) in best.iter_mut().zip([&a, &b]) {
            if run.keeps_up() {
                *best = Some(rate);
            }
        }
        if !a.keeps_up() && !b.keeps_up() {
            break;
        }
        rate *= 2.0;
    }
    let show = |b: Option<f64>| b.map_or("null".into(), |r| r.to_string());
    println!(
        "{{\"example\":\"online\",\"find_max_result\":true,\"seconds\":{},\"workers\":{},\
         \"shmexec_max_mbps\":{},\"threads_max_mbps\":{},\"identical\":{}}}",
        args.params.seconds,
        args.params.workers,
        show(best[0]),
        show(best[1]),
        !differ
    );
    if differ {
        return Err("the engines' results differ".into());
    }
    Ok(())
}
