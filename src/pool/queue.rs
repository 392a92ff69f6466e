//! What the coordinator has handed one worker and not yet had answered, and how much of it the
//! worker has still to work off.
//!
//! An item stays here from the moment its input is written into the worker's input ring until
//! its result is read. In between the worker *finishes* it: publishes the result and releases
//! the input frame. Only unfinished items are the worker's queue (its load, and what
//! `Builder::queue_bytes` bounds); finished ones merely wait for the caller, in the output ring.
//! The coordinator learns what is finished from the input ring's released position: each item
//! remembers where its frame ends, and the ring is released in order.

use std::collections::VecDeque;

/// An item handed to a worker, whose result is still to come.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Expected {
    pub(crate) seq: u64,
    /// `false` for an abandoned call's item: its result is discarded.
    pub(crate) live: bool,
    /// Ring bytes of its input archive.
    pub(crate) bytes: u64,
    /// The input ring's position just past its frame ([`shmexec_shm::Producer::written`]): the
    /// worker has finished the item once the ring's
    /// [`released`](shmexec_shm::Producer::released) position reaches it.
    pub(crate) end: u64,
    /// When it was handed to the worker (`shmexec_shm::clock`), for its results' timing.
    pub(crate) submitted_ns: u64,
}

/// The items of one worker, oldest first (the order the worker answers them in).
#[derive(Debug, Default)]
pub(crate) struct Queue {
    items: VecDeque<Expected>,
    /// Input bytes of `items`.
    bytes: u64,
    /// The first `finished` entries are known to be finished, with `finished_bytes` of input.
    finished: usize,
    finished_bytes: u64,
    /// The item popped last: a worker that dies after its closing frame was read, before it
    /// released its input, has it run again by its successor (see `WorkerSlot::dying_item`).
    last_closed: Option<Expected>,
}

impl Queue {
    pub(crate) fn push(&mut self, e: Expected) {
        self.bytes += e.bytes;
        self.items.push_back(e);
    }

    pub(crate) fn back(&self) -> Option<&Expected> {
        self.items.back()
    }

    pub(crate) fn front(&self) -> Option<&Expected> {
        self.items.front()
    }

    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Whether item `seq` is here (items are in increasing sequence order).
    pub(crate) fn contains(&self, seq: u64) -> bool {
        self.items.binary_search_by_key(&seq, |e| e.seq).is_ok()
    }

    /// Takes the oldest item off: its result has arrived.
    pub(crate) fn pop_front(&mut self) -> Option<Expected> {
        let e = self.items.pop_front()?;
        self.bytes -= e.bytes;
        if self.finished > 0 {
            self.finished -= 1;
            self.finished_bytes -= e.bytes;
        }
        self.last_closed = Some(e);
        Some(e)
    }

    /// The item that left the queue last (its closing frame was read, or it failed).
    pub(crate) fn last_closed(&self) -> Option<Expected> {
        self.last_closed
    }

    /// Items and input bytes not known to be finished as of the last [`Queue::refresh`]: an
    /// upper bound on what the worker has still to do.
    pub(crate) fn unfinished(&self) -> (usize, u64) {
        (
            self.items.len() - self.finished,
            self.bytes - self.finished_bytes,
        )
    }

    /// Marks finished the items whose input frames end at or before `released`. Each item is
    /// passed once, so this costs O(1) per item over its life.
    pub(crate) fn refresh(&mut self, released: u64) {
        while let Some(e) = self.items.get(self.finished).filter(|e| e.end <= released) {
            self.finished += 1;
            self.finished_bytes += e.bytes;
        }
    }

    /// The current call ended: results still to come are discarded when they arrive.
    pub(crate) fn abandon(&mut self) {
        for e in &mut self.items {
            e.live = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(seq: u64, bytes: u64, end: u64) -> Expected {
        Expected {
            seq,
            live: true,
            bytes,
            end,
            submitted_ns: 0,
        }
    }

    #[test]
    fn only_unreleased_items_count_as_queued() {
        let mut q = Queue::default();
        q.push(item(0, 100, 128));
        q.push(item(1, 200, 384));
        q.push(item(2, 50, 448));
        assert_eq!(q.unfinished(), (3, 350));
        // The worker released the first frame and part of the second.
        q.refresh(200);
        assert_eq!(q.unfinished(), (2, 250));
        q.refresh(384);
        assert_eq!(q.unfinished(), (1, 50));
        // A result read: the item was counted finished, so the queue stays as it was.
        assert_eq!(q.pop_front().map(|e| e.seq), Some(0));
        assert_eq!(q.unfinished(), (1, 50));
        assert_eq!(q.len(), 2);
        // A result read before any refresh saw its release.
        q.pop_front();
        assert_eq!(q.pop_front().map(|e| e.seq), Some(2));
        assert_eq!(q.unfinished(), (0, 0));
        assert!(q.is_empty());
        q.push(item(3, 10, 500));
        assert_eq!(q.unfinished(), (1, 10));
    }
}
