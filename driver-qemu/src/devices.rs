//! Devices of a QEMU domain (pure: no I/O): the device set of an instance with the bus
//! address of each device, the QMP arguments that hotplug and unplug them, and the
//! translation of QEMU's device events (`docs/semantics.md` §14).
//!
//! Every PCI device gets an explicit slot (`addr=`), on the command line and on hotplug,
//! so that a restore (a migration into a new process) rebuilds exactly the same machine,
//! hotplugged devices included: the set is stored in the save file's header.
//! Naming: the qdev id is the domkit device id; a hotplugged disk's block node is
//! `drive-<id>` (boot-time disks keep their `-drive id=disk<i>`, which the statistics
//! read), a NIC's netdev is `net-<id>`.

use domkit_core::device::{DeviceId, DeviceInfo, DeviceKind};
use domkit_core::{ConfigError, Disk, DiskFormat, DomainConfig, Nic, NicBackend};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

/// The PCI slot of the virtio-serial controller (channels, PV consoles).
pub const VIRTIO_SERIAL_SLOT: u8 = 3;
/// The first PCI slot for disks and NICs (0: host bridge, 1: PIIX3, 2: left free, 3:
/// virtio-serial).
pub const FIRST_SLOT: u8 = 4;
/// The last PCI slot of the i440fx root bus.
pub const LAST_SLOT: u8 = 31;
/// How many disks and NICs fit on the root bus.
pub const PCI_SLOTS: usize = (LAST_SLOT - FIRST_SLOT + 1) as usize;
/// The IDE positions (bus, unit) of the `pc` machine, for CD-ROMs.
pub const IDE_SLOTS: [(u8, u8); 4] = [(0, 0), (0, 1), (1, 0), (1, 1)];

/// Where a device sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Address {
    /// A slot of the PCI root bus (`pci.0`).
    Pci(u8),
    /// An IDE bus and unit (CD-ROMs).
    Ide(u8, u8),
}

impl Address {
    /// For humans (`pci 0x05`, `ide 1.0`).
    pub fn describe(self) -> String {
        match self {
            Address::Pci(slot) => format!("pci {slot:#04x}"),
            Address::Ide(bus, unit) => format!("ide {bus}.{unit}"),
        }
    }
}

/// A disk of an instance: its config (id filled in), its address, and the block node
/// QEMU knows it by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveDisk {
    /// The config, `id` always set.
    pub disk: Disk,
    /// Its address.
    pub addr: Address,
    /// The block backend (`disk<i>` from `-drive`) or node (`drive-<id>`, hotplugged).
    pub node: String,
    /// A CD-ROM whose tray is empty.
    #[serde(default)]
    pub ejected: bool,
}

/// A NIC of an instance: its config (id and MAC filled in) and its address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveNic {
    /// The config, `id` and `mac` always set.
    pub nic: Nic,
    /// Its address.
    pub addr: Address,
}

/// The devices of one instance (or of the definition, as the next start will have them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSet {
    /// Disks and CD-ROMs, in config order then hotplug order.
    pub disks: Vec<LiveDisk>,
    /// NICs, in config order then hotplug order.
    pub nics: Vec<LiveNic>,
}

