//! The libxl -> uniform mapping (pure; `docs/semantics.md` §9).
//!
//! Two inputs reach the core state machine from the Xen side:
//! - libxl events ([`LibxlEvent`]: `DOMAIN_SHUTDOWN` with a shutdown reason, `DOMAIN_DEATH`),
//!   translated by [`translate_event`] with the intent in force;
//! - facts learnt from libxl calls that returned ([`Fact`]: libxl has no pause/unpause events,
//!   and a successful shutdown call is the "acknowledged" of §6.3), translated by
//!   [`translate_fact`].
//!
//! Nothing here does I/O; `tests/fixtures/xen417_traces.json` holds event sequences recorded
//! on the real Xen 4.17 host (see `tests/libxl_integration.rs`), replayed by the unit tests
//! below through the core [`domkit_core::Lifecycle`].

use domkit_core::{
    CrashedDetail, Creation, Intent, Observation, PmSuspendedDetail, ShutdownRequester,
    ShutoffReason, StopCause,
};
use serde::{Deserialize, Serialize};

/// `LIBXL_SHUTDOWN_REASON_POWEROFF`.
pub const REASON_POWEROFF: u8 = 0;
/// `LIBXL_SHUTDOWN_REASON_REBOOT`.
pub const REASON_REBOOT: u8 = 1;
/// `LIBXL_SHUTDOWN_REASON_SUSPEND`.
pub const REASON_SUSPEND: u8 = 2;
/// `LIBXL_SHUTDOWN_REASON_CRASH`.
pub const REASON_CRASH: u8 = 3;
/// `LIBXL_SHUTDOWN_REASON_WATCHDOG`.
pub const REASON_WATCHDOG: u8 = 4;
/// `LIBXL_SHUTDOWN_REASON_SOFT_RESET`.
pub const REASON_SOFT_RESET: u8 = 5;

/// A libxl event, copied out of libxl's `libxl_event` (plain data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LibxlEvent {
    /// The domid it is about.
    pub domid: u32,
    /// The `for_user` value given to `libxl_evenable_domain_death` (the driver's token).
    pub for_user: u64,
    /// What happened.
    pub kind: LibxlEventKind,
}

/// The libxl event types the driver distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LibxlEventKind {
    /// `LIBXL_EVENT_TYPE_DOMAIN_SHUTDOWN` with `u.domain_shutdown.shutdown_reason`.
    DomainShutdown {
        /// `LIBXL_SHUTDOWN_REASON_*` (see the `REASON_*` constants).
        reason: u8,
    },
    /// `LIBXL_EVENT_TYPE_DOMAIN_DEATH`.
    DomainDeath,
    /// Any other event type (disk eject, operation complete, console available).
    Other {
        /// The `LIBXL_EVENT_TYPE_*` value.
        event_type: i32,
    },
}

/// Something the driver must do besides feeding the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FollowUp {
    /// The guest asked for a soft reset (`SHUTDOWN{soft_reset}`): call
    /// `libxl_domain_soft_reset` (if the core did not decide to destroy or preserve).
    SoftReset,
}

/// The result of translating one libxl event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// What to feed the core, if anything.
    pub observation: Option<Observation>,
    /// What else the driver must do.
    pub follow_up: Option<FollowUp>,
    /// Why, for the logs (the §9 row that applied).
    pub rule: &'static str,
}

