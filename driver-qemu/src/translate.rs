//! QMP events -> uniform [`Observation`]s: the one place that says what a QEMU event means.
//!
//! Pure: no I/O and no clock. [`QmpTranslator`] keeps a little state (the RESET burst window,
//! whether the vCPUs run, the cause of the next STOP, how the process is about to end) and
//! reads time only from QEMU's own event timestamps, so a recorded event sequence replays
//! exactly (`tests/fixtures/flows/*.jsonl`, recorded by `examples/record_flows.rs`).
//!
//! The table (QEMU 7.2, launched by domkit with `-S -no-shutdown -action panic=pause`):
//!
//! | QMP event | observation |
//! |---|---|
//! | `STOP` | `CpusStopped{Command}`; `IoError` right after `BLOCK_IO_ERROR{action: stop}`; `Watchdog` right after `WATCHDOG{action: pause}` |
//! | `RESUME` | `CpusResumed` |
//! | `POWERDOWN` | `ShutdownRequestDelivered` (the request is acknowledged) |
//! | `SHUTDOWN{guest-shutdown}` | `GuestPoweredOff` |
//! | `SHUTDOWN{guest-reset}` | `Rebooted{Guest, platform_restarted: false}` |
//! | `SHUTDOWN{host-qmp-system-reset}` | `Rebooted{Host, platform_restarted: false}` |
//! | `SHUTDOWN{guest-panic}`, `SHUTDOWN{host-qmp-quit}`, other causes | none (`GUEST_PANICKED` / our quit explain them) |
//! | `SHUTDOWN{host-signal \| host-ui}` | none; the end that follows is `Gone{Destroyed}` |
//! | `RESET` (first of a burst) | `Rebooted{Host if guest:false else Guest, platform_restarted: true}` |
//! | `RESET` (rest of the burst, or echo of our own reset) | none |
//! | `GUEST_PANICKED` | `Crashed{Panicked}` |
//! | `SUSPEND` / `SUSPEND_DISK` / `WAKEUP` | `PmSuspended{Memory}` / `PmSuspended{Disk}` / `PmWokeUp` |
//! | `MIGRATION`, `MIGRATION_PASS` | none (the save/restore operation watches them) |
//! | monitor EOF / process exit | `Gone{Crashed}` (`Gone{Destroyed}` after a host signal) |
//! | anything else | none, logged |
//!
//! RESET bursts: one guest reboot gives 2-10 RESET events (SeaBIOS resets again), spread over
//! up to ~150 ms, more under TCG on a loaded host. A sliding window over QEMU's timestamps
//! (default [`DEFAULT_RESET_WINDOW`], 1 s: no real guest reboots twice within a second) makes
//! a burst one reboot. Two cases are echoes of a reset that was already reported and are
//! swallowed whole:
//! - a reset while the vCPUs are stopped (`stop` + `system_reset`, or our own policy restart
//!   of a powered-off or panicked guest) gives a second burst after the `cont`: the window is
//!   re-anchored at that `RESUME`;
//! - while the driver carries out a [`PolicyAction::Restart`](domkit_core::PolicyAction)
//!   (bracketed by [`QmpTranslator::begin_own_restart`]), its `STOP`, `RESET` and `RESUME`
//!   are the restart's own noise, which the core must not see after it reported
//!   `RestartDone` (that would leak a `Paused` or a second `Rebooted`).

use std::time::{Duration, SystemTime};

use domkit_core::{
    CrashedDetail, DomainState, Observation, PmSuspendedDetail, ShutdownRequester, ShutoffReason,
    StopCause,
};
use serde_json::Value;

use crate::qmp::types::{QemuTimestamp, QmpEvent, QmpEventKind, RunState, ShutdownCause};

/// Default width of the sliding RESET burst window.
pub const DEFAULT_RESET_WINDOW: Duration = Duration::from_secs(1);

/// Where the driver's own policy restart (`system_reset` + `cont`) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OwnRestart {
    /// No restart of ours in progress.
    Idle,
    /// `system_reset` sent; its `RESET` has not arrived yet.
    AwaitingReset,
    /// The reset arrived; the `RESUME` of our `cont` ends the restart.
    AwaitingResume,
}

