//! Python objects that lend shared memory to numpy through the buffer protocol, so that an
//! array over a frame is made with no copy (`numpy.frombuffer(frame, dtype, count, offset)`)
//! and holds the frame for as long as it lives.
//!
//! - [`ResultFrame`]: a result frame in the coordinator. It owns the `OutputRef`, so the ring bytes
//!   stay the result's until the last array over them is gone; then the frame is freed.
//! - [`LentFrame`]: ring bytes lent for the length of one call of the user's function: an
//!   input frame in a worker (read-only), or the room a function writes its result in
//!   (`Pool(fn, out=...)`, writable). After the call it lends no more, and the worker counts
//!   the views still alive: one that outlives the call would see (or write) the ring's next
//!   bytes, so the item fails instead (see `task.rs`).

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;

use crate::task::PyTask;

/// Fills `view` for `len` bytes at `buf`, owned by `owner`, as CPython's own exporters do.
///
/// # Safety
///
/// `view` is the pointer CPython passed to `__getbuffer__`, and `buf..buf + len` stays
/// readable (and writable unless `readonly`) for as long as `owner` lives.
pub(crate) unsafe fn fill(
    view: *mut ffi::Py_buffer,
    owner: &Bound<'_, PyAny>,
    buf: *const u8,
    len: usize,
    readonly: bool,
    flags: c_int,
) -> PyResult<()> {
    // SAFETY: the caller's contract; PyBuffer_FillInfo takes a new reference to `owner` (kept
    // in `view.obj`, released by the consumer's PyBuffer_Release) and sets a static "B"
    // format, so nothing here needs freeing in __releasebuffer__.
    let rc = unsafe {
        ffi::PyBuffer_FillInfo(
            view,
            owner.as_ptr(),
            buf as *mut c_void,
            len as ffi::Py_ssize_t,
            c_int::from(readonly),
            flags,
        )
    };
    if rc != 0 {
        return Err(PyErr::fetch(owner.py()));
    }
    Ok(())
}

/// One result, in its worker's output ring (read-only).
#[pyclass(module = "shmexec._native", name = "ResultFrame", frozen)]
pub struct ResultFrame {
    /// `None` only while it drops.
    output: Option<shmexec::OutputRef<<PyTask as shmexec::Task>::Output>>,
    /// The process that received it: the pool's.
    pid: u32,
}

impl ResultFrame {
    pub(crate) fn new(output: shmexec::OutputRef<<PyTask as shmexec::Task>::Output>) -> Self {
        ResultFrame {
            output: Some(output),
            pid: std::process::id(),
        }
    }

    pub(crate) fn seq(&self) -> u64 {
        self.output.as_ref().map_or(0, |o| o.seq())
    }

    /// The item's bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        self.output.as_ref().map_or(&[], |o| o.0.as_slice())
    }
}

impl Drop for ResultFrame {
    fn drop(&mut self) {
        // In a forked child (`os.fork()` of the caller) the frame is a copy of the parent's:
        // releasing it would move the tail of the parent's ring (shared memory) over a result
        // the parent still holds, and its worker would overwrite it. The child forgets it.
        if std::process::id() != self.pid {
            std::mem::forget(self.output.take());
        }
    }
}

#[pymethods]
impl ResultFrame {
    /// # Safety
    ///
    /// Called by CPython with a valid `view`.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let bytes = slf.get().bytes();
        let (ptr, len) = (bytes.as_ptr(), bytes.len());
        // SAFETY: the bytes belong to the frame this object owns (its `OutputRef`, dropped only
        // with the object); `view.obj` keeps the object alive while the view lives.
        unsafe { fill(view, slf.as_any(), ptr, len, true, flags) }
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}

    fn __len__(&self) -> usize {
        self.bytes().len()
    }
}

/// Ring bytes in a worker, lent for one call.
#[pyclass(module = "shmexec._native", name = "LentFrame", frozen)]
pub struct LentFrame {
    /// The bytes' address and length, in the worker's mapping of one of its rings.
    addr: usize,
    len: usize,
    writable: bool,
    /// Cleared when the call returns: no view is lent after that.
    lent: AtomicBool,
    /// Views lent and not yet released.
    views: AtomicUsize,
}

impl LentFrame {
    /// An input frame, lent read-only.
    pub(crate) fn input(bytes: &[u8]) -> LentFrame {
        Self::new(bytes.as_ptr(), bytes.len(), false)
    }

    /// Room in a reserved output slot, lent writable.
    pub(crate) fn room(bytes: &mut [u8]) -> LentFrame {
        Self::new(bytes.as_mut_ptr(), bytes.len(), true)
    }

    fn new(ptr: *const u8, len: usize, writable: bool) -> LentFrame {
        LentFrame {
            addr: ptr as usize,
            len,
            writable,
            lent: AtomicBool::new(true),
            views: AtomicUsize::new(0),
        }
    }

    /// Ends the loan; returns how many views are still alive.
    pub(crate) fn end(&self) -> usize {
        self.lent.store(false, Ordering::Release);
        self.views()
    }

    /// How many views are alive.
    pub(crate) fn views(&self) -> usize {
        self.views.load(Ordering::Acquire)
    }
}

#[pymethods]
impl LentFrame {
    /// # Safety
    ///
    /// Called by CPython with a valid `view`.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let me = slf.get();
        if !me.lent.load(Ordering::Acquire) {
            return Err(PyBufferError::new_err(
                "this frame was lent for one call of the function, which has returned",
            ));
        }
        let (addr, len, readonly) = (me.addr, me.len, !me.writable);
        me.views.fetch_add(1, Ordering::AcqRel);
        // SAFETY: `addr..addr + len` lies in one of the worker's rings (its input frame, or a
        // slot it reserved in its output ring), whose mapping lasts as long as the worker
        // process (the worker loop owns the rings until the process exits), so the bytes stay
        // valid whatever outlives the call. Only the room of an output slot is lent writable;
        // nothing else writes it until the slot is published, after the loan, and a worker
        // whose function kept a writable view exits before its next item (`task::TAINTED`). After the
        // call the coordinator may write new frames there (or read the published slot); a view
        // kept past it would see those, and the worker fails the item (`PyTask::produce`
        // counts the views left).
        let r = unsafe { fill(view, slf.as_any(), addr as *const u8, len, readonly, flags) };
        if r.is_err() {
            me.views.fetch_sub(1, Ordering::AcqRel);
        }
        r
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {
        self.views.fetch_sub(1, Ordering::AcqRel);
    }

    fn __len__(&self) -> usize {
        self.len
    }
}
