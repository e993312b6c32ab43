//! Record the QMP event flows of `docs/semantics.md` §8 from a real QEMU booting the real test
//! guest, as fixtures for the translation unit tests (`src/translate/tests.rs`).
//!
//! ```text
//! cargo run -p domkit-qemu --example record_flows [-- [--out DIR] [FLOW...]]
//! ```
//!
//! Each flow boots the guest with exactly the command line the driver uses
//! ([`domkit_qemu::argv::build_argv`]), performs the QMP/agent steps the driver performs for
//! that operation (including the policy action the lifecycle would ask for), and writes
//! `DIR/<flow>.jsonl` (default `tests/fixtures/flows/`), one JSON object per line:
//!
//! - `{"flow": NAME, "qemu": VERSION, "argv": [...]}`: first line;
//! - `{"event": {...}}`: a QMP event as received (name, data, QEMU timestamp);
//! - `{"send": CMD, "arguments": ...}` / `{"reply": CMD, "ok": BOOL, "error": ...}`: our QMP
//!   commands (replies may be recorded after events that came later on the wire);
//! - `{"agent": CMD, "arguments": ...}`: a guest agent command;
//! - `{"intent": INTENT|null}`: the intent the driver holds from here on;
//! - `{"created": {"how": "boot"|"restore", "paused": BOOL}}`: where the driver reports
//!   `Created`;
//! - `{"end": HOW, "exit": STATUS}`: the monitor closed and the process exited.
//!
//! Every line also has `"t"`: seconds since the flow began (for humans only). Re-record for
//! another QEMU version by running this again; the guest comes from `DOMKIT_GUEST_DIR` or
//! `~/.cache/domkit/guest` (build it with `scripts/build-test-guest.sh`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use domkit_core::{Boot, Channel, ChannelKind, DomainConfig};
use domkit_qemu::agent::{GuestAgent, GuestExecRequest};
use domkit_qemu::argv::{build_argv, AccelChoice};
use domkit_qemu::process::{self, LaunchOptions};
use domkit_qemu::qmp::{QmpClient, QmpClientOptions};
use serde_json::{json, Value};

type Lines = Arc<Mutex<Vec<Value>>>;

const ALL_FLOWS: &[&str] = &[
    "boot",
    "pause_resume",
    "powerdown",
    "powerdown_ignored",
    "fake_reboot",
    "guest_reboot",
    "reset",
    "reset_paused",
    "guest_poweroff",
    "guest_poweroff_restart",
    "panic",
    "panic_restart",
    "save",
    "save_paused",
    "restore",
    "s3",
    "agent_shutdown",
    "sigkill",
    "sigterm",
];

type Error = Box<dyn std::error::Error + Send + Sync>;

fn guest_dir() -> PathBuf {
    match std::env::var_os("DOMKIT_GUEST_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/domkit/guest")
        }
    }
}

/// One recorded QEMU run.
struct Session {
    flow: String,
    lines: Lines,
    started: Instant,
    qmp: QmpClient,
    child: process::Proc,
    pid: u32,
    agent: Option<GuestAgent>,
    agent_socket: PathBuf,
    serial: PathBuf,
    _dir: tempfile::TempDir,
}

