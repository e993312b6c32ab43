//! What a new manager makes of a Xen domain it takes over (pure; `docs/semantics.md` §11.3,
//! §11.4). The I/O half is `DomainInner::reattach` in domain.rs: it finds the Xen domain by
//! the stored uuid (`libxl_list_domain`), reads `libxl_domain_info`, asks [`plan`] what to do
//! and does it.
//!
//! What a new manager can still know on Xen: whether a Xen domain with the domain's uuid
//! exists (a domain with the same name and another uuid is not ours), and its
//! `libxl_dominfo` flags: paused, shut down with a pending reason (poweroff, reboot, crash,
//! watchdog, suspend, soft_reset: no toolstack destroys a Xen domain whose manager is gone,
//! so the reason waits there), dying. What it cannot know: the events of the time away
//! (only their result), who paused or unpaused the domain, and why a domain that vanished
//! ended: a Xen domain dies without a shutdown reason only when destroyed (§10), so that is
//! `destroyed`, unless the stored state or a committed save explains the end.

use crate::context::DomInfo;
use crate::translate::{
    translate_event, FollowUp, LibxlEvent, LibxlEventKind, REASON_CRASH, REASON_POWEROFF,
    REASON_REBOOT, REASON_SUSPEND, REASON_WATCHDOG,
};
use domkit_core::{
    DomainState, LifecycleAction, LifecyclePolicies, Observation, PausedReason, ShutoffReason,
    ShuttingDownReason, StopCause,
};
use std::path::PathBuf;

/// A save the previous manager had in flight (its stored `in_flight`), and what is on disk
/// now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveEvidence {
    /// The final name.
    pub target: PathBuf,
    /// The temporary file.
    pub temp: PathBuf,
    /// Whether the temporary file still exists.
    pub temp_exists: bool,
    /// Whether the domain was paused before the save.
    pub was_paused: bool,
    /// Whether the rename to `target` had begun.
    pub committing: bool,
}

/// A save is committed exactly when its rename began and the temporary file is gone (the
/// rename is atomic: the file is then under its final name).
pub fn save_committed(save: &SaveEvidence) -> bool {
    save.committing && !save.temp_exists
}

/// What the new manager does with one stored domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Nothing of ours runs and nothing is to be reported (a shut-off domain).
    Nothing,
    /// A Xen domain with our uuid exists although the stored state is shut off: a create
    /// the previous manager did not finish (its caller never got an answer). It is destroyed;
    /// the state stays as the user last saw it, no event.
    DestroyLeftover {
        /// The leftover's domid.
        domid: u32,
    },
    /// No Xen domain of ours exists although the stored state is active: reconciled
    /// `gone{unexplained: reason}` (with `SaveCommitted` stashed when `committed`).
    Vanished {
        /// Why, as far as the evidence goes.
        reason: ShutoffReason,
        /// A committed save explains the end (`shutoff(saved)`).
        committed: bool,
    },
    /// Adopt the Xen domain: re-arm the death watch on `domid` (before anything is fed, under
    /// the backend lock), then feed `observation` reconciled and carry out the policy action
    /// it returns; `soft_reset`: then call `libxl_domain_soft_reset` if no action was taken.
    Adopt {
        /// The current domid.
        domid: u32,
        /// What happened while away, if anything.
        observation: Option<Observation>,
        /// The guest asked for a soft reset while away.
        soft_reset: bool,
    },
    /// The previous manager had already reported the end of this domain (a guest poweroff
    /// or crash whose `destroy` policy it was carrying out): finish it: destroy `domid`,
    /// then `gone{unexplained: reason}`.
    Finish {
        /// The current domid.
        domid: u32,
        /// The end the previous manager had decided.
        reason: ShutoffReason,
    },
    /// A committed save whose suspended domain still exists: destroy it, with
    /// `SaveCommitted` stashed: `shutoff(saved)`.
    EndSaved {
        /// The current domid.
        domid: u32,
    },
    /// An uncommitted save: put the domain back as it was (its temporary file is removed
    /// in every case, see [`temp_to_remove`]).
    CancelSave {
        /// The current domid.
        domid: u32,
        /// The guest is suspended (`shutdown{suspend}`): `libxl_domain_resume` with
        /// `suspend_cancel = 1`, then re-arm the watch; fed as `cpus_resumed` under `Save`.
        resume_suspended: bool,
        /// The domain's vCPUs must be stopped at the end (it was paused before the save;
        /// a Xen PV save had unpaused it so that the guest could suspend itself).
        pause: bool,
        /// The vCPUs must run at the end and are stopped now: unpause (under `Save`).
        unpause: bool,
    },
}

