//! Every transition rule of `docs/semantics.md` §3-§5, one test (or more) per rule, each
//! citing its section. Drives the pure `Lifecycle` directly.

use domkit_core::*;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn id() -> DomainId {
    DomainId {
        name: "t".into(),
        uuid: uuid::Uuid::nil(),
    }
}

fn at() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn lc_with(p: LifecyclePolicies) -> Lifecycle {
    Lifecycle::new(id(), p)
}

fn lc() -> Lifecycle {
    lc_with(LifecyclePolicies::default())
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

/// Apply and return (event kinds, action).
fn obs(lc: &mut Lifecycle, o: Observation) -> (Vec<EventKind>, Option<PolicyAction>) {
    let out = lc.observe(o, at());
    (out.events.into_iter().map(|e| e.kind).collect(), out.action)
}

fn boot(paused: bool) -> Observation {
    Observation::Created {
        how: Creation::Boot,
        paused,
    }
}

fn running() -> Lifecycle {
    let mut l = lc();
    obs(&mut l, boot(false));
    l
}

const STOP: Observation = Observation::CpusStopped {
    cause: StopCause::Command,
};
const GONE_CRASH: Observation = Observation::Gone {
    unexplained: ShutoffReason::Crashed,
};

use DomainState as S;
use EventKind as E;

// §4.1
#[test]
fn s4_1_created_boot_running() {
    let mut l = lc();
    assert_eq!(l.state(), S::Shutoff(ShutoffReason::Unknown));
    let (ev, act) = obs(&mut l, boot(false));
    assert_eq!(ev, vec![E::Started(StartedDetail::Booted)]);
    assert_eq!(act, None);
    assert_eq!(l.state(), S::Running(RunningReason::Booted));
}

// §4.1 + §2.1: events are not states.
#[test]
fn s4_1_created_paused_is_started_then_suspended() {
    let mut l = lc();
    let (ev, _) = obs(&mut l, boot(true));
    assert_eq!(
        ev,
        vec![
            E::Started(StartedDetail::Booted),
            E::Suspended(SuspendedDetail::Paused)
        ]
    );
    assert_eq!(l.state(), S::Paused(PausedReason::User));
}

#[test]
fn s4_1_created_restore_and_restore_paused() {
    let mut l = lc();
    let (ev, _) = obs(
        &mut l,
        Observation::Created {
            how: Creation::Restore,
            paused: false,
        },
    );
    assert_eq!(ev, vec![E::Started(StartedDetail::Restored)]);
    assert_eq!(l.state(), S::Running(RunningReason::Restored));

    let mut l = lc();
    let (ev, _) = obs(
        &mut l,
        Observation::Created {
            how: Creation::Restore,
            paused: true,
        },
    );
    assert_eq!(
        ev,
        vec![
            E::Started(StartedDetail::Restored),
            E::Suspended(SuspendedDetail::Paused)
        ]
    );
    assert_eq!(l.state(), S::Paused(PausedReason::User));
}

#[test]
fn s4_1_created_when_active_is_noop() {
    let mut l = running();
    let (ev, act) = obs(&mut l, boot(true));
    assert!(ev.is_empty());
    assert_eq!(act, None);
    assert_eq!(l.state(), S::Running(RunningReason::Booted));
}

// §4.2
#[test]
fn s4_2_create_failed() {
    let mut l = lc();
    let (ev, _) = obs(&mut l, Observation::CreateFailed);
    assert_eq!(
        ev,
        vec![E::Stopped(StoppedDetail::Failed)],
        "a failed start is reported (§2.3)"
    );
    assert_eq!(l.state(), S::Shutoff(ShutoffReason::Failed));
    // on an active domain it is a no-op
    let mut l = running();
    obs(&mut l, Observation::CreateFailed);
    assert!(l.state().is_running());
}

// §4.3
#[test]
fn s4_3_stop_with_pause_intent_is_user() {
    let mut l = running();
    let _intent1 = l.push_intent(Intent::Pause);
    let (ev, _) = obs(&mut l, STOP);
    assert_eq!(ev, vec![E::Suspended(SuspendedDetail::Paused)]);
    assert_eq!(l.state(), S::Paused(PausedReason::User));
}

#[test]
fn s4_3_stop_with_save_intent_is_save_not_user() {
    let mut l = running();
    let _intent2 = l.push_intent(Intent::Save);
    let (ev, _) = obs(&mut l, STOP);
    assert_eq!(ev, vec![E::Suspended(SuspendedDetail::Saving)]);
    assert_eq!(l.state(), S::Paused(PausedReason::Save));
}

#[test]
fn s4_3_stop_without_intent_is_unknown() {
    let mut l = running();
    let (ev, _) = obs(&mut l, STOP);
    assert_eq!(ev, vec![E::Suspended(SuspendedDetail::Paused)]);
    assert_eq!(l.state(), S::Paused(PausedReason::Unknown));
}

#[test]
fn s4_3_stop_causes_io_error_and_watchdog() {
    let mut l = running();
    let (ev, _) = obs(
        &mut l,
        Observation::CpusStopped {
            cause: StopCause::IoError,
        },
    );
    assert_eq!(ev, vec![E::Suspended(SuspendedDetail::IoError)]);
    assert_eq!(l.state(), S::Paused(PausedReason::IoError));
    let mut l = running();
    let _intent3 = l.push_intent(Intent::Pause); // the cause wins over a pause intent
    let (ev, _) = obs(
        &mut l,
        Observation::CpusStopped {
            cause: StopCause::Watchdog,
        },
    );
    assert_eq!(ev, vec![E::Suspended(SuspendedDetail::Watchdog)]);
    assert_eq!(l.state(), S::Paused(PausedReason::Watchdog));
}

#[test]
fn s4_3_stop_is_idempotent_and_guarded() {
    let mut l = running();
    let _intent4 = l.push_intent(Intent::Pause);
    obs(&mut l, STOP);
    let (ev, _) = obs(&mut l, STOP);
    assert!(ev.is_empty(), "a second stop is a no-op");
    // shut off: no-op
    let mut l = lc();
    let (ev, _) = obs(&mut l, STOP);
    assert!(ev.is_empty());
    assert!(l.state().is_shutoff());
}

#[test]
fn s4_3_stop_during_reboot_or_reset_is_transient() {
    for intent in [Intent::Reboot, Intent::Reset] {
        let mut l = running();
        let _intent5 = l.push_intent(intent);
        let (ev, _) = obs(&mut l, STOP);
        assert!(ev.is_empty());
        assert!(l.state().is_running());
    }
}

// §4.4
#[test]
fn s4_4_resume_after_pause() {
    let mut l = running();
    let _intent6 = l.push_intent(Intent::Pause);
    obs(&mut l, STOP);
    l.pop_intent(_intent6);
    let _intent7 = l.push_intent(Intent::Resume);
    let (ev, _) = obs(&mut l, Observation::CpusResumed);
    assert_eq!(ev, vec![E::Resumed(ResumedDetail::Unpaused)]);
    assert_eq!(l.state(), S::Running(RunningReason::Unpaused));
    let (ev, _) = obs(&mut l, Observation::CpusResumed);
    assert!(ev.is_empty(), "resuming a running domain is a no-op (§6.2)");
}

#[test]
fn s4_4_resume_during_save_is_save_canceled() {
    let mut l = running();
    let _intent8 = l.push_intent(Intent::Save);
    obs(&mut l, STOP);
    let (ev, _) = obs(&mut l, Observation::CpusResumed);
    assert_eq!(ev, vec![E::Resumed(ResumedDetail::SaveCanceled)]);
    assert_eq!(l.state(), S::Running(RunningReason::SaveCanceled));
}

#[test]
fn s4_4_resume_of_start_while_shutoff_is_noop() {
    // QEMU: the RESUME of start's `cont` arrives before Created.
    let mut l = lc();
    let (ev, _) = obs(&mut l, Observation::CpusResumed);
    assert!(ev.is_empty());
    let (ev, _) = obs(&mut l, boot(false));
    assert_eq!(ev, vec![E::Started(StartedDetail::Booted)]);
}

#[test]
fn s4_4_resume_of_preserved_crash_is_from_crashed() {
    let mut l = lc_with(policies(
        LifecycleAction::Destroy,
        LifecycleAction::Restart,
        LifecycleAction::Preserve,
    ));
    obs(&mut l, boot(false));
    obs(
        &mut l,
        Observation::Crashed {
            detail: CrashedDetail::Panicked,
        },
    );
    let (ev, _) = obs(&mut l, Observation::CpusResumed);
    assert_eq!(ev, vec![E::Resumed(ResumedDetail::Unpaused)]);
    assert_eq!(l.state(), S::Running(RunningReason::FromCrashed));
}

// §4.5
#[test]
fn s4_5_shutdown_request_delivered_once() {
    let mut l = running();
    let _intent9 = l.push_intent(Intent::Shutdown);
    let (ev, _) = obs(&mut l, Observation::ShutdownRequestDelivered);
    assert_eq!(ev, vec![E::ShutdownRequested(ShutdownRequester::Host)]);
    assert_eq!(l.state(), S::ShuttingDown(ShuttingDownReason::User));
    let (ev, _) = obs(&mut l, Observation::ShutdownRequestDelivered);
    assert!(ev.is_empty(), "repeated request is a no-op");
}

#[test]
fn s4_5_shutdown_request_during_reboot_is_noop() {
    let mut l = running();
    let _intent10 = l.push_intent(Intent::Reboot);
    let (ev, _) = obs(&mut l, Observation::ShutdownRequestDelivered);
    assert!(ev.is_empty());
    assert!(
        l.state().is_running(),
        "no ShuttingDown leak during a reboot"
    );
}

// §4.6 + §4.12: host shutdown: acknowledged then completed.
#[test]
fn s4_6_host_shutdown_completes_as_shutdown_even_with_restart_policy() {
    let mut l = lc_with(policies(
        LifecycleAction::Restart,
        LifecycleAction::Restart,
        LifecycleAction::Destroy,
    ));
    obs(&mut l, boot(false));
    let _intent11 = l.push_intent(Intent::Shutdown);
    obs(&mut l, Observation::ShutdownRequestDelivered);
    let (ev, act) = obs(&mut l, Observation::GuestPoweredOff);
    assert!(
        ev.is_empty(),
        "completion is reported when the domain is gone"
    );
    assert_eq!(act, Some(PolicyAction::Destroy));
    assert_eq!(l.state(), S::ShuttingDown(ShuttingDownReason::User));
    // the intent may already be cleared (shutdown returned Acknowledged)
    l.pop_intent(_intent11);
    let (ev, _) = obs(&mut l, GONE_CRASH);
    assert_eq!(ev, vec![E::Stopped(StoppedDetail::Shutdown)]);
    assert_eq!(l.state(), S::Shutoff(ShutoffReason::Shutdown));
}

// §4.6: the guest powers off before the host request's acknowledgement was observed (an
// agent shutdown returns only after its grace period): the poweroff implies the
// acknowledgement, and the backend's stop after the poweroff is no pause.
#[test]
fn s4_6_host_shutdown_completed_before_its_acknowledgement() {
    let mut l = running();
    let _intent12 = l.push_intent(Intent::Shutdown);
    let (ev, act) = obs(&mut l, Observation::GuestPoweredOff);
    assert_eq!(ev, vec![E::ShutdownRequested(ShutdownRequester::Host)]);
    assert_eq!(act, Some(PolicyAction::Destroy));
    assert_eq!(l.state(), S::ShuttingDown(ShuttingDownReason::User));
    let (ev, _) = obs(&mut l, STOP);
    assert!(ev.is_empty(), "no Suspended after the poweroff");
    let (ev, _) = obs(&mut l, Observation::ShutdownRequestDelivered);
    assert!(ev.is_empty(), "the late acknowledgement is a repeat");
    let (ev, _) = obs(&mut l, GONE_CRASH);
    assert_eq!(ev, vec![E::Stopped(StoppedDetail::Shutdown)]);
    assert_eq!(l.state(), S::Shutoff(ShutoffReason::Shutdown));
}

#[test]
fn s4_6_guest_poweroff_destroy_policy() {
    let mut l = running();
    let (ev, act) = obs(&mut l, Observation::GuestPoweredOff);
    assert_eq!(ev, vec![E::ShutdownRequested(ShutdownRequester::Guest)]);
    assert_eq!(act, Some(PolicyAction::Destroy));
    assert_eq!(l.state(), S::ShuttingDown(ShuttingDownReason::Guest));
    // the STOP that QEMU sends after SHUTDOWN with -no-shutdown is a no-op
    let (ev, _) = obs(&mut l, STOP);
    assert!(ev.is_empty());
    // a repeated poweroff report is a no-op
    let (ev, act) = obs(&mut l, Observation::GuestPoweredOff);
    assert!(ev.is_empty());
    assert_eq!(act, None);
    let (ev, _) = obs(&mut l, GONE_CRASH);
    assert_eq!(ev, vec![E::Stopped(StoppedDetail::Shutdown)]);
    assert_eq!(l.state(), S::Shutoff(ShutoffReason::Shutdown));
}

#[test]
fn s4_6_guest_poweroff_restart_policy() {
    let mut l = lc_with(policies(
        LifecycleAction::Restart,
        LifecycleAction::Restart,
        LifecycleAction::Destroy,
    ));
    obs(&mut l, boot(false));
    let (ev, act) = obs(&mut l, Observation::GuestPoweredOff);
    assert_eq!(
        ev,
        vec![
            E::ShutdownRequested(ShutdownRequester::Guest),
            E::Stopped(StoppedDetail::Shutdown),
            E::Started(StartedDetail::Booted)
        ]
    );
    assert_eq!(act, Some(PolicyAction::Restart));
    assert!(l.is_restarting());
    // §4.0: noise during the restart is swallowed
    for o in [
        STOP,
        Observation::Rebooted {
            by: ShutdownRequester::Host,
            platform_restarted: true,
        },
        Observation::CpusResumed,
        GONE_CRASH,
    ] {
        let (ev, act) = obs(&mut l, o);
        assert!(ev.is_empty(), "{o:?} leaked during a restart");
        assert_eq!(act, None);
    }
    let (ev, _) = obs(&mut l, Observation::RestartDone { ok: true });
    assert!(ev.is_empty());
    assert_eq!(l.state(), S::Running(RunningReason::Booted));
}

#[test]
fn s4_6_guest_poweroff_preserve_policy() {
    let mut l = lc_with(policies(
        LifecycleAction::Preserve,
        LifecycleAction::Restart,
        LifecycleAction::Destroy,
    ));
    obs(&mut l, boot(false));
    let (ev, act) = obs(&mut l, Observation::GuestPoweredOff);
    assert_eq!(
        ev,
        vec![
            E::ShutdownRequested(ShutdownRequester::Guest),
            E::Suspended(SuspendedDetail::Paused)
        ]
    );
    assert_eq!(act, Some(PolicyAction::Preserve));
    assert_eq!(l.state(), S::Paused(PausedReason::ShuttingDown));
    // a preserved domain does not resume, and is destroyed on request
    let (ev, _) = obs(&mut l, Observation::CpusResumed);
    assert!(ev.is_empty());
    let _intent13 = l.push_intent(Intent::Destroy);
    let (ev, _) = obs(&mut l, GONE_CRASH);
    assert_eq!(ev, vec![E::Stopped(StoppedDetail::Destroyed)]);
}

// §4.6: QEMU fake reboot — power-off under a reboot intent is one Rebooted.
#[test]
fn s4_6_fake_reboot_stays_running_with_one_rebooted() {
    let mut l = running();
    let mut all = Vec::new();
    let _intent14 = l.push_intent(Intent::Reboot);
    let seq = [
        Observation::ShutdownRequestDelivered, // POWERDOWN
        Observation::GuestPoweredOff,          // SHUTDOWN guest-shutdown
        STOP,                                  // -no-shutdown
        Observation::Rebooted {
            by: ShutdownRequester::Host,
            platform_restarted: true,
        }, // our system_reset
        Observation::CpusResumed,              // our cont
        Observation::RestartDone { ok: true },
        Observation::Rebooted {
            by: ShutdownRequester::Guest,
            platform_restarted: true,
        }, // RESET{guest:true} after cont: the translator swallows it; checked there
    ];
    let mut actions = Vec::new();
    for o in &seq[..6] {
        let (ev, act) = obs(&mut l, *o);
        all.extend(ev);
        actions.extend(act);
        assert!(
            l.state().is_running(),
            "state leaked to {} after {o:?}",
            l.state()
        );
    }
    assert_eq!(all, vec![E::Rebooted]);
    assert_eq!(actions, vec![PolicyAction::Restart]);
}

#[test]
fn s4_6_poweroff_of_gone_or_preserved_is_noop() {
    let mut l = lc();
    let (ev, act) = obs(&mut l, Observation::GuestPoweredOff);
    assert!(ev.is_empty());
    assert_eq!(act, None);
}

// §4.7
#[test]
fn s4_7_guest_reboot_restart_policy_platform_restarted() {
    let mut l = running();
    let (ev, act) = obs(
        &mut l,
        Observation::Rebooted {
            by: ShutdownRequester::Guest,
            platform_restarted: true,
        },
    );
    assert_eq!(ev, vec![E::Rebooted]);
    assert_eq!(act, None);
    assert!(l.state().is_running());
}

#[test]
fn s4_7_guest_reboot_needing_restart_xen_style() {
    let mut l = running();
    let (ev, act) = obs(
        &mut l,
        Observation::Rebooted {
            by: ShutdownRequester::Guest,
            platform_restarted: false,
        },
    );
    assert_eq!(ev, vec![E::Rebooted]);
    assert_eq!(act, Some(PolicyAction::Restart));
    // old domain's death during the restart is swallowed (§4.0)
    let (ev, _) = obs(
        &mut l,
        Observation::Gone {
            unexplained: ShutoffReason::Destroyed,
        },
    );
    assert!(ev.is_empty());
    let (ev, _) = obs(&mut l, Observation::RestartDone { ok: true });
    assert!(ev.is_empty());
    assert!(l.state().is_running());
}

#[test]
fn s4_0_restart_failure_is_shutoff_failed() {
    let mut l = running();
    obs(
        &mut l,
        Observation::Rebooted {
            by: ShutdownRequester::Guest,
            platform_restarted: false,
        },
    );
    let (ev, _) = obs(&mut l, Observation::RestartDone { ok: false });
    assert_eq!(ev, vec![E::Stopped(StoppedDetail::Failed)]);
    assert_eq!(l.state(), S::Shutoff(ShutoffReason::Failed));
}

#[test]
fn s4_7_guest_reboot_destroy_and_preserve_policies() {
    let mut l = lc_with(policies(
        LifecycleAction::Destroy,
        LifecycleAction::Destroy,
        LifecycleAction::Destroy,
    ));
    obs(&mut l, boot(false));
    let guest_reboot = Observation::Rebooted {
        by: ShutdownRequester::Guest,
        platform_restarted: true,
    };
    let (ev, act) = obs(&mut l, guest_reboot);
    assert_eq!(ev, vec![E::ShutdownRequested(ShutdownRequester::Guest)]);
    assert_eq!(act, Some(PolicyAction::Destroy));
    let (ev, _) = obs(&mut l, GONE_CRASH);
    assert_eq!(ev, vec![E::Stopped(StoppedDetail::Shutdown)]);

    let mut l = lc_with(policies(
        LifecycleAction::Destroy,
        LifecycleAction::Preserve,
        LifecycleAction::Destroy,
    ));
    obs(&mut l, boot(false));
    let (ev, act) = obs(&mut l, guest_reboot);
    assert_eq!(ev, vec![E::Suspended(SuspendedDetail::Paused)]);
    assert_eq!(act, Some(PolicyAction::Preserve));
    assert_eq!(l.state(), S::Paused(PausedReason::ShuttingDown));
}

#[test]
fn s5_host_reset_is_a_reboot_even_with_destroy_policy() {
    let mut l = lc_with(policies(
        LifecycleAction::Destroy,
        LifecycleAction::Destroy,
        LifecycleAction::Destroy,
    ));
    obs(&mut l, boot(false));
    let _intent15 = l.push_intent(Intent::Reset);
    let (ev, act) = obs(
        &mut l,
        Observation::Rebooted {
            by: ShutdownRequester::Guest,
            platform_restarted: true,
        },
    );
    assert_eq!(ev, vec![E::Rebooted]);
    assert_eq!(act, None);
    assert!(l.state().is_running());
}

// §4.8
#[test]
fn s4_8_crash_destroy() {
    let mut l = running();
    let panic = Observation::Crashed {
        detail: CrashedDetail::Panicked,
    };
    let (ev, act) = obs(&mut l, panic);
    assert_eq!(ev, vec![E::Crashed(CrashedDetail::Panicked)]);
    assert_eq!(act, Some(PolicyAction::Destroy));
    assert_eq!(l.state(), S::Crashed(CrashedReason::Panicked));
    let (ev, _) = obs(&mut l, panic);
    assert!(ev.is_empty(), "a repeated panic report is a no-op");
    let (ev, _) = obs(&mut l, STOP);
    assert!(ev.is_empty(), "panic=pause's STOP is a no-op");
    let (ev, _) = obs(
        &mut l,
        Observation::Gone {
            unexplained: ShutoffReason::Destroyed,
        },
    );
    assert_eq!(ev, vec![E::Stopped(StoppedDetail::Crashed)]);
    assert_eq!(l.state(), S::Shutoff(ShutoffReason::Crashed));
}

#[test]
fn s4_8_crash_restart_and_preserve() {
    let mut l = lc_with(policies(
        LifecycleAction::Destroy,
        LifecycleAction::Restart,
        LifecycleAction::Restart,
    ));
    obs(&mut l, boot(false));
    let (ev, act) = obs(
        &mut l,
        Observation::Crashed {
            detail: CrashedDetail::Panicked,
        },
    );
    assert_eq!(
        ev,
        vec![
            E::Crashed(CrashedDetail::Panicked),
            E::Stopped(StoppedDetail::Crashed),
            E::Started(StartedDetail::Booted)
        ]
    );
    assert_eq!(act, Some(PolicyAction::Restart));
    obs(&mut l, Observation::RestartDone { ok: true });
    assert_eq!(l.state(), S::Running(RunningReason::Booted));

    let mut l = lc_with(policies(
        LifecycleAction::Destroy,
        LifecycleAction::Restart,
        LifecycleAction::Preserve,
    ));
    obs(&mut l, boot(false));
    let (ev, act) = obs(
        &mut l,
        Observation::Crashed {
            detail: CrashedDetail::Watchdog,
        },
    );
    assert_eq!(ev, vec![E::Crashed(CrashedDetail::Watchdog)]);
    assert_eq!(act, Some(PolicyAction::Preserve));
    assert_eq!(l.state(), S::Crashed(CrashedReason::Watchdog));
}

// §4.9, §4.10
#[test]
fn s4_9_pm_suspend_and_wakeup() {
    let mut l = running();
    let (ev, _) = obs(
        &mut l,
        Observation::PmSuspended {
            detail: PmSuspendedDetail::Memory,
        },
    );
    assert_eq!(ev, vec![E::PmSuspended(PmSuspendedDetail::Memory)]);
    assert_eq!(l.state(), S::PmSuspended(PmSuspendedReason::Memory));
    let (ev, _) = obs(&mut l, STOP);
    assert!(ev.is_empty(), "suspended is not paused");
    let (ev, _) = obs(&mut l, Observation::PmWokeUp);
    assert_eq!(ev, vec![E::Started(StartedDetail::Wakeup)]);
    assert_eq!(l.state(), S::Running(RunningReason::Wakeup));
    let (ev, _) = obs(&mut l, Observation::PmWokeUp);
    assert!(ev.is_empty(), "wakeup of a running domain is a no-op");
}

// §4.11
#[test]
fn s4_11_stale_restart_done_is_noop() {
    let mut l = running();
    let (ev, _) = obs(&mut l, Observation::RestartDone { ok: false });
    assert!(ev.is_empty());
    assert!(l.state().is_running());
}

// §4.12 and §6.6: a save ends as Saved, never PmSuspended.
#[test]
fn s4_12_save_is_paused_save_then_shutoff_saved() {
    let mut l = running();
    let _intent16 = l.push_intent(Intent::Save);
    let mut all = Vec::new();
    all.extend(obs(&mut l, STOP).0);
    let _committed = l.push_intent(Intent::SaveCommitted);
    all.extend(obs(&mut l, GONE_CRASH).0);
    assert_eq!(
        all,
        vec![
            E::Suspended(SuspendedDetail::Saving),
            E::Stopped(StoppedDetail::Saved)
        ]
    );
    assert_eq!(l.state(), S::Shutoff(ShutoffReason::Saved));
    assert!(!all.iter().any(|e| matches!(e, E::PmSuspended(_))));
}

#[test]
fn s4_12_save_of_paused_domain() {
    let mut l = lc();
    obs(&mut l, boot(true));
    let _intent17 = l.push_intent(Intent::Save);
    let (ev, _) = obs(&mut l, STOP);
    assert!(ev.is_empty());
    assert_eq!(l.state(), S::Paused(PausedReason::User));
    let _committed = l.push_intent(Intent::SaveCommitted);
    let (ev, _) = obs(&mut l, GONE_CRASH);
    assert_eq!(ev, vec![E::Stopped(StoppedDetail::Saved)]);
}

#[test]
fn s4_12_destroy_intent_and_unexplained() {
    let mut l = running();
    let _intent18 = l.push_intent(Intent::Destroy);
    let (ev, _) = obs(&mut l, GONE_CRASH);
    assert_eq!(ev, vec![E::Stopped(StoppedDetail::Destroyed)]);
    assert_eq!(l.state(), S::Shutoff(ShutoffReason::Destroyed));
    let (ev, _) = obs(&mut l, GONE_CRASH);
    assert!(ev.is_empty(), "gone twice is a no-op");

    let mut l = running();
    let (ev, _) = obs(&mut l, GONE_CRASH);
    assert_eq!(ev, vec![E::Stopped(StoppedDetail::Crashed)]);
    assert_eq!(l.state(), S::Shutoff(ShutoffReason::Crashed));

    let mut l = running();
    let (ev, _) = obs(
        &mut l,
        Observation::Gone {
            unexplained: ShutoffReason::Destroyed,
        },
    );
    assert_eq!(ev, vec![E::Stopped(StoppedDetail::Destroyed)]);
}

#[test]
fn s4_12_shutdown_escalated_to_destroy_is_destroyed() {
    let mut l = running();
    let _intent19 = l.push_intent(Intent::Shutdown);
    obs(&mut l, Observation::ShutdownRequestDelivered);
    l.pop_intent(_intent19);
    let _intent20 = l.push_intent(Intent::Destroy);
    let (ev, _) = obs(&mut l, GONE_CRASH);
    assert_eq!(ev, vec![E::Stopped(StoppedDetail::Destroyed)]);
}

// §2.2
#[test]
fn s2_2_seq_is_monotonic_and_continues_across_restarts() {
    let mut l = lc_with(policies(
        LifecycleAction::Restart,
        LifecycleAction::Restart,
        LifecycleAction::Destroy,
    ));
    let d = l.defined(at());
    assert_eq!(d.seq, 1);
    let mut seqs = vec![d.seq];
    for o in [
        boot(false),
        Observation::GuestPoweredOff,
        Observation::RestartDone { ok: true },
        Observation::Rebooted {
            by: ShutdownRequester::Guest,
            platform_restarted: true,
        },
    ] {
        seqs.extend(l.observe(o, at()).events.iter().map(|e| e.seq));
    }
    let expect: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expect);
    assert_eq!(l.last_seq(), seqs.len() as u64);
}

