//! Choosing the accelerator.
//!
//! `Accel::Auto` means TCG unless a real boot showed that KVM works: the existence of
//! `/dev/kvm` (and even `query-kvm` saying "enabled") proves nothing: on a paging-based nested
//! KVM a VM without a guest runs fine while a Linux guest dies with "KVM internal error" or
//! hangs. [`probe_kvm_boot`] is that real boot; its result is cached per binary for the
//! process lifetime, and the driver uses it only when told to
//! ([`QemuDriverOptions::auto_accel`](crate::driver::QemuDriverOptions::auto_accel)).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use domkit_core::Accel;

use crate::argv::AccelChoice;

/// What `Accel::Auto` resolves to in a driver.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AutoAccel {
    /// Always TCG (the default: safe everywhere, slow).
    #[default]
    Tcg,
    /// KVM, trusted without a probe (the caller knows the host).
    Kvm,
    /// KVM if a real boot of this kernel/initrd under KVM printed `marker` on the serial
    /// console within `timeout` (probed once per binary, then cached); TCG otherwise.
    Probe(KvmProbe),
}

/// A real-boot KVM probe: the guest to boot and what proves it booted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmProbe {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Text the guest prints on ttyS0 once it is up (e.g. `DOMKIT-GUEST-READY`).
    pub marker: String,
    /// How long a boot may take.
    pub timeout: Duration,
}

/// Resolve the configured accelerator. `auto_kvm` is the (probed or trusted) answer to
/// "does KVM boot guests here".
pub fn resolve(requested: Accel, auto_kvm: bool) -> AccelChoice {
    match requested {
        Accel::Tcg => AccelChoice::Tcg,
        Accel::Kvm => AccelChoice::Kvm,
        Accel::Auto if auto_kvm => AccelChoice::Kvm,
        Accel::Auto => AccelChoice::Tcg,
    }
}

fn cache() -> &'static Mutex<HashMap<PathBuf, bool>> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, bool>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// Whether `Auto` means KVM for `binary` under `auto`, probing if needed (cached).
pub async fn auto_uses_kvm(auto: &AutoAccel, binary: &Path) -> bool {
    match auto {
        AutoAccel::Tcg => false,
        AutoAccel::Kvm => true,
        AutoAccel::Probe(probe) => {
            if let Some(&known) = cache()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(binary)
            {
                return known;
            }
            let works = probe_kvm_boot(binary, probe).await;
            tracing::info!(binary = %binary.display(), kvm_boots = works, "KVM boot probe");
            cache()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(binary.to_path_buf(), works);
            works
        }
    }
}

/// Boot `probe`'s guest under KVM and report whether it printed its marker in time. Never
/// fails: anything that goes wrong (no /dev/kvm access, QEMU error, KVM internal error, hang)
/// means "KVM does not work here". The QEMU process is killed and reaped, its temporary
/// directory removed.
pub async fn probe_kvm_boot(binary: &Path, probe: &KvmProbe) -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return false;
    }
    let Ok(dir) = tempfile::Builder::new()
        .prefix("domkit-kvm-probe")
        .tempdir()
    else {
        return false;
    };
    let serial = dir.path().join("serial.log");
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args([
        "-machine",
        "pc",
        "-accel",
        "kvm",
        "-m",
        "128",
        "-nodefaults",
    ])
    .args(["-no-user-config", "-display", "none", "-no-reboot"])
    .arg("-kernel")
    .arg(&probe.kernel)
    .arg("-append")
    .arg("console=ttyS0 panic=-1")
    .arg("-serial")
    .arg(format!("file:{}", serial.display()))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .kill_on_drop(true);
    if let Some(initrd) = &probe.initrd {
        cmd.arg("-initrd").arg(initrd);
    }
    let Ok(mut child) = cmd.spawn() else {
        return false;
    };
    let deadline = Instant::now() + probe.timeout;
    let booted = loop {
        if std::fs::read(&serial)
            .map(|log| contains(&log, probe.marker.as_bytes()))
            .unwrap_or(false)
        {
            break true;
        }
        if Instant::now() >= deadline || !matches!(child.try_wait(), Ok(None)) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = child.start_kill();
    let _ = child.wait().await;
    booted
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_tcg_unless_kvm_is_known_to_boot() {
        assert_eq!(resolve(Accel::Auto, false), AccelChoice::Tcg);
        assert_eq!(resolve(Accel::Auto, true), AccelChoice::Kvm);
        assert_eq!(resolve(Accel::Tcg, true), AccelChoice::Tcg);
        assert_eq!(resolve(Accel::Kvm, false), AccelChoice::Kvm);
    }

    #[tokio::test]
    async fn auto_without_probe_never_touches_kvm() {
        assert!(!auto_uses_kvm(&AutoAccel::Tcg, Path::new("/nonexistent/qemu")).await);
        assert!(auto_uses_kvm(&AutoAccel::Kvm, Path::new("/nonexistent/qemu")).await);
    }

    #[tokio::test]
    async fn probe_with_missing_binary_says_no() {
        let probe = KvmProbe {
            kernel: "/nonexistent/vmlinuz".into(),
            initrd: None,
            marker: "READY".into(),
            timeout: Duration::from_secs(5),
        };
        assert!(!probe_kvm_boot(Path::new("/nonexistent/qemu"), &probe).await);
    }
}
