//! The scenarios: written once, generic over [`TestBackend`]. Each checks the uniform states
//! and the exact event sequence (`docs/semantics.md` sections in `about`).

use crate::backend::{GuestAction, GuestOptions, TestBackend};
use crate::scenario::*;
use domkit_core::{
    CrashedDetail, CrashedReason, Domain, DomainState, Driver, Error, EventKind, LifecycleAction,
    LifecyclePolicies, Operation, PausedReason, PmSuspendTarget, PmSuspendedDetail,
    PmSuspendedReason, RestoreOptions, ResumedDetail, RunningReason, ShutdownMode, ShutdownOptions,
    ShutdownOutcome, ShutdownRequester, ShutdownWait, ShutoffReason, ShuttingDownReason,
    StartOptions, StartedDetail, StoppedDetail, SuspendedDetail,
};
use std::time::Duration;

use EventKind as E;

mod agent;
mod devices;
mod durable;
mod faults;
mod watch;

macro_rules! scenario {
    ($name:ident, $about:expr) => {
        Scenario {
            name: stringify!($name),
            about: $about,
            run: |ctx| Box::pin($name(ctx)),
        }
    };
}

macro_rules! durable {
    ($name:ident, $about:expr) => {
        Scenario {
            name: stringify!($name),
            about: $about,
            run: |ctx| Box::pin(durable::$name(ctx)),
        }
    };
}

macro_rules! watch {
    ($name:ident, $about:expr) => {
        Scenario {
            name: stringify!($name),
            about: $about,
            run: |ctx| Box::pin(watch::$name(ctx)),
        }
    };
}

macro_rules! device {
    ($name:ident, $about:expr) => {
        Scenario {
            name: stringify!($name),
            about: $about,
            run: |ctx| Box::pin(devices::$name(ctx)),
        }
    };
}

macro_rules! agent {
    ($name:ident, $about:expr) => {
        Scenario {
            name: stringify!($name),
            about: $about,
            run: |ctx| Box::pin(agent::$name(ctx)),
        }
    };
}

macro_rules! fault {
    ($name:ident, $about:expr) => {
        Scenario {
            name: stringify!($name),
            about: $about,
            run: |ctx| Box::pin(faults::$name(ctx)),
        }
    };
}

