//! [`QemuDriver`]: the QEMU implementation of domkit's [`Driver`] trait.
//!
//! It remembers domain configs (in memory), hands out [`QemuDomain`] handles, and owns the
//! runtime root under which every domain gets its private directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use domkit_core::cell::DRIVER_EVENT_BUFFER;
use domkit_core::{
    Capabilities, Domain, DomainConfig, DomainEvent, DomainId, DomainInfo, Driver, Error,
    EventStream, Lifecycle, LifecycleCell, Result, ShutdownMode,
};
use futures::StreamExt;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::accel::AutoAccel;
use crate::argv::DomainPaths;
use crate::domain::QemuDomain;
use crate::error::BACKEND;
pub use crate::process::Ownership;
use domkit_core::store::{ensure_private_dir, DefinitionStore, InFlight, StoredStatus};

/// Options of a [`QemuDriver`].
#[derive(Debug, Clone)]
pub struct QemuDriverOptions {
    /// Where the per-domain runtime directories go (created 0700 if missing, else verified:
    /// §11.1). Default: [`default_runtime_root`].
    pub runtime_root: PathBuf,
    /// Whether domains outlive this driver's process (§11). Default: ephemeral.
    pub ownership: Ownership,
    /// Where a persistent driver keeps definitions and statuses (created 0700 or verified).
    /// Default: [`default_state_root`]. Unused when ephemeral.
    pub state_root: PathBuf,
    /// What `accel = "auto"` means. Default: TCG.
    pub auto_accel: AutoAccel,
    /// How long QEMU may take from spawn to a negotiated monitor.
    pub connect_timeout: Duration,
    /// Timeout of one QMP command.
    pub command_timeout: Duration,
    /// How long a `quit` may take before the process is SIGKILLed.
    pub destroy_timeout: Duration,
    /// How long a save or restore migration may take.
    pub migration_timeout: Duration,
    /// How long the monitor may be closed while the process lives before the control
    /// channel is declared broken (QEMU closes it just before exiting).
    pub monitor_grace: Duration,
}

impl Default for QemuDriverOptions {
    fn default() -> Self {
        QemuDriverOptions {
            runtime_root: default_runtime_root(),
            ownership: Ownership::Ephemeral,
            state_root: default_state_root(),
            auto_accel: AutoAccel::Tcg,
            // Generous: TCG guests on a loaded, shared host are slow to do anything.
            connect_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(30),
            destroy_timeout: Duration::from_secs(10),
            migration_timeout: Duration::from_secs(300),
            monitor_grace: Duration::from_secs(3),
        }
    }
}

impl QemuDriverOptions {
    /// Default options with another runtime root (tests use a temporary directory).
    pub fn with_runtime_root(root: impl Into<PathBuf>) -> Self {
        QemuDriverOptions {
            runtime_root: root.into(),
            ..Default::default()
        }
    }

    /// Persistent options (a host tool): definitions under `state_root`, runtime files
    /// under `runtime_root`; domains outlive the process and the next driver reattaches.
    pub fn persistent(state_root: impl Into<PathBuf>, runtime_root: impl Into<PathBuf>) -> Self {
        QemuDriverOptions {
            runtime_root: runtime_root.into(),
            state_root: state_root.into(),
            ownership: Ownership::Persistent,
            ..Default::default()
        }
    }
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/nonexistent-home"))
}

/// `/run/domkit/qemu` for root, `$XDG_RUNTIME_DIR/domkit/qemu` otherwise, or, without
/// `XDG_RUNTIME_DIR`, `~/.local/state/domkit/run/qemu` (never a predictable directory in
/// a shared `/tmp`, §11.1).
pub fn default_runtime_root() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/run/domkit/qemu");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("domkit/qemu"),
        _ => home_dir().join(".local/state/domkit/run/qemu"),
    }
}

/// `/var/lib/domkit/qemu` for root, `$XDG_STATE_HOME/domkit/qemu` otherwise (default
/// `~/.local/state/domkit/qemu`).
pub fn default_state_root() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/domkit/qemu");
    }
    match std::env::var_os("XDG_STATE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("domkit/qemu"),
        _ => home_dir().join(".local/state/domkit/qemu"),
    }
}

/// The QEMU driver. Cheap to clone; all clones share the same domains.
#[derive(Debug, Clone)]
pub struct QemuDriver {
    shared: Arc<DriverShared>,
}

