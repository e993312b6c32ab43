//! Statistics of a QEMU domain (`docs/semantics.md` §12.5): the pure half. QMP replies and
//! `/proc` / `/sys` text in, [`DomainStats`](domkit_core::DomainStats) figures out; the I/O that fetches them is in
//! `domain.rs` (`QemuDomain::stats`). Every parser takes text or JSON a process or QEMU
//! produced and answers a typed [`StatsParseError`] for anything unexpected, never a panic.
//!
//! Tested with transcripts recorded from QEMU 7.2 (`tests/fixtures/stats/`, recorded by
//! `cargo run -p domkit-qemu --example record_stats`).

use domkit_core::{CpuStats, DiskStats, MemoryStats, NicStats, VcpuStats};
use serde::Deserialize;
use serde_json::Value;

/// Why a reply or a `/proc` file could not be read as statistics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot read {what}: {reason}")]
pub struct StatsParseError {
    /// What was read (`query-cpus-fast reply`, `/proc/<pid>/stat`).
    pub what: String,
    /// What was wrong with it.
    pub reason: String,
}

fn parse_error(what: &str, reason: impl Into<String>) -> StatsParseError {
    StatsParseError {
        what: what.to_owned(),
        reason: reason.into(),
    }
}

/// One vCPU as `query-cpus-fast` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuThread {
    /// `cpu-index`.
    pub index: u32,
    /// `thread-id`: the host thread running it.
    pub thread_id: u32,
}

/// The vCPUs of a `query-cpus-fast` reply, by index.
pub fn parse_cpus_fast(reply: &Value) -> Result<Vec<VcpuThread>, StatsParseError> {
    #[derive(Deserialize)]
    struct Entry {
        #[serde(rename = "cpu-index")]
        cpu_index: u32,
        #[serde(rename = "thread-id")]
        thread_id: u32,
    }
    let entries: Vec<Entry> = serde_json::from_value(reply.clone())
        .map_err(|e| parse_error("query-cpus-fast reply", e.to_string()))?;
    let mut vcpus: Vec<VcpuThread> = entries
        .into_iter()
        .map(|e| VcpuThread {
            index: e.cpu_index,
            thread_id: e.thread_id,
        })
        .collect();
    vcpus.sort_by_key(|v| v.index);
    Ok(vcpus)
}

/// The counters of one drive in a `query-blockstats` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveCounters {
    /// The drive id (`-drive id=disk0`), empty for a node without a drive.
    pub device: String,
    /// Bytes read.
    pub rd_bytes: u64,
    /// Bytes written.
    pub wr_bytes: u64,
    /// Read operations.
    pub rd_operations: u64,
    /// Write operations.
    pub wr_operations: u64,
}

/// The drives of a `query-blockstats` reply.
pub fn parse_blockstats(reply: &Value) -> Result<Vec<DriveCounters>, StatsParseError> {
    #[derive(Deserialize)]
    struct Entry {
        #[serde(default)]
        device: String,
        stats: Counters,
    }
    #[derive(Deserialize)]
    struct Counters {
        rd_bytes: u64,
        wr_bytes: u64,
        rd_operations: u64,
        wr_operations: u64,
    }
    let entries: Vec<Entry> = serde_json::from_value(reply.clone())
        .map_err(|e| parse_error("query-blockstats reply", e.to_string()))?;
    Ok(entries
        .into_iter()
        .map(|e| DriveCounters {
            device: e.device,
            rd_bytes: e.stats.rd_bytes,
            wr_bytes: e.stats.wr_bytes,
            rd_operations: e.stats.rd_operations,
            wr_operations: e.stats.wr_operations,
        })
        .collect())
}

/// The balloon's `actual` size in bytes from a `query-balloon` reply.
pub fn parse_balloon(reply: &Value) -> Result<u64, StatsParseError> {
    reply
        .get("actual")
        .and_then(Value::as_u64)
        .ok_or_else(|| parse_error("query-balloon reply", "no unsigned `actual` field"))
}

