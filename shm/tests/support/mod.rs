//! Helpers for tests that fork.
//!
//! libtest runs tests on several threads. A child forked while another thread holds a lock
//! would inherit it locked, so every forking test in a binary first takes [`serial`]: while one
//! test forks, the others are blocked on that mutex and the harness's main thread waits on its
//! channel, holding nothing a child needs. Under nextest (one test per process) the lock is
//! simply uncontended.

#![allow(dead_code)]

pub mod stream;

use std::sync::{Mutex, MutexGuard};

use shmexec_shm::{ChildProcess, Error};

static FORK_LOCK: Mutex<()> = Mutex::new(());

/// Serialises forking tests within this binary. Hold the guard for the whole test.
pub fn serial() -> MutexGuard<'static, ()> {
    FORK_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Forks `f` in a child. The caller must hold [`serial`].
pub fn spawn(
    _serial: &MutexGuard<'static, ()>,
    f: impl FnOnce() -> i32,
) -> Result<ChildProcess, Error> {
    // SAFETY: the caller holds FORK_LOCK, so every other test thread of this binary is blocked
    // on it (or runs no forking test and does not touch the rings), and libtest's main thread is
    // waiting on its result channel: no thread holds a lock the child takes. The child only
    // touches shared memory, its own stack and the allocator (re-initialised by glibc at fork).
    unsafe { shmexec_shm::fork_unchecked(f) }
}

/// Asserts that this process has no child left, reaped or not: every test must clean up after
/// itself. Call with [`serial`] held, at the end of the test.
pub fn assert_no_children() {
    let r = rustix::process::waitpid(None, rustix::process::WaitOptions::NOHANG);
    assert!(
        matches!(r, Err(rustix::io::Errno::CHILD)),
        "a child process outlived its test: waitpid says {r:?}"
    );
}

/// The names in /dev/shm now.
pub fn dev_shm_listing() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}
