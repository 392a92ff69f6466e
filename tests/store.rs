//! The store on a real file system: streams of archives saved as their bytes and read back in
//! place, cache misses and hits by stage key, and what a damaged file or a dead writer leaves.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use bytemuck::{Pod, Zeroable};
use rkyv::rancor;
use shmexec::store::{StageKey, Store, StoreError};
use shmexec::{Records, Samples};

/// A hit: 8-byte aligned for its `f64`.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
struct Hit {
    time: f64,
    area: f32,
    channel: u32,
}

/// A store in a fresh directory under the temp dir, removed on drop.
struct TempStore {
    dir: PathBuf,
    store: Store,
}

impl TempStore {
    fn new(name: &str) -> TempStore {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "shmexec-store-test-{}-{name}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        let store = Store::open(&dir).unwrap();
        TempStore { dir, store }
    }

    /// The names in the store's directory that are temporary ones.
    fn partials(&self) -> Vec<String> {
        fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains(".partial-"))
            .collect()
    }
}

impl Drop for TempStore {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn archive<T>(value: &T) -> rkyv::util::AlignedVec
where
    T: for<'a> rkyv::Serialize<
            rkyv::api::high::HighSerializer<
                rkyv::util::AlignedVec,
                rkyv::ser::allocator::ArenaHandle<'a>,
                rancor::Error,
            >,
        >,
{
    rkyv::to_bytes::<rancor::Error>(value).unwrap()
}

fn samples(chunk: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (chunk * 1_000_000 + i) as f32 * 0.5)
        .collect()
}

/// Whether `inner` lies inside `outer` (the same memory, not a copy of it).
fn lies_in<T, U>(inner: &[T], outer: &[U]) -> bool {
    let (start, end) = (
        outer.as_ptr() as usize,
        outer.as_ptr() as usize + size_of_val(outer),
    );
    let p = inner.as_ptr() as usize;
    p >= start && p + size_of_val(inner) <= end
}

fn raw_key() -> StageKey {
    StageKey::new("raw_records", "1", "run=7")
}

fn peaks_key() -> StageKey {
    StageKey::new("peaks", "0.3", "threshold=1.5").with_input(&raw_key())
}

/// Saves `chunks` archives of `Vec<f32>` under `key`.
fn save_samples(store: &Store, key: &StageKey, sizes: &[usize]) {
    let mut writer = store.writer(key).unwrap();
    for (i, &n) in sizes.iter().enumerate() {
        let range = (i as i64 * 100, (i as i64 + 1) * 100);
        writer
            .write_chunk(&archive(&samples(i, n)), Some(range))
            .unwrap();
    }
    assert_eq!(writer.chunks(), sizes.len());
    writer.finish().unwrap();
}

#[test]
fn samples_round_trip_in_place() {
    let t = TempStore::new("samples");
    let key = peaks_key();
    let sizes = [1000, 1 << 20, 1, 0];
    save_samples(&t.store, &key, &sizes);

    let saved = t.store.load(&key).unwrap().expect("saved");
    assert_eq!(saved.chunks(), sizes.len());
    assert_eq!(saved.id(), key.id());
    assert_eq!((saved.name(), saved.version()), ("peaks", "0.3"));
    assert_eq!(saved.path(), t.store.stream_path(&key));
    for (i, &n) in sizes.iter().enumerate() {
        let chunk = saved.chunk(i).unwrap();
        assert_eq!(chunk.index(), i);
        assert_eq!(chunk.range(), Some((i as i64 * 100, (i as i64 + 1) * 100)));
        let expect = samples(i, n);
        assert_eq!(
            &chunk[..],
            &archive(&expect)[..],
            "the bytes as they were saved"
        );
        assert_eq!(
            chunk.bytes().as_ptr() as usize % 4096,
            0,
            "mapped at a page"
        );
        let read = chunk.archive::<Vec<f32>>().unwrap().samples();
        assert_eq!(read, &expect[..]);
        assert!(lies_in(read, chunk.bytes()), "read in place, not copied");
        assert_eq!(saved.chunk_infos()[i].len(), chunk.len() as u64);
    }
    saved.verify().unwrap();
}