#[derive(Debug)]
struct DriverShared {
    options: Arc<QemuDriverOptions>,
    /// One manager per root, for the driver's life.
    _root_lock: domkit_core::RootLock,
    /// The durable store (persistent drivers).
    store: Option<DefinitionStore>,
    domains: Mutex<BTreeMap<String, QemuDomain>>,
    events: broadcast::Sender<DomainEvent>,
    /// Serialises `define` (check, persist, insert).
    defining: tokio::sync::Mutex<()>,
}

impl DriverShared {
    fn domains(&self) -> MutexGuard<'_, BTreeMap<String, QemuDomain>> {
        // The map is only ever inserted into / removed from: a poisoned lock is still whole.
        self.domains.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for DriverShared {
    fn drop(&mut self) {
        // The last driver handle is gone. Ephemeral: no QEMU may outlive it, and no runtime
        // directory. Persistent: every domain stays as it is for the next manager (§11).
        let persistent = self.options.ownership == Ownership::Persistent;
        for domain in self.domains().values() {
            if persistent {
                domain.detach();
            } else {
                domain.forget();
            }
        }
    }
}

impl QemuDriver {
    /// A driver with `options`. Creates the runtime root (0700) if missing.
    pub fn new(options: QemuDriverOptions) -> Result<Self> {
        if options.ownership == Ownership::Persistent {
            return Err(Error::InvalidConfig(domkit_core::ConfigError::Parse {
                format: "options",
                message: "a persistent QEMU driver reattaches its domains: open it with \
                          QemuDriver::open"
                    .into(),
            }));
        }
        Self::open_roots(options)
    }

    /// Open a driver of either ownership: roots created or verified (§11.1), the root
    /// locked (one manager per root), stale runtime directories of dead managers removed,
    /// and, when persistent, every stored domain loaded and reattached (§11.3).
    pub async fn open(options: QemuDriverOptions) -> Result<Self> {
        let driver = Self::open_roots(options)?;
        if let Some(store) = &driver.shared.store {
            let stored = store.load_all().map_err(|e| {
                Error::io(
                    format!(
                        "reading the definitions under {}",
                        driver.shared.options.state_root.display()
                    ),
                    e,
                )
            })?;
            let keep: std::collections::BTreeSet<String> = stored
                .iter()
                .map(|r| r.definition.config.name.clone())
                .collect();
            sweep_runtime_dirs(&driver.shared.options.runtime_root, |name| {
                keep.contains(name)
            });
            // A few at a time: each is a connection, a handshake and a status query.
            let reattaching = stored.into_iter().map(|record| {
                let name = record.definition.config.name.clone();
                let status = record.status.clone();
                let domain = driver.insert(record.definition.config, status.as_ref());
                async move {
                    if let Err(e) = domain.reattach(status).await {
                        tracing::warn!(domain = %name, error = %e, "reattach failed");
                    }
                }
            });
            futures::stream::iter(reattaching)
                .buffer_unordered(8)
                .collect::<Vec<()>>()
                .await;
        }
        Ok(driver)
    }