/// Every scenario, in the order they run.
pub fn all<B: TestBackend>() -> Vec<Scenario<B>> {
    vec![
        scenario!(define_undefine, "define/undefine events, duplicates, invalid config (§2, §7)"),
        scenario!(unknown_domain, "operations on an unknown domain -> not_found (§6.9)"),
        scenario!(start_state_destroy, "start -> running(booted); destroy -> shutoff(destroyed); destroy again is a no-op (§4.1, §6.5)"),
        scenario!(start_paused, "start paused -> started(booted), suspended(paused) (§2.1)"),
        scenario!(pause_resume_twice, "pause/resume twice: idempotent, no duplicate events (§6.2)"),
        scenario!(wrong_state, "operations in the wrong state (§6.1, §6.2, §6.6)"),
        scenario!(shutdown_acknowledged, "shutdown awaited as acknowledged, then it completes (§6.3)"),
        scenario!(shutdown_completed, "shutdown awaited as completed (§4.6, §6.3)"),
        scenario!(shutdown_ignored_escalates, "a guest that ignores shutdown: timeout, then escalation to destroy (§6.3)"),
        scenario!(host_reboot, "host reboot: stays running, exactly one rebooted (§4.6, §4.7, §6.4)"),
        scenario!(host_reset, "hard reset: exactly one rebooted (§4.7, §6.4)"),
        scenario!(guest_reboot, "guest-initiated reboot with on_reboot=restart (§4.7)"),
        scenario!(guest_poweroff_destroy, "guest poweroff, on_poweroff=destroy (§4.6)"),
        scenario!(guest_poweroff_restart, "guest poweroff, on_poweroff=restart (§4.6)"),
        scenario!(guest_poweroff_preserve, "guest poweroff, on_poweroff=preserve; not resumable (§4.6, §6.2)"),
        scenario!(save_restore, "save -> shutoff(saved), never pm_suspended -> restore -> running(restored), guest intact (§4.12, §6.6, §6.7)"),
        scenario!(save_paused_restore_paused, "save of a paused domain -> restore keeps it paused (§6.7)"),
        scenario!(save_unwritable, "save to an unwritable path -> error, domain unchanged, no file (§6.6)"),
        scenario!(crash_destroy, "guest panic, on_crash=destroy (§4.8)"),
        scenario!(crash_restart, "guest panic, on_crash=restart (§4.8)"),
        scenario!(crash_preserve, "guest panic, on_crash=preserve; not resumable (§4.8, §6.2)"),
        scenario!(killed_out_of_band, "backend domain killed out of band -> shutoff + stopped (§4.12, §10)"),
        scenario!(two_domains_isolated, "two domains do not see each other's events (§2)"),
        scenario!(pm_suspend_wakeup, "pm suspend to memory and wakeup (§4.9, §4.10, §6.8)"),
        // The fault family (issue 15): concurrency, preemption, cancellation, deaths.
        fault!(storm_pause_resume, "50 concurrent pause/resume callers: final state = the last call, events exactly the transitions in call order, seq contiguous, snapshot() never older than a delivered event (§2.2, §2.4, §6.0, §6.2)"),
        fault!(destroy_during_storm, "destroy with 40 pause/resume calls queued: prompt, shutoff(destroyed) + stopped(destroyed) last, each call Ok / interrupted / invalid_state, events a prefix in call order (§3, §6.0)"),
        fault!(destroy_preempts_shutdown, "destroy during shutdown(completed) of a guest that ignores it: prompt, shutdown -> interrupted{by: destroy}, shutoff(destroyed) (§6.0, §6.3)"),
        fault!(destroy_preempts_save, "destroy during a save (at suspended(saving), mid-stream): the save won (saved, restorable) or interrupted{by: destroy}, shutoff(destroyed), older file intact, no temp file (§3, §6.0, §6.6)"),
        fault!(destroy_preempts_reboot, "destroy during a reboot waiting on the guest and during its restart: interrupted{by: destroy}, shutoff(destroyed), nothing left (§4.0a, §6.0, §6.4)"),
        fault!(cancel_start, "start dropped at 1 ms / 30 ms / once the backend exists: completes in the background, the next operation queues behind it, state truthful (§6.0, §6.1)"),
        fault!(cancel_save, "save dropped at suspended(saving), mid-stream and at 1 ms: committed as if awaited (or never ran), no stuck paused(save), no temp file (§6.0, §6.6)"),
        fault!(cancel_restore, "restore dropped at 1 ms / once the backend exists: completes in the background, next operation queues behind it, file untouched (§6.0, §6.7)"),
        fault!(cancel_shutdown, "shutdown dropped at once and while waiting: the request goes out, the domain stays operable (§6.0, §6.3)"),
        fault!(killed_mid_save, "backend killed during a save (at suspended(saving), mid-stream): typed error or a real save, §10 reason, never saved without the file, older file intact, no temp file (§6.0, §6.6, §10)"),
        fault!(killed_mid_restore, "backend killed during a restore: typed error, shut off with its event, file untouched, no leftover (§6.0, §6.7, §10)"),
        fault!(killed_mid_shutdown, "backend killed while shutdown(completed) waits: backend error at once, the §10 reason, not shutdown (§6.0, §6.3, §10)"),
        fault!(crash_mid_shutdown, "guest crash while shutdown(completed) waits, on_crash destroy and preserve: a backend error at once, not Completed (§4.8, §6.3)"),
        fault!(killed_mid_start, "backend killed during a start: typed error or Ok, shut off with its event, no leftover, startable again (§6.0, §6.1, §10)"),
        fault!(shutdown_paused, "shutdown of a paused, pm_suspended, preserved crashed or preserved powered-off domain: invalid_state, nothing changes (§6.3)"),
        fault!(restore_corrupt, "truncated, random, damaged (4 KiB, one bit), garbage-after-header, header-only and foreign save files: bad_save_file, shutoff(failed) + stopped(failed), file untouched, nothing left (§6.7, §7)"),
        fault!(shutdown_ignored_then_operable, "after a shutdown the guest ignores times out: pause, resume, save, restore all work (§6.3)"),
        fault!(launch_failure_reason, "a backend launch failure (garbage kernel): the backend's reason in the error, shutoff(failed) + stopped(failed), every time (§2.3, §6.1)"),
        fault!(agent_absent, "agent-mode shutdown and agent pm_suspend without an agent channel: unsupported within 1 s, nothing changes (§6.3, §6.8)"),
        // The durable family (issue 12): managers that die, domains that stay.
        durable!(reattach_running, "a running domain outlives its SIGKILLed manager; the next one: same uuid, same seq, running(booted), guest and its agent answer, graceful shutdown with seq+1.. (§11.3)"),
        durable!(reattach_paused, "a paused domain outlives its manager; reattached paused(user), vCPUs stopped, resume and destroy continue the seq (§11.3)"),
        durable!(reattach_definitions, "shut-off definitions survive (never started, destroyed), already_exists for a persisted name, undefine is durable (§11.2)"),
        durable!(poweroff_while_away, "guest poweroff while no manager runs: reconciled events, then on_poweroff destroy / restart / preserve (§11.3)"),
        durable!(crash_while_away, "guest panic while no manager runs: reconciled events, then on_crash destroy / restart / preserve (§11.3)"),
        durable!(destroyed_while_away, "backend domain ended while no manager runs: reconciled stopped with the §10 reason, startable again (§11.3)"),
        durable!(manager_killed_mid_save, "manager SIGKILLed mid-save: committed (saved, file restores) or rolled back (running, no file, no temp file) (§11.4)"),
        durable!(manager_killed_mid_shutdown, "manager SIGKILLed while its shutdown waits: the next manager completes it as shutoff(shutdown) (§11.4)"),
        durable!(second_manager_refused, "a second manager (process, driver, two opening at once) gets root_in_use naming the holder; the holder keeps working (§11.1)"),
        durable!(reattach_after_restart, "a domain its policy restarted, then left by its manager: the next one adopts the restarted instance (same uuid and seq, running, guest answers) and its destroy ends it on the host (§11.3)"),
        durable!(seq_continues, "seq continues across a SIGKILLed manager and an orderly detach (§11.3)"),
        durable!(open_cancelled, "an open dropped at 1 / 50 / 300 ms leaves the roots usable and the domain untouched (§6.0, §11.3)"),
        durable!(ephemeral_dies_with_manager, "ephemeral: the domain lives while its idle manager lives (>10 s) and dies with its SIGKILL; the next manager starts clean (§11.0)"),
        // Watching a domain (issue 11): console stream, stats, race-free waiting.
        watch!(console_read_boot_banner, "the boot output read through a console stream opened before the vCPUs ran; it ends when the domain stops; no console when shut off (§12.4)"),
        watch!(console_write_command, "a command typed into the guest's shell through the stream answers on it and on a second reader; read-only cannot type; broken pipe once stopped (§12.4)"),
        watch!(console_second_writer_busy, "one writer at a time: busy for the next until dropped or released; readers unaffected; every stream ends at destroy (§12.4)"),
        watch!(stats_move, "cpu time (total, per vCPU) and disk read counters grow while the guest works; memory = config; shut off: state only; all_stats has it (§12.5)"),
        watch!(wait_for_event_timeout, "wait_for_event: typed timeout, nothing changes; by name, kind, predicate; a snapshot taken before the operation misses nothing (§12.3)"),
        // Devices (issue 10): proven in the guest, hotplug, unplug, bad input.
        device!(boot_with_disks_and_nic, "raw disks (one read-only) and two NICs on the backend's test network at boot: the guest sees each (serial, size, ro, contents, a write reaching the image; MACs, a DHCP lease) as devices() lists them (§14.1)"),
        device!(boot_with_qcow2_and_cdrom, "a qcow2 disk and a CD-ROM at boot: the guest sees the qcow2 contents at its virtual size and the medium read-only, as devices() lists them (§14.1)"),
        device!(hotplug_disk, "a disk attached live: device_added, in devices() and in the guest (size, write); a config-only attach changes the definition only (§14.2)"),
        device!(hotunplug_disk, "boot-time and hotplugged disks detached live: device_removed after the guest released them, gone in the guest and devices(); the id attaches again (§14.2)"),
        device!(hotplug_nic, "a NIC attached live: device_added, the guest has its MAC and a DHCP lease (§14.2)"),
        device!(hotunplug_nic, "a NIC detached live: device_removed, gone in the guest; attached again with its id and MAC (§14.2)"),
        device!(unplug_refused_by_guest, "a guest that ignores the unplug: typed timeout, device_removal_failed, the device remains (devices(), definition, guest); device_removed once the guest handles it (§14.2)"),
        device!(cdrom_change, "CD-ROM eject (device_removed, empty tray) and insert (device_added, the guest reads the new medium); a disk is not a CD-ROM (§14.2)"),
        device!(attach_bad_device, "missing image, directory, duplicate id, bad/multicast/used MAC, missing bridge, CD-ROM hot-add, no free slot: invalid_config with its reason, nothing changes (§14.4)"),
        device!(hotplug_concurrent, "concurrent callers: 8 attaches at once, one id twice (one duplicate_device_id), one detach twice (one not_found), two medium changes in queue order (§6.0, §14.2)"),
        device!(hotplug_cancelled, "attach dropped at 1 / 30 ms and a detach dropped while waiting: truthful devices() with exactly its events, background completion, next operation queues behind (§6.0, §14.2)"),
        device!(hotplug_killed, "backend killed during a detach the guest ignores and during an attach: typed error at once, §10 reason, no device event after; config attach of the shut-off domain boots with it (§6.0, §10, §14.2)"),
        device!(devices_survive_reattach, "a disk hotplugged live survives an orderly manager detach: the next persistent manager lists it at the same address and detaches it (§11.3, §14.3)"),
        device!(devices_survive_save_restore, "hotplugged disk and NIC survive save/restore at the same addresses; the guest sees them; detach works after (§14.3)"),
        watch!(snapshot_then_stream_no_gap, "a burst between snapshot and first read: every event once, in order; subscribe_from replays exactly; events_lost past the 128 kept; a lagging stream says so (§2.4, §12.1, §12.2)"),
        // The guest agent (issue 9): one typed client through Domain::guest_agent.
        agent!(agent_ping_info, "guest_agent(): ping, both syncs, info lists all 29 schema commands, unknown command unsupported with the guest's reason, one shared client; no channel: no_guest_agent saying what to add (§13.1, §13.2)"),
        agent!(agent_time, "get-time near the host's; set-time +1 h seen by the guest's date; set back; set from the RTC (§13.2)"),
        agent!(agent_file_roundtrip, "file open/write/seek (set, cur, end)/read/flush/close of 200 KB of binary data with 0xFF and newlines; checked inside the guest; closed handle and missing path typed (§13.2)"),
        agent!(agent_fsfreeze_thaw, "freeze a real ext filesystem: status frozen, a write blocks, pause/resume unaffected; thaw: the write finishes; freeze-list by mount point (§13.2, §13.5)"),
        agent!(agent_fsinfo_fstrim, "get-fsinfo lists the mounted ext filesystem with its sizes; fstrim trims it, with and without a minimum (§13.2)"),
        agent!(agent_network, "network-get-interfaces: lo with 127.0.0.1/8 and statistics; every interface the guest has (§13.2)"),
        agent!(agent_vcpus, "get-vcpus of a 2-vCPU guest; set-vcpus takes one offline and online again, checked in the guest's sysfs (§13.2)"),
        agent!(agent_memory_blocks, "get-memory-block-info = the guest's block size; get-memory-blocks = its blocks; set-memory-blocks (no change) succeeds per block (§13.2)"),
        agent!(agent_set_user_password, "set-user-password: the guest's /etc/shadow holds crypt(password, salt); crypted stored as given; unknown user typed (§13.2)"),
        agent!(agent_shutdown_mode, "shutdown(mode agent, completed): guest-shutdown sends no reply; shutdown_requested(host), stopped(shutdown); guest_agent() then invalid_state (§6.3, §13.3)"),
        agent!(agent_reboot_mode, "reboot(mode agent): exactly one rebooted, a new boot id, the same client resyncs with the new agent (§6.4, §13.3)"),
        agent!(agent_lifecycle_events, "agent_connected at boot; agent stopped and started in the guest: agent_disconnected, agent_connected; calls meanwhile typed and bounded; destroy: agent_disconnected then stopped (§13.4)"),
        agent!(agent_concurrent_calls, "8 callers at once on the one client: each gets its own guest-sync id and guest-exec output; pause/resume meanwhile not held up (§6.0, §13.5)"),
        agent!(agent_cancelled_calls, "40 calls dropped at 0-2 ms: the next calls get their own replies, never a dropped one's; guest-exec works (§6.0, §13.5)"),
        agent!(agent_backend_killed, "backend killed out of band during agent calls: each ends typed within its timeout, stopped with the §10 reason, guest_agent() then invalid_state (§10, §13.5)"),
        agent!(agent_hostile, "the guest's agent replaced by a flooding (garbage, 0xFF, fake replies, endless lines) and a silent program: every call typed within its timeout, memory bounded, pause/resume and another domain unaffected, resync after (§13.5)"),
    ]
}

