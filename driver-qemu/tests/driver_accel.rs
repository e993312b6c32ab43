//! The KVM boot probe behind `accel = "auto"` (accel.rs): it boots the real test guest under
//! KVM and reports whether it came up. Its answer depends on the host (on the reference host
//! /dev/kvm exists but guests do not boot), so the test checks that it answers within its
//! timeout and leaves nothing behind, and prints the answer.

mod driver_support;

use std::time::{Duration, Instant};

use domkit_qemu::accel::{probe_kvm_boot, KvmProbe};
use driver_support::*;

#[tokio::test]
async fn kvm_probe_answers_in_time_and_cleans_up() {
    let (kernel, initrd) = guest();
    let probe = KvmProbe {
        kernel,
        initrd: Some(initrd),
        marker: READY.into(),
        timeout: Duration::from_secs(20),
    };
    let started = Instant::now();
    let kvm_boots = probe_kvm_boot("qemu-system-x86_64".as_ref(), &probe).await;
    let took = started.elapsed();
    eprintln!("KVM boots a guest here: {kvm_boots} (probe took {took:?})");
    assert!(took < Duration::from_secs(35), "{took:?}");
    // The probe kills and reaps its QEMU: no child of ours is left.
    let me = std::process::id().to_string();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let ppid = rest.split_whitespace().nth(1).unwrap_or("");
        assert!(
            !(ppid == me && stat.contains("(qemu-system")),
            "probe QEMU left behind: {stat}"
        );
    }
}
