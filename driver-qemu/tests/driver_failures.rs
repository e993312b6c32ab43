//! Failure paths: a missing QEMU binary, a QEMU that exits at once, a monitor that speaks
//! garbage (at the greeting, and in the middle of an operation), and a QEMU SIGKILLed in the
//! middle of an operation (Shutoff(Crashed) + Stopped shortly after the EOF; the operation
//! fails with a typed error).
//!
//! The misbehaving "QEMU"s are small Python scripts standing in for the binary
//! (`qemu.binary`): real QEMU never sends garbage or dies on cue.

mod driver_support;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use domkit_core::{
    ControlState, Domain, DomainState, Driver, Error, EventKind, ShutdownMode, ShutdownOptions,
    ShutdownRequester, ShutdownWait, ShutoffReason, StartOptions, StoppedDetail,
};
use driver_support::*;

/// A fake QEMU: connects to the monitor socket from its argv and misbehaves per `mode`.
const FAKE_QEMU: &str = r#"#!/usr/bin/env python3
import json, socket, sys, time
mode = "MODE"
if mode == "exit":
    sys.stderr.write("fake-qemu: -accel tcg: this accelerator is broken on purpose\n")
    sys.exit(3)
# Like QEMU: the monitor is the listening socket inherited as fd 3 (`fd=3,server=on`).
assert any(a.startswith("socket,id=mon0,fd=3,server=on") for a in sys.argv)
listener = socket.socket(fileno=3)
s, _ = listener.accept()
if mode == "garbage-greeting":
    s.sendall(b"\x00\xffthis is not QMP\r\n")
    time.sleep(600)
greeting = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "fake"}, "capabilities": []}}
s.sendall(json.dumps(greeting).encode() + b"\r\n")
f = s.makefile("rb")
while True:
    line = f.readline()
    if not line:
        time.sleep(600)
    cmd = json.loads(line)
    if cmd.get("execute") == "cont":
        s.sendall(b'{"timestamp": {"seconds": 1, "microseconds": 0}, "event": "RESUME"}\r\n')
    if cmd.get("execute") == "stop" and mode == "garbage-later":
        s.sendall(b'{"return": {}, "id": \x00 garbage\r\n')
        time.sleep(600)
    s.sendall(json.dumps({"return": {}, "id": cmd.get("id")}).encode() + b"\r\n")
"#;

