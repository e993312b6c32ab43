//! Shared helpers of the `domkit` CLI and the example programs: printing uniform events,
//! locating (or building) the test guest.

#![warn(missing_docs)]

pub mod daemon_demo;

use domkit_core::DomainEvent;
use std::path::PathBuf;
use std::time::Instant;

/// Print one event, human-readable or as a JSON line, with the time since `t0`.
pub fn print_event(ev: &DomainEvent, t0: Instant, json: bool) {
    let elapsed = t0.elapsed().as_secs_f64();
    if json {
        let mut v = serde_json::to_value(ev).unwrap_or_default();
        v["elapsed_s"] = serde_json::json!((elapsed * 1000.0).round() / 1000.0);
        println!("{v}");
    } else {
        println!(
            "+{elapsed:8.3}s  {:<16} seq={:<3} {}",
            ev.domain.name, ev.seq, ev.kind
        );
    }
}

/// The test guest directory (`$DOMKIT_GUEST_DIR` or `~/.cache/domkit/guest`); builds it with
/// the repo's `scripts/build-test-guest.sh` when it is missing and the script is at hand.
pub fn ensure_test_guest() -> anyhow::Result<PathBuf> {
    let dir = domkit_conformance::qemu::guest_dir();
    if dir.join("vmlinuz").is_file() && dir.join("initrd.img").is_file() {
        return Ok(dir);
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-test-guest.sh");
    if !script.is_file() {
        anyhow::bail!(
            "the test guest is missing at {} and scripts/build-test-guest.sh is not at hand: \
             build it from a domkit checkout, or set DOMKIT_GUEST_DIR",
            dir.display()
        );
    }
    eprintln!("building the test guest (once): {}", script.display());
    let status = std::process::Command::new("bash")
        .arg(&script)
        .arg("--out")
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(
        status.success(),
        "building the test guest failed ({status})"
    );
    Ok(dir)
}
