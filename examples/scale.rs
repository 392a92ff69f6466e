//! Pool size: how long building, one small call and dropping take for W workers.
//!
//! ```text
//! cargo run --release --example scale -- 1 16 64 256
//! ```
//!
//! Each pool has 64 KiB rings and no pinning (W may exceed the cores), runs `4 W` items of a
//! few bytes, and is dropped. One line per W:
//!
//! ```text
//! W= 256 build    129.0 ms  map(1024)     9.1 ms  drop     77.0 ms
//! ```

use std::time::Instant;

use shmexec::Pinning;

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| {
            a.parse().unwrap_or_else(|e| {
                eprintln!("scale: {a}: {e} (give worker counts)");
                std::process::exit(2)
            })
        })
        .collect();
    for &w in &sizes {
        let task = shmexec::from_fn::<u64, _, _>(|&n| n.to_native() + 1);
        let t = Instant::now();
        let mut pool = shmexec::Pool::builder()
            .workers(w)
            .pinning(Pinning::Off)
            .ring_bytes(64 << 10)
            .build(task)
            .unwrap_or_else(|e| {
                eprintln!("scale: {w} workers: {e}");
                std::process::exit(1)
            });
        let built = t.elapsed();
        let t = Instant::now();
        let n = pool.map(0..(4 * w as u64)).filter(|r| r.is_ok()).count();
        let mapped = t.elapsed();
        let t = Instant::now();
        drop(pool);
        let dropped = t.elapsed();
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        println!(
            "W={w:4} build {:8.1} ms  map({n}) {:7.1} ms  drop {:8.1} ms",
            ms(built),
            ms(mapped),
            ms(dropped)
        );
    }
}
