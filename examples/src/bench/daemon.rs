//! domkitd (issue 13): the same calls in-process and through a real domkitd process over its
//! Unix socket, interleaved in one run, plus the CLI round trip and the daemon's idle cost.
//!
//! One paused QEMU per side (a persistent in-process driver; the daemon's own driver), the
//! same config. Per repetition, alternating which side goes first:
//! - `info`: `Domain::info` vs the `Info` RPC (no backend round trip: the pure cost of the
//!   daemon hop: gRPC over a Unix socket);
//! - `pause_resume`: a resume + pause pair (two QMP round trips and their events) vs the
//!   same through `Resume` + `Pause`;
//! - `cli`: `domkit domstate` as a process (spawn, connect, `Info`, print), wall time, and
//!   in the same repetition `virsh domstate` of a paused libvirt domain (same QEMU binary,
//!   TCG) against the running libvirtd, when `virsh` can reach one (`virsh_peer`; else the
//!   reason is a note).
//!
//! Then the daemon's RSS and CPU over an idle window, and its RSS with N = 100 paused
//! domains (per domain: the growth over the one-domain idle RSS / 99).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use domkit_core::{Domain, Driver, StartOptions};
use domkit_qemu::{QemuDriver, QemuDriverOptions};
use domkitd::client::{self, Target};
use domkitd::pb;

use super::qemu::{bench_config, SCALE_MEMORY_MIB};
use super::results::Results;
use super::stats::percentile;

/// Info calls per side per repetition.
const INFO_CALLS: usize = 300;
/// Resume + pause pairs per side per repetition.
const PAUSE_RESUME: usize = 20;
/// `domkit domstate` (and `virsh domstate`) runs per repetition.
const CLI_RUNS: usize = 10;
/// Domains in the daemon for its RSS per domain.
const RSS_DOMAINS: usize = 100;
/// The libvirt connection of the `virsh domstate` peer (`$DOMKIT_BENCH_VIRSH_URI`).
const VIRSH_URI: &str = "qemu:///system";
/// The peer domain's name (transient: gone with its `virsh destroy`).
const VIRSH_DOMAIN: &str = "domkit-bench-virsh";

struct DaemonProcess {
    child: Child,
    socket: PathBuf,
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A binary built beside this one (`cargo build --release -p domkitd -p domkit-examples`).
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    if !path.is_file() {
        bail!(
            "{} not found: build it beside domkit-bench (cargo build --release -p domkitd -p \
             domkit-examples)",
            path.display()
        );
    }
    Ok(path)
}