#[test]
fn s2_event_carries_identity_and_timestamp() {
    let mut l = lc();
    let out = l.observe(boot(false), at());
    let e = &out.events[0];
    assert_eq!(e.domain, id());
    assert_eq!(e.timestamp(), at());
}

// §3: a pause intent outlives nothing: cleared intents do not colour later stops.
#[test]
fn s3_cleared_intent_no_longer_applies() {
    let mut l = running();
    let save = l.push_intent(Intent::Save);
    l.pop_intent(save);
    let (ev, _) = obs(&mut l, STOP);
    assert_eq!(ev, vec![E::Suspended(SuspendedDetail::Paused)]);
    assert_eq!(l.state(), S::Paused(PausedReason::Unknown));
    // ending another operation does not clear the one in force
    let _intent22 = l.push_intent(Intent::Destroy);
    let pause = l.push_intent(Intent::Pause);
    l.pop_intent(pause);
    assert_eq!(l.intent(), Some(Intent::Destroy));
}

// §6.0: intents belong to the operation that stashed them.
#[test]
fn s6_0_an_operation_ending_never_clears_another_ones_intent() {
    let mut l = running();
    let destroy = l.push_intent(Intent::Destroy);
    // A pause that started after the destroy and ends before it (issue 15, item 1).
    let pause = l.push_intent(Intent::Pause);
    assert_eq!(l.intent(), Some(Intent::Destroy), "destroy is in force");
    l.pop_intent(pause);
    assert_eq!(l.intent(), Some(Intent::Destroy));
    let (ev, _) = obs(&mut l, GONE_CRASH);
    assert_eq!(ev, vec![E::Stopped(StoppedDetail::Destroyed)]);
    l.pop_intent(destroy);
    assert_eq!(l.intent(), None);
}

