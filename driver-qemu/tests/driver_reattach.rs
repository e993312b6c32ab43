//! Durable domains on real QEMU (§11, issue 12): a manager in a process of its own
//! (examples/qemu_manager.rs) is SIGKILLed, and a new driver on the same roots reattaches:
//! same uuid, the next `seq`, the state the evidence supports, policies applied to what
//! happened while no manager was attached (events marked `reconciled`), and operations in
//! flight ended consistently. The ephemeral mode is checked the other way: its VMs die with
//! the manager process.

mod driver_support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use domkit_core::{
    Domain, DomainState, Driver, Error, EventKind, LifecycleAction, PausedReason, ResumedDetail,
    RunningReason, ShutdownOptions, ShutdownOutcome, ShutdownRequester, ShutoffReason,
    StoppedDetail, SuspendedDetail,
};
use domkit_qemu::{QemuDomain, QemuDriver, QemuDriverOptions};
use driver_support::*;
use futures::StreamExt;
use serde_json::Value;

/// A manager process and its stdio.
struct Manager {
    child: Child,
    stdin: ChildStdin,
    out: BufReader<std::process::ChildStdout>,
}

fn manager_binary() -> PathBuf {
    // target/debug/deps/<test> -> target/debug/examples/qemu_manager (cargo test builds
    // the package's examples before running its tests).
    let exe = std::env::current_exe().expect("current exe");
    let debug = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = debug.join("examples/qemu_manager");
    assert!(
        bin.exists(),
        "{} missing: run `cargo test -p domkit-qemu` (it builds the examples)",
        bin.display()
    );
    bin
}

impl Manager {
    /// Define the test guest `name` and start it; returns its QEMU pid.
    fn define_and_start(&mut self, config: &domkit_core::DomainConfig) -> u32 {
        self.call(&format!(
            "define {}",
            serde_json::to_string(config).unwrap()
        ));
        self.call(&format!("start {}", config.name))["pid"]
            .as_u64()
            .expect("pid") as u32
    }

    fn spawn(mode: &str, roots: &Roots) -> Manager {
        let mut child = Command::new(manager_binary())
            .arg(mode)
            .arg(&roots.state)
            .arg(&roots.runtime)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the manager");
        let stdin = child.stdin.take().expect("stdin");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut m = Manager { child, stdin, out };
        let ready = m.read();
        assert_eq!(ready["ready"], true, "manager did not open: {ready}");
        m
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.out.read_line(&mut line).expect("manager output");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("manager said {line:?}: {e}"))
    }

    fn send(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").expect("manager stdin");
        self.stdin.flush().expect("flush");
    }

    fn call(&mut self, command: &str) -> Value {
        self.send(command);
        let answer = self.read();
        assert_eq!(answer["ok"], true, "{command}: {answer}");
        answer
    }

    fn sigkill(mut self) {
        self.child.kill().expect("SIGKILL the manager");
        self.child.wait().expect("reap the manager");
    }
}

/// A state root and a runtime root (short paths: Unix socket paths are limited).
struct Roots {
    _base: tempfile::TempDir,
    state: PathBuf,
    runtime: PathBuf,
}

impl Roots {
    fn new() -> Roots {
        init_tracing();
        let base = tempfile::Builder::new()
            .prefix("dr")
            .tempdir_in("/tmp")
            .expect("roots");
        Roots {
            state: base.path().join("s"),
            runtime: base.path().join("r"),
            _base: base,
        }
    }

    async fn open(&self) -> QemuDriver {
        QemuDriver::open(QemuDriverOptions::persistent(&self.state, &self.runtime))
            .await
            .expect("open the persistent driver")
    }
}

