//! Waiting between engine steps: spin briefly, then park on the pool's doorbell, until a
//! condition holds or a deadline passes.
//!
//! Every worker rings the doorbell after it lets go of an input, which is after it published
//! that input's result; a stream's sender rings it after placing an input. So "a result came",
//! "a worker has room" and "an input was placed" all wake a waiter, and one wait covers any mix
//! of them. Deadlines are short slices: between them the front end supervises the workers,
//! which is what notices a death that no ring would report.

use std::time::Duration;

use shmexec_shm::{Peer, Signal, Waiter};

use crate::error::Result;

/// How long a blocking iterator waits before it supervises the workers and looks for a caller
/// who holds too many results. A condition that comes true ends the wait at once.
pub(crate) const MAP_SLICE: Duration = Duration::from_millis(1);

/// The same for a stream's halves, which may wait for weeks on an idle source: long enough
/// that an idle stream costs little, short enough that a death is noticed in a few ms.
pub(crate) const STREAM_SLICE: Duration = Duration::from_millis(5);

/// Waits on `bell` until `ready` returns true (`Ok(true)`) or `slice` has passed (`Ok(false)`);
/// a condition that holds at once costs no clock read.
/// `ready` must not block; it may load shared state with `Acquire` (the doorbell's protocol,
/// `shmexec_shm::signal`, orders it after the ringer's stores).
///
/// SYNC POINT with every ringer of the doorbell (the worker loop after each release, a
/// stream's sender after each placement): `Signal::wait_until` re-checks `ready` after it
/// announced itself as a sleeper, so a condition made true before a ring is never slept through
/// (`shm/src/WAKEUP.md`, and `src/wire/PROTOCOL.md` for who rings after which store).
pub(crate) fn until(
    bell: &Signal,
    waiter: &mut Waiter,
    slice: Duration,
    ready: impl FnMut() -> shmexec_shm::Result<bool>,
) -> Result<bool> {
    // The slice bounds the wait; liveness is the supervisor's business between slices, so the
    // doorbell watches no peer of its own.
    match bell.wait_for(waiter, &Peer::unwatched(), slice, ready) {
        Ok(()) => Ok(true),
        Err(shmexec_shm::Error::Timeout { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
