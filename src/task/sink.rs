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
}

/// Whether an output is the item's last.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    More,
    Last,
}

/// Where a task's outputs go: reserved slots of the worker's output ring. Only the executor
/// makes one; tasks receive it in [`crate::Task::produce`].
///
/// The `emit` methods publish one output each (an item may have any number, or none: a
/// filter); the value must be of the task's output type, which the caller checks when it
/// reads it.
pub struct OutputSink<'a> {
    tx: &'a mut Producer,
    before_publish: &'a mut dyn FnMut(usize, u64),
    item: Item,
}

/// The item a sink writes for (apart from the ring, so that a grant of the ring and the item
/// can be used together).
struct Item {
    seq: u64,
    /// When the worker started the item (`shmexec_shm::clock`), carried in every output frame.
    started_ns: u64,
    /// Frames published for this item so far.
    parts: u32,
    /// Set once the item is closed or failed; nothing more is published then.
    outcome: Option<Outcome>,
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
        self.parts += 1;
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
        OutputSink {
            tx,
            before_publish,
            item: Item {
                seq,
                started_ns,
                parts: 0,
                outcome: None,
            },
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
        tx: &'t mut Producer,
        outcome: &mut Option<Outcome>,
        len: usize,
    ) -> Option<Grant<'t>> {
        match tx.reserve(len) {
            Ok(g) => Some(g),
            Err(shmexec_shm::Error::FrameTooLarge { len, max }) => {
                let mut r = Report::new(Code::OutputTooLarge, "");
                (r.a, r.b) = (len as u64, max as u64);
                *outcome = Some(Outcome::Report(r));
                None
            }
            Err(_) => {
                *outcome = Some(Outcome::Gone);
                None
            }
        }
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
        let Some(mut grant) = Self::reserve(self.tx, &mut self.item.outcome, len) else {
            return Err(failed());
        };
        match encode_into(value, &mut grant) {
            Ok(n) => {
                self.item.publish(grant, n, place, self.before_publish);
                Ok(())
            }
            Err(e) => {
                self.encode_failed(e);
                Err(failed())
            }
        }
    }

    /// Lets `fill` write `n` samples straight into the ring, then writes the metadata it
    /// returns after them: the output archives as `(Vec<E>, M)`. The item's only output.
    pub(crate) fn samples_then<E: Sample, M: Encode>(
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
        let ring_max = self.tx.max_payload();
        let guess = reserved
            .saturating_add(META_SLACK)
            .min(ring_max.max(reserved));
        let Some(mut grant) = Self::reserve(self.tx, &mut self.item.outcome, guess) else {
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
            // The metadata needs more room than reserved: move the elements to a bigger slot.
            let moved = grant[..data].to_vec();
            let Some(mut bigger) = Self::reserve(self.tx, &mut self.item.outcome, end) else {
                return Err(failed());
            };
            bigger[..data].copy_from_slice(&moved);
            grant = bigger;
        }
        match encode_into_at(&pair, &mut grant, data) {
            Ok(n) => {
                self.item.publish(grant, n, place, self.before_publish);
            }
            Err(e) => {
                self.encode_failed(e);
                return Err(failed());
            }
        }
        Ok(())
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
