//! Guest-initiated poweroff (`guest-exec poweroff -f`) and panic (`echo c >
//! /proc/sysrq-trigger`, reported by pvpanic) of a REAL test guest, with each of
//! `on_poweroff` / `on_crash` = destroy / restart / preserve.
//!
//! Two policies share a boot where the first keeps the domain running (restart) or keeps it
//! at all (preserve -> destroy -> start): 4 boots cover the 6 combinations.

mod driver_support;

use domkit_core::{
    CrashedDetail, CrashedReason, Domain, DomainState, EventKind, LifecycleAction, PausedReason,
    RunningReason, ShutdownRequester, ShutoffReason, StartedDetail, StoppedDetail, SuspendedDetail,
};
use driver_support::*;
use LifecycleAction::{Destroy, Preserve, Restart};

const POWEROFF: &str = "sleep 0.3; poweroff -f";
const PANIC: &str = "sleep 0.3; echo c > /proc/sysrq-trigger";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poweroff_restart_then_panic_preserve() {
    let h = Harness::new();
    let config = with_policies(guest_config("pr", ""), Restart, Restart, Preserve);
    let domain = h.define(config).await;
    let log = EventLog::new(&domain);
    h.boot(&domain).await;
    log.take().await;

    // on_poweroff = restart: the same process is reset and continued.
    let pid = domain.pid();
    sh_start(&domain, POWEROFF).await;
    log.wait_for(EventKind::Started(StartedDetail::Booted), LONG)
        .await;
    wait_ready(&domain, 2).await;
    settle().await;
    assert_eq!(
        log.take().await,
        [
            EventKind::ShutdownRequested(ShutdownRequester::Guest),
            EventKind::Stopped(StoppedDetail::Shutdown),
            EventKind::Started(StartedDetail::Booted),
        ]
    );
    assert_eq!(domain.state(), DomainState::Running(RunningReason::Booted));
    assert_eq!(domain.pid(), pid, "a QEMU restart keeps the process");

    // on_crash = preserve: Crashed(Panicked), vCPUs stopped, process kept.
    sh_start(&domain, PANIC).await;
    log.wait_for(EventKind::Crashed(CrashedDetail::Panicked), LONG)
        .await;
    settle().await;
    assert_eq!(
        log.take().await,
        [EventKind::Crashed(CrashedDetail::Panicked)]
    );
    assert_eq!(
        domain.state(),
        DomainState::Crashed(CrashedReason::Panicked)
    );
    let status = domain
        .qmp()
        .expect("qmp")
        .query_status()
        .await
        .expect("status");
    assert!(!status.running, "{status:?}");
    domain.destroy().await.expect("destroy");
    assert_eq!(
        domain.state(),
        DomainState::Shutoff(ShutoffReason::Destroyed)
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_restart_then_poweroff_preserve() {
    let h = Harness::new();
    let config = with_policies(guest_config("rp", ""), Preserve, Restart, Restart);
    let domain = h.define(config).await;
    let log = EventLog::new(&domain);
    h.boot(&domain).await;
    log.take().await;

    // on_crash = restart.
    sh_start(&domain, PANIC).await;
    log.wait_for(EventKind::Started(StartedDetail::Booted), LONG)
        .await;
    wait_ready(&domain, 2).await;
    settle().await;
    assert_eq!(
        log.take().await,
        [
            EventKind::Crashed(CrashedDetail::Panicked),
            EventKind::Stopped(StoppedDetail::Crashed),
            EventKind::Started(StartedDetail::Booted),
        ]
    );
    assert_eq!(domain.state(), DomainState::Running(RunningReason::Booted));

    // on_poweroff = preserve: Paused(ShuttingDown), process kept; resume is refused.
    sh_start(&domain, POWEROFF).await;
    log.wait_for(EventKind::Suspended(SuspendedDetail::Paused), LONG)
        .await;
    settle().await;
    assert_eq!(
        log.take().await,
        [
            EventKind::ShutdownRequested(ShutdownRequester::Guest),
            EventKind::Suspended(SuspendedDetail::Paused),
        ]
    );
    assert_eq!(
        domain.state(),
        DomainState::Paused(PausedReason::ShuttingDown)
    );
    assert!(domain.pid().is_some());
    assert!(matches!(
        domain.resume().await,
        Err(domkit_core::Error::InvalidState { .. })
    ));
    domain.destroy().await.expect("destroy");
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poweroff_destroy_then_panic_destroy() {
    let h = Harness::new();
    let config = with_policies(guest_config("dd", ""), Destroy, Restart, Destroy);
    let domain = h.define(config).await;
    let log = EventLog::new(&domain);

    h.boot(&domain).await;
    log.take().await;
    sh_start(&domain, POWEROFF).await;
    let state = wait_state(&domain, LONG, DomainState::is_shutoff).await;
    assert_eq!(state, DomainState::Shutoff(ShutoffReason::Shutdown));
    assert_eq!(
        log.take().await,
        [
            EventKind::ShutdownRequested(ShutdownRequester::Guest),
            EventKind::Stopped(StoppedDetail::Shutdown),
        ]
    );

    h.boot(&domain).await;
    log.take().await;
    sh_start(&domain, PANIC).await;
    let state = wait_state(&domain, LONG, DomainState::is_shutoff).await;
    assert_eq!(state, DomainState::Shutoff(ShutoffReason::Crashed));
    assert_eq!(
        log.take().await,
        [
            EventKind::Crashed(CrashedDetail::Panicked),
            EventKind::Stopped(StoppedDetail::Crashed),
        ]
    );
    h.finish().await;
}
