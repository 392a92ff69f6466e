//! Synchronization by containment: which things lie inside which base intervals
//! ([`fully_contained_in`], [`split_by_containment`]), and the same over two chunked streams
//! ([`Synchronizer`]).

use std::ops::Range;
use std::sync::Arc;

use super::{Continuity, Interval, IntervalProblem, TimeError, TimeRange};

/// Checks what containment assumes of `list`: each interval ends at or after its start, the
/// intervals are sorted by start and, for a base list (`disjoint`), do not overlap.
fn check_list<I: Interval>(
    name: &'static str,
    list: &[I],
    disjoint: bool,
) -> Result<(), TimeError> {
    let (mut prev_start, mut prev_end) = (i64::MIN, i64::MIN);
    for (index, x) in list.iter().enumerate() {
        let (start, end) = (x.start(), x.end());
        let problem = if end < start {
            IntervalProblem::EndsBeforeStart
        } else if start < prev_start {
            IntervalProblem::Unsorted { prev_start }
        } else if disjoint && start < prev_end {
            IntervalProblem::OverlapsPrevious { prev_end }
        } else {
            (prev_start, prev_end) = (start, end);
            continue;
        };
        return Err(TimeError::Interval {
            list: name,
            index,
            start,
            end,
            problem,
        });
    }
    Ok(())
}

/// For each thing, the index of the base interval it lies fully inside, or `None`: strax's
/// `fully_contained_in`. A thing lies inside a base interval if it starts in it (`[start, end)`)
/// and ends by its end, as [`TimeRange::holds`] says; one of length 0 at a base interval's end
/// is not inside it.
///
/// `base` must be sorted and non-overlapping (as events are), `things` sorted by start; the
/// error names the first interval that is not. O(n + m).
pub fn fully_contained_in<B: Interval, T: Interval>(
    base: &[B],
    things: &[T],
) -> Result<Vec<Option<usize>>, TimeError> {
    check_list("base", base, true)?;
    check_list("things", things, false)?;
    let mut b = 0;
    Ok(things
        .iter()
        .map(|t| {
            // Base intervals are disjoint and sorted by start, so their ends are sorted too:
            // the first one that ends after `t` starts is the only one that can hold it.
            while b < base.len() && base[b].end() <= t.start() {
                b += 1;
            }
            (b < base.len() && base[b].start() <= t.start() && t.end() <= base[b].end())
                .then_some(b)
        })
        .collect())
}

/// For each base interval, the index range of the `things` that lie fully inside it (see
/// [`fully_contained_in`]): strax's `split_by_containment`, as ranges, so that each base
/// interval's things are a subslice read in place. Things between base intervals or straddling
/// one's boundary are in no range; a base interval with nothing inside gets an empty range at
/// the index of the first thing that starts in or after it. O(n + m).
///
/// `base` must be sorted and non-overlapping, `things` sorted by start. The things inside one
/// base interval are one index range unless a thing that straddles its end lies between two
/// that are inside (possible only when things overlap one another, as hits of different
/// channels do); that is an error ([`IntervalProblem::Straddles`]): use [`fully_contained_in`]
/// there.
///
/// ```
/// use shmexec::time::{TimeRange, split_by_containment};
///
/// let r = |s, e| TimeRange::new(s, e).unwrap();
/// let events = [r(0, 10), r(20, 30)];
/// let peaks = [r(0, 4), r(5, 10), r(9, 21), r(22, 25), r(28, 31)];
/// // [9, 21) straddles both events, [28, 31) the end of the second.
/// assert_eq!(split_by_containment(&events, &peaks)?, vec![0..2, 3..4]);
/// # Ok::<(), shmexec::time::TimeError>(())
/// ```
pub fn split_by_containment<B: Interval, T: Interval>(
    base: &[B],
    things: &[T],
) -> Result<Vec<Range<usize>>, TimeError> {
    check_list("base", base, true)?;
    check_list("things", things, false)?;
    let mut j = 0;
    let mut out = Vec::with_capacity(base.len());
    for (i, b) in base.iter().enumerate() {
        while j < things.len() && things[j].start() < b.start() {
            j += 1;
        }
        // Where this base interval's things begin: its range if none is inside.
        let first = j;
        let mut inside: Option<Range<usize>> = None;
        // A straddler seen after the first thing inside: an error if another one inside follows.
        let mut straddler = None;
        while j < things.len() && things[j].start() < b.end() {
            if things[j].end() <= b.end() {
                if let Some(s) = straddler {
                    let t = &things[s];
                    return Err(TimeError::Interval {
                        list: "things",
                        index: s,
                        start: t.start(),
                        end: t.end(),
                        problem: IntervalProblem::Straddles { base: i, inside: j },
                    });
                }
                inside.get_or_insert(j..j).end = j + 1;
            } else if inside.is_some() && straddler.is_none() {
                straddler = Some(j);
            }
            j += 1;
        }
        out.push(inside.unwrap_or(first..first));
    }
    Ok(out)
}

