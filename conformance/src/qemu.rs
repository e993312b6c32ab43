//! The QEMU test backend: real `qemu-system-x86_64` (TCG) booting the repo's test guest
//! (`scripts/build-test-guest.sh`), with guest-side actions through the real guest agent.

use crate::backend::{AwayAction, DurableRoots, GuestAction, GuestOptions, TestBackend};
use async_trait::async_trait;
use domkit_core::{Accel, Boot, Channel, ChannelKind, DomainConfig, ShutoffReason};
use domkit_qemu::agent::GuestExecRequest;
use domkit_qemu::{QemuDomain, QemuDriver, QemuDriverOptions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the test guest is: `$DOMKIT_GUEST_DIR`, else `~/.cache/domkit/guest`.
pub fn guest_dir() -> PathBuf {
    std::env::var_os("DOMKIT_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            PathBuf::from(home).join(".cache/domkit/guest")
        })
}

/// The test guest's config (`name`, 128 MiB, 1 vCPU, serial console, guest agent unless
/// `options.no_agent`, TCG).
pub fn test_guest_config(dir: &Path, name: &str, options: GuestOptions) -> DomainConfig {
    let mut config =
        options.guest_config(name, dir.join("vmlinuz"), dir.join("initrd.img"), "ttyS0");
    if !options.no_agent {
        config.channels.push(Channel {
            kind: ChannelKind::GuestAgent,
            name: None,
        });
    }
    config.qemu.accel = Accel::Tcg;
    config.qemu.pvpanic = true;
    config
}

/// The QEMU backend under test.
pub struct QemuTestBackend {
    driver: QemuDriver,
    guest: PathBuf,
    scratch: tempfile::TempDir,
    _runtime: tempfile::TempDir,
}

impl QemuTestBackend {
    /// A driver with a private runtime root, and the test guest (which must have been built).
    pub fn new() -> Result<Self, String> {
        let guest = guest_dir();
        for f in ["vmlinuz", "initrd.img"] {
            if !guest.join(f).is_file() {
                return Err(format!(
                    "test guest missing: {} not found; run scripts/build-test-guest.sh (or set DOMKIT_GUEST_DIR)",
                    guest.join(f).display()
                ));
            }
        }
        let runtime = tempfile::Builder::new()
            .prefix("domkit-conf-run")
            .tempdir()
            .map_err(|e| format!("runtime dir: {e}"))?;
        // The driver refuses a runtime root that others can enter.
        std::fs::set_permissions(runtime.path(), std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("runtime dir: {e}"))?;
        let scratch = tempfile::Builder::new()
            .prefix("domkit-conf-scratch")
            .tempdir()
            .map_err(|e| format!("scratch dir: {e}"))?;
        let driver = QemuDriver::new(QemuDriverOptions::with_runtime_root(runtime.path()))
            .map_err(|e| e.to_string())?;
        Ok(QemuTestBackend {
            driver,
            guest,
            scratch,
            _runtime: runtime,
        })
    }

