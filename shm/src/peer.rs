//! Who is on the other end, and whether it is still alive.
//!
//! Every blocking call in this crate watches a [`Peer`]: a wait on a ring whose other process
//! died must end with [`Error::PeerGone`], not hang. A process is watched
//! through a **pidfd**, which becomes readable when the process exits. Unlike `kill(pid, 0)` it
//! sees a dead-but-unreaped child (a zombie) as dead, and it cannot be fooled by pid reuse.

use std::fmt;
use std::os::fd::OwnedFd;

use rustix::event::{PollFd, PollFlags};
use rustix::process::{Pid, PidfdFlags};

use crate::error::{Error, Result};

/// The other end of a ring, as far as liveness goes.
///
/// ```
/// use shmexec_shm::Peer;
/// let me = Peer::process(std::process::id() as i32)?;
/// assert!(me.is_alive());
/// assert!(Peer::check(|| false).is_alive() == false);
/// # Ok::<(), shmexec_shm::Error>(())
/// ```
pub struct Peer {
    kind: PeerKind,
}

enum PeerKind {
    Unwatched,
    Process { pid: i32, pidfd: OwnedFd },
    Check(Box<dyn Fn() -> bool + Send + Sync>),
}

impl Peer {
    /// No liveness check: waits end only when their condition holds or their deadline passes.
    /// For both ends in one process (tests, threads), where a dead peer means a dead caller.
    pub fn unwatched() -> Peer {
        Peer {
            kind: PeerKind::Unwatched,
        }
    }

    /// Watches process `pid` through a pidfd. Open it while the process is certainly alive
    /// (right after `fork`, or in the child for its parent) so that the pid cannot be reused
    /// in between.
    pub fn process(pid: i32) -> Result<Peer> {
        let raw = Pid::from_raw(pid).ok_or_else(|| Error::InvalidArgument {
            what: format!("pid {pid} is not a valid process id"),
        })?;
        let pidfd = match rustix::process::pidfd_open(raw, PidfdFlags::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::SRCH) => return Err(Error::PeerGone { pid: Some(pid) }),
            Err(e) => return Err(Error::os("pidfd_open", e)),
        };
        Ok(Peer {
            kind: PeerKind::Process { pid, pidfd },
        })
    }

    /// Watches with a closure of the caller's: `false` means the peer is gone. It is called at
    /// most every few milliseconds while a wait lasts, never on the fast path.
    pub fn check(alive: impl Fn() -> bool + Send + Sync + 'static) -> Peer {
        Peer {
            kind: PeerKind::Check(Box::new(alive)),
        }
    }

    /// Whether the peer is still there. A syscall for a process peer: call it off the hot path.
    pub fn is_alive(&self) -> bool {
        match &self.kind {
            PeerKind::Unwatched => true,
            PeerKind::Check(f) => f(),
            PeerKind::Process { pidfd, .. } => {
                let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
                let zero = rustix::time::Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                match rustix::event::poll(&mut fds, Some(&zero)) {
                    // Readable means exited. An error polling our own fd is no evidence of death.
                    Ok(n) => n == 0,
                    Err(_) => true,
                }
            }
        }
    }

    /// The watched pid, for a process peer.
    pub fn pid(&self) -> Option<i32> {
        match &self.kind {
            PeerKind::Process { pid, .. } => Some(*pid),
            _ => None,
        }
    }

    pub(crate) fn gone_error(&self) -> Error {
        Error::PeerGone { pid: self.pid() }
    }
}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            PeerKind::Unwatched => f.write_str("Peer::Unwatched"),
            PeerKind::Process { pid, .. } => write!(f, "Peer::Process({pid})"),
            PeerKind::Check(_) => f.write_str("Peer::Check(..)"),
        }
    }
}
