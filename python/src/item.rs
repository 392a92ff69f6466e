//! The layout of one Python item (an input or a result) inside a frame: a small header, the
//! item's skeleton (bytes the Python side made: a pickle of everything but its arrays, or a
//! short description of a lone array), then each array's bytes at a 64-byte aligned offset, so
//! that the receiving side makes numpy arrays over them in place.
//!
//! ```text
//! 0     u32 MAGIC, u32 number of arrays (n)
//! 8     u64 skeleton offset, u64 skeleton length
//! 24    n x (u64 offset, u64 length)      offsets from the start of the item
//! ..    skeleton bytes, then array 0 (64-byte aligned), array 1, ...
//! ```
//!
//! An input array that lies in the pool's shared region (`Pool(fn, shared_bytes=...)`) is not
//! copied: its offset word has [`IN_REGION`] set, and the other bits are its offset in the
//! region. Only the caller writes such entries; a worker checks them against its region, and
//! a result or a saved chunk that has one is invalid.
//!
//! A result written in place (`Pool(fn, out=...)`) has its one array first, right after the
//! table, and its skeleton after it: the function writes the array before its return value
//! (the skeleton) exists.
//!
//! The frame is 64-byte aligned in its ring (`shmexec::OutputSink`, the stream's in-place
//! sends), so aligned offsets are aligned addresses. The reader checks every length and
//! offset against the item's size: a frame is bytes from another process.

use numpy::PyReadonlyArray1;
use pyo3::PyResult;

use crate::region::SharedRegion;

const MAGIC: u32 = 0x5958_5053; // "SPXY"
const HEAD: usize = 24;
const ALIGN: usize = 64;

/// Set in an array's offset word: the array lies in the pool's shared region, at the offset
/// the other bits give.
pub const IN_REGION: u64 = 1 << 63;

fn align_up(n: usize) -> Option<usize> {
    n.checked_add(ALIGN - 1).map(|v| v & !(ALIGN - 1))
}

/// One array of an item, as its sender has it.
pub enum Part<'a> {
    /// Bytes to copy into the item.
    Bytes(&'a [u8]),
    /// `len` bytes at `at` in the pool's shared region, where the receiver reads them.
    Region { at: usize, len: usize },
}

impl Part<'_> {
    /// What [`Layout`] needs of it: its offset in the region (`None`: copied) and length.
    fn entry(&self) -> (Option<usize>, usize) {
        match *self {
            Part::Bytes(b) => (None, b.len()),
            Part::Region { at, len } => (Some(at), len),
        }
    }
}

/// Where the parts of an item go, for an item of this skeleton and these arrays.
pub struct Layout {
    /// Each array's entry in the table: its offset word and its length.
    table: Vec<(u64, usize)>,
    /// The item's size.
    pub len: usize,
}

impl Layout {
    /// The layout of an item whose arrays (of these lengths) are all copied into it; `None`
    /// if the sizes overflow.
    pub fn new(skeleton: usize, arrays: impl Iterator<Item = usize>) -> Option<Layout> {
        Self::of(skeleton, arrays.map(|len| (None, len)))
    }

    /// `arrays`: each array's offset in the region (`None`: copied into the item) and length.
    fn of(skeleton: usize, arrays: impl Iterator<Item = (Option<usize>, usize)>) -> Option<Layout> {
        let arrays: Vec<(Option<usize>, usize)> = arrays.collect();
        let table_len = arrays.len().checked_mul(16)?;
        let mut end = HEAD.checked_add(table_len)?.checked_add(skeleton)?;
        let mut table = Vec::with_capacity(arrays.len());
        for (region_at, len) in arrays {
            match region_at {
                Some(at) => {
                    let at = u64::try_from(at).ok().filter(|a| a & IN_REGION == 0)?;
                    table.push((at | IN_REGION, len));
                }
                None => {
                    let at = align_up(end)?;
                    table.push((at as u64, len));
                    end = at.checked_add(len)?;
                }
            }
        }
        Some(Layout { table, len: end })
    }

    /// Writes the item into `buf` (at least `self.len` bytes long): `arrays` are the ones
    /// [`Layout::new`] was given, all copied.
    pub fn write(&self, buf: &mut [u8], skeleton: &[u8], arrays: &[&[u8]]) {
        let parts: Vec<Part<'_>> = arrays.iter().map(|&a| Part::Bytes(a)).collect();
        self.write_parts(buf, skeleton, &parts);
    }

