//! Anonymous shared memory: one `memfd`, allocated up front, mapped `MAP_SHARED`.
//!
//! Guarantees:
//! - **No name anywhere.** The memory comes from `memfd_create`, so nothing appears in
//!   `/dev/shm`: there is no file to leak after `kill -9`, to collide with, or to fill a small
//!   `/dev/shm` (a container's 64 MB default). The memory is freed when the last descriptor and
//!   the last mapping are gone, in whatever order the processes die.
//! - **Allocated at creation.** The pages are reserved with `fallocate`, so a process without the
//!   memory says so with [`Error::OutOfMemory`] here instead of a SIGBUS on first touch later.
//!   The size is checked first against every limit on this process's memory
//!   ([`crate::memory::headroom`]: its memory cgroups, RAM, `RLIMIT_AS`).
//! - **Shared across `fork`.** The mapping is `MAP_SHARED`; a forked child sees the same bytes.
//!   For a re-executed child (`spawn`), pass [`Segment::fd`] across with CLOEXEC cleared and
//!   re-open it with [`Segment::from_fd`].
//!
//! Assumes: Linux (`memfd_create`, `fallocate` on shmem).

use std::ffi::c_void;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

use rustix::fs::{FallocateFlags, MemfdFlags};
use rustix::io::FdFlags;
use rustix::mm::{MapFlags, ProtFlags};

use crate::error::{Error, Result};
use crate::signal::Signal;

/// A block of shared memory, mapped into this process.
///
/// ```
/// use shmexec_shm::Segment;
/// let seg = Segment::new(1 << 20)?;
/// assert_eq!(seg.len(), 1 << 20);
/// # Ok::<(), shmexec_shm::Error>(())
/// ```
#[derive(Debug)]
pub struct Segment {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: `Segment` only hands out a raw base pointer; the bytes behind it are shared memory
// that any process may touch, so no Rust-level aliasing rule depends on which thread holds the
// `Segment`. The users of the pointer (the ring) synchronise through atomics.
unsafe impl Send for Segment {}
// SAFETY: as above: `&Segment` exposes nothing but the pointer, the length and the fd.
unsafe impl Sync for Segment {}

impl Segment {
    /// Creates a segment of `len` bytes, zero-filled, with every page allocated now.
    ///
    /// The descriptor is close-on-exec; see [`Segment::set_inheritable`].
    pub fn new(len: usize) -> Result<Segment> {
        if len == 0 {
            return Err(Error::InvalidArgument {
                what: "a segment must have at least one byte".into(),
            });
        }
        // fallocate on shmem does not fail at a memory cgroup's limit: it wakes the cgroup's
        // OOM killer. Refusing here, against every limit, is the clean error.
        crate::memory::ensure_fits(len as u64)?;
        let fd = rustix::fs::memfd_create("shmexec", MemfdFlags::CLOEXEC)
            .map_err(|e| Error::os("memfd_create", e))?;
        // fallocate reserves every page now: ENOSPC/ENOMEM here instead of SIGBUS on first touch.
        if let Err(e) = rustix::fs::fallocate(&fd, FallocateFlags::empty(), 0, len as u64) {
            return Err(match e {
                rustix::io::Errno::NOSPC | rustix::io::Errno::NOMEM | rustix::io::Errno::FBIG => {
                    crate::memory::out_of_memory(len as u64, crate::memory::headroom())
                }
                e => Error::os("fallocate", e),
            });
        }
        Self::map(fd, len)
    }

    /// Maps a segment received from another process (for example a descriptor inherited across
    /// `exec`). Its length is the file's size.
    pub fn from_fd(fd: OwnedFd) -> Result<Segment> {
        let stat = rustix::fs::fstat(&fd).map_err(|e| Error::os("fstat", e))?;
        let len = usize::try_from(stat.st_size).map_err(|_| Error::InvalidArgument {
            what: format!("descriptor reports size {}", stat.st_size),
        })?;
        if len == 0 {
            return Err(Error::InvalidArgument {
                what: "descriptor has size 0; not a shmexec segment".into(),
            });
        }
        Self::map(fd, len)
    }

