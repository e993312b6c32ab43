//! Power management of a REAL test guest: S3 through the guest agent (`guest-suspend-ram`,
//! which never replies) and `system_wakeup`; S4 is refused with the reason.

mod driver_support;

use domkit_core::{
    Domain, DomainState, Error, EventKind, PmSuspendTarget, PmSuspendedDetail, PmSuspendedReason,
    RunningReason, StartedDetail,
};
use driver_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_suspend_via_agent_and_wakeup() {
    let h = Harness::new();
    let domain = h.define(guest_config("sleeper", "")).await;
    let log = EventLog::new(&domain);
    assert!(matches!(
        domain.pm_wakeup().await,
        Err(Error::InvalidState { .. })
    ));
    h.boot(&domain).await;
    sh(&domain, "echo still-here > /tmp/pm").await;
    log.take().await;

    let err = domain
        .pm_suspend(PmSuspendTarget::Disk)
        .await
        .expect_err("S4");
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    eprintln!("S4: {err}");
    assert!(domain.state().is_running());

    domain
        .pm_suspend(PmSuspendTarget::Memory)
        .await
        .expect("suspend to RAM");
    assert_eq!(
        domain.state(),
        DomainState::PmSuspended(PmSuspendedReason::Memory)
    );
    let status = domain
        .qmp()
        .expect("qmp")
        .query_status()
        .await
        .expect("status");
    assert_eq!(status.status.as_str(), "suspended");
    assert!(matches!(
        domain.resume().await,
        Err(Error::InvalidState { .. })
    ));

    domain.pm_wakeup().await.expect("wakeup");
    assert_eq!(domain.state(), DomainState::Running(RunningReason::Wakeup));
    settle().await;
    assert_eq!(
        log.take().await,
        [
            EventKind::PmSuspended(PmSuspendedDetail::Memory),
            EventKind::Started(StartedDetail::Wakeup),
        ]
    );
    // The guest resumed where it was (S3 keeps memory), and its agent works again.
    assert_eq!(sh(&domain, "cat /tmp/pm").await.trim(), "still-here");
    domain.destroy().await.expect("destroy");
    h.finish().await;
}