/// The temporary save file to remove: an uncommitted save's, if it is still there.
pub fn temp_to_remove(save: Option<&SaveEvidence>) -> Option<PathBuf> {
    save.filter(|s| s.temp_exists && !save_committed(s))
        .map(|s| s.temp.clone())
}

/// Decide what to do with a stored domain. `stored`: its last recorded state; `save`: the
/// save it had in flight; `found`: `libxl_domain_info` of the Xen domain with its uuid, if
/// one exists.
pub fn plan(
    stored: DomainState,
    policies: LifecyclePolicies,
    save: Option<&SaveEvidence>,
    found: Option<&DomInfo>,
) -> Plan {
    let committed = save.is_some_and(save_committed);
    // A dying domain is being destroyed (by whoever destroyed it): it is gone for us.
    let found = found.filter(|i| !i.dying);
    let Some(info) = found else {
        if !stored.is_active() {
            return Plan::Nothing;
        }
        return Plan::Vanished {
            reason: vanished_reason(stored, policies),
            committed,
        };
    };
    let domid = info.domid;
    if committed {
        return Plan::EndSaved { domid };
    }
    let suspended = info.shutdown && info.shutdown_reason == i32::from(REASON_SUSPEND);
    if let Some(save) = save.filter(|_| stored.is_active()) {
        // Another shutdown reason than suspend (the guest powered off or crashed during the
        // save) is reconciled like any other below; the temporary file goes either way.
        if suspended || !info.shutdown {
            return Plan::CancelSave {
                domid,
                resume_suspended: suspended,
                pause: save.was_paused && (suspended || !info.paused),
                unpause: !save.was_paused && !suspended && info.paused,
            };
        }
    }
    if !stored.is_active() {
        return Plan::DestroyLeftover { domid };
    }
    if info.shutdown {
        return shut_down(stored, policies, info);
    }
    let observation = match (stored, info.paused) {
        // Someone else paused it (e.g. `xl pause`): the reason is not known.
        (DomainState::Running(_) | DomainState::Blocked(_), true) => {
            Some(Observation::CpusStopped {
                cause: StopCause::Command,
            })
        }
        // Someone else unpaused it.
        (DomainState::Paused(reason), false) if reason != PausedReason::ShuttingDown => {
            Some(Observation::CpusResumed)
        }
        // A pm-suspended guest (shutdown{suspend} on Xen) that runs again woke up.
        (DomainState::PmSuspended(_), false) => Some(Observation::PmWokeUp),
        _ => None,
    };
    Plan::Adopt {
        domid,
        observation,
        soft_reset: false,
    }
}

