//! Modules of `domkit-bench` (see `src/bin/domkit-bench.rs` and `docs/performance.md`).

pub mod allstats;
pub mod daemon;
pub mod dk;
pub mod qemu;
pub mod raw;
pub mod reattach;
pub mod results;
pub mod scale;
pub mod stats;
pub mod worker;
