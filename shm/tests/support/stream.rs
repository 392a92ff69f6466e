//! A checked stream of frames between two processes: the body of the 100,000-frame test and of
//! the `ring_stress` example.
//!
//! Frame `seq` has a log-uniform length in 0 B ..= 1 MiB (most small, some large) and content
//! derived from `(seed, seq)`, so the consumer can check every byte of every frame, and the
//! order, without any side channel. The producer also sends its running checksum in the final
//! `End` frame; the consumer compares it with its own.

use std::time::{Duration, Instant};

use shmexec_shm::{ChildProcess, Error, FrameKind, Peer, Ring};

/// Largest frame of the stream.
pub const MAX_FRAME: usize = 1 << 20;

/// What the consumer saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub frames: u64,
    pub bytes: u64,
    /// Frames whose sequence number was not the one expected next.
    pub misordered: u64,
    /// Frames whose length or content differed from what `(seed, seq)` gives.
    pub corrupt: u64,
    /// Totals and checksum agree with the producer's, and no frame was corrupt.
    pub checksum_ok: bool,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Log-uniform length in `0..=MAX_FRAME` for frame `seq`.
pub fn frame_len(seed: u64, seq: u64) -> usize {
    let u = (splitmix(seed ^ seq.wrapping_mul(0xD6E8_FEB8_6659_FD93)) >> 11) as f64
        / (1u64 << 53) as f64;
    let len = ((MAX_FRAME + 1) as f64).powf(u) as usize - 1;
    len.min(MAX_FRAME)
}

fn word(base: u64, i: u64) -> u64 {
    base ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Fills `buf` with frame `seq`'s content; returns its checksum.
pub fn fill(buf: &mut [u8], seed: u64, seq: u64) -> u64 {
    let base = splitmix(seed.wrapping_add(seq));
    let (len, mut sum) = (buf.len(), 0u64);
    let mut chunks = buf.chunks_exact_mut(8);
    for (i, c) in (&mut chunks).enumerate() {
        let w = word(base, i as u64);
        c.copy_from_slice(&w.to_le_bytes());
        sum = sum.wrapping_add(w);
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let w = word(base, (len / 8) as u64).to_le_bytes();
        tail.copy_from_slice(&w[..tail.len()]);
        sum = sum.wrapping_add(tail.iter().map(|&b| u64::from(b)).sum::<u64>());
    }
    sum.wrapping_add(len as u64)
}

/// Checks `buf` against frame `seq`'s content; returns its checksum if every byte matches.
pub fn verify(buf: &[u8], seed: u64, seq: u64) -> Option<u64> {
    let base = splitmix(seed.wrapping_add(seq));
    let mut sum = 0u64;
    let mut bad = 0u64;
    let mut chunks = buf.chunks_exact(8);
    for (i, c) in (&mut chunks).enumerate() {
        let w = word(base, i as u64);
        let got = u64::from_le_bytes(c.try_into().expect("chunks of 8"));
        bad |= got ^ w;
        sum = sum.wrapping_add(got);
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        let w = word(base, (buf.len() / 8) as u64).to_le_bytes();
        if tail != &w[..tail.len()] {
            bad |= 1;
        }
        sum = sum.wrapping_add(tail.iter().map(|&b| u64::from(b)).sum::<u64>());
    }
    (bad == 0).then(|| sum.wrapping_add(buf.len() as u64))
}

fn encode(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn decode(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("chunks of 8")))
        .collect()
}

/// Streams `frames` frames parent -> forked child through a ring of `ring_bytes`, and returns
/// the child's summary with the producer's elapsed time (first reserve to summary received).
///
/// `fork` starts the consumer; it is a parameter because a test binary (many threads) and an
/// example (one thread) fork differently.
pub fn run(
    frames: u64,
    seed: u64,
    ring_bytes: usize,
    fork: impl FnOnce(Box<dyn FnOnce() -> i32>) -> Result<ChildProcess, Error>,
    mut progress: impl FnMut(u64),
) -> Result<(Summary, Duration), Error> {
    let data = Ring::create(ring_bytes)?;
    let back = Ring::create(4096)?;
    let parent = std::process::id() as i32;
    let (data2, back2) = (data.clone(), back.clone());
    let mut child = fork(Box::new(move || {
        match consume(&data2, &back2, parent, seed) {
            Ok(()) => 0,
            Err(_) => 3,
        }
    }))?;

    let mut tx = data.producer(child.peer()?)?;
    let mut rx = back.consumer(child.peer()?)?;
    let start = Instant::now();
    let (mut sum, mut bytes) = (0u64, 0u64);
    for seq in 0..frames {
        let len = frame_len(seed, seq);
        let mut grant = tx.reserve(len)?;
        sum = sum.wrapping_add(fill(&mut grant, seed, seq));
        grant.set_seq(seq);
        grant.commit();
        bytes += len as u64;
        if seq % 65_536 == 0 {
            progress(seq);
        }
    }
    let totals = encode(&[frames, bytes, sum]);
    let mut end = tx.reserve(totals.len())?;
    end.copy_from_slice(&totals);
    end.set_kind(FrameKind::End).set_seq(frames);
    end.commit();

    let report = rx.peek_timeout(Duration::from_secs(120))?;
    let w = decode(&report);
    let elapsed = start.elapsed();
    let summary = match w.as_slice() {
        [frames, bytes, misordered, corrupt, ok] => Summary {
            frames: *frames,
            bytes: *bytes,
            misordered: *misordered,
            corrupt: *corrupt,
            checksum_ok: *ok == 1,
        },
        _ => {
            return Err(Error::Corrupt {
                what: "summary frame".into(),
            });
        }
    };
    report.release();
    drop((tx, rx));
    match child.wait_timeout(Duration::from_secs(30))? {
        Some(status) if status.success() => Ok((summary, elapsed)),
        other => Err(Error::Corrupt {
            what: format!("consumer ended with {other:?}"),
        }),
    }
}

/// The child's side: read, check, and report.
fn consume(data: &Ring, back: &Ring, parent: i32, seed: u64) -> Result<(), Error> {
    let mut rx = data.consumer(Peer::process(parent)?)?;
    let mut tx = back.producer(Peer::process(parent)?)?;
    let (mut frames, mut bytes, mut sum, mut misordered, mut corrupt) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut next = 0u64;
    let ok = loop {
        let frame = rx.peek()?;
        if frame.kind() == FrameKind::End {
            let theirs = decode(&frame);
            break theirs == [frames, bytes, sum] && corrupt == 0;
        }
        if frame.seq() != next {
            misordered += 1;
        }
        next = frame.seq() + 1;
        match verify(&frame, seed, frame.seq()) {
            Some(s) if frame.len() == frame_len(seed, frame.seq()) => sum = sum.wrapping_add(s),
            _ => corrupt += 1,
        }
        frames += 1;
        bytes += frame.len() as u64;
        frame.release();
    };
    tx.send(&encode(&[
        frames,
        bytes,
        misordered,
        corrupt,
        u64::from(ok),
    ]))?;
    Ok(())
}
