//! Criterion benchmarks: `executor.rs` (`cargo bench --bench executor`) and `transport.rs`
//! (`cargo bench --bench transport`), run from the repository root. This library holds no code.
