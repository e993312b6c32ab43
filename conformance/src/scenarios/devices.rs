//! Devices (issue 10, `docs/semantics.md` §14): disks, CD-ROMs and NICs proven from inside
//! the guest, hotplug and unplug with their events, bad input, and devices across a save.
//!
//! The guest reports what it sees on its serial console (`domkit-devices TAG` in the test
//! guest, `scripts/guest/sbin/domkit-devices`): one line per block device (name, virtio
//! serial = the domkit device id, size, read-only flag, its first bytes, a write read back)
//! and per NIC (MAC, a DHCP lease over the network). The scenario compares that with the
//! config and with `Domain::devices()`. Images are made per scenario in a private temporary
//! directory: raw files with a marker in their first bytes, a qcow2 converted from one, and
//! two CD images (raw 2 KiB sectors) with different markers.
//!
//! A Xen PV disk has no serial: the Xen test guest (`xen-host/domu/domkit-devices`) reports
//! as `serial` its image's file name without extension (read from the vbd's backend in
//! xenstore), so every image a scenario checks by serial in the guest is named `<id>.raw`.

use super::watch::{boot_on_console, read_until, run_in_shell, Seen};
use crate::backend::{GuestOptions, TestBackend};
use crate::scenario::*;
use domkit_core::{
    ConfigError, ConsoleAccess, ConsoleStream, DetachOptions, DeviceId, DeviceKind, DeviceScope,
    DeviceSpec, Disk, DiskFormat, Domain, Error, EventKind, Nic, NicBackend, Operation,
    RestoreOptions, StartedDetail, StoppedDetail, SuspendedDetail,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

use EventKind as E;

/// How long the guest's report may take (a DHCP exchange per NIC, a write per disk).
const REPORT: Duration = Duration::from_secs(90);
/// How long an unplug the guest accepts may take under TCG.
const UNPLUG: Duration = Duration::from_secs(60);

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap_or_else(|_| DeviceId::default_disk(0))
}

/// The scenario's images, removed with it.
struct Images {
    dir: tempfile::TempDir,
}

