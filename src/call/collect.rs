//! Collecting what one worker published: its output ring's frames turned into the call's
//! results, with what else a ring holds handled on the way (a replacement's start-up report,
//! outputs published again after a death, an abandoned call's outputs). The rules are in
//! `src/wire/PROTOCOL.md` ("Output ring").

use shmexec_shm::FrameKind;

use super::engine::Call;
use crate::error::{Error, Result};
use crate::output::OutputRef;
use crate::pool::Supervisor;
use crate::pool::queue::Queue;
use crate::task::Task;
use crate::wire::{START_SEQ, read_report};

/// What [`Call::take`] found.
pub(super) enum Took<O> {
    /// An output or an item's error; `true` when it closes its item.
    Output(Result<OutputRef<O>>, bool),
    /// An item closed with no further output.
    Closed,
}

impl Call {
    /// Takes the next frame of worker `w` that means something to the caller, if one is
    /// there, handling what else its ring holds: a replacement's start-up report, outputs
    /// published again (by a replacement that re-ran an item its predecessor died on), an
    /// abandoned call's outputs. With `stale_only`, stops before an output of this call.
    pub(super) fn take<T: Task>(
        &mut self,
        sup: &mut Supervisor<T>,
        w: usize,
        stale_only: bool,
    ) -> Result<Option<Took<T::Output>>> {
        loop {
            let (validate, timed) = (sup.config().validate_outputs, sup.config().item_timing);
            let slot = &mut sup.slots[w];
            if stale_only && !slot.has_stale_front() {
                return Ok(None);
            }
            let frame = match slot.rx.try_peek() {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(None),
                Err(shmexec_shm::Error::PeerGone { .. } | shmexec_shm::Error::Closed) => {
                    // Everything it published has been read: replace it.
                    sup.respawn(w).map_err(|e| sup.break_with(e))?;
                    continue;
                }
                Err(e) => return Err(sup.break_with(e.into())),
            };
            let (seq, kind) = (frame.seq(), frame.kind());
            if seq == START_SEQ {
                // A replacement's start-up report.
                let report = (kind == FrameKind::Error).then(|| read_report(w, seq, &frame));
                frame.release();
                match report {
                    None => continue,
                    Some(e) => return Err(sup.break_with(e)),
                }
            }
            let screened = screen(
                (&mut slot.expect, &mut slot.next_part, &mut slot.live),
                w,
                (seq, kind, frame.part()),
            );
            let (replayed, submitted_ns) = match screened {
                Screen::Skip => {
                    frame.release();
                    continue;
                }
                Screen::Broken(e) => return Err(sup.break_with(e)),
                Screen::Take {
                    replayed,
                    submitted_ns,
                } => (replayed, submitted_ns),
            };
            let result = match kind {
                // A closing output at a part taken already: a replacement re-ran the item and
                // produced fewer outputs than its predecessor; the item is closed with what
                // was handed out.
                FrameKind::Data | FrameKind::Done if replayed => {
                    frame.release();
                    return Ok(Some(Took::Closed));
                }
                FrameKind::Data | FrameKind::More => {
                    let n = frame.len() as u64;
                    self.stats.output_bytes += n;
                    sup.totals.output_bytes += n;
                    let stamps = timed.then_some((submitted_ns, self.clock));
                    OutputRef::new(frame.hold(), validate, stamps)
                }
                FrameKind::Done => {
                    frame.release();
                    return Ok(Some(Took::Closed));
                }
                FrameKind::Error => {
                    let mut e = read_report(w, seq, &frame);
                    frame.release();
                    if let Error::WorkerCrashed {
                        signal, crashes, ..
                    } = &mut e
                    {
                        let record = sup.crash_record(seq);
                        (*crashes, *signal) = (record.count, record.signal);
                        if let Some(after) = record.timed_out {
                            e = Error::ChunkTimeout { seq, after };
                        }
                    }
                    Err(e)
                }
                FrameKind::End => {
                    let e = Error::Broken(format!("worker {w} ended its output unasked"));
                    return Err(sup.break_with(e));
                }
            };
            return Ok(Some(Took::Output(result, kind != FrameKind::More)));
        }
    }
}

/// What to do with a frame of item `seq` (kind, part) read from worker `w`'s ring.
enum Screen {
    /// Seen already, or of an abandoned call: release it and read on.
    Skip,
    /// A frame the protocol does not allow there.
    Broken(Error),
    /// Hand it out (`replayed`: its part was taken before, see `PROTOCOL.md`).
    Take { replayed: bool, submitted_ns: u64 },
}

/// Checks a frame against what the worker owes (`expect`: its items in order, `next_part` of
/// the oldest, `live`: how many belong to the current call), and moves the books past it: an
/// item whose closing frame this is leaves the queue.
fn screen(
    (expect, next_part, live): (&mut Queue, &mut u32, &mut usize),
    w: usize,
    (seq, kind, part): (u64, FrameKind, u32),
) -> Screen {
    let due = expect.front().map(|e| e.seq);
    match due {
        // An item already closed, published again (its first worker died before releasing
        // the input).
        Some(due) if seq < due => return Screen::Skip,
        Some(due) if seq == due => {}
        _ => {
            return Screen::Broken(Error::Broken(format!(
                "worker {w} returned item {seq}, expected {due:?}"
            )));
        }
    }
    let replayed = part < *next_part;
    if replayed && kind == FrameKind::More {
        return Screen::Skip; // taken already, before its worker died
    }
    if part > *next_part && kind != FrameKind::Error {
        return Screen::Broken(Error::Broken(format!(
            "worker {w} sent output {part} of item {seq}, expected {next_part}"
        )));
    }
    let front = expect.front().copied();
    let is_live = front.is_some_and(|e| e.live);
    if kind == FrameKind::More {
        *next_part += 1;
    } else {
        // The item is closed: it leaves the worker's queue.
        expect.pop_front();
        *next_part = 0;
        if is_live {
            *live -= 1;
        }
    }
    if !is_live {
        return Screen::Skip; // an abandoned call's output
    }
    Screen::Take {
        replayed,
        submitted_ns: front.map_or(0, |e| e.submitted_ns),
    }
}
