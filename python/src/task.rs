//! [`PyTask`]: the pool's task. In the coordinator it is only the pool's type (the workers are
//! other processes); in a worker (`shmexec._worker`) it calls the Python side for each item:
//! the user's function reads its input in place and its result's arrays are copied once, into
//! the output ring.

use numpy::PyReadonlyArray1;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString};
use shmexec::{BoxError, OutputSink, Task, WorkerInfo};

use crate::frames::LentFrame;
use crate::item::{self, InPlace, Layout, Place};
use crate::region::SharedRegion;

/// The Python callables a worker runs (`shmexec._worker`): `init(index, workers)`,
/// `run(frame, skeleton, arrays) -> (skeleton, [uint8 arrays]) | str` (a `str` is the
/// traceback of the user's exception), `finish()`. For a function that writes its result in
/// place, `run` is `prepare(frame, skeleton, arrays) -> int | str` (the result array's size),
/// then `run_into(room) -> skeleton | str`.
pub struct Handlers {
    pub init: Py<PyAny>,
    pub run: Py<PyAny>,
    pub finish: Py<PyAny>,
    pub run_into: Option<Py<PyAny>>,
}

/// Room for the skeleton of a result written in place (its return value, pickled): the slot
/// is reserved before the function runs, so this counts against the output ring's size.
const SKELETON_ROOM: usize = 4 << 10;

/// Set when a function kept a view of its result's room: that view aliases the output ring,
/// where later results are written, so the worker must not run another item (see
/// [`PyTask::produce`]).
static TAINTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The task of a Python pool: items are [`item`] layouts inside `(Vec<u8>, ())` archives (a
/// byte array the coordinator fills in place, and the worker's output written in place).
#[derive(Default)]
pub struct PyTask {
    handlers: Option<Handlers>,
    /// The pool's shared region in this worker (read-only), once `init` found one.
    region: Option<Py<SharedRegion>>,
}

impl PyTask {
    pub fn worker(handlers: Handlers) -> PyTask {
        PyTask {
            handlers: Some(handlers),
            region: None,
        }
    }

    fn handlers(&self) -> Result<&Handlers, BoxError> {
        self.handlers
            .as_ref()
            .ok_or_else(|| "a Python task runs only in a shmexec worker".into())
    }
}

/// The text of a Python exception, with its traceback, as the Python side prints it.
pub fn describe(py: Python<'_>, e: PyErr) -> String {
    let formatted = py.import("traceback").and_then(|tb| {
        let lines = tb.call_method1("format_exception", (e.clone_ref(py),))?;
        PyString::new(py, "")
            .call_method1("join", (lines,))?
            .extract::<String>()
    });
    formatted.unwrap_or_else(|_| e.to_string())
}

impl Task for PyTask {
    type Input = (Vec<u8>, ());
    type Output = (Vec<u8>, ());

    fn init(&mut self, worker: &WorkerInfo) -> Result<(), BoxError> {
        Python::attach(|py| {
            // (The core maps the region before `init`.)
            self.region = match SharedRegion::worker() {
                Some(r) => Some(Py::new(py, r).map_err(|e| describe(py, e))?),
                None => None,
            };
            let h = self.handlers()?;
            h.init
                .call1(py, (worker.index, worker.workers))
                .map(drop)
                .map_err(|e| describe(py, e).into())
        })
    }

    fn process(&mut self, _: &rkyv::Archived<Self::Input>) -> Result<Self::Output, BoxError> {
        Err("a Python item runs through produce".into())
    }

    fn produce(
        &mut self,
        input: &rkyv::Archived<Self::Input>,
        out: &mut OutputSink<'_>,
    ) -> Result<(), BoxError> {
        let h = self.handlers()?;
        if TAINTED.load(std::sync::atomic::Ordering::Relaxed) {
            // The last item's function kept a writable view of the output ring (its item
            // failed). Only this process's end makes that view harmless: the worker exits, and
            // this item is run again by its successor (the death is charged to it, one of its
            // `max_attempts`).
            std::process::exit(crate::pool::EXIT_TAINTED);
        }
        let bytes = input.0.as_slice();
        let region = self.region.as_ref();
        let parts = item::parse(bytes, region.map(|r| r.get().len()))?;
        Python::attach(|py| {
            let frame = Bound::new(py, LentFrame::input(bytes)).map_err(|e| describe(py, e))?;
            let input = Input {
                frame: &frame,
                bytes,
                parts: &parts,
                region,
            };
            let done = match &h.run_into {
                None => run_one(py, h, &input, out),
                Some(run_into) => run_in_place(py, h, run_into, &input, out),
            };
            // Every reference the call made is gone by now (its result was dropped in
            // `run_one`); a view still alive was kept by the function.
            frame.get().end();
            done
        })
    }

    fn finish(&mut self, _worker: &WorkerInfo) {
        if let Some(h) = &self.handlers {
            Python::attach(|py| {
                if let Err(e) = h.finish.call0(py) {
                    eprintln!("shmexec worker: finalizer failed:\n{}", describe(py, e));
                }
            });
        }
    }
}

/// One input item in a worker: its frame (lent to the function) and where its parts lie.
struct Input<'a, 'py> {
    frame: &'a Bound<'py, LentFrame>,
    bytes: &'a [u8],
    parts: &'a item::Parts,
    region: Option<&'a Py<SharedRegion>>,
}

/// Calls the worker's `run` on the item: what it returned, or the traceback of the function's
/// exception (a `str`) as the item's error. Each array goes to Python as `(offset, length)` in
/// the frame, or `(offset, length, region)` for one in the shared region.
fn call_run<'py>(
    py: Python<'py>,
    h: &Handlers,
    input: &Input<'_, 'py>,
) -> Result<Bound<'py, PyAny>, BoxError> {
    let skeleton = PyBytes::new(py, &input.bytes[input.parts.skeleton.clone()]);
    let arrays = PyList::empty(py);
    for place in &input.parts.arrays {
        let entry = match (*place, input.region) {
            (Place::Item { at, len }, _) => (at, len).into_pyobject(py),
            (Place::Region { at, len }, Some(region)) => (at, len, region).into_pyobject(py),
            // (`parse` allows region entries only where there is a region.)
            (Place::Region { .. }, None) => return Err("an array lies in a missing region".into()),
        };
        arrays
            .append(entry.map_err(|e| describe(py, e))?)
            .map_err(|e| describe(py, e))?;
    }
    let returned = h
        .run
        .call1(py, (input.frame, skeleton, arrays))
        .map_err(|e| describe(py, e))?
        .into_bound(py);
    if let Ok(traceback) = returned.extract::<String>() {
        return Err(traceback.into());
    }
    Ok(returned)
}

