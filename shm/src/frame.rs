//! The frame format: a 64-byte header slot, then the payload, padded to 64 bytes.
//!
//! ```text
//! offset 0        48                64                64 + len    64 + round_up(len, 64)
//!        | header | (unused)        | payload ...     | padding    |
//! ```
//!
//! Every frame starts on a 64-byte boundary of the ring, so every payload is 64-byte aligned: a
//! cache line, enough for rkyv's 8-byte types and for 32/64-byte SIMD loads in place.
//!
//! The header slot starts with the frame's **stamp**, an `AtomicU64` holding the frame's ring
//! position plus one: the producer stores it last (`Release`), and the consumer polls it
//! (`Acquire`) to learn that the frame is published. Then come the payload length, a sequence
//! number, a kind (with the frame's part index), a check word derived from all four, and two
//! words the layers above carry with the frame (not checked: any value is valid). The consumer
//! copies the fields out of shared memory once and validates the copy, so a corrupt or hostile
//! header is an error and never an out-of-bounds read.

use crate::error::{Error, Result};

/// Frame (and payload) alignment in bytes.
pub const FRAME_ALIGN: usize = 64;
/// Bytes taken by the header slot in front of each payload.
pub const HEADER_LEN: usize = 64;

/// What a frame means to the layers above. The transport delivers them all alike.
///
/// Several frames may share a sequence number (one input, several outputs): all but the last
/// are [`FrameKind::More`], and each carries its position among them (its *part*, see
/// [`crate::Grant::set_part`]), so that a reader can tell a repeated part from a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u32)]
pub enum FrameKind {
    /// A payload (the last, or only, one of its sequence number).
    #[default]
    Data = 1,
    /// A payload that describes a failure (for example a task's error message).
    Error = 2,
    /// The sender will send nothing more (the payload may carry a summary).
    End = 3,
    /// A payload, and more frames of the same sequence number follow.
    More = 4,
    /// Closes its sequence number without a payload of its own (after zero or more `More`).
    Done = 5,
}

/// The largest part index a frame carries: the kind word keeps the kind in its low byte and
/// the part in the 24 bits above it.
pub const MAX_PART: u32 = (1 << 24) - 1;

/// The kind word of a frame: kind and part index together (both covered by the check word).
pub(crate) fn kind_word(kind: FrameKind, part: u32) -> u32 {
    kind as u32 | ((part & MAX_PART) << 8)
}

/// The kind word of a padding frame: fills the end of the ring when the next frame would not
/// fit contiguously before the wrap. Consumers skip it without showing it to their caller.
pub(crate) const KIND_PAD: u32 = 0x5041_4421;

const CHECK_SALT: u32 = 0x9E37_79B9;

/// Byte offset of the fields behind the stamp in the header slot.
pub(crate) const FIELDS_AT: usize = 8;

/// The header fields as they lie in the ring, after the 8-byte stamp.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct FrameHeader {
    kind: u32,
    check: u32,
    len: u64,
    seq: u64,
    /// Two words the layers above carry with the frame (the executor: when its item started
    /// and when this output was finished). Not covered by the check: any value is valid.
    words: [u64; 2],
}

const _: () = assert!(FIELDS_AT + std::mem::size_of::<FrameHeader>() <= HEADER_LEN);

/// A header that passed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decoded {
    Pad {
        len: u64,
    },
    Frame {
        kind: FrameKind,
        part: u32,
        len: u64,
        seq: u64,
    },
}

impl FrameHeader {
    /// The fields of a frame at ring position `at`.
    pub(crate) fn new(at: u64, kind: u32, len: u64, seq: u64) -> FrameHeader {
        FrameHeader {
            kind,
            check: check_word(stamp(at), kind, len, seq),
            len,
            seq,
            words: [0; 2],
        }
    }

    /// The header with the two carried words set.
    pub(crate) fn with_words(mut self, words: [u64; 2]) -> FrameHeader {
        self.words = words;
        self
    }

