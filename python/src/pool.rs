//! The coordinator's side: [`NativePool`] owns a `shmexec::Pool` of spawned Python workers,
//! and [`NativeCall`] is one call on it (a stream whose halves the Python side drives: it
//! sends inputs without waiting and waits for results, with the interpreter's lock released
//! during every wait). `shmexec/_pool.py` builds `map`, `imap_unordered` and the streaming
//! pair on it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use numpy::PyReadonlyArray1;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use shmexec::{Pinning, Pool, PoolStats, StreamReceiver, StreamSender, WaitStrategy};

use crate::errors::{self, raise};
use crate::frames::ResultFrame;
use crate::item;
use crate::region::SharedRegion;
use crate::task::PyTask;

/// How long one wait lasts before the waiter looks at the interpreter's signals (Ctrl-C).
const SLICE: Duration = Duration::from_millis(50);

/// How long finishing a call waits for another thread's wait on it to let go.
const LET_GO: Duration = Duration::from_secs(1);

/// The exit code of a worker whose function kept a writable view of its output ring.
pub const EXIT_TAINTED: i32 = 75;

/// The task name spawned workers serve (`shmexec._worker`).
pub const TASK_NAME: &str = "shmexec-python";

type Sender = StreamSender<'static, PyTask>;
type Receiver = StreamReceiver<'static, PyTask>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing under these locks panics half-way through a change.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where the pool is: waiting for a call, lent to one, or shut down.
enum State {
    Idle(Box<Pool<PyTask>>),
    Busy(std::sync::Weak<Halves>),
    Closed,
}

/// The two halves of a call's stream. Each is shared (`Arc`) by whoever uses it at the moment,
/// so that no lock is held while a thread waits with the interpreter's lock released.
struct Halves {
    tx: Mutex<Option<Arc<Sender>>>,
    rx: Mutex<Option<Arc<Receiver>>>,
    /// Set by [`NativePool::close`]: a thread waiting on the call (for a result, for room)
    /// stops at its next slice and lets go of its half, so that the pool can shut down.
    closed: AtomicBool,
    /// The threads in a wait on the call now (each holds a half while it waits).
    waiters: Mutex<Vec<ThreadId>>,
}

/// A thread's wait on a call, from [`Halves::enter`] until it drops.
struct Waiting<'a> {
    halves: &'a Halves,
    id: ThreadId,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut w = lock(&self.halves.waiters);
        if let Some(i) = w.iter().position(|&t| t == self.id) {
            w.swap_remove(i);
        }
    }
}

/// How long [`NativePool::close`] waits for the threads in a wait on its call to let go (each
/// looks at `closed` every [`SLICE`]).
const CLOSE_WAIT: Duration = Duration::from_secs(2);

#[pyclass(module = "shmexec._native", frozen)]
pub struct NativePool {
    state: Mutex<State>,
    workers: usize,
    max_input: usize,
    /// The process that made the pool. A forked child of it (`os.fork()`) holds a copy of
    /// the pool whose workers, rings and threads are the parent's: it must neither use it
    /// (it would read the parent's results) nor drop it (that would shut the parent's
    /// workers down, and release the parent's held results in the shared rings).
    pid: u32,
    /// The pool's shared region (`shared_bytes`), lent to the caller's arrays.
    region: Option<Py<SharedRegion>>,
}

/// The error of a pool used in a process that did not make it.
fn foreign_pool(pid: u32) -> PyErr {
    errors::usage(&format!(
        "this pool belongs to process {pid}, of which this process is a fork: a forked child \
         cannot use its parent's pool (make a pool of its own in the child)"
    ))
}

impl NativePool {
    /// `Err` in a process that did not make the pool.
    fn check_owner(&self) -> PyResult<()> {
        if std::process::id() != self.pid {
            return Err(foreign_pool(self.pid));
        }
        Ok(())
    }
}

