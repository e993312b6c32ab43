//! [`QemuDomain`]: one domain of the QEMU driver, implementing domkit's [`Domain`] trait.
//!
//! Every operation follows the same pattern (after libvirt's qemu driver): check the uniform
//! state, stash an [`Intent`] in the lifecycle, send the QMP command, and wait for the state or
//! event the supervisor derives from QEMU's events. Operations never set a state themselves;
//! the only observations they make are the ones no QMP event carries (`Created` after start /
//! restore, `CreateFailed`, and the agent's acceptance of a shutdown request).
//!
//! Operations are serialised per domain, except `destroy`, which may interrupt a long wait
//! (a shutdown that waits for a guest, say). State queries never wait.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use domkit_core::{
    Creation, Domain, DomainConfig, DomainEvent, DomainId, DomainInfo, DomainState, Error,
    EventKind, EventStream, Intent, LifecycleCell, Observation, Operation, PausedReason,
    PmSuspendTarget, RestoreOptions, Result, ShutdownMode, ShutdownOptions, ShutdownOutcome,
    ShutdownWait, ShutoffReason,
};
use futures::StreamExt;
use serde_json::json;
use tokio::time::Instant;

use crate::agent::{AgentError, GuestAgent, GuestAgentOptions, ShutdownMode as AgentShutdownMode};
use crate::argv::{build_argv, DomainPaths, DEFAULT_BINARY};
use crate::driver::QemuDriverOptions;
use crate::error::{backend, qmp_to_core, timeout, BACKEND};
use crate::process::{self, LaunchOptions};
use crate::qmp::types::MigrationStatus;
use crate::qmp::{EventRecvError, QmpClient, QmpClientOptions, QmpError, QmpEventKind};
use crate::savefile::{self, SaveHeader, TempSaveFile, FORMAT_VERSION};
use crate::supervisor::{self, SupervisedDomain, SupervisorHandle, SupervisorRequest};

/// The fd name a save passes to QEMU with `getfd`.
const SAVE_FD: &str = "domkit-save";
/// The fd name a restore passes to QEMU with `getfd`.
const RESTORE_FD: &str = "domkit-restore";

/// A QEMU domain. Cheap to clone; clones are the same domain.
#[derive(Debug, Clone)]
pub struct QemuDomain {
    inner: Arc<DomainInner>,
}

#[derive(Debug)]
struct DomainInner {
    id: DomainId,
    config: DomainConfig,
    cell: LifecycleCell,
    paths: DomainPaths,
    options: Arc<QemuDriverOptions>,
    /// Serialises operations (not state reads, not destroy).
    ops: tokio::sync::Mutex<()>,
    /// The running QEMU process, if any.
    instance: Mutex<Option<Arc<Instance>>>,
    /// Undefined, or its driver dropped: remove the runtime directory when nothing runs.
    forgotten: AtomicBool,
}

/// One running QEMU process of a domain.
#[derive(Debug)]
struct Instance {
    pid: u32,
    qmp: QmpClient,
    qemu_version: String,
    supervisor: SupervisorHandle,
    agent_socket: Option<PathBuf>,
    /// The guest agent connection, made on first use.
    agent: tokio::sync::Mutex<Option<Arc<GuestAgent>>>,
}

impl Instance {
    fn has_ended(&self) -> bool {
        *self.supervisor.ended.borrow()
    }

    /// Wait until the supervisor reaped the process and reported `Gone`.
    async fn wait_ended(&self, within: Duration) -> bool {
        let mut ended = self.supervisor.ended.clone();
        let waited = tokio::time::timeout(within, ended.wait_for(|e| *e)).await;
        matches!(waited, Ok(Ok(_)))
    }

    fn kill(&self) {
        let _ = self.supervisor.requests.send(SupervisorRequest::Kill);
    }
}

impl DomainInner {
    fn instance_slot(&self) -> MutexGuard<'_, Option<Arc<Instance>>> {
        // Only ever replaced whole: a poisoned lock still holds a consistent value.
        self.instance.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl SupervisedDomain for DomainInner {
    fn cell(&self) -> &LifecycleCell {
        &self.cell
    }

    fn process_ended(&self, pid: u32) {
        let mut slot = self.instance_slot();
        if slot.as_ref().is_some_and(|i| i.pid == pid) {
            *slot = None;
        }
        process::remove_sockets(&self.paths);
        if self.forgotten.load(Ordering::SeqCst) && slot.is_none() {
            if let Err(e) = process::remove_runtime_dir(&self.paths) {
                tracing::warn!(dir = %self.paths.dir.display(), error = %e, "cannot remove runtime dir");
            }
        }
    }
}

impl QemuDomain {
    pub(crate) fn new(
        id: DomainId,
        config: DomainConfig,
        cell: LifecycleCell,
        dir: PathBuf,
        options: Arc<QemuDriverOptions>,
    ) -> Self {
        QemuDomain {
            inner: Arc::new(DomainInner {
                id,
                config,
                cell,
                paths: DomainPaths::new(dir),
                options,
                ops: tokio::sync::Mutex::new(()),
                instance: Mutex::new(None),
                forgotten: AtomicBool::new(false),
            }),
        }
    }

