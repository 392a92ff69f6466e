//! The comparison harness: one light transform on every engine, side by side, in one run.
//!
//! ```text
//! cargo run --release --example compare -- --chunk-bytes 4MiB --total-bytes 512MiB --workers 2 \
//!     [--input memory|generate|index] [--rounds 3] [--engines seq,rayon,...] [--ring-bytes 64MiB]
//!     [--input-ring-bytes B] [--output-ring-bytes B] [--queue-bytes B]
//!     [--pinning auto|off|spread|source-first|cores:LIST] [--wait adaptive|park|spin] [--sched]
//! ```
//!
//! The transform, per chunk of `f32`: subtract the mean of the first 64 samples, scale by 0.5,
//! count the samples above 1.0; the transformed array is the output. Every engine *consumes* each
//! output the same cheap way (the count, plus a checksum of one sample per 4 KiB), so no engine
//! is charged for reading all output bytes twice, and all engines' summaries must agree exactly.
//!
//! Engines:
//! - `seq`: one thread, one reused output buffer.
//! - `rayon`: W threads, per-thread output buffers (`map_init`), each output consumed where it
//!   is made: the upper bound for a pool on one machine.
//! - `rayon-collect`: `par_iter().map(..).collect()`, a new `Vec` per output, consumed after.
//! - `pipe`: W forked workers fed bincode over pipes, results read back and decoded in order
//!   (what pipe and pickle process pools do).
//! - `shmexec-vec`: `Vec` inputs serialized into the rings (one copy by the coordinator).
//! - `shmexec-builder`: the source writes each chunk straight into a reserved ring slot.
//! - `shmexec-shared` (`--input memory` only): the chunks were generated into the pool's shared
//!   region (`Builder::shared_bytes`) instead of into `Vec`s; each item is a `Span` and the
//!   worker reads the chunk where it lies. Nobody copies the input.
//! - `shmexec-descr` (`--input index` only): work descriptors; each worker generates chunk `i`
//!   itself.
//!
//! Inputs: `memory` (default) generates every chunk in RAM before timing; `generate` has a serial
//! source make each chunk while timed (a digitizer or a file reader), fed to rayon through
//! `par_bridge`; `index` hands every engine chunk indices and each worker generates chunk `i`.
//!
//! `--wait spin` is for latency experiments, not for ratios: between its own rounds an idle
//! shmexec worker then spins (yielding) instead of parking, and on a small machine that takes
//! CPU from the engine running beside it (measured on 2 cores: rayon 8.6-10.0 GB/s against
//! 13.9-16.4 with the default wait, so shmexec looked faster than rayon). The harness says so
//! when it is asked for.
//!
//! `--sched` (with `--engines` naming one shmexec engine) also prints, for the coordinator and
//! each worker, the share of the run it spent on a CPU, waiting for one and asleep, from the
//! kernel's `/proc/<pid>/schedstat`: with more busy processes than cores this shows where a
//! process pool loses to threads that the wall time alone cannot.
//!
//! Each engine runs `--rounds` times, interleaved; the table shows the median. The last line is
//! JSON with `<engine>_mbps` (10^6 bytes per second of input) and the ratios.

use std::io::{BufReader, BufWriter, Write};
use std::time::Instant;

use rayon::prelude::*;
use shmexec::shared::{ArchivedSpan, Span};
use shmexec::{ArrayOutput, ArrayTask, BoxError, Pinning, Pool, Samples, WaitStrategy};

const STRIDE: usize = 1024; // one checksum sample per 4 KiB of output

// ---------------------------------------------------------------------------------------------
// The workload

/// The transform; returns the count of outputs above 1.0.
fn transform(x: &[f32], out: &mut [f32]) -> u64 {
    let head = &x[..x.len().min(64)];
    let mean = head.iter().sum::<f32>() / head.len().max(1) as f32;
    let mut count = 0u64;
    for (o, &v) in out.iter_mut().zip(x) {
        let y = (v - mean) * 0.5;
        *o = y;
        count += u64::from(y > 1.0);
    }
    count
}

/// How each engine consumes an output: exact, so all engines must agree bit for bit.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Summary {
    count: u64,
    checksum: f64,
}

fn summarize(out: &[f32], count: u64) -> Summary {
    Summary {
        count,
        checksum: out.iter().step_by(STRIDE).map(|&v| v as f64).sum(),
    }
}

