//! Arrays of plain structs (records) through real pools: read in place by the task and the
//! caller, written in place by the task and the producer, and checked like every archive.

mod support;

use bytemuck::{Pod, Zeroable};
use rkyv::Archived;
use shmexec::{BoxError, Error, OutputSink, Records, Task};
use support::{assert_no_children, builder, serial};

/// A strax raw record: a digitizer pulse fragment, packed as numpy packs it (244 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C, packed)]
struct RawRecord {
    time: i64,
    length: i32,
    dt: i16,
    channel: i16,
    pulse_length: i32,
    record_i: i16,
    baseline: i16,
    data: [i16; 110],
}

/// A hit: 8-byte aligned for its `f64`, so an archive must place it on an 8-byte boundary.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
struct Hit {
    time: f64,
    area: f32,
    channel: u32,
}

fn raw(chunk: u64, i: usize) -> RawRecord {
    let mut data = [0i16; 110];
    for (k, s) in data.iter_mut().enumerate() {
        *s = ((chunk as usize * 13 + i * 7 + k) % 200) as i16 - 100;
    }
    RawRecord {
        time: (chunk * 1_000_000 + i as u64 * 10) as i64,
        length: 110,
        dt: 10,
        channel: (i % 5) as i16,
        pulse_length: 110,
        record_i: 0,
        baseline: 16000,
        data,
    }
}

fn raw_chunk(chunk: u64, n: usize) -> Vec<RawRecord> {
    (0..n).map(|i| raw(chunk, i)).collect()
}

/// The reference integration: one hit per record of an even channel, its area the sum of the
/// samples.
fn hits_of(records: &[RawRecord]) -> Vec<Hit> {
    records
        .iter()
        .filter(|r| r.channel % 2 == 0)
        .map(|r| Hit {
            time: r.time as f64,
            area: { r.data }.iter().map(|&s| s as f32).sum(),
            channel: r.channel as u32,
        })
        .collect()
}

#[test]
fn records_round_trip_through_map_in_order() {
    let guard = serial();
    {
        // Each hit moved by one channel and doubled in area: a transform whose result shows
        // which input it came from.
        let task = shmexec::from_fn::<Records<Hit>, _, _>(|c| {
            let out: Vec<Hit> = c
                .records()
                .iter()
                .map(|h| Hit {
                    area: h.area * 2.0,
                    channel: h.channel + 1,
                    ..*h
                })
                .collect();
            Records(out)
        });
        let mut pool = builder(&guard).workers(3).build(task).unwrap();
        let inputs: Vec<Records<Hit>> = (0..60u64)
            .map(|c| Records(hits_of(&raw_chunk(c, (c as usize * 37) % 300))))
            .collect();
        let mut n = 0;
        for (input, r) in inputs.iter().zip(pool.map(&inputs)) {
            let out = r.unwrap();
            let want: Vec<Hit> = input
                .0
                .iter()
                .map(|h| Hit {
                    area: h.area * 2.0,
                    channel: h.channel + 1,
                    ..*h
                })
                .collect();
            assert_eq!(out.records(), &want[..], "item {}", out.seq());
            assert_eq!(out.len(), want.len());
            assert_eq!(out.deserialize().unwrap(), Records(want));
            n += 1;
        }
        assert_eq!(n, inputs.len());
        assert_eq!(pool.stats().copies_per_input_byte(), 1.0);
    }
    assert_no_children();
}

/// Reads raw records in place and writes the hits of the even channels in place: it reserves
/// one hit per record and uses fewer.
struct HitFinder;

impl Task for HitFinder {
    type Input = Records<RawRecord>;
    type Output = (Records<Hit>, u64);

    fn process(&mut self, _: &Archived<Records<RawRecord>>) -> Result<Self::Output, BoxError> {
        Err("the worker runs `produce`".into())
    }

    fn produce(
        &mut self,
        input: &Archived<Records<RawRecord>>,
        out: &mut OutputSink<'_>,
    ) -> Result<(), BoxError> {
        let records = input.records();
        out.emit_records_up_to(records.len(), |hits: &mut [Hit]| {
            let found = hits_of(records);
            hits[..found.len()].copy_from_slice(&found);
            Ok((found.len(), records.len() as u64))
        })
    }
}

