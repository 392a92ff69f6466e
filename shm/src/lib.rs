//! # shmexec-shm: the transport under shmexec
//!
//! Moves frames of bytes between processes through shared memory, at memory speed, and wakes a
//! sleeping peer with one futex call only when it actually sleeps. It knows bytes, not tasks:
//! the executor (`shmexec`) builds chunks, workers and ordering on top.
//!
//! Layers, bottom up (each file holds one concern):
//!
//! | module      | holds                                                                 |
//! |-------------|-----------------------------------------------------------------------|
//! | [`clock`]   | the monotonic clock, one time line for all the pool's processes      |
//! | [`segment`] | anonymous shared memory (`memfd`), allocated up front, `MAP_SHARED`   |
//! | [`memory`]  | the memory this process may still take (cgroups, RAM, `RLIMIT_AS`)    |
//! | [`mapped`]  | a file mapped read-only: its bytes read in place, no copy             |
//! | [`futex`]   | the raw shared-futex wait and wake                                     |
//! | [`peer`]    | liveness of the process at the other end (pidfd)                       |
//! | [`wait`]    | how a waiter spends its time: spin, then park                          |
//! | [`signal`]  | the wake-up protocol, with the argument that no wake-up is lost       |
//! | [`frame`]   | the frame header: length, sequence number, kind                        |
//! | [`ring`]    | the SPSC ring of variable-length, 64-byte aligned frames              |
//! | [`held`]    | frames kept after the read cursor moved on, released in any order     |
//! | [`snapshot`]| two tagged state slots, for a successor to go on from                 |
//! | [`process`] | forked children that die with their parent and their handle           |
//! | [`sched`]   | the cores a process may use, pinning, priority                         |
//! | [`launcher`]| a single-threaded process that forks children on request              |
//! | [`spawner`] | a thread that runs this program again as children that die with the process |
//!
//! ```
//! use shmexec_shm::{Peer, Ring};
//!
//! let ring = Ring::create(1 << 20)?;
//! let mut tx = ring.producer(Peer::unwatched())?;
//! let mut rx = ring.consumer(Peer::unwatched())?;
//! let samples: Vec<f32> = (0..1024).map(|i| i as f32).collect();
//! let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_ne_bytes()).collect();
//! tx.send(&bytes)?;
//! let frame = rx.peek()?;
//! assert_eq!(frame.len(), 4096);
//! frame.release();
//! # Ok::<(), shmexec_shm::Error>(())
//! ```

pub mod clock;
pub mod error;
pub mod frame;
pub mod futex;
pub mod held;
pub mod launcher;
pub mod mapped;
pub mod memory;
pub mod peer;
pub mod process;
pub mod ring;
pub mod sched;
pub mod segment;
pub mod signal;
pub mod snapshot;
pub mod spawner;
pub mod wait;

pub use error::{Error, Result};
pub use frame::{FRAME_ALIGN, FrameKind, HEADER_LEN};
pub use held::HeldFrame;
pub use launcher::Launcher;
pub use mapped::MappedFile;
pub use peer::Peer;
pub use process::{ChildProcess, ExitStatus, fork, fork_unchecked};
pub use ring::{CONTROL_LEN, Consumer, Frame, Grant, Producer, Ring};
pub use segment::Segment;
pub use signal::Signal;
pub use snapshot::Snapshots;
pub use spawner::Spawner;
pub use wait::{WaitStrategy, Waiter};
