//! [`OutputSink`]: how a task's outputs get into its worker's output ring.
//!
//! The default path ([`crate::Task::produce`]) serializes the task's returned value into a slot
//! reserved at its exact size: one copy, made in the worker, in parallel with the others. Tasks
//! whose output is a big sample array plus a little metadata ([`crate::ArrayTask`]) skip even
//! that copy: they write their samples straight into the reserved slot, and when they only know
//! an upper bound on the count beforehand they reserve that and publish what they used. Arrays
//! of [records](crate::archive::records) are written the same way, by the same code.
//!
//! An input may give zero, one or many outputs. Every output but the item's last is published
//! as a `More` frame as soon as it is written; the item is closed by its last output (`Data`),
//! by an error report, or, when it ends with no output written as last, by an empty `Done`
//! frame. Each frame carries its position in the item (its part), so that the coordinator
//! drops the outputs a replacement worker publishes again after its predecessor died mid-item
//! (`src/wire/PROTOCOL.md`).

use std::ops::{Deref, DerefMut};

use shmexec_shm::{FrameKind, Grant, Producer};

use crate::archive::{
    Array, Encode, Prewritten, Record, Records, Ref, Sample, encode_into, encode_into_at,
    encoded_len, encoded_len_at,
};
use crate::error::BoxError;
use crate::wire::{Code, Report};

/// Room reserved after the elements for the metadata of an in-place output. Metadata that needs
/// more (a long string, a vector) still works: the elements are moved to a bigger slot, once.
const META_SLACK: usize = 4096;

/// How an item's outputs ended.
pub(crate) enum Outcome {
    /// Its closing frame is published (its byte counts went to the stats before).
    Closed,
    /// Outputs were published but not closed yet: the worker closes with a `Done` frame.
    Open,
    /// To be reported in its place (too large, not serializable).
    Report(Report),
    /// The ring is gone (the coordinator died or closed it).
    Gone,
    /// A later stage of a fused chain failed on an output (the chain holds its report).
    Downstream,
}

/// Whether an output is the item's last.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    More,
    Last,
}

/// Where a task's outputs go: reserved slots of the worker's output ring, or, in a fused
/// [pipeline](crate::pipeline), the next stage of the same worker. Only the executor makes
/// one; tasks receive it in [`crate::Task::produce`].
///
/// The `emit` methods publish one output each (an item may have any number, or none: a
/// filter); the value must be of the task's output type, which the caller checks when it
/// reads it.
pub struct OutputSink<'a> {
    target: Target<'a>,
    item: Item,
}

/// Where published outputs go.
enum Target<'a> {
    /// The worker's output ring; `before_publish` counts each output (its bytes, when it was
    /// finished) before it becomes visible.
    Ring {
        tx: &'a mut Producer,
        before_publish: &'a mut dyn FnMut(usize, u64),
    },
    /// The next stage of a fused chain, run on each output as soon as it is written.
    Stage(&'a mut dyn NextStage),
}

/// The next stage of a fused chain, as a sink of the stage before it sees it: room to write an
/// output in, and a way to run the next stage on it. Implemented by `crate::pipeline::fuse`.
pub(crate) trait NextStage {
    /// The largest output it takes.
    fn max_payload(&self) -> usize;
    /// Makes the room at least `len` bytes, keeping its contents (so that a slot can grow
    /// with what was written in it).
    fn grow(&mut self, len: usize);
    /// The room: a 64-byte aligned buffer, as long as the last `grow` asked.
    fn room(&self) -> &[u8];
    /// The room, to write in.
    fn room_mut(&mut self) -> &mut [u8];
    /// Runs the next stage on the first `n` bytes of the room. `Err` is the failure of a later
    /// stage, which the chain keeps and reports for the item (the stage before only learns that
    /// its output could not be written).
    fn deliver(&mut self, n: usize) -> Result<(), ()>;
    /// Runs the next stage on `bytes` as they are (a filter passing its input on): no copy.
    fn forward(&mut self, bytes: &[u8]) -> Result<(), ()>;
}

/// A reserved output slot: a grant of the ring (with the counting to do when it is
/// published), or the next stage's room (with the stage to run on it).
enum Slot<'t> {
    Ring(Grant<'t>, &'t mut dyn FnMut(usize, u64)),
    Room(&'t mut dyn NextStage),
}