/// Translate one libxl event under the intent in force (§9).
pub fn translate_event(event: &LibxlEvent, intent: Option<Intent>) -> Translation {
    let t = |observation, rule| Translation {
        observation,
        follow_up: None,
        rule,
    };
    match event.kind {
        LibxlEventKind::DomainShutdown { reason } => match reason {
            REASON_SUSPEND => match intent {
                // Our save suspended the guest: the vCPUs stopped for the save (the event may
                // arrive after the file was committed: still the save's stop, never
                // pm_suspended). Under a destroy in force it is ignored like any stop.
                Some(Intent::Save | Intent::SaveCommitted) => t(
                    Some(Observation::CpusStopped {
                        cause: StopCause::Command,
                    }),
                    "shutdown{suspend} during our save -> cpus_stopped{command}",
                ),
                // Our pm_suspend (libxl_domain_suspend_only): the guest sleeps in memory.
                Some(Intent::PmSuspend) => t(
                    Some(Observation::PmSuspended {
                        detail: PmSuspendedDetail::Memory,
                    }),
                    "shutdown{suspend} during our pm_suspend -> pm_suspended{memory}",
                ),
                // Someone else's save/suspend (xl save): say nothing; its DEATH follows.
                _ => t(None, "shutdown{suspend} outside our save: ignored (death follows)"),
            },
            REASON_POWEROFF => t(
                Some(Observation::GuestPoweredOff),
                "shutdown{poweroff} -> guest_powered_off",
            ),
            REASON_REBOOT => t(
                Some(Observation::Rebooted {
                    by: if matches!(intent, Some(Intent::Reboot | Intent::Reset)) {
                        ShutdownRequester::Host
                    } else {
                        ShutdownRequester::Guest
                    },
                    platform_restarted: false,
                }),
                "shutdown{reboot} -> rebooted{platform_restarted=false} (restart = destroy + create)",
            ),
            REASON_CRASH => t(
                Some(Observation::Crashed {
                    detail: CrashedDetail::Panicked,
                }),
                "shutdown{crash} -> crashed{panicked}",
            ),
            REASON_WATCHDOG => t(
                Some(Observation::Crashed {
                    detail: CrashedDetail::Watchdog,
                }),
                "shutdown{watchdog} -> crashed{watchdog}",
            ),
            REASON_SOFT_RESET => Translation {
                observation: Some(Observation::Rebooted {
                    by: ShutdownRequester::Guest,
                    platform_restarted: true,
                }),
                follow_up: Some(FollowUp::SoftReset),
                rule: "shutdown{soft_reset} -> rebooted{guest, platform_restarted=true} + soft reset",
            },
            _ => t(None, "shutdown with an unknown reason: ignored"),
        },
        LibxlEventKind::DomainDeath => t(
            Some(Observation::Gone {
                unexplained: ShutoffReason::Destroyed,
            }),
            "death -> gone{unexplained=destroyed}",
        ),
        LibxlEventKind::Other { .. } => t(None, "other libxl event: ignored"),
    }
}

/// A fact learnt from a libxl call that returned (libxl emits no event for these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "fact", rename_all = "snake_case")]
pub enum Fact {
    /// `libxl_domain_create_new`/`_create_restore` worked; `paused`: left paused.
    Created {
        /// Boot or restore.
        how: Creation,
        /// The vCPUs were left paused.
        paused: bool,
    },
    /// Creating the domain failed (nothing runs).
    CreateFailed,
    /// `libxl_domain_pause` returned 0.
    Paused,
    /// `libxl_domain_unpause` returned 0.
    Unpaused,
    /// `libxl_domain_shutdown` returned 0: the guest acknowledged the PV request.
    ShutdownAcknowledged,
    /// `libxl_domain_suspend` returned 0, or `libxl_domain_info` shows the domain shut down
    /// with reason suspend while we save: the guest is suspended.
    Suspended,
    /// `libxl_domain_suspend_only` returned 0: the guest sleeps in memory.
    SuspendedOnly,
    /// `libxl_domain_resume(suspend_cancel=1)` returned 0 after a failed save.
    ResumedAfterFailedSave,
    /// `libxl_domain_resume(suspend_cancel=1)` returned 0 after `suspend_only`.
    WokeUp,
    /// `libxl_domain_destroy` returned 0 (or libxl says the domain is gone).
    Destroyed,
    /// A policy restart (destroy + create) finished.
    RestartDone {
        /// The new domain runs.
        ok: bool,
    },
    /// `libxl_domain_soft_reset` failed after a guest soft-reset request; the domain was
    /// destroyed.
    SoftResetFailed,
    /// A host reset (`reset()`): Xen has no reset of a PV guest, so the domain is destroyed
    /// and created again, like a reboot the platform did not restart itself.
    ResetRequested,
}

