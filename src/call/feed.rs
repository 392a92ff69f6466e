//! Where a call's inputs come from: each feed says how big its next archive is, then writes it
//! into the ring slot the engine reserved for it.

use std::borrow::Borrow;
use std::marker::PhantomData;

use crate::archive::{Array, Encode, Prewritten, encode_into, encoded_len};
use crate::error::BoxError;

/// A source of inputs for one call.
pub(crate) trait Feed {
    /// Gets the next input ready and returns its archive size; `None` when there are no more.
    /// An `Err` is that input's error (it is skipped). After `Some(Ok(_))` the next call must be
    /// `write` or `skip`.
    fn prepare(&mut self) -> Option<Result<usize, String>>;
    /// Writes the prepared input into `slot` (of the size `prepare` gave); returns the archive
    /// length.
    fn write(&mut self, slot: &mut [u8]) -> Result<usize, String>;
    /// Drops the prepared input (it does not fit any ring).
    fn skip(&mut self);
    /// Whether `write` copies the payload from the caller's memory (for the stats).
    fn copies(&self) -> bool;
    /// How many inputs are left after the prepared one, if the source knows.
    fn remaining(&self) -> Option<u64>;
    /// After `prepare` gave `None`: whether that is the end (the default), or only that no
    /// input is there yet (a live source).
    fn ended(&self) -> bool {
        true
    }
    /// Whether an input is there to prepare now (a live source's; a waiter's condition).
    fn has_input(&self) -> bool {
        false
    }
}

/// Inputs serialized from the caller's values: one copy into the ring ([`crate::Pool::map`]).
pub(crate) struct SerializeFeed<I: Iterator, In> {
    iter: I,
    pending: Option<I::Item>,
    _in: PhantomData<fn(In)>,
}

impl<I: Iterator, In> SerializeFeed<I, In> {
    pub(crate) fn new(iter: I) -> Self {
        SerializeFeed {
            iter,
            pending: None,
            _in: PhantomData,
        }
    }
}

/// What an iterator says of its length, when it knows it exactly.
fn exact_len(hint: (usize, Option<usize>)) -> Option<u64> {
    match hint {
        (lo, Some(hi)) if lo == hi => Some(lo as u64),
        _ => None,
    }
}

impl<I, In> Feed for SerializeFeed<I, In>
where
    I: Iterator,
    I::Item: Borrow<In>,
    In: Encode,
{
    fn prepare(&mut self) -> Option<Result<usize, String>> {
        let item = self.iter.next()?;
        let len = encoded_len(item.borrow()).map_err(|e| e.to_string());
        if len.is_ok() {
            self.pending = Some(item);
        }
        Some(len)
    }

    fn skip(&mut self) {
        self.pending = None;
    }

    fn write(&mut self, slot: &mut [u8]) -> Result<usize, String> {
        let item = self.pending.take().ok_or("no input prepared")?;
        encode_into(item.borrow(), slot).map_err(|e| e.to_string())
    }

    fn copies(&self) -> bool {
        true
    }

    fn remaining(&self) -> Option<u64> {
        exact_len(self.iter.size_hint())
    }
}

/// Inputs written in place by the caller's fill function, as archives of the array `V` (a
/// `Vec` of samples or [`crate::Records`]): no copy ([`crate::Pool::map_in_place`],
/// [`crate::Pool::map_records_in_place`]).
pub(crate) struct FillFeed<L, F, V> {
    lens: L,
    fill: F,
    pending: Option<Prewritten<V>>,
    index: u64,
}

impl<L, F, V> FillFeed<L, F, V> {
    pub(crate) fn new(lens: L, fill: F) -> Self {
        FillFeed {
            lens,
            fill,
            pending: None,
            index: 0,
        }
    }
}

impl<L, F, V> Feed for FillFeed<L, F, V>
where
    L: Iterator<Item = usize>,
    F: FnMut(u64, &mut [V::Elem]) -> Result<(), BoxError>,
    V: Array,
{
    fn prepare(&mut self) -> Option<Result<usize, String>> {
        let len = self.lens.next()?;
        let p = match Prewritten::<V>::new(len) {
            Ok(p) => p,
            Err(e) => return Some(Err(format!("an in-place chunk of {len} {}: {e}", V::NOUN))),
        };
        let n = p.archive_len();
        self.pending = Some(p);
        Some(Ok(n))
    }

    fn skip(&mut self) {
        self.pending = None;
        self.index += 1;
    }

    fn write(&mut self, slot: &mut [u8]) -> Result<usize, String> {
        let p = self.pending.take().ok_or("no input prepared")?;
        let index = self.index;
        self.index += 1;
        (self.fill)(index, p.elements(slot)?).map_err(|e| e.to_string())?;
        p.finish(slot).map_err(|e| e.to_string())
    }

    fn copies(&self) -> bool {
        false
    }

    fn remaining(&self) -> Option<u64> {
        exact_len(self.lens.size_hint())
    }
}

/// Inputs that are slices of the caller's memory, each copied once into the ring as an archive
/// of the array `V` ([`crate::Pool::map_slices`], [`crate::Pool::map_record_slices`]): no `Vec`
/// per chunk on the way.
pub(crate) struct SliceFeed<'s, I, V: Array> {
    slices: I,
    pending: Option<&'s [V::Elem]>,
}

impl<'s, I, V: Array> SliceFeed<'s, I, V> {
    pub(crate) fn new(slices: I) -> Self {
        SliceFeed {
            slices,
            pending: None,
        }
    }
}

impl<'s, I, V> Feed for SliceFeed<'s, I, V>
where
    I: Iterator<Item = &'s [V::Elem]>,
    V: Array,
{
    fn prepare(&mut self) -> Option<Result<usize, String>> {
        let slice = self.slices.next()?;
        match Prewritten::<V>::new(slice.len()) {
            Ok(p) => {
                self.pending = Some(slice);
                Some(Ok(p.archive_len()))
            }
            Err(e) => Some(Err(format!("a slice of {} {}: {e}", slice.len(), V::NOUN))),
        }
    }

    fn skip(&mut self) {
        self.pending = None;
    }

    fn write(&mut self, slot: &mut [u8]) -> Result<usize, String> {
        let slice = self.pending.take().ok_or("no input prepared")?;
        let p = Prewritten::<V>::new(slice.len()).map_err(|e| e.to_string())?;
        p.elements(slot)?.copy_from_slice(slice);
        p.finish(slot).map_err(|e| e.to_string())
    }

    fn copies(&self) -> bool {
        true
    }

    fn remaining(&self) -> Option<u64> {
        exact_len(self.slices.size_hint())
    }
}
