//! The store (`shmexec::store`) in Python terms: stage keys, a writer that saves result
//! frames' item bytes as chunks, and saved streams whose chunks are lent to numpy where they
//! are mapped (`SavedFrame`), as result frames are.
//!
//! A saved chunk holds one result of a pipeline group exactly as it lay in its frame (the item
//! layout of `item.rs`), so reading it back is parsing its header, not decoding a copy.

use std::ffi::c_int;
use std::sync::Mutex;

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use shmexec::store::{SavedChunk, SavedStream, StageKey, Store, StoreError, StreamWriter};

use numpy::PyReadonlyArray1;

use crate::errors;
use crate::frames::{ResultFrame, fill};
use crate::item;

fn raise(e: StoreError) -> PyErr {
    errors::make_error("store", None, e.to_string())
}

/// The key of a stage's output stream: its name, version and configuration, and its inputs'
/// keys (`shmexec::store::StageKey`).
#[pyclass(module = "shmexec._native", name = "StageKey", frozen)]
#[derive(Clone)]
pub struct PyStageKey {
    key: StageKey,
}

#[pymethods]
impl PyStageKey {
    /// A stage's key; `config` is bytes or a str (UTF-8), `inputs` the keys of its inputs.
    #[new]
    #[pyo3(signature = (name, version = "", config = None, inputs = Vec::new()))]
    fn new(
        name: &str,
        version: &str,
        config: Option<&Bound<'_, PyAny>>,
        inputs: Vec<PyRef<'_, PyStageKey>>,
    ) -> PyResult<Self> {
        let config: Vec<u8> = match config {
            None => Vec::new(),
            Some(c) => {
                if let Ok(text) = c.cast::<pyo3::types::PyString>() {
                    text.to_str()?.as_bytes().to_vec()
                } else if let Ok(bytes) = c.cast::<PyBytes>() {
                    bytes.as_bytes().to_vec()
                } else {
                    return Err(pyo3::exceptions::PyTypeError::new_err(
                        "a stage's config is bytes or a str (one that does not change between \
                         runs of the same settings)",
                    ));
                }
            }
        };
        let mut key = StageKey::new(name, version, config);
        for input in inputs {
            key = key.with_input(&input.key);
        }
        Ok(PyStageKey { key })
    }

    /// This key with `input` appended to its inputs.
    fn with_input(&self, input: &PyStageKey) -> PyStageKey {
        PyStageKey {
            key: self.key.clone().with_input(&input.key),
        }
    }

    #[getter]
    fn name(&self) -> &str {
        self.key.name()
    }

    #[getter]
    fn version(&self) -> &str {
        self.key.version()
    }

    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.key.config())
    }

    /// 64 hex digits over the name, version, configuration and inputs.
    #[getter]
    fn id(&self) -> String {
        self.key.id()
    }

    /// `(name, version, id)` of this stage and every stage upstream of it, inputs first.
    fn history(&self) -> Vec<(String, String, String)> {
        self.key
            .history()
            .into_iter()
            .map(|h| (h.name, h.version, h.id))
            .collect()
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<PyStageKey>()
            .is_ok_and(|o| o.get().key.id() == self.key.id())
    }

    fn __hash__(&self) -> u64 {
        let id = self.key.id();
        u64::from_str_radix(&id[..16], 16).unwrap_or(0)
    }

    fn __repr__(&self) -> String {
        format!(
            "StageKey({:?}, version={:?}, id={}..)",
            self.key.name(),
            self.key.version(),
            &self.key.id()[..12]
        )
    }
}

/// A directory of saved streams (`shmexec::store::Store`).
#[pyclass(module = "shmexec._native", name = "NativeStore", frozen)]
pub struct NativeStore {
    store: Store,
}

#[pymethods]
impl NativeStore {
    #[new]
    fn new(path: std::path::PathBuf) -> PyResult<Self> {
        Ok(NativeStore {
            store: Store::open(path).map_err(raise)?,
        })
    }

    #[getter]
    fn path(&self) -> std::path::PathBuf {
        self.store.path().to_owned()
    }

    /// A writer of the stream of `key`; nothing is visible under the key until `finish()`.
    fn writer(&self, key: &PyStageKey) -> PyResult<NativeWriter> {
        let w = self.store.writer(&key.key).map_err(raise)?;
        Ok(NativeWriter {
            writer: Mutex::new(Some(w)),
            pid: std::process::id(),
        })
    }

    /// The complete stream of `key`, or `None`.
    fn load(&self, key: &PyStageKey) -> PyResult<Option<NativeSaved>> {
        Ok(self
            .store
            .load(&key.key)
            .map_err(raise)?
            .map(|saved| NativeSaved { saved }))
    }

    /// Removes the stream of `key`; `False` if there was none.
    fn remove(&self, key: &PyStageKey) -> PyResult<bool> {
        self.store.remove(&key.key).map_err(raise)
    }

    /// Removes the temporary directories of writers whose process is gone; their paths.
    fn remove_stale_partials(&self, py: Python<'_>) -> PyResult<Vec<std::path::PathBuf>> {
        py.detach(|| self.store.remove_stale_partials())
            .map_err(raise)
    }
}

