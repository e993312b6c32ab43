//! The `Driver` and `Domain` traits every backend implements, and the option/outcome types of
//! their operations.

use crate::cell::EventStream;
use crate::config::DomainConfig;
use crate::console::{ConsoleAccess, ConsoleStream};
use crate::device::{DetachOptions, DeviceId, DeviceInfo, DeviceScope, DeviceSpec};
use crate::event::{DomainEvent, DomainId};
use crate::state::{ControlState, DomainState};
use crate::stats::DomainStats;
use crate::watch::EventFilter;
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
    /// The current devices (§14.1), as [`Domain::devices`] lists them; empty on a backend
    /// that does not list devices yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceInfo>,
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

    /// The statistics of every defined domain (libvirt's `virConnectGetAllDomainStats`),
    /// active ones with their figures, others with their state only (§12.5). Meant to be
    /// polled (once a second for 100 domains is cheap). The default asks each domain in
    /// turn; a backend may do better.
    async fn all_stats(&self) -> Result<Vec<DomainStats>> {
        let mut all = Vec::new();
        for info in self.list().await? {
            let domain = match self.lookup_by_uuid(info.id.uuid).await {
                Ok(domain) => domain,
                // Undefined since the list was taken.
                Err(Error::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            all.push(domain.stats().await?);
        }
        Ok(all)
    }
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

    /// Every event with a `seq` above `after`, none twice, then the live ones (§12.1): for
    /// a subscriber that has seen events up to `after` (from an earlier stream or
    /// snapshot) and wants to go on without a gap.
    ///
    /// [`Error::EventsLost`] when some of those events are no longer kept: take a new
    /// [`Domain::snapshot`]. The default keeps nothing: it serves `after` at or beyond the
    /// snapshot's `seq` and answers `events_lost` for anything older; a backend built on
    /// [`crate::LifecycleCell`] replays the last [`crate::cell::EVENT_BUFFER`] events.
    fn subscribe_from(&self, after: u64) -> Result<EventStream> {
        let snapshot = self.snapshot();
        if after >= snapshot.seq {
            let mut events = snapshot.events;
            events.skip_through(after);
            Ok(events)
        } else {
            Err(Error::EventsLost {
                domain: self.id().name.clone(),
                after,
                resumed_at: snapshot.seq + 1,
            })
        }
    }

    /// Wait for the next event `filter` accepts, from now on, at most `timeout` (§12.3):
    /// machine.py's `event_wait`. Errors as [`EventStream::wait_for`] (`timeout` with
    /// operation `wait_event`).
    ///
    /// "From now on" races with anything the caller did before: to wait for the effect of
    /// an operation, take a [`Domain::snapshot`] before it and wait on its stream.
    async fn wait_for_event(&self, filter: EventFilter, timeout: Duration) -> Result<DomainEvent> {
        let mut events = self.subscribe();
        events.wait_for(&filter, timeout).await
    }

    /// The domain's statistics now (§12.5): cpu, memory, disks, NICs, with `None` where the
    /// backend does not know a figure. A domain that is not active has its state only.
    async fn stats(&self) -> Result<DomainStats> {
        Err(Error::Unsupported {
            operation: Operation::Stats,
            backend: self.backend_name().into(),
            reason: "this backend does not report statistics yet".into(),
        })
    }

    /// A byte stream on the domain's serial console (§12.4): what the guest prints from
    /// now on, and, with [`ConsoleAccess::ReadWrite`], what to type into it. Any number of
    /// readers; one writer at a time (the next is [`Error::Busy`]). The stream ends when
    /// the domain stops; a domain that is not active is `invalid_state`.
    async fn console(&self, access: ConsoleAccess) -> Result<ConsoleStream> {
        let _ = access;
        Err(Error::Unsupported {
            operation: Operation::Console,
            backend: self.backend_name().into(),
            reason: "this backend has no console stream yet".into(),
        })
    }

    /// The backend's name, for errors of default methods (`qemu`, `libxl`).
    fn backend_name(&self) -> &'static str {
        "unknown"
    }

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

    // ---- Devices (§14) -------------------------------------------------------------------

    /// The domain's current devices: the running domain's (with hotplugged ones) while it
    /// is active, else the definition's.
    async fn devices(&self) -> Result<Vec<DeviceInfo>> {
        Err(self.devices_unsupported(Operation::AttachDevice))
    }

    /// The devices the definition has (what the next start gets).
    async fn defined_devices(&self) -> Result<Vec<DeviceInfo>> {
        Err(self.devices_unsupported(Operation::AttachDevice))
    }

    /// Attach a disk or NIC (virsh `attach-disk` / `attach-interface`). Live: the domain
    /// must be running or paused; returns once the backend has the device (`DeviceAdded`).
    /// Bad input is `invalid_config` with the reason, and nothing changes.
    async fn attach_device(&self, device: DeviceSpec, scope: DeviceScope) -> Result<DeviceId> {
        let _ = (device, scope);
        Err(self.devices_unsupported(Operation::AttachDevice))
    }

    /// Detach a device by id (virsh `detach-device`). Live: waits until the guest released
    /// it (`DeviceRemoved`); a guest that refuses or does not answer within the timeout is
    /// `DeviceRemovalFailed` and an error (`timeout`, or `backend` with the guest's
    /// refusal) saying the device is still attached.
    async fn detach_device(&self, id: DeviceId, options: DetachOptions) -> Result<()> {
        let _ = (id, options);
        Err(self.devices_unsupported(Operation::DetachDevice))
    }

    /// Change a CD-ROM's medium (virsh `change-media`): `None` ejects (`DeviceRemoved`),
    /// `Some(path)` inserts that image (`DeviceAdded`).
    async fn change_media(
        &self,
        id: DeviceId,
        medium: Option<std::path::PathBuf>,
        scope: DeviceScope,
    ) -> Result<()> {
        let _ = (id, medium, scope);
        Err(self.devices_unsupported(Operation::ChangeMedia))
    }

    /// The `unsupported` error of the device methods' defaults.
    fn devices_unsupported(&self, operation: Operation) -> Error {
        Error::Unsupported {
            operation,
            backend: self.backend_name().into(),
            reason: "this backend cannot change devices yet".into(),
        }
    }

    // ---- The guest agent (issue 9, `docs/semantics.md` §13) ------------------------------

    /// The domain's guest agent client (§13.1): the same typed [`crate::GuestAgent`] on
    /// every backend, connected on first use and shared by every caller (the channel serves
    /// one conversation; calls are serialised, each with its own timeout). Each command's
    /// errors are the client's own ([`crate::AgentError`]; `unsupported` for a command the
    /// guest disabled or lacks). The domain must be active (`invalid_state` otherwise).
    ///
    /// A domain without an agent channel: [`Error::NoGuestAgent`], which says to add
    /// `[[channels]] kind = "guest_agent"`. That is also the default for a backend that does
    /// not connect to an agent yet.
    async fn guest_agent(&self) -> Result<std::sync::Arc<crate::GuestAgent>> {
        Err(Error::NoGuestAgent {
            domain: self.id().name.clone(),
            reason: format!(
                "the {} backend does not connect to a guest agent yet",
                self.backend_name()
            ),
        })
    }
}
