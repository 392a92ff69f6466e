//! How a waiter spends the time before its condition holds: spin, then park.
//!
//! Waking a parked process costs tens of microseconds on a VM and a futex round trip about
//! twice that, against a few hundred nanoseconds for two spinning processes (figures in
//! `docs/benchmarks.md`). So the default, [`WaitStrategy::Adaptive`], spins for a short window
//! first, and parks only after a
//! quiet spell; its window grows when parking proves premature (the event came soon after the
//! waiter gave up spinning) and shrinks when the waiter slept for long (the stream is idle, and
//! spinning would only burn a core). An idle waiter therefore costs one futex wake-up per
//! [`MAX_PARK_SLICE`] to check its peer, about nothing.

use std::time::Duration;

/// How a blocking call waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WaitStrategy {
    /// Spin (with a periodic liveness check) until the condition holds or the deadline passes.
    /// Lowest latency; costs a whole core while waiting.
    Spin,
    /// Go to sleep on the futex at once. Costs a wake-up (tens of microseconds on a VM) per
    /// wait, and no CPU while waiting.
    Park,
    /// Spin for an adaptive window, then park. The default.
    #[default]
    Adaptive,
}

/// How long a parked waiter first sleeps before it re-checks its peer's liveness and its
/// deadline. Each further sleep of the same wait is twice as long, up to [`MAX_PARK_SLICE`]: a
/// peer's death is noticed within 10 ms early in a wait and within 100 ms in a long one, and
/// an idle waiter wakes ten times a second, not a hundred (which, over hundreds of idle
/// workers, was most of a machine's time).
pub const PARK_SLICE: Duration = Duration::from_millis(10);

/// The longest sleep of a parked waiter; see [`PARK_SLICE`].
pub const MAX_PARK_SLICE: Duration = Duration::from_millis(100);

/// While spinning, how often the (syscall-priced) liveness check runs.
pub(crate) const SPIN_PEER_CHECK: Duration = Duration::from_millis(2);

/// After this much spinning, the spinner also yields its core now and then, so that a peer
/// sharing the core (three processes on two cores) can run.
pub(crate) const YIELD_AFTER: Duration = Duration::from_micros(5);

const WINDOW_MIN: Duration = Duration::from_micros(5);
const WINDOW_START: Duration = Duration::from_micros(50);
const WINDOW_MAX: Duration = Duration::from_micros(400);

/// The per-handle state of a wait policy: the strategy and, for `Adaptive`, the current window.
#[derive(Debug, Clone)]
pub struct Waiter {
    strategy: WaitStrategy,
    window: Duration,
}

impl Default for Waiter {
    fn default() -> Self {
        Waiter::new(WaitStrategy::default())
    }
}

impl Waiter {
    /// A waiter following `strategy`.
    pub fn new(strategy: WaitStrategy) -> Waiter {
        Waiter {
            strategy,
            window: WINDOW_START,
        }
    }

    /// The strategy in use.
    pub fn strategy(&self) -> WaitStrategy {
        self.strategy
    }

    /// How long to spin before parking; `None` means spin without end.
    pub(crate) fn spin_budget(&self) -> Option<Duration> {
        match self.strategy {
            WaitStrategy::Spin => None,
            WaitStrategy::Park => Some(Duration::ZERO),
            WaitStrategy::Adaptive => Some(self.window),
        }
    }

    /// Learns from a wait that had to park and then lasted `parked` before its condition held.
    pub(crate) fn parked_for(&mut self, parked: Duration) {
        if self.strategy != WaitStrategy::Adaptive {
            return;
        }
        if parked < self.window {
            // The event came right after we gave up spinning: spinning longer would have won.
            self.window = (self.window * 2).min(WINDOW_MAX);
        } else if parked > WINDOW_MAX * 8 {
            // A quiet spell: spinning would have been wasted. Spin less next time.
            self.window = (self.window / 2).max(WINDOW_MIN);
        }
    }
}
