//! The guest agent on Xen (`docs/semantics.md` §13): the same [`GuestAgent`] client as on
//! QEMU, over the dom0 end of the PV channel `org.qemu.guest_agent.0`.
//!
//! libxl backs a PV channel with QEMU as the device model in dom0
//! (`/usr/libexec/xen-qemu-system-i386 -machine xenpv`): its console backend serves the
//! channel's ring, its chardev `socket,server=on,wait=off` listens at
//! [`crate::config::channel_socket_path`], in the domain's private runtime directory. The
//! socket outlives the manager (the device model belongs to the Xen domain), so a reattached
//! domain's agent works; a new run (restart, reboot, restore) has a new device model on the
//! same path, to which the client reconnects by itself.
//!
//! **Presence.** Unlike virtio-serial (QEMU's `VSERPORT_CHANGE`), nothing on Xen says that a
//! program in the guest opened or closed the channel's console: the ring and its event
//! channel stay up whether qemu-ga runs or not. So the driver asks: while the domain runs,
//! [`probe_loop`] sends a `guest-ping` every [`PROBE_INTERVAL`] on the shared client (never
//! while a call holds it) and feeds the outcome to [`Presence`], the pure rule that turns
//! answers and silences into `agent_connected` / `agent_disconnected` (§13.4). The end of a
//! run is fed as well, before the event that reports it, so `agent_disconnected` comes first.

use crate::domain::{DomainInner, BACKEND};
use domkit_core::agent::{AgentError, Connector, GuestAgent, GuestAgentOptions, Probe};
use domkit_core::{DomainState, Error, Observation, Operation};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// Between two probes of a running domain's agent.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_millis(700);
/// How long one probe waits for the agent's answer (its resync included).
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Silent probes in a row after which a connected agent counts as gone: one slow answer of a
/// loaded guest is not a disconnect.
pub(crate) const MISSES_TO_DISCONNECT: u32 = 2;

/// What [`Presence`] is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seen {
    /// A probe of run `epoch` was answered.
    Answered {
        /// [`Presence::epoch`] when the probe was sent.
        epoch: u64,
    },
    /// A probe of run `epoch` got no answer.
    Silent {
        /// [`Presence::epoch`] when the probe was sent.
        epoch: u64,
    },
    /// The run ended (the guest powered off, crashed or rebooted, or the Xen domain is
    /// gone): whatever agent there was is gone with it.
    RunEnded,
}

/// Whether the agent is there, from what the probes saw (pure).
///
/// Connected after an answer; disconnected after [`MISSES_TO_DISCONNECT`] silences in a row
/// or the end of the run. A probe sent before the run ended ([`Seen::RunEnded`] moves the
/// epoch on) says nothing about the next run and is ignored.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Presence {
    connected: bool,
    misses: u32,
    epoch: u64,
}

impl Presence {
    /// The run the next probe belongs to.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether the agent counts as connected.
    #[cfg(test)]
    pub(crate) fn connected(&self) -> bool {
        self.connected
    }

    /// Feed what was seen; `Some(connected)` when an event is due.
    pub(crate) fn feed(&mut self, seen: Seen) -> Option<bool> {
        match seen {
            Seen::RunEnded => {
                self.epoch += 1;
                self.misses = 0;
                self.change(false)
            }
            Seen::Answered { epoch } if epoch == self.epoch => {
                self.misses = 0;
                self.change(true)
            }
            Seen::Silent { epoch } if epoch == self.epoch => {
                self.misses = self.misses.saturating_add(1);
                if self.misses >= MISSES_TO_DISCONNECT {
                    self.change(false)
                } else {
                    None
                }
            }
            Seen::Answered { .. } | Seen::Silent { .. } => None,
        }
    }

    fn change(&mut self, connected: bool) -> Option<bool> {
        (self.connected != connected).then(|| {
            self.connected = connected;
            connected
        })
    }
}

/// Whether `obs` ends the guest's run (and with it whatever agent ran in it): fed to
/// [`Presence`] before the observation, so `agent_disconnected` precedes the event.
pub(crate) fn ends_run(obs: &Observation) -> bool {
    matches!(
        obs,
        Observation::Gone { .. }
            | Observation::GuestPoweredOff
            | Observation::Crashed { .. }
            | Observation::Rebooted { .. }
    )
}

/// Whether the agent of a domain in `state` can answer a probe: its vCPUs run.
pub(crate) fn probe_worthy(state: DomainState) -> bool {
    matches!(state, DomainState::Running(_) | DomainState::Blocked(_))
}

/// The agent side of a domain with an agent channel: the one client every caller shares,
/// and what the probes concluded.
#[derive(Debug)]
pub(crate) struct AgentLink {
    pub(crate) client: Arc<GuestAgent>,
    pub(crate) presence: Mutex<Presence>,
}

impl AgentLink {
    /// A client of the channel socket at `socket`: it connects on first use (no I/O now)
    /// and again after every loss (a new run has a new device model).
    pub(crate) fn new(socket: PathBuf) -> Self {
        let options = GuestAgentOptions::default();
        AgentLink {
            client: Arc::new(GuestAgent::with_connector(
                None,
                Connector::unix(socket),
                options,
            )),
            presence: Mutex::new(Presence::default()),
        }
    }
}

