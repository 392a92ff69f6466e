//! Time chunks: each law's violation is an error that names its chunk; rechunking, containment
//! and the synchronizer against brute-force references on random streams; a chunk of records
//! with its range archived and read in place.

use bytemuck::{Pod, Zeroable};
use rkyv::Archived;
use shmexec::Records;
use shmexec::time::{
    Continuity, Interval, IntervalProblem, Rechunker, RecordProblem, Synchronizer, TimeError,
    TimeRange, check_chunk, fully_contained_in, split_by_containment,
};

/// A strax-like peak: `length` samples of `dt` from `time`.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
struct Peak {
    time: i64,
    length: i32,
    dt: i32,
    area: f32,
    channel: u32,
}

impl Interval for Peak {
    fn start(&self) -> i64 {
        self.time
    }
    fn end(&self) -> i64 {
        self.time + self.length as i64 * self.dt as i64
    }
}

/// A peak over `[start, end)`, tagged with `id` (in `channel`) so that records stay distinct.
fn peak(start: i64, end: i64, id: u32) -> Peak {
    Peak {
        time: start,
        length: (end - start) as i32,
        dt: 1,
        area: id as f32 * 0.5,
        channel: id,
    }
}

fn r(start: i64, end: i64) -> TimeRange {
    TimeRange::new(start, end).unwrap()
}

