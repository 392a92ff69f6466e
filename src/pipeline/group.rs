//! Groups: the stages that run fused in one set of worker processes. A pipeline is one or more
//! groups, each a pool of its own (its worker count, rings, supervision), the first fed by the
//! caller's inputs and each later one by hops to the frames of the group before it.

use std::collections::VecDeque;
use std::sync::Arc;

use rkyv::Archived;
use shmexec_shm::HeldFrame;

use super::fuse::Chain;
use super::hop::HopReader;
use crate::error::BoxError;
use crate::pool::{Life, Pool};
use crate::stats::Doorbell;
use crate::task::bytes::{ByteTask, ItemFailure};
use crate::task::sink::OutputSink;
use crate::task::{Task, Token, WorkerInfo};

/// The task of a group's pool. Its types are nominal: the coordinator never reads a group's
/// inputs or outputs as values (it writes the caller's inputs, moves frames, and hands out the
/// last group's frames as the pipeline's output type).
pub(crate) struct GroupTask {
    pub(crate) worker: GroupWorker,
}

/// What a group's worker runs.
pub(crate) enum GroupWorker {
    /// The first group: its chain reads the caller's inputs.
    First(Chain),
    /// A later group: its chain reads the frames hops point to.
    Next(HopReader),
}

impl Task for GroupTask {
    type Input = ();
    type Output = ();

    /// Never called: the workers run the chain itself (`into_worker`).
    fn process(&mut self, _: &Archived<()>) -> Result<(), BoxError> {
        Err("a pipeline's stages run in its workers only".into())
    }

    fn into_worker(self, _: Token) -> impl ByteTask {
        self.worker
    }
}

impl ByteTask for GroupWorker {
    fn init(&mut self, worker: &WorkerInfo) -> Result<(), BoxError> {
        match self {
            GroupWorker::First(chain) => chain.init(worker),
            GroupWorker::Next(reader) => reader.init(worker),
        }
    }

    fn run(&mut self, input: &[u8], out: &mut OutputSink<'_>) -> Result<(), ItemFailure> {
        match self {
            GroupWorker::First(chain) => chain.run(input, out),
            GroupWorker::Next(reader) => reader.run(input, out),
        }
    }

    fn item_closed(&mut self, seq: u64, ok: bool) {
        match self {
            GroupWorker::First(chain) => chain.item_closed(seq, ok),
            GroupWorker::Next(reader) => reader.item_closed(seq, ok),
        }
    }

    fn finish(&mut self, worker: &WorkerInfo) {
        match self {
            GroupWorker::First(chain) => chain.finish(worker),
            GroupWorker::Next(reader) => reader.finish(worker),
        }
    }
}

/// An upstream frame held for the downstream item that reads it.
pub(crate) struct Pin {
    /// Where its hop ends in the downstream worker's input ring: once the ring's released
    /// position reaches it, the worker (and any successor) is done with the frame.
    pub(crate) end: u64,
    /// The frame, held (shared by every group that reads it): dropping the last hold gives its
    /// bytes back to the upstream worker.
    pub(crate) _frame: Arc<HeldFrame>,
}

/// Where an item of a later group came from.
#[derive(Clone, Copy)]
pub(crate) struct Origin {
    /// Its sequence number in the group.
    pub(crate) seq: u64,
    /// The number of the pipeline input it came from (the first group's sequence number).
    pub(crate) input: u64,
    /// Whether it is an error passed on from an earlier group (already numbered by its input).
    pub(crate) passed: bool,
}

/// The groups of a pipeline and what the coordinator holds between them.
pub(crate) struct Groups {
    pub(crate) pools: Vec<Pool<GroupTask>>,
    /// `pins[g][w]` (g >= 1): frames of group `g - 1` that worker `w` of group `g` reads,
    /// oldest first. A frame is held until the worker released the hop to it.
    pub(crate) pins: Vec<Vec<VecDeque<Pin>>>,
    /// `origins[g]` (g >= 1): the items placed in group `g`, oldest first, until their
    /// results are handed on.
    pub(crate) origins: Vec<VecDeque<Origin>>,
    /// The doorbell every group's workers ring.
    pub(crate) bell: Doorbell,
    /// Each group's stages, as an error that the group's supervision makes (a crash given up,
    /// a timeout) names them: `a + b` for fused stages.
    pub(crate) labels: Vec<String>,
    /// `states[g]`: the state slots of group `g`'s stateful stages, whose epoch each run sets.
    pub(crate) states: Vec<Vec<shmexec_shm::Snapshots>>,
    /// `parent[g]`: the group whose outputs group `g` reads (`None` for the first group).
    pub(crate) parent: Vec<Option<usize>>,
    /// `children[g]`: the groups that read group `g`'s outputs (the next on the main line, and
    /// any branch). Always after `g`: groups are made in an order where a group's parent comes
    /// first.
    pub(crate) children: Vec<Vec<usize>>,
    /// The main line's last group, whose outputs are the pipeline's results.
    pub(crate) results: usize,
    /// `main[g]`: whether group `g` is on the main line (not in a branch).
    pub(crate) main: Vec<bool>,
    /// `checks[g]`: the time check of group `g`'s last stage's outputs, if any.
    pub(crate) checks: Vec<Option<Box<dyn super::timecheck::TimeCheck>>>,
    /// `join_side[h]`: for a group that starts with a join, the group whose last stage is its
    /// side.
    pub(crate) join_side: Vec<Option<usize>>,
    /// `side_frames[h]` (a join's group): the side group's result frames not yet done with, by
    /// pipeline input, each with its worker. Cleared when a run ends: the join items placed
    /// hold their frames in their pins.
    pub(crate) side_frames: Vec<SideFrames>,
}

