//! A QEMU driver in a process of its own, for tests that SIGKILL the manager
//! (driver-qemu/tests/driver_reattach.rs): one command per line on stdin, one JSON line per
//! answer on stdout.
//!
//! Usage: `qemu_manager persistent|ephemeral STATE_DIR RUNTIME_DIR`
//!
//! Commands: `define <config json>`, `start <name>`, `pause <name>`, `save <name> <path>`,
//! `shutdown <name> <timeout s>`, `state <name>`. The first line printed is
//! `{"ready": true, "pid": N}` once the driver is open.

use std::io::Write;
use std::time::Duration;

use domkit_core::{Domain, DomainConfig, Driver, ShutdownOptions, StartOptions};
use domkit_qemu::{QemuDriver, QemuDriverOptions};
use serde_json::json;
use tokio::io::AsyncBufReadExt;

fn say(v: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, state_dir, runtime_dir] = args.as_slice() else {
        eprintln!("usage: qemu_manager persistent|ephemeral STATE_DIR RUNTIME_DIR");
        std::process::exit(2);
    };
    let mut options = QemuDriverOptions::persistent(state_dir, runtime_dir);
    if mode == "ephemeral" {
        options.ownership = domkit_qemu::Ownership::Ephemeral;
    }
    let driver = match QemuDriver::open(options).await {
        Ok(d) => d,
        Err(e) => {
            say(json!({"ready": false, "error": e.to_string(), "kind": format!("{e:?}")}));
            std::process::exit(1);
        }
    };
    say(json!({"ready": true, "pid": std::process::id()}));
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let (cmd, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        let answer = run(&driver, cmd, rest).await;
        say(match answer {
            Ok(v) => v,
            Err(e) => json!({"ok": false, "error": e.to_string()}),
        });
    }
    Ok(())
}

async fn run(
    driver: &QemuDriver,
    cmd: &str,
    rest: &str,
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let mut words = rest.split_whitespace();
    match cmd {
        "define" => {
            let config: DomainConfig = serde_json::from_str(rest)?;
            let d = driver.define(config).await?;
            Ok(json!({"ok": true, "uuid": d.id().uuid}))
        }
        "start" => {
            let d = driver.lookup_by_name(words.next().unwrap_or("")).await?;
            d.start(StartOptions::default()).await?;
            Ok(json!({"ok": true, "pid": d.pid()}))
        }
        "pause" => {
            let d = driver.lookup_by_name(words.next().unwrap_or("")).await?;
            d.pause().await?;
            Ok(json!({"ok": true}))
        }
        "save" => {
            let d = driver.lookup_by_name(words.next().unwrap_or("")).await?;
            d.save(std::path::Path::new(words.next().unwrap_or("")))
                .await?;
            Ok(json!({"ok": true}))
        }
        "shutdown" => {
            let d = driver.lookup_by_name(words.next().unwrap_or("")).await?;
            let secs: u64 = words.next().unwrap_or("60").parse()?;
            let outcome = d
                .shutdown(ShutdownOptions {
                    timeout: Duration::from_secs(secs),
                    ..ShutdownOptions::default()
                })
                .await?;
            Ok(json!({"ok": true, "outcome": outcome}))
        }
        "state" => {
            let d = driver.lookup_by_name(words.next().unwrap_or("")).await?;
            let (state, seq, _) = d.snapshot_and_subscribe();
            Ok(json!({"ok": true, "state": state, "seq": seq}))
        }
        other => Err(format!("unknown command {other:?}").into()),
    }
}
