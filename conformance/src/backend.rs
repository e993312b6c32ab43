//! What a backend must provide to be checked: its driver, a test guest, and the few
//! test-only actions that cannot go through the uniform API (making the guest act on its
//! own, killing the backend domain out of band).

use async_trait::async_trait;
use domkit_core::{Boot, DomainConfig, Driver, LifecyclePolicies, ShutoffReason};
use std::path::PathBuf;
use std::time::Duration;

/// Something the guest does by itself (not through the host API).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestAction {
    /// The guest powers itself off.
    Poweroff,
    /// The guest reboots itself.
    Reboot,
    /// The guest kernel panics.
    Panic,
}

/// How the scenario wants the test guest configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestOptions {
    /// Lifecycle policies.
    pub policies: LifecyclePolicies,
    /// The guest ignores graceful shutdown requests (kernel cmdline
    /// `domkit.ignore_shutdown=1`).
    pub ignore_shutdown: bool,
}

impl GuestOptions {
    /// The test guest's config, common to every backend: `name`, 1 vCPU, 128 MiB, direct
    /// kernel boot with `console=<console> quiet` (plus `domkit.ignore_shutdown=1` when
    /// asked), and these policies. Backends add their own devices and settings.
    pub fn guest_config(
        &self,
        name: &str,
        kernel: PathBuf,
        initrd: PathBuf,
        console: &str,
    ) -> DomainConfig {
        let mut cmdline = format!("console={console} quiet");
        if self.ignore_shutdown {
            cmdline.push_str(" domkit.ignore_shutdown=1");
        }
        let mut config = DomainConfig::with_kernel(name, 128, kernel.clone());
        config.boot = Boot::Kernel {
            kernel,
            initrd: Some(initrd),
            cmdline,
        };
        config.on_poweroff = self.policies.on_poweroff;
        config.on_reboot = self.policies.on_reboot;
        config.on_crash = self.policies.on_crash;
        config
    }
}

/// A backend under test.
#[async_trait]
pub trait TestBackend: Send + Sync + 'static {
    /// The driver.
    type Driver: Driver;

    /// The backend's name for reports (`qemu`, `libxl`).
    fn name(&self) -> &'static str;

    /// The driver under test.
    fn driver(&self) -> &Self::Driver;

    /// A config of the backend's test guest named `name`.
    fn guest_config(&self, name: &str, options: GuestOptions) -> DomainConfig;

    /// Wait until the guest has booted far enough to act on requests (its power button
    /// handler / agent / control watcher runs).
    async fn wait_guest_ready(
        &self,
        domain: &<Self::Driver as Driver>::Domain,
        timeout: Duration,
    ) -> Result<(), String>;

    /// Make the guest do `action` by itself.
    async fn guest_do(
        &self,
        domain: &<Self::Driver as Driver>::Domain,
        action: GuestAction,
    ) -> Result<(), String>;

    /// The guest kernel's boot id (`/proc/sys/kernel/random/boot_id`): unchanged across a
    /// save/restore (the guest state is intact), changed by a reboot.
    async fn guest_boot_id(
        &self,
        domain: &<Self::Driver as Driver>::Domain,
    ) -> Result<String, String>;

    /// End the backend domain behind the driver's back (QEMU: SIGKILL the process; Xen:
    /// `xl destroy`), and return the shutoff reason `docs/semantics.md` §10 documents for it.
    async fn kill_out_of_band(
        &self,
        domain: &<Self::Driver as Driver>::Domain,
    ) -> Result<ShutoffReason, String>;

    /// A directory scenarios may write save files to.
    fn scratch_dir(&self) -> std::path::PathBuf;

    /// A path where creating a file fails (for the unwritable-save scenario).
    fn unwritable_path(&self) -> std::path::PathBuf {
        std::path::PathBuf::from("/proc/domkit-unwritable/save.img")
    }
}
