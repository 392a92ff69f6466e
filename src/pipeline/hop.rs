//! Hops: an item going from one group of a pipeline to the next with no copy.
//!
//! A group's worker publishes its output frame in its own output ring, as any worker does. The
//! coordinator, the ring's only consumer, holds the frame (so its producer cannot reuse the
//! bytes) and places a [`Hop`] (32 bytes: which worker's ring, the frame's position, length,
//! sequence number and part) into the input ring of a worker of the next group. That worker
//! reads the frame where it lies, through its own mapping of the upstream ring (it was forked
//! after the ring existed), and runs its stages on it. The coordinator moves tens of bytes per
//! item, whatever the chunk's size.
//!
//! When the downstream worker is done with the frame is said by its input ring: a worker
//! releases its input last, after the item's closing frame and `item_closed`, so the
//! coordinator drops its hold on the upstream frame once the ring's released position has
//! passed the hop (`Groups::release_pins`), or once the worker is given up. A downstream worker
//! that dies before that leaves the hop in its input ring; its successor reads the same frame
//! again, which is still held.
//! A hop whose frame is not there any more (a bug, or memory written by someone else) fails the
//! item as an invalid input: [`shmexec_shm::Ring::read_held`] checks the frame's stamp and
//! header against the hop.

use shmexec_shm::{HeldFrame, Ring};

use super::fuse::Chain;
use crate::error::BoxError;
use crate::task::WorkerInfo;
use crate::task::bytes::{ByteTask, ItemFailure};
use crate::task::sink::OutputSink;

/// The size of a hop in the input ring.
pub(crate) const HOP_LEN: usize = 32;

/// Where a frame of the upstream group lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hop {
    /// The upstream worker whose output ring holds the frame.
    pub(crate) worker: u32,
    pub(crate) part: u32,
    pub(crate) pos: u64,
    pub(crate) len: u64,
    pub(crate) seq: u64,
}

impl Hop {
    /// The hop to `frame`, held from the output ring of upstream worker `worker`.
    pub(crate) fn to(worker: usize, frame: &HeldFrame) -> Hop {
        Hop {
            worker: worker as u32,
            part: frame.part(),
            pos: frame.position(),
            len: frame.len() as u64,
            seq: frame.seq(),
        }
    }

    /// Writes the hop into `out` (at least [`HOP_LEN`] bytes), little-endian.
    pub(crate) fn write(&self, out: &mut [u8]) -> usize {
        out[0..4].copy_from_slice(&self.worker.to_le_bytes());
        out[4..8].copy_from_slice(&self.part.to_le_bytes());
        out[8..16].copy_from_slice(&self.pos.to_le_bytes());
        out[16..24].copy_from_slice(&self.len.to_le_bytes());
        out[24..32].copy_from_slice(&self.seq.to_le_bytes());
        HOP_LEN
    }

    /// Reads a hop from an input frame's payload.
    pub(crate) fn read(input: &[u8]) -> Option<Hop> {
        if input.len() != HOP_LEN {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes(input[i..i + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |i: usize| u64::from_le_bytes(input[i..i + 8].try_into().unwrap_or([0; 8]));
        Some(Hop {
            worker: u32_at(0),
            part: u32_at(4),
            pos: u64_at(8),
            len: u64_at(16),
            seq: u64_at(24),
        })
    }
}

/// The first bytes of a descriptor of a saved chunk (a stage's output served from its cache):
/// then the chunk's length (8 bytes, little-endian) and its file's path.
const FILE_MAGIC: &[u8; 8] = b"shmxfile";

/// A saved chunk's file, as the next group's workers read it: mapped where the page cache holds
/// it, no copy.
pub(crate) struct FileChunk<'a> {
    pub(crate) len: u64,
    pub(crate) path: &'a std::path::Path,
}

impl FileChunk<'_> {
    /// Bytes of the descriptor.
    pub(crate) fn encoded_len(&self) -> usize {
        FILE_MAGIC.len() + 8 + self.path.as_os_str().len()
    }

    /// Writes the descriptor into `out` (at least [`FileChunk::encoded_len`] bytes).
    pub(crate) fn write(&self, out: &mut [u8]) -> usize {
        use std::os::unix::ffi::OsStrExt;
        let path = self.path.as_os_str().as_bytes();
        out[..8].copy_from_slice(FILE_MAGIC);
        out[8..16].copy_from_slice(&self.len.to_le_bytes());
        out[16..16 + path.len()].copy_from_slice(path);
        self.encoded_len()
    }

    fn read(input: &[u8]) -> Option<FileChunk<'_>> {
        use std::os::unix::ffi::OsStrExt;
        let rest = input.strip_prefix(FILE_MAGIC)?;
        let len = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
        let path = std::path::Path::new(std::ffi::OsStr::from_bytes(&rest[8..]));
        Some(FileChunk { len, path })
    }
}

/// What a worker of a group after the first runs: it reads each hop's frame in the upstream
/// group's output rings (or a saved chunk's file, when the stages before are served from their
/// cache) and runs its chain of stages on it.
pub(crate) struct HopReader {
    /// The upstream group's output rings, one per upstream worker.
    pub(crate) upstream: Vec<Ring>,
    pub(crate) chain: Chain,
}

impl ByteTask for HopReader {
    fn init(&mut self, worker: &WorkerInfo) -> Result<(), BoxError> {
        self.chain.init(worker)
    }

    fn run(&mut self, input: &[u8], out: &mut OutputSink<'_>) -> Result<(), ItemFailure> {
        if let Some(file) = FileChunk::read(input) {
            // SAFETY: `MappedFile::open` requires that nothing change the file while it is
            // mapped. The descriptor names a chunk of a complete saved stream, which the store
            // wrote once under a temporary name and never writes again (`crate::store`); the
            // coordinator checked its length and checksum before handing it on, and the
            // length is checked again below, before any byte is read.
            let map = unsafe { shmexec_shm::MappedFile::open(file.path) }.map_err(|e| {
                ItemFailure::InvalidInput(format!("saved chunk {}: {e}", file.path.display()))
            })?;
            if map.len() as u64 != file.len {
                return Err(ItemFailure::InvalidInput(format!(
                    "saved chunk {} is {} bytes, not {}",
                    file.path.display(),
                    map.len(),
                    file.len
                )));
            }
            return self.chain.run(&map, out);
        }
        let hop = Hop::read(input).ok_or_else(|| {
            ItemFailure::InvalidInput(format!("a hop is {HOP_LEN} bytes, not {}", input.len()))
        })?;
        let ring = self.upstream.get(hop.worker as usize).ok_or_else(|| {
            ItemFailure::InvalidInput(format!("no upstream worker {}", hop.worker))
        })?;
        let frame = ring
            .read_held(hop.pos, hop.len, hop.seq, hop.part)
            .map_err(|e| ItemFailure::InvalidInput(format!("the upstream frame: {e}")))?;
        self.chain.run(frame, out)
    }

    fn item_closed(&mut self, seq: u64, ok: bool) {
        self.chain.item_closed(seq, ok)
    }

    fn finish(&mut self, worker: &WorkerInfo) {
        self.chain.finish(worker)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hop_round_trips_and_a_wrong_length_is_refused() {
        let hop = Hop {
            worker: 3,
            part: 7,
            pos: 1 << 40,
            len: 12345,
            seq: u64::MAX - 1,
        };
        let mut buf = [0u8; HOP_LEN];
        assert_eq!(hop.write(&mut buf), HOP_LEN);
        assert_eq!(Hop::read(&buf), Some(hop));
        assert_eq!(Hop::read(&buf[..31]), None);
    }
}