/// Translate a fact (§9, the rows about calls that returned).
pub fn translate_fact(fact: Fact) -> Observation {
    match fact {
        Fact::Created { how, paused } => Observation::Created { how, paused },
        Fact::CreateFailed => Observation::CreateFailed,
        Fact::Paused | Fact::Suspended => Observation::CpusStopped {
            cause: StopCause::Command,
        },
        Fact::Unpaused | Fact::ResumedAfterFailedSave => Observation::CpusResumed,
        Fact::ShutdownAcknowledged => Observation::ShutdownRequestDelivered,
        Fact::SuspendedOnly => Observation::PmSuspended {
            detail: PmSuspendedDetail::Memory,
        },
        Fact::WokeUp => Observation::PmWokeUp,
        Fact::Destroyed => Observation::Gone {
            unexplained: ShutoffReason::Destroyed,
        },
        Fact::RestartDone { ok } => Observation::RestartDone { ok },
        Fact::SoftResetFailed => Observation::Gone {
            unexplained: ShutoffReason::Failed,
        },
        Fact::ResetRequested => Observation::Rebooted {
            by: ShutdownRequester::Host,
            platform_restarted: false,
        },
    }
}

/// One input of a domain's trace: what the driver fed the core, with the intent in force.
/// Recorded by the driver ([`crate::LibxlDomain::trace`]) and replayed by the unit tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceEntry {
    /// The intent in force when the input was translated.
    pub intent: Option<Intent>,
    /// The input.
    pub input: TraceInput,
}

/// A libxl event or a fact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TraceInput {
    /// A libxl event (for the domain's current watch).
    Event(LibxlEvent),
    /// A fact from a returned call.
    Fact(Fact),
}

