//! The checks of the two laws: records inside their chunk and sorted ([`check_chunk`]), chunks
//! of a stream contiguous ([`Continuity`]).

use std::sync::Arc;

use super::{ChunkId, Interval, RecordProblem, TimeError, TimeRange};

/// Checks the chunk law for chunk `seq` of an unnamed stream: every record lies inside `range`
/// (see [`TimeRange::holds`]) and the records are sorted by start. The error names the chunk,
/// the first record that breaks the law and how. O(n).
///
/// ```
/// use shmexec::time::{TimeRange, check_chunk};
///
/// let range = TimeRange::new(0, 100)?;
/// assert!(check_chunk(0, range, &[TimeRange::new(0, 10)?, TimeRange::new(5, 100)?]).is_ok());
/// let e = check_chunk(7, range, &[TimeRange::new(50, 60)?, TimeRange::new(20, 30)?]);
/// assert_eq!(
///     e.unwrap_err().to_string(),
///     "chunk 7 [0, 100): record 1 [20, 30) starts before the record ahead of it (at 50): \
///      records must be sorted by start"
/// );
/// # Ok::<(), shmexec::time::TimeError>(())
/// ```
pub fn check_chunk<T: Interval>(
    seq: u64,
    range: TimeRange,
    records: &[T],
) -> Result<(), TimeError> {
    check_records(&Arc::from(""), seq, range, records)
}

/// [`check_chunk`] for chunk `seq` of stream `stream`.
pub(super) fn check_records<T: Interval>(
    stream: &Arc<str>,
    seq: u64,
    range: TimeRange,
    records: &[T],
) -> Result<(), TimeError> {
    let mut prev_start = i64::MIN;
    for (i, r) in records.iter().enumerate() {
        let (start, end) = (r.start(), r.end());
        let problem = if end < start {
            RecordProblem::EndsBeforeStart
        } else if start < prev_start {
            RecordProblem::Unsorted { prev_start }
        } else if start < range.start() {
            RecordProblem::StartsBeforeChunk
        } else if end > range.end() {
            RecordProblem::EndsAfterChunk
        } else if start == range.end() {
            RecordProblem::AtChunkEnd
        } else {
            prev_start = start;
            continue;
        };
        return Err(TimeError::Record {
            chunk: ChunkId {
                stream: stream.clone(),
                seq,
                range,
            },
            record: i,
            start,
            end,
            problem,
        });
    }
    Ok(())
}

/// The continuity law over one stream, checked chunk by chunk: each chunk starts exactly where
/// the one before it ended (no gap, no overlap). The first chunk may start anywhere.
///
/// ```
/// use shmexec::time::{Continuity, TimeRange};
///
/// let mut peaks = Continuity::named("peaks");
/// peaks.push_range(TimeRange::new(0, 100)?)?;
/// peaks.push_range(TimeRange::new(100, 250)?)?;
/// let e = peaks.push_range(TimeRange::new(300, 400)?).unwrap_err();
/// assert_eq!(
///     e.to_string(),
///     "peaks chunk 2 [300, 400) starts at 300, after peaks chunk 1 [100, 250) ended at 250: \
///      a gap of 50 (chunks must be contiguous)"
/// );
/// # Ok::<(), shmexec::time::TimeError>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct Continuity {
    stream: Arc<str>,
    /// The last chunk accepted, if any.
    prev: Option<TimeRange>,
    /// The sequence number of the next chunk.
    next_seq: u64,
}

impl Continuity {
    /// A checker for an unnamed stream, before its first chunk.
    pub fn new() -> Continuity {
        Continuity::default()
    }

    /// A checker for the stream `name` (errors show it: `peaks chunk 3 [..)`).
    pub fn named(name: impl Into<Arc<str>>) -> Continuity {
        Continuity {
            stream: name.into(),
            ..Continuity::default()
        }
    }

    /// The stream's name.
    pub fn stream(&self) -> &Arc<str> {
        &self.stream
    }

    /// The sequence number the next chunk gets (the number of chunks accepted so far).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Where the next chunk must start: the end of the last chunk, or `None` before the first.
    pub fn end(&self) -> Option<i64> {
        self.prev.map(|r| r.end())
    }

    /// The id the next chunk would get if it covered `range`.
    pub fn next_id(&self, range: TimeRange) -> ChunkId {
        ChunkId {
            stream: self.stream.clone(),
            seq: self.next_seq,
            range,
        }
    }