fn with_policies(
    on_poweroff: LifecycleAction,
    on_reboot: LifecycleAction,
    on_crash: LifecycleAction,
) -> GuestOptions {
    GuestOptions {
        policies: LifecyclePolicies {
            on_poweroff,
            on_reboot,
            on_crash,
        },
        ..Default::default()
    }
}

fn shutdown_opts(
    wait: ShutdownWait,
    timeout: Duration,
    destroy_on_timeout: bool,
) -> ShutdownOptions {
    ShutdownOptions {
        mode: ShutdownMode::Default,
        wait,
        timeout,
        destroy_on_timeout,
    }
}

async fn define_undefine<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let mut all =
        crate::scenario::EventWatch::for_domain(ctx.driver().subscribe(), &ctx.domain_name("a"));
    let (domain, _watch) = ctx.define("a", GuestOptions::default()).await?;
    all.expect(&[E::Defined]).await?;
    expect_exact_state(&domain, DomainState::Shutoff(ShutoffReason::Unknown))?;
    let name = domain.id().name.clone();
    let again = ctx.backend.guest_config(&name, GuestOptions::default());
    expect_err(
        ctx.driver().define(again).await.map(|_| ()),
        "already_exists",
        |e| matches!(e, Error::AlreadyExists { .. }),
    )?;
    let mut bad = ctx
        .backend
        .guest_config(&format!("{name}-bad"), GuestOptions::default());
    bad.name = "../escape".into();
    expect_err(
        ctx.driver().define(bad).await.map(|_| ()),
        "invalid_config",
        |e| matches!(e, Error::InvalidConfig(_)),
    )?;
    let found = ctx.driver().lookup_by_uuid(domain.id().uuid).await?;
    check(found.id() == domain.id(), || {
        "lookup_by_uuid found another domain".into()
    })?;
    let listed = ctx.driver().list().await?;
    check(listed.iter().any(|i| i.id == *domain.id()), || {
        "list() does not show the defined domain".into()
    })?;
    ctx.driver().undefine(&name).await?;
    all.expect(&[E::Undefined]).await?;
    expect_err(
        ctx.driver().lookup_by_name(&name).await.map(|_| ()),
        "not_found",
        |e| matches!(e, Error::NotFound { .. }),
    )
}

