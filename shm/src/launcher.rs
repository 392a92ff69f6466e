//! A launcher: a small single-threaded process, forked once, that forks children on request.
//!
//! `fork` is only safe while the forking process runs one thread: a lock that another thread
//! holds at that moment stays locked forever in the child. A host that starts threads after
//! its children (a stream's halves, tokio, a thread pool) can therefore no longer fork a
//! replacement for a child that died. A [`Launcher`] is forked while the host still has one
//! thread; it keeps a copy of the host's memory as it was then (the closure that makes a child,
//! with everything it captured) and forks every child from that copy, on request, whatever the
//! host does meanwhile.
//!
//! The host talks to it over two pipes (requests, replies), one synchronous exchange at a time
//! (each message carries its request's id, so an answer that comes after its request timed out
//! is recognised and dropped):
//! - `Launch(index)` -> `Launched(pid)` or `Failed(errno)`: fork a child that runs
//!   `make(index)` and exits with its return value.
//! - `Reap(pid)` -> `Status(pid, how, code)` or `Running(pid)`: reap a child (the launcher is its
//!   parent; nobody else can). A child is reaped only when asked, so its pid cannot be reused
//!   while the host may still open a pidfd on it.
//! - `Exit`: kill and reap every child left, then exit.
//!
//! Lifetimes: the launcher does not use the parent-death signal (it fires when the forking
//! *thread* exits, and a host may build on a short-lived thread). It watches the host's pidfd
//! instead, and a closed request pipe: either means the host is gone, and it kills its children
//! and exits. Its children do use the death signal: the launcher has one thread.
//!
//! What the children start: the launcher is a child subreaper (`PR_SET_CHILD_SUBREAPER`), so a
//! process that a child started (a helper a task runs, a `sleep` it forgot) and that outlives
//! that child is reparented to the launcher instead of to init. After every `Reap` request
//! (the host asks for it once it has seen a child die, before it replaces it) and at `Exit`,
//! the launcher kills and reaps every child of its own that is not one of the children it
//! launched and has not reaped: nothing a dead child started keeps running, or keeps the
//! host's shared memory mapped, after its replacement is up or the launcher has gone. This
//! catches double forks and `setsid` (neither leaves the launcher's subtree), and costs no job
//! control (the children stay in the host's process group, so the terminal's Ctrl-C and Ctrl-Z
//! reach them). Limits: a process started by a child that is still alive is left alone while
//! its parent lives; one that was orphaned already (a daemon a live child double-forked) is
//! killed at the next `Reap` of any child; orphans that exit on their own stay zombies until
//! then; and a launcher killed by SIGKILL cannot do any of it (its children die by their death
//! signal, their own children are reparented above it).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use rustix::pipe::PipeFlags;
use rustix::process::{Pid, PidfdFlags, Signal, WaitOptions};

use crate::error::{Error, Result};
use crate::process::{ChildProcess, ExitStatus, readable_within};

/// How long the host waits for the launcher's answer (it answers in the time of a `fork`)
/// before it gives up on that request. A later request still works: answers carry the id of
/// their request, and the host drops stale ones.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);

const OP_LAUNCH: u32 = 1;
const OP_REAP: u32 = 2;
const OP_EXIT: u32 = 3;

const RE_LAUNCHED: u32 = 1;
const RE_FAILED: u32 = 2;
const RE_STATUS_EXITED: u32 = 3;
const RE_STATUS_SIGNALED: u32 = 4;
const RE_RUNNING: u32 = 5;

/// One message either way: an op or answer, two numbers, and the request's id (an answer
/// repeats its request's).
type Message = [u32; 4];

const MESSAGE_BYTES: usize = 16;

fn encode(m: Message) -> [u8; MESSAGE_BYTES] {
    let mut b = [0u8; MESSAGE_BYTES];
    for (i, w) in m.iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
    }
    b
}

fn decode(b: &[u8; MESSAGE_BYTES]) -> Message {
    let w = |i: usize| u32::from_le_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]);
    [w(0), w(1), w(2), w(3)]
}

