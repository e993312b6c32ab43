//! The QEMU guest agent (qemu-ga) protocol, for every domkit driver.
//!
//! The protocol is the same whatever carries it (a virtio-serial port QEMU serves as a unix
//! socket, a Xen PV channel whose dom0 end is a socket of the device model): only the
//! transport differs. So the protocol lives here, below `domkit-core`, and both drivers hand
//! out the same [`GuestAgent`] through `domkit_core::Domain::guest_agent`.
//!
//! - [`framing`]: the line framer (shared with driver-qemu's QMP codec), pure.
//! - [`codec`]: the agent's wire format, pure: 0xFF resync framing, replies, base64.
//! - [`types`]: typed requests and replies of every command of the schema.
//! - [`client`]: [`GuestAgent`], the async client over any `AsyncRead + AsyncWrite`.

pub mod client;
pub mod codec;
pub mod framing;
pub mod types;

pub use client::{
    AgentError, AgentStream, BoxedStream, ConnectFuture, Connector, GuestAgent, GuestAgentOptions,
    Probe,
};
pub use types::{
    AgentCommandInfo, AgentInfo, FileHandle, FileOpenMode, FsFreezeStatus, GuestDiskAddress,
    GuestExecRequest, GuestExecStatus, GuestFileRead, GuestFileSeek, GuestFileWrite,
    GuestFilesystemInfo, GuestFilesystemTrimResponse, GuestFilesystemTrimResult, GuestIpAddress,
    GuestLogicalProcessor, GuestMemoryBlock, GuestMemoryBlockInfo, GuestMemoryBlockResponse,
    GuestMemoryBlockResponseType, GuestNetworkInterface, GuestNetworkInterfaceStat,
    GuestPciAddress, SeekWhence, SetUserPassword, ShutdownMode,
};