/// Calls the Python side on one item and writes its result.
fn run_one(
    py: Python<'_>,
    h: &Handlers,
    input: &Input<'_, '_>,
    out: &mut OutputSink<'_>,
) -> Result<(), BoxError> {
    let result = call_run(py, h, input)?;
    let parsed: PyResult<(Vec<u8>, Vec<PyReadonlyArray1<'_, u8>>)> = result.extract();
    drop(result);
    let (skeleton, arrays) = parsed.map_err(|e| describe(py, e))?;
    let lens = arrays
        .iter()
        .map(|a| a.len().map_err(|e| describe(py, e)))
        .collect::<Result<Vec<usize>, String>>()?;
    let layout =
        Layout::new(skeleton.len(), lens.into_iter()).ok_or("the result's size overflows")?;
    out.emit_samples_last::<u8, ()>(layout.len, move |buf| {
        {
            let slices = arrays
                .iter()
                .map(|a| a.as_slice())
                .collect::<Result<Vec<&[u8]>, _>>()
                .map_err(|e| format!("a result array is not contiguous: {e}"))?;
            layout.write(buf, &skeleton, &slices);
        }
        // Before the result is published: an item whose function kept a view fails.
        drop(arrays);
        check_kept(py, input.frame)
    })
}

/// `Err` if views of the input frame are still alive now that the function's result was
/// written (after a garbage collection, so that a view in a reference cycle does not count):
/// the function kept one, and it would read the ring's next bytes.
fn check_kept(py: Python<'_>, frame: &Bound<'_, LentFrame>) -> Result<(), BoxError> {
    if frame.get().views() == 0 {
        return Ok(());
    }
    if let Ok(gc) = py.import("gc") {
        let _ = gc.call_method0("collect");
    }
    match frame.get().views() {
        0 => Ok(()),
        kept => Err(format!(
            "the function kept {kept} view(s) of its input after it returned (in a global, an \
             attribute, a cache): the input's memory is reused for the next chunk, so keep a \
             copy instead (numpy.array(x) or x.copy())"
        )
        .into()),
    }
}

/// Calls the Python side on one item whose result array the function writes in place, in a
/// slot reserved for it, then writes the header and the skeleton around it.
fn run_in_place(
    py: Python<'_>,
    h: &Handlers,
    run_into: &Py<PyAny>,
    input: &Input<'_, '_>,
    out: &mut OutputSink<'_>,
) -> Result<(), BoxError> {
    let size = call_run(py, h, input)?;
    let size: usize = size.extract().map_err(|e: PyErr| describe(py, e))?;
    let place = InPlace::new(size).ok_or("the result's size overflows")?;
    let max = place.array.end.saturating_add(SKELETON_ROOM);
    out.emit_samples_last_up_to::<u8, ()>(max, |buf| {
        let room = Bound::new(py, LentFrame::room(&mut buf[place.array.clone()]))
            .map_err(|e| describe(py, e))?;
        let returned = run_into.call1(py, (&room,)).map_err(|e| describe(py, e));
        let skeleton = returned.and_then(|r| {
            let r = r.into_bound(py);
            if let Ok(traceback) = r.extract::<String>() {
                return Err(traceback);
            }
            r.extract::<Vec<u8>>().map_err(|e| describe(py, e))
        });
        let mut kept = room.get().end();
        if kept > 0 {
            // A view in a reference cycle is no view kept.
            if let Ok(gc) = py.import("gc") {
                let _ = gc.call_method0("collect");
            }
            kept = room.get().views();
        }
        if kept > 0 {
            TAINTED.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let skeleton = skeleton?;
        check_kept(py, input.frame)?;
        if kept > 0 {
            return Err(format!(
                "the function kept {kept} view(s) of its output array after it returned: that \
                 memory is the result, handed to the caller; keep a copy instead (the worker \
                 is replaced: the view would write into later results)"
            )
            .into());
        }
        let len = place
            .len(skeleton.len())
            .filter(|&l| l <= buf.len())
            .ok_or_else(|| {
                format!(
                    "the function's return value pickles to {} bytes, more than the {} a result \
                     written in place has room for: return small metadata beside `out`",
                    skeleton.len(),
                    SKELETON_ROOM
                )
            })?;
        place.finish(buf, &skeleton);
        Ok((len, ()))
    })
}
