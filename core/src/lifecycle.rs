//! The backend-independent lifecycle state machine (normative: `docs/semantics.md` §3-§4).
//!
//! Both drivers feed it: a driver's pure translation module turns backend events (QMP events,
//! libxl events, completed calls) into [`Observation`]s, and every operation stashes an
//! [`Intent`] before it sends its command. [`Lifecycle::observe`] then
//! - guards every transition on the current state: a repeated or transient observation that
//!   does not apply is a no-op (no event, no state change);
//! - reads the intent to pick the reason: a stop during a save is `Paused(Save)`, not
//!   `Paused(User)`; a disappearance during a destroy is `Shutoff(Destroyed)`, not a crash;
//! - applies the lifecycle policies (`on_poweroff`, `on_reboot`, `on_crash`) and tells the
//!   driver which [`PolicyAction`] to carry out;
//! - while a policy restart is carried out, swallows the backend's noise (the stop, reset and
//!   resume of a QEMU fake reboot; the death and re-creation of a Xen domain) until the driver
//!   reports [`Observation::RestartDone`].
//!
//! It is pure: no I/O, no clock (callers pass the time), so every rule is unit-tested.

use crate::config::{LifecycleAction, LifecyclePolicies};
use crate::event::{
    unix_micros, CrashedDetail, DomainEvent, DomainId, EventKind, PmSuspendedDetail, ResumedDetail,
    ShutdownRequester, StartedDetail, StoppedDetail, SuspendedDetail,
};
use crate::state::{
    ControlState, CrashedReason, DomainState, PausedReason, PmSuspendedReason, RunningReason,
    ShutoffReason, ShuttingDownReason,
};
use serde::{Deserialize, Serialize};
use std::time::SystemTime;

/// What an operation in progress means to do; stashed before the backend command is sent and
/// cleared when the operation ends.
///
/// Several may be stashed at once (an operation and a `destroy` that preempts it, §6.0); each
/// belongs to the operation that stashed it ([`IntentToken`]). The one in force is `Destroy`
/// if any operation stashed it, else the newest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Intent {
    /// Pause through the API.
    Pause,
    /// Resume through the API.
    Resume,
    /// Save to a file: the stop and a resume after a failure belong to the save. A backend
    /// domain that ends while only this is stashed did not save anything (its end is
    /// whatever the backend's evidence says, never `saved`).
    Save,
    /// The save file is committed under its final name; the end that follows is
    /// `shutoff(saved)`. Stashed only after the file is durable.
    SaveCommitted,
    /// Graceful shutdown requested by the host.
    Shutdown,
    /// Graceful reboot requested by the host.
    Reboot,
    /// Hard reset requested by the host.
    Reset,
    /// Hard stop through the API.
    Destroy,
    /// Power-management suspend through the API.
    PmSuspend,
}

/// Proof of one stashed [`Intent`]: [`Lifecycle::pop_intent`] removes exactly that one (an
/// operation never clears another's intent).
#[derive(Debug, PartialEq, Eq)]
#[must_use = "an intent stays stashed until its token is popped"]
pub struct IntentToken(u64);

/// Why the vCPUs stopped, as far as the backend can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopCause {
    /// A stop command (ours or someone else's); the intent says whose.
    Command,
    /// The hypervisor stopped the guest on an I/O error.
    IoError,
    /// A watchdog stopped the guest.
    Watchdog,
}

/// How the backend domain came into existence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Creation {
    /// A fresh boot.
    Boot,
    /// A restore from a save file.
    Restore,
}

