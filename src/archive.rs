//! rkyv glue: serializing straight into a ring slot, reading archives in place, and numeric
//! arrays and arrays of plain structs ([`records`]) as plain slices.
//!
//! Serializing into shared memory needs the exact size before the slot is reserved, so values are
//! serialized twice: once into a [`Sink`] that only counts, then into the reserved slot. rkyv's
//! output depends only on the values and the start position (0 both times), so the two passes
//! agree; the second pass still checks every write against the slot's end.

use std::cell::Cell;
use std::marker::PhantomData;

use rkyv::api::high::{HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor::{self, Fallible};
use rkyv::ser::allocator::ArenaHandle;
use rkyv::ser::{Positional, Writer};
use rkyv::vec::{ArchivedVec, VecResolver};
use rkyv::{Archive, Place, Portable, Serialize};

#[cfg(not(target_endian = "little"))]
compile_error!(
    "shmexec reads numeric arrays in place as native slices, which needs a little-endian target"
);

pub mod records;

pub use records::{ArchivedRecords, Record, Records};

/// rkyv's error type, used for every serialization and validation here.
pub type RkyvError = rancor::Error;

/// The largest archive shmexec writes. rkyv's relative pointers are 32-bit (its default
/// pointer width), so an offset inside an archive must fit an `i32`: a pointer into a larger
/// archive would make rkyv panic or truncate a length. Every byte goes through a [`Sink`],
/// which refuses to pass this size, so the pointers rkyv resolves afterwards (at the position
/// reached, over the root's inline bytes) stay in range; the margin is for those inline bytes,
/// which rkyv builds on the stack and are far smaller.
pub(crate) const MAX_ARCHIVE: usize = (1 << 31) - (16 << 20);

/// The error of a value whose archive would pass [`MAX_ARCHIVE`].
#[derive(Debug, thiserror::Error)]
#[error(
    "its archive would be {need} bytes or more, past the {MAX_ARCHIVE} bytes that rkyv's 32-bit \
     offsets address: split the chunk"
)]
pub(crate) struct ArchiveTooLarge {
    pub(crate) need: u128,
}

/// Where serialization writes: nowhere (counting bytes) or a slice of shared memory. Public
/// only because [`Encode`]'s bound names it; nothing outside this crate can make one.
pub struct Sink<'a> {
    buf: Option<&'a mut [u8]>,
    pos: usize,
    /// Where a write past [`MAX_ARCHIVE`] leaves the size it needed: rkyv's error keeps no
    /// message in release builds, and this one tells the caller what to do.
    too_large: &'a Cell<usize>,
}

impl Positional for Sink<'_> {
    fn pos(&self) -> usize {
        self.pos
    }
}

impl<E: rancor::Source> Writer<E> for Sink<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), E> {
        let end = self.pos.saturating_add(bytes.len());
        if end > MAX_ARCHIVE {
            self.too_large.set(end);
            return Err(E::new(ArchiveTooLarge { need: end as u128 }));
        }
        if let Some(buf) = self.buf.as_deref_mut() {
            let Some(dst) = buf.get_mut(self.pos..end) else {
                return Err(E::new(SlotOverflow {
                    need: end,
                    have: buf.len(),
                }));
            };
            dst.copy_from_slice(bytes);
        }
        self.pos = end;
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "serialization needs {need} bytes but the slot has {have} (the value changed between passes?)"
)]
struct SlotOverflow {
    need: usize,
    have: usize,
}

/// A type the coordinator (inputs) or a worker (outputs) can serialize into a ring slot. Every
/// type that derives rkyv's `Archive` and `Serialize` is one.
pub trait Encode:
    Archive + for<'a, 'b> Serialize<HighSerializer<Sink<'b>, ArenaHandle<'a>, RkyvError>>
{
}

impl<T> Encode for T where
    T: Archive + for<'a, 'b> Serialize<HighSerializer<Sink<'b>, ArenaHandle<'a>, RkyvError>>
{
}

/// An archived type that can be checked before it is read (rkyv's `bytecheck`).
pub trait Decode: Portable + for<'a> CheckBytes<HighValidator<'a, RkyvError>> {}

