//! Watching a running Xen domain (`docs/semantics.md` §12.4, §12.5): the I/O half. The
//! libxl calls and dom0's sysfs reads behind a statistics record (mapped by the pure
//! [`crate::stats`]), and the console pump between the PV console's pty (served by
//! xenconsoled in dom0) and a [`ConsoleHub`].
//!
//! sysfs reads are done inline: they are served from kernel memory and never wait on a
//! disk. The libxl calls are quick hypercalls and xenstore reads, but they take libxl's
//! ctx lock, so callers make them on a blocking thread.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use domkit_core::{ConsoleHub, DomainEvent, EventKind, EventStream};
use futures::{FutureExt, StreamExt};
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;
use tokio::task::AbortHandle;

use crate::context::Context;
use crate::stats::{self, VbdCounters, VifCounters, XenReadings};

/// Everything [`stats::domain_stats`] needs about Xen domain `domid`, whose config has
/// `disks` disks and `nics` NICs. `Err` only when the domain itself cannot be read (it is
/// gone); a figure that cannot be read is `None` in the readings.
pub fn read(
    ctx: &Context,
    domid: u32,
    disks: usize,
    nics: usize,
) -> Result<XenReadings, crate::LibxlError> {
    let usage = ctx.domain_usage(domid)?;
    Ok(read_rest(ctx, usage, disks, nics))
}

/// [`read`] of a domain whose `libxl_domain_info` was already read (the bulk poll lists
/// every domain in one call).
pub fn read_rest(ctx: &Context, usage: stats::DomUsage, disks: usize, nics: usize) -> XenReadings {
    let domid = usage.domid;
    let vcpus = ctx
        .list_vcpus(domid)
        .map_err(|e| tracing::debug!(domid, error = %e, "no vCPU times"))
        .ok();
    let memory_target_kib = ctx
        .memory_target_kib(domid)
        .map_err(|e| tracing::debug!(domid, error = %e, "no memory target"))
        .ok();
    XenReadings {
        usage,
        memory_target_kib,
        vcpus,
        vbds: (0..disks).map(|i| read_vbd(domid, i)).collect(),
        vifs: (0..nics).map(|i| read_vif(domid, i)).collect(),
    }
}

fn counter(dir: &Path, file: &str) -> Option<u64> {
    std::fs::read_to_string(dir.join(file))
        .ok()
        .and_then(|t| stats::parse_counter(&t))
}

/// Blkback's counters of disk `index` of `domid`; `None` when dom0 has no such vbd.
fn read_vbd(domid: u32, index: usize) -> Option<VbdCounters> {
    let dir = Path::new(&stats::vbd_sysfs_dir(domid, index)).join("statistics");
    if !dir.is_dir() {
        return None;
    }
    Some(VbdCounters {
        rd_req: counter(&dir, "rd_req"),
        wr_req: counter(&dir, "wr_req"),
        rd_sect: counter(&dir, "rd_sect"),
        wr_sect: counter(&dir, "wr_sect"),
    })
}

/// Netback's counters of NIC `index` of `domid`; `None` when dom0 has no such vif.
fn read_vif(domid: u32, index: usize) -> Option<(String, VifCounters)> {
    let name = stats::vif_name(domid, index);
    let dir = Path::new("/sys/class/net").join(&name).join("statistics");
    if !dir.is_dir() {
        return None;
    }
    let c = VifCounters {
        rx_bytes: counter(&dir, "rx_bytes"),
        rx_packets: counter(&dir, "rx_packets"),
        tx_bytes: counter(&dir, "tx_bytes"),
        tx_packets: counter(&dir, "tx_packets"),
    };
    Some((name, c))
}

/// Between two attempts to find the pty of the current domid (xenconsoled makes it a
/// moment after the domain is created; a restart makes a new domid).
const TTY_RETRY: Duration = Duration::from_millis(200);

/// How long the first stream of a run waits for the pump to connect and take in what
/// xenconsoled kept from before (xenconsoled makes the pty a moment after the create).
pub const PRIME_WAIT: Duration = Duration::from_secs(3);
/// The backlog is taken in until the pty has been quiet this long...
const PRIME_QUIET: Duration = Duration::from_millis(100);
/// ...or for at most this long (a guest printing without pause).
const PRIME_MAX: Duration = Duration::from_secs(1);

/// The current domid of a domain, `None` between two Xen domains (a restart, a create).
pub type DomidSource = Arc<dyn Fn() -> Option<u32> + Send + Sync>;

/// Returns once the batch of events the domain is publishing (if any) is whole: takes and
/// releases the lifecycle lock the batch is published under.
pub type Settle = Arc<dyn Fn() + Send + Sync>;

