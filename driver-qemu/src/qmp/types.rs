//! Typed views of the QMP messages domkit uses (pure: no I/O).
//!
//! Everything here is tolerant by construction: an enum value QEMU adds in a later version
//! lands in an `Other(String)` variant, a field this crate does not know lands in an `extra`
//! map, and an event this crate does not know (or whose data does not have the expected
//! shape) is kept as [`QmpEventKind::Other`] with its raw data. Parsing never fails because
//! QEMU grew.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// Defines a string enum with a fallback `Other(String)` variant, so values added by a later
/// QEMU deserialize instead of failing.
macro_rules! open_string_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $wire:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )*
            /// A value this crate does not know (e.g. added by a newer QEMU), kept verbatim.
            Other(String),
        }

        impl $name {
            /// The value exactly as QEMU spells it on the wire.
            pub fn as_str(&self) -> &str {
                match self {
                    $( Self::$variant => $wire, )*
                    Self::Other(s) => s.as_str(),
                }
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                match s {
                    $( $wire => Self::$variant, )*
                    other => Self::Other(other.to_owned()),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let s = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
                Ok(Self::from(s.as_ref()))
            }
        }
    };
}

open_string_enum! {
    /// QEMU's `RunState` as reported by `query-status` (QEMU 7.2 values).
    pub enum RunState {
        /// QEMU is running under a debugger (gdbstub stop).
        Debug => "debug",
        /// Waiting for an incoming migration.
        InMigrate => "inmigrate",
        /// An internal error stopped the VM (e.g. KVM internal error).
        InternalError => "internal-error",
        /// An I/O error with `werror=stop` paused the VM.
        IoError => "io-error",
        /// Paused by `stop` (or a management action).
        Paused => "paused",
        /// An outgoing migration (or a save) completed; the VM is stopped.
        PostMigrate => "postmigrate",
        /// Started with `-S` (or after a reset while stopped) and never ran since.
        Prelaunch => "prelaunch",
        /// An outgoing migration is in its final, stopped phase.
        FinishMigrate => "finish-migrate",
        /// `loadvm` in progress.
        RestoreVm => "restore-vm",
        /// The vCPUs are running.
        Running => "running",
        /// `savevm` in progress.
        SaveVm => "save-vm",
        /// The guest shut down and QEMU was started with `-no-shutdown`.
        Shutdown => "shutdown",
        /// The guest is in ACPI S3 (suspend to RAM).
        Suspended => "suspended",
        /// A watchdog fired with action `pause`.
        Watchdog => "watchdog",
        /// The guest panicked and the panic action paused it.
        GuestPanicked => "guest-panicked",
        /// COLO fault tolerance state.
        Colo => "colo",
    }
}

open_string_enum! {
    /// Why QEMU shut down or reset (`ShutdownCause`, the `reason` of SHUTDOWN and RESET).
    pub enum ShutdownCause {
        /// No particular cause.
        None => "none",
        /// An error on the host side.
        HostError => "host-error",
        /// The QMP `quit` command.
        HostQmpQuit => "host-qmp-quit",
        /// The QMP `system_reset` command.
        HostQmpSystemReset => "host-qmp-system-reset",
        /// A signal (e.g. SIGTERM) delivered to QEMU.
        HostSignal => "host-signal",
        /// The user interface (e.g. window closed).
        HostUi => "host-ui",
        /// The guest powered itself off (ACPI S5, or the agent's guest-shutdown).
        GuestShutdown => "guest-shutdown",
        /// The guest rebooted itself.
        GuestReset => "guest-reset",
        /// The guest panicked and the panic action is shutdown.
        GuestPanic => "guest-panic",
        /// A subsystem (e.g. a device) requested the reset.
        SubsystemReset => "subsystem-reset",
        /// A snapshot was loaded.
        SnapshotLoad => "snapshot-load",
    }
}

open_string_enum! {
    /// What QEMU did about a guest panic (`GuestPanicAction`, the `action` of GUEST_PANICKED).
    pub enum GuestPanicAction {
        /// The VM was paused (run state `guest-panicked`).
        Pause => "pause",
        /// The VM is being powered off (a SHUTDOWN follows).
        Poweroff => "poweroff",
        /// The VM keeps running.
        Run => "run",
    }
}