/// User plus system CPU time in clock ticks from `/proc/<pid>/stat` or
/// `/proc/<pid>/task/<tid>/stat` (fields 14 and 15, counted after the parenthesised
/// command name, which may itself contain spaces and parentheses).
pub fn parse_proc_stat_ticks(text: &str) -> Result<u64, StatsParseError> {
    const WHAT: &str = "/proc/<pid>/stat";
    let close = text
        .rfind(')')
        .ok_or_else(|| parse_error(WHAT, "no `)` after the command name"))?;
    // Fields from 3 (state) on: utime is field 14, stime field 15.
    let fields: Vec<&str> = text[close + 1..].split_ascii_whitespace().collect();
    let field = |n: usize| -> Result<u64, StatsParseError> {
        let raw = fields
            .get(n - 3)
            .ok_or_else(|| parse_error(WHAT, format!("only {} fields", fields.len() + 2)))?;
        raw.parse()
            .map_err(|_| parse_error(WHAT, format!("field {n} is not a number: {raw:?}")))
    };
    let utime = field(14)?;
    let stime = field(15)?;
    utime
        .checked_add(stime)
        .ok_or_else(|| parse_error(WHAT, "utime + stime overflows"))
}

/// The resident set size in pages from `/proc/<pid>/statm` (its second field).
pub fn parse_statm_resident_pages(text: &str) -> Result<u64, StatsParseError> {
    const WHAT: &str = "/proc/<pid>/statm";
    let raw = text
        .split_ascii_whitespace()
        .nth(1)
        .ok_or_else(|| parse_error(WHAT, "fewer than 2 fields"))?;
    raw.parse()
        .map_err(|_| parse_error(WHAT, format!("resident is not a number: {raw:?}")))
}

/// The interface of a tun/tap fd from its `/proc/<pid>/fdinfo/<fd>` (the `iff:` line the
/// tun driver adds), or `None` for any other fd.
pub fn parse_fdinfo_tun_interface(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let name = line.strip_prefix("iff:")?.trim();
        // An interface name is at most 15 bytes of printable non-space ASCII.
        let valid = !name.is_empty()
            && name.len() <= 15
            && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/');
        valid.then(|| name.to_owned())
    })
}

/// A counter file of `/sys/class/net/<if>/statistics/` (one decimal number).
pub fn parse_counter(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// Clock ticks to nanoseconds (`ticks_per_second`: `sysconf(_SC_CLK_TCK)`, 100 on Linux).
pub fn ticks_to_ns(ticks: u64, ticks_per_second: u64) -> Option<u64> {
    if ticks_per_second == 0 {
        return None;
    }
    let ns = u128::from(ticks) * 1_000_000_000 / u128::from(ticks_per_second);
    u64::try_from(ns).ok()
}

/// What was read for the cpu group: the process's ticks and each vCPU's (`None` where its
/// thread's file could not be read, e.g. the process just ended).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuReadings {
    /// The whole process.
    pub process_ticks: Option<u64>,
    /// Per vCPU: its thread and that thread's ticks.
    pub vcpus: Vec<(VcpuThread, Option<u64>)>,
}

/// The cpu group from what was read.
pub fn cpu_stats(readings: &CpuReadings, ticks_per_second: u64) -> CpuStats {
    CpuStats {
        total_ns: readings
            .process_ticks
            .and_then(|t| ticks_to_ns(t, ticks_per_second)),
        vcpus: readings
            .vcpus
            .iter()
            .map(|(vcpu, ticks)| VcpuStats {
                index: vcpu.index,
                time_ns: ticks.and_then(|t| ticks_to_ns(t, ticks_per_second)),
                host_thread: Some(vcpu.thread_id),
            })
            .collect(),
    }
}

/// The memory group: the configured size is the maximum, and the current size unless a
/// balloon reports another; host resident from the process's RSS.
pub fn memory_stats(
    memory_mib: u64,
    balloon_bytes: Option<u64>,
    resident_pages: Option<u64>,
    page_size: u64,
) -> MemoryStats {
    let maximum_kib = memory_mib.checked_mul(1024);
    let balloon_kib = balloon_bytes.map(|b| b / 1024);
    MemoryStats {
        current_kib: balloon_kib.or(maximum_kib),
        maximum_kib,
        balloon_kib,
        host_resident_kib: resident_pages.and_then(|p| p.checked_mul(page_size / 1024)),
    }
}