/// Synchronizes a stream of records (the "other" kind, e.g. peaks) to the chunks of a base
/// stream (e.g. events) whose chunk boundaries differ: for each base chunk, in order, it hands
/// out exactly the other stream's records that lie inside the base chunk's range (see
/// [`TimeRange::holds`]); records that straddle a base chunk's boundary, or lie before the first
/// base chunk, are dropped, as strax drops things outside every container.
///
/// Push the other stream's chunks as they come ([`push_other`](Self::push_other)); ask for each
/// base chunk with [`take`](Self::take), which answers `None` (not yet) until the other stream
/// has covered the base chunk's end. Records are held only until a base chunk has passed them,
/// so memory stays bounded by what the other stream is ahead. Both streams are checked: the
/// other's chunks keep the chunk law and continuity, the base chunks continuity.
///
/// ```
/// use shmexec::time::{Synchronizer, TimeRange};
///
/// let r = |s, e| TimeRange::new(s, e).unwrap();
/// let mut sync = Synchronizer::named("events", "peaks");
/// sync.push_other(r(0, 15), &[r(1, 2), r(8, 12)])?;
/// // The peaks reached 15, not 20: not yet.
/// assert_eq!(sync.take(r(0, 20))?, None);
/// sync.push_other(r(15, 40), &[r(18, 19), r(19, 25)])?;
/// assert_eq!(sync.take(r(0, 10))?, Some(vec![r(1, 2)])); // [8, 12) straddles 10
/// assert_eq!(sync.take(r(10, 20))?, Some(vec![r(18, 19)]));
/// sync.finish_other();
/// assert!(sync.take(r(20, 50)).is_err()); // the peaks ended at 40
/// # Ok::<(), shmexec::time::TimeError>(())
/// ```
#[derive(Debug)]
pub struct Synchronizer<T> {
    base: Continuity,
    other: Continuity,
    /// The other stream's records not yet passed by a base chunk: `buf[head..]`, sorted by start.
    buf: Vec<T>,
    head: usize,
    /// Whether the other stream has ended.
    other_done: bool,
}

impl<T: Copy + Interval> Default for Synchronizer<T> {
    fn default() -> Self {
        Synchronizer::new()
    }
}

impl<T: Copy + Interval> Synchronizer<T> {
    /// A synchronizer whose streams are named "base" and "other" in errors.
    pub fn new() -> Synchronizer<T> {
        Synchronizer::named("base", "other")
    }

    /// A synchronizer whose streams are named `base` and `other` in errors.
    pub fn named(base: impl Into<Arc<str>>, other: impl Into<Arc<str>>) -> Synchronizer<T> {
        Synchronizer {
            base: Continuity::named(base),
            other: Continuity::named(other),
            buf: Vec::new(),
            head: 0,
            other_done: false,
        }
    }

    /// Feeds the other stream's next chunk. It must keep the laws ([`Continuity::push`]); if it
    /// does not, the error names it and nothing changes. Records a base chunk already passed
    /// (those that start before the last base chunk's end) are dropped at once.
    pub fn push_other(&mut self, range: TimeRange, records: &[T]) -> Result<(), TimeError> {
        self.other.push(range, records)?;
        let passed = self.base.end().unwrap_or(i64::MIN);
        let from = records.partition_point(|r| r.start() < passed);
        self.buf.extend_from_slice(&records[from..]);
        Ok(())
    }

    /// Says that the other stream has ended: a base chunk past its end can no longer be served.
    pub fn finish_other(&mut self) {
        self.other_done = true;
    }

    /// Where the other stream has reached (the end of its last chunk), or `None` before its first.
    pub fn covered(&self) -> Option<i64> {
        self.other.end()
    }

    /// The number of records held.
    pub fn held(&self) -> usize {
        self.buf.len() - self.head
    }