    /// Run `/bin/sh -c script` in the guest; with `wait`, return its stdout.
    async fn sh(&self, domain: &QemuDomain, script: &str, wait: bool) -> Result<String, String> {
        let agent = domain.guest_agent().await.map_err(|e| e.to_string())?;
        let pid = agent
            .exec(&GuestExecRequest {
                path: "/bin/sh".into(),
                args: vec!["-c".into(), script.into()],
                env: vec![],
                input: None,
                capture_output: wait,
            })
            .await
            .map_err(|e| format!("guest-exec: {e}"))?;
        if !wait {
            return Ok(String::new());
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let st = agent
                .exec_status(pid)
                .await
                .map_err(|e| format!("guest-exec-status: {e}"))?;
            if st.exited {
                let out = st.out_data.unwrap_or_default();
                return Ok(String::from_utf8_lossy(&out).trim().to_string());
            }
            if Instant::now() > deadline {
                return Err(format!("{script:?} did not finish in the guest"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[async_trait]
impl TestBackend for QemuTestBackend {
    type Driver = QemuDriver;

    fn name(&self) -> &'static str {
        "qemu"
    }

    fn driver(&self) -> &QemuDriver {
        &self.driver
    }

    fn guest_config(&self, name: &str, options: GuestOptions) -> DomainConfig {
        test_guest_config(&self.guest, name, options)
    }

    async fn wait_guest_ready(&self, domain: &QemuDomain, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no attempt");
        while Instant::now() < deadline {
            match domain.guest_agent().await {
                Ok(agent) => match agent.ping().await {
                    Ok(()) => return Ok(()),
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(format!(
            "guest agent not answering after {timeout:?}: {last}"
        ))
    }

    async fn guest_do(&self, domain: &QemuDomain, action: GuestAction) -> Result<(), String> {
        // Detached with a short delay, so the agent's reply to guest-exec gets out first.
        let script = match action {
            GuestAction::Poweroff => "sleep 0.3; poweroff -f",
            GuestAction::Reboot => "sleep 0.3; reboot -f",
            GuestAction::Panic => "sleep 0.3; echo c > /proc/sysrq-trigger",
        };
        self.sh(domain, script, false).await.map(|_| ())
    }

    async fn guest_boot_id(&self, domain: &QemuDomain) -> Result<String, String> {
        let id = self
            .sh(domain, "cat /proc/sys/kernel/random/boot_id", true)
            .await?;
        if id.len() < 32 {
            return Err(format!("unexpected boot id {id:?}"));
        }
        Ok(id)
    }

    async fn kill_out_of_band(&self, domain: &QemuDomain) -> Result<ShutoffReason, String> {
        let pid = domain.pid().ok_or("the domain has no qemu process")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .map_err(|e| format!("kill {pid}: {e}"))?;
        // §10: the emulator process died under the guest: the virtual machine crashed.
        Ok(ShutoffReason::Crashed)
    }

    fn scratch_dir(&self) -> PathBuf {
        self.scratch.path().to_path_buf()
    }

    async fn backend_domain_exists(&self, name: &str) -> Result<bool, String> {
        let name = name.to_string();
        tokio::task::spawn_blocking(move || !qemu_processes_named(&name).is_empty())
            .await
            .map_err(|e| format!("scanning /proc: {e}"))
    }

    async fn backend_vcpus_running(&self, domain: &QemuDomain) -> Result<bool, String> {
        let qmp = domain.qmp().ok_or("the domain has no qemu process")?;
        let status = qmp
            .query_status()
            .await
            .map_err(|e| format!("query-status: {e}"))?;
        Ok(status.running)
    }

    fn save_stream_start(&self, path: &Path) -> Result<u64, String> {
        let bytes = read_prefix(path, domkit_qemu::savefile::MAX_HEADER_LEN + 64)?;
        let (_, len) = domkit_qemu::savefile::parse_header(&bytes)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        // QEMU's stream: the magic `QEVM` and a 4-byte version, then sections.
        if bytes.get(len..len + 4) != Some(b"QEVM".as_slice()) {
            return Err(format!(
                "{}: no QEVM stream after the domkit header",
                path.display()
            ));
        }
        Ok(len as u64 + 8)
    }

    fn launch_failure_config(
        &self,
        name: &str,
    ) -> Result<(DomainConfig, &'static [&'static str]), String> {
        let garbage = self.scratch.path().join("garbage-kernel");
        std::fs::write(&garbage, b"this is not a kernel\n".repeat(4096))
            .map_err(|e| format!("writing {}: {e}", garbage.display()))?;
        let mut config = test_guest_config(&self.guest, name, GuestOptions::default());
        if let Boot::Kernel { kernel, .. } = &mut config.boot {
            *kernel = garbage;
        }
        // What QEMU 7.2's x86 loader prints (checked by hand): with an initrd (the test
        // guest has one) a file without the `HdrS` magic is taken for an ancient kernel.
        Ok((
            config,
            &[
                "linux kernel too old to load a ram disk",
                "invalid kernel header",
            ],
        ))
    }

    fn pm_suspend_uses_agent(&self) -> bool {
        true
    }

    fn connect_uri(&self) -> &'static str {
        "qemu:///session"
    }

    async fn open_persistent(&self, roots: &DurableRoots) -> domkit_core::Result<QemuDriver> {
        QemuDriver::open(QemuDriverOptions::persistent(&roots.state, &roots.runtime)).await
    }

    fn detach(&self, driver: QemuDriver) {
        driver.detach();
    }

    async fn wait_ready_away(
        &self,
        roots: &DurableRoots,
        name: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        // The agent chardev listens in the domain's runtime directory; with no manager
        // connected, this process may talk to it.
        let socket = roots.runtime.join(name).join("agent.sock");
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no attempt");
        while Instant::now() < deadline {
            match domkit_qemu::agent::GuestAgent::connect(&socket).await {
                Ok(agent) => match agent.ping().await {
                    Ok(()) => return Ok(()),
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(format!(
            "{}: no agent answer after {timeout:?}: {last}",
            socket.display()
        ))
    }

    async fn act_while_away(
        &self,
        roots: &DurableRoots,
        name: &str,
        action: AwayAction,
    ) -> Result<Option<ShutoffReason>, String> {
        let dir = roots.runtime.join(name);
        let want = match action {
            AwayAction::Kill => {
                let pids = qemu_processes_named(name);
                if pids.is_empty() {
                    return Err(format!("no qemu process of {name}"));
                }
                for pid in &pids {
                    nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(*pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    )
                    .map_err(|e| format!("kill {pid}: {e}"))?;
                }
                let deadline = Instant::now() + Duration::from_secs(10);
                while !qemu_processes_named(name).is_empty() {
                    if Instant::now() > deadline {
                        return Err(format!("the qemu of {name} survived SIGKILL"));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                // §11.3: a QEMU gone while away is `crashed` (it never exits by itself
                // under -no-shutdown), as an out-of-band kill seen live (§10).
                return Ok(Some(ShutoffReason::Crashed));
            }
            AwayAction::Guest(GuestAction::Poweroff) => ("poweroff -f", "shutdown"),
            AwayAction::Guest(GuestAction::Panic) => {
                ("echo c > /proc/sysrq-trigger", "guest-panicked")
            }
            AwayAction::Guest(GuestAction::Reboot) => {
                return Err("a reboot while away leaves no run state to wait for".into())
            }
        };
        let agent = domkit_qemu::agent::GuestAgent::connect(dir.join("agent.sock"))
            .await
            .map_err(|e| format!("agent of {name}: {e}"))?;
        agent
            .exec(&GuestExecRequest {
                path: "/bin/sh".into(),
                args: vec!["-c".into(), format!("sleep 0.3; {}", want.0)],
                env: vec![],
                input: None,
                capture_output: false,
            })
            .await
            .map_err(|e| format!("guest-exec in {name}: {e}"))?;
        drop(agent);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Ok(qmp) = domkit_qemu::qmp::QmpClient::connect(dir.join("qmp.sock")).await {
                if let Ok(status) = qmp.query_status().await {
                    last = serde_json::to_value(&status.status)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default();
                    if last == want.1 {
                        return Ok(None);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(format!("{name}: run state {last:?}, never {:?}", want.1))
    }
}

/// The first `limit` bytes of `path` (fewer if it is shorter).
fn read_prefix(path: &Path, limit: usize) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(limit as u64)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(bytes)
}

/// The pids of the QEMU processes whose `-name` is `guest=<name>,...` (the driver's argv),
/// from `/proc` (a reaped or zombie process has no cmdline and does not count).
fn qemu_processes_named(name: &str) -> Vec<u32> {
    let want = format!("guest={name},");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            args.first()
                .is_some_and(|a| String::from_utf8_lossy(a).contains("qemu-system"))
                && args
                    .windows(2)
                    .any(|w| w[0] == b"-name" && w[1].starts_with(want.as_bytes()))
        })
        .collect()
}
