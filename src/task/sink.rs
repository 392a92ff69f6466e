//! [`OutputSink`]: how a worker's result gets into its output ring.
//!
//! The default path ([`crate::Task::produce`]) serializes the task's returned value into a slot
//! reserved at its exact size: one copy, made in the worker, in parallel with the others. Tasks
//! whose output is a big sample array plus a little metadata ([`crate::ArrayTask`]) skip even
//! that copy: they write their samples straight into the reserved slot.

use shmexec_shm::{FrameKind, Grant, Producer};

use crate::archive::{
    Encode, Prewritten, Ref, Sample, encode_into, encode_into_at, encoded_len, encoded_len_at,
};
use crate::error::BoxError;
use crate::wire::{Code, Report};

/// Room reserved after the samples for the metadata of an in-place output. Metadata that needs
/// more (a long string, a vector) still works: the samples are moved to a bigger slot, once.
const META_SLACK: usize = 4096;

/// How one output ended.
pub(crate) enum Outcome {
    /// Published (the byte count went to the stats before publishing).
    Sent,
    /// To be reported in its place (too large, not serializable).
    Report(Report),
    /// The ring is gone (the coordinator died or closed it).
    Gone,
}

/// Where a task's output goes: a reserved slot of the worker's output ring. Only the executor
/// makes one; tasks receive it in [`crate::Task::produce`].
pub struct OutputSink<'a> {
    tx: &'a mut Producer,
    seq: u64,
    before_publish: &'a mut dyn FnMut(usize),
    outcome: Option<Outcome>,
}

impl<'a> OutputSink<'a> {
    pub(crate) fn new(
        tx: &'a mut Producer,
        seq: u64,
        before_publish: &'a mut dyn FnMut(usize),
    ) -> Self {
        OutputSink {
            tx,
            seq,
            before_publish,
            outcome: None,
        }
    }

    pub(crate) fn into_outcome(self) -> Option<Outcome> {
        self.outcome
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

    fn publish(grant: Grant<'_>, seq: u64, n: usize, before: &mut dyn FnMut(usize)) -> Outcome {
        let mut grant = grant;
        grant.truncate(n).set_seq(seq);
        before(n);
        grant.commit();
        Outcome::Sent
    }

    fn encode_failed(&mut self, e: impl std::fmt::Display) {
        self.outcome = Some(Outcome::Report(Report::new(Code::Encode, e.to_string())));
    }

    /// Serializes `value` into a slot of its exact size.
    pub(crate) fn serialize<O: Encode>(&mut self, value: &O) {
        let len = match encoded_len(value) {
            Ok(n) => n,
            Err(e) => return self.encode_failed(e),
        };
        let seq = self.seq;
        let Some(mut grant) = Self::reserve(self.tx, &mut self.outcome, len) else {
            return;
        };
        let outcome = match encode_into(value, &mut grant) {
            Ok(n) => Self::publish(grant, seq, n, self.before_publish),
            Err(e) => Outcome::Report(Report::new(Code::Encode, e.to_string())),
        };
        self.outcome = Some(outcome);
    }

    /// Lets `fill` write `n` samples straight into the ring, then writes the metadata it
    /// returns after them: the output archives as `(Vec<E>, M)`.
    pub(crate) fn samples_then<E: Sample, M: Encode>(
        &mut self,
        n: usize,
        fill: impl FnOnce(&mut [E]) -> Result<M, BoxError>,
    ) -> Result<(), BoxError> {
        let p = Prewritten::<E>::new(n);
        let data = p.data_len();
        let max = self.tx.max_payload();
        let guess = data.saturating_add(META_SLACK).min(max.max(data));
        let seq = self.seq;
        let Some(mut grant) = Self::reserve(self.tx, &mut self.outcome, guess) else {
            return Ok(());
        };
        let Ok(samples) = bytemuck::try_cast_slice_mut::<u8, E>(&mut grant[..data]) else {
            self.outcome = Some(Outcome::Report(Report::new(
                Code::Encode,
                "ring slot not aligned for the samples",
            )));
            return Ok(());
        };
        // An error or a panic here drops the grant unpublished.
        let meta = fill(samples)?;
        let pair = (p, Ref(&meta));
        let end = match encoded_len_at(&pair, data) {
            Ok(end) => end,
            Err(e) => {
                self.outcome = Some(Outcome::Report(Report::new(Code::Encode, e.to_string())));
                return Ok(());
            }
        };
        if end > grant.len() {
            // The metadata needs more room than reserved: move the samples to a bigger slot.
            let moved = grant[..data].to_vec();
            let Some(mut bigger) = Self::reserve(self.tx, &mut self.outcome, end) else {
                return Ok(());
            };
            bigger[..data].copy_from_slice(&moved);
            grant = bigger;
        }
        let outcome = match encode_into_at(&pair, &mut grant, data) {
            Ok(n) => Self::publish(grant, seq, n, self.before_publish),
            Err(e) => Outcome::Report(Report::new(Code::Encode, e.to_string())),
        };
        self.outcome = Some(outcome);
        Ok(())
    }
}

/// Publishes an error report for item `seq`. A message too long for the ring is cut, not lost.
pub(crate) fn send_report(
    tx: &mut Producer,
    seq: u64,
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
    grant.set_kind(FrameKind::Error).set_seq(seq);
    grant.commit();
    Ok(())
}
