//! domkit driver for QEMU/KVM.
//!
//! Layout: pure parts (protocol codecs, event translation, command line, save file format)
//! are kept apart from the I/O parts (process supervision, sockets).
//! - [`qmp`]: the QEMU Machine Protocol: `codec` (pure) and `client` (tokio I/O).
//! - [`agent`]: the QEMU guest agent protocol: `codec` (pure) and `client` (tokio I/O).
//! - [`translate`] (pure): QMP events -> uniform observations, the QEMU row of
//!   `docs/semantics.md` §8.
//! - [`argv`] (pure): the QEMU command line for a domain config.
//! - [`savefile`]: the save file header (pure) and its temp-file-then-rename writing.
//! - [`accel`]: what `accel = "auto"` means (TCG unless a real KVM boot was shown to work).
//! - [`process`]: launching QEMU and owning its runtime directory.
//! - [`supervisor`]: the per-process task that feeds events to the lifecycle and carries out
//!   policy actions.
//! - [`driver`] / [`domain`]: [`QemuDriver`] and [`QemuDomain`], the `Driver`/`Domain` traits.
//! - [`stats`] (pure): QMP replies and `/proc` text -> `DomainStats` figures;
//!   [`observe`]: the I/O of watching (reading `/proc`, the console socket pump), §12.
//! - [`error`]: launch failures and the mapping of QMP errors into `domkit_core::Error`.

#![warn(missing_docs)]

pub mod agent;
pub mod qmp;

pub mod accel;
pub mod argv;
pub mod devices;
pub mod domain;
pub mod driver;
pub mod error;
pub mod observe;
pub mod process;
pub mod reattach;
pub mod savefile;
pub mod stats;
pub mod supervisor;
pub mod translate;

pub use domain::QemuDomain;
pub use driver::{
    default_runtime_root, default_state_root, Ownership, QemuDriver, QemuDriverOptions,
};