#[test]
fn s6_0_destroy_preempts_a_newer_intent() {
    // reboot stashed after destroy (libxl stashed it before taking the ops lock)
    let mut l = running();
    let _destroy = l.push_intent(Intent::Destroy);
    let _reboot = l.push_intent(Intent::Reboot);
    assert_eq!(l.intent(), Some(Intent::Destroy));
    let (ev, _) = obs(&mut l, GONE_CRASH);
    assert_eq!(ev, vec![E::Stopped(StoppedDetail::Destroyed)]);
}

#[test]
fn s6_0_the_newest_intent_is_in_force_without_destroy() {
    let mut l = running();
    let save = l.push_intent(Intent::Save);
    let pause = l.push_intent(Intent::Pause);
    assert_eq!(l.intent(), Some(Intent::Pause));
    l.pop_intent(pause);
    assert_eq!(l.intent(), Some(Intent::Save));
    assert!(l.has_intent(Intent::Save));
    l.pop_intent(save);
    assert!(!l.has_intent(Intent::Save));
}

// §4.12: a domain that ends during a save, before its file is committed, saved nothing.
#[test]
fn s4_12_gone_during_an_uncommitted_save_is_never_saved() {
    let mut l = running();
    let _save = l.push_intent(Intent::Save);
    obs(&mut l, STOP);
    let (ev, _) = obs(&mut l, GONE_CRASH);
    assert_eq!(ev, vec![E::Stopped(StoppedDetail::Crashed)]);
    assert_eq!(l.state(), S::Shutoff(ShutoffReason::Crashed));

    // destroyed (libxl: xl destroy, Gone{destroyed}) during the save
    let mut l = running();
    let _save = l.push_intent(Intent::Save);
    obs(&mut l, STOP);
    let (ev, _) = obs(
        &mut l,
        Observation::Gone {
            unexplained: ShutoffReason::Destroyed,
        },
    );
    assert_eq!(ev, vec![E::Stopped(StoppedDetail::Destroyed)]);

    // destroy() through the API during the save
    let mut l = running();
    let _save = l.push_intent(Intent::Save);
    obs(&mut l, STOP);
    let _destroy = l.push_intent(Intent::Destroy);
    let (ev, _) = obs(&mut l, GONE_CRASH);
    assert_eq!(ev, vec![E::Stopped(StoppedDetail::Destroyed)]);
}

