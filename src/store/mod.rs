//! Saved stage outputs: a stream of chunks written to disk as the bytes they are, and mapped
//! back to be read in place.
//!
//! A stage's outputs are rkyv archives already (a frame's payload in an output ring is one), so
//! saving one is writing its bytes to a file, and loading it is mapping that file and reading
//! the archive where the page cache holds it: nothing is serialized or deserialized either way.
//! Saved streams serve as a cache (load the stage's output if it is there, compute and save it
//! if not) and as the program's results.
//!
//! # Layout
//!
//! A [`Store`] is a directory. Each stream in it is a directory named for its [`StageKey`]
//! (`<name>-<id>`, the id a hash of the stage's name, version, configuration and its inputs'
//! keys), holding one file per chunk and a metadata file written last:
//!
//! ```text
//! store/
//!   peaks-5be1…/            a complete stream
//!     000000.rkyv           chunk 0: the archive's bytes, as they were in the frame
//!     000001.rkyv
//!     stream.meta           history, and each chunk's file, length, checksum, time range
//!   events-0c9e….partial-4242-…   a writer at work (or one that died): never read
//! ```
//!
//! # Metadata
//!
//! `stream.meta` is a versioned, line-based text file that `cat` shows: the format version,
//! the key's id, the stage's name and version, its history (the stage and every stage upstream
//! of it, in processing order), then the chunk list.
//!
//! ```text
//! shmexec-stream 1
//! id 5be1…(64 hex digits)
//! name peaks
//! version 0.3
//! history 2
//! stage 91c0…(id) raw_records 1
//! stage 5be1…(id) peaks 0.3
//! chunks 2
//! chunk 000000.rkyv 4104 9f2a…(blake3, 64 hex digits) 0 1000
//! chunk 000001.rkyv 4104 07d3…(blake3) - -
//! end
//! ```
//!
//! - Line 1 names the format and its version; a reader refuses a version it does not know.
//! - Fields are separated by one space. Strings (names, versions) are percent-encoded: every
//!   byte outside `!`..=`~`, and `%` itself, is written `%XX`, so a string never holds a space
//!   or a line break and reads back exactly; the empty string is an empty field.
//! - `history` and `chunks` give the number of lines that follow, and `end` closes the file:
//!   a file cut short anywhere does not parse.
//! - A chunk line holds the file's name (inside the stream's directory), its length in bytes,
//!   its blake3 hash, and its time range `start end` (`- -`: none).
//!
//! # A rename is the commit
//!
//! A [`StreamWriter`] writes into a temporary directory beside the final one
//! (`<name>-<id>.partial-<pid>-<nonce>`): each chunk to a temporary name, fsynced, renamed to
//! its own; at [`finish`](StreamWriter::finish), the metadata the same way; then the directory
//! is renamed to its final name and the store's directory fsynced. A rename is atomic, so a
//! stream is either there complete or not there at all, whatever dies when:
//! - **A miss is a missing directory.** [`Store::load`] returns `None` only when there is no
//!   directory under the key's final name. Temporary directories are never read.
//! - **A final directory that does not read is an error, not a miss.** The store never makes
//!   one without complete metadata, so a directory without it, or with metadata that does not
//!   parse or names another key, was made or changed by something else: [`Store::load`] says
//!   which path and what is wrong ([`StoreError::MissingMetadata`],
//!   [`StoreError::BadMetadata`]) rather than computing the stream again over it.
//! - **A chunk is checked before it is handed out.** Its length and blake3 checksum are in the
//!   metadata; [`SavedStream::chunk`] compares both, so a chunk file that was cut short or
//!   changed is a [`StoreError::CorruptChunk`] naming the file, never bytes taken for good.
//!   The checksums are per chunk file, so a stream can be checked, copied or split across jobs
//!   chunk by chunk.
//! - **Dead writers leave temporary directories**, which are ignored;
//!   [`Store::remove_stale_partials`] removes those of processes that are gone.
//!
//! # Files are never modified
//!
//! Chunks are read through read-only mappings of their files. The store never writes a file
//! again once it has its final name, and [`Store::remove`] renames a stream away before it
//! unlinks its files, which leaves the pages of a mapped file intact. Editing or truncating a
//! saved chunk file in place while a [`SavedChunk`] of it is alive (with another program) is
//! outside what the store supports: the bytes would change under a validated archive, and a
//! page past a truncated end raises SIGBUS.
//!
//! [`Store`]'s doc has an example: a cache miss, the stream saved, then read in place.