/// Turns QMP events into uniform observations. One per QEMU process: create a new one for
/// every launch.
#[derive(Debug, Clone)]
pub struct QmpTranslator {
    reset_window: Duration,
    /// QEMU time of the latest RESET of the current burst (or of the RESUME that re-anchored
    /// the window); a RESET within `reset_window` of it is part of the same reboot.
    window_anchor: Option<SystemTime>,
    /// The latest valid QEMU timestamp seen (stands in for an event with an invalid one).
    last_time: Option<SystemTime>,
    /// Whether the vCPUs run, as far as STOP/RESUME tell (false at launch: domkit uses -S).
    vcpus_running: bool,
    /// A RESET happened while the vCPUs were stopped: its echo burst follows the next RESUME.
    reset_while_stopped: bool,
    own_restart: OwnRestart,
    /// The cause announced for the next STOP (I/O error, watchdog).
    next_stop_cause: Option<StopCause>,
    /// QEMU announced it is exiting because of a signal (or its UI): an out-of-band destroy.
    ending_by_host_signal: bool,
}

impl Default for QmpTranslator {
    fn default() -> Self {
        Self::new()
    }
}

impl QmpTranslator {
    /// A translator for a freshly launched (`-S`, so stopped) QEMU process.
    pub fn new() -> Self {
        Self::with_reset_window(DEFAULT_RESET_WINDOW)
    }

    /// A translator with a custom RESET burst window.
    pub fn with_reset_window(reset_window: Duration) -> Self {
        QmpTranslator {
            reset_window,
            window_anchor: None,
            last_time: None,
            vcpus_running: false,
            reset_while_stopped: false,
            own_restart: OwnRestart::Idle,
            next_stop_cause: None,
            ending_by_host_signal: false,
        }
    }

    /// The driver is about to carry out a policy restart (`system_reset` then `cont`): the
    /// STOP, RESET and RESUME events up to the `cont`'s RESUME, and the RESET echo after it,
    /// belong to the restart and are swallowed.
    pub fn begin_own_restart(&mut self) {
        self.own_restart = OwnRestart::AwaitingReset;
    }

    /// The restart failed before its `cont`: stop swallowing.
    pub fn abort_own_restart(&mut self) {
        self.own_restart = OwnRestart::Idle;
    }

    /// True while a restart begun with [`begin_own_restart`](Self::begin_own_restart) has
    /// not seen its RESUME yet.
    pub fn in_own_restart(&self) -> bool {
        self.own_restart != OwnRestart::Idle
    }

    /// Translate one event received from QEMU.
    pub fn translate(&mut self, event: &QmpEvent) -> Option<Observation> {
        self.translate_parts(&event.name, &event.kind, &event.data, event.timestamp)
    }

    /// Translate one event given by its wire parts (name, `data`, timestamp).
    pub fn translate_wire(
        &mut self,
        name: &str,
        data: &Value,
        timestamp: QemuTimestamp,
    ) -> Option<Observation> {
        let kind = QmpEventKind::from_wire(name, data);
        self.translate_parts(name, &kind, data, timestamp)
    }

    /// The monitor reached EOF or the process exited: the QEMU instance is gone.
    pub fn connection_ended(&self) -> Observation {
        Observation::Gone {
            unexplained: if self.ending_by_host_signal {
                ShutoffReason::Destroyed
            } else {
                ShutoffReason::Crashed
            },
        }
    }