#[test]
fn a_task_reads_records_and_writes_fewer_in_place() {
    let guard = serial();
    {
        let mut pool = builder(&guard).workers(2).build(HitFinder).unwrap();
        let lens = [0usize, 1, 2, 5, 300, 1000, 7];
        let inputs: Vec<Records<RawRecord>> = lens
            .iter()
            .enumerate()
            .map(|(c, &n)| Records(raw_chunk(c as u64, n)))
            .collect();
        let got: Vec<_> = pool.map(&inputs).map(|r| r.unwrap()).collect();
        assert_eq!(got.len(), inputs.len());
        for (input, out) in inputs.iter().zip(&got) {
            let want = hits_of(&input.0);
            assert!(want.len() < input.0.len() || input.0.len() < 2);
            assert_eq!(out.0.records(), &want[..], "item {}", out.seq());
            assert_eq!(out.1.to_native(), input.0.len() as u64);
            // Only the hits used are published: 16 bytes each, a small root and the count.
            assert!(
                out.bytes().len() <= want.len() * 16 + 64,
                "{}",
                out.bytes().len()
            );
        }
    }
    assert_no_children();
}

#[test]
fn records_written_in_place_by_the_producer_are_read_in_place() {
    let guard = serial();
    {
        let task = shmexec::from_fn::<Records<RawRecord>, _, _>(|c| Records(hits_of(c.records())));
        let mut pool = builder(&guard).workers(2).build(task).unwrap();
        let lens: Vec<usize> = (0..40).map(|i| (i * 97) % 2000).collect();
        let got: Vec<Vec<Hit>> = pool
            .map_records_in_place(lens.clone(), |i, records: &mut [RawRecord]| {
                for (j, r) in records.iter_mut().enumerate() {
                    *r = raw(i, j);
                }
                Ok(())
            })
            .map(|r| r.unwrap().records().to_vec())
            .collect();
        let want: Vec<Vec<Hit>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| hits_of(&raw_chunk(i as u64, n)))
            .collect();
        assert_eq!(got, want);
        let stats = pool.stats();
        assert!(stats.input_bytes > 0);
        assert_eq!(stats.input_bytes_copied, 0);
        // A failing fill is that item's error, in its place.
        let r: Vec<_> = pool
            .map_records_in_place([3, 3, 3], |i, _| {
                if i == 1 {
                    Err("no data".into())
                } else {
                    Ok(())
                }
            })
            .collect();
        assert!(r[0].is_ok() && r[2].is_ok());
        assert!(matches!(&r[1], Err(Error::Encode { reason, .. }) if reason.contains("no data")));
        // Slices of one buffer: copied once each, read the same.
        let buffer = raw_chunk(9, 3000);
        let got: Vec<Vec<Hit>> = pool
            .map_record_slices(buffer.chunks(701))
            .map(|r| r.unwrap().records().to_vec())
            .collect();
        let want: Vec<Vec<Hit>> = buffer.chunks(701).map(hits_of).collect();
        assert_eq!(got, want);
    }
    assert_no_children();
}

#[test]
fn a_live_source_writes_records_in_place_with_their_time_range() {
    let guard = serial();
    {
        let task = shmexec::from_fn::<(Records<RawRecord>, (i64, i64)), _, _>(|c| {
            let inside =
                c.0.records()
                    .iter()
                    .all(|r| (c.1.0.to_native()..c.1.1.to_native()).contains(&{ r.time }));
            (c.0.len() as u64, inside)
        });
        let mut pool = builder(&guard).workers(2).build(task).unwrap();
        let (tx, rx) = pool.stream();
        for i in 0..30u64 {
            let range = ((i * 1_000_000) as i64, ((i + 1) * 1_000_000) as i64);
            let n = 100 + i as usize;
            tx.send_records_in_place(n, &range, |records: &mut [RawRecord]| {
                for (j, r) in records.iter_mut().enumerate() {
                    *r = raw(i, j);
                }
                Ok(())
            })
            .unwrap();
        }
        drop(tx);
        for i in 0..30u64 {
            let out = rx.recv().unwrap().unwrap();
            assert_eq!(out.deserialize().unwrap(), (100 + i, true));
        }
        assert!(rx.recv().is_none());
        drop(rx);
        assert_eq!(pool.stats().input_bytes_copied, 0);
    }
    assert_no_children();
}

