//! A single-producer single-consumer ring of variable-length frames in shared memory.
//!
//! ```
//! use shmexec_shm::{FrameKind, Peer, Ring};
//!
//! let ring = Ring::create(1 << 16)?;
//! let mut tx = ring.producer(Peer::unwatched())?;
//! let mut rx = ring.consumer(Peer::unwatched())?;
//!
//! let mut slot = tx.reserve(5)?;          // 5 bytes inside the shared mapping
//! slot.copy_from_slice(b"hello");
//! slot.commit();                          // now the consumer may see it
//!
//! let frame = rx.peek()?;                 // borrowed from the mapping, no copy
//! assert_eq!(&*frame, b"hello");
//! assert_eq!(frame.kind(), FrameKind::Data);
//! frame.release();                        // the producer may reuse the bytes
//! # Ok::<(), shmexec_shm::Error>(())
//! ```
//!
//! In real use the two handles live in two processes: create the ring, `fork`, claim the
//! producer in one process and the consumer in the other, each watching the other's pid.
//!
//! # Layout
//!
//! ```text
//! offset 0          CONTROL_LEN (4096)                            CONTROL_LEN + capacity
//!        | control  | frame | frame | ... | pad |                |
//!          magic, capacity, pids, closed flags,
//!          head  (own cache line, written by the producer only; read only by a successor
//!                 producer after a crash)
//!          tail  (own cache line, written by the consumer only)
//!          data_ready / space_ready signals (own cache lines)
//! ```
//!
//! `head` and `tail` are byte positions that only grow; a position's place in the data area is
//! `pos % capacity`. The bytes in `[tail, head)` hold published frames; `[head, tail +
//! capacity)` is free for the producer. A frame never wraps: when the next one would cross the
//! end, the producer publishes a padding frame up to the end and starts again at 0. Because the
//! padding is published (and consumed) on its own, a frame of up to `capacity - 64` payload bytes
//! always fits eventually, whatever the offset; bigger ones are [`Error::FrameTooLarge`] at once.
//!
//! A frame is published by the stamp in its header slot (see [`crate::frame`]), not by `head`:
//! the consumer polls the one cache line the frame arrives in, so a hand-over costs one line
//! transfer less. Memory ordering, why a stale stamp never passes for a frame, and why no
//! wake-up is lost are argued in [`crate::signal`].
//!
//! # Trust
//!
//! Neither side trusts what the other wrote. Each handle caches the capacity once (checked
//! against the segment size) and never re-reads it; `head`, `tail` and every header (its check
//! word, kind, and that it ends inside the ring) are checked before use. A violation is
//! [`Error::Corrupt`]. A hostile peer can still scribble over payload bytes that it shares with
//! us; it cannot make this process read or write outside the mapping.

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

use crate::error::{Error, Result};
use crate::frame::{
    Decoded, FIELDS_AT, FRAME_ALIGN, FrameHeader, FrameKind, HEADER_LEN, KIND_PAD, frame_bytes,
    kind_word, stamp,
};
use crate::held::{Book, HeldFrame};
use crate::peer::Peer;
use crate::segment::Segment;
use crate::signal::Signal;
use crate::wait::{WaitStrategy, Waiter};

/// Bytes in front of the data area: the control block, padded to a page.
pub const CONTROL_LEN: usize = 4096;

const MAGIC: u64 = u64::from_le_bytes(*b"shmxring");
const PRODUCER_CLOSED: u32 = 1;
const CONSUMER_CLOSED: u32 = 2;
/// Smallest data area: one empty frame plus room to pad.
const MIN_CAPACITY: usize = 2 * FRAME_ALIGN;

/// Largest data area: positions are `u64`s that only grow, and a producer computes
/// `tail + capacity`; a capacity of at most a quarter of their range leaves them room for
/// longer than any process runs. (A machine's memory is the tighter bound: [`Segment::new`]
/// refuses what it cannot back.)
pub const MAX_CAPACITY: u64 = 1 << 62;

/// The shared control block. All fields are atomics, so any bit pattern a peer writes is a valid
/// value, and all-zero is "uninitialised" (no magic).
#[repr(C)]
pub(crate) struct Control {
    magic: AtomicU64,
    capacity: AtomicU64,
    producer_pid: AtomicU32,
    consumer_pid: AtomicU32,
    closed: AtomicU32,
    /// Bytes a producer blocked in `reserve` is waiting for (0 when it is not waiting): lets a
    /// consumer that holds frames see that only releasing them can unblock the producer.
    producer_need: AtomicU64,
    head: CachePadded<AtomicU64>,
    pub(crate) tail: CachePadded<AtomicU64>,
    data_ready: CachePadded<Signal>,
    pub(crate) space_ready: CachePadded<Signal>,
}

const _: () = assert!(std::mem::size_of::<Control>() <= CONTROL_LEN);
const _: () = assert!(CONTROL_LEN % std::mem::align_of::<Control>() == 0);

/// This process's view of one ring: the segment kept alive, the two base pointers, and the
/// capacity as checked at attach time. Every raw-pointer access of the ring goes through here.
#[derive(Clone)]
pub(crate) struct View {
    seg: Arc<Segment>,
    ctl: NonNull<Control>,
    data: NonNull<u8>,
    cap: u64,
}

// SAFETY: the pointers point into `seg`, which the `Arc` keeps mapped for as long as any `View`
// exists; the control block is only accessed through atomics, and the data area only through the
// SPSC protocol, which gives each byte range one owner at a time across all threads and
// processes.
unsafe impl Send for View {}
// SAFETY: as above; a shared `&View` only reads the pointers.
unsafe impl Sync for View {}

impl View {
    /// Checks that `[offset, offset + CONTROL_LEN + cap)` lies in `seg` and builds the view.
    fn new(seg: Arc<Segment>, offset: usize, cap: u64) -> Result<View> {
        let cap_usize =
            usize::try_from(cap).map_err(|_| Error::corrupt(format!("capacity {cap}")))?;
        let end = offset
            .checked_add(CONTROL_LEN)
            .and_then(|o| o.checked_add(cap_usize));
        if offset % CONTROL_LEN != 0 || end.is_none_or(|e| e > seg.len()) {
            return Err(Error::InvalidArgument {
                what: format!(
                    "a ring of capacity {cap} at offset {offset} does not fit a segment of {} bytes \
                     (offset must be a multiple of {CONTROL_LEN})",
                    seg.len()
                ),
            });
        }
        // SAFETY: offset + CONTROL_LEN + cap <= seg.len() (checked above), so both pointers stay
        // inside the mapping; the mapping base is page-aligned and offset a multiple of 4096, so
        // `ctl` is aligned for `Control`.
        let (ctl, data) = unsafe {
            let base = seg.as_ptr().add(offset);
            (base.cast::<Control>(), base.add(CONTROL_LEN))
        };
        Ok(View {
            ctl: NonNull::new(ctl).ok_or_else(|| Error::corrupt("null mapping"))?,
            data: NonNull::new(data).ok_or_else(|| Error::corrupt("null mapping"))?,
            seg,
            cap,
        })
    }