impl Drop for NativePool {
    fn drop(&mut self) {
        if std::process::id() != self.pid {
            // A forked child's copy: the parent's pool is not this process's to shut down.
            let state = std::mem::replace(&mut *lock(&self.state), State::Closed);
            std::mem::forget(state);
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[pymethods]
impl NativePool {
    #[new]
    #[pyo3(signature = (python, args, workers, input_ring_bytes, output_ring_bytes, queue_bytes,
        max_attempts, max_start_attempts, start_timeout, chunk_timeout, shutdown_timeout, pin,
        wait="adaptive", shared_bytes=0))]
    fn new(
        py: Python<'_>,
        python: std::path::PathBuf,
        args: Vec<String>,
        workers: Option<usize>,
        input_ring_bytes: usize,
        output_ring_bytes: usize,
        queue_bytes: usize,
        max_attempts: u32,
        max_start_attempts: u32,
        start_timeout: f64,
        chunk_timeout: Option<f64>,
        shutdown_timeout: f64,
        pin: &str,
        wait: &str,
        shared_bytes: usize,
    ) -> PyResult<NativePool> {
        let secs = |name: &str, s: f64| {
            Duration::try_from_secs_f64(s).map_err(|_| {
                pyo3::exceptions::PyValueError::new_err(format!(
                    "{name} must be a non-negative number of seconds, got {s}"
                ))
            })
        };
        let pinning = match pin {
            "auto" => Pinning::Auto,
            "off" => Pinning::Off,
            "spread" => Pinning::Spread,
            other => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "pin must be 'auto', 'off' or 'spread', got {other:?}"
                )));
            }
        };
        let wait = match wait {
            "adaptive" => WaitStrategy::Adaptive,
            "park" => WaitStrategy::Park,
            "spin" => WaitStrategy::Spin,
            other => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "wait must be 'adaptive', 'park' or 'spin', got {other:?}"
                )));
            }
        };
        let mut b = Pool::builder()
            .wait_strategy(wait)
            .spawn_program(TASK_NAME, python, args)
            .pinning(pinning)
            .input_ring_bytes(input_ring_bytes)
            .output_ring_bytes(output_ring_bytes)
            .queue_bytes(queue_bytes)
            .shared_bytes(shared_bytes)
            .max_attempts(max_attempts)
            .max_start_attempts(max_start_attempts)
            .start_timeout(secs("start_timeout", start_timeout)?)
            .shutdown_timeout(secs("shutdown_timeout", shutdown_timeout)?);
        if let Some(n) = workers {
            b = b.workers(n);
        }
        if let Some(t) = chunk_timeout {
            b = b.chunk_timeout(secs("chunk_timeout", t)?);
        }
        // The build waits for every worker's start (imports, the initializer: seconds, up to
        // start_timeout): it runs on a thread of its own while this one waits in slices and
        // looks at the interpreter's signals, so that Ctrl-C stops a slow start. Then the
        // build goes on alone and its pool, or its error, is dropped when it ends (a worker
        // still starting is killed with it, or dies with this process). Every worker,
        // replacements too, is started by the pool's spawner thread, not by this one, so the
        // build's thread ending does not fire the workers' death signal.
        let (done, result) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("shmexec-build".into())
            .spawn(move || {
                let _ = done.send(b.build(PyTask::default()));
            })
            .map_err(|e| {
                pyo3::exceptions::PyOSError::new_err(format!("cannot start a thread: {e}"))
            })?;
        // (In a mutex: a receiver is not `Sync`, and the wait borrows it across `detach`.)
        let result = Mutex::new(result);
        let pool = loop {
            match py.detach(|| lock(&result).recv_timeout(SLICE)) {
                Ok(built) => break built.map_err(|e| errors::raise_start(py, &e))?,
                Err(RecvTimeoutError::Timeout) => py.check_signals()?,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(errors::usage(
                        "the pool's build failed (its thread panicked)",
                    ));
                }
            }
        };
        let region = match pool.shared_segment() {
            Some(segment) => Some(Py::new(py, SharedRegion::caller(segment))?),
            None => None,
        };
        Ok(NativePool {
            region,
            workers: pool.workers(),
            max_input: pool.max_input_bytes(),
            state: Mutex::new(State::Idle(Box::new(pool))),
            pid: std::process::id(),
        })
    }

    #[getter]
    fn workers(&self) -> usize {
        self.workers
    }

    /// The largest input item (its arrays and skeleton) a worker's ring takes.
    #[getter]
    fn max_input_bytes(&self) -> usize {
        self.max_input
    }

    /// The pool's shared region (writable), or `None` for a pool without one.
    #[getter]
    fn region(&self, py: Python<'_>) -> PyResult<Option<Py<SharedRegion>>> {
        // A forked child writing its parent's region would change the parent's chunks.
        self.check_owner()?;
        Ok(self.region.as_ref().map(|r| r.clone_ref(py)))
    }

    /// The bytes an item of this skeleton and these arrays takes in a ring (an array in the
    /// shared region takes none): what a sender waits for room for.
    fn item_bytes(
        &self,
        skeleton: &[u8],
        arrays: Vec<PyReadonlyArray1<'_, u8>>,
    ) -> PyResult<usize> {
        let region = self.region.as_ref().map(|r| r.get());
        Ok(item::lay_out(skeleton.len(), &arrays, region)?.0.len)
    }

    /// Starts a call: results in input order (`ordered`) or as they come.
    fn start(slf: Bound<'_, Self>, ordered: bool) -> PyResult<NativeCall> {
        let me = slf.get();
        me.check_owner()?;
        let mut st = lock(&me.state);
        let pool = match std::mem::replace(&mut *st, State::Closed) {
            State::Idle(pool) => pool,
            State::Busy(h) => {
                *st = State::Busy(h);
                return Err(errors::usage(
                    "this pool is running another call: finish it (read it to its end, or \
                     close() it) before starting the next",
                ));
            }
            State::Closed => return Err(errors::usage("this pool is closed")),
        };
        let (tx, rx) = if ordered {
            pool.into_stream()
        } else {
            pool.into_stream_unordered()
        };
        let halves = Arc::new(Halves {
            tx: Mutex::new(Some(Arc::new(tx))),
            rx: Mutex::new(Some(Arc::new(rx))),
            closed: AtomicBool::new(false),
            waiters: Mutex::new(Vec::new()),
        });
        *st = State::Busy(Arc::downgrade(&halves));
        Ok(NativeCall {
            halves,
            owner: slf.clone().unbind(),
        })
    }

    /// Figures of every worker: a dict with the pool's totals and a list `workers` of dicts.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.check_owner()?;
        let stats = {
            let st = lock(&self.state);
            match &*st {
                State::Idle(pool) => Some(pool.stats()),
                State::Busy(h) => h
                    .upgrade()
                    .and_then(|h| lock(&h.rx).clone())
                    .map(|rx| rx.pool_stats()),
                State::Closed => None,
            }
        };
        let stats = stats.ok_or_else(|| errors::usage("this pool is closed"))?;
        stats_dict(py, &stats)
    }

    /// Process ids of the workers now (0 for one without a process).
    fn pids(&self) -> PyResult<Vec<i32>> {
        self.check_owner()?;
        let st = lock(&self.state);
        match &*st {
            State::Idle(pool) => Ok(pool.pids()),
            State::Busy(h) => Ok(h
                .upgrade()
                .and_then(|h| lock(&h.rx).clone())
                .map(|rx| rx.worker_pids())
                .unwrap_or_default()),
            State::Closed => Err(errors::usage("this pool is closed")),
        }
    }

    /// Shuts the workers down (waiting for them at most the shutdown timeout); a call still
    /// running ends, and a thread waiting on it (for a result, for room) gets an error.
    fn close(&self, py: Python<'_>) {
        let old = std::mem::replace(&mut *lock(&self.state), State::Closed);
        if self.check_owner().is_err() {
            // Closed for this (forked) process only; the parent's pool goes on.
            std::mem::forget(old);
            return;
        }
        let halves = match &old {
            State::Busy(h) => h.upgrade(),
            _ => None,
        };
        // The pool (or the call's halves) drop here, with the interpreter's lock released:
        // dropping a pool waits for its workers to exit.
        py.detach(move || {
            if let Some(h) = halves {
                h.closed.store(true, Ordering::SeqCst);
                let taken = (lock(&h.tx).take(), lock(&h.rx).take());
                // A thread in a wait on the call holds a half, and the pool with it: it sees
                // `closed` within a slice and lets go, and the pool shuts down here. (This
                // thread may be one of them, in a signal handler run from its wait.)
                let me = std::thread::current().id();
                let deadline = Instant::now() + CLOSE_WAIT;
                while lock(&h.waiters).iter().any(|&t| t != me) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(2));
                }
                drop(taken);
            }
            drop(old)
        });
    }

    #[getter]
    fn closed(&self) -> bool {
        matches!(*lock(&self.state), State::Closed)
    }
}

