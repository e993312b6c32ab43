//! The QEMU guest agent (qemu-ga) protocol.
//!
//! - [`codec`]: the wire format, pure: resync framing, typed replies, base64.
//! - [`client`]: [`GuestAgent`], the async client (tokio I/O).

pub mod client;
pub mod codec;

pub use client::{AgentError, GuestAgent, GuestAgentOptions};
pub use codec::{
    AgentInfo, FsFreezeStatus, GuestExecRequest, GuestExecStatus, GuestNetworkInterface,
    ShutdownMode,
};
