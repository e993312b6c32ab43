//! [`LibxlDriver`]: the [`Driver`] implementation (domain registry, event dispatcher).

use crate::config;
use crate::context::{Context, ContextEvent, DomInfo, LibxlError};
use crate::domain::{DomainInner, LibxlDomain, Registry, BACKEND};
use async_trait::async_trait;
use domkit_core::cell::DRIVER_EVENT_BUFFER;
use domkit_core::{
    Capabilities, ControlState, Domain, DomainConfig, DomainEvent, DomainId, DomainInfo, Driver,
    Error, EventStream, Lifecycle, LifecycleCell, Operation, Result, ShutdownMode,
};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use tokio::sync::broadcast;
use uuid::Uuid;

/// Options of a [`LibxlDriver`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibxlOptions {
    /// Where per-domain runtime files go (channel sockets): `<runtime_dir>/<name>/`.
    /// Default `/run/domkit/libxl`.
    pub runtime_dir: PathBuf,
}

impl Default for LibxlOptions {
    fn default() -> Self {
        LibxlOptions {
            runtime_dir: PathBuf::from("/run/domkit/libxl"),
        }
    }
}

struct DriverShared {
    ctx: Context,
    registry: Arc<Registry>,
    domains: Mutex<BTreeMap<String, LibxlDomain>>,
    events: broadcast::Sender<DomainEvent>,
    options: LibxlOptions,
    host_has_hvm: bool,
}

/// The Xen driver: one libxl context, the domains defined through it, and their events.
///
/// Needs a Xen dom0 (privcmd, xenstored); [`LibxlDriver::new`] fails with
/// [`Error::Backend`] elsewhere. Domains keep running in Xen when the driver is dropped.
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
    /// Open libxl with default options.
    pub fn new() -> Result<Self> {
        Self::with_options(LibxlOptions::default())
    }

    /// Open libxl.
    pub fn with_options(options: LibxlOptions) -> Result<Self> {
        let (ctx, rx) = Context::new().map_err(ctx_err)?;
        let host_has_hvm = ctx.host_can_run_pvh().map_err(ctx_err)?;
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
            }),
        })
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
    /// [`Capabilities`] can only list the supported ones).
    pub fn unsupported_modes(&self) -> Vec<(ShutdownMode, &'static str)> {
        vec![
            (ShutdownMode::Acpi, crate::domain::UNSUPPORTED_ACPI),
            (ShutdownMode::Agent, crate::domain::UNSUPPORTED_AGENT),
        ]
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
        self.shared
            .domains
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Driver for LibxlDriver {
    type Domain = LibxlDomain;

    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        use crate::domain::{UNSUPPORTED_ACPI, UNSUPPORTED_AGENT, UNSUPPORTED_S4};
        Capabilities {
            backend: BACKEND.into(),
            // Every operation exists; what does not is a mode or target of one, refused with
            // Error::Unsupported and the same reason.
            unsupported: BTreeMap::new(),
            shutdown_modes: vec![ShutdownMode::Default, ShutdownMode::Paravirt],
            unsupported_variants: [
                ("shutdown:acpi", UNSUPPORTED_ACPI),
                ("reboot:acpi", UNSUPPORTED_ACPI),
                ("shutdown:agent", UNSUPPORTED_AGENT),
                ("reboot:agent", UNSUPPORTED_AGENT),
                ("pm_suspend:disk", UNSUPPORTED_S4),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        }
    }

    async fn define(&self, mut config: DomainConfig) -> Result<LibxlDomain> {
        config.validate()?;
        let uuid = config.uuid.unwrap_or_else(Uuid::new_v4);
        config.uuid = Some(uuid);
        let json = config::domain_config_json(
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
        {
            let domains = self.domains();
            DomainId::check_unique(&config.name, uuid, domains.values().map(|d| d.id()))?;
        }
        self.check_host_unique(&config.name, uuid).await?;
        let mut domains = self.domains();
        DomainId::check_unique(&config.name, uuid, domains.values().map(|d| d.id()))?;
        let id = DomainId {
            name: config.name.clone(),
            uuid,
        };
        let cell = LifecycleCell::new(
            Lifecycle::new(id.clone(), config.policies()),
            Some(self.shared.events.clone()),
        );
        let runtime_dir = self.shared.options.runtime_dir.join(&config.name);
        let inner = DomainInner::new(
            id,
            config,
            json.to_string(),
            runtime_dir,
            cell,
            self.shared.ctx.clone(),
            self.shared.registry.clone(),
        );
        inner.cell.emit(Lifecycle::defined);
        let domain = LibxlDomain { inner };
        domains.insert(domain.id().name.clone(), domain.clone());
        Ok(domain)
    }

    async fn undefine(&self, name: &str) -> Result<()> {
        let mut domains = self.domains();
        let d = domains
            .get(name)
            .ok_or_else(|| Error::domain_not_found(name))?;
        let state = d.state();
        if state.is_active() {
            return Err(Error::InvalidState {
                current: state,
                operation: Operation::Undefine,
            });
        }
        let d = domains.remove(name).expect("present");
        d.inner.remove_runtime_dir();
        d.inner.cell.emit(Lifecycle::undefined);
        Ok(())
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
