//! Devices of a running domain: ids, hotplug options and what `info()` lists
//! (`docs/semantics.md` §14).
//!
//! A device id names a disk, CD-ROM or NIC of a domain for its whole life: in the config
//! (`[[disks]] id = "data"`, default `disk<i>` / `nic<i>` by position), in
//! [`crate::Domain::attach_device`] / [`crate::Domain::detach_device`], in the device events
//! ([`crate::EventKind::DeviceAdded`], ...) and in [`DeviceInfo`]. It is small and `Copy`
//! (1-31 of `[A-Za-z0-9_-]`, starting with a letter) so the events stay `Copy`.

use crate::config::{ConfigError, Disk, Nic};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// The longest device id, in bytes.
pub const DEVICE_ID_MAX: usize = 31;

/// A device id: 1-31 of `[A-Za-z0-9_-]`, starting with a letter (QEMU's rule for qdev ids,
/// minus `.`). Serialised as a string.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId {
    len: u8,
    bytes: [u8; DEVICE_ID_MAX],
}

impl DeviceId {
    /// Check and make a device id.
    pub fn new(id: &str) -> Result<Self, ConfigError> {
        let bad = |problem: &'static str| {
            Err(ConfigError::BadDeviceId {
                id: id.to_string(),
                problem,
            })
        };
        if id.is_empty() {
            return bad("it is empty");
        }
        if id.len() > DEVICE_ID_MAX {
            return bad("it is longer than 31 characters");
        }
        if !id.starts_with(|c: char| c.is_ascii_alphabetic()) {
            return bad("it does not start with a letter");
        }
        if !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        {
            return bad("it contains a character outside A-Z a-z 0-9 _ -");
        }
        let mut bytes = [0u8; DEVICE_ID_MAX];
        bytes[..id.len()].copy_from_slice(id.as_bytes());
        Ok(DeviceId {
            len: id.len() as u8,
            bytes,
        })
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        // Only ever built from a checked ASCII string.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }

    /// The default id of the disk at `index` of the config: `disk<index>`.
    pub fn default_disk(index: usize) -> Self {
        Self::new(&format!("disk{index}")).unwrap_or_else(|_| Self::fallback())
    }

    /// The default id of the NIC at `index` of the config: `nic<index>`.
    pub fn default_nic(index: usize) -> Self {
        Self::new(&format!("nic{index}")).unwrap_or_else(|_| Self::fallback())
    }

    fn fallback() -> Self {
        let mut bytes = [0u8; DEVICE_ID_MAX];
        bytes[0] = b'x';
        DeviceId { len: 1, bytes }
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl std::str::FromStr for DeviceId {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        DeviceId::new(s)
    }
}

impl Serialize for DeviceId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for DeviceId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DeviceId::new(&s).map_err(serde::de::Error::custom)
    }
}

/// Where a device change applies (virsh's `--live` / `--config`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceScope {
    /// The running domain only (it must be active); the definition is unchanged, so the
    /// next start has the old devices.
    #[default]
    Live,
    /// The definition only (persisted by a persistent driver, §11.2): the next start has
    /// it; a running domain is unchanged.
    Config,
    /// Both: the running domain first, then the definition (if the live change fails,
    /// nothing changes).
    Both,
}

impl DeviceScope {
    /// Whether the running domain changes.
    pub fn live(self) -> bool {
        matches!(self, DeviceScope::Live | DeviceScope::Both)
    }

    /// Whether the definition changes.
    pub fn config(self) -> bool {
        matches!(self, DeviceScope::Config | DeviceScope::Both)
    }
}

/// A device to attach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DeviceSpec {
    /// A disk (a CD-ROM cannot be hot-added: change its medium instead).
    Disk(Disk),
    /// A network interface.
    Nic(Nic),
}

/// What kind of device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// A disk.
    Disk,
    /// A CD-ROM drive.
    Cdrom,
    /// A network interface.
    Nic,
}

