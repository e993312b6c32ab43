//! Unit tests of the translation table.
//!
//! Most tests replay a flow RECORDED from real QEMU 7.2 booting the real test guest
//! (`tests/fixtures/flows/*.jsonl`, written by `examples/record_flows.rs`) through the
//! translator into the REAL core [`Lifecycle`], doing what the driver does around it (intents,
//! `Created`, carrying out `Restart`), and assert the uniform states and events. Rows that a
//! healthy guest cannot produce on demand (I/O error, watchdog, S4, -no-reboot shutdowns) use
//! synthetic events.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use domkit_core::{
    CrashedDetail, CrashedReason, Creation, DomainId, DomainState, EventKind, Intent, Lifecycle,
    LifecycleAction, LifecyclePolicies, Observation, PausedReason, PmSuspendedDetail,
    PmSuspendedReason, PolicyAction, ResumedDetail, RunningReason, ShutdownRequester,
    ShutoffReason, ShuttingDownReason, StartedDetail, StopCause, StoppedDetail, SuspendedDetail,
};
use serde_json::{json, Value};

use super::*;

/// A recorded flow, by name.
fn fixture(flow: &str) -> &'static str {
    macro_rules! flows {
        ($($name:literal),* $(,)?) => {
            match flow {
                $($name => include_str!(concat!("../../tests/fixtures/flows/", $name, ".jsonl")),)*
                other => panic!("no fixture {other}"),
            }
        };
    }
    flows!(
        "boot",
        "pause_resume",
        "powerdown",
        "powerdown_ignored",
        "fake_reboot",
        "guest_reboot",
        "reset",
        "reset_paused",
        "guest_poweroff",
        "guest_poweroff_restart",
        "panic",
        "panic_restart",
        "save",
        "save_paused",
        "restore",
        "s3",
        "agent_shutdown",
        "sigkill",
        "sigterm",
    )
}

fn policies(
    on_poweroff: LifecycleAction,
    on_reboot: LifecycleAction,
    on_crash: LifecycleAction,
) -> LifecyclePolicies {
    LifecyclePolicies {
        on_poweroff,
        on_reboot,
        on_crash,
    }
}

use LifecycleAction::{Destroy, Preserve, Restart};

/// The driver around the translator and the core, replaying a fixture.
struct Replay {
    lifecycle: Lifecycle,
    /// The recording's current intent, as the driver would hold it.
    stashed: Option<domkit_core::IntentToken>,
    translator: QmpTranslator,
    /// Every uniform event produced, in order.
    events: Vec<EventKind>,
    /// Every policy action asked for.
    actions: Vec<PolicyAction>,
    /// The state after each QMP event, with the event's name.
    trace: Vec<(String, DomainState)>,
    /// How many RESET events the fixture holds.
    resets: usize,
    /// How many QMP events were replayed.
    qmp_events: usize,
}

impl Replay {
    fn new(policies: LifecyclePolicies) -> Self {
        let id = DomainId {
            name: "replay".into(),
            uuid: uuid::Uuid::nil(),
        };
        Replay {
            lifecycle: Lifecycle::new(id, policies),
            stashed: None,
            translator: QmpTranslator::new(),
            events: Vec::new(),
            actions: Vec::new(),
            trace: Vec::new(),
            resets: 0,
            qmp_events: 0,
        }
    }

    fn observe(&mut self, obs: Observation) {
        let outcome = self.lifecycle.observe(obs, SystemTime::now());
        self.events.extend(outcome.events.iter().map(|e| e.kind));
        if let Some(action) = outcome.action {
            self.actions.push(action);
            if action == PolicyAction::Restart {
                // As supervisor.rs: system_reset + cont, then RestartDone once cont returned.
                // Reporting RestartDone at once is the stricter test: from here on only the
                // translator keeps the restart's STOP/RESET/RESUME away from the core.
                self.translator.begin_own_restart();
                let done = self
                    .lifecycle
                    .observe(Observation::RestartDone { ok: true }, SystemTime::now());
                self.events.extend(done.events.iter().map(|e| e.kind));
            }
        }
    }