    /// The two carried words.
    pub(crate) fn words(&self) -> [u64; 2] {
        self.words
    }

    /// Validates fields read at ring position `at` (whose stamp matched).
    pub(crate) fn decode(&self, at: u64) -> Result<Decoded> {
        if self.check != check_word(stamp(at), self.kind, self.len, self.seq) {
            return Err(Error::corrupt(format!(
                "frame header at ring position {at} fails its check (kind {:#x}, len {}, seq {})",
                self.kind, self.len, self.seq
            )));
        }
        if self.kind == KIND_PAD {
            return Ok(Decoded::Pad { len: self.len });
        }
        let kind = match self.kind & 0xff {
            1 => FrameKind::Data,
            2 => FrameKind::Error,
            3 => FrameKind::End,
            4 => FrameKind::More,
            5 => FrameKind::Done,
            _ => {
                let other = self.kind;
                return Err(Error::corrupt(format!(
                    "frame header at ring position {at} has unknown kind {other:#x}"
                )));
            }
        };
        Ok(Decoded::Frame {
            kind,
            part: self.kind >> 8,
            len: self.len,
            seq: self.seq,
        })
    }
}

/// The four 64-bit words (stamp, kind and check word, length, sequence number) that a producer
/// writes at the start of the header slot of a frame at ring position `at`, for fault-injection
/// tests that forge the headers a buggy or hostile peer could write: the check word is right,
/// the fields are whatever the caller says. Nothing else needs it.
#[doc(hidden)]
pub fn forged_header_words(at: u64, kind: u32, len: u64, seq: u64) -> [u64; 4] {
    let h = FrameHeader::new(at, kind, len, seq);
    [
        stamp(at),
        u64::from(h.kind) | (u64::from(h.check) << 32),
        h.len,
        h.seq,
    ]
}

/// The kind word of padding frames, for the same tests.
#[doc(hidden)]
pub const PAD_KIND_WORD: u32 = KIND_PAD;

/// The stamp of a frame published at ring position `at`. Positions are multiples of 64, so a
/// stamp is never 0, the value that marks "no frame here yet".
pub(crate) fn stamp(at: u64) -> u64 {
    at.wrapping_add(1)
}

fn check_word(stamp: u64, kind: u32, len: u64, seq: u64) -> u32 {
    let mixed = (len ^ seq.rotate_left(17) ^ stamp.rotate_left(41) ^ (u64::from(kind) << 32))
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((mixed >> 32) as u32) ^ CHECK_SALT
}

/// Ring bytes taken by a frame with `len` payload bytes, or `None` if that overflows.
pub(crate) fn frame_bytes(len: u64) -> Option<u64> {
    let align = FRAME_ALIGN as u64;
    len.checked_add(align - 1)
        .map(|l| l & !(align - 1))
        .and_then(|l| l.checked_add(HEADER_LEN as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_corruption() {
        let h = FrameHeader::new(128, FrameKind::End as u32, 1234, 99);
        // The same fields read at another position (a stale header of an earlier lap) fail.
        assert!(matches!(h.decode(128 + 4096), Err(Error::Corrupt { .. })));
        assert_eq!(
            h.decode(128).unwrap(),
            Decoded::Frame {
                kind: FrameKind::End,
                part: 0,
                len: 1234,
                seq: 99
            }
        );
        let mut bad = h;
        bad.len = 1 << 40;
        assert!(matches!(bad.decode(128), Err(Error::Corrupt { .. })));
        let unknown = FrameHeader::new(0, 77, 0, 0);
        assert!(matches!(unknown.decode(0), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn sizes() {
        assert_eq!(frame_bytes(0), Some(64));
        assert_eq!(frame_bytes(1), Some(128));
        assert_eq!(frame_bytes(64), Some(128));
        assert_eq!(frame_bytes(65), Some(192));
        assert_eq!(frame_bytes(u64::MAX), None);
    }
}
