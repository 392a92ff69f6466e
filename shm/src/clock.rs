//! The machine's monotonic clock in nanoseconds: one time line for every process of a pool
//! (`CLOCK_MONOTONIC` is system-wide, unlike `std::time::Instant`, which cannot be sent to
//! another process), so a worker's timestamps and the coordinator's can be subtracted.

/// Nanoseconds of `CLOCK_MONOTONIC` (since an unspecified point, the same in every process).
pub fn now_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(t.tv_nsec as u64)
}
