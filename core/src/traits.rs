//! The `Driver` and `Domain` traits every backend implements, and the option/outcome types of
//! their operations.

use crate::cell::EventStream;
use crate::config::DomainConfig;
use crate::event::DomainId;
use crate::state::{ControlState, DomainState};
use crate::{Error, Operation, Result};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use uuid::Uuid;

/// Options for starting a domain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartOptions {
    /// Start with the vCPUs stopped (`Started{Booted}` then `Suspended{Paused}`).
    pub paused: bool,
}

/// How a graceful shutdown or reboot is requested from the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownMode {
    /// The backend's native way: ACPI power button (QEMU), PV control request (Xen).
    #[default]
    Default,
    /// ACPI power button.
    Acpi,
    /// Through the guest agent.
    Agent,
    /// Paravirtual control request (Xen).
    Paravirt,
}

/// What [`Domain::shutdown`] waits for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownWait {
    /// Until the request reached the guest (QEMU POWERDOWN; Xen request written).
    Acknowledged,
    /// Until the domain is shut off.
    #[default]
    Completed,
}

/// Options for a graceful shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownOptions {
    /// How to ask.
    pub mode: ShutdownMode,
    /// What to wait for.
    pub wait: ShutdownWait,
    /// How long to wait.
    pub timeout: Duration,
    /// On timeout, destroy the domain instead of failing with [`Error::Timeout`].
    pub destroy_on_timeout: bool,
}

impl Default for ShutdownOptions {
    fn default() -> Self {
        ShutdownOptions {
            mode: ShutdownMode::Default,
            wait: ShutdownWait::Completed,
            timeout: Duration::from_secs(60),
            destroy_on_timeout: false,
        }
    }
}

/// What a graceful shutdown achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownOutcome {
    /// The request reached the guest (only with [`ShutdownWait::Acknowledged`]).
    Acknowledged,
    /// The domain shut down (`Shutoff(Shutdown)`).
    Completed,
    /// The guest did not shut down in time and was destroyed (`Shutoff(Destroyed)`).
    Destroyed,
}

/// Options for a restore.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreOptions {
    /// Force the vCPUs paused (`Some(true)`) or running (`Some(false)`) after the restore;
    /// `None`: as they were when saved.
    pub paused: Option<bool>,
}

/// A power-management sleep target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PmSuspendTarget {
    /// Suspend to RAM (S3).
    Memory,
    /// Suspend to disk (S4).
    Disk,
}

/// A summary of a domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainInfo {
    /// Identity.
    pub id: DomainId,
    /// State.
    pub state: DomainState,
    /// Control-channel state.
    pub control: ControlState,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// The backend's handle while active, for humans (`pid 1234`, `domid 7`).
    pub backend_handle: Option<String>,
}

/// What a backend can do; every other operation is supported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// The backend's name (`qemu`, `libxl`).
    pub backend: String,
    /// Unsupported operations, with the reason.
    pub unsupported: BTreeMap<Operation, String>,
    /// Shutdown modes this backend supports.
    pub shutdown_modes: Vec<ShutdownMode>,
    /// Modes and targets of supported operations that this backend refuses with
    /// [`Error::Unsupported`], keyed `operation:variant` (`shutdown:paravirt`,
    /// `pm_suspend:disk`), with the reason it gives.
    #[serde(default)]
    pub unsupported_variants: BTreeMap<String, String>,
}

impl Capabilities {
    /// `Ok` if `op` is supported, else the [`Error::Unsupported`] to return.
    pub fn check(&self, op: Operation) -> Result<()> {
        match self.unsupported.get(&op) {
            None => Ok(()),
            Some(reason) => Err(Error::Unsupported {
                operation: op,
                backend: self.backend.clone(),
                reason: reason.clone(),
            }),
        }
    }
}