impl Images {
    fn new() -> Step<Images> {
        let dir = tempfile::Builder::new()
            .prefix("dkdev")
            .tempdir_in("/tmp")
            .map_err(|e| Stop::Fail(format!("image directory: {e}")))?;
        Ok(Images { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A raw image of `size` bytes starting with `marker` (0600).
    fn raw(&self, name: &str, size: u64, marker: &str) -> Step<PathBuf> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.path(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Stop::Fail(format!("creating {}: {e}", path.display())))?;
        f.write_all(marker.as_bytes())
            .and_then(|_| f.set_len(size))
            .map_err(|e| Stop::Fail(format!("writing {}: {e}", path.display())))?;
        Ok(path)
    }

    /// A qcow2 image of `size` virtual bytes starting with `marker` (`qemu-img convert`).
    fn qcow2(&self, name: &str, size: u64, marker: &str) -> Step<PathBuf> {
        let raw = self.raw(&format!("{name}.src"), size, marker)?;
        let path = self.path(name);
        let out = std::process::Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&path)
            .output()
            .map_err(|e| Stop::Fail(format!("running qemu-img: {e}")))?;
        check(out.status.success(), || {
            format!(
                "qemu-img convert failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        let _ = std::fs::remove_file(&raw);
        Ok(path)
    }
}

fn disk(idv: &str, path: &Path) -> Disk {
    let mut d = Disk::new(path);
    d.id = Some(id(idv));
    d
}

/// A NIC on the backend's test network ([`TestBackend::test_nic_backend`]).
fn nic<B: TestBackend>(backend: &B, idv: &str, mac: Option<&str>) -> Nic {
    Nic {
        id: Some(id(idv)),
        mac: mac.map(str::to_owned),
        backend: backend.test_nic_backend(),
    }
}

/// One block device as the guest reports it.
#[derive(Debug, Clone, Default)]
struct GuestDisk {
    name: String,
    serial: String,
    bytes: u64,
    ro: bool,
    head: String,
    rw: String,
}

/// One NIC as the guest reports it.
#[derive(Debug, Clone, Default)]
struct GuestNic {
    name: String,
    mac: String,
    dhcp: String,
}

#[derive(Debug, Default)]
struct Report {
    disks: Vec<GuestDisk>,
    nics: Vec<GuestNic>,
}

impl Report {
    fn by_serial(&self, serial: &str) -> Option<&GuestDisk> {
        self.disks.iter().find(|d| d.serial == serial)
    }

    fn cdrom(&self) -> Option<&GuestDisk> {
        self.disks.iter().find(|d| d.name.starts_with("sr"))
    }

    fn by_mac(&self, mac: &str) -> Option<&GuestNic> {
        self.nics.iter().find(|n| n.mac.eq_ignore_ascii_case(mac))
    }
}

fn fields(line: &str) -> BTreeMap<&str, &str> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect()
}

/// Parse the last complete `DKDEV-BEGIN tag` .. `DKDEV-END tag` block of the output.
fn parse_report(out: &str, tag: &str) -> Option<Report> {
    let begin = format!("DKDEV-BEGIN {tag}");
    let end = format!("DKDEV-END {tag}");
    let start = out.rfind(&begin)?;
    let stop = start + out[start..].find(&end)?;
    let mut report = Report::default();
    for line in out[start..stop].lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("DKDEV disk ") {
            let f = fields(rest);
            report.disks.push(GuestDisk {
                name: f.get("name").unwrap_or(&"").to_string(),
                serial: f.get("serial").unwrap_or(&"").to_string(),
                bytes: f.get("bytes").and_then(|b| b.parse().ok()).unwrap_or(0),
                ro: f.get("ro") == Some(&"1"),
                head: f.get("head").unwrap_or(&"").to_string(),
                rw: f.get("rw").unwrap_or(&"").to_string(),
            });
        } else if let Some(rest) = line.strip_prefix("DKDEV nic ") {
            let f = fields(rest);
            report.nics.push(GuestNic {
                name: f.get("name").unwrap_or(&"").to_string(),
                mac: f.get("mac").unwrap_or(&"").to_string(),
                dhcp: f.get("dhcp").unwrap_or(&"").to_string(),
            });
        }
    }
    Some(report)
}

/// The guest's shell on a read-write console, after its boot.
struct Guest {
    console: ConsoleStream,
    seen: Seen,
    reports: u32,
}

impl Guest {
    async fn boot<D: Domain>(domain: &D, watch: &mut EventWatch) -> Step<Guest> {
        let (mut console, mut seen) =
            boot_on_console(domain, watch, ConsoleAccess::ReadWrite).await?;
        run_in_shell(
            &mut console,
            &mut seen,
            "echo dk-$((6*7))-sh",
            "dk-42-sh",
            Duration::from_secs(60),
        )
        .await?;
        Ok(Guest {
            console,
            seen,
            reports: 0,
        })
    }

    /// Run one command and wait for `answer`.
    async fn run(&mut self, command: &str, answer: &str, within: Duration) -> Step {
        self.console
            .write_all(format!("{command}\n").as_bytes())
            .await
            .map_err(|e| Stop::Fail(format!("typing into the console: {e}")))?;
        read_until(&mut self.console, &mut self.seen, answer.as_bytes(), within).await
    }

    /// What the guest sees now.
    async fn report(&mut self) -> Step<Report> {
        self.reports += 1;
        let tag = format!("r{}", self.reports);
        self.run(
            &format!("domkit-devices {tag}"),
            &format!("DKDEV-END {tag}"),
            REPORT,
        )
        .await?;
        let out = String::from_utf8_lossy(&self.seen.0).into_owned();
        parse_report(&out, &tag).ok_or_else(|| {
            Stop::Fail(format!(
                "no complete device report {tag} on the console: {:?}",
                self.seen.tail()
            ))
        })
    }

    /// Report until `done` holds (a hotplugged device takes the guest a moment).
    async fn report_until(&mut self, what: &str, done: impl Fn(&Report) -> bool) -> Step<Report> {
        let deadline = tokio::time::Instant::now() + UNPLUG;
        loop {
            let r = self.report().await?;
            if done(&r) {
                return Ok(r);
            }
            if tokio::time::Instant::now() >= deadline {
                return fail(format!(
                    "the guest never saw {what}; its last report: {r:?}"
                ));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// The guest sees a disk with this serial, size, read-only flag, marker, and a write that
/// worked (or was refused, read-only).
fn check_guest_disk(r: &Report, serial: &str, bytes: u64, ro: bool, marker: &str) -> Step {
    let Some(d) = r.by_serial(serial) else {
        return fail(format!(
            "the guest sees no disk with serial {serial}: {r:?}"
        ));
    };
    check(d.bytes == bytes, || {
        format!(
            "disk {serial}: the guest sees {} bytes, want {bytes}",
            d.bytes
        )
    })?;
    check(d.ro == ro, || {
        format!("disk {serial}: read-only {} in the guest, want {ro}", d.ro)
    })?;
    check(d.head.starts_with(marker), || {
        format!(
            "disk {serial}: starts with {:?} in the guest, want {marker:?}",
            d.head
        )
    })?;
    let want_rw = if ro { "refused" } else { "ok" };
    check(d.rw == want_rw, || {
        format!("disk {serial}: write check {:?}, want {want_rw:?}", d.rw)
    })
}

async fn devices_of<D: Domain>(domain: &D) -> Step<BTreeMap<String, domkit_core::DeviceInfo>> {
    Ok(domain
        .devices()
        .await?
        .into_iter()
        .map(|d| (d.id.to_string(), d))
        .collect())
}

const MIB: u64 = 1024 * 1024;

/// A backend without device support is a gap, found before anything boots.
async fn supported<D: Domain>(domain: &D) -> Step {
    domain.defined_devices().await?;
    Ok(())
}

/// Whether a config error is the expected reason.
type IsReason = fn(&ConfigError) -> bool;

/// Raw disks (one read-only) and two NICs on the backend's test network (one MAC given,
/// one generated) at boot: the guest sees each as configured (§14.1).
pub(super) async fn boot_with_disks_and_nic<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (probe, _) = ctx.define("probe", GuestOptions::default()).await?;
    supported(&probe).await?;
    let img = Images::new()?;
    let sys = img.raw("sys.raw", 16 * MIB, "DKDISK-sys")?;
    let ro = img.raw("ro.raw", 8 * MIB, "DKDISK-ro")?;
    let (domain, mut watch) = ctx
        .define_config("a", |name| {
            let mut c = ctx.backend.guest_config(name, GuestOptions::default());
            c.disks.push(disk("sys", &sys));
            let mut r = disk("ro", &ro);
            r.readonly = true;
            c.disks.push(r);
            c.nics
                .push(nic(ctx.backend, "n0", Some("52:54:00:dd:00:01")));
            c.nics.push(nic(ctx.backend, "n1", None));
            Ok(c)
        })
        .await?;
    let defined = devices_of(&domain).await?;
    let mut guest = Guest::boot(&domain, &mut watch).await?;
    let r = guest.report().await?;
    check_guest_disk(&r, "sys", 16 * MIB, false, "DKDISK-sys")?;
    check_guest_disk(&r, "ro", 8 * MIB, true, "DKDISK-ro")?;
    check(r.disks.len() == 2, || {
        format!(
            "the guest sees {} block devices, want 2: {r:?}",
            r.disks.len()
        )
    })?;
    // The guest's write reached the raw image on the host (sector 1).
    let bytes = std::fs::read(&sys).map_err(|e| Stop::Fail(format!("reading sys.raw: {e}")))?;
    check(bytes.get(512..516) == Some(&b"DKW-"[..]), || {
        "the guest's write to disk sys is not in its image on the host".into()
    })?;
    let live = devices_of(&domain).await?;
    check(live == defined, || {
        format!("devices() while running {live:?} differ from before the start {defined:?}")
    })?;
    check(
        live.get("sys").map(|d| (d.kind, d.readonly)) == Some((DeviceKind::Disk, false))
            && live.get("ro").map(|d| (d.kind, d.readonly)) == Some((DeviceKind::Disk, true)),
        || format!("devices() kinds and read-only flags: {live:?}"),
    )?;
    for n in ["n0", "n1"] {
        let Some(mac) = live.get(n).and_then(|d| d.mac.clone()) else {
            return fail(format!("devices() has no MAC for {n}: {live:?}"));
        };
        let Some(g) = r.by_mac(&mac) else {
            return fail(format!("the guest has no NIC with MAC {mac} ({n}): {r:?}"));
        };
        check(g.dhcp == "ok", || {
            format!(
                "NIC {n} ({mac}, {}): no DHCP lease over the test network",
                g.name
            )
        })?;
    }
    check(
        live.get("n0").and_then(|d| d.mac.as_deref()) == Some("52:54:00:dd:00:01"),
        || "n0 keeps its configured MAC".into(),
    )?;
    check(r.nics.len() == 2, || {
        format!("the guest sees {} NICs, want 2", r.nics.len())
    })?;
    domain.destroy().await?;
    watch
        .expect(&[E::Stopped(StoppedDetail::Destroyed)])
        .await?;
    Ok(())
}

/// A qcow2 disk and a CD-ROM at boot: the guest sees the qcow2 image's contents at its
/// virtual size, and the CD-ROM's medium read-only (§14.1).
pub(super) async fn boot_with_qcow2_and_cdrom<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    // The gap first, before the images need host tools (qemu-img) the backend's host may lack.
    let (probe, _) = ctx.define("probe", GuestOptions::default()).await?;
    supported(&probe).await?;
    let img = Images::new()?;
    let cd = img.raw("cd.iso", MIB, "DKCD-A")?;
    // A CD-ROM is defined first: a backend without CD-ROMs says so before qemu-img runs.
    ctx.define_config("cdprobe", |name| {
        let mut c = ctx.backend.guest_config(name, GuestOptions::default());
        let mut c2 = disk("cd", &cd);
        c2.cdrom = true;
        c.disks.push(c2);
        Ok(c)
    })
    .await?;
    let qc = img.qcow2("qc.qcow2", 24 * MIB, "DKDISK-qc")?;
    let (domain, mut watch) = ctx
        .define_config("a", |name| {
            let mut c = ctx.backend.guest_config(name, GuestOptions::default());
            let mut q = disk("qc", &qc);
            q.format = DiskFormat::Qcow2;
            c.disks.push(q);
            let mut c2 = disk("cd", &cd);
            c2.cdrom = true;
            c.disks.push(c2);
            Ok(c)
        })
        .await?;
    let defined = devices_of(&domain).await?;
    let mut guest = Guest::boot(&domain, &mut watch).await?;
    let r = guest.report().await?;
    check_guest_disk(&r, "qc", 24 * MIB, false, "DKDISK-qc")?;
    let Some(c) = r.cdrom() else {
        return fail(format!("the guest sees no CD-ROM: {r:?}"));
    };
    check(
        c.ro && c.head.starts_with("DKCD-A") && c.bytes == MIB,
        || format!("the CD-ROM in the guest: {c:?}, want read-only, 1 MiB, DKCD-A"),
    )?;
    check(r.disks.len() == 2, || {
        format!(
            "the guest sees {} block devices, want 2: {r:?}",
            r.disks.len()
        )
    })?;
    let live = devices_of(&domain).await?;
    check(live == defined, || {
        format!("devices() while running {live:?} differ from before the start {defined:?}")
    })?;
    check(
        live.get("cd").map(|d| d.kind) == Some(DeviceKind::Cdrom)
            && live.get("qc").map(|d| d.kind) == Some(DeviceKind::Disk),
        || format!("devices() kinds: {live:?}"),
    )?;
    domain.destroy().await?;
    watch
        .expect(&[E::Stopped(StoppedDetail::Destroyed)])
        .await?;
    Ok(())
}

/// Boot the plain test guest with `disks` (id, size) attached as raw images, NICs (id,
/// MAC) and a CD-ROM `cd` (medium `DKCD-A`).
async fn boot_with<'a, B: TestBackend>(
    ctx: &'a ScenarioCtx<'a, B>,
    img: &Images,
    disks: &[(&str, u64)],
    nics: &[(&str, &str)],
) -> Step<(
    <B::Driver as domkit_core::Driver>::Domain,
    EventWatch,
    Guest,
)> {
    // Every such guest has a CD-ROM `cd` with medium A (`DKCD-A`), for the medium changes,
    // on backends with CD-ROMs.
    let mut made = Vec::new();
    if ctx.backend.has_cdrom() {
        let mut cd = disk("cd", &img.raw("cd-a.iso", MIB, "DKCD-A")?);
        cd.cdrom = true;
        made.push(cd);
    }
    for (d, size) in disks {
        made.push(disk(
            d,
            &img.raw(&format!("{d}.raw"), *size, &format!("DKDISK-{d}"))?,
        ));
    }
    let (domain, mut watch) = ctx
        .define_config("a", |name| {
            let mut c = ctx.backend.guest_config(name, GuestOptions::default());
            c.disks.extend(made);
            c.nics
                .extend(nics.iter().map(|(n, mac)| nic(ctx.backend, n, Some(mac))));
            Ok(c)
        })
        .await?;
    supported(&domain).await?;
    let guest = Guest::boot(&domain, &mut watch).await?;
    Ok((domain, watch, guest))
}

/// A raw disk attached live: `device_added`, listed by `devices()`, the guest sees it and
/// writes to it; a config-only attach changes the definition, not the running domain
/// (§14.2).
pub(super) async fn hotplug_disk<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let img = Images::new()?;
    let (domain, mut watch, mut guest) = boot_with(ctx, &img, &[], &[]).await?;
    let h1 = img.raw("h1.raw", 12 * MIB, "DKDISK-h1")?;
    let got = domain
        .attach_device(DeviceSpec::Disk(disk("h1", &h1)), DeviceScope::Live)
        .await?;
    check(got == id("h1"), || format!("attach returned id {got}"))?;
    watch.expect(&[E::DeviceAdded(id("h1"))]).await?;
    let r = guest
        .report_until("the hotplugged disk h1", |r| r.by_serial("h1").is_some())
        .await?;
    check_guest_disk(&r, "h1", 12 * MIB, false, "DKDISK-h1")?;
    let live = devices_of(&domain).await?;
    check(live.contains_key("h1"), || {
        format!("devices() lacks h1: {live:?}")
    })?;
    check(
        !domain
            .defined_devices()
            .await?
            .iter()
            .any(|d| d.id == id("h1")),
        || "a live attach changed the definition".into(),
    )?;
    // Config only: the definition has it, the running guest does not.
    let h2 = img.raw("h2.raw", 4 * MIB, "DKDISK-h2")?;
    domain
        .attach_device(DeviceSpec::Disk(disk("h2", &h2)), DeviceScope::Config)
        .await?;
    check(
        domain
            .defined_devices()
            .await?
            .iter()
            .any(|d| d.id == id("h2")),
        || "a config attach is not in the definition".into(),
    )?;
    check(!devices_of(&domain).await?.contains_key("h2"), || {
        "a config attach changed the running domain".into()
    })?;
    watch.expect_quiet(QUIET).await?;
    domain.destroy().await?;
    watch
        .expect(&[E::Stopped(StoppedDetail::Destroyed)])
        .await?;
    Ok(())
}

/// A boot-time disk and a hotplugged one detached live: `device_removed` once the guest
/// released each, gone from `devices()` and from the guest; the id can be attached again
/// (its backend was freed) (§14.2).
pub(super) async fn hotunplug_disk<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let img = Images::new()?;
    let (domain, mut watch, mut guest) = boot_with(ctx, &img, &[("d1", 8 * MIB)], &[]).await?;
    let h1 = img.raw("h1.raw", 4 * MIB, "DKDISK-h1")?;
    domain
        .attach_device(DeviceSpec::Disk(disk("h1", &h1)), DeviceScope::Live)
        .await?;
    watch.expect(&[E::DeviceAdded(id("h1"))]).await?;
    guest
        .report_until("the hotplugged disk h1", |r| r.by_serial("h1").is_some())
        .await?;
    let opts = DetachOptions {
        scope: DeviceScope::Live,
        timeout: UNPLUG,
    };
    for d in ["h1", "d1"] {
        domain.detach_device(id(d), opts).await?;
        watch.expect(&[E::DeviceRemoved(id(d))]).await?;
        check(!devices_of(&domain).await?.contains_key(d), || {
            format!("devices() still lists {d} after its detach")
        })?;
    }
    let r = guest.report().await?;
    check(
        r.by_serial("h1").is_none() && r.by_serial("d1").is_none(),
        || format!("the guest still sees a detached disk: {r:?}"),
    )?;
    expect_err(
        domain.detach_device(id("d1"), opts).await,
        "not_found for a device that is gone",
        |e| matches!(e, Error::NotFound { .. }),
    )?;
    domain
        .attach_device(DeviceSpec::Disk(disk("h1", &h1)), DeviceScope::Live)
        .await?;
    watch.expect(&[E::DeviceAdded(id("h1"))]).await?;
    guest
        .report_until("h1 attached again", |r| r.by_serial("h1").is_some())
        .await?;
    domain.destroy().await?;
    watch
        .expect(&[E::Stopped(StoppedDetail::Destroyed)])
        .await?;
    Ok(())
}

/// A NIC attached live: `device_added`, the guest gets an interface with its MAC and a
/// DHCP lease over it (§14.2).
pub(super) async fn hotplug_nic<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let img = Images::new()?;
    let (domain, mut watch, mut guest) = boot_with(ctx, &img, &[], &[]).await?;
    let mac = "52:54:00:dd:01:07";
    domain
        .attach_device(
            DeviceSpec::Nic(nic(ctx.backend, "hn", Some(mac))),
            DeviceScope::Live,
        )
        .await?;
    watch.expect(&[E::DeviceAdded(id("hn"))]).await?;
    let r = guest
        .report_until("the hotplugged NIC", |r| r.by_mac(mac).is_some())
        .await?;
    let n = r.by_mac(mac).cloned().unwrap_or_default();
    check(n.dhcp == "ok", || {
        format!("the hotplugged NIC ({}) got no DHCP lease", n.name)
    })?;
    check(
        devices_of(&domain)
            .await?
            .get("hn")
            .and_then(|d| d.mac.clone())
            == Some(mac.into()),
        || "devices() lacks the hotplugged NIC with its MAC".into(),
    )?;
    domain.destroy().await?;
    watch
        .expect(&[E::Stopped(StoppedDetail::Destroyed)])
        .await?;
    Ok(())
}

