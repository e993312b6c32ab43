//! Bulk statistics at scale (issue 11): `Driver::all_stats()` for N paused QEMU domains in
//! this process (the manager), as a monitoring agent polling once a second would call it.
//!
//! The domains are started paused (`-S` then no `cont`: their QEMU processes live, their
//! vCPUs do not burn the two cores under TCG), each with the bench's one disk, so every
//! record costs what a real one does: a `query-blockstats` round trip, the `/proc` reads of
//! the process and of its vCPU thread (`query-cpus-fast` is asked once per instance, by the
//! warm-up call). Each repetition measures, in this order:
//! - `allstats_call_ms`: the median of back-to-back calls (`CALLS` of them);
//! - `allstats_poll_cpu_pct` / `allstats_poll_wakeups_per_s`: the manager's CPU (user +
//!   system, every thread; the QEMU processes are not counted) and context switches over a
//!   window in which it polls once a second;
//! - `allstats_idle_cpu_pct`: the same window without polling (what the N domains cost the
//!   manager anyway), so the poll's own cost is the difference.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use domkit_core::{Domain, Driver};
use domkit_qemu::{QemuDriver, QemuDriverOptions};

use super::qemu::{create_paused_in_batches, SCALE_MEMORY_MIB};
use super::results::Results;
use super::scale::cpu_and_wakeups;
use super::stats::percentile;

/// Back-to-back calls per repetition.
const CALLS: usize = 20;

/// Runs the bulk stats figures for `n` domains into `res`; `window` is the polling (and
/// idle) window of each repetition.
pub fn run(
    runtime: &tokio::runtime::Runtime,
    tmp: &Path,
    disk: &Path,
    n: usize,
    reps: usize,
    window: Duration,
    res: &mut Results,
) -> anyhow::Result<()> {
    let root = tmp.join(format!("st{n}"));
    std::fs::create_dir_all(&root)?;
    std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let driver = QemuDriver::new(QemuDriverOptions::with_runtime_root(&root))?;
    let result = runtime.block_on(async {
        create_paused_in_batches(&driver, n, "s", SCALE_MEMORY_MIB, disk, "a domain to poll")
            .await?;
        // Warm-up, and a check that every record has its figures.
        let all = driver.all_stats().await?;
        let complete = all
            .iter()
            .filter(|s| {
                s.cpu.total_ns.is_some()
                    && s.cpu.vcpus.len() == 1
                    && s.disks.first().and_then(|d| d.read_requests).is_some()
            })
            .count();
        if complete != n {
            bail!("{complete} of {n} records have cpu and disk figures: {all:?}");
        }
        for rep in 0..reps {
            let mut calls = Vec::with_capacity(CALLS);
            for _ in 0..CALLS {
                let t = Instant::now();
                let all = driver.all_stats().await?;
                calls.push(t.elapsed().as_secs_f64() * 1e3);
                anyhow::ensure!(all.len() == n, "all_stats gave {} records", all.len());
            }
            calls.sort_by(f64::total_cmp);
            res.push(
                format!("allstats_call_ms.domkit.n{n}"),
                percentile(&calls, 50.0),
            );
            res.push(
                format!("allstats_call_p99_ms.domkit.n{n}"),
                percentile(&calls, 99.0),
            );

            // Alternate which window goes first: the machine is noisy.
            for polling in if rep % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            } {
                let (cpu0, w0) = cpu_and_wakeups();
                let t0 = Instant::now();
                if polling {
                    let mut tick = tokio::time::interval(Duration::from_secs(1));
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    while t0.elapsed() < window {
                        tick.tick().await;
                        let all = driver.all_stats().await?;
                        anyhow::ensure!(all.len() == n, "all_stats gave {} records", all.len());
                    }
                } else {
                    tokio::time::sleep(window).await;
                }
                let secs = t0.elapsed().as_secs_f64();
                let (cpu1, w1) = cpu_and_wakeups();
                let what = if polling { "poll" } else { "idle" };
                res.push(
                    format!("allstats_{what}_cpu_pct.domkit.n{n}"),
                    (cpu1 - cpu0) / secs * 100.0,
                );
                res.push(
                    format!("allstats_{what}_wakeups_per_s.domkit.n{n}"),
                    (w1 - w0) as f64 / secs,
                );
            }
            eprintln!(
                "domkit-bench: stats N={n} repetition {}/{reps} done",
                rep + 1
            );
        }
        anyhow::Ok(())
    });
    // Whatever happened: every domain destroyed.
    runtime.block_on(async {
        for info in driver.list().await.unwrap_or_default() {
            if let Ok(d) = driver.lookup_by_name(&info.id.name).await {
                let _ = d.destroy().await;
            }
        }
        let _ = driver.close().await;
    });
    let _ = std::fs::remove_dir_all(&root);
    result
}
