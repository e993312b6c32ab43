//! The supervisor task of one QEMU process (I/O).
//!
//! It is the only reader of the process's QMP events and the only one to wait on the child:
//! events go through the pure [`QmpTranslator`] into the domain's [`LifecycleCell`], the
//! [`PolicyAction`]s that come back are carried out here, and when the monitor reaches EOF or
//! the process exits it reaps the child, removes the sockets and reports `Gone`, within a few
//! milliseconds of the exit (the EOF of a killed QEMU and its exit are simultaneous).
//!
//! A monitor that closes while the process keeps running (QEMU closes it only right before
//! exiting, so this means the monitor broke: garbage on the socket, say) is not a crash: after
//! a grace period the control state becomes `Broken`, and the domain can still be destroyed
//! (by signal).

use std::sync::Arc;
use std::time::Duration;

use crate::process::Proc;
use domkit_core::{ControlState, LifecycleCell, Observation, PolicyAction};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::qmp::{EventRecvError, QmpClient, QmpEvent, QmpEventStream};
use crate::translate::QmpTranslator;

/// Requests to a supervisor.
#[derive(Debug)]
pub enum SupervisorRequest {
    /// SIGKILL the process now.
    Kill,
    /// Stop supervising and leave the process running (a persistent driver closing: the
    /// next manager reattaches, §11).
    Detach,
    /// Re-read the run state and reconcile it as found on reattach (§11.3); answered once
    /// the reconciliation (and any policy action it started) is under way.
    ReconcileOnReattach(tokio::sync::oneshot::Sender<()>),
}

/// What a supervisor needs from its domain.
pub trait SupervisedDomain: Send + Sync + 'static {
    /// The domain's lifecycle.
    fn cell(&self) -> &LifecycleCell;

    /// The QEMU device id of the guest agent's virtserialport, if the domain has one: its
    /// `VSERPORT_CHANGE` events become `agent_connected` / `agent_disconnected` (§13.4).
    fn agent_port_id(&self) -> Option<String> {
        None
    }
    /// Called once the process is reaped, before `Gone` is reported: forget the instance and
    /// remove its sockets (and the runtime directory if the domain was forgotten).
    fn process_ended(&self, pid: u32);
}

/// Supervisor settings.
#[derive(Debug, Clone, Copy)]
pub struct SupervisorTimeouts {
    /// `quit` to SIGKILL, for a policy destroy.
    pub destroy: Duration,
    /// Monitor closed with the process alive for this long: control broken.
    pub monitor_grace: Duration,
}

/// The handles the rest of the driver keeps to a supervised process.
#[derive(Debug, Clone)]
pub struct SupervisorHandle {
    /// Send [`SupervisorRequest`]s.
    pub requests: mpsc::UnboundedSender<SupervisorRequest>,
    /// Becomes `true` once the process has been reaped and `Gone` reported.
    pub ended: watch::Receiver<bool>,
}

/// Start supervising `child`, whose monitor is `qmp` with event stream `events`.
pub fn spawn<D: SupervisedDomain>(
    domain: Arc<D>,
    child: Proc,
    pid: u32,
    qmp: QmpClient,
    events: QmpEventStream,
    timeouts: SupervisorTimeouts,
) -> SupervisorHandle {
    let (requests_tx, requests_rx) = mpsc::unbounded_channel();
    let (ended_tx, ended_rx) = watch::channel(false);
    let supervisor = Supervisor {
        domain,
        child,
        pid,
        qmp,
        events,
        translator: QmpTranslator::new(),
        timeouts,
        kill_at: None,
        agent_open: false,
    };
    tokio::spawn(supervisor.run(requests_rx, ended_tx));
    SupervisorHandle {
        requests: requests_tx,
        ended: ended_rx,
    }
}

struct Supervisor<D> {
    /// The guest agent's port is open in the guest (its last `VSERPORT_CHANGE`, §13.4).
    agent_open: bool,
    domain: Arc<D>,
    child: Proc,
    pid: u32,
    qmp: QmpClient,
    events: QmpEventStream,
    translator: QmpTranslator,
    timeouts: SupervisorTimeouts,
    /// When to SIGKILL a process we asked to quit.
    kill_at: Option<Instant>,
}