#[test]
fn records_and_metadata_round_trip_in_place() {
    let t = TempStore::new("records");
    let key = StageKey::new("hits", "2", "").with_input(&raw_key());
    let chunks: Vec<(Records<Hit>, u64)> = (0..3u64)
        .map(|c| {
            let hits = (0..100 * c as usize + 7)
                .map(|i| Hit {
                    time: (c * 1000 + i as u64) as f64,
                    area: i as f32 * 0.25,
                    channel: (i % 494) as u32,
                })
                .collect();
            (Records(hits), c * 10 + 1)
        })
        .collect();
    let mut writer = t.store.writer(&key).unwrap();
    for chunk in &chunks {
        writer.write_chunk(&archive(chunk), None).unwrap();
    }
    writer.finish().unwrap();

    let saved = t.store.load(&key).unwrap().unwrap();
    for (i, (hits, tag)) in chunks.iter().enumerate() {
        let chunk = saved.chunk(i).unwrap();
        assert_eq!(chunk.range(), None);
        let archived = chunk.archive::<(Records<Hit>, u64)>().unwrap();
        let read: &[Hit] = archived.0.records();
        assert_eq!(read, &hits.0[..]);
        assert_eq!(archived.1.to_native(), *tag);
        assert!(lies_in(read, chunk.bytes()), "read in place, not copied");
    }
}

#[test]
fn a_miss_then_a_hit() {
    let t = TempStore::new("cache");
    let key = peaks_key();
    assert!(t.store.load(&key).unwrap().is_none());
    assert!(t.store.streams().unwrap().is_empty());
    save_samples(&t.store, &key, &[10, 20]);
    let saved = t.store.load(&key).unwrap().expect("a hit after saving");
    assert_eq!(saved.chunks(), 2);
    let listed = t.store.streams().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id(), key.id());
    assert!(t.partials().is_empty(), "{:?}", t.partials());
    // Another handle on the same directory (another process) sees it too.
    let again = Store::open(&t.dir).unwrap();
    assert!(again.load(&key).unwrap().is_some());
}

#[test]
fn another_config_version_or_input_is_a_miss() {
    let t = TempStore::new("keys");
    let key = peaks_key();
    save_samples(&t.store, &key, &[10]);
    let others = [
        StageKey::new("peaks", "0.3", "threshold=1.6").with_input(&raw_key()),
        StageKey::new("peaks", "0.4", "threshold=1.5").with_input(&raw_key()),
        StageKey::new("peaks", "0.3", "threshold=1.5").with_input(&StageKey::new(
            "raw_records",
            "1",
            "run=8",
        )),
        StageKey::new("peaks", "0.3", "threshold=1.5").with_input(&StageKey::new(
            "raw_records",
            "2",
            "run=7",
        )),
        StageKey::new("peaks", "0.3", "threshold=1.5"),
        StageKey::new("peaks2", "0.3", "threshold=1.5").with_input(&raw_key()),
    ];
    for other in &others {
        assert_ne!(other.id(), key.id(), "{other:?}");
        assert!(t.store.load(other).unwrap().is_none(), "{other:?}");
    }
    assert!(
        t.store.load(&peaks_key()).unwrap().is_some(),
        "the same key again"
    );
}

