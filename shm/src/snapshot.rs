//! [`Snapshots`]: the last two states of a process, in shared memory, each tagged with the
//! sequence number of the item after which it was taken, so that a successor of a process
//! that died can go on from where it was.
//!
//! The writer is one process at a time (a serial worker, then its successor, started only once
//! the first is dead): the slots need no lock. A write for item `k` never goes to the slot that
//! holds the newest state from before `k` (it takes the other one), so a successor that reruns
//! `k` (its predecessor died after writing `k`'s snapshot but before letting go of `k`) still
//! finds the state from before `k`: [`Snapshots::latest_before`] `k`. Sequence numbers may skip
//! (items that failed before the stage, or were not run): the slot is chosen by the tags there,
//! not by the number's parity.
//!
//! ```text
//! slot (64-byte header, then `capacity` bytes):
//! | tag: u64 (seq + 1; 0 = being written or empty) | len: u64 | ... | bytes ... |
//! ```
//! A write clears the tag, writes the bytes and the length, then stores the tag (`Release`):
//! a writer that dies midway leaves a slot with tag 0, which a reader skips.
//!
//! After the two slots comes one more word, the **epoch**: the sequence number of the first
//! item of the current run, which another process (the coordinator) sets before it hands out
//! that item. State taken before the epoch belongs to an earlier run: a reader asking for the
//! state before an item of this run does not get it.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::error::{Error, Result};
use crate::segment::Segment;

const HEADER: usize = 64;

/// Two tagged state slots in a segment of their own; see the module documentation.
#[derive(Clone)]
pub struct Snapshots {
    seg: Arc<Segment>,
    capacity: usize,
}

