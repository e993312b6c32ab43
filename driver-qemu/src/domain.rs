//! [`QemuDomain`]: one domain of the QEMU driver, implementing domkit's [`Domain`] trait.
//!
//! Every operation follows the same pattern (after libvirt's qemu driver): check the uniform
//! state, stash an [`Intent`] in the lifecycle, send the QMP command, and wait for the state or
//! event the supervisor derives from QEMU's events. Operations never set a state themselves;
//! the only observations they make are the ones no QMP event carries (`Created` after start /
//! restore, `CreateFailed`, and the agent's acceptance of a shutdown request).
//!
//! Concurrency and cancellation follow `docs/semantics.md` §6.0: a caller queues (FIFO) for
//! the domain's operation lock, then the operation runs in a task of its own
//! (`QemuDomain::run_op`), so a caller that gives up while queued never runs it and one
//! that gives up later leaves it to complete in the background. `destroy` never queues: it
//! preempts, and the preempted operation's error becomes `interrupted` (`QemuDomain::settle`).
//! State queries never wait.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use domkit_core::{
    ConsoleAccess, ConsoleStream, Creation, Domain, DomainConfig, DomainEvent, DomainId,
    DomainInfo, DomainState, DomainStats, Error, EventKind, EventStream, Intent, LifecycleCell,
    Observation, Operation, PausedReason, PmSuspendTarget, RestoreOptions, Result, ShutdownMode,
    ShutdownOptions, ShutdownOutcome, ShutdownWait, ShutoffReason, ShuttingDownReason,
};
use futures::StreamExt;
use serde_json::json;
use tokio::time::Instant;

use crate::agent::{AgentError, GuestAgent, GuestAgentOptions, ShutdownMode as AgentShutdownMode};
use crate::argv::{build_argv_with, DomainPaths, DEFAULT_BINARY};
use crate::devices::{self, DeviceSet};
use crate::driver::{PersistedDomain, QemuDriverOptions};
use crate::error::{backend, qmp_to_core, timeout, BACKEND};
use crate::observe::{self, ConsoleLink};
use crate::process::{self, LaunchOptions};
use crate::qmp::types::MigrationStatus;
use crate::qmp::{EventRecvError, QmpClient, QmpClientOptions, QmpError, QmpEventKind};
use crate::reattach;
use crate::savefile::{self, SaveHeader, TempSaveFile, FORMAT_VERSION};
use crate::stats::{self as qstats, VcpuThread};
use crate::supervisor::{self, SupervisedDomain, SupervisorHandle, SupervisorRequest};
use domkit_core::store::{InFlight, StoredStatus};
use domkit_core::{ConfigError, DetachOptions, DeviceId, DeviceInfo, DeviceScope, DeviceSpec};

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
    /// Serialises operations (not state reads, not destroy); tokio's mutex is FIFO.
    ops: Arc<tokio::sync::Mutex<()>>,
    /// The running QEMU process, if any.
    instance: Mutex<Option<Arc<Instance>>>,
    /// Undefined, or its driver dropped: remove the runtime directory when nothing runs.
    forgotten: AtomicBool,
    /// The durable store, for a persistent driver's domain.
    persisted: Option<Arc<PersistedDomain>>,
    /// The current definition: `config` with the device changes made with scope `config`
    /// (§14); what the next start launches.
    definition: Mutex<DomainConfig>,
}

/// One running QEMU process of a domain.
#[derive(Debug)]
struct Instance {
    pid: u32,
    qmp: QmpClient,
    qemu_version: String,
    supervisor: SupervisorHandle,
    agent_socket: Option<PathBuf>,
    /// Where this process's output starts in the QEMU log.
    log_start: u64,
    /// The guest agent connection, made on first use.
    agent: tokio::sync::Mutex<Option<Arc<GuestAgent>>>,
    /// The vCPUs' host threads, asked of QEMU on the first stats call (they do not change
    /// while the process lives).
    vcpu_threads: tokio::sync::OnceCell<Vec<VcpuThread>>,
    /// The tun/tap interfaces of the process, found on the first stats call.
    taps: std::sync::OnceLock<Vec<String>>,
    /// The console socket connection, made on the first `console()` (§12.4).
    console: tokio::sync::Mutex<Option<ConsoleLink>>,
    /// The devices of this process, hotplugged ones included (§14).
    devices: Mutex<DeviceSet>,
}

