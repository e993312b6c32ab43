//! [`DomainConfig`] -> libxl's JSON domain config (pure).
//!
//! The driver builds the JSON that `libxl_domain_config_to_json` would print (the format of
//! `xl list -l` and of libxl's own saved configs) and hands it to
//! `libxl_domain_config_from_json`, instead of filling `libxl_domain_config` field by field:
//! - the mapping stays pure, table-like and unit-testable without a Xen host;
//! - libxl's own parser applies its IDL defaults and `init_type` for the keyed unions, so no
//!   hand-written FFI code has to get `init`/`dispose`/`malloc` ownership of nested strings
//!   and arrays right;
//! - the integration test `t00_config_json_roundtrip` checks on the real host that libxl
//!   reads every field back (`libxl_domain_config_to_json`).
//!
//! Format notes (libxl's gentypes.py): a keyed union is written as `"<key>.<variant>": {...}`
//! (`"type.pv": {}` in `b_info`; `"connection.socket": {"path": ..}` in a channel); enums are
//! lower-case names; bitmaps are arrays of set-bit indices; uuids are strings.

use domkit_core::{Boot, ConsoleKind, DomainConfig, LifecycleAction, XenGuestType};
use serde_json::{json, Map, Value};
use std::path::Path;
use uuid::Uuid;

/// Why a [`DomainConfig`] cannot be expressed for libxl (becomes `Error::Unsupported`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MappingError(pub String);

/// libxl's name for a lifecycle action (`libxl_action_on_shutdown`). libxl itself never acts
/// on these (xl does); domkit's core applies the policies. They are written so that
/// `xl list -l` shows the domain's real policy.
pub fn action_name(action: LifecycleAction) -> &'static str {
    match action {
        LifecycleAction::Destroy => "destroy",
        LifecycleAction::Restart => "restart",
        LifecycleAction::Preserve => "preserve",
    }
}