/// The MAC a NIC without one gets: `52:54:00` (QEMU's prefix) and three bytes of a hash of
/// the domain's uuid and the device id, so that it is stable across starts and differs
/// between domains.
pub fn default_mac(uuid: Uuid, id: DeviceId) -> String {
    let b = domkit_core::device::stable_mac_suffix(uuid, &id);
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

impl DeviceSet {
    /// The devices `config` boots with: ids and MACs filled in, addresses assigned (kept
    /// where a device already has one in `previous`, e.g. the set stored in a save file).
    pub fn from_config(config: &DomainConfig, uuid: Uuid) -> Result<DeviceSet, ConfigError> {
        config.check_devices_unique()?;
        let mut set = DeviceSet::default();
        for (i, disk) in config.disks.iter().enumerate() {
            let mut disk = disk.clone();
            let id = disk.device_id(i);
            disk.id = Some(id);
            let addr = if disk.cdrom {
                disk.readonly = true;
                set.free_ide(id)?
            } else {
                set.free_pci(id)?
            };
            set.disks.push(LiveDisk {
                disk,
                addr,
                node: format!("disk{i}"),
                ejected: false,
            });
        }
        for (i, nic) in config.nics.iter().enumerate() {
            let mut nic = nic.clone();
            let id = nic.device_id(i);
            nic.id = Some(id);
            if nic.mac.is_none() {
                nic.mac = Some(default_mac(uuid, id));
            }
            let addr = set.free_pci(id)?;
            set.nics.push(LiveNic { nic, addr });
        }
        Ok(set)
    }

    fn used(&self) -> impl Iterator<Item = Address> + '_ {
        self.disks
            .iter()
            .map(|d| d.addr)
            .chain(self.nics.iter().map(|n| n.addr))
    }

    /// The lowest free PCI slot, or `no_free_slot` naming `id`.
    pub fn free_pci(&self, id: DeviceId) -> Result<Address, ConfigError> {
        (FIRST_SLOT..=LAST_SLOT)
            .map(Address::Pci)
            .find(|a| !self.used().any(|u| u == *a))
            .ok_or(ConfigError::NoFreeSlot {
                bus: "pci",
                slots: PCI_SLOTS,
                id: id.to_string(),
            })
    }

    fn free_ide(&self, id: DeviceId) -> Result<Address, ConfigError> {
        IDE_SLOTS
            .iter()
            .map(|(b, u)| Address::Ide(*b, *u))
            .find(|a| !self.used().any(|u| u == *a))
            .ok_or(ConfigError::NoFreeSlot {
                bus: "ide",
                slots: IDE_SLOTS.len(),
                id: id.to_string(),
            })
    }

    /// Whether a device has this id.
    pub fn has(&self, id: DeviceId) -> bool {
        self.disk(id).is_some() || self.nic(id).is_some()
    }

    /// The disk with this id.
    pub fn disk(&self, id: DeviceId) -> Option<&LiveDisk> {
        self.disks.iter().find(|d| d.disk.id == Some(id))
    }

    /// The NIC with this id.
    pub fn nic(&self, id: DeviceId) -> Option<&LiveNic> {
        self.nics.iter().find(|n| n.nic.id == Some(id))
    }

    /// Check a disk to hot-add (pure part: id, CD-ROM, slot) and give it its id, node and
    /// address. `next_index` numbers a device without an id (`disk<n>`, the first free).
    pub fn plan_disk(&self, disk: &Disk) -> Result<LiveDisk, ConfigError> {
        let id = match disk.id {
            Some(id) => id,
            None => self.first_free_id("disk"),
        };
        if self.has(id) {
            return Err(ConfigError::DuplicateDeviceId { id: id.to_string() });
        }
        if disk.cdrom {
            return Err(ConfigError::BadDeviceChange {
                id: id.to_string(),
                problem:
                    "a CD-ROM drive (IDE) cannot be hot-added: define it, then change its medium"
                        .into(),
            });
        }
        let addr = self.free_pci(id)?;
        let mut disk = disk.clone();
        disk.id = Some(id);
        Ok(LiveDisk {
            disk,
            addr,
            node: format!("drive-{id}"),
            ejected: false,
        })
    }

    /// Check a NIC to hot-add (pure part: id, MAC syntax and uniqueness, slot).
    pub fn plan_nic(&self, nic: &Nic, uuid: Uuid) -> Result<LiveNic, ConfigError> {
        let id = match nic.id {
            Some(id) => id,
            None => self.first_free_id("nic"),
        };
        if self.has(id) {
            return Err(ConfigError::DuplicateDeviceId { id: id.to_string() });
        }
        let mac = nic.mac.clone().unwrap_or_else(|| default_mac(uuid, id));
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
        let addr = self.free_pci(id)?;
        let mut nic = nic.clone();
        nic.id = Some(id);
        nic.mac = Some(mac);
        Ok(LiveNic { nic, addr })
    }

    fn first_free_id(&self, prefix: &str) -> DeviceId {
        (0..)
            .filter_map(|i| DeviceId::new(&format!("{prefix}{i}")).ok())
            .find(|id| !self.has(*id))
            .unwrap_or_else(|| DeviceId::default_disk(0))
    }

    /// Remove the device with this id; whether it was there.
    pub fn remove(&mut self, id: DeviceId) -> bool {
        let before = self.disks.len() + self.nics.len();
        self.disks.retain(|d| d.disk.id != Some(id));
        self.nics.retain(|n| n.nic.id != Some(id));
        before != self.disks.len() + self.nics.len()
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
                path: (!d.ejected).then(|| d.disk.path.clone()),
                readonly: d.disk.readonly || d.disk.cdrom,
                mac: None,
                address: Some(d.addr.describe()),
            })
        });
        let nics = self.nics.iter().filter_map(|n| {
            Some(DeviceInfo {
                id: n.nic.id?,
                kind: DeviceKind::Nic,
                path: None,
                readonly: false,
                mac: n.nic.mac.clone(),
                address: Some(n.addr.describe()),
            })
        });
        disks.chain(nics).collect()
    }

    /// The config's devices replaced by this set's (for a launch from a stored set: a
    /// restore).
    pub fn apply_to(&self, config: &DomainConfig) -> DomainConfig {
        let mut config = config.clone();
        config.disks = self.disks.iter().map(|d| d.disk.clone()).collect();
        config.nics = self.nics.iter().map(|n| n.nic.clone()).collect();
        config
    }
}

