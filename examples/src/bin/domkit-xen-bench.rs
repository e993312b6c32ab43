//! `domkit-xen-bench`: domkit-libxl against `xl` for the same PV domU, interleaved, in one
//! dom0 run (issue 6, part 5). Runs inside the nested Xen test host:
//!
//! ```text
//! scripts/bench-xen.sh [--reps N]      # builds this (--features libxl), boots xen-host/, runs it
//! ```
//!
//! Per repetition and peer (rotating order): create (running) -> [guest boots: untimed] ->
//! pause -> unpause -> save -> restore -> shutdown (PV, until the domain is gone); then
//! create again and destroy at once. `xl` runs as a command (`xl create`, `xl pause`, ...),
//! exactly what an operator or a script would use; domkit through its `Driver`/`Domain`
//! API. Both drive the same libxl 4.17 of this dom0, same kernel, initramfs, memory and
//! vCPUs. The result is one line `DOMKIT-XEN-BENCH {json}` (samples per figure, ms) and a
//! Markdown table.

#[path = "../bench/stats.rs"]
#[allow(dead_code)]
mod stats;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use domkit_core::{
    Boot, Domain, DomainConfig, Driver, RestoreOptions, ShutdownOptions, StartOptions,
};
use domkit_libxl::{LibxlDomain, LibxlDriver};
use serde_json::json;

const OPS: [&str; 7] = [
    "create", "pause", "unpause", "save", "restore", "shutdown", "destroy",
];
const BOOT: Duration = Duration::from_secs(180);

fn env_path(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var).map_or_else(|| PathBuf::from(default), PathBuf::from)
}

fn kernel() -> PathBuf {
    env_path("DOMKIT_XEN_DOMU_KERNEL", "/domu/vmlinux")
}

fn initrd() -> PathBuf {
    env_path("DOMKIT_XEN_DOMU_INITRD", "/domu/initrd.img")
}

const CMDLINE: &str = "console=hvc0 loglevel=4";
const MEMORY_MIB: u64 = 128;

fn domkit_config(name: &str) -> DomainConfig {
    let mut c = DomainConfig::with_kernel(name, MEMORY_MIB, kernel());
    c.boot = Boot::Kernel {
        kernel: kernel(),
        initrd: Some(initrd()),
        cmdline: CMDLINE.into(),
    };
    c
}

/// The `xl` config of the same domain (PV, like domkit's default for Xen).
fn xl_config(name: &str) -> String {
    format!(
        "name = \"{name}\"\ntype = \"pv\"\nkernel = \"{}\"\nramdisk = \"{}\"\n\
         extra = \"{CMDLINE}\"\nmemory = {MEMORY_MIB}\nvcpus = 1\n\
         on_poweroff = \"destroy\"\non_reboot = \"restart\"\non_crash = \"destroy\"\n",
        kernel().display(),
        initrd().display()
    )
}