    /// Replay `flow`; stop before the first `send` of `stop_before` (if given).
    fn run(flow: &str, policies: LifecyclePolicies, stop_before: Option<&str>) -> Self {
        let mut r = Replay::new(policies);
        for (n, line) in fixture(flow).lines().enumerate() {
            let line: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{flow}.jsonl line {}: {e}", n + 1));
            if let Some(cmd) = line.get("send").and_then(Value::as_str) {
                if Some(cmd) == stop_before {
                    break;
                }
            } else if let Some(created) = line.get("created") {
                let how = match created["how"].as_str() {
                    Some("restore") => Creation::Restore,
                    _ => Creation::Boot,
                };
                let paused = created["paused"].as_bool().unwrap_or(false);
                r.observe(Observation::Created { how, paused });
            } else if let Some(intent) = line.get("intent") {
                // One operation at a time in a recording: each intent replaces the last.
                if let Some(token) = r.stashed.take() {
                    r.lifecycle.pop_intent(token);
                }
                if !intent.is_null() {
                    let intent: Intent =
                        serde_json::from_value(intent.clone()).expect("intent name");
                    r.stashed = Some(r.lifecycle.push_intent(intent));
                }
            } else if line.get("agent").and_then(Value::as_str) == Some("guest-shutdown") {
                // As domain.rs: the agent accepting the request is the acknowledgement.
                r.observe(Observation::ShutdownRequestDelivered);
            } else if let Some(event) = line.get("event") {
                let name = event["event"].as_str().expect("event name");
                let data = event.get("data").cloned().unwrap_or(Value::Null);
                let timestamp: QemuTimestamp =
                    serde_json::from_value(event["timestamp"].clone()).expect("timestamp");
                r.qmp_events += 1;
                if name == "RESET" {
                    r.resets += 1;
                }
                if let Some(obs) = r.translator.translate_wire(name, &data, timestamp) {
                    r.observe(obs);
                }
                r.trace.push((name.to_string(), r.lifecycle.state()));
            } else if line.get("end").is_some() {
                let gone = r.translator.connection_ended();
                r.observe(gone);
            }
        }
        r
    }

    fn state(&self) -> DomainState {
        self.lifecycle.state()
    }

    /// The state right after the first QMP event named `name`.
    fn state_after(&self, name: &str) -> DomainState {
        self.trace
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| *s)
            .unwrap_or_else(|| panic!("no {name} in the replay: {:?}", self.trace))
    }
}

fn defaults() -> LifecyclePolicies {
    LifecyclePolicies::default()
}

const STARTED: EventKind = EventKind::Started(StartedDetail::Booted);

#[test]
fn boot_then_destroy() {
    let r = Replay::run("boot", defaults(), None);
    assert_eq!(
        r.events,
        [STARTED, EventKind::Stopped(StoppedDetail::Destroyed)]
    );
    assert_eq!(r.state(), DomainState::Shutoff(ShutoffReason::Destroyed));
}

#[test]
fn start_cont_resume_before_created_is_a_no_op() {
    // The fixture has RESUME before `created`: still exactly one Started, no Resumed.
    let r = Replay::run("boot", defaults(), Some("quit"));
    assert_eq!(r.trace[0].0, "RESUME");
    assert_eq!(r.trace[0].1, DomainState::Shutoff(ShutoffReason::Unknown));
    assert_eq!(r.events, [STARTED]);
    assert_eq!(r.state(), DomainState::Running(RunningReason::Booted));
}

#[test]
fn pause_and_resume_twice_give_one_event_each() {
    let r = Replay::run("pause_resume", defaults(), None);
    assert_eq!(
        r.events,
        [
            STARTED,
            EventKind::Suspended(SuspendedDetail::Paused),
            EventKind::Resumed(ResumedDetail::Unpaused),
            EventKind::Stopped(StoppedDetail::Destroyed),
        ]
    );
    assert_eq!(
        r.state_after("STOP"),
        DomainState::Paused(PausedReason::User)
    );
}