fn format_name(format: DiskFormat) -> &'static str {
    match format {
        DiskFormat::Raw => "raw",
        DiskFormat::Qcow2 => "qcow2",
    }
}

/// `blockdev-add` arguments of a hotplugged disk: a `file` (regular file) or
/// `host_device` (block device) node under the format node `drive-<id>`.
pub fn blockdev_add_args(disk: &LiveDisk, path: &str, block_device: bool) -> Value {
    json!({
        "driver": format_name(disk.disk.format),
        "node-name": disk.node,
        "read-only": disk.disk.readonly,
        "file": {
            "driver": if block_device { "host_device" } else { "file" },
            "filename": path,
            "read-only": disk.disk.readonly,
        },
    })
}

/// `device_add` arguments of a hotplugged disk (virtio-blk, serial = the device id so the
/// guest can tell which disk is which: `/sys/block/vdX/serial`).
pub fn disk_device_add_args(disk: &LiveDisk) -> Value {
    let id = disk.disk.id.map(|i| i.to_string()).unwrap_or_default();
    let addr = match disk.addr {
        Address::Pci(slot) => format!("{slot:#x}"),
        Address::Ide(..) => String::new(),
    };
    json!({
        "driver": "virtio-blk-pci",
        "id": id,
        "drive": disk.node,
        "bus": "pci.0",
        "addr": addr,
        "serial": id,
    })
}

/// `netdev_add` arguments of a hotplugged NIC.
pub fn netdev_add_args(nic: &LiveNic) -> Value {
    let id = nic.nic.id.map(|i| i.to_string()).unwrap_or_default();
    match &nic.nic.backend {
        NicBackend::User => json!({ "type": "user", "id": format!("net-{id}") }),
        NicBackend::Bridge(br) => json!({ "type": "bridge", "id": format!("net-{id}"), "br": br }),
    }
}

/// `device_add` arguments of a hotplugged NIC (virtio-net).
pub fn nic_device_add_args(nic: &LiveNic) -> Value {
    let id = nic.nic.id.map(|i| i.to_string()).unwrap_or_default();
    let addr = match nic.addr {
        Address::Pci(slot) => format!("{slot:#x}"),
        Address::Ide(..) => String::new(),
    };
    json!({
        "driver": "virtio-net-pci",
        "id": id,
        "netdev": format!("net-{id}"),
        "mac": nic.nic.mac,
        "bus": "pci.0",
        "addr": addr,
    })
}

/// What a QEMU event says about a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceFact {
    /// `DEVICE_DELETED` of a device (not of one of its child objects): the guest released
    /// it and QEMU removed it.
    Deleted(DeviceId),
    /// `DEVICE_UNPLUG_GUEST_ERROR`: the guest refused the unplug; the device stays.
    UnplugRefused(DeviceId),
}

/// Translate one QMP event (name and data) into a device fact. `DEVICE_DELETED` is also
/// sent for a device's child objects (`/machine/peripheral/<id>/virtio-backend`, without
/// `device`): only the device itself, `/machine/peripheral/<id>`, counts. Ids that are not
/// domkit device ids (QEMU's own objects) are ignored.
pub fn device_fact(name: &str, data: &Value) -> Option<DeviceFact> {
    let device = data.get("device").and_then(Value::as_str)?;
    let id = DeviceId::new(device).ok()?;
    match name {
        "DEVICE_DELETED" => {
            let path = data.get("path").and_then(Value::as_str)?;
            (path == format!("/machine/peripheral/{device}")).then_some(DeviceFact::Deleted(id))
        }
        "DEVICE_UNPLUG_GUEST_ERROR" => Some(DeviceFact::UnplugRefused(id)),
        _ => None,
    }
}

/// Whether a `qom-list /machine/peripheral` reply names the device `id` (QEMU lists every
/// user-created device there by its qdev id).
pub fn peripheral_has(reply: &Value, id: DeviceId) -> bool {
    // Only `child<...>` entries are devices (`type` is a property of the container).
    reply.as_array().is_some_and(|a| {
        a.iter().any(|p| {
            p.get("name").and_then(Value::as_str) == Some(id.as_str())
                && p.get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| t.starts_with("child<"))
        })
    })
}

