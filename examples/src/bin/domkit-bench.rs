//! `domkit-bench`: domkit against its peers, side by side in one run (issue 6).
//!
//! ```text
//! cargo run --release -p domkit-examples --bin domkit-bench -- --quick   # CI, < 2 min
//! cargo run --release -p domkit-examples --bin domkit-bench              # full, ~10 min
//! scripts/bench.sh [--quick]     # the same on a fresh machine: installs the peers first
//! ```
//!
//! Peers: domkit (this workspace), a raw blocking QMP client in this binary (the practical
//! limit), python `qemu.qmp` and libvirt (`scripts/bench/peer.py`, each in its own process).
//! The machine is shared and noisy, so every measurement is repeated (`--reps`, >= 5) with
//! the peers interleaved in a rotating order inside each repetition, and reported as median
//! [min-max]. Nothing here asserts a time: the bench reports, `docs/performance.md` judges.
//!
//! Sections (`--only rt,events,start,scale,reattach,stats,daemon`):
//! 1. `rt`: sequential `query-status` for a fixed time per peer: ops/s, p50/p99; then 8
//!    concurrent callers on one connection.
//! 2. `events`: resume/pause cycles; latency from QEMU's own event timestamp to the event
//!    reaching a subscriber (domkit: the uniform `DomainEvent`).
//! 3. `start`: spawn -> QMP ready -> running, and destroy, domkit vs the bare spawn + raw
//!    connect of the identical command line (plus qemu.qmp and libvirt).
//! 4. `scale`: N = 1, 10, 50, 100 paused domains in one manager process: RSS per domain,
//!    CPU and wake-ups while idle, and the time to query all N at once.
//!
//! Output: Markdown tables on stdout (and `--markdown FILE`, or spliced into
//! `--update-doc docs/performance.md` between its `bench:begin`/`bench:end` markers) and a
//! JSON summary (`--json FILE`) with one key per figure (`qmp_rt_ops_per_s.domkit`, ...).

#[path = "../bench/mod.rs"]
mod bench;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use domkit_core::{Driver, StartOptions};
use domkit_qemu::{QemuDriver, QemuDriverOptions};
use serde_json::{json, Value};

use bench::qemu::{
    bench_config, domkit_argv, make_disk, with_listening_monitors, BareQemu, MEMORY_MIB,
    SCALE_MEMORY_MIB,
};
use bench::raw::{self, RawQmp};
use bench::results::{verdicts, Results};
use bench::stats::{summarize_us, Figure};
use bench::worker::Worker;

#[derive(Debug, Parser)]
#[command(
    name = "domkit-bench",
    about = "domkit vs raw QMP, qemu.qmp and libvirt, in one run"
)]
struct Cli {
    #[command(subcommand)]
    worker: Option<WorkerCmd>,
    /// CI mode: fewer, shorter segments (< 2 minutes).
    #[arg(long)]
    quick: bool,
    /// Repetitions (default 5 quick, 7 full; at least 5 for published figures).
    #[arg(long)]
    reps: Option<usize>,
    /// Sections to run (default all): rt, events, start, scale.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Scale bench domain counts (default 10,100 quick; 1,10,50,100 full).
    #[arg(long, value_delimiter = ',')]
    scale_n: Option<Vec<usize>>,
    /// Seconds each peer runs `query-status` per repetition (default 0.3 quick, 2 full).
    #[arg(long)]
    rt_secs: Option<f64>,
    /// Idle window of the scale bench in seconds (default 5 quick, 30 full).
    #[arg(long)]
    idle_secs: Option<f64>,
    /// Python interpreter with `qemu.qmp` (and the `libvirt` module for libvirt).
    #[arg(long, default_value = "python3")]
    python: String,
    /// The python peer worker.
    #[arg(long, default_value = "scripts/bench/peer.py")]
    peer_script: PathBuf,
    /// Only these peers/managers (default all): domkit, raw, qemu_qmp, libvirt, domkit_qmp.
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,
    /// Leave python qemu.qmp out.
    #[arg(long)]
    no_python: bool,
    /// Leave libvirt out.
    #[arg(long)]
    no_libvirt: bool,
    /// Why libvirt is unavailable, when the caller already knows (recorded as a note).
    #[arg(long)]
    libvirt_unavailable: Option<String>,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
    /// The result of `scripts/bench-xen.sh` (libxl vs xl), folded into the targets.
    #[arg(long)]
    xen_json: Option<PathBuf>,
    /// Write the JSON summary here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the Markdown tables here.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Splice the tables into this file between `<!-- bench:begin -->` and `<!-- bench:end -->`.
    #[arg(long)]
    update_doc: Option<PathBuf>,
    /// The command line to record in the report (default: this process's arguments).
    #[arg(long)]
    command: Option<String>,
}

#[derive(Debug, Subcommand)]
enum WorkerCmd {
    /// A scale-bench manager process (internal).
    #[command(hide = true)]
    ScaleWorker {
        /// domkit, domkit-qmp or raw.
        kind: String,
    },
}