/// A backend fact, already translated out of backend terms by the driver's translation module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "observation", rename_all = "snake_case")]
pub enum Observation {
    /// The backend domain exists and its vCPUs run, or are stopped if `paused`.
    Created {
        /// Boot or restore.
        how: Creation,
        /// Whether the vCPUs are stopped.
        paused: bool,
    },
    /// Creating the domain (start, restore) failed; nothing runs.
    CreateFailed,
    /// The vCPUs stopped.
    CpusStopped {
        /// Why, as far as the backend knows.
        cause: StopCause,
    },
    /// The vCPUs run again.
    CpusResumed,
    /// A graceful shutdown request reached the guest (QEMU POWERDOWN; Xen: the PV control
    /// request was written).
    ShutdownRequestDelivered,
    /// The guest powered itself off (in response to a request or on its own).
    GuestPoweredOff,
    /// The guest rebooted, once. `platform_restarted`: the backend already reset the machine
    /// and it runs (QEMU RESET); otherwise the domain is shut down and must be restarted
    /// (Xen shutdown reason reboot; QEMU SHUTDOWN during a host reboot request).
    Rebooted {
        /// Host-requested (reset/reboot through the API or host-side) or by the guest.
        by: ShutdownRequester,
        /// See above.
        platform_restarted: bool,
    },
    /// The guest crashed (kernel panic, or a watchdog that stopped the domain).
    Crashed {
        /// Panic or watchdog.
        detail: CrashedDetail,
    },
    /// The guest entered a power-management sleep state.
    PmSuspended {
        /// Which one.
        detail: PmSuspendedDetail,
    },
    /// The guest woke up from a power-management sleep state.
    PmWokeUp,
    /// The driver finished a [`PolicyAction::Restart`]: `ok` says whether the new instance runs.
    RestartDone {
        /// Whether the restart worked.
        ok: bool,
    },
    /// The backend domain no longer exists (QEMU process exited / monitor EOF; Xen domain
    /// death). `unexplained` is the reason to record when no intent, policy or earlier
    /// observation explains it (the driver's documented meaning of an out-of-band end).
    Gone {
        /// The reason when nothing else explains the end.
        unexplained: ShutoffReason,
    },
}

/// What the driver must do after an observation, decided by the lifecycle policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyAction {
    /// Tear the backend domain down; report [`Observation::Gone`] when it is gone.
    Destroy,
    /// Restart the guest with the same config and identity (QEMU: system_reset + cont of the
    /// stopped process; Xen: destroy + create, new domid); report
    /// [`Observation::RestartDone`]. Backend noise is swallowed until then.
    Restart,
    /// Keep the domain with its vCPUs stopped (stop them if the backend has not).
    Preserve,
}

/// The result of one observation: the events it produced (already numbered) and the action
/// the driver must carry out, if any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Events, in order.
    pub events: Vec<DomainEvent>,
    /// What the driver must do.
    pub action: Option<PolicyAction>,
}

/// The per-domain lifecycle state machine.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    id: DomainId,
    policies: LifecyclePolicies,
    state: DomainState,
    control: ControlState,
    /// Stashed intents, oldest first, each with its token number.
    intents: Vec<(u64, Intent)>,
    next_token: u64,
    /// The shutoff reason decided earlier (by a guest poweroff or crash with policy destroy)
    /// for the `Gone` that follows.
    pending_end: Option<ShutoffReason>,
    /// Set while a policy restart is carried out; the reason the restarted domain runs with.
    restarting: Option<RunningReason>,
    seq: u64,
    /// Events produced now are reconciled on reattach (§11.3).
    reconciling: bool,
}

impl Lifecycle {
    /// A new, shut-off domain.
    pub fn new(id: DomainId, policies: LifecyclePolicies) -> Self {
        Lifecycle {
            id,
            policies,
            state: DomainState::Shutoff(ShutoffReason::Unknown),
            control: ControlState::Ok,
            intents: Vec::new(),
            next_token: 0,
            pending_end: None,
            restarting: None,
            seq: 0,
            reconciling: false,
        }
    }

    /// A domain a new manager takes over (§11): it continues after `seq` from `state`, the
    /// last state the previous manager recorded; what happened since is then reported by
    /// [`Lifecycle::observe_reconciled`].
    pub fn resume_from(
        id: DomainId,
        policies: LifecyclePolicies,
        seq: u64,
        state: DomainState,
    ) -> Self {
        let mut lc = Lifecycle::new(id, policies);
        lc.seq = seq;
        lc.state = state;
        lc
    }

    /// As [`Lifecycle::resume_from`] goes on: the end the previous manager had decided and
    /// was carrying out when it stopped ([`Lifecycle::pending_end`], from the durable
    /// status), so the backend domain's disappearance is that end.
    pub fn with_pending_end(mut self, end: Option<ShutoffReason>) -> Self {
        if self.state.is_active() {
            self.pending_end = end;
        }
        self
    }

    /// The shutoff reason already decided for the end being carried out (a guest poweroff
    /// that completes a shutdown or meets `on_poweroff = destroy`, a crash under
    /// `on_crash = destroy`), reported when the backend domain is gone. Persistent drivers
    /// store it before they tear the backend domain down (§11.4).
    pub fn pending_end(&self) -> Option<ShutoffReason> {
        self.pending_end
    }