/// A domain's state, the `seq` of the last event it reflects, and a stream of exactly the
/// events after that one (§2.4): the race-free start of "wait until X happens".
#[derive(Debug)]
pub struct Snapshot {
    /// The state now.
    pub state: DomainState,
    /// The `seq` of the last event the state reflects (0 before the first).
    pub seq: u64,
    /// Every event after `seq`, none twice.
    pub events: EventStream,
}

/// A hypervisor connection: defines, finds and creates domains.
#[async_trait]
pub trait Driver: Send + Sync + 'static {
    /// The backend's domain handle.
    type Domain: Domain + Clone + 'static;

    /// The backend's name (`qemu`, `libxl`).
    fn backend(&self) -> &'static str;

    /// What the backend supports.
    fn capabilities(&self) -> Capabilities;

    /// Validate and remember a config; the domain starts shut off. Emits `Defined`.
    async fn define(&self, config: DomainConfig) -> Result<Self::Domain>;

    /// Forget a shut-off domain. Emits `Undefined`. An active domain: `InvalidState`.
    async fn undefine(&self, name: &str) -> Result<()>;

    /// All defined domains.
    async fn list(&self) -> Result<Vec<DomainInfo>>;

    /// Find a domain by name (`NotFound` if none).
    async fn lookup_by_name(&self, name: &str) -> Result<Self::Domain>;

    /// Find a domain by uuid (`NotFound` if none).
    async fn lookup_by_uuid(&self, uuid: Uuid) -> Result<Self::Domain>;

    /// Define and start in one call.
    async fn create(&self, config: DomainConfig, options: StartOptions) -> Result<Self::Domain> {
        let domain = self.define(config).await?;
        domain.start(options).await?;
        Ok(domain)
    }

    /// Events of every domain of this driver.
    fn subscribe(&self) -> EventStream;
}

/// One domain. Operations are serialised per domain; state queries never block on them.
#[async_trait]
pub trait Domain: Send + Sync {
    /// Identity.
    fn id(&self) -> &DomainId;

    /// The current state (cheap; no backend round trip).
    fn state(&self) -> DomainState;

    /// A summary.
    async fn info(&self) -> Result<DomainInfo>;

    /// Events of this domain, from now on.
    fn subscribe(&self) -> EventStream;

    /// The state and the events after it, taken at once (§2.4): no event between the two
    /// is missed or seen twice.
    fn snapshot(&self) -> Snapshot;

    /// Start a shut-off domain.
    async fn start(&self, options: StartOptions) -> Result<()>;

    /// Stop the vCPUs. Pausing a paused domain is a no-op (no event).
    async fn pause(&self) -> Result<()>;

    /// Resume the vCPUs. Resuming a running domain is a no-op (no event).
    async fn resume(&self) -> Result<()>;

    /// Ask the guest to shut down, and wait as `options` says.
    async fn shutdown(&self, options: ShutdownOptions) -> Result<ShutdownOutcome>;

    /// Ask the guest to reboot; returns when the reboot happened (`Rebooted`).
    async fn reboot(&self, mode: ShutdownMode, timeout: Duration) -> Result<()>;

    /// Hard reset (one `Rebooted`).
    async fn reset(&self) -> Result<()>;

    /// Hard stop (`Shutoff(Destroyed)`). Destroying a shut-off domain is a no-op.
    async fn destroy(&self) -> Result<()>;

    /// Save the domain's state to `path` and stop it (`Shutoff(Saved)`). The file is written
    /// under a temporary name and renamed only on success: a failed save keeps any older
    /// file at `path` and leaves the domain as it was.
    async fn save(&self, path: &Path) -> Result<()>;

    /// Restore a shut-off domain from a file written by [`Domain::save`] of this domain.
    async fn restore(&self, path: &Path, options: RestoreOptions) -> Result<()>;

    /// Put the guest to sleep.
    async fn pm_suspend(&self, target: PmSuspendTarget) -> Result<()>;

    /// Wake a sleeping guest.
    async fn pm_wakeup(&self) -> Result<()>;
}
