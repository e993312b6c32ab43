//! [`LibxlDriver`]: the [`Driver`] implementation (domain registry, event dispatcher, the
//! durable store of a persistent driver and the reaper of an ephemeral one, §11).

use crate::config;
use crate::context::{Context, ContextEvent, DomInfo, LibxlError};
use crate::domain::{DomainInner, LibxlDomain, Registry, BACKEND};
use crate::ephemeral::{self, Reaper};
use async_trait::async_trait;
use domkit_core::cell::DRIVER_EVENT_BUFFER;
use domkit_core::store::{ensure_private_dir, DefinitionStore, InFlight, StoredStatus};
use domkit_core::{
    Capabilities, ControlState, Domain, DomainConfig, DomainEvent, DomainId, DomainInfo, Driver,
    Error, EventStream, Lifecycle, LifecycleCell, Operation, Ownership, Result, ShutdownMode,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use tokio::sync::broadcast;
use uuid::Uuid;

/// Options of a [`LibxlDriver`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibxlOptions {
    /// Where per-domain runtime files go (channel sockets; an ephemeral driver's markers):
    /// `<runtime_dir>/<name>/`; created 0700 or verified (§11.1). Default:
    /// [`default_runtime_root`].
    pub runtime_dir: PathBuf,
    /// Whether domains die with this driver's process or outlive it (§11.0). Default:
    /// ephemeral.
    pub ownership: Ownership,
    /// Where a persistent driver keeps definitions and statuses (created 0700 or verified).
    /// Default: [`default_state_root`]. Unused when ephemeral.
    pub state_root: PathBuf,
}

impl Default for LibxlOptions {
    fn default() -> Self {
        LibxlOptions {
            runtime_dir: default_runtime_root(),
            ownership: Ownership::Ephemeral,
            state_root: default_state_root(),
        }
    }
}

impl LibxlOptions {
    /// Ephemeral options with another runtime root (tests use a temporary directory).
    pub fn with_runtime_dir(runtime_dir: impl Into<PathBuf>) -> Self {
        LibxlOptions {
            runtime_dir: runtime_dir.into(),
            ..Default::default()
        }
    }

    /// Persistent options (a host tool): definitions under `state_root`, runtime files
    /// under `runtime_dir`; domains outlive the process and the next driver reattaches.
    pub fn persistent(state_root: impl Into<PathBuf>, runtime_dir: impl Into<PathBuf>) -> Self {
        LibxlOptions {
            runtime_dir: runtime_dir.into(),
            state_root: state_root.into(),
            ownership: Ownership::Persistent,
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/nonexistent-home"))
}

/// `/run/domkit/libxl` for root, `$XDG_RUNTIME_DIR/domkit/libxl` otherwise, or, without
/// `XDG_RUNTIME_DIR`, `~/.local/state/domkit/run/libxl` (never a predictable directory in a
/// shared `/tmp`, §11.1). libxl itself needs root; the rest is for symmetry with QEMU.
pub fn default_runtime_root() -> PathBuf {
    if is_root() {
        return PathBuf::from("/run/domkit/libxl");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("domkit/libxl"),
        _ => home_dir().join(".local/state/domkit/run/libxl"),
    }
}

/// `/var/lib/domkit/libxl` for root, `$XDG_STATE_HOME/domkit/libxl` otherwise (default
/// `~/.local/state/domkit/libxl`).
pub fn default_state_root() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/domkit/libxl");
    }
    match std::env::var_os("XDG_STATE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("domkit/libxl"),
        _ => home_dir().join(".local/state/domkit/libxl"),
    }
}