fn fake_qemu(dir: &std::path::Path, mode: &str) -> PathBuf {
    let path = dir.join(format!("fake-qemu-{mode}"));
    std::fs::write(&path, FAKE_QEMU.replace("MODE", mode)).expect("write fake qemu");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_binary_and_early_exit_are_typed_launch_errors() {
    let h = Harness::new();
    let mut config = guest_config("nobin", "");
    config.qemu.binary = Some("/nonexistent/qemu-system-x86_64".into());
    let domain = h.define(config).await;
    let err = domain
        .start(StartOptions::default())
        .await
        .expect_err("no binary");
    let msg = err.to_string();
    eprintln!("missing binary: {msg}");
    assert!(matches!(err, Error::Backend { .. }), "{msg}");
    assert!(
        msg.contains("not found") && msg.contains("-no-shutdown"),
        "{msg}"
    );
    assert_eq!(domain.state(), DomainState::Shutoff(ShutoffReason::Failed));

    let bins = tempfile::tempdir().expect("dir");
    let mut config = guest_config("early", "");
    config.qemu.binary = Some(fake_qemu(bins.path(), "exit"));
    let domain = h.define(config).await;
    let err = domain
        .start(StartOptions::default())
        .await
        .expect_err("exits at once");
    let msg = err.to_string();
    eprintln!("early exit: {msg}");
    assert!(msg.contains("exit status: 3"), "{msg}");
    assert!(msg.contains("broken on purpose"), "{msg}");
    assert!(msg.contains("-S"), "argv in the message: {msg}");
    assert_eq!(domain.state(), DomainState::Shutoff(ShutoffReason::Failed));
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_qmp_bytes_are_typed_errors_without_hang() {
    let h = Harness::new();
    let bins = tempfile::tempdir().expect("dir");

    // Garbage instead of the greeting: start fails with a protocol error, the process is
    // killed and reaped.
    let mut config = guest_config("garbage1", "");
    config.qemu.binary = Some(fake_qemu(bins.path(), "garbage-greeting"));
    let domain = h.define(config).await;
    let t = Instant::now();
    let err = tokio::time::timeout(LONG, domain.start(StartOptions::default()))
        .await
        .expect("no hang")
        .expect_err("garbage greeting");
    eprintln!("garbage greeting ({:?}): {err}", t.elapsed());
    assert!(matches!(err, Error::Protocol { .. }), "{err}");
    assert_eq!(domain.state(), DomainState::Shutoff(ShutoffReason::Failed));
    assert!(domain.pid().is_none());

    // Garbage in the middle of an operation: the operation fails with a protocol error, the
    // domain is not declared dead (the process lives) but its control is Broken; destroy
    // still works (by signal).
    let mut config = guest_config("garbage2", "");
    config.qemu.binary = Some(fake_qemu(bins.path(), "garbage-later"));
    let domain = h.define(config).await;
    domain
        .start(StartOptions::default())
        .await
        .expect("fake start");
    h.track(&domain);
    assert!(domain.state().is_running());
    let err = tokio::time::timeout(LONG, domain.pause())
        .await
        .expect("no hang")
        .expect_err("garbage reply");
    eprintln!("garbage mid-operation: {err}");
    assert!(matches!(err, Error::Protocol { .. }), "{err}");
    assert!(domain.state().is_running(), "{}", domain.state());
    let deadline = Instant::now() + LONG;
    while !matches!(domain.info_now().control, ControlState::Broken { .. }) {
        assert!(Instant::now() < deadline, "control never marked broken");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(matches!(
        domain.pause().await,
        Err(Error::ControlBroken { .. } | Error::Protocol { .. })
    ));
    domain.destroy().await.expect("destroy by signal");
    assert_eq!(
        domain.state(),
        DomainState::Shutoff(ShutoffReason::Destroyed)
    );
    assert_eq!(domain.info_now().control, ControlState::Ok);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_killed_mid_operation_is_shutoff_crashed_at_once() {
    let h = Harness::new();
    // The guest ignores the power button, so a shutdown request waits for it forever.
    let domain = h
        .define(guest_config("victim", "domkit.ignore_shutdown=1"))
        .await;
    let log = EventLog::new(&domain);
    h.boot(&domain).await;
    let pid = domain.pid().expect("pid");
    log.take().await;

    let pending = {
        let domain = domain.clone();
        tokio::spawn(async move {
            let options = ShutdownOptions {
                mode: ShutdownMode::Acpi,
                wait: ShutdownWait::Completed,
                timeout: LONG,
                destroy_on_timeout: false,
            };
            domain.shutdown(options).await
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        log.take().await,
        [EventKind::ShutdownRequested(ShutdownRequester::Host)]
    );
    let killed_at = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let state = wait_state(&domain, Duration::from_secs(10), DomainState::is_shutoff).await;
    let stopped_at = loop {
        if let Some(t) = log.received_at(EventKind::Stopped(StoppedDetail::Crashed)) {
            break t;
        }
        assert!(
            killed_at.elapsed() < LONG,
            "no Stopped(Crashed): {:?}",
            log.kinds()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let latency = stopped_at.duration_since(killed_at);
    eprintln!("SIGKILL -> Stopped(Crashed) event: {latency:?}");
    assert_eq!(state, DomainState::Shutoff(ShutoffReason::Crashed));
    // Generous bound on a loaded 2-core box; the goal (and typical value) is well under 100 ms.
    assert!(latency < Duration::from_secs(2), "{latency:?}");
    assert_eq!(log.kinds(), [EventKind::Stopped(StoppedDetail::Crashed)]);

    let err = pending
        .await
        .expect("join")
        .expect_err("the shutdown cannot succeed: QEMU was killed");
    eprintln!("pending shutdown: {err}");
    assert!(
        matches!(err, Error::Backend { .. } | Error::ControlBroken { .. }),
        "{err}"
    );
    assert!(domain.pid().is_none());
    h.finish().await;
}

/// Issue 15 (outside run): a real QEMU that cannot build the machine (no memory for 1 TiB,
/// a kernel that is not one) exits right after its monitor came up; the error must carry
/// what QEMU said, not `control_broken`, and the failed start is reported with its event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_launch_failures_carry_qemus_own_reason() {
    let h = Harness::new();
    let scratch = tempfile::tempdir().expect("scratch");
    let garbage = scratch.path().join("not-a-kernel");
    std::fs::write(&garbage, vec![0x5a_u8; 64 * 1024]).expect("garbage kernel");

    let mut huge = guest_config("huge", "");
    huge.memory_mib = 1024 * 1024; // 1 TiB
    let mut bad_kernel = guest_config("badkernel", "");
    if let domkit_core::Boot::Kernel { kernel, .. } = &mut bad_kernel.boot {
        *kernel = garbage.clone();
    }
    for config in [huge, bad_kernel] {
        let name = config.name.clone();
        let domain = h.define(config).await;
        let log = EventLog::new(&domain);
        let err = domain
            .start(StartOptions::default())
            .await
            .expect_err("QEMU cannot launch this");
        let msg = err.to_string();
        eprintln!("{name}: {msg}");
        assert!(matches!(err, Error::Backend { .. }), "{name}: {msg}");
        assert!(
            msg.contains("QEMU said:"),
            "{name}: no QEMU output in: {msg}"
        );
        assert_eq!(domain.state(), DomainState::Shutoff(ShutoffReason::Failed));
        log.wait_for(
            EventKind::Stopped(StoppedDetail::Failed),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(log.kinds(), [EventKind::Stopped(StoppedDetail::Failed)]);
        assert!(domain.pid().is_none());
    }
    h.finish().await;
}

/// Issue 15 (outside run): names of 56-64 characters passed `define()` and every `start()`
/// failed with `io`; the socket paths are checked against the real runtime root at define.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_too_long_for_the_socket_paths_is_refused_at_define() {
    let base = tempfile::Builder::new()
        .prefix("dk")
        .tempdir_in("/tmp")
        .expect("temp root");
    // ~60 bytes of root: a 64-character name cannot fit `<root>/<name>/qmp.sock` (107 max),
    // a short one can.
    let root = base.path().join("r".repeat(44));
    let driver = domkit_qemu::QemuDriver::new(domkit_qemu::QemuDriverOptions::with_runtime_root(
        root.clone(),
    ))
    .expect("driver");
    let long = "n".repeat(64);
    match driver.define(guest_config(&long, "")).await {
        Err(Error::InvalidConfig(e)) => {
            let msg = e.to_string();
            eprintln!("{msg}");
            assert!(msg.contains("Unix socket path"), "{msg}");
        }
        other => panic!("want invalid_config, got {:?}", other.map(|_| ())),
    }
    driver
        .define(guest_config("short", ""))
        .await
        .expect("a short name fits");
    driver.close().await.expect("close");
}

/// Issue 15 (outside run): a second driver on the same runtime root deleted the first one's
/// live agent socket and, on undefine, its whole directory. One manager per root now: the
/// second gets `root_in_use` naming the holder and touches nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_driver_on_the_same_root_is_refused_and_touches_nothing() {
    let h = Harness::new();
    let domain = h.define(guest_config("first", "")).await;
    domain
        .start(StartOptions { paused: true })
        .await
        .expect("start paused");
    h.track(&domain);
    let dir = domain.runtime_dir().to_owned();
    let before: Vec<_> = std::fs::read_dir(&dir)
        .expect("runtime dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    match domkit_qemu::QemuDriver::new(domkit_qemu::QemuDriverOptions::with_runtime_root(
        h.runtime_root(),
    )) {
        Err(Error::RootInUse { holder_pid, .. }) => {
            assert_eq!(holder_pid, Some(std::process::id()))
        }
        Err(e) => panic!("want root_in_use, got {e}"),
        Ok(_) => panic!("a second driver opened the same root"),
    }
    let after: Vec<_> = std::fs::read_dir(&dir)
        .expect("runtime dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        before, after,
        "the refused driver touched the first one's files"
    );
    assert!(domain.state().is_active());
    h.finish().await;
}