// §6.0: a destroy preempts a policy restart: destroyed, not failed (issue 15, item 8).
#[test]
fn s6_0_destroy_during_a_policy_restart_is_destroyed() {
    let mut l = lc_with(policies(
        LifecycleAction::Restart,
        LifecycleAction::Restart,
        LifecycleAction::Destroy,
    ));
    obs(&mut l, boot(false));
    let (_, action) = obs(&mut l, Observation::GuestPoweredOff);
    assert_eq!(action, Some(PolicyAction::Restart));
    let _destroy = l.push_intent(Intent::Destroy);
    let (ev, _) = obs(&mut l, GONE_CRASH);
    assert_eq!(ev, vec![E::Stopped(StoppedDetail::Destroyed)]);
    assert_eq!(l.state(), S::Shutoff(ShutoffReason::Destroyed));
    assert!(!l.is_restarting());
    let (ev, _) = obs(&mut l, Observation::RestartDone { ok: false });
    assert!(ev.is_empty(), "the restart's late completion is stale");
    assert_eq!(l.state(), S::Shutoff(ShutoffReason::Destroyed));

    // the restart reports failure first (its new instance was killed by the destroy)
    let mut l = lc_with(policies(
        LifecycleAction::Restart,
        LifecycleAction::Restart,
        LifecycleAction::Destroy,
    ));
    obs(&mut l, boot(false));
    obs(&mut l, Observation::GuestPoweredOff);
    let _destroy = l.push_intent(Intent::Destroy);
    let (ev, _) = obs(&mut l, Observation::RestartDone { ok: false });
    assert_eq!(ev, vec![E::Stopped(StoppedDetail::Destroyed)]);
}

