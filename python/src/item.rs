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
//! A result written in place (`Pool(fn, out=...)`) has its one array first, right after the
//! table, and its skeleton after it: the function writes the array before its return value
//! (the skeleton) exists.
//!
//! The frame is 64-byte aligned in its ring (`shmexec::OutputSink`, the stream's in-place
//! sends), so aligned offsets are aligned addresses. The reader checks every length and
//! offset against the item's size: a frame is bytes from another process.

use numpy::PyReadonlyArray1;
use pyo3::PyResult;

const MAGIC: u32 = 0x5958_5053; // "SPXY"
const HEAD: usize = 24;
const ALIGN: usize = 64;

fn align_up(n: usize) -> Option<usize> {
    n.checked_add(ALIGN - 1).map(|v| v & !(ALIGN - 1))
}

/// Where the parts of an item go, for an item of this skeleton and these array lengths.
pub struct Layout {
    /// Offset of each array.
    pub offsets: Vec<usize>,
    /// The item's size.
    pub len: usize,
}

impl Layout {
    /// `None` if the sizes overflow.
    pub fn new(skeleton: usize, arrays: impl Iterator<Item = usize>) -> Option<Layout> {
        let arrays: Vec<usize> = arrays.collect();
        let table = arrays.len().checked_mul(16)?;
        let mut end = HEAD.checked_add(table)?.checked_add(skeleton)?;
        let mut offsets = Vec::with_capacity(arrays.len());
        for len in arrays {
            let at = align_up(end)?;
            offsets.push(at);
            end = at.checked_add(len)?;
        }
        Some(Layout { offsets, len: end })
    }

    /// Writes the item into `buf` (at least `self.len` bytes long).
    pub fn write(&self, buf: &mut [u8], skeleton: &[u8], arrays: &[&[u8]]) {
        let lens: Vec<usize> = arrays.iter().map(|a| a.len()).collect();
        self.write_head_and_skeleton(buf, skeleton, &lens);
        for (&at, a) in self.offsets.iter().zip(arrays) {
            buf[at..at + a.len()].copy_from_slice(a);
        }
    }
}

/// Writes the header and the table of an item whose skeleton is at `skeleton_at`.
fn write_head(
    buf: &mut [u8],
    skeleton_at: usize,
    skeleton: usize,
    offsets: &[usize],
    lens: &[usize],
) {
    buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    buf[4..8].copy_from_slice(&(offsets.len() as u32).to_le_bytes());
    buf[8..16].copy_from_slice(&(skeleton_at as u64).to_le_bytes());
    buf[16..24].copy_from_slice(&(skeleton as u64).to_le_bytes());
    for (i, (&at, &len)) in offsets.iter().zip(lens).enumerate() {
        let pos = HEAD + 16 * i;
        buf[pos..pos + 8].copy_from_slice(&(at as u64).to_le_bytes());
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
            &[self.array.start],
            &[self.array.len()],
        );
        buf[HEAD + 16..self.array.start].fill(0);
        buf[at..at + skeleton.len()].copy_from_slice(skeleton);
    }
}

impl Layout {
    /// Writes everything but the arrays' bytes (arrays of `lens` bytes, written later in
    /// place), and zeroes the padding before each array: a frame never carries stale bytes
    /// of the ring.
    fn write_head_and_skeleton(&self, buf: &mut [u8], skeleton: &[u8], lens: &[usize]) {
        let pos = HEAD + 16 * lens.len();
        write_head(buf, pos, skeleton.len(), &self.offsets, lens);
        buf[pos..pos + skeleton.len()].copy_from_slice(skeleton);
        let mut end = pos + skeleton.len();
        for (&at, &len) in self.offsets.iter().zip(lens) {
            buf[end..at].fill(0);
            end = at + len;
        }
    }
}

/// An item read back: where its skeleton and arrays are.
pub struct Parts {
    pub skeleton: std::ops::Range<usize>,
    pub arrays: Vec<(usize, usize)>,
}

/// The bytes of an item's arrays (numpy's, which must be contiguous) and the layout they make
/// with a skeleton of `skeleton` bytes: what a sender and a store writer both lay out.
pub fn lay_out<'a>(
    skeleton: usize,
    arrays: &'a [PyReadonlyArray1<'_, u8>],
) -> PyResult<(Layout, Vec<&'a [u8]>)> {
    let slices = arrays
        .iter()
        .map(|a| a.as_slice())
        .collect::<Result<Vec<&[u8]>, _>>()?;
    let layout = Layout::new(skeleton, slices.iter().map(|s| s.len()))
        .ok_or_else(|| pyo3::exceptions::PyOverflowError::new_err("item too large"))?;
    Ok((layout, slices))
}

/// Reads the header of the item in `buf`, checking every range against it.
pub fn parse(buf: &[u8]) -> Result<Parts, String> {
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
        arrays.push(part(at, len).ok_or_else(|| format!("array {i} of the item lies outside it"))?);
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
        let p = parse(&buf).unwrap();
        assert_eq!(&buf[p.skeleton], b"abc");
        assert_eq!(p.arrays[0].0 % 64, 0);
        assert_eq!(&buf[p.arrays[1].0..p.arrays[1].0 + 100], &b);
        assert!(parse(&buf[..20]).is_err());
    }

    #[test]
    fn in_place_round_trip() {
        let l = InPlace::new(100).unwrap();
        let mut buf = vec![0xffu8; l.len(5).unwrap()];
        buf[l.array.clone()].fill(7);
        l.finish(&mut buf, b"hello");
        let p = parse(&buf).unwrap();
        assert_eq!(&buf[p.skeleton], b"hello");
        assert_eq!(p.arrays, vec![(64, 100)]);
    }
}
