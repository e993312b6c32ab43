//! # domkitd
//!
//! The per-host domkit service and its client library:
//! - [`pb`]: the generated types, client and server of the `domkit.v1` schema
//!   (`proto/domkit/v1/domkit.proto`, documented in docs/daemon.md);
//! - [`convert`]: the library's types <-> wire types, and the error mapping (every
//!   `domkit_core::Error` keeps its kind, fields and message);
//! - [`journal`]: the event journal behind the resumable event stream (cursor, gap markers);
//! - [`backend`]: the drivers one daemon serves (QEMU; the libxl seam);
//! - [`server`]: the gRPC service, with access levels;
//! - [`listen`]: Unix sockets (SO_PEERCRED logged) and mutual-TLS TCP;
//! - [`daemon`]: `domkitd`'s options and main loop;
//! - [`client`]: connecting to a domkitd (`unix://PATH`, `tcp://HOST:PORT` + TLS) and its
//!   typed errors;
//! - [`cli`]: the `domkit` CLI verbs (virsh's names) that talk to a domkitd.

#![warn(missing_docs)]

/// The generated `domkit.v1` types, client (`domkit_client::DomkitClient`) and server.
pub mod pb {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("domkit.v1");
}

/// The gRPC reply and status types of the client's calls (tonic's), for callers that do
/// not depend on tonic themselves.
pub use tonic::{Response, Status};

pub mod backend;
pub mod cli;
pub mod client;
pub mod convert;
pub mod daemon;
pub mod journal;
pub mod listen;
pub mod server;

/// Why domkitd could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A driver could not be opened (e.g. `root_in_use`: another manager holds the root).
    #[error(transparent)]
    Domkit(#[from] domkit_core::Error),
    /// Options, directories, sockets or TLS files are not usable.
    #[error("{0}")]
    Setup(String),
}
