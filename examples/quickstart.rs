//! The main job: a DAQ pipeline step on synthetic detector data.
//!
//! A digitizer gives chunks of raw records: 8 channels of `i16` waveform samples (10 ns per
//! sample), each chunk covering a time range. Per chunk, every channel gets its baseline
//! subtracted (mean of its first 64 samples) and a threshold peak finder turns pulses into
//! peaks (time, channel, area, height, width), sorted by time: the records -> peaks step of a
//! framework like strax. Chunks go to a pool of worker processes through shared memory; the
//! peaks come back in time order, checked against a sequential run of the same function.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```
//!
//! No flags. It streams about 2 GB (about 10 s on a 2-core machine, half of it the sequential
//! reference) and ends with one summary line.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use rkyv::{Archive, Deserialize, Serialize};
use shmexec::{BoxError, Pool, Samples, Task};

const CHANNELS: usize = 8;
const SAMPLES_PER_CHANNEL: usize = 256 * 1024;
const CHUNKS: u64 = 480; // 4 MiB each: ~2 GB
const NS_PER_SAMPLE: u64 = 10;
const BASELINE_SAMPLES: usize = 64;
const THRESHOLD: i32 = 40; // ADC counts above baseline

/// One chunk of raw records, as the digitizer delivers it.
#[derive(Archive, Serialize, Deserialize)]
struct Chunk {
    start_ns: u64,
    end_ns: u64,
    /// `CHANNELS` blocks of `SAMPLES_PER_CHANNEL` samples.
    samples: Vec<i16>,
}

/// A pulse found in one channel.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Peak {
    time_ns: u64,
    channel: u16,
    width: u32,
    height: i32,
    area: i64,
}

/// Low-pass filter taps (a smoothing window): peaks are found on the filtered signal, so that
/// noise does not split them.
const TAPS: [f32; 12] = [
    0.02, 0.04, 0.07, 0.10, 0.12, 0.15, 0.15, 0.12, 0.10, 0.07, 0.04, 0.02,
];

/// Baseline subtraction, low-pass filter and threshold peak finding for one chunk.
fn find_peaks(start_ns: u64, samples: &[i16]) -> Vec<Peak> {
    let mut peaks = Vec::new();
    let mut signal = vec![0f32; SAMPLES_PER_CHANNEL];
    for (ch, wave) in samples.chunks_exact(SAMPLES_PER_CHANNEL).enumerate() {
        let base: i32 = wave[..BASELINE_SAMPLES]
            .iter()
            .map(|&s| s as i32)
            .sum::<i32>()
            / BASELINE_SAMPLES as i32;
        // PMT pulses go negative: the signal is the baseline minus the sample.
        for (y, &s) in signal.iter_mut().zip(wave) {
            *y = (base - s as i32) as f32;
        }
        let mut open: Option<Peak> = None;
        for (i, &s) in wave.iter().enumerate() {
            let x = base - s as i32;
            let window = &signal[i.saturating_sub(TAPS.len() - 1)..=i];
            let smooth: f32 = window.iter().rev().zip(&TAPS).map(|(a, b)| a * b).sum();
            match (&mut open, smooth > THRESHOLD as f32) {
                (Some(p), true) => {
                    p.width += 1;
                    p.height = p.height.max(x);
                    p.area += x as i64;
                }
                (None, true) => {
                    open = Some(Peak {
                        time_ns: start_ns + i as u64 * NS_PER_SAMPLE,
                        channel: ch as u16,
                        width: 1,
                        height: x,
                        area: x as i64,
                    })
                }
                (Some(_), false) => peaks.extend(open.take()),
                (None, false) => {}
            }
        }
        peaks.extend(open);
    }
    peaks.sort_by_key(|p| (p.time_ns, p.channel));
    peaks
}

/// The worker's task: it reads the chunk's samples in place, in shared memory.
struct PeakFinder;

impl Task for PeakFinder {
    type Input = Chunk;
    type Output = Vec<Peak>;
    fn process(&mut self, chunk: &ArchivedChunk) -> Result<Vec<Peak>, BoxError> {
        Ok(find_peaks(
            chunk.start_ns.to_native(),
            chunk.samples.samples(),
        ))
    }
}

/// Synthetic digitizer: a deterministic baseline with noise and pulses, chunk by chunk.
struct Digitizer {
    noise: Vec<i16>,
    pulse: Vec<i16>,
}