/// Transform into `out` and consume it: what `seq` and `rayon` do per chunk.
fn step(x: &[f32], out: &mut [f32]) -> Summary {
    let count = transform(x, out);
    summarize(out, count)
}

/// Deterministic chunk `i`: a cheap integer hash, so generating is faster than transforming.
fn generate(i: u64, out: &mut [f32]) {
    let seed = (i as u32).wrapping_mul(0x9E37_79B1);
    for (j, o) in out.iter_mut().enumerate() {
        let h = seed.wrapping_add((j as u32).wrapping_mul(0x85EB_CA6B));
        *o = ((h >> 7) & 0x3FF) as f32 / 256.0;
    }
}

fn generated(i: u64, n: usize) -> Vec<f32> {
    let mut v = vec![0f32; n];
    generate(i, &mut v);
    v
}

// ---------------------------------------------------------------------------------------------
// shmexec tasks

/// Input: the chunk; output: the transformed array, written straight into the output ring,
/// and the count.
struct Transform;

impl ArrayTask for Transform {
    type Input = Vec<f32>;
    type Sample = f32;
    type Meta = u64;
    fn output_len(&mut self, x: &rkyv::Archived<Vec<f32>>) -> usize {
        x.len()
    }
    fn process(&mut self, x: &rkyv::Archived<Vec<f32>>, out: &mut [f32]) -> Result<u64, BoxError> {
        Ok(transform(x.samples(), out))
    }
}

/// Input: a chunk index (a work descriptor); the worker generates the chunk into its scratch
/// buffer and writes the output straight into the ring.
struct Descriptor {
    n: usize,
    scratch: Vec<f32>,
}

impl ArrayTask for Descriptor {
    type Input = u64;
    type Sample = f32;
    type Meta = u64;
    fn output_len(&mut self, _: &rkyv::Archived<u64>) -> usize {
        self.n
    }
    fn process(&mut self, i: &rkyv::Archived<u64>, out: &mut [f32]) -> Result<u64, BoxError> {
        self.scratch.resize(self.n, 0.0);
        generate(i.to_native(), &mut self.scratch);
        Ok(transform(&self.scratch, out))
    }
}

/// Input: a span of the pool's shared region, where the chunk was generated before timing; the
/// worker reads it in place and writes the output straight into the ring.
struct SharedTransform;

impl ArrayTask for SharedTransform {
    type Input = Span<f32>;
    type Sample = f32;
    type Meta = u64;
    fn output_len(&mut self, span: &ArchivedSpan<f32>) -> usize {
        span.len() as usize
    }
    fn process(&mut self, span: &ArchivedSpan<f32>, out: &mut [f32]) -> Result<u64, BoxError> {
        Ok(transform(span.get()?, out))
    }
}

fn consume(o: &rkyv::Archived<(Vec<f32>, u64)>) -> Summary {
    summarize(o.0.samples(), o.1.to_native())
}

// ---------------------------------------------------------------------------------------------
// The pipe pool: forked workers, bincode over pipes

struct PipeWorker {
    tx: BufWriter<std::fs::File>,
    rx: BufReader<std::fs::File>,
    _child: shmexec::shm::ChildProcess,
}

const TAG_CHUNK: u8 = 0;
const TAG_INDEX: u8 = 1;

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard()
}

fn pipe_pool(workers: usize, n: usize) -> Result<Vec<PipeWorker>, BoxError> {
    let mut pool = Vec::new();
    for _ in 0..workers {
        let (req_r, req_w) = rustix::pipe::pipe()?;
        let (resp_r, resp_w) = rustix::pipe::pipe()?;
        let child = shmexec::shm::fork(move || {
            let mut rx = BufReader::with_capacity(1 << 16, std::fs::File::from(req_r));
            let mut tx = BufWriter::with_capacity(1 << 16, std::fs::File::from(resp_w));
            let mut chunk = vec![0f32; n];
            let mut out = vec![0f32; n];
            loop {
                let Ok(tag) = bincode::decode_from_std_read::<u8, _, _>(&mut rx, bincode_config())
                else {
                    return 0; // the parent closed the pipe
                };
                let x: Vec<f32> = if tag == TAG_INDEX {
                    let Ok(i) =
                        bincode::decode_from_std_read::<u64, _, _>(&mut rx, bincode_config())
                    else {
                        return 1;
                    };
                    generate(i, &mut chunk);
                    std::mem::take(&mut chunk)
                } else {
                    match bincode::decode_from_std_read(&mut rx, bincode_config()) {
                        Ok(v) => v,
                        Err(_) => return 1,
                    }
                };
                out.resize(x.len(), 0.0);
                let count = transform(&x, &mut out);
                if tag == TAG_INDEX {
                    chunk = x;
                }
                let sent =
                    bincode::encode_into_std_write((&out[..], count), &mut tx, bincode_config())
                        .is_ok()
                        && tx.flush().is_ok();
                if !sent {
                    return 1;
                }
            }
        })?;
        pool.push(PipeWorker {
            tx: BufWriter::with_capacity(1 << 16, std::fs::File::from(req_w)),
            rx: BufReader::with_capacity(1 << 16, std::fs::File::from(resp_r)),
            _child: child,
        });
    }
    Ok(pool)
}