/// A boot-time NIC detached live: `device_removed`, gone in the guest; attached again with
/// the same id and MAC (its netdev was freed) (§14.2).
pub(super) async fn hotunplug_nic<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let img = Images::new()?;
    let mac = "52:54:00:dd:02:01";
    let (domain, mut watch, mut guest) = boot_with(ctx, &img, &[], &[("n0", mac)]).await?;
    guest
        .report_until("the boot NIC", |r| r.by_mac(mac).is_some())
        .await?;
    let opts = DetachOptions {
        scope: DeviceScope::Live,
        timeout: UNPLUG,
    };
    domain.detach_device(id("n0"), opts).await?;
    watch.expect(&[E::DeviceRemoved(id("n0"))]).await?;
    let r = guest.report().await?;
    check(r.by_mac(mac).is_none(), || {
        format!("the guest still has the detached NIC: {r:?}")
    })?;
    domain
        .attach_device(
            DeviceSpec::Nic(nic(ctx.backend, "n0", Some(mac))),
            DeviceScope::Live,
        )
        .await?;
    watch.expect(&[E::DeviceAdded(id("n0"))]).await?;
    guest
        .report_until("n0 attached again", |r| r.by_mac(mac).is_some())
        .await?;
    domain.destroy().await?;
    watch
        .expect(&[E::Stopped(StoppedDetail::Destroyed)])
        .await?;
    Ok(())
}

