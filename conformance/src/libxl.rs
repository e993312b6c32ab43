//! The libxl test backend: the real libxenlight toolstack of a Xen dom0 (in CI: the nested
//! Xen 4.17 host of `xen-host/`), creating PV domUs from the harness's domU kernel and
//! initramfs. Guest-side actions go through xenstore: dom0 writes
//! `/local/domain/<domid>/data/domkit-action` (`poweroff`, `reboot`, `crash`, `report`), the
//! guest acts on it (`xen-host/domu/init`); `report` makes it write its kernel boot id to
//! `data/domkit-bootid`. Every command carries a token ([`command`]): the guest acts on each
//! new value once and never removes the key (removing it raced with the next command).

use crate::backend::{AwayAction, DurableRoots, GuestAction, GuestOptions, TestBackend};
use async_trait::async_trait;
use domkit_core::{
    Boot, Channel, ChannelKind, DomainConfig, NicBackend, ShutoffReason, XenGuestType,
};
use domkit_libxl::translate::{REASON_CRASH, REASON_POWEROFF, REASON_REBOOT};
use domkit_libxl::{LibxlDomain, LibxlDriver, LibxlOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The xenstore value of the guest command `word`: the word and a token no other command of
/// this or any other test process has, so the guest tells two identical commands apart.
fn command(word: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{word} {}-{n}", std::process::id())
}

fn env_path(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default))
}

/// The libxl backend under test.
pub struct LibxlTestBackend {
    driver: LibxlDriver,
    kernel: PathBuf,
    initrd: PathBuf,
    scratch: tempfile::TempDir,
}

impl LibxlTestBackend {
    /// Connect to the local libxl toolstack; the domU kernel and initramfs come from
    /// `$DOMKIT_XEN_DOMU_KERNEL` / `$DOMKIT_XEN_DOMU_INITRD` (default `/domu/...`).
    pub fn new() -> Result<Self, String> {
        let kernel = env_path("DOMKIT_XEN_DOMU_KERNEL", "/domu/vmlinux");
        let initrd = env_path("DOMKIT_XEN_DOMU_INITRD", "/domu/initrd.img");
        for f in [&kernel, &initrd] {
            if !f.is_file() {
                return Err(format!(
                    "domU image {} not found: run inside the Xen test host (xen-host/run-libxl-tests.sh)",
                    f.display()
                ));
            }
        }
        let driver = LibxlDriver::new().map_err(|e| e.to_string())?;
        let scratch = tempfile::Builder::new()
            .prefix("domkit-conf-scratch")
            .tempdir()
            .map_err(|e| format!("scratch dir: {e}"))?;
        Ok(LibxlTestBackend {
            driver,
            kernel,
            initrd,
            scratch,
        })
    }

    fn domid(domain: &LibxlDomain) -> Result<u32, String> {
        domain
            .domid()
            .ok_or_else(|| "the domain has no domid (not running)".to_string())
    }

