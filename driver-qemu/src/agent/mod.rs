//! The QEMU guest agent: the protocol moved to the `domkit-agent` crate (shared with the Xen
//! driver); re-exported here so that `domkit_qemu::agent::...` paths keep working.

pub use domkit_agent::client;
pub use domkit_agent::codec;
pub use domkit_agent::types;
pub use domkit_agent::*;
