//! What a forked worker should not keep: the pool's own descriptors.
//!
//! A forked worker inherits every descriptor of the coordinator. Those of the user stay (fork
//! semantics: a file opened before `build` is there in `init`), but the pool's own are closed:
//! the ring and statistics memfds (the worker already has them mapped, and the mapping is what
//! it uses) and the pidfds watching its sibling workers. A spawned worker needs none of this:
//! everything but its memfds (rings, statistics, the shared region) is close-on-exec.
//!
//! (A task that carries a `shmexec_shm::Segment` of its own into a forked worker keeps the
//! mapping, which is what it reads, but not the descriptor.)

/// Closes, in a freshly forked worker, the shmexec memfds and the pidfds of `siblings`.
pub(crate) fn close_pool_descriptors(siblings: &[i32]) {
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
        let ours = if link.starts_with("/memfd:shmexec") {
            true
        } else if link == "anon_inode:[pidfd]" {
            pidfd_target(fd).is_some_and(|pid| siblings.contains(&pid))
        } else {
            false
        };
        if ours {
            // SAFETY: the descriptor belongs to an `OwnedFd` (a `Segment`'s memfd, or the pidfd
            // of a sibling's `ChildProcess` or `Peer`) that lives in this child's copy of the
            // coordinator's memory. The child never uses or drops those values: it runs the
            // worker loop, which uses only the mappings and descriptors it opens itself, and
            // then `_exit`s without running destructors. So nothing else closes or reads it.
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