/// Whether a `device_del` error says an unplug of this device is already pending (QEMU
/// 7.2: "... unplug already in progress"; the first request still stands).
pub fn unplug_already_pending(desc: &str) -> bool {
    let d = desc.to_ascii_lowercase();
    d.contains("in progress") || d.contains("pending")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uuid() -> Uuid {
        "4c1e0a4e-8f1a-4a57-9a0e-6b8f0a1c2d3e"
            .parse()
            .expect("uuid")
    }

    fn id(s: &str) -> DeviceId {
        DeviceId::new(s).expect("id")
    }

    fn config() -> DomainConfig {
        let mut c = DomainConfig::with_kernel("web1", 128, "/boot/vmlinuz".into());
        c.disks = vec![Disk::new("/img/a.raw"), {
            let mut d = Disk::new("/img/cd.iso");
            d.cdrom = true;
            d
        }];
        c.nics = vec![Nic {
            id: None,
            mac: None,
            backend: NicBackend::User,
        }];
        c
    }

    #[test]
    fn s14_boot_devices_get_ids_slots_and_stable_macs() {
        let set = DeviceSet::from_config(&config(), uuid()).expect("set");
        assert_eq!(set.disks[0].disk.id, Some(id("disk0")));
        assert_eq!(set.disks[0].addr, Address::Pci(FIRST_SLOT));
        assert_eq!(set.disks[1].addr, Address::Ide(0, 0));
        assert!(set.disks[1].disk.readonly, "a CD-ROM is read-only");
        assert_eq!(set.nics[0].addr, Address::Pci(FIRST_SLOT + 1));
        let mac = set.nics[0].nic.mac.clone().expect("mac");
        assert!(domkit_core::config::is_valid_mac(&mac), "{mac}");
        let again = DeviceSet::from_config(&config(), uuid()).expect("set");
        assert_eq!(again.nics[0].nic.mac, Some(mac), "stable across starts");
    }

    #[test]
    fn s14_hotplug_plans_reject_duplicates_bad_macs_and_full_buses() {
        let set = DeviceSet::from_config(&config(), uuid()).expect("set");
        let mut dup = Disk::new("/img/b.raw");
        dup.id = Some(id("nic0"));
        assert!(matches!(
            set.plan_disk(&dup),
            Err(ConfigError::DuplicateDeviceId { .. })
        ));
        let taken = set.nics[0].nic.mac.clone();
        let nic = Nic {
            id: Some(id("n2")),
            mac: taken.map(|m| m.to_uppercase()),
            backend: NicBackend::User,
        };
        assert!(matches!(
            set.plan_nic(&nic, uuid()),
            Err(ConfigError::DuplicateMac { .. })
        ));
        let bad = Nic {
            id: Some(id("n3")),
            mac: Some("01:00:5e:00:00:01".into()),
            backend: NicBackend::User,
        };
        assert!(matches!(
            set.plan_nic(&bad, uuid()),
            Err(ConfigError::BadMac { .. })
        ));
        let mut cd = Disk::new("/img/cd2.iso");
        cd.cdrom = true;
        assert!(matches!(
            set.plan_disk(&cd),
            Err(ConfigError::BadDeviceChange { .. })
        ));
        let mut full = set.clone();
        while let Ok(d) = full.plan_disk(&Disk::new("/img/x.raw")) {
            full.disks.push(d);
        }
        let pci = full.used().filter(|a| matches!(a, Address::Pci(_))).count();
        assert_eq!(pci, PCI_SLOTS);
        assert!(matches!(
            full.plan_disk(&Disk::new("/img/x.raw")),
            Err(ConfigError::NoFreeSlot { bus: "pci", .. })
        ));
    }

    #[test]
    fn s14_a_removed_slot_is_reused_and_ids_default_to_the_first_free() {
        let mut set = DeviceSet::from_config(&config(), uuid()).expect("set");
        let d = set.plan_disk(&Disk::new("/img/b.raw")).expect("plan");
        assert_eq!(d.disk.id, Some(id("disk2")));
        assert_eq!(d.node, "drive-disk2");
        assert!(set.remove(id("disk0")));
        let d = set.plan_disk(&Disk::new("/img/b.raw")).expect("plan");
        assert_eq!(d.disk.id, Some(id("disk0")));
        assert_eq!(d.addr, Address::Pci(FIRST_SLOT), "the freed slot");
    }

    /// The events QEMU 7.2 sent during hotplug, unplug (completed, and ignored by a guest
    /// with its hotplug GPE masked) and a CD-ROM medium change, recorded from the real
    /// guest by `examples/record_devices.rs`.
    fn recorded() -> Vec<(String, Value)> {
        let text = include_str!("../tests/fixtures/devices/qemu-7.2.jsonl");
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| {
                let name = v.get("event")?.as_str()?.to_string();
                Some((name, v.get("data").cloned().unwrap_or(Value::Null)))
            })
            .collect()
    }

    #[test]
    fn s14_recorded_unplugs_are_one_deleted_fact_per_device_and_nothing_else() {
        let facts: Vec<DeviceFact> = recorded()
            .iter()
            .filter_map(|(name, data)| device_fact(name, data))
            .collect();
        // The child `virtio-backend` deletions, the tray moves of the medium change and
        // the ignored unplug of d2 give nothing.
        assert_eq!(
            facts,
            ["h1", "d1", "hn", "n0"]
                .iter()
                .map(|d| DeviceFact::Deleted(id(d)))
                .collect::<Vec<_>>()
        );
        let children = recorded()
            .iter()
            .filter(|(n, d)| n == "DEVICE_DELETED" && d.get("device").is_none())
            .count();
        assert_eq!(children, 4, "the recording has the child deletions");
    }

    #[test]
    fn s14_recorded_peripheral_lists_show_attached_and_detached_devices() {
        let text = include_str!("../tests/fixtures/devices/qemu-7.2.jsonl");
        let replies: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v.get("reply").is_some())
            .filter_map(|v| v.get("return").cloned())
            .collect();
        assert_eq!(replies.len(), 2, "after the attaches, after the detaches");
        for d in ["h1", "hn", "d1", "n0", "cd", "d2"] {
            assert!(peripheral_has(&replies[0], id(d)), "{d} attached");
        }
        for d in ["h1", "hn", "d1", "n0"] {
            assert!(!peripheral_has(&replies[1], id(d)), "{d} detached");
        }
        assert!(peripheral_has(&replies[1], id("d2")));
        assert!(
            !peripheral_has(&replies[1], id("type")),
            "a property, not a device"
        );
    }

    #[test]
    fn s14_unplug_guest_error_is_a_refusal() {
        // Not a recording: QEMU 7.2 on `pc` sends DEVICE_UNPLUG_GUEST_ERROR only for
        // memory and CPU unplug (ACPI PCI hotplug has no refusal path: the timeout is what
        // a refusing guest gives). The shape is the QAPI schema's (qapi/qdev.json).
        let data = json!({"device": "d1", "path": "/machine/peripheral/d1"});
        assert_eq!(
            device_fact("DEVICE_UNPLUG_GUEST_ERROR", &data),
            Some(DeviceFact::UnplugRefused(id("d1")))
        );
        // QEMU's own objects have ids that are not domkit device ids.
        let data = json!({"device": "0bad.id", "path": "/machine/peripheral/0bad.id"});
        assert_eq!(device_fact("DEVICE_DELETED", &data), None);
    }

    #[test]
    fn s14_qmp_arguments() {
        let set = DeviceSet::from_config(&config(), uuid()).expect("set");
        let mut disk = Disk::new("/img/b,c.qcow2");
        disk.id = Some(id("data"));
        disk.format = DiskFormat::Qcow2;
        disk.readonly = true;
        let d = set.plan_disk(&disk).expect("plan");
        assert_eq!(
            blockdev_add_args(&d, "/img/b,c.qcow2", false),
            json!({"driver": "qcow2", "node-name": "drive-data", "read-only": true,
                   "file": {"driver": "file", "filename": "/img/b,c.qcow2", "read-only": true}})
        );
        assert_eq!(
            disk_device_add_args(&d),
            json!({"driver": "virtio-blk-pci", "id": "data", "drive": "drive-data",
                   "bus": "pci.0", "addr": "0x6", "serial": "data"})
        );
        let n = set
            .plan_nic(
                &Nic {
                    id: Some(id("eth9")),
                    mac: Some("52:54:00:aa:bb:cc".into()),
                    backend: NicBackend::Bridge("br0".into()),
                },
                uuid(),
            )
            .expect("plan");
        assert_eq!(
            netdev_add_args(&n),
            json!({"type": "bridge", "id": "net-eth9", "br": "br0"})
        );
        assert_eq!(
            nic_device_add_args(&n),
            json!({"driver": "virtio-net-pci", "id": "eth9", "netdev": "net-eth9",
                   "mac": "52:54:00:aa:bb:cc", "bus": "pci.0", "addr": "0x6"})
        );
    }
}
