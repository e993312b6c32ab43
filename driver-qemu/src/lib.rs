//! domkit driver for QEMU/KVM.
//!
//! Layout: pure parts (protocol codecs, event translation) are kept apart from the I/O parts
//! (process supervision, sockets).
//! - [`qmp`]: the QEMU Machine Protocol: `codec` (pure) and `client` (tokio I/O).
//! - [`agent`]: the QEMU guest agent protocol: `codec` (pure) and `client` (tokio I/O).

pub mod agent;
pub mod qmp;
