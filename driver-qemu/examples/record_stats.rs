//! Record what the QEMU driver's statistics are made of (`docs/semantics.md` §12.5), from a
//! real QEMU booting the real test guest, as the fixture of `src/stats.rs`'s unit tests.
//!
//! ```text
//! cargo run -p domkit-qemu --example record_stats [-- --out FILE]
//! ```
//!
//! Boots the test guest (`DOMKIT_GUEST_DIR` or `~/.cache/domkit/guest`, which must have the
//! `virtio_blk` module: `scripts/build-test-guest.sh`) with one raw disk through the driver,
//! makes the guest read its disk through the serial console, then records the raw QMP
//! replies (`query-cpus-fast`, `query-blockstats`, `query-balloon`, an error without a
//! balloon device) and the `/proc` files (`stat` of the process and of each vCPU thread,
//! `statm`) into `FILE` (default `tests/fixtures/stats/qemu-<major>.<minor>.json`), with
//! what `Domain::stats()` made of them for humans. Re-record for another QEMU by running it
//! again.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use domkit_core::{
    Boot, Channel, ChannelKind, ConsoleAccess, Disk, DiskFormat, Domain, DomainConfig, Driver,
};
use domkit_qemu::{QemuDriver, QemuDriverOptions};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Read the console until `needle` shows up (or fail after `within`).
async fn read_until(
    console: &mut domkit_core::ConsoleStream,
    seen: &mut Vec<u8>,
    needle: &[u8],
    within: Duration,
) -> Result<(), Error> {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    while !seen.windows(needle.len()).any(|w| w == needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, console.read(&mut buf))
            .await
            .map_err(|_| {
                format!(
                    "{:?} not seen on the console",
                    String::from_utf8_lossy(needle)
                )
            })??;
        if n == 0 {
            return Err("the console ended".into());
        }
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let mut out: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--out" => out = Some(PathBuf::from(args.next().ok_or("--out needs a file")?)),
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    let guest = std::env::var_os("DOMKIT_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root/.cache/domkit/guest"));
    let work = tempfile::Builder::new()
        .prefix("dkstats")
        .tempdir_in("/tmp")?;
    let runtime = work.path().join("run");
    std::fs::create_dir(&runtime)?;
    std::fs::set_permissions(
        &runtime,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )?;
    let disk = work.path().join("disk.img");
    std::fs::write(&disk, vec![0x5a; 4 << 20])?;

    let mut config = DomainConfig::with_kernel("rec", 128, guest.join("vmlinuz"));
    config.boot = Boot::Kernel {
        kernel: guest.join("vmlinuz"),
        initrd: Some(guest.join("initrd.img")),
        cmdline: "console=ttyS0 quiet".into(),
    };
    config.channels.push(Channel {
        kind: ChannelKind::GuestAgent,
        name: None,
    });
    config.disks.push(Disk {
        id: None,
        path: disk,
        format: DiskFormat::Raw,
        readonly: false,
        cdrom: false,
    });
    config.qemu.accel = domkit_core::Accel::Tcg;

    let driver = QemuDriver::new(QemuDriverOptions::with_runtime_root(&runtime))?;
    let domain = driver.define(config).await?;
    domain
        .start(domkit_core::StartOptions { paused: true })
        .await?;
    let mut console = domain.console(ConsoleAccess::ReadWrite).await?;
    domain.resume().await?;
    let mut seen = Vec::new();
    read_until(
        &mut console,
        &mut seen,
        b"DOMKIT-GUEST-READY",
        Duration::from_secs(120),
    )
    .await?;
    // The shell starts after the ready line: type until it answers.
    let mut answered = false;
    for _ in 0..20 {
        console
            .write_all(b"dd if=/dev/vda of=/dev/null bs=4k count=512 && echo rec-$((40+2))\n")
            .await?;
        if read_until(&mut console, &mut seen, b"rec-42", Duration::from_secs(3))
            .await
            .is_ok()
        {
            answered = true;
            break;
        }
    }
    if !answered {
        return Err(format!(
            "the guest shell did not read its disk (is virtio_blk in the guest?); console: {}",
            String::from_utf8_lossy(&seen)
        )
        .into());
    }

    let qmp = domain.qmp().ok_or("no QMP client")?;
    let pid = domain.pid().ok_or("no pid")?;
    let version = domain.qemu_version().ok_or("no version")?;
    let mut replies = serde_json::Map::new();
    for command in ["query-cpus-fast", "query-blockstats", "query-balloon"] {
        let reply = match qmp.execute(command, None).await {
            Ok(v) => v,
            Err(e) => json!({"error": e.to_string()}),
        };
        replies.insert(command.into(), reply);
    }
    let vcpus = domkit_qemu::stats::parse_cpus_fast(&replies["query-cpus-fast"])?;
    let vcpu_stat: Vec<Value> = vcpus
        .iter()
        .map(|v| {
            let path = format!("/proc/{pid}/task/{}/stat", v.thread_id);
            Value::String(std::fs::read_to_string(path).unwrap_or_default())
        })
        .collect();
    let stats = domain.stats().await?;
    let transcript = json!({
        "qemu": version,
        "vcpus": vcpus.len(),
        "replies": replies,
        "proc": {
            "stat": std::fs::read_to_string(format!("/proc/{pid}/stat"))?,
            "vcpu_stat": vcpu_stat,
            "statm": std::fs::read_to_string(format!("/proc/{pid}/statm"))?,
        },
        "stats": serde_json::to_value(&stats)?,
    });
    domain.destroy().await?;
    driver.undefine("rec").await?;

    let mut parts = version.split('.');
    let short = format!(
        "{}.{}",
        parts.next().unwrap_or("0"),
        parts.next().unwrap_or("0")
    );
    let out = out.unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/stats")
            .join(format!("qemu-{short}.json"))
    });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&transcript)? + "\n")?;
    println!("{}", out.display());
    Ok(())
}