impl<D: SupervisedDomain> Supervisor<D> {
    async fn run(
        mut self,
        mut requests: mpsc::UnboundedReceiver<SupervisorRequest>,
        ended: watch::Sender<bool>,
    ) {
        let mut monitor_open = true;
        let mut broken_at: Option<Instant> = None;
        let far = Duration::from_secs(86400 * 365);
        let status = loop {
            let kill_at = self.kill_at.unwrap_or_else(|| Instant::now() + far);
            let broken_deadline = broken_at.unwrap_or_else(|| Instant::now() + far);
            tokio::select! {
                // Events first: whatever QEMU said before it went away is handled before the end.
                biased;
                event = self.events.recv(), if monitor_open => match event {
                    Ok(event) => self.handle_event(event).await,
                    Err(EventRecvError::Lagged(n)) => {
                        tracing::warn!(pid = self.pid, lost = n, "supervisor lost QMP events: re-reading the run state");
                        self.reconcile(false).await;
                    }
                    Err(EventRecvError::Closed) => {
                        monitor_open = false;
                        broken_at = Some(Instant::now() + self.timeouts.monitor_grace);
                    }
                },
                status = self.child.wait() => break status,
                // The domain holds the sender for as long as this task runs (it owns the
                // instance that owns the handle), so the channel cannot close under us.
                Some(request) = requests.recv() => match request {
                    SupervisorRequest::Kill => self.kill(),
                    SupervisorRequest::Detach => {
                        tracing::debug!(pid = self.pid, "detached: QEMU keeps running");
                        let _ = ended.send(true);
                        return;
                    }
                    SupervisorRequest::ReconcileOnReattach(done) => {
                        self.reconcile(true).await;
                        let _ = done.send(());
                    }
                },
                _ = tokio::time::sleep_until(kill_at), if self.kill_at.is_some() => {
                    tracing::warn!(pid = self.pid, "QEMU did not quit in time: SIGKILL");
                    self.kill();
                }
                _ = tokio::time::sleep_until(broken_deadline), if broken_at.is_some() => {
                    broken_at = None;
                    let end = self.qmp.connection_end();
                    let reason = match end {
                        Some(end) => format!(
                            "the QMP monitor connection ended ({end}) while QEMU (pid {}) \
                             still runs; destroy the domain to recover",
                            self.pid
                        ),
                        None => format!("the QMP monitor of pid {} stopped delivering", self.pid),
                    };
                    tracing::warn!(pid = self.pid, %reason, "control channel broken");
                    self.domain.cell().set_control(ControlState::Broken { reason });
                }
            }
        };
        // The process is gone. Events it sent just before are still being read: take them
        // (the stream reports Closed right after the last one; a killed QEMU sends none).
        if monitor_open {
            let drain = async {
                while let Ok(event) = self.events.recv().await {
                    self.handle_event(event).await;
                }
            };
            let _ = tokio::time::timeout(Duration::from_millis(50), drain).await;
        }
        match &status {
            Ok(Some(status)) => tracing::debug!(pid = self.pid, %status, "QEMU exited"),
            Ok(None) => tracing::debug!(pid = self.pid, "QEMU (adopted) exited"),
            Err(e) => tracing::warn!(pid = self.pid, error = %e, "waiting for QEMU failed"),
        }
        // Sockets and maybe the runtime directory are removed there: file-system work,
        // not on a runtime worker.
        let (domain, pid) = (self.domain.clone(), self.pid);
        if let Err(e) = tokio::task::spawn_blocking(move || domain.process_ended(pid)).await {
            tracing::warn!(pid = self.pid, error = %e, "cleaning up after QEMU failed");
        }
        // The agent goes with the process, before the domain's end (§13.4).
        self.agent_port_changed(false);
        let cell = self.domain.cell();
        if matches!(cell.control(), ControlState::Broken { .. }) {
            cell.set_control(ControlState::Ok);
        }
        if let Some(action) = cell.observe(self.translator.connection_ended()) {
            tracing::debug!(?action, "policy action after the end ignored: nothing runs");
        }
        let _ = ended.send(true);
    }