#[test]
fn powerdown_is_acknowledged_at_powerdown_and_completed_at_the_end() {
    let r = Replay::run("powerdown", defaults(), None);
    assert_eq!(
        r.state_after("POWERDOWN"),
        DomainState::ShuttingDown(ShuttingDownReason::User)
    );
    assert_eq!(
        r.events,
        [
            STARTED,
            EventKind::ShutdownRequested(ShutdownRequester::Host),
            EventKind::Stopped(StoppedDetail::Shutdown),
        ]
    );
    assert_eq!(r.actions, [PolicyAction::Destroy]);
    assert_eq!(r.state(), DomainState::Shutoff(ShutoffReason::Shutdown));
}

#[test]
fn explicit_shutdown_completes_as_shutdown_even_with_on_poweroff_restart() {
    let r = Replay::run("powerdown", policies(Restart, Restart, Destroy), None);
    assert_eq!(r.actions, [PolicyAction::Destroy]);
    assert_eq!(r.state(), DomainState::Shutoff(ShutoffReason::Shutdown));
}

#[test]
fn ignored_powerdown_stays_shutting_down_until_destroyed() {
    let r = Replay::run("powerdown_ignored", defaults(), None);
    assert_eq!(
        r.state_after("POWERDOWN"),
        DomainState::ShuttingDown(ShuttingDownReason::User)
    );
    assert!(r.actions.is_empty());
    assert_eq!(r.state(), DomainState::Shutoff(ShutoffReason::Destroyed));
}

#[test]
fn agent_shutdown_acknowledged_by_agent_completed_by_shutdown() {
    let r = Replay::run("agent_shutdown", defaults(), None);
    assert_eq!(
        r.events,
        [
            STARTED,
            EventKind::ShutdownRequested(ShutdownRequester::Host),
            EventKind::Stopped(StoppedDetail::Shutdown),
        ]
    );
    assert_eq!(r.state(), DomainState::Shutoff(ShutoffReason::Shutdown));
}

#[test]
fn fake_reboot_stays_running_with_exactly_one_rebooted() {
    let r = Replay::run("fake_reboot", defaults(), Some("quit"));
    assert_eq!(r.events, [STARTED, EventKind::Rebooted]);
    assert_eq!(r.actions, [PolicyAction::Restart]);
    assert!(!r.lifecycle.is_restarting());
    assert_eq!(r.state(), DomainState::Running(RunningReason::Booted));
    // Never a visible pause, shutdown or stop on the way.
    // (The first RESUME is start's cont, before Created: the domain is still shut off.)
    for (event, state) in &r.trace[1..] {
        assert!(state.is_running(), "after {event}: {state}");
    }
    assert!(r.resets >= 1, "the restart's RESETs are in the fixture");
}

#[test]
fn guest_reboot_burst_is_one_rebooted() {
    let r = Replay::run("guest_reboot", defaults(), Some("quit"));
    assert!(
        r.resets >= 2,
        "a real reboot gives a RESET burst ({} here)",
        r.resets
    );
    assert_eq!(r.events, [STARTED, EventKind::Rebooted]);
    assert!(r.actions.is_empty());
    assert_eq!(r.state(), DomainState::Running(RunningReason::Booted));
}

#[test]
fn guest_reboot_with_on_reboot_destroy_ends_shutdown() {
    let r = Replay::run(
        "guest_reboot",
        policies(Destroy, Destroy, Destroy),
        Some("quit"),
    );
    assert_eq!(
        r.events,
        [
            STARTED,
            EventKind::ShutdownRequested(ShutdownRequester::Guest)
        ]
    );
    assert_eq!(r.actions, [PolicyAction::Destroy]);
}

#[test]
fn host_reset_burst_is_one_rebooted() {
    let r = Replay::run("reset", defaults(), None);
    assert!(
        r.resets >= 2,
        "system_reset gives a RESET burst ({} here)",
        r.resets
    );
    assert_eq!(
        r.events,
        [
            STARTED,
            EventKind::Rebooted,
            EventKind::Stopped(StoppedDetail::Destroyed)
        ]
    );
}

