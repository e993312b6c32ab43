//! Start, pause/resume, reset, reboot (fake reboot, agent, guest-initiated) and destroy of a
//! REAL test guest under QEMU 7.2 / TCG, through the `Domain` trait.
//!
//! One boot serves the whole chain in `running_domain_*`: each step subscribes afresh and
//! checks exactly the events that step produced, so sharing the boot does not blur them.

mod driver_support;

use std::time::{Duration, Instant};

use domkit_core::{
    Domain, DomainState, EventKind, PausedReason, ResumedDetail, RunningReason, ShutdownMode,
    ShutoffReason, StartOptions, StartedDetail, StoppedDetail, SuspendedDetail,
};
use driver_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_domain_pause_resume_reset_reboots_and_destroy() {
    let h = Harness::new();
    let domain = h.define(guest_config("life", "")).await;
    let log = EventLog::new(&domain);

    // start -> Running(Booted), one Started.
    let boot_time = h.boot(&domain).await;
    eprintln!("boot (spawn -> agent answers): {boot_time:?}");
    assert_eq!(domain.state(), DomainState::Running(RunningReason::Booted));
    assert_eq!(
        log.take().await,
        [EventKind::Started(StartedDetail::Booted)]
    );
    let dir = domain.runtime_dir().to_path_buf();
    let mode = std::fs::metadata(&dir).expect("runtime dir").permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o700
    );
    // Everything in it is private to the owner (logs 0600, sockets without group/other bits).
    for entry in std::fs::read_dir(&dir).expect("ls").flatten() {
        let meta = entry.metadata().expect("stat");
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
        assert_eq!(
            mode & 0o077,
            0,
            "{} has mode {:o}",
            entry.path().display(),
            mode & 0o777
        );
    }

    // pause twice, resume twice: one event each, idempotent.
    domain.pause().await.expect("pause");
    domain.pause().await.expect("pause again");
    assert_eq!(domain.state(), DomainState::Paused(PausedReason::User));
    domain.resume().await.expect("resume");
    domain.resume().await.expect("resume again");
    assert_eq!(
        domain.state(),
        DomainState::Running(RunningReason::Unpaused)
    );
    settle().await;
    assert_eq!(
        log.take().await,
        [
            EventKind::Suspended(SuspendedDetail::Paused),
            EventKind::Resumed(ResumedDetail::Unpaused)
        ]
    );

    // reset: one Rebooted for the RESET burst.
    let ready = ready_count(&domain);
    domain.reset().await.expect("reset");
    wait_ready(&domain, ready + 1).await;
    settle().await;
    assert_eq!(log.take().await, [EventKind::Rebooted]);
    assert!(domain.state().is_running());

    // reboot (ACPI): QEMU fake reboot; stays Running, exactly one Rebooted.
    let ready = ready_count(&domain);
    let started = Instant::now();
    domain
        .reboot(ShutdownMode::Acpi, LONG)
        .await
        .expect("reboot (acpi)");
    eprintln!("fake reboot returned after {:?}", started.elapsed());
    assert!(domain.state().is_running(), "{}", domain.state());
    wait_ready(&domain, ready + 1).await;
    settle().await;
    assert_eq!(log.take().await, [EventKind::Rebooted]);
    assert_eq!(domain.state(), DomainState::Running(RunningReason::Booted));

    // guest-initiated reboot: one Rebooted.
    let ready = ready_count(&domain);
    sh_start(&domain, "sleep 0.3; reboot -f").await;
    log.wait_for(EventKind::Rebooted, LONG).await;
    wait_ready(&domain, ready + 1).await;
    settle().await;
    assert_eq!(log.take().await, [EventKind::Rebooted]);
    assert!(domain.state().is_running());

    // reboot through the agent: one Rebooted.
    let ready = ready_count(&domain);
    domain
        .reboot(ShutdownMode::Agent, LONG)
        .await
        .expect("reboot (agent)");
    wait_ready(&domain, ready + 1).await;
    settle().await;
    assert_eq!(log.take().await, [EventKind::Rebooted]);
    assert!(domain.state().is_running());

    // destroy: Shutoff(Destroyed), one Stopped; sockets gone at once.
    domain.destroy().await.expect("destroy");
    assert_eq!(
        domain.state(),
        DomainState::Shutoff(ShutoffReason::Destroyed)
    );
    assert_eq!(
        log.take().await,
        [EventKind::Stopped(StoppedDetail::Destroyed)]
    );
    let sockets: Vec<_> = std::fs::read_dir(&dir)
        .expect("dir")
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "sock"))
        .collect();
    assert!(sockets.is_empty(), "{sockets:?}");
    domain
        .destroy()
        .await
        .expect("destroy of a shut-off domain is a no-op");
    assert!(log.take().await.is_empty());
    log.assert_gapless();
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_paused_then_resume_and_state_errors() {
    let h = Harness::new();
    let domain = h.define(guest_config("paused", "")).await;
    let log = EventLog::new(&domain);
    assert!(matches!(
        domain.pause().await,
        Err(domkit_core::Error::InvalidState { .. })
    ));
    domain
        .start(StartOptions { paused: true })
        .await
        .expect("start paused");
    h.track(&domain);
    assert_eq!(domain.state(), DomainState::Paused(PausedReason::User));
    assert!(matches!(
        domain.start(StartOptions::default()).await,
        Err(domkit_core::Error::InvalidState { .. })
    ));
    domain
        .pause()
        .await
        .expect("pause of a paused domain: no-op");
    domain.resume().await.expect("resume");
    assert_eq!(
        domain.state(),
        DomainState::Running(RunningReason::Unpaused)
    );
    wait_ready(&domain, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        log.take().await,
        [
            EventKind::Started(StartedDetail::Booted),
            EventKind::Suspended(SuspendedDetail::Paused),
            EventKind::Resumed(ResumedDetail::Unpaused),
        ]
    );
    let info = domain.info().await.expect("info");
    assert!(info.backend_handle.expect("pid").starts_with("pid "));
    domain.destroy().await.expect("destroy");
    h.finish().await;
}
