//! Watching a running QEMU (`docs/semantics.md` §12.4, §12.5): the I/O half. Reading the
//! process's `/proc` files and its taps' counters for statistics (parsed by the pure
//! [`crate::stats`]), and the console pump between QEMU's console socket and a
//! [`ConsoleHub`].
//!
//! `/proc` and `/sys` reads are done inline: they are served from kernel memory, never wait
//! on a disk, and a stats call makes a handful of them.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use domkit_core::ConsoleHub;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::task::AbortHandle;

use crate::stats::{self, CpuReadings, TapCounters, VcpuThread};

/// `sysconf(_SC_CLK_TCK)` and `sysconf(_SC_PAGESIZE)`, asked once.
fn sysconf_values() -> (u64, u64) {
    static VALUES: OnceLock<(u64, u64)> = OnceLock::new();
    *VALUES.get_or_init(|| {
        // SAFETY: sysconf only reads a system constant; any name is valid input and an
        // unknown one returns -1, handled below.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        // SAFETY: as above.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        (
            u64::try_from(ticks).unwrap_or(100),
            u64::try_from(page).unwrap_or(4096),
        )
    })
}

/// Clock ticks per second of `/proc` cpu times.
pub fn ticks_per_second() -> u64 {
    sysconf_values().0
}

/// The page size `/proc/<pid>/statm` counts in.
pub fn page_size() -> u64 {
    sysconf_values().1
}

fn read_ticks(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    match stats::parse_proc_stat_ticks(&text) {
        Ok(ticks) => Some(ticks),
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "unreadable cpu times");
            None
        }
    }
}

/// The process's and each vCPU thread's cpu ticks (`None` for what cannot be read: the
/// process may have just ended).
pub fn read_cpu(pid: u32, vcpus: &[VcpuThread]) -> CpuReadings {
    let proc_dir = Path::new("/proc").join(pid.to_string());
    CpuReadings {
        process_ticks: read_ticks(&proc_dir.join("stat")),
        vcpus: vcpus
            .iter()
            .map(|v| {
                let stat = proc_dir
                    .join("task")
                    .join(v.thread_id.to_string())
                    .join("stat");
                (*v, read_ticks(&stat))
            })
            .collect(),
    }
}

/// The process's resident pages.
pub fn read_resident_pages(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    stats::parse_statm_resident_pages(&text).ok()
}

/// The tun/tap interfaces the process holds, in fd order (QEMU opens them in `-netdev`
/// order, which is the config's NIC order).
pub fn find_taps(pid: u32) -> Vec<String> {
    let fd_dir = format!("/proc/{pid}/fd");
    let Ok(entries) = std::fs::read_dir(&fd_dir) else {
        return Vec::new();
    };
    let mut fds: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| {
            std::fs::read_link(format!("{fd_dir}/{fd}"))
                .is_ok_and(|target| target == Path::new("/dev/net/tun"))
        })
        .collect();
    fds.sort_unstable();
    fds.into_iter()
        .filter_map(|fd| {
            let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
            stats::parse_fdinfo_tun_interface(&info)
        })
        .collect()
}

/// The host-side counters of interface `name`.
pub fn read_tap(name: &str) -> TapCounters {
    let counter = |file: &str| {
        std::fs::read_to_string(format!("/sys/class/net/{name}/statistics/{file}"))
            .ok()
            .and_then(|t| stats::parse_counter(&t))
    };
    TapCounters {
        rx_bytes: counter("rx_bytes"),
        rx_packets: counter("rx_packets"),
        tx_bytes: counter("tx_bytes"),
        tx_packets: counter("tx_packets"),
    }
}

/// The manager's connection to one QEMU console socket, fanned out by its hub.
#[derive(Debug)]
pub struct ConsoleLink {
    /// The streams' side.
    pub hub: Arc<ConsoleHub>,
    pump: AbortHandle,
}

impl ConsoleLink {
    /// Connect to the console socket at `path` and start pumping. The pump reads all the
    /// time, streams or not: a client that stops reading would make QEMU's serial port
    /// stall the guest's console output.
    pub async fn connect(path: &Path, domain: &str) -> std::io::Result<ConsoleLink> {
        let stream = UnixStream::connect(path).await?;
        let (hub, mut input) = ConsoleHub::new(domain);
        let hub = Arc::new(hub);
        let pump_hub = hub.clone();
        let name = domain.to_owned();
        let pump = tokio::spawn(async move {
            let (mut rd, mut wr) = stream.into_split();
            let mut buf = vec![0u8; domkit_core::console::CONSOLE_CHUNK_MAX];
            loop {
                tokio::select! {
                    read = rd.read(&mut buf) => match read {
                        Ok(0) => break,
                        Ok(n) => pump_hub.publish(&buf[..n]),
                        Err(e) => {
                            tracing::debug!(domain = %name, error = %e, "console socket read failed");
                            break;
                        }
                    },
                    typed = input.recv() => match typed {
                        Some(bytes) => {
                            if let Err(e) = wr.write_all(&bytes).await {
                                tracing::debug!(domain = %name, error = %e, "console socket write failed");
                                break;
                            }
                        }
                        // The hub is gone: nobody can type or read any more.
                        None => break,
                    },
                }
            }
            // QEMU closed the console (it exited) or the link was dropped: every stream ends.
            pump_hub.close();
        });
        Ok(ConsoleLink {
            hub,
            pump: pump.abort_handle(),
        })
    }

    /// Whether the pump still runs (QEMU has not closed the console).
    pub fn is_open(&self) -> bool {
        !self.hub.is_closed()
    }
}

impl Drop for ConsoleLink {
    fn drop(&mut self) {
        // Disconnect (a detaching manager must leave the socket to the next one) and end
        // the streams.
        self.pump.abort();
        self.hub.close();
    }
}