/// The Xen virtual disk name of disk `index`: `xvda`, ..., `xvdz`, `xvdaa`, ...
pub fn vdev_name(index: usize) -> String {
    let mut n = index;
    let mut letters = Vec::new();
    loop {
        letters.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    letters.reverse();
    format!("xvd{}", String::from_utf8_lossy(&letters))
}

/// Where the host end of channel `port` of domain `name` listens.
pub fn channel_socket_path(runtime_dir: &Path, name: &str, port: &str) -> std::path::PathBuf {
    runtime_dir.join(name).join(format!("{port}.sock"))
}

/// Build libxl's JSON domain config for `config` with identity (`config.name`, `uuid`).
/// `runtime_dir`: where channel sockets go. `host_has_hvm`: whether PVH guests can run
/// ([`crate::Context::host_can_run_pvh`]).
pub fn domain_config_json(
    config: &DomainConfig,
    uuid: Uuid,
    runtime_dir: &Path,
    host_has_hvm: bool,
) -> Result<Value, MappingError> {
    let guest_type = match config.xen.guest_type {
        XenGuestType::Pv => "pv",
        XenGuestType::Pvh => {
            if !host_has_hvm {
                return Err(MappingError(
                    "xen.type = \"pvh\" needs hardware virtualisation (VT-x/AMD-V) with HAP or \
                     shadow paging: libxl_get_physinfo reports no HVM capability or no paging \
                     mode on this Xen host (e.g. Xen under QEMU TCG); use xen.type = \"pv\""
                        .into(),
                ));
            }
            "pvh"
        }
    };

    let mut b_info = Map::new();
    b_info.insert("max_vcpus".into(), json!(config.vcpus));
    b_info.insert(
        "avail_vcpus".into(),
        Value::Array((0..config.vcpus).map(|i| json!(i)).collect()),
    );
    let kib = config.memory_mib.saturating_mul(1024);
    b_info.insert("max_memkb".into(), json!(kib));
    b_info.insert("target_memkb".into(), json!(kib));
    match &config.boot {
        Boot::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            b_info.insert("kernel".into(), json!(kernel.to_string_lossy()));
            if let Some(initrd) = initrd {
                b_info.insert("ramdisk".into(), json!(initrd.to_string_lossy()));
            }
            if !cmdline.is_empty() {
                b_info.insert("cmdline".into(), json!(cmdline));
            }
        }
        Boot::Disk { .. } => {
            if config.xen.guest_type == XenGuestType::Pvh {
                return Err(MappingError(
                    "boot.from = \"disk\" is not supported for PVH guests (it needs a PVH \
                     firmware such as grub-pvh); boot a kernel directly"
                        .into(),
                ));
            }
            // A PV guest boots its disk through the pygrub bootloader in dom0.
            b_info.insert("bootloader".into(), json!("pygrub"));
        }
    }
    b_info.insert(format!("type.{guest_type}"), json!({}));

    if config.consoles.len() > 1 {
        return Err(MappingError(format!(
            "{} consoles configured: a Xen PV/PVH guest has one PV console (console 0, served by \
             xenconsoled); configure at most one",
            config.consoles.len()
        )));
    }
    if let Some(console) = config.consoles.first() {
        if let Some(log) = &console.log {
            return Err(MappingError(format!(
                "consoles[0].log = {log:?}: xenconsoled logs guest consoles itself (xenconsoled \
                 --log=guest writes /var/log/xen/console/guest-<name>.log); a per-domain log path \
                 is not supported by the libxl backend"
            )));
        }
        // Serial and Pv both mean the PV console here (console 0, always present).
        debug_assert!(matches!(
            console.kind,
            ConsoleKind::Serial | ConsoleKind::Pv
        ));
    }

    if let Some(i) = config.disks.iter().position(|d| d.cdrom) {
        return Err(MappingError(format!(
            "disks[{i}]: CD-ROM drives are not supported by the libxl backend (a PV guest \
             has no emulated CD-ROM, and a PV CD-ROM with media changes needs the qdisk \
             backend, qemu-system-xen, which domkit does not use; attach the image as a \
             read-only disk)"
        )));
    }
    // Ids, vdevs, devids and MACs as `devices()` lists them (§14.7).
    let set = crate::devices::XenDeviceSet::from_config(config, uuid)
        .map_err(|e| MappingError(e.to_string()))?;
    let disks: Vec<Value> = set.disks.iter().map(crate::devices::disk_json).collect();
    let mut nics = Vec::new();
    for (i, x) in set.nics.iter().enumerate() {
        nics.push(crate::devices::nic_json(x).map_err(|_| {
            MappingError(format!(
                "nics[{i}]: user-mode networking is QEMU-only; on Xen use backend = \
                 {{ bridge = \"<dom0 bridge>\" }}"
            ))
        })?);
    }

    let channels: Vec<Value> = config
        .channels
        .iter()
        .enumerate()
        .map(|(i, ch)| {
            // A guest-agent channel is a plain PV channel named org.qemu.guest_agent.0 here.
            // libxl makes channel i the PV console with the channel's devid (and the device
            // model's chardev `libxl-channel<devid>`); console 0 is the primary console, so
            // devid 0 fails the create ("Primary console has invalid configuration"):
            // channels are consoles 1, 2, ... (`xenstore device/console/<devid>` in the guest).
            json!({
                "devid": i + 1,
                "name": ch.port_name(),
                "connection.socket": {
                    "path": channel_socket_path(runtime_dir, &config.name, ch.port_name()).to_string_lossy(),
                },
            })
        })
        .collect();

    let mut root = Map::new();
    root.insert(
        "c_info".into(),
        json!({ "type": guest_type, "name": config.name, "uuid": uuid.to_string() }),
    );
    root.insert("b_info".into(), Value::Object(b_info));
    if !disks.is_empty() {
        root.insert("disks".into(), Value::Array(disks));
    }
    if !nics.is_empty() {
        root.insert("nics".into(), Value::Array(nics));
    }
    if !channels.is_empty() {
        root.insert("channels".into(), Value::Array(channels));
    }
    root.insert("on_poweroff".into(), json!(action_name(config.on_poweroff)));
    root.insert("on_reboot".into(), json!(action_name(config.on_reboot)));
    root.insert("on_watchdog".into(), json!(action_name(config.on_crash)));
    root.insert("on_crash".into(), json!(action_name(config.on_crash)));
    Ok(Value::Object(root))
}

