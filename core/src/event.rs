//! Uniform lifecycle events (after libvirt's `virDomainEventType` and its detail enums).
//!
//! Events are not states: starting a domain paused yields `Started{Booted}` then
//! `Suspended{Paused}`, while its state is simply `Paused(User)`. Each event carries the
//! domain's identity, a per-domain monotonic sequence number (gaps mean a subscriber lagged
//! and lost events) and a timestamp. See `docs/semantics.md` §2.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};
use uuid::Uuid;

/// Who a domain is, independent of any backend id (QEMU pid, Xen domid): it survives a new
/// Xen domid after a reboot-restart or a restore.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DomainId {
    /// The domain's unique name.
    pub name: String,
    /// The domain's UUID.
    pub uuid: Uuid,
}

impl DomainId {
    /// Check that a new domain `name`/`uuid` clashes with none of `existing`: the one rule
    /// every driver's `define` enforces (`AlreadyExists` naming what clashed).
    pub fn check_unique<'a>(
        name: &str,
        uuid: Uuid,
        existing: impl IntoIterator<Item = &'a DomainId>,
    ) -> crate::Result<()> {
        for other in existing {
            if other.name == name {
                return Err(crate::Error::AlreadyExists {
                    what: format!("domain {name:?}"),
                });
            }
            if other.uuid == uuid {
                return Err(crate::Error::AlreadyExists {
                    what: format!("uuid {uuid} (domain {:?})", other.name),
                });
            }
        }
        Ok(())
    }
}

impl fmt::Display for DomainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.uuid)
    }
}

/// One uniform lifecycle event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainEvent {
    /// The domain it is about.
    pub domain: DomainId,
    /// Per-domain sequence number, starting at 1, +1 per event, never reused for that domain
    /// (a persistent driver continues it across managers, §11).
    pub seq: u64,
    /// Wall-clock time the event was produced, in microseconds since the Unix epoch.
    pub timestamp_us: u64,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
    /// True for an event a new manager derived on reattach, for something that happened
    /// while no manager was attached (§11.3): its timestamp is when it was found out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reconciled: bool,
}

impl DomainEvent {
    /// The event's timestamp as a `SystemTime`.
    pub fn timestamp(&self) -> SystemTime {
        UNIX_EPOCH + std::time::Duration::from_micros(self.timestamp_us)
    }
}

/// Microseconds since the Unix epoch of `t` (0 for times before the epoch).
pub fn unix_micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// What happened to a domain. Serialised as `{"event": "stopped", "detail": "saved"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "event", content = "detail", rename_all = "snake_case")]
pub enum EventKind {
    /// The domain was defined (its config is known to the driver).
    Defined,
    /// The domain was undefined (forgotten by the driver).
    Undefined,
    /// The domain started.
    Started(StartedDetail),
    /// The domain's vCPUs stopped.
    Suspended(SuspendedDetail),
    /// The domain's vCPUs run again.
    Resumed(ResumedDetail),
    /// The domain stopped and holds no hypervisor resources any more.
    Stopped(StoppedDetail),
    /// A graceful shutdown was requested (by the host) or initiated (by the guest).
    ShutdownRequested(ShutdownRequester),
    /// The guest rebooted, once (a burst of backend resets is one reboot). The domain stays.
    Rebooted,
    /// The guest entered a power-management sleep state.
    PmSuspended(PmSuspendedDetail),
    /// The guest crashed.
    Crashed(CrashedDetail),
    /// A device was attached to the running domain, or a CD-ROM got a medium (§14).
    DeviceAdded(crate::device::DeviceId),
    /// A device was detached from the running domain (the guest released it), or a
    /// CD-ROM's medium was ejected (§14).
    DeviceRemoved(crate::device::DeviceId),
    /// A detach failed: the guest refused or did not release the device in time; it is
    /// still attached (§14).
    DeviceRemovalFailed(crate::device::DeviceId),
    /// The guest agent in the guest connected to its channel (`docs/semantics.md` §13.4):
    /// qemu-ga opened its port. Not a state change.
    AgentConnected,
    /// The guest agent left its channel (§13.4): qemu-ga stopped or closed the port, or the
    /// domain stopped while it was connected. Not a state change.
    AgentDisconnected,
}

/// How a domain started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartedDetail {
    /// A fresh boot (or a restart by a lifecycle policy).
    Booted,
    /// Restored from a save file.
    Restored,
    /// Woken up from a power-management suspend.
    Wakeup,
}

/// Why a domain's vCPUs stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SuspendedDetail {
    /// Paused (through the API, at start, or by someone else).
    Paused,
    /// Paused by a save in progress.
    Saving,
    /// Paused by a migration (reserved).
    Migrating,
    /// Paused after an I/O error.
    IoError,
    /// Paused by a watchdog.
    Watchdog,
}

/// Why a domain's vCPUs run again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResumedDetail {
    /// Resumed after a pause.
    Unpaused,
    /// Resumed as part of a restore (reserved: a restore emits `Started{Restored}`).
    Restored,
    /// A save failed and the domain runs again.
    SaveCanceled,
}

/// Why a domain stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoppedDetail {
    /// The guest shut down.
    Shutdown,
    /// Destroyed.
    Destroyed,
    /// A crash ended it.
    Crashed,
    /// Saved to a file.
    Saved,
    /// It failed (e.g. a restart after a policy failed).
    Failed,
}

/// Who asked for a graceful shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownRequester {
    /// The guest powered itself off.
    Guest,
    /// The host asked (the API, or a host-side power button press).
    Host,
}

/// Which sleep state the guest entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PmSuspendedDetail {
    /// Suspend to RAM (S3).
    Memory,
    /// Suspend to disk (S4).
    Disk,
}

/// How the guest crashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CrashedDetail {
    /// Kernel panic.
    Panicked,
    /// A watchdog fired.
    Watchdog,
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = serde_json::to_value(self).unwrap_or_default();
        let name = v.get("event").and_then(|e| e.as_str()).unwrap_or("?");
        match v.get("detail").and_then(|d| d.as_str()) {
            Some(detail) => write!(f, "{name}({detail})"),
            None => f.write_str(name),
        }
    }
}
