//! Saved stages: a stage's outputs written to a [`Store`] as they pass the coordinator, and a
//! run that finds them there served from the saved chunks instead of computing them again
//! (strax's savers and its cache; datamultiproc's `Cache`).
//!
//! A saved stage is the last of its group, so each of its outputs is a frame the coordinator
//! holds anyway on its way to the next group: saving it is writing those bytes to a chunk file,
//! nothing serialized. The stream is committed when the run has handed on every output with no
//! error: a run that fails an item, or is dropped early, leaves nothing a later run could take
//! for complete. A run whose stage is saved already skips that stage and every stage before it:
//! the next group's workers map the chunk files and read them in place.

use std::path::PathBuf;

use crate::call::feed::Feed;
use crate::error::{Error, Result};
use crate::store::{SavedStream, StageKey, Store, StreamWriter};

use super::hop::FileChunk;

/// What makes a stage's key besides its inputs', and where it is saved.
#[derive(Clone, Debug)]
pub(crate) struct Lineage {
    pub(crate) version: String,
    pub(crate) config: Vec<u8>,
    pub(crate) store: Option<Store>,
    /// The stage whose outputs it reads (`None`: the pipeline's inputs).
    pub(crate) input: Option<usize>,
    /// A join's side: the second stage whose outputs it reads.
    pub(crate) side: Option<usize>,
}

impl Default for Lineage {
    fn default() -> Self {
        Lineage {
            version: "0".to_owned(),
            config: Vec::new(),
            store: None,
            input: None,
            side: None,
        }
    }
}

/// The keys of every stage, each built on its input stage's (or on `source`'s), and a join's
/// on its side's after that. A stage's inputs come before it in `lineage`'s order.
pub(crate) fn keys(names: &[String], lineage: &[Lineage], source: &StageKey) -> Vec<StageKey> {
    let mut keys: Vec<StageKey> = Vec::with_capacity(names.len());
    for (name, l) in names.iter().zip(lineage) {
        let input = l.input.map_or(source, |i| &keys[i]);
        let mut key = StageKey::new(name.clone(), l.version.clone(), &l.config).with_input(input);
        if let Some(side) = l.side {
            key = key.with_input(&keys[side]);
        }
        keys.push(key);
    }
    keys
}

/// A saved stage's outputs being written in one run.
pub(crate) struct Saving {
    pub(crate) stage: String,
    writer: Option<StreamWriter>,
    /// Why the stream will not be committed (an item failed), if it will not.
    spoiled: Option<String>,
}

impl Saving {
    pub(crate) fn start(stage: &str, store: &Store, key: &StageKey) -> Result<Saving> {
        Ok(Saving {
            stage: stage.to_owned(),
            writer: Some(store.writer(key)?),
            spoiled: None,
        })
    }

    /// Saves one output's archive bytes as the next chunk.
    pub(crate) fn output(&mut self, bytes: &[u8]) -> Result<()> {
        if self.spoiled.is_some() {
            return Ok(());
        }
        match &mut self.writer {
            Some(w) => Ok(w.write_chunk(bytes, None)?),
            None => Ok(()),
        }
    }

    /// An item failed in or before the stage: the stream is not complete.
    pub(crate) fn item_failed(&mut self, e: &Error) {
        self.spoiled
            .get_or_insert_with(|| format!("an item failed: {e}"));
        self.writer = None;
    }

    /// Commits the stream (if nothing spoiled it); says whether it did.
    pub(crate) fn finish(&mut self) -> Result<bool> {
        match self.writer.take() {
            Some(w) if self.spoiled.is_none() => {
                w.finish()?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

/// A saved stream's chunks, as the inputs of the group after its stage: descriptors of the chunk
/// files, each checked (length, checksum) before it is handed on.
pub(crate) struct SavedFeed {
    stream: SavedStream,
    next: usize,
    /// The chunk prepared: its file and length.
    prepared: Option<(PathBuf, u64)>,
}

impl SavedFeed {
    pub(crate) fn new(stream: SavedStream) -> Self {
        SavedFeed {
            stream,
            next: 0,
            prepared: None,
        }
    }
}

impl Feed for SavedFeed {
    fn prepare(&mut self) -> Option<Result<usize, String>> {
        if self.next >= self.stream.chunks() {
            return None;
        }
        let index = self.next;
        self.next += 1;
        match self.stream.chunk(index) {
            Ok(chunk) => {
                let (path, len) = (chunk.path().to_owned(), chunk.len() as u64);
                let n = FileChunk { len, path: &path }.encoded_len();
                self.prepared = Some((path, len));
                Some(Ok(n))
            }
            Err(e) => Some(Err(e.to_string())),
        }
    }

    fn write(&mut self, slot: &mut [u8]) -> Result<usize, String> {
        let (path, len) = self.prepared.take().ok_or("no saved chunk prepared")?;
        Ok(FileChunk { len, path: &path }.write(slot))
    }

    fn skip(&mut self) {
        self.prepared = None;
    }

    fn copies(&self) -> bool {
        false
    }

    fn remaining(&self) -> Option<u64> {
        Some((self.stream.chunks() - self.next) as u64)
    }
}