/// The drive id the QEMU command line gives disk `index` (`argv.rs`).
pub fn drive_id(index: usize) -> String {
    format!("disk{index}")
}

/// The disk group: one entry per configured disk, by the drive id `argv.rs` gives it;
/// a disk missing from the reply has `None` figures.
pub fn disk_stats(disk_count: usize, drives: &[DriveCounters]) -> Vec<DiskStats> {
    (0..disk_count)
        .map(|index| {
            let name = drive_id(index);
            let found = drives.iter().find(|d| d.device == name);
            DiskStats {
                index,
                read_bytes: found.map(|d| d.rd_bytes),
                write_bytes: found.map(|d| d.wr_bytes),
                read_requests: found.map(|d| d.rd_operations),
                write_requests: found.map(|d| d.wr_operations),
                name,
            }
        })
        .collect()
}

/// The counters of a host-side tap, as the host sees them (its rx is what the guest sent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TapCounters {
    /// `rx_bytes` of the tap.
    pub rx_bytes: Option<u64>,
    /// `rx_packets` of the tap.
    pub rx_packets: Option<u64>,
    /// `tx_bytes` of the tap.
    pub tx_bytes: Option<u64>,
    /// `tx_packets` of the tap.
    pub tx_packets: Option<u64>,
}

/// One NIC's entry: a tap's counters swapped to the guest's point of view (what the tap
/// received, the guest sent), or `None` figures for a NIC without a host interface
/// (user-mode networking).
pub fn nic_stats(index: usize, tap: Option<(&str, &TapCounters)>) -> NicStats {
    match tap {
        Some((name, c)) => NicStats {
            index,
            host_interface: Some(name.to_owned()),
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A transcript recorded from QEMU 7.2 by `examples/record_stats.rs`.
    fn transcript() -> Value {
        serde_json::from_str(include_str!("../tests/fixtures/stats/qemu-7.2.json"))
            .expect("the transcript is JSON")
    }

    fn reply<'a>(t: &'a Value, command: &str) -> &'a Value {
        t.get("replies")
            .and_then(|r| r.get(command))
            .unwrap_or_else(|| panic!("the transcript has a {command} reply"))
    }

    #[test]
    fn s12_5_recorded_cpus_fast_gives_each_vcpu_thread() {
        let t = transcript();
        let vcpus = parse_cpus_fast(reply(&t, "query-cpus-fast")).expect("parsed");
        let recorded = t["vcpus"].as_u64().expect("vcpus") as usize;
        assert_eq!(vcpus.len(), recorded);
        for (i, v) in vcpus.iter().enumerate() {
            assert_eq!(v.index as usize, i);
            assert!(v.thread_id > 0);
        }
    }

    #[test]
    fn s12_5_recorded_blockstats_map_to_the_configured_disks() {
        let t = transcript();
        let drives = parse_blockstats(reply(&t, "query-blockstats")).expect("parsed");
        let disks = disk_stats(1, &drives);
        assert_eq!(disks.len(), 1);
        assert_eq!(disks[0].name, "disk0");
        // The guest read its disk while the transcript was recorded.
        assert!(disks[0].read_bytes.expect("known") > 0, "{disks:?}");
        assert!(disks[0].read_requests.expect("known") > 0);
        // A disk QEMU does not list has unknown figures, not zeros.
        let missing = disk_stats(2, &drives);
        assert_eq!(missing[1].read_bytes, None);
    }

    #[test]
    fn s12_5_recorded_proc_files_parse() {
        let t = transcript();
        let total =
            parse_proc_stat_ticks(t["proc"]["stat"].as_str().expect("stat")).expect("ticks");
        for task in t["proc"]["vcpu_stat"].as_array().expect("vcpu stats") {
            let ticks = parse_proc_stat_ticks(task.as_str().expect("text")).expect("ticks");
            assert!(ticks <= total, "a vCPU thread used more than the process");
        }
        let pages =
            parse_statm_resident_pages(t["proc"]["statm"].as_str().expect("statm")).expect("rss");
        assert!(pages > 0);
    }

    #[test]
    fn s12_5_recorded_balloon_absent_is_an_error_reply() {
        let t = transcript();
        // No balloon device: QEMU answers an error, and the figure stays unknown.
        assert!(reply(&t, "query-balloon").get("error").is_some());
        assert_eq!(
            parse_balloon(&json!({"actual": 134217728})).expect("actual"),
            134_217_728
        );
        let memory = memory_stats(128, None, Some(1000), 4096);
        assert_eq!(memory.maximum_kib, Some(131_072));
        assert_eq!(memory.current_kib, Some(131_072));
        assert_eq!(memory.balloon_kib, None);
        assert_eq!(memory.host_resident_kib, Some(4000));
        let ballooned = memory_stats(128, Some(64 << 20), None, 4096);
        assert_eq!(ballooned.current_kib, Some(65_536));
        assert_eq!(ballooned.host_resident_kib, None);
    }

    #[test]
    fn s12_5_proc_stat_with_a_hostile_command_name() {
        // The command name is the thread's: a guest name can put spaces and `)` in it.
        let stat = "4242 (CPU 0/TCG) x) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0 100 0 0";
        assert_eq!(parse_proc_stat_ticks(stat), Ok(300));
        for bad in [
            "",
            "4242 (qemu",
            "4242 (q) S 1 2",
            "4242 (q) S 1 2 3 4 5 6 7 8 9 10 x 1",
        ] {
            assert!(parse_proc_stat_ticks(bad).is_err(), "{bad:?}");
        }
        let huge = format!("1 (q) S {} {} {}", "0 ".repeat(8), u64::MAX, u64::MAX);
        assert!(parse_proc_stat_ticks(&huge).is_err(), "overflow");
    }

    #[test]
    fn s12_5_bad_replies_are_typed_errors() {
        assert!(parse_cpus_fast(&json!({"not": "a list"})).is_err());
        assert!(parse_cpus_fast(&json!([{"cpu-index": -1, "thread-id": 1}])).is_err());
        assert!(parse_blockstats(&json!([{"device": "disk0"}])).is_err());
        assert!(parse_balloon(&json!({"actual": "big"})).is_err());
        assert!(parse_statm_resident_pages("12").is_err());
        assert!(parse_statm_resident_pages("12 x").is_err());
    }

    #[test]
    fn s12_5_fdinfo_names_a_tap_and_nothing_else() {
        let tun = "pos:\t0\nflags:\t0104002\nmnt_id:\t25\nino:\t1057\niff:\ttap0\n";
        assert_eq!(parse_fdinfo_tun_interface(tun).as_deref(), Some("tap0"));
        assert_eq!(parse_fdinfo_tun_interface("pos:\t0\nflags:\t02\n"), None);
        assert_eq!(parse_fdinfo_tun_interface("iff:\t../../etc\n"), None);
        assert_eq!(
            parse_fdinfo_tun_interface("iff:\tabcdefghijklmnopq\n"),
            None
        );
        assert_eq!(parse_counter("1234\n"), Some(1234));
        assert_eq!(parse_counter("-1"), None);
    }

    #[test]
    fn s12_5_nic_counters_are_the_guests_view() {
        let tap = TapCounters {
            rx_bytes: Some(100),
            rx_packets: Some(1),
            tx_bytes: Some(2000),
            tx_packets: Some(20),
        };
        let nic = nic_stats(0, Some(("tap0", &tap)));
        assert_eq!(nic.rx_bytes, Some(2000));
        assert_eq!(nic.tx_packets, Some(1));
        let user = nic_stats(1, None);
        assert_eq!((user.rx_bytes, user.host_interface), (None, None));
    }

    #[test]
    fn s12_5_ticks_to_ns() {
        assert_eq!(ticks_to_ns(250, 100), Some(2_500_000_000));
        assert_eq!(ticks_to_ns(1, 0), None);
        assert_eq!(ticks_to_ns(u64::MAX, 1), None);
        let cpu = cpu_stats(
            &CpuReadings {
                process_ticks: Some(10),
                vcpus: vec![(
                    VcpuThread {
                        index: 0,
                        thread_id: 7,
                    },
                    None,
                )],
            },
            100,
        );
        assert_eq!(cpu.total_ns, Some(100_000_000));
        assert_eq!(cpu.vcpus[0].time_ns, None);
        assert_eq!(cpu.vcpus[0].host_thread, Some(7));
    }
}
