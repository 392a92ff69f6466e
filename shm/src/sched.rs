//! Where and how urgently this process runs: the cores it may use, pinning to one, lowering its
//! priority.

use crate::error::{Error, Result};

/// The cores this process may run on (`sched_getaffinity`), in increasing order.
pub fn allowed_cores() -> Result<Vec<usize>> {
    let set =
        rustix::thread::sched_getaffinity(None).map_err(|e| Error::os("sched_getaffinity", e))?;
    Ok((0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|&c| set.is_set(c))
        .collect())
}

/// Pins the calling thread (the whole process, if it has one thread) to `core`.
pub fn pin_to(core: usize) -> Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(core);
    rustix::thread::sched_setaffinity(None, &set).map_err(|e| Error::os("sched_setaffinity", e))
}

/// Sets this process's nice value to `nice` (allowed without privileges when it lowers the
/// priority, which is what callers use it for).
pub fn set_nice(nice: i32) -> Result<()> {
    // SAFETY: setpriority takes plain integers and touches no memory of ours.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if r != 0 {
        return Err(Error::os("setpriority", std::io::Error::last_os_error()));
    }
    Ok(())
}