/// The guest ignores the unplug request (its hotplug GPE masked): the detach times out
/// with a typed `timeout` saying the device is still attached, `device_removal_failed`,
/// the device is listed and usable in the guest; once the guest handles the pending
/// request, `device_removed` follows (§14.2).
pub(super) async fn unplug_refused_by_guest<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    if let Some(reason) = ctx.backend.unplug_refusal_unsupported() {
        return Err(Stop::Unsupported(reason.into()));
    }
    let img = Images::new()?;
    let (domain, mut watch, mut guest) = boot_with(ctx, &img, &[("d1", 8 * MIB)], &[]).await?;
    guest
        .run(
            "domkit-devices ignore-unplug",
            "DKDEV-IGNORING",
            Duration::from_secs(30),
        )
        .await?;
    let opts = DetachOptions {
        scope: DeviceScope::Both,
        timeout: Duration::from_secs(5),
    };
    let err = domain.detach_device(id("d1"), opts).await;
    expect_err(
        err,
        "timeout (detach_device) saying the device is still attached",
        |e| {
            matches!(e, Error::Timeout { operation: Operation::DetachDevice, hint, .. }
                if hint.contains("still attached"))
        },
    )?;
    watch.expect(&[E::DeviceRemovalFailed(id("d1"))]).await?;
    check(devices_of(&domain).await?.contains_key("d1"), || {
        "devices() no longer lists the device whose unplug timed out".into()
    })?;
    check(
        domain
            .defined_devices()
            .await?
            .iter()
            .any(|d| d.id == id("d1")),
        || "a failed live+config detach changed the definition".into(),
    )?;
    let r = guest.report().await?;
    check_guest_disk(&r, "d1", 8 * MIB, false, "DKDISK-d1")?;
    guest
        .run(
            "domkit-devices accept-unplug",
            "DKDEV-ACCEPTING",
            Duration::from_secs(30),
        )
        .await?;
    // The pending request is handled now (or again, by a second detach).
    match watch
        .expect_within(&[E::DeviceRemoved(id("d1"))], Duration::from_secs(3))
        .await
    {
        Ok(()) => {}
        Err(_) => {
            domain
                .detach_device(
                    id("d1"),
                    DetachOptions {
                        scope: DeviceScope::Live,
                        timeout: UNPLUG,
                    },
                )
                .await?;
            watch.expect(&[E::DeviceRemoved(id("d1"))]).await?;
        }
    }
    check(!devices_of(&domain).await?.contains_key("d1"), || {
        "devices() still lists d1 after the guest released it".into()
    })?;
    domain.destroy().await?;
    watch
        .expect(&[E::Stopped(StoppedDetail::Destroyed)])
        .await?;
    Ok(())
}

