//! # shmexec
//!
//! Runs a function over a stream of large numeric chunks on a pool of worker processes pinned to
//! CPU cores; chunks travel as rkyv archives through shared-memory rings, so a worker reads a
//! 64 MiB array where it lies instead of unpickling it from a pipe.
//!
//! This crate is the executor (pool, workers, ordered `map`). It is being built; today it
//! re-exports the transport it stands on, [`shm`] (crate `shmexec-shm`).

pub use shmexec_shm as shm;