impl<T> Decode for T where T: Portable + for<'a> CheckBytes<HighValidator<'a, RkyvError>> {}

/// Why a value could not be serialized.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EncodeError {
    #[error(transparent)]
    TooLarge(ArchiveTooLarge),
    #[error(transparent)]
    Rkyv(RkyvError),
}

/// Serialized size of `value`.
pub(crate) fn encoded_len<T: Encode>(value: &T) -> Result<usize, EncodeError> {
    encoded_len_at(value, 0)
}

/// End of the archive of `value` serialized after `pos` bytes already in place.
pub(crate) fn encoded_len_at<T: Encode>(value: &T, pos: usize) -> Result<usize, EncodeError> {
    serialize(value, None, pos)
}

/// Serializes `value` into `buf` (sized by [`encoded_len`]); returns the bytes written.
pub(crate) fn encode_into<T: Encode>(value: &T, buf: &mut [u8]) -> Result<usize, EncodeError> {
    encode_into_at(value, buf, 0)
}

/// Serializes `value` into `buf` after the `pos` bytes already there; returns the archive end.
pub(crate) fn encode_into_at<T: Encode>(
    value: &T,
    buf: &mut [u8],
    pos: usize,
) -> Result<usize, EncodeError> {
    serialize(value, Some(buf), pos)
}

/// Serializes `value` from `pos` into `buf`, or only counts (`None`); returns the archive end.
fn serialize<T: Encode>(
    value: &T,
    buf: Option<&mut [u8]>,
    pos: usize,
) -> Result<usize, EncodeError> {
    let too_large = Cell::new(0);
    let sink = Sink {
        buf,
        pos,
        too_large: &too_large,
    };
    match rkyv::api::high::to_bytes_in::<_, RkyvError>(value, sink) {
        Ok(sink) => Ok(sink.pos),
        Err(_) if too_large.get() > 0 => Err(EncodeError::TooLarge(ArchiveTooLarge {
            need: too_large.get() as u128,
        })),
        Err(e) => Err(EncodeError::Rkyv(e)),
    }
}

/// Checks that `bytes` hold a valid archive of `A` and returns it, without copying.
pub(crate) fn decode<A: Decode>(bytes: &[u8]) -> Result<&A, RkyvError> {
    rkyv::access::<A, RkyvError>(bytes)
}

/// Reads an archive that [`decode`] accepted before.
///
/// # Safety
///
/// `bytes` must be the very bytes `decode::<A>` accepted, unchanged since.
pub(crate) unsafe fn decode_trusted<A: Portable>(bytes: &[u8]) -> &A {
    // SAFETY: the caller passes bytes that passed `decode::<A>` (validation) and have not
    // changed; that is `access_unchecked`'s contract.
    unsafe { rkyv::access_unchecked::<A>(bytes) }
}

/// A numeric sample type whose archived form has the native layout on this (little-endian)
/// target, so an archived array of it can be read as `&[Self]` in place: `i16` samples from a
/// digitizer, `f32` waveforms, `u64` timestamps...
pub trait Sample:
    bytemuck::Pod + Archive<Archived = <Self as Sample>::Le> + Encode + sealed::Sealed
{
    /// The archived (little-endian) form, same size and alignment.
    type Le: bytemuck::Pod + Decode;
}

mod sealed {
    pub trait Sealed {}
}

macro_rules! samples {
    ($($t:ty => $le:ty),* $(,)?) => {$(
        impl sealed::Sealed for $t {}
        impl Sample for $t {
            type Le = $le;
        }
        impl Samples for ArchivedVec<$le> {
            type Item = $t;
            fn samples(&self) -> &[$t] {
                // Pod to Pod of equal size and alignment (checked below): never fails.
                bytemuck::cast_slice(self.as_slice())
            }
        }
        const _: () = assert!(
            std::mem::size_of::<$t>() == std::mem::size_of::<$le>()
                && std::mem::align_of::<$t>() == std::mem::align_of::<$le>()
        );
    )*};
}

samples! {
    u8 => u8, i8 => i8,
    u16 => rend::u16_le, i16 => rend::i16_le,
    u32 => rend::u32_le, i32 => rend::i32_le,
    u64 => rend::u64_le, i64 => rend::i64_le,
    f32 => rend::f32_le, f64 => rend::f64_le,
}

