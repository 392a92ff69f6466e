//! [`StoreError`]: what went wrong saving or loading a stream, and on which path.

use std::io;
use std::path::PathBuf;

/// An error of the [store](crate::store). Every variant names the file or directory concerned
/// and what was found there; the ones about damaged files say what to do about them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A file-system call failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// The call (`create_dir`, `write`, `rename`, `fsync`, ...).
        op: &'static str,
        /// The path it was given.
        path: PathBuf,
        /// The error the system returned.
        #[source]
        source: io::Error,
    },

    /// A chunk file could not be mapped.
    #[error("mapping {}: {source}", path.display())]
    Map {
        /// The chunk file.
        path: PathBuf,
        /// The transport's error (the failed call and the system's error).
        #[source]
        source: shmexec_shm::Error,
    },

    /// A stream directory under its final name has no metadata file. The store writes the
    /// metadata before it gives the directory that name, so the directory was made or changed
    /// by something else; it is not taken for a stream, complete or missing.
    #[error(
        "{} has no metadata file ({}): it is not a stream this store wrote, or it was damaged; \
         remove it to compute the stream again",
        path.display(), super::meta::FILE
    )]
    MissingMetadata {
        /// The stream directory.
        path: PathBuf,
    },

    /// A metadata file that does not parse, or that belongs to another stage key.
    #[error(
        "{}{}: {what}; remove the stream's directory to compute it again",
        path.display(), at_line(*line)
    )]
    BadMetadata {
        /// The metadata file.
        path: PathBuf,
        /// The line (from 1) where it went wrong; 0 for the file as a whole.
        line: usize,
        /// What was expected and what was found.
        what: String,
    },

    /// A chunk file that is missing, or whose length or checksum differs from the metadata's:
    /// written only in part, or changed since. Its bytes are not handed out.
    #[error(
        "chunk file {} is damaged: {what}; remove the stream's directory to compute it again",
        path.display()
    )]
    CorruptChunk {
        /// The chunk file.
        path: PathBuf,
        /// What differs, with both values.
        what: String,
    },

    /// A chunk index past the stream's end.
    #[error("chunk {index} asked of the {chunks} chunks of {}", path.display())]
    NoSuchChunk {
        /// The index asked for.
        index: usize,
        /// How many chunks the stream has.
        chunks: usize,
        /// The stream directory.
        path: PathBuf,
    },

    /// A chunk's bytes are intact (its checksum matches) but are not a valid archive of the
    /// type they were read as: the stream was written with another type.
    #[error("chunk file {} is not a valid archive of {type_name}: {reason}", path.display())]
    InvalidArchive {
        /// The chunk file.
        path: PathBuf,
        /// The type it was read as.
        type_name: &'static str,
        /// rkyv's description of what failed to check.
        reason: String,
    },

    /// A chunk's time range ends before it starts.
    #[error("chunk {index}'s time range [{start}, {end}) ends before it starts")]
    InvalidRange {
        /// The chunk's index in its stream.
        index: usize,
        /// The range given.
        start: i64,
        /// The range given.
        end: i64,
    },

    /// [`StreamWriter::finish`](super::StreamWriter::finish) found a directory under the
    /// stream's final name that is not a complete stream of the same key, so it left both as
    /// they are.
    #[error(
        "cannot save the stream as {}: a directory of that name is there and does not load \
         ({source}); remove it and save again",
        path.display()
    )]
    Occupied {
        /// The final directory.
        path: PathBuf,
        /// Why it does not load.
        #[source]
        source: Box<StoreError>,
    },
}

/// " line 7", or nothing for line 0 (the file as a whole).
fn at_line(line: usize) -> String {
    if line == 0 {
        String::new()
    } else {
        format!(" line {line}")
    }
}

/// The store's result type.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    /// Wraps a file-system error with the call and the path.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        StoreError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
