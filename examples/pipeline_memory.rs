//! Memory stays bounded in a pipeline with a slow last stage: the coordinator's resident memory
//! after a stream of N chunks and after one of 8 N is the same, because a slow stage holds back
//! the stages before it (their rings fill, their workers wait) up to the source, which is only
//! read as the first group's rings have room.
//!
//! ```text
//! cargo run --release --example pipeline_memory -- [--chunks N] [--chunk-kib K] [--slow-us U]
//! ```
//!
//! The source is an iterator that makes each chunk as it is asked for, so the program itself
//! holds one chunk at a time; what the rings hold is bounded by their sizes (printed).

use std::time::{Duration, Instant};

use shmexec::pipeline::Pipeline;
use shmexec::{Pool, Samples};

/// This process's resident and peak resident memory, in KiB (`/proc/self/status`).
fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number"))
        })
        .unwrap_or(default)
}

fn main() -> Result<(), shmexec::Error> {
    let args: Vec<String> = std::env::args().collect();
    let chunks = arg(&args, "--chunks", 200);
    let chunk_kib = arg(&args, "--chunk-kib", 1024) as usize;
    let slow = Duration::from_micros(arg(&args, "--slow-us", 2000));
    let ring_bytes = 16 << 20;

    let mut pipeline = Pipeline::<Vec<f32>>::builder()
        .map_fn("scale", |c| {
            c.samples().iter().map(|x| x * 2.0).collect::<Vec<f32>>()
        })
        .map_fn("slow", move |c| {
            std::thread::sleep(slow);
            c.samples().iter().fold(0f32, |m, &x| m.max(x))
        })
        .workers(1)
        .build(Pool::builder().workers(2).ring_bytes(ring_bytes))?;
    println!("{}", pipeline.plan());
    println!(
        "rings of {} MiB per worker and direction; chunks of {chunk_kib} KiB; the slow stage \
         sleeps {slow:?} per chunk",
        ring_bytes >> 20
    );

    let floats = chunk_kib * 1024 / 4;
    let mut after = Vec::new();
    for n in [chunks, 8 * chunks] {
        let start = Instant::now();
        let source = (0..n).map(|i| vec![i as f32; floats]);
        for (count, r) in pipeline.run(source).enumerate() {
            let max = r?.to_native();
            assert_eq!(max, (count as f32) * 2.0, "chunk {count}");
        }
        let (rss, hwm) = rss_kib();
        println!(
            "{n:>6} chunks ({:>6} MiB) in {:>6.2} s: coordinator RSS {:>7} KiB, peak {:>7} KiB",
            n as usize * chunk_kib / 1024,
            start.elapsed().as_secs_f64(),
            rss,
            hwm
        );
        after.push(rss);
    }
    let stats = pipeline.stats();
    println!(
        "RSS after 8x / after 1x: {:.3}; bytes copied between groups: {}",
        after[1] as f64 / after[0] as f64,
        stats.copied_between_groups
    );
    Ok(())
}