    pub(crate) fn cell(&self) -> &LifecycleCell {
        &self.inner.cell
    }

    /// The domain's config (with its uuid filled in).
    pub fn config(&self) -> &DomainConfig {
        &self.inner.config
    }

    /// The domain's private runtime directory (sockets, console and QEMU logs).
    pub fn runtime_dir(&self) -> &Path {
        &self.inner.paths.dir
    }

    /// The serial console log (console 0, unless the config gives it another path).
    pub fn serial_log(&self) -> PathBuf {
        match self
            .inner
            .config
            .consoles
            .first()
            .and_then(|c| c.log.clone())
        {
            Some(log) => log,
            None => self.inner.paths.console_log(0),
        }
    }

    /// QEMU's own stdout/stderr log.
    pub fn qemu_log(&self) -> &Path {
        &self.inner.paths.qemu_log
    }

    /// The pid of the running QEMU process.
    pub fn pid(&self) -> Option<u32> {
        self.instance().map(|i| i.pid)
    }

    /// The QMP client of the running QEMU process (for diagnostics and tests: commands sent
    /// through it bypass domkit's intents, and their effects are reported as out-of-band).
    pub fn qmp(&self) -> Option<QmpClient> {
        self.instance().map(|i| i.qmp.clone())
    }

    /// The guest agent socket of the running process, if the config has an agent channel.
    pub fn agent_socket(&self) -> Option<PathBuf> {
        self.instance().and_then(|i| i.agent_socket.clone())
    }

    /// The QEMU version of the running process (`7.2.22`).
    pub fn qemu_version(&self) -> Option<String> {
        self.instance().map(|i| i.qemu_version.clone())
    }

    /// A summary without awaiting anything.
    pub fn info_now(&self) -> DomainInfo {
        DomainInfo {
            id: self.inner.id.clone(),
            state: self.inner.cell.state(),
            control: self.inner.cell.control(),
            vcpus: self.inner.config.vcpus,
            memory_mib: self.inner.config.memory_mib,
            backend_handle: self.pid().map(|p| format!("pid {p}")),
        }
    }

    fn instance(&self) -> Option<Arc<Instance>> {
        self.inner.instance_slot().clone()
    }

    /// The running instance, or `InvalidState` for `operation`.
    fn running_instance(&self, operation: Operation) -> Result<Arc<Instance>> {
        self.instance().ok_or_else(|| Error::InvalidState {
            current: self.state(),
            operation,
        })
    }

    /// Forget the domain: kill its process if any, remove its runtime directory (now, or by
    /// the supervisor once the process is reaped).
    pub(crate) fn forget(&self) {
        self.inner.forgotten.store(true, Ordering::SeqCst);
        let slot = self.inner.instance_slot();
        match slot.as_ref() {
            Some(instance) => instance.kill(),
            None => {
                if let Err(e) = process::remove_runtime_dir(&self.inner.paths) {
                    tracing::warn!(dir = %self.inner.paths.dir.display(), error = %e, "cannot remove runtime dir");
                }
            }
        }
    }

    pub(crate) fn ensure_inactive(&self, operation: Operation) -> Result<()> {
        let current = self.state();
        if current.is_active() || self.instance().is_some() {
            return Err(Error::InvalidState { current, operation });
        }
        Ok(())
    }

    fn invalid(&self, operation: Operation) -> Error {
        Error::InvalidState {
            current: self.state(),
            operation,
        }
    }

    fn qmp_error(&self, operation: Operation, command: &str, err: QmpError) -> Error {
        self.interrupted(
            operation,
            qmp_to_core(operation, &self.inner.id.name, command, err),
        )
    }

    /// If the domain stopped while `operation` ran, say so (the raw error is secondary).
    fn interrupted(&self, operation: Operation, err: Error) -> Error {
        let state = self.state();
        if state.is_shutoff() && !matches!(err, Error::InvalidState { .. }) {
            backend(format!(
                "{operation} failed because the domain stopped meanwhile (now {state}): {err}"
            ))
        } else {
            err
        }
    }

    fn command_timeout(&self) -> Duration {
        self.inner.options.command_timeout
    }