fn write_all(fd: &OwnedFd, bytes: &[u8]) -> rustix::io::Result<()> {
    let mut done = 0;
    while done < bytes.len() {
        match rustix::io::write(fd, &bytes[done..]) {
            Ok(0) => return Err(rustix::io::Errno::PIPE),
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads one message; `Ok(None)` at end of file.
fn read_message(fd: &OwnedFd) -> rustix::io::Result<Option<Message>> {
    let mut b = [0u8; MESSAGE_BYTES];
    let mut done = 0;
    while done < b.len() {
        match rustix::io::read(fd, &mut b[done..]) {
            Ok(0) => return Ok(None),
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Some(decode(&b)))
}

/// The host's end of the pipes.
struct Link {
    requests: OwnedFd,
    replies: OwnedFd,
    /// The id of the next request.
    next_id: u32,
    /// Children launched for requests the host had given up on: killed, to be reaped. Until
    /// they are, their pids still hold the rings they claimed.
    stale: Vec<u32>,
}

impl Link {
    /// Sends `[op, a, b]` and returns the answer to it, dropping answers to earlier requests
    /// that timed out (a launcher that was stopped answers them when it goes on).
    fn ask(&mut self, [op, a, b]: [u32; 3]) -> Result<[u32; 3]> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        write_all(&self.requests, &encode([op, a, b, id]))
            .map_err(|e| Error::os("launcher request", e))?;
        let deadline = std::time::Instant::now() + ANSWER_WITHIN;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if !readable_within(self.replies.as_fd(), left) {
                return Err(Error::os("launcher reply", rustix::io::Errno::TIMEDOUT));
            }
            let [re, x, y, of] = read_message(&self.replies)
                .map_err(|e| Error::os("launcher reply", e))?
                .ok_or_else(|| Error::os("launcher reply", rustix::io::Errno::PIPE))?;
            if of == id {
                return Ok([re, x, y]);
            }
            if re == RE_LAUNCHED {
                // A launch the host gave up on (the launcher was stopped past the deadline)
                // was served after all: that child would take over rings whose worker was
                // started again meanwhile. It is the launcher's and not reaped yet (the host
                // never asked), so its pid is still its own.
                kill_unreaped(x as i32);
                self.stale.push(x);
            }
        }
    }

    /// Asks the launcher to reap the stale children killed so far; those not dead yet are
    /// asked for again after the next exchange.
    fn reap_stale(&mut self) {
        let stale = std::mem::take(&mut self.stale);
        for pid in stale {
            if let Ok([RE_RUNNING, ..]) = self.ask([OP_REAP, pid, 0]) {
                self.stale.push(pid);
            }
        }
    }
}

/// Kills a launched child that nobody will use (the launcher reaps it when it exits).
fn kill_unreaped(pid: i32) {
    let Some(pid) = Pid::from_raw(pid) else {
        return;
    };
    if let Ok(fd) = rustix::process::pidfd_open(pid, PidfdFlags::empty()) {
        let _ = rustix::process::pidfd_send_signal(&fd, Signal::KILL);
    }
}

/// The host's handle on a launcher. Dropping it asks the launcher to kill its children and
/// exit, and reaps it.
pub struct Launcher {
    link: Arc<Mutex<Link>>,
    process: ChildProcess,
}

impl std::fmt::Debug for Launcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launcher")
            .field("pid", &self.process.pid())
            .finish()
    }
}

/// How a launched child is reaped: through its launcher (see [`ChildProcess`]).
pub(crate) struct Reaper {
    link: Arc<Mutex<Link>>,
}

impl Reaper {
    /// Reaps `pid` if it exited; `Ok(None)` if it still runs.
    pub(crate) fn reap(&self, pid: i32) -> Result<Option<ExitStatus>> {
        let mut link = self.link.lock().unwrap_or_else(PoisonError::into_inner);
        let answer = link.ask([OP_REAP, pid as u32, 0]);
        link.reap_stale();
        let [re, p, code] = answer?;
        match re {
            RE_STATUS_EXITED if p == pid as u32 => Ok(Some(ExitStatus::Exited(code as i32))),
            RE_STATUS_SIGNALED if p == pid as u32 => Ok(Some(ExitStatus::Signaled(code as i32))),
            RE_RUNNING => Ok(None),
            _ => Err(Error::os("launcher reap", rustix::io::Errno::PROTO)),
        }
    }
}

impl Launcher {
    /// Forks the launcher; `make(index)` runs in each child it launches, whose exit code is its
    /// return value.
    ///
    /// # Safety
    /// As for [`crate::fork_unchecked`]: no other thread of this process may hold, at this
    /// moment, a lock that the launcher or `make` could take. (The launcher itself then has one
    /// thread, so its own forks are safe.)
    pub unsafe fn start_unchecked(make: impl FnMut(u32) -> i32) -> Result<Launcher> {
        // SAFETY: passed on from the caller.
        unsafe { Self::start_with_unchecked(|| {}, make) }
    }

