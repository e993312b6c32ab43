//! What a new manager makes of a domain it takes over (pure; `docs/semantics.md` §11.3,
//! §11.4). The I/O half is `QemuDomain::reattach` in domain.rs; the run-state half (a QEMU
//! found running, paused, powered off, panicked, suspended) is [`crate::translate::reconcile`],
//! the same mapping that repairs lost events, applied with its events marked `reconciled`.

use std::path::PathBuf;

use domkit_core::{Observation, ShutoffReason};

/// A save the previous manager had in flight, and what is on disk now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveEvidence {
    /// The final name.
    pub target: PathBuf,
    /// The temporary file.
    pub temp: PathBuf,
    /// Whether it still exists.
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

/// What to do for a domain whose QEMU ended while no manager was attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GonePlan {
    /// The save was committed: its end is `shutoff(saved)` (stash `SaveCommitted`).
    pub committed: bool,
    /// A temporary save file to remove.
    pub remove_temp: Option<PathBuf>,
    /// The observation to apply, reconciled.
    pub observation: Observation,
}

/// The domain's QEMU is gone. Nobody explained the end (domkit always runs QEMU with
/// `-no-shutdown`, so QEMU never exits on its own): `crashed`, as for an out-of-band kill
/// seen live (§10), unless a committed save explains it.
pub fn plan_gone(save: Option<&SaveEvidence>) -> GonePlan {
    let committed = save.is_some_and(save_committed);
    GonePlan {
        committed,
        remove_temp: save
            .filter(|s| !committed && s.temp_exists)
            .map(|s| s.temp.clone()),
        observation: Observation::Gone {
            unexplained: ShutoffReason::Crashed,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use domkit_core::{
        DomainId, DomainState, EventKind, Intent, Lifecycle, LifecyclePolicies, PausedReason,
        RunningReason, StoppedDetail,
    };
    use std::time::SystemTime;

    fn evidence(committing: bool, temp_exists: bool) -> SaveEvidence {
        SaveEvidence {
            target: "/s/save.img".into(),
            temp: "/s/.save.img.tmp".into(),
            temp_exists,
            was_paused: false,
            committing,
        }
    }

    fn resumed(state: DomainState) -> Lifecycle {
        let id = DomainId {
            name: "r".into(),
            uuid: uuid::Uuid::nil(),
        };
        Lifecycle::resume_from(id, LifecyclePolicies::default(), 41, state)
    }

    #[test]
    fn committed_only_when_the_rename_began_and_the_temp_is_gone() {
        assert!(save_committed(&evidence(true, false)));
        assert!(
            !save_committed(&evidence(true, true)),
            "rename not done yet"
        );
        assert!(
            !save_committed(&evidence(false, false)),
            "never got to the rename"
        );
        assert!(!save_committed(&evidence(false, true)));
    }

    #[test]
    fn gone_while_away_is_crashed_with_the_next_seq_and_reconciled() {
        let mut l = resumed(DomainState::Running(RunningReason::Booted));
        let plan = plan_gone(None);
        assert_eq!(plan.remove_temp, None);
        let out = l.observe_reconciled(plan.observation, SystemTime::now());
        assert_eq!(l.state(), DomainState::Shutoff(ShutoffReason::Crashed));
        assert_eq!(out.events.len(), 1);
        assert_eq!(out.events[0].seq, 42, "seq continues after the stored one");
        assert!(out.events[0].reconciled);
        assert_eq!(
            out.events[0].kind,
            EventKind::Stopped(StoppedDetail::Crashed)
        );
    }

    /// Found by daemon/tests/restart.rs: a host shutdown whose guest powered off at once,
    /// the manager killed after it quit QEMU but before the exit was seen. The decided end
    /// is in the durable status (`pending_end`, written although that observation has no
    /// event of its own), and the next manager reports it, not `crashed`.
    #[test]
    fn gone_after_a_decided_shutdown_is_shutdown_not_crashed() {
        use domkit_core::{Observation, PolicyAction, ShuttingDownReason};
        let mut first = resumed(DomainState::Running(RunningReason::Booted));
        let _shutdown = first.push_intent(Intent::Shutdown);
        first.observe(Observation::ShutdownRequestDelivered, SystemTime::now());
        assert_eq!(
            first.state(),
            DomainState::ShuttingDown(ShuttingDownReason::User)
        );
        let out = first.observe(Observation::GuestPoweredOff, SystemTime::now());
        assert!(
            out.events.is_empty(),
            "the poweroff completes a shutdown already on record"
        );
        assert_eq!(out.action, Some(PolicyAction::Destroy));
        assert_eq!(first.pending_end(), Some(ShutoffReason::Shutdown));

        // What the store holds when the manager dies now, read by the next one.
        let id = first.id().clone();
        let mut next = Lifecycle::resume_from(
            id,
            LifecyclePolicies::default(),
            first.last_seq(),
            first.state(),
        )
        .with_pending_end(first.pending_end());
        let out = next.observe_reconciled(plan_gone(None).observation, SystemTime::now());
        assert_eq!(next.state(), DomainState::Shutoff(ShutoffReason::Shutdown));
        assert_eq!(out.events.len(), 1);
        assert_eq!(
            out.events[0].kind,
            EventKind::Stopped(StoppedDetail::Shutdown)
        );
        assert!(out.events[0].reconciled);
    }

    /// The same kill, but QEMU still there in run state `shutdown` (the quit not sent yet):
    /// the reconciled poweroff is the end already decided, so the new manager carries it out
    /// (destroy, no second `shutdown_requested`), and the exit is `shutoff(shutdown)`.
    #[test]
    fn a_decided_end_found_not_carried_out_is_carried_out() {
        use domkit_core::{Observation, PolicyAction, ShuttingDownReason};
        let id = DomainId {
            name: "r".into(),
            uuid: uuid::Uuid::nil(),
        };
        let mut next = Lifecycle::resume_from(
            id,
            LifecyclePolicies::default(),
            41,
            DomainState::ShuttingDown(ShuttingDownReason::User),
        )
        .with_pending_end(Some(ShutoffReason::Shutdown));
        let out = next.observe_reconciled(Observation::GuestPoweredOff, SystemTime::now());
        assert!(out.events.is_empty(), "{:?}", out.events);
        assert_eq!(out.action, Some(PolicyAction::Destroy));
        let live = next.observe(Observation::GuestPoweredOff, SystemTime::now());
        assert_eq!(live.action, None, "a live repeat is only a repeat");
        let out = next.observe(plan_gone(None).observation, SystemTime::now());
        assert_eq!(next.state(), DomainState::Shutoff(ShutoffReason::Shutdown));
        assert_eq!(
            out.events[0].kind,
            EventKind::Stopped(StoppedDetail::Shutdown)
        );
        assert_eq!(out.events[0].seq, 42);
    }

    #[test]
    fn gone_during_an_uncommitted_save_removes_the_temp_and_is_never_saved() {
        let mut l = resumed(DomainState::Paused(PausedReason::Save));
        let save = evidence(false, true);
        let plan = plan_gone(Some(&save));
        assert!(!plan.committed);
        assert_eq!(plan.remove_temp, Some(save.temp.clone()));
        let _save = l.push_intent(Intent::Save);
        l.observe_reconciled(plan.observation, SystemTime::now());
        assert_eq!(l.state(), DomainState::Shutoff(ShutoffReason::Crashed));
    }

    #[test]
    fn gone_after_a_committed_save_is_saved() {
        let mut l = resumed(DomainState::Paused(PausedReason::Save));
        let plan = plan_gone(Some(&evidence(true, false)));
        assert!(plan.committed);
        assert_eq!(plan.remove_temp, None);
        let _committed = l.push_intent(Intent::SaveCommitted);
        let out = l.observe_reconciled(plan.observation, SystemTime::now());
        assert_eq!(l.state(), DomainState::Shutoff(ShutoffReason::Saved));
        assert_eq!(out.events[0].kind, EventKind::Stopped(StoppedDetail::Saved));
    }
}