    pub(crate) fn ctl(&self) -> &Control {
        // SAFETY: `ctl` is in bounds and aligned (see `View::new`) and the segment outlives
        // `self`. `Control` is all atomics: any bytes (zero-filled at creation, or written by a
        // peer) are a valid value, and shared access needs no exclusivity.
        unsafe { self.ctl.as_ref() }
    }

    /// The stamp word at the start of the header slot at data offset `off`.
    fn stamp(&self, off: u64) -> &AtomicU64 {
        debug_assert!(off % FRAME_ALIGN as u64 == 0 && off + HEADER_LEN as u64 <= self.cap);
        // SAFETY: callers pass `off < cap`, a multiple of 64, and `cap` is a multiple of 64, so
        // the 64-byte slot is inside the data area and 64-aligned (enough for AtomicU64). Any
        // 8 bytes are a valid AtomicU64, and the borrow ends before the segment can be unmapped
        // (`self` holds it).
        unsafe { &*self.data.as_ptr().add(off as usize).cast::<AtomicU64>() }
    }

    /// Copies the header fields of the slot at data offset `off` out of shared memory.
    fn read_fields(&self, off: u64) -> FrameHeader {
        debug_assert!(off % FRAME_ALIGN as u64 == 0 && off + HEADER_LEN as u64 <= self.cap);
        // SAFETY: the slot is in bounds and 64-aligned (see `stamp`), so the fields at +8 are in
        // bounds and 8-aligned for `FrameHeader`. A volatile read copies them exactly once, so
        // validating the copy cannot be raced by a peer rewriting the slot.
        unsafe {
            std::ptr::read_volatile(
                self.data
                    .as_ptr()
                    .add(off as usize + FIELDS_AT)
                    .cast::<FrameHeader>(),
            )
        }
    }

    /// Writes a frame's header fields, then its stamp: the frame is published by this call.
    fn publish_header(&self, pos: u64, fields: FrameHeader) {
        let off = pos % self.cap;
        debug_assert!(off % FRAME_ALIGN as u64 == 0 && off + HEADER_LEN as u64 <= self.cap);
        // SAFETY: as in `read_fields` for bounds and alignment; the slot lies in the free part of
        // the ring, owned by the (single) producer until the stamp store below.
        unsafe {
            std::ptr::write_volatile(
                self.data
                    .as_ptr()
                    .add(off as usize + FIELDS_AT)
                    .cast::<FrameHeader>(),
                fields,
            )
        }
        // SYNC POINT with the consumer's stamp load in `Consumer::wait_data`: the payload and
        // the fields written before this store are visible to it once it sees the stamp.
        self.stamp(off).store(stamp(pos), Ordering::Release);
    }

    /// The payload area of the frame whose header is at data offset `off`.
    pub(crate) fn payload_ptr(&self, off: u64) -> *mut u8 {
        // SAFETY: off + HEADER_LEN <= cap (frames are validated or sized to fit before the end).
        unsafe { self.data.as_ptr().add(off as usize + HEADER_LEN) }
    }

    fn closed(&self, flag: u32) -> bool {
        self.ctl().closed.load(Ordering::Acquire) & flag != 0
    }
}

/// A ring in shared memory. Cloning (or forking) gives another view of the same ring; the
/// producer and consumer roles are claimed separately with [`Ring::producer`] and
/// [`Ring::consumer`], at most one live handle each.
#[derive(Clone)]
pub struct Ring {
    view: View,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("capacity", &self.view.cap)
            .field("head", &self.view.ctl().head.load(Ordering::Relaxed))
            .field("tail", &self.view.ctl().tail.load(Ordering::Relaxed))
            .finish()
    }
}

impl Ring {
    /// Bytes of segment a ring of `capacity` data bytes takes (control block included), after
    /// rounding `capacity` up to 64, and the whole rounded up to [`CONTROL_LEN`]: rings laid
    /// out one after another at multiples of their footprints start where a ring may (its
    /// offset a multiple of [`CONTROL_LEN`]), whatever their capacities. Saturates at
    /// `usize::MAX` for a capacity that cannot be a ring's (above [`MAX_CAPACITY`]), a size
    /// that no segment is made with.
    pub fn footprint(capacity: usize) -> usize {
        Self::data_bytes(capacity)
            .ok()
            .and_then(|cap| usize::try_from(cap).ok())
            .and_then(|cap| cap.checked_add(CONTROL_LEN))
            .and_then(|len| len.checked_next_multiple_of(CONTROL_LEN))
            .unwrap_or(usize::MAX)
    }

    /// `capacity` rounded up to 64, if a ring may have it.
    fn data_bytes(capacity: usize) -> Result<u64> {
        let cap = (capacity as u64).checked_next_multiple_of(FRAME_ALIGN as u64);
        match cap {
            Some(cap) if capacity >= MIN_CAPACITY && cap <= MAX_CAPACITY => Ok(cap),
            _ => Err(Error::InvalidArgument {
                what: format!(
                    "ring capacity {capacity} is not between {MIN_CAPACITY} bytes and \
                     {MAX_CAPACITY} bytes"
                ),
            }),
        }
    }

    /// Creates a ring with `capacity` data bytes (rounded up to a multiple of 64) in a segment
    /// of its own.
    pub fn create(capacity: usize) -> Result<Ring> {
        Self::data_bytes(capacity)?;
        let seg = Arc::new(Segment::new(Self::footprint(capacity))?);
        Self::init_in(seg, 0, capacity)
    }

    /// Initialises a ring at `offset` (a multiple of [`CONTROL_LEN`]) of `seg`, overwriting
    /// whatever was there. No other ring may use that range.
    pub fn init_in(seg: Arc<Segment>, offset: usize, capacity: usize) -> Result<Ring> {
        let cap = Self::data_bytes(capacity)?;
        let view = View::new(seg, offset, cap)?;
        let ctl = view.ctl();
        ctl.magic.store(0, Ordering::Relaxed);
        ctl.capacity.store(cap, Ordering::Relaxed);
        ctl.producer_pid.store(0, Ordering::Relaxed);
        ctl.consumer_pid.store(0, Ordering::Relaxed);
        ctl.closed.store(0, Ordering::Relaxed);
        ctl.producer_need.store(0, Ordering::Relaxed);
        ctl.head.store(0, Ordering::Relaxed);
        ctl.tail.store(0, Ordering::Relaxed);
        // SYNC POINT with the magic load in `attach`: an attacher that sees the magic sees the
        // fields above.
        ctl.magic.store(MAGIC, Ordering::Release);
        Ok(Ring { view })
    }