#[cfg(test)]
mod tests {
    use super::*;
    use domkit_core::{Channel, ChannelKind, Console, Disk, DiskFormat, Nic, NicBackend};
    use std::path::PathBuf;

    fn base() -> DomainConfig {
        let mut c = DomainConfig::with_kernel("web1", 128, PathBuf::from("/domu/vmlinux"));
        c.boot = Boot::Kernel {
            kernel: "/domu/vmlinux".into(),
            initrd: Some("/domu/initrd.img".into()),
            cmdline: "console=hvc0 quiet".into(),
        };
        c
    }

    fn uuid() -> Uuid {
        Uuid::parse_str("6f1f3e9a-2c1e-4f5b-9a55-0a8c2d3e4f51").unwrap()
    }

    fn map(c: &DomainConfig) -> Value {
        domain_config_json(c, uuid(), Path::new("/run/domkit/libxl"), false).unwrap()
    }

    #[test]
    fn minimal_pv_config_maps_identity_kernel_memory_vcpus() {
        let mut c = base();
        c.vcpus = 2;
        let v = map(&c);
        assert_eq!(
            v["c_info"],
            json!({"type": "pv", "name": "web1", "uuid": "6f1f3e9a-2c1e-4f5b-9a55-0a8c2d3e4f51"})
        );
        let b = &v["b_info"];
        assert_eq!(b["max_vcpus"], 2);
        assert_eq!(b["avail_vcpus"], json!([0, 1]));
        assert_eq!(b["max_memkb"], 131072);
        assert_eq!(b["target_memkb"], 131072);
        assert_eq!(b["kernel"], "/domu/vmlinux");
        assert_eq!(b["ramdisk"], "/domu/initrd.img");
        assert_eq!(b["cmdline"], "console=hvc0 quiet");
        assert_eq!(b["type.pv"], json!({}));
        assert!(v.get("disks").is_none() && v.get("nics").is_none());
    }

    #[test]
    fn policies_are_written_for_xl_list() {
        let mut c = base();
        c.on_poweroff = LifecycleAction::Preserve;
        c.on_reboot = LifecycleAction::Destroy;
        c.on_crash = LifecycleAction::Restart;
        let v = map(&c);
        assert_eq!(v["on_poweroff"], "preserve");
        assert_eq!(v["on_reboot"], "destroy");
        assert_eq!(v["on_crash"], "restart");
        assert_eq!(v["on_watchdog"], "restart");
    }

    #[test]
    fn disks_get_xvd_names_format_and_mode() {
        let mut c = base();
        c.disks = vec![
            Disk {
                id: None,
                path: "/img/root.raw".into(),
                format: DiskFormat::Raw,
                readonly: false,
                cdrom: false,
            },
            Disk {
                id: None,
                path: "/img/data.qcow2".into(),
                format: DiskFormat::Qcow2,
                readonly: true,
                cdrom: false,
            },
        ];
        let v = map(&c);
        assert_eq!(
            v["disks"],
            json!([
                {"pdev_path": "/img/root.raw", "vdev": "xvda", "format": "raw", "readwrite": 1},
                {"pdev_path": "/img/data.qcow2", "vdev": "xvdb", "format": "qcow2", "readwrite": 0},
            ])
        );
    }

    #[test]
    fn vdev_names_continue_past_z() {
        assert_eq!(vdev_name(0), "xvda");
        assert_eq!(vdev_name(25), "xvdz");
        assert_eq!(vdev_name(26), "xvdaa");
        assert_eq!(vdev_name(27), "xvdab");
    }

