//! What a backend must provide to be checked: its driver, a test guest, and the few
//! test-only actions that cannot go through the uniform API (making the guest act on its
//! own, killing the backend domain out of band).

use async_trait::async_trait;
use domkit_core::{Boot, DomainConfig, Driver, LifecyclePolicies, NicBackend, ShutoffReason};
use std::path::{Path, PathBuf};
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

/// What happens to a domain while no manager runs (the durable scenarios, §11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AwayAction {
    /// The guest does this by itself.
    Guest(GuestAction),
    /// The backend domain is ended behind every manager's back (QEMU: SIGKILL of the
    /// process; Xen: `xl destroy`).
    Kill,
}

/// The private state and runtime roots of one durable scenario (§11.1): fresh, 0700, short
/// paths (Unix socket paths are limited), removed when dropped.
#[derive(Debug)]
pub struct DurableRoots {
    /// The state root (definitions, statuses, the root lock).
    pub state: PathBuf,
    /// The runtime root (per-domain directories: sockets, pid, logs).
    pub runtime: PathBuf,
    _base: tempfile::TempDir,
}

impl DurableRoots {
    /// New roots under `/tmp` (the roots themselves are created by the driver).
    pub fn new() -> Result<DurableRoots, String> {
        let base = tempfile::Builder::new()
            .prefix("dk")
            .tempdir_in("/tmp")
            .map_err(|e| format!("durable roots: {e}"))?;
        Ok(DurableRoots {
            state: base.path().join("s"),
            runtime: base.path().join("r"),
            _base: base,
        })
    }
}

/// How the scenario wants the test guest configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestOptions {
    /// Lifecycle policies.
    pub policies: LifecyclePolicies,
    /// The guest ignores graceful shutdown requests (kernel cmdline
    /// `domkit.ignore_shutdown=1`).
    pub ignore_shutdown: bool,
    /// Leave out the guest agent channel (on backends whose test guest has one).
    pub no_agent: bool,
}

impl GuestOptions {
    /// The test guest's config, common to every backend: `name`, 1 vCPU, 128 MiB, direct
    /// kernel boot with `console=<console> quiet no_timer_check` (plus `domkit.ignore_shutdown=1` when
    /// asked), and these policies. Backends add their own devices and settings.
    pub fn guest_config(
        &self,
        name: &str,
        kernel: PathBuf,
        initrd: PathBuf,
        console: &str,
    ) -> DomainConfig {
        // no_timer_check: Linux's boot-time IO-APIC timer check panics ("IO-APIC + timer doesn't
        // work") when a loaded host starves the TCG vCPU (seen in a CI dry run at load 20).
        let mut cmdline = format!("console={console} quiet no_timer_check");
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

    /// How the test guest's NICs reach a network with a DHCP server, for the device
    /// scenarios (§14): QEMU user-mode networking (its built-in DHCP); on Xen the test dom0's
    /// bridge `xenbr0` (udhcpd on it, `xen-host/build.sh`).
    fn test_nic_backend(&self) -> NicBackend {
        NicBackend::User
    }

    /// Whether the backend has CD-ROM drives (the device scenarios give their test guests
    /// one when it has; libxl: no, they need the qdisk backend, §14.7).
    fn has_cdrom(&self) -> bool {
        true
    }

    /// Why this backend's test guest cannot refuse or ignore an unplug request, if it
    /// cannot (`unplug_refused_by_guest`, `hotplug_killed`): the scenarios that need such a
    /// guest are `unsupported` with this reason.
    fn unplug_refusal_unsupported(&self) -> Option<&'static str> {
        None
    }

    /// A directory scenarios may write save files to.
    fn scratch_dir(&self) -> std::path::PathBuf;

    /// A path where creating a file fails (for the unwritable-save scenario).
    fn unwritable_path(&self) -> std::path::PathBuf {
        std::path::PathBuf::from("/proc/domkit-unwritable/save.img")
    }

    /// Whether a backend domain (QEMU process, Xen domain) of the domain named `name` exists
    /// on the host, asked of the host itself, not of the driver (leak checks, and whether
    /// `state()` tells the truth). A domain being torn down may still count for a moment.
    async fn backend_domain_exists(&self, name: &str) -> Result<bool, String>;