    /// Opens a ring that another process initialised at `offset` of `seg` (for example a
    /// segment received with [`Segment::from_fd`]). Checks the magic and that the recorded
    /// capacity fits the segment.
    pub fn attach(seg: Arc<Segment>, offset: usize) -> Result<Ring> {
        let probe = View::new(seg, offset, 0)?;
        let ctl = probe.ctl();
        if ctl.magic.load(Ordering::Acquire) != MAGIC {
            return Err(Error::corrupt(format!(
                "no ring at offset {offset} (bad magic)"
            )));
        }
        let cap = ctl.capacity.load(Ordering::Relaxed);
        if cap < MIN_CAPACITY as u64 || cap % FRAME_ALIGN as u64 != 0 {
            return Err(Error::corrupt(format!(
                "ring at offset {offset} has capacity {cap}"
            )));
        }
        Ok(Ring {
            view: View::new(probe.seg, offset, cap)?,
        })
    }

    /// Data bytes in the ring.
    pub fn capacity(&self) -> usize {
        self.view.cap as usize
    }

    /// The largest payload one frame can carry.
    pub fn max_payload(&self) -> usize {
        self.capacity() - HEADER_LEN
    }

    /// The segment holding the ring (to pass its descriptor to a re-executed process).
    pub fn segment(&self) -> &Arc<Segment> {
        &self.view.seg
    }

    /// Reads a frame that another process's consumer holds, where it lies: the frame at ring
    /// position `pos` (see [`HeldFrame::position`]), which must still carry that position's
    /// stamp and the length, sequence number and part given. This is how a process that is
    /// neither producer nor consumer of the ring (the next stage of a pipeline) reads a frame
    /// the consumer handed it by descriptor. The consumer keeps the frame held, so the
    /// producer does not write it, until the reader says it is done (by a protocol above this
    /// one); a descriptor whose frame was released and overwritten fails the stamp or header
    /// checks instead of returning other bytes.
    pub fn read_held(&self, pos: u64, len: u64, seq: u64, part: u32) -> Result<&[u8]> {
        let view = &self.view;
        let cap = view.cap;
        let off = pos % cap;
        let stale = |what: &str| {
            Err(Error::corrupt(format!(
                "no frame of {len} bytes (seq {seq}, part {part}) at ring position {pos}: {what}"
            )))
        };
        if off % FRAME_ALIGN as u64 != 0 || off + HEADER_LEN as u64 > cap {
            return stale("not a frame position");
        }
        // SYNC POINT with the stamp store in `View::publish_header`: the frame's fields and
        // payload were written before it; the consumer saw it published before it handed the
        // position on.
        if view.stamp(off).load(Ordering::Acquire) != stamp(pos) {
            return stale("its stamp is gone (the frame was released)");
        }
        match view.read_fields(off).decode(pos) {
            Ok(Decoded::Frame {
                kind: FrameKind::Data | FrameKind::More,
                part: p,
                len: l,
                seq: s,
            }) if (p, l, s) == (part, len, seq) => {}
            Ok(_) => return stale("another frame is there"),
            Err(e) => return Err(e),
        }
        let (Some(total), Ok(n)) = (frame_bytes(len), usize::try_from(len)) else {
            return stale("a length past the ring");
        };
        if total > cap - off {
            return stale("a length past the ring end");
        }
        // SAFETY: the frame lies inside the data area (checked above: `off + total <= cap`)
        // and the view keeps the mapping alive for the returned borrow. Its bytes were
        // published before the stamp we loaded with Acquire, and the ring's consumer holds them
        // (the caller's protocol), so the producer does not write them meanwhile; a hostile
        // process could, but they are bytes, valid at any value, and checked by the layer
        // above before use.
        Ok(unsafe { std::slice::from_raw_parts(view.payload_ptr(off), n) })
    }

    /// Claims the producer side for this process; `peer` is the consumer's process, watched by
    /// every blocking call. Fails with [`Error::AlreadyClaimed`] while another live handle holds
    /// it; a holder that died without dropping its handle is replaced.
    pub fn producer(&self, peer: Peer) -> Result<Producer> {
        let ctl = self.view.ctl();
        let pid = claim(&ctl.producer_pid, "producer")?;
        ctl.closed.fetch_and(!PRODUCER_CLOSED, Ordering::AcqRel);
        let head = ctl.head.load(Ordering::Acquire);
        let mut producer = Producer {
            view: self.view.clone(),
            head,
            tail_seen: 0,
            next_seq: 0,
            waiter: Waiter::default(),
            peer,
            pid,
            warm_window: 0,
        };
        producer.tail_seen = head.saturating_sub(producer.view.cap);
        load_tail(&producer.view, producer.head, &mut producer.tail_seen)?;
        if head % FRAME_ALIGN as u64 != 0 {
            return Err(Error::corrupt(format!(
                "ring head {head} is not frame aligned"
            )));
        }
        Ok(producer)
    }

    /// Claims the consumer side for this process; `peer` is the producer's process. See
    /// [`Ring::producer`].
    pub fn consumer(&self, peer: Peer) -> Result<Consumer> {
        let ctl = self.view.ctl();
        let pid = claim(&ctl.consumer_pid, "consumer")?;
        ctl.closed.fetch_and(!CONSUMER_CLOSED, Ordering::AcqRel);
        let tail = ctl.tail.load(Ordering::Acquire);
        if tail % FRAME_ALIGN as u64 != 0 {
            return Err(Error::corrupt(format!(
                "ring tail {tail} is not frame aligned"
            )));
        }
        Ok(Consumer {
            view: self.view.clone(),
            read: tail,
            book: Arc::new(Book::new(tail)),
            waiter: Waiter::default(),
            peer,
            pid,
        })
    }
}

/// Takes a role slot for this process: free (0), or held by a process that no longer exists.
fn claim(slot: &AtomicU32, role: &'static str) -> Result<u32> {
    let me = rustix::process::getpid().as_raw_nonzero().get() as u32;
    let mut expected = 0;
    loop {
        match slot.compare_exchange(expected, me, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Ok(me),
            Err(holder) if holder != me && holder != 0 && !process_exists(holder) => {
                expected = holder
            }
            Err(0) => expected = 0,
            Err(holder) => {
                return Err(Error::AlreadyClaimed {
                    role,
                    pid: holder as i32,
                });
            }
        }
    }
}

fn process_exists(pid: u32) -> bool {
    match rustix::process::Pid::from_raw(pid as i32) {
        Some(p) => !matches!(
            rustix::process::test_kill_process(p),
            Err(rustix::io::Errno::SRCH)
        ),
        None => false,
    }
}

fn this_pid() -> u32 {
    rustix::process::getpid().as_raw_nonzero().get() as u32
}

/// Reads `tail` and checks it against what the producer knows: it may only grow, may not pass
/// `head`, and stays frame aligned.
fn load_tail(view: &View, head: u64, tail_seen: &mut u64) -> Result<()> {
    // SYNC POINT with the consumer's `tail.store(Release)` in `Frame::release`: once we see the
    // new tail, the consumer is done reading the bytes below it and we may overwrite them.
    let t = view.ctl().tail.load(Ordering::Acquire);
    if t < *tail_seen || t > head || t % FRAME_ALIGN as u64 != 0 {
        return Err(Error::corrupt(format!(
            "ring tail {t} is impossible (last seen {}, head {head})",
            *tail_seen
        )));
    }
    *tail_seen = t;
    Ok(())
}

fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or(now + Duration::from_secs(86_400 * 365))
}

/// Zeroes a word when dropped: the producer's "waiting for space" mark ends with the wait,
/// whichever way the wait ends.
struct ClearOnDrop<'a>(&'a AtomicU64);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::SeqCst);
    }
}

/// The writing end of a ring. Not `Clone`: a ring has one producer.
pub struct Producer {
    view: View,
    /// Our own index; we are its only writer, so the shared copy is only ever stored.
    head: u64,
    /// The last `tail` we loaded; free space is at least `cap - (head - tail_seen)`.
    tail_seen: u64,
    next_seq: u64,
    waiter: Waiter,
    peer: Peer,
    pid: u32,
    /// See [`Producer::set_warm_window`]; 0: off.
    warm_window: u64,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("capacity", &self.view.cap)
            .field("head", &self.head)
            .field("peer", &self.peer)
            .finish()
    }
}

impl Producer {
    /// Reserves a frame of `len` payload bytes, waiting for space as long as the consumer
    /// lives. Ends with [`Error::PeerGone`] if the consumer dies and [`Error::Closed`] if it
    /// drops its handle; [`Error::FrameTooLarge`] at once if the frame can never fit.
    pub fn reserve(&mut self, len: usize) -> Result<Grant<'_>> {
        self.reserve_blocking(len, None)
    }

    /// [`Producer::reserve`] that gives up with [`Error::Timeout`] at `deadline`.
    pub fn reserve_until(&mut self, len: usize, deadline: Instant) -> Result<Grant<'_>> {
        self.reserve_blocking(len, Some(deadline))
    }

    /// [`Producer::reserve`] that gives up with [`Error::Timeout`] after `timeout`.
    pub fn reserve_timeout(&mut self, len: usize, timeout: Duration) -> Result<Grant<'_>> {
        self.reserve_until(len, deadline_after(timeout))
    }

    /// Reserves without waiting: `Ok(None)` when the ring is too full right now.
    pub fn try_reserve(&mut self, len: usize) -> Result<Option<Grant<'_>>> {
        match self.reserve_inner(len, None, false)? {
            Some(off) => Ok(Some(self.grant(off, len))),
            None => Ok(None),
        }
    }

    /// Copies `payload` into a new data frame and publishes it; returns its sequence number.
    pub fn send(&mut self, payload: &[u8]) -> Result<u64> {
        let mut grant = self.reserve(payload.len())?;
        grant.copy_from_slice(payload);
        Ok(grant.commit())
    }

    /// Publishes an empty [`FrameKind::End`] frame: the consumer sees it in order after every
    /// frame before it.
    pub fn send_end(&mut self) -> Result<u64> {
        let mut grant = self.reserve(0)?;
        grant.set_kind(FrameKind::End);
        Ok(grant.commit())
    }

    /// Data bytes in the ring.
    pub fn capacity(&self) -> usize {
        self.view.cap as usize
    }

    /// The largest payload one frame can carry.
    pub fn max_payload(&self) -> usize {
        self.capacity() - HEADER_LEN
    }

    /// Sets how blocking calls wait (default [`WaitStrategy::Adaptive`]).
    pub fn set_wait_strategy(&mut self, strategy: WaitStrategy) {
        self.waiter = Waiter::new(strategy);
    }

    /// Starts frames again at offset 0 once they have passed `bytes` into the ring (or twice
    /// the frame, whichever is more) and the ring behind them is free; 0 (the default) turns
    /// this off.
    ///
    /// A producer that is not ahead of its consumer otherwise still walks the whole ring, so
    /// each frame lands in memory last touched a lap ago, long gone from the caches for a ring
    /// of tens of MiB: the writes miss, and so do the consumer's reads. With a warm window the
    /// same few MiB are reused while they are in cache. The cost: the padding to the end is
    /// a frame like any other, so until the consumer has stepped past it (its next `peek`), the
    /// producer has only the bytes below the window to run ahead in. For a producer that keeps
    /// a short queue anyway (the executor's), that is no cost.
    pub fn set_warm_window(&mut self, bytes: u64) {
        self.warm_window = bytes;
    }

    /// Replaces the peer that blocking calls watch.
    pub fn set_peer(&mut self, peer: Peer) {
        self.peer = peer;
    }

    /// The sequence number the next commit gets unless [`Grant::set_seq`] says otherwise.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Whether a frame of `len` payload bytes fits now: what [`Producer::try_reserve`] would
    /// grant (`false` for a frame that never fits). Loads the consumer's index only when the
    /// space last seen is short.
    pub fn fits(&mut self, len: usize) -> Result<bool> {
        let cap = self.view.cap;
        let Some(need) = frame_bytes(len as u64).filter(|&n| n <= cap) else {
            return Ok(false);
        };
        let off = self.head % cap;
        // A frame that would cross the end needs the padding to the end as well.
        let want = if off + need > cap {
            cap - off + need
        } else {
            need
        };
        self.has_free(want)
    }

    /// The ring position just past the last committed frame: bytes committed since the ring was
    /// made, padding included. A frame committed when this was `p` has been read and let go
    /// once [`Producer::released`] reaches `p`.
    pub fn written(&self) -> u64 {
        self.head
    }

    /// The ring position up to which the consumer has let go of frames (it only ever grows).
    /// Loads the consumer's index: one shared cache line, so not for every byte.
    pub fn released(&mut self) -> Result<u64> {
        load_tail(&self.view, self.head, &mut self.tail_seen)?;
        Ok(self.tail_seen)
    }

    fn reserve_blocking(&mut self, len: usize, deadline: Option<Instant>) -> Result<Grant<'_>> {
        let off = self
            .reserve_inner(len, deadline, true)?
            .expect("a blocking reserve returns a slot or an error");
        Ok(self.grant(off, len))
    }

    fn grant(&mut self, off: u64, len: usize) -> Grant<'_> {
        let seq = self.next_seq;
        Grant {
            producer: self,
            off,
            len,
            kind: FrameKind::Data,
            part: 0,
            seq,
            words: [0; 2],
        }
    }

    /// Returns the data offset of a slot of `len` payload bytes, or `None` (non-blocking only)
    /// if there is no room yet.
    fn reserve_inner(
        &mut self,
        len: usize,
        deadline: Option<Instant>,
        block: bool,
    ) -> Result<Option<u64>> {
        let cap = self.view.cap;
        let need = frame_bytes(len as u64)
            .filter(|&n| n <= cap)
            .ok_or(Error::FrameTooLarge {
                len,
                max: cap as usize - HEADER_LEN,
            })?;
        if self.view.closed(CONSUMER_CLOSED) {
            return Err(Error::Closed);
        }
        let off = self.head % cap;
        if off + need > cap || self.wraps_early(off, need)? {
            // The frame would cross the end (or should start again at 0 while that is free):
            // pad to the end first, as a frame of its own.
            let pad = cap - off;
            if !self.wait_space(pad, deadline, block)? {
                return Ok(None);
            }
            self.publish(pad, KIND_PAD, pad - HEADER_LEN as u64, 0, [0; 2]);
        }
        if !self.wait_space(need, deadline, block)? {
            return Ok(None);
        }
        Ok(Some(self.head % cap))
    }

    /// Whether to start the next frame of `need` bytes at 0 instead of at `off`, although it
    /// would fit (see [`Producer::set_warm_window`]): yes once `off` is past the window and the
    /// padding to the end plus the frame are free right now (never worth a wait). A consumer
    /// that falls behind keeps the space taken, and then the ring is used end to end.
    fn wraps_early(&mut self, off: u64, need: u64) -> Result<bool> {
        let cap = self.view.cap;
        if self.warm_window == 0 || off < self.warm_window.max(2 * need) {
            return Ok(false);
        }
        self.has_free((cap - off) + need)
    }

    /// Whether `want` bytes after `head` are free now; loads the consumer's index only when the
    /// space last seen is short.
    fn has_free(&mut self, want: u64) -> Result<bool> {
        let cap = self.view.cap;
        if cap - (self.head - self.tail_seen) < want {
            load_tail(&self.view, self.head, &mut self.tail_seen)?;
        }
        Ok(cap - (self.head - self.tail_seen) >= want)
    }

    /// Makes sure `need` bytes after `head` are free; `Ok(false)` if not and `block` is false.
    fn wait_space(&mut self, need: u64, deadline: Option<Instant>, block: bool) -> Result<bool> {
        let cap = self.view.cap;
        if self.has_free(need)? {
            return Ok(true);
        }
        if self.view.closed(CONSUMER_CLOSED) {
            return Err(Error::Closed);
        }
        if !block {
            return Ok(false);
        }
        let (view, head, tail_seen) = (&self.view, self.head, &mut self.tail_seen);
        let need_word = &view.ctl().producer_need;
        need_word.store(need, Ordering::SeqCst);
        let _clear = ClearOnDrop(need_word);
        view.ctl()
            .space_ready
            .wait_until(&mut self.waiter, &self.peer, deadline, || {
                load_tail(view, head, tail_seen)?;
                if cap - (head - *tail_seen) >= need {
                    Ok(true)
                } else if view.closed(CONSUMER_CLOSED) {
                    Err(Error::Closed)
                } else {
                    Ok(false)
                }
            })?;
        Ok(true)
    }

    /// Publishes the frame of `total` ring bytes at `head`, whose payload is already written.
    fn publish(&mut self, total: u64, kind: u32, len: u64, seq: u64, words: [u64; 2]) {
        let (pos, cap) = (self.head, self.view.cap);
        let next = pos + total;
        // The consumer will poll the slot at `next` once it has read this frame. Old payload
        // bytes there must never pass for a stamp, so clear it while it is ours (free space).
        // If the ring is exactly full, the slot is not ours, but then it holds the real header
        // of the frame at `tail_seen` (tails only stop at frame starts), whose stamp names the
        // previous lap and cannot match.
        if next < self.tail_seen + cap {
            self.view.stamp(next % cap).store(0, Ordering::Relaxed);
        }
        self.view
            .publish_header(pos, FrameHeader::new(pos, kind, len, seq).with_words(words));
        self.head = next;
        let ctl = self.view.ctl();
        // The shared head is for a producer that takes over after this one died; the consumer
        // never reads it (it polls stamps), so this store stays in our own cache line.
        ctl.head.store(next, Ordering::Release);
        ctl.data_ready.notify();
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        // A forked child inherits a copy of the parent's handle; only the claimant may close.
        if this_pid() != self.pid {
            return;
        }
        let ctl = self.view.ctl();
        ctl.closed.fetch_or(PRODUCER_CLOSED, Ordering::AcqRel);
        let _ = ctl
            .producer_pid
            .compare_exchange(self.pid, 0, Ordering::AcqRel, Ordering::Relaxed);
        ctl.data_ready.notify();
    }
}