async fn unknown_domain<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let nf = |e: &Error| matches!(e, Error::NotFound { .. });
    expect_err(
        ctx.driver()
            .lookup_by_name("domkit-no-such-domain")
            .await
            .map(|_| ()),
        "not_found",
        nf,
    )?;
    expect_err(
        ctx.driver()
            .lookup_by_uuid(uuid::Uuid::new_v4())
            .await
            .map(|_| ()),
        "not_found",
        nf,
    )?;
    expect_err(
        ctx.driver().undefine("domkit-no-such-domain").await,
        "not_found",
        nf,
    )
}

async fn start_state_destroy<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.boot("a", GuestOptions::default()).await?;
    expect_exact_state(&domain, DomainState::Running(RunningReason::Booted))?;
    let info = domain.info().await?;
    check(
        info.state.is_running() && info.backend_handle.is_some(),
        || format!("info() while running: {info:?}"),
    )?;
    domain.destroy().await?;
    watch
        .expect(&[E::Stopped(StoppedDetail::Destroyed)])
        .await?;
    expect_exact_state(&domain, DomainState::Shutoff(ShutoffReason::Destroyed))?;
    domain.destroy().await?;
    watch.expect_quiet(QUIET).await
}

async fn start_paused<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.define("a", GuestOptions::default()).await?;
    domain.start(StartOptions { paused: true }).await?;
    watch
        .expect(&[
            E::Started(StartedDetail::Booted),
            E::Suspended(SuspendedDetail::Paused),
        ])
        .await?;
    expect_exact_state(&domain, DomainState::Paused(PausedReason::User))?;
    domain.resume().await?;
    watch.expect(&[E::Resumed(ResumedDetail::Unpaused)]).await?;
    expect_exact_state(&domain, DomainState::Running(RunningReason::Unpaused))?;
    domain.destroy().await?;
    watch.expect(&[E::Stopped(StoppedDetail::Destroyed)]).await
}