    /// As [`Lifecycle::observe`], for a fact found on reattach: its events are marked
    /// `reconciled`.
    pub fn observe_reconciled(&mut self, obs: Observation, at: SystemTime) -> Outcome {
        self.reconciling = true;
        let outcome = self.observe(obs, at);
        self.reconciling = false;
        outcome
    }

    /// The domain's identity.
    pub fn id(&self) -> &DomainId {
        &self.id
    }

    /// The current state.
    pub fn state(&self) -> DomainState {
        self.state
    }

    /// The control-channel state.
    pub fn control(&self) -> &ControlState {
        &self.control
    }

    /// Set the control-channel state (a job started/ended, the monitor broke).
    pub fn set_control(&mut self, control: ControlState) {
        self.control = control;
    }

    /// The lifecycle policies.
    pub fn policies(&self) -> LifecyclePolicies {
        self.policies
    }

    /// Replace the policies (takes effect for the next observation).
    pub fn set_policies(&mut self, policies: LifecyclePolicies) {
        self.policies = policies;
    }

    /// The intent in force, if any: `Destroy` if stashed (it preempts every other
    /// operation, §6.0), else the newest.
    pub fn intent(&self) -> Option<Intent> {
        if self.intents.iter().any(|(_, i)| *i == Intent::Destroy) {
            return Some(Intent::Destroy);
        }
        self.intents.last().map(|(_, i)| *i)
    }

    /// True if `intent` is stashed by any operation (in force or not).
    pub fn has_intent(&self, intent: Intent) -> bool {
        self.intents.iter().any(|(_, i)| *i == intent)
    }

    /// Stash an intent before sending the backend command; other operations' intents stay.
    pub fn push_intent(&mut self, intent: Intent) -> IntentToken {
        self.next_token += 1;
        self.intents.push((self.next_token, intent));
        IntentToken(self.next_token)
    }

    /// Remove the intent `token` stands for (the operation that stashed it is ending).
    pub fn pop_intent(&mut self, token: IntentToken) {
        self.intents.retain(|(t, _)| *t != token.0);
    }

    /// True while a policy restart is carried out.
    pub fn is_restarting(&self) -> bool {
        self.restarting.is_some()
    }

    /// The last sequence number used (0 before the first event).
    pub fn last_seq(&self) -> u64 {
        self.seq
    }

    /// Produce a `Defined` event (the driver learned the config).
    pub fn defined(&mut self, at: SystemTime) -> DomainEvent {
        self.event(EventKind::Defined, at)
    }

    /// Produce an `Undefined` event (the driver forgot the domain).
    pub fn undefined(&mut self, at: SystemTime) -> DomainEvent {
        self.event(EventKind::Undefined, at)
    }

    /// Produce a device event (`DeviceAdded`, `DeviceRemoved`, `DeviceRemovalFailed`,
    /// §14): devices do not change the state, only the event `seq`.
    pub fn device_event(&mut self, kind: EventKind, at: SystemTime) -> DomainEvent {
        self.event(kind, at)
    }

    /// Produce an `AgentConnected` (`connected`) or `AgentDisconnected` event: the guest
    /// agent opened or left its channel (§13.4). Not a state change.
    pub fn agent_event(&mut self, connected: bool, at: SystemTime) -> DomainEvent {
        let kind = if connected {
            EventKind::AgentConnected
        } else {
            EventKind::AgentDisconnected
        };
        self.event(kind, at)
    }

    /// A guest end reported while one is already decided (`pending_end`): live, a repeated
    /// report (nothing to do). On reattach it is the backend domain still in the shut-down
    /// state the previous manager was ending when it died (§11.4): carry that end out (no
    /// new event; the `Gone` that follows reports `pending_end`).
    fn end_already_decided(&self) -> Option<PolicyAction> {
        self.reconciling.then_some(PolicyAction::Destroy)
    }

    fn event(&mut self, kind: EventKind, at: SystemTime) -> DomainEvent {
        self.seq += 1;
        DomainEvent {
            domain: self.id.clone(),
            seq: self.seq,
            timestamp_us: unix_micros(at),
            kind,
            reconciled: self.reconciling,
        }
    }

