//! A file mapped read-only into this process: its bytes read where the page cache holds them,
//! with no copy into a buffer.
//!
//! Guarantees:
//! - **Page-aligned base.** The mapping starts on a page, so an archive written at offset 0 of
//!   the file is as aligned (64 bytes and more) as it was in the frame it came from.
//! - **Read-only.** The pages are mapped `PROT_READ`: a write through them kills the process
//!   with SIGSEGV, and nothing this process does changes the file.
//! - **Empty files work.** A file of zero bytes maps nothing (`mmap` refuses a length of 0) and
//!   reads as an empty slice.
//! - **The length is the file's at opening**, read with `fstat` on the descriptor that is
//!   mapped, so no rename between a `stat` and the `open` can make them disagree.
//!
//! Assumes: a file that nobody modifies or truncates while it is mapped (see
//! [`MappedFile::open`]). Pages are read on first touch, so a read error of the disk, or a
//! page past the end of a file that was truncated meanwhile, is a SIGBUS at that access, not an
//! error here. Assumes Linux.

use std::ffi::c_void;
use std::fs::File;
use std::ops::Deref;
use std::path::Path;
use std::ptr::NonNull;

use rustix::mm::{MapFlags, ProtFlags};

use crate::error::{Error, Result};

/// A file's bytes, mapped read-only; dereferences to `[u8]` and unmaps on drop.
///
/// ```
/// use std::io::Write;
/// use shmexec_shm::MappedFile;
///
/// let path = std::env::temp_dir().join(format!("mapped-doc-{}", std::process::id()));
/// std::fs::File::create(&path)?.write_all(b"frame bytes")?;
/// // SAFETY: this example's own file, written above and not changed while mapped.
/// let file = unsafe { MappedFile::open(&path)? };
/// assert_eq!(&file[..], b"frame bytes");
/// assert_eq!(file.as_ptr() as usize % 4096, 0);
/// drop(file);
/// std::fs::remove_file(&path)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct MappedFile {
    /// The mapping's base, or a dangling pointer when `len` is 0 (nothing mapped).
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value alone (unmapped on drop): sharing or
// moving it between threads is sharing a `&[u8]` or a `Box<[u8]>`.
unsafe impl Send for MappedFile {}
// SAFETY: as above: `&MappedFile` gives out nothing but shared reads of immutable bytes.
unsafe impl Sync for MappedFile {}

impl MappedFile {
    /// Opens the file at `path` read-only and maps all of it.
    ///
    /// The descriptor is closed before this returns; the mapping keeps the file's pages.
    ///
    /// # Safety
    ///
    /// Until the `MappedFile` is dropped, nothing may write to the file or truncate it: not this
    /// process, not another. The slice handed out is a `&[u8]`, which Rust assumes does not
    /// change while it is borrowed; bytes that changed after a reader validated them (an rkyv
    /// archive whose offsets were checked) could send that reader out of bounds, and a page
    /// past a truncated end raises SIGBUS. Files written once under a temporary name and only
    /// then renamed to the name that is opened, and never modified after, meet this.
    pub unsafe fn open(path: impl AsRef<Path>) -> Result<MappedFile> {
        let file = File::open(path.as_ref()).map_err(|e| Error::os("open", e))?;
        let size = file.metadata().map_err(|e| Error::os("fstat", e))?.len();
        let len = usize::try_from(size).map_err(|_| Error::InvalidArgument {
            what: format!("a file of {size} bytes does not fit this address space"),
        })?;
        if len == 0 {
            return Ok(MappedFile {
                ptr: NonNull::dangling(),
                len: 0,
            });
        }
        // SAFETY: a fresh mapping (null hint, no MAP_FIXED) replaces nothing in this address
        // space. It is `len` bytes of a file that `fstat` says holds `len` bytes, read-only, so
        // no access through it writes the file. The caller promises that nothing else changes
        // or truncates the file while it is mapped; the pages are plain bytes, for which every
        // bit pattern is valid, and any structure in them is validated by whoever reads them.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ,
                MapFlags::SHARED,
                &file,
                0,
            )
        }
        .map_err(|e| Error::os("mmap", e))?;
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| Error::os("mmap", rustix::io::Errno::INVAL))?;
        Ok(MappedFile { ptr, len })
    }

    /// The mapping's base address: page-aligned, or dangling (and never read) when the file is
    /// empty.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes: the file's size when it was opened.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the file was empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Deref for MappedFile {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr`/`len` are exactly the read-only mapping made in `open`, which lives
        // until `self` is dropped, and the borrow is tied to `&self`. Every byte of it is
        // initialised (file contents) and valid as `u8`; `open`'s contract keeps them unchanged
        // and inside the file while mapped.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for MappedFile {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: `ptr`/`len` are exactly the mapping made in `open`, and every slice handed out
        // borrows `self`, so nothing in this process uses the range after this point.
        unsafe {
            let _ = rustix::mm::munmap(self.ptr.as_ptr().cast::<c_void>(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::PathBuf;

    /// A file under the temp dir, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn with(name: &str, bytes: &[u8]) -> TempFile {
            let path = std::env::temp_dir().join(format!(
                "shmexec-mapped-{}-{name}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            File::create(&path).unwrap().write_all(bytes).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn maps_the_bytes_page_aligned() {
        let bytes: Vec<u8> = (0..3 * 4096 + 17).map(|i| (i * 7) as u8).collect();
        let f = TempFile::with("bytes", &bytes);
        // SAFETY: the test's own file, not changed while mapped.
        let m = unsafe { MappedFile::open(&f.0) }.unwrap();
        assert_eq!(m.len(), bytes.len());
        assert!(!m.is_empty());
        assert_eq!(&m[..], &bytes[..]);
        assert_eq!(m.as_ptr() as usize % 4096, 0);
    }

    #[test]
    fn an_empty_file_is_an_empty_slice() {
        let f = TempFile::with("empty", b"");
        // SAFETY: as above.
        let m = unsafe { MappedFile::open(&f.0) }.unwrap();
        assert_eq!(m.len(), 0);
        assert!(m.is_empty());
        assert_eq!(&m[..], b"");
    }

    #[test]
    fn the_mapping_outlives_the_name() {
        let f = TempFile::with("unlinked", b"still here");
        // SAFETY: the file is unlinked, not modified: the mapping keeps its pages.
        let m = unsafe { MappedFile::open(&f.0) }.unwrap();
        std::fs::remove_file(&f.0).unwrap();
        assert_eq!(&m[..], b"still here");
    }

    #[test]
    fn a_missing_file_is_an_open_error() {
        let path = std::env::temp_dir().join(format!("shmexec-mapped-none-{}", std::process::id()));
        // SAFETY: nothing is mapped.
        let err = unsafe { MappedFile::open(&path) }.unwrap_err();
        match err {
            Error::Os { op: "open", source } => {
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound)
            }
            e => panic!("unexpected {e}"),
        }
    }

    #[test]
    fn moves_across_threads() {
        let f = TempFile::with("threads", b"0123456789");
        // SAFETY: as above.
        let m = unsafe { MappedFile::open(&f.0) }.unwrap();
        let sum = std::thread::spawn(move || m.iter().map(|&b| b as u32).sum::<u32>())
            .join()
            .unwrap();
        assert_eq!(sum, (b'0'..=b'9').map(u32::from).sum::<u32>());
    }
}