/// The Xen domain is shut down with a pending reason.
fn shut_down(stored: DomainState, policies: LifecyclePolicies, info: &DomInfo) -> Plan {
    let domid = info.domid;
    let reason = u8::try_from(info.shutdown_reason).unwrap_or(u8::MAX);
    let adopt = |observation| Plan::Adopt {
        domid,
        observation,
        soft_reset: false,
    };
    match (stored, reason) {
        // Already reported by the previous manager, which was ending it (policy destroy):
        // finish that end instead of reporting the shutdown twice.
        (DomainState::ShuttingDown(ShuttingDownReason::Guest), REASON_POWEROFF | REASON_REBOOT) => {
            Plan::Finish {
                domid,
                reason: ShutoffReason::Shutdown,
            }
        }
        (DomainState::Crashed(_), REASON_CRASH | REASON_WATCHDOG) => {
            if policies.on_crash == LifecycleAction::Destroy {
                Plan::Finish {
                    domid,
                    reason: ShutoffReason::Crashed,
                }
            } else {
                adopt(None) // preserved: kept as it is
            }
        }
        // A preserved poweroff or reboot: kept as it is.
        (DomainState::Paused(PausedReason::ShuttingDown), REASON_POWEROFF | REASON_REBOOT) => {
            adopt(None)
        }
        // Suspended: a pm_suspend of the previous manager (consistent), or someone else's
        // `xl save` (its death follows): nothing to report either way.
        (_, REASON_SUSPEND) => adopt(None),
        // What the guest did while away, translated as the live event would be (no intent:
        // no operation of this manager is in progress).
        _ => {
            let event = LibxlEvent {
                domid,
                for_user: 0,
                kind: LibxlEventKind::DomainShutdown { reason },
            };
            let t = translate_event(&event, None);
            Plan::Adopt {
                domid,
                observation: t.observation,
                soft_reset: t.follow_up == Some(FollowUp::SoftReset),
            }
        }
    }
}

/// Why a domain that vanished while away ended. A Xen domain dies without a shutdown
/// reason only when destroyed (§10): `destroyed`, unless the previous manager had already
/// decided the end (a guest poweroff or crash whose `destroy` policy it was carrying out).
pub fn vanished_reason(stored: DomainState, policies: LifecyclePolicies) -> ShutoffReason {
    match stored {
        DomainState::ShuttingDown(ShuttingDownReason::Guest) => ShutoffReason::Shutdown,
        DomainState::Crashed(_) if policies.on_crash == LifecycleAction::Destroy => {
            ShutoffReason::Crashed
        }
        _ => ShutoffReason::Destroyed,
    }
}

#[cfg(test)]
mod tests {
    //! Replays `libxl_domain_info` recorded on the real Xen 4.17 host
    //! (`tests/fixtures/xen417_dominfo.json`, `libxl_integration::t40`) through [`plan`] and
    //! the core lifecycle resumed from a stored state.
    use super::*;
    use domkit_core::{
        CrashedDetail, CrashedReason, DomainId, EventKind, Intent, Lifecycle, PolicyAction,
        RunningReason, ShutdownRequester, StoppedDetail, SuspendedDetail,
    };
    use std::time::SystemTime;

    #[derive(serde::Deserialize)]
    struct Recorded {
        case: String,
        info: DomInfo,
    }

    /// The recorded info of `case` (running, paused, suspended, poweroff, crash, reboot).
    fn recorded(case: &str) -> DomInfo {
        let all: Vec<Recorded> =
            serde_json::from_str(include_str!("../tests/fixtures/xen417_dominfo.json"))
                .expect("fixture");
        all.into_iter()
            .find(|r| r.case == case)
            .unwrap_or_else(|| panic!("no recorded case {case}"))
            .info
    }

    fn policies(poweroff: LifecycleAction, crash: LifecycleAction) -> LifecyclePolicies {
        LifecyclePolicies {
            on_poweroff: poweroff,
            on_crash: crash,
            ..LifecyclePolicies::default()
        }
    }

    fn resumed(state: DomainState, policies: LifecyclePolicies) -> Lifecycle {
        let id = DomainId {
            name: "r".into(),
            uuid: uuid::Uuid::nil(),
        };
        Lifecycle::resume_from(id, policies, 41, state)
    }

    fn save(committing: bool, temp_exists: bool, was_paused: bool) -> SaveEvidence {
        SaveEvidence {
            target: "/s/dom.save".into(),
            temp: "/s/.dom.save.x.tmp".into(),
            temp_exists,
            was_paused,
            committing,
        }
    }

    fn adopted(plan: Plan) -> Option<Observation> {
        match plan {
            Plan::Adopt { observation, .. } => observation,
            other => panic!("want adopt, got {other:?}"),
        }
    }