    async fn tool(&self, argv: &[&str]) -> Result<String, String> {
        let out = tokio::process::Command::new(argv[0])
            .args(&argv[1..])
            .output()
            .await
            .map_err(|e| format!("{}: {e}", argv[0]))?;
        if !out.status.success() {
            return Err(format!(
                "{argv:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    async fn action(&self, domain: &LibxlDomain, action: &str) -> Result<(), String> {
        let key = format!("/local/domain/{}/data/domkit-action", Self::domid(domain)?);
        self.tool(&["xenstore-write", &key, &command(action)])
            .await
            .map(|_| ())
    }

    /// Ask the guest for its boot id and wait up to `timeout` for the answer.
    async fn report(&self, domain: &LibxlDomain, timeout: Duration) -> Result<String, String> {
        self.report_by(|| Self::domid(domain), timeout).await
    }

    /// The domid of the Xen domain named `name`, asked of the toolstack (no driver).
    async fn domid_of(&self, name: &str) -> Result<u32, String> {
        let out = self.tool(&["xl", "domid", name]).await?;
        out.trim()
            .parse()
            .map_err(|e| format!("`xl domid {name}` said {out:?}: {e}"))
    }

    /// [`Self::report`] for the domid `domid()` gives each round.
    async fn report_by(
        &self,
        domid: impl Fn() -> Result<u32, String>,
        timeout: Duration,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        let mut asked: Option<u32> = None;
        while Instant::now() < deadline {
            // The domid changes across restarts and restores: re-read it each round.
            if let Ok(domid) = domid() {
                let key = format!("/local/domain/{domid}/data/domkit-bootid");
                // An old answer is removed once per domid, not every round: a guest slower
                // than one round (several booting at once under TCG) still gets its answer
                // read.
                if asked != Some(domid) {
                    let _ = self.tool(&["xenstore-rm", &key]).await;
                    asked = Some(domid);
                }
                let action_key = format!("/local/domain/{domid}/data/domkit-action");
                match self
                    .tool(&["xenstore-write", &action_key, &command("report")])
                    .await
                    .map(|_| ())
                {
                    Ok(()) => {
                        let until = Instant::now() + Duration::from_secs(3);
                        while Instant::now() < until {
                            if let Ok(id) = self.tool(&["xenstore-read", &key]).await {
                                if id.len() >= 32 {
                                    return Ok(id);
                                }
                            }
                            tokio::time::sleep(Duration::from_millis(150)).await;
                        }
                        last = "no answer to `report`".into();
                    }
                    Err(e) => last = e,
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Err(format!(
            "the domU did not report within {timeout:?}: {last}"
        ))
    }
}

#[async_trait]
impl TestBackend for LibxlTestBackend {
    type Driver = LibxlDriver;

    fn name(&self) -> &'static str {
        "libxl"
    }

    fn driver(&self) -> &LibxlDriver {
        &self.driver
    }

    fn guest_config(&self, name: &str, options: GuestOptions) -> DomainConfig {
        let mut config =
            options.guest_config(name, self.kernel.clone(), self.initrd.clone(), "hvc0");
        config.xen.guest_type = XenGuestType::Pv;
        // The guest agent on its PV channel (the domU runs qemu-ga on it, xen-host/domu/init),
        // as the QEMU test guest has it on virtio-serial.
        if !options.no_agent {
            config.channels.push(Channel {
                kind: ChannelKind::GuestAgent,
                name: None,
            });
        }
        config
    }

    async fn wait_guest_ready(
        &self,
        domain: &LibxlDomain,
        timeout: Duration,
    ) -> Result<(), String> {
        self.report(domain, timeout).await.map(|_| ())
    }

    async fn guest_do(&self, domain: &LibxlDomain, action: GuestAction) -> Result<(), String> {
        let word = match action {
            GuestAction::Poweroff => "poweroff",
            GuestAction::Reboot => "reboot",
            GuestAction::Panic => "crash",
        };
        self.action(domain, word).await
    }

    async fn guest_boot_id(&self, domain: &LibxlDomain) -> Result<String, String> {
        self.report(domain, Duration::from_secs(60)).await
    }

    async fn kill_out_of_band(&self, domain: &LibxlDomain) -> Result<ShutoffReason, String> {
        let domid = Self::domid(domain)?.to_string();
        self.tool(&["xl", "destroy", &domid]).await?;
        // §10: a Xen domain dies without a shutdown reason only when destroyed.
        Ok(ShutoffReason::Destroyed)
    }

    /// The test dom0's bridge (`xen-host/build.sh`: 10.99.0.1/24, udhcpd).
    fn test_nic_backend(&self) -> NicBackend {
        NicBackend::Bridge("xenbr0".into())
    }

    fn has_cdrom(&self) -> bool {
        false
    }

    fn unplug_refusal_unsupported(&self) -> Option<&'static str> {
        Some(
            "a Xen PV guest cannot hold an unplug off: libxl_device_*_remove asks the frontend, \
             waits 10 s for the backend to close, then forces the removal (§14.7), so a refusal \
             only delays the removal and the test domU has no way to keep a device",
        )
    }

    fn scratch_dir(&self) -> PathBuf {
        self.scratch.path().to_path_buf()
    }

    async fn backend_domain_exists(&self, name: &str) -> Result<bool, String> {
        let ctx = self.driver.context().clone();
        let domains = tokio::task::spawn_blocking(move || ctx.list_domains())
            .await
            .map_err(|e| format!("libxl_list_domain: {e}"))?
            .map_err(|e| e.to_string())?;
        Ok(domains.iter().any(|d| d.name.as_deref() == Some(name)))
    }

    async fn backend_vcpus_running(&self, domain: &LibxlDomain) -> Result<bool, String> {
        let domid = Self::domid(domain)?;
        let ctx = self.driver.context().clone();
        let info = tokio::task::spawn_blocking(move || ctx.domain_info(domid))
            .await
            .map_err(|e| format!("libxl_domain_info: {e}"))?
            .map_err(|e| e.to_string())?;
        Ok(!info.paused && !info.shutdown && !info.dying)
    }

    fn save_stream_start(&self, path: &Path) -> Result<u64, String> {
        use std::io::Seek;
        let (mut file, _) = domkit_libxl::savefile::open(path).map_err(|e| e.to_string())?;
        let at = file
            .stream_position()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        // libxl's stream header: ident `LibxlFmt`, version, options (16 bytes).
        Ok(at + 16)
    }

    fn launch_failure_config(
        &self,
        name: &str,
    ) -> Result<(DomainConfig, &'static [&'static str]), String> {
        let garbage = self.scratch.path().join("garbage-kernel");
        std::fs::write(&garbage, b"this is not a kernel\n".repeat(4096))
            .map_err(|e| format!("writing {}: {e}", garbage.display()))?;
        let mut config = self.guest_config(name, GuestOptions::default());
        if let Boot::Kernel { kernel, .. } = &mut config.boot {
            *kernel = garbage;
        }
        // libxenguest 4.17 (`xc_dom_find_loader` via xc_dom_panic, then libxl's
        // libxl__build_dom), as logged to libxl's logger.
        Ok((config, &["no loader found", "xc_dom_parse_image failed"]))
    }

    fn pm_suspend_uses_agent(&self) -> bool {
        false
    }

    fn save_runs_a_paused_guest(&self) -> bool {
        true
    }

    fn agent_events_follow_the_port(&self) -> bool {
        false
    }

    fn connect_uri(&self) -> &'static str {
        "libxl:///"
    }

    async fn open_persistent(&self, roots: &DurableRoots) -> domkit_core::Result<LibxlDriver> {
        LibxlDriver::open(LibxlOptions::persistent(&roots.state, &roots.runtime)).await
    }

    fn detach(&self, driver: LibxlDriver) {
        driver.detach();
        drop(driver);
    }

    async fn wait_ready_away(
        &self,
        _roots: &DurableRoots,
        name: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        // By name through the toolstack; the guest answers over xenstore whoever asks.
        let domid = self.domid_of(name).await?;
        self.report_by(|| Ok(domid), timeout).await.map(|_| ())
    }

    async fn act_while_away(
        &self,
        _roots: &DurableRoots,
        name: &str,
        action: AwayAction,
    ) -> Result<Option<ShutoffReason>, String> {
        let domid = self.domid_of(name).await?;
        let (word, reason) = match action {
            AwayAction::Kill => {
                self.tool(&["xl", "destroy", &domid.to_string()]).await?;
                let deadline = Instant::now() + Duration::from_secs(30);
                while self.backend_domain_exists(name).await? {
                    if Instant::now() > deadline {
                        return Err(format!("{name} (domid {domid}) survived `xl destroy`"));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                // §10/§11.3: a Xen domain that dies without a shutdown reason was destroyed.
                return Ok(Some(ShutoffReason::Destroyed));
            }
            AwayAction::Guest(GuestAction::Poweroff) => ("poweroff", REASON_POWEROFF),
            AwayAction::Guest(GuestAction::Reboot) => ("reboot", REASON_REBOOT),
            AwayAction::Guest(GuestAction::Panic) => ("crash", REASON_CRASH),
        };
        let key = format!("/local/domain/{domid}/data/domkit-action");
        self.tool(&["xenstore-write", &key, &command(word)]).await?;
        // With no toolstack watching, the Xen domain stays shut down with its reason.
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            let ctx = self.driver.context().clone();
            match tokio::task::spawn_blocking(move || ctx.domain_info(domid)).await {
                Ok(Ok(info)) if info.shutdown && info.shutdown_reason == i32::from(reason) => {
                    return Ok(None)
                }
                Ok(Ok(info)) => last = format!("{info:?}"),
                Ok(Err(e)) => last = e.to_string(),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(format!(
            "{name} (domid {domid}) never shut down with reason {reason} after `{word}`: {last}"
        ))
    }
}
