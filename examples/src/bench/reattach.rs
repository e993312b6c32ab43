//! Reattach at scale (issue 12): a fresh persistent driver opening a root that holds N live
//! QEMU domains, beside a bare client connecting to the same N monitors and querying their
//! status, interleaved in one run.
//!
//! The domains are started paused (their QEMU processes live, their vCPUs do not burn the
//! two cores under TCG) by a driver that then detaches, as a manager does at an orderly
//! exit; each repetition then measures, alternately:
//! - `raw`: connect + greeting + `qmp_capabilities` + `query-status`, for every monitor in
//!   turn (the blocking raw client of `raw.rs`);
//! - `domkit`: `QemuDriver::open` until every domain is reattached (pidfd, monitor
//!   connection, handshake, `query-status` reconciled) and reports `paused`, then detach.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use domkit_core::{Domain, DomainState, Driver};
use domkit_qemu::{QemuDriver, QemuDriverOptions};

use super::qemu::{create_paused_in_batches, SCALE_MEMORY_MIB};
use super::raw::{RawQmp, QUERY_STATUS};
use super::results::Results;

/// Runs the reattach figures for `n` domains and `reps` repetitions into `res`:
/// `reattach_ms.{domkit,raw}.n<N>` and `reattach_vs_raw.domkit.n<N>`.
pub fn run(
    runtime: &tokio::runtime::Runtime,
    tmp: &Path,
    disk: &Path,
    n: usize,
    reps: usize,
    res: &mut Results,
) -> anyhow::Result<()> {
    let base = tmp.join(format!("ra{n}"));
    let options = || QemuDriverOptions::persistent(base.join("s"), base.join("r"));
    runtime.block_on(async {
        let driver = QemuDriver::open(options()).await?;
        create_paused_in_batches(
            &driver,
            n,
            "r",
            SCALE_MEMORY_MIB,
            disk,
            "a domain to reattach to",
        )
        .await?;
        driver.detach();
        anyhow::Ok(())
    })?;
    let sockets: Vec<_> = (0..n)
        .map(|i| base.join("r").join(format!("r{i}")).join("qmp.sock"))
        .collect();
    let result = (|| -> anyhow::Result<()> {
        for rep in 0..reps {
            // Alternate which goes first: the machine is noisy.
            for peer in if rep % 2 == 0 {
                ["raw", "domkit"]
            } else {
                ["domkit", "raw"]
            } {
                let t = Instant::now();
                match peer {
                    "raw" => {
                        for s in &sockets {
                            let mut qmp = RawQmp::connect(s)
                                .with_context(|| format!("raw connect {}", s.display()))?;
                            qmp.cmd(QUERY_STATUS)?;
                        }
                    }
                    _ => runtime.block_on(async {
                        let driver = QemuDriver::open(options()).await?;
                        let listed = driver.list().await?;
                        let paused = listed
                            .iter()
                            .filter(|i| matches!(i.state, DomainState::Paused(_)))
                            .count();
                        if paused != n {
                            bail!("reattached {paused} of {n} domains as paused: {listed:?}");
                        }
                        driver.detach();
                        anyhow::Ok(())
                    })?,
                }
                let ms = t.elapsed().as_secs_f64() * 1e3;
                res.push(format!("reattach_ms.{peer}.n{n}"), ms);
            }
            if let (Some(dk), Some(raw)) = (
                last(res, &format!("reattach_ms.domkit.n{n}")),
                last(res, &format!("reattach_ms.raw.n{n}")),
            ) {
                res.push(format!("reattach_vs_raw.domkit.n{n}"), dk / raw);
            }
        }
        Ok(())
    })();
    // Whatever happened: every domain destroyed, the roots removed.
    runtime.block_on(async {
        match QemuDriver::open(options()).await {
            Ok(driver) => {
                for d in driver.list().await.unwrap_or_default() {
                    if let Ok(dom) = driver.lookup_by_name(&d.id.name).await {
                        let _ = dom.destroy().await;
                    }
                }
                let _ = driver.close().await;
            }
            Err(e) => eprintln!("domkit-bench: reattach cleanup: {e}"),
        }
    });
    let _ = std::fs::remove_dir_all(&base);
    result
}

fn last(res: &Results, key: &str) -> Option<f64> {
    res.samples(key).and_then(|s| s.last().copied())
}
