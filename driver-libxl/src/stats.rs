//! Pure: what libxl and dom0's backends report about a Xen domain -> the uniform
//! [`DomainStats`] (`docs/semantics.md` §12.5). The I/O half (the libxl calls, dom0's sysfs)
//! is [`crate::observe`]; the readings it takes are plain data, so readings recorded on the
//! real Xen 4.17 host (`tests/fixtures/xen417_stats.json`, `libxl_integration::t42`) are
//! replayed by the unit tests below.
//!
//! Sources:
//! - `libxl_domain_info`: `cpu_time` (ns, every vCPU of the domain), `current_memkb` (the
//!   pages Xen gave the domain), `max_memkb` (the hypervisor's limit: the configured size
//!   plus what libxl adds for its own use);
//! - `libxl_get_memory_target`: the balloon target (xenstore `memory/target`);
//! - `libxl_list_vcpu`: each vCPU's `vcpu_time` (ns);
//! - blkback in dom0: `/sys/bus/xen-backend/devices/vbd-<domid>-<devid>/statistics/`
//!   `rd_req`, `wr_req`, `rd_sect`, `wr_sect` (512-byte sectors);
//! - netback in dom0: `/sys/class/net/vif<domid>.<devid>/statistics/`, counted from dom0's
//!   side (its `tx` is what the guest received), swapped here.

use domkit_core::{
    CpuStats, DiskStats, DomainId, DomainState, DomainStats, MemoryStats, NicStats, VcpuStats,
};
use serde::{Deserialize, Serialize};

/// Blkback counts in sectors of this size, whatever the disk's own sector size.
pub const VBD_SECTOR_BYTES: u64 = 512;

/// What `libxl_domain_info` says about a domain's use of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomUsage {
    /// The domid.
    pub domid: u32,
    /// CPU time used by all its vCPUs, in nanoseconds.
    pub cpu_time_ns: u64,
    /// Memory the domain has now (pages Xen gave it), KiB.
    pub current_memkb: u64,
    /// The hypervisor's limit on its memory, KiB.
    pub max_memkb: u64,
    /// vCPUs online.
    pub vcpu_online: u32,
}

/// What `libxl_list_vcpu` says about one vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuUsage {
    /// The vCPU's index.
    pub vcpuid: u32,
    /// Online in the guest.
    pub online: bool,
    /// CPU time it ran, in nanoseconds.
    pub vcpu_time_ns: u64,
}

/// Blkback's counters of one virtual block device (`None`: not readable).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VbdCounters {
    /// `rd_req`.
    pub rd_req: Option<u64>,
    /// `wr_req`.
    pub wr_req: Option<u64>,
    /// `rd_sect` (512-byte sectors).
    pub rd_sect: Option<u64>,
    /// `wr_sect` (512-byte sectors).
    pub wr_sect: Option<u64>,
}

/// Netback's counters of one vif, from dom0's side of it (`None`: not readable).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VifCounters {
    /// Bytes dom0 received on the vif (sent by the guest).
    pub rx_bytes: Option<u64>,
    /// Packets dom0 received.
    pub rx_packets: Option<u64>,
    /// Bytes dom0 sent on the vif (received by the guest).
    pub tx_bytes: Option<u64>,
    /// Packets dom0 sent.
    pub tx_packets: Option<u64>,
}

/// Everything read about one running Xen domain for one stats record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct XenReadings {
    /// `libxl_domain_info`.
    pub usage: DomUsage,
    /// `libxl_get_memory_target`, KiB (`None`: the call failed).
    pub memory_target_kib: Option<u64>,
    /// `libxl_list_vcpu` (`None`: the call failed).
    pub vcpus: Option<Vec<VcpuUsage>>,
    /// Per disk of the config, in config order: blkback's counters, `None` when dom0 has
    /// no such vbd (no blkback, or the device is served by another backend).
    pub vbds: Vec<Option<VbdCounters>>,
    /// Per NIC of the config, in config order: the vif's name and counters, `None` when
    /// dom0 has no such interface.
    pub vifs: Vec<Option<(String, VifCounters)>>,
}

/// The Xen virtual device number of disk `index` of the config (named
/// [`crate::config::vdev_name`] `xvda`, `xvdb`, ...): `(202 << 8) | (index << 4)` for the
/// first 16, the extended form `(1 << 28) | (index << 8)` after (Xen's
/// `docs/misc/vbd-interface.txt`). It names the vbd in dom0's sysfs and xenstore.
pub fn vbd_devid(index: usize) -> u32 {
    let i = u32::try_from(index).unwrap_or(u32::MAX >> 8);
    if i < 16 {
        (202 << 8) | (i << 4)
    } else {
        (1 << 28) | (i.min((1 << 20) - 1) << 8)
    }
}

/// dom0's sysfs directory of the vbd of disk `index` of domain `domid`.
pub fn vbd_sysfs_dir(domid: u32, index: usize) -> String {
    format!(
        "/sys/bus/xen-backend/devices/vbd-{domid}-{}",
        vbd_devid(index)
    )
}