    /// Apply one observation. See the module docs and `docs/semantics.md` §4.
    pub fn observe(&mut self, obs: Observation, at: SystemTime) -> Outcome {
        let mut kinds = Vec::new();
        let action = self.apply(obs, &mut kinds);
        let events = kinds.into_iter().map(|k| self.event(k, at)).collect();
        Outcome { events, action }
    }

    fn apply(&mut self, obs: Observation, ev: &mut Vec<EventKind>) -> Option<PolicyAction> {
        use DomainState as S;
        use Observation as O;

        // While a policy restart runs, the backend's stop/reset/resume/death noise belongs to
        // the restart: swallow everything but its completion (and a real crash of the new
        // instance is reported after RestartDone, by the backend's next events).
        if let Some(reason) = self.restarting {
            match obs {
                O::RestartDone { ok: true } => {
                    self.restarting = None;
                    self.pending_end = None;
                    self.state = S::Running(reason);
                }
                O::RestartDone { ok: false } => {
                    self.restarting = None;
                    self.pending_end = None;
                    // A destroy that preempted the restart explains why it did not finish.
                    let reason = if self.intent() == Some(Intent::Destroy) {
                        ShutoffReason::Destroyed
                    } else {
                        ShutoffReason::Failed
                    };
                    self.state = S::Shutoff(reason);
                    ev.push(EventKind::Stopped(stopped_detail(reason)));
                }
                O::Gone { .. } if self.intent() == Some(Intent::Destroy) => {
                    // A destroy preempts a policy restart (§6.0): the domain ends destroyed,
                    // and the restart's completion that may follow is stale.
                    self.restarting = None;
                    self.pending_end = None;
                    self.state = S::Shutoff(ShutoffReason::Destroyed);
                    ev.push(EventKind::Stopped(StoppedDetail::Destroyed));
                }
                _ => {}
            }
            return None;
        }

        match obs {
            O::Created { how, paused } => {
                if self.state.is_active() {
                    return None; // already known to exist: a repeated report
                }
                self.pending_end = None;
                let (started, running) = match how {
                    Creation::Boot => (StartedDetail::Booted, RunningReason::Booted),
                    Creation::Restore => (StartedDetail::Restored, RunningReason::Restored),
                };
                ev.push(EventKind::Started(started));
                if paused {
                    ev.push(EventKind::Suspended(SuspendedDetail::Paused));
                    self.state = S::Paused(PausedReason::User);
                } else {
                    self.state = S::Running(running);
                }
                None
            }
            O::CreateFailed => {
                // Every failed start or restore is reported (libvirt: STOPPED_FAILED), so a
                // subscriber sees why the state became shutoff(failed).
                if !self.state.is_active() {
                    self.state = S::Shutoff(ShutoffReason::Failed);
                    ev.push(EventKind::Stopped(StoppedDetail::Failed));
                }
                None
            }
            O::CpusStopped { cause } => {
                // A shutdown request the guest has not acted on leaves the domain operable
                // (§6.3): a pause or save of it stops the vCPUs like from running.
                let pending_request = self.state == S::ShuttingDown(ShuttingDownReason::User)
                    && self.pending_end.is_none()
                    && matches!(self.intent(), Some(Intent::Pause | Intent::Save));
                if !self.state.is_running() && !pending_request {
                    // Paused already (idempotent), shutting down (QEMU's STOP after SHUTDOWN
                    // with -no-shutdown), crashed (panic=pause), suspended, or gone.
                    return None;
                }
                let (reason, detail) = match (self.intent(), cause) {
                    (Some(Intent::Save), _) => (PausedReason::Save, SuspendedDetail::Saving),
                    (_, StopCause::IoError) => (PausedReason::IoError, SuspendedDetail::IoError),
                    (_, StopCause::Watchdog) => (PausedReason::Watchdog, SuspendedDetail::Watchdog),
                    (Some(Intent::Pause), _) => (PausedReason::User, SuspendedDetail::Paused),
                    // A host reboot/reset may stop the vCPUs transiently: not a pause.
                    (Some(Intent::Reboot | Intent::Reset), _) => return None,
                    _ => (PausedReason::Unknown, SuspendedDetail::Paused),
                };
                self.state = S::Paused(reason);
                ev.push(EventKind::Suspended(detail));
                None
            }
            O::CpusResumed => {
                let reason = match self.state {
                    S::Paused(PausedReason::ShuttingDown) => return None, // preserved: no
                    S::Paused(_) if self.intent() == Some(Intent::Save) => {
                        ev.push(EventKind::Resumed(ResumedDetail::SaveCanceled));
                        RunningReason::SaveCanceled
                    }
                    S::Paused(_) => {
                        ev.push(EventKind::Resumed(ResumedDetail::Unpaused));
                        RunningReason::Unpaused
                    }
                    S::Crashed(_) if self.pending_end.is_none() => {
                        ev.push(EventKind::Resumed(ResumedDetail::Unpaused));
                        RunningReason::FromCrashed
                    }
                    _ => return None, // running already, shutting down, suspended, gone
                };
                self.state = S::Running(reason);
                None
            }
            O::ShutdownRequestDelivered => {
                if self.intent() == Some(Intent::Reboot) {
                    return None; // the power button of a host reboot: a reboot, not a shutdown
                }
                match self.state {
                    S::Running(_) | S::Paused(_) | S::Blocked(_) | S::PmSuspended(_) => {
                        self.state = S::ShuttingDown(ShuttingDownReason::User);
                        ev.push(EventKind::ShutdownRequested(ShutdownRequester::Host));
                    }
                    _ => {} // repeated request, or nothing to shut down
                }
                None
            }
            O::GuestPoweredOff => {
                if !self.state.is_active() {
                    return None; // gone
                }
                if self.pending_end.is_some() {
                    return self.end_already_decided(); // already ending
                }
                if matches!(
                    self.state,
                    S::Crashed(_) | S::Paused(PausedReason::ShuttingDown)
                ) {
                    return None; // preserved: the guest is not running to power off
                }
                if self.intent() == Some(Intent::Reboot) {
                    // Host reboot done as power-off + restart (QEMU fake reboot): one reboot.
                    ev.push(EventKind::Rebooted);
                    self.restarting = Some(RunningReason::Booted);
                    return Some(PolicyAction::Restart);
                }
                let host_requested = self.intent() == Some(Intent::Shutdown)
                    || self.state == S::ShuttingDown(ShuttingDownReason::User);
                if host_requested {
                    // An explicit shutdown request is completed, whatever on_poweroff says.
                    // The guest may power off before its acknowledgement was observed (an
                    // agent request is acknowledged only when the agent call returns): the
                    // poweroff implies it, so enter shutting_down(user) now, or the backend's
                    // stop that follows (QEMU -no-shutdown) would look like a pause.
                    if self.state != S::ShuttingDown(ShuttingDownReason::User) {
                        self.state = S::ShuttingDown(ShuttingDownReason::User);
                        ev.push(EventKind::ShutdownRequested(ShutdownRequester::Host));
                    }
                    self.pending_end = Some(ShutoffReason::Shutdown);
                    return Some(PolicyAction::Destroy);
                }
                ev.push(EventKind::ShutdownRequested(ShutdownRequester::Guest));
                match self.policies.on_poweroff {
                    LifecycleAction::Destroy => {
                        self.state = S::ShuttingDown(ShuttingDownReason::Guest);
                        self.pending_end = Some(ShutoffReason::Shutdown);
                        Some(PolicyAction::Destroy)
                    }
                    LifecycleAction::Restart => {
                        ev.push(EventKind::Stopped(StoppedDetail::Shutdown));
                        ev.push(EventKind::Started(StartedDetail::Booted));
                        self.restarting = Some(RunningReason::Booted);
                        Some(PolicyAction::Restart)
                    }
                    LifecycleAction::Preserve => {
                        self.state = S::Paused(PausedReason::ShuttingDown);
                        ev.push(EventKind::Suspended(SuspendedDetail::Paused));
                        Some(PolicyAction::Preserve)
                    }
                }
            }
            O::Rebooted {
                by,
                platform_restarted,
            } => {
                if !self.state.is_active() {
                    return None;
                }
                if self.pending_end.is_some() {
                    return self.end_already_decided();
                }
                if matches!(
                    self.state,
                    S::Crashed(_) | S::Paused(PausedReason::ShuttingDown)
                ) {
                    return None;
                }
                let host_requested = matches!(self.intent(), Some(Intent::Reboot | Intent::Reset))
                    || by == ShutdownRequester::Host;
                let policy = if host_requested {
                    LifecycleAction::Restart // an explicit reboot request is a reboot
                } else {
                    self.policies.on_reboot
                };
                match policy {
                    LifecycleAction::Restart => {
                        ev.push(EventKind::Rebooted);
                        if self.state == S::ShuttingDown(ShuttingDownReason::User) {
                            // a reboot overtook a shutdown request: the domain runs on
                            self.state = S::Running(RunningReason::Booted);
                        }
                        if platform_restarted {
                            None
                        } else {
                            let reason = match self.state {
                                S::Running(r) => r,
                                _ => RunningReason::Booted,
                            };
                            self.restarting = Some(reason);
                            Some(PolicyAction::Restart)
                        }
                    }
                    LifecycleAction::Destroy => {
                        ev.push(EventKind::ShutdownRequested(ShutdownRequester::Guest));
                        self.state = S::ShuttingDown(ShuttingDownReason::Guest);
                        self.pending_end = Some(ShutoffReason::Shutdown);
                        Some(PolicyAction::Destroy)
                    }
                    LifecycleAction::Preserve => {
                        self.state = S::Paused(PausedReason::ShuttingDown);
                        ev.push(EventKind::Suspended(SuspendedDetail::Paused));
                        Some(PolicyAction::Preserve)
                    }
                }
            }
            O::Crashed { detail } => {
                if !self.state.is_active() {
                    return None;
                }
                if self.pending_end.is_some() {
                    return self.end_already_decided(); // already ending
                }
                if matches!(self.state, S::Crashed(_)) {
                    return None; // repeated
                }
                let reason = match detail {
                    CrashedDetail::Panicked => CrashedReason::Panicked,
                    CrashedDetail::Watchdog => CrashedReason::Watchdog,
                };
                ev.push(EventKind::Crashed(detail));
                match self.policies.on_crash {
                    LifecycleAction::Destroy => {
                        self.state = S::Crashed(reason);
                        self.pending_end = Some(ShutoffReason::Crashed);
                        Some(PolicyAction::Destroy)
                    }
                    LifecycleAction::Restart => {
                        ev.push(EventKind::Stopped(StoppedDetail::Crashed));
                        ev.push(EventKind::Started(StartedDetail::Booted));
                        self.restarting = Some(RunningReason::Booted);
                        Some(PolicyAction::Restart)
                    }
                    LifecycleAction::Preserve => {
                        self.state = S::Crashed(reason);
                        Some(PolicyAction::Preserve)
                    }
                }
            }
            O::PmSuspended { detail } => {
                if !self.state.is_running() {
                    return None;
                }
                let reason = match detail {
                    PmSuspendedDetail::Memory => PmSuspendedReason::Memory,
                    PmSuspendedDetail::Disk => PmSuspendedReason::Disk,
                };
                self.state = S::PmSuspended(reason);
                ev.push(EventKind::PmSuspended(detail));
                None
            }
            O::PmWokeUp => {
                if !matches!(self.state, S::PmSuspended(_)) {
                    return None;
                }
                self.state = S::Running(RunningReason::Wakeup);
                ev.push(EventKind::Started(StartedDetail::Wakeup));
                None
            }
            O::RestartDone { .. } => None, // no restart in progress: stale
            O::Gone { unexplained } => {
                if !self.state.is_active() {
                    return None; // already shut off: the process exit after a quit, say
                }
                let reason = match (self.intent(), self.pending_end) {
                    // Only a committed save explains an end as saved: a domain that dies
                    // during the save itself saved nothing (§4.12).
                    (Some(Intent::SaveCommitted), _) => ShutoffReason::Saved,
                    (_, Some(end)) => end,
                    (Some(Intent::Destroy), None) => ShutoffReason::Destroyed,
                    (Some(Intent::Shutdown), None) if matches!(self.state, S::ShuttingDown(_)) => {
                        ShutoffReason::Shutdown
                    }
                    _ => unexplained,
                };
                self.pending_end = None;
                self.state = S::Shutoff(reason);
                ev.push(EventKind::Stopped(stopped_detail(reason)));
                None
            }
        }
    }
}

/// The `Stopped` detail matching a shutoff reason.
pub fn stopped_detail(reason: ShutoffReason) -> StoppedDetail {
    match reason {
        ShutoffReason::Shutdown => StoppedDetail::Shutdown,
        ShutoffReason::Destroyed => StoppedDetail::Destroyed,
        ShutoffReason::Crashed => StoppedDetail::Crashed,
        ShutoffReason::Saved => StoppedDetail::Saved,
        ShutoffReason::Failed | ShutoffReason::Unknown => StoppedDetail::Failed,
    }
}