/// Sizes of one run.
#[derive(Debug, Clone)]
struct Params {
    reps: usize,
    /// Seconds each peer runs `query-status` per repetition (sequential, then concurrent).
    rt_secs: f64,
    callers: usize,
    /// Resume/pause cycles per peer per repetition.
    event_cycles: usize,
    /// Start/destroy cycles per peer per repetition (the repetition's figure is their median).
    starts: usize,
    scale_ns: Vec<usize>,
    idle_secs: f64,
    /// Fan-outs per manager per repetition (the repetition's figure is their median).
    fanout_rounds: usize,
}

impl Params {
    fn new(cli: &Cli) -> Params {
        let mut p = if cli.quick {
            Params {
                reps: 5,
                rt_secs: 0.3,
                callers: 8,
                event_cycles: 20,
                starts: 1,
                scale_ns: vec![10, 100],
                idle_secs: 5.0,
                fanout_rounds: 10,
            }
        } else {
            Params {
                reps: 7,
                rt_secs: 2.0,
                callers: 8,
                event_cycles: 100,
                starts: 3,
                scale_ns: vec![1, 10, 50, 100],
                idle_secs: 30.0,
                fanout_rounds: 20,
            }
        };
        if let Some(r) = cli.reps {
            p.reps = r.max(1);
        }
        if let Some(ns) = &cli.scale_n {
            p.scale_ns = ns.clone();
        }
        if let Some(s) = cli.rt_secs {
            p.rt_secs = s;
        }
        if let Some(s) = cli.idle_secs {
            p.idle_secs = s;
        }
        p
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(WorkerCmd::ScaleWorker { kind }) = &cli.worker {
        return bench::scale::run_worker(kind);
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let params = Params::new(&cli);
    let section = |s: &str| cli.only.is_empty() || cli.only.iter().any(|o| o == s);
    let started = Instant::now();

    // Short paths: Unix socket paths are limited to 107 bytes.
    let tmp = tempfile::Builder::new().prefix("dkb").tempdir_in("/tmp")?;
    let disk = make_disk(tmp.path())?;
    let runtime = tokio::runtime::Runtime::new()?;
    let mut res = Results::default();
    record_meta(&mut res, &cli, &params);

    if section("rt") || section("events") || section("start") {
        let mut run = QmpRun::setup(&cli, &params, &runtime, tmp.path(), &disk, &mut res)?;
        for rep in 0..params.reps {
            let t = Instant::now();
            run.repetition(rep, &section, &mut res);
            eprintln!(
                "domkit-bench: repetition {}/{} done in {:.1} s",
                rep + 1,
                params.reps,
                t.elapsed().as_secs_f64()
            );
        }
        run.teardown(&mut res);
    }
    if section("scale") {
        for &n in &params.scale_ns {
            let t = Instant::now();
            if let Err(e) = scale(&cli, &params, tmp.path(), &disk, n, &mut res) {
                eprintln!("domkit-bench: scale N={n} failed: {e:#}");
                res.notes
                    .insert(format!("scale N={n}"), format!("failed: {e:#}"));
            }
            eprintln!(
                "domkit-bench: scale N={n} done in {:.1} s",
                t.elapsed().as_secs_f64()
            );
        }
    }
    if section("reattach") {
        let n = if cli.quick { 10 } else { 100 };
        let t = Instant::now();
        if let Err(e) = bench::reattach::run(&runtime, tmp.path(), &disk, n, params.reps, &mut res)
        {
            eprintln!("domkit-bench: reattach N={n} failed: {e:#}");
            res.notes
                .insert(format!("reattach N={n}"), format!("failed: {e:#}"));
        }
        eprintln!(
            "domkit-bench: reattach N={n} done in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    if section("stats") {
        // Bulk stats (issue 11): N = 100 paused domains, polled once a second.
        let n = 100;
        let window = Duration::from_secs_f64(params.idle_secs.min(10.0));
        let t = Instant::now();
        if let Err(e) = bench::allstats::run(
            &runtime,
            tmp.path(),
            &disk,
            n,
            params.reps,
            window,
            &mut res,
        ) {
            eprintln!("domkit-bench: stats N={n} failed: {e:#}");
            res.notes
                .insert(format!("stats N={n}"), format!("failed: {e:#}"));
        }
        eprintln!(
            "domkit-bench: stats N={n} done in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    if section("daemon") {
        // domkitd (issue 13): in-process vs through the daemon, and the CLI round trip.
        let t = Instant::now();
        let idle = Duration::from_secs_f64(params.idle_secs.min(10.0));
        if let Err(e) = bench::daemon::run(&runtime, tmp.path(), &disk, params.reps, idle, &mut res)
        {
            eprintln!("domkit-bench: daemon failed: {e:#}");
            res.notes.insert("daemon".into(), format!("failed: {e:#}"));
        }
        eprintln!(
            "domkit-bench: daemon done in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    if let Some(path) = &cli.xen_json {
        match xen_note(path) {
            Ok(note) => {
                res.notes.insert("xen".into(), note);
            }
            Err(e) => eprintln!("domkit-bench: {}: {e:#}", path.display()),
        }
    }
    res.notes.entry("xen".into()).or_insert_with(|| {
        "not yet measured: the libxl-vs-xl comparison needs a run inside the nested Xen \
         host's dom0 (xen-host/run.sh); see docs/performance.md"
            .into()
    });
    res.meta.insert(
        "duration_s".into(),
        json!((started.elapsed().as_secs_f64() * 10.0).round() / 10.0),
    );
    res.meta.insert("loadavg_end".into(), json!(loadavg()));

    let targets = verdicts(&res);
    let md = res.markdown(&targets) + &bench::daemon::markdown(&res);
    println!("{md}");
    let mut json = res.to_json();
    json["targets"] = targets.iter().map(|t| t.to_json()).collect();
    if let Some(path) = &cli.json {
        write_file(path, &serde_json::to_string_pretty(&json)?)?;
    }
    if let Some(path) = &cli.markdown {
        write_file(path, &md)?;
    }
    if let Some(path) = &cli.update_doc {
        splice_doc(path, &header(&res), &md)?;
    }
    Ok(())
}

/// The libxl-vs-xl verdict from `docs/bench/xen.json`: every operation's per-repetition
/// domkit/xl ratio (median), judged against 1.05.
fn xen_note(path: &Path) -> anyhow::Result<String> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let figures = v["figures"].as_object().context("no figures")?;
    let mut parts = Vec::new();
    let mut worst: Option<(String, f64)> = None;
    for (key, f) in figures {
        let Some(op) = key
            .strip_prefix("xen_")
            .and_then(|k| k.strip_suffix("_vs_xl.domkit"))
        else {
            continue;
        };
        let median = f["median"].as_f64().context("median")?;
        parts.push(format!("{op} {median:.2}x"));
        if worst.as_ref().map_or(true, |w| median > w.1) {
            worst = Some((op.to_string(), median));
        }
    }
    let (op, ratio) = worst.context("no ratios")?;
    let verdict = if ratio <= 1.05 {
        "met".to_string()
    } else {
        format!("MISSED by {:.0} % ({op})", (ratio - 1.05) * 100.0)
    };
    Ok(format!(
        "{verdict}: domkit/xl per operation (median of {} repetitions, {}): {}",
        v["reps"],
        path.display(),
        parts.join(", ")
    ))
}

fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Replaces what lies between the bench markers of `path` with the run's header and tables.
fn splice_doc(path: &Path, header: &str, md: &str) -> anyhow::Result<()> {
    const BEGIN: &str = "<!-- bench:begin -->";
    const END: &str = "<!-- bench:end -->";
    let doc =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let (Some(b), Some(e)) = (doc.find(BEGIN), doc.find(END)) else {
        anyhow::bail!("{} has no {BEGIN} ... {END} markers", path.display());
    };
    anyhow::ensure!(b < e, "markers out of order in {}", path.display());
    let out = format!("{}{BEGIN}\n{header}\n{md}\n{}", &doc[..b], &doc[e..]);
    write_file(path, &out)
}

/// The run's machine, versions and command, for the report.
fn header(res: &Results) -> String {
    let m = |k: &str| {
        res.meta
            .get(k)
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
            .unwrap_or_else(|| "?".into())
    };
    format!(
        "Run of {date}, {dur} s: `{cmd}`\n\n\
         - machine: {cpu}, {cores} cores, kernel {kernel}; load average {la0} at start, {la1} at end \
         (the machine is shared with other builds and VMs)\n\
         - {qemu}; domkit {dk} ({rustc}); {py}: qemu.qmp {qmp}; libvirt {lv}\n",
        date = m("date"),
        dur = m("duration_s"),
        cmd = m("command"),
        cpu = m("cpu"),
        cores = m("cores"),
        kernel = m("kernel"),
        la0 = m("loadavg_start"),
        la1 = m("loadavg_end"),
        qemu = m("qemu_version"),
        dk = m("domkit_commit"),
        rustc = m("rustc"),
        py = m("python"),
        qmp = m("qemu_qmp_version"),
        lv = m("libvirt_version"),
    )
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn command_output(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

fn record_meta(res: &mut Results, cli: &Cli, p: &Params) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let command = cli.command.clone().unwrap_or_else(|| {
        let args: Vec<String> = std::env::args().collect();
        args.join(" ")
    });
    let meta = &mut res.meta;
    meta.insert("command".into(), json!(command));
    meta.insert(
        "mode".into(),
        json!(if cli.quick { "quick" } else { "full" }),
    );
    meta.insert("reps".into(), json!(p.reps));
    meta.insert("rt_secs".into(), json!(p.rt_secs));
    meta.insert("event_cycles".into(), json!(p.event_cycles));
    meta.insert("starts_per_rep".into(), json!(p.starts));
    meta.insert("idle_secs".into(), json!(p.idle_secs));
    meta.insert("cpu".into(), json!(cpu));
    meta.insert("cores".into(), json!(cores));
    meta.insert(
        "kernel".into(),
        json!(std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()),
    );
    meta.insert("loadavg_start".into(), json!(loadavg()));
    meta.insert(
        "qemu_version".into(),
        json!(command_output(&cli.qemu, &["--version"])),
    );
    meta.insert(
        "rustc".into(),
        json!(command_output("rustc", &["--version"])),
    );
    meta.insert(
        "python".into(),
        json!(command_output(&cli.python, &["--version"])),
    );
    meta.insert(
        "domkit_commit".into(),
        json!(command_output("git", &["rev-parse", "--short", "HEAD"])),
    );
    meta.insert(
        "date".into(),
        json!(command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"])),
    );
}

/// Whether `--peers` selects `peer` (all are selected by default).
fn selected(cli: &Cli, peer: &str) -> bool {
    cli.peers.is_empty() || cli.peers.iter().any(|p| p == peer)
}

/// Peers of a repetition in rotating order, so none is always first or last.
fn rotated<T: Clone>(items: &[T], rep: usize) -> Vec<T> {
    let mut v = items.to_vec();
    if !v.is_empty() {
        let k = rep % v.len();
        v.rotate_left(k);
    }
    v
}

fn median(v: &[f64]) -> f64 {
    Figure::of(v).map_or(f64::NAN, |f| f.median)
}

/// The QMP sections' peers and their QEMUs, alive for the whole run.
struct QmpRun<'a> {
    params: Params,
    runtime: &'a tokio::runtime::Runtime,
    driver: QemuDriver,
    dk_domain: domkit_qemu::QemuDomain,
    dk_start: domkit_qemu::QemuDomain,
    raw: Option<RawQmp>,
    _raw_qemu: BareQemu,
    raw_start: (Vec<String>, domkit_qemu::argv::DomainPaths),
    py: Option<Worker>,
    _py_qemu: Option<BareQemu>,
    py_start_argv: Vec<String>,
    lv: Option<Worker>,
    peers: Vec<&'static str>,
}

impl<'a> QmpRun<'a> {
    fn setup(
        cli: &Cli,
        params: &Params,
        runtime: &'a tokio::runtime::Runtime,
        tmp: &Path,
        disk: &Path,
        res: &mut Results,
    ) -> anyhow::Result<QmpRun<'a>> {
        let driver = QemuDriver::new(QemuDriverOptions::with_runtime_root(tmp.join("dk")))?;
        let (dk_domain, dk_start) = runtime.block_on(async {
            let d = driver
                .create(
                    bench_config("rt", MEMORY_MIB, disk),
                    StartOptions { paused: true },
                )
                .await?;
            let s = driver.define(bench_config("st", MEMORY_MIB, disk)).await?;
            anyhow::Ok((d, s))
        })?;

        // The raw client's QEMU: domkit's exact command line, its monitor socket inherited.
        let (argv, paths) = domkit_argv(&bench_config("raw", MEMORY_MIB, disk), &tmp.join("raw"))?;
        let listener = UnixListener::bind(&paths.qmp_socket)?;
        let raw_qemu = BareQemu::spawn_with_monitor(&argv, &paths.qemu_log, &listener)?;
        drop(listener);
        let raw = RawQmp::connect(&paths.qmp_socket)?;
        let raw_start = domkit_argv(&bench_config("rst", MEMORY_MIB, disk), &tmp.join("rst"))?;

        let mut peers = vec!["domkit", "raw"];
        let (mut py, mut py_qemu, mut py_start_argv) = (None, None, Vec::new());
        if cli.no_python || !selected(cli, "qemu_qmp") {
            res.notes.insert(
                "python qemu.qmp".into(),
                "left out (--no-python/--peers)".into(),
            );
        } else {
            let dir = tmp.join("py");
            let sock = dir.join("qmp.sock");
            let (argv, paths) = domkit_argv(&bench_config("py", MEMORY_MIB, disk), &dir)?;
            let argv = with_listening_monitors(&argv, std::slice::from_ref(&sock));
            let attempt = (|| -> anyhow::Result<(Worker, BareQemu)> {
                let q =
                    BareQemu::spawn_listening(&argv, &paths.qemu_log, std::slice::from_ref(&sock))?;
                let mut w = python_worker(cli, "qemu.qmp", tmp)?;
                w.call(json!({"op": "connect", "socket": sock}))?;
                Ok((w, q))
            })();
            match attempt {
                Ok((w, q)) => {
                    res.meta
                        .insert("qemu_qmp_version".into(), w.hello["version"].clone());
                    py = Some(w);
                    py_qemu = Some(q);
                    peers.push("qemu_qmp");
                    let (argv, _) =
                        domkit_argv(&bench_config("pst", MEMORY_MIB, disk), &tmp.join("pst"))?;
                    py_start_argv = with_listening_monitors(&argv, &[]);
                }
                Err(e) => {
                    eprintln!("domkit-bench: python qemu.qmp unavailable: {e:#}");
                    res.notes
                        .insert("python qemu.qmp".into(), format!("unavailable: {e:#}"));
                }
            }
        }
        let mut lv = None;
        if let Some(why) = &cli.libvirt_unavailable {
            res.notes
                .insert("libvirt".into(), format!("unavailable: {why}"));
        } else if cli.no_libvirt || !selected(cli, "libvirt") {
            res.notes
                .insert("libvirt".into(), "left out (--no-libvirt/--peers)".into());
        } else {
            let attempt = (|| -> anyhow::Result<Worker> {
                let mut w = python_worker(cli, "libvirt", tmp)?;
                w.call(json!({"op": "connect", "qemu": qemu_path(&cli.qemu), "memory_mib": MEMORY_MIB}))?;
                Ok(w)
            })();
            match attempt {
                Ok(w) => {
                    res.meta
                        .insert("libvirt_version".into(), w.hello["version"].clone());
                    lv = Some(w);
                    peers.push("libvirt");
                    res.notes.insert(
                        "libvirt".into(),
                        "runs its own QEMU (same binary, TCG, START_PAUSED; libvirt cannot \
                         attach to a QEMU it did not start); its round trip is \
                         virDomainQemuMonitorCommand, the only libvirt call that reaches QMP on \
                         demand (virDomainGetState answers from libvirtd's cache)"
                            .into(),
                    );
                }
                Err(e) => {
                    eprintln!("domkit-bench: libvirt unavailable: {e:#}");
                    res.notes
                        .insert("libvirt".into(), format!("unavailable: {e:#}"));
                }
            }
        }
        peers.retain(|p| selected(cli, p));
        Ok(QmpRun {
            params: params.clone(),
            runtime,
            driver,
            dk_domain,
            dk_start,
            raw: Some(raw),
            _raw_qemu: raw_qemu,
            raw_start,
            py,
            _py_qemu: py_qemu,
            py_start_argv,
            lv,
            peers,
        })
    }

    fn worker(&mut self, peer: &str) -> Option<&mut Worker> {
        match peer {
            "qemu_qmp" => self.py.as_mut(),
            "libvirt" => self.lv.as_mut(),
            _ => None,
        }
    }

    /// One repetition of every enabled QMP section, peers in rotating order.
    fn repetition(&mut self, rep: usize, section: &dyn Fn(&str) -> bool, res: &mut Results) {
        let order = rotated(&self.peers, rep);
        let p = self.params.clone();
        if section("rt") {
            let mut seq = std::collections::HashMap::new();
            for &peer in &order {
                match self.rt(peer, p.rt_secs) {
                    Ok(r) => {
                        res.push(format!("qmp_rt_ops_per_s.{peer}"), r.ops_per_s);
                        res.push(format!("qmp_rt_p50_us.{peer}"), r.p50_us);
                        res.push(format!("qmp_rt_p99_us.{peer}"), r.p99_us);
                        res.push(format!("qmp_rt_cpu_us_per_op.{peer}"), r.cpu_us_per_op);
                        res.push(format!("qmp_rt_csw_per_op.{peer}"), r.csw_per_op);
                        seq.insert(peer, r.ops_per_s);
                    }
                    Err(e) => note_failure(res, peer, "rt", &e),
                }
            }
            if let Some(raw) = seq.get("raw") {
                for (peer, ops) in &seq {
                    res.push(format!("qmp_rt_vs_raw.{peer}"), ops / raw);
                }
            }
            // What an id costs on the wire: the raw client again, its command carrying a
            // five-digit id (as a client numbering its commands sends after a few thousand).
            // QEMU's monitor reads one byte per main-loop dispatch, so the bytes show.
            if self.raw.is_some() {
                match self.raw_with_id(p.rt_secs / 2.0) {
                    Ok((p50, raw_p50)) => {
                        res.push("qmp_rt_p50_us.raw_with_id", p50);
                        res.push("qmp_rt_p50_us.raw_again", raw_p50);
                    }
                    Err(e) => note_failure(res, "raw", "rt with id", &e),
                }
            }
            let mut conc = std::collections::HashMap::new();
            for &peer in &order {
                match self.rt_concurrent(peer, p.callers, p.rt_secs) {
                    Ok(ops) => {
                        res.push(format!("qmp_rt8_ops_per_s.{peer}"), ops);
                        conc.insert(peer, ops);
                    }
                    Err(e) => note_failure(res, peer, "rt8", &e),
                }
            }
            // The concurrent figure against raw's in the same repetition, as for sequential.
            if let Some(raw) = conc.get("raw") {
                for (peer, ops) in &conc {
                    res.push(format!("qmp_rt8_vs_raw.{peer}"), ops / raw);
                }
            }
        }
        if section("events") {
            let mut p50s = std::collections::HashMap::new();
            for &peer in &order {
                match self.events(peer, p.event_cycles, res) {
                    Ok(p50) => {
                        p50s.insert(peer, p50);
                    }
                    Err(e) => note_failure(res, peer, "events", &e),
                }
            }
            // Event p50 against the raw client's in the same repetition (the issue-14 goal is
            // a ratio: the absolute figure moves with the machine's load).
            if let Some(raw) = p50s.get("raw") {
                for (peer, p50) in &p50s {
                    res.push(format!("event_p50_vs_raw.{peer}"), p50 / raw);
                }
            }
        }
        if section("start") {
            let mut running = std::collections::HashMap::new();
            let mut ready = std::collections::HashMap::new();
            for &peer in &order {
                match self.starts(peer, p.starts) {
                    Ok(s) => {
                        let r = median(&s.running);
                        res.push(format!("start_ms.{peer}"), r);
                        running.insert(peer, r);
                        if !s.ready.is_empty() {
                            let q = median(&s.ready);
                            res.push(format!("qmp_ready_ms.{peer}"), q);
                            ready.insert(peer, q);
                        }
                        res.push(format!("destroy_ms.{peer}"), median(&s.destroy));
                    }
                    Err(e) => note_failure(res, peer, "start", &e),
                }
            }
            if let (Some(d), Some(r)) = (running.get("domkit"), running.get("raw")) {
                res.push("start_overhead_ms.domkit", d - r);
            }
            if let (Some(d), Some(r)) = (ready.get("domkit"), ready.get("raw")) {
                res.push("qmp_ready_overhead_ms.domkit", d - r);
            }
        }
    }

    /// Sequential round trips, with the client side's CPU time and context switches per
    /// operation (the client process: this one for domkit and raw, the worker for python
    /// peers; for libvirt that leaves out libvirtd's share).
    fn rt(&mut self, peer: &str, secs: f64) -> anyhow::Result<RtResult> {
        let (cpu0, csw0) = bench::scale::cpu_and_wakeups();
        let s = match peer {
            "domkit" => {
                let qmp = self.dk_domain.qmp().context("domkit domain has no QMP")?;
                // In a spawned task, as a server built on domkit would call it.
                self.runtime.block_on(async move {
                    tokio::spawn(async move { bench::dk::rt(&qmp, secs).await }).await
                })??
            }
            "raw" => {
                let raw = self.raw.as_mut().context("raw client")?;
                let mut lat = Vec::with_capacity(16 * 1024);
                let t0 = Instant::now();
                let end = t0 + Duration::from_secs_f64(secs);
                while Instant::now() < end {
                    let a = Instant::now();
                    raw.cmd(raw::QUERY_STATUS)?;
                    lat.push(a.elapsed().as_nanos() as f64 / 1000.0);
                }
                summarize_us(&mut lat, t0.elapsed())
            }
            _ => {
                let w = self.worker(peer).context("no worker")?;
                let v = w.call(json!({"op": "rt", "secs": secs}))?;
                return Ok(RtResult {
                    ops_per_s: num(&v, "ops_per_s")?,
                    p50_us: num(&v, "p50_us")?,
                    p99_us: num(&v, "p99_us")?,
                    cpu_us_per_op: num(&v, "cpu_us_per_op")?,
                    csw_per_op: num(&v, "csw_per_op")?,
                });
            }
        };
        let (cpu1, csw1) = bench::scale::cpu_and_wakeups();
        let n = s.n.max(1) as f64;
        Ok(RtResult {
            ops_per_s: s.ops_per_s,
            p50_us: s.p50_us,
            p99_us: s.p99_us,
            cpu_us_per_op: (cpu1 - cpu0) * 1e6 / n,
            csw_per_op: (csw1 - csw0) as f64 / n,
        })
    }

    /// p50 µs of the raw client's `query-status` with a five-digit id and, interleaved in
    /// 0.1 s slices, without: the cost of the id's bytes alone.
    fn raw_with_id(&mut self, secs: f64) -> anyhow::Result<(f64, f64)> {
        const WITH_ID: &[u8] = b"{\"execute\":\"query-status\",\"id\":12345}\n";
        let raw = self.raw.as_mut().context("raw client")?;
        let (mut with, mut without) = (Vec::new(), Vec::new());
        let t0 = Instant::now();
        let mut slice = 0u32;
        while t0.elapsed().as_secs_f64() < secs {
            let (cmd, lat) = if slice % 2 == 0 {
                (WITH_ID, &mut with)
            } else {
                (raw::QUERY_STATUS, &mut without)
            };
            let s0 = Instant::now();
            while s0.elapsed() < Duration::from_millis(100) {
                let a = Instant::now();
                raw.cmd(cmd)?;
                lat.push(a.elapsed().as_nanos() as f64 / 1000.0);
            }
            slice += 1;
        }
        let with = summarize_us(&mut with, t0.elapsed());
        let without = summarize_us(&mut without, t0.elapsed());
        Ok((with.p50_us, without.p50_us))
    }

    /// `callers` concurrent callers on one connection: total ops/s.
    fn rt_concurrent(&mut self, peer: &str, callers: usize, secs: f64) -> anyhow::Result<f64> {
        match peer {
            "domkit" => {
                let qmp = self.dk_domain.qmp().context("domkit domain has no QMP")?;
                self.runtime
                    .block_on(bench::dk::rt_concurrent(&qmp, callers, secs))
            }
            "raw" => {
                // A blocking client serves concurrent callers by taking turns on the one
                // connection: threads behind a mutex.
                let raw = std::sync::Mutex::new(self.raw.take().context("raw client")?);
                let count = std::sync::atomic::AtomicU64::new(0);
                let t0 = Instant::now();
                let end = t0 + Duration::from_secs_f64(secs);
                let result = std::thread::scope(|s| {
                    let handles: Vec<_> = (0..callers)
                        .map(|_| {
                            s.spawn(|| -> std::io::Result<()> {
                                while Instant::now() < end {
                                    raw.lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .cmd(raw::QUERY_STATUS)?;
                                    count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                }
                                Ok(())
                            })
                        })
                        .collect();
                    handles.into_iter().try_for_each(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(std::io::Error::other("caller panicked")))
                    })
                });
                let elapsed = t0.elapsed();
                self.raw = Some(raw.into_inner().unwrap_or_else(|p| p.into_inner()));
                result?;
                Ok(count.into_inner() as f64 / elapsed.as_secs_f64())
            }
            _ => {
                let w = self.worker(peer).context("no worker")?;
                let v = w.call(json!({"op": "rt_conc", "secs": secs, "callers": callers}))?;
                num(&v, "ops_per_s")
            }
        }
    }

    /// Event latencies of `peer` into `res`; returns the p50 in µs.
    fn events(&mut self, peer: &str, cycles: usize, res: &mut Results) -> anyhow::Result<f64> {
        let (p50, p99) = match peer {
            "domkit" => {
                let dom = self.dk_domain.clone();
                let mut s = self.runtime.block_on(async move {
                    tokio::spawn(async move { bench::dk::events(&dom, cycles).await }).await
                })??;
                anyhow::ensure!(!s.uniform_us.is_empty(), "no event measured");
                let reader = summarize_us(&mut s.qmp_reader_us, Duration::from_secs(1));
                res.push("event_qmp_reader_p50_us.domkit", reader.p50_us);
                let u = summarize_us(&mut s.uniform_us, Duration::from_secs(1));
                (u.p50_us, u.p99_us)
            }
            "raw" => {
                let raw = self.raw.as_mut().context("raw client")?;
                let mut lat = Vec::with_capacity(cycles * 2);
                for _ in 0..cycles {
                    lat.push(raw.cmd_event_latency(raw::CONT, "RESUME")?);
                    lat.push(raw.cmd_event_latency(raw::STOP, "STOP")?);
                }
                let s = summarize_us(&mut lat, Duration::from_secs(1));
                (s.p50_us, s.p99_us)
            }
            _ => {
                let w = self.worker(peer).context("no worker")?;
                let v = w.call(json!({"op": "events", "n": cycles}))?;
                if let Some(m) = v["monitor_event_p50_us"].as_f64() {
                    res.push("event_monitor_p50_us.libvirt", m);
                }
                (num(&v, "p50_us")?, num(&v, "p99_us")?)
            }
        };
        res.push(format!("event_p50_us.{peer}"), p50);
        res.push(format!("event_p99_us.{peer}"), p99);
        Ok(p50)
    }

    fn starts(&mut self, peer: &str, count: usize) -> anyhow::Result<StartSamples> {
        let mut s = StartSamples::default();
        for _ in 0..count {
            match peer {
                "domkit" => {
                    let dom = self.dk_start.clone();
                    let x = self.runtime.block_on(async move {
                        tokio::spawn(async move { bench::dk::start_cycle(&dom).await }).await
                    })??;
                    s.ready.push(ms(x.qmp_ready));
                    s.running.push(ms(x.running));
                    s.destroy.push(ms(x.destroy));
                }
                "raw" => {
                    let (argv, paths) = &self.raw_start;
                    let x = raw::start_and_quit(argv, &paths.qmp_socket, &paths.qemu_log)?;
                    s.ready.push(ms(x.qmp_ready));
                    s.running.push(ms(x.running));
                    s.destroy.push(ms(x.destroy));
                }
                "qemu_qmp" => {
                    let argv = self.py_start_argv.clone();
                    let w = self.worker(peer).context("no worker")?;
                    let v = w.call(json!({"op": "start", "argv": argv}))?;
                    s.ready.push(num(&v, "qmp_ready_ms")?);
                    s.running.push(num(&v, "running_ms")?);
                    s.destroy.push(num(&v, "destroy_ms")?);
                }
                _ => {
                    let w = self.worker(peer).context("no worker")?;
                    let v = w.call(json!({"op": "start", "qemu": "/usr/bin/qemu-system-x86_64", "memory_mib": MEMORY_MIB}))?;
                    s.running.push(num(&v, "running_ms")?);
                    s.destroy.push(num(&v, "destroy_ms")?);
                }
            }
        }
        Ok(s)
    }

    fn teardown(mut self, res: &mut Results) {
        self.py = None;
        self.lv = None;
        if let Some(raw) = self.raw.take() {
            raw.quit();
        }
        if let Err(e) = self.runtime.block_on(self.driver.close()) {
            res.notes
                .insert("teardown".into(), format!("driver close failed: {e}"));
        }
    }
}

/// One peer's sequential round-trip segment.
#[derive(Debug, Clone, Copy)]
struct RtResult {
    ops_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_op: f64,
    csw_per_op: f64,
}

#[derive(Debug, Default)]
struct StartSamples {
    ready: Vec<f64>,
    running: Vec<f64>,
    destroy: Vec<f64>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn num(v: &Value, key: &str) -> anyhow::Result<f64> {
    v[key].as_f64().with_context(|| format!("no {key} in {v}"))
}

fn note_failure(res: &mut Results, peer: &str, what: &str, e: &anyhow::Error) {
    eprintln!("domkit-bench: {peer} {what} failed: {e:#}");
    res.notes
        .entry(format!("{peer} {what}"))
        .or_insert_with(|| format!("failed: {e:#}"));
}

fn qemu_path(qemu: &str) -> String {
    if qemu.contains('/') {
        return qemu.to_string();
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(qemu))
                .find(|p| p.is_file())
        })
        .map_or_else(|| qemu.to_string(), |p| p.display().to_string())
}

fn python_worker(cli: &Cli, kind: &str, tmp: &Path) -> anyhow::Result<Worker> {
    let mut cmd = Command::new(&cli.python);
    cmd.arg(&cli.peer_script).arg(kind);
    Worker::start(kind, cmd, tmp.join(format!("{kind}.stderr")))
}

/// The scale bench at one N: every manager holds N paused domains at once; they idle
/// together, then fan out in turns.
fn scale(
    cli: &Cli,
    p: &Params,
    tmp: &Path,
    disk: &Path,
    n: usize,
    res: &mut Results,
) -> anyhow::Result<()> {
    let dir = tmp.join(format!("s{n}"));
    std::fs::create_dir_all(&dir)?;
    // N bare QEMUs, each with one listening monitor per bare-connection manager.
    let monitors = ["raw", "dkq", "py"];
    let mut qemus = Vec::with_capacity(n);
    let mut socks: Vec<Vec<PathBuf>> = vec![Vec::new(); monitors.len()];
    // Only when a manager connects to them: `--peers domkit` at N = 300 then holds 300
    // QEMUs, not 600.
    let bare = ["domkit_qmp", "raw", "qemu_qmp"]
        .iter()
        .any(|k| selected(cli, k) && !(*k == "qemu_qmp" && cli.no_python));
    let bare_n = if bare { n } else { 0 };
    for batch in (0..bare_n).collect::<Vec<_>>().chunks(10) {
        let mut pending = Vec::new();
        for &i in batch {
            let qdir = dir.join(format!("q{i}"));
            let (argv, paths) = domkit_argv(
                &bench_config(&format!("b{i}"), SCALE_MEMORY_MIB, disk),
                &qdir,
            )?;
            let mine: Vec<PathBuf> = monitors
                .iter()
                .map(|m| qdir.join(format!("{m}.sock")))
                .collect();
            let argv = with_listening_monitors(&argv, &mine);
            let q = BareQemu::spawn(&argv, &paths.qemu_log)?;
            for (k, s) in mine.iter().enumerate() {
                socks[k].push(s.clone());
            }
            pending.push((q, mine));
        }
        for (mut q, mine) in pending {
            q.wait_for_sockets(&mine, Duration::from_secs(60))?;
            qemus.push(q);
        }
    }

    let exe = std::env::current_exe()?;
    let rust_worker = |kind: &str| -> anyhow::Result<Worker> {
        let mut cmd = Command::new(&exe);
        cmd.args(["scale-worker", kind]);
        Worker::start(kind, cmd, dir.join(format!("{kind}.stderr")))
    };
    let mut workers: Vec<(&str, Worker, Value)> = Vec::new();
    let dk_root = dir.join("dk");
    let plan: Vec<(&str, Value)> = vec![
        (
            "domkit",
            json!({"op": "scale_connect", "n": n, "root": dk_root, "disk": disk, "batch": 10}),
        ),
        (
            "domkit_qmp",
            json!({"op": "scale_connect", "sockets": socks[1]}),
        ),
        ("raw", json!({"op": "scale_connect", "sockets": socks[0]})),
        (
            "qemu_qmp",
            json!({"op": "scale_connect", "sockets": socks[2]}),
        ),
    ];
    for (key, req) in plan {
        if !selected(cli, key) {
            continue;
        }
        let started = match key {
            "domkit" => rust_worker("domkit"),
            "domkit_qmp" => rust_worker("domkit-qmp"),
            "raw" => rust_worker("raw"),
            _ if cli.no_python => continue,
            _ => python_worker(cli, "qemu.qmp", &dir),
        };
        let mut w = match started {
            Ok(w) => w,
            Err(e) => {
                note_failure(res, key, &format!("scale N={n}"), &e);
                continue;
            }
        };
        match w.call(req) {
            Ok(v) => {
                let grow = num(&v, "rss_kib")? - num(&v, "rss_base_kib")?;
                res.push(format!("rss_per_domain_kib.{key}.n{n}"), grow / n as f64);
                // What each domain after the first costs: the first one also pays for the
                // code its path pages in (file-backed, ~1.4 MiB for the driver) and the
                // runtime's first allocations, which do not grow with N.
                if let (Some(first), true) = (v["rss_first_kib"].as_f64(), n > 1) {
                    res.push(
                        format!("rss_marginal_per_domain_kib.{key}.n{n}"),
                        (num(&v, "rss_kib")? - first) / (n - 1) as f64,
                    );
                }
                workers.push((key, w, v));
            }
            Err(e) => note_failure(res, key, &format!("scale N={n}"), &e),
        }
    }

    // Idle together: each manager's CPU time and wake-ups over the same window.
    let idle = json!({"op": "scale_idle", "secs": p.idle_secs});
    for (_, w, _) in workers.iter_mut() {
        w.send(&idle)?;
    }
    for (key, w, _) in workers.iter_mut() {
        let v = w.recv()?;
        res.push(format!("idle_cpu_ms.{key}.n{n}"), num(&v, "cpu_s")? * 1e3);
        res.push(format!("idle_wakeups.{key}.n{n}"), num(&v, "wakeups")?);
    }

    for rep in 0..p.reps {
        let order: Vec<usize> = rotated(&(0..workers.len()).collect::<Vec<_>>(), rep);
        for i in order {
            let (key, w, _) = &mut workers[i];
            match w.call(json!({"op": "scale_fanout", "rounds": p.fanout_rounds})) {
                Ok(v) => res.push(format!("fanout_ms.{key}.n{n}"), num(&v, "fanout_ms")?),
                Err(e) => note_failure(res, key, &format!("fan-out N={n}"), &e),
            }
        }
    }
    // Dropping the workers closes them (domkit destroys its domains); then the bare QEMUs.
    drop(workers);
    drop(qemus);
    Ok(())
}