    const RUNNING: DomainState = DomainState::Running(RunningReason::Booted);
    const D: LifecycleAction = LifecycleAction::Destroy;
    const P: LifecycleAction = LifecycleAction::Preserve;
    const R: LifecycleAction = LifecycleAction::Restart;

    #[test]
    fn the_fixtures_are_what_libxl_reported() {
        // Guards the mapping's reading of the flags (a suspended or shut-down domain is not
        // `paused` in libxl_dominfo).
        let running = recorded("running");
        assert!(!running.paused && !running.shutdown && !running.dying);
        assert!(recorded("paused").paused);
        for (case, reason) in [
            ("suspended", REASON_SUSPEND),
            ("poweroff", REASON_POWEROFF),
            ("crash", REASON_CRASH),
            ("reboot", REASON_REBOOT),
        ] {
            let i = recorded(case);
            assert!(i.shutdown && !i.paused, "{case}: {i:?}");
            assert_eq!(i.shutdown_reason, i32::from(reason), "{case}");
        }
    }

    #[test]
    fn a_domain_as_recorded_is_adopted_without_events() {
        let p = LifecyclePolicies::default();
        let running = recorded("running");
        assert_eq!(adopted(plan(RUNNING, p, None, Some(&running))), None);
        let paused = recorded("paused");
        let user = DomainState::Paused(PausedReason::User);
        assert_eq!(adopted(plan(user, p, None, Some(&paused))), None);
        let pm = DomainState::PmSuspended(domkit_core::PmSuspendedReason::Memory);
        assert_eq!(
            adopted(plan(pm, p, None, Some(&recorded("suspended")))),
            None
        );
    }

    #[test]
    fn paused_or_unpaused_by_someone_else_is_reconciled() {
        let p = LifecyclePolicies::default();
        let obs = adopted(plan(RUNNING, p, None, Some(&recorded("paused"))));
        let mut l = resumed(RUNNING, p);
        let out = l.observe_reconciled(obs.expect("an observation"), SystemTime::now());
        assert_eq!(l.state(), DomainState::Paused(PausedReason::Unknown));
        assert_eq!(
            out.events[0].kind,
            EventKind::Suspended(SuspendedDetail::Paused)
        );
        assert_eq!(out.events[0].seq, 42, "seq continues");
        assert!(out.events[0].reconciled);

        let user = DomainState::Paused(PausedReason::User);
        let obs = adopted(plan(user, p, None, Some(&recorded("running"))));
        assert_eq!(obs, Some(Observation::CpusResumed));
        let pm = DomainState::PmSuspended(domkit_core::PmSuspendedReason::Memory);
        let obs = adopted(plan(pm, p, None, Some(&recorded("running"))));
        assert_eq!(obs, Some(Observation::PmWokeUp));
    }

    #[test]
    fn a_poweroff_while_away_gets_each_on_poweroff() {
        let off = recorded("poweroff");
        for (policy, want_action, want_state) in [
            (D, Some(PolicyAction::Destroy), None),
            (R, Some(PolicyAction::Restart), None),
            (
                P,
                Some(PolicyAction::Preserve),
                Some(DomainState::Paused(PausedReason::ShuttingDown)),
            ),
        ] {
            let p = policies(policy, D);
            let obs = adopted(plan(RUNNING, p, None, Some(&off)));
            assert_eq!(obs, Some(Observation::GuestPoweredOff));
            let mut l = resumed(RUNNING, p);
            let out = l.observe_reconciled(obs.unwrap(), SystemTime::now());
            assert_eq!(out.action, want_action, "{policy:?}");
            assert_eq!(
                out.events[0].kind,
                EventKind::ShutdownRequested(ShutdownRequester::Guest)
            );
            assert!(out.events.iter().all(|e| e.reconciled));
            if let Some(s) = want_state {
                assert_eq!(l.state(), s);
            }
            if policy == D {
                // The policy's destroy ends it: shutoff(shutdown).
                l.observe(
                    Observation::Gone {
                        unexplained: ShutoffReason::Destroyed,
                    },
                    SystemTime::now(),
                );
                assert_eq!(l.state(), DomainState::Shutoff(ShutoffReason::Shutdown));
            }
        }
    }