/// Deterministic pseudo-random numbers (xorshift64), so failures reproduce from the seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// A time in `[lo, hi)` (`lo` if the range is empty).
    fn time(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo).max(0) as u64) as i64
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A random stream that keeps the laws: contiguous chunks from `start` (some empty, some of no
/// time), each holding sorted records inside it that may overlap one another, with records of
/// length 0 and long ones that leave no legal cut.
fn stream(rng: &mut Rng, start: i64, chunks: usize) -> Vec<(TimeRange, Vec<Peak>)> {
    let mut out = Vec::new();
    let mut t = start;
    let mut id = 0;
    for _ in 0..chunks {
        let len = match rng.below(10) {
            0 => 0,
            1 => rng.time(1, 4),
            _ => rng.time(1, 200),
        };
        let range = r(t, t + len);
        let n = if len == 0 || rng.chance(10) {
            0
        } else {
            rng.below(12) as usize
        };
        let mut starts: Vec<i64> = (0..n).map(|_| rng.time(t, t + len)).collect();
        starts.sort();
        let records = starts
            .into_iter()
            .map(|s| {
                let room = t + len - s;
                let dur = match rng.below(10) {
                    0 => 0,
                    1 => room,
                    _ => rng.time(0, room.min(15) + 1),
                };
                id += 1;
                peak(s, s + dur, id)
            })
            .collect();
        out.push((range, records));
        t += len;
    }
    out
}

/// The same records as `chunks`, chunked again at random legal cuts (so the two differ).
fn rechunked_at_random(
    rng: &mut Rng,
    chunks: &[(TimeRange, Vec<Peak>)],
) -> Vec<(TimeRange, Vec<Peak>)> {
    let all: Vec<Peak> = chunks.iter().flat_map(|c| c.1.iter().copied()).collect();
    let (start, end) = (chunks[0].0.start(), chunks.last().unwrap().0.end());
    let mut out = Vec::new();
    let (mut from, mut t0) = (0, start);
    let mut reach = i64::MIN;
    for (i, p) in all.iter().enumerate() {
        if i > from && reach <= p.start() && rng.chance(30) {
            // Cut anywhere in [reach, p.start()].
            let t = rng.time(reach.max(t0), p.start() + 1);
            out.push((r(t0, t), all[from..i].to_vec()));
            (from, t0) = (i, t);
        }
        reach = reach.max(p.end()).max(p.start() + 1);
    }
    out.push((r(t0, end), all[from..].to_vec()));
    out
}

// ---- the laws ----

#[test]
fn an_overlap_names_both_chunks() {
    let mut c = Continuity::named("peaks");
    c.push(r(0, 100), &[peak(10, 20, 1)]).unwrap();
    let e = c.push(r(90, 200), &[peak(95, 99, 2)]).unwrap_err();
    assert!(matches!(e, TimeError::Overlap { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "peaks chunk 1 [90, 200) starts at 90, before peaks chunk 0 [0, 100) ended at 100: they \
         overlap by 10 (chunks must be contiguous)"
    );
}

#[test]
fn a_gap_names_both_chunks() {
    let mut c = Continuity::named("peaks");
    c.push::<Peak>(r(0, 100), &[]).unwrap();
    c.push::<Peak>(r(100, 100), &[]).unwrap();
    let e = c.push::<Peak>(r(150, 200), &[]).unwrap_err();
    assert!(matches!(e, TimeError::Gap { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "peaks chunk 2 [150, 200) starts at 150, after peaks chunk 1 [100, 100) ended at 100: a \
         gap of 50 (chunks must be contiguous)"
    );
}

#[test]
fn unsorted_records_name_the_chunk_and_the_record() {
    let records = [peak(10, 20, 1), peak(30, 31, 2), peak(25, 40, 3)];
    let e = check_chunk(4, r(0, 100), &records).unwrap_err();
    assert_eq!(
        e.to_string(),
        "chunk 4 [0, 100): record 2 [25, 40) starts before the record ahead of it (at 30): \
         records must be sorted by start"
    );
    let mut c = Continuity::named("peaks");
    c.push::<Peak>(r(-10, 0), &[]).unwrap();
    let e = c.push(r(0, 100), &records).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("peaks chunk 1 [0, 100): record 2 [25, 40)"),
        "{e}"
    );
}

#[test]
fn a_record_outside_its_chunk_names_the_chunk_and_the_record() {
    let cases = [
        (
            peak(-1, 5, 1),
            RecordProblem::StartsBeforeChunk,
            "starts before the chunk",
        ),
        (
            peak(95, 101, 1),
            RecordProblem::EndsAfterChunk,
            "ends after the chunk",
        ),
        (
            peak(100, 100, 1),
            RecordProblem::AtChunkEnd,
            "has length 0 at the chunk's end",
        ),
        (
            peak(50, 40, 1),
            RecordProblem::EndsBeforeStart,
            "ends before it starts",
        ),
    ];
    for (bad, want, text) in cases {
        // A lawful record ahead of it, unless it starts before the chunk (it would be unsorted).
        let records = if bad.start() < 0 {
            vec![bad]
        } else {
            vec![peak(0, 1, 0), bad]
        };
        let at = records.len() - 1;
        let e = check_chunk(9, r(0, 100), &records).unwrap_err();
        let TimeError::Record {
            chunk,
            record,
            problem,
            ..
        } = &e
        else {
            panic!("{e:?}")
        };
        assert_eq!(
            (chunk.seq, chunk.range, *record, *problem),
            (9, r(0, 100), at, want)
        );
        let shown = format!(
            "chunk 9 [0, 100): record {at} [{}, {}) {text}",
            bad.start(),
            bad.end()
        );
        assert!(e.to_string().starts_with(&shown), "{e}");
    }
    // Records that touch both ends, and length 0 at the start, are inside.
    let ok = [peak(0, 0, 1), peak(0, 100, 2), peak(99, 100, 3)];
    check_chunk(0, r(0, 100), &ok).unwrap();
}

#[test]
fn the_rechunker_and_the_synchronizer_check_what_they_are_fed() {
    let mut rechunker = Rechunker::<Peak>::new(1 << 20);
    rechunker.push(r(0, 10), &[peak(1, 2, 1)]).unwrap();
    let e = rechunker.push(r(10, 20), &[peak(15, 25, 2)]).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("input chunk 1 [10, 20): record 0"),
        "{e}"
    );
    let e = rechunker.push(r(9, 20), &[]).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("input chunk 1 [9, 20) starts at 9, before input chunk 0"),
        "{e}"
    );

    let mut sync = Synchronizer::<Peak>::named("events", "peaks");
    sync.push_other(r(0, 10), &[]).unwrap();
    let e = sync.push_other(r(11, 20), &[]).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("peaks chunk 1 [11, 20) starts at 11"),
        "{e}"
    );
    let e = sync
        .push_other(r(10, 20), &[peak(12, 13, 1), peak(11, 12, 2)])
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("peaks chunk 1 [10, 20): record 1"),
        "{e}"
    );
    assert_eq!(sync.take(r(0, 5)).unwrap(), Some(vec![]));
    let e = sync.take(r(6, 10)).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("events chunk 1 [6, 10) starts at 6, after events chunk 0 [0, 5)"),
        "{e}"
    );
}

