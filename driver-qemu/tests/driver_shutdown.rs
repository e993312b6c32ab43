//! Graceful shutdown of a REAL test guest: acknowledged vs completed, ACPI and agent, and a
//! guest that ignores the request (`domkit.ignore_shutdown=1`): timeout, then escalation.

mod driver_support;

use std::time::{Duration, Instant};

use domkit_core::{
    Domain, DomainState, Error, EventKind, ShutdownMode, ShutdownOptions, ShutdownOutcome,
    ShutdownRequester, ShutdownWait, ShutoffReason, ShuttingDownReason, StartedDetail,
    StoppedDetail,
};
use driver_support::*;

fn options(
    mode: ShutdownMode,
    wait: ShutdownWait,
    timeout: Duration,
    destroy: bool,
) -> ShutdownOptions {
    ShutdownOptions {
        mode,
        wait,
        timeout,
        destroy_on_timeout: destroy,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_acknowledged_then_completed_acpi_and_agent() {
    let h = Harness::new();
    let domain = h.define(guest_config("shut", "")).await;
    let log = EventLog::new(&domain);

    // ACPI, wait for the acknowledgement only: returns at POWERDOWN, the guest finishes later.
    h.boot(&domain).await;
    log.take().await;
    let t = Instant::now();
    let outcome = domain
        .shutdown(options(
            ShutdownMode::Acpi,
            ShutdownWait::Acknowledged,
            LONG,
            false,
        ))
        .await
        .expect("shutdown acknowledged");
    let ack = t.elapsed();
    assert_eq!(outcome, ShutdownOutcome::Acknowledged);
    assert!(
        matches!(
            domain.state(),
            DomainState::ShuttingDown(ShuttingDownReason::User) | DomainState::Shutoff(_)
        ),
        "{}",
        domain.state()
    );
    let state = wait_state(&domain, LONG, DomainState::is_shutoff).await;
    eprintln!(
        "acpi: acknowledged after {ack:?}, shut off after {:?}",
        t.elapsed()
    );
    assert_eq!(state, DomainState::Shutoff(ShutoffReason::Shutdown));
    assert_eq!(
        log.take().await,
        [
            EventKind::ShutdownRequested(ShutdownRequester::Host),
            EventKind::Stopped(StoppedDetail::Shutdown)
        ]
    );

    // Agent, wait for completion.
    h.boot(&domain).await;
    let t = Instant::now();
    let outcome = domain
        .shutdown(options(
            ShutdownMode::Agent,
            ShutdownWait::Completed,
            LONG,
            false,
        ))
        .await
        .expect("shutdown via agent");
    eprintln!("agent: completed after {:?}", t.elapsed());
    assert_eq!(outcome, ShutdownOutcome::Completed);
    assert_eq!(
        domain.state(),
        DomainState::Shutoff(ShutoffReason::Shutdown)
    );
    assert_eq!(
        log.take().await,
        [
            EventKind::Started(StartedDetail::Booted),
            EventKind::ShutdownRequested(ShutdownRequester::Host),
            EventKind::Stopped(StoppedDetail::Shutdown)
        ]
    );

    // Paravirt does not exist on QEMU; a shut-off domain cannot be shut down.
    assert!(matches!(
        domain
            .shutdown(options(
                ShutdownMode::Paravirt,
                ShutdownWait::Completed,
                LONG,
                false
            ))
            .await,
        Err(Error::InvalidState { .. } | Error::Unsupported { .. })
    ));
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignored_shutdown_times_out_then_escalates_to_destroy() {
    let h = Harness::new();
    let domain = h
        .define(guest_config("deaf", "domkit.ignore_shutdown=1"))
        .await;
    let log = EventLog::new(&domain);
    h.boot(&domain).await;
    log.take().await;

    let short = Duration::from_secs(5);
    let err = domain
        .shutdown(options(
            ShutdownMode::Acpi,
            ShutdownWait::Completed,
            short,
            false,
        ))
        .await
        .expect_err("the guest ignores the power button");
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    eprintln!("timeout error: {err}");
    assert!(domain.state().is_active());
    assert!(matches!(
        domain
            .shutdown(options(
                ShutdownMode::Paravirt,
                ShutdownWait::Completed,
                short,
                false
            ))
            .await,
        Err(Error::Unsupported { .. })
    ));

    let outcome = domain
        .shutdown(options(
            ShutdownMode::Agent,
            ShutdownWait::Completed,
            short,
            true,
        ))
        .await
        .expect("escalation");
    assert_eq!(outcome, ShutdownOutcome::Destroyed);
    assert_eq!(
        domain.state(),
        DomainState::Shutoff(ShutoffReason::Destroyed)
    );
    let events = log.take().await;
    assert_eq!(
        events.last(),
        Some(&EventKind::Stopped(StoppedDetail::Destroyed)),
        "{events:?}"
    );
    assert_eq!(
        events
            .iter()
            .filter(|k| matches!(k, EventKind::Stopped(_)))
            .count(),
        1
    );
    h.finish().await;
}