#[test]
fn a_torn_or_changed_chunk_is_an_error_naming_the_file() {
    let t = TempStore::new("torn");
    let key = peaks_key();
    save_samples(&t.store, &key, &[1000, 1000, 1000]);
    let saved = t.store.load(&key).unwrap().unwrap();
    let file = |i: usize| saved.path().join(saved.chunk_infos()[i].file());

    // Cut short, as a write that did not finish leaves it.
    let f = fs::OpenOptions::new().write(true).open(file(0)).unwrap();
    f.set_len(saved.chunk_infos()[0].len() - 100).unwrap();
    drop(f);
    let err = saved.chunk(0).unwrap_err();
    match &err {
        StoreError::CorruptChunk { path, what } => {
            assert_eq!(path, &file(0));
            assert!(what.contains("bytes"), "{what}");
        }
        e => panic!("unexpected {e}"),
    }
    assert!(
        err.to_string().contains(&file(0).display().to_string()),
        "{err}"
    );

    // One byte flipped in the samples: same length, wrong checksum.
    let mut bytes = fs::read(file(1)).unwrap();
    bytes[123] ^= 0x40;
    fs::write(file(1), &bytes).unwrap();
    match saved.chunk(1).unwrap_err() {
        StoreError::CorruptChunk { path, what } => {
            assert_eq!(path, file(1));
            assert!(what.contains("checksum"), "{what}");
        }
        e => panic!("unexpected {e}"),
    }

    // Gone.
    fs::remove_file(file(2)).unwrap();
    match saved.chunk(2).unwrap_err() {
        StoreError::CorruptChunk { path, what } => {
            assert_eq!(path, file(2));
            assert!(what.contains("missing"), "{what}");
        }
        e => panic!("unexpected {e}"),
    }
    assert!(matches!(
        saved.verify(),
        Err(StoreError::CorruptChunk { .. })
    ));
    assert!(matches!(
        saved.chunk(3),
        Err(StoreError::NoSuchChunk {
            index: 3,
            chunks: 3,
            ..
        })
    ));
}

#[test]
fn a_crashed_writer_leaves_no_stream() {
    let t = TempStore::new("crash");
    let key = peaks_key();

    // A writer that is dropped unfinished (an error, a panic) removes its directory.
    let mut writer = t.store.writer(&key).unwrap();
    writer.write_chunk(&archive(&samples(0, 10)), None).unwrap();
    assert_eq!(t.partials().len(), 1);
    drop(writer);
    assert!(t.partials().is_empty());
    assert!(t.store.load(&key).unwrap().is_none());

    // A process that dies leaves it (forget: no drop runs), and it is not a stream.
    let mut writer = t.store.writer(&key).unwrap();
    writer.write_chunk(&archive(&samples(0, 10)), None).unwrap();
    std::mem::forget(writer);
    assert_eq!(t.partials().len(), 1);
    assert!(t.store.load(&key).unwrap().is_none());
    assert!(t.store.streams().unwrap().is_empty());

    // Even a temporary directory holding everything, metadata included, is not read: a copy of
    // a complete stream under the name a dead process's writer would have had.
    save_samples(&t.store, &key, &[10]);
    let dead = t.dir.join(format!(
        "{}.partial-999999999-0-0",
        t.store
            .stream_path(&key)
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
    ));
    fs::create_dir(&dead).unwrap();
    let final_dir = t.store.stream_path(&key);
    for entry in fs::read_dir(&final_dir).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), dead.join(entry.file_name())).unwrap();
    }
    assert!(t.store.remove(&key).unwrap());
    assert!(t.store.load(&key).unwrap().is_none());
    assert_eq!(t.partials().len(), 2);

    // Clean-up takes the dead process's directory and keeps this (live) process's.
    let removed = t.store.remove_stale_partials().unwrap();
    assert_eq!(removed, vec![dead]);
    assert_eq!(t.partials().len(), 1);
    assert!(t.partials()[0].contains(&format!(".partial-{}-", std::process::id())));
}