/// CD-ROM eject (`device_removed`, empty tray in `devices()`, no medium in the guest) and
/// insert of another image (`device_added`, the guest reads it); a disk is not a CD-ROM
/// (§14.2).
pub(super) async fn cdrom_change<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let img = Images::new()?;
    let a = img.raw("a.iso", MIB, "DKCD-A")?;
    let b = img.raw("b.iso", 2 * MIB, "DKCD-B")?;
    let d1 = img.raw("d1.raw", 4 * MIB, "DKDISK-d1")?;
    let (domain, mut watch) = ctx
        .define_config("a", |name| {
            let mut c = ctx.backend.guest_config(name, GuestOptions::default());
            let mut cd = disk("cd", &a);
            cd.cdrom = true;
            c.disks.push(cd);
            c.disks.push(disk("d1", &d1));
            Ok(c)
        })
        .await?;
    supported(&domain).await?;
    let mut guest = Guest::boot(&domain, &mut watch).await?;
    guest
        .report_until("medium A", |r| {
            r.cdrom().is_some_and(|c| c.head.starts_with("DKCD-A"))
        })
        .await?;
    domain
        .change_media(id("cd"), None, DeviceScope::Live)
        .await?;
    watch.expect(&[E::DeviceRemoved(id("cd"))]).await?;
    // Ejecting an empty tray: a no-op, no event (the next event must be the insert's).
    domain
        .change_media(id("cd"), None, DeviceScope::Live)
        .await?;
    let live = devices_of(&domain).await?;
    check(live.get("cd").is_some_and(|d| d.path.is_none()), || {
        format!("devices() after eject: {live:?}")
    })?;
    guest
        .report_until("the empty tray", |r| {
            r.cdrom().is_some_and(|c| c.head.is_empty())
        })
        .await?;
    domain
        .change_media(id("cd"), Some(b.clone()), DeviceScope::Live)
        .await?;
    watch.expect(&[E::DeviceAdded(id("cd"))]).await?;
    let r = guest
        .report_until("medium B", |r| {
            r.cdrom().is_some_and(|c| c.head.starts_with("DKCD-B"))
        })
        .await?;
    let c = r.cdrom().cloned().unwrap_or_default();
    check(c.bytes == 2 * MIB && c.ro, || {
        format!("medium B in the guest: {c:?}")
    })?;
    check(
        devices_of(&domain)
            .await?
            .get("cd")
            .and_then(|d| d.path.clone())
            == Some(b.clone()),
        || "devices() does not show medium B".into(),
    )?;
    expect_err(
        domain
            .change_media(id("d1"), Some(b.clone()), DeviceScope::Live)
            .await,
        "invalid_config for a medium change of a disk",
        |e| matches!(e, Error::InvalidConfig(ConfigError::BadDeviceChange { .. })),
    )?;
    watch.expect_quiet(QUIET).await?;
    domain.destroy().await?;
    watch
        .expect(&[E::Stopped(StoppedDetail::Destroyed)])
        .await?;
    Ok(())
}

/// Each bad input is `invalid_config` with its typed reason, and nothing changes (no
/// event, `devices()` the same): a missing image, a directory, a duplicate id, a
/// malformed MAC, a MAC in use, a bridge that does not exist, a CD-ROM hot-add, and the
/// device after the last free slot (§14.4).
pub(super) async fn attach_bad_device<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let img = Images::new()?;
    let d1 = img.raw("d1.raw", 4 * MIB, "DKDISK-d1")?;
    let mac = "52:54:00:dd:03:01";
    let (domain, mut watch) = ctx
        .define_config("a", |name| {
            let mut c = ctx.backend.guest_config(name, GuestOptions::default());
            c.disks.push(disk("d1", &d1));
            c.nics.push(nic(ctx.backend, "n0", Some(mac)));
            Ok(c)
        })
        .await?;
    supported(&domain).await?;
    // Paused: the guest takes no part in a refusal, and costs no CPU.
    domain
        .start(domkit_core::StartOptions { paused: true })
        .await?;
    watch
        .expect(&[
            E::Started(StartedDetail::Booted),
            E::Suspended(SuspendedDetail::Paused),
        ])
        .await?;
    let before = devices_of(&domain).await?;
    let spare = img.raw("spare.raw", MIB, "DKDISK-spare")?;
    let mut cd = disk("cd9", &spare);
    cd.cdrom = true;
    let cases: Vec<(&str, DeviceSpec, IsReason)> = vec![
        (
            "missing image",
            DeviceSpec::Disk(disk("x1", &img.path("nope.raw"))),
            |e| matches!(e, ConfigError::MissingFile { .. }),
        ),
        (
            "a directory",
            DeviceSpec::Disk(disk("x2", img.dir.path())),
            |e| matches!(e, ConfigError::NotAFile { .. }),
        ),
        ("duplicate id", DeviceSpec::Disk(disk("d1", &spare)), |e| {
            matches!(e, ConfigError::DuplicateDeviceId { .. })
        }),
        (
            "duplicate id across kinds",
            DeviceSpec::Nic(nic(ctx.backend, "d1", Some("52:54:00:dd:03:09"))),
            |e| matches!(e, ConfigError::DuplicateDeviceId { .. }),
        ),
        (
            "malformed MAC",
            DeviceSpec::Nic(nic(ctx.backend, "x3", Some("52:54:00:zz:00:01"))),
            |e| matches!(e, ConfigError::BadMac { .. }),
        ),
        (
            "multicast MAC",
            DeviceSpec::Nic(nic(ctx.backend, "x4", Some("01:00:5e:00:00:01"))),
            |e| matches!(e, ConfigError::BadMac { .. }),
        ),
        (
            "MAC in use",
            DeviceSpec::Nic(nic(ctx.backend, "x5", Some("52:54:00:DD:03:01"))),
            |e| matches!(e, ConfigError::DuplicateMac { .. }),
        ),
        (
            "missing bridge",
            DeviceSpec::Nic(Nic {
                id: Some(id("x6")),
                mac: None,
                backend: NicBackend::Bridge("dknobr0".into()),
            }),
            |e| matches!(e, ConfigError::MissingBridge { .. }),
        ),
        ("CD-ROM hot-add", DeviceSpec::Disk(cd), |e| {
            matches!(e, ConfigError::BadDeviceChange { .. })
        }),
    ];
    for (what, spec, want) in cases {
        for scope in [DeviceScope::Live, DeviceScope::Both] {
            expect_err(
                domain.attach_device(spec.clone(), scope).await,
                &format!("invalid_config for {what} ({scope:?})"),
                |e| matches!(e, Error::InvalidConfig(ce) if want(ce)),
            )?;
        }
    }
    watch.expect_quiet(QUIET).await?;
    check(devices_of(&domain).await? == before, || {
        "a refused attach changed devices()".into()
    })?;
    // Fill the bus (read-only: one image may be opened read-only many times).
    let mut added = 0;
    let full = loop {
        let mut d = disk(&format!("f{added}"), &spare);
        d.readonly = true;
        match domain
            .attach_device(DeviceSpec::Disk(d), DeviceScope::Live)
            .await
        {
            Ok(_) => added += 1,
            Err(e) => break e,
        }
        if added > 64 {
            return fail("more than 64 disks were attached: no slot limit");
        }
    };
    check(
        matches!(&full, Error::InvalidConfig(ConfigError::NoFreeSlot { .. })),
        || format!("after {added} disks: {full}, want no_free_slot"),
    )?;
    let kinds: Vec<_> = (0..added)
        .map(|i| E::DeviceAdded(id(&format!("f{i}"))))
        .collect();
    watch.expect(&kinds).await?;
    watch.expect_quiet(QUIET).await?;
    check(
        devices_of(&domain).await?.len() == before.len() + added,
        || "devices() after filling the bus".into(),
    )?;
    domain.destroy().await?;
    watch
        .expect(&[E::Stopped(StoppedDetail::Destroyed)])
        .await?;
    Ok(())
}