    /// [`Launcher::start_unchecked`] that first runs `setup` once in the launcher, before it
    /// serves: for what the children should not inherit from the host (descriptors they would
    /// otherwise each close, which costs every child the scan of all of them).
    ///
    /// # Safety
    /// As for [`Launcher::start_unchecked`], for `setup` too.
    pub unsafe fn start_with_unchecked(
        setup: impl FnOnce(),
        mut make: impl FnMut(u32) -> i32,
    ) -> Result<Launcher> {
        let (req_r, req_w) =
            rustix::pipe::pipe_with(PipeFlags::CLOEXEC).map_err(|e| Error::os("pipe", e))?;
        let (rep_r, rep_w) =
            rustix::pipe::pipe_with(PipeFlags::CLOEXEC).map_err(|e| Error::os("pipe", e))?;
        let host = rustix::process::getpid();
        // The host's ends must not stay open in the launcher (a closed request pipe is how it
        // learns that the host is gone), nor the launcher's ends in the host.
        let (host_ends, launcher_ends) = ((req_w, rep_r), (req_r, rep_w));
        let mut launcher_ends = Some(launcher_ends);
        let host_raw = (
            std::os::fd::AsRawFd::as_raw_fd(&host_ends.0),
            std::os::fd::AsRawFd::as_raw_fd(&host_ends.1),
        );
        let body = || {
            // SAFETY: these two descriptors are the host's pipe ends, owned by `host_ends` in
            // this child's copy of the host's memory, which the child never uses or drops (it
            // `_exit`s from `serve`).
            unsafe {
                libc::close(host_raw.0);
                libc::close(host_raw.1);
            }
            let Some((requests, replies)) = launcher_ends.take() else {
                return 1;
            };
            setup();
            serve(host, requests, replies, &mut make)
        };
        // SAFETY: the caller guarantees that no other thread holds a lock the launcher needs.
        let process = unsafe { crate::process::fork_detached_unchecked(body) }?;
        drop(launcher_ends);
        Ok(Launcher {
            link: Arc::new(Mutex::new(Link {
                requests: host_ends.0,
                replies: host_ends.1,
                next_id: 0,
                stale: Vec::new(),
            })),
            process,
        })
    }

    /// The launcher's own pid (the parent of every child it launches).
    pub fn pid(&self) -> i32 {
        self.process.pid()
    }

    /// Launches child `index`: a [`ChildProcess`] watched by pidfd and reaped through this
    /// launcher.
    pub fn launch(&self, index: u32) -> Result<ChildProcess> {
        let mut link = self.link.lock().unwrap_or_else(PoisonError::into_inner);
        let answer = link.ask([OP_LAUNCH, index, 0]);
        link.reap_stale();
        let [re, pid, errno] = answer?;
        drop(link);
        match re {
            RE_LAUNCHED => ChildProcess::launched(
                pid as i32,
                Reaper {
                    link: Arc::clone(&self.link),
                },
            ),
            RE_FAILED => Err(Error::os(
                "fork (in the launcher)",
                rustix::io::Errno::from_raw_os_error(errno as i32),
            )),
            _ => Err(Error::os("launcher launch", rustix::io::Errno::PROTO)),
        }
    }

    /// Whether the launcher still runs.
    pub fn is_alive(&self) -> bool {
        self.process.is_alive()
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        let link = self.link.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = write_all(&link.requests, &encode([OP_EXIT, 0, 0, u32::MAX]));
        drop(link);
        if !matches!(self.process.wait_timeout(ANSWER_WITHIN), Ok(Some(_))) {
            let _ = self.process.kill();
        }
    }
}