/// Wait until the guest of `name` printed its ready marker (read from its serial log: no
/// driver of this process holds the domain).
async fn wait_booted(roots: &Roots, name: &str) {
    let log = roots.runtime.join(name).join("serial.log");
    let deadline = Instant::now() + LONG;
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains(READY)
    {
        assert!(Instant::now() < deadline, "{name} did not boot");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

async fn wait_gone(pid: u32, within: Duration) {
    let deadline = Instant::now() + within;
    while pid_alive(pid) {
        assert!(Instant::now() < deadline, "pid {pid} still alive");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The events of a reattached domain, beginning right after the snapshot it was taken at.
async fn next_events(
    events: &mut domkit_core::EventStream,
    n: usize,
) -> Vec<domkit_core::DomainEvent> {
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(LONG, events.next()).await {
            Ok(Some(ev)) => out.push(ev),
            other => panic!("wanted {n} events, got {out:?} then {other:?}"),
        }
    }
    out
}

/// End of a test: destroy and undefine through a driver, nothing left running.
async fn finish(driver: QemuDriver, pids: &[u32]) {
    driver.close().await.expect("close");
    for pid in pids {
        wait_gone(*pid, Duration::from_secs(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reattach_running_then_paused_seq_continues_then_graceful_shutdown() {
    let roots = Roots::new();
    let mut a = Manager::spawn("persistent", &roots);
    let config = guest_config("durable", "");
    let uuid = a.call(&format!(
        "define {}",
        serde_json::to_string(&config).unwrap()
    ))["uuid"]
        .as_str()
        .expect("uuid")
        .to_owned();
    let pid = a.call("start durable")["pid"].as_u64().expect("pid") as u32;
    let before = a.call("state durable");
    assert_eq!(before["state"]["state"], "running", "{before}");
    let seq = before["seq"].as_u64().unwrap();
    a.sigkill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(pid_alive(pid), "a persistent domain died with its manager");

    // A new manager: the same domain, running, same uuid, next seq.
    let b = roots.open().await;
    let d: QemuDomain = b.lookup_by_name("durable").await.expect("reattached");
    assert_eq!(d.id().uuid.to_string(), uuid);
    assert_eq!(d.pid(), Some(pid));
    assert_eq!(d.state(), DomainState::Running(RunningReason::Booted));
    wait_ready(&d, 1).await;
    let (_, snap_seq, mut events) = d.snapshot_and_subscribe();
    assert_eq!(snap_seq, seq, "nothing happened while away: no event");
    d.pause().await.expect("pause after reattach");
    let evs = next_events(&mut events, 1).await;
    assert_eq!(evs[0].seq, seq + 1, "seq continues across managers");
    assert_eq!(evs[0].kind, EventKind::Suspended(SuspendedDetail::Paused));
    assert!(!evs[0].reconciled);
    // Orderly detach, then a third manager finds it paused.
    b.detach();
    drop(d);
    drop(b);
    let c = roots.open().await;
    let d = c.lookup_by_name("durable").await.expect("reattached");
    assert_eq!(d.state(), DomainState::Paused(PausedReason::User));
    let (_, snap_seq, mut events) = d.snapshot_and_subscribe();
    assert_eq!(snap_seq, seq + 1);
    d.resume().await.expect("resume");
    let outcome = d
        .shutdown(ShutdownOptions {
            timeout: LONG,
            ..ShutdownOptions::default()
        })
        .await
        .expect("graceful shutdown after reattach");
    assert_eq!(outcome, ShutdownOutcome::Completed);
    let evs = next_events(&mut events, 3).await;
    let kinds: Vec<_> = evs.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::Resumed(ResumedDetail::Unpaused),
            EventKind::ShutdownRequested(ShutdownRequester::Host),
            EventKind::Stopped(StoppedDetail::Shutdown),
        ]
    );
    let seqs: Vec<u64> = evs.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [seq + 2, seq + 3, seq + 4]);
    finish(c, &[pid]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_survive_and_a_second_manager_is_refused() {
    let roots = Roots::new();
    let mut a = Manager::spawn("persistent", &roots);
    for name in ["def-a", "def-b"] {
        let config = guest_config(name, "");
        a.call(&format!(
            "define {}",
            serde_json::to_string(&config).unwrap()
        ));
    }
    // A second manager on the same roots while the first lives: refused, typed.
    let mut second = Command::new(manager_binary())
        .arg("persistent")
        .arg(&roots.state)
        .arg(&roots.runtime)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(second.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let refused: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(refused["ready"], false, "{refused}");
    assert!(
        refused["kind"].as_str().unwrap_or("").contains("RootInUse"),
        "{refused}"
    );
    assert!(second.wait().unwrap().code() == Some(1));
    a.sigkill();

    let b = roots.open().await;
    let listed: Vec<String> = b
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id.name)
        .collect();
    assert_eq!(listed, ["def-a", "def-b"]);
    // Defining a persisted name again is already_exists.
    match b.define(guest_config("def-a", "")).await {
        Err(Error::AlreadyExists { .. }) => {}
        other => panic!("want already_exists, got {:?}", other.map(|_| ())),
    }
    // Undefine is durable.
    b.undefine("def-b").await.expect("undefine");
    drop(b);
    let c = roots.open().await;
    let listed: Vec<String> = c
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id.name)
        .collect();
    assert_eq!(listed, ["def-a"]);
    finish(c, &[]).await;
}

/// Poweroff, crash and SIGKILL while no manager runs: reconciled events, then the policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poweroff_crash_and_kill_while_away_are_reconciled_with_the_policy() {
    let roots = Roots::new();
    let mut a = Manager::spawn("persistent", &roots);
    let mut crash = guest_config("away-crash", "");
    crash.on_crash = LifecycleAction::Destroy;
    for config in [
        guest_config("away-off", ""),
        crash,
        guest_config("away-kill", ""),
    ] {
        a.call(&format!(
            "define {}",
            serde_json::to_string(&config).unwrap()
        ));
    }
    let mut pids = Vec::new();
    for name in ["away-off", "away-crash", "away-kill"] {
        pids.push(a.call(&format!("start {name}"))["pid"].as_u64().unwrap() as u32);
    }
    // Let the guests boot through a driver view of the same roots? Not while A holds them:
    // wait on the serial logs instead.
    for name in ["away-off", "away-crash", "away-kill"] {
        wait_booted(&roots, name).await;
    }
    let seqs: Vec<u64> = ["away-off", "away-crash", "away-kill"]
        .iter()
        .map(|n| a.call(&format!("state {n}"))["seq"].as_u64().unwrap())
        .collect();
    a.sigkill();

    // While away: the guest of away-off powers off (ACPI from a bare QMP client), the
    // guest of away-crash panics (through its agent), away-kill's QEMU is SIGKILLed.
    let qmp = domkit_qemu::qmp::QmpClient::connect(roots.runtime.join("away-off/qmp.sock"))
        .await
        .expect("bare QMP client");
    qmp.system_powerdown().await.expect("powerdown");
    drop(qmp);
    let agent = domkit_qemu::agent::GuestAgent::connect_with(
        roots.runtime.join("away-crash/agent.sock"),
        Default::default(),
    )
    .await
    .expect("agent");
    let _ = agent
        .exec(&domkit_qemu::agent::GuestExecRequest {
            path: "/bin/sh".into(),
            args: vec!["-c".into(), "echo c > /proc/sysrq-trigger".into()],
            ..Default::default()
        })
        .await;
    drop(agent);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[2] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Give the guests time to act (a TCG guest's ACPI poweroff takes a few seconds).
    let deadline = Instant::now() + LONG;
    loop {
        let status = qmp_run_state(&roots.runtime.join("away-off/qmp.sock")).await;
        let crashed = qmp_run_state(&roots.runtime.join("away-crash/qmp.sock")).await;
        if status == "shutdown" && crashed == "guest-panicked" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "while away: {status} / {crashed}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let b = roots.open().await;
    let mut ends = Vec::new();
    for (i, name) in ["away-off", "away-crash", "away-kill"].iter().enumerate() {
        let d = b.lookup_by_name(name).await.expect("reattached");
        let state = wait_state(&d, LONG, |s| !s.is_active()).await;
        ends.push((name.to_string(), state, seqs[i]));
    }
    assert_eq!(ends[0].1, DomainState::Shutoff(ShutoffReason::Shutdown));
    assert_eq!(ends[1].1, DomainState::Shutoff(ShutoffReason::Crashed));
    assert_eq!(ends[2].1, DomainState::Shutoff(ShutoffReason::Crashed));
    for pid in &pids {
        wait_gone(*pid, Duration::from_secs(10)).await;
    }
    // The events: read back through a fresh manager's view of the status (the seq moved).
    drop(b);
    let c = roots.open().await;
    for (name, _, seq) in &ends {
        let d = c.lookup_by_name(name).await.unwrap();
        let (_, now, _) = d.snapshot_and_subscribe();
        assert!(
            now > *seq,
            "{name}: the end while away produced events ({seq} -> {now})"
        );
    }
    finish(c, &[]).await;
}

async fn qmp_run_state(socket: &Path) -> String {
    match domkit_qemu::qmp::QmpClient::connect(socket).await {
        Ok(qmp) => match qmp.query_status().await {
            Ok(s) => serde_json::to_value(&s.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            Err(_) => String::new(),
        },
        Err(_) => String::new(),
    }
}

/// SIGKILL of the manager in the middle of a save: the next manager finds either the file
/// committed and the domain saved, or no file, no temporary file, and the domain running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_killed_mid_save_ends_consistent() {
    let roots = Roots::new();
    let scratch = tempfile::tempdir().expect("scratch");
    let target = scratch.path().join("durable.save");
    let mut a = Manager::spawn("persistent", &roots);
    let pid = a.define_and_start(&guest_config("midsave", ""));
    a.send(&format!("save midsave {}", target.display()));
    // Kill once the save is underway: its temporary file exists.
    let deadline = Instant::now() + LONG;
    loop {
        let temp = std::fs::read_dir(scratch.path())
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains("tmp"));
        if temp || target.exists() {
            break;
        }
        assert!(Instant::now() < deadline, "the save never began");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.sigkill();

    let b = roots.open().await;
    let d = b.lookup_by_name("midsave").await.expect("reattached");
    let state = wait_state(&d, LONG, |s| {
        s.is_running() || *s == DomainState::Shutoff(ShutoffReason::Saved)
    })
    .await;
    let left: Vec<String> = std::fs::read_dir(scratch.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    eprintln!("after reattach: {state}, files {left:?}");
    match state {
        DomainState::Shutoff(ShutoffReason::Saved) => {
            assert_eq!(left, ["durable.save"], "committed: only the final file");
            d.restore(&target, Default::default())
                .await
                .expect("the committed file restores");
        }
        DomainState::Running(_) => {
            assert!(left.is_empty(), "rolled back: no file at all, got {left:?}");
            assert!(pid_alive(pid));
        }
        other => panic!("inconsistent end: {other}"),
    }
    finish(b, &[pid]).await;
}

/// SIGKILL of the manager while its shutdown waits: the guest powers off while no manager
/// runs, and the next one completes the shutdown as a shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_killed_mid_shutdown_completes_as_shutdown() {
    let roots = Roots::new();
    let mut a = Manager::spawn("persistent", &roots);
    let pid = a.define_and_start(&guest_config("midshut", ""));
    wait_booted(&roots, "midshut").await;
    a.send("shutdown midshut 120");
    // Killed once the request was acknowledged (persisted: shutting_down).
    let status = roots.state.join("domains");
    let deadline = Instant::now() + LONG;
    loop {
        let acked = std::fs::read_dir(&status).unwrap().flatten().any(|e| {
            e.file_name().to_string_lossy().ends_with(".status.json")
                && std::fs::read_to_string(e.path())
                    .unwrap_or_default()
                    .contains("shutting_down")
        });
        if acked {
            break;
        }
        assert!(Instant::now() < deadline, "shutdown never acknowledged");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.sigkill();
    let b = roots.open().await;
    let d = b.lookup_by_name("midshut").await.expect("reattached");
    let state = wait_state(&d, LONG, |s| !s.is_active()).await;
    assert_eq!(state, DomainState::Shutoff(ShutoffReason::Shutdown));
    wait_gone(pid, Duration::from_secs(10)).await;
    finish(b, &[pid]).await;
}

/// Ephemeral: "dies with the manager" means the manager process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_domains_die_with_the_manager_process() {
    let roots = Roots::new();
    let mut a = Manager::spawn("ephemeral", &roots);
    let pid = a.define_and_start(&guest_config("eph", ""));
    // Longer than tokio keeps an idle blocking thread (10 s): the VM must still run.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(
        pid_alive(pid),
        "an ephemeral VM died while its manager lives"
    );
    a.call("state eph");
    a.sigkill();
    wait_gone(pid, Duration::from_secs(5)).await;
    // The next ephemeral manager sweeps what the dead one left.
    let m = Manager::spawn("ephemeral", &roots);
    assert!(
        !roots.runtime.join("eph").exists(),
        "stale runtime directory left"
    );
    m.sigkill();
}