#[test]
fn a_final_directory_without_good_metadata_is_an_error() {
    let t = TempStore::new("meta");
    let key = peaks_key();
    let dir = t.store.stream_path(&key);

    // Made by hand: a chunk, no metadata.
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("000000.rkyv"), archive(&samples(0, 10))).unwrap();
    let err = t.store.load(&key).unwrap_err();
    match &err {
        StoreError::MissingMetadata { path } => assert_eq!(path, &dir),
        e => panic!("unexpected {e}"),
    }
    assert!(
        err.to_string().contains(&dir.display().to_string()),
        "{err}"
    );
    assert!(t.store.streams().is_err(), "listing says so too");
    fs::remove_dir_all(&dir).unwrap();

    // Metadata that does not parse: named, with the line.
    save_samples(&t.store, &key, &[10, 10]);
    let meta = dir.join("stream.meta");
    let text = fs::read_to_string(&meta).unwrap();
    fs::write(&meta, text.replace("chunks 2", "chunks two")).unwrap();
    match t.store.load(&key).unwrap_err() {
        StoreError::BadMetadata { path, line, what } => {
            assert_eq!(path, meta);
            assert_eq!(line, 8, "{what}");
        }
        e => panic!("unexpected {e}"),
    }
    // Cut short.
    fs::write(&meta, &text[..text.len() - 4]).unwrap();
    assert!(matches!(
        t.store.load(&key),
        Err(StoreError::BadMetadata { .. })
    ));
    fs::write(&meta, &text).unwrap();
    assert!(t.store.load(&key).unwrap().is_some());

    // A stream moved under another key's name is not that key's.
    let other = StageKey::new("peaks", "0.3", "threshold=9").with_input(&raw_key());
    fs::rename(&dir, t.store.stream_path(&other)).unwrap();
    match t.store.load(&other).unwrap_err() {
        StoreError::BadMetadata { what, .. } => assert!(what.contains(&key.id()), "{what}"),
        e => panic!("unexpected {e}"),
    }
    assert!(t.store.load(&key).unwrap().is_none());
}

#[test]
fn an_empty_stream_and_an_empty_chunk_round_trip() {
    let t = TempStore::new("empty");
    let key = StageKey::new("nothing", "1", "");
    t.store.writer(&key).unwrap().finish().unwrap();
    let saved = t
        .store
        .load(&key)
        .unwrap()
        .expect("an empty stream is a stream");
    assert_eq!(saved.chunks(), 0);
    saved.verify().unwrap();
    assert!(matches!(
        saved.chunk(0),
        Err(StoreError::NoSuchChunk { .. })
    ));

    let key = StageKey::new("blank", "1", "");
    let mut writer = t.store.writer(&key).unwrap();
    writer.write_chunk(&[], Some((5, 5))).unwrap();
    writer.finish().unwrap();
    let chunk = t.store.load(&key).unwrap().unwrap().chunk(0).unwrap();
    assert!(chunk.is_empty());
    assert_eq!(chunk.range(), Some((5, 5)));
    // Intact (checksum of no bytes), but not an archive of anything.
    assert!(matches!(
        chunk.archive::<Vec<f32>>(),
        Err(StoreError::InvalidArchive { .. })
    ));
}

#[test]
fn history_lists_each_stage_once_inputs_first() {
    let t = TempStore::new("history");
    let raw = raw_key();
    let peaks = StageKey::new("peaks", "0.3", "").with_input(&raw);
    let hits = StageKey::new("hits", "2", "").with_input(&raw);
    let events = StageKey::new("events", "1.0", "")
        .with_input(&peaks)
        .with_input(&hits);
    let pairs = |h: &[shmexec::store::HistoryEntry]| -> Vec<(String, String)> {
        h.iter()
            .map(|e| (e.name.clone(), e.version.clone()))
            .collect()
    };
    let expect: Vec<(String, String)> = [
        ("raw_records", "1"),
        ("peaks", "0.3"),
        ("hits", "2"),
        ("events", "1.0"),
    ]
    .iter()
    .map(|&(n, v)| (n.into(), v.into()))
    .collect();
    assert_eq!(pairs(&events.history()), expect);
    assert_eq!(events.history()[0].id, raw.id());
    assert_eq!(events.history()[3].id, events.id());

    t.store.writer(&events).unwrap().finish().unwrap();
    let saved = t.store.load(&events).unwrap().unwrap();
    assert_eq!(saved.history(), &events.history()[..]);
}

#[test]
fn odd_names_round_trip_through_the_metadata() {
    let t = TempStore::new("names");
    let key = StageKey::new("peaks v2/ä%20\nx", "", [0u8, 255, 10]);
    t.store.writer(&key).unwrap().finish().unwrap();
    let saved = t.store.load(&key).unwrap().unwrap();
    assert_eq!(saved.name(), key.name());
    assert_eq!(saved.version(), "");
    let dir_name = saved
        .path()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(dir_name.starts_with("peaks_v2_"), "{dir_name}");
}

