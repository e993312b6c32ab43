//! # domkit-conformance
//!
//! ONE set of lifecycle scenarios, generic over `domkit-core`'s traits, run against every
//! backend. A difference between backends is a bug in a driver (or an explicit
//! `Unsupported`, reported as a gap, never as a pass), never a special case in a scenario.
//!
//! - [`backend::TestBackend`]: what a backend provides (driver, test guest, guest-side
//!   actions, out-of-band kill);
//! - [`scenarios`]: the scenarios, each checking uniform states and the exact event sequence;
//! - [`runner`]: runs them and reports a table / JSON;
//! - `qemu` (feature `qemu`, default): the QEMU test backend;
//! - `libxl` (feature `libxl`): the Xen test backend (inside a dom0).

#![warn(missing_docs)]

pub mod backend;
#[cfg(feature = "libxl")]
pub mod libxl;
pub mod manager;
#[cfg(feature = "qemu")]
pub mod qemu;
pub mod runner;
pub mod scenario;
pub mod scenarios;

pub use backend::{AwayAction, DurableRoots, GuestAction, GuestOptions, TestBackend};
pub use runner::{run, SuiteReport};
pub use scenario::{ScenarioReport, Verdict};