// ---- rechunking ----

/// Legal cut indices of a sorted record list: `k` such that every record before `k` starts
/// before record `k` and ends by its start; the list's end counts as legal.
fn legal_cuts(all: &[Peak]) -> Vec<bool> {
    let mut legal = vec![false; all.len() + 1];
    let mut reach = i64::MIN;
    for (k, p) in all.iter().enumerate() {
        legal[k] = k > 0 && reach <= p.start();
        reach = reach.max(p.end()).max(p.start() + 1);
    }
    legal[all.len()] = true;
    legal
}

fn rechunk(target: usize, chunks: &[(TimeRange, Vec<Peak>)]) -> Vec<(TimeRange, Vec<Peak>)> {
    let mut rechunker = Rechunker::<Peak>::new(target * size_of::<Peak>() + target % 3);
    assert_eq!(rechunker.target_records(), target);
    let mut out = Vec::new();
    for (range, records) in chunks {
        out.extend(rechunker.push(*range, records).unwrap());
        assert!(rechunker.pending() < target);
    }
    out.extend(rechunker.finish());
    out
}

#[test]
fn rechunking_keeps_every_record_the_coverage_and_the_laws() {
    let mut cut_inside = 0;
    let mut kept_whole = 0;
    for seed in 0..400 {
        let mut rng = Rng::new(seed);
        let start = rng.time(-1000, 1000);
        let n = 1 + rng.below(40) as usize;
        let input = stream(&mut rng, start, n);
        let target = 1 + rng.below(25) as usize;
        let out = rechunk(target, &input);
        let all: Vec<Peak> = input.iter().flat_map(|c| c.1.iter().copied()).collect();
        let what = format!("seed {seed}, target {target}");

        // Every record once, in order; the same span, contiguous, each chunk lawful.
        let got: Vec<Peak> = out.iter().flat_map(|c| c.1.iter().copied()).collect();
        assert_eq!(got, all, "{what}");
        assert_eq!(out[0].0.start(), input[0].0.start(), "{what}");
        assert_eq!(
            out.last().unwrap().0.end(),
            input.last().unwrap().0.end(),
            "{what}"
        );
        let mut laws = Continuity::named("output");
        for (range, records) in &out {
            laws.push(*range, records)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
        }

        // Each chunk but the last is cut at the legal cut nearest the target, the earlier on a
        // tie.
        let legal = legal_cuts(&all);
        let mut g = 0;
        for (range, records) in &out[..out.len() - 1] {
            let len = records.len();
            let want = g + target;
            let before = (g + 1..=want.min(all.len())).rev().find(|&k| legal[k]);
            let after = (want..=all.len()).find(|&k| legal[k]).unwrap();
            let best = match before {
                Some(b) if want - b <= after - want => b,
                _ => after,
            };
            assert_eq!(
                g + len,
                best,
                "{what}: chunk {range} of {len} records from {g}"
            );
            if len > target {
                kept_whole += 1;
            }
            if g + len < all.len() {
                cut_inside += 1;
            }
            g += len;
        }
    }
    // Both kinds of cut were exercised.
    assert!(
        cut_inside > 500 && kept_whole > 20,
        "{cut_inside} {kept_whole}"
    );
}

#[test]
fn the_records_of_each_chunk_do_not_depend_on_the_input_chunking() {
    for seed in 0..200 {
        let mut rng = Rng::new(1000 + seed);
        let n = 1 + rng.below(30) as usize;
        let a = stream(&mut rng, 0, n);
        let b = rechunked_at_random(&mut rng, &a);
        let target = 1 + rng.below(10) as usize;
        let counts = |c: &[(TimeRange, Vec<Peak>)]| c.iter().map(|c| c.1.len()).collect::<Vec<_>>();
        let (ra, rb) = (rechunk(target, &a), rechunk(target, &b));
        // Trailing empty chunks aside (a chunking may end with time and no records).
        let trim = |mut v: Vec<usize>| {
            while v.len() > 1 && v.last() == Some(&0) {
                v.pop();
            }
            v
        };
        assert_eq!(trim(counts(&ra)), trim(counts(&rb)), "seed {seed}");
    }
}

// ---- containment ----

