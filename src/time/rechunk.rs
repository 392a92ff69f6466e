//! [`Rechunker`]: merges small chunks and splits big ones to a target size, at times that no
//! record straddles.

use std::collections::VecDeque;

use super::{Continuity, Interval, TimeError, TimeRange};

/// Rechunks one stream to chunks of about a target size in bytes (strax sizes chunks in bytes
/// too), keeping the laws: the chunks it hands out are contiguous, cover exactly the time the
/// input covered, and hold every input record once, in order.
///
/// The target is `target_bytes / size_of::<T>()` records (at least 1). Chunks are cut only at a
/// legal split: a time `t` such that every record before the cut starts before `t` and ends at
/// or before it, and every record after it starts at or after `t`. The end of what was pushed
/// so far is always legal, and so is the start of a record that begins after every record
/// before it has ended (a record of length 0 counts as ending just after its start). Of the legal cuts, the one nearest the target is taken (the earlier on a tie), as soon
/// as no later input can bring a nearer one; a chunk in which no legal cut exists stays whole
/// however big it is, as in strax. An interior cut is made at the start of the first record
/// after it.
///
/// Small chunks are held until the records reach the target, so output lags input by up to a
/// target's worth of records; [`finish`](Self::finish) hands out what is left.
///
/// ```
/// use shmexec::time::{Rechunker, TimeRange};
///
/// // Records are time ranges here; 16 bytes each, so the target is 2 records.
/// let rec = |s, e| TimeRange::new(s, e).unwrap();
/// let mut rechunker = Rechunker::<TimeRange>::new(32);
/// let out = rechunker.push(rec(0, 100), &[rec(0, 10), rec(20, 30), rec(25, 40), rec(50, 60)])?;
/// // [20, 30) and [25, 40) overlap, so no cut between them: the legal cuts nearest 2 records
/// // are after 1 record (at 20) and after 3 (at 50); the earlier wins the tie.
/// assert_eq!(out[0], (rec(0, 20), vec![rec(0, 10)]));
/// assert_eq!(out[1], (rec(20, 50), vec![rec(20, 30), rec(25, 40)]));
/// assert_eq!(out.len(), 2);
/// // The last record waits for more input, or for the end.
/// assert_eq!(rechunker.finish(), Some((rec(50, 100), vec![rec(50, 60)])));
/// # Ok::<(), shmexec::time::TimeError>(())
/// ```
#[derive(Debug)]
pub struct Rechunker<T> {
    target: usize,
    input: Continuity,
    /// Records not handed out yet: `pending[head..]` (the ones before `head` were handed out
    /// and are dropped in batches).
    pending: Vec<T>,
    head: usize,
    /// Indices in `pending` (past `head`) where a cut is legal, ascending.
    legal: VecDeque<usize>,
    /// The greatest `max(end, start + 1)` of the pending records: a cut at `t` is legal after
    /// them iff this is at most `t`.
    reach: i64,
    /// Where the next output chunk starts (the previous one's end), once something was pushed.
    out_start: Option<i64>,
    /// Whether a chunk was handed out.
    handed_out: bool,
}

/// A chunk handed out: its range and its records.
pub type TimeChunk<T> = (TimeRange, Vec<T>);

impl<T: Copy + Interval> Rechunker<T> {
    /// A rechunker to chunks of about `target_bytes` of records.
    pub fn new(target_bytes: usize) -> Rechunker<T> {
        Rechunker {
            target: (target_bytes / size_of::<T>()).max(1),
            input: Continuity::named("input"),
            pending: Vec::new(),
            head: 0,
            legal: VecDeque::new(),
            reach: i64::MIN,
            out_start: None,
            handed_out: false,
        }
    }

    /// The target size in records.
    pub fn target_records(&self) -> usize {
        self.target
    }

    /// The number of records held, not handed out yet.
    pub fn pending(&self) -> usize {
        self.pending.len() - self.head
    }

    /// Feeds the next input chunk (its range and records, e.g. an archived chunk's records read
    /// in place) and returns the chunks now complete, in order. The chunk must keep the laws
    /// (see [`Continuity::push`]); if it does not, the error names it and nothing changes.
    pub fn push(
        &mut self,
        range: TimeRange,
        records: &[T],
    ) -> Result<Vec<TimeChunk<T>>, TimeError> {
        self.input.push(range, records)?;
        self.out_start.get_or_insert(range.start());
        self.pending.reserve(records.len());
        for r in records {
            // Past the first pending record, a cut before `r` is legal iff every pending record
            // starts before `r` and has ended by its start.
            if self.pending.len() > self.head && self.reach <= r.start() {
                self.legal.push_back(self.pending.len());
            }
            self.reach = self.reach.max(r.end()).max(r.start().saturating_add(1));
            self.pending.push(*r);
        }
        let mut out = Vec::new();
        while self.pending() >= self.target {
            out.push(self.cut());
        }
        self.compact();
        Ok(out)
    }

    /// Hands out the records left, as the last chunk (it ends where the input ended), or `None`
    /// if nothing was pushed or the chunks handed out already reach the input's end.
    pub fn finish(mut self) -> Option<TimeChunk<T>> {
        let end = self.input.end()?;
        if self.handed_out && self.out_start == Some(end) && self.pending() == 0 {
            return None;
        }
        // Everything pending fits under the target (each push cuts until it does): one chunk.
        Some(self.emit(self.pending.len(), end))
    }

