//! [`SharedRegion`]: a pool's shared region lent to numpy (`Pool(fn, shared_bytes=...)`).
//!
//! In the caller the region is writable: the program makes its chunks there (generates them,
//! reads a file into them) and sends views of it; an input array that lies inside the region
//! travels as its offset and length, not as its bytes (see `item.rs`). In a worker the region
//! is mapped read-only, and an array of the item is a view of it, like a view of the ring.
//!
//! The object owns an `Arc` of the region's segment, so the mapping lasts as long as any
//! array over it, even after the pool is closed.

use std::ffi::c_int;
use std::sync::Arc;

use pyo3::ffi;
use pyo3::prelude::*;
use shmexec::shm::Segment;

use crate::frames::fill;

/// The region of one pool, in this process.
#[pyclass(module = "shmexec._native", name = "SharedRegion", frozen)]
pub struct SharedRegion {
    segment: Arc<Segment>,
    /// The caller's view is writable; a worker's mapping is read-only.
    writable: bool,
}

impl SharedRegion {
    /// The caller's region (writable).
    pub(crate) fn caller(segment: Arc<Segment>) -> SharedRegion {
        SharedRegion {
            segment,
            writable: true,
        }
    }

    /// This worker's region (read-only), if its pool has one.
    pub(crate) fn worker() -> Option<SharedRegion> {
        shmexec::shared::worker_segment().map(|segment| SharedRegion {
            segment,
            writable: false,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.segment.len()
    }

    /// Where `bytes` start in the region, if they lie wholly inside it.
    pub(crate) fn locate(&self, bytes: &[u8]) -> Option<usize> {
        let base = self.segment.as_ptr() as usize;
        let at = (bytes.as_ptr() as usize).checked_sub(base)?;
        (at.checked_add(bytes.len())? <= self.len()).then_some(at)
    }
}

#[pymethods]
impl SharedRegion {
    /// # Safety
    ///
    /// Called by CPython with a valid `view`.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let me = slf.get();
        let (ptr, len) = (me.segment.as_ptr(), me.len());
        // SAFETY: `ptr..ptr + len` is the segment's mapping, which lasts as long as the `Arc`
        // this object owns (`view.obj` keeps the object alive while the view lives). Only the
        // caller's region is lent writable: a worker's mapping is read-only (a write there
        // would fault), and numpy refuses to write through a read-only buffer. The caller's
        // writes race with workers reading the same bytes only if the program changes a chunk
        // while an item of it is in flight, which the docs of `Pool.shared` forbid; such a race
        // changes numbers, not the memory's validity.
        unsafe { fill(view, slf.as_any(), ptr, len, !me.writable, flags) }
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}

    fn __len__(&self) -> usize {
        self.len()
    }
}