/// Hotplugged disk and NIC survive a save and restore: the same devices at the same
/// addresses, the guest still sees them, and they can be detached afterwards (§14.3).
pub(super) async fn devices_survive_save_restore<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    if ctx.backend.name() == "libxl" {
        // A known defect, kept a gap (never a pass) until fixed: with the guest agent's PV
        // channel now in every test domU (issue 9) and a hotplugged disk and NIC, the
        // guest's device report after the restore hangs at its first disk (reproduced 2 of
        // 2 in the nested host on 2026-12-02 after merging issues 9 and 10 on Xen; passed
        // before the merge).
        return Err(Stop::Unsupported(
            "known defect on libxl (open, issue 10): after a restore of a domain with a \
             hotplugged disk and NIC and the agent channel, the guest's first disk read \
             hangs (the device report stops after DKDEV-BEGIN)"
                .into(),
        ));
    }
    let img = Images::new()?;
    let (domain, mut watch, mut guest) = boot_with(ctx, &img, &[("d1", 4 * MIB)], &[]).await?;
    let h1 = img.raw("h1.raw", 6 * MIB, "DKDISK-h1")?;
    let mac = "52:54:00:dd:04:01";
    domain
        .attach_device(DeviceSpec::Disk(disk("h1", &h1)), DeviceScope::Live)
        .await?;
    domain
        .attach_device(
            DeviceSpec::Nic(nic(ctx.backend, "hn", Some(mac))),
            DeviceScope::Live,
        )
        .await?;
    watch
        .expect(&[E::DeviceAdded(id("h1")), E::DeviceAdded(id("hn"))])
        .await?;
    guest
        .report_until("h1 and hn", |r| {
            r.by_serial("h1").is_some() && r.by_mac(mac).is_some()
        })
        .await?;
    let before = devices_of(&domain).await?;
    drop(guest);
    let save = img.path("dom.save");
    domain.save(&save).await?;
    watch
        .expect(&[
            E::Suspended(SuspendedDetail::Saving),
            E::Stopped(StoppedDetail::Saved),
        ])
        .await?;
    domain.restore(&save, RestoreOptions::default()).await?;
    watch.expect(&[E::Started(StartedDetail::Restored)]).await?;
    let after = devices_of(&domain).await?;
    check(after == before, || {
        format!("devices() after restore {after:?} differ from before the save {before:?}")
    })?;
    let console = domain.console(ConsoleAccess::ReadWrite).await?;
    let mut guest = Guest {
        console,
        seen: Seen::default(),
        reports: 100,
    };
    let r = guest.report().await?;
    check_guest_disk(&r, "h1", 6 * MIB, false, "DKDISK-h1")?;
    check_guest_disk(&r, "d1", 4 * MIB, false, "DKDISK-d1")?;
    check(r.by_mac(mac).is_some_and(|n| n.dhcp == "ok"), || {
        format!("the hotplugged NIC after restore: {r:?}")
    })?;
    domain
        .detach_device(
            id("h1"),
            DetachOptions {
                scope: DeviceScope::Live,
                timeout: UNPLUG,
            },
        )
        .await?;
    watch.expect(&[E::DeviceRemoved(id("h1"))]).await?;
    domain.destroy().await?;
    watch
        .expect(&[E::Stopped(StoppedDetail::Destroyed)])
        .await?;
    Ok(())
}

/// Concurrent callers (§6.0): eight attaches at once (distinct ids) all succeed, each once
/// in `devices()` and in the events, each in its own slot; two attaches of one id: one
/// wins, the other is `duplicate_device_id`; two detaches of one device: one completes,
/// the other is `not_found`; two medium changes: the last queued one is what stays.
pub(super) async fn hotplug_concurrent<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let img = Images::new()?;
    let a = img.raw("a.iso", MIB, "DKCD-A")?;
    let b = img.raw("b.iso", MIB, "DKCD-B")?;
    // One image per id (the Xen test guest names a disk after its image, module doc).
    for n in (0..8).map(|i| format!("c{i}")).chain(["same".to_string()]) {
        img.raw(&format!("{n}.raw"), MIB, &format!("DKDISK-{n}"))?;
    }
    let cdrom = ctx.backend.has_cdrom();
    let (domain, mut watch) = ctx
        .define_config("a", |name| {
            let mut c = ctx.backend.guest_config(name, GuestOptions::default());
            if cdrom {
                let mut cd = disk("cd", &a);
                cd.cdrom = true;
                c.disks.push(cd);
            }
            Ok(c)
        })
        .await?;
    supported(&domain).await?;
    let mut guest = Guest::boot(&domain, &mut watch).await?;
    let ro = |n: &str| {
        let mut d = disk(n, &img.path(&format!("{n}.raw")));
        d.readonly = true;
        DeviceSpec::Disk(d)
    };
    let mut tasks = Vec::new();
    for i in 0..8 {
        let d = domain.clone();
        let spec = ro(&format!("c{i}"));
        tasks.push(tokio::spawn(async move {
            d.attach_device(spec, DeviceScope::Live).await
        }));
    }
    for t in tasks {
        match t.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return fail(format!("a concurrent attach failed: {e}")),
            Err(e) => return fail(format!("a concurrent attach task failed: {e}")),
        }
    }
    let got = watch.collect_quiet(QUIET).await?;
    let mut added: Vec<String> = got
        .iter()
        .filter_map(|k| match k {
            E::DeviceAdded(d) => Some(d.to_string()),
            _ => None,
        })
        .collect();
    added.sort();
    let want: Vec<String> = (0..8).map(|i| format!("c{i}")).collect();
    check(added == want && got.len() == 8, || {
        format!("events of 8 concurrent attaches: {}", kinds_list(&got))
    })?;
    let live = devices_of(&domain).await?;
    let mut addresses: Vec<_> = live.values().filter_map(|d| d.address.clone()).collect();
    addresses.sort();
    addresses.dedup();
    check(
        addresses.len() == live.len() && live.len() == 8 + usize::from(cdrom),
        || format!("devices() after 8 concurrent attaches: {live:?}"),
    )?;
    guest
        .report_until("the 8 disks", |r| {
            (0..8).all(|i| r.by_serial(&format!("c{i}")).is_some())
        })
        .await?;
    // One id, two callers.
    let (d1, d2) = (domain.clone(), domain.clone());
    let (s1, s2) = (ro("same"), ro("same"));
    let (r1, r2) = tokio::join!(
        d1.attach_device(s1, DeviceScope::Live),
        d2.attach_device(s2, DeviceScope::Live)
    );
    let dup = |r: &domkit_core::Result<DeviceId>| {
        matches!(
            r,
            Err(Error::InvalidConfig(ConfigError::DuplicateDeviceId { .. }))
        )
    };
    check((r1.is_ok() && dup(&r2)) || (r2.is_ok() && dup(&r1)), || {
        format!(
            "two attaches of one id: {r1:?} and {r2:?}, want one Ok and one duplicate_device_id"
        )
    })?;
    watch.expect(&[E::DeviceAdded(id("same"))]).await?;
    // One device, two detaches.
    let opts = DetachOptions {
        scope: DeviceScope::Live,
        timeout: UNPLUG,
    };
    let (r1, r2) = tokio::join!(
        d1.detach_device(id("c0"), opts),
        d2.detach_device(id("c0"), opts)
    );
    let gone = |r: &domkit_core::Result<()>| matches!(r, Err(Error::NotFound { .. }));
    check(
        (r1.is_ok() && gone(&r2)) || (r2.is_ok() && gone(&r1)),
        || format!("two detaches of one device: {r1:?} and {r2:?}, want one Ok and one not_found"),
    )?;
    watch.expect(&[E::DeviceRemoved(id("c0"))]).await?;
    if !cdrom {
        // No medium changes on a backend without CD-ROMs (cdrom_change is its gap).
        domain.destroy().await?;
        watch
            .expect(&[E::Stopped(StoppedDetail::Destroyed)])
            .await?;
        return Ok(());
    }
    // Two medium changes: queue order (the first call polled first queues first).
    let (r1, r2) = tokio::join!(
        d1.change_media(id("cd"), Some(b.clone()), DeviceScope::Live),
        d2.change_media(id("cd"), Some(a.clone()), DeviceScope::Live)
    );
    r1?;
    r2?;
    watch
        .expect(&[E::DeviceAdded(id("cd")), E::DeviceAdded(id("cd"))])
        .await?;
    check(
        devices_of(&domain)
            .await?
            .get("cd")
            .and_then(|d| d.path.clone())
            == Some(a.clone()),
        || "after two medium changes devices() does not show the last queued one".into(),
    )?;
    guest
        .report_until("the last medium", |r| {
            r.cdrom().is_some_and(|c| c.head.starts_with("DKCD-A"))
        })
        .await?;
    domain.destroy().await?;
    watch
        .expect(&[E::Stopped(StoppedDetail::Destroyed)])
        .await?;
    Ok(())
}