/// Base intervals on a small grid: sorted, disjoint, some touching, some empty.
fn base_intervals(rng: &mut Rng) -> Vec<Peak> {
    let mut out = Vec::new();
    let mut t = rng.time(0, 5);
    for id in 0..rng.below(8) {
        let len = rng.below(8) as i64;
        out.push(peak(t, t + len, id as u32));
        t += len + if rng.chance(40) { 0 } else { rng.time(1, 4) };
    }
    out
}

/// Things sorted by start on the same grid, overlapping one another if `overlap`.
fn things(rng: &mut Rng, overlap: bool) -> Vec<Peak> {
    let n = rng.below(20);
    let mut out: Vec<Peak> = Vec::new();
    let mut t = 0;
    for id in 0..n {
        t += rng.below(3) as i64;
        let len = rng.below(6) as i64;
        out.push(peak(t, t + len, id as u32));
        if !overlap {
            t += len;
        }
    }
    out
}

fn brute_containment(base: &[Peak], things: &[Peak]) -> Vec<Vec<usize>> {
    base.iter()
        .map(|b| {
            let b = r(b.start(), b.end());
            (0..things.len()).filter(|&j| b.holds(&things[j])).collect()
        })
        .collect()
}

#[test]
fn containment_matches_brute_force() {
    let (mut ranges_ok, mut refused, mut boundary_cases) = (0, 0, 0);
    for seed in 0..3000 {
        let mut rng = Rng::new(5000 + seed);
        let base = base_intervals(&mut rng);
        let overlap = rng.chance(50);
        let things = things(&mut rng, overlap);
        let want = brute_containment(&base, &things);
        let what = format!("seed {seed}: base {base:?} things {things:?}");
        boundary_cases += things
            .iter()
            .filter(|t| {
                base.iter()
                    .any(|b| t.start() == b.end() || t.end() == b.end() || t.start() == b.start())
            })
            .count();

        let which = fully_contained_in(&base, &things).unwrap();
        for (j, w) in which.iter().enumerate() {
            let brute = want.iter().position(|set| set.contains(&j));
            assert_eq!(*w, brute, "{what}: thing {j}");
        }

        match split_by_containment(&base, &things) {
            Ok(ranges) => {
                assert_eq!(ranges.len(), base.len(), "{what}");
                for (range, set) in ranges.iter().zip(&want) {
                    assert_eq!(range.clone().collect::<Vec<_>>(), *set, "{what}");
                }
                ranges_ok += 1;
            }
            Err(e) => {
                assert!(overlap, "{what}: {e}");
                let TimeError::Interval {
                    problem: IntervalProblem::Straddles { base: i, .. },
                    index,
                    ..
                } = e
                else {
                    panic!("{what}: {e}")
                };
                // The things inside base interval i are not one range, and `index` is a gap in it.
                let set = &want[i];
                assert!(
                    set.first() < Some(&index) && Some(&index) < set.last(),
                    "{what}: {e}"
                );
                assert!(!set.contains(&index), "{what}: {e}");
                refused += 1;
            }
        }
    }
    assert!(
        ranges_ok > 2000 && refused > 10 && boundary_cases > 1000,
        "{ranges_ok} {refused} {boundary_cases}"
    );
}

#[test]
fn containment_refuses_unsorted_or_overlapping_input() {
    let e = split_by_containment(&[r(0, 5), r(3, 8)], &[r(0, 1)]).unwrap_err();
    assert!(
        matches!(
            e,
            TimeError::Interval {
                list: "base",
                index: 1,
                problem: IntervalProblem::OverlapsPrevious { prev_end: 5 },
                ..
            }
        ),
        "{e:?}"
    );
    let e = fully_contained_in(&[r(0, 5)], &[r(2, 3), r(1, 4)]).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("things interval 1 [1, 4) starts before the one ahead of it (at 2)"),
        "{e}"
    );
    let e = split_by_containment(&[r(4, 5), r(0, 3)], &[r(0, 1)]).unwrap_err();
    assert!(
        matches!(
            e,
            TimeError::Interval {
                list: "base",
                index: 1,
                problem: IntervalProblem::Unsorted { prev_start: 4 },
                ..
            }
        ),
        "{e:?}"
    );
}

// ---- synchronization ----