    /// Writes the item of the parts [`lay_out`] made, copying only those not in the region.
    pub fn write_parts(&self, buf: &mut [u8], skeleton: &[u8], parts: &[Part<'_>]) {
        self.write_head_and_skeleton(buf, skeleton);
        for (&(at, _), part) in self.table.iter().zip(parts) {
            if let Part::Bytes(a) = part {
                let at = at as usize;
                buf[at..at + a.len()].copy_from_slice(a);
            }
        }
    }
}

/// Writes the header and the table of an item whose skeleton is at `skeleton_at`.
fn write_head(buf: &mut [u8], skeleton_at: usize, skeleton: usize, table: &[(u64, usize)]) {
    buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    buf[4..8].copy_from_slice(&(table.len() as u32).to_le_bytes());
    buf[8..16].copy_from_slice(&(skeleton_at as u64).to_le_bytes());
    buf[16..24].copy_from_slice(&(skeleton as u64).to_le_bytes());
    for (i, &(at, len)) in table.iter().enumerate() {
        let pos = HEAD + 16 * i;
        buf[pos..pos + 8].copy_from_slice(&at.to_le_bytes());
        buf[pos + 8..pos + 16].copy_from_slice(&(len as u64).to_le_bytes());
    }
}

/// The layout of a result written in place: one array of `len` bytes, then the skeleton.
pub struct InPlace {
    /// Where the array goes.
    pub array: std::ops::Range<usize>,
}

impl InPlace {
    /// `None` if the size overflows.
    pub fn new(len: usize) -> Option<InPlace> {
        let at = align_up(HEAD + 16)?;
        Some(InPlace {
            array: at..at.checked_add(len)?,
        })
    }

    /// The size of the item with a skeleton of `skeleton` bytes.
    pub fn len(&self, skeleton: usize) -> Option<usize> {
        self.array.end.checked_add(skeleton)
    }

    /// Writes the header and the skeleton around the array (already written); `buf` holds
    /// at least `self.len(skeleton.len())` bytes.
    pub fn finish(&self, buf: &mut [u8], skeleton: &[u8]) {
        let at = self.array.end;
        write_head(
            buf,
            at,
            skeleton.len(),
            &[(self.array.start as u64, self.array.len())],
        );
        buf[HEAD + 16..self.array.start].fill(0);
        buf[at..at + skeleton.len()].copy_from_slice(skeleton);
    }
}

impl Layout {
    /// Writes everything but the arrays' bytes (written next, or in the region already), and
    /// zeroes the padding before each array: a frame never carries stale bytes of the ring.
    fn write_head_and_skeleton(&self, buf: &mut [u8], skeleton: &[u8]) {
        let pos = HEAD + 16 * self.table.len();
        write_head(buf, pos, skeleton.len(), &self.table);
        buf[pos..pos + skeleton.len()].copy_from_slice(skeleton);
        let mut end = pos + skeleton.len();
        for &(at, len) in self.table.iter().filter(|(at, _)| at & IN_REGION == 0) {
            buf[end..at as usize].fill(0);
            end = at as usize + len;
        }
    }
}

/// Where one array of an item lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// `len` bytes at `at` in the item.
    Item { at: usize, len: usize },
    /// `len` bytes at `at` in the pool's shared region.
    Region { at: usize, len: usize },
}

/// An item read back: where its skeleton and arrays are.
#[derive(Debug)]
pub struct Parts {
    pub skeleton: std::ops::Range<usize>,
    pub arrays: Vec<Place>,
}

impl Parts {
    /// Each array's `(offset, length)` in the item, for an item parsed without a region (so
    /// every array is in it).
    pub fn in_item(&self) -> Vec<(usize, usize)> {
        self.arrays
            .iter()
            .filter_map(|p| match *p {
                Place::Item { at, len } => Some((at, len)),
                Place::Region { .. } => None,
            })
            .collect()
    }
}

/// The bytes of an item's arrays (numpy's, which must be contiguous) and the layout they make
/// with a skeleton of `skeleton` bytes: what a sender and a store writer both lay out. An
/// array that lies wholly inside `region` becomes a reference to it instead of a copy.
pub fn lay_out<'a>(
    skeleton: usize,
    arrays: &'a [PyReadonlyArray1<'_, u8>],
    region: Option<&SharedRegion>,
) -> PyResult<(Layout, Vec<Part<'a>>)> {
    let parts = arrays
        .iter()
        .map(|a| {
            let bytes = a.as_slice()?;
            // An empty array has no bytes anywhere (its pointer may be any address).
            Ok(
                match region
                    .filter(|_| !bytes.is_empty())
                    .and_then(|r| r.locate(bytes))
                {
                    Some(at) => Part::Region {
                        at,
                        len: bytes.len(),
                    },
                    None => Part::Bytes(bytes),
                },
            )
        })
        .collect::<PyResult<Vec<Part<'a>>>>()?;
    let layout = Layout::of(skeleton, parts.iter().map(Part::entry))
        .ok_or_else(|| pyo3::exceptions::PyOverflowError::new_err("item too large"))?;
    Ok((layout, parts))
}