    #[test]
    fn a_shutdown_in_flight_completes_as_shutdown() {
        let p = policies(P, D); // even with on_poweroff = preserve
        let pending = DomainState::ShuttingDown(ShuttingDownReason::User);
        let obs = adopted(plan(pending, p, None, Some(&recorded("poweroff"))));
        let mut l = resumed(pending, p);
        let out = l.observe_reconciled(obs.expect("observation"), SystemTime::now());
        assert_eq!(out.action, Some(PolicyAction::Destroy));
        l.observe(
            Observation::Gone {
                unexplained: ShutoffReason::Destroyed,
            },
            SystemTime::now(),
        );
        assert_eq!(l.state(), DomainState::Shutoff(ShutoffReason::Shutdown));
        // Not powered off yet: adopted as it is; the live poweroff completes it later.
        assert_eq!(
            adopted(plan(pending, p, None, Some(&recorded("running")))),
            None
        );
    }

    #[test]
    fn a_crash_or_reboot_while_away_is_translated_as_live() {
        let p = policies(D, P);
        let obs = adopted(plan(RUNNING, p, None, Some(&recorded("crash"))));
        assert_eq!(
            obs,
            Some(Observation::Crashed {
                detail: CrashedDetail::Panicked
            })
        );
        let mut l = resumed(RUNNING, p);
        l.observe_reconciled(obs.unwrap(), SystemTime::now());
        assert_eq!(l.state(), DomainState::Crashed(CrashedReason::Panicked));
        let obs = adopted(plan(RUNNING, p, None, Some(&recorded("reboot"))));
        assert_eq!(
            obs,
            Some(Observation::Rebooted {
                by: ShutdownRequester::Guest,
                platform_restarted: false
            })
        );
    }

    #[test]
    fn an_end_the_previous_manager_had_decided_is_finished_not_reported_twice() {
        let guest = DomainState::ShuttingDown(ShuttingDownReason::Guest);
        let p = policies(D, D);
        assert_eq!(
            plan(guest, p, None, Some(&recorded("poweroff"))),
            Plan::Finish {
                domid: recorded("poweroff").domid,
                reason: ShutoffReason::Shutdown
            }
        );
        let crashed = DomainState::Crashed(CrashedReason::Panicked);
        let info = recorded("crash");
        assert_eq!(
            plan(crashed, p, None, Some(&info)),
            Plan::Finish {
                domid: info.domid,
                reason: ShutoffReason::Crashed
            }
        );
        // Preserved: kept as it is.
        assert_eq!(
            adopted(plan(crashed, policies(D, P), None, Some(&info))),
            None
        );
        let kept = DomainState::Paused(PausedReason::ShuttingDown);
        assert_eq!(
            adopted(plan(
                kept,
                policies(P, D),
                None,
                Some(&recorded("poweroff"))
            )),
            None
        );
    }

    #[test]
    fn a_vanished_domain_was_destroyed_unless_its_end_was_decided() {
        let p = policies(D, D);
        assert_eq!(
            plan(RUNNING, p, None, None),
            Plan::Vanished {
                reason: ShutoffReason::Destroyed,
                committed: false
            }
        );
        let mut l = resumed(RUNNING, p);
        let out = l.observe_reconciled(
            Observation::Gone {
                unexplained: ShutoffReason::Destroyed,
            },
            SystemTime::now(),
        );
        assert_eq!(l.state(), DomainState::Shutoff(ShutoffReason::Destroyed));
        assert_eq!(
            out.events[0].kind,
            EventKind::Stopped(StoppedDetail::Destroyed)
        );
        assert_eq!(out.events[0].seq, 42);
        assert!(out.events[0].reconciled);
        let guest = DomainState::ShuttingDown(ShuttingDownReason::Guest);
        assert_eq!(vanished_reason(guest, p), ShutoffReason::Shutdown);
        let crashed = DomainState::Crashed(CrashedReason::Panicked);
        assert_eq!(vanished_reason(crashed, p), ShutoffReason::Crashed);
        assert_eq!(
            vanished_reason(crashed, policies(D, P)),
            ShutoffReason::Destroyed
        );
        // Dying is gone for us.
        let mut dying = recorded("running");
        dying.dying = true;
        assert!(matches!(
            plan(RUNNING, p, None, Some(&dying)),
            Plan::Vanished { .. }
        ));
        // Shut off and nothing found: nothing to do.
        let off = DomainState::Shutoff(ShutoffReason::Shutdown);
        assert_eq!(plan(off, p, None, None), Plan::Nothing);
    }