    fn translate_parts(
        &mut self,
        name: &str,
        kind: &QmpEventKind,
        data: &Value,
        timestamp: QemuTimestamp,
    ) -> Option<Observation> {
        // An invalid timestamp (QEMU sends -1 when it cannot read the clock) counts as "same
        // time as the previous event": it can join a burst but never opens a gap.
        let at = timestamp.to_system_time().or(self.last_time);
        if at.is_some() {
            self.last_time = at;
        }
        match kind {
            QmpEventKind::Stop => {
                self.vcpus_running = false;
                let cause = self.next_stop_cause.take().unwrap_or(StopCause::Command);
                if self.in_own_restart() {
                    return None;
                }
                Some(Observation::CpusStopped { cause })
            }
            QmpEventKind::Resume => {
                self.vcpus_running = true;
                self.next_stop_cause = None;
                match self.own_restart {
                    OwnRestart::AwaitingResume => {
                        // Our cont after our system_reset: the restart is over; its RESET echo
                        // follows within the window.
                        self.own_restart = OwnRestart::Idle;
                        self.reset_while_stopped = false;
                        self.window_anchor = at;
                        return None;
                    }
                    OwnRestart::AwaitingReset => return None,
                    OwnRestart::Idle => {}
                }
                if std::mem::take(&mut self.reset_while_stopped) {
                    self.window_anchor = at;
                }
                Some(Observation::CpusResumed)
            }
            QmpEventKind::Powerdown => Some(Observation::ShutdownRequestDelivered),
            QmpEventKind::Shutdown(shutdown) => match &shutdown.reason {
                ShutdownCause::GuestShutdown => Some(Observation::GuestPoweredOff),
                ShutdownCause::GuestReset => Some(Observation::Rebooted {
                    by: ShutdownRequester::Guest,
                    platform_restarted: false,
                }),
                ShutdownCause::HostQmpSystemReset => Some(Observation::Rebooted {
                    by: ShutdownRequester::Host,
                    platform_restarted: false,
                }),
                ShutdownCause::HostSignal | ShutdownCause::HostUi => {
                    self.ending_by_host_signal = true;
                    None
                }
                // guest-panic: GUEST_PANICKED already said it; host-qmp-quit: our own quit
                // (or someone's), explained by the intent in force.
                other => {
                    tracing::debug!(reason = %other, "SHUTDOWN without an observation");
                    None
                }
            },
            QmpEventKind::Reset(reset) => {
                let in_window = match (self.window_anchor, at) {
                    (Some(anchor), Some(now)) => {
                        // A timestamp going backwards is treated as simultaneous.
                        now.duration_since(anchor).unwrap_or(Duration::ZERO) < self.reset_window
                    }
                    _ => false,
                };
                if at.is_some() {
                    self.window_anchor = at; // sliding: the burst lasts while RESETs keep coming
                }
                if !self.vcpus_running {
                    self.reset_while_stopped = true;
                }
                if self.own_restart == OwnRestart::AwaitingReset {
                    self.own_restart = OwnRestart::AwaitingResume;
                    return None;
                }
                if self.own_restart == OwnRestart::AwaitingResume || in_window {
                    return None;
                }
                Some(Observation::Rebooted {
                    by: if reset.guest {
                        ShutdownRequester::Guest
                    } else {
                        ShutdownRequester::Host
                    },
                    platform_restarted: true,
                })
            }
            QmpEventKind::GuestPanicked(_) => Some(Observation::Crashed {
                detail: CrashedDetail::Panicked,
            }),
            QmpEventKind::Suspend => Some(Observation::PmSuspended {
                detail: PmSuspendedDetail::Memory,
            }),
            QmpEventKind::SuspendDisk => Some(Observation::PmSuspended {
                detail: PmSuspendedDetail::Disk,
            }),
            QmpEventKind::Wakeup => Some(Observation::PmWokeUp),
            QmpEventKind::Migration(_) | QmpEventKind::MigrationPass(_) => None,
            QmpEventKind::Other => {
                self.note_other(name, data);
                None
            }
        }
    }

    /// Events without an observation of their own that announce the cause of the next STOP.
    fn note_other(&mut self, name: &str, data: &Value) {
        let action = data.get("action").and_then(Value::as_str);
        match (name, action) {
            ("BLOCK_IO_ERROR", Some("stop")) => self.next_stop_cause = Some(StopCause::IoError),
            ("WATCHDOG", Some("pause")) => self.next_stop_cause = Some(StopCause::Watchdog),
            _ => tracing::debug!(event = name, "QMP event without an observation"),
        }
    }
}

/// What QEMU's current run state says about the domain, for reconciling after events were
/// lost (a subscriber that lagged behind the QMP event ring): the observation that brings
/// the core to where QEMU is. The core's guards make it a no-op when nothing was missed.
/// `None` for transient or migration states, which an operation in progress owns.
/// `current` is the core's state: QEMU running while the core says pm_suspended is a lost
/// WAKEUP, not a resume.
pub fn reconcile(status: &RunState, current: &DomainState) -> Option<Observation> {
    match status {
        RunState::Running if matches!(current, DomainState::PmSuspended(_)) => {
            Some(Observation::PmWokeUp)
        }
        RunState::Running => Some(Observation::CpusResumed),
        RunState::Paused | RunState::Prelaunch | RunState::Debug => {
            Some(Observation::CpusStopped {
                cause: StopCause::Command,
            })
        }
        RunState::IoError => Some(Observation::CpusStopped {
            cause: StopCause::IoError,
        }),
        RunState::Watchdog => Some(Observation::CpusStopped {
            cause: StopCause::Watchdog,
        }),
        RunState::Suspended => Some(Observation::PmSuspended {
            detail: PmSuspendedDetail::Memory,
        }),
        RunState::GuestPanicked => Some(Observation::Crashed {
            detail: CrashedDetail::Panicked,
        }),
        // -no-shutdown after the guest powered off: the lost SHUTDOWN.
        RunState::Shutdown => Some(Observation::GuestPoweredOff),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
