//! `domkit demo` (the README's first command) runs the test guest's lifecycle through a
//! private domkitd it starts and stops: real CLI binary, real domkitd, real QEMU (TCG).
//! Checked: exit 0; the daemon's pid and socket are printed; every step and every event in
//! order, once; the final state; the daemon gone afterwards (its socket and private
//! directory removed, no process left).

mod common;

use std::process::{Command, Stdio};

#[test]
fn demo_walks_the_lifecycle_through_a_private_domkitd() {
    let out = Command::new(common::domkit_bin())
        .args(["demo", "--json"])
        .env("DOMKIT_GUEST_DIR", common::guest_dir())
        .env("DOMKITD", common::domkitd_bin())
        .stdin(Stdio::null())
        .output()
        .expect("run domkit demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "domkit demo failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    let daemon = &lines[0]["daemon"];
    let pid = daemon["pid"].as_i64().expect("the daemon's pid") as i32;
    let socket = std::path::PathBuf::from(daemon["socket"].as_str().unwrap());
    let steps: Vec<&str> = lines.iter().filter_map(|l| l["step"].as_str()).collect();
    assert_eq!(
        steps,
        [
            "start",
            "wait for the guest to boot",
            "suspend",
            "resume",
            "save",
            "restore",
            "reboot",
            "wait for the guest to boot again",
            "graceful shutdown (wait: completed)"
        ]
    );
    let events: Vec<String> = lines
        .iter()
        .filter_map(|l| {
            let e = l["event"].as_str()?;
            // The guest agent coming and going (§13.4) is not a lifecycle step: its timing
            // relative to the others depends on the guest.
            if e.starts_with("agent_") {
                return None;
            }
            Some(match l["detail"].as_str() {
                Some(d) => format!("{e}({d})"),
                None => e.to_string(),
            })
        })
        .collect();
    assert_eq!(
        events,
        [
            "defined",
            "started(booted)",
            "suspended(paused)",
            "resumed(unpaused)",
            "suspended(saving)",
            "stopped(saved)",
            "started(restored)",
            "rebooted",
            "shutdown_requested(host)",
            "stopped(shutdown)",
            "undefined"
        ],
        "{stdout}"
    );
    let seqs: Vec<u64> = lines.iter().filter_map(|l| l["seq"].as_u64()).collect();
    // Agent events included: every seq once, in order, from 1.
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "each event once, in order"
    );
    assert!(seqs.len() >= 11, "{stdout}");
    let last = lines.last().unwrap();
    assert_eq!(last["final_state"], "shutoff (shutdown)");
    assert_eq!(last["daemon_stopped"], 0, "domkitd stopped cleanly");
    // SAFETY: signal 0 only checks whether the process exists.
    assert_ne!(unsafe { libc::kill(pid, 0) }, 0, "domkitd {pid} is gone");
    assert!(!socket.exists(), "its socket is removed");
    let private = socket.parent().and_then(|r| r.parent()).unwrap();
    assert!(
        !private.exists(),
        "its private directory is removed: {}",
        private.display()
    );
}