/// Reads an archived `Vec` of samples as a native slice, in place.
///
/// ```
/// use shmexec::Samples;
/// let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&vec![1.5f32, -2.0])?;
/// let archived = rkyv::access::<rkyv::Archived<Vec<f32>>, rkyv::rancor::Error>(&bytes)?;
/// let samples: &[f32] = archived.samples();
/// assert_eq!(samples, &[1.5, -2.0]);
/// # Ok::<(), rkyv::rancor::Error>(())
/// ```
pub trait Samples {
    /// The native element type.
    type Item;
    /// The elements as a native slice, without copying.
    fn samples(&self) -> &[Self::Item];
}

/// An owned array whose archive is its elements' bytes, then a root that says where they are
/// and how many: a `Vec` of [`Sample`]s, or [`Records`]. Its elements can be written in place
/// before the root ([`Prewritten`]), which is how in-place input and in-place outputs avoid a
/// copy.
pub(crate) trait Array: Archive<Resolver = VecResolver> {
    /// The element type, as the producer writes it and the reader sees it.
    type Elem: bytemuck::Pod;
    /// What the elements are called in an item's error ("samples", "records").
    const NOUN: &'static str;
    /// Writes the root of `len` elements whose bytes start at the resolver's position.
    fn resolve_len(len: usize, resolver: VecResolver, out: Place<Self::Archived>);
}

impl<E: Sample> Array for Vec<E> {
    type Elem = E;
    const NOUN: &'static str = "samples";
    fn resolve_len(len: usize, resolver: VecResolver, out: Place<ArchivedVec<E::Le>>) {
        ArchivedVec::<E::Le>::resolve_from_len(len, resolver, out);
    }
}

/// Stands for an [`Array`] `V` whose `len` elements were already written at offset 0 of the
/// slot: serializing it writes only the root after them. This is how in-place input (see
/// [`crate::Pool::map_in_place`]) becomes a valid archive of `V` without a copy. Offset 0 of a
/// slot is 64-byte aligned, so it is aligned for every element type that can travel.
pub(crate) struct Prewritten<V> {
    len: usize,
    _v: PhantomData<V>,
}

impl<V: Array> Prewritten<V> {
    /// `len` elements, or `Err` (the item's error) if their bytes would make an archive larger
    /// than [`MAX_ARCHIVE`]: rkyv could not point at them.
    pub(crate) fn new(len: usize) -> Result<Self, ArchiveTooLarge> {
        let size = std::mem::size_of::<V::Elem>() as u128;
        // The bytes after the elements: padding and the root (8 bytes), with room to spare.
        if (len as u128) * size + 64 > MAX_ARCHIVE as u128 {
            return Err(ArchiveTooLarge {
                need: (len as u128) * size,
            });
        }
        Ok(Prewritten {
            len,
            _v: PhantomData,
        })
    }

    /// Bytes of the element area (the root follows, aligned). Cannot overflow: `new` bounds it
    /// by [`MAX_ARCHIVE`].
    pub(crate) fn data_len(&self) -> usize {
        self.len * std::mem::size_of::<V::Elem>()
    }

    /// Whole archive size.
    pub(crate) fn archive_len(&self) -> usize {
        self.data_len()
            .next_multiple_of(std::mem::align_of::<V::Archived>())
            + std::mem::size_of::<V::Archived>()
    }

    /// Writes the root after the elements already in `buf[..data_len]`; returns the archive size.
    pub(crate) fn finish(&self, buf: &mut [u8]) -> Result<usize, EncodeError> {
        encode_into_at(self, buf, self.data_len())
    }

    /// The element area of `slot` as elements, for the producer to write.
    pub(crate) fn elements<'s>(&self, slot: &'s mut [u8]) -> Result<&'s mut [V::Elem], String> {
        let area = slot
            .get_mut(..self.data_len())
            .ok_or_else(|| format!("the slot is shorter than the {}", V::NOUN))?;
        bytemuck::try_cast_slice_mut(area)
            .map_err(|e| format!("slot not aligned for the {}: {e:?}", V::NOUN))
    }
}