struct DriverShared {
    ctx: Context,
    registry: Arc<Registry>,
    domains: Mutex<BTreeMap<String, LibxlDomain>>,
    events: broadcast::Sender<DomainEvent>,
    options: LibxlOptions,
    host_has_hvm: bool,
    /// The durable store (persistent drivers).
    store: Option<DefinitionStore>,
    /// The reaper (ephemeral drivers): dropped after the domains are destroyed.
    reaper: Option<Arc<Reaper>>,
    /// Serialises `define` (check, persist, insert).
    defining: tokio::sync::Mutex<()>,
    /// One manager per root, for the driver's life (dropped last).
    _root_lock: domkit_core::RootLock,
}

impl DriverShared {
    fn domains(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, LibxlDomain>> {
        // Only ever inserted into / removed from: a poisoned lock is still whole.
        self.domains.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for DriverShared {
    fn drop(&mut self) {
        // The last driver handle is gone. Ephemeral: no Xen domain of ours may outlive it
        // (the reaper would destroy them when the process dies; do it now). Persistent:
        // every domain stays as it is for the next manager (§11).
        let domains: Vec<LibxlDomain> = self.domains().values().cloned().collect();
        for d in domains {
            match self.options.ownership {
                Ownership::Persistent => d.inner.detach(),
                Ownership::Ephemeral => d.inner.destroy_for_drop(),
            }
        }
    }
}

/// The Xen driver: one libxl context, the domains defined through it, and their events.
///
/// Needs a Xen dom0 (privcmd, xenstored); opening fails with [`Error::Backend`] elsewhere.
/// Ephemeral (the default): its domains die with it, also when its process is killed
/// (§11.0, [`crate::ephemeral`]). Persistent ([`LibxlDriver::open`] with
/// [`LibxlOptions::persistent`]): definitions on disk, domains outlive the process, the
/// next driver on the same roots reattaches them.
#[derive(Clone)]
pub struct LibxlDriver {
    shared: Arc<DriverShared>,
}

impl std::fmt::Debug for LibxlDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibxlDriver")
            .field("ctx", &self.shared.ctx)
            .field("options", &self.shared.options)
            .finish_non_exhaustive()
    }
}

fn ctx_err(e: LibxlError) -> Error {
    Error::Backend {
        backend: BACKEND.into(),
        message: e.to_string(),
    }
}

/// The dispatcher thread: routes libxl events to the domain owning the watch token.
fn dispatch(rx: mpsc::Receiver<ContextEvent>, registry: Arc<Registry>) {
    while let Ok(ev) = rx.recv() {
        match ev {
            ContextEvent::Libxl(ev) => match registry.get(ev.for_user) {
                Some(domain) => domain.on_libxl_event(ev),
                None => tracing::debug!(?ev, "libxl event for no current watch: ignored"),
            },
            ContextEvent::Disaster(reason) => {
                for d in registry.all() {
                    d.cell.set_control(ControlState::Broken {
                        reason: reason.clone(),
                    });
                }
            }
        }
    }
}

impl LibxlDriver {
    /// An ephemeral driver with default options.
    pub fn new() -> Result<Self> {
        Self::with_options(LibxlOptions::default())
    }

    /// An ephemeral driver (a persistent one reattaches its domains: [`LibxlDriver::open`]).
    pub fn with_options(options: LibxlOptions) -> Result<Self> {
        if options.ownership == Ownership::Persistent {
            return Err(Error::InvalidConfig(domkit_core::ConfigError::Parse {
                format: "options",
                message: "a persistent libxl driver reattaches its domains: open it with \
                          LibxlDriver::open"
                    .into(),
            }));
        }
        Self::open_roots(options)
    }

    /// Open a driver of either ownership: roots created or verified (§11.1), the root
    /// locked (one manager per root: a second one gets [`Error::RootInUse`] and touches
    /// nothing), then, ephemeral: the reaper started and what a dead ephemeral manager left
    /// destroyed; persistent: every stored domain loaded and reattached (§11.3, §11.4).
    ///
    /// Cancel-safe: dropped before it returns, it leaves every domain as it found it or as
    /// its reattach left it (recorded), and the roots free.
    pub async fn open(options: LibxlOptions) -> Result<Self> {
        let driver = Self::open_roots(options)?;
        if driver.shared.store.is_some() {
            driver.reattach_all().await?;
        }
        Ok(driver)
    }