fn start_daemon(dir: &Path) -> anyhow::Result<DaemonProcess> {
    let socket = dir.join("r").join("d.sock");
    let child = Command::new(sibling("domkitd")?)
        .arg("--foreground")
        .arg("--state-dir")
        .arg(dir.join("s"))
        .arg("--runtime-dir")
        .arg(dir.join("r"))
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting domkitd")?;
    let daemon = DaemonProcess { child, socket };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&daemon.socket).is_err() {
        if Instant::now() > deadline {
            bail!(
                "domkitd did not listen on {} in 30 s",
                daemon.socket.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(daemon)
}

fn us(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e6
}

fn p50(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    percentile(samples, 50.0)
}

fn p99(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    percentile(samples, 99.0)
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn rss_kib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A paused transient libvirt domain for the `virsh domstate` peer, destroyed on drop.
struct VirshPeer {
    uri: String,
}

impl VirshPeer {
    /// Start it, or say why not (no virsh, no libvirtd answering, create refused).
    fn start(tmp: &Path) -> Result<VirshPeer, String> {
        let uri = std::env::var("DOMKIT_BENCH_VIRSH_URI").unwrap_or_else(|_| VIRSH_URI.into());
        let version = Command::new("virsh")
            .args(["-c", &uri, "version"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("virsh not runnable ({e}): install libvirt-clients"))?;
        if !version.status.success() {
            return Err(format!(
                "`virsh -c {uri} version` failed: {}",
                String::from_utf8_lossy(&version.stderr).trim()
            ));
        }
        // A leftover of an interrupted run.
        let _ = Command::new("virsh")
            .args(["-c", &uri, "destroy", VIRSH_DOMAIN])
            .stdin(Stdio::null())
            .output();
        let qemu =
            which("qemu-system-x86_64").unwrap_or_else(|| "/usr/bin/qemu-system-x86_64".into());
        let xml = format!(
            "<domain type='qemu'><name>{VIRSH_DOMAIN}</name><memory unit='MiB'>{SCALE_MEMORY_MIB}</memory>\
             <vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>\
             <devices><emulator>{}</emulator></devices></domain>",
            qemu.display()
        );
        let file = tmp.join("virsh-peer.xml");
        std::fs::write(&file, xml).map_err(|e| format!("writing {}: {e}", file.display()))?;
        let created = Command::new("virsh")
            .args(["-c", &uri, "create", "--paused"])
            .arg(&file)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("virsh create: {e}"))?;
        if !created.status.success() {
            return Err(format!(
                "`virsh create --paused` failed: {}",
                String::from_utf8_lossy(&created.stderr).trim()
            ));
        }
        Ok(VirshPeer { uri })
    }

    /// One `virsh domstate` as a process: wall time in ms.
    fn domstate_ms(&self) -> anyhow::Result<f64> {
        let t = Instant::now();
        let out = Command::new("virsh")
            .args(["-c", &self.uri, "domstate", VIRSH_DOMAIN])
            .stdin(Stdio::null())
            .output()?;
        let ms = us(t) / 1000.0;
        if !out.status.success() || !String::from_utf8_lossy(&out.stdout).contains("paused") {
            bail!(
                "virsh domstate failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(ms)
    }
}

impl Drop for VirshPeer {
    fn drop(&mut self) {
        let _ = Command::new("virsh")
            .args(["-c", &self.uri, "destroy", VIRSH_DOMAIN])
            .stdin(Stdio::null())
            .output();
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Start `n` more paused domains (`bdN`) through the daemon, 10 at a time.
async fn start_many(
    remote: &client::Client,
    config: &domkit_core::DomainConfig,
    n: usize,
) -> anyhow::Result<()> {
    for batch in (1..=n).collect::<Vec<_>>().chunks(10) {
        let starts = batch.iter().map(|i| {
            let mut c = remote.clone();
            let mut config = config.clone();
            config.name = format!("bd{i}");
            config.uuid = None;
            async move {
                c.define(pb::DefineRequest {
                    config: serde_json::to_string(&config)?,
                    format: pb::ConfigFormat::Json as i32,
                })
                .await?;
                c.start(pb::StartRequest {
                    domain: Some(client::domain_ref(&config.name)),
                    paused: true,
                })
                .await?;
                anyhow::Ok(())
            }
        });
        for r in futures::future::join_all(starts).await {
            r.context("starting a domain through domkitd")?;
        }
    }
    Ok(())
}

/// Destroy and undefine `bd1..=bdN` through the daemon.
async fn stop_many(remote: &client::Client, n: usize) {
    for batch in (1..=n).collect::<Vec<_>>().chunks(10) {
        let stops = batch.iter().map(|i| {
            let mut c = remote.clone();
            let name = format!("bd{i}");
            async move {
                let _ = c.destroy(client::domain_ref(&name)).await;
                let _ = c.undefine(client::domain_ref(&name)).await;
            }
        });
        futures::future::join_all(stops).await;
    }
}

/// Runs the daemon figures into `res`: `daemon_info_p50_us.{inprocess,domkitd}`,
/// `daemon_info_vs_inprocess`, `daemon_pause_resume_ms.{inprocess,domkitd}`,
/// `daemon_pause_resume_vs_inprocess`, `cli_domstate_ms.p50/p99`, `virsh_domstate_ms.p50/p99`
/// and `cli_domstate_vs_virsh` (when virsh runs), `domkitd_rss_kib.idle`,
/// `domkitd_idle_cpu_ms_per_s`, `domkitd_rss_kib.n100`, `domkitd_rss_kib_per_domain`.
pub fn run(
    runtime: &tokio::runtime::Runtime,
    tmp: &Path,
    disk: &Path,
    reps: usize,
    idle: Duration,
    res: &mut Results,
) -> anyhow::Result<()> {
    let base = tmp.join("dmn");
    let daemon = start_daemon(&base.join("d"))?;
    let domkit = sibling("domkit")?;
    let config = bench_config("bd", SCALE_MEMORY_MIB, disk);
    let (driver, local, mut remote) = runtime.block_on(async {
        let options = QemuDriverOptions::persistent(base.join("ls"), base.join("lr"));
        let driver = QemuDriver::open(options).await?;
        let mut local_config = config.clone();
        local_config.name = "bl".into();
        local_config.uuid = None;
        let local = driver
            .create(local_config, StartOptions { paused: true })
            .await?;
        let mut remote = client::connect(&Target::Unix(daemon.socket.clone())).await?;
        remote
            .define(pb::DefineRequest {
                config: serde_json::to_string(&config)?,
                format: pb::ConfigFormat::Json as i32,
            })
            .await?;
        remote
            .start(pb::StartRequest {
                domain: Some(client::domain_ref("bd")),
                paused: true,
            })
            .await?;
        anyhow::Ok((driver, local, remote))
    })?;
    let remote_ref = || client::domain_ref("bd");
    let virsh = match VirshPeer::start(&base) {
        Ok(peer) => Some(peer),
        Err(why) => {
            eprintln!("domkit-bench: daemon: no virsh peer: {why}");
            res.notes.insert(
                "virsh".into(),
                format!("virsh domstate not measured: {why}"),
            );
            None
        }
    };
    let result = (|| -> anyhow::Result<()> {
        for rep in 0..reps {
            let sides = if rep % 2 == 0 {
                ["inprocess", "domkitd"]
            } else {
                ["domkitd", "inprocess"]
            };
            let mut info_p50 = [0.0f64; 2];
            let mut pr_p50 = [0.0f64; 2];
            for side in sides {
                let i = usize::from(side == "domkitd");
                let (mut info, mut pr) = runtime.block_on(async {
                    let mut info = Vec::with_capacity(INFO_CALLS);
                    let mut pr = Vec::with_capacity(PAUSE_RESUME);
                    for _ in 0..INFO_CALLS {
                        let t = Instant::now();
                        if side == "domkitd" {
                            remote.info(remote_ref()).await?;
                        } else {
                            local.info().await?;
                        }
                        info.push(us(t));
                    }
                    for _ in 0..PAUSE_RESUME {
                        let t = Instant::now();
                        if side == "domkitd" {
                            remote.resume(remote_ref()).await?;
                            remote.pause(remote_ref()).await?;
                        } else {
                            local.resume().await?;
                            local.pause().await?;
                        }
                        pr.push(us(t) / 1000.0);
                    }
                    anyhow::Ok((info, pr))
                })?;
                info_p50[i] = p50(&mut info);
                pr_p50[i] = p50(&mut pr);
                res.push(format!("daemon_info_p50_us.{side}"), info_p50[i]);
                res.push(format!("daemon_info_p99_us.{side}"), p99(&mut info));
                res.push(format!("daemon_pause_resume_ms.{side}"), pr_p50[i]);
            }
            res.push("daemon_info_vs_inprocess", info_p50[1] / info_p50[0]);
            res.push("daemon_pause_resume_vs_inprocess", pr_p50[1] / pr_p50[0]);
            let mut cli = Vec::with_capacity(CLI_RUNS);
            for _ in 0..CLI_RUNS {
                let t = Instant::now();
                let out = Command::new(&domkit)
                    .arg("--socket")
                    .arg(&daemon.socket)
                    .args(["domstate", "bd"])
                    .stdin(Stdio::null())
                    .output()?;
                if !out.status.success() {
                    bail!(
                        "domkit domstate failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                cli.push(us(t) / 1000.0);
            }
            let cli_p50 = p50(&mut cli);
            res.push("cli_domstate_ms.p50", cli_p50);
            res.push("cli_domstate_ms.p99", p99(&mut cli));
            if let Some(peer) = &virsh {
                let mut v = Vec::with_capacity(CLI_RUNS);
                for _ in 0..CLI_RUNS {
                    v.push(peer.domstate_ms()?);
                }
                let v_p50 = p50(&mut v);
                res.push("virsh_domstate_ms.p50", v_p50);
                res.push("virsh_domstate_ms.p99", p99(&mut v));
                res.push("cli_domstate_vs_virsh", cli_p50 / v_p50);
            }
        }
        let pid = daemon.child.id();
        if let Some(rss) = rss_kib(pid) {
            res.push("domkitd_rss_kib.idle", rss);
        }
        let before = cpu_ticks(pid);
        std::thread::sleep(idle);
        if let (Some(a), Some(b)) = (before, cpu_ticks(pid)) {
            // SAFETY: sysconf has no preconditions.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
            let ms = (b - a) as f64 * 1000.0 / hz;
            res.push("domkitd_idle_cpu_ms_per_s", ms / idle.as_secs_f64());
        }
        // RSS per domain: N = 100 paused domains in the daemon (the one above + 99).
        let idle_rss = rss_kib(pid);
        let started = runtime.block_on(start_many(&remote, &config, RSS_DOMAINS - 1));
        if started.is_ok() {
            // Let the daemon settle (its per-domain tasks and journal writes).
            std::thread::sleep(Duration::from_secs(2));
            if let (Some(one), Some(n)) = (idle_rss, rss_kib(pid)) {
                res.push("domkitd_rss_kib.n100", n);
                res.push(
                    "domkitd_rss_kib_per_domain",
                    (n - one) / (RSS_DOMAINS - 1) as f64,
                );
            }
        }
        runtime.block_on(stop_many(&remote, RSS_DOMAINS - 1));
        started?;
        Ok(())
    })();
    drop(virsh);
    runtime.block_on(async {
        let _ = remote.destroy(remote_ref()).await;
        let _ = local.destroy().await;
        let _ = driver.undefine("bl").await;
    });
    result
}

/// The Markdown table of the daemon figures (empty if the section did not run).
pub fn markdown(res: &Results) -> String {
    let Some(_) = res.figure("daemon_info_p50_us.domkitd") else {
        return String::new();
    };
    let cell = |k: &str| res.figure(k).map_or_else(|| "n/a".into(), |f| f.cell());
    let mut md = String::from(
        "\n#### domkitd: the same calls in-process and through a domkitd process (Unix socket)\n\n",
    );
    md.push_str(
        "| call | in-process | through domkitd | domkitd vs in-process |\n|---|---|---|---|\n",
    );
    md.push_str(&format!(
        "| `info` p50 µs (no backend round trip) | {} | {} | {} |\n",
        cell("daemon_info_p50_us.inprocess"),
        cell("daemon_info_p50_us.domkitd"),
        cell("daemon_info_vs_inprocess"),
    ));
    md.push_str(&format!(
        "| `info` p99 µs | {} | {} | |\n",
        cell("daemon_info_p99_us.inprocess"),
        cell("daemon_info_p99_us.domkitd"),
    ));
    md.push_str(&format!(
        "| resume + pause p50 ms (2 QMP round trips + events) | {} | {} | {} |\n",
        cell("daemon_pause_resume_ms.inprocess"),
        cell("daemon_pause_resume_ms.domkitd"),
        cell("daemon_pause_resume_vs_inprocess"),
    ));
    md.push_str(&format!(
        "\n`domkit domstate` (a process: spawn, connect, `Info`, print): p50 {} ms, p99 {} ms. \
         `virsh domstate` (same run, a paused libvirt domain): p50 {} ms, p99 {} ms; domkit / \
         virsh p50 {}. domkitd with one paused domain: RSS {} KiB, idle CPU {} ms/s; with 100: \
         RSS {} KiB, {} KiB per domain.\n",
        cell("cli_domstate_ms.p50"),
        cell("cli_domstate_ms.p99"),
        cell("virsh_domstate_ms.p50"),
        cell("virsh_domstate_ms.p99"),
        cell("cli_domstate_vs_virsh"),
        cell("domkitd_rss_kib.idle"),
        cell("domkitd_idle_cpu_ms_per_s"),
        cell("domkitd_rss_kib.n100"),
        cell("domkitd_rss_kib_per_domain"),
    ));
    if let Some(why) = res.notes.get("virsh") {
        md.push_str(&format!("\n{why}\n"));
    }
    md
}