    /// Whether the vCPUs of the running backend domain run (QEMU `query-status`, Xen
    /// `libxl_domain_info`): checked against `state()` (running vs paused).
    async fn backend_vcpus_running(
        &self,
        domain: &<Self::Driver as Driver>::Domain,
    ) -> Result<bool, String>;

    /// The offset in a save file written by this backend at which the bytes become opaque
    /// stream data: after domkit's header and the backend stream's own header (QEMU: the
    /// `QEVM` magic and version; libxl: the 16-byte `LibxlFmt` header). Used to build "a valid
    /// header followed by garbage".
    fn save_stream_start(&self, path: &Path) -> Result<u64, String>;

    /// A config named `name` that this backend fails to launch (a kernel file of garbage),
    /// and substrings of the backend's own reason, at least one of which the error of
    /// `start()` must contain (`docs/semantics.md` §6.1).
    fn launch_failure_config(
        &self,
        name: &str,
    ) -> Result<(DomainConfig, &'static [&'static str]), String>;

    /// Whether `pm_suspend(memory)` goes through the guest agent on this backend (QEMU: yes;
    /// Xen: no, it is a PV suspend), i.e. whether it must be `unsupported` without one.
    fn pm_suspend_uses_agent(&self) -> bool;

    /// Whether saving a paused domain lets its guest run until it suspends (Xen PV: the guest
    /// answers its own suspend request, so the save resumes it first and the events say so,
    /// §6.6/§10), rather than keeping its vCPUs stopped throughout (QEMU).
    fn save_runs_a_paused_guest(&self) -> bool {
        false
    }

    /// Whether `agent_connected` / `agent_disconnected` follow a program opening and closing
    /// the guest's end of the channel, whatever it is (QEMU: `VSERPORT_CHANGE`), rather than
    /// a real agent answering (Xen: probes, `docs/semantics.md` §13.4). With probes, a
    /// hostile program on the channel never makes it "connected".
    fn agent_events_follow_the_port(&self) -> bool {
        true
    }

    // ---- durable domains (§11): the scenarios of `scenarios/durable.rs` ----

    /// The `--connect` URI of this backend for the `domkit` CLI (`qemu:///session`,
    /// `libxl:///`).
    fn connect_uri(&self) -> &'static str;

    /// The command line of a separate manager process on `roots` (persistent, or with
    /// `ephemeral` domains that die with it): `domkit --connect URI manager --state-dir S
    /// --runtime-dir R [--ephemeral]` (protocol: [`crate::manager`]).
    fn manager_command(
        &self,
        roots: &DurableRoots,
        ephemeral: bool,
    ) -> Result<std::process::Command, String> {
        let mut command = std::process::Command::new(crate::manager::domkit_binary()?);
        command
            .arg("--connect")
            .arg(self.connect_uri())
            .arg("manager")
            .arg("--state-dir")
            .arg(&roots.state)
            .arg("--runtime-dir")
            .arg(&roots.runtime);
        if ephemeral {
            command.arg("--ephemeral");
        }
        Ok(command)
    }

    /// A persistent driver on `roots`, opened in this process (the next manager: it
    /// reattaches what the roots hold). A second manager on the same roots is
    /// `root_in_use`.
    async fn open_persistent(&self, roots: &DurableRoots) -> domkit_core::Result<Self::Driver>;

    /// Stop supervising and drop `driver`, leaving every domain as it is (a persistent
    /// manager's orderly exit); the roots are free for the next manager when this returns.
    fn detach(&self, driver: Self::Driver);

    /// Wait until the guest of `name` on `roots`, which no driver of this process holds, has
    /// booted far enough to act.
    async fn wait_ready_away(
        &self,
        roots: &DurableRoots,
        name: &str,
        timeout: Duration,
    ) -> Result<(), String>;

    /// While no manager runs: make `action` happen to the domain `name` on `roots`, and
    /// return once the backend shows it happened (QEMU: the run state; Xen: the domain's
    /// shutdown flag, or its absence). For [`AwayAction::Kill`], the shutoff reason the next
    /// manager must report (§11.3).
    async fn act_while_away(
        &self,
        roots: &DurableRoots,
        name: &str,
        action: AwayAction,
    ) -> Result<Option<ShutoffReason>, String>;
}