    fn open_roots(options: LibxlOptions) -> Result<Self> {
        let root_error = |what: &str, path: &Path, e: std::io::Error| {
            Error::io(
                format!(
                    "{what} {} (give the driver a directory of its own)",
                    path.display()
                ),
                e,
            )
        };
        ensure_private_dir(&options.runtime_dir)
            .map_err(|e| root_error("using the runtime root", &options.runtime_dir, e))?;
        let persistent = options.ownership == Ownership::Persistent;
        let store = if persistent {
            Some(
                DefinitionStore::open(&options.state_root)
                    .map_err(|e| root_error("using the state root", &options.state_root, e))?,
            )
        } else {
            None
        };
        // Before anything under the roots is touched.
        let lock_root = if persistent {
            &options.state_root
        } else {
            &options.runtime_dir
        };
        let root_lock = domkit_core::RootLock::acquire(lock_root)?;
        let reaper = if persistent {
            None
        } else {
            Some(Arc::new(Reaper::spawn(&options.runtime_dir).map_err(
                |e| {
                    Error::io(
                        format!(
                            "starting the reaper of an ephemeral libxl driver on {}",
                            options.runtime_dir.display()
                        ),
                        e,
                    )
                },
            )?))
        };
        let (ctx, rx) = Context::new().map_err(ctx_err)?;
        let host_has_hvm = ctx.host_can_run_pvh().map_err(ctx_err)?;
        if !persistent {
            sweep_ephemeral_leftovers(&ctx, &options.runtime_dir);
        }
        let registry = Arc::new(Registry::default());
        let r2 = registry.clone();
        std::thread::Builder::new()
            .name("domkit-libxl-events".into())
            .spawn(move || dispatch(rx, r2))
            .map_err(|e| Error::io("starting the libxl event dispatcher thread", e))?;
        let (events, _) = broadcast::channel(DRIVER_EVENT_BUFFER);
        Ok(LibxlDriver {
            shared: Arc::new(DriverShared {
                ctx,
                registry,
                domains: Mutex::new(BTreeMap::new()),
                events,
                options,
                host_has_hvm,
                store,
                reaper,
                defining: tokio::sync::Mutex::new(()),
                _root_lock: root_lock,
            }),
        })
    }

    /// Load every stored domain and reattach it (persistent drivers, §11.3).
    async fn reattach_all(&self) -> Result<()> {
        let Some(store) = self.shared.store.clone() else {
            return Ok(());
        };
        let state_root = self.shared.options.state_root.clone();
        let stored = tokio::task::spawn_blocking(move || store.load_all())
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            .map_err(|e| {
                Error::io(
                    format!("reading the definitions under {}", state_root.display()),
                    e,
                )
            })?;
        let keep: std::collections::BTreeSet<String> = stored
            .iter()
            .map(|r| r.definition.config.name.clone())
            .collect();
        sweep_runtime_dirs(&self.shared.options.runtime_dir, |name| keep.contains(name));
        let ctx = self.shared.ctx.clone();
        let host: Vec<DomInfo> = tokio::task::spawn_blocking(move || ctx.list_domains())
            .await
            .map_err(|e| Error::Backend {
                backend: BACKEND.into(),
                message: format!("reattach: listing the Xen domains failed: {e}"),
            })?
            .map_err(ctx_err)?;
        let host = Arc::new(host);
        // All listed first: list() shows every defined domain even while one reattaches.
        let domains: Vec<(LibxlDomain, Option<StoredStatus>)> = stored
            .into_iter()
            .map(|record| {
                let status = record.status;
                (
                    self.insert(record.definition.config, status.as_ref()),
                    status,
                )
            })
            .collect();
        for (domain, status) in domains {
            let (inner, host) = (domain.inner.clone(), host.clone());
            let name = domain.id().name.clone();
            // Finishes even if this future is dropped: a reattach is never left half done.
            if let Err(e) = tokio::task::spawn_blocking(move || inner.reattach(status, &host)).await
            {
                tracing::warn!(domain = %name, error = %e, "reattach failed");
            }
        }
        Ok(())
    }

