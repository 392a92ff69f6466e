//! shmexec's errors in Python terms. Each error is sorted into a kind; the Python side
//! (`shmexec/_errors.py`) holds the exception classes and makes the exception, so the classes
//! and their documentation live in one place.

use pyo3::prelude::*;
use shmexec::Error;

/// The kind, item number (if the error is an item's) and message of `e`.
pub fn classify(e: &Error) -> (&'static str, Option<u64>, String) {
    let kind = match e {
        Error::Stage { error, .. } => return classify(error),
        Error::Task { message, seq } | Error::Panic { message, seq } => {
            // The worker's message is the function's traceback, as Python printed it.
            return ("task", Some(*seq), message.clone());
        }
        Error::WorkerCrashed { .. } | Error::WorkerLost { .. } | Error::WorkerDied { .. } => {
            "crashed"
        }
        Error::ChunkTimeout { .. } | Error::Timeout { .. } => "timeout",
        // In the Python pool's terms (its settings are not `Builder::ring_bytes`).
        Error::InputTooLarge { seq, len, max } => {
            let m = format!(
                "item {seq} is {len} bytes (its arrays and the rest, pickled), larger than an \
                 input ring can carry ({max} bytes): raise the pool's input_ring_bytes (or \
                 ring_bytes), or split the chunk"
            );
            return ("too_large", Some(*seq), m);
        }
        Error::OutputTooLarge { seq, len, max } => {
            let m = format!(
                "the result of item {seq} is {len} bytes (its arrays and the rest, pickled), \
                 larger than an output ring can carry ({max} bytes): raise the pool's \
                 output_ring_bytes (or ring_bytes), or return less"
            );
            return ("too_large", Some(*seq), m);
        }
        Error::OutputsHeld {
            worker,
            held,
            bytes,
        } => {
            let m = format!(
                "worker {worker}'s output ring is full of {held} results ({bytes} bytes) that \
                 the caller still holds (arrays that point into it), so the call ends: keep \
                 copies instead (numpy.array(x), or copy=True)"
            );
            return ("outputs_held", None, m);
        }
        Error::Encode { .. } | Error::InvalidInput { .. } | Error::InvalidOutput { .. } => {
            "invalid"
        }
        Error::Init { .. } => "init",
        Error::OutOfMemory { .. } => "memory",
        Error::InvalidArgument(_) => "setting",
        Error::CallEnded { .. } | Error::Broken(_) | Error::StreamClosed => "broken",
        _ => "pool",
    };
    (kind, e.seq(), e.to_string())
}

/// `e` as the Python exception of its kind (`seq`, if given, in place of the error's own).
pub fn raise(py: Python<'_>, e: &Error, seq: Option<u64>) -> PyErr {
    let (kind, own, message) = classify(e);
    make(py, kind, seq.or(own), message)
}

/// `e`, an error of the pool's start, as a Python exception: a worker that died or hung before
/// its start-up report (an initializer that called `os._exit`, crashed in C code or never
/// returned) could not start, which is an `InitError` as an initializer's exception is, not an
/// item's `WorkerCrashed` or `ChunkTimeout`.
pub fn raise_start(py: Python<'_>, e: &Error) -> PyErr {
    let message = match e {
        Error::WorkerDied { worker, status, .. } => format!(
            "worker {worker} died while it started (in the import of the function or in the \
             initializer): {status}"
        ),
        Error::Timeout { what: "start", .. } => format!(
            "{e} (the import of the function or the initializer took longer than start_timeout)"
        ),
        _ => return raise(py, e, None),
    };
    make(py, "init", None, message)
}

/// The exception `shmexec._errors.make` gives for an error of `kind` (a RuntimeError if the
/// Python side cannot be reached).
fn make(py: Python<'_>, kind: &str, seq: Option<u64>, message: String) -> PyErr {
    let made = py
        .import("shmexec._errors")
        .and_then(|m| m.call_method1("make", (kind, seq, message.clone())));
    match made {
        Ok(exc) => PyErr::from_value(exc),
        Err(_) => pyo3::exceptions::PyRuntimeError::new_err(message),
    }
}

/// The exception of `kind` (as `make` gives it), made where the interpreter's lock may not be
/// held.
pub fn make_error(kind: &str, seq: Option<u64>, message: String) -> PyErr {
    Python::attach(|py| make(py, kind, seq, message))
}

/// A call made at the wrong time (a second call on a busy pool, a closed pool).
pub fn usage(message: &str) -> PyErr {
    pyo3::exceptions::PyRuntimeError::new_err(message.to_owned())
}