#[test]
fn reset_while_paused_is_one_rebooted_and_its_echo_after_resume_is_swallowed() {
    let r = Replay::run("reset_paused", defaults(), Some("quit"));
    assert_eq!(
        r.events,
        [
            STARTED,
            EventKind::Suspended(SuspendedDetail::Paused),
            EventKind::Rebooted,
            EventKind::Resumed(ResumedDetail::Unpaused),
        ]
    );
    assert_eq!(r.state(), DomainState::Running(RunningReason::Unpaused));
}

#[test]
fn guest_poweroff_with_on_poweroff_destroy() {
    let r = Replay::run("guest_poweroff", policies(Destroy, Restart, Destroy), None);
    assert_eq!(
        r.events,
        [
            STARTED,
            EventKind::ShutdownRequested(ShutdownRequester::Guest),
            EventKind::Stopped(StoppedDetail::Shutdown),
        ]
    );
    assert_eq!(r.actions, [PolicyAction::Destroy]);
    assert_eq!(r.state(), DomainState::Shutoff(ShutoffReason::Shutdown));
}

#[test]
fn guest_poweroff_with_on_poweroff_preserve() {
    let r = Replay::run(
        "guest_poweroff",
        policies(Preserve, Restart, Destroy),
        Some("quit"),
    );
    assert_eq!(
        r.events,
        [
            STARTED,
            EventKind::ShutdownRequested(ShutdownRequester::Guest),
            EventKind::Suspended(SuspendedDetail::Paused),
        ]
    );
    assert_eq!(r.actions, [PolicyAction::Preserve]);
    assert_eq!(r.state(), DomainState::Paused(PausedReason::ShuttingDown));
}

#[test]
fn guest_poweroff_with_on_poweroff_restart() {
    let r = Replay::run(
        "guest_poweroff_restart",
        policies(Restart, Restart, Destroy),
        Some("quit"),
    );
    assert_eq!(
        r.events,
        [
            STARTED,
            EventKind::ShutdownRequested(ShutdownRequester::Guest),
            EventKind::Stopped(StoppedDetail::Shutdown),
            STARTED,
        ]
    );
    assert_eq!(r.actions, [PolicyAction::Restart]);
    assert_eq!(r.state(), DomainState::Running(RunningReason::Booted));
}

#[test]
fn panic_with_on_crash_destroy() {
    let r = Replay::run("panic", policies(Destroy, Restart, Destroy), None);
    assert_eq!(
        r.events,
        [
            STARTED,
            EventKind::Crashed(CrashedDetail::Panicked),
            EventKind::Stopped(StoppedDetail::Crashed),
        ]
    );
    assert_eq!(
        r.state_after("GUEST_PANICKED"),
        DomainState::Crashed(CrashedReason::Panicked)
    );
    assert_eq!(r.state(), DomainState::Shutoff(ShutoffReason::Crashed));
}

#[test]
fn panic_with_on_crash_preserve() {
    let r = Replay::run("panic", policies(Destroy, Restart, Preserve), Some("quit"));
    assert_eq!(
        r.events,
        [STARTED, EventKind::Crashed(CrashedDetail::Panicked)]
    );
    assert_eq!(r.actions, [PolicyAction::Preserve]);
    assert_eq!(r.state(), DomainState::Crashed(CrashedReason::Panicked));
}

#[test]
fn panic_with_on_crash_restart() {
    let r = Replay::run(
        "panic_restart",
        policies(Destroy, Restart, Restart),
        Some("quit"),
    );
    assert_eq!(
        r.events,
        [
            STARTED,
            EventKind::Crashed(CrashedDetail::Panicked),
            EventKind::Stopped(StoppedDetail::Crashed),
            STARTED,
        ]
    );
    assert_eq!(r.state(), DomainState::Running(RunningReason::Booted));
}

#[test]
fn save_is_paused_save_then_shutoff_saved_never_pm_suspended() {
    let r = Replay::run("save", defaults(), None);
    assert_eq!(
        r.state_after("STOP"),
        DomainState::Paused(PausedReason::Save)
    );
    assert_eq!(
        r.events,
        [
            STARTED,
            EventKind::Suspended(SuspendedDetail::Saving),
            EventKind::Stopped(StoppedDetail::Saved),
        ]
    );
    assert!(r.trace.iter().any(|(e, _)| e == "MIGRATION"));
    assert_eq!(r.state(), DomainState::Shutoff(ShutoffReason::Saved));
}