/// Reads the header of the item in `buf`, checking every range against it, and every array
/// in the shared region against the region's size (`region`: `None` where no array may lie
/// in a region).
pub fn parse(buf: &[u8], region: Option<usize>) -> Result<Parts, String> {
    let word = |at: usize, n: usize| -> Result<u64, String> {
        let b = buf
            .get(at..at + n)
            .ok_or_else(|| format!("the item is {} bytes: too short for its header", buf.len()))?;
        let mut w = [0u8; 8];
        w[..n].copy_from_slice(b);
        Ok(u64::from_le_bytes(w))
    };
    if word(0, 4)? != u64::from(MAGIC) {
        return Err("the frame is not a shmexec Python item (bad magic)".into());
    }
    let n = word(4, 4)? as usize;
    let table_end = n
        .checked_mul(16)
        .and_then(|t| t.checked_add(HEAD))
        .filter(|&e| e <= buf.len())
        .ok_or_else(|| format!("the item says it has {n} arrays, more than its size holds"))?;
    // Every part lies after the table and inside the item.
    let part = |at: u64, len: u64| -> Option<(usize, usize)> {
        let (at, len) = (usize::try_from(at).ok()?, usize::try_from(len).ok()?);
        (at >= table_end && at.checked_add(len)? <= buf.len()).then_some((at, len))
    };
    let (skel_at, skel_len) =
        part(word(8, 8)?, word(16, 8)?).ok_or("the item's skeleton lies outside it")?;
    let mut arrays = Vec::with_capacity(n);
    for i in 0..n {
        let at = word(HEAD + 16 * i, 8)?;
        let len = word(HEAD + 16 * i + 8, 8)?;
        if at & IN_REGION == 0 {
            let (at, len) =
                part(at, len).ok_or_else(|| format!("array {i} of the item lies outside it"))?;
            arrays.push(Place::Item { at, len });
            continue;
        }
        let size = region.ok_or_else(|| {
            format!("array {i} of the item says it lies in a shared region, which it cannot here")
        })?;
        let at = at & !IN_REGION;
        let inside = (usize::try_from(at).ok())
            .zip(usize::try_from(len).ok())
            .filter(|&(a, l)| a.checked_add(l).is_some_and(|end| end <= size));
        let (at, len) = inside.ok_or_else(|| {
            format!("array {i} of the item lies outside the {size}-byte shared region")
        })?;
        arrays.push(Place::Region { at, len });
    }
    Ok(Parts {
        skeleton: skel_at..skel_at + skel_len,
        arrays,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let a = [1u8; 10];
        let b = [2u8; 100];
        let l = Layout::new(3, [10, 100].into_iter()).unwrap();
        let mut buf = vec![0xffu8; l.len];
        l.write(&mut buf, b"abc", &[&a, &b]);
        let p = parse(&buf, None).unwrap();
        assert_eq!(&buf[p.skeleton.clone()], b"abc");
        let arrays = p.in_item();
        assert_eq!(arrays[0].0 % 64, 0);
        assert_eq!(&buf[arrays[1].0..arrays[1].0 + 100], &b);
        assert!(parse(&buf[..20], None).is_err());
    }

    #[test]
    fn an_array_in_the_region_is_a_reference_checked_against_the_region() {
        let a = [1u8; 10];
        let parts = [
            Part::Region {
                at: 4096,
                len: 1000,
            },
            Part::Bytes(&a),
        ];
        let l = Layout::of(2, parts.iter().map(Part::entry)).unwrap();
        // The region's array takes no room in the item.
        assert!(l.len < HEAD + 32 + 2 + 64 + 10);
        let mut buf = vec![0xffu8; l.len];
        l.write_parts(&mut buf, b"sk", &parts);
        let p = parse(&buf, Some(8192)).unwrap();
        assert_eq!(
            p.arrays[0],
            Place::Region {
                at: 4096,
                len: 1000
            }
        );
        let Place::Item { at, len } = p.arrays[1] else {
            panic!("the copied array is in the item");
        };
        assert_eq!(&buf[at..at + len], &a);
        // Outside the region, or where no region may be: an error, not a read.
        assert!(
            parse(&buf, Some(5000))
                .unwrap_err()
                .contains("outside the 5000-byte")
        );
        assert!(parse(&buf, None).unwrap_err().contains("shared region"));
    }

    #[test]
    fn in_place_round_trip() {
        let l = InPlace::new(100).unwrap();
        let mut buf = vec![0xffu8; l.len(5).unwrap()];
        buf[l.array.clone()].fill(7);
        l.finish(&mut buf, b"hello");
        let p = parse(&buf, None).unwrap();
        assert_eq!(&buf[p.skeleton.clone()], b"hello");
        assert_eq!(p.in_item(), vec![(64, 100)]);
    }
}
