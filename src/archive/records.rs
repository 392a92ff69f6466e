//! Arrays of plain structs ("records"): fixed-size, `Copy`, every bit pattern valid, as numpy's
//! structured arrays are. They travel as their bytes and are read as `&[T]` where they lie, with
//! no deserialization.
//!
//! A [`Records<T>`] archives as the records' bytes, aligned for `T`, then an 8-byte root (where
//! they are, how many bytes): a packed 244-byte record takes 244 bytes per record in the
//! archive, no padding between records. The archived form, [`ArchivedRecords<T>`], is checked
//! like every archive before it is read: its bytes must be a whole number of records and start
//! aligned for `T`, so a mis-sized or misplaced payload is an invalid archive (an item's
//! `InvalidInput` in a worker, `InvalidOutput` for the caller), never a bad read.
//!
//! The bytes are read in the target's own layout: little-endian (shmexec builds only there), and
//! the same struct definition on both sides, as with any shared-memory array. Deriving `Pod`
//! takes bytemuck's `derive` feature, and `min_const_generics` for arrays of any length (such as
//! the 110 samples below).
//!
//! ```
//! use bytemuck::{Pod, Zeroable};
//! use shmexec::Records;
//!
//! /// A strax-like raw record: a digitizer pulse fragment, packed as numpy packs it.
//! #[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
//! #[repr(C, packed)]
//! struct RawRecord {
//!     time: i64,
//!     length: i32,
//!     dt: i16,
//!     channel: i16,
//!     pulse_length: i32,
//!     record_i: i16,
//!     baseline: i16,
//!     data: [i16; 110],
//! }
//! assert_eq!(std::mem::size_of::<RawRecord>(), 244);
//!
//! let records = Records(vec![RawRecord::zeroed(); 3]);
//! let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&records)?;
//! assert_eq!(bytes.len(), 3 * 244 + 8);
//! let archived = rkyv::access::<rkyv::Archived<Records<RawRecord>>, rkyv::rancor::Error>(&bytes)?;
//! let read: &[RawRecord] = archived.records(); // in place
//! assert_eq!(read, &records.0[..]);
//! # Ok::<(), rkyv::rancor::Error>(())
//! ```

use std::marker::PhantomData;

use rkyv::bytecheck::{CheckBytes, Verify};
use rkyv::munge::munge;
use rkyv::rancor::{Fallible, Source, fail};
use rkyv::ser::Writer;
use rkyv::vec::{ArchivedVec, VecResolver};
use rkyv::{Archive, Deserialize, Place, Portable, Serialize};

use super::Array;

/// A plain struct that can travel as a record: any `bytemuck::Pod` type (`#[repr(C)]`, `Copy`,
/// no padding, every bit pattern valid), derived with `#[derive(Pod, Zeroable)]`. Its size must
/// not be 0 and its alignment at most 64 bytes (a frame's), which a build checks where the type
/// is used.
pub trait Record: bytemuck::Pod {}

impl<T: bytemuck::Pod> Record for T {}

/// An owned array of records, to send as a chunk or return as an output; it archives as
/// [`ArchivedRecords<T>`]. See the [module doc](self).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Records<T>(pub Vec<T>);

/// The archived [`Records<T>`]: read it in place with [`records`](Self::records).
#[derive(CheckBytes, Portable)]
#[bytecheck(crate = rkyv::bytecheck, verify)]
#[rkyv(crate = rkyv)]
#[repr(C)]
pub struct ArchivedRecords<T> {
    /// The records' bytes.
    bytes: ArchivedVec<u8>,
    _t: PhantomData<T>,
}

impl<T: Record> ArchivedRecords<T> {
    /// The records, in place.
    pub fn records(&self) -> &[T] {
        // Validation checked the length and the alignment, so the cast cannot fail; bytes that
        // were not validated (`Builder::trust_outputs`) and do not fit make it panic, not
        // misread.
        bytemuck::cast_slice(self.bytes.as_slice())
    }

    /// The number of records.
    pub fn len(&self) -> usize {
        self.bytes.len() / size_of::<T>()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// Why an archive's bytes are not records of `T`.
#[derive(Debug, thiserror::Error)]
#[error(
    "{len} bytes at an address {offset} past a multiple of {align} are not records of {size} \
     bytes aligned to {align}"
)]
struct NotRecords {
    len: usize,
    offset: usize,
    size: usize,
    align: usize,
}

// SAFETY: `verify` only adds conditions: the derived check has already checked `bytes` as an
// `ArchivedVec<u8>` (in bounds, claimed), so reading its slice here is sound, and a value is
// accepted only if those bytes also cast to `&[T]` (length a multiple of `size_of::<T>()`,
// start aligned for `T`), which is what `records` relies on.
unsafe impl<T: Record, C: Fallible + ?Sized> Verify<C> for ArchivedRecords<T>
where
    C::Error: Source,
{
    fn verify(&self, _: &mut C) -> Result<(), C::Error> {
        let bytes = self.bytes.as_slice();
        if bytemuck::try_cast_slice::<u8, T>(bytes).is_err() {
            fail!(NotRecords {
                len: bytes.len(),
                offset: bytes.as_ptr() as usize % align_of::<T>(),
                size: size_of::<T>(),
                align: align_of::<T>(),
            });
        }
        Ok(())
    }
}