fn run(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Waits (untimed) until the guest's init answers through xenstore: it is booted and will
/// react to a PV shutdown request.
async fn wait_booted(domid: u32) -> anyhow::Result<()> {
    let key = format!("/local/domain/{domid}/data/domkit-bootid");
    let _ = run(&["xenstore-rm", &key]);
    run(&[
        "xenstore-write",
        &format!("/local/domain/{domid}/data/domkit-action"),
        "report",
    ])?;
    let t0 = Instant::now();
    while t0.elapsed() < BOOT {
        if run(&["xenstore-read", &key]).is_ok_and(|s| !s.is_empty()) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("domid {domid} did not boot within {BOOT:?}")
}

type Samples = BTreeMap<String, Vec<f64>>;

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

async fn domkit_cycle(
    d: &LibxlDomain,
    save: &Path,
    out: &mut BTreeMap<&'static str, f64>,
) -> anyhow::Result<()> {
    let t = Instant::now();
    d.start(StartOptions { paused: false }).await?;
    out.insert("create", ms(t));
    wait_booted(d.domid().context("no domid")?).await?;
    let t = Instant::now();
    d.pause().await?;
    out.insert("pause", ms(t));
    let t = Instant::now();
    d.resume().await?;
    out.insert("unpause", ms(t));
    let t = Instant::now();
    d.save(save).await?;
    out.insert("save", ms(t));
    let t = Instant::now();
    d.restore(save, RestoreOptions::default()).await?;
    out.insert("restore", ms(t));
    let t = Instant::now();
    d.shutdown(ShutdownOptions {
        timeout: BOOT,
        ..ShutdownOptions::default()
    })
    .await?;
    out.insert("shutdown", ms(t));
    d.start(StartOptions { paused: false }).await?;
    let t = Instant::now();
    d.destroy().await?;
    out.insert("destroy", ms(t));
    Ok(())
}

async fn xl_cycle(
    name: &str,
    cfg: &Path,
    save: &Path,
    out: &mut BTreeMap<&'static str, f64>,
) -> anyhow::Result<()> {
    let cfg = cfg.to_str().context("cfg path")?;
    let save = save.to_str().context("save path")?;
    let t = Instant::now();
    run(&["xl", "create", "-q", cfg])?;
    out.insert("create", ms(t));
    let domid: u32 = run(&["xl", "domid", name])?.parse()?;
    wait_booted(domid).await?;
    for (op, cmd) in [("pause", "pause"), ("unpause", "unpause")] {
        let t = Instant::now();
        run(&["xl", cmd, name])?;
        out.insert(op, ms(t));
    }
    let t = Instant::now();
    run(&["xl", "save", name, save])?;
    out.insert("save", ms(t));
    let t = Instant::now();
    run(&["xl", "restore", save])?;
    out.insert("restore", ms(t));
    let t = Instant::now();
    run(&["xl", "shutdown", "-w", name])?;
    out.insert("shutdown", ms(t));
    run(&["xl", "create", "-q", cfg])?;
    let t = Instant::now();
    run(&["xl", "destroy", name])?;
    out.insert("destroy", ms(t));
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let reps: usize = std::env::args()
        .skip_while(|a| a != "--reps")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let dir = std::env::temp_dir().join("domkit-xen-bench");
    std::fs::create_dir_all(&dir)?;
    let xl_cfg = dir.join("xb-xl.cfg");
    std::fs::write(&xl_cfg, xl_config("xb-xl"))?;
    let driver = LibxlDriver::new()?;
    let dk = driver.define(domkit_config("xb-dk")).await?;
    let mut samples = Samples::new();
    let peers = ["domkit", "xl"];
    for rep in 0..reps {
        let mut order = peers.to_vec();
        order.rotate_left(rep % 2);
        let mut this = BTreeMap::new();
        for peer in order {
            let mut out = BTreeMap::new();
            let save = dir.join(format!("{peer}.save"));
            let r = match peer {
                "domkit" => domkit_cycle(&dk, &save, &mut out).await,
                _ => xl_cycle("xb-xl", &xl_cfg, &save, &mut out).await,
            };
            let _ = std::fs::remove_file(&save);
            if let Err(e) = r {
                eprintln!("domkit-xen-bench: {peer} repetition {rep} failed: {e:#}");
                let _ = dk.destroy().await;
                let _ = run(&["xl", "destroy", "xb-xl"]);
            }
            for (op, v) in &out {
                samples
                    .entry(format!("xen_{op}_ms.{peer}"))
                    .or_default()
                    .push(*v);
            }
            this.insert(peer, out);
        }
        for op in OPS {
            if let (Some(d), Some(x)) = (this["domkit"].get(op), this["xl"].get(op)) {
                samples
                    .entry(format!("xen_{op}_vs_xl.domkit"))
                    .or_default()
                    .push(d / x);
            }
        }
        println!("domkit-xen-bench: repetition {}/{reps} done", rep + 1);
    }

    let mut md = String::from(
        "| operation | domkit-libxl, ms | xl, ms | domkit / xl (per repetition) |\n|---|---|---|---|\n",
    );
    let cell = |k: &str| {
        samples
            .get(k)
            .and_then(|s| stats::Figure::of(s))
            .map_or("n/a".into(), |f| f.cell())
    };
    for op in OPS {
        md.push_str(&format!(
            "| {op} | {} | {} | {} |\n",
            cell(&format!("xen_{op}_ms.domkit")),
            cell(&format!("xen_{op}_ms.xl")),
            cell(&format!("xen_{op}_vs_xl.domkit")),
        ));
    }
    println!("{md}");
    let figures: BTreeMap<&String, serde_json::Value> = samples
        .iter()
        .filter_map(|(k, s)| stats::Figure::of(s).map(|f| (k, json!(f))))
        .collect();
    println!(
        "DOMKIT-XEN-BENCH {}",
        json!({"reps": reps, "figures": figures, "markdown": md})
    );
    Ok(())
}
