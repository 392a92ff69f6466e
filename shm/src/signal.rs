#![doc = include_str!("WAKEUP.md")]

use std::hint::spin_loop;
use std::sync::atomic::{AtomicU32, Ordering, fence};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::futex;
use crate::peer::Peer;
use crate::wait::{MAX_PARK_SLICE, PARK_SLICE, SPIN_PEER_CHECK, Waiter, YIELD_AFTER};

/// A wake-up channel in shared memory for one condition. See the module documentation for the
/// protocol and why no wake-up is lost.
///
/// `Signal` is plain atomics with no pointers, so it may live in a shared mapping: any bytes are
/// a valid `Signal` (all zero: idle; a stray non-zero sleeper count costs spurious wake-ups only).
#[repr(C)]
#[derive(Debug, Default)]
pub struct Signal {
    epoch: AtomicU32,
    sleepers: AtomicU32,
}

impl Signal {
    /// An idle signal (no sleepers).
    pub const fn new() -> Signal {
        Signal {
            epoch: AtomicU32::new(0),
            sleepers: AtomicU32::new(0),
        }
    }

    /// Wakes the waiter if it announced that it may sleep. Call it **after** the store that made
    /// the condition true. Costs a fence and a load when nobody sleeps.
    #[inline]
    pub fn notify(&self) {
        // SYNC POINT with the waiter's fence after `sleepers += 1` (see "Why no wake-up is
        // lost"): orders our condition store before our load of `sleepers`.
        fence(Ordering::SeqCst);
        if self.sleepers.load(Ordering::Relaxed) != 0 {
            self.wake();
        }
    }

    #[cold]
    fn wake(&self) {
        // SYNC POINT with the waiter's `epoch` load: a waiter that reads the new epoch also
        // sees the condition store that came before this increment.
        self.epoch.fetch_add(1, Ordering::Release);
        futex::wake_all(&self.epoch);
    }

    /// Waits until `ready` returns `Ok(true)`, `deadline` passes ([`Error::Timeout`]) or `peer`
    /// is gone ([`Error::PeerGone`]). An `Err` from `ready` ends the wait with that error.
    ///
    /// `ready` must load the condition with `Acquire` (or stronger) and must not block.
    pub fn wait_until(
        &self,
        waiter: &mut Waiter,
        peer: &Peer,
        deadline: Option<Instant>,
        ready: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        self.wait(waiter, peer, |_| deadline, ready)
    }

    /// [`Signal::wait_until`] with a deadline `timeout` after the wait began. The clock is read
    /// only once the first spins have failed, so a condition that already holds, or comes true
    /// within them, costs no clock read (on a VM one costs as much as a cache-line hand-over).
    pub fn wait_for(
        &self,
        waiter: &mut Waiter,
        peer: &Peer,
        timeout: Duration,
        ready: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        self.wait(waiter, peer, |start| start.checked_add(timeout), ready)
    }

