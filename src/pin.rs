//! Which core each worker runs on.

use crate::error::{Error, Result};

/// How workers are pinned to cores (of the set this process may run on, `sched_getaffinity`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Pinning {
    /// Pin only where a core is left for the coordinator, which is busy too (it copies inputs
    /// in and hands results out): with fewer workers than allowed cores, worker `i` goes on
    /// allowed core `i + 1` and core 0 stays free; otherwise nobody is pinned. Pinning every
    /// core's worker beside a floating coordinator made throughput collapse and swing on a
    /// 2-core machine (DESIGN.md, the probe's lessons).
    #[default]
    Auto,
    /// No pinning: the kernel places the workers.
    Off,
    /// Worker `i` on allowed core `i mod n`, whatever the coordinator does.
    Spread,
    /// Worker `i` on the `i`-th core of the list (core ids as the kernel numbers them). A core
    /// may appear more than once.
    Cores(Vec<usize>),
    /// For a coordinator that is busy itself (a serial source filling chunks in place, a reader,
    /// a digitizer): worker `i` on allowed core `i mod n`, and the workers on the first core
    /// run at the lowest priority (nice 19), so the kernel places the coordinator there and it
    /// never waits for them; they take only the time it leaves. While the coordinator waits it
    /// parks at once (unless the wait strategy is `Spin`) instead of spinning, so that time is
    /// theirs: a serial source and work descriptors gain, copied inputs stay about the same
    /// (figures in `docs/benchmarks.md`). Not the default: with small chunks the parked
    /// coordinator pays a wake-up every few items, and a process outside the pool that
    /// competes for the first core starves the workers there (an ordered call then waits for
    /// their items).
    SourceFirst,
}

/// The cores this process may run on, in increasing order.
pub fn allowed_cores() -> Result<Vec<usize>> {
    shmexec_shm::sched::allowed_cores().map_err(|e| Error::InvalidArgument(e.to_string()))
}

/// The core for each of `workers` workers under `pinning`.
pub(crate) fn plan(
    pinning: &Pinning,
    workers: usize,
    allowed: &[usize],
) -> Result<Vec<Option<usize>>> {
    if allowed.is_empty() {
        return Err(Error::InvalidArgument(
            "this process may run on no core".into(),
        ));
    }
    Ok(match pinning {
        Pinning::Off => vec![None; workers],
        Pinning::Auto if workers < allowed.len() => {
            (0..workers).map(|i| Some(allowed[i + 1])).collect()
        }
        Pinning::Auto => vec![None; workers],
        Pinning::Spread | Pinning::SourceFirst => (0..workers)
            .map(|i| Some(allowed[i % allowed.len()]))
            .collect(),
        Pinning::Cores(list) => {
            if list.len() < workers {
                return Err(Error::InvalidArgument(format!(
                    "Pinning::Cores lists {} cores for {workers} workers",
                    list.len()
                )));
            }
            if let Some(bad) = list[..workers].iter().find(|c| !allowed.contains(c)) {
                return Err(Error::InvalidArgument(format!(
                    "core {bad} is not among the cores this process may use {allowed:?}"
                )));
            }
            list[..workers].iter().map(|&c| Some(c)).collect()
        }
    })
}

/// Whether the worker on `core` runs at the lowest priority under `pinning`: it shares the
/// coordinator's core ([`Pinning::SourceFirst`]).
pub(crate) fn low_priority(pinning: &Pinning, core: Option<usize>, allowed: &[usize]) -> bool {
    *pinning == Pinning::SourceFirst && core.is_some() && core == allowed.first().copied()
}

/// The nice value of a worker that yields to the coordinator: the lowest priority.
const LOW_PRIORITY_NICE: i32 = 19;

/// Lowers the calling process's priority to [`LOW_PRIORITY_NICE`].
pub(crate) fn lower_priority() -> Result<()> {
    shmexec_shm::sched::set_nice(LOW_PRIORITY_NICE)
        .map_err(|e| Error::InvalidArgument(format!("cannot lower the worker's priority: {e}")))
}

/// Pins the calling process (thread) to `core`.
pub(crate) fn pin_to(core: usize) -> Result<()> {
    shmexec_shm::sched::pin_to(core)
        .map_err(|e| Error::InvalidArgument(format!("cannot pin to core {core}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_leaves_a_core_for_the_coordinator() {
        let cores = [0, 1, 2, 3];
        assert_eq!(
            plan(&Pinning::Auto, 3, &cores).unwrap(),
            [Some(1), Some(2), Some(3)]
        );
        assert_eq!(plan(&Pinning::Auto, 4, &cores).unwrap(), [None; 4]);
        assert_eq!(plan(&Pinning::Auto, 2, &[0, 1]).unwrap(), [None; 2]);
        assert_eq!(
            plan(&Pinning::Spread, 3, &[4, 6]).unwrap(),
            [Some(4), Some(6), Some(4)]
        );
        assert!(plan(&Pinning::Cores(vec![0, 9]), 2, &[0, 1]).is_err());
        assert!(plan(&Pinning::Cores(vec![1]), 2, &[0, 1]).is_err());
        assert_eq!(
            plan(&Pinning::Cores(vec![1, 0]), 2, &[0, 1]).unwrap(),
            [Some(1), Some(0)]
        );
        assert_eq!(
            plan(&Pinning::SourceFirst, 3, &[2, 5]).unwrap(),
            [Some(2), Some(5), Some(2)]
        );
        assert!(low_priority(&Pinning::SourceFirst, Some(2), &[2, 5]));
        assert!(!low_priority(&Pinning::SourceFirst, Some(5), &[2, 5]));
        assert!(!low_priority(&Pinning::Spread, Some(2), &[2, 5]));
    }
}