    #[test]
    fn a_xen_domain_of_a_shut_off_one_is_an_unfinished_create_and_is_destroyed() {
        let off = DomainState::Shutoff(ShutoffReason::Unknown);
        let info = recorded("paused");
        assert_eq!(
            plan(off, LifecyclePolicies::default(), None, Some(&info)),
            Plan::DestroyLeftover { domid: info.domid }
        );
    }

    #[test]
    fn a_committed_save_ends_saved_found_or_not() {
        let p = LifecyclePolicies::default();
        let saving = DomainState::Paused(PausedReason::Save);
        let committed = save(true, false, false);
        let info = recorded("suspended");
        assert_eq!(
            plan(saving, p, Some(&committed), Some(&info)),
            Plan::EndSaved { domid: info.domid }
        );
        assert_eq!(
            plan(saving, p, Some(&committed), None),
            Plan::Vanished {
                reason: ShutoffReason::Destroyed,
                committed: true
            }
        );
        let mut l = resumed(saving, p);
        let _c = l.push_intent(Intent::SaveCommitted);
        l.observe_reconciled(
            Observation::Gone {
                unexplained: ShutoffReason::Destroyed,
            },
            SystemTime::now(),
        );
        assert_eq!(l.state(), DomainState::Shutoff(ShutoffReason::Saved));
        assert_eq!(temp_to_remove(Some(&committed)), None);
    }

    #[test]
    fn an_uncommitted_save_is_cancelled_and_the_domain_put_back_as_it_was() {
        let p = LifecyclePolicies::default();
        let saving = DomainState::Paused(PausedReason::Save);
        let suspended = recorded("suspended");
        for (was_paused, committing) in [(false, false), (true, false), (false, true)] {
            let s = save(committing, true, was_paused);
            assert_eq!(
                plan(saving, p, Some(&s), Some(&suspended)),
                Plan::CancelSave {
                    domid: suspended.domid,
                    resume_suspended: true,
                    pause: was_paused,
                    unpause: false
                },
                "was_paused {was_paused}, committing {committing}"
            );
            assert_eq!(temp_to_remove(Some(&s)), Some(s.temp.clone()));
        }
        // Killed before the guest suspended: a running domain saved paused is paused again;
        // a domain paused by the save's start and not saved paused runs again.
        let running = recorded("running");
        let paused = recorded("paused");
        assert_eq!(
            plan(RUNNING, p, Some(&save(false, true, true)), Some(&running)),
            Plan::CancelSave {
                domid: running.domid,
                resume_suspended: false,
                pause: true,
                unpause: false
            }
        );
        assert_eq!(
            plan(RUNNING, p, Some(&save(false, false, false)), Some(&paused)),
            Plan::CancelSave {
                domid: paused.domid,
                resume_suspended: false,
                pause: false,
                unpause: true
            }
        );
        // The resume under the save's intent reads as its cancellation.
        let mut l = resumed(saving, p);
        let _s = l.push_intent(Intent::Save);
        let out = l.observe_reconciled(Observation::CpusResumed, SystemTime::now());
        assert_eq!(l.state(), DomainState::Running(RunningReason::SaveCanceled));
        assert!(out.events[0].reconciled);
        // A guest that powered off during the save: reconciled like any poweroff.
        let obs = adopted(plan(
            RUNNING,
            policies(D, D),
            Some(&save(false, true, false)),
            Some(&recorded("poweroff")),
        ));
        assert_eq!(obs, Some(Observation::GuestPoweredOff));
    }
}