#[test]
fn the_synchronizer_matches_brute_force() {
    let mut waited = 0;
    for seed in 0..500 {
        let mut rng = Rng::new(9000 + seed);
        let (start, n) = (rng.time(-50, 50), 1 + rng.below(30) as usize);
        let other = stream(&mut rng, start, n);
        let (o_start, o_end) = (other[0].0.start(), other.last().unwrap().0.end());
        // Base chunks over part of the other stream's span, chunked differently.
        let mut base = Vec::new();
        let mut t = rng.time(o_start - 20, o_start + 20).min(o_end);
        while t < o_end && base.len() < 40 {
            let len = match rng.below(8) {
                0 => 0,
                _ => rng.time(1, 120),
            };
            let end = (t + len).min(o_end);
            base.push(r(t, end));
            t = end;
        }
        let all: Vec<Peak> = other.iter().flat_map(|c| c.1.iter().copied()).collect();
        let what = format!("seed {seed}");

        let mut sync = Synchronizer::<Peak>::named("events", "peaks");
        let mut pushed = 0;
        for b in &base {
            // Push a random number of other chunks first, then as many as it takes.
            while pushed < other.len() && rng.chance(30) {
                sync.push_other(other[pushed].0, &other[pushed].1).unwrap();
                pushed += 1;
            }
            let got = loop {
                let covered = sync.covered();
                match sync.take(*b).unwrap() {
                    Some(got) => {
                        assert!(covered.is_some_and(|c| c >= b.end()), "{what}");
                        break got;
                    }
                    None => {
                        assert!(covered.is_none_or(|c| c < b.end()), "{what}");
                        waited += 1;
                        sync.push_other(other[pushed].0, &other[pushed].1).unwrap();
                        pushed += 1;
                    }
                }
            };
            let want: Vec<Peak> = all.iter().copied().filter(|p| b.holds(p)).collect();
            assert_eq!(got, want, "{what}: base chunk {b}");
            // Only records a later base chunk could hold are kept.
            let ahead = other[..pushed]
                .iter()
                .flat_map(|c| c.1.iter())
                .filter(|p| p.start() >= b.end())
                .count();
            assert_eq!(sync.held(), ahead, "{what}: base chunk {b}");
        }
        while pushed < other.len() {
            sync.push_other(other[pushed].0, &other[pushed].1).unwrap();
            pushed += 1;
        }
        sync.finish_other();
        let last = base.last().map_or(o_end, |b| b.end());
        let e = sync.take(r(last, o_end + 1)).unwrap_err();
        assert!(
            matches!(e, TimeError::NotCovered { other_end: Some(end), .. } if end == o_end),
            "{what}: {e}"
        );
    }
    assert!(waited > 500, "{waited}");
}

// ---- archives ----

#[test]
fn an_archived_chunk_gives_back_its_range_and_records_in_place() {
    let peaks: Vec<Peak> = (0..100)
        .map(|i| peak(i * 10, i * 10 + 5, i as u32))
        .collect();
    let chunk = (Records(peaks.clone()), r(0, 1_000));
    let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&chunk).unwrap();
    let archived =
        rkyv::access::<Archived<(Records<Peak>, TimeRange)>, rkyv::rancor::Error>(&bytes).unwrap();
    assert_eq!(archived.1.to_native(), r(0, 1_000));
    assert_eq!((archived.1.start(), archived.1.end()), (0, 1_000));
    let read: &[Peak] = archived.0.records();
    assert_eq!(read, &peaks[..]);
    // In place: the records are the archive's own bytes.
    let within = bytes.as_ptr_range();
    assert!(within.contains(&(read.as_ptr() as *const u8)));
    // And lawful as they lie.
    check_chunk(0, archived.1.to_native(), read).unwrap();
    let back: (Records<Peak>, TimeRange) =
        rkyv::deserialize::<_, rkyv::rancor::Error>(archived).unwrap();
    assert_eq!(back, chunk);

    // A range forged to end before it starts is an invalid archive. The range is the root's
    // last 16 bytes: start, then end.
    let mut forged = bytes.clone();
    let n = forged.len();
    forged[n - 16..n - 8].copy_from_slice(&9i64.to_le_bytes());
    forged[n - 8..].copy_from_slice(&8i64.to_le_bytes());
    assert!(
        rkyv::access::<Archived<(Records<Peak>, TimeRange)>, rkyv::rancor::Error>(&forged).is_err()
    );
}