mod error;
mod key;
mod meta;
mod saved;
mod writer;

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub use error::{Result, StoreError};
pub use key::{HistoryEntry, StageKey};
pub use meta::ChunkInfo;
pub use saved::{SavedChunk, SavedStream};
pub use writer::StreamWriter;

use saved::read_stream;
use writer::sync_dir;

/// What a temporary directory's name holds after the final name: `.partial-<pid>-<nonce>`.
const PARTIAL: &str = ".partial-";

/// A directory of saved streams, each under its [`StageKey`]. See the [module doc](self) for
/// the layout and what survives a crash.
///
/// ```
/// use shmexec::Samples;
/// use shmexec::store::{StageKey, Store};
///
/// let dir = std::env::temp_dir().join(format!("shmexec-store-doc-{}", std::process::id()));
/// let store = Store::open(&dir)?;
/// let raw = StageKey::new("raw_records", "1", "run=7");
/// let peaks = StageKey::new("peaks", "0.3", "threshold=1.5").with_input(&raw);
///
/// if store.load(&peaks)?.is_none() {
///     // A miss: compute the stage's outputs and save them as they come.
///     let mut writer = store.writer(&peaks)?;
///     for i in 0..3i64 {
///         let output: Vec<f32> = vec![i as f32; 1000];
///         let archive = rkyv::to_bytes::<rkyv::rancor::Error>(&output)?;
///         writer.write_chunk(&archive, Some((i * 1000, (i + 1) * 1000)))?;
///     }
///     writer.finish()?;
/// }
///
/// let saved = store.load(&peaks)?.expect("saved above");
/// assert_eq!(saved.chunks(), 3);
/// let chunk = saved.chunk(2)?; // mapped, length and checksum checked
/// assert_eq!(chunk.range(), Some((2000, 3000)));
/// let samples: &[f32] = chunk.archive::<Vec<f32>>()?.samples(); // in place
/// assert_eq!(samples, &[2.0; 1000][..]);
///
/// drop(chunk);
/// std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// Several processes may use one store at once: writers of different keys never meet, two
/// writers of one key both succeed (the first to finish provides the stream) and a reader sees
/// a stream complete or not at all.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// The store in `dir`, created (with its parents) if it is not there.
    pub fn open(dir: impl AsRef<Path>) -> Result<Store> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir).map_err(|e| StoreError::io("create_dir", dir, e))?;
        Ok(Store {
            dir: dir.to_owned(),
        })
    }

    /// The store's directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The directory the stream of `key` has when it is complete.
    pub fn stream_path(&self, key: &StageKey) -> PathBuf {
        self.dir.join(key.dir_name())
    }

    /// A writer for the stream of `key`, in a fresh temporary directory: nothing is visible
    /// under the key until [`StreamWriter::finish`].
    pub fn writer(&self, key: &StageKey) -> Result<StreamWriter> {
        let target = self.stream_path(key);
        let temp = self.create_temp_dir(&key.dir_name())?;
        let meta = meta::Meta {
            id: key.id(),
            name: key.name().to_owned(),
            version: key.version().to_owned(),
            history: key.history(),
            chunks: Vec::new(),
        };
        Ok(StreamWriter::new(self.dir.clone(), temp, target, meta))
    }

    /// The complete stream of `key`, or `None` if there is none (temporary directories of
    /// writers that have not finished do not count).
    ///
    /// A directory under the key's final name whose metadata is missing, does not parse or
    /// belongs to another key is an error naming it: see the [module doc](self). Chunks are
    /// checked when they are read ([`SavedStream::chunk`]), or all at once with
    /// [`SavedStream::verify`].
    pub fn load(&self, key: &StageKey) -> Result<Option<SavedStream>> {
        read_stream(&self.stream_path(key), &key.id())
    }

    /// Removes the stream of `key`; `false` if there was none. The directory is first renamed
    /// to a temporary name, so a concurrent [`load`](Self::load) sees the stream whole or not
    /// at all, and chunks mapped already stay readable. A removal cut short by a crash leaves
    /// that temporary directory, as a dead writer does.
    pub fn remove(&self, key: &StageKey) -> Result<bool> {
        let target = self.stream_path(key);
        let doomed = self.temp_path(&key.dir_name());
        match fs::rename(&target, &doomed) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(StoreError::io("rename", &target, e)),
        }
        sync_dir(&self.dir)?;
        fs::remove_dir_all(&doomed).map_err(|e| StoreError::io("remove_dir_all", &doomed, e))?;
        Ok(true)
    }

    /// Every complete stream in the store, by directory name. Entries that are not stream
    /// directories (temporary ones, files) are skipped; a stream directory that does not read
    /// is an error, as in [`load`](Self::load).
    pub fn streams(&self) -> Result<Vec<SavedStream>> {
        let mut names = Vec::new();
        for entry in
            fs::read_dir(&self.dir).map_err(|e| StoreError::io("read_dir", &self.dir, e))?
        {
            let entry = entry.map_err(|e| StoreError::io("read_dir", &self.dir, e))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            // Final names are `<name>-<id>` with no `.` (see `StageKey::dir_name`).
            if name.contains('.') {
                continue;
            }
            let Some((_, id)) = name.rsplit_once('-') else {
                continue;
            };
            if id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                names.push((name.clone(), id.to_owned()));
            }
        }
        names.sort();
        let mut streams = Vec::with_capacity(names.len());
        for (name, id) in names {
            // Removed since it was listed: skipped.
            if let Some(stream) = read_stream(&self.dir.join(name), &id)? {
                streams.push(stream);
            }
        }
        Ok(streams)
    }

    /// Removes the temporary directories of writers whose process is gone (no `/proc/<pid>`),
    /// left by a crash or a kill; returns their paths. A temporary directory of a live
    /// process, this one's included, is kept.
    ///
    /// Process ids are this machine's: do not call it on a store that processes of other
    /// machines or other pid namespaces write at the same time (a shared file system, another
    /// container), whose live writers it would take for dead.
    pub fn remove_stale_partials(&self) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        for entry in
            fs::read_dir(&self.dir).map_err(|e| StoreError::io("read_dir", &self.dir, e))?
        {
            let entry = entry.map_err(|e| StoreError::io("read_dir", &self.dir, e))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let Some((_, tail)) = name.split_once(PARTIAL) else {
                continue;
            };
            let Some(pid) = tail.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists() {
                continue;
            }
            let path = entry.path();
            match fs::remove_dir_all(&path) {
                Ok(()) => removed.push(path),
                // Another process cleaned it meanwhile.
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("remove_dir_all", &path, e)),
            }
        }
        Ok(removed)
    }

    /// A fresh temporary name beside the final name `final_name`.
    fn temp_path(&self, final_name: &str) -> PathBuf {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let count = NEXT.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        self.dir.join(format!(
            "{final_name}{PARTIAL}{}-{nanos:x}-{count}",
            std::process::id()
        ))
    }

    /// Creates a temporary directory for a writer of `final_name`.
    fn create_temp_dir(&self, final_name: &str) -> Result<PathBuf> {
        loop {
            let temp = self.temp_path(final_name);
            match fs::create_dir(&temp) {
                Ok(()) => return Ok(temp),
                // Left by a process that had this pid before: take another nonce.
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(StoreError::io("create_dir", &temp, e)),
            }
        }
    }
}
