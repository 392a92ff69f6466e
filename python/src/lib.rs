//! The native half of the `shmexec` Python package: a pool of Python worker processes that
//! run a function over numpy arrays passed through shared-memory rings, never pickled. The
//! Python half (`python/shmexec/`) holds the API users see; see its documentation.
//!
//! - `pool`: the coordinator's pool and calls;
//! - `task`: what a worker runs for each item;
//! - `item`: the layout of an item (arrays plus a small skeleton) inside a frame;
//! - `frames`: frames lent to numpy through the buffer protocol;
//! - `store`: saved streams of pipeline stages (`shmexec::store`);
//! - `errors`: shmexec's errors as Python exceptions.

mod errors;
mod frames;
mod item;
mod pool;
mod region;
mod store;
mod task;

use pyo3::prelude::*;

/// Runs this process as a worker of the pool that spawned it, and exits when the pool is done
/// with it. `init(index, workers)`, `run(frame, skeleton, arrays)`, `finish()` and, for a
/// function that writes its result in place, `run_into(room)` are the worker's Python side
/// (`shmexec._worker`). Returns only in a process that no pool spawned.
#[pyfunction]
#[pyo3(signature = (init, run, finish, run_into=None))]
fn serve(
    py: Python<'_>,
    init: Py<PyAny>,
    run: Py<PyAny>,
    finish: Py<PyAny>,
    run_into: Option<Py<PyAny>>,
) -> PyResult<()> {
    let handlers = task::Handlers {
        init,
        run,
        finish,
        run_into,
    };
    py.detach(move || {
        shmexec::spawn::serve(pool::TASK_NAME, move || task::PyTask::worker(handlers))
    });
    Err(pyo3::exceptions::PyRuntimeError::new_err(
        "this process was not started by a shmexec pool: shmexec._worker runs only as a pool's worker",
    ))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<pool::NativePool>()?;
    m.add_class::<pool::NativeCall>()?;
    m.add_class::<frames::ResultFrame>()?;
    m.add_class::<frames::LentFrame>()?;
    m.add_class::<region::SharedRegion>()?;
    m.add_class::<store::PyStageKey>()?;
    m.add_class::<store::NativeStore>()?;
    m.add_class::<store::NativeWriter>()?;
    m.add_class::<store::NativeSaved>()?;
    m.add_class::<store::SavedFrame>()?;
    m.add_function(wrap_pyfunction!(serve, m)?)?;
    m.add("TASK_NAME", pool::TASK_NAME)?;
    Ok(())
}