    fn map(fd: OwnedFd, len: usize) -> Result<Segment> {
        // SAFETY: a fresh mapping (null hint, no MAP_FIXED) replaces nothing in this address
        // space; `fd` is at least `len` bytes long (we sized it, or fstat said so).
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::POPULATE,
                &fd,
                0,
            )
        }
        .map_err(|e| Error::os("mmap", e))?;
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| Error::os("mmap", rustix::io::Errno::INVAL))?;
        Ok(Segment { fd, ptr, len })
    }

    /// Base address of the mapping in this process (page aligned).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always `false`: a segment has at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The 32-bit atomic at byte `offset`: a flag or counter shared between the processes that
    /// map this segment (a futex word, for example). `None` if `offset` is out of bounds or not
    /// 4-byte aligned.
    ///
    /// ```
    /// use std::sync::atomic::Ordering;
    /// let seg = shmexec_shm::Segment::new(4096)?;
    /// seg.atomic_u32(64).unwrap().store(7, Ordering::Release);
    /// assert_eq!(seg.atomic_u32(64).unwrap().load(Ordering::Acquire), 7);
    /// assert!(seg.atomic_u32(4094).is_none());
    /// # Ok::<(), shmexec_shm::Error>(())
    /// ```
    pub fn atomic_u32(&self, offset: usize) -> Option<&AtomicU32> {
        self.atomic_at(offset)
    }

    /// [`Segment::atomic_u32`] for a 64-bit word (8-byte aligned): counters shared between the
    /// processes, such as a worker's statistics.
    pub fn atomic_u64(&self, offset: usize) -> Option<&AtomicU64> {
        self.atomic_at(offset)
    }

    /// The [`Signal`] at byte `offset` (4-byte aligned): a wake-up channel between the
    /// processes that map this segment, beside the words whose changes it announces.
    ///
    /// ```
    /// let seg = shmexec_shm::Segment::new(4096)?;
    /// seg.signal(128).unwrap().notify(); // nobody sleeps on it: costs a fence and a load
    /// assert!(seg.signal(4092).is_none());
    /// # Ok::<(), shmexec_shm::Error>(())
    /// ```
    pub fn signal(&self, offset: usize) -> Option<&Signal> {
        self.atomic_at(offset)
    }

    /// An atomic of type `A` (one of the std atomics, plain integers that accept any bits, or a
    /// [`Signal`], two of them) at `offset`, if it fits and is aligned.
    fn atomic_at<A>(&self, offset: usize) -> Option<&A> {
        let size = std::mem::size_of::<A>();
        let fits = offset.checked_add(size).is_some_and(|end| end <= self.len);
        if !fits || offset % std::mem::align_of::<A>() != 0 {
            return None;
        }
        // SAFETY: `offset + size <= len` and the base is page aligned, so the bytes are inside
        // the mapping and aligned for `A`. `A` is only instantiated with AtomicU32, AtomicU64
        // and Signal (private fn): the first two have their integer's layout and accept any
        // bits; Signal is `repr(C)` of two AtomicU32 and is documented valid for any bits (all
        // zero: idle). The memory starts zeroed and is always initialised. The borrow is tied
        // to `&self`, and the mapping lives as long as `self`. Other processes access it only
        // atomically.
        Some(unsafe { &*self.ptr.as_ptr().add(offset).cast::<A>() })
    }

    /// The memfd behind the mapping, for passing to a process that will call
    /// [`Segment::from_fd`].
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Makes this process's mapping read-only: from now on a write through it kills the process
    /// with SIGSEGV instead of changing bytes that other processes read. For a process that must
    /// only read what another writes (a worker and the inputs a retried item reads again).
    ///
    /// # Safety
    ///
    /// Nothing in this process may write through this segment afterwards: not through
    /// [`Segment::as_ptr`], and not through the atomics of [`Segment::atomic_u32`] and
    /// [`Segment::atomic_u64`], which the compiler assumes writable.
    pub unsafe fn make_read_only(&self) -> Result<()> {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `map`, so only this segment's pages
        // change protection; the caller promises that nothing writes through them any more.
        unsafe {
            rustix::mm::mprotect(
                self.ptr.as_ptr().cast::<c_void>(),
                self.len,
                rustix::mm::MprotectFlags::READ,
            )
        }
        .map_err(|e| Error::os("mprotect", e))
    }

    /// Clears (`true`) or sets (`false`) close-on-exec on the descriptor, so that a child started
    /// with `exec` inherits it. Segments start close-on-exec so that unrelated programs this
    /// process runs never hold the memory alive.
    pub fn set_inheritable(&self, inheritable: bool) -> Result<()> {
        let flags = if inheritable {
            FdFlags::empty()
        } else {
            FdFlags::CLOEXEC
        };
        rustix::io::fcntl_setfd(&self.fd, flags).map_err(|e| Error::os("fcntl(F_SETFD)", e))
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `map`, and every borrow handed out
        // from it (rings, frames) holds an `Arc<Segment>`, so nothing in this process uses the
        // range after this point.
        unsafe {
            let _ = rustix::mm::munmap(self.ptr.as_ptr().cast::<c_void>(), self.len);
        }
    }
}
