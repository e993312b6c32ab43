//! domkit's side of each measurement, through the public API a program would use:
//! `QemuDriver` / [`QemuDomain`] (`domkit_core::{Driver, Domain}`) and the domain's
//! [`QmpClient`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use domkit_core::{Domain, EventKind, StartOptions};
use domkit_qemu::qmp::{EventRecvError, QmpClient};
use domkit_qemu::QemuDomain;
use futures::StreamExt;

use super::stats::{summarize_ns, LatSummary};

/// Sequential `query-status` (typed, as a program calls it) for `secs`.
pub async fn rt(qmp: &QmpClient, secs: f64) -> anyhow::Result<LatSummary> {
    let mut lat = Vec::with_capacity(16 * 1024);
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        let a = Instant::now();
        qmp.query_status().await?;
        lat.push(a.elapsed().as_nanos() as u64);
    }
    Ok(summarize_ns(&lat, t0.elapsed()))
}

/// `callers` tasks sharing one client, each issuing `query-status` back to back for
/// `secs`: the total rate.
pub async fn rt_concurrent(qmp: &QmpClient, callers: usize, secs: f64) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let (qmp, done, stop) = (qmp.clone(), done.clone(), stop.clone());
            tokio::spawn(async move {
                while Instant::now() < end && !stop.load(Ordering::Relaxed) {
                    if let Err(e) = qmp.query_status().await {
                        stop.store(true, Ordering::Relaxed);
                        return Err(e);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64())
}

/// Event latencies of `cycles` resume/pause cycles, in microseconds.
#[derive(Debug, Default)]
pub struct EventSamples {
    /// QEMU's event timestamp to the uniform `DomainEvent` (Resumed/Suspended) reaching a
    /// subscriber task.
    pub uniform_us: Vec<f64>,
    /// QEMU's event timestamp to domkit's QMP reader having the event (its `received_wall`):
    /// the wire part of `uniform_us`.
    pub qmp_reader_us: Vec<f64>,
}

/// Resumes and pauses `domain` `cycles` times while a separate subscriber task measures
/// each uniform event. The uniform event carries domkit's own time, so QEMU's timestamp is
/// taken from the QMP event it was translated from: the subscriber also holds a QMP
/// subscription that it only drains with `try_recv` (no extra wake-up), since the QMP event
/// is always in the ring before the uniform event is published.
pub async fn events(domain: &QemuDomain, cycles: usize) -> anyhow::Result<EventSamples> {
    let qmp = domain.qmp().context("the domain has no QMP connection")?;
    let mut qmp_events = qmp.subscribe();
    let mut uniform = domain.subscribe();
    let want = cycles * 2;
    let subscriber = tokio::spawn(async move {
        let mut s = EventSamples::default();
        while s.uniform_us.len() < want {
            let Some(ev) = uniform.next().await else {
                break;
            };
            let now = SystemTime::now();
            let name = match ev.kind {
                EventKind::Suspended(_) => "STOP",
                EventKind::Resumed(_) => "RESUME",
                _ => continue,
            };
            let mut source = None;
            loop {
                match qmp_events.try_recv() {
                    Ok(Some(q)) if q.name == name => {
                        source = Some(q);
                        break;
                    }
                    Ok(Some(_)) | Err(EventRecvError::Lagged(_)) => {}
                    Ok(None) | Err(EventRecvError::Closed) => break,
                }
            }
            let Some(q) = source else { continue };
            let Some(qemu_time) = q.timestamp.to_system_time() else {
                continue;
            };
            s.uniform_us.push(micros_between(qemu_time, now));
            s.qmp_reader_us
                .push(micros_between(qemu_time, q.received_wall));
        }
        s
    });
    for _ in 0..cycles {
        domain.resume().await?;
        domain.pause().await?;
    }
    let samples = tokio::time::timeout(Duration::from_secs(30), subscriber)
        .await
        .context("the subscriber did not see every event")??;
    Ok(samples)
}

fn micros_between(from: SystemTime, to: SystemTime) -> f64 {
    match to.duration_since(from) {
        Ok(d) => d.as_secs_f64() * 1e6,
        Err(e) => -e.duration().as_secs_f64() * 1e6,
    }
}

/// Milestones of one domkit start/destroy pair of cycles.
#[derive(Debug, Clone, Copy)]
pub struct StartSample {
    /// `start(paused)`: spawn -> monitor negotiated -> lifecycle says Paused.
    pub qmp_ready: Duration,
    /// `start(running)`: the same plus `cont`.
    pub running: Duration,
    /// `destroy()` of the running domain (quit, process reaped, Shutoff).
    pub destroy: Duration,
}

/// Starts `domain` paused, destroys it, starts it running, destroys it.
pub async fn start_cycle(domain: &QemuDomain) -> anyhow::Result<StartSample> {
    let t0 = Instant::now();
    domain.start(StartOptions { paused: true }).await?;
    let qmp_ready = t0.elapsed();
    domain.destroy().await?;
    let t1 = Instant::now();
    domain.start(StartOptions { paused: false }).await?;
    let running = t1.elapsed();
    let t2 = Instant::now();
    domain.destroy().await?;
    let destroy = t2.elapsed();
    Ok(StartSample {
        qmp_ready,
        running,
        destroy,
    })
}
