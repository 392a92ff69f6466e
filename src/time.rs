//! Time chunks, as strax has them: streams of records cut into chunks by time, with the laws
//! that let a pipeline route, merge, split and synchronize them knowing only each chunk's range.
//!
//! # The laws
//!
//! 1. **A record is an interval.** Each record covers `[start, end)` in integer time units
//!    (nanoseconds in strax), with `end >= start`: the record type implements [`Interval`].
//! 2. **A chunk holds the records inside its range.** A chunk covers a [`TimeRange`]
//!    `[start, end)`; each of its records starts in that range and ends by its end (a record of
//!    length 0 at the range's end belongs to the next chunk), and the records are sorted by
//!    start. [`check_chunk`] checks it.
//! 3. **A stream's chunks are contiguous.** Each chunk starts exactly where the one before it
//!    ended: no gap, no overlap, so the chunks of a stream cover its span once. Time with no
//!    records is an empty chunk, not a hole. [`Continuity`] checks it as the chunks come.
//! 4. **Chunks are cut only between records.** Merging consecutive chunks is concatenation;
//!    splitting at `t` puts the records that start before `t` on the left and the others on the
//!    right, so it is legal only if every record on the left ends by `t`: no record straddles a
//!    split. Where no legal split exists, the chunk stays whole. [`Rechunker`] merges and
//!    splits to a target size this way.
//! 5. **Kinds are synchronized by containment.** A computation over two kinds (events and
//!    peaks) takes one as the base: with each base interval go the other kind's records that
//!    lie fully inside it; those between base intervals or straddling their boundaries go with
//!    none. [`fully_contained_in`] and [`split_by_containment`] do it within chunks,
//!    [`Synchronizer`] across two streams chunked differently.
//!
//! Why sorted and contiguous: with them, a chunk's `(start, end)` says everything routing
//! needs. The records of a stream that lie in a window `[a, b)` are in exactly the chunks whose
//! ranges overlap it, so a stage handed an event chunk needs descriptors of those peak chunks
//! only, and finds its records inside each one by binary search on the starts (sorted), in
//! place, without reading the others. Contiguity makes "is there more to come before `t`?" a
//! question of ranges alone: once a stream's chunks reach `t`, no later chunk can hold a record
//! that starts before `t` (the [`Synchronizer`] waits on exactly that), and a missing stretch
//! is always an error, never an ambiguous "no data".
//!
//! Every check returns a [`TimeError`] that names the chunk (stream, sequence number, range),
//! the record and what is wrong.
//!
//! # Example
//!
//! ```
//! use bytemuck::{Pod, Zeroable};
//! use shmexec::Records;
//! use shmexec::time::{Continuity, Interval, TimeRange, split_by_containment};
//!
//! /// A peak: `length` samples of `dt` ns from `time`.
//! #[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
//! #[repr(C)]
//! struct Peak {
//!     time: i64,
//!     length: i32,
//!     dt: i32,
//!     area: f32,
//!     _pad: u32,
//! }
//!
//! impl Interval for Peak {
//!     fn start(&self) -> i64 {
//!         self.time
//!     }
//!     fn end(&self) -> i64 {
//!         self.time + self.length as i64 * self.dt as i64
//!     }
//! }
//!
//! let peak = |time, length| Peak { time, length, dt: 10, area: 1.0, _pad: 0 };
//! // A chunk of peaks travels as (records, range) and is read in place.
//! let chunk = (
//!     Records(vec![peak(100, 5), peak(180, 3), peak(400, 20)]),
//!     TimeRange::new(0, 1_000)?,
//! );
//! let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&chunk)?;
//! let archived =
//!     rkyv::access::<rkyv::Archived<(Records<Peak>, TimeRange)>, rkyv::rancor::Error>(&bytes)?;
//! let (peaks, range) = (archived.0.records(), archived.1.to_native());
//!
//! // The laws hold: the peaks lie inside the chunk, sorted, and the chunk continues the stream.
//! let mut stream = Continuity::named("peaks");
//! stream.push(range, peaks)?;
//!
//! // Events [90, 220) and [350, 500): the first holds two peaks, the second none (the peak at
//! // 400 ends at 600).
//! let events = [TimeRange::new(90, 220)?, TimeRange::new(350, 500)?];
//! let per_event = split_by_containment(&events, peaks)?;
//! assert_eq!(per_event, vec![0..2, 2..2]);
//! assert_eq!(&peaks[per_event[0].clone()], &[peak(100, 5), peak(180, 3)]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod error;
mod laws;
mod range;
mod rechunk;
mod sync;

pub use error::{ChunkId, IntervalProblem, RecordProblem, TimeError};
pub use laws::{Continuity, check_chunk};
pub use range::{ArchivedTimeRange, Interval, TimeRange};
pub use rechunk::{Rechunker, TimeChunk};
pub use sync::{Synchronizer, fully_contained_in, split_by_containment};