impl Deref for Slot<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Slot::Ring(g, _) => g,
            Slot::Room(next) => next.room(),
        }
    }
}

impl DerefMut for Slot<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            Slot::Ring(g, _) => g,
            Slot::Room(next) => next.room_mut(),
        }
    }
}

/// The item a sink writes for (apart from the ring, so that a grant of the ring and the item
/// can be used together).
struct Item {
    seq: u64,
    /// When the worker started the item (`shmexec_shm::clock`), carried in every output frame.
    started_ns: u64,
    /// Frames published for this item so far.
    parts: u32,
    /// Payload bytes published for this item so far.
    bytes: u64,
    /// Set once the item is closed or failed; nothing more is published then.
    outcome: Option<Outcome>,
    /// Whether every output is published as `More`, the closing left to the worker (the last
    /// stage of a fused chain, which runs once per output of the stage before).
    keep_open: bool,
}

impl Item {
    /// Publishes `grant` as `n` bytes of the item's next part, stamped with when the item
    /// started and when this output was finished (now).
    fn publish(
        &mut self,
        mut grant: Grant<'_>,
        n: usize,
        place: Place,
        before: &mut dyn FnMut(usize, u64),
    ) {
        let place = if self.keep_open { Place::More } else { place };
        let kind = match place {
            Place::More => FrameKind::More,
            Place::Last => FrameKind::Data,
        };
        let finished_ns = shmexec_shm::clock::now_ns();
        grant
            .truncate(n)
            .set_seq(self.seq)
            .set_kind(kind)
            .set_part(self.parts)
            .set_words([self.started_ns, finished_ns]);
        before(n, finished_ns);
        grant.commit();
        self.published(n, place);
    }

    /// Publishes the first `n` bytes of `slot`: commits the ring frame, or runs the next stage
    /// on them; a later stage's failure fails the item (the chain holds its report).
    fn publish_slot(&mut self, slot: Slot<'_>, n: usize, place: Place) -> Result<(), BoxError> {
        match slot {
            Slot::Ring(grant, before) => {
                self.publish(grant, n, place, before);
                Ok(())
            }
            Slot::Room(next) => {
                self.published(n, place);
                next.deliver(n).map_err(|()| self.downstream_failed())
            }
        }
    }

    /// Records that a later stage failed on an output: nothing more is published for the item.
    fn downstream_failed(&mut self) -> BoxError {
        self.outcome = Some(Outcome::Downstream);
        failed()
    }

    fn published(&mut self, n: usize, place: Place) {
        let place = if self.keep_open { Place::More } else { place };
        self.parts += 1;
        self.bytes += n as u64;
        if place == Place::Last {
            self.outcome = Some(Outcome::Closed);
        }
    }
}

/// The error an `emit` returns once the sink has failed (the report it recorded is what the
/// caller sees, not this).
fn failed() -> BoxError {
    "the output could not be written".into()
}

impl<'a> OutputSink<'a> {
    pub(crate) fn new(
        tx: &'a mut Producer,
        seq: u64,
        started_ns: u64,
        before_publish: &'a mut dyn FnMut(usize, u64),
    ) -> Self {
        Self::with_target(Target::Ring { tx, before_publish }, seq, started_ns)
    }

    /// A sink whose outputs are the inputs of the next stage of a fused chain.
    pub(crate) fn to_stage(next: &'a mut dyn NextStage, seq: u64, started_ns: u64) -> Self {
        Self::with_target(Target::Stage(next), seq, started_ns)
    }

    fn with_target(target: Target<'a>, seq: u64, started_ns: u64) -> Self {
        OutputSink {
            target,
            item: Item {
                seq,
                started_ns,
                parts: 0,
                bytes: 0,
                outcome: None,
                keep_open: false,
            },
        }
    }

    /// The number of the item the outputs are for: its position in the pool's input stream
    /// (in a pipeline's first group, the input's number; in a later group, its number there),
    /// to name a chunk in an error.
    pub fn seq(&self) -> u64 {
        self.item.seq
    }

    /// When the worker started the item.
    pub(crate) fn started_ns(&self) -> u64 {
        self.item.started_ns
    }

    /// Payload bytes published so far.
    pub(crate) fn published_bytes(&self) -> u64 {
        self.item.bytes
    }

    /// Outputs published so far.
    pub(crate) fn published_parts(&self) -> u32 {
        self.item.parts
    }

