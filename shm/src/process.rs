//! Forked child processes that cannot outlive their parent or their handle.
//!
//! A [`ChildProcess`] is watched through a pidfd, killed with SIGKILL and reaped when its handle
//! drops, and dies by itself (`PR_SET_PDEATHSIG`) if the parent dies first. Tests, examples and
//! benchmarks use it so that no child ever outlives them.
//!
//! `fork` copies only the calling thread. A lock that another thread held at that moment stays
//! locked forever in the child, so [`fork`] refuses to run in a multi-threaded process, and
//! [`fork_unchecked`] (unsafe) is for callers that know their other threads hold nothing the
//! child needs.
//!
//! A child that leads a process group of its own (started by a [`crate::spawner::Spawner`]
//! with `own_group`) takes its group with it: its handle kills the group when it kills, reaps
//! or drops the child, while the child is unreaped, so the group's id (the child's pid) cannot
//! name anyone else's group yet.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::process::{Pid, PidfdFlags, Signal, WaitOptions};

use crate::error::{Error, Result};
use crate::peer::Peer;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Exited(i32),
    /// A signal (this number) killed it.
    Signaled(i32),
}

impl ExitStatus {
    /// Exited with code 0.
    pub fn success(self) -> bool {
        self == ExitStatus::Exited(0)
    }
}

/// A forked child. Dropping the handle kills (SIGKILL) and reaps the child if it still runs.
#[derive(Debug)]
pub struct ChildProcess {
    pid: i32,
    pidfd: OwnedFd,
    status: Option<ExitStatus>,
    reaper: Reaping,
    /// It leads a process group of its own (its pid is the group's id), killed with it. The id
    /// cannot name another group while the child is unreaped: a zombie keeps its pid.
    group: bool,
}

/// Who reaps the child: this process (its parent), its launcher, or nobody (the handle let go).
enum Reaping {
    Parent,
    Launcher(crate::launcher::Reaper),
    Nobody,
}

impl std::fmt::Debug for Reaping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reaping::Parent => "Parent",
            Reaping::Launcher(_) => "Launcher",
            Reaping::Nobody => "Nobody",
        })
    }
}

/// Forks a child that runs `child` and exits with its return value (101 if it panics), without
/// running the parent's destructors or `atexit` handlers.
///
/// Fails with [`Error::MultiThreaded`] if this process has more than one thread.
///
/// ```no_run
/// let mut child = shmexec_shm::fork(|| 7)?;
/// assert_eq!(child.wait()?, shmexec_shm::ExitStatus::Exited(7));
/// # Ok::<(), shmexec_shm::Error>(())
/// ```
pub fn fork(child: impl FnOnce() -> i32) -> Result<ChildProcess> {
    let threads = thread_count();
    if threads > 1 {
        return Err(Error::MultiThreaded { threads });
    }
    // SAFETY: this process has one thread, so no other thread can hold a lock at the fork.
    unsafe { fork_unchecked(child) }
}

/// [`fork`] without the single-thread check.
///
/// # Safety
/// Every other thread of this process must, at the moment of the call, hold no lock (of the
/// allocator excepted, which glibc re-initialises in the child) that `child` could take: for
/// example all other threads are blocked waiting on a lock or channel that the calling thread
/// owns, or are parked by a test harness.
pub unsafe fn fork_unchecked(child: impl FnOnce() -> i32) -> Result<ChildProcess> {
    // SAFETY: passed on from the caller.
    unsafe { fork_with(child, true) }
}

/// [`fork_unchecked`] for a child that does not die with the forking *thread*
/// (`PR_SET_PDEATHSIG` follows the thread, not the process): it must watch its parent itself.
///
/// # Safety
/// As for [`fork_unchecked`].
pub(crate) unsafe fn fork_detached_unchecked(child: impl FnOnce() -> i32) -> Result<ChildProcess> {
    // SAFETY: passed on from the caller.
    unsafe { fork_with(child, false) }
}