#[test]
fn save_of_a_paused_domain_stays_paused_until_saved() {
    let r = Replay::run("save_paused", defaults(), None);
    assert_eq!(
        r.events,
        [
            STARTED,
            EventKind::Suspended(SuspendedDetail::Paused),
            EventKind::Stopped(StoppedDetail::Saved),
        ]
    );
    assert_eq!(r.state(), DomainState::Shutoff(ShutoffReason::Saved));
}

#[test]
fn restore_is_started_restored() {
    let r = Replay::run("restore", defaults(), Some("quit"));
    assert!(r.trace.iter().any(|(e, _)| e == "MIGRATION"));
    assert_eq!(r.events, [EventKind::Started(StartedDetail::Restored)]);
    assert_eq!(r.state(), DomainState::Running(RunningReason::Restored));
}

#[test]
fn s3_suspend_and_wakeup() {
    let r = Replay::run("s3", defaults(), Some("quit"));
    assert_eq!(
        r.state_after("SUSPEND"),
        DomainState::PmSuspended(PmSuspendedReason::Memory)
    );
    assert_eq!(
        r.events,
        [
            STARTED,
            EventKind::PmSuspended(PmSuspendedDetail::Memory),
            EventKind::Started(StartedDetail::Wakeup),
        ]
    );
    assert_eq!(r.state(), DomainState::Running(RunningReason::Wakeup));
}

#[test]
fn eof_without_shutdown_is_shutoff_crashed() {
    let r = Replay::run("sigkill", defaults(), None);
    assert_eq!(
        r.events,
        [STARTED, EventKind::Stopped(StoppedDetail::Crashed)]
    );
    assert_eq!(r.state(), DomainState::Shutoff(ShutoffReason::Crashed));
}

#[test]
fn host_signal_then_eof_is_shutoff_destroyed() {
    let r = Replay::run("sigterm", defaults(), None);
    assert_eq!(
        r.events,
        [STARTED, EventKind::Stopped(StoppedDetail::Destroyed)]
    );
    assert_eq!(r.state(), DomainState::Shutoff(ShutoffReason::Destroyed));
}

#[test]
fn every_fixture_parses_and_replays_without_panicking() {
    for flow in [
        "boot",
        "pause_resume",
        "powerdown",
        "powerdown_ignored",
        "fake_reboot",
        "guest_reboot",
        "reset",
        "reset_paused",
        "guest_poweroff",
        "guest_poweroff_restart",
        "panic",
        "panic_restart",
        "save",
        "save_paused",
        "restore",
        "s3",
        "agent_shutdown",
        "sigkill",
        "sigterm",
    ] {
        let r = Replay::run(flow, defaults(), None);
        assert!(r.qmp_events > 0, "{flow}: no events");
        assert!(r.state().is_shutoff(), "{flow}: ends {}", r.state());
    }
}

// ---- synthetic rows -------------------------------------------------------------------------

/// QEMU timestamp `ms` milliseconds after an arbitrary origin.
fn at(ms: i64) -> QemuTimestamp {
    QemuTimestamp {
        seconds: 1_700_000_000 + ms / 1000,
        microseconds: (ms % 1000) * 1000,
    }
}

fn feed(t: &mut QmpTranslator, name: &str, data: Value, ms: i64) -> Option<Observation> {
    t.translate_wire(name, &data, at(ms))
}

fn reset(guest: bool) -> Value {
    let reason = if guest {
        "guest-reset"
    } else {
        "host-qmp-system-reset"
    };
    json!({"guest": guest, "reason": reason})
}

fn running_translator() -> QmpTranslator {
    let mut t = QmpTranslator::new();
    assert_eq!(
        feed(&mut t, "RESUME", Value::Null, 0),
        Some(Observation::CpusResumed)
    );
    t
}

