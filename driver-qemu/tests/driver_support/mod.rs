//! Shared helpers of the `driver_*` integration tests: a driver on a temporary runtime root,
//! the real test guest, event recording, guest-exec, and the leak check every test ends with.
//!
//! The guest comes from `DOMKIT_GUEST_DIR` or `~/.cache/domkit/guest`; when it is missing the
//! tests FAIL and say to run `scripts/build-test-guest.sh`.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use domkit_core::{
    Boot, Channel, ChannelKind, Domain, DomainConfig, DomainEvent, DomainState, Driver, EventKind,
    LifecycleAction,
};
use domkit_qemu::agent::GuestExecRequest;
use domkit_qemu::{QemuDomain, QemuDriver, QemuDriverOptions};
use futures::StreamExt;

/// Bounds how long a broken step may hang (TCG on a loaded 2-core host is slow); never a
/// judgement of speed.
pub const LONG: Duration = Duration::from_secs(120);

/// The marker the guest prints on ttyS0 once its init is done.
pub const READY: &str = "DOMKIT-GUEST-READY";

/// The test guest's kernel and initrd, or a failure telling how to build them.
pub fn guest() -> (PathBuf, PathBuf) {
    let dir = match std::env::var_os("DOMKIT_GUEST_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/domkit/guest")
        }
    };
    let (kernel, initrd) = (dir.join("vmlinuz"), dir.join("initrd.img"));
    assert!(
        kernel.is_file() && initrd.is_file(),
        "the test guest is missing in {}: run `bash scripts/build-test-guest.sh` (or set \
         DOMKIT_GUEST_DIR)",
        dir.display()
    );
    (kernel, initrd)
}

/// A test guest config: 128 MiB, serial console, guest agent, pvpanic, TCG.
pub fn guest_config(name: &str, extra_cmdline: &str) -> DomainConfig {
    let (kernel, initrd) = guest();
    let mut config = DomainConfig::with_kernel(name, 128, kernel.clone());
    // no_timer_check: the boot-time IO-APIC timer check panics on a starved TCG vCPU.
    let mut cmdline = "console=ttyS0 no_timer_check".to_string();
    if !extra_cmdline.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(extra_cmdline);
    }
    config.boot = Boot::Kernel {
        kernel,
        initrd: Some(initrd),
        cmdline,
    };
    config.channels.push(Channel {
        kind: ChannelKind::GuestAgent,
        name: None,
    });
    config.qemu.accel = domkit_core::Accel::Tcg;
    config
}

/// Set the three lifecycle policies.
pub fn with_policies(
    mut config: DomainConfig,
    on_poweroff: LifecycleAction,
    on_reboot: LifecycleAction,
    on_crash: LifecycleAction,
) -> DomainConfig {
    config.on_poweroff = on_poweroff;
    config.on_reboot = on_reboot;
    config.on_crash = on_crash;
    config
}

/// Log to the test's output (`RUST_LOG`, default warn); once per test binary.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A driver on a private temporary runtime root, tracking every QEMU pid it saw.
pub struct Harness {
    pub driver: QemuDriver,
    root: tempfile::TempDir,
    pids: Mutex<Vec<u32>>,
}

impl Harness {
    pub fn new() -> Self {
        init_tracing();
        // Short path: Unix socket paths are limited to 107 bytes.
        let root = tempfile::Builder::new()
            .prefix("dk")
            .tempdir_in("/tmp")
            .expect("temp runtime root");
        let options = QemuDriverOptions::with_runtime_root(root.path().join("qemu"));
        let driver = QemuDriver::new(options).expect("driver");
        Harness {
            driver,
            root,
            pids: Mutex::new(Vec::new()),
        }
    }

    pub fn runtime_root(&self) -> PathBuf {
        self.root.path().join("qemu")
    }

    /// Remember the domain's current QEMU pid for the leak check.
    pub fn track(&self, domain: &QemuDomain) {
        if let Some(pid) = domain.pid() {
            let mut pids = self.pids.lock().unwrap_or_else(|p| p.into_inner());
            if !pids.contains(&pid) {
                pids.push(pid);
            }
        }
    }

    pub async fn define(&self, config: DomainConfig) -> QemuDomain {
        self.driver.define(config).await.expect("define")
    }

    /// Start and wait until the guest is up (ready marker + agent answers).
    pub async fn boot(&self, domain: &QemuDomain) -> Duration {
        let started = Instant::now();
        domain
            .start(domkit_core::StartOptions::default())
            .await
            .expect("start");
        self.track(domain);
        wait_ready(domain, 1).await;
        started.elapsed()
    }

