//! # domkit-core
//!
//! The uniform model of domkit, shared by every backend and free of backend types:
//! - [`DomainState`] with a typed reason per state, and [`ControlState`];
//! - [`DomainEvent`] / [`EventKind`]: uniform lifecycle events with identity, sequence
//!   number and timestamp;
//! - [`Lifecycle`]: the backend-independent state machine both drivers feed with
//!   [`Observation`]s and [`Intent`]s (pure), and [`LifecycleCell`] (its shared runtime form);
//! - [`DomainConfig`] with lifecycle policies and validation;
//! - the [`Driver`] / [`Domain`] traits and their option types;
//! - [`Error`];
//! - the guest agent client ([`agent`], the `domkit-agent` crate), reached through
//!   [`Domain::guest_agent`] on every backend;
//! - watching a domain (§12): [`watch`] (race-free waiting for events), [`stats`]
//!   ([`DomainStats`]), [`console`] (the serial console as a byte stream);
//! - [`store`]: the crash-safe store of a persistent driver (private directories, atomic
//!   writes, per-domain definition and status records).
//!
//! The normative description is `docs/semantics.md`; tests cite its sections.

#![warn(missing_docs)]

pub mod cell;
pub mod config;
pub mod console;
pub mod device;
pub mod error;
pub mod event;
pub mod lifecycle;
pub mod rootlock;
pub mod state;
pub mod stats;
pub mod store;
pub mod traits;
pub mod watch;

pub use cell::{EventStream, IntentGuard, LifecycleCell};
pub use config::{
    Accel, Boot, Channel, ChannelKind, ConfigError, Console, ConsoleKind, Disk, DiskFormat,
    DomainConfig, LifecycleAction, LifecyclePolicies, Nic, NicBackend, QemuSettings, XenGuestType,
    XenSettings,
};
pub use console::{ConsoleAccess, ConsoleHub, ConsoleStream};
pub use device::{DetachOptions, DeviceId, DeviceInfo, DeviceKind, DeviceScope, DeviceSpec};
pub use domkit_agent as agent;
pub use domkit_agent::{AgentError, GuestAgent, GuestAgentOptions};
pub use error::{Error, Operation, Result};
pub use event::{
    CrashedDetail, DomainEvent, DomainId, EventKind, PmSuspendedDetail, ResumedDetail,
    ShutdownRequester, StartedDetail, StoppedDetail, SuspendedDetail,
};
pub use lifecycle::{
    Creation, Intent, IntentToken, Lifecycle, Observation, Outcome, PolicyAction, StopCause,
};
pub use rootlock::RootLock;
pub use state::{
    BlockedReason, ControlState, CrashedReason, DomainState, PausedReason, PmSuspendedReason,
    RunningReason, ShutoffReason, ShuttingDownReason,
};
pub use stats::{CpuStats, DiskStats, DomainStats, MemoryStats, NicStats, VcpuStats};
pub use store::Ownership;
pub use traits::{
    Capabilities, Domain, DomainInfo, Driver, PmSuspendTarget, RestoreOptions, ShutdownMode,
    ShutdownOptions, ShutdownOutcome, ShutdownWait, Snapshot, StartOptions,
};
pub use watch::{EventFilter, EventName};