/// Calls its argument with (tag, chunk, index) for chunk `i`: the pipe engine's source.
type PipeSource<'a> = dyn Fn(u64, &mut dyn FnMut(u8, &[f32], u64)) + Sync + 'a;

/// Sends every chunk (round robin) from a writer thread and reads the results in order here.
fn run_pipe(
    pool: &mut [PipeWorker],
    count: u64,
    source: &PipeSource<'_>,
) -> Result<Vec<Summary>, BoxError> {
    let w = pool.len();
    let (txs, mut rxs): (Vec<_>, Vec<_>) = pool.iter_mut().map(|p| (&mut p.tx, &mut p.rx)).unzip();
    std::thread::scope(|s| {
        let writer = s.spawn(move || -> Result<(), String> {
            let mut txs = txs;
            for i in 0..count {
                let tx = &mut *txs[(i % w as u64) as usize];
                let mut result = Ok(());
                source(i, &mut |tag, chunk, index| {
                    let r =
                        bincode::encode_into_std_write(tag, tx, bincode_config()).and_then(|_| {
                            if tag == TAG_INDEX {
                                bincode::encode_into_std_write(index, tx, bincode_config())
                            } else {
                                bincode::encode_into_std_write(chunk, tx, bincode_config())
                            }
                        });
                    result = r.map(|_| ()).map_err(|e| e.to_string());
                });
                result?;
                tx.flush().map_err(|e| e.to_string())?;
            }
            Ok(())
        });
        let mut out = Vec::with_capacity(count as usize);
        for i in 0..count {
            let rx = &mut *rxs[(i % w as u64) as usize];
            let (v, c): (Vec<f32>, u64) = bincode::decode_from_std_read(rx, bincode_config())?;
            out.push(summarize(&v, c));
        }
        writer.join().map_err(|_| "pipe writer panicked")??;
        Ok(out)
    })
}

// ---------------------------------------------------------------------------------------------
// Command line

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Input {
    Memory,
    Generate,
    Index,
}

struct Args {
    chunk_bytes: usize,
    total_bytes: usize,
    workers: usize,
    input: Input,
    rounds: usize,
    engines: Option<Vec<String>>,
    /// Input and output ring bytes per worker (`--ring-bytes` sets both).
    input_ring_bytes: usize,
    queue_bytes: usize,
    output_ring_bytes: usize,
    pinning: Pinning,
    wait: WaitStrategy,
    /// Report the scheduler's view of the coordinator and the workers (one shmexec engine).
    sched: bool,
}

/// What the scheduler says of one process (or thread), from `/proc/<pid>/schedstat` and
/// `/proc/<pid>/status`: where a process pool loses time that a thread pool does not.
#[derive(Clone, Copy)]
struct Sched {
    /// When it was read.
    at: Instant,
    /// Time on a CPU.
    cpu_ns: u64,
    /// Time runnable but waiting for a CPU (the run queue).
    runq_ns: u64,
    /// Times it went to sleep (waited for something).
    sleeps: u64,
    /// Times it was preempted while runnable.
    preempted: u64,
}

impl Sched {
    fn read(pid: &str) -> Sched {
        let text =
            |f: &str| std::fs::read_to_string(format!("/proc/{pid}/{f}")).unwrap_or_default();
        let stat = text("schedstat");
        let mut nums = stat.split_whitespace().map(|v| v.parse().unwrap_or(0));
        let status = text("status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        Sched {
            at: Instant::now(),
            cpu_ns: nums.next().unwrap_or(0),
            runq_ns: nums.next().unwrap_or(0),
            sleeps: field("voluntary_ctxt_switches:"),
            preempted: field("nonvoluntary_ctxt_switches:"),
        }
    }

