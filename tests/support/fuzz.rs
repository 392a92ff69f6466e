//! Corrupted and forged frames thrown at the ring reader and the archive validator. Shared by
//! `tests/corrupt_frames.rs` (10,000 cases of each) and `examples/fuzz_frames.rs` (1,000,000).
//!
//! Each case must end in frames read within bounds or a clean `Err`: never a panic, a hang (all
//! reads are `try_`) or an access outside the mapping.

#![allow(dead_code)]

use std::sync::Arc;

use shmexec::shm::frame::{PAD_KIND_WORD, forged_header_words};
use shmexec::shm::{CONTROL_LEN, Peer, Ring, Segment};

/// Deterministic pseudo-random numbers (xorshift), so failures reproduce.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What the cases saw, so that a run can show both paths were taken.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub frames_read: u64,
    pub ring_errors: u64,
    /// Cases whose first header (at the consumer's position) is invalid: bad check word, kind
    /// or length. Each must be an `Err`.
    pub bad_headers: u64,
    /// Of those, the ones the reader rejected (must equal `bad_headers`).
    pub bad_headers_rejected: u64,
    pub archives_ok: u64,
    pub archives_rejected: u64,
}

/// Largest ring a case uses.
const MAX_CAP: usize = 64 * 64;

/// A segment reused by every ring case (re-initialised each time).
pub fn segment() -> Arc<Segment> {
    Arc::new(Segment::new(Ring::footprint(MAX_CAP)).expect("segment"))
}

fn poke(seg: &Segment, offset: usize, word: u64) {
    seg.atomic_u64(offset)
        .expect("in the segment, 8-aligned")
        .store(word, std::sync::atomic::Ordering::Release);
}

/// One ring case: some honest traffic, then forged headers and scribbled words at and after
/// the consumer's position, then up to 8 reads.
pub fn ring_case(seg: &Arc<Segment>, rng: &mut Rng, tally: &mut Tally) {
    let cap = 64 * (2 + rng.below(63) as usize);
    let ring = Ring::init_in(Arc::clone(seg), 0, cap).expect("ring");
    let mut tx = ring.producer(Peer::unwatched()).expect("producer");
    let mut rx = ring.consumer(Peer::unwatched()).expect("consumer");
    // Empty frames take 64 bytes each and never need padding: afterwards the consumer reads
    // at position 64 * m.
    let m = rng.below(200);
    for _ in 0..m {
        tx.send(&[]).expect("send");
        rx.try_peek().expect("peek").expect("frame").release();
    }
    let mut at = 64 * m;
    for _ in 0..1 + rng.below(3) {
        let off = (at % cap as u64) as usize;
        let kind = match rng.below(8) {
            0 => PAD_KIND_WORD,
            1 => rng.next() as u32,
            // 1..=6: data, error, end, more, done, one past; with a part index now and then
            k => (k as u32 - 1) | ((rng.below(2) as u32 * rng.next() as u32) << 8),
        };
        let len = match rng.below(4) {
            0 => rng.below(64),
            1 => rng.below(2 * cap as u64),
            2 => cap as u64 - 64 - off as u64 + rng.below(3), // around the end of the ring
            _ => rng.next(),
        };
        let words = forged_header_words(at, kind, len, rng.next());
        for (i, w) in words.iter().enumerate() {
            poke(seg, CONTROL_LEN + off + 8 * i, *w);
        }
        if rng.below(4) == 0 {
            // And a scribble anywhere in the data area (headers included).
            let word = rng.below(cap as u64 / 8) as usize;
            poke(seg, CONTROL_LEN + 8 * word, rng.next());
        }
        at += 64 * (1 + rng.below(4));
    }
    // What the first read must give, from the words now at the consumer's position.
    let first_off = (64 * m % cap as u64) as usize;
    let word = |i: usize| {
        seg.atomic_u64(CONTROL_LEN + first_off + 8 * i)
            .expect("in the segment")
            .load(std::sync::atomic::Ordering::Acquire)
    };
    let words = [word(0), word(1), word(2), word(3)];
    let first_at = 64 * m;
    let room = (cap - first_off) as u64;
    let bad = words[0] == first_at + 1 && {
        let (kind, len, seq) = (words[1] as u32, words[2], words[3]);
        let check_ok = forged_header_words(first_at, kind, len, seq)[1] == words[1];
        let fits = len
            .checked_add(63)
            .map(|l| l / 64 * 64 + 64)
            .is_some_and(|total| total <= room);
        !check_ok
            || match kind {
                k if k == PAD_KIND_WORD => len.checked_add(64) != Some(room),
                k if (1..=5).contains(&(k & 0xff)) => !fits,
                _ => true,
            }
    };
    if bad {
        tally.bad_headers += 1;
        if rx.try_peek().is_err() {
            tally.bad_headers_rejected += 1;
        }
    }
    for _ in 0..8 {
        match rx.try_peek() {
            Ok(Some(f)) => {
                // Touch every byte: it must lie inside the mapping.
                let sum = f.iter().fold(0u8, |a, &b| a.wrapping_add(b));
                std::hint::black_box(sum);
                tally.frames_read += 1;
                f.release();
            }
            Ok(None) => break,
            Err(_) => {
                tally.ring_errors += 1;
                break;
            }
        }
    }
}

type Sample = (Vec<f32>, String, u64, Vec<(u32, i16)>);

/// One validator case: a valid archive with bytes flipped, cut short or replaced by noise,
/// checked with rkyv's bytecheck as the coordinator checks outputs.
pub fn archive_case(rng: &mut Rng, tally: &mut Tally) {
    let value: Sample = (
        (0..rng.below(64)).map(|i| i as f32).collect(),
        "peaks".repeat(rng.below(20) as usize),
        rng.next(),
        (0..rng.below(8)).map(|i| (i as u32, -(i as i16))).collect(),
    );
    let valid = rkyv::to_bytes::<rkyv::rancor::Error>(&value).expect("serialize");
    let mut bytes = rkyv::util::AlignedVec::<16>::new();
    match rng.below(4) {
        0 => {
            bytes.extend_from_slice(&valid[..valid.len() - rng.below(valid.len() as u64) as usize])
        }
        1 => (0..rng.below(256)).for_each(|_| bytes.push(rng.next() as u8)),
        _ => {
            bytes.extend_from_slice(&valid);
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(bytes.len() as u64) as usize;
                bytes[i] ^= 1 << rng.below(8);
            }
        }
    }
    match rkyv::access::<rkyv::Archived<Sample>, rkyv::rancor::Error>(&bytes) {
        Ok(a) => {
            let mut acc = a.0.iter().map(|x| x.to_native()).sum::<f32>() as u64;
            acc = acc
                .wrapping_add(a.1.len() as u64)
                .wrapping_add(a.2.to_native());
            for p in a.3.iter() {
                acc = acc.wrapping_add(u64::from(p.0.to_native()));
            }
            std::hint::black_box(acc);
            tally.archives_ok += 1;
        }
        Err(_) => tally.archives_rejected += 1,
    }
}