    /// The wait itself; `deadline` turns the time the first spins ended into the deadline.
    fn wait(
        &self,
        waiter: &mut Waiter,
        peer: &Peer,
        deadline: impl FnOnce(Instant) -> Option<Instant>,
        mut ready: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        if ready()? {
            return Ok(());
        }
        // Most waits on a busy stream end within a few spins: read no clock until the first
        // batch of spins has failed (on a VM a clock read costs as much as a cache-line hand-over).
        const FIRST_SPINS: u32 = 128;
        let budget = waiter.spin_budget();
        if budget != Some(Duration::ZERO) {
            for _ in 0..FIRST_SPINS {
                spin_loop();
                if ready()? {
                    return Ok(());
                }
            }
        }
        let start = Instant::now();
        let deadline = deadline(start);
        let gone = |ready: &mut dyn FnMut() -> Result<bool>| -> Result<()> {
            // The peer may have published and then died: deliver what it left first.
            if ready()? {
                Ok(())
            } else {
                Err(peer.gone_error())
            }
        };

        if budget != Some(Duration::ZERO) {
            let mut next_peer_check = start + SPIN_PEER_CHECK;
            let mut spins: u32 = 0;
            loop {
                spin_loop();
                if ready()? {
                    return Ok(());
                }
                spins = spins.wrapping_add(1);
                if spins % 64 != 0 {
                    continue;
                }
                let now = Instant::now();
                let spun = now - start;
                if deadline.is_some_and(|d| now >= d) {
                    return Err(Error::Timeout { waited: spun });
                }
                if now >= next_peer_check {
                    if !peer.is_alive() {
                        return gone(&mut ready);
                    }
                    next_peer_check = now + SPIN_PEER_CHECK;
                }
                if budget.is_some_and(|b| spun >= b) {
                    break;
                }
                if spun >= YIELD_AFTER && spins % 256 == 0 {
                    rustix::thread::sched_yield();
                }
            }
        }

        let park_start = Instant::now();
        let mut park = PARK_SLICE;
        loop {
            // Announce (state 3 of the protocol).
            self.sleepers.fetch_add(1, Ordering::SeqCst);
            // SYNC POINT with `notify`'s fence: either it sees our increment, or we see its
            // condition store in the `ready()` below.
            fence(Ordering::SeqCst);
            let epoch = self.epoch.load(Ordering::Acquire);
            let now_ready = ready();
            if !matches!(now_ready, Ok(false)) {
                self.sleepers.fetch_sub(1, Ordering::Relaxed);
                now_ready?;
                waiter.parked_for(park_start.elapsed());
                return Ok(());
            }
            let now = Instant::now();
            let slice = match deadline {
                Some(d) => park.min(d.saturating_duration_since(now)),
                None => park,
            };
            if !slice.is_zero() {
                futex::wait(&self.epoch, epoch, Some(slice));
            }
            park = (park * 2).min(MAX_PARK_SLICE);
            self.sleepers.fetch_sub(1, Ordering::Relaxed);

            if ready()? {
                waiter.parked_for(park_start.elapsed());
                return Ok(());
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(Error::Timeout {
                    waited: now - start,
                });
            }
            if !peer.is_alive() {
                return gone(&mut ready);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wait::WaitStrategy;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn wakes_a_parked_thread() {
        for strategy in [
            WaitStrategy::Park,
            WaitStrategy::Adaptive,
            WaitStrategy::Spin,
        ] {
            let sig = Arc::new(Signal::new());
            let flag = Arc::new(AtomicBool::new(false));
            let (s2, f2) = (sig.clone(), flag.clone());
            let t = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                f2.store(true, Ordering::Release);
                s2.notify();
            });
            let mut w = Waiter::new(strategy);
            let deadline = Instant::now() + Duration::from_secs(20);
            sig.wait_until(&mut w, &Peer::unwatched(), Some(deadline), || {
                Ok(flag.load(Ordering::Acquire))
            })
            .unwrap();
            t.join().unwrap();
        }
    }

    #[test]
    fn deadline_ends_the_wait() {
        let sig = Signal::new();
        let mut w = Waiter::new(WaitStrategy::Adaptive);
        let deadline = Instant::now() + Duration::from_millis(30);
        let err = sig
            .wait_until(&mut w, &Peer::unwatched(), Some(deadline), || Ok(false))
            .unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        assert!(Instant::now() >= deadline);
    }

    #[test]
    fn dead_peer_ends_the_wait_but_ready_wins() {
        let sig = Signal::new();
        let mut w = Waiter::new(WaitStrategy::Park);
        let err = sig
            .wait_until(&mut w, &Peer::check(|| false), None, || Ok(false))
            .unwrap_err();
        assert!(matches!(err, Error::PeerGone { .. }), "{err}");
        // A condition that turns true by the final check is delivered, not reported as death.
        let mut calls = 0;
        sig.wait_until(&mut w, &Peer::check(|| false), None, || {
            calls += 1;
            Ok(calls > 3)
        })
        .unwrap();
    }
}
