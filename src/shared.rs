//! The shared region: memory the coordinator fills once and every worker reads in place.
//!
//! Inputs sent through [`crate::Pool::map`] are copied into a ring: one `memcpy` by the
//! coordinator per input byte. That is free when the data is made for the call (a digitizer
//! read straight into a slot with [`crate::Pool::map_in_place`]), but when a program already
//! holds its chunks in memory the copy is a third busy process beside the workers, and on a
//! machine whose workers run at memory speed it caps the pool at about half of rayon.
//!
//! A pool built with [`crate::Builder::shared_bytes`] owns a shared region of that size,
//! mapped in every worker. The program writes its chunks there ([`crate::Pool::shared_mut`]:
//! generate them there, read a file into it) instead of into a `Vec`, and hands out [`Span`]s,
//! two numbers each; the worker reads the samples where they lie with [`ArchivedSpan::get`].
//! No byte of the chunk is copied by anyone. This is what Python users do by hand with
//! `multiprocessing.shared_memory`, with the mapping, the bounds and the lifetime handled.
//!
//! ```no_run
//! use shmexec::shared::Span;
//! use shmexec::{Pool, Samples};
//!
//! // Each item is a span of the region; the worker sums it in place.
//! let task = shmexec::try_from_fn::<Span<f32>, _, _>(|span| Ok(span.get()?.iter().sum::<f32>()));
//! let n = 1 << 20;
//! let mut pool = Pool::builder().workers(2).shared_bytes(16 * n * 4).build(task)?;
//! // Fill the region between calls (this waits until no worker reads it).
//! for (i, x) in pool.shared_mut::<f32>()?.iter_mut().enumerate() {
//!     *x = (i / n) as f32;
//! }
//! for (i, sum) in pool.map((0..16).map(|i| Span::new(i * n, n))).enumerate() {
//!     assert_eq!(sum?.to_native(), (i * n) as f32);
//! }
//! # Ok::<(), shmexec::Error>(())
//! ```
//!
//! Who writes when: only the coordinator writes the region, and only through
//! [`crate::Pool::shared_mut`], which takes the pool mutably (so no call is running) and first
//! waits for the items of an abandoned call to finish (so no worker is reading). Workers get
//! shared slices only, for as long as they hold the item's input, and map the region read-only:
//! a worker that writes into it anyway (a stray pointer in native code) dies with SIGSEGV and is
//! replaced like any crashed worker, and the input stays intact for the retry.

use std::marker::PhantomData;
use std::sync::{Arc, OnceLock};

use shmexec_shm::Segment;

use crate::archive::Sample;
use crate::error::{Error, Result};

/// `len` samples of type `S` from sample `start` of the pool's shared region: the input a
/// coordinator sends instead of the samples themselves. A worker reads it with
/// [`ArchivedSpan::get`].
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span<S> {
    start: u64,
    len: u64,
    _samples: PhantomData<S>,
}

impl<S: Sample> Span<S> {
    /// `len` samples from sample `start` (both counted in samples of `S`, not bytes).
    pub fn new(start: usize, len: usize) -> Span<S> {
        Span {
            start: start as u64,
            len: len as u64,
            _samples: PhantomData,
        }
    }