#[test]
fn stop_cause_comes_from_the_io_error_or_watchdog_event_before_it() {
    let mut t = running_translator();
    let io = json!({"device": "", "node-name": "disk0", "operation": "write", "action": "stop", "nospace": false, "reason": "EIO"});
    assert_eq!(feed(&mut t, "BLOCK_IO_ERROR", io, 10), None);
    assert_eq!(
        feed(&mut t, "STOP", Value::Null, 11),
        Some(Observation::CpusStopped {
            cause: StopCause::IoError
        })
    );
    assert_eq!(
        feed(&mut t, "RESUME", Value::Null, 20),
        Some(Observation::CpusResumed)
    );
    assert_eq!(
        feed(&mut t, "WATCHDOG", json!({"action": "pause"}), 30),
        None
    );
    assert_eq!(
        feed(&mut t, "STOP", Value::Null, 31),
        Some(Observation::CpusStopped {
            cause: StopCause::Watchdog
        })
    );
    assert_eq!(
        feed(&mut t, "RESUME", Value::Null, 40),
        Some(Observation::CpusResumed)
    );
    // The cause is used once; a BLOCK_IO_ERROR that only reports does not make a STOP an I/O
    // error.
    let report = json!({"device": "", "operation": "read", "action": "report", "nospace": false});
    assert_eq!(feed(&mut t, "BLOCK_IO_ERROR", report, 50), None);
    assert_eq!(
        feed(&mut t, "STOP", Value::Null, 51),
        Some(Observation::CpusStopped {
            cause: StopCause::Command
        })
    );
}

#[test]
fn shutdown_reasons() {
    let mut t = running_translator();
    let shutdown = |guest: bool, reason: &str| json!({"guest": guest, "reason": reason});
    assert_eq!(
        feed(&mut t, "SHUTDOWN", shutdown(true, "guest-shutdown"), 1),
        Some(Observation::GuestPoweredOff)
    );
    assert_eq!(
        feed(&mut t, "SHUTDOWN", shutdown(true, "guest-reset"), 2),
        Some(Observation::Rebooted {
            by: ShutdownRequester::Guest,
            platform_restarted: false
        })
    );
    assert_eq!(
        feed(
            &mut t,
            "SHUTDOWN",
            shutdown(false, "host-qmp-system-reset"),
            3
        ),
        Some(Observation::Rebooted {
            by: ShutdownRequester::Host,
            platform_restarted: false
        })
    );
    assert_eq!(
        feed(&mut t, "SHUTDOWN", shutdown(true, "guest-panic"), 4),
        None
    );
    assert_eq!(
        feed(&mut t, "SHUTDOWN", shutdown(false, "host-qmp-quit"), 5),
        None
    );
    assert_eq!(
        feed(&mut t, "SHUTDOWN", shutdown(false, "some-new-cause"), 6),
        None
    );
    assert_eq!(
        t.connection_ended(),
        Observation::Gone {
            unexplained: ShutoffReason::Crashed
        }
    );
    assert_eq!(
        feed(&mut t, "SHUTDOWN", shutdown(false, "host-signal"), 7),
        None
    );
    assert_eq!(
        t.connection_ended(),
        Observation::Gone {
            unexplained: ShutoffReason::Destroyed
        }
    );
}

#[test]
fn pm_panic_and_migration_rows() {
    let mut t = running_translator();
    assert_eq!(
        feed(&mut t, "POWERDOWN", Value::Null, 1),
        Some(Observation::ShutdownRequestDelivered)
    );
    assert_eq!(
        feed(&mut t, "SUSPEND", Value::Null, 2),
        Some(Observation::PmSuspended {
            detail: PmSuspendedDetail::Memory
        })
    );
    assert_eq!(
        feed(&mut t, "WAKEUP", Value::Null, 3),
        Some(Observation::PmWokeUp)
    );
    assert_eq!(
        feed(&mut t, "SUSPEND_DISK", Value::Null, 4),
        Some(Observation::PmSuspended {
            detail: PmSuspendedDetail::Disk
        })
    );
    assert_eq!(
        feed(&mut t, "GUEST_PANICKED", json!({"action": "pause"}), 5),
        Some(Observation::Crashed {
            detail: CrashedDetail::Panicked
        })
    );
    assert_eq!(
        feed(&mut t, "MIGRATION", json!({"status": "setup"}), 6),
        None
    );
    assert_eq!(feed(&mut t, "MIGRATION_PASS", json!({"pass": 1}), 7), None);
}