impl std::fmt::Debug for Snapshots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshots")
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl Snapshots {
    /// Two slots of `capacity` bytes each (rounded up to 64).
    pub fn new(capacity: usize) -> Result<Snapshots> {
        let capacity =
            capacity
                .checked_next_multiple_of(HEADER)
                .ok_or_else(|| Error::InvalidArgument {
                    what: format!("snapshots of {capacity} bytes"),
                })?;
        let len = capacity
            .checked_add(HEADER)
            .and_then(|slot| slot.checked_mul(2))
            .and_then(|slots| slots.checked_add(HEADER))
            .ok_or_else(|| Error::InvalidArgument {
                what: format!("snapshots of {capacity} bytes"),
            })?;
        Ok(Snapshots {
            seg: Arc::new(Segment::new(len)?),
            capacity,
        })
    }

    /// The largest snapshot a slot takes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Where the epoch word is.
    fn epoch_at(&self) -> usize {
        2 * (HEADER + self.capacity)
    }

    /// Starts a run whose first item is `seq`: state taken before it is not handed out for its
    /// items. Call before that item is handed to the writer.
    pub fn set_epoch(&self, seq: u64) {
        if let Some(word) = self.seg.atomic_u64(self.epoch_at()) {
            // SYNC POINT with the `Acquire` load in `epoch`: the first item of the run is
            // published after this store (by a ring's Release stamp), so a writer that sees the
            // item sees the epoch.
            word.store(seq, Ordering::Release);
        }
    }

    /// The first item of the current run (0 until a run is started).
    pub fn epoch(&self) -> u64 {
        self.seg
            .atomic_u64(self.epoch_at())
            .map_or(0, |w| w.load(Ordering::Acquire))
    }

    fn slot(&self, index: usize) -> usize {
        index * (HEADER + self.capacity)
    }

    /// The item whose state slot `index` holds (`None`: empty, or being written).
    fn taken(&self, index: usize) -> Option<u64> {
        self.seg
            .atomic_u64(self.slot(index))?
            .load(Ordering::Acquire)
            .checked_sub(1)
    }

    /// Saves `bytes` as the state after item `seq`, in the slot that does not hold the newest
    /// state from before `seq`.
    pub fn write(&self, seq: u64, bytes: &[u8]) -> Result<()> {
        if bytes.len() > self.capacity {
            return Err(Error::FrameTooLarge {
                len: bytes.len(),
                max: self.capacity,
            });
        }
        let keep = self.newest_before(seq, 0);
        let at = self.slot(match keep {
            Some(0) => 1,
            _ => 0,
        });
        let (Some(tag), Some(len)) = (self.seg.atomic_u64(at), self.seg.atomic_u64(at + 8)) else {
            return Err(Error::corrupt("snapshot slot outside its segment"));
        };
        tag.store(0, Ordering::Release);
        // SAFETY: `at + HEADER + bytes.len() <= at + HEADER + capacity <= seg.len()` (the segment
        // holds two slots of `HEADER + capacity`), and the region does not overlap `bytes` (a
        // caller's buffer, not this segment). Only this process writes the slots now (one
        // writer at a time: see the module documentation), and no reference into them exists:
        // readers copy out.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.seg.as_ptr().add(at + HEADER),
                bytes.len(),
            );
        }
        len.store(bytes.len() as u64, Ordering::Relaxed);
        // SYNC POINT with the `Acquire` load of the tag in `latest_before`: the bytes and the
        // length are visible to whoever sees this tag.
        tag.store(seq.wrapping_add(1), Ordering::Release);
        Ok(())
    }

    /// The slot holding the newest state taken after an item in `floor..seq`.
    fn newest_before(&self, seq: u64, floor: u64) -> Option<usize> {
        (0..2)
            .filter_map(|i| Some((i, self.taken(i)?)))
            .filter(|&(_, taken)| taken < seq && taken >= floor)
            .max_by_key(|&(_, taken)| taken)
            .map(|(i, _)| i)
    }

    /// A copy of the newest snapshot taken after an item before `seq`, and that item's number:
    /// the state to go on from before running item `seq`. `None` if there is none, or if it
    /// belongs to an earlier run than `seq` (see [`Snapshots::set_epoch`]).
    pub fn latest_before(&self, seq: u64) -> Option<(u64, Vec<u8>)> {
        let epoch = self.epoch();
        let floor = if seq >= epoch { epoch } else { 0 };
        let index = self.newest_before(seq, floor)?;
        let (taken, at) = (self.taken(index)?, self.slot(index));
        let len = self.seg.atomic_u64(at + 8)?.load(Ordering::Relaxed);
        let len = usize::try_from(len).ok().filter(|&l| l <= self.capacity)?;
        let mut out = vec![0u8; len];
        // SAFETY: `at + HEADER + len <= seg.len()` (`len <= capacity`, checked above); the
        // writer of this slot finished before its tag was stored (and we loaded the tag with
        // Acquire), and writes no more: it is dead, or it is this process. Copying out leaves
        // no reference into shared memory.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.seg.as_ptr().add(at + HEADER),
                out.as_mut_ptr(),
                len,
            );
        }
        Some((taken, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_before_an_item_survives_its_snapshot() {
        let s = Snapshots::new(100).unwrap();
        assert_eq!(s.capacity(), 128);
        assert_eq!(s.latest_before(0), None);
        s.write(0, b"after 0").unwrap();
        assert_eq!(s.latest_before(0), None);
        assert_eq!(s.latest_before(1), Some((0, b"after 0".to_vec())));
        s.write(1, b"after 1").unwrap();
        // Rerunning item 1: the state after 0, not after 1.
        assert_eq!(s.latest_before(1), Some((0, b"after 0".to_vec())));
        assert_eq!(s.latest_before(2), Some((1, b"after 1".to_vec())));
        s.write(2, b"after 2!").unwrap();
        assert_eq!(s.latest_before(2), Some((1, b"after 1".to_vec())));
        assert_eq!(s.latest_before(9), Some((2, b"after 2!".to_vec())));
        assert!(matches!(
            s.write(3, &[0; 129]),
            Err(Error::FrameTooLarge { len: 129, max: 128 })
        ));
        // A forked reader sees the same slots.
        let c = s.clone();
        assert_eq!(c.latest_before(3), Some((2, b"after 2!".to_vec())));
        // A new run from item 3 on: nothing of the run before is its state, but an item of
        // the earlier run still finds its own.
        s.set_epoch(3);
        assert_eq!(c.epoch(), 3);
        assert_eq!(s.latest_before(3), None);
        assert_eq!(s.latest_before(5), None);
        assert_eq!(s.latest_before(2), Some((1, b"after 1".to_vec())));
        s.write(3, b"run 2").unwrap();
        assert_eq!(s.latest_before(4), Some((3, b"run 2".to_vec())));
    }

    #[test]
    fn numbers_that_skip_keep_the_state_before_each_item() {
        let s = Snapshots::new(64).unwrap();
        // 3, 4, then 6 (5 never reached the stage): the state before 6 is the one after 4,
        // also once the state after 6 is saved (a successor rerunning 6 needs it).
        s.write(3, &[3]).unwrap();
        s.write(4, &[4]).unwrap();
        assert_eq!(s.latest_before(6), Some((4, vec![4])));
        s.write(6, &[6]).unwrap();
        assert_eq!(s.latest_before(6), Some((4, vec![4])));
        assert_eq!(s.latest_before(7), Some((6, vec![6])));
        // Two odd numbers in a row.
        s.write(9, &[9]).unwrap();
        s.write(11, &[11]).unwrap();
        assert_eq!(s.latest_before(11), Some((9, vec![9])));
        assert_eq!(s.latest_before(12), Some((11, vec![11])));
        // Saving the same item again (a rerun) keeps the state before it.
        s.write(11, &[111]).unwrap();
        assert_eq!(s.latest_before(11), Some((9, vec![9])));
        assert_eq!(s.latest_before(12), Some((11, vec![111])));
    }
}