    fn read_all(pids: &[String]) -> Vec<Sched> {
        pids.iter().map(|p| Sched::read(p)).collect()
    }
}

/// Prints, per process, the share of the wall time it ran, waited for a CPU and slept.
fn print_sched(before: &[Sched], after: &[Sched]) {
    println!(
        "scheduler (whole run, all rounds): % of wall time on a CPU / waiting for a CPU / asleep"
    );
    for (i, (b, a)) in before.iter().zip(after).enumerate() {
        let wall = (a.at - b.at).as_nanos().max(1) as f64;
        let cpu = (a.cpu_ns - b.cpu_ns) as f64 / wall * 100.0;
        let runq = (a.runq_ns - b.runq_ns) as f64 / wall * 100.0;
        let who = if i == 0 {
            "coordinator".to_string()
        } else {
            format!("worker {}", i - 1)
        };
        println!(
            "  {who:<12} {cpu:5.1} / {runq:5.1} / {:5.1}   ({} sleeps, {} preemptions)",
            (100.0 - cpu - runq).max(0.0),
            a.sleeps - b.sleeps,
            a.preempted - b.preempted
        );
    }
}

fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        _ => return Err(format!("bad size unit in {s:?} (use KiB, MiB, GiB)")),
    };
    Ok(n * mult)
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        chunk_bytes: 4 << 20,
        total_bytes: 512 << 20,
        workers: 2,
        input: Input::Memory,
        rounds: 3,
        engines: None,
        input_ring_bytes: 64 << 20,
        queue_bytes: shmexec::DEFAULT_QUEUE_BYTES,
        output_ring_bytes: 64 << 20,
        pinning: Pinning::Auto,
        wait: WaitStrategy::Adaptive,
        sched: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--chunk-bytes" => a.chunk_bytes = parse_size(&value()?)?,
            "--total-bytes" => a.total_bytes = parse_size(&value()?)?,
            "--workers" => a.workers = value()?.parse().map_err(|e| format!("--workers: {e}"))?,
            "--rounds" => a.rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--ring-bytes" => {
                a.input_ring_bytes = parse_size(&value()?)?;
                a.output_ring_bytes = a.input_ring_bytes;
            }
            "--input-ring-bytes" => a.input_ring_bytes = parse_size(&value()?)?,
            "--queue-bytes" => a.queue_bytes = parse_size(&value()?)?,
            "--output-ring-bytes" => a.output_ring_bytes = parse_size(&value()?)?,
            "--engines" => a.engines = Some(value()?.split(',').map(str::to_owned).collect()),
            "--input" => {
                a.input = match value()?.as_str() {
                    "memory" => Input::Memory,
                    "generate" => Input::Generate,
                    "index" => Input::Index,
                    other => return Err(format!("--input {other}: use memory, generate or index")),
                }
            }
            "--pinning" => {
                a.pinning = match value()?.as_str() {
                    "auto" => Pinning::Auto,
                    "off" => Pinning::Off,
                    "spread" => Pinning::Spread,
                    "source-first" => Pinning::SourceFirst,
                    list if list.starts_with("cores:") => Pinning::Cores(
                        list["cores:".len()..]
                            .split(',')
                            .map(|c| c.parse().map_err(|e| format!("--pinning {list}: {e}")))
                            .collect::<Result<_, _>>()?,
                    ),
                    other => {
                        return Err(format!(
                            "--pinning {other}: use auto, off, spread, source-first or cores:1,2,..."
                        ));
                    }
                }
            }
            "--wait" => {
                a.wait = match value()?.as_str() {
                    "adaptive" => WaitStrategy::Adaptive,
                    "park" => WaitStrategy::Park,
                    "spin" => WaitStrategy::Spin,
                    other => return Err(format!("--wait {other}: use adaptive, park or spin")),
                }
            }
            "--sched" => a.sched = true,
            "-h" | "--help" => {
                return Err(
                    "usage: compare --chunk-bytes B --total-bytes T --workers W \
                            [--input memory|generate|index] [--rounds R] [--engines a,b] \
                            [--ring-bytes B] [--input-ring-bytes B] [--output-ring-bytes B] \
                            [--queue-bytes B] \
                            [--pinning auto|off|spread|source-first|cores:LIST] \
                            [--wait adaptive|park|spin] [--sched]"
                        .into(),
                );
            }
            other => return Err(format!("unknown argument {other} (try --help)")),
        }
    }
    if a.chunk_bytes < 4 || a.chunk_bytes % 4 != 0 || a.total_bytes < a.chunk_bytes {
        return Err("--chunk-bytes must be a positive multiple of 4, at most --total-bytes".into());
    }
    let one_shmexec = matches!(&a.engines, Some(e) if e.len() == 1 && e[0].starts_with("shmexec"));
    if a.sched && !one_shmexec {
        return Err("--sched reports on one shmexec engine: pass --engines with just one".into());
    }
    if a.workers == 0 || a.rounds == 0 {
        return Err("--workers and --rounds must be at least 1".into());
    }
    Ok(a)
}

