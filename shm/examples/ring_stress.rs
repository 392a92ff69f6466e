//! Streams N frames of log-uniform random size (0 B to 1 MiB) from this process to a forked
//! child through one shared-memory ring, checking every byte and the order on the other side.
//!
//! ```text
//! cargo run --release -p shmexec-shm --example ring_stress -- --frames 1000000
//! ```
//!
//! Options: `--frames N` (default 100000), `--ring-bytes B` (default 8 MiB), `--seed S`.
//! Ends with one line:
//! `frames=N bytes=B checksum_ok=true misordered=0 secs=S gbps=G`.

#[path = "../tests/support/stream.rs"]
mod stream;

use std::io::IsTerminal;
use std::process::ExitCode;

fn parse_args() -> Result<(u64, usize, u64), String> {
    let (mut frames, mut ring_bytes, mut seed) = (100_000u64, 8usize << 20, 0x5eedu64);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or(format!("{name} needs a value"))?
                .replace('_', "")
                .parse::<u64>()
                .map_err(|e| format!("{name}: {e}"))
        };
        match flag.as_str() {
            "--frames" => frames = value("--frames")?,
            "--ring-bytes" => ring_bytes = value("--ring-bytes")? as usize,
            "--seed" => seed = value("--seed")?,
            "-h" | "--help" => {
                return Err("usage: ring_stress [--frames N] [--ring-bytes B] [--seed S]".into());
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if ring_bytes < stream::MAX_FRAME + 64 {
        return Err(format!(
            "--ring-bytes must be at least {} to hold the largest frame",
            stream::MAX_FRAME + 64
        ));
    }
    Ok((frames, ring_bytes, seed))
}

fn main() -> ExitCode {
    let (frames, ring_bytes, seed) = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let tty = std::io::stderr().is_terminal();
    let progress = |seq: u64| {
        if tty && seq > 0 {
            eprint!("\r{seq}/{frames} frames sent");
        }
    };
    match stream::run(frames, seed, ring_bytes, shmexec_shm::fork, progress) {
        Ok((s, elapsed)) => {
            if tty {
                eprint!("\r");
            }
            let secs = elapsed.as_secs_f64();
            println!(
                "frames={} bytes={} checksum_ok={} misordered={} secs={:.3} gbps={:.2}",
                s.frames,
                s.bytes,
                s.checksum_ok,
                s.misordered,
                secs,
                s.bytes as f64 / secs / 1e9
            );
            if s.checksum_ok && s.misordered == 0 && s.frames == frames {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("\nring_stress failed: {e}");
            ExitCode::FAILURE
        }
    }
}