    /// The other stream's records inside the next base chunk, `base`: `Some` once the other
    /// stream has covered `base.end()`, `None` (not yet: push more and ask again) before.
    ///
    /// `base` must continue the base stream ([`TimeError::Gap`], [`TimeError::Overlap`]); after
    /// [`finish_other`](Self::finish_other), a base chunk that ends past the other stream is
    /// [`TimeError::NotCovered`]. On an error or `None`, nothing changes.
    pub fn take(&mut self, base: TimeRange) -> Result<Option<Vec<T>>, TimeError> {
        self.base.check_next(base)?;
        match self.other.end() {
            Some(end) if end >= base.end() => {}
            other_end if self.other_done => {
                return Err(TimeError::NotCovered {
                    base: self.base.next_id(base),
                    other: self.other.stream().clone(),
                    other_end,
                });
            }
            _ => return Ok(None),
        }
        self.base.push_range(base)?;
        // Every held record starts at or after the previous base chunk's end, which is where
        // this one starts (continuity), unless this is the first base chunk.
        let mut inside = Vec::new();
        let mut i = self.head;
        while i < self.buf.len() && self.buf[i].start() < base.end() {
            if base.holds(&self.buf[i]) {
                inside.push(self.buf[i]);
            }
            i += 1;
        }
        self.head = i;
        if self.head == self.buf.len() {
            self.buf.clear();
            self.head = 0;
        } else if self.head * 2 >= self.buf.len() {
            self.buf.drain(..self.head);
            self.head = 0;
        }
        Ok(Some(inside))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: i64, end: i64) -> TimeRange {
        TimeRange::new(start, end).unwrap()
    }

    #[test]
    fn containment_at_equal_boundaries() {
        let base = [r(0, 10), r(10, 20), r(25, 25), r(30, 40)];
        let things = [
            r(0, 0),   // at the first base's start: inside it
            r(0, 10),  // exactly the first base
            r(9, 10),  // ends at its end: inside
            r(10, 10), // length 0 at its end: in the second
            r(10, 21), // straddles the second's end
            r(25, 25), // in an empty base interval: inside none
            r(29, 30), // between
            r(40, 40), // at the last base's end: inside none
        ];
        assert_eq!(
            fully_contained_in(&base, &things).unwrap(),
            vec![Some(0), Some(0), Some(0), Some(1), None, None, None, None]
        );
        assert_eq!(
            split_by_containment(&base, &things).unwrap(),
            vec![0..3, 3..4, 5..5, 7..7]
        );
        assert_eq!(
            split_by_containment::<TimeRange, TimeRange>(&[], &things).unwrap(),
            vec![]
        );
        assert_eq!(
            split_by_containment::<_, TimeRange>(&base, &[]).unwrap(),
            vec![0..0; 4]
        );
    }

    #[test]
    fn containment_checks_its_inputs() {
        let e = split_by_containment(&[r(0, 10), r(5, 20)], &[r(1, 2)]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "base interval 1 [5, 20) starts before the one ahead of it ends (at 10): base \
             intervals must not overlap"
        );
        let e = fully_contained_in(&[r(0, 10)], &[r(3, 4), r(2, 9)]).unwrap_err();
        assert!(matches!(
            e,
            TimeError::Interval {
                list: "things",
                index: 1,
                problem: IntervalProblem::Unsorted { prev_start: 3 },
                ..
            }
        ));
        // A straddler at either end of the things inside is left out; between them, an error.
        assert_eq!(
            split_by_containment(&[r(0, 10)], &[r(1, 11), r(2, 3), r(4, 5), r(6, 12)]).unwrap(),
            vec![1..3]
        );
        let e = split_by_containment(&[r(0, 10)], &[r(1, 2), r(2, 11), r(4, 5)]).unwrap_err();
        assert_eq!(
            e,
            TimeError::Interval {
                list: "things",
                index: 1,
                start: 2,
                end: 11,
                problem: IntervalProblem::Straddles { base: 0, inside: 2 },
            }
        );
    }

    #[test]
    fn the_synchronizer_waits_drops_and_checks() {
        let mut s = Synchronizer::<TimeRange>::named("events", "peaks");
        assert_eq!(s.take(r(0, 10)).unwrap(), None);
        s.push_other(r(-5, 5), &[r(-5, -4), r(1, 2), r(4, 5)])
            .unwrap();
        assert_eq!(s.take(r(0, 10)).unwrap(), None);
        s.push_other(r(5, 30), &[r(9, 12), r(12, 13), r(19, 21), r(25, 26)])
            .unwrap();
        assert_eq!(s.held(), 7);
        assert_eq!(s.take(r(0, 10)).unwrap(), Some(vec![r(1, 2), r(4, 5)]));
        assert_eq!(s.held(), 3);
        let e = s.take(r(11, 20)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("events chunk 1 [11, 20) starts at 11, after events chunk 0"),
            "{e}"
        );
        assert_eq!(s.take(r(10, 20)).unwrap(), Some(vec![r(12, 13)]));
        let e = s.push_other(r(30, 40), &[r(39, 41)]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("peaks chunk 2 [30, 40): record 0"),
            "{e}"
        );
        s.finish_other();
        assert_eq!(s.take(r(20, 30)).unwrap(), Some(vec![r(25, 26)]));
        let e = s.take(r(30, 31)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "events chunk 3 [30, 31) ends after the peaks stream, which ended at 30"
        );
        assert_eq!(s.take(r(30, 30)).unwrap(), Some(vec![]));
        assert_eq!(s.held(), 0);
    }
}