#[test]
fn unknown_and_malformed_events_are_ignored_never_errors() {
    let mut t = running_translator();
    assert_eq!(
        feed(&mut t, "NIC_RX_FILTER_CHANGED", json!({"path": "/x"}), 1),
        None
    );
    assert_eq!(
        feed(&mut t, "SOMETHING_FROM_QEMU_9", json!([1, 2, 3]), 2),
        None
    );
    assert_eq!(feed(&mut t, "SHUTDOWN", json!("not an object"), 3), None);
    assert_eq!(feed(&mut t, "RESET", Value::Null, 4), None);
    // The translator still works afterwards.
    assert_eq!(
        feed(&mut t, "RESET", reset(true), 5),
        Some(Observation::Rebooted {
            by: ShutdownRequester::Guest,
            platform_restarted: true
        })
    );
}

#[test]
fn reset_burst_uses_a_sliding_window_on_qemu_timestamps() {
    let mut t = running_translator();
    let first = feed(&mut t, "RESET", reset(false), 1000);
    assert_eq!(
        first,
        Some(Observation::Rebooted {
            by: ShutdownRequester::Host,
            platform_restarted: true
        })
    );
    // Spread wider than 150 ms (a loaded TCG host), each within 1 s of the previous one: one
    // burst, although the last is 2.4 s after the first.
    for ms in [1400, 2100, 2900, 3400] {
        assert_eq!(
            feed(&mut t, "RESET", reset(true), ms),
            None,
            "RESET at {ms} ms"
        );
    }
    // A reboot 1.5 s after the burst ended is a new one.
    assert_eq!(
        feed(&mut t, "RESET", reset(true), 4900),
        Some(Observation::Rebooted {
            by: ShutdownRequester::Guest,
            platform_restarted: true
        })
    );
}

#[test]
fn window_is_configurable_and_invalid_timestamps_join_the_burst() {
    let mut t = QmpTranslator::with_reset_window(Duration::from_millis(150));
    assert!(feed(&mut t, "RESUME", Value::Null, 0).is_some());
    assert!(feed(&mut t, "RESET", reset(true), 1000).is_some());
    assert!(feed(&mut t, "RESET", reset(true), 1100).is_none());
    let invalid = QemuTimestamp {
        seconds: -1,
        microseconds: -1,
    };
    assert_eq!(t.translate_wire("RESET", &reset(true), invalid), None);
    assert!(feed(&mut t, "RESET", reset(true), 1400).is_some());
    // A timestamp going backwards counts as simultaneous.
    assert!(feed(&mut t, "RESET", reset(true), 900).is_none());
}

#[test]
fn own_restart_swallows_its_stop_reset_resume_and_echo() {
    let mut t = running_translator();
    assert_eq!(
        feed(
            &mut t,
            "SHUTDOWN",
            json!({"guest": true, "reason": "guest-shutdown"}),
            100
        ),
        Some(Observation::GuestPoweredOff)
    );
    t.begin_own_restart();
    assert!(t.in_own_restart());
    // The -no-shutdown STOP may arrive after the driver began the restart.
    assert_eq!(feed(&mut t, "STOP", Value::Null, 101), None);
    assert_eq!(feed(&mut t, "RESET", reset(false), 200), None);
    assert_eq!(feed(&mut t, "RESUME", Value::Null, 201), None);
    assert!(!t.in_own_restart());
    assert_eq!(feed(&mut t, "RESET", reset(true), 900), None);
    assert_eq!(feed(&mut t, "RESET", reset(true), 1500), None);
    // Later, a real guest reboot is reported again.
    assert!(feed(&mut t, "RESET", reset(true), 5000).is_some());
    // And pause/resume are plain again.
    assert_eq!(
        feed(&mut t, "STOP", Value::Null, 6000),
        Some(Observation::CpusStopped {
            cause: StopCause::Command
        })
    );
    assert_eq!(
        feed(&mut t, "RESUME", Value::Null, 6001),
        Some(Observation::CpusResumed)
    );
}

