//! [`LibxlDomain`]: one domkit domain backed by a Xen domain (a domid that changes on every
//! restart and restore), and the [`Domain`] trait implementation.
//!
//! Concurrency (`docs/semantics.md` §6.0):
//! - `ops` (async, FIFO mutex): serialises API operations and policy restarts of this
//!   domain. A caller queues for it before its work is spawned; once it holds it, its libxl
//!   calls run on a blocking thread that finishes even if the caller's future is dropped.
//!   It is held only while libxl is called, never while waiting for the guest (shutdown and
//!   reboot send the request under it and wait in the caller's future).
//! - `destroy` never takes `ops`: it stashes `Destroy` and destroys the current Xen domain
//!   from its own blocking thread, concurrently with whatever holds `ops` (libxl's ctx is
//!   thread-safe). The preempted libxl call fails or returns; the operation sees that a
//!   destroy ran meanwhile (`destroys` changed) and returns `Error::Interrupted`. A create in
//!   progress (start, restore, policy restart, reset) has no domid yet: destroy kills the
//!   Xen domain with our uuid and waits until the create is over (`Backend::creating`).
//!   Policy destroys (after a poweroff or a crash) do not take `ops` either.
//! - `backend` (std mutex): the current domid, its death watch and whether a create is in
//!   progress. The event dispatcher takes it to check that an event belongs to the current
//!   watch, so creation paths hold it from `libxl_evenable_domain_death` until `Created` is
//!   fed: no event can overtake `Created`. Order: `backend` before the cell's lock and
//!   libxl's ctx lock; never held across a long libxl call.
//! - A save commits its file and stashes `SaveCommitted` in one step under the cell's lock,
//!   where `destroy` stashes `Destroy`: either the save is committed first (the end is
//!   `saved`; the destroy only ends the suspended domain) or the destroy is (the save is
//!   interrupted and leaves no file).

use crate::agent::{self as xagent, AgentLink, Seen};
use crate::context::{Context, DeathWatch, DomInfo, LibxlError};
use crate::devices::XenDeviceSet;
use crate::driver::PersistedDomain;
use crate::ephemeral::Reaper;
use crate::observe::{self, ConsoleLink};
use crate::reattach::{self, Plan, SaveEvidence};
use crate::savefile::{self, SaveHeader, SaveTarget};
use crate::stats::{self as xstats, XenReadings};
use crate::translate::{
    translate_event, translate_input, Fact, FollowUp, LibxlEvent, LibxlEventKind, TraceEntry,
    TraceInput, REASON_SUSPEND,
};
use async_trait::async_trait;
use domkit_core::device::{DetachOptions, DeviceId, DeviceInfo, DeviceScope, DeviceSpec};
use domkit_core::store::{InFlight, StoredStatus};
use domkit_core::{
    ConsoleAccess, ConsoleStream, ControlState, Creation, Domain, DomainConfig, DomainId,
    DomainInfo, DomainState, DomainStats, Error, EventKind, EventStream, Intent, IntentToken,
    LifecycleCell, Observation, Operation, PausedReason, PmSuspendTarget, PolicyAction,
    RestoreOptions, Result, ShutdownMode, ShutdownOptions, ShutdownOutcome, ShutdownWait,
    ShutoffReason, ShuttingDownReason, StartOptions, StoppedDetail,
};
use futures::StreamExt;
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

/// The backend name in errors and capabilities.
pub const BACKEND: &str = "libxl";

/// How many trace entries a domain keeps ([`LibxlDomain::trace`]).
const TRACE_LEN: usize = 512;

/// How long an operation preempted by a destroy waits for the domain to end before it
/// reports the state it sees.
const INTERRUPTED_SETTLE: Duration = Duration::from_secs(30);

/// How long an operation whose domain died under it waits for the death to be observed.
const GONE_SETTLE: Duration = Duration::from_secs(10);

/// How long a save waits for a booting PV guest to become saveable (libxl's own limit for
/// a guest's answer to a suspend request).
const SAVE_READY_WAIT: Duration = Duration::from_secs(60);
/// A failed `libxl_domain_suspend` this quick had not asked the guest anything yet.
const GUEST_NOT_READY_FAILS_WITHIN: Duration = Duration::from_secs(10);
/// Between two attempts to save a guest that is not ready.
const SAVE_RETRY_PAUSE: Duration = Duration::from_millis(500);

/// Why Xen PV/PVH guests cannot be shut down or rebooted with the ACPI power button.
pub(crate) const UNSUPPORTED_ACPI: &str =
    "ACPI power button: Xen PV/PVH guests have no ACPI power button (libxl_send_trigger \
     POWER is HVM-only); use the default (paravirtual) mode";
/// Why the agent mode is unsupported for a domain without an agent channel.
pub(crate) const UNSUPPORTED_AGENT: &str =
    "guest agent: the domain has no guest agent channel: add `[[channels]] kind = \
     \"guest_agent\"` to its config, or use the default (paravirtual) mode";
/// Why suspend to disk is unsupported.
pub(crate) const UNSUPPORTED_S4: &str =
    "suspend to disk (S4): libxl has no guest hibernation request for PV/PVH guests; use \
     save() to keep the state in a file";

/// Maps death-watch tokens (`for_user`) to domains, for the event dispatcher.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    next: AtomicU64,
    map: Mutex<HashMap<u64, Weak<DomainInner>>>,
}

impl Registry {
    fn token(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn insert(&self, token: u64, d: Weak<DomainInner>) {
        lock(&self.map).insert(token, d);
    }

    fn remove(&self, token: u64) {
        lock(&self.map).remove(&token);
    }

    /// The domain watching with `token`, if any.
    pub(crate) fn get(&self, token: u64) -> Option<Arc<DomainInner>> {
        lock(&self.map).get(&token).and_then(Weak::upgrade)
    }

    /// Every registered domain.
    pub(crate) fn all(&self) -> Vec<Arc<DomainInner>> {
        lock(&self.map).values().filter_map(Weak::upgrade).collect()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Default)]
struct Backend {
    domid: Option<u32>,
    watch: Option<DeathWatch>,
    /// A create (start, restore, policy restart, reset) is in progress: the new domid is not
    /// known yet. Cleared under this lock when the domid is armed or the create failed.
    creating: bool,
}

pub(crate) struct DomainInner {
    me: Weak<DomainInner>,
    id: DomainId,
    config: DomainConfig,
    libxl_json: String,
    /// The domain's private runtime directory (channel sockets).
    runtime_dir: PathBuf,
    pub(crate) cell: LifecycleCell,
    ctx: Context,
    registry: Arc<Registry>,
    ops: Arc<tokio::sync::Mutex<()>>,
    backend: Mutex<Backend>,
    /// Notified when `Backend::creating` is cleared.
    created: Condvar,
    /// API destroys begun: an operation during which this changed was preempted.
    destroys: AtomicU64,
    /// API destroys in flight: an operation starts only once none is.
    destroying: tokio::sync::watch::Sender<usize>,
    trace: Mutex<Vec<TraceEntry>>,
    /// The durable status of a persistent driver's domain (§11.2, §11.4).
    persisted: Option<Arc<PersistedDomain>>,
    /// The reaper of an ephemeral driver (§11.0): told before every create.
    reaper: Option<Arc<Reaper>>,
    /// The driver detached (persistent drivers): this handle no longer controls the Xen
    /// domain; the next manager does.
    detached: AtomicBool,
    /// The console pump of the current run, made on its first `console()` (§12.4).
    console: tokio::sync::Mutex<Option<ConsoleLink>>,
    /// The devices of the current Xen domain, hotplugged ones included (§14.7): set at
    /// each create (the definition's; a restart's or restore's own), changed by attach and
    /// detach. `None` before the first create.
    live: Mutex<Option<XenDeviceSet>>,
    /// The definition as it is now: `config` with the device changes of scope config since
    /// (§14.2); what the next start creates.
    defined: Mutex<DomainConfig>,
    /// The guest agent over the PV channel, if the config has one (§13).
    agent: Option<AgentLink>,
}

impl std::fmt::Debug for DomainInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DomainInner")
            .field("id", &self.id)
            .field("state", &self.cell.state())
            .finish_non_exhaustive()
    }
}

fn backend_err(op: Operation, e: LibxlError) -> Error {
    Error::Backend {
        backend: BACKEND.into(),
        message: format!("{op}: {e}"),
    }
}

fn backend_msg(message: String) -> Error {
    Error::Backend {
        backend: BACKEND.into(),
        message,
    }
}

fn save_err(e: savefile::SaveFileError) -> Error {
    match e {
        savefile::SaveFileError::Io { context, source } => Error::Io { context, source },
        savefile::SaveFileError::Format { path, problem } => Error::Protocol {
            message: format!("{}: {problem}", path.display()),
        },
    }
}

/// A save file problem found by `restore`: a damaged, truncated or foreign file is
/// `BadSaveFile`; a file that cannot be read at all is `Io`.
fn restore_file_err(e: savefile::SaveFileError) -> Error {
    match e {
        savefile::SaveFileError::Io { context, source } => Error::Io { context, source },
        savefile::SaveFileError::Format { path, problem } => Error::BadSaveFile {
            path,
            reason: problem,
        },
    }
}

/// Pops one intent when dropped (the operation that stashed it is over).
struct TokenGuard<'a> {
    cell: &'a LifecycleCell,
    token: Option<IntentToken>,
}

impl Drop for TokenGuard<'_> {
    fn drop(&mut self) {
        if let Some(token) = self.token.take() {
            self.cell.with(|l| l.pop_intent(token));
        }
    }
}

/// A create in progress (`Backend::creating`); ends it on drop unless it ended already.
struct Creating<'a> {
    d: &'a DomainInner,
    done: bool,
}

impl Creating<'_> {
    fn end_locked(&mut self, b: &mut Backend) {
        if !self.done {
            self.done = true;
            b.creating = false;
            self.d.created.notify_all();
        }
    }
}

impl Drop for Creating<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut b = lock(&self.d.backend);
            self.end_locked(&mut b);
        }
    }
}

