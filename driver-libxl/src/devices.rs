//! Devices of a libxl domain (pure: no I/O): the disks and vifs a config boots with, each
//! with its domkit device id and its Xen identity (`docs/semantics.md` §14.7).
//!
//! A disk is the PV block device `xvd<x>` of its position in the config (`xvda` first);
//! a NIC is the vif of devid = its position, with its MAC as configured or a stable
//! default ([`default_mac`]). The set is what `devices()` / `defined_devices()` list and
//! what [`crate::config::domain_config_json`] writes for libxl, so the two never disagree.

use crate::config::{vdev_name, MappingError};
use domkit_core::device::{DeviceId, DeviceInfo, DeviceKind};
use domkit_core::{ConfigError, Disk, DiskFormat, DomainConfig, Nic, NicBackend};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use uuid::Uuid;

/// How many disks a domain may have: `xvda` to `xvdz` (domkit's limit; `no_free_slot` past
/// it).
pub const MAX_DISKS: usize = 26;
/// How many vifs a domain may have (domkit's limit).
pub const MAX_NICS: usize = 16;

/// A disk of a domain: its config (`id` always set) and its PV name (`xvdb`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct XenDisk {
    /// The config, `id` always set.
    pub disk: Disk,
    /// The virtual device name the guest sees (`xvda`, ...).
    pub vdev: String,
}

/// A NIC of a domain: its config (`id` and `mac` always set) and its vif devid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct XenNic {
    /// The config, `id` and `mac` (lower case) always set.
    pub nic: Nic,
    /// The vif's devid (dom0 interface `vif<domid>.<devid>`).
    pub devid: u32,
}

/// The devices of a domain, in config order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    let b = domkit_core::device::stable_mac_suffix(uuid, &id);
    // The top bit of the fourth byte is cleared: libxl's random MACs keep it clear too.
    format!("00:16:3e:{:02x}:{:02x}:{:02x}", b[0] & 0x7f, b[1], b[2])
}

