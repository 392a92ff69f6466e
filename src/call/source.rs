//! [`Source`]: the inputs of a blocking call, placed into a pool's input rings as room allows.
//! One rule for [`super::Map`] and for the first group of a pipeline.

use super::engine::{Call, Placed};
use super::feed::Feed;
use crate::error::{Error, Result};
use crate::pool::Supervisor;
use crate::task::Task;

/// The most inputs one step places before it looks for results: with workers that keep up
/// with the source, room never runs out, and the caller would get no result until the input
/// did.
const PUMP_AT_MOST: u32 = 64;

/// A call's inputs and where they stand.
pub(crate) struct Source<'a> {
    feed: Box<dyn Feed + 'a>,
    /// Archive size of the input the feed holds ready, waiting for ring space.
    prepared: Option<usize>,
    feeding: bool,
    /// Why no more input can be placed (every worker was given up): reported once the items
    /// in flight are handed out.
    refused: Option<Error>,
}

impl<'a> Source<'a> {
    pub(crate) fn new(feed: Box<dyn Feed + 'a>) -> Self {
        Source {
            feed,
            prepared: None,
            feeding: true,
            refused: None,
        }
    }

    /// Whether inputs may still come.
    pub(crate) fn feeding(&self) -> bool {
        self.feeding
    }

    /// Whether a live source has an input there to place now.
    pub(crate) fn has_input(&self) -> bool {
        self.feeding && self.prepared.is_none() && self.feed.has_input()
    }

    /// The size of the input waiting for room, if one is.
    pub(crate) fn prepared(&self) -> Option<usize> {
        self.prepared
    }

    /// Why the pool refused further inputs, once (to be reported after what is in flight).
    pub(crate) fn take_refused(&mut self) -> Option<Error> {
        self.refused.take()
    }

    /// Places inputs until no worker has room, the inputs run out or [`PUMP_AT_MOST`] were
    /// placed. Never waits.
    pub(crate) fn pump<T: Task>(&mut self, call: &mut Call, sup: &mut Supervisor<T>) -> Result<()> {
        for _ in 0..PUMP_AT_MOST {
            if !self.feeding {
                break;
            }
            // Workers that keep up with the source keep making room, so placing could go on
            // for the whole input: the health check counts placements too.
            call.tick(sup)?;
            // An input stays prepared in the feed while no ring has room for it.
            let len = match self.prepared {
                Some(len) => len,
                None => match self.feed.prepare() {
                    None => {
                        // A live source with nothing yet goes on feeding later.
                        self.feeding = !self.feed.ended();
                        break;
                    }
                    Some(Err(reason)) => {
                        call.fail_input(sup, reason);
                        continue;
                    }
                    Some(Ok(len)) => len,
                },
            };
            self.prepared = Some(len);
            let copies = self.feed.copies();
            let mut wrote = false;
            let feed = &mut self.feed;
            let placed = call.place(sup, len, copies, &mut |slot| {
                wrote = true;
                feed.write(slot)
            });
            let placed = match placed {
                Ok(p) => p,
                // What is in flight is handed out first (results, or why each was not run).
                Err(e) if call.pending(sup) > 0 => {
                    self.feeding = false;
                    self.refused = Some(e);
                    break;
                }
                Err(e) => return Err(e),
            };
            match placed {
                Placed::NoRoom => break,
                Placed::Item { .. } => {
                    if !wrote {
                        self.feed.skip(); // too large for any ring: its error takes its place
                    }
                    self.prepared = None;
                }
            }
        }
        Ok(())
    }

    /// Inputs the caller has not had placed yet, if known.
    pub(crate) fn unplaced(&self) -> Option<u64> {
        if !self.feeding {
            return Some(0);
        }
        let rest = self.feed.remaining()?;
        Some(rest + u64::from(self.prepared.is_some()))
    }
}
