//! What a pipeline reports: which stages run where ([`Plan`]) and what each did
//! ([`PipelineStats`]).

use std::fmt;
use std::time::Duration;

use super::counters::StageCounters;
use super::group::Groups;

/// What each stage did so far: the counters of each group, and what its pool saw.
pub(crate) fn stats(plan: &Plan, counters: &[StageCounters], groups: &Groups) -> PipelineStats {
    // Items each group's workers have not finished (queued or running), as the supervisor
    // last saw their input rings.
    let queued: Vec<u64> = groups
        .pools
        .iter()
        .map(|p| {
            p.rt.slots
                .iter()
                .map(|w| w.expect.unfinished().0 as u64)
                .sum()
        })
        .collect();
    let stages = plan
        .stages
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let group = plan.group_of[i];
            let c = counters[group].stage(i);
            StageStats {
                queued: queued[group],
                name: name.clone(),
                group,
                workers: plan.groups[group].workers,
                items: c.items,
                bytes_in: c.bytes_in,
                outputs: c.outputs,
                bytes_out: c.bytes_out,
                busy: c.busy,
                errors: c.errors,
            }
        })
        .collect();
    let copied = groups
        .pools
        .iter()
        .skip(1)
        .map(|p| p.stats().input_bytes_copied)
        .sum();
    PipelineStats {
        stages,
        copied_between_groups: copied,
    }
}

/// What a run needs to report its pipeline's statistics while it holds the groups.
pub(crate) struct Introspect<'p> {
    pub(crate) plan: &'p Plan,
    pub(crate) counters: &'p [StageCounters],
}

impl Introspect<'_> {
    pub(crate) fn stats(&self, groups: &Groups) -> PipelineStats {
        stats(self.plan, self.counters, groups)
    }
}

/// Which stages of a pipeline run together, and on how many workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub(crate) stages: Vec<String>,
    pub(crate) groups: Vec<GroupPlan>,
    /// The group each stage runs in.
    pub(crate) group_of: Vec<usize>,
}

/// One group of fused stages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GroupPlan {
    pub(crate) stages: Vec<usize>,
    pub(crate) workers: usize,
    pub(crate) serial: bool,
    /// The group whose outputs it reads (the one before it, or a branch's source).
    pub(crate) after: Option<usize>,
}

impl Plan {
    /// The stages, in order.
    pub fn stages(&self) -> &[String] {
        &self.stages
    }

    /// The groups of stages fused into one worker process each, in order (the main line's,
    /// then each branch's).
    pub fn fused(&self) -> Vec<Vec<String>> {
        self.groups
            .iter()
            .map(|g| g.stages.iter().map(|&i| self.stages[i].clone()).collect())
            .collect()
    }

    /// The worker processes of each group, in order.
    pub fn workers(&self) -> Vec<usize> {
        self.groups.iter().map(|g| g.workers).collect()
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fused = self.fused();
        for (i, (g, names)) in self.groups.iter().zip(&fused).enumerate() {
            let kind = match (names.len(), g.serial) {
                (_, true) => "serial, ",
                (1, false) => "",
                _ => "fused, ",
            };
            let s = if g.workers == 1 { "" } else { "s" };
            write!(f, "{}: {kind}{} worker{s}", names.join(" + "), g.workers)?;
            match g.after {
                Some(a) if a + 1 != i => {
                    writeln!(f, ", a branch reading {}", fused[a].join(" + "))?
                }
                _ => writeln!(f)?,
            }
        }
        Ok(())
    }
}

/// One stage's counters, summed over its workers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct StageStats {
    /// The stage's name.
    pub name: String,
    /// The group of fused stages it runs in (see [`Plan::fused`]).
    pub group: usize,
    /// The workers of that group.
    pub workers: usize,
    /// Items the stage started (its inputs).
    pub items: u64,
    /// Bytes of those inputs.
    pub bytes_in: u64,
    /// Outputs it gave.
    pub outputs: u64,
    /// Bytes of those outputs.
    pub bytes_out: u64,
    /// Time its workers spent in it, not counting the fused stages after it.
    pub busy: Duration,
    /// Items it failed on.
    pub errors: u64,
    /// Items its group's workers have been handed and not finished yet (queued, or being
    /// run), as the coordinator last saw: a group whose queues stay full while the next
    /// group's stay empty is the bottleneck.
    pub queued: u64,
}

impl StageStats {
    /// Input megabytes per second of busy time: what one worker of the stage processes.
    pub fn mbps_per_worker(&self) -> f64 {
        let secs = self.busy.as_secs_f64();
        if secs == 0.0 {
            0.0
        } else {
            self.bytes_in as f64 / 1e6 / secs
        }
    }
}

/// Every stage's counters; see [`Pipeline::stats`](crate::pipeline::Pipeline::stats).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PipelineStats {
    /// The stages, in order.
    pub stages: Vec<StageStats>,
    /// Payload bytes the coordinator copied to move items between groups: none, as a group
    /// reads the frames of the one before where they lie (the coordinator writes a 32-byte
    /// hop per item instead). Counted from the rings, not assumed.
    pub copied_between_groups: u64,
}

impl PipelineStats {
    /// The stage that limits the pipeline so far: the one with the most busy time per worker
    /// of its group (fused stages share their workers' time; a group's workers share its
    /// stages' load). The one to speed up, or to give more workers. `None` before any item ran.
    pub fn bottleneck(&self) -> Option<&StageStats> {
        self.stages
            .iter()
            .filter(|s| s.busy > Duration::ZERO)
            .max_by_key(|s| s.busy / s.workers.max(1) as u32)
    }

    /// The counters since `earlier` (an earlier reading of the same pipeline): over a window
    /// of a running pipeline, its [`bottleneck`](PipelineStats::bottleneck) is the stage that
    /// limits it now. Queue fills are the latest reading's.
    pub fn since(&self, earlier: &PipelineStats) -> PipelineStats {
        let stages = self
            .stages
            .iter()
            .zip(&earlier.stages)
            .map(|(now, then)| StageStats {
                name: now.name.clone(),
                group: now.group,
                workers: now.workers,
                items: now.items.saturating_sub(then.items),
                bytes_in: now.bytes_in.saturating_sub(then.bytes_in),
                outputs: now.outputs.saturating_sub(then.outputs),
                bytes_out: now.bytes_out.saturating_sub(then.bytes_out),
                busy: now.busy.saturating_sub(then.busy),
                errors: now.errors.saturating_sub(then.errors),
                queued: now.queued,
            })
            .collect();
        PipelineStats {
            stages,
            copied_between_groups: self
                .copied_between_groups
                .saturating_sub(earlier.copied_between_groups),
        }
    }
}

impl fmt::Display for PipelineStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bottleneck = self.bottleneck().map(|s| s.name.as_str());
        writeln!(
            f,
            "{:<16} {:>5} {:>9} {:>12} {:>9} {:>12} {:>10} {:>7} {:>7}",
            "stage",
            "group",
            "items",
            "bytes in",
            "outputs",
            "bytes out",
            "busy s",
            "errors",
            "queued"
        )?;
        for s in &self.stages {
            let mark = if Some(s.name.as_str()) == bottleneck {
                "  <- most time"
            } else {
                ""
            };
            writeln!(
                f,
                "{:<16} {:>5} {:>9} {:>12} {:>9} {:>12} {:>10.3} {:>7} {:>7}{mark}",
                s.name,
                s.group,
                s.items,
                s.bytes_in,
                s.outputs,
                s.bytes_out,
                s.busy.as_secs_f64(),
                s.errors,
                s.queued
            )?;
        }
        Ok(())
    }
}
