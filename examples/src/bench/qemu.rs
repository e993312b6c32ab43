//! The QEMUs the bench talks to, and their command lines.
//!
//! Every peer gets a QEMU with the **same command line**: the one domkit's own
//! [`build_argv`] produces for the bench's domain config (TCG, `-S`, `-nodefaults`, one
//! read-only 1 MiB disk so no guest is needed, a logged serial console). Only the monitor
//! differs where a peer needs it to: domkit and the raw client listen and QEMU connects
//! (`server=off`, domkit's setup), python `qemu.qmp` connects to a QEMU that listens
//! (`-qmp unix:PATH,server=on`).

use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use domkit_core::{Accel, Boot, Disk, DiskFormat, DomainConfig};
use domkit_qemu::argv::{build_argv, AccelChoice, DomainPaths};

/// Memory of the QEMUs of the round-trip, event and start benches (MiB).
pub const MEMORY_MIB: u64 = 64;

/// Memory of the scale bench's QEMUs (MiB): small, so 200 of them fit comfortably.
pub const SCALE_MEMORY_MIB: u64 = 32;

/// Creates the 1 MiB read-only boot disk every bench domain uses (QEMU opens it; with
/// `-S` nothing ever reads it).
pub fn make_disk(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join("disk.img");
    let f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(1 << 20)?;
    Ok(path)
}

/// The bench's domain config: TCG, `memory_mib`, booting the empty disk (no guest needed).
pub fn bench_config(name: &str, memory_mib: u64, disk: &Path) -> DomainConfig {
    let mut config = DomainConfig::with_kernel(name, memory_mib, disk.to_path_buf());
    config.boot = Boot::Disk { index: 0 };
    config.disks = vec![Disk {
        id: None,
        path: disk.to_path_buf(),
        format: DiskFormat::Raw,
        readonly: true,
        cdrom: false,
    }];
    config.qemu.accel = Accel::Tcg;
    config
}

/// domkit's command line for `config` with its files in `dir` (created here).
pub fn domkit_argv(
    config: &DomainConfig,
    dir: &Path,
) -> anyhow::Result<(Vec<String>, DomainPaths)> {
    std::fs::create_dir_all(dir)?;
    let paths = DomainPaths::new(dir);
    let argv = build_argv(config, AccelChoice::Tcg, &paths, false)?;
    Ok((argv, paths))
}

/// `argv` with domkit's monitor (QEMU connects) replaced by one listening monitor per
/// socket in `sockets` (the peer connects). QEMU accepts one client per monitor at a time,
/// so each client that shares a QEMU gets its own.
pub fn with_listening_monitors(argv: &[String], sockets: &[PathBuf]) -> Vec<String> {
    let mut out = Vec::with_capacity(argv.len() + 2 * sockets.len());
    let mut i = 0;
    while i < argv.len() {
        let next = argv.get(i + 1).map(String::as_str).unwrap_or("");
        let is_monitor = (argv[i] == "-chardev" && next.starts_with("socket,id=mon0,"))
            || (argv[i] == "-mon" && next.starts_with("chardev=mon0,"));
        if is_monitor {
            i += 2;
            continue;
        }
        out.push(argv[i].clone());
        i += 1;
    }
    for s in sockets {
        out.push("-qmp".into());
        out.push(format!("unix:{},server=on,wait=off", s.display()));
    }
    out
}

/// A QEMU process spawned by the bench. Killed (SIGKILL) and reaped on drop, and killed by
/// the kernel if the bench dies first (parent-death signal), so none is ever leaked.
#[derive(Debug)]
pub struct BareQemu {
    child: Option<Child>,
}

impl BareQemu {
    /// Spawns `argv` with stdout/stderr appended to `log`.
    pub fn spawn(argv: &[String], log: &Path) -> anyhow::Result<BareQemu> {
        let child = spawn_qemu(argv, log)?;
        Ok(BareQemu { child: Some(child) })
    }

    /// Spawns `argv` with `monitor` inherited as its fd 3 (domkit's monitor).
    pub fn spawn_with_monitor(
        argv: &[String],
        log: &Path,
        monitor: &std::os::unix::net::UnixListener,
    ) -> anyhow::Result<BareQemu> {
        let child = spawn_qemu_with_monitor(argv, log, monitor)?;
        Ok(BareQemu { child: Some(child) })
    }

