//! The QEMU Machine Protocol (QMP).
//!
//! - [`codec`]: the wire format, pure (bytes in, messages out).
//! - [`types`]: typed replies and events, tolerant of what newer QEMUs add.
//! - [`client`]: [`QmpClient`], the async client (tokio I/O).

pub mod client;
pub mod codec;
pub mod types;

pub use client::{
    ConnectionEnd, EventRecvError, QmpClient, QmpClientOptions, QmpError, QmpEventStream,
};
pub use types::{QmpEvent, QmpEventKind, RunState, StatusInfo};