    /// Publishes every output from now on as one of more to come: the item is closed by the
    /// worker, not by an output.
    pub(crate) fn keep_open(&mut self) {
        self.item.keep_open = true;
    }

    /// Names `stage` in the report the sink made itself (an output too large), if any.
    pub(crate) fn blame_stage(&mut self, stage: u32) {
        if let Some(Outcome::Report(report)) = &mut self.item.outcome {
            report.stage.get_or_insert(stage);
        }
    }

    /// How the item's outputs ended; `None`: no output at all.
    pub(crate) fn into_outcome(self) -> (Option<Outcome>, u32) {
        let parts = self.item.parts;
        let outcome = match self.item.outcome {
            None if parts > 0 => Some(Outcome::Open),
            other => other,
        };
        (outcome, parts)
    }

    /// Reserves `len` bytes; on failure records the outcome and returns `None`.
    fn reserve<'t>(
        target: &'t mut Target<'_>,
        outcome: &mut Option<Outcome>,
        len: usize,
    ) -> Option<Slot<'t>> {
        let too_large = |outcome: &mut Option<Outcome>, max: usize| {
            let mut r = Report::new(Code::OutputTooLarge, "");
            (r.a, r.b) = (len as u64, max as u64);
            *outcome = Some(Outcome::Report(r));
            None
        };
        match target {
            Target::Ring { tx, before_publish } => match tx.reserve(len) {
                Ok(g) => Some(Slot::Ring(g, &mut **before_publish)),
                Err(shmexec_shm::Error::FrameTooLarge { max, .. }) => too_large(outcome, max),
                Err(_) => {
                    *outcome = Some(Outcome::Gone);
                    None
                }
            },
            Target::Stage(next) => {
                let max = next.max_payload();
                if len > max {
                    return too_large(outcome, max);
                }
                next.grow(len);
                Some(Slot::Room(&mut **next))
            }
        }
    }

    /// The largest output the target takes.
    fn max_payload(&self) -> usize {
        match &self.target {
            Target::Ring { tx, .. } => tx.max_payload(),
            Target::Stage(next) => next.max_payload(),
        }
    }

    /// Publishes `bytes`, an archive of the output type as it is (a filter passing its input
    /// on): copied into the ring once, or handed to the next fused stage with no copy.
    pub(crate) fn emit_archive(&mut self, bytes: &[u8]) -> Result<(), BoxError> {
        if !self.open() {
            return Err(failed());
        }
        if let Target::Stage(next) = &mut self.target {
            self.item.published(bytes.len(), Place::More);
            return next
                .forward(bytes)
                .map_err(|()| self.item.downstream_failed());
        }
        let Some(mut slot) = Self::reserve(&mut self.target, &mut self.item.outcome, bytes.len())
        else {
            return Err(failed());
        };
        slot[..bytes.len()].copy_from_slice(bytes);
        self.item.publish_slot(slot, bytes.len(), Place::More)
    }

    fn encode_failed(&mut self, e: impl std::fmt::Display) {
        self.item.outcome = Some(Outcome::Report(Report::new(Code::Encode, e.to_string())));
    }

    /// Whether the sink may still publish: the item is neither closed nor failed, and its
    /// parts fit a frame's part index.
    fn open(&mut self) -> bool {
        if self.item.outcome.is_some() {
            return false;
        }
        if self.item.parts >= shmexec_shm::frame::MAX_PART {
            let msg = format!(
                "more than {} outputs for one input",
                shmexec_shm::frame::MAX_PART
            );
            self.item.outcome = Some(Outcome::Report(Report::new(Code::Task, msg)));
            return false;
        }
        true
    }

    /// Publishes one output, serialized into a slot of its exact size; more may follow.
    pub fn emit<O: Encode>(&mut self, value: &O) -> Result<(), BoxError> {
        self.serialize_as(value, Place::More)
    }

    /// [`emit`](Self::emit) for the item's last output (saves the closing frame).
    pub fn emit_last<O: Encode>(&mut self, value: &O) -> Result<(), BoxError> {
        self.serialize_as(value, Place::Last)
    }

    /// Serializes `value` as the item's only output (the typed `Task` path).
    pub(crate) fn serialize<O: Encode>(&mut self, value: &O) {
        let _ = self.serialize_as(value, Place::Last);
    }

    fn serialize_as<O: Encode>(&mut self, value: &O, place: Place) -> Result<(), BoxError> {
        if !self.open() {
            return Err(failed());
        }
        let len = match encoded_len(value) {
            Ok(n) => n,
            Err(e) => {
                self.encode_failed(e);
                return Err(failed());
            }
        };
        let Some(mut slot) = Self::reserve(&mut self.target, &mut self.item.outcome, len) else {
            return Err(failed());
        };
        match encode_into(value, &mut slot) {
            Ok(n) => self.item.publish_slot(slot, n, place),
            Err(e) => {
                self.encode_failed(e);
                Err(failed())
            }
        }
    }

    /// Publishes the item's last output written in place: lets `fill` write exactly `n`
    /// samples straight into the ring, then writes the metadata it returns after them. The
    /// output archives as `(Vec<E>, M)`; no closing frame follows it (an item's last output
    /// closes it), so a task with one output per item pays one frame per item. For outputs
    /// whose length is known before they are written ([`crate::ArrayTask`], a binding that has
    /// its result's arrays in hand).
    pub fn emit_samples_last<E: Sample, M: Encode>(
        &mut self,
        n: usize,
        fill: impl FnOnce(&mut [E]) -> Result<M, BoxError>,
    ) -> Result<(), BoxError> {
        self.array_up_to::<Vec<E>, M>(
            n,
            |samples| fill(samples).map(|m| (samples.len(), m)),
            Place::Last,
        )
    }

    /// Publishes one output written in place: reserves room for up to `max` samples, lets
    /// `fill` write them and say how many it used (at most `max`) and what metadata goes with
    /// them, and publishes only what was used. The output archives as `(Vec<E>, M)`; more
    /// outputs may follow. For outputs whose length is known only once computed (a peak
    /// finder's peaks): no copy, and no second pass.
    pub fn emit_samples_up_to<E: Sample, M: Encode>(
        &mut self,
        max: usize,
        fill: impl FnOnce(&mut [E]) -> Result<(usize, M), BoxError>,
    ) -> Result<(), BoxError> {
        self.array_up_to::<Vec<E>, M>(max, fill, Place::More)
    }

    /// [`emit_samples_up_to`](Self::emit_samples_up_to) as the item's last output: no closing
    /// frame follows it (see [`emit_samples_last`](Self::emit_samples_last)). For a task that
    /// learns its output's exact length only while it writes it (a binding whose function
    /// writes an array in place, then returns metadata of unknown size).
    pub fn emit_samples_last_up_to<E: Sample, M: Encode>(
        &mut self,
        max: usize,
        fill: impl FnOnce(&mut [E]) -> Result<(usize, M), BoxError>,
    ) -> Result<(), BoxError> {
        self.array_up_to::<Vec<E>, M>(max, fill, Place::Last)
    }

    /// [`emit_samples_up_to`](Self::emit_samples_up_to) for
    /// [records](crate::archive::records): `fill` writes up to `max` records straight into the
    /// ring and says how many it used; the output archives as `(Records<T>, M)`.
    ///
    /// ```
    /// use bytemuck::{Pod, Zeroable};
    /// use shmexec::{BoxError, OutputSink, Records, Task};
    ///
    /// #[derive(Clone, Copy, Pod, Zeroable)]
    /// #[repr(C)]
    /// struct Hit { time: i64, area: f32, channel: u32 }
    ///
    /// /// Finds the hits of a chunk of samples: at most one per sample above threshold.
    /// struct HitFinder;
    ///
    /// impl Task for HitFinder {
    ///     type Input = Vec<f32>;
    ///     type Output = (Records<Hit>, u64);
    ///     fn process(&mut self, _: &rkyv::Archived<Vec<f32>>) -> Result<Self::Output, BoxError> {
    ///         Err("runs through produce".into())
    ///     }
    ///     fn produce(
    ///         &mut self,
    ///         input: &rkyv::Archived<Vec<f32>>,
    ///         out: &mut OutputSink<'_>,
    ///     ) -> Result<(), BoxError> {
    ///         let samples = input.as_slice();
    ///         out.emit_records_up_to(samples.len(), |hits: &mut [Hit]| {
    ///             let mut n = 0;
    ///             for (i, s) in samples.iter().enumerate() {
    ///                 if s.to_native() > 1.0 {
    ///                     hits[n] = Hit { time: i as i64, area: s.to_native(), channel: 0 };
    ///                     n += 1;
    ///                 }
    ///             }
    ///             Ok((n, samples.len() as u64))
    ///         })
    ///     }
    /// }
    /// ```
    pub fn emit_records_up_to<T: Record, M: Encode>(
        &mut self,
        max: usize,
        fill: impl FnOnce(&mut [T]) -> Result<(usize, M), BoxError>,
    ) -> Result<(), BoxError> {
        self.array_up_to::<Records<T>, M>(max, fill, Place::More)
    }

    /// Writes one output of `(V, M)` in place: up to `max` elements by `fill`, then the root and
    /// the metadata after the ones it used.
    fn array_up_to<V: Array, M: Encode>(
        &mut self,
        max: usize,
        fill: impl FnOnce(&mut [V::Elem]) -> Result<(usize, M), BoxError>,
        place: Place,
    ) -> Result<(), BoxError> {
        if !self.open() {
            return Err(failed());
        }
        // More elements than an archive addresses: `usize::MAX` bytes, which no ring takes, so the
        // reservation below fails with the output's size error.
        let reserved = Prewritten::<V>::new(max).map_or(usize::MAX, |p| p.data_len());
        let ring_max = self.max_payload();
        let guess = reserved
            .saturating_add(META_SLACK)
            .min(ring_max.max(reserved));
        let Some(mut grant) = Self::reserve(&mut self.target, &mut self.item.outcome, guess) else {
            return Err(failed());
        };
        let Ok(elements) = bytemuck::try_cast_slice_mut::<u8, V::Elem>(&mut grant[..reserved])
        else {
            let msg = format!("ring slot not aligned for the {}", V::NOUN);
            self.item.outcome = Some(Outcome::Report(Report::new(Code::Encode, msg)));
            return Err(failed());
        };
        // An error or a panic here drops the grant unpublished.
        let (used, meta) = fill(elements)?;
        if used > max {
            let msg = format!("the task used {used} {} of the {max} it reserved", V::NOUN);
            self.item.outcome = Some(Outcome::Report(Report::new(Code::Task, msg)));
            return Err(failed());
        }
        // `used <= max`, whose size passed above.
        let Ok(p) = Prewritten::<V>::new(used) else {
            return Err(failed());
        };
        let data = p.data_len();
        let pair = (p, Ref(&meta));
        let end = match encoded_len_at(&pair, data) {
            Ok(end) => end,
            Err(e) => {
                self.encode_failed(e);
                return Err(failed());
            }
        };
        if end > grant.len() {
            // The metadata needs more room than reserved: move the elements to a bigger slot
            // (a stage's room grows in place, keeping them).
            let moved = match grant {
                Slot::Ring(g, _) => Some(g[..data].to_vec()),
                Slot::Room(_) => None,
            };
            let Some(mut bigger) = Self::reserve(&mut self.target, &mut self.item.outcome, end)
            else {
                return Err(failed());
            };
            if let Some(moved) = moved {
                bigger[..data].copy_from_slice(&moved);
            }
            grant = bigger;
        }
        match encode_into_at(&pair, &mut grant, data) {
            Ok(n) => self.item.publish_slot(grant, n, place),
            Err(e) => {
                self.encode_failed(e);
                Err(failed())
            }
        }
    }
}

/// Publishes an error report for item `seq` as its part `part` (closing it). A message too
/// long for the ring is cut, not lost.
pub(crate) fn send_report(
    tx: &mut Producer,
    seq: u64,
    part: u32,
    mut message: Report,
) -> Result<(), shmexec_shm::Error> {
    let max = tx.max_payload();
    if message.len() > max {
        let mut cut = max.saturating_sub(message.len() - message.message.len());
        while !message.message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.message.truncate(cut);
    }
    let mut grant = tx.reserve(message.len())?;
    message.write(&mut grant);
    grant.set_kind(FrameKind::Error).set_seq(seq).set_part(part);
    grant.commit();
    Ok(())
}

/// Publishes an empty frame of `kind` for `seq` at `part`: `Done` closes an item after `part`
/// outputs; `End` is the start-up report and the goodbye.
pub(crate) fn send_empty(
    tx: &mut Producer,
    kind: FrameKind,
    seq: u64,
    part: u32,
) -> Result<(), shmexec_shm::Error> {
    let mut grant = tx.reserve(0)?;
    grant.set_kind(kind).set_seq(seq).set_part(part);
    grant.commit();
    Ok(())
}