/// A reserved, unpublished frame: a `&mut [u8]` of exactly the reserved length inside the
/// shared mapping. Write into it, then [`commit`](Grant::commit). Dropping it without a commit
/// publishes nothing.
pub struct Grant<'a> {
    producer: &'a mut Producer,
    off: u64,
    len: usize,
    kind: FrameKind,
    part: u32,
    seq: u64,
    words: [u64; 2],
}

impl std::fmt::Debug for Grant<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("len", &self.len)
            .field("kind", &self.kind)
            .field("seq", &self.seq)
            .finish()
    }
}

impl Grant<'_> {
    /// Sets the frame's kind (default [`FrameKind::Data`]).
    pub fn set_kind(&mut self, kind: FrameKind) -> &mut Self {
        self.kind = kind;
        self
    }

    /// Sets the frame's part: its position among the frames of its sequence number (default 0;
    /// at most [`crate::frame::MAX_PART`], higher bits are dropped).
    pub fn set_part(&mut self, part: u32) -> &mut Self {
        self.part = part;
        self
    }

    /// Sets the two words the frame carries beside its payload (default 0; not checked: the
    /// reader gets them as written, or as a hostile writer left them).
    pub fn set_words(&mut self, words: [u64; 2]) -> &mut Self {
        self.words = words;
        self
    }

    /// Sets the frame's sequence number (default: one more than the last committed).
    pub fn set_seq(&mut self, seq: u64) -> &mut Self {
        self.seq = seq;
        self
    }

    /// Shortens the frame to `len` bytes (for a writer that reserved an upper bound). Lengths
    /// above the reserved one are ignored.
    pub fn truncate(&mut self, len: usize) -> &mut Self {
        self.len = self.len.min(len);
        self
    }

    /// Publishes the frame; returns its sequence number.
    pub fn commit(self) -> u64 {
        let Grant {
            producer,
            off: _,
            len,
            kind,
            part,
            seq,
            words,
        } = self;
        let total = frame_bytes(len as u64).expect("reserved frames fit the ring");
        producer.next_seq = seq.wrapping_add(1);
        producer.publish(total, kind_word(kind, part), len as u64, seq, words);
        seq
    }
}

impl Deref for Grant<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `reserve_inner` made sure `[off, off + frame_bytes(len))` is free ring space
        // inside the data area; the consumer reads none of it before we publish, and the
        // `&mut Producer` we hold rules out a second grant. u8 has no invalid bit patterns.
        unsafe { std::slice::from_raw_parts(self.producer.view.payload_ptr(self.off), self.len) }
    }
}