/// # Safety
/// As for [`fork_unchecked`].
unsafe fn fork_with(child: impl FnOnce() -> i32, die_with_parent: bool) -> Result<ChildProcess> {
    let parent = rustix::process::getpid();
    // SAFETY: the caller guarantees no other thread holds a lock the child needs; the child
    // only runs `child` and then `_exit`s, never returning into the caller's stack frames.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Error::os("fork", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        let code = run_child(parent, die_with_parent, child);
        // SAFETY: `_exit` ends the process at once; skipping destructors and atexit handlers is
        // the point (they belong to the parent's state).
        unsafe { libc::_exit(code) }
    }
    let raw = Pid::from_raw(pid).ok_or_else(|| Error::os("fork", rustix::io::Errno::INVAL))?;
    // The child cannot have been reaped yet (only we can reap it), so the pid is still its own.
    let pidfd = match rustix::process::pidfd_open(raw, PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(e) => {
            let _ = rustix::process::kill_process(raw, Signal::KILL);
            let _ = rustix::process::waitpid(Some(raw), WaitOptions::empty());
            return Err(Error::os("pidfd_open", e));
        }
    };
    Ok(ChildProcess {
        pid,
        pidfd,
        status: None,
        reaper: Reaping::Parent,
        group: false,
    })
}

fn run_child(parent: Pid, die_with_parent: bool, child: impl FnOnce() -> i32) -> i32 {
    // Die with the parent; and if it already died before the request took effect, go now.
    if die_with_parent {
        let _ = rustix::process::set_parent_process_death_signal(Some(Signal::KILL));
    }
    if rustix::process::getppid() != Some(parent) {
        return 102;
    }
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).unwrap_or(101)
}

/// Whether `fd` becomes readable within `timeout` (a pidfd: the process exited; a pipe: data
/// or end of file). Interrupted polls resume with the time left. A timeout past the clock's
/// range waits without a deadline.
pub(crate) fn readable_within(fd: BorrowedFd<'_>, timeout: Duration) -> bool {
    let deadline = Instant::now().checked_add(timeout);
    loop {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let ts = left.map(|left| rustix::time::Timespec {
            tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: left.subsec_nanos() as _,
        });
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        match rustix::event::poll(&mut fds, ts.as_ref()) {
            Ok(n) => return n > 0,
            Err(rustix::io::Errno::INTR) if left.is_none_or(|l| !l.is_zero()) => continue,
            Err(_) => return false,
        }
    }
}

/// The parent's pid (0 if there is none any more).
pub fn parent_pid() -> i32 {
    rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get())
}

/// Closes the descriptors above 2 that `which(fd, target, pidfd_pid)` picks: `target` is what
/// `/proc/self/fd/<fd>` links to, `pidfd_pid` the pid a pidfd refers to.
///
/// # Safety
/// Every descriptor `which` picks must belong to a value this process never uses or drops
/// afterwards (in a freshly forked child: values of the parent's memory that the child ignores
/// until it exits without running destructors); otherwise that value would use or close a
/// descriptor number that may by then be another file.
pub unsafe fn close_descriptors(which: impl Fn(i32, &str, Option<i32>) -> bool) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    // Collect first: the directory's own descriptor is open while it is read.
    let fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        let Ok(link) = std::fs::read_link(format!("/proc/self/fd/{fd}")) else {
            continue;
        };
        let link = link.to_string_lossy();
        let pid = (link == "anon_inode:[pidfd]")
            .then(|| pidfd_target(fd))
            .flatten();
        if which(fd, &link, pid) {
            // SAFETY: the caller guarantees that nothing uses or closes this descriptor again.
            unsafe {
                libc::close(fd);
            }
        }
    }
}

/// The pid a pidfd refers to, from `/proc/self/fdinfo`.
fn pidfd_target(fd: i32) -> Option<i32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|p| p.trim().parse().ok())
}

