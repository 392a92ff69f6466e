//! Executor benchmarks: the cost per chunk (tiny chunks, so overhead is all there is) and
//! throughput for 64 KiB and 4 MiB chunks, serialized (`map`), written in place
//! (`map_in_place`) and read in place from the shared region (`shared`: spans), beside the same
//! work on one thread in this process.
//!
//! ```text
//! cargo bench --bench executor
//! ```

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use shmexec::shared::{ArchivedSpan, Span};
use shmexec::{ArrayOutput, ArrayTask, BoxError, Pool, Samples};

/// Scale by 0.5 and count samples above 1.0 (the compare harness's transform, simplified).
struct Halve;

impl ArrayTask for Halve {
    type Input = Vec<f32>;
    type Sample = f32;
    type Meta = u64;
    fn output_len(&mut self, x: &rkyv::Archived<Vec<f32>>) -> usize {
        x.len()
    }
    fn process(&mut self, x: &rkyv::Archived<Vec<f32>>, out: &mut [f32]) -> Result<u64, BoxError> {
        Ok(halve(x.samples(), out))
    }
}

/// [`Halve`] over a span of the pool's shared region.
struct HalveSpan;

impl ArrayTask for HalveSpan {
    type Input = Span<f32>;
    type Sample = f32;
    type Meta = u64;
    fn output_len(&mut self, span: &ArchivedSpan<f32>) -> usize {
        span.len() as usize
    }
    fn process(&mut self, span: &ArchivedSpan<f32>, out: &mut [f32]) -> Result<u64, BoxError> {
        Ok(halve(span.get()?, out))
    }
}

fn halve(x: &[f32], out: &mut [f32]) -> u64 {
    let mut n = 0;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v * 0.5;
        n += u64::from(*o > 1.0);
    }
    n
}

const ITEMS_PER_ITER: u64 = 1000;

fn main() {
    // Pools fork, so they are built before criterion runs anything.
    let mut tiny = Pool::builder()
        .workers(2)
        .ring_bytes(1 << 20)
        .build(shmexec::from_fn::<u64, _, _>(|&n| n.to_native() ^ 1))
        .expect("pool");
    let mut arrays = Pool::builder()
        .workers(2)
        .build(ArrayOutput(Halve))
        .expect("pool");

    // Room for the largest case below: 32 chunks of 4 MiB.
    let mut spans = Pool::builder()
        .workers(2)
        .shared_bytes(128 << 20)
        .build(ArrayOutput(HalveSpan))
        .expect("pool");

    let mut sink = Pool::builder()
        .workers(2)
        .build(shmexec::from_fn::<Vec<f32>, _, _>(|c| c.len() as u64))
        .expect("pool");

    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();

    let mut g = c.benchmark_group("overhead");
    g.throughput(Throughput::Elements(ITEMS_PER_ITER));
    g.bench_function("map_u64_ordered", |b| {
        b.iter(|| {
            let sum: u64 = tiny
                .map(0..ITEMS_PER_ITER)
                .map(|r| r.expect("item").to_native())
                .sum();
            black_box(sum)
        })
    });
    g.bench_function("map_u64_unordered", |b| {
        b.iter(|| {
            let sum: u64 = tiny
                .map_unordered(0..ITEMS_PER_ITER)
                .map(|r| r.expect("item").to_native())
                .sum();
            black_box(sum)
        })
    });
    g.finish();

    let mut g = c.benchmark_group("throughput");
    for (label, bytes, chunks) in [("64KiB", 64 << 10, 512), ("4MiB", 4 << 20, 32)] {
        let n = bytes / 4;
        let data: Vec<Vec<f32>> = (0..chunks).map(|i| vec![i as f32; n]).collect();
        g.throughput(Throughput::Bytes((bytes * chunks) as u64));
        g.bench_with_input(BenchmarkId::new("one_thread", label), &data, |b, data| {
            let mut out = vec![0f32; n];
            b.iter(|| data.iter().map(|c| halve(c, &mut out)).sum::<u64>())
        });
        g.bench_with_input(BenchmarkId::new("map", label), &data, |b, data| {
            b.iter(|| {
                arrays
                    .map(data)
                    .map(|r| r.expect("item").1.to_native())
                    .sum::<u64>()
            })
        });
        g.bench_with_input(BenchmarkId::new("map_in_place", label), &data, |b, data| {
            b.iter(|| {
                arrays
                    .map_in_place(std::iter::repeat_n(n, chunks), |i, slot| {
                        slot.copy_from_slice(&data[i as usize]);
                        Ok(())
                    })
                    .map(|r| r.expect("item").1.to_native())
                    .sum::<u64>()
            })
        });
        // The same chunks, placed in the shared region before timing.
        let region = spans.shared_mut::<f32>().expect("region");
        for (c, chunk) in region.chunks_exact_mut(n).zip(&data) {
            c.copy_from_slice(chunk);
        }
        g.bench_function(BenchmarkId::new("shared", label), |b| {
            b.iter(|| {
                spans
                    .map((0..chunks).map(|i| Span::new(i * n, n)))
                    .map(|r| r.expect("item").1.to_native())
                    .sum::<u64>()
            })
        });
    }
    g.finish();

    // Copy-in from sources at several offsets past a page boundary. On AMD Zen a copy of
    // 4-256 KiB whose destination lies 1-16 bytes past its source modulo 4 KiB was seen to run
    // at a twentieth of the usual speed (DESIGN.md). Ring payloads start 64-byte aligned, and
    // 256 KiB frames step through every 64-byte offset of a page, so sources at 48-60 bytes
    // past a page meet that window on some frames. The task does nothing: this is the
    // coordinator's copy.
    let mut g = c.benchmark_group("copy_in_256KiB");
    let (n, chunks) = (64 << 10, 64usize);
    let src: Vec<f32> = (0..n + 4096).map(|i| i as f32).collect();
    let page = (src.as_ptr() as usize).next_multiple_of(4096) - src.as_ptr() as usize;
    g.throughput(Throughput::Bytes((n * 4 * chunks) as u64));
    for offset in [0usize, 16, 48, 60] {
        let from = (page + offset) / 4;
        g.bench_function(BenchmarkId::new("source_offset", offset), |b| {
            b.iter(|| {
                sink.map_in_place(std::iter::repeat_n(n, chunks), |_, slot| {
                    slot.copy_from_slice(&src[from..from + n]);
                    Ok(())
                })
                .map(|r| r.expect("item").to_native())
                .sum::<u64>()
            })
        });
    }
    g.finish();
    c.final_summary();
}