impl Halves {
    /// Marks this thread as in a wait on the call until the guard drops.
    fn enter(&self) -> Waiting<'_> {
        let id = std::thread::current().id();
        lock(&self.waiters).push(id);
        Waiting { halves: self, id }
    }

    /// An error if the pool was closed under the call.
    fn check_open(&self) -> PyResult<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(errors::usage("the pool of this call was closed"));
        }
        Ok(())
    }
}

fn stats_dict<'py>(py: Python<'py>, s: &PoolStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("items", s.items)?;
    d.set_item("input_bytes", s.input_bytes)?;
    d.set_item("input_bytes_copied", s.input_bytes_copied)?;
    d.set_item("output_bytes", s.output_bytes)?;
    d.set_item("respawns", s.respawns)?;
    let ws = PyList::empty(py);
    for w in &s.workers {
        let wd = PyDict::new(py);
        wd.set_item("index", w.index)?;
        wd.set_item("pid", w.pid)?;
        wd.set_item("core", w.core)?;
        wd.set_item("items", w.chunks)?;
        wd.set_item("bytes_in", w.bytes_in)?;
        wd.set_item("bytes_out", w.bytes_out)?;
        wd.set_item("busy_seconds", w.busy.as_secs_f64())?;
        wd.set_item("errors", w.errors)?;
        wd.set_item("respawns", w.respawns)?;
        ws.append(wd)?;
    }
    d.set_item("workers", ws)?;
    Ok(d)
}