/// Copies per input byte between two snapshots of a pool's stats.
fn copies_per_byte(before: &shmexec::PoolStats, after: &shmexec::PoolStats) -> f64 {
    (after.input_bytes_copied - before.input_bytes_copied) as f64
        / (after.input_bytes - before.input_bytes).max(1) as f64
}

fn max_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args) {
        eprintln!("compare: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), BoxError> {
    let n = args.chunk_bytes / 4;
    let chunks = (args.total_bytes / args.chunk_bytes) as u64;
    let total = chunks as usize * args.chunk_bytes;
    let w = args.workers;
    let input = args.input;

    let mut engines: Vec<&str> = vec!["seq", "rayon", "rayon-collect", "pipe"];
    if input == Input::Index {
        engines.push("shmexec-descr");
    } else {
        engines.extend(["shmexec-vec", "shmexec-builder"]);
    }
    if input == Input::Memory {
        engines.push("shmexec-shared");
    }
    if let Some(only) = &args.engines {
        if let Some(bad) = only.iter().find(|e| !engines.contains(&e.as_str())) {
            return Err(
                format!("engine {bad} is not available with {input:?} input: {engines:?}").into(),
            );
        }
        engines.retain(|e| only.iter().any(|o| o == e));
    }
    let wants = |e: &str| engines.contains(&e);

    // Everything that forks comes first, while this process has one thread.
    let builder = || {
        Pool::builder()
            .workers(w)
            .input_ring_bytes(args.input_ring_bytes)
            .queue_bytes(args.queue_bytes)
            .output_ring_bytes(args.output_ring_bytes)
            .pinning(args.pinning.clone())
            .wait_strategy(args.wait)
    };
    let mut vec_pool = if wants("shmexec-vec") || wants("shmexec-builder") {
        Some(builder().build(ArrayOutput(Transform))?)
    } else {
        None
    };
    let mut descr_pool = if wants("shmexec-descr") {
        Some(builder().build(ArrayOutput(Descriptor {
            n,
            scratch: Vec::new(),
        }))?)
    } else {
        None
    };
    let mut shared_pool = if wants("shmexec-shared") {
        let mut pool = builder()
            .shared_bytes(total)
            .build(ArrayOutput(SharedTransform))?;
        // Memory input for this engine: the chunks are generated into the shared region (where
        // the other engines' are generated into Vecs), before timing.
        for (i, c) in pool.shared_mut::<f32>()?.chunks_exact_mut(n).enumerate() {
            generate(i as u64, c);
        }
        Some(pool)
    } else {
        None
    };
    let mut pipes = if wants("pipe") {
        pipe_pool(w, n)?
    } else {
        Vec::new()
    };
    let rayon_pool = rayon::ThreadPoolBuilder::new().num_threads(w).build()?;

    let data: Vec<Vec<f32>> = if input == Input::Memory {
        (0..chunks).map(|i| generated(i, n)).collect()
    } else {
        Vec::new()
    };
    let data = &data;
    // The serial source every engine of this input mode reads.
    let chunk = |i: u64| -> std::borrow::Cow<'_, [f32]> {
        match input {
            Input::Memory => std::borrow::Cow::Borrowed(&data[i as usize]),
            _ => std::borrow::Cow::Owned(generated(i, n)),
        }
    };

    if args.wait == WaitStrategy::Spin && engines.len() > 1 {
        println!(
            "note: --wait spin: idle shmexec workers spin while the other engines run and slow \
             them down; do not read the ratios of this run as a comparison"
        );
    }
    println!(
        "compare: {chunks} chunks of {} KiB ({:.0} MiB), {w} workers, {input:?} input, {} rounds, \
         pinning {:?}",
        args.chunk_bytes >> 10,
        total as f64 / (1 << 20) as f64,
        args.rounds,
        args.pinning
    );

    // `--sched`: the processes of the one shmexec engine, the coordinator (this thread) first.
    let sched_pids: Vec<String> = if args.sched {
        let pool_pids = match engines[..] {
            ["shmexec-vec" | "shmexec-builder"] => vec_pool.as_ref().map(|p| p.pids()),
            ["shmexec-shared"] => shared_pool.as_ref().map(|p| p.pids()),
            ["shmexec-descr"] => descr_pool.as_ref().map(|p| p.pids()),
            _ => None,
        }
        .ok_or("--sched: no pool for this engine")?;
        std::iter::once("thread-self".to_string())
            .chain(pool_pids.iter().map(|p| p.to_string()))
            .collect()
    } else {
        Vec::new()
    };
    let sched_before = args.sched.then(|| Sched::read_all(&sched_pids));

    let mut reference: Option<Vec<Summary>> = None;
    let mut times: Vec<(String, Vec<f64>)> =
        engines.iter().map(|e| (e.to_string(), vec![])).collect();
    let mut copies = std::collections::BTreeMap::new();
    for _round in 0..args.rounds {
        for (name, secs) in &mut times {
            let t = Instant::now();
            let result: Vec<Summary> = match name.as_str() {
                "seq" => {
                    let mut out = vec![0f32; n];
                    let mut buf = vec![0f32; n];
                    (0..chunks)
                        .map(|i| {
                            let c = match input {
                                Input::Memory => &data[i as usize][..],
                                _ => {
                                    generate(i, &mut buf);
                                    &buf[..]
                                }
                            };
                            step(c, &mut out)
                        })
                        .collect()
                }
                "rayon" => rayon_pool.install(|| match input {
                    Input::Memory => data
                        .par_iter()
                        .map_init(|| vec![0f32; n], |out, c| step(c, out))
                        .collect(),
                    Input::Index => (0..chunks)
                        .into_par_iter()
                        .map_init(
                            || (vec![0f32; n], vec![0f32; n]),
                            |(x, out), i| {
                                generate(i, x);
                                step(x, out)
                            },
                        )
                        .collect(),
                    Input::Generate => {
                        let mut v: Vec<(u64, Summary)> = (0..chunks)
                            .map(|i| (i, generated(i, n)))
                            .par_bridge()
                            .map_init(|| vec![0f32; n], |out, (i, c)| (i, step(&c, out)))
                            .collect();
                        v.sort_by_key(|p| p.0);
                        v.into_iter().map(|p| p.1).collect()
                    }
                }),
                "rayon-collect" => {
                    let outs: Vec<(Vec<f32>, u64)> = rayon_pool.install(|| {
                        (0..chunks)
                            .into_par_iter()
                            .map(|i| {
                                let c = chunk(i);
                                let mut out = vec![0f32; n];
                                let count = transform(&c, &mut out);
                                (out, count)
                            })
                            .collect()
                    });
                    outs.iter().map(|(o, c)| summarize(o, *c)).collect()
                }
                "pipe" => {
                    let source = |i: u64, send: &mut dyn FnMut(u8, &[f32], u64)| match input {
                        Input::Index => send(TAG_INDEX, &[], i),
                        _ => send(TAG_CHUNK, &chunk(i), i),
                    };
                    run_pipe(&mut pipes, chunks, &source)?
                }
                "shmexec-vec" => {
                    let pool = vec_pool.as_mut().ok_or("no pool")?;
                    let before = pool.stats();
                    let r: Result<Vec<Summary>, shmexec::Error> = match input {
                        Input::Memory => pool.map(data).map(|o| Ok(consume(&*o?))).collect(),
                        _ => pool
                            .map((0..chunks).map(|i| generated(i, n)))
                            .map(|o| Ok(consume(&*o?)))
                            .collect(),
                    };
                    copies.insert("shmexec-vec", copies_per_byte(&before, &pool.stats()));
                    r?
                }
                "shmexec-builder" => {
                    let pool = vec_pool.as_mut().ok_or("no pool")?;
                    let before = pool.stats();
                    let r: Result<Vec<Summary>, shmexec::Error> = pool
                        .map_in_place(std::iter::repeat_n(n, chunks as usize), |i, slot| {
                            match input {
                                // The source's bytes are in RAM already: it copies them in.
                                Input::Memory => slot.copy_from_slice(&data[i as usize]),
                                // A digitizer writes straight into the ring.
                                _ => generate(i, slot),
                            }
                            Ok(())
                        })
                        .map(|o| Ok(consume(&*o?)))
                        .collect();
                    copies.insert("shmexec-builder", copies_per_byte(&before, &pool.stats()));
                    r?
                }
                "shmexec-shared" => {
                    let pool = shared_pool.as_mut().ok_or("no pool")?;
                    let before = pool.stats();
                    let r: Result<Vec<Summary>, shmexec::Error> = pool
                        .map((0..chunks as usize).map(|i| Span::new(i * n, n)))
                        .map(|o| Ok(consume(&*o?)))
                        .collect();
                    // Per byte of the chunks (not of the 16-byte spans that went through the
                    // rings): the spans are all the coordinator copies.
                    let after = pool.stats();
                    let copied = after.input_bytes_copied - before.input_bytes_copied;
                    copies.insert("shmexec-shared", copied as f64 / total as f64);
                    r?
                }
                "shmexec-descr" => {
                    let pool = descr_pool.as_mut().ok_or("no pool")?;
                    pool.map(0..chunks)
                        .map(|o| Ok(consume(&*o?)))
                        .collect::<Result<_, shmexec::Error>>()?
                }
                other => return Err(format!("unknown engine {other}").into()),
            };
            secs.push(t.elapsed().as_secs_f64());
            match &reference {
                None => reference = Some(result),
                Some(r) if *r == result => {}
                Some(r) => {
                    let first = r.iter().zip(&result).position(|(a, b)| a != b);
                    return Err(format!(
                        "{name} disagrees with {}: {} results against {}, first difference at chunk {first:?}",
                        engines[0],
                        result.len(),
                        r.len()
                    )
                    .into());
                }
            }
        }
    }

    let mbps = |secs: &[f64]| {
        let mut s = secs.to_vec();
        s.sort_by(f64::total_cmp);
        total as f64 / 1e6 / s[s.len() / 2]
    };
    let rates: Vec<(String, f64)> = times.iter().map(|(e, s)| (e.clone(), mbps(s))).collect();
    let rate = |e: &str| rates.iter().find(|r| r.0 == e).map(|r| r.1);
    println!("{:<16} {:>10} {:>12}", "engine", "MB/s", "vs rayon");
    for (e, r) in &rates {
        let vs = rate("rayon").map_or(String::from("-"), |b| format!("{:.2}x", r / b));
        println!("{e:<16} {r:>10.0} {vs:>12}");
    }
    let best = rates
        .iter()
        .filter(|r| r.0.starts_with("shmexec"))
        .max_by(|a, b| a.1.total_cmp(&b.1));
    let mut json = format!(
        "{{\"chunk_bytes\":{},\"total_bytes\":{total},\"workers\":{w},\"input\":\"{}\",\"rounds\":{}",
        args.chunk_bytes,
        format!("{input:?}").to_lowercase(),
        args.rounds
    );
    for (e, r) in &rates {
        json += &format!(",\"{}_mbps\":{r:.1}", e.replace('-', "_"));
    }
    if let Some((name, b)) = best {
        json += &format!(",\"best_shmexec\":\"{name}\"");
        for (key, peer) in [
            ("ratio_vs_rayon", "rayon"),
            ("ratio_vs_rayon_collect", "rayon-collect"),
            ("ratio_vs_pipe", "pipe"),
        ] {
            if let Some(p) = rate(peer) {
                json += &format!(",\"{key}\":{:.3}", b / p);
            }
        }
    }
    if let Some(r) = rate("rayon") {
        for (e, b) in rates.iter().filter(|r| r.0.starts_with("shmexec")) {
            json += &format!(
                ",\"ratio_vs_rayon_{}\":{:.3}",
                e.trim_start_matches("shmexec-"),
                b / r
            );
        }
    }
    for (e, c) in &copies {
        json += &format!(
            ",\"copies_per_input_byte_{}\":{c}",
            e.trim_start_matches("shmexec-")
        );
    }
    json += &format!(",\"coordinator_max_rss_kib\":{}}}", max_rss_kib());
    println!("{json}");
    if let Some(before) = sched_before {
        print_sched(&before, &Sched::read_all(&sched_pids));
    }
    Ok(())
}