    /// Build and register a domain (defined now, or loaded from the store).
    fn insert(&self, config: DomainConfig, status: Option<&StoredStatus>) -> LibxlDomain {
        let uuid = config.uuid.unwrap_or_else(Uuid::new_v4);
        let id = DomainId {
            name: config.name.clone(),
            uuid,
        };
        let lifecycle = match status {
            // The stored pending_end is not restored on libxl yet: with it,
            // manager_killed_mid_shutdown failed in 2 of 4 CI dry runs (left
            // shutting_down(user)); libxl keeps a shut-down domain's reason, which the plan
            // reads instead (§11.3).
            Some(st) => Lifecycle::resume_from(id.clone(), config.policies(), st.seq, st.state),
            None => Lifecycle::new(id.clone(), config.policies()),
        };
        let events = Some(self.shared.events.clone());
        let persisted = self
            .shared
            .store
            .clone()
            .map(|store| Arc::new(PersistedDomain::new(store, uuid)));
        let cell = match (&persisted, &self.shared.reaper) {
            (Some(p), _) => {
                let p = p.clone();
                LifecycleCell::with_persist(lifecycle, events, Box::new(move |lc| p.write(lc)))
            }
            (None, Some(reaper)) => {
                // Ephemeral: once shut off, no Xen domain of this one exists.
                let (reaper, name) = (reaper.clone(), config.name.clone());
                LifecycleCell::with_persist(
                    lifecycle,
                    events,
                    Box::new(move |lc| {
                        if lc.state().is_shutoff() {
                            reaper.untrack(&name);
                        }
                    }),
                )
            }
            (None, None) => LifecycleCell::new(lifecycle, events),
        };
        let json = config::domain_config_json(
            &config,
            uuid,
            &self.shared.options.runtime_dir,
            self.shared.host_has_hvm,
        );
        let json = match json {
            Ok(json) => json.to_string(),
            Err(e) => {
                // A stored definition this host cannot run (e.g. PVH without HVM): listed,
                // and every create fails with the reason.
                tracing::warn!(domain = %config.name, reason = %e.0, "the stored definition cannot be mapped to libxl");
                cell.set_control(ControlState::Broken {
                    reason: format!("the definition cannot run on this host: {}", e.0),
                });
                String::new()
            }
        };
        let runtime_dir = self.shared.options.runtime_dir.join(&config.name);
        let inner = DomainInner::new(
            id,
            config,
            json,
            runtime_dir,
            cell,
            self.shared.ctx.clone(),
            self.shared.registry.clone(),
            persisted,
            self.shared.reaper.clone(),
        );
        let domain = LibxlDomain { inner };
        self.shared
            .domains()
            .insert(domain.id().name.clone(), domain.clone());
        domain
    }

    /// Stop supervising and leave every domain as it is (a persistent driver's orderly
    /// exit: the next driver on the same roots reattaches; the handles of this one control
    /// nothing any more). The roots stay locked until the driver is dropped.
    pub fn detach(&self) {
        for domain in self.shared.domains().values() {
            domain.inner.detach();
        }
    }

    /// The options in force.
    pub fn options(&self) -> &LibxlOptions {
        &self.shared.options
    }

    /// The libxl context (for diagnostics and tests).
    pub fn context(&self) -> &Context {
        &self.shared.ctx
    }

    /// Whether this Xen host can run PVH guests (`libxl_get_physinfo`: HVM capability and a
    /// paging mode, HAP or shadow).
    pub fn host_supports_pvh(&self) -> bool {
        self.shared.host_has_hvm
    }

