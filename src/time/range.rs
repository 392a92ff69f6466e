//! A record's time interval ([`Interval`]) and the range a chunk covers ([`TimeRange`]).

use std::fmt;

use rkyv::bytecheck::Verify;
use rkyv::rancor::{Fallible, Source, fail};

use super::TimeError;

/// A record's time interval `[start, end)`, in integer time units (nanoseconds in strax).
///
/// Implement it on the record struct; strax's records keep `time`, `length` and `dt`, and end
/// at `time + length * dt`:
///
/// ```
/// use bytemuck::{Pod, Zeroable};
/// use shmexec::time::Interval;
///
/// #[derive(Clone, Copy, Debug, Pod, Zeroable)]
/// #[repr(C)]
/// struct Peak {
///     time: i64,
///     length: i32,
///     dt: i32,
///     area: f32,
///     _pad: u32,
/// }
///
/// impl Interval for Peak {
///     fn start(&self) -> i64 {
///         self.time
///     }
///     fn end(&self) -> i64 {
///         self.time + self.length as i64 * self.dt as i64
///     }
/// }
/// ```
///
/// A record must end at or after its start; the [laws](super#the-laws) check it. A record of
/// length 0 sits at its start: it belongs to the range that holds that instant.
pub trait Interval {
    /// The first instant of the interval.
    fn start(&self) -> i64;
    /// The first instant after the interval (exclusive).
    fn end(&self) -> i64;
}

/// The time range `[start, end)` a chunk covers: every record of the chunk lies inside it, and
/// the next chunk of the stream starts at its `end`.
///
/// It archives as two little-endian `i64`s ([`ArchivedTimeRange`]), read in place; validation
/// refuses an archived range that ends before it starts. A chunk of records travels as
/// `(Records<T>, TimeRange)`:
///
/// ```
/// use shmexec::Records;
/// use shmexec::time::TimeRange;
///
/// let chunk = (Records(vec![7u64, 8, 9]), TimeRange::new(1_000, 2_000)?);
/// let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&chunk)?;
/// let archived =
///     rkyv::access::<rkyv::Archived<(Records<u64>, TimeRange)>, rkyv::rancor::Error>(&bytes)?;
/// assert_eq!(archived.1.to_native(), chunk.1);
/// assert_eq!(archived.0.records(), &[7, 8, 9]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[rkyv(derive(Debug, PartialEq, Eq), compare(PartialEq), bytecheck(verify))]
pub struct TimeRange {
    start: i64,
    end: i64,
}

impl TimeRange {
    /// The range `[start, end)`, or [`TimeError::Reversed`] if `end < start`. `start == end` is
    /// an empty range: a chunk of no time, which holds no records.
    pub fn new(start: i64, end: i64) -> Result<TimeRange, TimeError> {
        if end < start {
            return Err(TimeError::Reversed { start, end });
        }
        Ok(TimeRange { start, end })
    }

    /// The first instant of the range.
    pub fn start(&self) -> i64 {
        self.start
    }

    /// The first instant after the range (exclusive).
    pub fn end(&self) -> i64 {
        self.end
    }

    /// The length, `end - start` (a `u64`: the difference of two `i64`s may not fit one).
    pub fn len(&self) -> u64 {
        self.end.abs_diff(self.start)
    }

    /// Whether the range covers no time.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Whether `other` lies inside this range (`start <= other.start`, `other.end <= end`). An
    /// empty range lies inside every range that reaches it.
    pub fn contains(&self, other: &TimeRange) -> bool {
        self.start <= other.start && other.end <= self.end
    }

    /// Whether the two ranges share an instant. An empty range overlaps nothing; two ranges that
    /// only touch (`a.end == b.start`) do not overlap.
    pub fn overlaps(&self, other: &TimeRange) -> bool {
        self.start < other.end && other.start < self.end && !self.is_empty() && !other.is_empty()
    }

    /// Whether a record with this interval belongs to the range: it starts in `[start, end)`
    /// and ends by `end`. A record of length 0 at `end` belongs to the next range, not this
    /// one, so that each record has exactly one chunk.
    pub fn holds<I: Interval + ?Sized>(&self, record: &I) -> bool {
        let (s, e) = (record.start(), record.end());
        self.start <= s && s < self.end && s <= e && e <= self.end
    }
}

