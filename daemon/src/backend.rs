//! The backends one daemon drives, behind one enum each for drivers and domains: QEMU
//! always, libxl with the `libxl` feature (built with libxen-dev, opened in a Xen dom0).
//! A backend is one variant in [`BackendDriver`] and [`BackendDomain`] and one arm in the
//! `with_domain!` macro and [`BackendDriver`]'s methods; everything above (server,
//! journal) stays backend-free.

use domkit_core::{Domain, DomainConfig, DomainId, DomainInfo, Driver, Error, EventStream, Result};
use domkit_qemu::{QemuDomain, QemuDriver};
use uuid::Uuid;

/// A persistent driver the daemon opened.
pub enum BackendDriver {
    /// QEMU/KVM.
    Qemu(QemuDriver),
    /// Xen, through libxl.
    #[cfg(feature = "libxl")]
    Libxl(domkit_libxl::LibxlDriver),
}

/// A domain of one of the daemon's drivers.
#[derive(Clone)]
pub enum BackendDomain {
    /// A QEMU domain.
    Qemu(QemuDomain),
    /// A Xen domain.
    #[cfg(feature = "libxl")]
    Libxl(domkit_libxl::LibxlDomain),
}

/// Run `$body` with `$d` bound to the backend's domain handle (it implements
/// [`domkit_core::Domain`] whatever the backend).
macro_rules! with_domain {
    ($domain:expr, $d:ident => $body:expr) => {
        match $domain {
            $crate::backend::BackendDomain::Qemu($d) => $body,
            #[cfg(feature = "libxl")]
            $crate::backend::BackendDomain::Libxl($d) => $body,
        }
    };
}
pub(crate) use with_domain;

/// Run `$body` with `$d` bound to the backend's driver.
macro_rules! with_driver {
    ($driver:expr, $d:ident => $body:expr) => {
        match $driver {
            BackendDriver::Qemu($d) => $body,
            #[cfg(feature = "libxl")]
            BackendDriver::Libxl($d) => $body,
        }
    };
}

impl BackendDomain {
    /// The backend's name.
    pub fn backend(&self) -> &'static str {
        match self {
            BackendDomain::Qemu(_) => "qemu",
            #[cfg(feature = "libxl")]
            BackendDomain::Libxl(_) => domkit_libxl::BACKEND,
        }
    }

    /// Identity.
    pub fn id(&self) -> DomainId {
        with_domain!(self, d => d.id().clone())
    }
}

impl BackendDriver {
    /// The backend's name.
    pub fn name(&self) -> &'static str {
        with_driver!(self, d => d.backend())
    }

    /// Define a domain.
    pub async fn define(&self, config: DomainConfig) -> Result<BackendDomain> {
        match self {
            BackendDriver::Qemu(d) => d.define(config).await.map(BackendDomain::Qemu),
            #[cfg(feature = "libxl")]
            BackendDriver::Libxl(d) => d.define(config).await.map(BackendDomain::Libxl),
        }
    }

    /// Undefine a domain.
    pub async fn undefine(&self, name: &str) -> Result<()> {
        with_driver!(self, d => d.undefine(name).await)
    }

    /// Every defined domain.
    pub async fn list(&self) -> Result<Vec<DomainInfo>> {
        with_driver!(self, d => d.list().await)
    }

    /// A domain by name.
    pub async fn lookup_by_name(&self, name: &str) -> Result<BackendDomain> {
        match self {
            BackendDriver::Qemu(d) => d.lookup_by_name(name).await.map(BackendDomain::Qemu),
            #[cfg(feature = "libxl")]
            BackendDriver::Libxl(d) => d.lookup_by_name(name).await.map(BackendDomain::Libxl),
        }
    }

    /// A domain by uuid.
    pub async fn lookup_by_uuid(&self, uuid: Uuid) -> Result<BackendDomain> {
        match self {
            BackendDriver::Qemu(d) => d.lookup_by_uuid(uuid).await.map(BackendDomain::Qemu),
            #[cfg(feature = "libxl")]
            BackendDriver::Libxl(d) => d.lookup_by_uuid(uuid).await.map(BackendDomain::Libxl),
        }
    }

    /// Every event of the driver's domains.
    pub fn subscribe(&self) -> EventStream {
        with_driver!(self, d => d.subscribe())
    }

    /// Stop supervising and leave every domain as it is (the daemon's orderly exit).
    pub fn detach(&self) {
        with_driver!(self, d => d.detach())
    }
}

/// The daemon's drivers, in lookup order.
pub struct Backends {
    drivers: Vec<BackendDriver>,
}

impl Backends {
    /// The drivers given.
    pub fn new(drivers: Vec<BackendDriver>) -> Self {
        Backends { drivers }
    }

    /// The drivers.
    pub fn drivers(&self) -> &[BackendDriver] {
        &self.drivers
    }

    /// The driver of backend `name`.
    pub fn driver(&self, name: &str) -> Option<&BackendDriver> {
        self.drivers.iter().find(|d| d.name() == name)
    }

    /// A domain by name, on whichever backend defines it; `NotFound` (the library's
    /// error) if none does.
    pub async fn lookup_by_name(&self, name: &str) -> Result<BackendDomain> {
        for driver in &self.drivers {
            match driver.lookup_by_name(name).await {
                Err(Error::NotFound { .. }) => continue,
                other => return other,
            }
        }
        Err(Error::domain_not_found(name))
    }

    /// A domain by uuid, on whichever backend defines it.
    pub async fn lookup_by_uuid(&self, uuid: Uuid) -> Result<BackendDomain> {
        for driver in &self.drivers {
            match driver.lookup_by_uuid(uuid).await {
                Err(Error::NotFound { .. }) => continue,
                other => return other,
            }
        }
        Err(Error::NotFound {
            what: format!("domain with uuid {uuid}"),
        })
    }
}
