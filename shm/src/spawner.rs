//! A thread that starts every child of its owner that runs this program again, so that the
//! children die with the owner's process, whatever thread asked for them, and run the program
//! file the owner started with, whatever became of that file since.
//!
//! **The death signal follows a thread.** A child started with `PR_SET_PDEATHSIG` gets the
//! signal when the *thread* that created it exits, not when its process does. A pool used from
//! a short-lived thread (a tokio blocking thread that replaces a dead worker inline, a scoped
//! thread that drives one call) would see that replacement killed as soon as the thread ended.
//! A [`Spawner`] owns one thread for its whole life and every [`Spawner::spawn`] is a request to
//! that thread over a channel, answered over a channel of its own: every child is the spawner
//! thread's, so the death signal fires when the spawner is dropped (its owner has shut the
//! children down by then) or the process dies, and never earlier.
//!
//! Designs weighed against it:
//! - the child watching its parent's pidfd instead of the death signal (as the launcher does):
//!   a worker looks at its parent only while it waits on its rings, so one running a long item
//!   or a hung `init` would outlive a dead parent; the death signal is the kernel's guarantee;
//! - a single-threaded helper process that starts the children (the launcher, run by `exec`):
//!   equally sound, but a process and a pipe protocol more, where a thread and a channel do;
//! - starting children on whatever thread asks and documenting "use the pool from a thread that
//!   lives as long as it": a rule that async runtimes break without the user knowing.
//!
//! The cost is one parked thread per owner, and a request that waits for that thread: a
//! request waits at most [`SPAWN_WITHIN`] for its answer (a `fork` and an `exec`), so nothing
//! hangs on a thread that is stuck. A child whose answer comes after its request gave up is one
//! that nobody holds: the thread drops its handle, which kills and reaps it.
//!
//! **The program file.** [`Spawner::start`] opens `/proc/self/exe` (read-only, close-on-exec)
//! and every child runs through that descriptor (`/proc/self/fd/N`, with this process's own
//! `argv[0]`), so a child started after the program was upgraded on disk (the file replaced or
//! deleted, `current_exe()` reading "... (deleted)") runs the program its owner runs, not the
//! new file or nothing.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use rustix::fs::{Mode, OFlags};

use crate::error::{Error, Result};
use crate::process::ChildProcess;

/// How long a request waits for the spawner thread to answer (it answers in the time of a
/// `fork` and an `exec`).
pub const SPAWN_WITHIN: Duration = Duration::from_secs(5);

/// One child to start, and where its answer goes.
struct Request {
    cmd: Command,
    /// Duplicates of the descriptors the child keeps, owned by the request so that they are
    /// open until the thread has started the child, whatever the caller closes meanwhile.
    keep: Vec<OwnedFd>,
    own_group: bool,
    answer: mpsc::SyncSender<Result<ChildProcess>>,
}

/// The owner's handle on the spawner thread; see the module documentation. Dropping it ends
/// the thread (after the request it is serving, if any).
pub struct Spawner {
    requests: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
    /// This program's file, as it was at [`Spawner::start`].
    program: OwnedFd,
    arg0: OsString,
    /// The arguments every child gets first.
    args: Vec<OsString>,
}

impl std::fmt::Debug for Spawner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spawner")
            .field("program", &self.program.as_raw_fd())
            .finish()
    }
}

impl Spawner {
    /// Opens this program's file and starts the spawner thread.
    pub fn start() -> Result<Spawner> {
        let arg0 = std::env::args_os()
            .next()
            .or_else(|| std::env::current_exe().ok().map(OsString::from))
            .unwrap_or_else(|| OsString::from("/proc/self/exe"));
        Self::start_with(Path::new("/proc/self/exe"), arg0, Vec::new())
    }

    /// [`start`](Self::start) for children that run `program` with `args` (then what
    /// [`spawn`](Self::spawn)'s `configure` adds) instead of this program. The child's
    /// `argv[0]` is `program` as given: an interpreter finds its installation (a Python
    /// virtual environment's `pyvenv.cfg`) from it.
    pub fn start_program(program: &Path, args: Vec<OsString>) -> Result<Spawner> {
        Self::start_with(program, program.as_os_str().to_owned(), args)
    }

    fn start_with(path: &Path, arg0: OsString, args: Vec<OsString>) -> Result<Spawner> {
        let program = rustix::fs::open(path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| Error::os("open the program to spawn", e))?;
        let (tx, rx) = mpsc::channel::<Request>();
        let thread = std::thread::Builder::new()
            .name("shmexec-spawner".into())
            .spawn(move || {
                for req in rx {
                    let child = start_child(req.cmd, &req.keep, req.own_group);
                    // The descriptors' duplicates close here, after the child has exec'd.
                    drop(req.keep);
                    // Refused when the request gave up: the child is dropped, so killed and
                    // reaped, on this thread.
                    let _ = req.answer.send(child);
                }
            })
            .map_err(|e| Error::os("spawn the spawner thread", e))?;
        Ok(Spawner {
            requests: Some(tx),
            thread: Some(thread),
            program,
            arg0,
            args,
        })
    }

    /// Starts this program again (the file [`Spawner::start`] opened) on the spawner thread, as
    /// a child that keeps duplicates of `keep` open across `exec` and dies with the spawner
    /// thread (`PR_SET_PDEATHSIG`). `configure` gets the command and the numbers the kept
    /// descriptors have in the child (to tell it, in its environment or arguments). With
    /// `own_group`, the child leads a process group of its own, which its handle kills with it
    /// (see [`ChildProcess`]).
    pub fn spawn(
        &self,
        keep: &[BorrowedFd<'_>],
        own_group: bool,
        configure: impl FnOnce(&mut Command, &[i32]),
    ) -> Result<ChildProcess> {
        let keep = keep
            .iter()
            .map(|fd| {
                rustix::io::fcntl_dupfd_cloexec(fd, 3).map_err(|e| Error::os("dup (to keep)", e))
            })
            .collect::<Result<Vec<OwnedFd>>>()?;
        let numbers: Vec<i32> = keep.iter().map(|fd| fd.as_raw_fd()).collect();
        let mut cmd = Command::new(format!("/proc/self/fd/{}", self.program.as_raw_fd()));
        cmd.arg0(&self.arg0).args(&self.args);
        configure(&mut cmd, &numbers);
        let (answer, answered) = mpsc::sync_channel(1);
        let gone = || Error::os("spawner thread", rustix::io::Errno::PIPE);
        self.requests
            .as_ref()
            .ok_or_else(gone)?
            .send(Request {
                cmd,
                keep,
                own_group,
                answer,
            })
            .map_err(|_| gone())?;
        match answered.recv_timeout(SPAWN_WITHIN) {
            Ok(child) => child,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                Err(Error::os("spawner thread", rustix::io::Errno::TIMEDOUT))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(gone()),
        }
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        drop(self.requests.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Starts `cmd` on the calling thread (the spawner's); see [`crate::process::spawn_keeping`].
fn start_child(cmd: Command, keep: &[OwnedFd], own_group: bool) -> Result<ChildProcess> {
    let keep: Vec<BorrowedFd<'_>> = keep.iter().map(std::os::fd::AsFd::as_fd).collect();
    crate::process::spawn_keeping_with(cmd, &keep, own_group)
}