/// Fails the build for a record type that cannot travel: of size 0, or aligned past a frame.
const fn check_layout<T>() {
    const {
        assert!(size_of::<T>() > 0, "a record type must not be of size 0");
        assert!(
            align_of::<T>() <= shmexec_shm::frame::FRAME_ALIGN,
            "a record type must not be aligned past 64 bytes (a frame's alignment)"
        );
    }
}

impl<T: Record> Array for Records<T> {
    type Elem = T;
    const NOUN: &'static str = "records";
    fn resolve_len(len: usize, resolver: VecResolver, out: Place<ArchivedRecords<T>>) {
        check_layout::<T>();
        munge!(let ArchivedRecords { bytes, _t: _ } = out);
        ArchivedVec::<u8>::resolve_from_len(len * size_of::<T>(), resolver, bytes);
    }
}

impl<T: Record> Archive for Records<T> {
    type Archived = ArchivedRecords<T>;
    type Resolver = VecResolver;

    fn resolve(&self, resolver: VecResolver, out: Place<ArchivedRecords<T>>) {
        <Self as Array>::resolve_len(self.0.len(), resolver, out);
    }
}

impl<T: Record, S: Fallible + Writer<S::Error> + ?Sized> Serialize<S> for Records<T> {
    fn serialize(&self, serializer: &mut S) -> Result<VecResolver, S::Error> {
        check_layout::<T>();
        // Pad to the records' alignment (at most 64, checked above), then write them as they
        // are.
        let pad = serializer.pos().next_multiple_of(align_of::<T>()) - serializer.pos();
        serializer.write(&[0; shmexec_shm::frame::FRAME_ALIGN][..pad])?;
        let pos = serializer.pos();
        serializer.write(bytemuck::cast_slice(&self.0))?;
        Ok(VecResolver::from_pos(pos))
    }
}

impl<T: Record, D: Fallible + ?Sized> Deserialize<Records<T>, D> for ArchivedRecords<T> {
    fn deserialize(&self, _: &mut D) -> Result<Records<T>, D::Error> {
        Ok(Records(self.records().to_vec()))
    }
}

impl<T: Record + std::fmt::Debug> std::fmt::Debug for ArchivedRecords<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.records()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::{Prewritten, RkyvError, decode, encode_into_at, encoded_len_at};
    use rkyv::Archived;

    #[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
    #[repr(C)]
    struct Hit {
        time: f64,
        area: f32,
        channel: u32,
    }

    fn hits(n: usize) -> Vec<Hit> {
        (0..n)
            .map(|i| Hit {
                time: i as f64 * 10.0,
                area: i as f32,
                channel: i as u32 % 7,
            })
            .collect()
    }

    #[test]
    fn records_after_a_misaligning_field_are_aligned_and_read_back() {
        // 13 bytes of string first: the records must be padded to 8, not follow at offset 13.
        let value = (String::from("thirteen byte"), Records(hits(5)), 1u8);
        let bytes = rkyv::to_bytes::<RkyvError>(&value).unwrap();
        let a = decode::<Archived<(String, Records<Hit>, u8)>>(&bytes).unwrap();
        assert_eq!(a.1.records(), &hits(5)[..]);
        assert_eq!(a.1.records().as_ptr() as usize % 8, 0);
        assert_eq!(a.1.len(), 5);
        let back: (String, Records<Hit>, u8) = rkyv::deserialize::<_, RkyvError>(a).unwrap();
        assert_eq!(back, value);
    }

    #[test]
    fn prewritten_records_form_the_same_archive() {
        let want = hits(9);
        let meta = 77u64;
        let p = Prewritten::<Records<Hit>>::new(want.len()).unwrap();
        let mut buf = rkyv::util::AlignedVec::<64>::with_capacity(4096);
        buf.resize(4096, 0);
        p.elements(&mut buf).unwrap().copy_from_slice(&want);
        let data = p.data_len();
        let pair = (p, super::super::Ref(&meta));
        let end = encoded_len_at(&pair, data).unwrap();
        assert_eq!(encode_into_at(&pair, &mut buf, data).unwrap(), end);
        let reference = rkyv::to_bytes::<RkyvError>(&(Records(want), meta)).unwrap();
        assert_eq!(&buf[..end], &reference[..]);
    }

    #[test]
    fn a_length_that_is_not_whole_records_is_invalid() {
        // 17 bytes where 16-byte records are expected: the same root, read as the wrong type.
        let bytes = rkyv::to_bytes::<RkyvError>(&Records(vec![0u8; 17])).unwrap();
        let e = decode::<ArchivedRecords<Hit>>(&bytes)
            .unwrap_err()
            .to_string();
        // rkyv's error keeps its message only in debug builds.
        assert!(
            e.contains("not records of 16 bytes") || !cfg!(debug_assertions),
            "{e}"
        );
        // A misaligned start: 16 bytes placed after 13 bytes of string, read as 8-aligned
        // records.
        let value = (String::from("thirteen byte"), Records(vec![0u8; 16]));
        let bytes = rkyv::to_bytes::<RkyvError>(&value).unwrap();
        assert!(decode::<Archived<(String, Records<u8>)>>(&bytes).is_ok());
        let e = decode::<Archived<(String, Records<Hit>)>>(&bytes).unwrap_err();
        assert!(
            e.to_string().contains("past a multiple of 8") || !cfg!(debug_assertions),
            "{e}"
        );
    }
}