impl XenDeviceSet {
    /// The devices `config` boots with: ids, vdevs, devids and MACs filled in. Ids and MACs
    /// must be unique (`duplicate_device_id`, `duplicate_mac`).
    pub fn from_config(config: &DomainConfig, uuid: Uuid) -> Result<XenDeviceSet, ConfigError> {
        config.check_devices_unique()?;
        let mut set = XenDeviceSet::default();
        if config.disks.len() > MAX_DISKS {
            return Err(no_free_slot(
                "xvd",
                MAX_DISKS,
                config.disks[MAX_DISKS].device_id(MAX_DISKS),
            ));
        }
        if config.nics.len() > MAX_NICS {
            return Err(no_free_slot(
                "vif",
                MAX_NICS,
                config.nics[MAX_NICS].device_id(MAX_NICS),
            ));
        }
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

    /// Whether a device has this id.
    pub fn has(&self, id: DeviceId) -> bool {
        self.disk(id).is_some() || self.nic(id).is_some()
    }

    /// The disk with this id.
    pub fn disk(&self, id: DeviceId) -> Option<&XenDisk> {
        self.disks.iter().find(|d| d.disk.id == Some(id))
    }

    /// The NIC with this id.
    pub fn nic(&self, id: DeviceId) -> Option<&XenNic> {
        self.nics.iter().find(|n| n.nic.id == Some(id))
    }

    fn first_free_id(&self, prefix: &str) -> DeviceId {
        (0..)
            .filter_map(|i| DeviceId::new(&format!("{prefix}{i}")).ok())
            .find(|id| !self.has(*id))
            .unwrap_or_else(|| DeviceId::default_disk(0))
    }

    /// Check a disk to hot-add (pure part: id, CD-ROM, a free `xvd` name) and give it its
    /// id and the lowest free name.
    pub fn plan_disk(&self, disk: &Disk) -> Result<XenDisk, ConfigError> {
        let id = disk.id.unwrap_or_else(|| self.first_free_id("disk"));
        if self.has(id) {
            return Err(ConfigError::DuplicateDeviceId { id: id.to_string() });
        }
        if disk.cdrom {
            return Err(ConfigError::BadDeviceChange {
                id: id.to_string(),
                problem: "a CD-ROM drive cannot be hot-added (and the libxl backend has no \
                          CD-ROMs: they need the qdisk backend)"
                    .into(),
            });
        }
        let vdev = (0..MAX_DISKS)
            .map(vdev_name)
            .find(|v| !self.disks.iter().any(|d| &d.vdev == v))
            .ok_or_else(|| no_free_slot("xvd", MAX_DISKS, id))?;
        let mut disk = disk.clone();
        disk.id = Some(id);
        Ok(XenDisk { disk, vdev })
    }

    /// Check a NIC to hot-add (pure part: id, MAC syntax and uniqueness, a bridge backend,
    /// a free devid) and give it its id, MAC and the lowest free devid.
    pub fn plan_nic(&self, nic: &Nic, uuid: Uuid) -> Result<XenNic, ConfigError> {
        let id = nic.id.unwrap_or_else(|| self.first_free_id("nic"));
        if self.has(id) {
            return Err(ConfigError::DuplicateDeviceId { id: id.to_string() });
        }
        let mac = nic
            .mac
            .clone()
            .unwrap_or_else(|| default_mac(uuid, id))
            .to_ascii_lowercase();
        if !domkit_core::config::is_valid_mac(&mac) {
            return Err(ConfigError::BadMac {
                index: self.nics.len(),
                mac,
            });
        }
        if self.nics.iter().any(|n| {
            n.nic
                .mac
                .as_deref()
                .is_some_and(|m| m.eq_ignore_ascii_case(&mac))
        }) {
            return Err(ConfigError::DuplicateMac { mac });
        }
        let devid = (0..MAX_NICS as u32)
            .find(|d| !self.nics.iter().any(|n| n.devid == *d))
            .ok_or_else(|| no_free_slot("vif", MAX_NICS, id))?;
        let mut nic = nic.clone();
        nic.id = Some(id);
        nic.mac = Some(mac);
        Ok(XenNic { nic, devid })
    }

    /// Remove the device with this id; whether it was there.
    pub fn remove(&mut self, id: DeviceId) -> bool {
        let before = self.disks.len() + self.nics.len();
        self.disks.retain(|d| d.disk.id != Some(id));
        self.nics.retain(|n| n.nic.id != Some(id));
        before != self.disks.len() + self.nics.len()
    }

    /// `json` (libxl's JSON domain config of the definition) with its `disks` and `nics`
    /// replaced by this set's: the config a restart or restore of this instance is created
    /// from, hotplugged devices included.
    pub fn apply_to_json(&self, json: &Value) -> Result<Value, MappingError> {
        let mut root = json.clone();
        let Some(obj) = root.as_object_mut() else {
            return Err(MappingError(
                "libxl's domain config is not an object".into(),
            ));
        };
        obj.remove("disks");
        obj.remove("nics");
        if !self.disks.is_empty() {
            obj.insert(
                "disks".into(),
                Value::Array(self.disks.iter().map(disk_json).collect()),
            );
        }
        if !self.nics.is_empty() {
            let nics: Result<Vec<Value>, MappingError> = self.nics.iter().map(nic_json).collect();
            obj.insert("nics".into(), Value::Array(nics?));
        }
        Ok(root)
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

fn no_free_slot(bus: &'static str, slots: usize, id: DeviceId) -> ConfigError {
    ConfigError::NoFreeSlot {
        bus,
        slots,
        id: id.to_string(),
    }
}

/// One `libxl_device_disk` as libxl's JSON (`libxl_device_disk_from_json`, and the
/// `disks` of the domain config): a PV disk (`xvd<x>`) on blkback.
pub fn disk_json(d: &XenDisk) -> Value {
    json!({
        "pdev_path": d.disk.path.to_string_lossy(),
        "vdev": d.vdev,
        "format": match d.disk.format { DiskFormat::Raw => "raw", DiskFormat::Qcow2 => "qcow2" },
        "readwrite": if d.disk.readonly { 0 } else { 1 },
    })
}

/// The `libxl_device_disk` of a disk to remove: [`disk_json`] plus the backend type libxl
/// picked when it added it (`libxl__device_from_disk` needs it; `libxl_device_disk_add`
/// fills it in only in its own copy): blkback (`phy`) for raw images, qdisk for qcow2.
pub fn disk_remove_json(d: &XenDisk) -> Value {
    let mut v = disk_json(d);
    v["backend"] = json!(match d.disk.format {
        DiskFormat::Raw => "phy",
        DiskFormat::Qcow2 => "qdisk",
    });
    v
}

/// One `libxl_device_nic` as libxl's JSON: a vif on a dom0 bridge (user-mode networking is
/// QEMU-only).
pub fn nic_json(n: &XenNic) -> Result<Value, MappingError> {
    let bridge = match &n.nic.backend {
        NicBackend::Bridge(b) => b,
        NicBackend::User => {
            return Err(MappingError(format!(
                "NIC {}: user-mode networking is QEMU-only; on Xen use backend = \
                 {{ bridge = \"<dom0 bridge>\" }}",
                n.nic.id.map(|i| i.to_string()).unwrap_or_default()
            )))
        }
    };
    let mut m = Map::new();
    m.insert("devid".into(), json!(n.devid));
    m.insert("nictype".into(), json!("vif"));
    m.insert("bridge".into(), json!(bridge));
    if let Some(mac) = &n.nic.mac {
        m.insert("mac".into(), json!(mac));
    }
    Ok(Value::Object(m))
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
    fn s14_7_hotplug_plans_reject_duplicates_bad_macs_cdroms_and_full_buses() {
        let mut set = XenDeviceSet::from_config(&config(), uuid()).unwrap();
        let mut d = Disk::new("/img/h1.raw");
        d.id = Some(id("h1"));
        let h1 = set.plan_disk(&d).unwrap();
        assert_eq!(h1.vdev, "xvdc");
        d.id = Some(id("sys"));
        assert!(matches!(
            set.plan_disk(&d),
            Err(ConfigError::DuplicateDeviceId { .. })
        ));
        d.id = Some(id("cd"));
        d.cdrom = true;
        assert!(matches!(
            set.plan_disk(&d),
            Err(ConfigError::BadDeviceChange { .. })
        ));
        let nic = |i: &str, mac: Option<&str>| Nic {
            id: Some(id(i)),
            mac: mac.map(str::to_owned),
            backend: NicBackend::Bridge("xenbr0".into()),
        };
        assert!(matches!(
            set.plan_nic(&nic("x", Some("00:16:3e:zz:00:01")), uuid()),
            Err(ConfigError::BadMac { .. })
        ));
        assert!(matches!(
            set.plan_nic(&nic("x", Some("01:00:5e:00:00:01")), uuid()),
            Err(ConfigError::BadMac { .. })
        ));
        assert!(matches!(
            set.plan_nic(&nic("x", Some("00:16:3E:AA:00:01")), uuid()),
            Err(ConfigError::DuplicateMac { .. })
        ));
        let hn = set.plan_nic(&nic("hn", None), uuid()).unwrap();
        assert_eq!(hn.devid, 2);
        // A removed name is reused; the bus holds MAX_DISKS.
        set.disks.push(h1);
        assert!(set.remove(id("disk1")));
        let mut d = Disk::new("/img/x.raw");
        d.id = Some(id("again"));
        assert_eq!(set.plan_disk(&d).unwrap().vdev, "xvdb");
        let mut n = 0;
        loop {
            let mut d = Disk::new("/img/x.raw");
            d.id = Some(id(&format!("f{n}")));
            match set.plan_disk(&d) {
                Ok(p) => set.disks.push(p),
                Err(e) => {
                    assert!(
                        matches!(
                            e,
                            ConfigError::NoFreeSlot {
                                bus: "xvd",
                                slots: MAX_DISKS,
                                ..
                            }
                        ),
                        "{e}"
                    );
                    break;
                }
            }
            n += 1;
        }
        assert_eq!(set.disks.len(), MAX_DISKS);
    }

    #[test]
    fn s14_7_a_restore_json_carries_the_live_devices() {
        let c = config();
        let mut set = XenDeviceSet::from_config(&c, uuid()).unwrap();
        let def = json!({"c_info": {"name": "a"}, "disks": [{"vdev": "xvda"}]});
        let mut d = Disk::new("/img/h1.raw");
        d.id = Some(id("h1"));
        let h1 = set.plan_disk(&d).unwrap();
        set.disks.push(h1);
        let v = set.apply_to_json(&def).unwrap();
        assert_eq!(v["c_info"]["name"], "a");
        assert_eq!(v["disks"].as_array().unwrap().len(), 3);
        assert_eq!(v["disks"][2]["vdev"], "xvdc");
        assert_eq!(v["disks"][2]["pdev_path"], "/img/h1.raw");
        assert_eq!(v["nics"][1]["devid"], 1);
        let back: XenDeviceSet =
            serde_json::from_value(serde_json::to_value(&set).unwrap()).unwrap();
        assert_eq!(back, set);
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