impl Instance {
    fn devices(&self) -> MutexGuard<'_, DeviceSet> {
        // Only ever changed whole per operation: a poisoned lock holds a consistent value.
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }
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

    fn agent_port_id(&self) -> Option<String> {
        // argv.rs names the virtserialport of channel i `port{i}`.
        self.config
            .channels
            .iter()
            .position(|c| c.kind == domkit_core::ChannelKind::GuestAgent)
            .map(|i| format!("port{i}"))
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
        persisted: Option<Arc<PersistedDomain>>,
    ) -> Self {
        QemuDomain {
            inner: Arc::new(DomainInner {
                persisted,
                id,
                definition: Mutex::new(config.clone()),
                config,
                cell,
                paths: DomainPaths::new(dir),
                options,
                ops: Arc::new(tokio::sync::Mutex::new(())),
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

    /// The state, the `seq` of the last event it reflects, and the events after it: no
    /// gap, no duplicate between the snapshot and the stream (§2.4).
    pub fn snapshot_and_subscribe(&self) -> (DomainState, u64, EventStream) {
        self.inner.cell.snapshot_and_subscribe()
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
            devices: self.devices_now().unwrap_or_default(),
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

    /// Statistics now (§12.5): `query-cpus-fast` once per instance, `query-blockstats` when
    /// the config has disks, the rest from `/proc` and `/sys`.
    pub async fn stats_now(&self) -> Result<DomainStats> {
        let taken_at_us = domkit_core::event::unix_micros(std::time::SystemTime::now());
        let id = self.inner.id.clone();
        let config = &self.inner.config;
        let Some(instance) = self.instance() else {
            return Ok(DomainStats::inactive(id, self.state(), taken_at_us));
        };
        let vcpus = instance
            .vcpu_threads
            .get_or_try_init(|| async {
                let reply = instance
                    .qmp
                    .execute("query-cpus-fast", None)
                    .await
                    .map_err(|e| self.qmp_error(Operation::Stats, "query-cpus-fast", e))?;
                qstats::parse_cpus_fast(&reply).map_err(|e| Error::Protocol {
                    message: e.to_string(),
                })
            })
            .await?;
        let drives = if config.disks.is_empty() {
            Vec::new()
        } else {
            let reply = instance
                .qmp
                .execute("query-blockstats", None)
                .await
                .map_err(|e| self.qmp_error(Operation::Stats, "query-blockstats", e))?;
            qstats::parse_blockstats(&reply).map_err(|e| Error::Protocol {
                message: e.to_string(),
            })?
        };
        let cpu = observe::read_cpu(instance.pid, vcpus);
        let resident = observe::read_resident_pages(instance.pid);
        let bridged = config
            .nics
            .iter()
            .any(|n| matches!(n.backend, domkit_core::NicBackend::Bridge(_)));
        let taps: &[String] = if bridged {
            instance
                .taps
                .get_or_init(|| observe::find_taps(instance.pid))
        } else {
            &[]
        };
        let mut next_tap = taps.iter();
        let nics = config
            .nics
            .iter()
            .enumerate()
            .map(|(index, nic)| match nic.backend {
                domkit_core::NicBackend::Bridge(_) => {
                    let tap = next_tap.next().map(|name| (name, observe::read_tap(name)));
                    qstats::nic_stats(index, tap.as_ref().map(|(n, c)| (n.as_str(), c)))
                }
                domkit_core::NicBackend::User => qstats::nic_stats(index, None),
            })
            .collect();
        Ok(DomainStats {
            domain: id,
            // After the figures: a stop racing with them shows as the newer state.
            state: self.state(),
            taken_at_us,
            cpu: qstats::cpu_stats(&cpu, observe::ticks_per_second()),
            // No balloon device is configured (argv.rs): QEMU would answer `query-balloon`
            // with an error, so it is not asked.
            memory: qstats::memory_stats(config.memory_mib, None, resident, observe::page_size()),
            disks: qstats::disk_stats(config.disks.len(), &drives),
            nics,
        })
    }

    /// A stream on console 0 (§12.4): the manager's link to QEMU's console socket is made
    /// on the first call of an instance and shared by every stream.
    pub async fn open_console(&self, access: ConsoleAccess) -> Result<ConsoleStream> {
        let instance = self.running_instance(Operation::Console)?;
        let mut link = instance.console.lock().await;
        if !link.as_ref().is_some_and(ConsoleLink::is_open) {
            if instance.has_ended() {
                return Err(self.invalid(Operation::Console));
            }
            let path = self.inner.paths.console_socket(0);
            let connected = ConsoleLink::connect(&path, &self.inner.id.name)
                .await
                .map_err(|e| {
                    if instance.has_ended() {
                        self.invalid(Operation::Console)
                    } else {
                        Error::io(
                            format!("connecting to the console socket {}", path.display()),
                            e,
                        )
                    }
                })?;
            *link = Some(connected);
        }
        match link.as_ref() {
            Some(l) => l.hub.open(access).map_err(|e| match e {
                // Closed between the check and the open: the domain stopped.
                Error::NotFound { .. } => self.invalid(Operation::Console),
                other => other,
            }),
            None => Err(self.invalid(Operation::Console)),
        }
    }

    fn qmp_error(&self, operation: Operation, command: &str, err: QmpError) -> Error {
        qmp_to_core(operation, &self.inner.id.name, command, err)
    }

    /// Queue for the operation lock in call order, then run `body` in a task of its own
    /// (§6.0): dropped while queued, it never runs; dropped later, it completes in the
    /// background and the next operation queues behind it. Errors are settled (`settle`).
    async fn run_op<T, F, Fut>(&self, operation: Operation, body: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(QemuDomain) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        let queued = self.inner.ops.clone().lock_owned().await;
        let me = self.clone();
        let task = tokio::spawn(async move {
            let _op = queued;
            let was_active = me.state().is_active();
            match body(me.clone()).await {
                Ok(v) => Ok(v),
                Err(e) if was_active => Err(me.settle(operation, e).await),
                Err(e) => Err(e),
            }
        });
        task.await.unwrap_or_else(|e| {
            Err(backend(format!(
                "{operation}: the operation task failed: {e}"
            )))
        })
    }

    /// The error of an operation on an active domain, once the domain's end (if it is
    /// ending) has been observed: preempted by our destroy -> `interrupted`; ended otherwise
    /// meanwhile -> says so; else the error as it is.
    async fn settle(&self, operation: Operation, err: Error) -> Error {
        if matches!(
            err,
            Error::InvalidState { .. }
                | Error::Unsupported { .. }
                | Error::Interrupted { .. }
                | Error::BadSaveFile { .. }
        ) {
            return err;
        }
        // A QMP error because the process is ending: wait for the supervisor's `Gone`, so
        // the error can say why (a destroy of ours, or an end nobody asked for).
        let ending = self.inner.cell.with(|l| l.has_intent(Intent::Destroy))
            || self
                .instance()
                .map_or(true, |i| i.has_ended() || i.qmp.connection_end().is_some());
        if ending {
            let _ = self
                .inner
                .cell
                .wait_for(operation, self.inner.options.destroy_timeout * 2, |s| {
                    !s.is_active()
                })
                .await;
        }
        match self.state() {
            state @ DomainState::Shutoff(ShutoffReason::Destroyed) => Error::Interrupted {
                operation,
                by: Operation::Destroy,
                state,
            },
            state if !state.is_active() => backend(format!(
                "{operation} failed because the domain stopped meanwhile (now {state}): {err}"
            )),
            _ => err,
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
            .await?;
        Ok(())
    }

    /// Launch QEMU for this domain (`incoming`: wait for a migration stream) and start its
    /// supervisor. The lifecycle is not told anything yet.
    async fn launch(
        &self,
        operation: Operation,
        incoming: bool,
        devices: Option<DeviceSet>,
    ) -> Result<Arc<Instance>> {
        let options = &self.inner.options;
        let definition = self.definition();
        let devices = match devices {
            Some(d) => d,
            None => DeviceSet::from_config(&definition, self.inner.id.uuid)?,
        };
        check_bridges(devices.nics.iter().map(|n| &n.nic))?;
        let config = &devices.apply_to(&definition);
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
        let argv = build_argv_with(config, &devices, accel, &paths, incoming)
            .map_err(|e| backend(e.to_string()))?;
        let launch_options = self.launch_options();
        let proc = process::launch(argv, &paths, &launch_options)
            .await
            .map_err(|e| e.into_core(operation, &config.name))?;
        Ok(self.supervise(proc, devices))
    }

    /// Start supervising a QEMU process (launched now, or adopted on reattach) and publish
    /// it as the domain's instance.
    fn supervise(&self, proc: process::QemuProcess, devices: DeviceSet) -> Arc<Instance> {
        let options = &self.inner.options;
        let qemu = proc.qmp.greeting().version.qemu;
        let agent_socket = self
            .inner
            .config
            .channels
            .iter()
            .find(|c| c.kind == domkit_core::ChannelKind::GuestAgent)
            .map(|c| self.inner.paths.channel_socket(c.kind, c.port_name()));
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
            log_start: proc.log_start,
            agent: tokio::sync::Mutex::new(None),
            vcpu_threads: tokio::sync::OnceCell::new(),
            taps: std::sync::OnceLock::new(),
            console: tokio::sync::Mutex::new(None),
            devices: Mutex::new(devices),
        });
        *slot = Some(instance.clone());
        self.record_devices(&instance);
        instance
    }

    /// Record the operation in flight in the durable status (persistent drivers, §11.4).
    fn set_in_flight(&self, in_flight: Option<InFlight>) {
        if let Some(p) = &self.inner.persisted {
            p.set_in_flight(in_flight);
            self.inner.cell.persist_now();
        }
    }

    /// Stop supervising and leave the process running (persistent driver detaching).
    pub(crate) fn detach(&self) {
        if let Some(instance) = self.inner.instance_slot().take() {
            let _ = instance.supervisor.requests.send(SupervisorRequest::Detach);
            // Leave the console socket to the next manager (a console() in progress keeps
            // its link until it returns; the process's socket accepts the next client then).
            if let Ok(mut console) = instance.console.try_lock() {
                console.take();
            }
        }
    }

    /// Take over this domain after a manager restart (§11.3): from the status the previous
    /// manager recorded and what is found now (its QEMU alive or not; a save in flight).
    pub(crate) async fn reattach(&self, status: Option<StoredStatus>) -> Result<()> {
        let Some(status) = status else {
            return Ok(()); // defined, never started
        };
        let recorded_devices = status.devices.clone();
        let paths = &self.inner.paths;
        let save = status.in_flight.map(|in_flight| match in_flight {
            InFlight::Save {
                target,
                temp,
                was_paused,
                committing,
            } => reattach::SaveEvidence {
                target,
                temp_exists: temp.exists(),
                temp,
                was_paused,
                committing,
            },
        });
        if !status.state.is_active() && save.is_none() {
            return Ok(());
        }
        let alive = match process::read_pid_file(paths) {
            None => {
                tracing::info!(domain = %self.inner.id.name, "no QEMU pid recorded: it is gone");
                None
            }
            Some((pid, start)) => match process::AdoptedProcess::open(pid, start) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::info!(domain = %self.inner.id.name, pid, error = %e, "its QEMU is gone");
                    None
                }
            },
        };
        let Some(adopted) = alive else {
            self.ended_while_away(save.as_ref());
            return Ok(());
        };
        let pid = adopted.pid();
        let proc = match process::connect_adopted(adopted, paths, &self.launch_options()).await {
            Ok(proc) => proc,
            Err(e) => {
                // Dead meanwhile (the refused connection was its end), or alive with a
                // monitor we cannot reach: then say so in the control state.
                let start = process::read_pid_file(paths).map(|(_, s)| s).unwrap_or(0);
                if process::AdoptedProcess::open(pid, start).is_err() {
                    self.ended_while_away(save.as_ref());
                    return Ok(());
                }
                self.inner
                    .cell
                    .set_control(domkit_core::ControlState::Broken {
                        reason: e.to_string(),
                    });
                return Err(e);
            }
        };
        // The devices the previous manager recorded (hotplugged ones included, §14.3),
        // else the definition's.
        let devices = recorded_devices
            .and_then(|v| serde_json::from_value::<DeviceSet>(v).ok())
            .or_else(|| DeviceSet::from_config(&self.definition(), self.inner.id.uuid).ok())
            .unwrap_or_default();
        let instance = self.supervise(proc, devices);
        if let Some(save) = save {
            self.finish_save_on_reattach(&instance, &save).await;
        }
        let (done, reconciled) = tokio::sync::oneshot::channel();
        let _ = instance
            .supervisor
            .requests
            .send(SupervisorRequest::ReconcileOnReattach(done));
        let _ = reconciled.await;
        Ok(())
    }

    /// Its QEMU ended while no manager was attached: reconciled `gone` (§11.3), a save in
    /// flight settled (§11.4).
    fn ended_while_away(&self, save: Option<&reattach::SaveEvidence>) {
        let plan = reattach::plan_gone(save);
        let _committed = plan
            .committed
            .then(|| self.inner.cell.intent(Intent::SaveCommitted));
        if let Some(temp) = &plan.remove_temp {
            let _ = std::fs::remove_file(temp);
        }
        self.inner.cell.observe_reconciled(plan.observation);
        self.set_in_flight(None);
        process::remove_sockets(&self.inner.paths);
        let _ = std::fs::remove_file(self.inner.paths.dir.join("pid"));
    }

    /// A save was in flight when the previous manager died (§11.4): committed -> end the
    /// domain as saved; otherwise cancel it, remove its temporary file, and put the domain
    /// back as it was.
    async fn finish_save_on_reattach(&self, instance: &Instance, save: &reattach::SaveEvidence) {
        let operation = Operation::Save;
        let qmp = &instance.qmp;
        if reattach::save_committed(save) {
            let _committed = self.inner.cell.intent(Intent::SaveCommitted);
            if let Err(e) = self.end_instance(instance, operation).await {
                tracing::warn!(error = %e, "ending a saved domain on reattach failed");
            }
            let _ = self
                .inner
                .cell
                .wait_for(operation, self.command_timeout(), |s| s.is_shutoff())
                .await;
        } else {
            let _save = self.inner.cell.intent(Intent::Save);
            if let Ok(info) = qmp.query_migrate().await {
                if info.status.as_ref().is_some_and(|s| !is_final(s)) {
                    let _ = qmp.execute("migrate_cancel", None).await;
                    let mut waited = 0;
                    while waited < 100 {
                        match qmp.query_migrate().await {
                            Ok(i) if i.status.as_ref().is_some_and(|s| !is_final(s)) => {}
                            _ => break,
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        waited += 1;
                    }
                }
            }
            let _ = std::fs::remove_file(&save.temp);
            if !save.was_paused {
                if let Err(e) = qmp.cont().await {
                    tracing::warn!(error = %e, "resuming after an interrupted save failed");
                }
                let _ = self.wait_running_or_gone(operation).await;
            }
        }
        self.set_in_flight(None);
    }

    fn launch_options(&self) -> LaunchOptions {
        let options = &self.inner.options;
        LaunchOptions {
            ownership: options.ownership,
            connect_timeout: options.connect_timeout,
            qmp: QmpClientOptions {
                command_timeout: options.command_timeout,
                greeting_timeout: options.connect_timeout,
                ..QmpClientOptions::default()
            },
        }
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
                        return Err(Error::ControlBroken {
                            domain: self.inner.id.name.clone(),
                            reason: format!("the QMP connection closed during the {operation} migration"),
                        });
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
        let was_paused = match state {
            DomainState::Paused(PausedReason::ShuttingDown) => return Err(self.invalid(operation)),
            DomainState::Paused(_) => true,
            // §6.3: a pending shutdown request leaves the domain operable.
            DomainState::Running(_) | DomainState::ShuttingDown(ShuttingDownReason::User) => false,
            _ => return Err(self.invalid(operation)),
        };
        let instance = self.running_instance(operation)?;
        let header = SaveHeader {
            format: FORMAT_VERSION,
            backend: BACKEND.into(),
            domain: self.inner.id.clone(),
            was_paused,
            qemu_version: instance.qemu_version.clone(),
            memory_mib: self.inner.config.memory_mib,
            devices: Some(instance.devices().clone()),
        };
        let create_error = |e| {
            Error::io(
                format!(
                    "creating the save file next to {} (is the directory writable?)",
                    path.display()
                ),
                e,
            )
        };
        // Recorded before the temporary file exists: a manager killed at any instant after
        // this leaves the next one the name to remove (§11.4).
        let temp_path = savefile::temp_path_for(path).map_err(create_error)?;
        self.set_in_flight(Some(InFlight::Save {
            target: path.to_owned(),
            temp: temp_path.clone(),
            was_paused,
            committing: false,
        }));
        // First, before the domain is touched: an unwritable place fails here.
        let temp = match TempSaveFile::create_at(path, &temp_path, &header) {
            Ok(temp) => temp,
            Err(e) => {
                self.set_in_flight(None);
                return Err(create_error(e));
            }
        };
        let qmp = &instance.qmp;
        let mut events = qmp.subscribe();
        // Intent::Save explains the stop (paused(save)) and the resume after a failure
        // (running(save_canceled)); a QEMU that dies meanwhile saved nothing and ends as the
        // evidence says (crashed), §4.12. Only SaveCommitted, once the file is durable under
        // its final name, explains the end as saved.
        let _save = self.inner.cell.intent(Intent::Save);
        let migrated = async {
            qmp.migrate_set_capabilities(&[("events", true)])
                .await
                .map_err(|e| self.qmp_error(operation, "migrate-set-capabilities", e))?;
            if !was_paused {
                qmp.stop()
                    .await
                    .map_err(|e| self.qmp_error(operation, "stop", e))?;
                self.inner
                    .cell
                    .wait_for(operation, self.command_timeout(), |s| {
                        s.is_paused() || !s.is_active()
                    })
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
            Ok::<(), Error>(())
        }
        .await;
        let migrated = match migrated {
            // fsync of a multi-GiB file: not on a runtime worker.
            Ok(()) => {
                self.set_in_flight(Some(InFlight::Save {
                    target: path.to_owned(),
                    temp: temp.temp_path().to_owned(),
                    was_paused,
                    committing: true,
                }));
                tokio::task::spawn_blocking(move || temp.commit())
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                    .map_err(|e| Error::io(format!("writing the save file {}", path.display()), e))
            }
            Err(e) => Err(e), // `temp` is dropped here: the temporary file is removed
        };
        let ended = self.save_end(&instance, migrated, was_paused).await;
        self.set_in_flight(None);
        ended
    }

    /// The end of a save: committed -> end the domain as saved; failed -> back as it was.
    async fn save_end(
        &self,
        instance: &Instance,
        migrated: Result<()>,
        was_paused: bool,
    ) -> Result<()> {
        let operation = Operation::Save;
        let qmp = &instance.qmp;
        match migrated {
            Ok(()) => {
                let _committed = self.inner.cell.intent(Intent::SaveCommitted);
                self.end_instance(instance, operation).await?;
                self.inner
                    .cell
                    .wait_for(operation, self.command_timeout(), |s| s.is_shutoff())
                    .await?;
                Ok(())
            }
            Err(err) => {
                // The domain goes back as it was.
                if !was_paused && instance.qmp.connection_end().is_none() {
                    if let Err(e) = qmp.cont().await {
                        tracing::warn!(error = %e, "resuming after a failed save failed");
                    }
                    let _ = self.wait_running_or_gone(operation).await;
                }
                Err(err)
            }
        }
    }

    /// Open a save file and check that it belongs to this domain and config.
    fn check_save_file(&self, path: &Path) -> Result<(std::fs::File, SaveHeader)> {
        let bad = |reason: String| Error::BadSaveFile {
            path: path.to_owned(),
            reason,
        };
        let (file, header) = savefile::open_for_restore(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof => {
                bad(e.to_string())
            }
            _ => Error::io(format!("reading the save file {}", path.display()), e),
        })?;
        if header.backend != BACKEND {
            return Err(bad(format!(
                "it was saved by the {} backend; restore it with that backend",
                header.backend
            )));
        }
        if header.domain.uuid != self.inner.id.uuid {
            return Err(bad(format!(
                "it holds domain {}, not {}: restore it into the domain it was saved from",
                header.domain, self.inner.id
            )));
        }
        if header.memory_mib != self.inner.config.memory_mib {
            return Err(bad(format!(
                "it was saved with {} MiB of memory but the domain now has {} MiB: restore \
                 with the config it was saved with",
                header.memory_mib, self.inner.config.memory_mib
            )));
        }
        Ok((file, header))
    }

    async fn restore_inner(&self, path: &Path, options: RestoreOptions) -> Result<()> {
        let operation = Operation::Restore;
        self.ensure_inactive(operation)?;
        // Reading and verifying a multi-GiB stream: not on a runtime worker.
        let checked = {
            let me = self.clone();
            let path = path.to_owned();
            tokio::task::spawn_blocking(move || me.check_save_file(&path))
                .await
                .unwrap_or_else(|e| Err(backend(format!("checking the save file: {e}"))))
        };
        let (file, header) = match checked {
            Ok(ok) => ok,
            Err(e) => {
                self.inner.cell.observe(Observation::CreateFailed);
                return Err(e);
            }
        };
        let instance = match self.launch(operation, true, header.devices.clone()).await {
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
            // The file was verified against its digest: a migration that fails now failed
            // for another reason (QEMU killed, out of memory), and says so.
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

    /// The request half of a shutdown, under the operation lock: check the state (§6.3),
    /// send the request, and wait (until `deadline`) for its acknowledgement.
    async fn shutdown_request(&self, mode: ShutdownMode, deadline: Instant) -> Result<()> {
        let operation = Operation::Shutdown;
        if mode == ShutdownMode::Paravirt {
            return Err(unsupported_paravirt(operation));
        }
        match self.state() {
            DomainState::Running(_) | DomainState::ShuttingDown(ShuttingDownReason::User) => {}
            _ => return Err(self.invalid(operation)),
        }
        let instance = self.running_instance(operation)?;
        let within = |d: Instant| d.saturating_duration_since(Instant::now());
        // The intent is held until the request is acknowledged (state shutting_down(user)),
        // not until completion: from then on the state alone says the end is a shutdown, and
        // an end nobody explains (QEMU killed while we wait) stays a crash.
        let _intent = self.inner.cell.intent(Intent::Shutdown);
        match mode {
            ShutdownMode::Agent => {
                // The caller's timeout bounds the agent too (its resync has a timeout of its
                // own that may be longer).
                let asked = self.agent_shutdown(&instance, operation, false);
                tokio::time::timeout(within(deadline), asked)
                    .await
                    .map_err(|_| {
                        timeout(
                            operation,
                            within(deadline),
                            "the guest agent did not take the shutdown request in time",
                        )
                    })??;
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
        self.inner
            .cell
            .wait_for(operation, within(deadline), |s| {
                matches!(s, DomainState::ShuttingDown(_)) || !s.is_active()
            })
            .await?;
        Ok(())
    }

    /// The waiting half of a shutdown: the caller's, not the operation lock's (§6.0).
    async fn shutdown_wait(
        &self,
        options: ShutdownOptions,
        deadline: Instant,
    ) -> Result<ShutdownOutcome> {
        let operation = Operation::Shutdown;
        let left = deadline.saturating_duration_since(Instant::now());
        let state = match options.wait {
            ShutdownWait::Acknowledged => Ok(self.state()),
            // Ends at once on an end that can never be a shutdown (§6.3).
            ShutdownWait::Completed => {
                self.inner
                    .cell
                    .wait_for(operation, left, |s| {
                        !s.is_active()
                            || matches!(
                                s,
                                DomainState::Crashed(_)
                                    | DomainState::Paused(PausedReason::ShuttingDown)
                            )
                    })
                    .await
            }
        };
        match state {
            Ok(DomainState::Shutoff(ShutoffReason::Shutdown)) => Ok(ShutdownOutcome::Completed),
            Ok(state @ DomainState::Shutoff(ShutoffReason::Destroyed)) => Err(Error::Interrupted {
                operation,
                by: Operation::Destroy,
                state,
            }),
            Ok(state) if options.wait == ShutdownWait::Completed || !state.is_active() => {
                Err(backend(format!(
                    "shutdown: the domain ended as {state} instead of shutting down"
                )))
            }
            Ok(_) => Ok(ShutdownOutcome::Acknowledged),
            Err(Error::Timeout { .. }) if options.destroy_on_timeout => {
                tracing::info!(domain = %self.inner.id.name, "shutdown timed out: destroying");
                self.destroy().await?;
                Ok(ShutdownOutcome::Destroyed)
            }
            Err(Error::Timeout { .. }) => Err(timeout(
                operation,
                options.timeout,
                format!(
                    "the guest did not shut down (it is {}); the request stays pending in the \
                     guest and the domain stays operable: destroy it, or ask with \
                     destroy_on_timeout",
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
            if operation == Operation::GuestAgent {
                return Err(Error::NoGuestAgent {
                    domain: self.inner.id.name.clone(),
                    reason: String::new(),
                });
            }
            // An operation with an agent mode (§6.3): that mode is unsupported here.
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
    /// operations (guest-exec, ...). The same connection domkit uses. Also
    /// [`domkit_core::Domain::guest_agent`].
    pub async fn guest_agent(&self) -> Result<Arc<GuestAgent>> {
        let operation = Operation::GuestAgent;
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
            .map_err(|e| agent_to_core(operation, e))
    }

    async fn agent_suspend_ram(&self, instance: &Instance) -> Result<()> {
        let operation = Operation::PmSuspend;
        let agent = self.agent_of(instance, operation).await?;
        agent
            .suspend_ram()
            .await
            .map_err(|e| agent_to_core(operation, e))
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
        reason: UNSUPPORTED_PARAVIRT.into(),
    }
}

impl QemuDomain {
    async fn start_inner(&self, options: domkit_core::StartOptions) -> Result<()> {
        let operation = Operation::Start;
        self.ensure_inactive(operation)?;
        let instance = match self.launch(operation, false, None).await {
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
                let err = self.launch_failure_after_start(&instance, err).await;
                self.abandon(&instance).await;
                return Err(err);
            }
        }
        self.created(&instance, Creation::Boot, options.paused);
        Ok(())
    }

    /// A QEMU that exits right after its monitor came up (bad kernel, no memory for the
    /// guest) has said why in its log: that is the error, not the broken monitor.
    async fn launch_failure_after_start(&self, instance: &Instance, err: Error) -> Error {
        if !instance.wait_ended(Duration::from_secs(1)).await {
            return err;
        }
        let said = process::read_log_since(&self.inner.paths.qemu_log, instance.log_start);
        let said = said.trim();
        if said.is_empty() {
            return err;
        }
        backend(format!(
            "QEMU failed to start the domain: it exited right after launch; QEMU said: {said}"
        ))
    }

    async fn pause_inner(&self) -> Result<()> {
        let operation = Operation::Pause;
        match self.state() {
            DomainState::Paused(_) => return Ok(()), // §6.2: no-op, no event
            // §6.3: a pending shutdown request leaves the domain operable.
            DomainState::Running(_) | DomainState::ShuttingDown(ShuttingDownReason::User) => {}
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
            .wait_for(operation, self.command_timeout(), |s| {
                s.is_paused() || !s.is_active()
            })
            .await?;
        if !state.is_paused() {
            return Err(backend(format!("pause: the domain became {state} instead")));
        }
        Ok(())
    }

    async fn resume_inner(&self) -> Result<()> {
        let operation = Operation::Resume;
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
            return Err(self.invalid(operation));
        }
        Ok(())
    }

    async fn reboot_inner(&self, mode: ShutdownMode, within: Duration) -> Result<()> {
        let operation = Operation::Reboot;
        match self.state() {
            DomainState::Running(_) | DomainState::ShuttingDown(ShuttingDownReason::User) => {}
            _ => return Err(self.invalid(operation)),
        }
        if mode == ShutdownMode::Paravirt {
            return Err(unsupported_paravirt(operation));
        }
        let instance = self.running_instance(operation)?;
        let mut events = self.subscribe();
        // Held until the reboot happened: the guest's poweroff that a fake reboot produces
        // must read as a reboot, not as the guest's own poweroff.
        let _intent = self.inner.cell.intent(Intent::Reboot);
        match mode {
            // QEMU fake reboot: power button; the guest powers off; the lifecycle turns
            // that into one Rebooted and a Restart (system_reset + cont), see
            // supervisor.rs.
            ShutdownMode::Agent => self.agent_shutdown(&instance, operation, true).await?,
            _ => instance
                .qmp
                .system_powerdown()
                .await
                .map_err(|e| self.qmp_error(operation, "system_powerdown", e))?,
        }
        self.wait_event(&mut events, operation, within, |k| {
            *k == EventKind::Rebooted
        })
        .await?;
        Ok(())
    }

    async fn reset_inner(&self) -> Result<()> {
        let operation = Operation::Reset;
        match self.state() {
            DomainState::Running(_) | DomainState::ShuttingDown(ShuttingDownReason::User) => {}
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

    async fn pm_suspend_inner(&self, target: PmSuspendTarget) -> Result<()> {
        let operation = Operation::PmSuspend;
        if target == PmSuspendTarget::Disk {
            return Err(Error::Unsupported {
                operation,
                backend: BACKEND.into(),
                reason: UNSUPPORTED_S4.into(),
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
            .await?;
        Ok(())
    }

    async fn pm_wakeup_inner(&self) -> Result<()> {
        let operation = Operation::PmWakeup;
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

/// Why S4 is refused (also in the driver's capabilities).
pub(crate) const UNSUPPORTED_S4: &str = "suspend to disk (S4) makes the guest write its memory \
     to its own disk and QEMU exit, which domkit cannot tell from a poweroff; use save instead";

/// Why paravirtual shutdown is refused (also in the driver's capabilities).
pub(crate) const UNSUPPORTED_PARAVIRT: &str =
    "QEMU guests have no paravirtual shutdown channel: use mode acpi or agent";

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

    fn snapshot(&self) -> domkit_core::Snapshot {
        let (state, seq, events) = self.inner.cell.snapshot_and_subscribe();
        domkit_core::Snapshot { state, seq, events }
    }

    fn subscribe_from(&self, after: u64) -> Result<EventStream> {
        self.inner.cell.subscribe_from(after)
    }

    fn backend_name(&self) -> &'static str {
        BACKEND
    }

    async fn stats(&self) -> Result<DomainStats> {
        self.stats_now().await
    }

    async fn console(&self, access: ConsoleAccess) -> Result<ConsoleStream> {
        self.open_console(access).await
    }

    async fn start(&self, options: domkit_core::StartOptions) -> Result<()> {
        self.run_op(Operation::Start, move |d| async move {
            d.start_inner(options).await
        })
        .await
    }

    async fn pause(&self) -> Result<()> {
        self.run_op(Operation::Pause, |d| async move { d.pause_inner().await })
            .await
    }

    async fn resume(&self) -> Result<()> {
        self.run_op(Operation::Resume, |d| async move { d.resume_inner().await })
            .await
    }

    async fn shutdown(&self, options: ShutdownOptions) -> Result<ShutdownOutcome> {
        let deadline = Instant::now() + options.timeout;
        let requested = self
            .run_op(Operation::Shutdown, move |d| async move {
                d.shutdown_request(options.mode, deadline).await
            })
            .await;
        match requested {
            Ok(()) => self.shutdown_wait(options, deadline).await,
            Err(Error::Timeout { .. }) if options.destroy_on_timeout => {
                tracing::info!(domain = %self.inner.id.name, "shutdown request timed out: destroying");
                self.destroy().await?;
                Ok(ShutdownOutcome::Destroyed)
            }
            Err(e) => Err(e),
        }
    }

    async fn reboot(&self, mode: ShutdownMode, within: Duration) -> Result<()> {
        let started = Instant::now();
        self.run_op(Operation::Reboot, move |d| async move {
            d.reboot_inner(mode, within).await
        })
        .await?;
        let left = within.saturating_sub(started.elapsed());
        self.wait_restart_done(Operation::Reboot, left.max(Duration::from_secs(5)))
            .await
    }

    async fn reset(&self) -> Result<()> {
        self.run_op(Operation::Reset, |d| async move { d.reset_inner().await })
            .await
    }

    async fn destroy(&self) -> Result<()> {
        // Never queued (§6.0): destroy must be able to end a domain whose operation hangs on
        // the guest. Its own task, so a caller that gives up cannot drop the destroy intent
        // before the end it explains.
        let me = self.clone();
        tokio::spawn(async move { me.destroy_inner().await })
            .await
            .unwrap_or_else(|e| Err(backend(format!("destroy: the task failed: {e}"))))
    }

    async fn save(&self, path: &Path) -> Result<()> {
        let path = path.to_owned();
        self.run_op(Operation::Save, move |d| async move {
            d.save_inner(&path).await
        })
        .await
    }

    async fn restore(&self, path: &Path, options: RestoreOptions) -> Result<()> {
        let path = path.to_owned();
        self.run_op(Operation::Restore, move |d| async move {
            d.restore_inner(&path, options).await
        })
        .await
    }

    async fn pm_suspend(&self, target: PmSuspendTarget) -> Result<()> {
        self.run_op(Operation::PmSuspend, move |d| async move {
            d.pm_suspend_inner(target).await
        })
        .await
    }

    async fn devices(&self) -> Result<Vec<DeviceInfo>> {
        self.devices_now()
    }

    async fn defined_devices(&self) -> Result<Vec<DeviceInfo>> {
        self.defined_devices_now()
    }

    async fn attach_device(&self, device: DeviceSpec, scope: DeviceScope) -> Result<DeviceId> {
        self.run_op(Operation::AttachDevice, move |d| async move {
            d.attach_inner(device, scope).await
        })
        .await
    }

    async fn detach_device(&self, id: DeviceId, options: DetachOptions) -> Result<()> {
        self.run_op(Operation::DetachDevice, move |d| async move {
            d.detach_inner(id, options).await
        })
        .await
    }

    async fn change_media(
        &self,
        id: DeviceId,
        medium: Option<PathBuf>,
        scope: DeviceScope,
    ) -> Result<()> {
        self.run_op(Operation::ChangeMedia, move |d| async move {
            d.change_media_inner(id, medium, scope).await
        })
        .await
    }

    async fn pm_wakeup(&self) -> Result<()> {
        self.run_op(
            Operation::PmWakeup,
            |d| async move { d.pm_wakeup_inner().await },
        )
        .await
    }

    // The guest agent (§13): outside the operation queue, so a hung agent never holds up
    // the domain's lifecycle operations (§13.5).
    async fn guest_agent(&self) -> Result<Arc<GuestAgent>> {
        QemuDomain::guest_agent(self).await
    }
}

// ---- Devices (§14) ---------------------------------------------------------------------

/// A bridge name that is safe to look up and exists as a bridge on this host
/// (`/sys/class/net/<name>/bridge`).
fn check_bridges<'a>(nics: impl IntoIterator<Item = &'a domkit_core::Nic>) -> Result<()> {
    for nic in nics {
        if let domkit_core::NicBackend::Bridge(br) = &nic.backend {
            let safe = !br.is_empty()
                && br.len() <= 15
                && br
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
                && br != "."
                && br != "..";
            if !safe || !Path::new("/sys/class/net").join(br).join("bridge").is_dir() {
                return Err(Error::InvalidConfig(ConfigError::MissingBridge {
                    bridge: br.clone(),
                }));
            }
        }
    }
    Ok(())
}

fn device_not_found(domain: &str, id: DeviceId) -> Error {
    Error::NotFound {
        what: format!("device {:?} of domain {domain:?}", id.as_str()),
    }
}

fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

impl QemuDomain {
    /// The current definition (the config with the device changes of scope `config`).
    pub fn definition(&self) -> DomainConfig {
        self.inner
            .definition
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replace the definition, durably for a persistent driver (§11.2) before it is used.
    fn set_definition(&self, config: DomainConfig) -> Result<()> {
        if let Some(p) = &self.inner.persisted {
            p.save_definition(&config)
                .map_err(|e| Error::io("persisting the changed definition", e))?;
        }
        *self
            .inner
            .definition
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = config;
        Ok(())
    }

    /// Put the instance's device set into the durable status (written with the next
    /// event, under the lifecycle lock, §11.2).
    fn record_devices(&self, instance: &Instance) {
        if let Some(p) = &self.inner.persisted {
            p.set_devices(serde_json::to_value(&*instance.devices()).ok());
        }
    }

    fn emit_device(&self, kind: EventKind) {
        if let Some(instance) = self.instance() {
            self.record_devices(&instance);
        }
        self.inner.cell.emit(|lc, at| lc.device_event(kind, at));
    }

    /// The instance a live device change works on: running or paused (not shutting down,
    /// not preserved, not suspended to memory).
    fn live_instance(&self, operation: Operation) -> Result<Arc<Instance>> {
        match self.state() {
            DomainState::Running(_) => {}
            DomainState::Paused(p) if p != PausedReason::ShuttingDown => {}
            _ => return Err(self.invalid(operation)),
        }
        self.running_instance(operation)
    }

    /// The devices now: the instance's while active, else the definition's.
    pub fn devices_now(&self) -> Result<Vec<DeviceInfo>> {
        if let Some(instance) = self.instance() {
            return Ok(instance.devices().infos());
        }
        self.defined_devices_now()
    }

    fn defined_devices_now(&self) -> Result<Vec<DeviceInfo>> {
        Ok(DeviceSet::from_config(&self.definition(), self.inner.id.uuid)?.infos())
    }

    async fn attach_inner(&self, spec: DeviceSpec, scope: DeviceScope) -> Result<DeviceId> {
        let operation = Operation::AttachDevice;
        // Checks that touch nothing first: a bad device changes nothing (§14).
        match &spec {
            DeviceSpec::Disk(d) => domkit_core::config::check_image("disk.path", &d.path)?,
            DeviceSpec::Nic(n) => {
                if let Some(mac) = &n.mac {
                    if !domkit_core::config::is_valid_mac(mac) {
                        return Err(Error::InvalidConfig(ConfigError::BadMac {
                            index: 0,
                            mac: mac.clone(),
                        }));
                    }
                }
                check_bridges([n])?;
            }
        }
        let uuid = self.inner.id.uuid;
        // The definition after the change, checked whole (ids, MACs, slots) before any.
        let new_definition = if scope.config() {
            let mut def = self.definition();
            let current = DeviceSet::from_config(&def, uuid)?;
            match &spec {
                DeviceSpec::Disk(d) => {
                    let mut d = d.clone();
                    let plan = current.plan_disk(&d)?;
                    d.id = plan.disk.id;
                    def.disks.push(d);
                }
                DeviceSpec::Nic(n) => {
                    let mut n = n.clone();
                    let plan = current.plan_nic(&n, uuid)?;
                    n.id = plan.nic.id;
                    n.mac = plan.nic.mac;
                    def.nics.push(n);
                }
            }
            DeviceSet::from_config(&def, uuid)?;
            Some(def)
        } else {
            None
        };
        let id = if scope.live() {
            let instance = self.live_instance(operation)?;
            let qmp = &instance.qmp;
            let cmd = |c: &'static str| move |e| self.qmp_error(operation, c, e);
            match &spec {
                DeviceSpec::Disk(d) => {
                    let plan = instance.devices().plan_disk(d)?;
                    let path = d.path.to_str().ok_or_else(|| {
                        Error::InvalidConfig(ConfigError::NotAFile {
                            field: "disk.path (not UTF-8)".into(),
                            path: d.path.clone(),
                        })
                    })?;
                    let args = devices::blockdev_add_args(&plan, path, is_block_device(&d.path));
                    qmp.execute("blockdev-add", Some(args))
                        .await
                        .map_err(cmd("blockdev-add"))?;
                    if let Err(e) = qmp
                        .execute("device_add", Some(devices::disk_device_add_args(&plan)))
                        .await
                    {
                        // Nothing half-added stays behind.
                        let _ = qmp
                            .execute("blockdev-del", Some(json!({ "node-name": plan.node })))
                            .await;
                        return Err(self.qmp_error(operation, "device_add", e));
                    }
                    let id = plan.disk.id.unwrap_or_else(|| DeviceId::default_disk(0));
                    instance.devices().disks.push(plan);
                    id
                }
                DeviceSpec::Nic(n) => {
                    let plan = instance.devices().plan_nic(n, uuid)?;
                    qmp.execute("netdev_add", Some(devices::netdev_add_args(&plan)))
                        .await
                        .map_err(cmd("netdev_add"))?;
                    if let Err(e) = qmp
                        .execute("device_add", Some(devices::nic_device_add_args(&plan)))
                        .await
                    {
                        let id = plan.nic.id.map(|i| i.to_string()).unwrap_or_default();
                        let _ = qmp
                            .execute("netdev_del", Some(json!({ "id": format!("net-{id}") })))
                            .await;
                        return Err(self.qmp_error(operation, "device_add", e));
                    }
                    let id = plan.nic.id.unwrap_or_else(|| DeviceId::default_nic(0));
                    instance.devices().nics.push(plan);
                    id
                }
            }
        } else {
            match (&spec, &new_definition) {
                (DeviceSpec::Disk(_), Some(def)) => def.disks.last().and_then(|d| d.id),
                (DeviceSpec::Nic(_), Some(def)) => def.nics.last().and_then(|n| n.id),
                _ => None,
            }
            .unwrap_or_else(|| DeviceId::default_disk(0))
        };
        if scope.live() {
            self.emit_device(EventKind::DeviceAdded(id));
        }
        if let Some(mut def) = new_definition {
            // Both: the definition gets the id the live device got.
            if scope.live() {
                if let DeviceSpec::Disk(_) = spec {
                    if let Some(d) = def.disks.last_mut() {
                        d.id = Some(id);
                    }
                } else if let Some(n) = def.nics.last_mut() {
                    n.id = Some(id);
                }
            }
            self.set_definition(def)?;
        }
        Ok(id)
    }

    /// After QEMU deleted a device: free its backend (a hotplugged block node, a netdev;
    /// a `-drive` backend goes with its device), drop it from the set, emit `DeviceRemoved`
    /// once (whoever sees the deletion first).
    async fn device_deleted(&self, instance: &Instance, id: DeviceId) {
        let (node, nic) = {
            let devices = instance.devices();
            let node = devices
                .disk(id)
                .map(|d| d.node.clone())
                .filter(|n| n.starts_with("drive-"));
            (node, devices.nic(id).is_some())
        };
        if let Some(node) = node {
            let _ = instance
                .qmp
                .execute("blockdev-del", Some(json!({ "node-name": node })))
                .await;
        }
        if nic {
            let _ = instance
                .qmp
                .execute("netdev_del", Some(json!({ "id": format!("net-{id}") })))
                .await;
        }
        if instance.devices().remove(id) {
            self.emit_device(EventKind::DeviceRemoved(id));
        }
    }

    /// Whether QEMU still has the device (`qom-list /machine/peripheral`); `None` if QEMU
    /// did not answer.
    async fn device_present(&self, instance: &Instance, id: DeviceId) -> Option<bool> {
        let reply = instance
            .qmp
            .execute("qom-list", Some(json!({ "path": "/machine/peripheral" })))
            .await
            .ok()?;
        Some(devices::peripheral_has(&reply, id))
    }

    async fn detach_inner(&self, id: DeviceId, options: DetachOptions) -> Result<()> {
        let operation = Operation::DetachDevice;
        let name = &self.inner.id.name;
        let new_definition = if options.scope.config() {
            let mut def = self.definition();
            let set = DeviceSet::from_config(&def, self.inner.id.uuid)?;
            let di = set.disks.iter().position(|d| d.disk.id == Some(id));
            let ni = set.nics.iter().position(|n| n.nic.id == Some(id));
            match (di, ni) {
                (Some(i), _) => {
                    def.disks.remove(i);
                }
                (_, Some(i)) => {
                    def.nics.remove(i);
                }
                _ => return Err(device_not_found(name, id)),
            }
            Some(def)
        } else {
            None
        };
        if options.scope.live() {
            let instance = self.live_instance(operation)?;
            {
                let devices = instance.devices();
                match devices.disk(id) {
                    Some(d) if d.disk.cdrom => {
                        return Err(Error::InvalidConfig(ConfigError::BadDeviceChange {
                            id: id.to_string(),
                            problem:
                                "a CD-ROM drive (IDE) cannot be unplugged: eject its medium instead"
                                    .into(),
                        }))
                    }
                    Some(_) => {}
                    None if devices.nic(id).is_some() => {}
                    None => return Err(device_not_found(name, id)),
                }
            }
            let mut events = instance.qmp.subscribe();
            match instance
                .qmp
                .execute("device_del", Some(json!({ "id": id.as_str() })))
                .await
            {
                Ok(_) => {}
                // A request of an earlier (timed out) detach is still with the guest.
                Err(QmpError::CommandFailed { desc, .. })
                    if devices::unplug_already_pending(&desc) => {}
                Err(e) => return Err(self.qmp_error(operation, "device_del", e)),
            }
            let deadline = Instant::now() + options.timeout;
            let outcome = loop {
                match tokio::time::timeout_at(deadline, events.recv()).await {
                    // The truth at the deadline: the event may have been among lost ones.
                    Err(_) => match self.device_present(&instance, id).await {
                        Some(false) => break Some(devices::DeviceFact::Deleted(id)),
                        _ => break None,
                    },
                    Ok(Err(EventRecvError::Lagged(_))) => {
                        if self.device_present(&instance, id).await == Some(false) {
                            break Some(devices::DeviceFact::Deleted(id));
                        }
                    }
                    Ok(Err(EventRecvError::Closed)) => {
                        return Err(Error::ControlBroken {
                            domain: name.clone(),
                            reason: format!(
                                "the QMP connection closed while waiting for the guest to release device {id}"
                            ),
                        })
                    }
                    Ok(Ok(ev)) => match devices::device_fact(&ev.name, &ev.data) {
                        Some(f @ devices::DeviceFact::Deleted(d)) if d == id => break Some(f),
                        Some(f @ devices::DeviceFact::UnplugRefused(d)) if d == id => {
                            break Some(f)
                        }
                        _ => {}
                    },
                }
            };
            match outcome {
                Some(devices::DeviceFact::Deleted(_)) => self.device_deleted(&instance, id).await,
                Some(devices::DeviceFact::UnplugRefused(_)) => {
                    self.emit_device(EventKind::DeviceRemovalFailed(id));
                    return Err(backend(format!(
                        "detach_device: the guest refused to release device {id} \
                         (DEVICE_UNPLUG_GUEST_ERROR): it is still attached"
                    )));
                }
                None => {
                    self.emit_device(EventKind::DeviceRemovalFailed(id));
                    // The request stays with the guest: a later release is still seen.
                    let me = self.clone();
                    let late = instance.clone();
                    tokio::spawn(async move {
                        while let Ok(ev) = events.recv().await {
                            if devices::device_fact(&ev.name, &ev.data)
                                == Some(devices::DeviceFact::Deleted(id))
                            {
                                me.device_deleted(&late, id).await;
                                break;
                            }
                        }
                    });
                    return Err(timeout(
                        operation,
                        options.timeout,
                        format!(
                            "device {id} is still attached: the guest did not release it \
                             (its unplug request stays pending; a device_removed event \
                             follows if the guest releases it later)"
                        ),
                    ));
                }
            }
        }
        if let Some(def) = new_definition {
            self.set_definition(def)?;
        }
        Ok(())
    }

    async fn change_media_inner(
        &self,
        id: DeviceId,
        medium: Option<PathBuf>,
        scope: DeviceScope,
    ) -> Result<()> {
        let operation = Operation::ChangeMedia;
        let name = &self.inner.id.name;
        if let Some(p) = &medium {
            domkit_core::config::check_image("medium", p)?;
        }
        let not_cdrom = || {
            Error::InvalidConfig(ConfigError::BadDeviceChange {
                id: id.to_string(),
                problem: "it is not a CD-ROM drive: only a CD-ROM's medium can be changed".into(),
            })
        };
        let new_definition =
            if scope.config() {
                let mut def = self.definition();
                let set = DeviceSet::from_config(&def, self.inner.id.uuid)?;
                let i = set
                    .disks
                    .iter()
                    .position(|d| d.disk.id == Some(id))
                    .ok_or_else(|| device_not_found(name, id))?;
                if !def.disks[i].cdrom {
                    return Err(not_cdrom());
                }
                match &medium {
                    Some(p) => def.disks[i].path = p.clone(),
                    None => return Err(Error::InvalidConfig(ConfigError::BadDeviceChange {
                        id: id.to_string(),
                        problem:
                            "a defined CD-ROM always has a medium: eject it live, or insert another"
                                .into(),
                    })),
                }
                Some(def)
            } else {
                None
            };
        if scope.live() {
            let instance = self.live_instance(operation)?;
            let format = match instance.devices().disk(id) {
                None => return Err(device_not_found(name, id)),
                Some(d) if !d.disk.cdrom => return Err(not_cdrom()),
                Some(d) => match d.disk.format {
                    domkit_core::DiskFormat::Raw => "raw",
                    domkit_core::DiskFormat::Qcow2 => "qcow2",
                },
            };
            let empty = instance.devices().disk(id).is_some_and(|d| d.ejected);
            match &medium {
                // An empty tray stays empty: no-op, no event (like §6.2).
                None if empty => {}
                None => {
                    instance
                        .qmp
                        .execute("eject", Some(json!({ "id": id.as_str(), "force": true })))
                        .await
                        .map_err(|e| self.qmp_error(operation, "eject", e))?;
                    let mut devices = instance.devices();
                    if let Some(d) = devices.disks.iter_mut().find(|d| d.disk.id == Some(id)) {
                        d.ejected = true;
                    }
                }
                Some(p) => {
                    let path = p.to_str().ok_or_else(|| {
                        Error::InvalidConfig(ConfigError::NotAFile {
                            field: "medium (not UTF-8)".into(),
                            path: p.clone(),
                        })
                    })?;
                    instance
                        .qmp
                        .execute(
                            "blockdev-change-medium",
                            Some(json!({
                                "id": id.as_str(),
                                "filename": path,
                                "format": format,
                                "read-only-mode": "read-only",
                            })),
                        )
                        .await
                        .map_err(|e| self.qmp_error(operation, "blockdev-change-medium", e))?;
                    let mut devices = instance.devices();
                    if let Some(d) = devices.disks.iter_mut().find(|d| d.disk.id == Some(id)) {
                        d.ejected = false;
                        d.disk.path = p.clone();
                    }
                }
            }
            match medium {
                None if empty => {}
                None => self.emit_device(EventKind::DeviceRemoved(id)),
                Some(_) => self.emit_device(EventKind::DeviceAdded(id)),
            }
        }
        if let Some(def) = new_definition {
            self.set_definition(def)?;
        }
        Ok(())
    }
}