impl<V: Array> Archive for Prewritten<V> {
    type Archived = V::Archived;
    type Resolver = VecResolver;

    fn resolve(&self, resolver: VecResolver, out: Place<Self::Archived>) {
        V::resolve_len(self.len, resolver, out);
    }
}

impl<V: Array, S: Fallible + ?Sized> Serialize<S> for Prewritten<V> {
    fn serialize(&self, _: &mut S) -> Result<VecResolver, S::Error> {
        // The elements start at position 0 of the archive.
        Ok(VecResolver::from_pos(0))
    }
}

/// Serializes as the value it points to: `(Prewritten<E>, Ref<M>)` archives exactly like
/// `(Vec<E>, M)`, with the samples already in place and `M` written after them.
pub(crate) struct Ref<'a, M>(pub(crate) &'a M);

impl<M: Archive> Archive for Ref<'_, M> {
    type Archived = M::Archived;
    type Resolver = M::Resolver;

    fn resolve(&self, resolver: M::Resolver, out: Place<M::Archived>) {
        self.0.resolve(resolver, out);
    }
}

impl<M: Serialize<S>, S: Fallible + ?Sized> Serialize<S> for Ref<'_, M> {
    fn serialize(&self, serializer: &mut S) -> Result<M::Resolver, S::Error> {
        self.0.serialize(serializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rkyv::Archived;

    #[test]
    fn two_passes_agree_with_rkyv() {
        let v: (Vec<f32>, String, u64) = ((0..1000).map(|i| i as f32).collect(), "run7".into(), 9);
        let len = encoded_len(&v).unwrap();
        let reference = rkyv::to_bytes::<RkyvError>(&v).unwrap();
        assert_eq!(len, reference.len());
        let mut buf = rkyv::util::AlignedVec::<64>::with_capacity(len);
        buf.resize(len, 0);
        assert_eq!(encode_into(&v, &mut buf).unwrap(), len);
        assert_eq!(&buf[..], &reference[..]);
        let a = decode::<Archived<(Vec<f32>, String, u64)>>(&buf).unwrap();
        assert_eq!(a.0.samples()[999], 999.0);
        assert!(encode_into(&v, &mut buf[..len - 1]).is_err());
    }

    #[test]
    fn prewritten_samples_and_metadata_form_a_pair_archive() {
        let samples: Vec<f32> = (0..777).map(|i| i as f32 * 0.25).collect();
        let meta = (42u64, String::from("a name longer than inline"));
        let p = Prewritten::<Vec<f32>>::new(samples.len()).unwrap();
        let mut buf = rkyv::util::AlignedVec::<64>::with_capacity(8192);
        buf.resize(8192, 0);
        bytemuck::cast_slice_mut(&mut buf[..p.data_len()]).copy_from_slice(&samples);
        let pair = (p, Ref(&meta));
        let end = encoded_len_at(&pair, pair.0.data_len()).unwrap();
        assert_eq!(
            encode_into_at(&pair, &mut buf, pair.0.data_len()).unwrap(),
            end
        );
        let reference = rkyv::to_bytes::<RkyvError>(&(samples, meta)).unwrap();
        assert_eq!(&buf[..end], &reference[..]);
    }

    #[test]
    fn prewritten_elements_form_a_vec_archive() {
        for n in [0usize, 1, 3, 1000] {
            let p = Prewritten::<Vec<i16>>::new(n).unwrap();
            let mut buf = rkyv::util::AlignedVec::<64>::with_capacity(p.archive_len());
            buf.resize(p.archive_len(), 0);
            let data: &mut [i16] = bytemuck::cast_slice_mut(&mut buf[..p.data_len()]);
            for (i, x) in data.iter_mut().enumerate() {
                *x = i as i16 - 7;
            }
            assert_eq!(p.finish(&mut buf).unwrap(), p.archive_len());
            let a = decode::<Archived<Vec<i16>>>(&buf).unwrap();
            let expect: Vec<i16> = (0..n).map(|i| i as i16 - 7).collect();
            assert_eq!(a.samples(), &expect[..]);
            assert_eq!(&buf[..], &rkyv::to_bytes::<RkyvError>(&expect).unwrap()[..]);
        }
    }
}