impl DomainInner {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: DomainId,
        config: DomainConfig,
        libxl_json: String,
        runtime_dir: PathBuf,
        cell: LifecycleCell,
        ctx: Context,
        registry: Arc<Registry>,
        persisted: Option<Arc<PersistedDomain>>,
        reaper: Option<Arc<Reaper>>,
    ) -> Arc<Self> {
        let defined = Mutex::new(config.clone());
        let agent = config
            .channels
            .iter()
            .find(|c| c.kind == domkit_core::ChannelKind::GuestAgent)
            .map(|c| {
                let root = runtime_dir.parent().unwrap_or(Path::new("/"));
                AgentLink::new(crate::config::channel_socket_path(
                    root,
                    &id.name,
                    c.port_name(),
                ))
            });
        let inner = Arc::new_cyclic(|me| DomainInner {
            me: me.clone(),
            id,
            config,
            libxl_json,
            runtime_dir,
            cell,
            ctx,
            registry,
            ops: Arc::new(tokio::sync::Mutex::new(())),
            backend: Mutex::new(Backend::default()),
            created: Condvar::new(),
            destroys: AtomicU64::new(0),
            destroying: tokio::sync::watch::Sender::new(0),
            trace: Mutex::new(Vec::new()),
            persisted,
            reaper,
            detached: AtomicBool::new(false),
            console: tokio::sync::Mutex::new(None),
            live: Mutex::new(None),
            defined,
            agent,
        });
        // The agent's presence (§13.4) is probed while the domain runs; without a runtime
        // (a driver built outside tokio) there are no agent events, the client still works.
        if inner.agent.is_some() {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(xagent::probe_loop(Arc::downgrade(&inner)));
                }
                Err(_) => {
                    tracing::warn!(domain = %inner.id.name, "no tokio runtime: the guest agent's presence is not probed (no agent events)")
                }
            }
        }
        inner
    }

    /// The guest agent link, if the config has an agent channel.
    pub(crate) fn agent_link(&self) -> Option<&AgentLink> {
        self.agent.as_ref()
    }

    /// The domain's name (logs).
    pub(crate) fn name(&self) -> &str {
        &self.id.name
    }

    /// Whether the driver detached (this handle controls nothing any more).
    pub(crate) fn is_detached(&self) -> bool {
        self.detached.load(Ordering::SeqCst)
    }

    /// Feed what the agent's probes (or the run's end) showed; emit the event it makes due,
    /// under the presence lock so that a probe's late answer cannot overtake a run's end.
    pub(crate) fn agent_seen(&self, seen: Seen) {
        let Some(link) = &self.agent else { return };
        let mut presence = lock(&link.presence);
        if let Some(connected) = presence.feed(seen) {
            tracing::info!(domain = %self.id.name, connected, "guest agent presence changed");
            self.cell.emit(|lc, at| lc.agent_event(connected, at));
        }
    }

    fn domid(&self) -> Option<u32> {
        lock(&self.backend).domid
    }

    /// Ephemeral: a Xen domain of ours may exist from now on (before a create, §11.0).
    fn track(&self) {
        if let Some(reaper) = &self.reaper {
            reaper.track(&self.id.name, self.id.uuid);
        }
    }

    /// Record the operation in flight in the durable status (persistent drivers, §11.4).
    fn set_in_flight(&self, in_flight: Option<InFlight>) {
        if let Some(p) = &self.persisted {
            p.set_in_flight(in_flight);
            self.cell.persist_now();
        }
    }

    fn invalid(&self, operation: Operation) -> Error {
        Error::InvalidState {
            current: self.cell.state(),
            operation,
        }
    }

    /// Make `set` the current instance's devices (and the persisted status's, §14.3).
    fn set_live(&self, set: XenDeviceSet) {
        if let Some(p) = &self.persisted {
            p.set_devices(serde_json::to_value(&set).ok());
        }
        *lock(&self.live) = Some(set);
    }

    /// Change the current instance's devices with `f` (under the lock: a detach completing
    /// in the background and an attach do not lose each other's change).
    fn update_live(&self, f: impl FnOnce(&mut XenDeviceSet)) -> Result<()> {
        let mut set = self.live_set()?;
        {
            let mut live = lock(&self.live);
            if let Some(current) = live.as_ref() {
                set = current.clone();
            }
            f(&mut set);
            *live = Some(set.clone());
        }
        if let Some(p) = &self.persisted {
            p.set_devices(serde_json::to_value(&set).ok());
        }
        Ok(())
    }

    fn emit_device(&self, kind: EventKind) {
        self.cell.emit(|lc, at| lc.device_event(kind, at));
    }

    /// The running (or paused) Xen domain a live device change applies to.
    fn live_domid(&self, operation: Operation) -> Result<u32> {
        match self.domid() {
            Some(domid) if self.cell.state().is_active() => Ok(domid),
            _ => Err(self.invalid(operation)),
        }
    }

    /// `attach_device`, live (§14.2, §14.7): plan against the current set (duplicate id,
    /// MAC, free name or devid: nothing touched on failure), then `libxl_device_disk_add`
    /// / `libxl_device_nic_add`; `device_added` once libxl returned.
    fn attach_blocking(&self, spec: DeviceSpec, scope: DeviceScope) -> Result<DeviceId> {
        let operation = Operation::AttachDevice;
        // Every check before anything changes (§14.4): against the definition (config)
        // and the running instance (live).
        let planned_id = if scope.config() {
            let defined = self.defined_set()?;
            match &spec {
                DeviceSpec::Disk(d) => defined.plan_disk(d)?.disk.id,
                DeviceSpec::Nic(n) => defined.plan_nic(n, self.id.uuid)?.nic.id,
            }
        } else {
            None
        };
        if !scope.live() {
            let id = planned_id.unwrap_or_else(|| DeviceId::default_disk(0));
            self.change_definition(|c| {
                match spec {
                    DeviceSpec::Disk(mut d) => {
                        d.id = Some(id);
                        c.disks.push(d);
                    }
                    DeviceSpec::Nic(mut n) => {
                        n.id = Some(id);
                        c.nics.push(n);
                    }
                }
                Ok(())
            })?;
            // Config only: nothing happened to a running domain, no event (§14.2).
            return Ok(id);
        }
        let domid = self.live_domid(operation)?;
        let set = self.live_set()?;
        match &spec {
            DeviceSpec::Disk(d) => drop(set.plan_disk(d)?),
            DeviceSpec::Nic(n) => drop(set.plan_nic(n, self.id.uuid)?),
        }
        let for_config = spec.clone();
        let id = match spec {
            DeviceSpec::Disk(disk) => {
                let plan = set.plan_disk(&disk)?;
                let id = plan.disk.id.unwrap_or_else(|| DeviceId::default_disk(0));
                let json = crate::devices::disk_json(&plan).to_string();
                self.ctx.disk_add(domid, &json).map_err(|e| {
                    backend_msg(format!("attach of disk {id} ({}): {e}", plan.vdev))
                })?;
                self.update_live(|s| s.disks.push(plan))?;
                id
            }
            DeviceSpec::Nic(nic) => {
                let plan = set.plan_nic(&nic, self.id.uuid)?;
                let id = plan.nic.id.unwrap_or_else(|| DeviceId::default_nic(0));
                let json = crate::devices::nic_json(&plan)
                    .map_err(|e| Error::Unsupported {
                        operation,
                        backend: BACKEND.into(),
                        reason: e.0,
                    })?
                    .to_string();
                self.ctx.nic_add(domid, &json).map_err(|e| {
                    backend_msg(format!(
                        "attach of NIC {id} (vif devid {}): {e}",
                        plan.devid
                    ))
                })?;
                self.update_live(|s| s.nics.push(plan))?;
                id
            }
        };
        self.emit_device(EventKind::DeviceAdded(id));
        if scope.config() {
            // Both: live first, then the definition, with the id (and MAC) live got.
            let live = self.live_set()?;
            self.change_definition(|c| {
                match for_config {
                    DeviceSpec::Disk(mut d) => {
                        d.id = Some(id);
                        c.disks.push(d);
                    }
                    DeviceSpec::Nic(mut n) => {
                        n.id = Some(id);
                        n.mac = live.nic(id).and_then(|x| x.nic.mac.clone()).or(n.mac);
                        c.nics.push(n);
                    }
                }
                Ok(())
            })?;
        }
        Ok(id)
    }

    /// `detach_device` (§14.2): live (see [`DomainInner::detach_live`]) then, for scope
    /// config or both, the definition; a failed live detach changes nothing.
    fn detach_blocking(&self, id: DeviceId, options: DetachOptions) -> Result<()> {
        if !options.scope.live() && !self.defined_set()?.has(id) {
            return Err(self.device_not_found(id));
        }
        if options.scope.live() {
            self.detach_live(id, options.timeout)?;
        }
        if options.scope.config() {
            self.change_definition(|c| {
                let before = c.disks.len() + c.nics.len();
                c.disks.retain(|d| d.id != Some(id));
                c.nics.retain(|n| n.id != Some(id));
                if before == c.disks.len() + c.nics.len() {
                    return Err(self.device_not_found(id));
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    fn device_not_found(&self, id: DeviceId) -> Error {
        Error::NotFound {
            what: format!("device {id:?} of domain {:?}", self.id.name),
        }
    }

    /// `detach_device`, live (§14.2, §14.7): `libxl_device_disk_remove` /
    /// `libxl_device_nic_remove` on a thread of its own, waited for up to `timeout`. libxl
    /// asks the frontend to close, waits for the backend (its own 10 s), then forces the
    /// removal; the device leaves the set with `device_removed` when the call returns, also
    /// after the caller's timeout (then `device_removal_failed` and `timeout` first).
    fn detach_live(&self, id: DeviceId, timeout: Duration) -> Result<()> {
        let operation = Operation::DetachDevice;
        let domid = self.live_domid(operation)?;
        let set = self.live_set()?;
        let (json, what) = if let Some(d) = set.disk(id) {
            (
                crate::devices::disk_remove_json(d),
                format!("disk {id} ({})", d.vdev),
            )
        } else if let Some(n) = set.nic(id) {
            let json = crate::devices::nic_json(n).map_err(|e| backend_msg(e.0))?;
            (json, format!("NIC {id} (vif devid {})", n.devid))
        } else {
            return Err(self.device_not_found(id));
        };
        let is_disk = set.disk(id).is_some();
        let json = json.to_string();
        let Some(me) = self.me.upgrade() else {
            return Err(backend_msg("the domain is being dropped".into()));
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("domkit-libxl-unplug".into())
            .spawn(move || {
                let r = if is_disk {
                    me.ctx.disk_remove(domid, &json)
                } else {
                    me.ctx.nic_remove(domid, &json)
                };
                let done = match &r {
                    // The same Xen domain still runs: the device is gone from it.
                    Ok(()) if me.domid() == Some(domid) => {
                        let _ = me.update_live(|s| {
                            s.remove(id);
                        });
                        me.emit_device(EventKind::DeviceRemoved(id));
                        Ok(())
                    }
                    Ok(()) => Err(backend_msg(format!(
                        "detach of {id}: the domain ended during the unplug"
                    ))),
                    Err(e) => Err(backend_msg(format!(
                        "detach of {id}: {e}; the device is still attached"
                    ))),
                };
                let _ = tx.send(done);
            })
            .map_err(|e| backend_msg(format!("cannot start the unplug thread: {e}")))?;
        match rx.recv_timeout(timeout) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                if self.domid() == Some(domid) && self.cell.state().is_active() {
                    self.emit_device(EventKind::DeviceRemovalFailed(id));
                }
                Err(e)
            }
            Err(_) => {
                self.emit_device(EventKind::DeviceRemovalFailed(id));
                Err(Error::Timeout {
                    operation,
                    after: timeout,
                    hint: format!(
                        "the guest did not release {what} in time: the device is still \
                         attached; libxl forces its removal after its own 10 s, and \
                         device_removed follows then"
                    ),
                })
            }
        }
    }

    /// The definition's devices.
    fn defined_set(&self) -> Result<XenDeviceSet> {
        Ok(XenDeviceSet::from_config(
            &lock(&self.defined),
            self.id.uuid,
        )?)
    }

    /// The definition as it is now (device changes of scope config included).
    pub(crate) fn definition(&self) -> DomainConfig {
        lock(&self.defined).clone()
    }

    /// Change the definition with `f` (on a copy whose devices all have explicit ids, so
    /// that removing one does not rename the others), check it, persist it (persistent
    /// drivers, §11.2), then make it the definition.
    fn change_definition(&self, f: impl FnOnce(&mut DomainConfig) -> Result<()>) -> Result<()> {
        let mut defined = lock(&self.defined);
        let mut next = defined.clone();
        for (i, d) in next.disks.iter_mut().enumerate() {
            d.id = Some(d.device_id(i));
        }
        for (i, n) in next.nics.iter_mut().enumerate() {
            n.id = Some(n.device_id(i));
        }
        f(&mut next)?;
        XenDeviceSet::from_config(&next, self.id.uuid)?;
        if let Some(p) = &self.persisted {
            p.save_definition(&next)
                .map_err(|e| Error::io("persisting the changed definition", e))?;
        }
        *defined = next;
        Ok(())
    }

    /// The devices of the current Xen domain (the definition's before any create).
    fn live_set(&self) -> Result<XenDeviceSet> {
        match lock(&self.live).clone() {
            Some(set) => Ok(set),
            None => self.defined_set(),
        }
    }

    /// libxl's JSON config with `set`'s devices (the definition's JSON when they are the
    /// definition's).
    fn json_with(&self, set: &XenDeviceSet) -> Result<String> {
        if *set == XenDeviceSet::from_config(&self.config, self.id.uuid)? {
            return Ok(self.libxl_json.clone());
        }
        let def: serde_json::Value = serde_json::from_str(&self.libxl_json)
            .map_err(|e| backend_msg(format!("the domain's libxl JSON: {e}")))?;
        let v = set.apply_to_json(&def).map_err(|e| backend_msg(e.0))?;
        Ok(v.to_string())
    }

    /// A `Destroy` of the API is stashed (in flight).
    fn preempted(&self) -> bool {
        self.cell.with(|l| l.has_intent(Intent::Destroy))
    }

    /// Translate and feed one input (recorded in the trace). Returns the policy action.
    fn feed(&self, input: TraceInput) -> Option<PolicyAction> {
        let entry = TraceEntry {
            intent: self.cell.with(|l| l.intent()),
            input,
        };
        {
            let mut t = lock(&self.trace);
            if t.len() >= TRACE_LEN {
                t.remove(0);
            }
            t.push(entry);
        }
        let obs = translate_input(&entry)?;
        tracing::debug!(domain = %self.id.name, ?input, ?obs, "observation");
        if xagent::ends_run(&obs) {
            self.agent_seen(Seen::RunEnded);
        }
        self.cell.observe(obs)
    }

    /// Feed a fact and carry out any resulting policy action on a policy thread.
    fn feed_fact(&self, fact: Fact) {
        if let Some(action) = self.feed(TraceInput::Fact(fact)) {
            self.spawn_action(action);
        }
    }

    /// Feed a fact with `intent` stashed for it (e.g. the unpause of a save of a paused
    /// domain reads as a resume, not as the save's cancellation).
    fn feed_fact_as(&self, intent: Intent, fact: Fact) {
        let _intent = self.cell.intent(intent);
        self.feed_fact(fact);
    }

    /// A libxl event for this domain (from the dispatcher thread).
    pub(crate) fn on_libxl_event(&self, ev: LibxlEvent) {
        let mut backend = lock(&self.backend);
        if backend.watch.as_ref().map(DeathWatch::token) != Some(ev.for_user) {
            tracing::debug!(domain = %self.id.name, ?ev, "stale libxl event (old watch): ignored");
            return;
        }
        let intent = self.cell.with(|l| l.intent());
        let t = translate_event(&ev, intent);
        tracing::info!(domain = %self.id.name, domid = ev.domid, event = ?ev.kind, ?intent, rule = t.rule, "libxl event");
        let action = self.feed(TraceInput::Event(ev));
        if ev.kind == LibxlEventKind::DomainDeath {
            self.disarm_locked(&mut backend);
        }
        drop(backend);
        if t.follow_up == Some(FollowUp::SoftReset) && action.is_none() {
            self.spawn_soft_reset();
        }
        if let Some(a) = action {
            self.spawn_action(a);
        }
    }

    fn disarm_locked(&self, backend: &mut Backend) {
        if let Some(w) = backend.watch.take() {
            self.registry.remove(w.token());
        }
        backend.domid = None;
    }

    /// The Xen domain `domid` is gone: if it is still the current one, stop watching it and
    /// feed its end, under the backend lock (no event of a newer domid can be mistaken for
    /// it, and none overtakes it).
    fn ended(&self, domid: u32) {
        let mut b = lock(&self.backend);
        if b.domid != Some(domid) {
            return;
        }
        self.disarm_locked(&mut b);
        let action = self.feed(TraceInput::Fact(Fact::Destroyed));
        drop(b);
        if let Some(a) = action {
            self.spawn_action(a);
        }
    }

    /// No Xen domain of ours exists and none is being created: if the state still says
    /// active, the end was not observed: feed it.
    fn ended_if_idle(&self) {
        let b = lock(&self.backend);
        if b.domid.is_some() || b.creating || !self.cell.state().is_active() {
            return;
        }
        let action = self.feed(TraceInput::Fact(Fact::Destroyed));
        drop(b);
        if let Some(a) = action {
            self.spawn_action(a);
        }
    }

    fn watch_locked(
        &self,
        backend: &mut Backend,
        domid: u32,
    ) -> std::result::Result<(), LibxlError> {
        let token = self.registry.token();
        self.registry.insert(token, self.me.clone());
        match self.ctx.watch_death(domid, token) {
            Ok(w) => {
                if let Some(old) = backend.watch.replace(w) {
                    self.registry.remove(old.token());
                }
                backend.domid = Some(domid);
                Ok(())
            }
            Err(e) => {
                self.registry.remove(token);
                Err(e)
            }
        }
    }

    /// Watch a fresh watch on the current domid (after a resume: libxl reports a domain's
    /// shutdown only once per watch).
    fn rearm(&self, domid: u32) -> std::result::Result<(), LibxlError> {
        let mut b = lock(&self.backend);
        self.watch_locked(&mut b, domid)
    }

    /// Start a create: from now until it ends, a destroy waits for it (and kills what it
    /// builds).
    fn begin_create(&self) -> Creating<'_> {
        self.track();
        lock(&self.backend).creating = true;
        Creating {
            d: self,
            done: false,
        }
    }

    /// A domain was just created (left paused by libxl): watch it, run it unless `paused`,
    /// feed `then` and end the create, all under the backend lock so no event overtakes
    /// `then` and a destroy sees either the create in progress or the armed domid.
    fn arm_and_run(
        &self,
        creating: &mut Creating<'_>,
        domid: u32,
        paused: bool,
        then: Fact,
    ) -> std::result::Result<(), LibxlError> {
        let mut b = lock(&self.backend);
        let armed = self.watch_locked(&mut b, domid).and_then(|()| {
            let is_paused = self
                .ctx
                .domain_info(domid)
                .map(|i| i.paused)
                .unwrap_or(true);
            match (paused, is_paused) {
                (false, true) => self.ctx.unpause(domid),
                (true, false) => self.ctx.pause(domid),
                _ => Ok(()),
            }
        });
        if let Err(e) = armed {
            if b.domid == Some(domid) {
                self.disarm_locked(&mut b);
            }
            creating.end_locked(&mut b);
            return Err(e);
        }
        let action = self.feed(TraceInput::Fact(then));
        creating.end_locked(&mut b);
        drop(b);
        if let Some(a) = action {
            self.spawn_action(a);
        }
        Ok(())
    }

    /// Destroy every Xen domain with this domain's uuid (a create in progress, or one left
    /// behind by a failed create). Returns how many there were.
    fn kill_by_uuid(&self) -> usize {
        let domains = match self.ctx.list_domains() {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(domain = %self.id.name, error = %e, "cannot list the Xen domains");
                return 0;
            }
        };
        let mut n = 0;
        for d in domains
            .iter()
            .filter(|d| d.domid != 0 && d.uuid == self.id.uuid)
        {
            n += 1;
            match self.ctx.destroy(d.domid) {
                Ok(()) => {
                    tracing::info!(domain = %self.id.name, domid = d.domid, "destroyed a Xen domain with our uuid")
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    tracing::warn!(domain = %self.id.name, domid = d.domid, error = %e, "cannot destroy a Xen domain with our uuid")
                }
            }
        }
        n
    }

    /// The domain's runtime directory, for channel sockets: created 0700 or verified
    /// (§11.1) before a create that has channels.
    fn prepare_runtime_dir(&self, operation: Operation) -> Result<()> {
        if self.config.channels.is_empty() {
            return Ok(());
        }
        domkit_core::store::ensure_private_dir(&self.runtime_dir).map_err(|e| {
            Error::io(
                format!(
                    "{operation}: creating the domain's runtime directory {} (channel sockets)",
                    self.runtime_dir.display()
                ),
                e,
            )
        })
    }

    /// Remove the domain's runtime directory (undefine; the domain is shut off).
    pub(crate) fn remove_runtime_dir(&self) {
        match std::fs::remove_dir_all(&self.runtime_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(domain = %self.id.name, dir = %self.runtime_dir.display(), error = %e, "cannot remove the runtime directory")
            }
        }
    }

    fn spawn_action(&self, action: PolicyAction) {
        let Some(me) = self.me.upgrade() else { return };
        let spawned = std::thread::Builder::new()
            .name("domkit-libxl-policy".into())
            .spawn(move || match action {
                // A destroy never queues (§6.0): the guest powered off or crashed, and an
                // operation holding the lock would only wait for the end anyway.
                PolicyAction::Destroy => me.carry_out(action),
                _ => {
                    let _op = me.ops.blocking_lock();
                    me.carry_out(action);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(domain = %self.id.name, error = %e, ?action, "cannot start a policy thread");
        }
    }

    fn spawn_soft_reset(&self) {
        let Some(me) = self.me.upgrade() else { return };
        let _ = std::thread::Builder::new()
            .name("domkit-libxl-softreset".into())
            .spawn(move || {
                let _op = me.ops.blocking_lock();
                let Some(domid) = me.domid() else { return };
                let json = me
                    .live_set()
                    .and_then(|set| me.json_with(&set))
                    .unwrap_or_else(|_| me.libxl_json.clone());
                match me.ctx.soft_reset(&json, domid) {
                    Ok(()) => {
                        if let Err(e) = me.rearm(domid) {
                            tracing::error!(domain = %me.id.name, error = %e, "cannot watch the soft-reset domain");
                        }
                    }
                    Err(e) => {
                        tracing::error!(domain = %me.id.name, error = %e, "soft reset failed: destroying");
                        let _ = me.ctx.destroy(domid);
                        let mut b = lock(&me.backend);
                        if b.domid == Some(domid) {
                            me.disarm_locked(&mut b);
                            drop(b);
                            me.feed_fact(Fact::SoftResetFailed);
                        }
                    }
                }
            });
    }

    /// Carry out a policy action (a restart holds `ops`; a destroy does not need it).
    fn carry_out(&self, action: PolicyAction) {
        tracing::info!(domain = %self.id.name, ?action, "carrying out policy action");
        match action {
            PolicyAction::Destroy => {
                if let Err(e) = self.destroy_current() {
                    tracing::error!(domain = %self.id.name, error = %e, "policy destroy failed");
                }
            }
            PolicyAction::Restart => self.restart_locked(),
            // A Xen domain that shut down or crashed is already stopped: keep it.
            PolicyAction::Preserve => {}
        }
    }

    /// `libxl_domain_destroy` of `domid`; a domain that is gone already is fine.
    fn destroy_domid(&self, domid: u32) -> std::result::Result<(), LibxlError> {
        let t0 = Instant::now();
        let mut tries = 0;
        loop {
            match self.ctx.destroy(domid) {
                Ok(()) => break,
                Err(e) if e.is_not_found() => break,
                Err(e) => {
                    // Two destroys of one domid at once (ours and a policy restart's, or
                    // `xl destroy`): libxl fails one of them (LOCK_FAIL, "unable to find
                    // domain info"). What counts is that the domain is gone.
                    if matches!(self.ctx.domain_info(domid), Err(i) if i.is_not_found()) {
                        break;
                    }
                    tries += 1;
                    if tries >= 5 {
                        return Err(e);
                    }
                    tracing::info!(domain = %self.id.name, domid, error = %e, "destroy failed while the domain still exists: trying again");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        tracing::info!(domain = %self.id.name, domid, ms = t0.elapsed().as_millis() as u64, "destroyed");
        Ok(())
    }

    /// Destroy the current Xen domain and feed its end (policy destroys, the end of a save).
    fn destroy_current(&self) -> std::result::Result<(), LibxlError> {
        match self.domid() {
            Some(domid) => {
                self.destroy_domid(domid)?;
                self.ended(domid);
            }
            None => self.ended_if_idle(),
        }
        Ok(())
    }

    /// `destroy()` (§6.0, §6.5): stash `Destroy` (unless a committed save already decided
    /// the end), destroy the current Xen domain, and whatever a create in progress builds,
    /// until nothing of ours exists; concurrently with any operation holding `ops`.
    fn destroy_preempting(&self) -> Result<()> {
        let token = self.cell.with(|l| {
            if l.has_intent(Intent::SaveCommitted) {
                None // the save won: the file is committed, the end is `saved`
            } else {
                Some(l.push_intent(Intent::Destroy))
            }
        });
        let _intent = TokenGuard {
            cell: &self.cell,
            token,
        };
        loop {
            let (domid, creating) = {
                let b = lock(&self.backend);
                (b.domid, b.creating)
            };
            match (domid, creating) {
                (Some(domid), _) => {
                    self.destroy_domid(domid)
                        .map_err(|e| backend_err(Operation::Destroy, e))?;
                    self.ended(domid);
                }
                (None, true) => {
                    // No domid yet: kill what the create built so far; it then fails (or
                    // arms a domid that the next round destroys).
                    self.kill_by_uuid();
                    let b = lock(&self.backend);
                    if b.creating && b.domid.is_none() {
                        let _ = self
                            .created
                            .wait_timeout(b, Duration::from_millis(250))
                            .unwrap_or_else(|p| p.into_inner());
                    }
                }
                (None, false) => break,
            }
        }
        self.ended_if_idle();
        Ok(())
    }

    /// Restart: destroy the old domid, create a new one from the same config (same name and
    /// uuid), report `RestartDone` (caller holds `ops`).
    fn restart_locked(&self) {
        let (old, mut creating) = {
            let mut b = lock(&self.backend);
            // Checked under the backend lock, where a destroy feeds the end: a destroy that
            // ended the domain before this thread got `ops` ended the restart too (§4.0a);
            // creating the domain now would leave it running behind a shut-off state.
            if !self.cell.with(|l| l.is_restarting()) {
                tracing::info!(domain = %self.id.name, state = %self.cell.state(), "restart: no longer wanted (the domain ended meanwhile)");
                return;
            }
            let d = b.domid;
            self.disarm_locked(&mut b);
            self.track();
            b.creating = true;
            (
                d,
                Creating {
                    d: self,
                    done: false,
                },
            )
        };
        if let Some(domid) = old {
            if let Err(e) = self.ctx.destroy(domid) {
                if !e.is_not_found() {
                    tracing::error!(domain = %self.id.name, error = %e, "restart: destroying the old domain failed");
                }
            }
        }
        let t0 = Instant::now();
        let ok = if self.preempted() {
            tracing::info!(domain = %self.id.name, "restart: a destroy is in progress: not creating the domain again");
            false
        } else {
            // A reboot keeps the devices, hotplugged ones included (§14.3).
            let json = self
                .live_set()
                .and_then(|set| self.json_with(&set))
                .unwrap_or_else(|_| self.libxl_json.clone());
            match self.ctx.create_new(&json) {
                Ok(domid) => {
                    match self.arm_and_run(
                        &mut creating,
                        domid,
                        false,
                        Fact::RestartDone { ok: true },
                    ) {
                        Ok(()) => {
                            tracing::info!(domain = %self.id.name, old = ?old, new = domid, ms = t0.elapsed().as_millis() as u64, "restarted");
                            true
                        }
                        Err(e) => {
                            tracing::error!(domain = %self.id.name, error = %e, "restart: cannot run the new domain");
                            let _ = self.ctx.destroy(domid);
                            false
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(domain = %self.id.name, error = %e, "restart: creating the new domain failed");
                    self.kill_by_uuid();
                    false
                }
            }
        };
        if !ok {
            self.feed_fact(Fact::RestartDone { ok: false });
        }
        drop(creating);
    }

    // ---- operations (blocking; the caller holds `ops`) ----

    /// The error for a libxl call of `operation` that failed: if the domain ended meanwhile
    /// (or libxl cannot find it any more), wait for that end to be observed and say so.
    fn failed(&self, operation: Operation, domid: u32, e: LibxlError) -> Error {
        let gone = e.is_not_found()
            || !self.cell.state().is_active()
            || self.ctx.domain_info(domid).map_or(true, |i| i.dying);
        if gone {
            self.settle_gone(domid);
            let state = self.cell.state();
            if !state.is_active() {
                return backend_msg(format!(
                    "{operation} failed because the domain stopped meanwhile (now {state}): {e}"
                ));
            }
        }
        backend_err(operation, e)
    }

    /// The Xen domain `domid` died or is dying under an operation: wait (bounded) for its
    /// death to be observed; if it is gone and still not observed, feed its end.
    fn settle_gone(&self, domid: u32) {
        let t0 = Instant::now();
        while self.cell.state().is_active() && t0.elapsed() < GONE_SETTLE {
            if matches!(self.ctx.domain_info(domid), Err(e) if e.is_not_found()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.cell.state().is_active()
            && matches!(self.ctx.domain_info(domid), Err(e) if e.is_not_found())
        {
            self.ended(domid);
        }
    }

    /// After a failed create: destroy anything left with our uuid, report the failure.
    fn create_failed(&self) {
        let left = self.kill_by_uuid();
        if left > 0 {
            tracing::warn!(domain = %self.id.name, left, "a failed create left Xen domains behind: destroyed");
        }
        self.feed_fact(Fact::CreateFailed);
    }

    // ---- reattach (§11.3, §11.4) and detach ----

    /// Take over this domain after a manager restart: from the status the previous manager
    /// recorded and `host` (`libxl_list_domain`), do what [`reattach::plan`] says. Blocking.
    pub(crate) fn reattach(&self, status: Option<StoredStatus>, host: &[DomInfo]) {
        let Some(status) = status else {
            return; // defined, never changed
        };
        // The recorded instance's devices, hotplugged ones included (§14.3); unreadable or
        // absent: the definition's.
        if let Some(set) = status
            .devices
            .clone()
            .and_then(|v| serde_json::from_value::<XenDeviceSet>(v).ok())
        {
            self.set_live(set);
        }
        let save = status.in_flight.map(|in_flight| match in_flight {
            InFlight::Save {
                target,
                temp,
                was_paused,
                committing,
            } => SaveEvidence {
                target,
                temp_exists: temp.exists(),
                temp,
                was_paused,
                committing,
            },
        });
        // Ours by uuid only: a Xen domain with our name and another uuid is someone else's.
        let found = host
            .iter()
            .find(|d| d.domid != 0 && d.uuid == self.id.uuid)
            .and_then(|d| match self.ctx.domain_info(d.domid) {
                Ok(info) => Some(info),
                Err(e) if e.is_not_found() => None,
                Err(_) => Some(d.clone()),
            });
        let plan = reattach::plan(
            status.state,
            self.config.policies(),
            save.as_ref(),
            found.as_ref(),
        );
        tracing::info!(domain = %self.id.name, stored = %status.state, ?found, ?save, ?plan, "reattach");
        if let Some(temp) = reattach::temp_to_remove(save.as_ref()) {
            match std::fs::remove_file(&temp) {
                Ok(()) => {
                    tracing::info!(domain = %self.id.name, temp = %temp.display(), "removed the temporary file of an interrupted save")
                }
                Err(e) => {
                    tracing::warn!(domain = %self.id.name, temp = %temp.display(), error = %e, "cannot remove the temporary file of an interrupted save")
                }
            }
        }
        match plan {
            Plan::Nothing => {}
            Plan::DestroyLeftover { domid } => {
                if let Err(e) = self.destroy_domid(domid) {
                    tracing::warn!(domain = %self.id.name, domid, error = %e, "cannot destroy the leftover of an unfinished create");
                }
            }
            Plan::Vanished { reason, committed } => {
                let _committed = committed.then(|| self.cell.intent(Intent::SaveCommitted));
                self.cell.observe_reconciled(Observation::Gone {
                    unexplained: reason,
                });
            }
            Plan::Adopt {
                domid,
                observation,
                soft_reset,
            } => {
                // Armed and fed under the backend lock: the new watch reports a pending
                // shutdown again, and must find it reconciled already (it is then a repeat).
                let mut b = lock(&self.backend);
                if let Err(e) = self.watch_locked(&mut b, domid) {
                    drop(b);
                    return self.watch_failed(domid, e);
                }
                // What was found is reconciled; what this manager does about it (a policy's
                // destroy or restart) is seen live.
                let action = observation.and_then(|o| self.cell.observe_reconciled(o));
                drop(b);
                match action {
                    Some(a) => self.spawn_action(a),
                    None if soft_reset => self.spawn_soft_reset(),
                    None => {}
                }
            }
            Plan::Finish { domid, reason } => self.finish_found(domid, None, reason),
            Plan::EndSaved { domid } => {
                self.finish_found(domid, Some(Intent::SaveCommitted), ShutoffReason::Saved)
            }
            Plan::CancelSave {
                domid,
                resume_suspended,
                pause,
                unpause,
            } => self.cancel_save_found(domid, resume_suspended, pause, unpause),
        }
        if save.is_some() {
            self.set_in_flight(None);
        }
    }

    fn watch_failed(&self, domid: u32, e: LibxlError) {
        tracing::error!(domain = %self.id.name, domid, error = %e, "reattach: cannot watch the Xen domain");
        self.cell.set_control(ControlState::Broken {
            reason: format!("reattach: cannot watch Xen domain {domid}: {e}"),
        });
    }

    /// End a found Xen domain whose end is already decided (`reason`, or the intent's):
    /// destroy it and report the end (done by this manager: not reconciled).
    fn finish_found(&self, domid: u32, intent: Option<Intent>, reason: ShutoffReason) {
        let _intent = intent.map(|i| self.cell.intent(i));
        // Not watched first: the death event of this destroy would race with the end fed
        // below, and without a pending end the core would read it as `destroyed`.
        if let Err(e) = self.destroy_domid(domid) {
            tracing::error!(domain = %self.id.name, domid, error = %e, "reattach: cannot destroy the domain: watching it as it is");
            if let Err(e) = self.rearm(domid) {
                self.watch_failed(domid, e);
            }
            return;
        }
        self.cell.observe(Observation::Gone {
            unexplained: reason,
        });
    }

    /// Put back a domain whose save was not committed (§11.4): resumed if it is suspended,
    /// then paused or unpaused as it was before the save (done by this manager: the events
    /// are not reconciled).
    fn cancel_save_found(&self, domid: u32, resume_suspended: bool, pause: bool, unpause: bool) {
        let save = self.cell.intent(Intent::Save);
        if resume_suspended {
            // Resumed first, watched after: a watch armed on the suspended domain would
            // report its suspend (libxl reports a shutdown once per watch).
            if let Err(e) = self.ctx.resume_cancel(domid) {
                tracing::error!(domain = %self.id.name, domid, error = %e, "reattach: cannot resume the domain suspended by an interrupted save");
            }
        }
        let mut b = lock(&self.backend);
        if let Err(e) = self.watch_locked(&mut b, domid) {
            drop(b);
            return self.watch_failed(domid, e);
        }
        if resume_suspended {
            self.cell.observe(Observation::CpusResumed);
        }
        drop(b);
        if unpause {
            match self.ctx.unpause(domid) {
                Ok(()) => {
                    self.cell.observe(Observation::CpusResumed);
                }
                Err(e) => {
                    tracing::error!(domain = %self.id.name, domid, error = %e, "reattach: cannot unpause after an interrupted save")
                }
            }
        }
        drop(save);
        if pause {
            let _pause = self.cell.intent(Intent::Pause);
            match self.ctx.pause(domid) {
                Ok(()) => {
                    self.cell.observe(Observation::CpusStopped {
                        cause: domkit_core::StopCause::Command,
                    });
                }
                Err(e) => {
                    tracing::error!(domain = %self.id.name, domid, error = %e, "reattach: cannot pause again after an interrupted save")
                }
            }
        }
    }

    /// Stop controlling the Xen domain (a persistent driver detaching): no more events, no
    /// more status writes; the next manager on the roots takes over.
    pub(crate) fn detach(&self) {
        self.detached.store(true, Ordering::SeqCst);
        // Leave the console to the next manager (a console() in progress keeps its link
        // until its domain stops).
        if let Ok(mut console) = self.console.try_lock() {
            console.take();
        }
        if let Some(p) = &self.persisted {
            p.detach();
        }
        // The agent channel serves one connection: leave it to the next manager now (the
        // probe loop also stops at its next round).
        if let (Some(link), Ok(rt)) = (&self.agent, tokio::runtime::Handle::try_current()) {
            let client = link.client.clone();
            rt.spawn(async move { client.disconnect().await });
        }
        let mut b = lock(&self.backend);
        if let Some(w) = b.watch.take() {
            self.registry.remove(w.token());
        }
        b.domid = None;
    }

    /// An ephemeral driver is dropped: its domains die with it (§11.0).
    pub(crate) fn destroy_for_drop(&self) {
        if self.detached.load(Ordering::SeqCst) {
            return;
        }
        let active = self.cell.state().is_active() || {
            let b = lock(&self.backend);
            b.domid.is_some() || b.creating
        };
        if active {
            if let Err(e) = self.destroy_preempting() {
                tracing::warn!(domain = %self.id.name, error = %e, "destroying the domain of a dropped ephemeral driver failed");
            }
        }
    }

    fn start_blocking(&self, options: StartOptions) -> Result<()> {
        if self.cell.state().is_active() {
            return Err(self.invalid(Operation::Start));
        }
        if let Err(e) = self.prepare_runtime_dir(Operation::Start) {
            self.feed_fact(Fact::CreateFailed);
            return Err(e);
        }
        // A new start has the definition's devices (§14.3).
        let set = self.defined_set()?;
        self.set_live(set.clone());
        let t0 = Instant::now();
        let json = self.json_with(&set)?;
        let mut creating = self.begin_create();
        let domid = match self.ctx.create_new(&json) {
            Ok(d) => d,
            Err(e) => {
                drop(creating);
                self.create_failed();
                return Err(backend_msg(format!(
                    "start: libxl could not create the domain: {e}"
                )));
            }
        };
        let created = Fact::Created {
            how: Creation::Boot,
            paused: options.paused,
        };
        if let Err(e) = self.arm_and_run(&mut creating, domid, options.paused, created) {
            let _ = self.ctx.destroy(domid);
            self.create_failed();
            return Err(backend_msg(format!(
                "start: the domain was created but cannot be run: {e}"
            )));
        }
        tracing::info!(domain = %self.id.name, domid, ms = t0.elapsed().as_millis() as u64, "started");
        Ok(())
    }

    fn pause_blocking(&self) -> Result<()> {
        match self.cell.state() {
            DomainState::Paused(_) => return Ok(()),
            // A pending shutdown request leaves the domain operable (§6.3).
            DomainState::Running(_)
            | DomainState::Blocked(_)
            | DomainState::ShuttingDown(ShuttingDownReason::User) => {}
            _ => return Err(self.invalid(Operation::Pause)),
        }
        let domid = self.domid().ok_or_else(|| self.invalid(Operation::Pause))?;
        let _intent = self.cell.intent(Intent::Pause);
        self.ctx
            .pause(domid)
            .map_err(|e| self.failed(Operation::Pause, domid, e))?;
        self.feed_fact(Fact::Paused);
        Ok(())
    }

    fn resume_blocking(&self) -> Result<()> {
        match self.cell.state() {
            DomainState::Running(_) | DomainState::ShuttingDown(ShuttingDownReason::User) => {
                return Ok(())
            }
            DomainState::Paused(PausedReason::ShuttingDown) => {
                return Err(self.invalid(Operation::Resume))
            }
            DomainState::Paused(_) => {}
            _ => return Err(self.invalid(Operation::Resume)),
        }
        let domid = self
            .domid()
            .ok_or_else(|| self.invalid(Operation::Resume))?;
        let _intent = self.cell.intent(Intent::Resume);
        self.ctx
            .unpause(domid)
            .map_err(|e| self.failed(Operation::Resume, domid, e))?;
        self.feed_fact(Fact::Unpaused);
        Ok(())
    }

    /// The request half of `shutdown` (§6.3): only from running or with a request pending
    /// (`shutting_down(user)`): a paused, suspended or crashed guest cannot act on it.
    fn shutdown_request_blocking(&self) -> Result<()> {
        match self.cell.state() {
            DomainState::Running(_)
            | DomainState::Blocked(_)
            | DomainState::ShuttingDown(ShuttingDownReason::User) => {}
            _ => return Err(self.invalid(Operation::Shutdown)),
        }
        let domid = self
            .domid()
            .ok_or_else(|| self.invalid(Operation::Shutdown))?;
        let _intent = self.cell.intent(Intent::Shutdown);
        let t0 = Instant::now();
        match self.ctx.shutdown(domid) {
            Ok(()) => {
                tracing::info!(domain = %self.id.name, domid, ms = t0.elapsed().as_millis() as u64, "shutdown request acknowledged by the guest");
                self.feed_fact(Fact::ShutdownAcknowledged);
                Ok(())
            }
            Err(e) if e.code == libxenlight_sys::ERROR_TIMEDOUT => Err(Error::Timeout {
                operation: Operation::Shutdown,
                after: t0.elapsed(),
                hint: format!(
                    "the guest did not acknowledge the PV shutdown request ({e}); is it \
                     without PV drivers, or hung? destroy it to stop it"
                ),
            }),
            Err(e) => Err(self.failed(Operation::Shutdown, domid, e)),
        }
    }

    /// The request half of `reboot`: stash `Reboot`, send the PV request and wait for its
    /// acknowledgement; then hand the intent to `hold` (it stays stashed until the reboot
    /// happened or the caller's deadline passed, even if the caller stops waiting).
    fn reboot_request_blocking(&self, hold: impl FnOnce(OwnedIntent, EventStream)) -> Result<()> {
        match self.cell.state() {
            DomainState::Running(_)
            | DomainState::Blocked(_)
            | DomainState::ShuttingDown(ShuttingDownReason::User) => {}
            _ => return Err(self.invalid(Operation::Reboot)),
        }
        let domid = self
            .domid()
            .ok_or_else(|| self.invalid(Operation::Reboot))?;
        let me = self
            .me
            .upgrade()
            .ok_or_else(|| self.invalid(Operation::Reboot))?;
        let events = self.cell.subscribe();
        let intent = OwnedIntent::push(me, Intent::Reboot);
        let t0 = Instant::now();
        match self.ctx.reboot(domid) {
            Ok(()) => {
                hold(intent, events);
                Ok(())
            }
            Err(e) if e.code == libxenlight_sys::ERROR_TIMEDOUT => Err(Error::Timeout {
                operation: Operation::Reboot,
                after: t0.elapsed(),
                hint: format!(
                    "the guest did not acknowledge the PV reboot request ({e}); destroy or \
                     reset it"
                ),
            }),
            Err(e) => Err(self.failed(Operation::Reboot, domid, e)),
        }
    }

    fn reset_blocking(&self) -> Result<()> {
        if !self.cell.state().is_active() {
            return Err(self.invalid(Operation::Reset));
        }
        let _intent = self.cell.intent(Intent::Reset);
        match self.feed(TraceInput::Fact(Fact::ResetRequested)) {
            Some(PolicyAction::Restart) => {
                self.restart_locked();
                if self.cell.state().is_running() {
                    Ok(())
                } else {
                    Err(backend_msg(format!(
                        "reset: creating the domain again failed; it is {}",
                        self.cell.state()
                    )))
                }
            }
            Some(other) => {
                self.carry_out(other);
                Ok(())
            }
            None => Err(self.invalid(Operation::Reset)),
        }
    }

    fn save_blocking(&self, path: &Path) -> Result<()> {
        let r = self.save_recorded(path);
        // Over, whichever way (a committed save ended the domain as saved already).
        self.set_in_flight(None);
        r
    }

    /// The save, recorded in the durable status while in flight (§11.4).
    fn save_recorded(&self, path: &Path) -> Result<()> {
        let was_paused = match self.cell.state() {
            DomainState::Running(_)
            | DomainState::Blocked(_)
            | DomainState::ShuttingDown(ShuttingDownReason::User) => false,
            DomainState::Paused(PausedReason::ShuttingDown) => {
                return Err(self.invalid(Operation::Save))
            }
            DomainState::Paused(_) => true,
            _ => return Err(self.invalid(Operation::Save)),
        };
        let domid = self.domid().ok_or_else(|| self.invalid(Operation::Save))?;
        // Recorded before the temporary file exists: a manager killed at any instant after
        // this leaves the next one the name to remove (§11.4).
        let temp = SaveTarget::temp_path_for(path).map_err(save_err)?;
        let in_flight = |committing| InFlight::Save {
            target: path.to_owned(),
            temp: temp.clone(),
            was_paused,
            committing,
        };
        self.set_in_flight(Some(in_flight(false)));
        // The temporary file first: an unwritable place fails before the domain is touched.
        let mut target = SaveTarget::create_at(path, &temp).map_err(save_err)?;
        target
            .write_header(&SaveHeader {
                format: savefile::FORMAT,
                backend: BACKEND.into(),
                name: self.id.name.clone(),
                uuid: self.id.uuid,
                was_paused,
                domid,
                saved_at_us: domkit_core::event::unix_micros(SystemTime::now()),
                devices: self
                    .live_set()
                    .ok()
                    .and_then(|set| serde_json::to_value(set).ok()),
            })
            .map_err(save_err)?;
        let _save = self.cell.intent(Intent::Save);
        if was_paused {
            // A PV guest suspends itself: libxl notifies its suspend event channel (or
            // writes control/shutdown = suspend) and waits up to 60 s for the guest's own
            // SCHEDOP_shutdown(suspend); a paused guest would never answer. So it runs until
            // it suspends, and the events say so (resumed, then suspended for the save).
            self.ctx
                .unpause(domid)
                .map_err(|e| self.failed(Operation::Save, domid, e))?;
            self.feed_fact_as(Intent::Resume, Fact::Unpaused);
        }
        let t0 = Instant::now();
        loop {
            let attempt = Instant::now();
            let e = match self.ctx.suspend_to_fd(domid, target.raw_fd()) {
                Ok(()) => break,
                Err(e) => e,
            };
            // A PV guest whose kernel has not booted far enough (no p2m frame list yet)
            // fails the save helper's setup at once, before libxl asked it anything
            // (ERROR_GUEST_TIMEDOUT: "domain did not respond to suspend request"; seen on
            // the test host 1-2 s after start). It is not suspended: try again until
            // libxl's own patience for a guest's answer (60 s) is used up.
            let not_ready = e.code == libxenlight_sys::ERROR_GUEST_TIMEDOUT
                && attempt.elapsed() < GUEST_NOT_READY_FAILS_WITHIN
                && t0.elapsed() < SAVE_READY_WAIT
                && !self.preempted()
                && self.cell.state().is_active()
                && matches!(self.ctx.domain_info(domid), Ok(i) if !i.shutdown && !i.dying);
            if !not_ready {
                let err = backend_err(Operation::Save, e);
                return Err(self.save_failed(domid, was_paused, path, target, err));
            }
            tracing::info!(domain = %self.id.name, error = %e, "the guest cannot be saved yet (its kernel is still booting): trying again");
            if let Err(e) = target.rewind() {
                return Err(self.save_failed(domid, was_paused, path, target, save_err(e)));
            }
            std::thread::sleep(SAVE_RETRY_PAUSE);
        }
        let suspend_ms = t0.elapsed().as_millis() as u64;
        // libxl_domain_suspend returned 0: the guest is suspended.
        self.feed_fact(Fact::Suspended);
        if let Err(e) = target.seal() {
            return Err(self.save_failed(domid, was_paused, path, target, save_err(e)));
        }
        // From here the rename may happen: a new manager that finds the temporary file gone
        // knows the file is committed.
        self.set_in_flight(Some(in_flight(true)));
        // Commit: rename and stash SaveCommitted in one step under the cell's lock, unless
        // a destroy is stashed (it preempted the save) or the domain ended meanwhile.
        enum Commit {
            Done(PathBuf, IntentToken),
            Preempted,
            Stopped(DomainState),
            Failed(savefile::SaveFileError),
        }
        let mut target = Some(target);
        let commit = self.cell.with(|l| {
            if l.has_intent(Intent::Destroy) {
                return Commit::Preempted;
            }
            let state = l.state();
            if !state.is_active() {
                return Commit::Stopped(state);
            }
            match target.take().map(SaveTarget::commit) {
                Some(Ok(dest)) => Commit::Done(dest, l.push_intent(Intent::SaveCommitted)),
                Some(Err(e)) => Commit::Failed(e),
                None => Commit::Preempted,
            }
        });
        drop(target); // not committed: removes the temporary file
        let _committed = match commit {
            Commit::Done(dest, token) => {
                savefile::sync_dir(&dest);
                TokenGuard {
                    cell: &self.cell,
                    token: Some(token),
                }
            }
            Commit::Preempted => {
                return Err(Error::Interrupted {
                    operation: Operation::Save,
                    by: Operation::Destroy,
                    state: self.cell.state(),
                })
            }
            Commit::Stopped(state) => {
                return Err(backend_msg(format!(
                    "save: the domain stopped during the save (now {state}): nothing was \
                     saved; an older file at {} is intact",
                    path.display()
                )))
            }
            Commit::Failed(e) => {
                tracing::warn!(domain = %self.id.name, error = %e, "cannot keep the save file: resuming the domain");
                self.recover_after_failed_save(domid, was_paused);
                return Err(save_err(e));
            }
        };
        // The file is committed: the end of the domain is `saved` from here on.
        if let Err(e) = self.destroy_domid(domid) {
            return Err(backend_msg(format!(
                "save: the state is saved to {} but destroying the suspended domain failed: \
                 {e}; destroy it",
                path.display()
            )));
        }
        self.ended(domid);
        tracing::info!(domain = %self.id.name, domid, suspend_ms, total_ms = t0.elapsed().as_millis() as u64, path = %path.display(), "saved");
        Ok(())
    }

    /// A save failed before its file was committed (the temporary file goes with `target`):
    /// preempted by a destroy -> no recovery; the domain died -> say so; else resume it.
    fn save_failed(
        &self,
        domid: u32,
        was_paused: bool,
        path: &Path,
        target: SaveTarget,
        err: Error,
    ) -> Error {
        drop(target);
        if self.preempted() {
            return Error::Interrupted {
                operation: Operation::Save,
                by: Operation::Destroy,
                state: self.cell.state(),
            };
        }
        let gone =
            !self.cell.state().is_active() || self.ctx.domain_info(domid).map_or(true, |i| i.dying);
        if gone {
            self.settle_gone(domid);
            let state = self.cell.state();
            if !state.is_active() {
                return backend_msg(format!(
                    "save: the domain stopped during the save (now {state}): nothing was \
                     saved; an older file at {} is intact ({err})",
                    path.display()
                ));
            }
        }
        tracing::warn!(domain = %self.id.name, error = %err, "save failed: resuming the domain");
        self.recover_after_failed_save(domid, was_paused);
        err
    }

    /// Pause again after a failed save of a paused domain (it ran to suspend itself).
    fn pause_again(&self, domid: u32) {
        let _intent = self.cell.intent(Intent::Pause);
        match self.ctx.pause(domid) {
            Ok(()) => self.feed_fact(Fact::Paused),
            Err(e) => {
                tracing::error!(domain = %self.id.name, error = %e, "cannot pause the domain again after a failed save")
            }
        }
    }

    /// After a failed save: if the guest is suspended, resume it (co-operatively) and watch
    /// it afresh; put it back to paused if it was paused.
    fn recover_after_failed_save(&self, domid: u32, was_paused: bool) {
        match self.ctx.domain_info(domid) {
            Ok(info) if info.shutdown && info.shutdown_reason == i32::from(REASON_SUSPEND) => {
                self.feed_fact(Fact::Suspended);
                match self.ctx.resume_cancel(domid) {
                    Ok(()) => {
                        if let Err(e) = self.rearm(domid) {
                            tracing::error!(domain = %self.id.name, error = %e, "cannot watch the resumed domain");
                        }
                        self.feed_fact(Fact::ResumedAfterFailedSave);
                        if was_paused {
                            self.pause_again(domid);
                        }
                    }
                    Err(e) => {
                        tracing::error!(domain = %self.id.name, error = %e, "cannot resume the domain after a failed save: it stays suspended")
                    }
                }
            }
            Ok(info) => {
                if was_paused {
                    self.pause_again(domid);
                } else if info.paused {
                    // libxc stops the vCPUs for the save's last round; a save that fails
                    // there ("Bad mfn for suspend record", seen under load) leaves them
                    // stopped without a suspend, while the state is running again.
                    tracing::warn!(domain = %self.id.name, domid, "a failed save left the vCPUs stopped: unpausing");
                    if let Err(e) = self.ctx.unpause(domid) {
                        tracing::error!(domain = %self.id.name, error = %e, "cannot unpause the domain after a failed save")
                    }
                }
            }
            Err(e) => {
                tracing::error!(domain = %self.id.name, error = %e, "after a failed save the domain cannot be found")
            }
        }
    }

    fn restore_blocking(&self, path: &Path, options: RestoreOptions) -> Result<()> {
        if self.cell.state().is_active() {
            return Err(self.invalid(Operation::Restore));
        }
        // Every failure from here on is a failed restore: shutoff(failed) + stopped(failed).
        let (file, header) = match self.check_save_file(path) {
            Ok(ok) => ok,
            Err(e) => {
                self.feed_fact(Fact::CreateFailed);
                return Err(e);
            }
        };
        if let Err(e) = self.prepare_runtime_dir(Operation::Restore) {
            self.feed_fact(Fact::CreateFailed);
            return Err(e);
        }
        let paused = options.paused.unwrap_or(header.was_paused);
        // The saved instance's devices, hotplugged ones included (§14.3); a header without
        // them: the definition's.
        let set = match header.devices.clone() {
            Some(v) => match serde_json::from_value::<XenDeviceSet>(v) {
                Ok(set) => set,
                Err(e) => {
                    self.feed_fact(Fact::CreateFailed);
                    return Err(backend_msg(format!(
                        "restore: the device set in {} cannot be read: {e}",
                        path.display()
                    )));
                }
            },
            None => self.defined_set()?,
        };
        let json = match self.json_with(&set) {
            Ok(j) => j,
            Err(e) => {
                self.feed_fact(Fact::CreateFailed);
                return Err(e);
            }
        };
        let t0 = Instant::now();
        self.set_live(set);
        let mut creating = self.begin_create();
        let domid = match self.ctx.create_restore(&json, file.as_raw_fd()) {
            Ok(d) => d,
            Err(e) => {
                drop(creating);
                self.create_failed();
                return Err(backend_msg(format!(
                    "restore: libxl could not restore the domain from {}: {e}",
                    path.display()
                )));
            }
        };
        drop(file);
        let created = Fact::Created {
            how: Creation::Restore,
            paused,
        };
        if let Err(e) = self.arm_and_run(&mut creating, domid, paused, created) {
            let _ = self.ctx.destroy(domid);
            self.create_failed();
            return Err(backend_msg(format!(
                "restore: the domain was restored but cannot be run: {e}"
            )));
        }
        tracing::info!(domain = %self.id.name, domid, ms = t0.elapsed().as_millis() as u64, "restored");
        Ok(())
    }

    /// Open a save file and check it before libxl reads a byte of it: header, stream length
    /// and digest (savefile.rs), and that it holds this domain.
    fn check_save_file(&self, path: &Path) -> Result<(std::fs::File, SaveHeader)> {
        let (mut file, header) = savefile::open_header(path).map_err(restore_file_err)?;
        if header.uuid != self.id.uuid || header.name != self.id.name {
            return Err(Error::BadSaveFile {
                path: path.to_path_buf(),
                reason: format!(
                    "it holds domain {:?} ({}), not {}: restore it through that domain",
                    header.name, header.uuid, self.id
                ),
            });
        }
        let t0 = Instant::now();
        savefile::verify_stream(&mut file, path).map_err(restore_file_err)?;
        tracing::info!(domain = %self.id.name, ms = t0.elapsed().as_millis() as u64, "save file verified");
        Ok((file, header))
    }

    fn pm_suspend_blocking(&self) -> Result<()> {
        if !self.cell.state().is_running() {
            return Err(self.invalid(Operation::PmSuspend));
        }
        let domid = self
            .domid()
            .ok_or_else(|| self.invalid(Operation::PmSuspend))?;
        let _intent = self.cell.intent(Intent::PmSuspend);
        self.ctx
            .suspend_only(domid)
            .map_err(|e| self.failed(Operation::PmSuspend, domid, e))?;
        self.feed_fact(Fact::SuspendedOnly);
        Ok(())
    }

    fn pm_wakeup_blocking(&self) -> Result<()> {
        if !matches!(self.cell.state(), DomainState::PmSuspended(_)) {
            return Err(self.invalid(Operation::PmWakeup));
        }
        let domid = self
            .domid()
            .ok_or_else(|| self.invalid(Operation::PmWakeup))?;
        self.ctx
            .resume_cancel(domid)
            .map_err(|e| self.failed(Operation::PmWakeup, domid, e))?;
        if let Err(e) = self.rearm(domid) {
            tracing::error!(domain = %self.id.name, error = %e, "cannot watch the woken domain");
        }
        self.feed_fact(Fact::WokeUp);
        Ok(())
    }
}

impl Drop for DomainInner {
    fn drop(&mut self) {
        let b = self.backend.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = b.watch.take() {
            self.registry.remove(w.token());
        }
    }
}

/// A domkit domain on Xen (cheap to clone; clones share the domain).
#[derive(Clone, Debug)]
pub struct LibxlDomain {
    pub(crate) inner: Arc<DomainInner>,
}

/// An intent that outlives the blocking call that stashed it (reboot: until the guest
/// rebooted); popped when dropped.
pub(crate) struct OwnedIntent {
    inner: Arc<DomainInner>,
    token: Option<IntentToken>,
}

impl OwnedIntent {
    fn push(inner: Arc<DomainInner>, intent: Intent) -> Self {
        let token = inner.cell.with(|l| l.push_intent(intent));
        OwnedIntent {
            inner,
            token: Some(token),
        }
    }
}

impl Drop for OwnedIntent {
    fn drop(&mut self) {
        if let Some(token) = self.token.take() {
            self.inner.cell.with(|l| l.pop_intent(token));
        }
    }
}

/// Counts an API destroy in flight until dropped.
struct DestroyInFlight(Arc<DomainInner>);

impl Drop for DestroyInFlight {
    fn drop(&mut self) {
        self.0.destroying.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// How a wait for the end of a shutdown or a reboot ended.
enum WaitEnd {
    /// `stopped(detail)`.
    Stopped(StoppedDetail),
    /// The guest crashed (the state is `crashed(_)`, or a restart follows).
    Crashed,
    /// The guest rebooted.
    Rebooted,
}

/// Wait for the first event that ends a wait on the guest.
async fn next_end(events: &mut EventStream) -> Option<WaitEnd> {
    while let Some(ev) = events.next().await {
        match ev.kind {
            EventKind::Stopped(d) => return Some(WaitEnd::Stopped(d)),
            EventKind::Crashed(_) => return Some(WaitEnd::Crashed),
            EventKind::Rebooted => return Some(WaitEnd::Rebooted),
            _ => {}
        }
    }
    None
}

impl LibxlDomain {
    /// The current Xen domid (changes on every restart and restore); `None` when shut off.
    pub fn domid(&self) -> Option<u32> {
        self.inner.domid()
    }

    /// The config this domain was defined with (its uuid filled in); device changes of
    /// scope config since are in [`LibxlDomain::definition`].
    pub fn config(&self) -> &DomainConfig {
        &self.inner.config
    }

    /// The definition as it is now, device changes of scope config included (what the next
    /// start creates, and what a persistent driver has stored).
    pub fn definition(&self) -> DomainConfig {
        self.inner.definition()
    }

    /// The current devices (§14.1): the running instance's while active, hotplugged ones
    /// included, else the definition's.
    fn device_infos(&self) -> Result<Vec<DeviceInfo>> {
        if self.inner.cell.state().is_active() {
            return Ok(self.inner.live_set()?.infos());
        }
        Ok(self.inner.defined_set()?.infos())
    }

    /// libxl's JSON domain config of the config this domain was defined with; a create
    /// replaces its `disks` and `nics` with the devices it is created with (the current
    /// definition's, or a restart's / restore's own: [`crate::devices`], §14.7).
    pub fn libxl_json(&self) -> &str {
        &self.inner.libxl_json
    }

    /// The domain's private runtime directory (channel sockets).
    pub fn runtime_dir(&self) -> &Path {
        &self.inner.runtime_dir
    }

    /// The raw figures behind [`Domain::stats`] (`None` when the domain has no Xen domain,
    /// or it cannot be read): what `libxl_integration::t42` records as the fixture of
    /// [`crate::stats`]'s tests.
    pub async fn stats_readings(&self) -> Option<XenReadings> {
        let domid = self.domid()?;
        let (ctx, disks, nics) = (
            self.inner.ctx.clone(),
            self.inner.config.disks.len(),
            self.inner.config.nics.len(),
        );
        tokio::task::spawn_blocking(move || observe::read(&ctx, domid, disks, nics).ok())
            .await
            .ok()
            .flatten()
    }

    /// The record of this domain from `readings` of its current Xen domain, or of its
    /// state only when there are none (it is not active, or its Xen domain just ended).
    pub(crate) fn stats_from(
        &self,
        readings: Option<&XenReadings>,
        taken_at_us: u64,
    ) -> DomainStats {
        // After the figures: a stop racing with them shows as the newer state.
        let state = self.inner.cell.state();
        match readings {
            Some(r) if state.is_active() => xstats::domain_stats(
                self.inner.id.clone(),
                state,
                taken_at_us,
                self.inner.config.memory_mib,
                r,
            ),
            _ => DomainStats::inactive(self.inner.id.clone(), state, taken_at_us),
        }
    }

    /// A stream on the PV console (§12.4): the pump to xenconsoled's pty is made on the
    /// first call of a run (start or restore to stop) and shared by every stream; it
    /// follows the run across restarts (new domids).
    async fn open_console(&self, access: ConsoleAccess) -> Result<ConsoleStream> {
        self.check_attached(Operation::Console)?;
        let mut link = self.inner.console.lock().await;
        if !link.as_ref().is_some_and(ConsoleLink::is_open) {
            // Subscribe before looking at the state: a stop after the look is in the
            // stream, and ends the link.
            let events = self.inner.cell.subscribe();
            if !self.inner.cell.state().is_active() {
                return Err(self.inner.invalid(Operation::Console));
            }
            let me = Arc::downgrade(&self.inner);
            let domid: observe::DomidSource =
                Arc::new(move || me.upgrade().and_then(|d| d.domid()));
            let me = Arc::downgrade(&self.inner);
            let settle: observe::Settle = Arc::new(move || {
                if let Some(d) = me.upgrade() {
                    d.cell.with(|_| ());
                }
            });
            *link = Some(ConsoleLink::start(
                self.inner.ctx.clone(),
                &self.inner.id.name,
                domid,
                settle,
                events,
            ));
        }
        if let Some(l) = link.as_mut() {
            l.primed().await;
        }
        match link.as_ref() {
            Some(l) => l.hub.open(access).map_err(|e| match e {
                // Closed between the check and the open: the domain stopped.
                Error::NotFound { .. } => self.inner.invalid(Operation::Console),
                other => other,
            }),
            None => Err(self.inner.invalid(Operation::Console)),
        }
    }

    /// Diagnostics: what the driver fed the state machine (libxl events of the current watch
    /// and facts from returned calls, with the intent in force), oldest first.
    pub fn trace(&self) -> Vec<TraceEntry> {
        lock(&self.inner.trace).clone()
    }

    /// Run `f` on a blocking thread under this domain's operation lock (§6.0): the caller
    /// queues (FIFO) for the lock first, so a future dropped while queued never runs `f`;
    /// the operation starts once no destroy is in flight; once spawned, `f` runs to its end
    /// even if the caller's future is dropped. An error of an operation that a destroy
    /// preempted is `Error::Interrupted`.
    async fn run_op<T: Send + 'static>(
        &self,
        operation: Operation,
        f: impl FnOnce(&DomainInner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.check_attached(operation)?;
        let guard = self.inner.ops.clone().lock_owned().await;
        let mut destroying = self.inner.destroying.subscribe();
        while *destroying.borrow_and_update() > 0 {
            if destroying.changed().await.is_err() {
                break;
            }
        }
        let inner = self.inner.clone();
        let job = tokio::task::spawn_blocking(move || {
            let _guard = guard;
            let epoch = inner.destroys.load(Ordering::SeqCst);
            let broken = inner.ctx.broken();
            if broken.is_none() {
                inner.cell.set_control(ControlState::Job { operation });
            }
            let r = f(&inner);
            match broken.or_else(|| inner.ctx.broken()) {
                Some(reason) => inner.cell.set_control(ControlState::Broken { reason }),
                None => inner.cell.set_control(ControlState::Ok),
            }
            let preempted = inner.destroys.load(Ordering::SeqCst) != epoch;
            (r, preempted)
        });
        let (r, preempted) = job.await.map_err(|e| {
            backend_msg(format!(
                "{operation}: the blocking libxl call panicked or was cancelled: {e}"
            ))
        })?;
        match r {
            Ok(v) => Ok(v),
            Err(e) if preempted || matches!(e, Error::Interrupted { .. }) => {
                tracing::info!(domain = %self.inner.id.name, %operation, error = %e, "preempted by a destroy");
                Err(self.interrupted(operation).await)
            }
            Err(e) => Err(e),
        }
    }

    /// A handle of a driver that detached controls nothing any more.
    fn check_attached(&self, operation: Operation) -> Result<()> {
        if self.inner.detached.load(Ordering::SeqCst) {
            return Err(backend_msg(format!(
                "{operation}: this handle's driver detached from its roots; the domain \
                 belongs to the next manager (open the roots again)"
            )));
        }
        Ok(())
    }

    /// `Error::Interrupted` for `operation`, once the destroy that preempted it is over.
    async fn interrupted(&self, operation: Operation) -> Error {
        let state = self
            .inner
            .cell
            .wait_for(operation, INTERRUPTED_SETTLE, |s| !s.is_active())
            .await
            .unwrap_or_else(|_| self.state());
        Error::Interrupted {
            operation,
            by: Operation::Destroy,
            state,
        }
    }

    /// The error of a shutdown or reboot whose wait ended without the outcome it waited
    /// for. `epoch`: [`DomainInner::destroys`] when the operation began (an API destroy
    /// since then interrupted it; any other destroy was out of band, e.g. `xl destroy`).
    async fn ended_instead(&self, operation: Operation, end: WaitEnd, epoch: u64) -> Error {
        match end {
            WaitEnd::Stopped(StoppedDetail::Destroyed)
                if self.inner.destroys.load(Ordering::SeqCst) != epoch =>
            {
                self.interrupted(operation).await
            }
            WaitEnd::Stopped(StoppedDetail::Destroyed) => backend_msg(format!(
                "{operation}: the domain was destroyed by someone else (e.g. `xl destroy`) \
                 before the guest completed it; it is {}",
                self.state()
            )),
            WaitEnd::Stopped(d) => backend_msg(format!(
                "{operation}: the domain ended (stopped {d:?}) instead; it is {}",
                self.state()
            )),
            WaitEnd::Crashed => backend_msg(format!(
                "{operation}: the guest crashed instead (it is {}; on_crash decides what \
                 follows)",
                self.state()
            )),
            WaitEnd::Rebooted => backend_msg(format!(
                "{operation}: the guest rebooted instead; it is {}",
                self.state()
            )),
        }
    }

    /// A shutdown that did not complete by its deadline (§6.3).
    async fn shutdown_timed_out(
        &self,
        options: &ShutdownOptions,
        what: &str,
    ) -> Result<ShutdownOutcome> {
        if options.destroy_on_timeout {
            tracing::info!(domain = %self.inner.id.name, "shutdown timed out: destroying");
            self.destroy().await?;
            return Ok(ShutdownOutcome::Destroyed);
        }
        Err(Error::Timeout {
            operation: Operation::Shutdown,
            after: options.timeout,
            hint: format!(
                "{what} (it is {}); the request stays pending in the guest and the domain \
                 stays operable: destroy it, or ask with destroy_on_timeout",
                self.state()
            ),
        })
    }

    /// The guest agent of the running domain (§13.1): one client over the PV channel
    /// `org.qemu.guest_agent.0`, shared by every caller and by domkit's agent-mode shutdown
    /// and reboot. Also [`Domain::guest_agent`].
    pub async fn guest_agent(&self) -> Result<Arc<domkit_core::GuestAgent>> {
        self.agent_for(Operation::GuestAgent)
    }

    /// The agent client for `operation`: the domain must be active and have the channel.
    fn agent_for(&self, operation: Operation) -> Result<Arc<domkit_core::GuestAgent>> {
        self.check_attached(operation)?;
        let Some(link) = self.inner.agent.as_ref() else {
            if operation == Operation::GuestAgent {
                return Err(Error::NoGuestAgent {
                    domain: self.inner.id.name.clone(),
                    reason: String::new(),
                });
            }
            return Err(Error::Unsupported {
                operation,
                backend: BACKEND.into(),
                reason: UNSUPPORTED_AGENT.into(),
            });
        };
        if !self.inner.cell.state().is_active() {
            return Err(self.inner.invalid(operation));
        }
        Ok(link.client.clone())
    }

    /// The request half of an agent-mode shutdown or reboot (§6.3, §13): `guest-shutdown`
    /// (it sends no reply on success), with the PV request's state rules. A shutdown is
    /// acknowledged once the agent took it; a reboot keeps `Reboot` stashed (handed to
    /// `hold`) until the guest rebooted.
    async fn agent_request(
        &self,
        operation: Operation,
        hold: Option<Box<dyn FnOnce(OwnedIntent, EventStream) + Send>>,
    ) -> Result<()> {
        let agent = self.agent_for(operation)?;
        // Not under the operation lock: a hung agent must not hold up the domain's other
        // operations (§13.5); the client serialises its own calls, the caller's deadline
        // bounds this one.
        match self.inner.cell.state() {
            DomainState::Running(_)
            | DomainState::Blocked(_)
            | DomainState::ShuttingDown(ShuttingDownReason::User) => {}
            _ => return Err(self.inner.invalid(operation)),
        }
        let mode = if hold.is_some() {
            domkit_core::agent::ShutdownMode::Reboot
        } else {
            domkit_core::agent::ShutdownMode::Powerdown
        };
        match hold {
            None => {
                let _intent = self.inner.cell.intent(Intent::Shutdown);
                agent
                    .shutdown(mode)
                    .await
                    .map_err(|e| xagent::agent_to_core(operation, e))?;
                self.inner.feed_fact(Fact::ShutdownAcknowledged);
            }
            Some(hold) => {
                let events = self.inner.cell.subscribe();
                let intent = OwnedIntent::push(self.inner.clone(), Intent::Reboot);
                agent
                    .shutdown(mode)
                    .await
                    .map_err(|e| xagent::agent_to_core(operation, e))?;
                hold(intent, events);
            }
        }
        Ok(())
    }

    fn check_mode(&self, operation: Operation, mode: ShutdownMode) -> Result<()> {
        let reason = match mode {
            ShutdownMode::Default | ShutdownMode::Paravirt => return Ok(()),
            ShutdownMode::Agent if self.inner.agent.is_some() => return Ok(()),
            ShutdownMode::Acpi => UNSUPPORTED_ACPI,
            ShutdownMode::Agent => UNSUPPORTED_AGENT,
        };
        Err(Error::Unsupported {
            operation,
            backend: BACKEND.into(),
            reason: reason.into(),
        })
    }
}

#[async_trait]
impl Domain for LibxlDomain {
    fn id(&self) -> &DomainId {
        &self.inner.id
    }

    fn state(&self) -> DomainState {
        self.inner.cell.state()
    }

    async fn info(&self) -> Result<DomainInfo> {
        Ok(DomainInfo {
            id: self.inner.id.clone(),
            state: self.inner.cell.state(),
            control: self.inner.cell.control(),
            vcpus: self.inner.config.vcpus,
            memory_mib: self.inner.config.memory_mib,
            backend_handle: self.domid().map(|d| format!("domid {d}")),
            devices: self.device_infos()?,
        })
    }

    async fn devices(&self) -> Result<Vec<DeviceInfo>> {
        self.device_infos()
    }

    /// The definition's devices, changes of scope config included (§14.2).
    async fn defined_devices(&self) -> Result<Vec<DeviceInfo>> {
        Ok(self.inner.defined_set()?.infos())
    }

    async fn attach_device(&self, device: DeviceSpec, scope: DeviceScope) -> Result<DeviceId> {
        let operation = Operation::AttachDevice;
        // Checks that touch nothing first: a bad device changes nothing (§14.4).
        match &device {
            DeviceSpec::Disk(d) => domkit_core::config::check_image("disk.path", &d.path)?,
            DeviceSpec::Nic(n) => {
                if let Some(mac) = &n.mac {
                    if !domkit_core::config::is_valid_mac(mac) {
                        return Err(Error::InvalidConfig(domkit_core::ConfigError::BadMac {
                            index: 0,
                            mac: mac.clone(),
                        }));
                    }
                }
                check_bridge(operation, n)?;
            }
        }
        self.run_op(operation, move |d| d.attach_blocking(device, scope))
            .await
    }

    async fn detach_device(&self, id: DeviceId, options: DetachOptions) -> Result<()> {
        self.run_op(Operation::DetachDevice, move |d| {
            d.detach_blocking(id, options)
        })
        .await
    }

    fn subscribe(&self) -> EventStream {
        self.inner.cell.subscribe()
    }

    fn snapshot(&self) -> domkit_core::Snapshot {
        let (state, seq, events) = self.inner.cell.snapshot_and_subscribe();
        domkit_core::Snapshot { state, seq, events }
    }

    /// Replays the kept events after `after` (the cell's ring; §12.1): also those a reattach
    /// produced before the caller got the handle.
    fn subscribe_from(&self, after: u64) -> Result<EventStream> {
        self.inner.cell.subscribe_from(after)
    }

    async fn start(&self, options: StartOptions) -> Result<()> {
        self.run_op(Operation::Start, move |d| d.start_blocking(options))
            .await
    }

    async fn pause(&self) -> Result<()> {
        self.run_op(Operation::Pause, |d| d.pause_blocking()).await
    }

    async fn resume(&self) -> Result<()> {
        self.run_op(Operation::Resume, |d| d.resume_blocking())
            .await
    }

    /// §6.3: the request (and libxl's wait for the guest's acknowledgement) runs under the
    /// operation lock in the background; the wait for the end belongs to this future. The
    /// caller's timeout bounds both.
    async fn shutdown(&self, options: ShutdownOptions) -> Result<ShutdownOutcome> {
        self.check_mode(Operation::Shutdown, options.mode)?;
        let deadline = tokio::time::Instant::now() + options.timeout;
        let epoch = self.inner.destroys.load(Ordering::SeqCst);
        let mut events = self.subscribe();
        let requested = if options.mode == ShutdownMode::Agent {
            tokio::time::timeout_at(deadline, self.agent_request(Operation::Shutdown, None)).await
        } else {
            tokio::time::timeout_at(
                deadline,
                self.run_op(Operation::Shutdown, |d| d.shutdown_request_blocking()),
            )
            .await
        };
        match requested {
            Ok(Ok(())) => {}
            Ok(Err(Error::Timeout { .. })) | Err(_) => {
                let what = if options.mode == ShutdownMode::Agent {
                    "the guest agent did not take the shutdown request in time (is qemu-ga \
                     running on the PV channel?)"
                } else {
                    "the guest did not acknowledge the PV shutdown request in time (libxl \
                     keeps waiting for it for up to 60 s; operations queue behind that)"
                };
                return self.shutdown_timed_out(&options, what).await;
            }
            Ok(Err(e)) => return Err(e),
        }
        if options.wait == ShutdownWait::Acknowledged {
            return Ok(ShutdownOutcome::Acknowledged);
        }
        match tokio::time::timeout_at(deadline, next_end(&mut events)).await {
            Ok(Some(WaitEnd::Stopped(StoppedDetail::Shutdown))) => Ok(ShutdownOutcome::Completed),
            Ok(Some(end)) => Err(self.ended_instead(Operation::Shutdown, end, epoch).await),
            Ok(None) => Err(backend_msg(format!(
                "shutdown: the domain's event stream ended; it is {}",
                self.state()
            ))),
            Err(_) => {
                self.shutdown_timed_out(&options, "the guest did not shut down in time")
                    .await
            }
        }
    }

    /// §6.4, §6.0: the PV request (and its acknowledgement) runs under the operation lock in
    /// the background, with `Reboot` stashed until the guest rebooted or `timeout` passed;
    /// the wait for the reboot and the restart that follows belongs to this future.
    async fn reboot(&self, mode: ShutdownMode, timeout: Duration) -> Result<()> {
        self.check_mode(Operation::Reboot, mode)?;
        let deadline = tokio::time::Instant::now() + timeout;
        let epoch = self.inner.destroys.load(Ordering::SeqCst);
        let mut events = self.subscribe();
        let handle = tokio::runtime::Handle::current();
        let hold = move |intent: OwnedIntent, mut events: EventStream| {
            handle.spawn(async move {
                let _intent = intent;
                let _ = tokio::time::timeout_at(deadline, next_end(&mut events)).await;
            });
        };
        let requested = if mode == ShutdownMode::Agent {
            tokio::time::timeout_at(
                deadline,
                self.agent_request(Operation::Reboot, Some(Box::new(hold))),
            )
            .await
        } else {
            tokio::time::timeout_at(
                deadline,
                self.run_op(Operation::Reboot, move |d| d.reboot_request_blocking(hold)),
            )
            .await
        };
        let timed_out = |what: &str| Error::Timeout {
            operation: Operation::Reboot,
            after: timeout,
            hint: format!("{what}; it is {}", self.state()),
        };
        match requested {
            Ok(r) => r?,
            Err(_) if mode == ShutdownMode::Agent => {
                return Err(timed_out(
                    "the guest agent did not take the reboot request in time (is qemu-ga \
                     running on the PV channel?)",
                ))
            }
            Err(_) => {
                return Err(timed_out(
                    "the guest did not acknowledge the PV reboot request in time (libxl keeps \
                     waiting for it for up to 60 s; operations queue behind that)",
                ))
            }
        }
        match tokio::time::timeout_at(deadline, next_end(&mut events)).await {
            Ok(Some(WaitEnd::Rebooted)) => {}
            Ok(Some(end)) => return Err(self.ended_instead(Operation::Reboot, end, epoch).await),
            Ok(None) => {
                return Err(backend_msg(format!(
                    "reboot: the domain's event stream ended; it is {}",
                    self.state()
                )))
            }
            Err(_) => {
                return Err(timed_out(
                    "the guest acknowledged the reboot request but did not reboot",
                ))
            }
        }
        // Xen reboots a PV guest by destroy + create (the policy restart): wait for it.
        let inner = self.inner.clone();
        let left = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(Duration::from_secs(1));
        let state = self
            .inner
            .cell
            .wait_for(Operation::Reboot, left, move |_| {
                !inner.cell.with(|l| l.is_restarting())
            })
            .await?;
        if state.is_active() {
            Ok(())
        } else if state == DomainState::Shutoff(domkit_core::ShutoffReason::Destroyed)
            && self.inner.destroys.load(Ordering::SeqCst) != epoch
        {
            Err(Error::Interrupted {
                operation: Operation::Reboot,
                by: Operation::Destroy,
                state,
            })
        } else {
            Err(backend_msg(format!(
                "reboot: creating the domain again failed; it is {state}"
            )))
        }
    }

    async fn reset(&self) -> Result<()> {
        self.run_op(Operation::Reset, |d| d.reset_blocking()).await
    }

    /// §6.0, §6.5: never queues behind another operation; preempts it.
    async fn destroy(&self) -> Result<()> {
        self.check_attached(Operation::Destroy)?;
        let inner = self.inner.clone();
        inner.destroys.fetch_add(1, Ordering::SeqCst);
        inner.destroying.send_modify(|n| *n += 1);
        let in_flight = DestroyInFlight(inner.clone());
        let job = tokio::task::spawn_blocking(move || {
            let _in_flight = in_flight;
            inner.destroy_preempting()
        });
        job.await.map_err(|e| {
            backend_msg(format!(
                "destroy: the blocking libxl call panicked or was cancelled: {e}"
            ))
        })?
    }

    async fn save(&self, path: &Path) -> Result<()> {
        let path = path.to_path_buf();
        self.run_op(Operation::Save, move |d| d.save_blocking(&path))
            .await
    }

    async fn restore(&self, path: &Path, options: RestoreOptions) -> Result<()> {
        let path = path.to_path_buf();
        self.run_op(Operation::Restore, move |d| {
            d.restore_blocking(&path, options)
        })
        .await
    }

    async fn pm_suspend(&self, target: PmSuspendTarget) -> Result<()> {
        if target == PmSuspendTarget::Disk {
            return Err(Error::Unsupported {
                operation: Operation::PmSuspend,
                backend: BACKEND.into(),
                reason: UNSUPPORTED_S4.into(),
            });
        }
        self.run_op(Operation::PmSuspend, |d| d.pm_suspend_blocking())
            .await
    }

    async fn pm_wakeup(&self) -> Result<()> {
        self.run_op(Operation::PmWakeup, |d| d.pm_wakeup_blocking())
            .await
    }

    /// `libxl_domain_info`, `libxl_list_vcpu`, `libxl_get_memory_target` and dom0's
    /// blkback/netback counters (§12.5, [`crate::stats`]).
    async fn stats(&self) -> Result<DomainStats> {
        let taken_at_us = domkit_core::event::unix_micros(SystemTime::now());
        let readings = self.stats_readings().await;
        Ok(self.stats_from(readings.as_ref(), taken_at_us))
    }

    async fn console(&self, access: ConsoleAccess) -> Result<ConsoleStream> {
        self.open_console(access).await
    }

    fn backend_name(&self) -> &'static str {
        BACKEND
    }

    // The guest agent (§13): outside the operation queue, so a hung agent never holds up
    // the domain's other operations.
    async fn guest_agent(&self) -> Result<Arc<domkit_core::GuestAgent>> {
        LibxlDomain::guest_agent(self).await
    }
}

/// A NIC to hot-add must name a bridge that exists in dom0 (`missing_bridge`); user-mode
/// networking is QEMU-only (`unsupported`).
fn check_bridge(operation: Operation, nic: &domkit_core::Nic) -> Result<()> {
    match &nic.backend {
        domkit_core::NicBackend::User => Err(Error::Unsupported {
            operation,
            backend: BACKEND.into(),
            reason: "user-mode networking is QEMU-only; on Xen use backend = { bridge = \
                     \"<dom0 bridge>\" }"
                .into(),
        }),
        domkit_core::NicBackend::Bridge(br) => {
            let safe = !br.is_empty()
                && br.len() <= 15
                && br
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
                && br != "."
                && br != "..";
            if !safe || !Path::new("/sys/class/net").join(br).join("bridge").is_dir() {
                return Err(Error::InvalidConfig(
                    domkit_core::ConfigError::MissingBridge { bridge: br.clone() },
                ));
            }
            Ok(())
        }
    }
}