    fn kill(&mut self) {
        self.kill_at = None;
        if let Err(e) = self.child.start_kill() {
            tracing::debug!(pid = self.pid, error = %e, "SIGKILL failed (already exited?)");
        }
    }

    /// After lost events, or on reattach (`on_reattach`: the events say so), bring the core
    /// to QEMU's current run state (not during our own restart, whose transient states the
    /// translator is swallowing).
    async fn reconcile(&mut self, on_reattach: bool) {
        if self.translator.in_own_restart() {
            return;
        }
        match self.qmp.query_status().await {
            Ok(status) => {
                let current = self.domain.cell().state();
                if let Some(observation) = crate::translate::reconcile(&status.status, &current) {
                    let cell = self.domain.cell();
                    let action = if on_reattach {
                        cell.observe_reconciled(observation)
                    } else {
                        cell.observe(observation)
                    };
                    if let Some(action) = action {
                        self.carry_out(action).await;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(pid = self.pid, error = %e, "query-status after lost events failed")
            }
        }
    }

    /// A `VSERPORT_CHANGE` of the agent's port, or the end of the process (`open` false):
    /// one `agent_connected` / `agent_disconnected` per real change (§13.4).
    fn agent_port_changed(&mut self, open: bool) {
        if self.agent_open == open {
            return;
        }
        self.agent_open = open;
        self.domain.cell().emit(|lc, at| lc.agent_event(open, at));
    }

    async fn handle_event(&mut self, event: QmpEvent) {
        tracing::debug!(pid = self.pid, event = %event.name, data = %event.data, "QMP event");
        if event.name == "VSERPORT_CHANGE" {
            let id = event.data.get("id").and_then(|v| v.as_str());
            let open = event.data.get("open").and_then(|v| v.as_bool());
            if let (Some(id), Some(open)) = (id, open) {
                if self.domain.agent_port_id().as_deref() == Some(id) {
                    self.agent_port_changed(open);
                }
            }
            return;
        }
        let Some(observation) = self.translator.translate(&event) else {
            return;
        };
        if let Some(action) = self.domain.cell().observe(observation) {
            self.carry_out(action).await;
        }
    }

    async fn carry_out(&mut self, action: PolicyAction) {
        tracing::debug!(pid = self.pid, ?action, "carrying out policy action");
        match action {
            PolicyAction::Destroy => self.quit_then_kill(),
            PolicyAction::Restart => {
                // Fake reboot of the stopped (-no-shutdown / panic=pause) process.
                self.translator.begin_own_restart();
                let result = async {
                    self.qmp.system_reset().await?;
                    self.qmp.cont().await
                }
                .await;
                let ok = match result {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(pid = self.pid, error = %e, "policy restart failed");
                        self.translator.abort_own_restart();
                        false
                    }
                };
                self.domain.cell().observe(Observation::RestartDone { ok });
                if !ok {
                    // The domain is Shutoff(Failed) now: nothing may keep running.
                    self.quit_then_kill();
                }
            }
            PolicyAction::Preserve => {
                // After a poweroff (-no-shutdown) or panic (panic=pause) QEMU has stopped the
                // vCPUs already; after a reboot it has not. `stop` is idempotent.
                if let Err(e) = self.qmp.stop().await {
                    tracing::warn!(pid = self.pid, error = %e, "stopping a preserved guest failed");
                }
            }
        }
    }

    /// Ask QEMU to quit without blocking the event loop; SIGKILL if it is not gone in time.
    fn quit_then_kill(&mut self) {
        let qmp = self.qmp.clone();
        let pid = self.pid;
        tokio::spawn(async move {
            if let Err(e) = qmp.quit().await {
                tracing::debug!(pid, error = %e, "quit failed; SIGKILL follows");
            }
        });
        self.kill_at = Some(Instant::now() + self.timeouts.destroy);
    }
}