    /// Checks that a chunk covering `range` may come next, without accepting it.
    pub fn check_next(&self, range: TimeRange) -> Result<(), TimeError> {
        let Some(prev) = self.prev else {
            return Ok(());
        };
        if range.start() == prev.end() {
            return Ok(());
        }
        let prev = ChunkId {
            stream: self.stream.clone(),
            seq: self.next_seq - 1,
            range: prev,
        };
        let chunk = self.next_id(range);
        Err(if range.start() > prev.range.end() {
            TimeError::Gap { prev, chunk }
        } else {
            TimeError::Overlap { prev, chunk }
        })
    }

    /// Accepts the next chunk's range if it continues the stream; returns its sequence number.
    /// On an error nothing changes.
    pub fn push_range(&mut self, range: TimeRange) -> Result<u64, TimeError> {
        self.check_next(range)?;
        let seq = self.next_seq;
        self.prev = Some(range);
        self.next_seq += 1;
        Ok(seq)
    }

    /// Accepts the next chunk if it continues the stream and its records keep the chunk law
    /// ([`check_chunk`]); returns its sequence number. On an error nothing changes.
    pub fn push<T: Interval>(&mut self, range: TimeRange, records: &[T]) -> Result<u64, TimeError> {
        self.check_next(range)?;
        check_records(&self.stream, self.next_seq, range, records)?;
        self.push_range(range)
    }

    /// Takes `range` as the stream's next chunk without checking it: after a chunk that broke
    /// a law (and was reported), the chunk after it is checked against it, not against the one
    /// before, so one bad chunk is one error.
    pub fn skip(&mut self, range: TimeRange) -> u64 {
        let seq = self.next_seq;
        self.prev = Some(range);
        self.next_seq += 1;
        seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: i64, end: i64) -> TimeRange {
        TimeRange::new(start, end).unwrap()
    }

    /// An interval that may be reversed, which a `TimeRange` cannot be.
    struct Raw(i64, i64);

    impl Interval for Raw {
        fn start(&self) -> i64 {
            self.0
        }
        fn end(&self) -> i64 {
            self.1
        }
    }

    fn problem<T: Interval>(range: TimeRange, records: &[T]) -> RecordProblem {
        match check_chunk(3, range, records) {
            Err(TimeError::Record { problem, .. }) => problem,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn each_record_problem_is_found() {
        let c = r(10, 20);
        assert!(check_chunk(0, c, &[r(10, 10), r(10, 20), r(19, 19), r(19, 20)]).is_ok());
        assert!(check_chunk::<TimeRange>(0, r(5, 5), &[]).is_ok());
        assert_eq!(problem(c, &[Raw(12, 11)]), RecordProblem::EndsBeforeStart);
        assert_eq!(problem(c, &[r(9, 12)]), RecordProblem::StartsBeforeChunk);
        assert_eq!(problem(c, &[r(15, 21)]), RecordProblem::EndsAfterChunk);
        assert_eq!(problem(c, &[r(20, 20)]), RecordProblem::AtChunkEnd);
        assert_eq!(problem(r(5, 5), &[r(5, 5)]), RecordProblem::AtChunkEnd);
        assert_eq!(
            problem(c, &[r(12, 13), r(11, 12)]),
            RecordProblem::Unsorted { prev_start: 12 }
        );
        let e = check_chunk(3, c, &[r(10, 11), r(15, 21)]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "chunk 3 [10, 20): record 1 [15, 21) ends after the chunk"
        );
    }

    #[test]
    fn continuity_names_both_chunks_and_changes_nothing_on_error() {
        let mut c = Continuity::named("hits");
        assert_eq!(c.push_range(r(-50, 0)).unwrap(), 0);
        assert_eq!(c.push_range(r(0, 0)).unwrap(), 1);
        assert_eq!(c.push(r(0, 10), &[r(1, 2)]).unwrap(), 2);
        let e = c.push_range(r(5, 20)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "hits chunk 3 [5, 20) starts at 5, before hits chunk 2 [0, 10) ended at 10: they \
             overlap by 5 (chunks must be contiguous)"
        );
        assert!(matches!(e, TimeError::Overlap { .. }));
        assert!(matches!(
            c.push_range(r(11, 20)),
            Err(TimeError::Gap { .. })
        ));
        // A bad record refuses the chunk and keeps its place.
        let e = c.push(r(10, 20), &[r(10, 21)]).unwrap_err();
        assert!(
            e.to_string().starts_with("hits chunk 3 [10, 20): record 0"),
            "{e}"
        );
        assert_eq!((c.next_seq(), c.end()), (3, Some(10)));
        assert_eq!(c.push(r(10, 20), &[r(10, 20)]).unwrap(), 3);
    }
}