    /// Every Xen domain on the host (dom0 included), as libxl lists them.
    pub fn host_domains(&self) -> Result<Vec<DomInfo>> {
        self.shared.ctx.list_domains().map_err(ctx_err)
    }

    /// The shutdown/reboot modes this backend does not support, with the reason (the core's
    /// [`Capabilities`] can only list the supported ones). The agent mode is supported for
    /// domains with a guest agent channel (`unsupported` without one, per domain).
    pub fn unsupported_modes(&self) -> Vec<(ShutdownMode, &'static str)> {
        vec![(ShutdownMode::Acpi, crate::domain::UNSUPPORTED_ACPI)]
    }

    /// A name or uuid taken on the host by a Xen domain that is not ours (left running by
    /// an exited process, or created with `xl`) is `AlreadyExists` at define time, not a
    /// failure of the first `start()`.
    async fn check_host_unique(&self, name: &str, uuid: Uuid) -> Result<()> {
        let ctx = self.shared.ctx.clone();
        let host = tokio::task::spawn_blocking(move || ctx.list_domains())
            .await
            .map_err(|e| Error::Backend {
                backend: BACKEND.into(),
                message: format!("define: listing the Xen domains failed: {e}"),
            })?
            .map_err(ctx_err)?;
        match host
            .iter()
            .find(|d| d.name.as_deref() == Some(name) || d.uuid == uuid)
        {
            Some(d) => Err(Error::AlreadyExists {
                what: format!(
                    "a Xen domain with {} (domid {}, name {:?}, uuid {}; not managed by this \
                     driver: destroy it with `xl destroy {}` or pick another name/uuid)",
                    if d.name.as_deref() == Some(name) {
                        format!("the name {name:?}")
                    } else {
                        format!("the uuid {uuid}")
                    },
                    d.domid,
                    d.name.as_deref().unwrap_or("?"),
                    d.uuid,
                    d.domid
                ),
            }),
            None => Ok(()),
        }
    }

    fn domains(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, LibxlDomain>> {
        self.shared.domains()
    }
}

#[async_trait]
impl Driver for LibxlDriver {
    type Domain = LibxlDomain;

    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        use crate::domain::{UNSUPPORTED_ACPI, UNSUPPORTED_S4};
        Capabilities {
            backend: BACKEND.into(),
            // Every operation exists; what does not is a mode or target of one, refused with
            // Error::Unsupported and the same reason.
            unsupported: BTreeMap::new(),
            // Agent: for domains with a guest agent channel (§13.6), as on QEMU.
            shutdown_modes: vec![
                ShutdownMode::Default,
                ShutdownMode::Paravirt,
                ShutdownMode::Agent,
            ],
            unsupported_variants: [
                ("shutdown:acpi", UNSUPPORTED_ACPI),
                ("reboot:acpi", UNSUPPORTED_ACPI),
                ("pm_suspend:disk", UNSUPPORTED_S4),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        }
    }

    async fn define(&self, mut config: DomainConfig) -> Result<LibxlDomain> {
        config.validate()?;
        let uuid = *config.uuid.get_or_insert_with(Uuid::new_v4);
        // Mapped now: a config libxl cannot take is refused at define time.
        config::domain_config_json(
            &config,
            uuid,
            &self.shared.options.runtime_dir,
            self.shared.host_has_hvm,
        )
        .map_err(|e| Error::Unsupported {
            operation: Operation::Define,
            backend: BACKEND.into(),
            reason: e.0,
        })?;
        // One define at a time: the checks, the store write and the insert must not
        // interleave with another define of the same name.
        let _defining = self.shared.defining.lock().await;
        {
            let domains = self.domains();
            DomainId::check_unique(&config.name, uuid, domains.values().map(|d| d.id()))?;
        }
        self.check_host_unique(&config.name, uuid).await?;
        // Durable before define returns (§11.2).
        if let Some(store) = &self.shared.store {
            let (store, stored) = (store.clone(), config.clone());
            tokio::task::spawn_blocking(move || store.save_definition(&stored))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                .map_err(|e| {
                    Error::io(format!("persisting the definition of {}", config.name), e)
                })?;
        }
        let domain = self.insert(config, None);
        domain.inner.cell.emit(Lifecycle::defined);
        Ok(domain)
    }