#[test]
fn two_writers_of_one_key_both_succeed() {
    let t = TempStore::new("race");
    let key = peaks_key();
    let mut first = t.store.writer(&key).unwrap();
    let mut second = t.store.writer(&key).unwrap();
    first.write_chunk(&archive(&samples(0, 10)), None).unwrap();
    second.write_chunk(&archive(&samples(0, 10)), None).unwrap();
    first.finish().unwrap();
    second.finish().unwrap();
    assert!(t.partials().is_empty(), "{:?}", t.partials());
    t.store.load(&key).unwrap().unwrap().verify().unwrap();
}

#[test]
fn finishing_onto_a_foreign_directory_leaves_it_alone() {
    let t = TempStore::new("occupied");
    let key = peaks_key();
    let dir = t.store.stream_path(&key);
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("notes.txt"), "mine").unwrap();
    let writer = t.store.writer(&key).unwrap();
    match writer.finish().unwrap_err() {
        StoreError::Occupied { path, source } => {
            assert_eq!(path, dir);
            assert!(matches!(*source, StoreError::MissingMetadata { .. }));
        }
        e => panic!("unexpected {e}"),
    }
    assert_eq!(fs::read_to_string(dir.join("notes.txt")).unwrap(), "mine");
    assert!(t.partials().is_empty());
}

#[test]
fn removing_a_stream_keeps_mapped_chunks_readable() {
    let t = TempStore::new("remove");
    let key = peaks_key();
    save_samples(&t.store, &key, &[1000]);
    let chunk = t.store.load(&key).unwrap().unwrap().chunk(0).unwrap();
    assert!(t.store.remove(&key).unwrap());
    assert!(!t.store.remove(&key).unwrap());
    assert!(t.store.load(&key).unwrap().is_none());
    assert!(!Path::new(&t.store.stream_path(&key)).exists());
    assert!(t.partials().is_empty());
    assert_eq!(
        chunk.archive::<Vec<f32>>().unwrap().samples(),
        &samples(0, 1000)[..]
    );
}

#[test]
fn bad_ranges_and_wrong_types_are_errors() {
    let t = TempStore::new("errors");
    let key = peaks_key();
    let mut writer = t.store.writer(&key).unwrap();
    assert!(matches!(
        writer.write_chunk(b"x", Some((10, 9))),
        Err(StoreError::InvalidRange {
            index: 0,
            start: 10,
            end: 9
        })
    ));
    assert_eq!(writer.chunks(), 0);
    writer.write_chunk(&archive(&samples(0, 3)), None).unwrap();
    writer.finish().unwrap();
    let chunk = t.store.load(&key).unwrap().unwrap().chunk(0).unwrap();
    // 12 bytes of samples are not 16-byte records.
    match chunk.archive::<Records<Hit>>().unwrap_err() {
        StoreError::InvalidArchive {
            path, type_name, ..
        } => {
            assert_eq!(path, chunk.path());
            assert!(type_name.contains("Records"), "{type_name}");
        }
        e => panic!("unexpected {e}"),
    }
}

#[test]
fn a_load_while_the_stream_is_committed_and_removed_is_a_hit_or_a_miss() {
    // The commit renames the whole directory into place: a reader that found no metadata and
    // then the directory must not take it for a damaged stream.
    let t = TempStore::new("load-race");
    let key = peaks_key();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let start = std::time::Instant::now();
            while start.elapsed() < std::time::Duration::from_millis(1500) {
                save_samples(&t.store, &key, &[4]);
                t.store.remove(&key).unwrap();
            }
            stop.store(true, Ordering::Relaxed);
        });
        let mut loads = 0u64;
        while !stop.load(Ordering::Relaxed) {
            match t.store.load(&key) {
                Ok(_) => loads += 1,
                Err(e) => panic!("load {loads} while the stream is committed: {e}"),
            }
        }
        assert!(loads > 0);
    });
}