async fn pause_resume_twice<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.boot("a", GuestOptions::default()).await?;
    domain.pause().await?;
    watch
        .expect(&[E::Suspended(SuspendedDetail::Paused)])
        .await?;
    expect_exact_state(&domain, DomainState::Paused(PausedReason::User))?;
    domain.pause().await?;
    watch.expect_quiet(QUIET).await?;
    domain.resume().await?;
    watch.expect(&[E::Resumed(ResumedDetail::Unpaused)]).await?;
    expect_exact_state(&domain, DomainState::Running(RunningReason::Unpaused))?;
    domain.resume().await?;
    watch.expect_quiet(QUIET).await?;
    domain.destroy().await?;
    watch.expect(&[E::Stopped(StoppedDetail::Destroyed)]).await
}

async fn wrong_state<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.define("a", GuestOptions::default()).await?;
    let path = ctx
        .backend
        .scratch_dir()
        .join(format!("{}.save", domain.id().name));
    expect_err(
        domain.pause().await,
        "invalid_state(pause)",
        is_invalid_state(Operation::Pause),
    )?;
    expect_err(
        domain.resume().await,
        "invalid_state(resume)",
        is_invalid_state(Operation::Resume),
    )?;
    expect_err(
        domain.save(&path).await,
        "invalid_state(save)",
        is_invalid_state(Operation::Save),
    )?;
    check(!path.exists(), || "a refused save left a file".into())?;
    domain.destroy().await?; // destroy of a shut-off domain: no-op
    watch.expect_quiet(QUIET).await?;
    domain.start(StartOptions::default()).await?;
    watch.expect(&[E::Started(StartedDetail::Booted)]).await?;
    expect_err(
        domain.start(StartOptions::default()).await,
        "invalid_state(start)",
        is_invalid_state(Operation::Start),
    )?;
    expect_err(
        ctx.driver().undefine(&domain.id().name).await,
        "invalid_state(undefine)",
        is_invalid_state(Operation::Undefine),
    )?;
    domain.resume().await?; // resume of a running domain: no-op
    watch.expect_quiet(QUIET).await?;
    domain.destroy().await?;
    watch.expect(&[E::Stopped(StoppedDetail::Destroyed)]).await
}

async fn shutdown_acknowledged<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.boot("a", GuestOptions::default()).await?;
    let outcome = domain
        .shutdown(shutdown_opts(
            ShutdownWait::Acknowledged,
            EVENT_TIMEOUT,
            false,
        ))
        .await?;
    check(outcome == ShutdownOutcome::Acknowledged, || {
        format!("shutdown(acknowledged) returned {outcome:?}")
    })?;
    watch
        .expect(&[E::ShutdownRequested(ShutdownRequester::Host)])
        .await?;
    watch.expect(&[E::Stopped(StoppedDetail::Shutdown)]).await?;
    expect_exact_state(&domain, DomainState::Shutoff(ShutoffReason::Shutdown))?;
    watch.expect_quiet(QUIET).await
}