impl DerefMut for Grant<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` makes this the only reference into the slot.
        unsafe {
            std::slice::from_raw_parts_mut(self.producer.view.payload_ptr(self.off), self.len)
        }
    }
}

/// The reading end of a ring. Not `Clone`: a ring has one consumer.
pub struct Consumer {
    view: View,
    /// Start of the next frame to read. Equal to the shared `tail` unless frames are held.
    read: u64,
    /// Frames read but not yet released (see [`Frame::hold`]); it moves the shared `tail`.
    book: Arc<Book>,
    waiter: Waiter,
    peer: Peer,
    pid: u32,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("capacity", &self.view.cap)
            .field("read", &self.read)
            .field("peer", &self.peer)
            .finish()
    }
}

/// Where a validated frame lies.
#[derive(Clone, Copy)]
struct Located {
    off: u64,
    len: usize,
    seq: u64,
    kind: FrameKind,
    part: u32,
    words: [u64; 2],
    total: u64,
}

impl Consumer {
    /// The oldest unreleased frame, waiting for one as long as the producer lives. Ends with
    /// [`Error::Closed`] once the producer dropped its handle and every frame was read, and
    /// with [`Error::PeerGone`] if it died (after every frame it published was read).
    pub fn peek(&mut self) -> Result<Frame<'_>> {
        let at = self
            .next_frame(None, true)?
            .expect("a blocking peek returns a frame or an error");
        Ok(Frame { consumer: self, at })
    }

    /// [`Consumer::peek`] that gives up with [`Error::Timeout`] at `deadline`.
    pub fn peek_until(&mut self, deadline: Instant) -> Result<Frame<'_>> {
        let at = self
            .next_frame(Some(deadline), true)?
            .expect("a blocking peek returns a frame or an error");
        Ok(Frame { consumer: self, at })
    }

    /// [`Consumer::peek`] that gives up with [`Error::Timeout`] after `timeout`.
    pub fn peek_timeout(&mut self, timeout: Duration) -> Result<Frame<'_>> {
        self.peek_until(deadline_after(timeout))
    }

    /// The oldest frame if one is published, without waiting.
    pub fn try_peek(&mut self) -> Result<Option<Frame<'_>>> {
        Ok(self
            .next_frame(None, false)?
            .map(|at| Frame { consumer: self, at }))
    }

    /// Data bytes in the ring.
    pub fn capacity(&self) -> usize {
        self.view.cap as usize
    }

    /// Sets how blocking calls wait (default [`WaitStrategy::Adaptive`]).
    pub fn set_wait_strategy(&mut self, strategy: WaitStrategy) {
        self.waiter = Waiter::new(strategy);
    }

    /// Replaces the peer that blocking calls watch.
    pub fn set_peer(&mut self, peer: Peer) {
        self.peer = peer;
    }

    /// Whether the producer is blocked in `reserve`, waiting for room (a worker whose results
    /// nobody has read yet is not slow, it is waiting).
    pub fn producer_waiting(&self) -> bool {
        self.view.ctl().producer_need.load(Ordering::Relaxed) != 0
    }

    /// Drops every frame published and not read yet, for a ring whose contents can no longer
    /// be trusted (a header failed its checks, so the frames behind it cannot be found). The
    /// producer must be gone: its `head` no longer moves, and its successor publishes from
    /// there. Frames already held stay valid. Returns the bytes dropped.
    pub fn discard_unread(&mut self) -> Result<u64> {
        let head = self.view.ctl().head.load(Ordering::Acquire);
        let unread = head.checked_sub(self.read).filter(|&n| n <= self.view.cap);
        let Some(unread) = unread.filter(|_| head % FRAME_ALIGN as u64 == 0) else {
            return Err(Error::corrupt(format!(
                "ring head {head} is not a frame start at most a lap past the read position {}",
                self.read
            )));
        };
        if unread > 0 {
            self.advance(unread);
        }
        Ok(unread)
    }

    fn next_frame(&mut self, deadline: Option<Instant>, block: bool) -> Result<Option<Located>> {
        let cap = self.view.cap;
        loop {
            if !self.wait_data(deadline, block)? {
                return Ok(None);
            }
            let off = self.read % cap;
            let room = cap - off;
            let fields = self.view.read_fields(off);
            match fields.decode(self.read)? {
                Decoded::Pad { len } => {
                    if len.checked_add(HEADER_LEN as u64) != Some(room) {
                        return Err(Error::corrupt(format!(
                            "padding of {len} bytes at ring position {} does not end at the wrap",
                            self.read
                        )));
                    }
                    self.advance(room);
                }
                Decoded::Frame {
                    kind,
                    part,
                    len,
                    seq,
                } => {
                    let total = frame_bytes(len).filter(|&t| t <= room);
                    let (Some(total), Ok(len)) = (total, usize::try_from(len)) else {
                        return Err(Error::corrupt(format!(
                            "frame of {len} bytes at ring position {} runs past the ring end",
                            self.read
                        )));
                    };
                    return Ok(Some(Located {
                        off,
                        len,
                        seq,
                        kind,
                        part,
                        words: fields.words(),
                        total,
                    }));
                }
            }
        }
    }

    /// Waits until the frame at `tail` is published; `Ok(false)` if it is not and `block` is
    /// false.
    fn wait_data(&mut self, deadline: Option<Instant>, block: bool) -> Result<bool> {
        let (view, tail) = (&self.view, self.read);
        let slot = view.stamp(tail % view.cap);
        // SYNC POINT with the stamp store in `View::publish_header`: seeing the stamp makes the
        // frame's fields and payload visible.
        let published = || slot.load(Ordering::Acquire) == stamp(tail);
        let ready = || -> Result<bool> {
            if published() {
                return Ok(true);
            }
            if view.closed(PRODUCER_CLOSED) {
                // The producer's last stamp store came before its closed flag: look once more.
                return if published() {
                    Ok(true)
                } else {
                    Err(Error::Closed)
                };
            }
            Ok(false)
        };
        if published() {
            return Ok(true);
        }
        if !block {
            return ready();
        }
        view.ctl()
            .data_ready
            .wait_until(&mut self.waiter, &self.peer, deadline, ready)?;
        Ok(true)
    }

    /// Releases the frame (or padding) of `total` bytes at the read cursor and moves past it.
    fn advance(&mut self, total: u64) {
        let pos = self.read;
        self.read += total;
        // The book stores the shared tail; see its SYNC POINT in `held::publish_tail`.
        self.book.release_read(&self.view, pos, total);
    }

    /// Frames read past with [`Frame::hold`] and not yet dropped, and the ring bytes they pin.
    pub fn held(&self) -> (usize, usize) {
        self.book.held()
    }

    /// True when the producer is blocked in `reserve` and only dropping held frames can make
    /// room for it: every frame it published has been read, and the free space is less than it
    /// needs. A consumer that holds frames and then waits for the next one would wait forever;
    /// this lets it return an error instead.
    pub fn blocked_by_held(&self) -> bool {
        let ctl = self.view.ctl();
        let need = ctl.producer_need.load(Ordering::SeqCst);
        if need == 0 || self.book.held().0 == 0 {
            return false;
        }
        let head = ctl.head.load(Ordering::Acquire);
        let tail = ctl.tail.load(Ordering::Acquire);
        head == self.read && self.view.cap.saturating_sub(head.saturating_sub(tail)) < need
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if this_pid() != self.pid {
            return;
        }
        let ctl = self.view.ctl();
        ctl.closed.fetch_or(CONSUMER_CLOSED, Ordering::AcqRel);
        let _ = ctl
            .consumer_pid
            .compare_exchange(self.pid, 0, Ordering::AcqRel, Ordering::Relaxed);
        ctl.space_ready.notify();
    }
}

/// A published frame, read in place. Derefs to the payload. [`release`](Frame::release) frees
/// its bytes for the producer; dropping it without a release leaves it at the head, so the next
/// peek returns it again.
pub struct Frame<'a> {
    consumer: &'a mut Consumer,
    at: Located,
}

impl std::fmt::Debug for Frame<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frame")
            .field("len", &self.at.len)
            .field("kind", &self.at.kind)
            .field("seq", &self.at.seq)
            .finish()
    }
}

impl Frame<'_> {
    /// The kind the producer gave the frame.
    pub fn kind(&self) -> FrameKind {
        self.at.kind
    }

    /// The sequence number the producer gave the frame.
    pub fn seq(&self) -> u64 {
        self.at.seq
    }

    /// The frame's part: its position among the frames of its sequence number.
    pub fn part(&self) -> u32 {
        self.at.part
    }

    /// The two words the producer set with [`Grant::set_words`].
    pub fn words(&self) -> [u64; 2] {
        self.at.words
    }

    /// Frees the frame's bytes for the producer.
    pub fn release(self) {
        let total = self.at.total;
        self.consumer.advance(total);
    }

    /// Moves the read cursor past this frame but keeps its bytes: the returned [`HeldFrame`]
    /// owns them (and keeps the mapping alive) until it is dropped, in any order and on any
    /// thread. The producer cannot reuse them until then, so holding frames for long fills the
    /// ring; see [`Consumer::blocked_by_held`].
    pub fn hold(self) -> HeldFrame {
        let Located {
            off,
            len,
            seq,
            kind,
            total,
            part,
            words,
        } = self.at;
        let consumer = self.consumer;
        let pos = consumer.read;
        consumer.read += total;
        HeldFrame::new(
            consumer.view.clone(),
            Arc::clone(&consumer.book),
            pos,
            total,
            off,
            len,
            seq,
            part,
            kind,
            words,
        )
    }
}

impl Deref for Frame<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `next_frame` checked that the frame lies inside the data area and below the
        // published head, so the producer wrote it before its Release store of head, which we
        // loaded with Acquire, and it will not touch these bytes until we store a tail past
        // them (which needs `release(self)`, ending this borrow).
        unsafe {
            std::slice::from_raw_parts(self.consumer.view.payload_ptr(self.at.off), self.at.len)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::held::HeldFrame;

    fn pair(cap: usize) -> (Producer, Consumer) {
        let ring = Ring::create(cap).unwrap();
        (
            ring.producer(Peer::unwatched()).unwrap(),
            ring.consumer(Peer::unwatched()).unwrap(),
        )
    }

    #[test]
    fn held_frames_release_out_of_order_and_pin_their_bytes() {
        let (mut tx, mut rx) = pair(64 * 8);
        for i in 0..4u8 {
            tx.send(&[i; 10]).unwrap();
        }
        let held: Vec<HeldFrame> = (0..4)
            .map(|_| rx.try_peek().unwrap().unwrap().hold())
            .collect();
        assert_eq!(rx.held(), (4, 4 * 128));
        assert!(
            tx.try_reserve(200).unwrap().is_none(),
            "held bytes are not free"
        );
        let mut held: Vec<Option<HeldFrame>> = held.into_iter().map(Some).collect();
        // Dropping the later ones frees nothing: the first still pins the tail.
        held[3] = None;
        held[1] = None;
        assert_eq!(rx.held(), (2, 256));
        assert!(tx.try_reserve(200).unwrap().is_none());
        assert_eq!(&**held[2].as_ref().unwrap(), &[2u8; 10]);
        held[0] = None;
        held[2] = None;
        assert_eq!(rx.held(), (0, 0));
        tx.try_reserve(200).unwrap().expect("all released").commit();
        let f = rx.try_peek().unwrap().unwrap();
        assert_eq!(f.len(), 200);
        f.release();
    }

    #[test]
    fn a_held_frame_is_read_by_position_and_a_stale_descriptor_fails() {
        let ring = Ring::create(64 * 8).unwrap();
        let mut tx = ring.producer(Peer::unwatched()).unwrap();
        let mut rx = ring.consumer(Peer::unwatched()).unwrap();
        let reader = ring.clone();
        let mut g = tx.reserve(10).unwrap();
        g.copy_from_slice(&[7; 10]);
        g.set_seq(42).set_kind(FrameKind::More).set_part(3);
        g.commit();
        let held = rx.try_peek().unwrap().unwrap().hold();
        let (pos, part) = (held.position(), held.part());
        assert_eq!(part, 3);
        let bytes = reader.read_held(pos, 10, 42, 3).unwrap();
        assert_eq!(bytes, &[7; 10]);
        assert_eq!(bytes.as_ptr(), held.as_ptr(), "read in place");
        for (len, seq, part) in [(11, 42, 3), (10, 41, 3), (10, 42, 2)] {
            assert!(reader.read_held(pos, len, seq, part).is_err());
        }
        assert!(reader.read_held(pos + 8, 10, 42, 3).is_err());
        // Released and overwritten: the old descriptor no longer finds its frame.
        drop(held);
        for i in 0..8u8 {
            tx.send(&[i; 100]).unwrap();
            rx.try_peek().unwrap().unwrap().release();
        }
        assert!(reader.read_held(pos, 10, 42, 3).is_err());
    }

    #[test]
    fn a_producer_blocked_by_held_frames_is_reported() {
        let ring = Ring::create(64 * 4).unwrap();
        let mut rx = ring.consumer(Peer::unwatched()).unwrap();
        let mut tx = ring.producer(Peer::unwatched()).unwrap();
        tx.send(&[1; 100]).unwrap();
        let held = rx.try_peek().unwrap().unwrap().hold();
        assert!(!rx.blocked_by_held());
        let t = std::thread::spawn(move || {
            let r = tx
                .reserve_timeout(150, Duration::from_secs(5))
                .map(|g| g.len());
            (tx, r)
        });
        let start = Instant::now();
        // A wait for data reads past the padding the producer put before its blocked frame.
        while rx.try_peek().unwrap().is_none() && !rx.blocked_by_held() {
            assert!(start.elapsed() < Duration::from_secs(4), "never reported");
            std::thread::yield_now();
        }
        drop(held);
        let (_tx, r) = t.join().unwrap();
        assert_eq!(r.unwrap(), 150);
        assert!(!rx.blocked_by_held());
    }

    #[test]
    fn frames_wrap_with_padding_and_keep_order() {
        let (mut tx, mut rx) = pair(1024);
        for round in 0..200u64 {
            let len = (round as usize * 37) % 700;
            let fits = tx.fits(len).unwrap();
            let granted = tx.try_reserve(len).unwrap().is_some();
            assert_eq!(fits, granted, "round {round}: fits says {fits}");
            if !granted {
                // The wrap padding was published but the frame does not fit beside it until
                // the consumer skips the padding (which `try_peek` does, returning no frame).
                assert!(rx.try_peek().unwrap().is_none());
            }
            assert!(tx.fits(len).unwrap());
            let mut g = tx
                .try_reserve(len)
                .unwrap()
                .expect("ring drained each round");
            g.fill(round as u8);
            assert_eq!(g.commit(), round);
            let f = rx.try_peek().unwrap().unwrap();
            assert_eq!(f.seq(), round);
            assert_eq!(f.len(), len);
            assert!(f.iter().all(|&b| b == round as u8));
            assert_eq!(f.as_ptr() as usize % FRAME_ALIGN, 0);
            f.release();
        }
        assert!(rx.try_peek().unwrap().is_none());
    }

    #[test]
    fn a_warm_window_keeps_a_producer_in_step_at_the_start_of_the_ring() {
        const MIB: usize = 1 << 20;
        const WINDOW: usize = 8 * MIB;
        let (mut tx, mut rx) = pair(64 * MIB);
        let send = |tx: &mut Producer, i: u64| -> bool {
            match tx.try_reserve(MIB).unwrap() {
                Some(mut g) => {
                    g.fill(i as u8);
                    g.commit();
                    true
                }
                None => false,
            }
        };
        let mut base = None;
        let mut read = |rx: &mut Consumer, i: u64| -> usize {
            let f = rx.try_peek().unwrap().unwrap();
            assert_eq!((f.seq(), f[0]), (i, i as u8));
            let at = f.as_ptr() as usize - *base.get_or_insert(f.as_ptr() as usize);
            f.release();
            at
        };
        // Without a window, frames in step walk the whole ring.
        let mut furthest = 0;
        for i in 0..100u64 {
            assert!(send(&mut tx, i));
            furthest = furthest.max(read(&mut rx, i));
        }
        assert!(furthest > 48 * MIB, "{furthest}");
        // With one, 200 MiB in step never leave the first window (plus a frame).
        tx.set_warm_window(WINDOW as u64);
        // (The first frames may still lie further on, until the producer comes back to 0.)
        let mut back_at_start = false;
        for i in 100..300u64 {
            assert!(send(&mut tx, i));
            let at = read(&mut rx, i);
            back_at_start |= at < WINDOW;
            if back_at_start {
                assert!(at < WINDOW + 2 * MIB, "frame {i} at {at}");
            }
        }
        assert!(back_at_start);
        // A producer far ahead: until the consumer steps past the padding of an early wrap it
        // has the window to fill, not the ring. Nothing is lost.
        let mut i = 300u64;
        while send(&mut tx, i) {
            i += 1;
        }
        assert!(
            i - 300 >= 4,
            "{} frames before the producer had to wait",
            i - 300
        );
        for j in 300..i {
            read(&mut rx, j);
        }
        assert!(rx.try_peek().unwrap().is_none());
    }

    #[test]
    fn full_ring_and_too_large() {
        let (mut tx, mut rx) = pair(512);
        assert!(matches!(
            tx.try_reserve(512 - 63),
            Err(Error::FrameTooLarge { max: 448, .. })
        ));
        tx.try_reserve(448).unwrap().unwrap().commit();
        assert!(tx.try_reserve(0).unwrap().is_none());
        assert!(matches!(
            tx.reserve_timeout(0, Duration::from_millis(20)),
            Err(Error::Timeout { .. })
        ));
        rx.try_peek().unwrap().unwrap().release();
        assert!(tx.try_reserve(448).unwrap().is_some());
    }

    #[test]
    fn unreleased_frame_is_peeked_again_and_roles_are_exclusive() {
        let ring = Ring::create(4096).unwrap();
        let mut tx = ring.producer(Peer::unwatched()).unwrap();
        assert!(matches!(
            ring.producer(Peer::unwatched()),
            Err(Error::AlreadyClaimed {
                role: "producer",
                ..
            })
        ));
        let mut rx = ring.consumer(Peer::unwatched()).unwrap();
        tx.send(b"abc").unwrap();
        assert_eq!(&*rx.try_peek().unwrap().unwrap(), b"abc");
        assert_eq!(&*rx.try_peek().unwrap().unwrap(), b"abc");
        drop(tx);
        rx.peek().unwrap().release();
        assert!(matches!(rx.peek(), Err(Error::Closed)));
    }

    #[test]
    fn corrupt_indices_and_headers_are_errors() {
        let ring = Ring::create(1024).unwrap();
        let mut tx = ring.producer(Peer::unwatched()).unwrap();
        let mut rx = ring.consumer(Peer::unwatched()).unwrap();
        tx.send(b"x").unwrap();
        // A published header whose length runs past the ring end.
        ring.view
            .publish_header(0, FrameHeader::new(0, 1, 1 << 40, 0));
        assert!(matches!(rx.try_peek(), Err(Error::Corrupt { .. })));
        // A garbage kind.
        ring.view
            .publish_header(0, FrameHeader::new(0, 0xdead, 1, 0));
        assert!(matches!(rx.try_peek(), Err(Error::Corrupt { .. })));
        // Fields that do not match the stamp (a stale header, or random bytes).
        ring.view.publish_header(0, FrameHeader::new(4096, 1, 1, 0));
        assert!(matches!(rx.try_peek(), Err(Error::Corrupt { .. })));
        // A tail beyond the head, as a hostile consumer could write it.
        ring.view.ctl().tail.store(1 << 50, Ordering::Release);
        assert!(matches!(tx.reserve(900), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn stale_payload_never_passes_for_a_frame() {
        // Every payload line holds the stamp that a frame starting at the same place one lap
        // later would carry: without the producer clearing the next slot, the consumer would
        // find a "published" stamp in stale bytes (and then fail on its check word).
        let (mut tx, mut rx) = pair(1024);
        for round in 0..200u64 {
            let len = 64 * (1 + (round as usize * 7) % 9);
            if tx.try_reserve(len).unwrap().is_none() {
                assert!(rx.try_peek().unwrap().is_none()); // skips the wrap padding
            }
            let at = tx.head + HEADER_LEN as u64;
            let mut g = tx.try_reserve(len).unwrap().expect("drained every round");
            for (i, line) in g.chunks_exact_mut(64).enumerate() {
                let future = stamp(at + 64 * i as u64 + 1024);
                line[..8].copy_from_slice(&future.to_ne_bytes());
            }
            g.commit();
            let f = rx.try_peek().unwrap().unwrap();
            assert_eq!(f.len(), len);
            f.release();
            assert!(rx.try_peek().unwrap().is_none(), "round {round}");
        }
    }

    #[test]
    fn attach_checks_the_magic() {
        let seg = Arc::new(Segment::new(8192).unwrap());
        assert!(matches!(
            Ring::attach(seg.clone(), 0),
            Err(Error::Corrupt { .. })
        ));
        Ring::init_in(seg.clone(), 0, 4096).unwrap();
        assert_eq!(Ring::attach(seg.clone(), 0).unwrap().capacity(), 4096);
        assert!(matches!(
            Ring::init_in(seg, 0, 8192),
            Err(Error::InvalidArgument { .. })
        ));
    }
}