/// The manager's link to one run of a domain's PV console (from a start or a restore to
/// the stop), fanned out by its hub. It follows the domain across restarts: a reboot, a
/// policy restart or a reset makes a new Xen domain (new domid, new pty), and the pump
/// reconnects to it, so a stream survives a restart as it does on QEMU (one process, one
/// console, reset in place).
#[derive(Debug)]
pub struct ConsoleLink {
    /// The streams' side.
    pub hub: Arc<ConsoleHub>,
    pump: AbortHandle,
    /// Fired once the first pty's backlog is in the ring ([`ConsoleLink::primed`]).
    primed: Option<oneshot::Receiver<()>>,
}

impl ConsoleLink {
    /// Start pumping the console of the domain named `domain`. `events` is a subscription
    /// taken before the caller checked that the domain is active: its `stopped` (unless a
    /// policy restart's `started` follows in the same observation) ends the link. The pump reads the pty all the time, streams or not (xenconsoled would
    /// otherwise buffer the guest's output for a reader that comes later).
    pub fn start(
        ctx: Context,
        domain: &str,
        domid: DomidSource,
        settle: Settle,
        events: EventStream,
    ) -> Self {
        let (hub, input) = ConsoleHub::new(domain);
        let hub = Arc::new(hub);
        let (primed_tx, primed) = oneshot::channel();
        let src = Source {
            ctx,
            name: domain.to_owned(),
            domid,
            settle,
        };
        let pump = tokio::spawn(pump(src, events, hub.clone(), input, primed_tx));
        ConsoleLink {
            hub,
            pump: pump.abort_handle(),
            primed: Some(primed),
        }
    }

    /// Wait (at most [`PRIME_WAIT`]) until the pump has connected to the first pty and
    /// put what xenconsoled kept from before into the ring, where no stream reads it.
    pub async fn primed(&mut self) {
        if let Some(primed) = self.primed.take() {
            // Err: the pump ended (the domain stopped): nothing to wait for.
            let _ = tokio::time::timeout(PRIME_WAIT, primed).await;
        }
    }

    /// Whether the pump still runs (the domain has not stopped, and the runtime the pump
    /// was spawned on still runs it).
    pub fn is_open(&self) -> bool {
        !self.hub.is_closed() && !self.pump.is_finished()
    }
}

impl Drop for ConsoleLink {
    fn drop(&mut self) {
        // Close the pty (a detaching manager leaves the console to the next one) and end
        // the streams.
        self.pump.abort();
        self.hub.close();
    }
}

/// Whether `ev` ends the run the link serves (or the stream of events ended). A policy
/// restart (`on_poweroff`/`on_crash = restart`) is `stopped` and `started` of one
/// observation (one batch: the same timestamp, consecutive `seq`s), and the run goes on, as
/// QEMU's console does through its `system_reset`; a `started` of a later observation is a
/// new start after a real stop. `settle` waits until a batch being published is whole.
fn ends_run(ev: Option<DomainEvent>, events: &mut EventStream, settle: &Settle) -> bool {
    // A lagging subscription may have skipped the stop: end the streams rather than
    // serve the next run on them.
    let Some(ev) = ev else { return true };
    if events.lost() > 0 {
        return true;
    }
    if !matches!(ev.kind, EventKind::Stopped(_)) {
        return false;
    }
    settle();
    match events.next().now_or_never() {
        Some(Some(next)) => {
            !(matches!(next.kind, EventKind::Started(_))
                && next.seq == ev.seq + 1
                && next.timestamp_us == ev.timestamp_us)
        }
        _ => true,
    }
}

/// Where the pump finds the domain's console and learns about its run.
struct Source {
    ctx: Context,
    /// The domain's name, for logs.
    name: String,
    domid: DomidSource,
    settle: Settle,
}