async fn shutdown_completed<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.boot("a", GuestOptions::default()).await?;
    let outcome = domain
        .shutdown(shutdown_opts(ShutdownWait::Completed, EVENT_TIMEOUT, false))
        .await?;
    check(outcome == ShutdownOutcome::Completed, || {
        format!("shutdown(completed) returned {outcome:?}")
    })?;
    expect_exact_state(&domain, DomainState::Shutoff(ShutoffReason::Shutdown))?;
    watch
        .expect(&[
            E::ShutdownRequested(ShutdownRequester::Host),
            E::Stopped(StoppedDetail::Shutdown),
        ])
        .await?;
    watch.expect_quiet(QUIET).await
}

async fn shutdown_ignored_escalates<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let opts = GuestOptions {
        ignore_shutdown: true,
        ..Default::default()
    };
    let (domain, mut watch) = ctx.boot("a", opts).await?;
    let r = domain
        .shutdown(shutdown_opts(
            ShutdownWait::Completed,
            Duration::from_secs(5),
            false,
        ))
        .await;
    expect_err(r, "timeout", |e| matches!(e, Error::Timeout { .. }))?;
    watch
        .expect(&[E::ShutdownRequested(ShutdownRequester::Host)])
        .await?;
    expect_exact_state(&domain, DomainState::ShuttingDown(ShuttingDownReason::User))?;
    let outcome = domain
        .shutdown(shutdown_opts(
            ShutdownWait::Completed,
            Duration::from_secs(5),
            true,
        ))
        .await?;
    check(outcome == ShutdownOutcome::Destroyed, || {
        format!("escalated shutdown returned {outcome:?}")
    })?;
    watch
        .expect(&[E::Stopped(StoppedDetail::Destroyed)])
        .await?;
    expect_exact_state(&domain, DomainState::Shutoff(ShutoffReason::Destroyed))?;
    watch.expect_quiet(QUIET).await
}

async fn boot_id<B: TestBackend>(
    ctx: &ScenarioCtx<'_, B>,
    domain: &<B::Driver as Driver>::Domain,
) -> Step<String> {
    hook(
        "reading the guest's boot id",
        ctx.backend.guest_boot_id(domain).await,
    )
}

async fn host_reboot<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.boot("a", GuestOptions::default()).await?;
    let before = boot_id(ctx, &domain).await?;
    domain.reboot(ShutdownMode::Default, BOOT_TIMEOUT).await?;
    watch.expect(&[E::Rebooted]).await?;
    expect_state(&domain, |s| s.is_running(), "running after reboot")?;
    hook(
        "guest ready after reboot",
        ctx.backend.wait_guest_ready(&domain, BOOT_TIMEOUT).await,
    )?;
    let after = boot_id(ctx, &domain).await?;
    check(before != after, || {
        "the guest did not really reboot (same boot id)".into()
    })?;
    watch.expect_quiet(QUIET).await
}

async fn host_reset<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.boot("a", GuestOptions::default()).await?;
    domain.reset().await?;
    watch.expect(&[E::Rebooted]).await?;
    expect_state(&domain, |s| s.is_running(), "running after reset")?;
    hook(
        "guest ready after reset",
        ctx.backend.wait_guest_ready(&domain, BOOT_TIMEOUT).await,
    )?;
    watch.expect_quiet(QUIET).await
}

async fn guest_reboot<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.boot("a", GuestOptions::default()).await?;
    let before = boot_id(ctx, &domain).await?;
    hook(
        "guest reboot",
        ctx.backend.guest_do(&domain, GuestAction::Reboot).await,
    )?;
    watch.expect(&[E::Rebooted]).await?;
    hook(
        "guest ready after reboot",
        ctx.backend.wait_guest_ready(&domain, BOOT_TIMEOUT).await,
    )?;
    expect_state(&domain, |s| s.is_running(), "running after a guest reboot")?;
    let after = boot_id(ctx, &domain).await?;
    check(before != after, || {
        "the guest did not really reboot (same boot id)".into()
    })?;
    watch.expect_quiet(QUIET).await
}

async fn guest_poweroff_destroy<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    use LifecycleAction::*;
    let (domain, mut watch) = ctx
        .boot("a", with_policies(Destroy, Restart, Destroy))
        .await?;
    hook(
        "guest poweroff",
        ctx.backend.guest_do(&domain, GuestAction::Poweroff).await,
    )?;
    watch
        .expect(&[
            E::ShutdownRequested(ShutdownRequester::Guest),
            E::Stopped(StoppedDetail::Shutdown),
        ])
        .await?;
    expect_exact_state(&domain, DomainState::Shutoff(ShutoffReason::Shutdown))?;
    watch.expect_quiet(QUIET).await
}

