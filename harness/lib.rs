//! The compare harness lives in `examples/` (`cargo run --release --example compare -- --help`
//! from the repository root), beside its Python peer `examples/compare_python.py`.
//!
//! This library holds no code: it compiles the README's Rust snippets as doctests, so that
//! they keep matching the API.

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeSnippets;