    /// Spawns `argv` and waits (up to 30 s) until every socket in `sockets` exists, i.e.
    /// QEMU listens on them.
    pub fn spawn_listening(
        argv: &[String],
        log: &Path,
        sockets: &[PathBuf],
    ) -> anyhow::Result<BareQemu> {
        for s in sockets {
            let _ = std::fs::remove_file(s);
        }
        let mut q = Self::spawn(argv, log)?;
        q.wait_for_sockets(sockets, Duration::from_secs(30))?;
        Ok(q)
    }

    /// Waits until every socket exists (setup only: never inside a timed section).
    pub fn wait_for_sockets(
        &mut self,
        sockets: &[PathBuf],
        within: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        for s in sockets {
            while !s.exists() {
                if let Some(child) = self.child.as_mut() {
                    if let Some(status) = child.try_wait()? {
                        anyhow::bail!("QEMU exited ({status}) before listening on {}", s.display());
                    }
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "QEMU did not listen on {}",
                    s.display()
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        Ok(())
    }
}

impl Drop for BareQemu {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Spawns a QEMU the way domkit does (stdin null, output to a log, parent-death SIGKILL),
/// so spawn costs are comparable.
pub fn spawn_qemu(argv: &[String], log: &Path) -> anyhow::Result<Child> {
    spawn_qemu_inheriting(argv, log, None)
}

/// As [`spawn_qemu`], handing QEMU `monitor` as fd 3 the way domkit does for its monitor
/// (`-chardev socket,id=mon0,fd=3,server=on`): domkit's exact command line then works.
pub fn spawn_qemu_with_monitor(
    argv: &[String],
    log: &Path,
    monitor: &std::os::unix::net::UnixListener,
) -> anyhow::Result<Child> {
    use std::os::fd::AsRawFd;
    spawn_qemu_inheriting(argv, log, Some(monitor.as_raw_fd()))
}

fn spawn_qemu_inheriting(
    argv: &[String],
    log: &Path,
    monitor_fd: Option<i32>,
) -> anyhow::Result<Child> {
    let (binary, args) = argv.split_first().context("empty QEMU command line")?;
    let out = File::options().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(binary);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // calls are allowed: prctl(2) is a plain system call and the error is a raw OS code.
    // dup2/fcntl are plain system calls too.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = monitor_fd {
                let target = domkit_qemu::argv::MONITOR_FD;
                let rc = if fd == target {
                    libc::fcntl(fd, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, target)
                };
                if rc < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(|e| io::Error::from_raw_os_error(e as i32))
        });
    }
    cmd.spawn()
        .with_context(|| format!("spawning {binary} (install qemu-system-x86)"))
}

/// Create `n` paused bench domains named `<prefix>0..` on `driver`, ten at a time (100 QEMUs
/// initialising at once on 2 cores miss their connect timeout); `what` names them in errors.
pub async fn create_paused_in_batches(
    driver: &domkit_qemu::QemuDriver,
    n: usize,
    prefix: &str,
    memory_mib: u64,
    disk: &Path,
    what: &str,
) -> anyhow::Result<()> {
    use domkit_core::{Driver, StartOptions};
    for batch in (0..n).collect::<Vec<_>>().chunks(10) {
        let starts = batch.iter().map(|i| {
            let config = bench_config(&format!("{prefix}{i}"), memory_mib, disk);
            driver.create(config, StartOptions { paused: true })
        });
        for created in futures::future::join_all(starts).await {
            created.with_context(|| format!("starting {what}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_monitors_replace_domkits_monitor() {
        let argv: Vec<String> = [
            "qemu",
            "-S",
            "-chardev",
            "socket,id=mon0,path=/x/qmp.sock,server=off",
            "-mon",
            "chardev=mon0,mode=control",
            "-device",
            "pvpanic",
        ]
        .map(String::from)
        .to_vec();
        let out = with_listening_monitors(&argv, &[PathBuf::from("/y/a.sock")]);
        assert_eq!(
            out,
            [
                "qemu",
                "-S",
                "-device",
                "pvpanic",
                "-qmp",
                "unix:/y/a.sock,server=on,wait=off"
            ]
            .map(String::from)
            .to_vec()
        );
    }
}