/// Starts `cmd` (a program to `exec`) as a child that keeps the descriptors `keep` open across
/// the `exec` and dies with the calling thread (`PR_SET_PDEATHSIG`), and takes charge of it.
/// The borrows prove the descriptors open until `exec`: `Command::spawn` returns only once the
/// child has exec'd (or failed to). (A [`crate::spawner::Spawner`] makes the death signal
/// follow a thread that lives as long as its owner.)
pub fn spawn_keeping(cmd: std::process::Command, keep: &[BorrowedFd<'_>]) -> Result<ChildProcess> {
    spawn_keeping_with(cmd, keep, false)
}

/// [`spawn_keeping`]; with `own_group`, the child also leads a process group of its own, which
/// its handle kills with it: everything the child starts (that stays in its group) is then
/// killed when the child is killed, reaped or dropped.
pub(crate) fn spawn_keeping_with(
    mut cmd: std::process::Command,
    keep: &[BorrowedFd<'_>],
    own_group: bool,
) -> Result<ChildProcess> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fds: Vec<i32> = keep.iter().map(|fd| fd.as_raw_fd()).collect();
    // SAFETY: the hook runs in the child between fork and exec, where only async-signal-safe
    // work is allowed: it makes raw system calls only (fcntl to let the descriptors through
    // exec, setpgid for the group, prctl for the death signal) and allocates nothing (`fds` was
    // made before). The descriptors are open: `keep` borrows them for this whole call, which
    // returns after the exec.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                let fd = BorrowedFd::borrow_raw(fd);
                rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
            }
            if own_group {
                rustix::process::setpgid(None, None)?;
            }
            rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| Error::os("spawn", e))?;
    let mut child = ChildProcess::adopt(child.id() as i32)?;
    child.group = own_group;
    Ok(child)
}

/// The children of this process (running or exited, not yet reaped), from
/// `/proc/self/task/<tid>/children`, or from every process's parent in `/proc/<pid>/stat` where
/// the kernel has no such file.
pub(crate) fn children() -> Vec<Pid> {
    let mut found = Vec::new();
    let mut listed = false;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
            listed = true;
            found.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    if !listed {
        let me = rustix::process::getpid().as_raw_nonzero().get();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // The command name may hold spaces: the fields after it follow the last ')'.
            let ppid = stat
                .rfind(')')
                .and_then(|at| stat[at + 2..].split(' ').nth(1)?.parse::<i32>().ok());
            if ppid == Some(me) {
                found.push(pid);
            }
        }
    }
    found.sort_unstable();
    found.dedup();
    found.into_iter().filter_map(Pid::from_raw).collect()
}

/// Threads in this process, from `/proc/self/task` (1 if it cannot be read).
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(1)
        .max(1)
}

impl ChildProcess {
    /// Takes charge of a child this process started some other way (for example with
    /// `std::process::Command`, to `exec` a fresh program): watches it through a pidfd, and
    /// kills and reaps it on drop like a forked one. `pid` must be a child of this process that
    /// has not been reaped (so that the pid cannot have been reused).
    pub fn adopt(pid: i32) -> Result<ChildProcess> {
        let raw = Pid::from_raw(pid).ok_or_else(|| Error::InvalidArgument {
            what: format!("pid {pid} is not a valid process id"),
        })?;
        let pidfd = rustix::process::pidfd_open(raw, PidfdFlags::empty())
            .map_err(|e| Error::os("pidfd_open", e))?;
        Ok(ChildProcess {
            pid,
            pidfd,
            status: None,
            reaper: Reaping::Parent,
            group: false,
        })
    }

    /// A child of a launcher: watched here by pidfd, reaped by the launcher (which keeps it
    /// unreaped until asked, so the pid is still its own here).
    pub(crate) fn launched(pid: i32, reaper: crate::launcher::Reaper) -> Result<ChildProcess> {
        let mut child = ChildProcess::adopt(pid)?;
        child.reaper = Reaping::Launcher(reaper);
        Ok(child)
    }

