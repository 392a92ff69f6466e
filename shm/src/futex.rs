//! The two futex calls the transport needs, in their **shared** form.
//!
//! The word lives in a `MAP_SHARED` mapping that several processes see, so the kernel must key
//! the wait queue by the physical page, not by this process's address space: that rules out
//! `FUTEX_PRIVATE_FLAG`, which would make a waiter in one process deaf to a wake from another.
//!
//! These are the raw calls. Code that waits for a condition goes through
//! [`Signal`](crate::Signal), which adds the announce-before-sleep protocol that keeps wakes off
//! the hot path and makes lost wake-ups impossible.

use std::sync::atomic::AtomicU32;
use std::time::Duration;

use rustix::thread::futex;

/// Why [`wait`] returned. Every outcome is a reason to re-check the condition, nothing more:
/// futex waits can also end spuriously.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitResult {
    /// Woken by a [`wake_all`], or spuriously.
    Woken,
    /// The word did not hold `expected` when the kernel looked, so the caller did not sleep.
    Changed,
    /// The timeout passed.
    TimedOut,
}

/// Sleeps while `word == expected`, for at most `timeout` (`None`: no limit).
///
/// The comparison and the enqueue are atomic in the kernel: a [`wake_all`] that follows a store
/// which changed the word cannot be missed.
pub fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> WaitResult {
    let ts = timeout.map(|d| rustix::time::Timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: d.subsec_nanos() as _,
    });
    match futex::wait(word, futex::Flags::empty(), expected, ts.as_ref()) {
        Ok(()) => WaitResult::Woken,
        Err(rustix::io::Errno::AGAIN) => WaitResult::Changed,
        Err(rustix::io::Errno::TIMEDOUT) => WaitResult::TimedOut,
        // EINTR (a signal arrived) and anything unexpected: let the caller re-check.
        Err(_) => WaitResult::Woken,
    }
}

/// Wakes every process sleeping on `word`. Returns how many were woken.
pub fn wake_all(word: &AtomicU32) -> usize {
    futex::wake(word, futex::Flags::empty(), i32::MAX as u32).unwrap_or(0)
}
