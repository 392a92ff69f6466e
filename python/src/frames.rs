//! Python objects that lend shared memory to numpy through the buffer protocol, so that an
//! array over a frame is made with no copy (`numpy.frombuffer(frame, dtype, count, offset)`)
//! and holds the frame for as long as it lives.
//!
//! - [`Result`]: a result frame in the coordinator. It owns the `OutputRef`, so the ring bytes
//!   stay the result's until the last array over them is gone; then the frame is freed.
//! - [`Input`]: an input frame in a worker, lent for the length of one call of the user's
//!   function. After the call it lends no more, and the worker counts the views still alive:
//!   one that outlives the call would see the ring's next bytes, so the item fails instead
//!   (see `task.rs`).

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
unsafe fn fill(
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
    pub(crate) output: shmexec::OutputRef<<PyTask as shmexec::Task>::Output>,
}

impl ResultFrame {
    /// The item's bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        self.output.0.as_slice()
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

/// An input frame in a worker, lent for one call (read-only).
#[pyclass(module = "shmexec._native", name = "InputFrame", frozen)]
pub struct InputFrame {
    /// The frame's address and length, in the worker's mapping of its input ring.
    addr: usize,
    len: usize,
    /// Cleared when the call returns: no view is lent after that.
    lent: AtomicBool,
    /// Views lent and not yet released.
    views: AtomicUsize,
}

impl InputFrame {
    pub(crate) fn new(bytes: &[u8]) -> InputFrame {
        InputFrame {
            addr: bytes.as_ptr() as usize,
            len: bytes.len(),
            lent: AtomicBool::new(true),
            views: AtomicUsize::new(0),
        }
    }

    /// Ends the loan; returns how many views are still alive.
    pub(crate) fn end(&self) -> usize {
        self.lent.store(false, Ordering::Release);
        self.views.load(Ordering::Acquire)
    }
}

#[pymethods]
impl InputFrame {
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
                "this input frame was lent for one call of the function, which has returned",
            ));
        }
        let (addr, len) = (me.addr, me.len);
        me.views.fetch_add(1, Ordering::AcqRel);
        // SAFETY: `addr..addr + len` is a frame of the worker's input ring, whose mapping
        // lasts as long as the worker process (the worker loop owns the ring until the process
        // exits), so the bytes stay readable whatever outlives the call. After the call the
        // coordinator may write new frames there; a view kept past it would read those, and
        // the worker fails the item (`PyTask::produce` counts the views left).
        let r = unsafe { fill(view, slf.as_any(), addr as *const u8, len, true, flags) };
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