async fn guest_poweroff_restart<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    use LifecycleAction::*;
    let (domain, mut watch) = ctx
        .boot("a", with_policies(Restart, Restart, Destroy))
        .await?;
    hook(
        "guest poweroff",
        ctx.backend.guest_do(&domain, GuestAction::Poweroff).await,
    )?;
    watch
        .expect(&[
            E::ShutdownRequested(ShutdownRequester::Guest),
            E::Stopped(StoppedDetail::Shutdown),
            E::Started(StartedDetail::Booted),
        ])
        .await?;
    hook(
        "guest ready after restart",
        ctx.backend.wait_guest_ready(&domain, BOOT_TIMEOUT).await,
    )?;
    expect_exact_state(&domain, DomainState::Running(RunningReason::Booted))?;
    watch.expect_quiet(QUIET).await
}

async fn guest_poweroff_preserve<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    use LifecycleAction::*;
    let (domain, mut watch) = ctx
        .boot("a", with_policies(Preserve, Restart, Destroy))
        .await?;
    hook(
        "guest poweroff",
        ctx.backend.guest_do(&domain, GuestAction::Poweroff).await,
    )?;
    watch
        .expect(&[
            E::ShutdownRequested(ShutdownRequester::Guest),
            E::Suspended(SuspendedDetail::Paused),
        ])
        .await?;
    expect_exact_state(&domain, DomainState::Paused(PausedReason::ShuttingDown))?;
    expect_err(
        domain.resume().await,
        "invalid_state(resume)",
        is_invalid_state(Operation::Resume),
    )?;
    watch.expect_quiet(QUIET).await?;
    domain.destroy().await?;
    watch.expect(&[E::Stopped(StoppedDetail::Destroyed)]).await
}

async fn save_restore<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.boot("a", GuestOptions::default()).await?;
    let before = boot_id(ctx, &domain).await?;
    let path = ctx
        .backend
        .scratch_dir()
        .join(format!("{}.save", domain.id().name));
    let _ = std::fs::remove_file(&path);
    domain.save(&path).await?;
    watch
        .expect(&[
            E::Suspended(SuspendedDetail::Saving),
            E::Stopped(StoppedDetail::Saved),
        ])
        .await?;
    expect_exact_state(&domain, DomainState::Shutoff(ShutoffReason::Saved))?;
    check(path.is_file(), || {
        format!("no save file at {}", path.display())
    })?;
    domain.restore(&path, RestoreOptions::default()).await?;
    watch.expect(&[E::Started(StartedDetail::Restored)]).await?;
    expect_exact_state(&domain, DomainState::Running(RunningReason::Restored))?;
    let after = boot_id(ctx, &domain).await?;
    check(before == after, || {
        format!("guest state not intact: boot id {before} before save, {after} after restore")
    })?;
    check(
        !watch
            .seen
            .iter()
            .any(|e| matches!(e.kind, E::PmSuspended(_))),
        || "a save produced pm_suspended".into(),
    )?;
    let _ = std::fs::remove_file(&path);
    watch.expect_quiet(QUIET).await
}

async fn save_paused_restore_paused<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.boot("a", GuestOptions::default()).await?;
    let before = boot_id(ctx, &domain).await?;
    domain.pause().await?;
    watch
        .expect(&[E::Suspended(SuspendedDetail::Paused)])
        .await?;
    let path = ctx
        .backend
        .scratch_dir()
        .join(format!("{}.save", domain.id().name));
    let _ = std::fs::remove_file(&path);
    domain.save(&path).await?;
    if ctx.backend.save_runs_a_paused_guest() {
        // §6.6/§10: the guest runs until it suspends itself for the save.
        watch
            .expect(&[
                E::Resumed(ResumedDetail::Unpaused),
                E::Suspended(SuspendedDetail::Saving),
                E::Stopped(StoppedDetail::Saved),
            ])
            .await?;
    } else {
        watch.expect(&[E::Stopped(StoppedDetail::Saved)]).await?;
    }
    // Restored paused either way: it was paused when the save was asked for.
    domain.restore(&path, RestoreOptions::default()).await?;
    watch
        .expect(&[
            E::Started(StartedDetail::Restored),
            E::Suspended(SuspendedDetail::Paused),
        ])
        .await?;
    expect_exact_state(&domain, DomainState::Paused(PausedReason::User))?;
    domain.resume().await?;
    watch.expect(&[E::Resumed(ResumedDetail::Unpaused)]).await?;
    let after = boot_id(ctx, &domain).await?;
    check(before == after, || {
        "guest state not intact across save/restore".into()
    })?;
    let _ = std::fs::remove_file(&path);
    watch.expect_quiet(QUIET).await
}

async fn save_unwritable<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.boot("a", GuestOptions::default()).await?;
    let path = ctx.backend.unwritable_path();
    let r = domain.save(&path).await;
    expect_err(r, "an error", |e| {
        matches!(e, Error::Io { .. } | Error::Backend { .. })
    })?;
    check(!path.exists(), || "a failed save left a file".into())?;
    expect_exact_state(&domain, DomainState::Running(RunningReason::Booted))?;
    watch.expect_quiet(QUIET).await?;
    domain.pause().await?; // still fully controllable
    watch.expect(&[E::Suspended(SuspendedDetail::Paused)]).await
}