    /// Lets go of the child without killing or reaping it (its parent will); returns its pid.
    pub(crate) fn into_pid(mut self) -> i32 {
        self.reaper = Reaping::Nobody;
        self.pid
    }

    /// The child's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// A [`Peer`] watching this child, for the ring handles of the parent.
    pub fn peer(&self) -> Result<Peer> {
        Peer::process(self.pid)
    }

    /// Whether the child exits within `timeout` (without reaping it).
    pub fn exits_within(&self, timeout: Duration) -> bool {
        self.status.is_some() || self.exited_within(timeout)
    }

    /// Whether the child is still running (a zombie counts as dead).
    pub fn is_alive(&self) -> bool {
        self.status.is_none() && !self.exited_within(Duration::ZERO)
    }

    /// Sends SIGKILL (a no-op if the child was already reaped); to its whole group if it leads
    /// one.
    pub fn kill(&self) -> Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        self.kill_group();
        rustix::process::pidfd_send_signal(&self.pidfd, Signal::KILL)
            .or_else(|e| {
                if e == rustix::io::Errno::SRCH {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|e| Error::os("pidfd_send_signal", e))
    }

    /// Waits for the child to exit and reaps it.
    pub fn wait(&mut self) -> Result<ExitStatus> {
        loop {
            if let Some(status) = self.wait_timeout(Duration::from_secs(3600))? {
                return Ok(status);
            }
        }
    }

    /// Waits at most `timeout` for the child to exit; reaps it if it did.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        if !self.exited_within(timeout) {
            return Ok(None);
        }
        self.reap().map(Some)
    }

    /// Kills the rest of the child's group, if it leads one: called while the child is unreaped
    /// (its zombie keeps the group's id from being reused), so it reaches only that group.
    fn kill_group(&self) {
        if let (true, None, Some(pid)) = (self.group, self.status, Pid::from_raw(self.pid)) {
            // ESRCH: the group is empty, nothing to kill.
            let _ = rustix::process::kill_process_group(pid, Signal::KILL);
        }
    }

    fn exited_within(&self, timeout: Duration) -> bool {
        readable_within(self.pidfd.as_fd(), timeout)
    }

    fn reap(&mut self) -> Result<ExitStatus> {
        if let Reaping::Launcher(reaper) = &self.reaper {
            // The pidfd said it exited, so the launcher finds a zombie to reap; give it a few
            // tries in case the exit is still being accounted.
            for _ in 0..100 {
                if let Some(status) = reaper.reap(self.pid)? {
                    self.status = Some(status);
                    return Ok(status);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            return Err(Error::os("reap (launcher)", rustix::io::Errno::CHILD));
        }
        let pid = Pid::from_raw(self.pid)
            .ok_or_else(|| Error::os("waitpid", rustix::io::Errno::INVAL))?;
        // What the child started in its group dies with it, before the zombie (and with it the
        // group's id) goes.
        self.kill_group();
        let status = loop {
            match rustix::process::waitpid(Some(pid), WaitOptions::empty()) {
                Ok(Some((_, st))) => break st,
                Ok(None) => continue,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(Error::os("waitpid", e)),
            }
        };
        let status = match (status.exit_status(), status.terminating_signal()) {
            (Some(code), _) => ExitStatus::Exited(code),
            (None, Some(sig)) => ExitStatus::Signaled(sig),
            (None, None) => ExitStatus::Signaled(0),
        };
        self.status = Some(status);
        Ok(status)
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        match self.reaper {
            Reaping::Parent => {
                let _ = self.kill();
                let _ = self.reap();
            }
            // Its launcher reaps it, at the latest when the launcher exits: asking now would
            // wait on a launcher that may be stopped.
            Reaping::Launcher(_) => {
                let _ = self.kill();
            }
            Reaping::Nobody => {}
        }
    }
}
