//! [`OutputRef`]: a result read in place from a worker's output ring.

use std::marker::PhantomData;
use std::ops::Deref;

use rkyv::Archived;
use rkyv::api::high::HighDeserializer;
use shmexec_shm::HeldFrame;

use crate::archive::{Decode, RkyvError, decode, decode_trusted};
use crate::error::{Error, Result};
use crate::stats::Timing;
use crate::store::SavedChunk;

/// One result, still inside the worker's output ring (or, from a pipeline stage served from its
/// cache, in the saved chunk's mapped file): it derefs to the archived output without a copy,
/// and frees its ring bytes when dropped.
///
/// Holding many of them holds their worker's ring: when the ring is full of outputs the caller
/// still holds, the worker cannot write the next one, and the call returns
/// [`Error::OutputsHeld`] instead of waiting forever. Drop some and call `next()` again to go on
/// (nothing is lost); calling it again while still holding them all ends the call (so that
/// `collect()` of every result ends too, with that error last). Keep owned values with
/// [`OutputRef::deserialize`] (or copy what you need) to collect a long stream.
pub struct OutputRef<O> {
    frame: Held,
    timing: Timing,
    /// The item's number: the frame's, or, out of a pipeline, the number of the input it
    /// came from.
    seq: u64,
    _out: PhantomData<fn() -> O>,
}

/// Where a result's bytes are.
enum Held {
    /// A frame of a worker's output ring, held.
    Frame(HeldFrame),
    /// A saved chunk, mapped.
    Chunk(SavedChunk),
}

impl Deref for Held {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Held::Frame(f) => f,
            Held::Chunk(c) => c,
        }
    }
}

impl<O: rkyv::Archive<Archived: Decode>> OutputRef<O> {
    /// Validates the frame as an archive of `O` (every output is checked once, here), unless
    /// the pool was built with the unsafe [`crate::Builder::trust_outputs`].
    /// `stamps`, for a pool that times items: when its input was placed, and a clock reading
    /// the call took since it last waited, if any, for the delivery (none: read now). `None`:
    /// the coordinator's half of [`Timing`] stays 0.
    pub(crate) fn new(
        frame: HeldFrame,
        validate: bool,
        stamps: Option<(u64, Option<u64>)>,
    ) -> Result<OutputRef<O>> {
        let [started_ns, finished_ns] = frame.words();
        let (submitted_ns, delivered_ns) = match stamps {
            None => (0, 0),
            // A reading from before the worker finished cannot be the delivery's.
            Some((submitted, recent)) => (
                submitted,
                recent
                    .filter(|&t| t >= finished_ns)
                    .unwrap_or_else(shmexec_shm::clock::now_ns),
            ),
        };
        let timing = Timing {
            submitted_ns,
            started_ns,
            finished_ns,
            delivered_ns,
        };
        let seq = frame.seq();
        Self::checked(Held::Frame(frame), timing, seq, validate)
    }

    /// A saved chunk as output `seq` (checked as an archive of `O` if `validate`).
    pub(crate) fn from_chunk(chunk: SavedChunk, seq: u64, validate: bool) -> Result<Self> {
        Self::checked(Held::Chunk(chunk), Timing::default(), seq, validate)
    }

    fn checked(frame: Held, timing: Timing, seq: u64, validate: bool) -> Result<Self> {
        if validate && let Err(e) = decode::<Archived<O>>(&frame) {
            return Err(Error::InvalidOutput {
                seq,
                reason: e.to_string(),
            });
        }
        Ok(OutputRef {
            frame,
            timing,
            seq,
            _out: PhantomData,
        })
    }

    /// The same frame as an output of type `P`, numbered `seq` (checked as an archive of `P`
    /// if `validate`): the last group of a pipeline hands its frames out this way.
    pub(crate) fn retype<P: rkyv::Archive<Archived: Decode>>(
        self,
        seq: u64,
        validate: bool,
    ) -> Result<OutputRef<P>> {
        OutputRef::<P>::checked(self.frame, self.timing, seq, validate)
    }

    /// The frame itself, held (`None` for a saved chunk).
    pub(crate) fn into_frame(self) -> Option<HeldFrame> {
        match self.frame {
            Held::Frame(f) => Some(f),
            Held::Chunk(_) => None,
        }
    }

    /// When this result's input was handed to a worker, when the worker started and finished
    /// it, and when it was handed to the caller (the first and last are 0 in a pool built with
    /// `item_timing(false)`).
    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// The item's sequence number: its 0-based position in the pool's input stream (all calls
    /// of the pool count on from one another).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The archive's bytes in the ring.
    pub fn bytes(&self) -> &[u8] {
        &self.frame
    }

    /// An owned copy of the output, which outlives the ring slot.
    pub fn deserialize(&self) -> Result<O>
    where
        Archived<O>: rkyv::Deserialize<O, HighDeserializer<RkyvError>>,
    {
        rkyv::deserialize::<O, RkyvError>(&**self).map_err(|e| Error::InvalidOutput {
            seq: self.seq(),
            reason: format!("deserialize: {e}"),
        })
    }
}

impl<O: rkyv::Archive<Archived: Decode>> Deref for OutputRef<O> {
    type Target = Archived<O>;
    fn deref(&self) -> &Archived<O> {
        // SAFETY: `checked` validated exactly these bytes as an `Archived<O>` (or the pool's
        // owner vouched for them with the unsafe `Builder::trust_outputs`), and they have not
        // changed: a frame is held, so the ring protocol keeps the producer (the worker) from
        // writing them until this `OutputRef` is dropped, and a saved chunk's file is never
        // written once saved (`crate::store`). (A worker that scribbles over memory it has
        // already published is outside the model; see the README's failure model.)
        unsafe { decode_trusted::<Archived<O>>(&self.frame) }
    }
}

impl<O: rkyv::Archive<Archived: Decode + std::fmt::Debug>> std::fmt::Debug for OutputRef<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputRef")
            .field("seq", &self.seq())
            .field("value", &**self)
            .finish()
    }
}