#[test]
fn packed_records_archive_at_their_numpy_size() {
    assert_eq!(std::mem::size_of::<RawRecord>(), 244);
    // The archive alone: 244 bytes per record, then an 8-byte root.
    for n in [0usize, 1, 3, 1000] {
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&Records(raw_chunk(0, n))).unwrap();
        assert_eq!(bytes.len(), n * 244 + 8, "{n} records");
    }
    // With a time range after them: the records, then the root and two i64s, aligned.
    let with_range =
        rkyv::to_bytes::<rkyv::rancor::Error>(&(Records(raw_chunk(0, 3)), (0i64, 1i64))).unwrap();
    assert_eq!(
        with_range.len(),
        (3 * 244usize).next_multiple_of(8) + 8 + 16
    );
    // The same sizes in a pool's rings: as outputs, and as in-place inputs (the task returns the
    // size of the input it read).
    let guard = serial();
    {
        let task = shmexec::from_fn::<u64, _, _>(|n| Records(raw_chunk(0, n.to_native() as usize)));
        let mut pool = builder(&guard).workers(1).build(task).unwrap();
        for r in pool.map([0u64, 1, 1000]) {
            let out = r.unwrap();
            assert_eq!(out.bytes().len(), out.len() * 244 + 8);
        }
        drop(pool);
        let task = shmexec::from_fn::<Records<RawRecord>, _, _>(|c| {
            (
                c.records().len() as u64,
                std::mem::size_of_val(c.records()) as u64,
            )
        });
        let mut pool = builder(&guard).workers(1).build(task).unwrap();
        let got: Vec<(u64, u64)> = pool
            .map_records_in_place([0usize, 1, 1000], |_, _| Ok(()))
            .map(|r| r.unwrap().deserialize().unwrap())
            .collect();
        assert_eq!(got, [(0, 0), (1, 244), (1000, 244_000)]);
        assert_eq!(pool.stats().input_bytes, (244 + 8) + (244_000 + 8) + 8);
    }
    assert_no_children();
}

/// Claims `Records<Hit>` outputs but writes something else for some inputs: bytes that are not
/// a whole number of hits (1), or hits placed off their 8-byte alignment (2).
struct Liar;

impl Task for Liar {
    type Input = u64;
    type Output = (String, Records<Hit>);

    fn process(&mut self, _: &Archived<u64>) -> Result<Self::Output, BoxError> {
        Err("the worker runs `produce`".into())
    }

    fn produce(&mut self, input: &Archived<u64>, out: &mut OutputSink<'_>) -> Result<(), BoxError> {
        // A 13-byte string is written first, so the records that follow it would start at
        // byte 13 if nothing aligned them.
        let label = String::from("thirteen byte");
        match input.to_native() {
            1 => out.emit_last(&(label, Records(vec![0u8; 17]))),
            2 => out.emit_last(&(label, Records(vec![0u8; 16]))),
            n => out.emit_last(&(label, Records(vec![hit(n)]))),
        }
    }
}

fn hit(n: u64) -> Hit {
    Hit {
        time: n as f64,
        area: 1.5,
        channel: n as u32,
    }
}

#[test]
fn mis_sized_or_misaligned_records_are_an_item_error() {
    let guard = serial();
    {
        let mut pool = builder(&guard).workers(2).build(Liar).unwrap();
        let r: Vec<_> = pool.map([0u64, 1, 2, 3]).collect();
        for (n, r) in r.iter().enumerate() {
            match (n, r) {
                (1 | 2, Err(Error::InvalidOutput { seq, reason })) => {
                    assert_eq!(*seq, n as u64);
                    // rkyv's error keeps its message only in debug builds.
                    assert!(
                        reason.contains("not records of 16 bytes") || !cfg!(debug_assertions),
                        "{reason}"
                    );
                }
                (0 | 3, Ok(out)) => {
                    assert_eq!(out.1.records(), &[hit(n as u64)]);
                    assert_eq!(out.1.records().as_ptr() as usize % 8, 0);
                    assert_eq!(out.0.as_str(), "thirteen byte");
                }
                other => panic!("{other:?}"),
            }
        }
        // The pool goes on.
        assert_eq!(pool.map([5u64]).count(), 1);
    }
    assert_no_children();
}

#[test]
fn aligned_records_are_read_aligned_after_unaligned_fields() {
    let guard = serial();
    {
        // The input's string leaves the hits at an odd position unless they are aligned; the
        // task checks their address and the output goes the same way back.
        let task = shmexec::try_from_fn::<(String, Records<Hit>), _, _>(|c| {
            let hits = c.1.records();
            if hits.as_ptr() as usize % std::mem::align_of::<Hit>() != 0 {
                return Err("hits not aligned in the input".into());
            }
            Ok((
                c.0.as_str().to_owned() + "!",
                Records(hits.iter().map(|h| hit(h.channel as u64 + 1)).collect()),
            ))
        });
        let mut pool = builder(&guard).workers(2).build(task).unwrap();
        let inputs: Vec<(String, Records<Hit>)> = (0..20u64)
            .map(|i| {
                (
                    "x".repeat(9 + i as usize),
                    Records((0..i).map(hit).collect()),
                )
            })
            .collect();
        for (i, r) in pool.map(&inputs).enumerate() {
            let out = r.unwrap();
            assert_eq!(out.0.len(), 10 + i);
            let want: Vec<Hit> = (1..=i as u64).map(hit).collect();
            assert_eq!(out.1.records(), &want[..]);
            assert_eq!(out.1.records().as_ptr() as usize % 8, 0);
        }
    }
    assert_no_children();
}
