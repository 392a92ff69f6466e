//! # shmexec
//!
//! Runs a function over a stream of large numeric chunks on a pool of worker processes. Chunks
//! travel as rkyv archives through shared-memory rings (`shmexec-shm`), so a worker reads a
//! 64 MiB array where it lies: no pickling, no pipe. Results come back in input order as
//! [`OutputRef`]s that point into the worker's output ring.
//!
//! ```no_run
//! use shmexec::{Pool, Samples};
//!
//! // Count the samples above threshold in each chunk, on 2 worker processes.
//! let task = shmexec::from_fn::<Vec<f32>, _, _>(|chunk| {
//!     chunk.samples().iter().filter(|&&x| x > 1.0).count() as u64
//! });
//! let mut pool = Pool::builder().workers(2).build(task)?;
//! let chunks: Vec<Vec<f32>> = (0..16).map(|i| vec![i as f32 / 8.0; 1 << 20]).collect();
//! for count in pool.map(&chunks) {
//!     println!("{}", count?.to_native());
//! }
//! # Ok::<(), shmexec::Error>(())
//! ```
//!
//! | module      | holds                                                                 |
//! |-------------|-----------------------------------------------------------------------|
//! | [`task`]    | what a worker runs: the [`Task`] trait, array tasks, closures, sinks  |
//! | [`pool`]    | [`Pool`] and [`Builder`]; the supervisor (start, health, respawn)     |
//! | [`call`]    | one call's engine; [`Map`] and streams on top of it (async: `async`)  |
//! | [`pipeline`]| chains of stages (map, filter, flat_map, each), fused in the workers  |
//! | [`output`]  | [`OutputRef`], a result read in place                                 |
//! | [`shared`]  | the shared region: chunks the workers read where the program put them |
//! | [`store`]   | stage outputs saved to disk as they are, mapped back, read in place   |
//! | [`archive`] | rkyv glue: serializing into a ring slot; samples, records in place    |
//! | [`spawn`]   | the `spawn` start method, for programs that run threads               |
//! | [`pin`]     | which core each worker runs on, and at what priority                  |
//! | [`stats`]   | counters per worker and per call; the coordinator's doorbell          |
//! | [`time`]    | time chunks: their laws, rechunking, synchronization by containment   |
//! | `wire`      | what crosses the process boundary besides archives (`PROTOCOL.md`)    |
//! | `worker`    | the loop a worker process runs                                        |

pub mod archive;
pub mod call;
pub mod error;
mod hygiene;
pub mod output;
pub mod pin;
pub mod pipeline;
pub mod pool;
pub mod shared;
pub mod spawn;
pub mod stats;
pub mod store;
pub mod task;
pub mod time;
mod wire;
mod worker;

pub use archive::{ArchivedRecords, Decode, Encode, Record, Records, Sample, Samples};
#[cfg(feature = "async")]
pub use call::{AsyncReceiver, AsyncSender};
pub use call::{Map, StreamReceiver, StreamSender};
pub use error::{BoxError, Error, Result};
pub use output::OutputRef;
pub use pin::Pinning;
pub use pipeline::Pipeline;
pub use pool::{Builder, DEFAULT_QUEUE_BYTES, DEFAULT_RING_BYTES, Pool, Start};
pub use shmexec_shm as shm;
pub use shmexec_shm::WaitStrategy;
pub use stats::{CallStats, PoolStats, Timing, WorkerStats};
pub use task::bytes::{ByteTask, ItemFailure};
pub use task::sink::OutputSink;
pub use task::{
    ArrayOutput, ArrayTask, FlatMapTask, Task, TryFnTask, WorkerInfo, flat_map_fn, from_fn,
    try_from_fn,
};
pub use time::{Continuity, Interval, Rechunker, Synchronizer, TimeError, TimeRange};