    fn open_roots(options: QemuDriverOptions) -> Result<Self> {
        let root_error = |what: &str, path: &Path, e: std::io::Error| {
            Error::io(
                format!(
                    "{what} {} (give the driver a directory of its own)",
                    path.display()
                ),
                e,
            )
        };
        ensure_private_dir(&options.runtime_root)
            .map_err(|e| root_error("using the runtime root", &options.runtime_root, e))?;
        let persistent = options.ownership == Ownership::Persistent;
        let store = if persistent {
            Some(
                DefinitionStore::open(&options.state_root)
                    .map_err(|e| root_error("using the state root", &options.state_root, e))?,
            )
        } else {
            None
        };
        // Before anything under the roots is touched (a second manager would delete the
        // first one's live sockets).
        let lock_root = if persistent {
            &options.state_root
        } else {
            &options.runtime_root
        };
        let root_lock = domkit_core::RootLock::acquire(lock_root)?;
        if !persistent {
            // Domains of an ephemeral driver die with it: what a dead one left is stale.
            sweep_runtime_dirs(&options.runtime_root, |_| false);
        }
        let (events, _) = broadcast::channel(DRIVER_EVENT_BUFFER);
        Ok(QemuDriver {
            shared: Arc::new(DriverShared {
                _root_lock: root_lock,
                store,
                options: Arc::new(options),
                domains: Mutex::new(BTreeMap::new()),
                events,
                defining: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Build and register a domain (defined now, or loaded from the store).
    fn insert(&self, config: DomainConfig, status: Option<&StoredStatus>) -> QemuDomain {
        let uuid = config.uuid.expect("uuid filled in");
        let id = DomainId {
            name: config.name.clone(),
            uuid,
        };
        let lifecycle = match status {
            Some(st) => Lifecycle::resume_from(id.clone(), config.policies(), st.seq, st.state)
                .with_pending_end(st.pending_end),
            None => Lifecycle::new(id.clone(), config.policies()),
        };
        let events = Some(self.shared.events.clone());
        let persisted = self
            .shared
            .store
            .clone()
            .map(|store| Arc::new(PersistedDomain::new(store, uuid)));
        let cell = match &persisted {
            Some(p) => {
                let p = p.clone();
                LifecycleCell::with_persist(lifecycle, events, Box::new(move |lc| p.write(lc)))
            }
            None => LifecycleCell::new(lifecycle, events),
        };
        let dir = self.shared.options.runtime_root.join(&config.name);
        let domain = QemuDomain::new(
            id,
            config,
            cell,
            dir,
            self.shared.options.clone(),
            persisted,
        );
        self.shared
            .domains()
            .insert(domain.id().name.clone(), domain.clone());
        domain
    }

    /// Stop supervising and leave every domain as it is (a persistent driver's orderly
    /// exit: the next driver on the same roots reattaches). The root stays locked until
    /// the driver is dropped.
    pub fn detach(&self) {
        for domain in self.shared.domains().values() {
            domain.detach();
        }
    }

    /// The runtime root.
    pub fn runtime_root(&self) -> &Path {
        &self.shared.options.runtime_root
    }

    /// The options in force.
    pub fn options(&self) -> &QemuDriverOptions {
        &self.shared.options
    }

    /// Destroy every active domain and forget every domain (removing their runtime
    /// directories). Use before dropping the driver to end everything cleanly and wait for it.
    pub async fn close(&self) -> Result<()> {
        let domains: Vec<QemuDomain> = self.shared.domains().values().cloned().collect();
        let mut first_error = None;
        for domain in domains {
            if let Err(e) = domain.destroy().await {
                first_error.get_or_insert(e);
            }
            if let Err(e) = self.undefine(&domain.id().name).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[async_trait]
impl Driver for QemuDriver {
    type Domain = QemuDomain;

    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            backend: BACKEND.into(),
            // Every operation exists; what does not is a target or mode of one, refused
            // with Error::Unsupported and the same reason.
            unsupported: BTreeMap::new(),
            shutdown_modes: vec![
                ShutdownMode::Default,
                ShutdownMode::Acpi,
                ShutdownMode::Agent,
            ],
            unsupported_variants: [
                ("pm_suspend:disk", crate::domain::UNSUPPORTED_S4),
                ("shutdown:paravirt", crate::domain::UNSUPPORTED_PARAVIRT),
                ("reboot:paravirt", crate::domain::UNSUPPORTED_PARAVIRT),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        }
    }

    async fn define(&self, mut config: DomainConfig) -> Result<QemuDomain> {
        config.validate()?;
        check_socket_paths(&self.shared.options.runtime_root, &config)?;
        let uuid = *config.uuid.get_or_insert_with(Uuid::new_v4);
        // The devices fit the machine's buses (§14).
        crate::devices::DeviceSet::from_config(&config, uuid)?;
        // One define at a time: the uniqueness check and the insert must not interleave
        // with another define of the same name (the store write is in between).
        let _defining = self.shared.defining.lock().await;
        {
            let domains = self.shared.domains();
            DomainId::check_unique(&config.name, uuid, domains.values().map(|d| d.id()))?;
        }
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
        domain.cell().emit(Lifecycle::defined);
        Ok(domain)
    }

    async fn undefine(&self, name: &str) -> Result<()> {
        let domain = self.lookup_by_name(name).await?;
        domain.ensure_inactive(domkit_core::Operation::Undefine)?;
        if let Some(store) = &self.shared.store {
            let (store, uuid) = (store.clone(), domain.id().uuid);
            tokio::task::spawn_blocking(move || store.remove(uuid))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                .map_err(|e| Error::io(format!("removing the definition of {name}"), e))?;
        }
        self.shared.domains().remove(name);
        domain.forget();
        domain.cell().emit(Lifecycle::undefined);
        Ok(())
    }

    async fn all_stats(&self) -> Result<Vec<domkit_core::DomainStats>> {
        // Concurrently: each domain's figures cost at most one QMP round trip (disks), the
        // rest is /proc. A domain whose figures cannot be read now (it is stopping, its
        // monitor broke) has its state only (§12.5): one domain does not fail the poll.
        let domains: Vec<QemuDomain> = self.shared.domains().values().cloned().collect();
        let all = futures::future::join_all(domains.iter().map(|d| async move {
            match d.stats_now().await {
                Ok(stats) => stats,
                Err(e) => {
                    tracing::debug!(domain = %d.id().name, error = %e, "no figures for this poll");
                    domkit_core::DomainStats::inactive(
                        d.id().clone(),
                        d.state(),
                        domkit_core::event::unix_micros(std::time::SystemTime::now()),
                    )
                }
            }
        }))
        .await;
        Ok(all)
    }

    async fn list(&self) -> Result<Vec<DomainInfo>> {
        let domains: Vec<QemuDomain> = self.shared.domains().values().cloned().collect();
        Ok(domains.iter().map(QemuDomain::info_now).collect())
    }

    async fn lookup_by_name(&self, name: &str) -> Result<QemuDomain> {
        self.shared
            .domains()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::domain_not_found(name))
    }

    async fn lookup_by_uuid(&self, uuid: Uuid) -> Result<QemuDomain> {
        self.shared
            .domains()
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

/// Every socket of `config` under `root` must fit a Unix socket path: found at define time,
/// not as an `io` error at every start.
fn check_socket_paths(root: &Path, config: &DomainConfig) -> Result<()> {
    let paths = DomainPaths::new(root.join(&config.name));
    let sockets = std::iter::once(("the QMP socket".to_owned(), paths.qmp_socket.clone())).chain(
        config.channels.iter().map(|c| {
            (
                format!("the socket of channel {:?}", c.port_name()),
                paths.channel_socket(c.kind, c.port_name()),
            )
        }),
    );
    for (what, path) in sockets {
        let len = path.as_os_str().len();
        if len > crate::process::MAX_SOCKET_PATH {
            return Err(domkit_core::ConfigError::SocketPathTooLong {
                what,
                path,
                len,
                max: crate::process::MAX_SOCKET_PATH,
            }
            .into());
        }
    }
    Ok(())
}

/// A persistent domain's link to the store: its status record is rewritten with every
/// event (under the cell lock, before publication), with the operation in flight.
#[derive(Debug)]
pub(crate) struct PersistedDomain {
    store: DefinitionStore,
    uuid: Uuid,
    in_flight: Mutex<Option<InFlight>>,
    /// The running instance's device set (§14.3), taken into every status write.
    devices: Mutex<Option<serde_json::Value>>,
}

impl PersistedDomain {
    fn new(store: DefinitionStore, uuid: Uuid) -> Self {
        PersistedDomain {
            store,
            uuid,
            in_flight: Mutex::new(None),
            devices: Mutex::new(None),
        }
    }

    /// Rewrite the stored definition (a device change of scope `config`, §14).
    pub(crate) fn save_definition(&self, config: &DomainConfig) -> std::io::Result<()> {
        self.store.save_definition(config)
    }

    /// Record the running instance's devices (taken into the next status write).
    pub(crate) fn set_devices(&self, devices: Option<serde_json::Value>) {
        *self.devices.lock().unwrap_or_else(|p| p.into_inner()) = devices;
    }

    /// Record the operation in flight (taken into the next status write).
    pub(crate) fn set_in_flight(&self, in_flight: Option<InFlight>) {
        *self.in_flight.lock().unwrap_or_else(|p| p.into_inner()) = in_flight;
    }

    /// Write the status now (called by the cell, under its lock).
    pub(crate) fn write(&self, lc: &Lifecycle) {
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
pub(crate) fn sweep_runtime_dirs(root: &Path, keep: impl Fn(&str) -> bool) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_dir || keep(&name) {
            continue;
        }
        if let Err(e) = std::fs::remove_dir_all(entry.path()) {
            tracing::warn!(dir = %entry.path().display(), error = %e, "cannot remove a stale runtime directory");
        } else {
            tracing::info!(dir = %entry.path().display(), "removed a stale runtime directory");
        }
    }
}