    async fn undefine(&self, name: &str) -> Result<()> {
        let d = self.lookup_by_name(name).await?;
        let state = d.state();
        if state.is_active() {
            return Err(Error::InvalidState {
                current: state,
                operation: Operation::Undefine,
            });
        }
        // Removed durably first (§11.2): a manager killed after this has no definition left.
        if let Some(store) = &self.shared.store {
            let (store, uuid) = (store.clone(), d.id().uuid);
            tokio::task::spawn_blocking(move || store.remove(uuid))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                .map_err(|e| Error::io(format!("removing the definition of {name}"), e))?;
        }
        self.domains().remove(name);
        d.inner.remove_runtime_dir();
        d.inner.cell.emit(Lifecycle::undefined);
        Ok(())
    }

    /// One `libxl_list_domain` for every domain's cpu time and memory, then per active
    /// domain `libxl_list_vcpu`, its memory target and dom0's sysfs counters, all on one
    /// blocking thread (§12.5). A domain whose Xen domain is not in the list (it is
    /// stopping, or starting) has its state only: one domain does not fail the poll.
    async fn all_stats(&self) -> Result<Vec<domkit_core::DomainStats>> {
        let domains: Vec<LibxlDomain> = self.domains().values().cloned().collect();
        let wanted: Vec<(Uuid, Option<u32>, usize, usize)> = domains
            .iter()
            .map(|d| {
                let c = d.config();
                (d.id().uuid, d.domid(), c.disks.len(), c.nics.len())
            })
            .collect();
        let ctx = self.context().clone();
        let taken_at_us = domkit_core::event::unix_micros(std::time::SystemTime::now());
        let readings = tokio::task::spawn_blocking(move || {
            let listed = match ctx.list_usage() {
                Ok(l) => l,
                Err(e) => {
                    tracing::debug!(error = %e, "no figures for this poll");
                    Vec::new()
                }
            };
            wanted
                .into_iter()
                .map(|(uuid, domid, disks, nics)| {
                    // The domid we watch, and the uuid ours (a domid is reused).
                    let usage = listed
                        .iter()
                        .find(|(u, usage)| *u == uuid && Some(usage.domid) == domid)?
                        .1;
                    Some(crate::observe::read_rest(&ctx, usage, disks, nics))
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Error::Backend {
            backend: BACKEND.into(),
            message: format!("stats: the blocking task failed: {e}"),
        })?;
        Ok(domains
            .iter()
            .zip(readings)
            .map(|(d, r)| d.stats_from(r.as_ref(), taken_at_us))
            .collect())
    }

    async fn list(&self) -> Result<Vec<DomainInfo>> {
        let domains: Vec<LibxlDomain> = self.domains().values().cloned().collect();
        let mut out = Vec::with_capacity(domains.len());
        for d in domains {
            out.push(d.info().await?);
        }
        Ok(out)
    }

    async fn lookup_by_name(&self, name: &str) -> Result<LibxlDomain> {
        self.domains()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::domain_not_found(name))
    }

    async fn lookup_by_uuid(&self, uuid: Uuid) -> Result<LibxlDomain> {
        self.domains()
            .values()
            .find(|d| d.id().uuid == uuid)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                what: format!("domain with uuid {uuid}"),
            })
    }

