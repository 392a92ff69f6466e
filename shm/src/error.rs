//! The one error type of `shmexec-shm`.
//!
//! Every way a transport call can fail is a variant here, with a message that says what to do
//! about it. Nothing in this crate panics on data that another process controls: a corrupt
//! header or index in shared memory is a [`Error::Corrupt`], never an out-of-bounds read.

use std::io;
use std::time::Duration;

/// Errors of the transport layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument no call could satisfy: a segment of zero bytes, a ring too small or placed
    /// outside its segment, a pid that is not one.
    #[error("invalid argument: {what}")]
    InvalidArgument {
        /// What was wrong, with the value.
        what: String,
    },

    /// A limit on this process's memory (a memory cgroup, the machine's RAM, `RLIMIT_AS`; see
    /// [`crate::memory`]) leaves too little for a segment of this size. Reported at creation,
    /// so the process is neither killed by the OOM killer nor meets a SIGBUS on a page that
    /// could not be allocated.
    #[error(
        "not enough memory for a shared segment of {}: {limit} leaves {}; use smaller rings or \
         fewer workers, or raise that limit",
        crate::memory::Bytes(*requested), crate::memory::Bytes(*available)
    )]
    OutOfMemory {
        /// Bytes asked for.
        requested: u64,
        /// Bytes the tightest limit left when asked.
        available: u64,
        /// That limit, named for a person (see [`crate::memory::Limit`]).
        limit: String,
    },

    /// A system call failed.
    #[error("{op} failed: {source}")]
    Os {
        /// The call that failed.
        op: &'static str,
        /// The error the kernel returned.
        #[source]
        source: io::Error,
    },

    /// A frame can never fit in this ring, however long the producer waits.
    #[error(
        "frame of {len} bytes is larger than the ring can hold (at most {max} payload bytes per frame); \
         make the ring larger or the chunk smaller"
    )]
    FrameTooLarge {
        /// The payload length that was asked for.
        len: usize,
        /// The largest payload this ring can take.
        max: usize,
    },

    /// A deadline passed before the ring had what the caller waited for.
    #[error("timed out after {waited:?} waiting for the peer")]
    Timeout {
        /// How long the call waited.
        waited: Duration,
    },

    /// The process on the other end of the ring died (or its liveness check failed) while this
    /// side waited. Frames it published before dying are still delivered first.
    #[error("the peer process is gone{}", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    PeerGone {
        /// The peer's pid, where it was watched by pid.
        pid: Option<i32>,
    },

    /// The other end dropped its handle: no more frames will come, or none will be read.
    #[error("the other end closed the ring")]
    Closed,

    /// Shared memory holds something the protocol forbids: a header or index that a buggy or
    /// hostile peer (or a stray write) produced. The ring cannot be used further.
    #[error("corrupt ring: {what}")]
    Corrupt {
        /// What was found, with the offending values.
        what: String,
    },

    /// The producer or consumer side of a ring was already taken by a live handle.
    #[error("the ring already has a {role} (pid {pid}); a ring has exactly one of each")]
    AlreadyClaimed {
        /// `"producer"` or `"consumer"`.
        role: &'static str,
        /// The process holding it.
        pid: i32,
    },

    /// `fork` was refused because other threads exist in this process: a lock one of them held
    /// at the time of the fork would stay locked forever in the child.
    #[error(
        "refusing to fork: this process has {threads} threads, and a child forked now could \
         inherit a lock held by one of them; fork before starting threads"
    )]
    MultiThreaded {
        /// Threads counted in `/proc/self/task`.
        threads: usize,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an OS error with the name of the call that returned it.
    pub(crate) fn os(op: &'static str, source: impl Into<io::Error>) -> Self {
        Error::Os {
            op,
            source: source.into(),
        }
    }

    pub(crate) fn corrupt(what: impl Into<String>) -> Self {
        Error::Corrupt { what: what.into() }
    }
}