    /// End of every test: destroy and undefine everything, then check that no QEMU process,
    /// socket or runtime directory is left.
    pub async fn finish(self) {
        self.driver.close().await.expect("close the driver");
        let pids = self.pids.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        for pid in pids {
            // Gone entirely: not running, and reaped (no zombie).
            while Path::new(&format!("/proc/{pid}")).exists() {
                assert!(
                    Instant::now() < deadline,
                    "QEMU pid {pid} leaked: {}",
                    std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let root = self.runtime_root();
        // The root's lock file is the root's, not a domain's: it stays with the root.
        let left: Vec<PathBuf> = std::fs::read_dir(&root)
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| !p.ends_with("lock"))
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "runtime files leaked under {}: {left:?}",
            root.display()
        );
        drop(self.driver);
    }
}

/// Wait until the guest printed its ready marker `count` times (since its process started)
/// and its agent answers a ping.
pub async fn wait_ready(domain: &QemuDomain, count: usize) {
    let deadline = Instant::now() + LONG;
    loop {
        let log = std::fs::read_to_string(domain.serial_log()).unwrap_or_default();
        if log.matches(READY).count() >= count {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}: guest not ready ({count}x {READY}) in {LONG:?}; serial log:\n{log}",
            domain.id().name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let agent = domain.guest_agent().await.expect("agent");
    let deadline = Instant::now() + LONG;
    while let Err(e) = agent.ping().await {
        assert!(Instant::now() < deadline, "agent does not answer: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How many ready markers the serial log holds now (it accumulates across reboots and
/// processes of one domain).
pub fn ready_count(domain: &QemuDomain) -> usize {
    std::fs::read_to_string(domain.serial_log())
        .unwrap_or_default()
        .matches(READY)
        .count()
}

/// Start `/bin/sh -c script` in the guest; returns the guest pid.
pub async fn sh_start(domain: &QemuDomain, script: &str) -> i64 {
    let agent = domain.guest_agent().await.expect("agent");
    let request = GuestExecRequest {
        path: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        capture_output: true,
        ..Default::default()
    };
    agent.exec(&request).await.expect("guest-exec")
}

/// Run `/bin/sh -c script` in the guest and return its stdout.
pub async fn sh(domain: &QemuDomain, script: &str) -> String {
    let pid = sh_start(domain, script).await;
    let agent = domain.guest_agent().await.expect("agent");
    let deadline = Instant::now() + LONG;
    loop {
        let status = agent.exec_status(pid).await.expect("guest-exec-status");
        if status.exited {
            assert_eq!(
                status.exit_code,
                Some(0),
                "guest command {script:?} failed: {status:?}"
            );
            return String::from_utf8_lossy(status.out_data.as_deref().unwrap_or_default())
                .into_owned();
        }
        assert!(Instant::now() < deadline, "guest command {script:?} hangs");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An `agent_connected` / `agent_disconnected` event (§13.4).
pub fn is_agent_event(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::AgentConnected | EventKind::AgentDisconnected
    )
}

/// Records a domain's events in the background.
pub struct EventLog {
    events: Arc<Mutex<Vec<(Instant, DomainEvent)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl EventLog {
    pub fn new(domain: &QemuDomain) -> Self {
        let mut stream = domain.subscribe();
        let events: Arc<Mutex<Vec<(Instant, DomainEvent)>>> = Arc::default();
        let sink = events.clone();
        let task = tokio::spawn(async move {
            while let Some(ev) = stream.next().await {
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((Instant::now(), ev));
            }
        });
        EventLog { events, task }
    }

    /// The lifecycle kinds recorded so far, and forget them. Events are published
    /// synchronously but collected by a task: give it a moment to catch up first. The guest
    /// agent's connected/disconnected events are left out (not lifecycle transitions; they
    /// come whenever qemu-ga opens or closes its port): see [`EventLog::agent_kinds`].
    pub async fn take(&self) -> Vec<EventKind> {
        tokio::time::sleep(Duration::from_millis(200)).await;
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()))
            .into_iter()
            .map(|(_, e)| e.kind)
            .filter(|k| !is_agent_event(k))
            .collect()
    }

    /// The lifecycle kinds recorded so far (agent events left out, as in `take`).
    pub fn kinds(&self) -> Vec<EventKind> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(_, e)| e.kind)
            .filter(|k| !is_agent_event(k))
            .collect()
    }

    /// The guest agent's connected/disconnected events recorded so far.
    pub fn agent_kinds(&self) -> Vec<EventKind> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(_, e)| e.kind)
            .filter(is_agent_event)
            .collect()
    }

    /// When `kind` was first received.
    pub fn received_at(&self, kind: EventKind) -> Option<Instant> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(_, e)| e.kind == kind)
            .map(|(t, _)| *t)
    }

    /// Wait until `kind` was recorded.
    pub async fn wait_for(&self, kind: EventKind, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.kinds().contains(&kind) {
            assert!(
                Instant::now() < deadline,
                "no {kind} within {within:?}; got {:?}",
                self.kinds()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sequence numbers must be gapless (nothing lost) — checked on the raw events.
    pub fn assert_gapless(&self) {
        let events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        for w in events.windows(2) {
            assert_eq!(w[1].1.seq, w[0].1.seq + 1, "event seq gap: {:?}", w);
        }
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Wait until `pred` holds for the domain's state.
pub async fn wait_state(
    domain: &QemuDomain,
    within: Duration,
    pred: impl Fn(&DomainState) -> bool,
) -> DomainState {
    let deadline = Instant::now() + within;
    loop {
        let state = domain.state();
        if pred(&state) {
            return state;
        }
        assert!(
            Instant::now() < deadline,
            "{}: state still {state} after {within:?}",
            domain.id().name
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Let the guest settle: events that would follow an operation (a RESET echo, say) have time
/// to arrive before the test counts them.
pub async fn settle() {
    tokio::time::sleep(Duration::from_secs(2)).await;
}
