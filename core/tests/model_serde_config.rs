//! Serde round-trips and stable names of states and events (`docs/semantics.md` §1, §2),
//! config parsing and validation errors, error messages, and the `LifecycleCell` runtime.

use domkit_core::*;
use futures::StreamExt;
use std::path::PathBuf;
use std::time::Duration;

fn all_states() -> Vec<DomainState> {
    use DomainState as S;
    let mut v = vec![S::NoState, S::Blocked(BlockedReason::Unknown)];
    for r in [
        RunningReason::Unknown,
        RunningReason::Booted,
        RunningReason::Unpaused,
        RunningReason::Restored,
        RunningReason::Migrated,
        RunningReason::Wakeup,
        RunningReason::SaveCanceled,
        RunningReason::FromCrashed,
    ] {
        v.push(S::Running(r));
    }
    for r in [
        PausedReason::Unknown,
        PausedReason::User,
        PausedReason::Save,
        PausedReason::Migration,
        PausedReason::IoError,
        PausedReason::Watchdog,
        PausedReason::StartingUp,
        PausedReason::ShuttingDown,
        PausedReason::Crashed,
    ] {
        v.push(S::Paused(r));
    }
    for r in [
        ShuttingDownReason::Unknown,
        ShuttingDownReason::User,
        ShuttingDownReason::Guest,
    ] {
        v.push(S::ShuttingDown(r));
    }
    for r in [
        ShutoffReason::Unknown,
        ShutoffReason::Shutdown,
        ShutoffReason::Destroyed,
        ShutoffReason::Crashed,
        ShutoffReason::Saved,
        ShutoffReason::Failed,
    ] {
        v.push(S::Shutoff(r));
    }
    for r in [
        CrashedReason::Unknown,
        CrashedReason::Panicked,
        CrashedReason::Watchdog,
    ] {
        v.push(S::Crashed(r));
    }
    for r in [
        PmSuspendedReason::Unknown,
        PmSuspendedReason::Memory,
        PmSuspendedReason::Disk,
    ] {
        v.push(S::PmSuspended(r));
    }
    v
}

// §1
#[test]
fn s1_states_round_trip_and_have_stable_names() {
    for s in all_states() {
        let json = serde_json::to_string(&s).unwrap();
        let back: DomainState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s, "{json}");
    }
    assert_eq!(
        serde_json::to_string(&DomainState::Shutoff(ShutoffReason::Saved)).unwrap(),
        r#"{"state":"shutoff","reason":"saved"}"#
    );
    assert_eq!(
        serde_json::to_string(&DomainState::PmSuspended(PmSuspendedReason::Memory)).unwrap(),
        r#"{"state":"pm_suspended","reason":"memory"}"#
    );
    assert_eq!(
        serde_json::to_string(&DomainState::Running(RunningReason::SaveCanceled)).unwrap(),
        r#"{"state":"running","reason":"save_canceled"}"#
    );
    assert_eq!(
        DomainState::Paused(PausedReason::Save).to_string(),
        "paused (save)"
    );
}

// §1: control state is separate
#[test]
fn s1_control_state_round_trip() {
    for c in [
        ControlState::Ok,
        ControlState::Job {
            operation: Operation::Save,
        },
        ControlState::Broken {
            reason: "monitor EOF".into(),
        },
    ] {
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<ControlState>(&json).unwrap(), c);
    }
}

// §2
#[test]
fn s2_events_round_trip_and_have_stable_names() {
    use EventKind as E;
    let kinds = [
        E::Defined,
        E::Undefined,
        E::Started(StartedDetail::Booted),
        E::Started(StartedDetail::Restored),
        E::Started(StartedDetail::Wakeup),
        E::Suspended(SuspendedDetail::Paused),
        E::Suspended(SuspendedDetail::Saving),
        E::Suspended(SuspendedDetail::Migrating),
        E::Suspended(SuspendedDetail::IoError),
        E::Suspended(SuspendedDetail::Watchdog),
        E::Resumed(ResumedDetail::Unpaused),
        E::Resumed(ResumedDetail::Restored),
        E::Resumed(ResumedDetail::SaveCanceled),
        E::Stopped(StoppedDetail::Shutdown),
        E::Stopped(StoppedDetail::Destroyed),
        E::Stopped(StoppedDetail::Crashed),
        E::Stopped(StoppedDetail::Saved),
        E::Stopped(StoppedDetail::Failed),
        E::ShutdownRequested(ShutdownRequester::Guest),
        E::ShutdownRequested(ShutdownRequester::Host),
        E::Rebooted,
        E::PmSuspended(PmSuspendedDetail::Memory),
        E::PmSuspended(PmSuspendedDetail::Disk),
        E::Crashed(CrashedDetail::Panicked),
        E::Crashed(CrashedDetail::Watchdog),
    ];
    for (i, kind) in kinds.into_iter().enumerate() {
        let ev = DomainEvent {
            domain: DomainId {
                name: "web1".into(),
                uuid: uuid::Uuid::from_u128(7),
            },
            seq: i as u64 + 1,
            timestamp_us: 1_700_000_000_000_000,
            kind,
            reconciled: i % 2 == 0,
        };
        let json = serde_json::to_string(&ev).unwrap();
        assert_eq!(serde_json::from_str::<DomainEvent>(&json).unwrap(), ev);
    }
    let ev = DomainEvent {
        domain: DomainId {
            name: "a".into(),
            uuid: uuid::Uuid::nil(),
        },
        seq: 3,
        timestamp_us: 5,
        kind: E::Stopped(StoppedDetail::Saved),
        reconciled: false,
    };
    let v = serde_json::to_value(&ev).unwrap();
    assert_eq!(v["event"], "stopped");
    assert_eq!(v["detail"], "saved");
    assert_eq!(v["seq"], 3);
    assert_eq!(E::Rebooted.to_string(), "rebooted");
    assert_eq!(
        E::ShutdownRequested(ShutdownRequester::Host).to_string(),
        "shutdown_requested(host)"
    );
}