/// One call: send items, receive results. Dropping it (or [`NativeCall::finish`]) gives the
/// pool back for the next call; results still in flight are discarded.
#[pyclass(module = "shmexec._native", frozen)]
pub struct NativeCall {
    halves: Arc<Halves>,
    owner: Py<NativePool>,
}

impl NativeCall {
    /// Whether this process is not the pool's (a forked child of it).
    fn foreign(&self) -> bool {
        std::process::id() != self.owner.get().pid
    }

    fn sender(&self) -> PyResult<Arc<Sender>> {
        self.owner.get().check_owner()?;
        lock(&self.halves.tx)
            .clone()
            .ok_or_else(|| self.gone("this call takes no more input"))
    }

    fn receiver(&self) -> PyResult<Arc<Receiver>> {
        self.owner.get().check_owner()?;
        lock(&self.halves.rx)
            .clone()
            .ok_or_else(|| self.gone("this call is finished"))
    }

    /// The error of a half that is gone: `otherwise`, or the pool's closing if that took it.
    fn gone(&self, otherwise: &str) -> PyErr {
        let closed = matches!(*lock(&self.owner.get().state), State::Closed);
        errors::usage(if closed {
            "the pool of this call was closed"
        } else {
            otherwise
        })
    }

    /// Gives the pool back to its owner. Another thread may be in a wait on this call
    /// (`recv`, `wait_for_room`): it sees the call finished at its next slice and lets go of
    /// its half, which this waits for (the interpreter's lock released) at most [`LET_GO`].
    fn give_back(&self, py: Python<'_>) {
        if self.foreign() {
            // A forked child's copy of the call: its halves are never dropped here (see
            // `NativePool::pid`).
            std::mem::forget(Arc::clone(&self.halves));
            return;
        }
        let tx = lock(&self.halves.tx).take();
        let Some(rx) = lock(&self.halves.rx).take() else {
            return;
        };
        let (rx, tx) = py.detach(move || {
            let deadline = Instant::now() + LET_GO;
            let shared = |tx: &Option<Arc<Sender>>| {
                Arc::strong_count(&rx) > 1 || tx.as_ref().is_some_and(|t| Arc::strong_count(t) > 1)
            };
            while shared(&tx) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            (rx, tx)
        });
        drop(tx);
        let owner = self.owner.get();
        let mut st = lock(&owner.state);
        let mine =
            matches!(&*st, State::Busy(h) if std::ptr::eq(h.as_ptr(), Arc::as_ptr(&self.halves)));
        if !mine {
            // The pool was closed meanwhile: the halves drop, and the pool with them.
            return;
        }
        *st = match Arc::try_unwrap(rx).map(Receiver::into_pool) {
            Ok(Ok(pool)) => State::Idle(Box::new(pool)),
            // Still held past LET_GO: the pool goes when the holder lets go.
            _ => State::Closed,
        };
    }

    /// `Err` once the call is finished (checked by waits at every slice).
    fn still_running(&self) -> PyResult<()> {
        self.halves.check_open()?;
        if lock(&self.halves.rx).is_none() {
            return Err(self.gone("this call is finished"));
        }
        Ok(())
    }
}