impl Digitizer {
    fn new() -> Digitizer {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let noise = (0..65_536 + SAMPLES_PER_CHANNEL)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 17) as i16 - 8
            })
            .collect();
        // A PMT-like pulse: fast rise, slower fall.
        let pulse = (0..60)
            .map(|i| {
                let t = i as f64;
                (-400.0 * (1.0 - (-t / 2.0).exp()) * (-t / 12.0).exp()) as i16
            })
            .collect();
        Digitizer { noise, pulse }
    }

    fn chunk(&self, index: u64) -> Chunk {
        let mut samples = Vec::with_capacity(CHANNELS * SAMPLES_PER_CHANNEL);
        for ch in 0..CHANNELS as u64 {
            let offset = ((index * 7919 + ch * 104_729) % 65_536) as usize;
            let base = 15_000 + 100 * ch as i16;
            samples.extend(
                self.noise[offset..offset + SAMPLES_PER_CHANNEL]
                    .iter()
                    .map(|&n| base + n),
            );
            // ~40 pulses per channel per chunk, never in the baseline window.
            let wave = &mut samples[ch as usize * SAMPLES_PER_CHANNEL..];
            let mut at = 1_000 + ((index * 31 + ch * 17) % 3_000) as usize;
            while at + self.pulse.len() < SAMPLES_PER_CHANNEL {
                for (w, &p) in wave[at..].iter_mut().zip(&self.pulse) {
                    *w += p;
                }
                at += 5_000 + (at * 13 + index as usize) % 3_000;
            }
        }
        let start_ns = index * (SAMPLES_PER_CHANNEL as u64 * NS_PER_SAMPLE);
        Chunk {
            start_ns,
            end_ns: start_ns + SAMPLES_PER_CHANNEL as u64 * NS_PER_SAMPLE,
            samples,
        }
    }
}

fn same(a: &ArchivedPeak, b: &Peak) -> bool {
    a.time_ns == b.time_ns
        && a.channel == b.channel
        && a.width == b.width
        && a.height == b.height
        && a.area == b.area
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let chunk_bytes = CHANNELS * SAMPLES_PER_CHANNEL * 2;
    let total_bytes = chunk_bytes as u64 * CHUNKS;
    // Workers are forked before anything else starts threads.
    let mut pool = Pool::builder().build(PeakFinder)?;
    let digitizer = Digitizer::new();
    println!(
        "quickstart: {CHUNKS} chunks of {CHANNELS} channels x {SAMPLES_PER_CHANNEL} i16 samples \
         ({:.1} GB), {} worker processes",
        total_bytes as f64 / 1e9,
        pool.workers()
    );

    // Sequential reference first: the same function, in this process.
    let t = Instant::now();
    let reference: Vec<Vec<Peak>> = (0..CHUNKS)
        .map(|i| {
            let c = digitizer.chunk(i);
            find_peaks(c.start_ns, &c.samples)
        })
        .collect();
    let seq_secs = t.elapsed().as_secs_f64();

    // The pool: chunks are made on the fly and serialized into the workers' rings.
    let tty = std::io::stderr().is_terminal();
    let t = Instant::now();
    let mut last_report = Instant::now();
    let (mut peaks, mut mismatches, mut last_time, mut out_of_order) = (0usize, 0usize, 0u64, 0);
    for (i, result) in pool
        .map((0..CHUNKS).map(|i| digitizer.chunk(i)))
        .enumerate()
    {
        let found = result?;
        let want = &reference[i];
        if found.len() != want.len() || found.iter().zip(want).any(|(a, b)| !same(a, b)) {
            mismatches += 1;
        }
        for p in found.iter() {
            out_of_order += usize::from(p.time_ns.to_native() < last_time);
            last_time = p.time_ns.to_native();
        }
        peaks += found.len();
        if last_report.elapsed() > Duration::from_millis(500) {
            last_report = Instant::now();
            let done = (i as u64 + 1) * chunk_bytes as u64;
            let rate = done as f64 / 1e6 / t.elapsed().as_secs_f64();
            let line = format!(
                "  {:5.2} / {:.2} GB  {rate:6.0} MB/s  {peaks} peaks",
                done as f64 / 1e9,
                total_bytes as f64 / 1e9
            );
            if tty {
                eprint!("\r{line}");
            } else {
                eprintln!("{line}");
            }
        }
    }
    let pool_secs = t.elapsed().as_secs_f64();
    if tty {
        eprintln!();
    }
    let stats = pool.stats();
    drop(pool);

    let mbps = |s: f64| total_bytes as f64 / 1e6 / s;
    for w in &stats.workers {
        println!(
            "  worker {} (pid {}, core {:?}): {} chunks, {:.0} MB in, busy {:.1} s",
            w.index,
            w.pid,
            w.core,
            w.chunks,
            w.bytes_in as f64 / 1e6,
            w.busy.as_secs_f64()
        );
    }
    println!(
        "sequential {:.0} MB/s, shmexec {:.0} MB/s ({:.2}x), copies per input byte {:.0}",
        mbps(seq_secs),
        mbps(pool_secs),
        seq_secs / pool_secs,
        stats.copies_per_input_byte()
    );
    let ok = mismatches == 0 && out_of_order == 0 && peaks > 0;
    println!(
        "chunks={CHUNKS} bytes={total_bytes} peaks={peaks} matches_sequential={} \
         time_ordered={} mbps={:.0}",
        mismatches == 0,
        out_of_order == 0,
        mbps(pool_secs)
    );
    if !ok {
        return Err(
            format!("{mismatches} chunks differ, {out_of_order} peaks out of order").into(),
        );
    }
    Ok(())
}