/// Probes the agent of the domain while it runs, for as long as the domain exists and its
/// driver has not detached (then it closes the connection: the channel is the next
/// manager's).
pub(crate) async fn probe_loop(domain: Weak<DomainInner>) {
    loop {
        tokio::time::sleep(PROBE_INTERVAL).await;
        let Some(d) = domain.upgrade() else { return };
        let Some(link) = d.agent_link() else { return };
        if d.is_detached() {
            link.client.disconnect().await;
            return;
        }
        if !probe_worthy(d.cell.state()) {
            continue;
        }
        let epoch = crate::domain::lock(&link.presence).epoch();
        let seq = d.cell.with(|l| l.last_seq());
        let probe = link.client.probe(PROBE_TIMEOUT).await;
        let seen = match probe {
            Probe::Busy => continue,
            Probe::Answered => Seen::Answered { epoch },
            // Something happened to the domain meanwhile (paused, rebooting...): a silence
            // then says nothing about the agent.
            Probe::Silent(why) => {
                let quiet = d.cell.with(|l| l.last_seq()) == seq;
                if !quiet || !probe_worthy(d.cell.state()) {
                    continue;
                }
                tracing::debug!(domain = %d.name(), %why, "guest agent probe unanswered");
                Seen::Silent { epoch }
            }
        };
        d.agent_seen(seen);
    }
}

/// A guest agent error as domkit's error of `operation`.
pub(crate) fn agent_to_core(operation: Operation, err: AgentError) -> Error {
    let backend = |message: String| Error::Backend {
        backend: BACKEND.into(),
        message,
    };
    match err {
        AgentError::Timeout { command, after } => Error::Timeout {
            operation,
            after,
            hint: format!(
                "the guest agent did not answer `{command}`: is qemu-ga running in the guest \
                 on the PV channel org.qemu.guest_agent.0?"
            ),
        },
        AgentError::Unsupported { command, reason } => Error::Unsupported {
            operation,
            backend: BACKEND.into(),
            reason: format!("the guest agent cannot run `{command}`: {reason}"),
        },
        AgentError::CommandFailed { class, desc } => backend(format!(
            "{operation}: the guest agent refused: {class}: {desc}"
        )),
        AgentError::Protocol { message, excerpt } => Error::Protocol {
            message: format!("guest agent: {message} (bytes: {excerpt})"),
        },
        other => backend(format!(
            "{operation}: the guest agent is unreachable: {other} (is the guest up and \
             qemu-ga running on its PV channel?)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use domkit_core::{PausedReason, RunningReason};

    #[test]
    fn an_answer_connects_once() {
        let mut p = Presence::default();
        assert_eq!(p.feed(Seen::Answered { epoch: 0 }), Some(true));
        assert_eq!(p.feed(Seen::Answered { epoch: 0 }), None);
        assert!(p.connected());
    }

    #[test]
    fn one_silence_is_not_a_disconnect_two_are() {
        let mut p = Presence::default();
        p.feed(Seen::Answered { epoch: 0 });
        assert_eq!(p.feed(Seen::Silent { epoch: 0 }), None);
        assert_eq!(p.feed(Seen::Answered { epoch: 0 }), None, "still connected");
        assert_eq!(p.feed(Seen::Silent { epoch: 0 }), None);
        assert_eq!(p.feed(Seen::Silent { epoch: 0 }), Some(false));
        assert_eq!(p.feed(Seen::Silent { epoch: 0 }), None);
        assert_eq!(p.feed(Seen::Answered { epoch: 0 }), Some(true));
    }

    #[test]
    fn silence_of_an_agent_never_seen_is_no_event() {
        let mut p = Presence::default();
        for _ in 0..5 {
            assert_eq!(p.feed(Seen::Silent { epoch: 0 }), None);
        }
        assert!(!p.connected());
    }

    #[test]
    fn the_end_of_a_run_disconnects_at_once_and_old_probes_are_ignored() {
        let mut p = Presence::default();
        p.feed(Seen::Answered { epoch: 0 });
        assert_eq!(p.feed(Seen::RunEnded), Some(false));
        assert_eq!(p.epoch(), 1);
        // A probe of the old run answered late: not the new run's agent.
        assert_eq!(p.feed(Seen::Answered { epoch: 0 }), None);
        assert!(!p.connected());
        assert_eq!(p.feed(Seen::Answered { epoch: 1 }), Some(true));
        // An end while disconnected: no event.
        p.feed(Seen::RunEnded);
        assert_eq!(p.feed(Seen::RunEnded), None);
    }

    #[test]
    fn misses_do_not_carry_over_a_run_end() {
        let mut p = Presence::default();
        p.feed(Seen::Answered { epoch: 0 });
        p.feed(Seen::Silent { epoch: 0 });
        p.feed(Seen::RunEnded);
        p.feed(Seen::Answered { epoch: 1 });
        assert_eq!(p.feed(Seen::Silent { epoch: 1 }), None);
    }

    #[test]
    fn ends_of_runs_are_the_guest_s_ends_and_the_domain_s() {
        assert!(ends_run(&Observation::GuestPoweredOff));
        assert!(ends_run(&Observation::Gone {
            unexplained: domkit_core::ShutoffReason::Destroyed
        }));
        assert!(!ends_run(&Observation::CpusResumed));
        assert!(!ends_run(&Observation::ShutdownRequestDelivered));
    }

    #[test]
    fn only_running_vcpus_are_probed() {
        assert!(probe_worthy(DomainState::Running(RunningReason::Booted)));
        assert!(!probe_worthy(DomainState::Paused(PausedReason::User)));
        assert!(!probe_worthy(DomainState::Shutoff(
            domkit_core::ShutoffReason::Destroyed
        )));
    }
}