#[test]
fn aborted_restart_stops_swallowing() {
    let mut t = running_translator();
    t.begin_own_restart();
    t.abort_own_restart();
    assert_eq!(
        feed(&mut t, "STOP", Value::Null, 10),
        Some(Observation::CpusStopped {
            cause: StopCause::Command
        })
    );
}

#[test]
fn fixture_timestamps_are_qemu_wall_clock() {
    // The replay depends on QEMU's timestamps, never on the recording machine's clock.
    let line = fixture("guest_reboot")
        .lines()
        .find(|l| l.contains("\"RESET\""))
        .expect("a RESET");
    let v: Value = serde_json::from_str(line).expect("json");
    let ts: QemuTimestamp = serde_json::from_value(v["event"]["timestamp"].clone()).expect("ts");
    let t = ts.to_system_time().expect("valid");
    assert!(t > UNIX_EPOCH + Duration::from_secs(1_600_000_000));
}

/// A lifecycle whose domain booted (running), and the time used.
fn booted_lifecycle() -> (Lifecycle, std::time::SystemTime) {
    let mut l = Lifecycle::new(
        DomainId {
            name: "r".into(),
            uuid: uuid::Uuid::nil(),
        },
        defaults(),
    );
    let at = std::time::SystemTime::now();
    l.observe(
        Observation::Created {
            how: Creation::Boot,
            paused: false,
        },
        at,
    );
    (l, at)
}

#[test]
fn reconcile_after_lost_events_maps_run_states_and_is_guarded() {
    use crate::qmp::types::RunState;
    use crate::translate::reconcile;
    // Lost STOP: QEMU says paused while the core believes running.
    let (mut l, at) = booted_lifecycle();
    let out = l.observe(reconcile(&RunState::Paused, &l.state()).unwrap(), at);
    assert_eq!(l.state(), DomainState::Paused(PausedReason::Unknown));
    assert_eq!(out.events.len(), 1);
    // Reconciling again with the same state changes nothing.
    let out = l.observe(reconcile(&RunState::Paused, &l.state()).unwrap(), at);
    assert!(out.events.is_empty());
    let out = l.observe(reconcile(&RunState::Running, &l.state()).unwrap(), at);
    assert_eq!(l.state(), DomainState::Running(RunningReason::Unpaused));
    assert_eq!(out.events.len(), 1);
    assert_eq!(
        reconcile(
            &RunState::GuestPanicked,
            &DomainState::Running(RunningReason::Booted)
        ),
        Some(Observation::Crashed {
            detail: CrashedDetail::Panicked
        })
    );
    assert_eq!(
        reconcile(
            &RunState::Suspended,
            &DomainState::Running(RunningReason::Booted)
        ),
        Some(Observation::PmSuspended {
            detail: PmSuspendedDetail::Memory
        })
    );
    assert_eq!(
        reconcile(
            &RunState::Shutdown,
            &DomainState::Running(RunningReason::Booted)
        ),
        Some(Observation::GuestPoweredOff)
    );
    for transient in [
        RunState::InMigrate,
        RunState::PostMigrate,
        RunState::FinishMigrate,
    ] {
        assert_eq!(
            reconcile(&transient, &DomainState::Running(RunningReason::Booted)),
            None,
            "{transient:?}"
        );
    }
}

#[test]
fn reconcile_a_lost_wakeup_is_a_wakeup() {
    use crate::qmp::types::RunState;
    use crate::translate::reconcile;
    let (mut l, at) = booted_lifecycle();
    l.observe(
        Observation::PmSuspended {
            detail: PmSuspendedDetail::Memory,
        },
        at,
    );
    // The WAKEUP was lost: QEMU says running while the core says pm_suspended.
    let obs = reconcile(&RunState::Running, &l.state()).unwrap();
    assert_eq!(obs, Observation::PmWokeUp);
    let out = l.observe(obs, at);
    assert_eq!(l.state(), DomainState::Running(RunningReason::Wakeup));
    assert_eq!(out.events.len(), 1);
}