fn push(lines: &Lines, started: Instant, mut line: Value) {
    line["t"] = json!((started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0);
    lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
}

impl Session {
    async fn launch(flow: &str, ignore_shutdown: bool, incoming: bool) -> Result<Self, Error> {
        let guest = guest_dir();
        let (kernel, initrd) = (guest.join("vmlinuz"), guest.join("initrd.img"));
        if !kernel.is_file() || !initrd.is_file() {
            return Err(format!(
                "test guest missing in {}: run scripts/build-test-guest.sh",
                guest.display()
            )
            .into());
        }
        let mut config =
            DomainConfig::with_kernel(&format!("rec-{flow}").replace('_', "-"), 128, kernel);
        let mut cmdline = "console=ttyS0".to_string();
        if ignore_shutdown {
            cmdline.push_str(" domkit.ignore_shutdown=1");
        }
        config.boot = Boot::Kernel {
            kernel: guest.join("vmlinuz"),
            initrd: Some(initrd),
            cmdline,
        };
        config.channels.push(Channel {
            kind: ChannelKind::GuestAgent,
            name: None,
        });
        let dir = tempfile::Builder::new().prefix("domkit-rec").tempdir()?;
        let paths = process::create_runtime_dir(dir.path(), &config.name)?;
        let argv = build_argv(&config, AccelChoice::Tcg, &paths, incoming)?;
        let options = LaunchOptions {
            ownership: process::Ownership::Ephemeral,
            connect_timeout: Duration::from_secs(30),
            qmp: QmpClientOptions::default(),
        };
        let proc = process::launch(argv.clone(), &paths, &options).await?;
        let started = Instant::now();
        let lines: Lines = Arc::default();
        let v = proc.qmp.greeting().version.qemu;
        push(
            &lines,
            started,
            json!({"flow": flow, "qemu": format!("{}.{}.{}", v.major, v.minor, v.micro), "argv": argv}),
        );
        let mut events = proc.events;
        let rec = lines.clone();
        tokio::spawn(async move {
            while let Ok(ev) = events.recv().await {
                let mut raw = json!({
                    "event": ev.name,
                    "timestamp": {"seconds": ev.timestamp.seconds, "microseconds": ev.timestamp.microseconds},
                });
                if !ev.data.is_null() {
                    raw["data"] = ev.data.clone();
                }
                push(&rec, started, json!({ "event": raw }));
            }
        });
        Ok(Session {
            flow: flow.to_string(),
            lines,
            started,
            qmp: proc.qmp,
            child: proc.child,
            pid: proc.pid,
            agent: None,
            agent_socket: paths.channel_socket(ChannelKind::GuestAgent, Channel::GUEST_AGENT_NAME),
            serial: paths.console_log(0),
            _dir: dir,
        })
    }

    fn note(&self, line: Value) {
        push(&self.lines, self.started, line);
    }

    fn intent(&self, intent: Option<&str>) {
        self.note(json!({ "intent": intent }));
    }

    fn created(&self, how: &str, paused: bool) {
        self.note(json!({"created": {"how": how, "paused": paused}}));
    }

    async fn cmd(&self, name: &str, arguments: Option<Value>) -> Result<Value, Error> {
        self.note(json!({"send": name, "arguments": arguments}));
        let result = self.qmp.execute(name, arguments).await;
        // Events a command causes arrive before its reply; give the recording task the moment
        // it needs to write them, so the next intent line comes after them, as in the driver
        // (whose operations hold their intent until the resulting state is reached).
        tokio::time::sleep(Duration::from_millis(50)).await;
        match &result {
            Ok(_) => self.note(json!({"reply": name, "ok": true})),
            Err(e) => self.note(json!({"reply": name, "ok": false, "error": e.to_string()})),
        }
        Ok(result?)
    }

    async fn quit(&self) {
        self.note(json!({"send": "quit"}));
        let _ = self.qmp.quit().await;
    }

    /// Wait until an event named `name` was recorded after line `from`.
    async fn wait_event(&self, name: &str, from: usize, within: Duration) -> Result<usize, Error> {
        let deadline = Instant::now() + within;
        loop {
            {
                let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(i) = lines
                    .iter()
                    .enumerate()
                    .skip(from)
                    .find(|(_, l)| l["event"]["event"] == name)
                    .map(|(i, _)| i)
                {
                    return Ok(i);
                }
            }
            if Instant::now() > deadline {
                return Err(format!("{}: no {name} event within {within:?}", self.flow).into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn mark(&self) -> usize {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Wait until the guest printed its ready marker `count` times and its agent answers.
    async fn wait_ready(&mut self, count: usize) -> Result<(), Error> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let log = std::fs::read_to_string(&self.serial).unwrap_or_default();
            if log.matches("DOMKIT-GUEST-READY").count() >= count {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("{}: guest not ready", self.flow).into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let agent = match self.agent.take() {
            Some(a) => a,
            None => GuestAgent::connect(&self.agent_socket).await?,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Err(e) = agent.ping().await {
            if Instant::now() > deadline {
                return Err(format!("{}: agent does not answer: {e}", self.flow).into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.agent = Some(agent);
        Ok(())
    }

    fn agent(&self) -> Result<&GuestAgent, Error> {
        self.agent
            .as_ref()
            .ok_or_else(|| "agent not connected".into())
    }

    async fn sh(&self, script: &str) -> Result<i64, Error> {
        self.note(json!({"agent": "guest-exec", "arguments": ["/bin/sh", "-c", script]}));
        let request = GuestExecRequest {
            path: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            capture_output: true,
            ..Default::default()
        };
        Ok(self.agent()?.exec(&request).await?)
    }

    async fn boot(flow: &str, ignore_shutdown: bool) -> Result<Self, Error> {
        let mut s = Session::launch(flow, ignore_shutdown, false).await?;
        s.cmd("cont", None).await?;
        s.created("boot", false);
        s.wait_ready(1).await?;
        Ok(s)
    }

    async fn destroy(&self) {
        self.intent(Some("destroy"));
        self.quit().await;
    }

    /// Wait for the process to end, record it, and write the fixture.
    async fn finish(mut self, out: &Path) -> Result<(), Error> {
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await;
        let status = match status {
            Ok(s) => s?,
            Err(_) => {
                let _ = self.child.start_kill();
                self.child.wait().await?
            }
        };
        let end = self.qmp.closed().await;
        // The event task delivers what was read before the end.
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.note(json!({"end": end.to_string(), "exit": status.and_then(|s| s.code())}));
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut text = String::new();
        for l in &lines {
            text.push_str(&serde_json::to_string(l)?);
            text.push('\n');
        }
        let path = out.join(format!("{}.jsonl", self.flow));
        std::fs::write(&path, text)?;
        let events = lines.iter().filter(|l| l.get("event").is_some()).count();
        println!(
            "{}: {} lines, {events} events -> {}",
            self.flow,
            lines.len(),
            path.display()
        );
        Ok(())
    }
}

async fn record(flow: &str, out: &Path, save_file: &Path) -> Result<(), Error> {
    let long = Duration::from_secs(60);
    match flow {
        "boot" => {
            let s = Session::boot(flow, false).await?;
            s.destroy().await;
            s.finish(out).await
        }
        "pause_resume" => {
            let s = Session::boot(flow, false).await?;
            s.intent(Some("pause"));
            s.cmd("stop", None).await?;
            s.cmd("stop", None).await?;
            s.intent(None);
            s.intent(Some("resume"));
            s.cmd("cont", None).await?;
            s.cmd("cont", None).await?;
            s.intent(None);
            s.destroy().await;
            s.finish(out).await
        }
        "powerdown" => {
            let s = Session::boot(flow, false).await?;
            let m = s.mark();
            s.intent(Some("shutdown"));
            s.cmd("system_powerdown", None).await?;
            s.wait_event("SHUTDOWN", m, long).await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            s.quit().await; // the lifecycle's Destroy after the requested poweroff
            s.finish(out).await
        }
        "powerdown_ignored" => {
            let s = Session::boot(flow, true).await?;
            s.intent(Some("shutdown"));
            s.cmd("system_powerdown", None).await?;
            tokio::time::sleep(Duration::from_secs(3)).await;
            s.destroy().await;
            s.finish(out).await
        }
        "fake_reboot" => {
            let mut s = Session::boot(flow, false).await?;
            let m = s.mark();
            s.intent(Some("reboot"));
            s.cmd("system_powerdown", None).await?;
            s.wait_event("SHUTDOWN", m, long).await?;
            s.wait_event("STOP", m, long).await?;
            s.cmd("system_reset", None).await?; // the lifecycle's Restart
            s.cmd("cont", None).await?;
            s.intent(None);
            s.wait_ready(2).await?;
            s.destroy().await;
            s.finish(out).await
        }
        "guest_reboot" => {
            let mut s = Session::boot(flow, false).await?;
            let m = s.mark();
            s.sh("sleep 0.3; reboot -f").await?;
            s.wait_event("RESET", m, long).await?;
            s.wait_ready(2).await?;
            s.destroy().await;
            s.finish(out).await
        }
        "reset" => {
            let mut s = Session::boot(flow, false).await?;
            s.intent(Some("reset"));
            s.cmd("system_reset", None).await?;
            s.intent(None);
            s.wait_ready(2).await?;
            s.destroy().await;
            s.finish(out).await
        }
        "reset_paused" => {
            let mut s = Session::boot(flow, false).await?;
            s.intent(Some("pause"));
            s.cmd("stop", None).await?;
            s.intent(None);
            s.intent(Some("reset"));
            s.cmd("system_reset", None).await?;
            s.intent(None);
            tokio::time::sleep(Duration::from_secs(1)).await;
            s.intent(Some("resume"));
            s.cmd("cont", None).await?;
            s.intent(None);
            s.wait_ready(2).await?;
            s.destroy().await;
            s.finish(out).await
        }
        "guest_poweroff" | "guest_poweroff_restart" => {
            let mut s = Session::boot(flow, false).await?;
            let m = s.mark();
            s.sh("sleep 0.3; poweroff -f").await?;
            s.wait_event("SHUTDOWN", m, long).await?;
            s.wait_event("STOP", m, long).await?;
            if flow == "guest_poweroff_restart" {
                s.cmd("system_reset", None).await?; // on_poweroff = restart
                s.cmd("cont", None).await?;
                s.wait_ready(2).await?;
                s.destroy().await;
            } else {
                s.quit().await; // on_poweroff = destroy
            }
            s.finish(out).await
        }
        "panic" | "panic_restart" => {
            let mut s = Session::boot(flow, false).await?;
            let m = s.mark();
            s.sh("sleep 0.3; echo c > /proc/sysrq-trigger").await?;
            s.wait_event("GUEST_PANICKED", m, long).await?;
            s.wait_event("STOP", m, long).await?;
            if flow == "panic_restart" {
                s.cmd("system_reset", None).await?; // on_crash = restart
                s.cmd("cont", None).await?;
                s.wait_ready(2).await?;
                s.destroy().await;
            } else {
                tokio::time::sleep(Duration::from_millis(300)).await;
                s.quit().await; // on_crash = destroy
            }
            s.finish(out).await
        }
        "save" | "save_paused" => {
            let s = Session::boot(flow, false).await?;
            s.sh("echo saved-state > /tmp/domkit-mark").await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            if flow == "save_paused" {
                s.intent(Some("pause"));
                s.cmd("stop", None).await?;
                s.intent(None);
            }
            s.intent(Some("save"));
            s.cmd(
                "migrate-set-capabilities",
                Some(json!({"capabilities": [{"capability": "events", "state": true}]})),
            )
            .await?;
            if flow == "save" {
                s.cmd("stop", None).await?;
            }
            let file = std::fs::File::create(save_file)?;
            s.note(json!({"send": "getfd", "arguments": {"fdname": "domkit-save"}}));
            s.qmp.send_fd("domkit-save", &file).await?;
            let m = s.mark();
            s.cmd("migrate", Some(json!({"uri": "fd:domkit-save"})))
                .await?;
            wait_migration(&s, m).await?;
            // As the driver: the file is committed, and only that explains the end as saved.
            s.intent(Some("save_committed"));
            s.quit().await;
            s.finish(out).await
        }
        "restore" => {
            if !save_file.is_file() {
                return Err("restore needs the save flow to run first".into());
            }
            let mut s = Session::launch(flow, false, true).await?;
            s.cmd(
                "migrate-set-capabilities",
                Some(json!({"capabilities": [{"capability": "events", "state": true}]})),
            )
            .await?;
            let file = std::fs::File::open(save_file)?;
            s.note(json!({"send": "getfd", "arguments": {"fdname": "domkit-restore"}}));
            s.qmp.send_fd("domkit-restore", &file).await?;
            let m = s.mark();
            s.cmd(
                "migrate-incoming",
                Some(json!({"uri": "fd:domkit-restore"})),
            )
            .await?;
            wait_migration(&s, m).await?;
            s.cmd("cont", None).await?;
            s.created("restore", false);
            // The restored guest does not boot again: no ready marker, just the agent.
            s.wait_ready(0).await?;
            let pid = s.sh("cat /tmp/domkit-mark").await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let status = s.agent()?.exec_status(pid).await?;
            let out_text =
                String::from_utf8_lossy(status.out_data.as_deref().unwrap_or_default()).to_string();
            s.note(json!({"agent_output": out_text}));
            s.destroy().await;
            s.finish(out).await
        }
        "s3" => {
            let s = Session::boot(flow, false).await?;
            let m = s.mark();
            s.intent(Some("pm_suspend"));
            s.note(json!({"agent": "guest-suspend-ram"}));
            s.agent()?.suspend_ram().await?;
            s.wait_event("SUSPEND", m, long).await?;
            s.intent(None);
            tokio::time::sleep(Duration::from_secs(1)).await;
            let m = s.mark();
            s.cmd("system_wakeup", None).await?;
            s.wait_event("WAKEUP", m, long).await?;
            tokio::time::sleep(Duration::from_secs(3)).await;
            s.destroy().await;
            s.finish(out).await
        }
        "agent_shutdown" => {
            let s = Session::boot(flow, false).await?;
            let m = s.mark();
            s.intent(Some("shutdown"));
            s.note(json!({"agent": "guest-shutdown", "arguments": {"mode": "powerdown"}}));
            s.agent()?
                .shutdown(domkit_qemu::agent::ShutdownMode::Powerdown)
                .await?;
            s.wait_event("SHUTDOWN", m, long).await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            s.quit().await;
            s.finish(out).await
        }
        "sigkill" | "sigterm" => {
            let s = Session::boot(flow, false).await?;
            let signal = if flow == "sigkill" {
                nix::sys::signal::Signal::SIGKILL
            } else {
                nix::sys::signal::Signal::SIGTERM
            };
            s.note(json!({"signal": signal.as_str()}));
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(s.pid as i32), signal)?;
            s.finish(out).await
        }
        other => Err(format!("unknown flow {other}; flows: {}", ALL_FLOWS.join(" ")).into()),
    }
}

async fn wait_migration(s: &Session, from: usize) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = {
            let lines = s.lines.lock().unwrap_or_else(|p| p.into_inner());
            lines.iter().skip(from).any(|l| {
                l["event"]["event"] == "MIGRATION"
                    && matches!(
                        l["event"]["data"]["status"].as_str(),
                        Some("completed" | "failed")
                    )
            })
        };
        if done {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("migration did not finish".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let mut out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flows");
    let mut flows = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--out" {
            out = PathBuf::from(args.next().ok_or("--out needs a directory")?);
        } else {
            flows.push(arg);
        }
    }
    if flows.is_empty() {
        flows = ALL_FLOWS.iter().map(|s| s.to_string()).collect();
    }
    std::fs::create_dir_all(&out)?;
    let work = tempfile::tempdir()?;
    let save_file = work.path().join("flow.save");
    let mut failed = 0;
    for flow in &flows {
        if flow == "restore" && !save_file.is_file() {
            // restore replays the stream of a save flow run in this invocation.
            record("save", &out, &save_file).await?;
        }
        if let Err(e) = record(flow, &out, &save_file).await {
            eprintln!("{flow}: FAILED: {e}");
            failed += 1;
        }
    }
    if failed > 0 {
        return Err(format!("{failed} flow(s) failed").into());
    }
    Ok(())
}
