//! [`TimeError`]: a broken law, named by its chunk, its record and what is wrong.

use std::fmt;
use std::sync::Arc;

use super::TimeRange;

/// Which chunk of which stream: its name (empty for a stream with none), its sequence number
/// in the stream (0 for the first chunk) and its range. Shown as `peaks chunk 3 [100, 200)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkId {
    /// The stream's name, as given to [`Continuity::named`](super::Continuity::named).
    pub stream: Arc<str>,
    /// The chunk's sequence number in the stream.
    pub seq: u64,
    /// The range the chunk covers.
    pub range: TimeRange,
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.stream.is_empty() {
            write!(f, "{} ", self.stream)?;
        }
        write!(f, "chunk {} {}", self.seq, self.range)
    }
}

/// What is wrong with one record of a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordProblem {
    /// Its end is before its start.
    EndsBeforeStart,
    /// It starts before the chunk does.
    StartsBeforeChunk,
    /// It ends after the chunk does.
    EndsAfterChunk,
    /// It has length 0 at the chunk's end: that instant belongs to the next chunk.
    AtChunkEnd,
    /// It starts before the record ahead of it, which started at `prev_start`.
    Unsorted { prev_start: i64 },
}

impl fmt::Display for RecordProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordProblem::EndsBeforeStart => f.write_str("ends before it starts"),
            RecordProblem::StartsBeforeChunk => f.write_str("starts before the chunk"),
            RecordProblem::EndsAfterChunk => f.write_str("ends after the chunk"),
            RecordProblem::AtChunkEnd => f.write_str(
                "has length 0 at the chunk's end, an instant that belongs to the next chunk",
            ),
            RecordProblem::Unsorted { prev_start } => write!(
                f,
                "starts before the record ahead of it (at {prev_start}): records must be sorted \
                 by start"
            ),
        }
    }
}

/// What is wrong with one interval of the lists given to
/// [`split_by_containment`](super::split_by_containment) or
/// [`fully_contained_in`](super::fully_contained_in).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IntervalProblem {
    /// Its end is before its start.
    EndsBeforeStart,
    /// It starts before the interval ahead of it, which started at `prev_start`.
    Unsorted { prev_start: i64 },
    /// A base interval that starts before the one ahead of it ended (at `prev_end`).
    OverlapsPrevious { prev_end: i64 },
    /// A thing that starts in base interval `base` and ends after it, while thing `inside`,
    /// after it, lies inside that base interval: the things inside are not one index range.
    Straddles { base: usize, inside: usize },
}

impl fmt::Display for IntervalProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntervalProblem::EndsBeforeStart => f.write_str("ends before it starts"),
            IntervalProblem::Unsorted { prev_start } => write!(
                f,
                "starts before the one ahead of it (at {prev_start}): intervals must be sorted \
                 by start"
            ),
            IntervalProblem::OverlapsPrevious { prev_end } => write!(
                f,
                "starts before the one ahead of it ends (at {prev_end}): base intervals must not \
                 overlap"
            ),
            IntervalProblem::Straddles { base, inside } => write!(
                f,
                "starts in base interval {base} and ends after it, but thing {inside} after it \
                 lies inside: the things inside are not one index range (use fully_contained_in)"
            ),
        }
    }
}

/// A broken law of time chunks, or a request that the streams cannot answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TimeError {
    /// A range whose end is before its start.
    #[error("time range [{start}, {end}) ends before it starts")]
    Reversed { start: i64, end: i64 },

    /// Record `record` (its index in the chunk), of interval `[start, end)`, breaks the chunk
    /// law.
    #[error("{chunk}: record {record} [{start}, {end}) {problem}")]
    Record {
        chunk: ChunkId,
        record: usize,
        start: i64,
        end: i64,
        problem: RecordProblem,
    },

    /// `chunk` starts after `prev`, the chunk before it, ended: no chunk covers the time between.
    #[error(
        "{chunk} starts at {}, after {prev} ended at {}: a gap of {} (chunks must be contiguous)",
        chunk.range.start(), prev.range.end(), chunk.range.start().abs_diff(prev.range.end())
    )]
    Gap { prev: ChunkId, chunk: ChunkId },

    /// `chunk` starts before `prev`, the chunk before it, ended.
    #[error(
        "{chunk} starts at {}, before {prev} ended at {}: they overlap by {} (chunks must be \
         contiguous)",
        chunk.range.start(), prev.range.end(), chunk.range.start().abs_diff(prev.range.end())
    )]
    Overlap { prev: ChunkId, chunk: ChunkId },

    /// The other stream of a [`Synchronizer`](super::Synchronizer) ended (at `other_end`, or
    /// with no chunk at all) before the end of base chunk `base`.
    #[error(
        "{base} ends after the {other} stream, which {}",
        match other_end { Some(e) => format!("ended at {e}"), None => "had no chunks".to_owned() }
    )]
    NotCovered {
        base: ChunkId,
        other: Arc<str>,
        other_end: Option<i64>,
    },

    /// Interval `index` of the list `list` ("base" or "things"), of interval `[start, end)`,
    /// breaks what containment assumes.
    #[error("{list} interval {index} [{start}, {end}) {problem}")]
    Interval {
        list: &'static str,
        index: usize,
        start: i64,
        end: i64,
        problem: IntervalProblem,
    },
}
