//! Joins (fan-in): a stage that reads two streams paired by pipeline input, the outputs of the
//! stage before it (the *base*: events) and those of an earlier main-line stage (the *side*:
//! peaks), as strax's `event_basics` reads events and the peaks of the same chunk.
//!
//! The join's worker gets a descriptor (`JOIN_MAGIC`, a count, the base hop, then one hop per
//! side frame: [`Hop`]'s 32-byte layout), reads every frame in place in the base group's and
//! the side group's output rings ([`Ring::read_held`]), decodes them, and calls [`Join::process`].
//! The coordinator holds every one of those frames until the worker released the descriptor.

use std::marker::PhantomData;

use rkyv::Archived;
use shmexec_shm::Ring;

use super::hop::{HOP_LEN, Hop};
use crate::archive::{Decode, Encode, decode};
use crate::error::BoxError;
use crate::task::WorkerInfo;
use crate::task::bytes::{ByteTask, ItemFailure};
use crate::task::sink::OutputSink;

/// A stage that reads each output of the stage before it (`Base`) with every output an earlier
/// stage gave for the same pipeline input (`Side`); see
/// [`Stages::join`](crate::pipeline::Stages::join).
pub trait Join {
    /// The output type of the stage before the join.
    type Base: Encode<Archived: Decode>;
    /// The output type of the side stage (checked by name when the pipeline is built).
    type Side: Encode<Archived: Decode>;
    /// What the join gives for each base item.
    type Output: Encode<Archived: Decode>;

    /// Runs once in each worker before its first item.
    fn init(&mut self, _worker: &WorkerInfo) -> Result<(), BoxError> {
        Ok(())
    }

    /// Joins one base item with `side`: every output the side stage gave for the same input
    /// (usually one; none if it gave none), in order.
    fn process(
        &mut self,
        base: &Archived<Self::Base>,
        side: &[&Archived<Self::Side>],
    ) -> Result<Self::Output, BoxError>;

    /// Runs once in each worker when the pipeline shuts down cleanly.
    fn finish(&mut self, _worker: &WorkerInfo) {}
}

/// The first bytes of a join descriptor.
const JOIN_MAGIC: &[u8; 8] = b"shmxjoin";

/// The bytes of a join descriptor with `sides` side hops.
pub(crate) fn descriptor_len(sides: usize) -> usize {
    JOIN_MAGIC.len() + 8 + HOP_LEN * (1 + sides)
}

/// Writes a join descriptor into `out` (at least [`descriptor_len`] bytes).
pub(crate) fn write_descriptor(base: &Hop, sides: &[Hop], out: &mut [u8]) -> usize {
    out[..8].copy_from_slice(JOIN_MAGIC);
    out[8..16].copy_from_slice(&(sides.len() as u64).to_le_bytes());
    let mut at = 16;
    for hop in std::iter::once(base).chain(sides) {
        at += hop.write(&mut out[at..at + HOP_LEN]);
    }
    at
}

/// Reads a join descriptor: the base hop and the side hops.
fn read_descriptor(input: &[u8]) -> Option<(Hop, Vec<Hop>)> {
    let rest = input.strip_prefix(JOIN_MAGIC)?;
    let n = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
    let n = usize::try_from(n).ok()?;
    if input.len() != descriptor_len(n) {
        return None;
    }
    let mut hops = rest[8..].chunks_exact(HOP_LEN).map(Hop::read);
    let base = hops.next()??;
    let sides = hops.collect::<Option<Vec<Hop>>>()?;
    Some((base, sides))
}

/// Reads the frame `hop` names in `rings`.
fn frame<'r>(rings: &'r [Ring], hop: &Hop, what: &str) -> Result<&'r [u8], ItemFailure> {
    let ring = rings
        .get(hop.worker as usize)
        .ok_or_else(|| ItemFailure::InvalidInput(format!("no {what} worker {}", hop.worker)))?;
    ring.read_held(hop.pos, hop.len, hop.seq, hop.part)
        .map_err(|e| ItemFailure::InvalidInput(format!("the {what} frame: {e}")))
}

/// A [`Join`] as the worker runs it, with no rings yet (they exist once the groups before are
/// built).
pub(crate) trait JoinRun {
    fn with_rings(self: Box<Self>, base: Vec<Ring>, side: Vec<Ring>) -> Box<dyn ByteTask>;
}

/// A join task and its types.
pub(crate) struct Typed<J>(pub(crate) J);

impl<J: Join + 'static> JoinRun for Typed<J> {
    fn with_rings(self: Box<Self>, base: Vec<Ring>, side: Vec<Ring>) -> Box<dyn ByteTask> {
        Box::new(JoinReader {
            task: self.0,
            base,
            side,
            _types: PhantomData::<fn()>,
        })
    }
}

/// What a join stage's worker runs: it reads the frames a descriptor names and joins them.
struct JoinReader<J, P> {
    task: J,
    /// The base group's output rings, one per worker.
    base: Vec<Ring>,
    /// The side group's output rings, one per worker.
    side: Vec<Ring>,
    _types: PhantomData<P>,
}

impl<J: Join, P> ByteTask for JoinReader<J, P> {
    fn init(&mut self, worker: &WorkerInfo) -> Result<(), BoxError> {
        self.task.init(worker)
    }

    fn run(&mut self, input: &[u8], out: &mut OutputSink<'_>) -> Result<(), ItemFailure> {
        let (base, sides) = read_descriptor(input).ok_or_else(|| {
            ItemFailure::InvalidInput(format!("not a join descriptor ({} bytes)", input.len()))
        })?;
        let bad = |e: crate::archive::RkyvError| ItemFailure::InvalidInput(e.to_string());
        let base = decode::<Archived<J::Base>>(frame(&self.base, &base, "base")?).map_err(bad)?;
        let mut side = Vec::with_capacity(sides.len());
        for hop in &sides {
            let bytes = frame(&self.side, hop, "side")?;
            side.push(decode::<Archived<J::Side>>(bytes).map_err(bad)?);
        }
        let output = self
            .task
            .process(base, &side)
            .map_err(ItemFailure::Failed)?;
        out.emit_last(&output).map_err(ItemFailure::Failed)
    }

    fn finish(&mut self, worker: &WorkerInfo) {
        self.task.finish(worker)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_descriptor_round_trips_and_a_wrong_length_is_refused() {
        let hop = |seq| Hop {
            worker: 1,
            part: 0,
            pos: 64 * seq,
            len: 100,
            seq,
        };
        let sides = [hop(2), hop(3), hop(4)];
        let mut buf = vec![0u8; descriptor_len(3)];
        assert_eq!(write_descriptor(&hop(1), &sides, &mut buf), buf.len());
        assert_eq!(read_descriptor(&buf), Some((hop(1), sides.to_vec())));
        assert_eq!(read_descriptor(&buf[..buf.len() - 1]), None);
        let mut none = vec![0u8; descriptor_len(0)];
        write_descriptor(&hop(1), &[], &mut none);
        assert_eq!(read_descriptor(&none), Some((hop(1), Vec::new())));
    }
}