async fn crash<B: TestBackend>(
    ctx: &ScenarioCtx<'_, B>,
    on_crash: LifecycleAction,
) -> Step<(<B::Driver as Driver>::Domain, EventWatch)> {
    let (domain, watch) = ctx
        .boot(
            "a",
            with_policies(LifecycleAction::Destroy, LifecycleAction::Restart, on_crash),
        )
        .await?;
    hook(
        "guest panic",
        ctx.backend.guest_do(&domain, GuestAction::Panic).await,
    )?;
    Ok((domain, watch))
}

async fn crash_destroy<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = crash(ctx, LifecycleAction::Destroy).await?;
    watch
        .expect(&[
            E::Crashed(CrashedDetail::Panicked),
            E::Stopped(StoppedDetail::Crashed),
        ])
        .await?;
    expect_exact_state(&domain, DomainState::Shutoff(ShutoffReason::Crashed))?;
    watch.expect_quiet(QUIET).await
}

async fn crash_restart<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = crash(ctx, LifecycleAction::Restart).await?;
    watch
        .expect(&[
            E::Crashed(CrashedDetail::Panicked),
            E::Stopped(StoppedDetail::Crashed),
            E::Started(StartedDetail::Booted),
        ])
        .await?;
    hook(
        "guest ready after restart",
        ctx.backend.wait_guest_ready(&domain, BOOT_TIMEOUT).await,
    )?;
    expect_exact_state(&domain, DomainState::Running(RunningReason::Booted))?;
    watch.expect_quiet(QUIET).await
}

async fn crash_preserve<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = crash(ctx, LifecycleAction::Preserve).await?;
    watch.expect(&[E::Crashed(CrashedDetail::Panicked)]).await?;
    expect_exact_state(&domain, DomainState::Crashed(CrashedReason::Panicked))?;
    expect_err(
        domain.resume().await,
        "invalid_state(resume)",
        is_invalid_state(Operation::Resume),
    )?;
    watch.expect_quiet(QUIET).await?;
    domain.destroy().await?;
    watch.expect(&[E::Stopped(StoppedDetail::Destroyed)]).await
}

async fn killed_out_of_band<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.boot("a", GuestOptions::default()).await?;
    let reason = hook(
        "out-of-band kill",
        ctx.backend.kill_out_of_band(&domain).await,
    )?;
    check(
        matches!(reason, ShutoffReason::Crashed | ShutoffReason::Destroyed),
        || format!("§10 allows crashed or destroyed, backend documents {reason:?}"),
    )?;
    watch
        .expect(&[E::Stopped(domkit_core::lifecycle::stopped_detail(reason))])
        .await?;
    expect_exact_state(&domain, DomainState::Shutoff(reason))?;
    // the driver knows it is gone: it can be started again
    domain.start(StartOptions::default()).await?;
    watch.expect(&[E::Started(StartedDetail::Booted)]).await?;
    domain.destroy().await?;
    watch.expect(&[E::Stopped(StoppedDetail::Destroyed)]).await
}

async fn two_domains_isolated<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (a, mut wa) = ctx.boot("a", GuestOptions::default()).await?;
    let (b, mut wb) = ctx.boot("b", GuestOptions::default()).await?;
    a.pause().await?;
    wa.expect(&[E::Suspended(SuspendedDetail::Paused)]).await?;
    wb.expect_quiet(QUIET).await?;
    b.destroy().await?;
    wb.expect(&[E::Stopped(StoppedDetail::Destroyed)]).await?;
    wa.expect_quiet(QUIET).await?;
    check(
        wa.seen.iter().all(|e| e.domain == *a.id()) && wb.seen.iter().all(|e| e.domain == *b.id()),
        || "an event carried the other domain's identity".into(),
    )?;
    expect_exact_state(&a, DomainState::Paused(PausedReason::User))
}

async fn pm_suspend_wakeup<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    ctx.driver().capabilities().check(Operation::PmSuspend)?;
    let (domain, mut watch) = ctx.boot("a", GuestOptions::default()).await?;
    domain.pm_suspend(PmSuspendTarget::Memory).await?;
    watch
        .expect(&[E::PmSuspended(PmSuspendedDetail::Memory)])
        .await?;
    expect_exact_state(&domain, DomainState::PmSuspended(PmSuspendedReason::Memory))?;
    domain.pm_wakeup().await?;
    watch.expect(&[E::Started(StartedDetail::Wakeup)]).await?;
    expect_exact_state(&domain, DomainState::Running(RunningReason::Wakeup))?;
    hook(
        "guest answers after wakeup",
        ctx.backend.wait_guest_ready(&domain, BOOT_TIMEOUT).await,
    )?;
    watch.expect_quiet(QUIET).await
}
