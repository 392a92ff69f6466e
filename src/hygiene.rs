//! What a forked worker should not keep: the pool's own descriptors.
//!
//! A forked worker inherits every descriptor of the coordinator, through the launcher it is
//! forked from. Those of the user stay (fork semantics: a file opened before `build` is there
//! in `init`), but the pool's own are closed: the ring and statistics memfds (the worker
//! already has them mapped, and the mapping is what it uses) and the pidfds watching its
//! sibling workers. The launcher closes them once, as it starts, so that the workers never
//! inherit them (the launcher, forked before any worker, holds no pidfd of one). A spawned
//! worker inherits only its memfds (rings, statistics, the shared region: everything else is
//! close-on-exec), and closes those once it has reopened them.
//!
//! (A task that carries a `shmexec_shm::Segment` of its own into a forked worker keeps the
//! mapping, which is what it reads, but not the descriptor.)

/// Closes, in a freshly forked process (the launcher), the shmexec memfds and the pidfds of
/// `siblings`.
pub(crate) fn close_pool_descriptors(siblings: &[i32]) {
    let ours = |_fd: i32, target: &str, pidfd_of: Option<i32>| {
        target.starts_with("/memfd:shmexec") || pidfd_of.is_some_and(|pid| siblings.contains(&pid))
    };
    // SAFETY: each descriptor picked belongs to an `OwnedFd` (a `Segment`'s memfd, or the pidfd
    // of a sibling's `ChildProcess` or `Peer`) that lives in this child's copy of the
    // coordinator's memory. Neither this child (the launcher: it only forks) nor the workers
    // it forks, which inherit the same values, ever use or drop them: a worker runs the worker
    // loop, which uses only the mappings and descriptors it opens itself, and each `_exit`s
    // without running destructors. So nothing else closes or reads them.
    unsafe { shmexec_shm::process::close_descriptors(ours) }
}

/// Closes, in a freshly spawned worker, the descriptors it inherited across `exec` (numbered in
/// its environment), once it has reopened them: left open, they would pass into every program
/// its task runs, keeping the pool's memory alive as long as those run.
pub(crate) fn close_inherited(fds: &[i32]) {
    let inherited = |fd: i32, target: &str, _: Option<i32>| {
        fds.contains(&fd) && target.starts_with("/memfd:shmexec")
    };
    // SAFETY: the descriptors picked came through `exec` and no value in this process owns them:
    // the worker reopened each through `/proc/self/fd` (a descriptor of its own, in a
    // `Segment`) instead of taking it, and nothing else in the program knows their numbers.
    unsafe { shmexec_shm::process::close_descriptors(inherited) }
}