/// A stream being saved: each chunk a result frame's item bytes.
#[pyclass(module = "shmexec._native", name = "NativeWriter", frozen)]
pub struct NativeWriter {
    /// `None` once finished or abandoned.
    writer: Mutex<Option<StreamWriter>>,
    /// The process that made it. A forked child's copy is the parent's writer: dropping it
    /// there would remove the parent's partial stream, so the child forgets it.
    pid: u32,
}

impl NativeWriter {
    /// The writer, taken, in the process that made it; `None` once finished, abandoned, or
    /// in a forked child.
    fn take(&self) -> Option<StreamWriter> {
        let taken = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if std::process::id() != self.pid {
            std::mem::forget(taken);
            return None;
        }
        taken
    }

    fn write(&self, py: Python<'_>, bytes: &[u8]) -> PyResult<()> {
        if std::process::id() != self.pid {
            return Err(errors::usage(
                "this stream writer belongs to another process",
            ));
        }
        let written = py.detach(|| {
            let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            w.as_mut().map(|w| w.write_chunk(bytes, None))
        });
        match written {
            Some(r) => r.map_err(raise),
            None => Err(errors::usage("this stream writer is finished")),
        }
    }
}

impl Drop for NativeWriter {
    fn drop(&mut self) {
        if std::process::id() != self.pid {
            let w = self
                .writer
                .get_mut()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            std::mem::forget(w);
        }
    }
}

#[pymethods]
impl NativeWriter {
    /// Saves the item bytes of `frame` as the stream's next chunk (written and synced).
    fn write_frame(&self, py: Python<'_>, frame: &ResultFrame) -> PyResult<()> {
        self.write(py, frame.bytes())
    }

    /// Saves an item (a skeleton and its arrays, as `_codec.encode` gives them) as the
    /// stream's next chunk: for a result whose frame holds more than the stage's output (a
    /// stateful stage's state beside it).
    fn write_item(
        &self,
        py: Python<'_>,
        skeleton: &[u8],
        arrays: Vec<PyReadonlyArray1<'_, u8>>,
    ) -> PyResult<()> {
        let (layout, slices) = item::lay_out(skeleton.len(), &arrays, None)?;
        let mut bytes = vec![0u8; layout.len];
        layout.write_parts(&mut bytes, skeleton, &slices);
        self.write(py, &bytes)
    }

    /// Commits the stream: complete under its key from now on.
    fn finish(&self, py: Python<'_>) -> PyResult<()> {
        match self.take() {
            Some(w) => py.detach(|| w.finish()).map_err(raise),
            None => Err(errors::usage("this stream writer is finished")),
        }
    }

    /// Drops what was written: nothing appears under the key.
    fn abandon(&self, py: Python<'_>) {
        // Waits for a write in progress and removes the partial files: not under the
        // interpreter's lock.
        py.detach(|| drop(self.take()));
    }
}

/// A saved chunk as a result is handed to Python: `(skeleton, arrays, frame)`.
type Chunk<'py> = (
    Bound<'py, PyBytes>,
    Vec<(usize, usize)>,
    Bound<'py, SavedFrame>,
);

/// A complete saved stream.
#[pyclass(module = "shmexec._native", name = "NativeSaved", frozen)]
pub struct NativeSaved {
    saved: SavedStream,
}

#[pymethods]
impl NativeSaved {
    fn __len__(&self) -> usize {
        self.saved.chunks()
    }

    #[getter]
    fn id(&self) -> &str {
        self.saved.id()
    }

    #[getter]
    fn name(&self) -> &str {
        self.saved.name()
    }

    /// `(name, version, id)` of the stages that made it, inputs first.
    fn history(&self) -> Vec<(String, String, String)> {
        self.saved
            .history()
            .iter()
            .map(|h| (h.name.clone(), h.version.clone(), h.id.clone()))
            .collect()
    }

    /// Chunk `index`, mapped and checked: `(skeleton, arrays, frame)` as a result is.
    fn chunk<'py>(&self, py: Python<'py>, index: usize) -> PyResult<Chunk<'py>> {
        let chunk = py.detach(|| self.saved.chunk(index)).map_err(raise)?;
        let parts = item::parse(chunk.bytes(), None).map_err(|reason| {
            errors::make_error(
                "store",
                None,
                format!("{}: {reason}", chunk.path().display()),
            )
        })?;
        let skeleton = PyBytes::new(py, &chunk.bytes()[parts.skeleton.clone()]);
        let frame = Bound::new(py, SavedFrame { chunk })?;
        Ok((skeleton, parts.in_item(), frame))
    }
}

/// A saved chunk, where its file is mapped (read-only): arrays over it hold the mapping.
#[pyclass(module = "shmexec._native", name = "SavedFrame", frozen)]
pub struct SavedFrame {
    chunk: SavedChunk,
}

#[pymethods]
impl SavedFrame {
    /// # Safety
    ///
    /// Called by CPython with a valid `view`.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let bytes = slf.get().chunk.bytes();
        let (ptr, len) = (bytes.as_ptr(), bytes.len());
        // SAFETY: the bytes are the mapping this object owns (its `SavedChunk`, dropped only
        // with the object), of a file the store never writes again; `view.obj` keeps the
        // object alive while the view lives.
        unsafe { fill(view, slf.as_any(), ptr, len, true, flags) }
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}

    fn __len__(&self) -> usize {
        self.chunk.bytes().len()
    }
}
