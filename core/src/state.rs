//! Domain states and their reasons (the uniform model, after libvirt's `virDomainState`).
//!
//! A state always carries a typed reason saying how the domain got there. Serde names are
//! stable (`snake_case`); see `docs/semantics.md` §1 for the normative table.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The uniform state of a domain, with a typed reason.
///
/// Serialised as `{"state": "shutoff", "reason": "saved"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "state", content = "reason", rename_all = "snake_case")]
pub enum DomainState {
    /// No state known yet (a domain object that was never observed).
    NoState,
    /// vCPUs are running.
    Running(RunningReason),
    /// Blocked on a resource (reported by some hypervisors; domkit never derives it itself).
    Blocked(BlockedReason),
    /// vCPUs are stopped; the domain holds its resources.
    Paused(PausedReason),
    /// A graceful shutdown is in progress.
    ShuttingDown(ShuttingDownReason),
    /// The domain is not running and holds no hypervisor resources.
    Shutoff(ShutoffReason),
    /// The guest crashed and the domain is kept for inspection (`on_crash = "preserve"`), or is
    /// being torn down after the crash.
    Crashed(CrashedReason),
    /// The guest is in a power-management sleep state (ACPI S3 / S4).
    PmSuspended(PmSuspendedReason),
}

/// Why a domain is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunningReason {
    /// Not known (e.g. observed running on attach).
    Unknown,
    /// Freshly booted (or restarted by a lifecycle policy).
    Booted,
    /// Resumed after a pause.
    Unpaused,
    /// Restored from a save file.
    Restored,
    /// Arrived by migration (reserved; domkit does not migrate yet).
    Migrated,
    /// Woken up from a power-management suspend.
    Wakeup,
    /// A save failed or was cancelled and the domain resumed.
    SaveCanceled,
    /// Resumed from the crashed state (`on_crash = "preserve"`, then resume).
    FromCrashed,
}

/// Why a domain is blocked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockedReason {
    /// Not known.
    Unknown,
}

/// Why a domain is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PausedReason {
    /// Paused by someone other than domkit (no intent was stashed).
    Unknown,
    /// Paused through the API (or started paused).
    User,
    /// Paused by a save in progress.
    Save,
    /// Paused by a migration (reserved).
    Migration,
    /// Paused by the hypervisor after an I/O error.
    IoError,
    /// Paused by a watchdog action.
    Watchdog,
    /// Paused while starting up (reserved).
    StartingUp,
    /// The guest shut down and the domain is kept (`on_poweroff`/`on_reboot = "preserve"`).
    ShuttingDown,
    /// Paused after a crash (reserved; domkit uses [`DomainState::Crashed`]).
    Crashed,
}

/// Why a domain is shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShuttingDownReason {
    /// Not known.
    Unknown,
    /// Requested by the host (the API, or a host-side power button press).
    User,
    /// Initiated by the guest itself.
    Guest,
}

/// Why a domain is shut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShutoffReason {
    /// Never started, or not known.
    Unknown,
    /// The guest shut down (on its own or on request).
    Shutdown,
    /// Destroyed (through the API, or out of band at the hypervisor level).
    Destroyed,
    /// Ended by a crash: of the guest (after `on_crash = "destroy"`) or of its emulator process.
    Crashed,
    /// Saved to a file; restore brings it back.
    Saved,
    /// Failed to start, restore or restart.
    Failed,
}

/// Why a domain is in the crashed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CrashedReason {
    /// Not known.
    Unknown,
    /// The guest kernel panicked (pvpanic, Xen crash shutdown).
    Panicked,
    /// A watchdog fired and the hypervisor stopped the guest (Xen watchdog shutdown).
    Watchdog,
}

/// Which sleep state a pm-suspended domain is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PmSuspendedReason {
    /// Not known.
    Unknown,
    /// Suspended to RAM (S3).
    Memory,
    /// Suspended to disk (S4).
    Disk,
}

impl DomainState {
    /// True when the domain holds hypervisor resources (anything but shut off / no state).
    pub fn is_active(&self) -> bool {
        !matches!(self, DomainState::Shutoff(_) | DomainState::NoState)
    }

    /// True for `Running(_)`.
    pub fn is_running(&self) -> bool {
        matches!(self, DomainState::Running(_))
    }

    /// True for `Paused(_)`.
    pub fn is_paused(&self) -> bool {
        matches!(self, DomainState::Paused(_))
    }

    /// True for `Shutoff(_)`.
    pub fn is_shutoff(&self) -> bool {
        matches!(self, DomainState::Shutoff(_))
    }

    /// The state's name without its reason, as serialised (`"running"`, `"shutoff"`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            DomainState::NoState => "no_state",
            DomainState::Running(_) => "running",
            DomainState::Blocked(_) => "blocked",
            DomainState::Paused(_) => "paused",
            DomainState::ShuttingDown(_) => "shutting_down",
            DomainState::Shutoff(_) => "shutoff",
            DomainState::Crashed(_) => "crashed",
            DomainState::PmSuspended(_) => "pm_suspended",
        }
    }

    /// The reason's serialised name (`"booted"`, `"saved"`, ...); empty for `NoState`.
    pub fn reason_name(&self) -> String {
        let value = serde_json::to_value(self).unwrap_or_default();
        value
            .get("reason")
            .and_then(|r| r.as_str())
            .unwrap_or("")
            .to_string()
    }
}

impl fmt::Display for DomainState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainState::NoState => f.write_str("no_state"),
            other => write!(f, "{} ({})", other.name(), other.reason_name()),
        }
    }
}

/// The state of domkit's control channel to a domain, kept apart from [`DomainState`]:
/// a broken monitor is not a crash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "control", rename_all = "snake_case")]
pub enum ControlState {
    /// The control channel works and no job is running.
    Ok,
    /// A job (an operation that takes time) is in progress.
    Job {
        /// The operation in progress.
        operation: crate::Operation,
    },
    /// The control channel (QMP monitor, libxl context) is broken; the domain may still run.
    Broken {
        /// What broke, for humans.
        reason: String,
    },
}
