//! Time checks: a stage's output chunks held to strax's laws as they pass the coordinator
//! ([`Stages::check_time`](crate::pipeline::Stages::check_time)).
//!
//! The checked stage ends its group, so each output is a frame the coordinator reads in order
//! anyway: it checks that frame's records and range in place (every record inside its chunk and
//! sorted, each chunk starting where the one before ended), before it hands the chunk on. A
//! chunk that breaks a law takes its error's place: [`crate::Error::Time`], inside
//! [`crate::Error::Stage`] naming the stage. Each run's first chunk may start anywhere.

use std::marker::PhantomData;

use rkyv::Archived;

use crate::archive::{Record, Records, decode};
use crate::error::Error;
use crate::time::{Continuity, Interval, TimeError, TimeRange};

/// Checks a stream of output frames, in order.
pub(crate) trait TimeCheck {
    /// Checks one output's archive bytes, the next chunk of the stream (item `seq`): the error
    /// to hand on in its place if it breaks a law.
    fn check(&mut self, bytes: &[u8], seq: u64) -> Result<(), Error>;
    /// A new run: the next chunk starts the stream again.
    fn restart(&mut self);
}

/// The check of outputs `(Records<T>, TimeRange)` of stage `name`.
pub(crate) struct Checker<T> {
    name: String,
    continuity: Continuity,
    _records: PhantomData<fn(T)>,
}

impl<T> Checker<T> {
    pub(crate) fn new(name: &str) -> Self {
        Checker {
            name: name.to_owned(),
            continuity: Continuity::named(name),
            _records: PhantomData,
        }
    }
}

/// Why a chunk failed its check: a law it breaks, or bytes that are not such a chunk.
pub(crate) enum Broken {
    Law(TimeError),
    Unreadable(String),
}

impl<T: Record + Interval> Checker<T> {
    fn check_chunk(&mut self, bytes: &[u8]) -> Result<(), Broken> {
        let chunk = decode::<Archived<(Records<T>, TimeRange)>>(bytes)
            .map_err(|e| Broken::Unreadable(e.to_string()))?;
        let range = chunk.1.to_native();
        match self.continuity.push(range, chunk.0.records()) {
            Ok(_) => Ok(()),
            Err(e) => {
                // One bad chunk is one error: the next is checked against this one.
                self.continuity.skip(range);
                Err(Broken::Law(e))
            }
        }
    }
}

impl<T: Record + Interval> TimeCheck for Checker<T> {
    fn check(&mut self, bytes: &[u8], seq: u64) -> Result<(), Error> {
        let error = match self.check_chunk(bytes) {
            Ok(()) => return Ok(()),
            Err(Broken::Law(error)) => Error::Time { seq, error },
            Err(Broken::Unreadable(reason)) => Error::InvalidOutput { seq, reason },
        };
        Err(Error::Stage {
            stage: self.name.clone(),
            error: Box::new(error),
        })
    }

    fn restart(&mut self) {
        self.continuity = Continuity::named(self.name.as_str());
    }
}