/// Cancelled callers (§6.0): an attach, a detach and a medium change whose futures are
/// dropped (at 1 ms, and once running) leave a truthful state: the device is there with
/// its one event, or absent with none, as `devices()` and the guest agree; a dropped detach
/// completes in the background; the next operation queues behind it.
pub(super) async fn hotplug_cancelled<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let img = Images::new()?;
    let (domain, mut watch, mut guest) = boot_with(ctx, &img, &[("d1", 4 * MIB)], &[]).await?;
    for (n, after) in [("k1", 1u64), ("k2", 30)] {
        // One image per id: the Xen test guest names a disk after its image (module doc).
        let image = img.raw(&format!("{n}.raw"), 4 * MIB, &format!("DKDISK-{n}"))?;
        let mut spec = disk(n, &image);
        spec.readonly = true;
        let r = tokio::time::timeout(
            Duration::from_millis(after),
            domain.attach_device(DeviceSpec::Disk(spec), DeviceScope::Live),
        )
        .await;
        // The next operation queues behind whatever part of it runs in the background.
        let listed = devices_of(&domain).await?;
        let _ = domain.pause().await;
        domain.resume().await?;
        let listed_after = devices_of(&domain).await?.contains_key(n);
        let got = watch.collect_quiet(QUIET).await?;
        let added = got.iter().filter(|k| **k == E::DeviceAdded(id(n))).count();
        check(added == usize::from(listed_after), || {
            format!(
                "attach of {n} dropped after {after} ms ({r:?}; listed before {:?}): listed {listed_after}, events {}",
                listed.contains_key(n),
                kinds_list(&got)
            )
        })?;
        if listed_after {
            guest
                .report_until(
                    &format!("the attach of {n} completed in the background"),
                    |r| r.by_serial(n).is_some(),
                )
                .await?;
        }
    }
    // A detach dropped while it waits for the guest completes in the background.
    let r = tokio::time::timeout(
        Duration::from_millis(50),
        domain.detach_device(
            id("d1"),
            DetachOptions {
                scope: DeviceScope::Live,
                timeout: UNPLUG,
            },
        ),
    )
    .await;
    check(r.is_err(), || {
        format!("a detach returned within 50 ms: {r:?}")
    })?;
    watch.expect(&[E::DeviceRemoved(id("d1"))]).await?;
    check(!devices_of(&domain).await?.contains_key("d1"), || {
        "a dropped detach that completed left d1 in devices()".into()
    })?;
    guest
        .report_until("d1 gone", |r| r.by_serial("d1").is_none())
        .await?;
    // A medium change dropped at 1 ms: medium B with its one event, or A and none (on
    // backends with CD-ROMs; cdrom_change is their gap elsewhere).
    if !ctx.backend.has_cdrom() {
        domain.destroy().await?;
        watch
            .expect(&[E::Stopped(StoppedDetail::Destroyed)])
            .await?;
        return Ok(());
    }
    let b = img.raw("cd-b.iso", MIB, "DKCD-B")?;
    let r = tokio::time::timeout(
        Duration::from_millis(1),
        domain.change_media(id("cd"), Some(b.clone()), DeviceScope::Live),
    )
    .await;
    let _ = domain.pause().await;
    domain.resume().await?;
    let got = watch.collect_quiet(QUIET).await?;
    let changed = devices_of(&domain)
        .await?
        .get("cd")
        .and_then(|d| d.path.clone())
        == Some(b);
    let added = got
        .iter()
        .filter(|k| **k == E::DeviceAdded(id("cd")))
        .count();
    check(added == usize::from(changed), || {
        format!(
            "medium change dropped at 1 ms ({r:?}): changed {changed}, events {}",
            kinds_list(&got)
        )
    })?;
    let want = if changed { "DKCD-B" } else { "DKCD-A" };
    guest
        .report_until(&format!("medium {want}"), |r| {
            r.cdrom().is_some_and(|c| c.head.starts_with(want))
        })
        .await?;
    domain.destroy().await?;
    watch
        .expect(&[E::Stopped(StoppedDetail::Destroyed)])
        .await?;
    Ok(())
}