/// The launcher's loop. Returns its exit code.
fn serve(host: Pid, requests: OwnedFd, replies: OwnedFd, make: &mut impl FnMut(u32) -> i32) -> i32 {
    let Ok(host_fd) = rustix::process::pidfd_open(host, PidfdFlags::empty()) else {
        return 1;
    };
    // Opened after the fork: if the host died before, the pidfd is of a dead process (or the
    // open failed above), and the poll below sees it at once.
    if rustix::process::getppid() != Some(host) {
        return 1;
    }
    // Orphans of the launched children come here rather than to init (see the module doc).
    // If the kernel refuses, they are reparented above the launcher as without it.
    let _ = rustix::process::set_child_subreaper(Some(rustix::process::getpid()));
    let mut children: Vec<Pid> = Vec::new();
    loop {
        let mut fds = [
            PollFd::new(&requests, PollFlags::IN),
            PollFd::new(&host_fd, PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => break,
        }
        if !fds[1].revents().is_empty() {
            break; // the host is gone
        }
        let msg = match read_message(&requests) {
            Ok(Some(m)) => m,
            _ => break, // closed: the host is gone
        };
        let id = msg[3];
        let [re, x, y] = match msg {
            [OP_LAUNCH, index, _, _] => launch(index, &requests, &replies, &host_fd, make)
                .map(|pid| {
                    children.push(pid);
                    [RE_LAUNCHED, pid.as_raw_nonzero().get() as u32, 0]
                })
                .unwrap_or_else(|e| [RE_FAILED, 0, e.raw_os_error() as u32]),
            [OP_REAP, pid, _, _] => {
                let status = reap(pid as i32, &mut children);
                kill_orphans(&children);
                status
            }
            [OP_EXIT, ..] => break,
            _ => break,
        };
        if write_all(&replies, &encode([re, x, y, id])).is_err() {
            break;
        }
    }
    for &pid in &children {
        let _ = rustix::process::kill_process(pid, Signal::KILL);
    }
    for pid in children {
        let _ = rustix::process::waitpid(Some(pid), WaitOptions::empty());
    }
    kill_orphans(&[]);
    0
}

/// How many generations of orphans [`kill_orphans`] goes through: killing one reparents its own
/// children to the launcher, to be killed in the next round.
const ORPHAN_ROUNDS: usize = 64;

/// Kills and reaps every child of the launcher that is not in `launched` (those are its own
/// children, reaped when the host asks): orphans of launched children that died, reparented
/// here because the launcher is a child subreaper. Each pid listed is still the orphan's: only
/// the launcher reaps its children, and it has not reaped these yet.
fn kill_orphans(launched: &[Pid]) {
    for _ in 0..ORPHAN_ROUNDS {
        let orphans: Vec<Pid> = crate::process::children()
            .into_iter()
            .filter(|p| !launched.contains(p))
            .collect();
        if orphans.is_empty() {
            return;
        }
        for &pid in &orphans {
            let _ = rustix::process::kill_process(pid, Signal::KILL);
        }
        for pid in orphans {
            let _ = rustix::process::waitpid(Some(pid), WaitOptions::empty());
        }
    }
}

/// Forks one child that runs `make(index)`.
fn launch(
    index: u32,
    requests: &OwnedFd,
    replies: &OwnedFd,
    host_fd: &OwnedFd,
    make: &mut impl FnMut(u32) -> i32,
) -> rustix::io::Result<Pid> {
    let fds = [requests, replies, host_fd].map(std::os::fd::AsRawFd::as_raw_fd);
    // The launcher has one thread, so the checked fork applies; the child keeps none of the
    // launcher's descriptors.
    let child = crate::process::fork(|| {
        for fd in fds {
            // SAFETY: the launcher's own descriptors, owned by values in this child's copy of
            // the launcher's memory that the child never uses or drops (it `_exit`s).
            unsafe {
                libc::close(fd);
            }
        }
        make(index)
    })
    .map_err(|e| match e {
        Error::Os { source, .. } => {
            rustix::io::Errno::from_io_error(&source).unwrap_or(rustix::io::Errno::AGAIN)
        }
        _ => rustix::io::Errno::AGAIN,
    })?;
    // The child stays unreaped until the host asks (`Reap`): forget the handle, which would
    // kill and reap it on drop.
    let pid = child.into_pid();
    Pid::from_raw(pid).ok_or(rustix::io::Errno::INVAL)
}

/// Reaps `pid` if it is one of the launcher's children and has exited.
fn reap(pid: i32, children: &mut Vec<Pid>) -> [u32; 3] {
    let Some(at) = children
        .iter()
        .position(|p| p.as_raw_nonzero().get() == pid)
    else {
        return [0, pid as u32, 0];
    };
    match rustix::process::waitpid(Some(children[at]), WaitOptions::NOHANG) {
        Ok(Some((_, st))) => {
            children.swap_remove(at);
            match (st.exit_status(), st.terminating_signal()) {
                (Some(code), _) => [RE_STATUS_EXITED, pid as u32, code as u32],
                (None, Some(sig)) => [RE_STATUS_SIGNALED, pid as u32, sig as u32],
                (None, None) => [RE_STATUS_SIGNALED, pid as u32, 0],
            }
        }
        Ok(None) => [RE_RUNNING, pid as u32, 0],
        Err(_) => {
            children.swap_remove(at);
            [RE_STATUS_SIGNALED, pid as u32, 0]
        }
    }
}