    /// Index of the first sample.
    pub fn start(&self) -> usize {
        self.start as usize
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// `true` for a span of no samples.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<S: Sample> ArchivedSpan<S> {
    /// Index of the first sample.
    pub fn start(&self) -> u64 {
        self.start.to_native()
    }

    /// Number of samples (what [`ArchivedSpan::get`] returns if the span is valid).
    pub fn len(&self) -> u64 {
        self.len.to_native()
    }

    /// `true` for a span of no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The samples, read in place from the shared region mapped in this worker.
    ///
    /// An `Err` if the span does not lie inside the region, or if this process is not a worker
    /// of a pool built with [`crate::Builder::shared_bytes`]. (In the coordinator, read the
    /// region with [`crate::Pool::shared`].)
    pub fn get(&self) -> Result<&[S]> {
        let region = REGION.get().ok_or(Error::NoSharedRegion)?;
        let (start, len) = (self.start.to_native(), self.len.to_native());
        let size = std::mem::size_of::<S>() as u64;
        let samples = region.len() as u64 / size;
        if start.checked_add(len).is_none_or(|end| end > samples) {
            return Err(Error::SpanOutOfRange {
                start,
                len,
                region: samples,
            });
        }
        REGION_READ.fetch_add(len * size, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the bytes [start * size, (start + len) * size) lie inside the mapping (checked
        // just above), which stays mapped for the life of this process (`REGION` holds it and is
        // never emptied). The mapping is page aligned and `size` is a multiple of `S`'s
        // alignment (true of every `Sample`), so the pointer is aligned; `S` is `Pod`, so any
        // bytes are a valid `S`. Nothing writes these bytes while the slice lives: the
        // coordinator writes the region only through `Pool::shared_mut`, which first waits until
        // every item handed to a worker is answered, and the slice borrows `self`, which lives in
        // this item's input frame.
        Ok(unsafe {
            std::slice::from_raw_parts(
                region.as_ptr().add((start * size) as usize).cast::<S>(),
                len as usize,
            )
        })
    }
}

/// Region bytes this worker process read through spans since the worker loop last took them
/// (`take_region_read`), for its counters.
static REGION_READ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The region bytes read through spans since the last call (for the worker's counters).
pub(crate) fn take_region_read() -> u64 {
    REGION_READ.swap(0, std::sync::atomic::Ordering::Relaxed)
}

/// The region as mapped in this worker process; set once, before `Task::init`.
static REGION: OnceLock<Arc<Segment>> = OnceLock::new();

/// The shared region as mapped (read-only) in this worker process, if its pool has one: for a
/// language binding whose workers lend it to arrays of their own (see
/// [`crate::Pool::shared_segment`]).
#[doc(hidden)]
pub fn worker_segment() -> Option<Arc<Segment>> {
    REGION.get().cloned()
}

/// Makes `region` the one [`ArchivedSpan::get`] reads in this (worker) process, and makes the
/// worker's mapping of it read-only: a worker that writes into the region (a stray pointer in a
/// C extension) dies with SIGSEGV, is replaced, and its item is retried on intact input, instead
/// of corrupting what every later item reads.
pub(crate) fn install(region: Arc<Segment>) -> Result<()> {
    // SAFETY: in a worker nothing writes the region: `ArchivedSpan::get` hands out shared slices
    // only, and the pool's own handle (copied into a forked worker with the rest of the
    // coordinator's memory) is never used there.
    unsafe { region.make_read_only() }?;
    // A worker serves exactly one pool, so this is its first and only call.
    let _ = REGION.set(region);
    Ok(())
}

/// The coordinator's view of the region: the whole of it as samples of `S`.
pub(crate) fn view<S: Sample>(region: &Segment) -> &[S] {
    // SAFETY: the mapping is `region.len()` bytes, page aligned (so aligned for any `Sample`),
    // and lives as long as the borrow of `region`; `S` is `Pod`. Workers never write the
    // region, and the coordinator writes it only through `view_mut`, which needs the pool
    // mutably, so no write overlaps this shared borrow in this process.
    unsafe {
        std::slice::from_raw_parts(
            region.as_ptr().cast::<S>(),
            region.len() / std::mem::size_of::<S>(),
        )
    }
}

/// The coordinator's writable view of the region. The caller (`Pool::shared_mut`) holds the
/// pool mutably and has waited until no worker is reading.
pub(crate) fn view_mut<S: Sample>(region: &mut Arc<Segment>) -> &mut [S] {
    // SAFETY: as in `view`, for bounds, alignment and validity. Exclusive: the pool lends its
    // `Arc` mutably here, and the only other `Arc`s of this process that reach the region are
    // those `Pool::shared_segment` gave out, which yield a raw address (making a reference of it
    // is their holder's `unsafe`); workers hold theirs in their own address space. Every item
    // handed to a worker has been answered, and a worker reads the region only while it holds
    // an item.
    unsafe {
        std::slice::from_raw_parts_mut(
            region.as_ptr().cast::<S>(),
            region.len() / std::mem::size_of::<S>(),
        )
    }
}