/// dom0's network interface of NIC `index` of domain `domid` (the config's NICs are vifs
/// with devid = index, `config.rs`).
pub fn vif_name(domid: u32, index: usize) -> String {
    format!("vif{domid}.{index}")
}

/// A sysfs counter file's content (a decimal number and a newline); `None` otherwise.
pub fn parse_counter(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// The uniform record of a running Xen domain from its readings. `memory_mib` is the
/// configured size (the uniform `maximum_kib`; Xen's `max_memkb` also counts what libxl
/// adds for itself).
pub fn domain_stats(
    domain: DomainId,
    state: DomainState,
    taken_at_us: u64,
    memory_mib: u64,
    readings: &XenReadings,
) -> DomainStats {
    let usage = &readings.usage;
    let vcpus = readings
        .vcpus
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|v| VcpuStats {
            index: v.vcpuid,
            time_ns: Some(v.vcpu_time_ns),
            // A Xen vCPU is scheduled by the hypervisor: no dom0 thread runs it.
            host_thread: None,
        })
        .collect();
    let disks = readings
        .vbds
        .iter()
        .enumerate()
        .map(|(index, c)| {
            let c = c.unwrap_or_default();
            DiskStats {
                index,
                name: crate::config::vdev_name(index),
                read_bytes: c.rd_sect.map(|s| s.saturating_mul(VBD_SECTOR_BYTES)),
                write_bytes: c.wr_sect.map(|s| s.saturating_mul(VBD_SECTOR_BYTES)),
                read_requests: c.rd_req,
                write_requests: c.wr_req,
            }
        })
        .collect();
    let nics = readings
        .vifs
        .iter()
        .enumerate()
        .map(|(index, vif)| match vif {
            // dom0's transmit is the guest's receive.
            Some((name, c)) => NicStats {
                index,
                host_interface: Some(name.clone()),
                rx_bytes: c.tx_bytes,
                rx_packets: c.tx_packets,
                tx_bytes: c.rx_bytes,
                tx_packets: c.rx_packets,
            },
            None => NicStats {
                index,
                host_interface: None,
                rx_bytes: None,
                rx_packets: None,
                tx_bytes: None,
                tx_packets: None,
            },
        })
        .collect();
    DomainStats {
        domain,
        state,
        taken_at_us,
        cpu: CpuStats {
            total_ns: Some(usage.cpu_time_ns),
            vcpus,
        },
        memory: MemoryStats {
            // The balloon's target (every PV guest has the balloon driver's xenstore
            // key); what the domain has when it cannot be read.
            current_kib: Some(readings.memory_target_kib.unwrap_or(usage.current_memkb)),
            maximum_kib: Some(memory_mib.saturating_mul(1024)),
            // What the guest's balloon driver left it: the pages Xen gave it.
            balloon_kib: Some(usage.current_memkb),
            // Host memory the domain holds: the same pages (Xen allocates them to it).
            host_resident_kib: Some(usage.current_memkb),
        },
        disks,
        nics,
    }
}

#[cfg(test)]
mod tests {
    //! Replays readings recorded on the real Xen 4.17 host (`tests/fixtures/xen417_stats.json`,
    //! printed by `libxl_integration::t42` as `DOMKIT-LIBXL-STATS`, kept by
    //! `xen-host/run-libxl-tests.sh --record`) through [`domain_stats`].
    use super::*;
    use domkit_core::RunningReason;

    #[derive(Deserialize)]
    struct Recorded {
        case: String,
        memory_mib: u64,
        readings: XenReadings,
    }

    fn recorded() -> Vec<Recorded> {
        serde_json::from_str(include_str!("../tests/fixtures/xen417_stats.json")).expect("fixture")
    }

    fn case(name: &str) -> Recorded {
        recorded()
            .into_iter()
            .find(|r| r.case == name)
            .unwrap_or_else(|| panic!("no recorded case {name}"))
    }

    fn id() -> DomainId {
        DomainId {
            name: "dk-stats".into(),
            uuid: uuid::Uuid::nil(),
        }
    }

    fn map(r: &Recorded) -> DomainStats {
        domain_stats(
            id(),
            DomainState::Running(RunningReason::Booted),
            1,
            r.memory_mib,
            &r.readings,
        )
    }

    #[test]
    fn the_fixture_is_what_libxl_reported() {
        let all = recorded();
        assert!(all.len() >= 2, "a booted and a worked reading");
        for r in &all {
            let u = &r.readings.usage;
            assert!(u.cpu_time_ns > 0 && u.current_memkb > 0, "{}", r.case);
            // Xen's limit is at least the configured size (libxl adds its slack on top).
            assert!(u.max_memkb >= r.memory_mib * 1024, "{}: {u:?}", r.case);
            assert!(r.readings.vcpus.as_ref().is_some_and(|v| !v.is_empty()));
        }
    }

