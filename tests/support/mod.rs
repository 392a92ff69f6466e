//! Helpers for tests that build pools (and so fork).
//!
//! libtest runs tests on several threads, and `Builder::build` forks. A child forked while
//! another thread holds a lock inherits it locked, so every test that builds a pool first takes
//! [`serial`]: while one test forks, the others are blocked on that mutex and the harness's main
//! thread waits on its channel, holding nothing a worker needs. Under nextest (one test per
//! process) the lock is uncontended.

#![allow(dead_code)]

use std::sync::{Mutex, MutexGuard, mpsc};
use std::time::Duration;

use shmexec::Builder;

pub mod cgroup;
pub mod fuzz;

static FORK_LOCK: Mutex<()> = Mutex::new(());

/// Serialises pool-building tests within this binary. Hold the guard for the whole test.
pub fn serial() -> MutexGuard<'static, ()> {
    FORK_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A builder that may fork in the test harness (which runs other threads). Small rings, so
/// that tests also cover full rings.
pub fn builder(_serial: &MutexGuard<'static, ()>) -> Builder {
    // SAFETY: the caller holds FORK_LOCK: every other test thread of this binary is blocked on
    // it, and libtest's main thread waits on its result channel, so no thread holds a lock the
    // workers take while `build` forks.
    unsafe { shmexec::Pool::builder().allow_threads() }.ring_bytes(1 << 20)
}

/// Asserts that this process has no child left, reaped or not. Call with [`serial`] held, at
/// the end of the test, after the pool is dropped.
pub fn assert_no_children() {
    let r = rustix::process::waitpid(None, rustix::process::WaitOptions::NOHANG);
    assert!(
        matches!(r, Err(rustix::io::Errno::CHILD)),
        "a child process outlived its test: waitpid says {r:?}"
    );
}

/// A pool whose 64 KiB output rings hold only a few of its 10 KB outputs (`n` as bytes), so
/// that a caller who keeps results fills them.
pub fn small_output_rings(
    guard: &MutexGuard<'static, ()>,
) -> shmexec::Pool<impl shmexec::Task<Input = u64, Output = Vec<u8>>> {
    let task = shmexec::from_fn::<u64, _, _>(|&n| vec![n.to_native() as u8; 10_000]);
    builder(guard)
        .workers(2)
        .ring_bytes(1 << 16)
        .build(task)
        .expect("pool")
}

/// Sends SIGKILL to `pid`.
pub fn kill(pid: i32) {
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).expect("a pid"),
        rustix::process::Signal::KILL,
    )
    .expect("kill");
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

/// Open descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

#[allow(unused_imports)] // not every test binary uses it
pub use fuzz::Rng;

/// Aborts the test binary if the returned sender is not dropped within `secs`: a regression
/// there is a hang, and a hung test should say so (and which) instead of holding CI.
pub fn watchdog(secs: u64, what: &'static str) -> mpsc::Sender<()> {
    let (tx, rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(Duration::from_secs(secs)) {
            eprintln!("{what}: still running after {secs} s, so it hangs");
            std::process::abort();
        }
    });
    tx
}

/// A per-test directory (emptied) for the files a test shares with its workers.
pub fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("shmexec-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Mappings of shmexec's memfds in this process (a leak check).
pub fn shm_mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.contains("memfd:shmexec"))
        .count()
}
