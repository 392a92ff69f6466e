//! [`StreamWriter`]: one stream saved chunk by chunk into a temporary directory, then committed
//! by a rename.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use super::error::{Result, StoreError};
use super::meta::{self, ChunkInfo, Meta};
use super::saved::read_stream;

/// Writes one stage's output into the [store](super::Store), chunk by chunk: made by
/// [`Store::writer`](super::Store::writer), committed by [`finish`](Self::finish).
///
/// Until `finish` returns, everything lies in a temporary directory beside the stream's final
/// one, which [`Store::load`](super::Store::load) never reads: a stream is either complete under
/// its final name or absent. Dropping the writer without `finish` (an error, a panic) removes
/// the temporary directory; a process that dies leaves it behind, still ignored (see
/// [`Store::remove_stale_partials`](super::Store::remove_stale_partials)).
#[derive(Debug)]
pub struct StreamWriter {
    /// The store's directory, fsynced after the final rename.
    store_dir: PathBuf,
    /// The temporary directory everything is written in.
    temp: PathBuf,
    /// The stream's final directory.
    target: PathBuf,
    /// The metadata, its chunk list growing with each chunk.
    meta: Meta,
    /// Set once the temporary directory has become the final one: nothing left to remove.
    committed: bool,
}

impl StreamWriter {
    /// Starts a writer whose temporary directory `temp` was just created.
    pub(crate) fn new(store_dir: PathBuf, temp: PathBuf, target: PathBuf, meta: Meta) -> Self {
        StreamWriter {
            store_dir,
            temp,
            target,
            meta,
            committed: false,
        }
    }

    /// Saves the next chunk: `bytes` as they are (a frame's payload, an rkyv archive), with
    /// the time range `[start, end)` of the records it holds, if the stream is a time stream.
    ///
    /// The bytes go to a file of their own under a temporary name, are fsynced, and the file is
    /// renamed to the chunk's name; its length and blake3 checksum go into the metadata, which a
    /// loader checks before it hands the bytes out. An error leaves the writer as it was (the
    /// chunk not counted): the same chunk can be written again.
    pub fn write_chunk(&mut self, bytes: &[u8], range: Option<(i64, i64)>) -> Result<()> {
        let index = self.meta.chunks.len();
        if let Some((start, end)) = range.filter(|&(start, end)| end < start) {
            return Err(StoreError::InvalidRange { index, start, end });
        }
        let file = format!("{index:06}.rkyv");
        let tmp = self.temp.join(format!(".{file}.tmp"));
        write_synced(&tmp, bytes)?;
        let path = self.temp.join(&file);
        fs::rename(&tmp, &path).map_err(|e| StoreError::io("rename", &tmp, e))?;
        self.meta.chunks.push(ChunkInfo {
            file,
            len: bytes.len() as u64,
            checksum: blake3::hash(bytes),
            range,
        });
        Ok(())
    }

    /// The number of chunks written so far.
    pub fn chunks(&self) -> usize {
        self.meta.chunks.len()
    }

    /// Commits the stream: writes its metadata (format version, key id, name, version, history,
    /// chunk list) last, fsyncs it and the temporary directory, renames that directory to the
    /// stream's final name and fsyncs the store's directory. Once it returns `Ok`, every
    /// [`Store::load`](super::Store::load) of the key finds the stream, also after a crash of
    /// the machine.
    ///
    /// If a complete stream of the same key is there already (another writer of the same key
    /// finished first), this one's files are discarded and `finish` returns `Ok`: the key names
    /// the output, so both hold the same. A directory under the final name that does not load
    /// is left alone: [`StoreError::Occupied`].
    pub fn finish(mut self) -> Result<()> {
        let meta_tmp = self.temp.join(format!(".{}.tmp", meta::FILE));
        write_synced(&meta_tmp, self.meta.render().as_bytes())?;
        let meta_path = self.temp.join(meta::FILE);
        fs::rename(&meta_tmp, &meta_path).map_err(|e| StoreError::io("rename", &meta_tmp, e))?;
        sync_dir(&self.temp)?;
        // A rename onto a stream that is removed meanwhile succeeds on the next try.
        for _ in 0..3 {
            match fs::rename(&self.temp, &self.target) {
                Ok(()) => {
                    self.committed = true;
                    return sync_dir(&self.store_dir);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::DirectoryNotEmpty
                            | ErrorKind::AlreadyExists
                            | ErrorKind::NotADirectory
                    ) =>
                {
                    match read_stream(&self.target, &self.meta.id) {
                        // Drop removes this writer's directory.
                        Ok(Some(_)) => return Ok(()),
                        Ok(None) => continue,
                        Err(source) => {
                            return Err(StoreError::Occupied {
                                path: self.target.clone(),
                                source: Box::new(source),
                            });
                        }
                    }
                }
                Err(e) => return Err(StoreError::io("rename", &self.temp, e)),
            }
        }
        Err(StoreError::io(
            "rename",
            &self.temp,
            std::io::Error::other(format!(
                "{} kept appearing and disappearing",
                self.target.display()
            )),
        ))
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: what is left is a temporary directory, which no load reads.
            let _ = fs::remove_dir_all(&self.temp);
        }
    }
}

/// Creates (or truncates) `path`, writes `bytes` and fsyncs the file.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| StoreError::io("create", path, e))?;
    file.write_all(bytes)
        .map_err(|e| StoreError::io("write", path, e))?;
    file.sync_all()
        .map_err(|e| StoreError::io("fsync", path, e))
}

/// Fsyncs a directory, so that the names created or renamed in it last.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io("fsync", dir, e))
}
