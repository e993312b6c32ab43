//! The scale bench's manager processes (`domkit-bench scale-worker KIND`).
//!
//! Each manager is its own process so its RSS is its own: the RSS growth from before the
//! first domain to after the N-th, divided by N, is the manager's memory per domain. Kinds:
//! - `domkit`: one [`QemuDriver`] that creates (spawns, connects, supervises) N paused
//!   domains: everything domkit keeps per domain.
//! - `domkit-qmp`: N bare [`QmpClient`]s on QEMUs spawned by the orchestrator: the client's
//!   share of the above.
//! - `raw`: N blocking connections, fanned out with `poll(2)`.
//!
//! Requests (one JSON line each, same protocol as `scripts/bench/peer.py`):
//! `scale_connect`, `scale_idle {secs}`, `scale_fanout {rounds}`, `close`.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use domkit_core::{Domain, Driver, StartOptions};
use domkit_qemu::qmp::QmpClient;
use domkit_qemu::{QemuDomain, QemuDriver, QemuDriverOptions};
use nix::sys::resource::{getrusage, UsageWho};
use serde_json::{json, Value};

use super::qemu::{bench_config, SCALE_MEMORY_MIB};
use super::raw::{RawFanout, RawQmp};
use super::stats::percentile;

/// This process's resident set size in KiB (`VmRSS`).
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// CPU time (user + system, all threads) in seconds and context switches (voluntary +
/// involuntary: every wake-up of any thread counts) of this process so far.
pub fn cpu_and_wakeups() -> (f64, i64) {
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            (
                t(u.user_time()) + t(u.system_time()),
                u.voluntary_context_switches() + u.involuntary_context_switches(),
            )
        }
        Err(_) => (f64::NAN, -1),
    }
}

enum Managed {
    None,
    Raw(RawFanout),
    Qmp(Vec<QmpClient>),
    Domkit(QemuDriver, Vec<QemuDomain>),
}

/// Runs a scale worker of `kind` on stdin/stdout until `close`.
pub fn run_worker(kind: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{}", json!({"ok": true, "peer": kind}))?;
    stdout.flush()?;
    let mut managed = Managed::None;
    for line in stdin.lock().lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let req: Value = serde_json::from_str(&line)?;
        let op = req["op"].as_str().unwrap_or("").to_string();
        let reply = match handle(kind, &runtime, &mut managed, &req) {
            Ok(mut v) => {
                v["ok"] = json!(true);
                v
            }
            Err(e) => json!({"ok": false, "error": format!("{e:#}")}),
        };
        writeln!(stdout, "{reply}")?;
        stdout.flush()?;
        if op == "close" {
            break;
        }
    }
    Ok(())
}

fn handle(
    kind: &str,
    runtime: &tokio::runtime::Runtime,
    managed: &mut Managed,
    req: &Value,
) -> anyhow::Result<Value> {
    match req["op"].as_str().unwrap_or("") {
        "scale_connect" => {
            let base = rss_kib();
            let mut first = None;
            *managed = connect(kind, runtime, req, &mut first)?;
            let n = match managed {
                Managed::Raw(f) => f.connections(),
                Managed::Qmp(c) => c.len(),
                Managed::Domkit(_, d) => d.len(),
                Managed::None => 0,
            };
            Ok(json!({"rss_base_kib": base, "rss_first_kib": first, "rss_kib": rss_kib(), "n": n}))
        }
        "scale_idle" => {
            let secs = req["secs"].as_f64().unwrap_or(1.0);
            // The runtime's worker threads keep serving domkit's tasks (I/O, timers) on their
            // own while this thread just sleeps, so the window's CPU time and wake-ups are
            // domkit's alone, plus this thread's single wake-up at the end.
            let (cpu0, w0) = cpu_and_wakeups();
            let t0 = Instant::now();
            std::thread::sleep(Duration::from_secs_f64(secs));
            let (cpu1, w1) = cpu_and_wakeups();
            Ok(
                json!({"cpu_s": cpu1 - cpu0, "wakeups": w1 - w0, "secs": t0.elapsed().as_secs_f64()}),
            )
        }
        "scale_fanout" => {
            let rounds = req["rounds"].as_u64().unwrap_or(5) as usize;
            let mut times = Vec::with_capacity(rounds);
            for _ in 0..rounds {
                let d = match managed {
                    Managed::Raw(f) => f.query_all()?,
                    Managed::Qmp(clients) => runtime.block_on(fanout(clients.iter()))?,
                    Managed::Domkit(_, domains) => {
                        let clients: Vec<QmpClient> =
                            domains.iter().filter_map(QemuDomain::qmp).collect();
                        anyhow::ensure!(clients.len() == domains.len(), "a domain lost its QMP");
                        runtime.block_on(fanout(clients.iter()))?
                    }
                    Managed::None => bail!("nothing connected"),
                };
                times.push(d.as_secs_f64() * 1e3);
            }
            times.sort_by(f64::total_cmp);
            Ok(json!({"fanout_ms": percentile(&times, 50.0)}))
        }
        "close" => {
            if let Managed::Domkit(driver, _) = std::mem::replace(managed, Managed::None) {
                runtime.block_on(driver.close())?;
            }
            Ok(json!({}))
        }
        other => bail!("unknown op {other:?}"),
    }
}

