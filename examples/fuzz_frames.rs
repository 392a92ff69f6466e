//! A million forged or corrupted ring frames and a million damaged archives.
//!
//! ```text
//! cargo run --release --example fuzz_frames -- [--cases 1000000] [--seed 1]
//! ```
//!
//! The same cases as `tests/corrupt_frames.rs` (10,000 there): every ring case ends in frames
//! read within bounds or an `Err`, every archive in a validated value or an `Err`; a panic, a
//! hang or a fault would end the run. The last line:
//! `cases=N bad_headers=B bad_headers_rejected=B frames_read=.. ring_errors=.. archives_ok=..
//! archives_rejected=.. secs=..`; it fails unless every invalid header was rejected.

#[path = "../tests/support/fuzz.rs"]
mod fuzz;

use fuzz::{Rng, Tally, archive_case, ring_case, segment};

fn main() {
    let (mut cases, mut seed) = (1_000_000u64, 1u64);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().and_then(|v| v.parse().ok());
        match (flag.as_str(), value) {
            ("--cases", Some(n)) => cases = n,
            ("--seed", Some(s)) => seed = u64::max(s, 1),
            _ => {
                eprintln!("usage: fuzz_frames [--cases N] [--seed S]");
                std::process::exit(2);
            }
        }
    }
    let start = std::time::Instant::now();
    let seg = segment();
    let mut rng = Rng(seed);
    let mut tally = Tally::default();
    for _ in 0..cases {
        ring_case(&seg, &mut rng, &mut tally);
        archive_case(&mut rng, &mut tally);
    }
    println!(
        "cases={cases} bad_headers={} bad_headers_rejected={} frames_read={} ring_errors={} \
         archives_ok={} archives_rejected={} secs={:.1}",
        tally.bad_headers,
        tally.bad_headers_rejected,
        tally.frames_read,
        tally.ring_errors,
        tally.archives_ok,
        tally.archives_rejected,
        start.elapsed().as_secs_f64()
    );
    if tally.bad_headers_rejected != tally.bad_headers {
        std::process::exit(1);
    }
}
