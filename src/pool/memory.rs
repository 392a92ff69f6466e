//! Memory admission: before the pool allocates anything, the sum of what it will allocate is
//! compared with what this process may still take, so that a pool too large for its container
//! is an error from `build` rather than the coordinator killed by the kernel's OOM killer.
//!
//! The limits themselves (memory cgroups, RAM, `RLIMIT_AS`) are read by
//! [`shmexec_shm::memory::headroom`]; this file only counts what the pool needs.

use shmexec_shm::memory::{Bytes, charge, headroom};
use shmexec_shm::{CONTROL_LEN, FRAME_ALIGN, Ring};

use super::config::Config;
use crate::error::{Error, Result};
use crate::stats::StatsBlock;

/// Memory kept free for the pool's processes themselves, beyond its shared memory: the
/// coordinator's own heap and the launcher, plus [`MARGIN_PER_WORKER`] for each worker.
///
/// The rings are most of a pool's memory, but not all of it: every process has a stack, a heap,
/// page tables (charged to the cgroup too) and the pages it writes after the fork (copies of the
/// parent's). A pool admitted with nothing to spare would be killed by the first of those. The
/// margin is several times what an idle pool takes beyond its rings (the leak test in
/// `tests/pool_memory.rs` prints a cgroup's usage after `build`), so that heaps may grow with
/// the calls; what the task itself allocates is the caller's to budget, and a task that takes
/// too much kills its own worker, not the coordinator (workers raise their OOM score).
pub(crate) const MARGIN: u64 = 16 << 20;

/// See [`MARGIN`]: each worker's share.
pub(crate) const MARGIN_PER_WORKER: u64 = 8 << 20;

/// What a pool built from `config` allocates, and its parts for the error message.
pub(crate) struct Needs {
    /// Bytes in all, the margin included; `u64::MAX` where the sum overflows.
    pub(crate) total: u64,
    /// The sum spelled out: "2 workers x (64 MiB input ring + 64 MiB output ring), ...".
    pub(crate) parts: String,
}

impl Needs {
    pub(crate) fn of(config: &Config) -> Needs {
        let workers = config.cores.len();
        let input = ring_footprint(config.input_ring_bytes);
        let output = ring_footprint(config.output_ring_bytes);
        // One segment per worker holds both of its rings (`super::start::rings`).
        let per_worker = input
            .zip(output)
            .and_then(|(i, o)| charge(i.checked_add(o)?));
        let rings = per_worker.and_then(|w| w.checked_mul(workers as u64));
        let counters = charge(StatsBlock::footprint(workers) as u64);
        let shared = match config.shared_bytes {
            0 => Some(0),
            bytes => charge(bytes as u64),
        };
        let margin = MARGIN_PER_WORKER
            .checked_mul(workers as u64)
            .and_then(|m| m.checked_add(MARGIN));
        let total = [rings, counters, shared, margin]
            .into_iter()
            .try_fold(0u64, |sum, part| sum.checked_add(part?))
            .unwrap_or(u64::MAX);

        let size =
            |b: Option<u64>| b.map_or("more than 16 EiB".to_owned(), |b| Bytes(b).to_string());
        let mut parts = format!(
            "{workers} workers x ({} input ring + {} output ring)",
            size(input),
            size(output)
        );
        if config.shared_bytes > 0 {
            parts += &format!(", a {} shared region", size(shared));
        }
        parts += &format!(
            ", {} of counters and a {} margin for the processes themselves",
            size(counters),
            size(margin)
        );
        Needs { total, parts }
    }
}

/// [`Ring::footprint`], `None` where it would overflow.
fn ring_footprint(capacity: usize) -> Option<u64> {
    capacity.checked_add(CONTROL_LEN + FRAME_ALIGN)?;
    Some(Ring::footprint(capacity) as u64)
}

/// Refuses a pool whose memory does not fit under the tightest limit on this process, with
/// an error that names the limit and the settings to lower.
pub(crate) fn admit(config: &Config) -> Result<()> {
    let needs = Needs::of(config);
    let room = headroom();
    if needs.total > room.available {
        return Err(Error::OutOfMemory {
            needed: needs.total,
            available: room.available,
            limit: room.limit.to_string(),
            parts: needs.parts,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::Builder;

    #[test]
    fn needs_count_every_segment_and_the_margin() {
        let config = Builder::default()
            .workers(2)
            .ring_bytes(64 << 20)
            .shared_bytes(1 << 20)
            .into_config()
            .unwrap();
        let needs = Needs::of(&config);
        let rings = 2 * charge(2 * Ring::footprint(64 << 20) as u64).unwrap();
        let counters = charge(StatsBlock::footprint(2) as u64).unwrap();
        let margin = MARGIN + 2 * MARGIN_PER_WORKER;
        assert_eq!(needs.total, rings + counters + (1 << 20) + margin);
        assert!(
            needs
                .parts
                .starts_with("2 workers x (64 MiB input ring + 64 MiB output ring), a 1 MiB"),
            "{}",
            needs.parts
        );
    }
}