    #[test]
    fn every_figure_of_a_running_domain_is_known() {
        let r = case("booted");
        let s = map(&r);
        assert_eq!(s.cpu.total_ns, Some(r.readings.usage.cpu_time_ns));
        assert_eq!(s.cpu.vcpus.len(), r.readings.vcpus.as_ref().unwrap().len());
        assert!(s
            .cpu
            .vcpus
            .iter()
            .enumerate()
            .all(|(i, v)| v.index == i as u32 && v.time_ns.is_some() && v.host_thread.is_none()));
        assert_eq!(s.memory.maximum_kib, Some(r.memory_mib * 1024));
        assert!(s.memory.current_kib.is_some() && s.memory.balloon_kib.is_some());
        // The vCPUs' times add up to the domain's (read a moment later: a little more).
        let sum: u64 = s.cpu.vcpus.iter().filter_map(|v| v.time_ns).sum();
        let total = s.cpu.total_ns.unwrap();
        assert!(sum.abs_diff(total) < total / 10, "{sum} vs {total}");
        // The recorded disk, as blkback counts it, in bytes.
        let vbd = r.readings.vbds[0].unwrap();
        assert_eq!(s.disks[0].name, "xvda");
        assert_eq!(s.disks[0].read_bytes, Some(vbd.rd_sect.unwrap() * 512));
        assert_eq!(s.disks[0].read_requests, vbd.rd_req);
        assert_eq!(s.disks[0].write_bytes, Some(0));
        assert!(s.nics.is_empty());
    }

    #[test]
    fn counters_grow_between_two_recorded_readings() {
        let (a, b) = (map(&case("booted")), map(&case("worked")));
        assert!(b.cpu.total_ns > a.cpu.total_ns);
        let t = |s: &DomainStats| s.cpu.vcpus.iter().map(|v| v.time_ns.unwrap()).sum::<u64>();
        assert!(t(&b) > t(&a));
        // The guest read its 8 MiB disk between the two.
        let read = |s: &DomainStats| s.disks[0].read_bytes.unwrap();
        assert!(
            read(&b) >= read(&a) + (8 << 20),
            "{} then {}",
            read(&a),
            read(&b)
        );
        assert!(b.disks[0].read_requests > a.disks[0].read_requests);
    }

    #[test]
    fn disks_and_nics_follow_the_config_and_unknown_is_none() {
        let mut r = case("booted").readings;
        r.vbds = vec![
            Some(VbdCounters {
                rd_req: Some(3),
                wr_req: Some(0),
                rd_sect: Some(24),
                wr_sect: None,
            }),
            None,
        ];
        r.vifs = vec![
            Some((
                "vif7.0".into(),
                VifCounters {
                    rx_bytes: Some(10),
                    rx_packets: Some(1),
                    tx_bytes: Some(2000),
                    tx_packets: Some(20),
                },
            )),
            None,
        ];
        let s = domain_stats(
            id(),
            DomainState::Running(RunningReason::Booted),
            1,
            128,
            &r,
        );
        assert_eq!(
            s.disks[0],
            DiskStats {
                index: 0,
                name: "xvda".into(),
                read_bytes: Some(24 * 512),
                write_bytes: None,
                read_requests: Some(3),
                write_requests: Some(0),
            }
        );
        assert_eq!(s.disks[1].name, "xvdb");
        assert_eq!(s.disks[1].read_bytes, None);
        // Swapped to the guest's view.
        assert_eq!(s.nics[0].rx_bytes, Some(2000));
        assert_eq!(s.nics[0].tx_packets, Some(1));
        assert_eq!(s.nics[0].host_interface.as_deref(), Some("vif7.0"));
        assert_eq!(s.nics[1].host_interface, None);
        assert_eq!(s.nics[1].rx_bytes, None);
    }

    #[test]
    fn a_failed_vcpu_list_leaves_the_vcpus_empty_not_zero() {
        let mut r = case("booted").readings;
        r.vcpus = None;
        r.memory_target_kib = None;
        let s = domain_stats(
            id(),
            DomainState::Running(RunningReason::Booted),
            1,
            128,
            &r,
        );
        assert!(s.cpu.vcpus.is_empty());
        assert_eq!(s.memory.current_kib, Some(r.usage.current_memkb));
    }

    #[test]
    fn vbd_numbers_are_xens() {
        assert_eq!(vbd_devid(0), 51712); // xvda
        assert_eq!(vbd_devid(1), 51728); // xvdb
        assert_eq!(vbd_devid(15), 51952); // xvdp
        assert_eq!(vbd_devid(16), (1 << 28) | (16 << 8)); // xvdq, extended
        assert_eq!(
            vbd_sysfs_dir(3, 0),
            "/sys/bus/xen-backend/devices/vbd-3-51712"
        );
        assert_eq!(vif_name(3, 1), "vif3.1");
    }

    #[test]
    fn counters_parse_or_are_unknown() {
        assert_eq!(parse_counter("1234\n"), Some(1234));
        assert_eq!(parse_counter(""), None);
        assert_eq!(parse_counter("-1\n"), None);
        assert_eq!(parse_counter("12 34"), None);
    }
}