    #[test]
    fn bridge_nics_map_and_user_nics_are_unsupported() {
        let mut c = base();
        c.nics = vec![Nic {
            id: None,
            mac: Some("00:16:3E:00:00:01".into()),
            backend: NicBackend::Bridge("xenbr0".into()),
        }];
        let v = map(&c);
        assert_eq!(
            v["nics"],
            json!([{"devid": 0, "nictype": "vif", "bridge": "xenbr0", "mac": "00:16:3e:00:00:01"}])
        );
        c.nics = vec![Nic {
            id: None,
            mac: None,
            backend: NicBackend::User,
        }];
        let e = domain_config_json(&c, uuid(), Path::new("/r"), true).unwrap_err();
        assert!(e.0.contains("QEMU-only"), "{e}");
    }

    #[test]
    fn channels_become_socket_channels_in_the_runtime_dir() {
        let mut c = base();
        c.channels = vec![
            Channel {
                kind: ChannelKind::GuestAgent,
                name: None,
            },
            Channel {
                kind: ChannelKind::Plain,
                name: Some("org.example.log".into()),
            },
        ];
        let v = map(&c);
        assert_eq!(
            v["channels"],
            json!([
                {"devid": 1, "name": "org.qemu.guest_agent.0",
                 "connection.socket": {"path": "/run/domkit/libxl/web1/org.qemu.guest_agent.0.sock"}},
                {"devid": 2, "name": "org.example.log",
                 "connection.socket": {"path": "/run/domkit/libxl/web1/org.example.log.sock"}},
            ])
        );
    }

    #[test]
    fn one_console_is_the_pv_console_more_or_a_log_path_is_unsupported() {
        let mut c = base();
        c.consoles = vec![Console::default()];
        assert!(domain_config_json(&c, uuid(), Path::new("/r"), false).is_ok());
        c.consoles = vec![Console::default(), Console::default()];
        assert!(domain_config_json(&c, uuid(), Path::new("/r"), false).is_err());
        c.consoles = vec![Console {
            kind: ConsoleKind::Pv,
            log: Some("/tmp/x.log".into()),
        }];
        let e = domain_config_json(&c, uuid(), Path::new("/r"), false).unwrap_err();
        assert!(e.0.contains("xenconsoled"), "{e}");
    }

    #[test]
    fn s14_7_cdroms_are_refused_with_the_reason() {
        let mut c = base();
        let mut cd = Disk::new("/domu/cd.iso");
        cd.cdrom = true;
        c.disks = vec![cd];
        let e = domain_config_json(&c, uuid(), Path::new("/r"), false).unwrap_err();
        assert!(e.0.contains("CD-ROM"), "{e}");
    }

    #[test]
    fn pvh_needs_hvm_capability() {
        let mut c = base();
        c.xen.guest_type = XenGuestType::Pvh;
        let e = domain_config_json(&c, uuid(), Path::new("/r"), false).unwrap_err();
        assert!(e.0.contains("hardware virtualisation"), "{e}");
        let v = domain_config_json(&c, uuid(), Path::new("/r"), true).unwrap();
        assert_eq!(v["c_info"]["type"], "pvh");
        assert_eq!(v["b_info"]["type.pvh"], json!({}));
        assert!(v["b_info"].get("type.pv").is_none());
    }

    #[test]
    fn disk_boot_uses_pygrub_for_pv_and_is_unsupported_for_pvh() {
        let mut c = base();
        c.disks = vec![Disk {
            id: None,
            path: "/img/root.raw".into(),
            format: DiskFormat::Raw,
            readonly: false,
            cdrom: false,
        }];
        c.boot = Boot::Disk { index: 0 };
        let v = map(&c);
        assert_eq!(v["b_info"]["bootloader"], "pygrub");
        assert!(v["b_info"].get("kernel").is_none());
        c.xen.guest_type = XenGuestType::Pvh;
        assert!(domain_config_json(&c, uuid(), Path::new("/r"), true).is_err());
    }

    #[test]
    fn empty_cmdline_and_no_initrd_are_omitted() {
        let c = DomainConfig::with_kernel("a", 64, PathBuf::from("/k"));
        let v = map(&c);
        assert!(v["b_info"].get("cmdline").is_none());
        assert!(v["b_info"].get("ramdisk").is_none());
    }
}
