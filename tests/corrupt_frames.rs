//! 10,000 forged or corrupted ring frames and 10,000 damaged archives: each is read within
//! bounds or rejected with an error (`examples/fuzz_frames.rs` runs a million of each).

mod support;

use support::fuzz::{Rng, Tally, archive_case, ring_case, segment};

const CASES: u64 = 10_000;

#[test]
fn forged_and_corrupted_ring_frames_are_read_in_bounds_or_rejected() {
    let seg = segment();
    let mut rng = Rng(0x5EED);
    let mut tally = Tally::default();
    for _ in 0..CASES {
        ring_case(&seg, &mut rng, &mut tally);
    }
    // Every invalid header is an error; valid forged ones are read (within bounds), so the
    // test would notice a reader that accepts or rejects everything.
    assert!(tally.bad_headers > CASES / 2, "{tally:?}");
    assert_eq!(tally.bad_headers_rejected, tally.bad_headers, "{tally:?}");
    assert!(tally.frames_read > CASES / 20, "{tally:?}");
}

#[test]
fn damaged_archives_are_rejected_by_the_validator() {
    let mut rng = Rng(0xA5C1);
    let mut tally = Tally::default();
    for _ in 0..CASES {
        archive_case(&mut rng, &mut tally);
    }
    assert!(tally.archives_rejected > CASES / 2, "{tally:?}");
    assert!(tally.archives_ok > 0, "{tally:?}");
}