    /// Wait until the vCPUs run or the domain is gone: the end of a `cont` or a
    /// `system_wakeup` (their RESUME / WAKEUP may arrive before or after the reply).
    async fn wait_running_or_gone(&self, operation: Operation) -> Result<()> {
        self.inner
            .cell
            .wait_for(operation, self.command_timeout(), |s| {
                s.is_running() || !s.is_active()
            })
            .await
            .map_err(|e| self.interrupted(operation, e))?;
        Ok(())
    }

    /// Launch QEMU for this domain (`incoming`: wait for a migration stream) and start its
    /// supervisor. The lifecycle is not told anything yet.
    async fn launch(&self, operation: Operation, incoming: bool) -> Result<Arc<Instance>> {
        let options = &self.inner.options;
        let config = &self.inner.config;
        let paths = process::create_runtime_dir(&options.runtime_root, &config.name)
            .map_err(|e| Error::io("creating the domain's runtime directory", e))?;
        let binary = config
            .qemu
            .binary
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_BINARY));
        let auto_kvm = config.qemu.accel == domkit_core::Accel::Auto
            && crate::accel::auto_uses_kvm(&options.auto_accel, &binary).await;
        let accel = crate::accel::resolve(config.qemu.accel, auto_kvm);
        let argv =
            build_argv(config, accel, &paths, incoming).map_err(|e| backend(e.to_string()))?;
        let launch_options = LaunchOptions {
            connect_timeout: options.connect_timeout,
            qmp: QmpClientOptions {
                command_timeout: options.command_timeout,
                greeting_timeout: options.connect_timeout,
                ..QmpClientOptions::default()
            },
        };
        let proc = process::launch(argv, &paths, &launch_options)
            .await
            .map_err(|e| e.into_core(operation, &config.name))?;
        let qemu = proc.qmp.greeting().version.qemu;
        let agent_socket = config
            .channels
            .iter()
            .find(|c| c.kind == domkit_core::ChannelKind::GuestAgent)
            .map(|c| paths.channel_socket(c.kind, c.port_name()));
        // Publish the instance under the slot lock, so a process that dies at once cannot
        // be reported ended before it is known.
        let mut slot = self.inner.instance_slot();
        let handle = supervisor::spawn(
            self.inner.clone(),
            proc.child,
            proc.pid,
            proc.qmp.clone(),
            proc.events,
            supervisor::SupervisorTimeouts {
                destroy: options.destroy_timeout,
                monitor_grace: options.monitor_grace,
            },
        );
        let instance = Arc::new(Instance {
            pid: proc.pid,
            qmp: proc.qmp,
            qemu_version: format!("{}.{}.{}", qemu.major, qemu.minor, qemu.micro),
            supervisor: handle,
            agent_socket,
            agent: tokio::sync::Mutex::new(None),
        });
        *slot = Some(instance.clone());
        Ok(instance)
    }

    /// Tell the lifecycle the domain exists, unless its process died meanwhile (then the
    /// supervisor's `Gone` came first and was a no-op: repeat it now).
    fn created(&self, instance: &Instance, how: Creation, paused: bool) {
        self.inner
            .cell
            .observe(Observation::Created { how, paused });
        if instance.has_ended() || self.instance().is_none() {
            self.inner.cell.observe(Observation::Gone {
                unexplained: ShutoffReason::Crashed,
            });
        }
    }

    /// Kill a half-started instance and report the failed creation.
    async fn abandon(&self, instance: &Instance) {
        instance.kill();
        instance
            .wait_ended(self.inner.options.destroy_timeout)
            .await;
        self.inner.cell.observe(Observation::CreateFailed);
    }

    /// Wait for the next event matching `pred`, failing if the domain shuts off first.
    async fn wait_event(
        &self,
        events: &mut EventStream,
        operation: Operation,
        within: Duration,
        pred: impl Fn(&EventKind) -> bool,
    ) -> Result<DomainEvent> {
        let deadline = Instant::now() + within;
        loop {
            let next = tokio::time::timeout_at(deadline, events.next()).await;
            match next {
                Ok(Some(event)) if pred(&event.kind) => return Ok(event),
                Ok(Some(DomainEvent {
                    kind: EventKind::Stopped(detail),
                    ..
                })) => {
                    return Err(backend(format!(
                        "{operation} failed: the domain stopped ({detail:?}) meanwhile"
                    )))
                }
                Ok(Some(_)) => {}
                Ok(None) => return Err(backend(format!("{operation}: event stream closed"))),
                Err(_) => {
                    return Err(timeout(
                        operation,
                        within,
                        format!("the domain is {}", self.state()),
                    ))
                }
            }
        }
    }

    /// Poll until no policy restart is in progress (the core reports none as a state).
    async fn wait_restart_done(&self, operation: Operation, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        while self.inner.cell.with(|lc| lc.is_restarting()) {
            if Instant::now() >= deadline {
                return Err(timeout(operation, within, "the restart did not finish"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Stop the process: `quit`, SIGKILL if it does not exit in time. The caller holds the
    /// intent that explains the end.
    async fn end_instance(&self, instance: &Instance, operation: Operation) -> Result<()> {
        let grace = self.inner.options.destroy_timeout;
        if instance.qmp.connection_end().is_some() {
            // No monitor to ask: straight to SIGKILL.
            instance.kill();
        } else {
            match tokio::time::timeout(grace, instance.qmp.quit()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "quit failed; SIGKILL follows"),
                Err(_) => tracing::debug!("quit got no answer; SIGKILL follows"),
            }
        }
        if instance.wait_ended(grace).await {
            return Ok(());
        }
        tracing::warn!(pid = instance.pid, "QEMU did not exit after quit: SIGKILL");
        instance.kill();
        if instance.wait_ended(grace).await {
            return Ok(());
        }
        Err(timeout(
            operation,
            grace * 2,
            format!("QEMU pid {} does not die, even after SIGKILL", instance.pid),
        ))
    }

    /// Wait for a MIGRATION event with a final status (QMP events, with `query-migrate` as a
    /// fallback in case one was missed). `Ok(())` on completed.
    async fn wait_migration(
        &self,
        qmp: &QmpClient,
        events: &mut crate::qmp::QmpEventStream,
        operation: Operation,
    ) -> Result<()> {
        let within = self.inner.options.migration_timeout;
        let deadline = Instant::now() + within;
        let mut poll = tokio::time::interval(Duration::from_millis(500));
        let status = loop {
            tokio::select! {
                event = events.recv() => match event {
                    Ok(event) => {
                        if let QmpEventKind::Migration(m) = &event.kind {
                            if is_final(&m.status) {
                                break m.status.clone();
                            }
                        }
                    }
                    Err(EventRecvError::Lagged(_)) => {}
                    Err(EventRecvError::Closed) => {
                        return Err(self.interrupted(operation, Error::ControlBroken {
                            domain: self.inner.id.name.clone(),
                            reason: format!("the QMP connection closed during the {operation} migration"),
                        }));
                    }
                },
                _ = poll.tick() => {
                    match qmp.query_migrate().await {
                        Ok(info) => if let Some(s) = info.status.filter(is_final) {
                            break s;
                        },
                        Err(e) => return Err(self.qmp_error(operation, "query-migrate", e)),
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(timeout(operation, within, "the migration stream did not finish; check free space and the QEMU log"));
                }
            }
        };
        if status == MigrationStatus::Completed {
            return Ok(());
        }
        let detail = match qmp.query_migrate().await {
            Ok(info) => info
                .extra
                .get("error-desc")
                .and_then(|v| v.as_str())
                .map(str::to_owned)
                .unwrap_or_default(),
            Err(_) => String::new(),
        };
        Err(backend(format!(
            "{operation}: QEMU's migration ended {status}{}",
            if detail.is_empty() {
                String::new()
            } else {
                format!(": {detail}")
            }
        )))
    }

    async fn save_inner(&self, path: &Path) -> Result<()> {
        let operation = Operation::Save;
        let state = self.state();
        if !matches!(state, DomainState::Running(_) | DomainState::Paused(_))
            || matches!(state, DomainState::Paused(PausedReason::ShuttingDown))
        {
            return Err(self.invalid(operation));
        }
        let instance = self.running_instance(operation)?;
        let was_paused = state.is_paused();
        let header = SaveHeader {
            format: FORMAT_VERSION,
            backend: BACKEND.into(),
            domain: self.inner.id.clone(),
            was_paused,
            qemu_version: instance.qemu_version.clone(),
            memory_mib: self.inner.config.memory_mib,
        };
        // First, before the domain is touched: an unwritable place fails here.
        let temp = TempSaveFile::create(path, &header).map_err(|e| {
            Error::io(
                format!(
                    "creating the save file next to {} (is the directory writable?)",
                    path.display()
                ),
                e,
            )
        })?;
        let qmp = &instance.qmp;
        let mut events = qmp.subscribe();
        // Intent::Save is held where it explains what QEMU does (the stop: paused(save); the
        // resume after a failure: running(save_canceled); the quit after success:
        // shutoff(saved)) but not during the migration itself: a QEMU that dies then did not
        // save anything and must end as crashed, not as saved.
        let migrated = async {
            qmp.migrate_set_capabilities(&[("events", true)])
                .await
                .map_err(|e| self.qmp_error(operation, "migrate-set-capabilities", e))?;
            if !was_paused {
                let _intent = self.inner.cell.intent(Intent::Save);
                qmp.stop()
                    .await
                    .map_err(|e| self.qmp_error(operation, "stop", e))?;
                self.inner
                    .cell
                    .wait_for(operation, self.command_timeout(), |s| !s.is_running())
                    .await?;
            }
            qmp.send_fd(SAVE_FD, temp.file())
                .await
                .map_err(|e| self.qmp_error(operation, "getfd", e))?;
            if let Err(e) = qmp.migrate(&format!("fd:{SAVE_FD}")).await {
                let _ = qmp.closefd(SAVE_FD).await;
                return Err(self.qmp_error(operation, "migrate", e));
            }
            self.wait_migration(qmp, &mut events, operation).await?;
            temp.commit()
                .map_err(|e| Error::io(format!("writing the save file {}", path.display()), e))
        }
        .await;
        let _intent = self.inner.cell.intent(Intent::Save);
        match migrated {
            Ok(()) => {
                self.end_instance(&instance, operation).await?;
                self.inner
                    .cell
                    .wait_for(operation, self.command_timeout(), |s| s.is_shutoff())
                    .await?;
                Ok(())
            }
            Err(err) => {
                // The temporary file is gone (dropped); the domain goes back as it was.
                if !was_paused && instance.qmp.connection_end().is_none() {
                    if let Err(e) = qmp.cont().await {
                        tracing::warn!(error = %e, "resuming after a failed save failed");
                    }
                    let _ = self
                        .inner
                        .cell
                        .wait_for(operation, self.command_timeout(), |s| s.is_running())
                        .await;
                }
                Err(self.interrupted(operation, err))
            }
        }
    }

    /// Open a save file and check that it belongs to this domain and config.
    fn check_save_file(&self, path: &Path) -> Result<(std::fs::File, SaveHeader)> {
        let (file, header) = savefile::open_for_restore(path)
            .map_err(|e| Error::io(format!("reading the save file {}", path.display()), e))?;
        if header.backend != BACKEND {
            return Err(backend(format!(
                "{} was saved by the {} backend; restore it with that backend",
                path.display(),
                header.backend
            )));
        }
        if header.domain.uuid != self.inner.id.uuid {
            return Err(backend(format!(
                "{} holds domain {}, not {}: restore it into the domain it was saved from",
                path.display(),
                header.domain,
                self.inner.id
            )));
        }
        if header.memory_mib != self.inner.config.memory_mib {
            return Err(backend(format!(
                "{} was saved with {} MiB of memory but the domain now has {} MiB: restore \
                 with the config it was saved with",
                path.display(),
                header.memory_mib,
                self.inner.config.memory_mib
            )));
        }
        Ok((file, header))
    }

    async fn restore_inner(&self, path: &Path, options: RestoreOptions) -> Result<()> {
        let operation = Operation::Restore;
        self.ensure_inactive(operation)?;
        let checked = self.check_save_file(path);
        let (file, header) = match checked {
            Ok(ok) => ok,
            Err(e) => {
                self.inner.cell.observe(Observation::CreateFailed);
                return Err(e);
            }
        };
        let instance = match self.launch(operation, true).await {
            Ok(i) => i,
            Err(e) => {
                self.inner.cell.observe(Observation::CreateFailed);
                return Err(e);
            }
        };
        let qmp = &instance.qmp;
        let paused = options.paused.unwrap_or(header.was_paused);
        let incoming = async {
            let mut events = qmp.subscribe();
            qmp.migrate_set_capabilities(&[("events", true)])
                .await
                .map_err(|e| self.qmp_error(operation, "migrate-set-capabilities", e))?;
            qmp.send_fd(RESTORE_FD, &file)
                .await
                .map_err(|e| self.qmp_error(operation, "getfd", e))?;
            qmp.execute(
                "migrate-incoming",
                Some(json!({ "uri": format!("fd:{RESTORE_FD}") })),
            )
            .await
            .map_err(|e| self.qmp_error(operation, "migrate-incoming", e))?;
            self.wait_migration(qmp, &mut events, operation).await?;
            if !paused {
                qmp.cont()
                    .await
                    .map_err(|e| self.qmp_error(operation, "cont", e))?;
            }
            Ok::<(), Error>(())
        }
        .await;
        if let Err(e) = incoming {
            self.abandon(&instance).await;
            return Err(e);
        }
        self.created(&instance, Creation::Restore, paused);
        Ok(())
    }

    async fn shutdown_inner(&self, options: ShutdownOptions) -> Result<ShutdownOutcome> {
        let operation = Operation::Shutdown;
        if options.mode == ShutdownMode::Paravirt {
            return Err(unsupported_paravirt(operation));
        }
        let state = self.state();
        if !state.is_active() {
            return Err(self.invalid(operation));
        }
        let instance = self.running_instance(operation)?;
        let deadline = Instant::now() + options.timeout;
        let acknowledged =
            |s: &DomainState| matches!(s, DomainState::ShuttingDown(_) | DomainState::Shutoff(_));
        // The intent is held until the request is acknowledged (state shutting_down(user)),
        // not until completion: from then on the state alone says the end is a shutdown, and
        // an end nobody explains (QEMU killed while we wait) stays a crash.
        let waited = {
            let _intent = self.inner.cell.intent(Intent::Shutdown);
            match options.mode {
                ShutdownMode::Agent => {
                    self.agent_shutdown(&instance, operation, false).await?;
                    // No QMP event says the agent took the request: its success does.
                    self.inner
                        .cell
                        .observe(Observation::ShutdownRequestDelivered);
                }
                _ => instance
                    .qmp
                    .system_powerdown()
                    .await
                    .map_err(|e| self.qmp_error(operation, "system_powerdown", e))?,
            }
            let left = deadline.saturating_duration_since(Instant::now());
            self.inner
                .cell
                .wait_for(operation, left, acknowledged)
                .await
        };
        let waited = match (waited, options.wait) {
            (Ok(DomainState::Shutoff(s)), _) => Ok(DomainState::Shutoff(s)),
            (Ok(s), ShutdownWait::Acknowledged) => Ok(s),
            (Ok(_), ShutdownWait::Completed) => {
                let left = deadline.saturating_duration_since(Instant::now());
                self.inner
                    .cell
                    .wait_for(operation, left, DomainState::is_shutoff)
                    .await
            }
            (Err(e), _) => Err(e),
        };
        match waited {
            Ok(DomainState::Shutoff(ShutoffReason::Shutdown)) => Ok(ShutdownOutcome::Completed),
            Ok(DomainState::Shutoff(other)) => Err(backend(format!(
                "shutdown: the domain ended as {other:?} instead of shutting down"
            ))),
            Ok(_) => Ok(ShutdownOutcome::Acknowledged),
            Err(Error::Timeout { .. }) if options.destroy_on_timeout => {
                tracing::info!(domain = %self.inner.id.name, "shutdown timed out: destroying");
                self.destroy_inner().await?;
                Ok(ShutdownOutcome::Destroyed)
            }
            Err(Error::Timeout { .. }) => Err(timeout(
                operation,
                options.timeout,
                format!(
                    "the guest did not shut down (it is {}); the request stays pending in the \
                     guest: destroy the domain, or ask with destroy_on_timeout",
                    self.state()
                ),
            )),
            Err(e) => Err(e),
        }
    }

    async fn destroy_inner(&self) -> Result<()> {
        let operation = Operation::Destroy;
        let Some(instance) = self.instance() else {
            // Nothing runs. The supervisor may be reporting the end right now.
            let _ = self
                .inner
                .cell
                .wait_for(operation, Duration::from_secs(1), |s| !s.is_active())
                .await;
            return Ok(());
        };
        let _intent = self.inner.cell.intent(Intent::Destroy);
        self.end_instance(&instance, operation).await?;
        self.inner
            .cell
            .wait_for(operation, self.command_timeout(), |s| !s.is_active())
            .await?;
        Ok(())
    }

    /// The guest agent of the running instance (connected on first use, then shared: the
    /// agent's chardev serves one client at a time).
    async fn agent_of(&self, instance: &Instance, operation: Operation) -> Result<Arc<GuestAgent>> {
        let mut slot = instance.agent.lock().await;
        if let Some(agent) = slot.as_ref() {
            return Ok(agent.clone());
        }
        let Some(socket) = &instance.agent_socket else {
            return Err(Error::Unsupported {
                operation,
                backend: BACKEND.into(),
                reason: "the domain has no guest agent channel: add \
                         `[[channels]] kind = \"guest_agent\"` to its config"
                    .into(),
            });
        };
        let options = GuestAgentOptions {
            command_timeout: self.command_timeout(),
            ..GuestAgentOptions::default()
        };
        let agent = GuestAgent::connect_with(socket, options)
            .await
            .map_err(|e| agent_to_core(operation, e))?;
        let agent = Arc::new(agent);
        *slot = Some(agent.clone());
        Ok(agent)
    }

    /// The guest agent of the running domain, for callers that need more than domkit's
    /// operations (guest-exec, ...). The same connection domkit uses.
    pub async fn guest_agent(&self) -> Result<Arc<GuestAgent>> {
        let operation = Operation::State;
        let instance = self.running_instance(operation)?;
        self.agent_of(&instance, operation).await
    }

    async fn agent_shutdown(
        &self,
        instance: &Instance,
        operation: Operation,
        reboot: bool,
    ) -> Result<()> {
        let agent = self.agent_of(instance, operation).await?;
        let mode = if reboot {
            AgentShutdownMode::Reboot
        } else {
            AgentShutdownMode::Powerdown
        };
        agent
            .shutdown(mode)
            .await
            .map_err(|e| self.interrupted(operation, agent_to_core(operation, e)))
    }

    async fn agent_suspend_ram(&self, instance: &Instance) -> Result<()> {
        let operation = Operation::PmSuspend;
        let agent = self.agent_of(instance, operation).await?;
        agent
            .suspend_ram()
            .await
            .map_err(|e| self.interrupted(operation, agent_to_core(operation, e)))
    }
}

/// Map a guest agent error into domkit's error.
fn agent_to_core(operation: Operation, err: AgentError) -> Error {
    match err {
        AgentError::Timeout { command, after } => timeout(
            operation,
            after,
            format!("the guest agent did not answer `{command}`: is qemu-ga running in the guest?"),
        ),
        AgentError::CommandFailed { class, desc } => backend(format!(
            "{operation}: the guest agent refused: {class}: {desc}"
        )),
        AgentError::Protocol { message, excerpt } => Error::Protocol {
            message: format!("guest agent: {message} (bytes: {excerpt})"),
        },
        other => backend(format!(
            "{operation}: the guest agent is unreachable: {other} (is the guest up and qemu-ga \
             running?)"
        )),
    }
}

fn is_final(status: &MigrationStatus) -> bool {
    matches!(
        status,
        MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
    )
}

fn unsupported_paravirt(operation: Operation) -> Error {
    Error::Unsupported {
        operation,
        backend: BACKEND.into(),
        reason: "QEMU guests have no paravirtual shutdown channel: use mode acpi or agent".into(),
    }
}

#[async_trait]
impl Domain for QemuDomain {
    fn id(&self) -> &DomainId {
        &self.inner.id
    }

    fn state(&self) -> DomainState {
        self.inner.cell.state()
    }

    async fn info(&self) -> Result<DomainInfo> {
        Ok(self.info_now())
    }

    fn subscribe(&self) -> EventStream {
        self.inner.cell.subscribe()
    }

    async fn start(&self, options: domkit_core::StartOptions) -> Result<()> {
        let operation = Operation::Start;
        let _op = self.inner.ops.lock().await;
        self.ensure_inactive(operation)?;
        let instance = match self.launch(operation, false).await {
            Ok(i) => i,
            Err(e) => {
                self.inner.cell.observe(Observation::CreateFailed);
                return Err(e);
            }
        };
        if !options.paused {
            // The RESUME arrives before cont's reply, while the domain is still shut off:
            // the lifecycle ignores it, and Created below says "running".
            if let Err(e) = instance.qmp.cont().await {
                let err = self.qmp_error(operation, "cont", e);
                self.abandon(&instance).await;
                return Err(err);
            }
        }
        self.created(&instance, Creation::Boot, options.paused);
        Ok(())
    }

    async fn pause(&self) -> Result<()> {
        let operation = Operation::Pause;
        let _op = self.inner.ops.lock().await;
        match self.state() {
            DomainState::Paused(_) => return Ok(()), // §6.2: no-op, no event
            DomainState::Running(_) => {}
            _ => return Err(self.invalid(operation)),
        }
        let instance = self.running_instance(operation)?;
        let _intent = self.inner.cell.intent(Intent::Pause);
        instance
            .qmp
            .stop()
            .await
            .map_err(|e| self.qmp_error(operation, "stop", e))?;
        // QEMU sent STOP before the reply; wait until the supervisor has applied it.
        let state = self
            .inner
            .cell
            .wait_for(operation, self.command_timeout(), |s| !s.is_running())
            .await
            .map_err(|e| self.interrupted(operation, e))?;
        if !state.is_paused() {
            return Err(self.interrupted(
                operation,
                backend(format!("pause: the domain became {state} instead")),
            ));
        }
        Ok(())
    }

    async fn resume(&self) -> Result<()> {
        let operation = Operation::Resume;
        let _op = self.inner.ops.lock().await;
        match self.state() {
            DomainState::Running(_) => return Ok(()), // §6.2: no-op, no event
            // §6.2: a preserved poweroff or crash is kept for inspection, not resumable
            // (QEMU itself refuses `cont` after a -no-shutdown poweroff; a panicked kernel
            // has nothing to resume to): destroy it. Same on every backend.
            DomainState::Paused(PausedReason::ShuttingDown) | DomainState::Crashed(_) => {
                return Err(self.invalid(operation));
            }
            DomainState::Paused(_) => {}
            _ => return Err(self.invalid(operation)),
        }
        let instance = self.running_instance(operation)?;
        let _intent = self.inner.cell.intent(Intent::Resume);
        instance
            .qmp
            .cont()
            .await
            .map_err(|e| self.qmp_error(operation, "cont", e))?;
        self.wait_running_or_gone(operation).await?;
        if !self.state().is_running() {
            return Err(self.interrupted(operation, self.invalid(operation)));
        }
        Ok(())
    }

    async fn shutdown(&self, options: ShutdownOptions) -> Result<ShutdownOutcome> {
        let _op = self.inner.ops.lock().await;
        self.shutdown_inner(options).await
    }

    async fn reboot(&self, mode: ShutdownMode, within: Duration) -> Result<()> {
        let operation = Operation::Reboot;
        let _op = self.inner.ops.lock().await;
        if !self.state().is_running() {
            return Err(self.invalid(operation));
        }
        let instance = self.running_instance(operation)?;
        let mut events = self.subscribe();
        let started = Instant::now();
        {
            let _intent = self.inner.cell.intent(Intent::Reboot);
            match mode {
                // QEMU fake reboot: power button; the guest powers off; the lifecycle turns
                // that into one Rebooted and a Restart (system_reset + cont), see
                // supervisor.rs.
                ShutdownMode::Default | ShutdownMode::Acpi => instance
                    .qmp
                    .system_powerdown()
                    .await
                    .map_err(|e| self.qmp_error(operation, "system_powerdown", e))?,
                ShutdownMode::Agent => self.agent_shutdown(&instance, operation, true).await?,
                ShutdownMode::Paravirt => return Err(unsupported_paravirt(operation)),
            }
            self.wait_event(&mut events, operation, within, |k| {
                *k == EventKind::Rebooted
            })
            .await?;
        }
        let left = within.saturating_sub(started.elapsed());
        self.wait_restart_done(operation, left.max(Duration::from_secs(5)))
            .await
    }

    async fn reset(&self) -> Result<()> {
        let operation = Operation::Reset;
        let _op = self.inner.ops.lock().await;
        match self.state() {
            DomainState::Running(_) => {}
            DomainState::Paused(reason) if reason != PausedReason::ShuttingDown => {}
            _ => return Err(self.invalid(operation)),
        }
        let instance = self.running_instance(operation)?;
        let mut events = self.subscribe();
        let _intent = self.inner.cell.intent(Intent::Reset);
        instance
            .qmp
            .system_reset()
            .await
            .map_err(|e| self.qmp_error(operation, "system_reset", e))?;
        self.wait_event(&mut events, operation, self.command_timeout(), |k| {
            *k == EventKind::Rebooted
        })
        .await?;
        Ok(())
    }

    async fn destroy(&self) -> Result<()> {
        // Not serialised with the other operations: destroy must be able to end a domain
        // whose operation hangs on the guest.
        self.destroy_inner().await
    }

    async fn save(&self, path: &Path) -> Result<()> {
        let _op = self.inner.ops.lock().await;
        self.save_inner(path).await
    }

    async fn restore(&self, path: &Path, options: RestoreOptions) -> Result<()> {
        let _op = self.inner.ops.lock().await;
        self.restore_inner(path, options).await
    }

    async fn pm_suspend(&self, target: PmSuspendTarget) -> Result<()> {
        let operation = Operation::PmSuspend;
        let _op = self.inner.ops.lock().await;
        if target == PmSuspendTarget::Disk {
            return Err(Error::Unsupported {
                operation,
                backend: BACKEND.into(),
                reason: "suspend to disk (S4) makes the guest write its memory to its own disk \
                         and QEMU exit, which domkit cannot tell from a poweroff; use save \
                         instead"
                    .into(),
            });
        }
        if !self.state().is_running() {
            return Err(self.invalid(operation));
        }
        let instance = self.running_instance(operation)?;
        let _intent = self.inner.cell.intent(Intent::PmSuspend);
        self.agent_suspend_ram(&instance).await?;
        self.inner
            .cell
            .wait_for(operation, Duration::from_secs(60), |s| {
                matches!(s, DomainState::PmSuspended(_)) || !s.is_active()
            })
            .await
            .map_err(|e| self.interrupted(operation, e))?;
        Ok(())
    }

    async fn pm_wakeup(&self) -> Result<()> {
        let operation = Operation::PmWakeup;
        let _op = self.inner.ops.lock().await;
        if !matches!(self.state(), DomainState::PmSuspended(_)) {
            return Err(self.invalid(operation));
        }
        let instance = self.running_instance(operation)?;
        instance
            .qmp
            .system_wakeup()
            .await
            .map_err(|e| self.qmp_error(operation, "system_wakeup", e))?;
        self.wait_running_or_gone(operation).await?;
        Ok(())
    }
}
