//! Statistics of a domain (`docs/semantics.md` §12.5): one typed record on every backend,
//! after libvirt's `virConnectGetAllDomainStats` groups. A figure a backend does not know is
//! `None`, never a made-up 0.
//!
//! Counters (cpu time, bytes, requests, packets) only grow while one backend instance (QEMU
//! process, Xen domain) lives; they start again from 0 after the domain was shut off and
//! started or restored.

use crate::event::DomainId;
use crate::state::DomainState;
use serde::{Deserialize, Serialize};

/// Statistics of one domain at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainStats {
    /// Which domain.
    pub domain: DomainId,
    /// Its state when the figures were taken.
    pub state: DomainState,
    /// When they were taken, in microseconds since the Unix epoch.
    pub taken_at_us: u64,
    /// vCPU times. Empty (`None`, no vCPUs) for a domain that is not active.
    pub cpu: CpuStats,
    /// Memory.
    pub memory: MemoryStats,
    /// One entry per disk of the config, in config order (empty when not active).
    pub disks: Vec<DiskStats>,
    /// One entry per NIC of the config, in config order (empty when not active).
    pub nics: Vec<NicStats>,
}

impl DomainStats {
    /// The record of a domain that is not active (shut off): its state, no figures.
    pub fn inactive(domain: DomainId, state: DomainState, taken_at_us: u64) -> Self {
        DomainStats {
            domain,
            state,
            taken_at_us,
            cpu: CpuStats::default(),
            memory: MemoryStats::default(),
            disks: Vec::new(),
            nics: Vec::new(),
        }
    }
}

/// CPU time used by the domain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuStats {
    /// CPU time used by the whole domain in nanoseconds, user plus system (QEMU: every
    /// thread of the process, emulation and I/O included, like libvirt's `cpu.time`).
    pub total_ns: Option<u64>,
    /// Per vCPU, by index.
    pub vcpus: Vec<VcpuStats>,
}

/// CPU time of one vCPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuStats {
    /// The vCPU's index (0-based).
    pub index: u32,
    /// CPU time the vCPU ran, in nanoseconds (QEMU: its host thread's).
    pub time_ns: Option<u64>,
    /// The host thread running it (QEMU: a thread id of the QEMU process), if it has one.
    pub host_thread: Option<u32>,
}

/// Memory of the domain, in KiB.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryStats {
    /// The memory the guest has now (the balloon's target where a balloon exists, else the
    /// configured size).
    pub current_kib: Option<u64>,
    /// The most it may have (the configured size).
    pub maximum_kib: Option<u64>,
    /// What the balloon driver reports the guest has, where a balloon device exists.
    pub balloon_kib: Option<u64>,
    /// Host memory resident for the domain (QEMU: the process's RSS).
    pub host_resident_kib: Option<u64>,
}

/// I/O counters of one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStats {
    /// The disk's index in the config.
    pub index: usize,
    /// The backend's name of it (QEMU: the drive id `disk0`; Xen: the vbd).
    pub name: String,
    /// Bytes read.
    pub read_bytes: Option<u64>,
    /// Bytes written.
    pub write_bytes: Option<u64>,
    /// Read requests.
    pub read_requests: Option<u64>,
    /// Write requests.
    pub write_requests: Option<u64>,
}

/// Traffic counters of one NIC, from the guest's point of view (rx: received by the guest),
/// like libvirt's `net.*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicStats {
    /// The NIC's index in the config.
    pub index: usize,
    /// The host-side interface (QEMU: the tap, `tap0`), when the NIC has one.
    pub host_interface: Option<String>,
    /// Bytes received by the guest.
    pub rx_bytes: Option<u64>,
    /// Packets received by the guest.
    pub rx_packets: Option<u64>,
    /// Bytes sent by the guest.
    pub tx_bytes: Option<u64>,
    /// Packets sent by the guest.
    pub tx_packets: Option<u64>,
}
