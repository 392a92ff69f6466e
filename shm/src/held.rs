//! Frames a consumer has read past but not released yet ([`HeldFrame`]).
//!
//! The ring frees bytes strictly in order: `tail` only moves forward. A consumer that hands
//! frames to someone else (the executor gives each result to the user as an `OutputRef`) needs
//! to read on while earlier frames are still in use, and those may be dropped in any order, on
//! any thread. The `Book` records every frame between the shared `tail` and the consumer's read
//! cursor and moves `tail` over the longest released prefix.
//!
//! The common case, nothing held, takes no lock: the count of recorded frames is read first, and
//! only the consumer's own thread can make it non-zero (by holding a frame), so a zero it reads
//! stays zero while it releases.

use std::collections::VecDeque;
use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::frame::FrameKind;
use crate::ring::View;

/// One frame between `tail` and the read cursor.
struct Entry {
    pos: u64,
    total: u64,
    released: bool,
}

struct Inner {
    /// Released up to here (the value last stored in the shared `tail`).
    tail: u64,
    /// In ring order; the front is at `tail`.
    entries: VecDeque<Entry>,
}

/// The consumer's record of held frames, shared with every [`HeldFrame`] it gave out.
pub(crate) struct Book {
    inner: Mutex<Inner>,
    /// `entries.len()`, readable without the lock.
    recorded: AtomicUsize,
}

impl Book {
    pub(crate) fn new(tail: u64) -> Book {
        Book {
            inner: Mutex::new(Inner {
                tail,
                entries: VecDeque::new(),
            }),
            recorded: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The critical sections below cannot panic half-way, so a poisoned lock holds
        // consistent data.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The consumer releases the frame of `total` bytes at `pos`, its read cursor.
    pub(crate) fn release_read(&self, view: &View, pos: u64, total: u64) {
        if self.recorded.load(Ordering::Acquire) == 0 {
            // Nothing held: every frame before `pos` is released, so `tail == pos`.
            publish_tail(view, pos + total);
            return;
        }
        let mut inner = self.lock();
        inner.entries.push_back(Entry {
            pos,
            total,
            released: true,
        });
        self.settle(view, &mut inner);
    }

    /// The consumer moves its read cursor past the frame at `pos` without releasing it.
    fn record_held(&self, pos: u64, total: u64) {
        let mut inner = self.lock();
        if inner.entries.is_empty() {
            inner.tail = pos;
        }
        inner.entries.push_back(Entry {
            pos,
            total,
            released: false,
        });
        self.recorded.store(inner.entries.len(), Ordering::Release);
    }

    /// A [`HeldFrame`] is dropped.
    fn release_held(&self, view: &View, pos: u64) {
        let mut inner = self.lock();
        if let Ok(i) = inner.entries.binary_search_by_key(&pos, |e| e.pos) {
            inner.entries[i].released = true;
        }
        self.settle(view, &mut inner);
    }

    /// Moves `tail` over the released prefix.
    fn settle(&self, view: &View, inner: &mut Inner) {
        let before = inner.tail;
        while let Some(front) = inner.entries.front().filter(|e| e.released) {
            inner.tail = front.pos + front.total;
            inner.entries.pop_front();
        }
        if inner.tail != before {
            publish_tail(view, inner.tail);
        }
        // After the tail store: a consumer that reads 0 here releases past a tail that is
        // already in place.
        self.recorded.store(inner.entries.len(), Ordering::Release);
    }

    /// Frames held and not yet dropped, and the ring bytes they pin.
    pub(crate) fn held(&self) -> (usize, usize) {
        if self.recorded.load(Ordering::Acquire) == 0 {
            return (0, 0);
        }
        let inner = self.lock();
        inner
            .entries
            .iter()
            .filter(|e| !e.released)
            .fold((0, 0), |(n, b), e| (n + 1, b + e.total as usize))
    }
}

fn publish_tail(view: &View, tail: u64) {
    let ctl = view.ctl();
    // SYNC POINT with the producer's `tail` load (`load_tail` in ring.rs): we are done with
    // every byte below `tail`.
    ctl.tail.store(tail, Ordering::Release);
    ctl.space_ready.notify();
}

/// A frame read from a ring and kept: it derefs to the payload inside shared memory, keeps the
/// mapping alive, and frees its ring bytes when dropped (in any order, on any thread).
pub struct HeldFrame {
    view: View,
    book: Arc<Book>,
    pos: u64,
    off: u64,
    len: usize,
    seq: u64,
    part: u32,
    kind: FrameKind,
    words: [u64; 2],
}

impl HeldFrame {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        view: View,
        book: Arc<Book>,
        pos: u64,
        total: u64,
        off: u64,
        len: usize,
        seq: u64,
        part: u32,
        kind: FrameKind,
        words: [u64; 2],
    ) -> HeldFrame {
        book.record_held(pos, total);
        HeldFrame {
            view,
            book,
            pos,
            off,
            len,
            seq,
            part,
            kind,
            words,
        }
    }

    /// The frame's kind.
    pub fn kind(&self) -> FrameKind {
        self.kind
    }

    /// The sequence number the producer gave the frame.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The frame's part: its position among the frames of its sequence number.
    pub fn part(&self) -> u32 {
        self.part
    }

    /// The frame's ring position, for [`crate::Ring::read_held`] in another process.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The two words the producer set with [`crate::Grant::set_words`].
    pub fn words(&self) -> [u64; 2] {
        self.words
    }
}

impl std::fmt::Debug for HeldFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldFrame")
            .field("len", &self.len)
            .field("kind", &self.kind)
            .field("seq", &self.seq)
            .finish()
    }
}

impl Deref for HeldFrame {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the frame was validated to lie inside the data area when it was read
        // (`Consumer::next_frame`), and its bytes are recorded as held in the book, so `tail`
        // stays at or below `pos` and the producer does not write them until `drop` below. The
        // `View` keeps the mapping alive. A hostile producer could still write them; they are
        // bytes, valid at any value.
        unsafe { std::slice::from_raw_parts(self.view.payload_ptr(self.off), self.len) }
    }
}

impl Drop for HeldFrame {
    fn drop(&mut self) {
        self.book.release_held(&self.view, self.pos);
    }
}