// §6.1: every failed creation is reported with its event.
#[test]
fn s6_1_create_failed_emits_stopped_failed() {
    let mut l = lc();
    let (ev, _) = obs(&mut l, Observation::CreateFailed);
    assert_eq!(ev, vec![E::Stopped(StoppedDetail::Failed)]);
    assert_eq!(l.state(), S::Shutoff(ShutoffReason::Failed));
    let (ev, _) = obs(&mut l, Observation::CreateFailed);
    assert_eq!(
        ev,
        vec![E::Stopped(StoppedDetail::Failed)],
        "each failure is reported"
    );
    let mut l = running();
    let (ev, _) = obs(&mut l, Observation::CreateFailed);
    assert!(
        ev.is_empty(),
        "an active domain is not shut off by a stale failure"
    );
}

// §6.3: a shutdown request the guest ignores leaves the domain operable.
#[test]
fn s6_3_pending_shutdown_request_pause_and_save_stop_the_vcpus() {
    for (intent, detail, reason) in [
        (Intent::Pause, SuspendedDetail::Paused, PausedReason::User),
        (Intent::Save, SuspendedDetail::Saving, PausedReason::Save),
    ] {
        let mut l = running();
        let shutdown = l.push_intent(Intent::Shutdown);
        obs(&mut l, Observation::ShutdownRequestDelivered);
        l.pop_intent(shutdown);
        assert_eq!(l.state(), S::ShuttingDown(ShuttingDownReason::User));
        let _op = l.push_intent(intent);
        let (ev, _) = obs(&mut l, STOP);
        assert_eq!(ev, vec![E::Suspended(detail)]);
        assert_eq!(l.state(), S::Paused(reason));
    }
    // QEMU's STOP after the guest's own poweroff (-no-shutdown) is still not a pause
    let mut l = running();
    let _shutdown = l.push_intent(Intent::Shutdown);
    obs(&mut l, Observation::ShutdownRequestDelivered);
    obs(&mut l, Observation::GuestPoweredOff);
    let (ev, _) = obs(&mut l, STOP);
    assert!(ev.is_empty());
}
