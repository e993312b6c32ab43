//! Record the QMP events of device hotplug and unplug (`docs/semantics.md` §14) from a real
//! QEMU booting the real test guest, as the fixture of `src/devices.rs`'s unit tests.
//!
//! ```text
//! cargo run -p domkit-qemu --example record_devices [-- --out FILE]
//! ```
//!
//! Boots the test guest (`DOMKIT_GUEST_DIR` or `~/.cache/domkit/guest`,
//! `scripts/build-test-guest.sh`) with a boot disk `d1`, a NIC `n0` and a CD-ROM `cd`
//! through the driver, then through the driver's API: attaches disk `h1` and NIC `hn`,
//! detaches `h1`, `d1`, `hn`, `n0` (each completed by the guest), ejects and inserts the
//! CD-ROM, and a detach of a disk while the guest has its hotplug GPE masked (times out),
//! then unmasked (completes). Every QMP event QEMU sent meanwhile is written to `FILE`
//! (default `tests/fixtures/devices/qemu-<major>.<minor>.jsonl`), one JSON object per line:
//! `{"step": WHAT}` before each operation, `{"event": NAME, "data": DATA}` as received, and
//! `{"reply": "qom-list /machine/peripheral", "return": ...}` after the attaches and after
//! the detaches.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use domkit_core::{
    Boot, Channel, ChannelKind, ConsoleAccess, DetachOptions, DeviceId, DeviceScope, DeviceSpec,
    Disk, Domain, DomainConfig, Driver, Nic, NicBackend,
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

fn id(s: &str) -> Result<DeviceId, Error> {
    Ok(DeviceId::new(s)?)
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
        .prefix("dkdevs")
        .tempdir_in("/tmp")?;
    let runtime = work.path().join("run");
    std::fs::create_dir(&runtime)?;
    std::fs::set_permissions(
        &runtime,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )?;
    let image = |name: &str| -> Result<PathBuf, Error> {
        let p = work.path().join(name);
        std::fs::write(&p, vec![0u8; 1 << 20])?;
        Ok(p)
    };
    let mut config = DomainConfig::with_kernel("recdev", 128, guest.join("vmlinuz"));
    config.boot = Boot::Kernel {
        kernel: guest.join("vmlinuz"),
        initrd: Some(guest.join("initrd.img")),
        cmdline: "console=ttyS0 quiet".into(),
    };
    config.channels.push(Channel {
        kind: ChannelKind::GuestAgent,
        name: None,
    });
    let mut d1 = Disk::new(image("d1.raw")?);
    d1.id = Some(id("d1")?);
    config.disks.push(d1);
    let mut d2 = Disk::new(image("d2.raw")?);
    d2.id = Some(id("d2")?);
    config.disks.push(d2);
    let mut cd = Disk::new(image("a.iso")?);
    cd.id = Some(id("cd")?);
    cd.cdrom = true;
    config.disks.push(cd);
    config.nics.push(Nic {
        id: Some(id("n0")?),
        mac: Some("52:54:00:dd:05:01".into()),
        backend: NicBackend::User,
    });
    config.qemu.accel = domkit_core::Accel::Tcg;

    let driver = QemuDriver::new(QemuDriverOptions::with_runtime_root(&runtime))?;
    let domain = driver.define(config).await?;
    domain
        .start(domkit_core::StartOptions { paused: true })
        .await?;
    let lines: Arc<Mutex<Vec<Value>>> = Arc::default();
    let qmp = domain.qmp().ok_or("no QMP client")?;
    let version = domain.qemu_version().ok_or("no version")?;
    let mut events = qmp.subscribe();
    let recorder = {
        let lines = lines.clone();
        tokio::spawn(async move {
            while let Ok(ev) = events.recv().await {
                lines
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(json!({ "event": ev.name, "data": ev.data }));
            }
        })
    };
    let step = |what: &str| {
        lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(json!({ "step": what }));
    };
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
    let mut answered = false;
    for _ in 0..20 {
        console.write_all(b"echo rec-$((40+2))\n").await?;
        if read_until(&mut console, &mut seen, b"rec-42", Duration::from_secs(3))
            .await
            .is_ok()
        {
            answered = true;
            break;
        }
    }
    if !answered {
        return Err("the guest shell did not answer".into());
    }
    let wait = DetachOptions {
        scope: DeviceScope::Live,
        timeout: Duration::from_secs(60),
    };
    step("attach disk h1");
    let mut h1 = Disk::new(image("h1.raw")?);
    h1.id = Some(id("h1")?);
    domain
        .attach_device(DeviceSpec::Disk(h1), DeviceScope::Live)
        .await?;
    step("attach nic hn");
    domain
        .attach_device(
            DeviceSpec::Nic(Nic {
                id: Some(id("hn")?),
                mac: Some("52:54:00:dd:05:02".into()),
                backend: NicBackend::User,
            }),
            DeviceScope::Live,
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let qom = |qmp: domkit_qemu::qmp::QmpClient| async move {
        qmp.execute("qom-list", Some(json!({ "path": "/machine/peripheral" })))
            .await
    };
    let reply = qom(qmp.clone()).await?;
    lines
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(json!({ "reply": "qom-list /machine/peripheral", "return": reply }));
    for d in ["h1", "d1", "hn", "n0"] {
        step(&format!("detach {d}"));
        domain.detach_device(id(d)?, wait).await?;
    }
    let reply = qom(qmp.clone()).await?;
    lines
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(json!({ "reply": "qom-list /machine/peripheral", "return": reply }));
    step("eject cd");
    domain
        .change_media(id("cd")?, None, DeviceScope::Live)
        .await?;
    step("insert cd");
    domain
        .change_media(id("cd")?, Some(image("b.iso")?), DeviceScope::Live)
        .await?;
    step("guest masks its hotplug GPE");
    console.write_all(b"domkit-devices ignore-unplug\n").await?;
    read_until(
        &mut console,
        &mut seen,
        b"DKDEV-IGNORING",
        Duration::from_secs(30),
    )
    .await?;
    step("detach d2 (times out)");
    let refused = domain
        .detach_device(
            id("d2")?,
            DetachOptions {
                scope: DeviceScope::Live,
                timeout: Duration::from_secs(5),
            },
        )
        .await;
    if refused.is_ok() {
        return Err("the masked guest released d2".into());
    }
    step("guest unmasks its hotplug GPE");
    console.write_all(b"domkit-devices accept-unplug\n").await?;
    read_until(
        &mut console,
        &mut seen,
        b"DKDEV-ACCEPTING",
        Duration::from_secs(30),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while domain
        .devices()
        .await?
        .iter()
        .any(|d| d.id == id("d2").unwrap_or(d.id))
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    step("destroy");
    domain.destroy().await?;
    let _ = tokio::time::timeout(Duration::from_secs(10), recorder).await;
    let (major, minor) = {
        let mut parts = version.split('.');
        (
            parts.next().unwrap_or("0").to_string(),
            parts.next().unwrap_or("0").to_string(),
        )
    };
    let out = out.unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(format!("tests/fixtures/devices/qemu-{major}.{minor}.jsonl"))
    });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut text = json!({ "qemu": version }).to_string();
    text.push('\n');
    for line in lines.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        text.push_str(&line.to_string());
        text.push('\n');
    }
    std::fs::write(&out, text)?;
    println!("{}", out.display());
    Ok(())
}