#[pymethods]
impl NativeCall {
    /// Places one item without waiting: its sequence number, or `None` if no worker has room.
    /// An item that can never fit a ring still gets a number; its error comes in its place.
    fn try_send(
        &self,
        py: Python<'_>,
        skeleton: &[u8],
        arrays: Vec<PyReadonlyArray1<'_, u8>>,
    ) -> PyResult<Option<u64>> {
        let tx = self.sender()?;
        let region = self.owner.get().region.as_ref().map(|r| r.get());
        let (layout, parts) = item::lay_out(skeleton.len(), &arrays, region)?;
        let sent = tx.try_send_in_place::<u8, ()>(layout.len, &(), |buf| {
            layout.write_parts(buf, skeleton, &parts);
            Ok(())
        });
        sent.map_err(|e| raise(py, &e, None))
    }

    /// Waits (the interpreter's lock released) at most `timeout` seconds until a worker may
    /// have room for an item of `len` bytes; `True` if one may.
    fn wait_for_room(&self, py: Python<'_>, len: usize, timeout: f64) -> PyResult<bool> {
        // Dropped after `tx` (locals drop in reverse order): close() waits for that.
        let _waiting = self.halves.enter();
        let tx = self.sender()?;
        let mut left = Duration::try_from_secs_f64(timeout.max(0.0)).unwrap_or(Duration::MAX);
        loop {
            self.halves.check_open()?;
            let slice = left.min(SLICE);
            let room = py
                .detach(|| tx.wait_for_room(len, slice))
                .map_err(|e| raise(py, &e, None))?;
            if room {
                return Ok(true);
            }
            py.check_signals()?;
            self.still_running()?;
            left = left.saturating_sub(slice);
            if left.is_zero() {
                return Ok(false);
            }
        }
    }

    /// Ends the input: the results of what was sent still come, then the end.
    fn close_input(&self) {
        if self.foreign() {
            return;
        }
        drop(lock(&self.halves.tx).take());
    }

    /// The next result, waiting (the interpreter's lock released) at most `timeout` seconds
    /// (`None`: as long as it takes). Returns `("ok", seq, skeleton, arrays, frame)`,
    /// `("err", kind, seq, message)`, `("end",)` when every result was handed out, or `None`
    /// when the time ran out.
    #[pyo3(signature = (timeout=None))]
    fn recv<'py>(
        &self,
        py: Python<'py>,
        timeout: Option<f64>,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        // Dropped after `rx` (locals drop in reverse order): close() waits for that.
        let _waiting = self.halves.enter();
        let rx = self.receiver()?;
        let mut left =
            timeout.map(|t| Duration::try_from_secs_f64(t.max(0.0)).unwrap_or(Duration::MAX));
        loop {
            self.halves.check_open()?;
            let slice = left.map_or(SLICE, |l| l.min(SLICE));
            let got = if slice.is_zero() {
                rx.try_recv()
            } else {
                py.detach(|| rx.recv_timeout(slice))
            };
            match got {
                Poll::Ready(Some(Ok(output))) => {
                    let frame = ResultFrame::new(output);
                    let seq = frame.seq();
                    let bytes = frame.bytes();
                    let parts = match item::parse(bytes, None) {
                        Ok(p) => p,
                        Err(reason) => {
                            let t = ("err", "invalid", seq, format!("result {seq}: {reason}"));
                            return Ok(Some(t.into_pyobject(py)?.into_any()));
                        }
                    };
                    let skeleton = PyBytes::new(py, &bytes[parts.skeleton.clone()]);
                    let frame = Bound::new(py, frame)?;
                    let t = ("ok", seq, skeleton, parts.in_item(), frame);
                    return Ok(Some(t.into_pyobject(py)?.into_any()));
                }
                Poll::Ready(Some(Err(e))) => {
                    let (kind, seq, message) = errors::classify(&e);
                    let t = ("err", kind, seq, message);
                    return Ok(Some(t.into_pyobject(py)?.into_any()));
                }
                Poll::Ready(None) => return Ok(Some(("end",).into_pyobject(py)?.into_any())),
                Poll::Pending => {
                    py.check_signals()?;
                    self.still_running()?;
                    if let Some(l) = &mut left {
                        *l = l.saturating_sub(slice);
                        if l.is_zero() {
                            return Ok(None);
                        }
                    }
                }
            }
        }
    }

    /// Ends the call and gives the pool back (results still in flight are discarded).
    fn finish(&self, py: Python<'_>) {
        self.give_back(py);
    }
}

impl Drop for NativeCall {
    fn drop(&mut self) {
        Python::attach(|py| self.give_back(py));
    }
}