/// A join's side frames, by the pipeline input they came from.
pub(crate) type SideFrames = std::collections::BTreeMap<u64, Vec<(usize, Arc<HeldFrame>)>>;

impl Drop for Groups {
    /// Stops the groups from the last made to the first (children before their parents), and
    /// lets go of the frames each one read as soon as its workers are gone: a parent's workers
    /// blocked on an output ring full of those frames can then stop at once, instead of at the
    /// shutdown timeout.
    fn drop(&mut self) {
        while let Some(pool) = self.pools.pop() {
            let g = self.pools.len();
            drop(pool);
            if let Some(pins) = self.pins.get_mut(g) {
                pins.clear();
            }
            if let Some(frames) = self.side_frames.get_mut(g) {
                frames.clear();
            }
        }
    }
}

impl Groups {
    /// Where item `seq` of group `g` came from. Results of a group come in its items' order,
    /// so the items before `seq` are done with.
    pub(crate) fn origin(&mut self, g: usize, seq: u64) -> Origin {
        let direct = Origin {
            seq,
            input: seq,
            passed: false,
        };
        if g == 0 {
            return direct;
        }
        let origins = &mut self.origins[g];
        while origins.front().is_some_and(|o| o.seq < seq) {
            origins.pop_front();
        }
        match origins.front() {
            Some(o) if o.seq == seq => *o,
            _ => direct,
        }
    }

    /// Where item `seq` of group `g` came from, if it is still known (without forgetting the
    /// items before it).
    pub(crate) fn peek_origin(&self, g: usize, seq: u64) -> Option<Origin> {
        if g == 0 {
            return Some(Origin {
                seq,
                input: seq,
                passed: false,
            });
        }
        self.origins[g].iter().find(|o| o.seq == seq).copied()
    }

    /// Whether some held frame's downstream worker is done with it (a step would let it go).
    pub(crate) fn releasable(&mut self) -> shmexec_shm::Result<bool> {
        for (g, pins) in self.pins.iter().enumerate().skip(1) {
            for (w, pins) in pins.iter().enumerate() {
                let Some(front) = pins.front() else {
                    continue;
                };
                let slot = &mut self.pools[g].rt.slots[w];
                if slot.life == Life::Failed || front.end <= slot.tx.released()? {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Lets go of every upstream frame whose downstream worker is done with it: it released
    /// the hop (which a worker does last, after the item's closing frame and `item_closed`), or
    /// it was given up and its item failed, so neither it nor a successor reads the frame again.
    ///
    /// SYNC POINT with the worker loop's release of its input (`worker::run`): the release is a
    /// `Release` store of the input ring's tail after the worker's last read of the frame, and
    /// `Producer::released` loads it with `Acquire`; only then is the frame given back to its
    /// producer. Reading the item's closing frame is not enough: a worker that dies between its
    /// closing frame and the release has the item run again by its successor.
    pub(crate) fn release_pins(&mut self) {
        for (g, pins) in self.pins.iter_mut().enumerate().skip(1) {
            let slots = &mut self.pools[g].rt.slots;
            for (w, pins) in pins.iter_mut().enumerate() {
                let slot = &mut slots[w];
                if slot.life == Life::Failed {
                    // It has no process, and none will be started: nothing it was handed is
                    // read again (its items fail as `WorkerLost`).
                    pins.clear();
                    continue;
                }
                // A tail that does not read (a corrupt ring) releases nothing.
                let released = slot.tx.released().unwrap_or(0);
                while pins.front().is_some_and(|p| p.end <= released) {
                    pins.pop_front();
                }
            }
        }
    }
}
