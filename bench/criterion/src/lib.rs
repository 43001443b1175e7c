//! Nothing here: the benchmarks live in `benches/inprocess.rs` (see `Cargo.toml`).
