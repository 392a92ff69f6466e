//! Collecting what one worker published: its output ring's frames turned into the call's
//! results, with what else a ring holds handled on the way (a replacement's start-up report,
//! outputs published again after a death, an abandoned call's outputs). The rules are in
//! `src/wire/PROTOCOL.md` ("Output ring").

use shmexec_shm::FrameKind;

use super::engine::Call;
use crate::error::{Error, Result};
use crate::output::OutputRef;
use crate::pool::queue::Queue;
use crate::pool::{Life, Supervisor, WorkerSlot};
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
            if let Some(lost) = give_up_front(slot, w) {
                match lost {
                    Some(e) => return Ok(Some(Took::Output(Err(e), true))),
                    None => continue,
                }
            }
            let frame = match slot.rx.try_peek() {
                Ok(Some(f)) => f,
                Ok(None) => {
                    if let Some(reason) = slot.lost_output() {
                        // Its stamps or headers were overwritten: start the ring afresh.
                        sup.reset_output(w, &reason)
                            .map_err(|e| sup.break_with(e))?;
                        continue; // the items it had finished fail above
                    }
                    return Ok(None);
                }
                Err(shmexec_shm::Error::PeerGone { .. } | shmexec_shm::Error::Closed) => {
                    // Everything it published has been read: replace it.
                    if slot.life != Life::Up {
                        return Ok(None);
                    }
                    sup.on_death(w);
                    continue;
                }
                Err(e) => {
                    // A header failed its checks: nothing behind it can be found.
                    sup.reset_output(w, &e.to_string())
                        .map_err(|e| sup.break_with(e))?;
                    continue;
                }
            };
            let (seq, kind) = (frame.seq(), frame.kind());
            if seq == START_SEQ {
                // A successor's start-up report: one that will not serve (its `init` failed)
                // then exits, and that death counts as a failed start.
                if kind == FrameKind::Error {
                    slot.init_error = Some(read_report(w, seq, &frame, &[]).to_string());
                }
                frame.release();
                continue;
            }
            let screened = screen(
                (&mut slot.expect, &mut slot.next_part, &mut slot.live),
                (seq, kind, frame.part()),
            );
            let (replayed, submitted_ns) = match screened {
                Screen::Skip => {
                    frame.release();
                    continue;
                }
                Screen::Lost { consume, due, live } => {
                    let part = frame.part();
                    if consume {
                        frame.release();
                    }
                    if !live {
                        continue;
                    }
                    let e = Error::InvalidOutput {
                        seq: due,
                        reason: format!(
                            "worker {w} sent a {kind:?} frame of item {seq} part {part} where \
                             this item's output was due: a frame header in its output ring is \
                             corrupt, and the item's output is lost"
                        ),
                    };
                    return Ok(Some(Took::Output(Err(e), true)));
                }
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
                    let mut e = read_report(w, seq, &frame, &sup.config.stage_names);
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
    /// The item `due` lost its output (its frames were corrupted): it is closed with an error
    /// (`live`: it belongs to the current call). With `consume`, the frame is taken as that
    /// item's (its header is garbage); without, it is the next item's and is read again.
    Lost { consume: bool, due: u64, live: bool },
    /// Hand it out (`replayed`: its part was taken before, see `PROTOCOL.md`).
    Take { replayed: bool, submitted_ns: u64 },
}

/// Checks a frame against what the worker owes (`expect`: its items in order, `next_part` of
/// the oldest, `live`: how many belong to the current call), and moves the books past it: an
/// item whose closing frame this is, or whose output is lost, leaves the queue.
fn screen(
    (expect, next_part, live): (&mut Queue, &mut u32, &mut usize),
    (seq, kind, part): (u64, FrameKind, u32),
) -> Screen {
    let Some(front) = expect.front().copied() else {
        // Nothing is due: an item closed already, published again (its worker died before
        // releasing the input), or garbage.
        return Screen::Skip;
    };
    // An item already closed, published again.
    if seq < front.seq {
        return Screen::Skip;
    }
    let replayed = part < *next_part;
    if seq == front.seq && replayed && kind == FrameKind::More {
        return Screen::Skip; // taken already, before its worker died
    }
    let lost = if seq > front.seq {
        // The due item's closing frame never came: a later item's frame (read again once the
        // due item is closed), or one whose seq is garbage (taken as the due item's).
        Some(!expect.contains(seq))
    } else if part > *next_part && kind != FrameKind::Error {
        Some(true) // outputs of this item are missing
    } else {
        None
    };
    if kind == FrameKind::More && lost.is_none() {
        *next_part += 1;
    } else {
        // The item is closed: it leaves the worker's queue.
        expect.pop_front();
        *next_part = 0;
        if front.live {
            *live -= 1;
        }
    }
    if let Some(consume) = lost {
        return Screen::Lost {
            consume,
            due: front.seq,
            live: front.live,
        };
    }
    if !front.live {
        return Screen::Skip; // an abandoned call's output
    }
    Screen::Take {
        replayed,
        submitted_ns: front.submitted_ns,
    }
}

/// Closes the front item of worker `slot` (index `w`) without output when it can no longer
/// come: the worker was given up (`WorkerLost`), or its input was released with no closing
/// frame left to read (the frame was lost to a corrupt header). `None` when the front item is
/// not lost; `Some(None)` when it was an abandoned call's (nothing to report).
fn give_up_front(slot: &mut WorkerSlot, w: usize) -> Option<Option<Error>> {
    let front = *slot.expect.front()?;
    let error = if slot.life == Life::Failed {
        // Published results are read first: only an empty ring means the item is lost.
        if !matches!(
            slot.rx.try_peek(),
            Ok(None) | Err(shmexec_shm::Error::PeerGone { .. } | shmexec_shm::Error::Closed)
        ) {
            return None;
        }
        Error::WorkerLost {
            seq: front.seq,
            worker: w,
            reason: slot.given_up(),
        }
    } else {
        let (released, reason) = slot.lost_outputs.clone()?;
        if front.end > released {
            slot.lost_outputs = None;
            return None;
        }
        Error::InvalidOutput {
            seq: front.seq,
            reason: format!("its output was lost: worker {w}'s output ring was corrupt ({reason})"),
        }
    };
    slot.expect.pop_front();
    slot.next_part = 0;
    if !front.live {
        return Some(None);
    }
    slot.live -= 1;
    Some(Some(error))
}