open_string_enum! {
    /// The state of a migration (`MigrationStatus`), also used for save-to-file.
    pub enum MigrationStatus {
        /// No migration has happened.
        None => "none",
        /// Setting up.
        Setup => "setup",
        /// Being cancelled.
        Cancelling => "cancelling",
        /// Cancelled.
        Cancelled => "cancelled",
        /// Transferring state.
        Active => "active",
        /// Postcopy phase.
        PostcopyActive => "postcopy-active",
        /// Postcopy paused after a failure.
        PostcopyPaused => "postcopy-paused",
        /// Postcopy recovering.
        PostcopyRecover => "postcopy-recover",
        /// Finished successfully.
        Completed => "completed",
        /// Failed.
        Failed => "failed",
        /// COLO.
        Colo => "colo",
        /// Waiting for `migrate-continue` (pause-before-switchover).
        PreSwitchover => "pre-switchover",
        /// Transferring device state.
        Device => "device",
        /// Waiting for devices to unplug.
        WaitUnplug => "wait-unplug",
    }
}

/// A `major.minor.micro` version triple as QEMU reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VersionTriple {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version (the Debian package's point release, e.g. 22 in 7.2.22).
    pub micro: u32,
}

/// The reply of `query-version`, also embedded in the greeting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The QEMU version.
    pub qemu: VersionTriple,
    /// The distribution package string (e.g. `Debian 1:7.2+dfsg-7+deb12u18+b3`); may be empty.
    #[serde(default)]
    pub package: String,
    /// Fields this crate does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The QMP greeting QEMU sends first: `{"QMP": {"version": ..., "capabilities": [...]}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QmpGreeting {
    /// QEMU's version.
    pub version: VersionInfo,
    /// Capabilities QEMU offers (e.g. `oob`); domkit enables none of them.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Fields this crate does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The reply of `query-status`.
///
/// QEMU 7.2 also sends `singlestep` (deprecated, removed later): it is not a field here and
/// lands in `extra`, like any field a later QEMU adds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// The run state.
    pub status: RunState,
    /// Whether the vCPUs are running (`status == running`, or `debug` in some versions).
    pub running: bool,
    /// Fields this crate does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The reply of `query-migrate` (only the status is typed; statistics stay raw in `extra`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationInfo {
    /// The migration status; absent before any migration was started.
    #[serde(default)]
    pub status: Option<MigrationStatus>,
    /// Everything else (`ram`, `total-time`, `error-desc`...), verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// QEMU's event timestamp: wall-clock time on the QEMU host when the event was emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QemuTimestamp {
    /// Seconds since the Unix epoch (QEMU sends -1 if it could not read the clock).
    pub seconds: i64,
    /// Microseconds within the second (-1 if unknown).
    pub microseconds: i64,
}

impl QemuTimestamp {
    /// The timestamp as a [`SystemTime`], or `None` when QEMU sent an invalid or negative time.
    pub fn to_system_time(self) -> Option<SystemTime> {
        let secs = u64::try_from(self.seconds).ok()?;
        let micros = u64::try_from(self.microseconds).ok()?;
        if micros >= 1_000_000 {
            return None;
        }
        UNIX_EPOCH.checked_add(Duration::from_secs(secs) + Duration::from_micros(micros))
    }
}

/// Data of the SHUTDOWN event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownEventData {
    /// `true` if the guest asked for it, `false` if the host did (quit, signal, reset...).
    pub guest: bool,
    /// The cause.
    pub reason: ShutdownCause,
}

/// Data of the RESET event (same shape as SHUTDOWN).
pub type ResetEventData = ShutdownEventData;

/// Data of the GUEST_PANICKED event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestPanickedEventData {
    /// What QEMU did about the panic.
    pub action: GuestPanicAction,
    /// Architecture-specific panic information (Hyper-V crash registers, s390 reason...), raw.
    #[serde(default)]
    pub info: Option<Value>,
}

/// Data of the MIGRATION event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationEventData {
    /// The new migration status.
    pub status: MigrationStatus,
}

/// Data of the MIGRATION_PASS event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationPassEventData {
    /// The RAM pass number, starting at 1.
    pub pass: u64,
}

