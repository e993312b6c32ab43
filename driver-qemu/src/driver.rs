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
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::accel::AutoAccel;
use crate::argv::DomainPaths;
use crate::domain::QemuDomain;
use crate::error::BACKEND;

/// Options of a [`QemuDriver`].
#[derive(Debug, Clone)]
pub struct QemuDriverOptions {
    /// Where the per-domain runtime directories go (created 0700 if missing). Default:
    /// [`default_runtime_root`].
    pub runtime_root: PathBuf,
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
}

/// `/run/domkit/qemu` for root, `$XDG_RUNTIME_DIR/domkit/qemu` otherwise, or
/// `/tmp/domkit-<uid>/qemu` without `XDG_RUNTIME_DIR`.
pub fn default_runtime_root() -> PathBuf {
    let uid = nix::unistd::getuid();
    if uid.is_root() {
        return PathBuf::from("/run/domkit/qemu");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("domkit/qemu"),
        _ => PathBuf::from(format!("/tmp/domkit-{uid}/qemu")),
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
    /// One manager per runtime root, for the driver's life.
    _root_lock: crate::rootlock::RootLock,
    domains: Mutex<BTreeMap<String, QemuDomain>>,
    events: broadcast::Sender<DomainEvent>,
}

impl DriverShared {
    fn domains(&self) -> MutexGuard<'_, BTreeMap<String, QemuDomain>> {
        // The map is only ever inserted into / removed from: a poisoned lock is still whole.
        self.domains.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for DriverShared {
    fn drop(&mut self) {
        // The last driver handle is gone: no QEMU may outlive it, and no runtime directory.
        for domain in self.domains().values() {
            domain.forget();
        }
    }
}

impl QemuDriver {
    /// A driver with `options`. Creates the runtime root (0700) if missing.
    pub fn new(options: QemuDriverOptions) -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&options.runtime_root)
            .map_err(|e| {
                Error::io(
                    format!(
                        "creating the runtime root {} (set QemuDriverOptions::runtime_root to \
                         a writable directory)",
                        options.runtime_root.display()
                    ),
                    e,
                )
            })?;
        // Before anything under the root is touched (a second manager would delete the
        // first one's live sockets).
        let root_lock = crate::rootlock::RootLock::acquire(&options.runtime_root)?;
        let (events, _) = broadcast::channel(DRIVER_EVENT_BUFFER);
        Ok(QemuDriver {
            shared: Arc::new(DriverShared {
                _root_lock: root_lock,
                options: Arc::new(options),
                domains: Mutex::new(BTreeMap::new()),
                events,
            }),
        })
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
        let domain = {
            let mut domains = self.shared.domains();
            DomainId::check_unique(&config.name, uuid, domains.values().map(|d| d.id()))?;
            let id = DomainId {
                name: config.name.clone(),
                uuid,
            };
            let cell = LifecycleCell::new(
                Lifecycle::new(id.clone(), config.policies()),
                Some(self.shared.events.clone()),
            );
            let dir = self.shared.options.runtime_root.join(&config.name);
            let domain = QemuDomain::new(id, config, cell, dir, self.shared.options.clone());
            domains.insert(domain.id().name.clone(), domain.clone());
            domain
        };
        domain.cell().emit(Lifecycle::defined);
        Ok(domain)
    }

    async fn undefine(&self, name: &str) -> Result<()> {
        let domain = self.lookup_by_name(name).await?;
        domain.ensure_inactive(domkit_core::Operation::Undefine)?;
        self.shared.domains().remove(name);
        domain.forget();
        domain.cell().emit(Lifecycle::undefined);
        Ok(())
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
