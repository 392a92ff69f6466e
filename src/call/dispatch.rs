//! Where the next input goes: the one rule, used both to place an input and to decide whether
//! a waiting coordinator has room to place one (the two must agree, or a wake-up would find
//! nothing to do).
//!
//! The rule: the worker with the fewest unfinished items first (ties to the lower index), then
//! any other; a worker takes the input if its process runs, its queue is not full
//! (`Builder::queue_bytes`) and its input ring has room for the archive.

use shmexec_shm::Grant;

use crate::pool::{Life, WorkerSlot};

/// Whether worker `slot` would take an input of `len` archive bytes now. A worker whose
/// process is down (it waits for a successor, or was given up) takes none: its queue waits for
/// the successor, and new input goes to the others.
fn takes(slot: &mut WorkerSlot, len: usize, limit: u64) -> shmexec_shm::Result<bool> {
    if slot.life != Life::Up {
        return Ok(false);
    }
    let room = slot
        .queue_full(limit)
        .and_then(|full| Ok(!full && slot.tx.fits(len)?));
    match room {
        // Its process closed the ring as it exited: a death the supervisor has yet to see.
        Err(shmexec_shm::Error::Closed | shmexec_shm::Error::PeerGone { .. }) => Ok(false),
        other => other,
    }
}

/// The workers in the order the rule tries them.
fn order(slots: &[WorkerSlot]) -> impl Iterator<Item = usize> + use<> {
    let n = slots.len();
    let least = (0..n)
        .min_by_key(|&w| slots[w].expect.unfinished().0)
        .unwrap_or(0);
    std::iter::once(least).chain((0..n).filter(move |&w| w != least))
}

/// Whether any worker would take an input of `len` archive bytes now.
pub(crate) fn has_room(
    slots: &mut [WorkerSlot],
    len: usize,
    limit: u64,
) -> shmexec_shm::Result<bool> {
    for w in order(slots) {
        if takes(&mut slots[w], len, limit)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Reserves a slot of `len` bytes at the worker the rule picks: `None` when no worker takes it
/// now.
pub(crate) fn reserve(
    slots: &mut [WorkerSlot],
    len: usize,
    limit: u64,
) -> shmexec_shm::Result<Option<(usize, Grant<'_>)>> {
    let mut chosen = None;
    for w in order(slots) {
        if takes(&mut slots[w], len, limit)? {
            chosen = Some(w);
            break;
        }
    }
    let Some(w) = chosen else {
        return Ok(None);
    };
    match slots[w].tx.try_reserve(len) {
        Ok(grant) => Ok(grant.map(|g| (w, g))),
        Err(shmexec_shm::Error::Closed | shmexec_shm::Error::PeerGone { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}