/// The typed meaning of a [`QmpEvent`], for the events domkit acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpEventKind {
    /// `STOP`: the vCPUs stopped (stop command, save, panic with pause, -no-shutdown...).
    Stop,
    /// `RESUME`: the vCPUs started running.
    Resume,
    /// `SHUTDOWN`: the VM is shutting down (QEMU exits unless -no-shutdown).
    Shutdown(ShutdownEventData),
    /// `POWERDOWN`: an ACPI power button press was injected (system_powerdown).
    Powerdown,
    /// `RESET`: the VM was reset; a guest reboot usually gives a burst of these.
    Reset(ResetEventData),
    /// `GUEST_PANICKED`: the guest reported a panic (pvpanic, Hyper-V crash MSRs...).
    GuestPanicked(GuestPanickedEventData),
    /// `SUSPEND`: the guest entered S3.
    Suspend,
    /// `SUSPEND_DISK`: the guest entered S4 (QEMU then shuts down).
    SuspendDisk,
    /// `WAKEUP`: the guest left S3.
    Wakeup,
    /// `MIGRATION`: the migration (or save) status changed (needs the `events` capability).
    Migration(MigrationEventData),
    /// `MIGRATION_PASS`: a RAM pass started (needs the `events` capability).
    MigrationPass(MigrationPassEventData),
    /// Any other event, or a known one whose data did not have the expected shape; the name
    /// and raw data are in [`QmpEvent::name`] and [`QmpEvent::data`].
    Other,
}

impl QmpEventKind {
    /// Interprets an event name and its data. Never fails: unknown names, and known names
    /// with unexpected data, give [`QmpEventKind::Other`].
    pub fn from_wire(name: &str, data: &Value) -> Self {
        fn typed<T: serde::de::DeserializeOwned>(data: &Value) -> Option<T> {
            T::deserialize(data).ok()
        }
        let kind = match name {
            "STOP" => Some(Self::Stop),
            "RESUME" => Some(Self::Resume),
            "POWERDOWN" => Some(Self::Powerdown),
            "SUSPEND" => Some(Self::Suspend),
            "SUSPEND_DISK" => Some(Self::SuspendDisk),
            "WAKEUP" => Some(Self::Wakeup),
            "SHUTDOWN" => typed(data).map(Self::Shutdown),
            "RESET" => typed(data).map(Self::Reset),
            "GUEST_PANICKED" => typed(data).map(Self::GuestPanicked),
            "MIGRATION" => typed(data).map(Self::Migration),
            "MIGRATION_PASS" => typed(data).map(Self::MigrationPass),
            _ => None,
        };
        kind.unwrap_or(Self::Other)
    }
}

/// One asynchronous event from QEMU, as delivered to subscribers.
#[derive(Debug, Clone)]
pub struct QmpEvent {
    /// The event name exactly as QEMU sent it (e.g. `RESET`, `JOB_STATUS_CHANGE`).
    pub name: String,
    /// The event's `data` member, verbatim (`Value::Null` when QEMU sent none).
    pub data: Value,
    /// The typed interpretation of `name` and `data`.
    pub kind: QmpEventKind,
    /// When QEMU emitted the event (QEMU's own clock).
    pub timestamp: QemuTimestamp,
    /// When this process read the event off the socket (monotonic clock).
    pub received_at: Instant,
    /// When this process read the event off the socket (wall clock).
    pub received_wall: SystemTime,
}

impl QmpEvent {
    /// Builds an event from its wire parts, stamping it with the local receive time given.
    pub fn from_wire(
        name: String,
        data: Value,
        timestamp: QemuTimestamp,
        received_at: Instant,
        received_wall: SystemTime,
    ) -> Self {
        let kind = QmpEventKind::from_wire(&name, &data);
        Self {
            name,
            data,
            kind,
            timestamp,
            received_at,
            received_wall,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn run_state_round_trips_known_and_unknown_values() {
        let known: RunState = serde_json::from_value(json!("postmigrate")).expect("string");
        assert_eq!(known, RunState::PostMigrate);
        let unknown: RunState = serde_json::from_value(json!("hibernating")).expect("string");
        assert_eq!(unknown, RunState::Other("hibernating".into()));
        assert_eq!(
            serde_json::to_value(&unknown).expect("ser"),
            json!("hibernating")
        );
    }

    #[test]
    fn known_event_with_unexpected_data_is_other_not_an_error() {
        let kind = QmpEventKind::from_wire("SHUTDOWN", &json!({"guest": "maybe"}));
        assert_eq!(kind, QmpEventKind::Other);
        let kind = QmpEventKind::from_wire("SHUTDOWN", &Value::Null);
        assert_eq!(kind, QmpEventKind::Other);
    }

    #[test]
    fn timestamp_converts_and_rejects_invalid() {
        let ts = QemuTimestamp {
            seconds: 10,
            microseconds: 5,
        };
        assert_eq!(
            ts.to_system_time(),
            Some(UNIX_EPOCH + Duration::from_micros(10_000_005))
        );
        let bad = QemuTimestamp {
            seconds: -1,
            microseconds: -1,
        };
        assert_eq!(bad.to_system_time(), None);
    }
}