/// One current device of a domain, as `info()` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Its id.
    pub id: DeviceId,
    /// What it is.
    pub kind: DeviceKind,
    /// A disk's image (a CD-ROM's medium; `None` when its tray is empty).
    pub path: Option<PathBuf>,
    /// A disk attached read-only (a CD-ROM always is).
    pub readonly: bool,
    /// A NIC's MAC address (as configured or assigned).
    pub mac: Option<String>,
    /// Where it sits on the backend's bus, for humans (`pci 0x05`, `ide 1.0`, `xvdb`).
    pub address: Option<String>,
}

/// Options of [`crate::Domain::detach_device`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetachOptions {
    /// Live, config or both.
    pub scope: DeviceScope,
    /// How long to wait for the guest to release the device (live). On timeout the
    /// device is still attached and the error is `timeout` saying so.
    pub timeout: Duration,
}

impl Default for DetachOptions {
    fn default() -> Self {
        DetachOptions {
            scope: DeviceScope::Live,
            timeout: Duration::from_secs(30),
        }
    }
}

/// Three bytes of a hash (FNV-1a: stable across Rust versions, std's hasher is not) of a
/// domain's uuid and a device id: the device part of a generated MAC, the same at every
/// start and different between domains. Each backend puts its own prefix before it.
pub fn stable_mac_suffix(uuid: uuid::Uuid, id: &DeviceId) -> [u8; 3] {
    let mut h: u32 = 0x811c_9dc5;
    for b in uuid.as_bytes().iter().chain(id.as_str().as_bytes()) {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let b = h.to_be_bytes();
    [b[1], b[2], b[3]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DomainConfig;

    #[test]
    fn s14_device_ids_are_checked_and_serialise_as_strings() {
        let id = DeviceId::new("data-1_x").expect("valid");
        assert_eq!(id.as_str(), "data-1_x");
        assert_eq!(serde_json::to_string(&id).expect("json"), "\"data-1_x\"");
        let back: DeviceId = serde_json::from_str("\"data-1_x\"").expect("parse");
        assert_eq!(back, id);
        for bad in ["", "1abc", "a.b", "a/b", &"x".repeat(32)] {
            assert!(
                matches!(DeviceId::new(bad), Err(ConfigError::BadDeviceId { .. })),
                "{bad:?}"
            );
        }
        assert!(serde_json::from_str::<DeviceId>("\"../x\"").is_err());
    }

    #[test]
    fn s14_ids_and_macs_are_unique_per_domain() {
        let mut c = DomainConfig::with_kernel("a", 128, "/boot/k".into());
        c.disks.push(Disk::new("/img/a"));
        c.nics.push(Nic {
            id: Some(DeviceId::new("disk0").expect("id")),
            mac: None,
            backend: Default::default(),
        });
        assert!(matches!(
            c.check_devices_unique(),
            Err(ConfigError::DuplicateDeviceId { .. })
        ));
        c.nics[0].id = None;
        c.nics[0].mac = Some("52:54:00:00:00:01".into());
        c.nics.push(Nic {
            id: None,
            mac: Some("52:54:00:00:00:01".to_uppercase()),
            backend: Default::default(),
        });
        assert!(matches!(
            c.check_devices_unique(),
            Err(ConfigError::DuplicateMac { .. })
        ));
    }

    #[test]
    fn s14_an_image_must_be_a_file_or_block_device() {
        use crate::config::check_image;
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").expect("write");
        assert_eq!(check_image("p", &file), Ok(()));
        assert!(matches!(
            check_image("p", dir.path()),
            Err(ConfigError::NotAFile { .. })
        ));
        assert!(matches!(
            check_image("p", &dir.path().join("none")),
            Err(ConfigError::MissingFile { .. })
        ));
        assert!(matches!(
            check_image("p", std::path::Path::new("rel")),
            Err(ConfigError::RelativePath { .. })
        ));
    }
}