async fn pump(
    src: Source,
    mut events: EventStream,
    hub: Arc<ConsoleHub>,
    mut input: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    primed: oneshot::Sender<()>,
) {
    let Source {
        ctx,
        name,
        domid,
        settle,
    } = src;
    let mut buf = vec![0u8; domkit_core::console::CONSOLE_CHUNK_MAX];
    let mut primed = Some(primed);
    'run: loop {
        // Find the pty of the current Xen domain.
        let (id, pty) = loop {
            if let Some(id) = domid() {
                let c = ctx.clone();
                let found = tokio::task::spawn_blocking(move || c.console_tty(id))
                    .await
                    .map_err(|e| io::Error::other(e.to_string()))
                    .and_then(|r| r.map_err(|e| io::Error::other(e.to_string())))
                    .and_then(|path| open_pty(&path));
                match found {
                    Ok(pty) => break (id, pty),
                    Err(e) => {
                        tracing::trace!(domain = %name, domid = id, error = %e, "no console pty yet")
                    }
                }
            }
            tokio::select! {
                ev = events.next() => if ends_run(ev, &mut events, &settle) { break 'run },
                _ = tokio::time::sleep(TTY_RETRY) => {}
            }
        };
        tracing::debug!(domain = %name, domid = id, "console pty connected");
        if let Some(primed) = primed.take() {
            // What xenconsoled kept for the pty before anyone read it was printed before
            // the first stream was opened: into the ring before that stream exists, so
            // that no stream reads it (§12.4: from the moment it is opened).
            let until = tokio::time::Instant::now() + PRIME_MAX;
            let mut backlog = 0;
            while tokio::time::Instant::now() < until {
                match tokio::time::timeout(PRIME_QUIET, read_some(&pty, &mut buf)).await {
                    Ok(Ok(n)) if n > 0 => {
                        backlog += n;
                        hub.publish(&buf[..n]);
                    }
                    _ => break,
                }
            }
            tracing::debug!(domain = %name, domid = id, backlog, "console backlog taken in");
            let _ = primed.send(());
        }
        // Pump until the pty hangs up (the Xen domain ended: xenconsoled closed it) or the
        // run ends.
        loop {
            tokio::select! {
                ev = events.next() => if ends_run(ev, &mut events, &settle) { break 'run },
                read = read_some(&pty, &mut buf) => match read {
                    Ok(0) => break,
                    Ok(n) => hub.publish(&buf[..n]),
                    Err(e) => {
                        tracing::debug!(domain = %name, domid = id, error = %e, "console pty read ended");
                        break;
                    }
                },
                typed = input.recv() => match typed {
                    Some(bytes) => {
                        if let Err(e) = write_all(&pty, &bytes).await {
                            tracing::debug!(domain = %name, domid = id, error = %e, "console pty write failed");
                            break;
                        }
                    }
                    // The hub is gone: nobody can type or read any more.
                    None => break 'run,
                },
            }
        }
        // The next Xen domain of this run (a restart) gets its own pty; the same domid
        // again only after a pause (xenconsoled may be re-making it).
        tokio::select! {
            ev = events.next() => if ends_run(ev, &mut events, &settle) { break 'run },
            _ = tokio::time::sleep(TTY_RETRY) => {}
        }
    }
    // The domain stopped (or the link was dropped): every stream ends.
    hub.close();
}

/// Open the PV console's pty at `path` (from xenstore, written by xenconsoled) for the
/// pump: non-blocking, raw, not our controlling terminal. Only a `/dev/pts/<n>` that is a
/// terminal is opened, whatever xenstore says.
fn open_pty(path: &Path) -> io::Result<AsyncFd<OwnedFd>> {
    let n = path
        .strip_prefix("/dev/pts")
        .ok()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if n.is_none() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("console tty {} is not a /dev/pts pty", path.display()),
        ));
    }
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: `c` is a valid NUL-terminated path; open has no other preconditions. The fd
    // it returns is owned by the OwnedFd below (closed when the pump drops it).
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOFOLLOW,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by open and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut term = std::mem::MaybeUninit::<libc::termios>::uninit();
    // SAFETY: a valid fd and a pointer to writable termios storage; filled on success.
    if unsafe { libc::tcgetattr(fd.as_raw_fd(), term.as_mut_ptr()) } != 0 {
        // Not a terminal (ENOTTY): not a console.
        return Err(io::Error::last_os_error());
    }
    // SAFETY: tcgetattr succeeded, so the termios is initialised.
    let mut term = unsafe { term.assume_init() };
    // Raw: bytes pass unchanged both ways (the guest's own tty echoes and edits lines), as
    // xenconsole (`xl console`) sets it.
    // SAFETY: `term` is a valid termios.
    unsafe { libc::cfmakeraw(&mut term) };
    // SAFETY: a valid fd and termios.
    if unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, &term) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the OwnedFd is moved into the AsyncFd, which owns it from now on: the fd
    // stays open, and `as_raw_fd` returns it, until the AsyncFd is dropped.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// Read what the pty has (at most `buf.len()` bytes); `Ok(0)` when it hung up.
async fn read_some(pty: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut ready = pty.readable().await?;
        let r = ready.try_io(|fd| {
            // SAFETY: a valid fd and a writable buffer of buf.len() bytes.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match r {
            Ok(Ok(n)) => return Ok(n),
            // The other side of a pty closed: EIO on Linux.
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}

/// Write all of `bytes` to the pty, waiting while it is full.
async fn write_all(pty: &AsyncFd<OwnedFd>, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        let mut ready = pty.writable().await?;
        let r = ready.try_io(|fd| {
            // SAFETY: a valid fd and a readable buffer of bytes.len() bytes.
            let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match r {
            Ok(Ok(n)) => bytes = &bytes[n..],
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(())
}