/// Queries every client at once (one task, `join_all`) and waits for all replies.
async fn fanout<'a>(clients: impl Iterator<Item = &'a QmpClient>) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let all = futures::future::join_all(clients.map(QmpClient::query_status)).await;
    let elapsed = t0.elapsed();
    for r in all {
        r?;
    }
    Ok(elapsed)
}

fn sockets(req: &Value) -> anyhow::Result<Vec<PathBuf>> {
    Ok(req["sockets"]
        .as_array()
        .context("sockets")?
        .iter()
        .filter_map(|s| s.as_str().map(PathBuf::from))
        .collect())
}

/// Connects (or creates) the manager's N domains; `first` gets the RSS once the first one is
/// there (the marginal cost per domain is measured from it).
fn connect(
    kind: &str,
    runtime: &tokio::runtime::Runtime,
    req: &Value,
    first: &mut Option<u64>,
) -> anyhow::Result<Managed> {
    match kind {
        "raw" => {
            let mut f = RawFanout::default();
            for s in sockets(req)? {
                f.push(RawQmp::connect(&s).with_context(|| format!("connecting {}", s.display()))?);
                first.get_or_insert_with(rss_kib);
            }
            Ok(Managed::Raw(f))
        }
        "domkit-qmp" => runtime.block_on(async {
            let mut clients = Vec::new();
            for s in sockets(req)? {
                clients.push(QmpClient::connect(&s).await?);
                first.get_or_insert_with(rss_kib);
            }
            Ok(Managed::Qmp(clients))
        }),
        "domkit" => {
            let n = req["n"].as_u64().context("n")? as usize;
            let root = PathBuf::from(req["root"].as_str().context("root")?);
            let disk = PathBuf::from(req["disk"].as_str().context("disk")?);
            let batch = req["batch"].as_u64().unwrap_or(10).max(1) as usize;
            runtime.block_on(async {
                let driver = QemuDriver::new(QemuDriverOptions::with_runtime_root(root))?;
                let mut domains = Vec::with_capacity(n);
                // The first alone (the marginal cost is measured from it), then in batches:
                // 100 QEMUs initialising at once on 2 cores would make some miss their
                // connect timeout.
                let ids: Vec<usize> = (0..n).collect();
                let (one, rest) = ids.split_at(n.min(1));
                for chunk in std::iter::once(one).chain(rest.chunks(batch)) {
                    let created = futures::future::join_all(chunk.iter().map(|i| {
                        let config = bench_config(&format!("s{i}"), SCALE_MEMORY_MIB, &disk);
                        driver.create(config, StartOptions { paused: true })
                    }))
                    .await;
                    for d in created {
                        domains.push(d?);
                    }
                    first.get_or_insert_with(rss_kib);
                }
                for d in &domains {
                    anyhow::ensure!(d.state().is_active(), "{} is not active", d.id().name);
                }
                Ok(Managed::Domkit(driver, domains))
            })
        }
        other => bail!("unknown scale worker kind {other:?}"),
    }
}