    fn subscribe(&self) -> EventStream {
        EventStream::new(self.shared.events.subscribe())
    }
}

/// A persistent domain's link to the store: its status record is rewritten with every
/// event (under the cell lock, before publication), with the operation in flight (§11.2).
#[derive(Debug)]
pub(crate) struct PersistedDomain {
    store: DefinitionStore,
    uuid: Uuid,
    in_flight: Mutex<Option<InFlight>>,
    /// The running instance's device set (§14.3), taken into the next status write.
    devices: Mutex<Option<serde_json::Value>>,
    /// The driver detached: the next manager owns the record.
    detached: AtomicBool,
}

impl PersistedDomain {
    fn new(store: DefinitionStore, uuid: Uuid) -> Self {
        PersistedDomain {
            store,
            uuid,
            in_flight: Mutex::new(None),
            devices: Mutex::new(None),
            detached: AtomicBool::new(false),
        }
    }

    /// Record the operation in flight (taken into the next status write).
    pub(crate) fn set_in_flight(&self, in_flight: Option<InFlight>) {
        *self.in_flight.lock().unwrap_or_else(|p| p.into_inner()) = in_flight;
    }

    /// Persist a changed definition (device changes of scope config, §14.2).
    pub(crate) fn save_definition(&self, config: &DomainConfig) -> std::io::Result<()> {
        self.store.save_definition(config)
    }

    /// Record the running instance's device set (taken into the next status write).
    pub(crate) fn set_devices(&self, devices: Option<serde_json::Value>) {
        *self.devices.lock().unwrap_or_else(|p| p.into_inner()) = devices;
    }

    /// Never write again (the driver detached).
    pub(crate) fn detach(&self) {
        self.detached.store(true, Ordering::SeqCst);
    }

    /// Write the status now (called by the cell, under its lock).
    pub(crate) fn write(&self, lc: &Lifecycle) {
        if self.detached.load(Ordering::SeqCst) {
            return;
        }
        let status = StoredStatus {
            seq: lc.last_seq(),
            state: lc.state(),
            in_flight: self
                .in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            pending_end: lc.pending_end(),
            devices: self
                .devices
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        };
        if let Err(e) = self.store.save_status(self.uuid, &status) {
            tracing::warn!(uuid = %self.uuid, error = %e, "cannot persist the domain status");
        }
    }
}

/// Remove the runtime directories under `root` that `keep` does not claim (left by a
/// manager that died; the root is locked by us, so nobody else uses them).
fn sweep_runtime_dirs(root: &Path, keep: impl Fn(&str) -> bool) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_dir || keep(&name) {
            continue;
        }
        remove_stale_dir(&entry.path());
    }
}

fn remove_stale_dir(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => tracing::info!(dir = %dir.display(), "removed a stale runtime directory"),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a stale runtime directory")
        }
    }
}

/// What a dead ephemeral manager on this (now locked) runtime root left (§11.0): the Xen
/// domains its markers name are destroyed, its directories removed.
fn sweep_ephemeral_leftovers(ctx: &Context, runtime_root: &Path) {
    let left = ephemeral::leftovers(runtime_root);
    if left.iter().any(|(_, uuid)| uuid.is_some()) {
        match ctx.list_domains() {
            Ok(host) => {
                for (dir, uuid) in &left {
                    let Some(uuid) = uuid else { continue };
                    for d in host.iter().filter(|d| d.domid != 0 && d.uuid == *uuid) {
                        match ctx.destroy(d.domid) {
                            Ok(()) => {
                                tracing::info!(domid = d.domid, name = ?d.name, %uuid, dir = %dir.display(), "destroyed a Xen domain a dead ephemeral manager left")
                            }
                            Err(e) if e.is_not_found() => {}
                            Err(e) => {
                                tracing::warn!(domid = d.domid, error = %e, "cannot destroy a Xen domain a dead ephemeral manager left")
                            }
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the Xen domains a dead ephemeral manager may have left")
            }
        }
    }
    for (dir, _) in left {
        remove_stale_dir(&dir);
    }
}