/// Translate a trace input under `intent`: the observation to feed, if any.
pub fn translate_input(entry: &TraceEntry) -> Option<Observation> {
    match entry.input {
        TraceInput::Event(ev) => translate_event(&ev, entry.intent).observation,
        TraceInput::Fact(f) => Some(translate_fact(f)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use domkit_core::{
        CrashedReason, DomainId, DomainState, EventKind, Lifecycle, LifecyclePolicies,
        PausedReason, PolicyAction, RunningReason, StoppedDetail,
    };
    use std::time::SystemTime;

    fn shutdown(reason: u8) -> LibxlEvent {
        LibxlEvent {
            domid: 5,
            for_user: 1,
            kind: LibxlEventKind::DomainShutdown { reason },
        }
    }

    fn death() -> LibxlEvent {
        LibxlEvent {
            domid: 5,
            for_user: 1,
            kind: LibxlEventKind::DomainDeath,
        }
    }

    #[test]
    fn suspend_during_save_is_a_cpu_stop_never_pm_suspended() {
        let t = translate_event(&shutdown(REASON_SUSPEND), Some(Intent::Save));
        assert_eq!(
            t.observation,
            Some(Observation::CpusStopped {
                cause: StopCause::Command
            })
        );
    }

    #[test]
    fn suspend_outside_a_save_is_ignored() {
        for intent in [
            None,
            Some(Intent::Pause),
            Some(Intent::Shutdown),
            Some(Intent::Destroy),
        ] {
            assert_eq!(
                translate_event(&shutdown(REASON_SUSPEND), intent).observation,
                None
            );
        }
    }

    #[test]
    fn suspend_during_pm_suspend_is_pm_suspended_memory() {
        assert_eq!(
            translate_event(&shutdown(REASON_SUSPEND), Some(Intent::PmSuspend)).observation,
            Some(Observation::PmSuspended {
                detail: PmSuspendedDetail::Memory
            })
        );
    }

    #[test]
    fn shutdown_reasons_map_per_section_9() {
        assert_eq!(
            translate_event(&shutdown(REASON_POWEROFF), None).observation,
            Some(Observation::GuestPoweredOff)
        );
        assert_eq!(
            translate_event(&shutdown(REASON_REBOOT), None).observation,
            Some(Observation::Rebooted {
                by: ShutdownRequester::Guest,
                platform_restarted: false
            })
        );
        assert_eq!(
            translate_event(&shutdown(REASON_REBOOT), Some(Intent::Reboot)).observation,
            Some(Observation::Rebooted {
                by: ShutdownRequester::Host,
                platform_restarted: false
            })
        );
        assert_eq!(
            translate_event(&shutdown(REASON_CRASH), None).observation,
            Some(Observation::Crashed {
                detail: CrashedDetail::Panicked
            })
        );
        assert_eq!(
            translate_event(&shutdown(REASON_WATCHDOG), None).observation,
            Some(Observation::Crashed {
                detail: CrashedDetail::Watchdog
            })
        );
        let soft = translate_event(&shutdown(REASON_SOFT_RESET), None);
        assert_eq!(
            soft.observation,
            Some(Observation::Rebooted {
                by: ShutdownRequester::Guest,
                platform_restarted: true
            })
        );
        assert_eq!(soft.follow_up, Some(FollowUp::SoftReset));
        assert_eq!(translate_event(&shutdown(77), None).observation, None);
    }

    #[test]
    fn death_is_an_unexplained_destroy() {
        assert_eq!(
            translate_event(&death(), None).observation,
            Some(Observation::Gone {
                unexplained: ShutoffReason::Destroyed
            })
        );
    }

    #[test]
    fn other_events_are_ignored() {
        let ev = LibxlEvent {
            domid: 1,
            for_user: 0,
            kind: LibxlEventKind::Other { event_type: 3 },
        };
        assert_eq!(translate_event(&ev, None).observation, None);
    }

    #[test]
    fn facts_map_per_section_9() {
        assert_eq!(
            translate_fact(Fact::Paused),
            Observation::CpusStopped {
                cause: StopCause::Command
            }
        );
        assert_eq!(translate_fact(Fact::Unpaused), Observation::CpusResumed);
        assert_eq!(
            translate_fact(Fact::ShutdownAcknowledged),
            Observation::ShutdownRequestDelivered
        );
        assert_eq!(
            translate_fact(Fact::ResumedAfterFailedSave),
            Observation::CpusResumed
        );
        assert_eq!(translate_fact(Fact::WokeUp), Observation::PmWokeUp);
        assert_eq!(
            translate_fact(Fact::Destroyed),
            Observation::Gone {
                unexplained: ShutoffReason::Destroyed
            }
        );
    }

    fn lifecycle(policies: LifecyclePolicies) -> Lifecycle {
        Lifecycle::new(
            DomainId {
                name: "t".into(),
                uuid: uuid::Uuid::nil(),
            },
            policies,
        )
    }

    /// Replay a trace; returns the states after each step, all events, and the actions.
    fn replay(
        lc: &mut Lifecycle,
        trace: &[TraceEntry],
    ) -> (Vec<DomainState>, Vec<EventKind>, Vec<PolicyAction>) {
        let mut states = Vec::new();
        let mut events = Vec::new();
        let mut actions = Vec::new();
        // One operation at a time in a trace: each entry's intent replaces the last one's.
        let mut stashed = None;
        for e in trace {
            if let Some(token) = stashed.take() {
                lc.pop_intent(token);
            }
            stashed = e.intent.map(|i| lc.push_intent(i));
            if let Some(obs) = translate_input(e) {
                let out = lc.observe(obs, SystemTime::now());
                events.extend(out.events.into_iter().map(|ev| ev.kind));
                actions.extend(out.action);
            }
            states.push(lc.state());
        }
        (states, events, actions)
    }

    fn fact(intent: Option<Intent>, f: Fact) -> TraceEntry {
        TraceEntry {
            intent,
            input: TraceInput::Fact(f),
        }
    }
    fn event(intent: Option<Intent>, ev: LibxlEvent) -> TraceEntry {
        TraceEntry {
            intent,
            input: TraceInput::Event(ev),
        }
    }
    fn booted() -> TraceEntry {
        fact(
            None,
            Fact::Created {
                how: Creation::Boot,
                paused: false,
            },
        )
    }

    /// What the driver does for a save (domain.rs `save_blocking`): `Save` while libxl
    /// suspends the guest and the stream is sealed; `SaveCommitted` once the file is renamed
    /// into place, before the suspended domain is destroyed (its DEATH may come before
    /// `libxl_domain_destroy` returns).
    #[test]
    fn save_success_ends_saved_never_pm_suspended() {
        let mut lc = lifecycle(LifecyclePolicies::default());
        let s = Some(Intent::Save);
        let c = Some(Intent::SaveCommitted);
        let (states, events, _) = replay(
            &mut lc,
            &[
                booted(),
                event(s, shutdown(REASON_SUSPEND)),
                fact(s, Fact::Suspended),
                event(c, death()),
                fact(c, Fact::Destroyed),
            ],
        );
        assert_eq!(states[1], DomainState::Paused(PausedReason::Save));
        assert_eq!(
            *states.last().unwrap(),
            DomainState::Shutoff(ShutoffReason::Saved)
        );
        assert!(!events
            .iter()
            .any(|e| matches!(e, EventKind::PmSuspended(_))));
        assert!(events.contains(&EventKind::Stopped(StoppedDetail::Saved)));
    }

    /// Issue 15 item 2 (`xl destroy` during a save, 22 of 24 reported saved on the real
    /// host): a death before the file is committed saved nothing; it is libxl's unexplained
    /// end, destroyed.
    #[test]
    fn death_during_save_before_the_commit_is_destroyed_never_saved() {
        for late_suspend_event in [false, true] {
            let mut lc = lifecycle(LifecyclePolicies::default());
            let s = Some(Intent::Save);
            let mut trace = vec![booted()];
            if late_suspend_event {
                trace.push(fact(s, Fact::Suspended));
                trace.push(event(s, shutdown(REASON_SUSPEND)));
            } else {
                trace.push(event(s, shutdown(REASON_SUSPEND)));
            }
            trace.push(event(s, death()));
            let (states, events, _) = replay(&mut lc, &trace);
            assert_eq!(
                *states.last().unwrap(),
                DomainState::Shutoff(ShutoffReason::Destroyed)
            );
            assert!(!events.contains(&EventKind::Stopped(StoppedDetail::Saved)));
            assert!(events.contains(&EventKind::Stopped(StoppedDetail::Destroyed)));
        }
    }

    /// A destroy of ours that preempts a save: `Destroy` is in force over `Save`; the
    /// suspend event the save's own libxl call produces is not a pause, the end is
    /// destroyed.
    #[test]
    fn destroy_preempting_a_save_ends_destroyed() {
        let mut lc = lifecycle(LifecyclePolicies::default());
        let (states, _, _) = replay(&mut lc, &[booted()]);
        assert_eq!(states[0], DomainState::Running(RunningReason::Booted));
        let mut events = Vec::new();
        let save = lc.push_intent(Intent::Save);
        let destroy = lc.push_intent(Intent::Destroy);
        assert_eq!(lc.intent(), Some(Intent::Destroy));
        for input in [
            TraceInput::Event(shutdown(REASON_SUSPEND)),
            TraceInput::Event(death()),
        ] {
            let entry = TraceEntry {
                intent: lc.intent(),
                input,
            };
            if let Some(obs) = translate_input(&entry) {
                let out = lc.observe(obs, SystemTime::now());
                events.extend(out.events.into_iter().map(|e| e.kind));
            }
        }
        lc.pop_intent(destroy);
        lc.pop_intent(save);
        assert_eq!(lc.state(), DomainState::Shutoff(ShutoffReason::Destroyed));
        assert_eq!(events, vec![EventKind::Stopped(StoppedDetail::Destroyed)]);
    }

    /// A late SHUTDOWN{suspend} under `SaveCommitted` is still the save's stop, never
    /// pm_suspended.
    #[test]
    fn suspend_after_the_commit_is_still_the_save() {
        let t = translate_event(&shutdown(REASON_SUSPEND), Some(Intent::SaveCommitted));
        assert_eq!(
            t.observation,
            Some(Observation::CpusStopped {
                cause: StopCause::Command
            })
        );
    }

    /// Save of a paused domain (defect 6): the PV guest runs to suspend itself, and the
    /// events say so: resumed(unpaused) (the unpause reads as a resume, not as the save's
    /// cancellation), suspended(saving), stopped(saved).
    #[test]
    fn save_of_a_paused_domain_says_the_guest_ran_to_suspend_itself() {
        let mut lc = lifecycle(LifecyclePolicies::default());
        let s = Some(Intent::Save);
        let c = Some(Intent::SaveCommitted);
        let (states, events, _) = replay(
            &mut lc,
            &[
                booted(),
                fact(Some(Intent::Pause), Fact::Paused),
                fact(Some(Intent::Resume), Fact::Unpaused),
                event(s, shutdown(REASON_SUSPEND)),
                fact(s, Fact::Suspended),
                event(c, death()),
                fact(c, Fact::Destroyed),
            ],
        );
        assert_eq!(states[2], DomainState::Running(RunningReason::Unpaused));
        assert_eq!(states[3], DomainState::Paused(PausedReason::Save));
        assert_eq!(
            events,
            vec![
                EventKind::Started(domkit_core::StartedDetail::Booted),
                EventKind::Suspended(domkit_core::SuspendedDetail::Paused),
                EventKind::Resumed(domkit_core::ResumedDetail::Unpaused),
                EventKind::Suspended(domkit_core::SuspendedDetail::Saving),
                EventKind::Stopped(StoppedDetail::Saved),
            ]
        );
    }

    #[test]
    fn failed_save_resumes_as_save_canceled() {
        let mut lc = lifecycle(LifecyclePolicies::default());
        let s = Some(Intent::Save);
        let (states, _, _) = replay(
            &mut lc,
            &[
                booted(),
                event(s, shutdown(REASON_SUSPEND)),
                fact(s, Fact::Suspended),
                fact(s, Fact::ResumedAfterFailedSave),
            ],
        );
        assert_eq!(
            *states.last().unwrap(),
            DomainState::Running(RunningReason::SaveCanceled)
        );
    }

    #[test]
    fn guest_reboot_restarts_and_swallows_the_old_death() {
        let mut lc = lifecycle(LifecyclePolicies::default());
        let (states, events, actions) = replay(
            &mut lc,
            &[
                booted(),
                event(None, shutdown(REASON_REBOOT)),
                event(None, death()),
                fact(None, Fact::RestartDone { ok: true }),
            ],
        );
        assert_eq!(actions, vec![PolicyAction::Restart]);
        assert_eq!(
            *states.last().unwrap(),
            DomainState::Running(RunningReason::Booted)
        );
        assert_eq!(events.last(), Some(&EventKind::Rebooted));
    }

    #[test]
    fn crash_with_default_policy_ends_crashed() {
        let mut lc = lifecycle(LifecyclePolicies::default());
        let (states, _, actions) = replay(
            &mut lc,
            &[
                booted(),
                event(None, shutdown(REASON_CRASH)),
                fact(None, Fact::Destroyed),
            ],
        );
        assert_eq!(states[1], DomainState::Crashed(CrashedReason::Panicked));
        assert_eq!(actions, vec![PolicyAction::Destroy]);
        assert_eq!(
            *states.last().unwrap(),
            DomainState::Shutoff(ShutoffReason::Crashed)
        );
    }

    #[test]
    fn out_of_band_death_is_destroyed() {
        let mut lc = lifecycle(LifecyclePolicies::default());
        let (states, _, _) = replay(&mut lc, &[booted(), event(None, death())]);
        assert_eq!(
            *states.last().unwrap(),
            DomainState::Shutoff(ShutoffReason::Destroyed)
        );
    }

    /// A recorded trace: the test that produced it, the policies, the trace, and the state the
    /// real driver ended in.
    #[derive(Debug, Deserialize)]
    struct Recorded {
        test: String,
        #[serde(default)]
        policies: Option<LifecyclePolicies>,
        trace: Vec<TraceEntry>,
        final_state: DomainState,
    }

    #[test]
    fn recorded_real_host_traces_replay_to_the_same_state() {
        let text = include_str!("../tests/fixtures/xen417_traces.json");
        let recorded: Vec<Recorded> = serde_json::from_str(text).expect("fixture parses");
        assert!(!recorded.is_empty(), "no recorded traces");
        for r in recorded {
            let mut lc = lifecycle(r.policies.unwrap_or_default());
            let (states, _, _) = replay(&mut lc, &r.trace);
            assert_eq!(
                states.last().copied().unwrap_or(DomainState::NoState),
                r.final_state,
                "trace of {} replays to a different state",
                r.test
            );
        }
    }
}