/// The backend killed mid-operation (§6.0, §10): a detach waiting on a guest that ignores
/// the unplug returns a typed error at once, the domain ends with the §10 reason and no
/// device event; an attach racing the kill is `Ok` or typed, never a hang; a device change
/// of the shut-off domain is `invalid_state` live, fine for the definition.
pub(super) async fn hotplug_killed<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    if let Some(reason) = ctx.backend.unplug_refusal_unsupported() {
        return Err(Stop::Unsupported(reason.into()));
    }
    let img = Images::new()?;
    let (domain, mut watch, mut guest) = boot_with(ctx, &img, &[("d1", 4 * MIB)], &[]).await?;
    guest
        .run(
            "domkit-devices ignore-unplug",
            "DKDEV-IGNORING",
            Duration::from_secs(30),
        )
        .await?;
    let d = domain.clone();
    let task = tokio::spawn(async move {
        d.detach_device(
            id("d1"),
            DetachOptions {
                scope: DeviceScope::Live,
                timeout: Duration::from_secs(60),
            },
        )
        .await
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let reason = hook(
        "out-of-band kill",
        ctx.backend.kill_out_of_band(&domain).await,
    )?;
    let t0 = std::time::Instant::now();
    let r = match tokio::time::timeout(Duration::from_secs(10), task).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return fail(format!("the detach task failed: {e}")),
        Err(_) => return fail("the detach whose backend was killed did not return in 10 s"),
    };
    expect_err(r, "a backend or control_broken error", |e| {
        matches!(e, Error::Backend { .. } | Error::ControlBroken { .. })
    })?;
    check(t0.elapsed() < Duration::from_secs(5), || {
        format!(
            "the detach took {:?} to return after the kill",
            t0.elapsed()
        )
    })?;
    let detail = domkit_core::lifecycle::stopped_detail(reason);
    let got = watch.collect_quiet(QUIET).await?;
    check(got == [E::Stopped(detail)], || {
        format!(
            "events after the kill: {}, want [{}]",
            kinds_list(&got),
            E::Stopped(detail)
        )
    })?;
    let h1 = img.raw("h1.raw", MIB, "DKDISK-h1")?;
    expect_err(
        domain
            .attach_device(DeviceSpec::Disk(disk("h1", &h1)), DeviceScope::Live)
            .await,
        "invalid_state for a live attach to a shut-off domain",
        is_invalid_state(Operation::AttachDevice),
    )?;
    // The definition still has d1 and takes h1; the next start has both.
    domain
        .attach_device(DeviceSpec::Disk(disk("h1", &h1)), DeviceScope::Config)
        .await?;
    let defined: Vec<_> = domain
        .defined_devices()
        .await?
        .into_iter()
        .map(|d| d.id.to_string())
        .collect();
    check(
        defined.contains(&"d1".into()) && defined.contains(&"h1".into()),
        || format!("definition after the kill and a config attach: {defined:?}"),
    )?;
    // An attach racing a kill: Ok or typed, never a hang.
    let mut guest = Guest::boot(&domain, &mut watch).await?;
    guest
        .report_until("d1 and h1 at the next start", |r| {
            r.by_serial("d1").is_some() && r.by_serial("h1").is_some()
        })
        .await?;
    let h2 = img.raw("h2.raw", MIB, "DKDISK-h2")?;
    let b = img.raw("cd-b.iso", MIB, "DKCD-B")?;
    let d = domain.clone();
    let media =
        tokio::spawn(async move { d.change_media(id("cd"), Some(b), DeviceScope::Live).await });
    let d = domain.clone();
    let task = tokio::spawn(async move {
        d.attach_device(DeviceSpec::Disk(disk("h2", &h2)), DeviceScope::Live)
            .await
    });
    let reason = hook(
        "out-of-band kill",
        ctx.backend.kill_out_of_band(&domain).await,
    )?;
    match tokio::time::timeout(Duration::from_secs(10), task).await {
        Ok(Ok(Ok(_))) => {}
        Ok(Ok(Err(
            Error::Backend { .. } | Error::ControlBroken { .. } | Error::InvalidState { .. },
        ))) => {}
        Ok(Ok(Err(e))) => return fail(format!("an attach racing a kill: {e}")),
        Ok(Err(e)) => return fail(format!("the attach task failed: {e}")),
        Err(_) => return fail("an attach racing a kill did not return in 10 s"),
    }
    match tokio::time::timeout(Duration::from_secs(10), media).await {
        Ok(Ok(Ok(())))
        | Ok(Ok(Err(
            Error::Backend { .. } | Error::ControlBroken { .. } | Error::InvalidState { .. },
        ))) => {}
        Ok(Ok(Err(e))) => return fail(format!("a medium change racing a kill: {e}")),
        Ok(Err(e)) => return fail(format!("the medium change task failed: {e}")),
        Err(_) => return fail("a medium change racing a kill did not return in 10 s"),
    }
    let got = watch.collect_quiet(QUIET).await?;
    let detail = domkit_core::lifecycle::stopped_detail(reason);
    check(
        got.last() == Some(&E::Stopped(detail))
            && got[..got.len() - 1]
                .iter()
                .all(|k| *k == E::DeviceAdded(id("h2")) || *k == E::DeviceAdded(id("cd"))),
        || format!("events of an attach racing a kill: {}", kinds_list(&got)),
    )?;
    Ok(())
}

/// A disk hotplugged live survives the manager (§14.3 with §11.3): after an orderly
/// detach the next persistent manager lists it (same devices, same addresses) and can
/// detach it (the guest releases it: `device_removed`).
pub(super) async fn devices_survive_reattach<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let away = super::durable::Away::new(ctx)?;
    let result = async {
        let img = Images::new()?;
        let driver = away.open().await?;
        let name = away.name("a");
        let domain = domkit_core::Driver::define(
            &driver,
            ctx.backend.guest_config(&name, GuestOptions::default()),
        )
        .await?;
        supported(&domain).await?;
        domain.start(Default::default()).await?;
        hook(
            "waiting for the guest to be ready",
            ctx.backend.wait_guest_ready(&domain, BOOT_TIMEOUT).await,
        )?;
        let uuid = domain.id().uuid.to_string();
        let h1 = img.raw("h1.raw", 4 * MIB, "DKDISK-h1")?;
        domain
            .attach_device(DeviceSpec::Disk(disk("h1", &h1)), DeviceScope::Live)
            .await?;
        let before = devices_of(&domain).await?;
        check(before.contains_key("h1"), || "h1 not attached".into())?;
        drop(domain);
        away.backend().detach(driver);
        let driver = away.open().await?;
        let domain = away.reattached(&driver, &name, &uuid).await?;
        let after = devices_of(&domain).await?;
        check(after == before, || {
            format!("devices() after reattach {after:?}, before {before:?}")
        })?;
        let mut watch = EventWatch::new(domain.subscribe());
        domain
            .detach_device(
                id("h1"),
                DetachOptions {
                    scope: DeviceScope::Live,
                    timeout: UNPLUG,
                },
            )
            .await?;
        watch.expect(&[E::DeviceRemoved(id("h1"))]).await?;
        check(!devices_of(&domain).await?.contains_key("h1"), || {
            "h1 still listed after its detach".into()
        })?;
        drop(domain);
        drop(driver);
        Ok(())
    }
    .await;
    away.finish(result).await
}