impl Interval for TimeRange {
    fn start(&self) -> i64 {
        self.start
    }
    fn end(&self) -> i64 {
        self.end
    }
}

impl fmt::Display for TimeRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {})", self.start, self.end)
    }
}

impl ArchivedTimeRange {
    /// The first instant of the range.
    pub fn start(&self) -> i64 {
        self.start.to_native()
    }

    /// The first instant after the range.
    pub fn end(&self) -> i64 {
        self.end.to_native()
    }

    /// The range as a native value.
    pub fn to_native(&self) -> TimeRange {
        TimeRange {
            start: self.start(),
            end: self.end(),
        }
    }
}

impl Interval for ArchivedTimeRange {
    fn start(&self) -> i64 {
        self.start.to_native()
    }
    fn end(&self) -> i64 {
        self.end.to_native()
    }
}

/// Why an archived range is invalid.
#[derive(Debug, thiserror::Error)]
#[error("archived time range [{start}, {end}) ends before it starts")]
struct ReversedArchive {
    start: i64,
    end: i64,
}

// SAFETY: `verify` only adds a condition (end >= start) to the derived field checks, which have
// already accepted both fields; nothing unsafe relies on it.
unsafe impl<C: Fallible + ?Sized> Verify<C> for ArchivedTimeRange
where
    C::Error: Source,
{
    fn verify(&self, _: &mut C) -> Result<(), C::Error> {
        if self.end() < self.start() {
            fail!(ReversedArchive {
                start: self.start(),
                end: self.end(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::{RkyvError, decode};
    use rkyv::Archived;

    fn r(start: i64, end: i64) -> TimeRange {
        TimeRange::new(start, end).unwrap()
    }

    #[test]
    fn a_reversed_range_is_refused() {
        assert_eq!(
            TimeRange::new(10, 9),
            Err(TimeError::Reversed { start: 10, end: 9 })
        );
        assert!(r(5, 5).is_empty());
        assert_eq!(r(i64::MIN, i64::MAX).len(), u64::MAX);
        assert_eq!(r(-3, 4).to_string(), "[-3, 4)");
    }

    #[test]
    fn contains_overlaps_and_holds() {
        let a = r(0, 10);
        assert!(a.contains(&r(0, 10)) && a.contains(&r(3, 3)) && a.contains(&r(10, 10)));
        assert!(!a.contains(&r(-1, 5)) && !a.contains(&r(5, 11)));
        assert!(a.overlaps(&r(9, 20)) && a.overlaps(&r(-5, 1)));
        assert!(!a.overlaps(&r(10, 20)) && !a.overlaps(&r(-5, 0)) && !a.overlaps(&r(5, 5)));
        assert!(a.holds(&r(0, 10)) && a.holds(&r(0, 0)) && a.holds(&r(9, 9)));
        // Length 0 at the end belongs to the next range; a reversed interval to none.
        assert!(!a.holds(&r(10, 10)) && !a.holds(&r(-1, 3)) && !a.holds(&r(3, 11)));
        assert!(!a.holds(&TimeRange { start: 5, end: 4 }));
        assert!(!r(4, 4).holds(&r(4, 4)));
    }

    #[test]
    fn an_archived_range_is_read_in_place_and_checked() {
        let bytes = rkyv::to_bytes::<RkyvError>(&r(-7, 123)).unwrap();
        let a = decode::<Archived<TimeRange>>(&bytes).unwrap();
        assert_eq!((a.start(), a.end()), (-7, 123));
        assert_eq!(a.to_native(), r(-7, 123));
        assert_eq!(*a, r(-7, 123));
        let back: TimeRange = rkyv::deserialize::<_, RkyvError>(a).unwrap();
        assert_eq!(back, r(-7, 123));
        let bad = rkyv::to_bytes::<RkyvError>(&TimeRange { start: 9, end: 8 }).unwrap();
        let e = decode::<Archived<TimeRange>>(&bad).unwrap_err().to_string();
        assert!(
            e.contains("ends before it starts") || !cfg!(debug_assertions),
            "{e}"
        );
    }
}