fn kernel_file() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("vmlinuz");
    std::fs::write(&k, b"kernel").unwrap();
    (dir, k)
}

#[test]
fn config_toml_and_json_round_trip() {
    let (_d, k) = kernel_file();
    let toml_text = format!(
        r#"
name = "web1"
memory_mib = 128
vcpus = 2
on_crash = "preserve"

[boot]
from = "kernel"
kernel = "{}"
cmdline = "console=ttyS0"

[[channels]]
kind = "guest_agent"

[qemu]
accel = "tcg"
"#,
        k.display()
    );
    let c = DomainConfig::from_toml(&toml_text).unwrap();
    c.validate().unwrap();
    assert_eq!(c.vcpus, 2);
    assert_eq!(c.on_crash, LifecycleAction::Preserve);
    assert_eq!(c.on_reboot, LifecycleAction::Restart, "default");
    assert_eq!(c.on_poweroff, LifecycleAction::Destroy, "default");
    assert!(c.has_guest_agent());
    assert!(c.qemu.pvpanic, "pvpanic defaults on");
    let json = serde_json::to_string(&c).unwrap();
    assert_eq!(DomainConfig::from_json(&json).unwrap(), c);
    let back = toml::to_string(&c).unwrap();
    assert_eq!(DomainConfig::from_toml(&back).unwrap(), c);
}

#[test]
fn config_load_by_extension() {
    let (d, k) = kernel_file();
    let c = DomainConfig::with_kernel("x", 128, k);
    let p = d.path().join("x.json");
    std::fs::write(&p, serde_json::to_string(&c).unwrap()).unwrap();
    assert_eq!(DomainConfig::load(&p).unwrap(), c);
    let missing = DomainConfig::load(&d.path().join("nope.toml")).unwrap_err();
    assert!(missing.to_string().contains("reading config"), "{missing}");
}

#[test]
fn config_validation_errors_are_precise() {
    let (_d, k) = kernel_file();
    let base = DomainConfig::with_kernel("ok-name_1.x", 128, k.clone());
    base.validate().unwrap();

    let check = |c: DomainConfig, want: &str| {
        let e = c.validate().unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(want), "{msg:?} should contain {want:?}");
        e
    };
    for bad in [
        "",
        "../etc",
        "a/b",
        ".hidden",
        "-x",
        "sp ace",
        "é",
        &"x".repeat(65),
    ] {
        let mut c = base.clone();
        c.name = bad.to_string();
        let e = check(c, "bad domain name");
        assert!(matches!(e, ConfigError::BadName { .. }));
    }
    let mut c = base.clone();
    c.memory_mib = 0;
    assert_eq!(c.validate(), Err(ConfigError::MemoryTooSmall(0)));
    let mut c = base.clone();
    c.vcpus = 0;
    assert_eq!(c.validate(), Err(ConfigError::BadVcpus(0)));
    let mut c = base.clone();
    c.boot = Boot::Kernel {
        kernel: "/nonexistent/vmlinuz".into(),
        initrd: None,
        cmdline: String::new(),
    };
    check(c, "does not exist");
    let mut c = base.clone();
    c.boot = Boot::Kernel {
        kernel: "relative/vmlinuz".into(),
        initrd: None,
        cmdline: String::new(),
    };
    check(c, "must be an absolute path");
    let mut c = base.clone();
    c.boot = Boot::Kernel {
        kernel: k.clone(),
        initrd: Some("/nonexistent/initrd".into()),
        cmdline: String::new(),
    };
    check(c, "boot.initrd");
    let mut c = base.clone();
    c.boot = Boot::Kernel {
        kernel: k.clone(),
        initrd: None,
        cmdline: "a\nb".into(),
    };
    assert_eq!(c.validate(), Err(ConfigError::BadCmdline('\n')));
    let mut c = base.clone();
    c.boot = Boot::Disk { index: 0 };
    assert_eq!(
        c.validate(),
        Err(ConfigError::BadBootDisk { index: 0, count: 0 })
    );
    let mut c = base.clone();
    c.nics.push(Nic {
        id: None,
        mac: Some("01:00:00:00:00:01".into()),
        backend: NicBackend::User,
    });
    check(c, "not a MAC address");
    let mut c = base.clone();
    c.channels = vec![
        Channel {
            kind: ChannelKind::GuestAgent,
            name: None,
        },
        Channel {
            kind: ChannelKind::Plain,
            name: Some("org.qemu.guest_agent.0".into()),
        },
    ];
    check(c, "used twice");
    let mut c = base;
    c.channels = vec![Channel {
        kind: ChannelKind::Plain,
        name: None,
    }];
    check(c, "needs a name");
}

