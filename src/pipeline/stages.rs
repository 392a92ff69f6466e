//! The stage kinds that are not plain [`crate::Task`]s: a filter passes its input on as it is,
//! and a sink (`each`) consumes it.

use std::marker::PhantomData;

use rkyv::Archived;

use crate::archive::{Decode, Encode, decode};
use crate::task::bytes::{ByteTask, ItemFailure};
use crate::task::sink::OutputSink;

/// Reads `input` as an archive of `T`.
fn read<T: Encode<Archived: Decode>>(input: &[u8]) -> Result<&Archived<T>, ItemFailure> {
    decode::<Archived<T>>(input).map_err(|e| ItemFailure::InvalidInput(e.to_string()))
}

/// Keeps the items `keep` says yes to, passing each on as the archive it arrived as: to the
/// next fused stage with no copy, into the output ring with one.
pub(crate) struct Filter<T, F> {
    keep: F,
    _item: PhantomData<fn(T)>,
}

impl<T, F> Filter<T, F> {
    pub(crate) fn new(keep: F) -> Self {
        Filter {
            keep,
            _item: PhantomData,
        }
    }
}

impl<T, F> ByteTask for Filter<T, F>
where
    T: Encode<Archived: Decode>,
    F: FnMut(&Archived<T>) -> bool,
{
    fn run(&mut self, input: &[u8], out: &mut OutputSink<'_>) -> Result<(), ItemFailure> {
        if (self.keep)(read::<T>(input)?) {
            out.emit_archive(input)?;
        }
        Ok(())
    }
}

/// Runs `f` on every item and gives no output: the pipeline's last stage, a sink.
pub(crate) struct Each<T, F> {
    f: F,
    _item: PhantomData<fn(T)>,
}

impl<T, F> Each<T, F> {
    pub(crate) fn new(f: F) -> Self {
        Each {
            f,
            _item: PhantomData,
        }
    }
}

impl<T, F> ByteTask for Each<T, F>
where
    T: Encode<Archived: Decode>,
    F: FnMut(&Archived<T>) -> Result<(), crate::BoxError>,
{
    fn run(&mut self, input: &[u8], _out: &mut OutputSink<'_>) -> Result<(), ItemFailure> {
        (self.f)(read::<T>(input)?).map_err(ItemFailure::Failed)
    }
}