    /// Cuts off the next chunk: at the legal cut nearest the target. The end of the input is a
    /// legal cut at or past the target (the caller checked `pending() >= target`), so no later
    /// input could bring a nearer one.
    fn cut(&mut self) -> TimeChunk<T> {
        let want = self.head + self.target;
        let at = self.legal.partition_point(|&i| i < want);
        let after = self.legal.get(at).copied().unwrap_or(self.pending.len());
        let before = match self.legal.get(at) {
            Some(&i) if i == want => Some(i),
            _ if at > 0 => Some(self.legal[at - 1]),
            _ => None,
        };
        let i = match before {
            Some(b) if want - b <= after - want => b,
            _ => after,
        };
        let t = match self.pending.get(i) {
            Some(r) => r.start(),
            None => self.input.end().expect("records were pushed"),
        };
        self.emit(i, t)
    }

    /// Hands out `pending[head..i]` as the chunk ending at `t`.
    fn emit(&mut self, i: usize, t: i64) -> TimeChunk<T> {
        let start = self.out_start.expect("emit follows a push");
        let range = TimeRange::new(start, t).expect("cuts move forward in time");
        let records = if i == self.pending.len() {
            // All of it: nothing is left to cut, and nothing pending reaches past `t`.
            let mut all = std::mem::take(&mut self.pending);
            all.drain(..self.head);
            self.head = 0;
            self.legal.clear();
            self.reach = i64::MIN;
            all
        } else {
            let records = self.pending[self.head..i].to_vec();
            self.head = i;
            while self.legal.front().is_some_and(|&l| l <= i) {
                self.legal.pop_front();
            }
            records
        };
        self.out_start = Some(t);
        self.handed_out = true;
        (range, records)
    }

    /// Drops the records handed out once they are at least half the buffer, so that each
    /// record is moved O(1) times on average.
    fn compact(&mut self) {
        if self.head > 0 && self.head * 2 >= self.pending.len() {
            self.pending.drain(..self.head);
            for l in &mut self.legal {
                *l -= self.head;
            }
            self.head = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: i64, end: i64) -> TimeRange {
        TimeRange::new(start, end).unwrap()
    }

    /// A rechunker of `n` records per chunk.
    fn per(n: usize) -> Rechunker<TimeRange> {
        Rechunker::new(n * size_of::<TimeRange>())
    }

    #[test]
    fn small_chunks_merge_and_the_rest_comes_at_finish() {
        let mut c = per(3);
        assert!(c.push(r(0, 10), &[r(1, 2)]).unwrap().is_empty());
        assert!(c.push(r(10, 20), &[r(11, 12)]).unwrap().is_empty());
        let out = c.push(r(20, 30), &[r(21, 22), r(23, 24)]).unwrap();
        // 4 records: the legal cuts at 3 (t = 23) and at the end (4); 3 is the target.
        assert_eq!(out, vec![(r(0, 23), vec![r(1, 2), r(11, 12), r(21, 22)])]);
        assert!(c.push(r(30, 40), &[]).unwrap().is_empty());
        assert_eq!(c.finish(), Some((r(23, 40), vec![r(23, 24)])));
    }

    #[test]
    fn a_chunk_without_a_legal_cut_stays_whole() {
        let mut c = per(2);
        let recs = [r(0, 100), r(1, 2), r(3, 4), r(5, 6), r(99, 100)];
        let out = c.push(r(0, 100), &recs).unwrap();
        assert_eq!(out, vec![(r(0, 100), recs.to_vec())]);
        assert_eq!(c.pending(), 0);
        assert_eq!(c.finish(), None);
    }

    #[test]
    fn a_record_of_length_0_is_never_left_at_a_cut() {
        // [5, 5) then [5, 6): a cut at 5 would leave [5, 5) at its chunk's end.
        let mut c = per(1);
        let out = c.push(r(0, 10), &[r(5, 5), r(5, 6), r(7, 8)]).unwrap();
        assert_eq!(
            out,
            vec![(r(0, 7), vec![r(5, 5), r(5, 6)]), (r(7, 10), vec![r(7, 8)]),]
        );
    }

    #[test]
    fn empty_input_and_empty_chunks() {
        assert_eq!(per(4).finish(), None);
        let mut c = per(4);
        assert!(c.push(r(3, 3), &[]).unwrap().is_empty());
        assert_eq!(c.finish(), Some((r(3, 3), vec![])));
        let mut c = per(4);
        assert!(c.push(r(3, 3), &[]).unwrap().is_empty());
        assert!(c.push(r(3, 9), &[]).unwrap().is_empty());
        assert_eq!(c.finish(), Some((r(3, 9), vec![])));
    }

    #[test]
    fn a_bad_input_chunk_is_refused_and_named() {
        let mut c = per(4);
        c.push(r(0, 10), &[r(1, 2)]).unwrap();
        let e = c.push(r(10, 20), &[r(15, 16), r(12, 13)]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("input chunk 1 [10, 20): record 1"),
            "{e}"
        );
        let e = c.push(r(12, 20), &[]).unwrap_err();
        assert!(matches!(e, TimeError::Gap { .. }), "{e}");
        assert_eq!(c.finish(), Some((r(0, 10), vec![r(1, 2)])));
    }
}