#[test]
fn config_parse_errors_name_the_format_and_unknown_fields() {
    let e = DomainConfig::from_toml("name = \"a\"\nmemory_mib = 128\nbogus = 1\n").unwrap_err();
    assert!(e.to_string().contains("cannot parse toml config"), "{e}");
    let e = DomainConfig::from_json("{").unwrap_err();
    assert!(matches!(e, ConfigError::Parse { format: "json", .. }));
}

#[test]
fn errors_say_what_to_do() {
    let e = Error::InvalidState {
        current: DomainState::Shutoff(ShutoffReason::Shutdown),
        operation: Operation::Save,
    };
    assert_eq!(
        e.to_string(),
        "cannot save a domain that is shutoff (shutdown)"
    );
    let e = Error::domain_not_found("web9");
    assert!(e.to_string().contains("not found"));
    let caps = Capabilities {
        backend: "libxl".into(),
        unsupported: [(
            Operation::PmSuspend,
            "PV guests have no ACPI S3".to_string(),
        )]
        .into_iter()
        .collect(),
        shutdown_modes: vec![],
        unsupported_variants: Default::default(),
    };
    assert!(caps.check(Operation::Pause).is_ok());
    let e = caps.check(Operation::PmSuspend).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }));
    assert_eq!(
        e.to_string(),
        "pm_suspend is not supported by the libxl backend: PV guests have no ACPI S3"
    );
}

#[tokio::test]
async fn cell_publishes_to_domain_and_driver_streams_and_waits() {
    let (driver_tx, _) = tokio::sync::broadcast::channel(16);
    let id = DomainId {
        name: "c".into(),
        uuid: uuid::Uuid::nil(),
    };
    let cell = std::sync::Arc::new(LifecycleCell::new(
        Lifecycle::new(id, LifecyclePolicies::default()),
        Some(driver_tx.clone()),
    ));
    let mut dom_events = cell.subscribe();
    let mut drv_events = EventStream::new(driver_tx.subscribe());
    let waiter = {
        let cell = cell.clone();
        tokio::spawn(async move {
            cell.wait_for(Operation::Pause, Duration::from_secs(5), |s| s.is_paused())
                .await
        })
    };
    cell.observe(Observation::Created {
        how: Creation::Boot,
        paused: false,
    });
    {
        let _g = cell.intent(Intent::Pause);
        cell.observe(Observation::CpusStopped {
            cause: StopCause::Command,
        });
    }
    assert_eq!(cell.with(|l| l.intent()), None, "guard cleared the intent");
    assert_eq!(
        waiter.await.unwrap().unwrap(),
        DomainState::Paused(PausedReason::User)
    );
    for stream in [&mut dom_events, &mut drv_events] {
        let a = stream.next().await.unwrap();
        let b = stream.next().await.unwrap();
        assert_eq!(a.kind, EventKind::Started(StartedDetail::Booted));
        assert_eq!(b.kind, EventKind::Suspended(SuspendedDetail::Paused));
        assert_eq!((a.seq, b.seq), (1, 2));
    }
    let e = cell
        .wait_for(Operation::Resume, Duration::from_millis(50), |s| {
            s.is_running()
        })
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("still paused"), "{e}");
}

#[tokio::test]
async fn cell_lagging_subscriber_counts_lost_events() {
    let id = DomainId {
        name: "lag".into(),
        uuid: uuid::Uuid::nil(),
    };
    let cell = LifecycleCell::new(Lifecycle::new(id, LifecyclePolicies::default()), None);
    let mut s = cell.subscribe();
    cell.observe(Observation::Created {
        how: Creation::Boot,
        paused: false,
    });
    for _ in 0..(domkit_core::cell::EVENT_BUFFER + 10) {
        cell.observe(Observation::CpusStopped {
            cause: StopCause::Command,
        });
        cell.observe(Observation::CpusResumed);
    }
    let first = s.next().await.unwrap();
    assert!(s.lost() > 0);
    assert!(first.seq > 1, "the gap is visible in seq");
}

#[test]
fn domain_id_uniqueness_names_what_clashed() {
    let a = DomainId {
        name: "a".into(),
        uuid: uuid::Uuid::from_u128(1),
    };
    let existing = [a.clone()];
    assert!(DomainId::check_unique("b", uuid::Uuid::from_u128(2), &existing).is_ok());
    let e = DomainId::check_unique("a", uuid::Uuid::from_u128(2), &existing).unwrap_err();
    assert_eq!(
        e.to_string(),
        "domain \"a\" already exists: pick another name/uuid or undefine the old one"
    );
    let e = DomainId::check_unique("b", uuid::Uuid::from_u128(1), &existing).unwrap_err();
    assert!(e.to_string().contains("(domain \"a\")"), "{e}");
}
