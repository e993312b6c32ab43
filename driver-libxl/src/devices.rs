//! Devices of a libxl domain (pure: no I/O): the disks and vifs a config boots with, each
//! with its domkit device id and its Xen identity (`docs/semantics.md` §14.7).
//!
//! A disk is the PV block device `xvd<x>` of its position in the config (`xvda` first);
//! a NIC is the vif of devid = its position, with its MAC as configured or a stable
//! default ([`default_mac`]). The set is what `devices()` / `defined_devices()` list and
//! what [`crate::config::domain_config_json`] writes for libxl, so the two never disagree.

use crate::config::vdev_name;
use domkit_core::device::{DeviceId, DeviceInfo, DeviceKind};
use domkit_core::{ConfigError, Disk, DomainConfig, Nic};
use uuid::Uuid;

/// A disk of a domain: its config (`id` always set) and its PV name (`xvdb`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XenDisk {
    /// The config, `id` always set.
    pub disk: Disk,
    /// The virtual device name the guest sees (`xvda`, ...).
    pub vdev: String,
}

/// A NIC of a domain: its config (`id` and `mac` always set) and its vif devid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XenNic {
    /// The config, `id` and `mac` (lower case) always set.
    pub nic: Nic,
    /// The vif's devid (dom0 interface `vif<domid>.<devid>`).
    pub devid: u32,
}

/// The devices of a domain, in config order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XenDeviceSet {
    /// Disks.
    pub disks: Vec<XenDisk>,
    /// NICs.
    pub nics: Vec<XenNic>,
}

/// The MAC a NIC without one gets: the Xen OUI `00:16:3e` (the prefix libxl's own random
/// MACs use) and three bytes of an FNV-1a hash of the domain's uuid and the device id, so
/// that it is the same at every start and differs between domains.
pub fn default_mac(uuid: Uuid, id: DeviceId) -> String {
    // FNV-1a: stable across Rust versions (std's hasher is not).
    let mut h: u32 = 0x811c_9dc5;
    for b in uuid.as_bytes().iter().chain(id.as_str().as_bytes()) {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let b = h.to_be_bytes();
    // The top bit of the fourth byte is cleared: libxl's random MACs keep it clear too.
    format!("00:16:3e:{:02x}:{:02x}:{:02x}", b[1] & 0x7f, b[2], b[3])
}

impl XenDeviceSet {
    /// The devices `config` boots with: ids, vdevs, devids and MACs filled in. Ids and MACs
    /// must be unique (`duplicate_device_id`, `duplicate_mac`).
    pub fn from_config(config: &DomainConfig, uuid: Uuid) -> Result<XenDeviceSet, ConfigError> {
        config.check_devices_unique()?;
        let mut set = XenDeviceSet::default();
        for (i, disk) in config.disks.iter().enumerate() {
            let mut disk = disk.clone();
            disk.id = Some(disk.device_id(i));
            if disk.cdrom {
                disk.readonly = true;
            }
            set.disks.push(XenDisk {
                disk,
                vdev: vdev_name(i),
            });
        }
        for (i, nic) in config.nics.iter().enumerate() {
            let mut nic = nic.clone();
            let id = nic.device_id(i);
            nic.id = Some(id);
            let mac = nic.mac.clone().unwrap_or_else(|| default_mac(uuid, id));
            nic.mac = Some(mac.to_ascii_lowercase());
            set.nics.push(XenNic {
                nic,
                devid: u32::try_from(i).unwrap_or(u32::MAX),
            });
        }
        Ok(set)
    }

    /// What `info()` lists.
    pub fn infos(&self) -> Vec<DeviceInfo> {
        let disks = self.disks.iter().filter_map(|d| {
            Some(DeviceInfo {
                id: d.disk.id?,
                kind: if d.disk.cdrom {
                    DeviceKind::Cdrom
                } else {
                    DeviceKind::Disk
                },
                path: Some(d.disk.path.clone()),
                readonly: d.disk.readonly || d.disk.cdrom,
                mac: None,
                address: Some(d.vdev.clone()),
            })
        });
        let nics = self.nics.iter().filter_map(|n| {
            Some(DeviceInfo {
                id: n.nic.id?,
                kind: DeviceKind::Nic,
                path: None,
                readonly: false,
                mac: n.nic.mac.clone(),
                address: Some(format!("vif {}", n.devid)),
            })
        });
        disks.chain(nics).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use domkit_core::NicBackend;
    use std::path::PathBuf;

    fn uuid() -> Uuid {
        Uuid::parse_str("6f1f3e9a-2c1e-4f5b-9a55-0a8c2d3e4f51").unwrap()
    }

    fn id(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap()
    }

    fn config() -> DomainConfig {
        let mut c = DomainConfig::with_kernel("a", 128, PathBuf::from("/k"));
        let mut d = Disk::new("/img/sys.raw");
        d.id = Some(id("sys"));
        c.disks.push(d);
        let mut r = Disk::new("/img/ro.raw");
        r.readonly = true;
        c.disks.push(r);
        c.nics.push(Nic {
            id: Some(id("n0")),
            mac: Some("00:16:3E:AA:00:01".into()),
            backend: NicBackend::Bridge("xenbr0".into()),
        });
        c.nics.push(Nic {
            id: None,
            mac: None,
            backend: NicBackend::Bridge("xenbr0".into()),
        });
        c
    }

    #[test]
    fn s14_7_boot_devices_get_ids_vdevs_devids_and_stable_macs() {
        let set = XenDeviceSet::from_config(&config(), uuid()).unwrap();
        let infos = set.infos();
        let by = |s: &str| infos.iter().find(|i| i.id == id(s)).cloned().unwrap();
        assert_eq!(by("sys").address.as_deref(), Some("xvda"));
        assert!(!by("sys").readonly);
        assert_eq!(by("disk1").address.as_deref(), Some("xvdb"));
        assert!(by("disk1").readonly);
        assert_eq!(by("n0").mac.as_deref(), Some("00:16:3e:aa:00:01"));
        assert_eq!(by("n0").address.as_deref(), Some("vif 0"));
        let generated = by("nic1").mac.unwrap();
        assert!(generated.starts_with("00:16:3e:"), "{generated}");
        assert!(domkit_core::config::is_valid_mac(&generated));
        // Stable across calls, different for another domain.
        assert_eq!(
            XenDeviceSet::from_config(&config(), uuid())
                .unwrap()
                .infos(),
            infos
        );
        let other = XenDeviceSet::from_config(&config(), Uuid::new_v4()).unwrap();
        assert_ne!(other.nics[1].nic.mac.as_deref(), Some(generated.as_str()));
    }

    #[test]
    fn s14_7_duplicate_ids_and_macs_are_refused() {
        let mut c = config();
        c.nics[1].id = Some(id("sys"));
        assert!(matches!(
            XenDeviceSet::from_config(&c, uuid()),
            Err(ConfigError::DuplicateDeviceId { .. })
        ));
        let mut c = config();
        c.nics[1].mac = Some("00:16:3e:aa:00:01".into());
        assert!(matches!(
            XenDeviceSet::from_config(&c, uuid()),
            Err(ConfigError::DuplicateMac { .. })
        ));
    }
}
