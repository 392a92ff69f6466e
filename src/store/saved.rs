//! [`SavedStream`] and [`SavedChunk`]: a complete stream found in the store, and one of its
//! chunks mapped and checked.

use std::fs;
use std::io::ErrorKind;
use std::ops::Deref;
use std::path::{Path, PathBuf};

use rkyv::{Archive, Archived};
use shmexec_shm::MappedFile;

use super::error::{Result, StoreError};
use super::key::HistoryEntry;
use super::meta::{self, ChunkInfo, Meta};
use crate::archive::{Decode, decode};

/// A complete stream in the [store](super::Store): its metadata, read and checked against the
/// key it was loaded for. Its chunks are read one at a time with [`chunk`](Self::chunk).
#[derive(Clone, Debug)]
pub struct SavedStream {
    dir: PathBuf,
    meta: Meta,
}

impl SavedStream {
    /// The stream's directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The [`id`](super::StageKey::id) of the key the stream was saved under.
    pub fn id(&self) -> &str {
        &self.meta.id
    }

    /// The name of the stage that made it.
    pub fn name(&self) -> &str {
        &self.meta.name
    }

    /// The version of the stage that made it.
    pub fn version(&self) -> &str {
        &self.meta.version
    }

    /// The stage and its ancestors, as [`StageKey::history`](super::StageKey::history) listed
    /// them when the stream was saved: each after its inputs, the stage last.
    pub fn history(&self) -> &[HistoryEntry] {
        &self.meta.history
    }

    /// The number of chunks.
    pub fn chunks(&self) -> usize {
        self.meta.chunks.len()
    }

    /// What the metadata says of each chunk (file, length, checksum, time range), in order.
    pub fn chunk_infos(&self) -> &[ChunkInfo] {
        &self.meta.chunks
    }

    /// Chunk `index`, mapped from its file and checked: its length and its blake3 checksum must
    /// be the metadata's, or the chunk is a [`StoreError::CorruptChunk`] that names the file
    /// and what differs. Checking reads every byte once (the checksum); the bytes are then read
    /// where they lie in the page cache, with no copy.
    pub fn chunk(&self, index: usize) -> Result<SavedChunk> {
        let info = self
            .meta
            .chunks
            .get(index)
            .ok_or_else(|| StoreError::NoSuchChunk {
                index,
                chunks: self.meta.chunks.len(),
                path: self.dir.clone(),
            })?;
        let path = self.dir.join(&info.file);
        // SAFETY (`MappedFile::open`'s contract, nothing changes or truncates the file while it
        // is mapped): the store writes a chunk file once, under a temporary name, fsyncs it and
        // renames it into a directory that becomes the stream's only when its metadata is
        // complete; it never writes to that file again, and removing a stream renames its
        // directory away and unlinks the files, which leaves the pages of a mapped file as they
        // were. The length is compared with the metadata's before a byte is read, so a file that
        // was cut short before it was opened is an error here, not a SIGBUS; and the checksum
        // catches bytes that differ. Something outside the store that edits or truncates a
        // saved chunk in place while it is mapped breaks the contract (see `Store`).
        let map = unsafe { MappedFile::open(&path) }.map_err(|source| match source {
            shmexec_shm::Error::Os { source, .. } if source.kind() == ErrorKind::NotFound => {
                StoreError::CorruptChunk {
                    path: path.clone(),
                    what: "the file is missing".into(),
                }
            }
            source => StoreError::Map {
                path: path.clone(),
                source,
            },
        })?;
        if map.len() as u64 != info.len {
            return Err(StoreError::CorruptChunk {
                path,
                what: format!(
                    "it holds {} bytes, the metadata says {}",
                    map.len(),
                    info.len
                ),
            });
        }
        let checksum = blake3::hash(&map);
        if checksum != info.checksum {
            return Err(StoreError::CorruptChunk {
                path,
                what: format!(
                    "its blake3 checksum is {}, the metadata says {}",
                    checksum.to_hex(),
                    info.checksum.to_hex()
                ),
            });
        }
        Ok(SavedChunk {
            map,
            path,
            index,
            range: info.range,
        })
    }

    /// Checks every chunk as [`chunk`](Self::chunk) does; the first that fails is the error.
    pub fn verify(&self) -> Result<()> {
        (0..self.chunks()).try_for_each(|i| self.chunk(i).map(drop))
    }
}

/// One chunk of a [`SavedStream`], mapped from its file and checked: it derefs to the bytes
/// that were saved, and [`archive`](Self::archive) reads them as the archive they are, in
/// place. The mapping lives as long as this value (not the stream's).
#[derive(Debug)]
pub struct SavedChunk {
    map: MappedFile,
    path: PathBuf,
    index: usize,
    range: Option<(i64, i64)>,
}

impl SavedChunk {
    /// The chunk's index in its stream.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The chunk's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The time range `[start, end)` it was saved with, if any.
    pub fn range(&self) -> Option<(i64, i64)> {
        self.range
    }

    /// The saved bytes, where they are mapped (the same as `&*chunk`).
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The bytes as an archive of `T`, validated (rkyv's `bytecheck`) and read in place: for a
    /// stage whose outputs are `Vec<f32>`, `chunk.archive::<Vec<f32>>()?.samples()` is the
    /// saved samples, with no copy. The file is mapped at a page boundary, so the archive is
    /// as aligned as it was in its frame.
    pub fn archive<T>(&self) -> Result<&Archived<T>>
    where
        T: Archive<Archived: Decode>,
    {
        decode::<Archived<T>>(&self.map).map_err(|e| StoreError::InvalidArchive {
            path: self.path.clone(),
            type_name: std::any::type_name::<T>(),
            reason: e.to_string(),
        })
    }
}

impl Deref for SavedChunk {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.map
    }
}

impl AsRef<[u8]> for SavedChunk {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

/// The complete stream in `dir` saved under the key `id`: `None` if there is no such
/// directory; an error if the directory is there without metadata that parses and names `id`.
pub(crate) fn read_stream(dir: &Path, id: &str) -> Result<Option<SavedStream>> {
    let meta_path = dir.join(meta::FILE);
    let mut looked = false;
    let text = loop {
        match fs::read(&meta_path) {
            Ok(text) => break text,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                // No directory (a miss, or removed meanwhile), or a directory without metadata.
                match fs::symlink_metadata(dir) {
                    Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(StoreError::io("stat", dir, e)),
                    // A writer that committed between the two looks renamed the whole
                    // directory into place: it is read again once before it is taken for a
                    // damaged one.
                    Ok(_) if !looked => looked = true,
                    Ok(_) => {
                        return Err(StoreError::MissingMetadata {
                            path: dir.to_owned(),
                        });
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::NotADirectory => {
                return Err(StoreError::MissingMetadata {
                    path: dir.to_owned(),
                });
            }
            Err(e) => return Err(StoreError::io("read", meta_path, e)),
        }
    };
    let bad = |line, what: String| StoreError::BadMetadata {
        path: meta_path.clone(),
        line,
        what,
    };
    let text = String::from_utf8(text).map_err(|_| bad(0, "it is not UTF-8 text".into()))?;
    let meta = Meta::parse(&text).map_err(|(line, what)| bad(line, what))?;
    if meta.id != id {
        return Err(bad(
            2,
            format!("it holds the stream of key {}, not of key {id}", meta.id),
        ));
    }
    Ok(Some(SavedStream {
        dir: dir.to_owned(),
        meta,
    }))
}
