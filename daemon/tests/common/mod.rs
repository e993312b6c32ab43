//! Shared by the domkitd tests: a real `domkitd` process on private directories and its
//! real socket, the `domkit` CLI binary, the test guest's config, and waiting for the guest.

#![allow(dead_code)]

use domkitd::client::{self, Client, Target};
use domkitd::pb;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A domkitd process of a test.
pub struct Daemon {
    pub child: Child,
    pub dirs: std::sync::Arc<Dirs>,
    pub socket: PathBuf,
    pub log: PathBuf,
}

/// The private directories of one daemon (kept across its restarts).
pub struct Dirs {
    pub root: tempfile::TempDir,
}

impl Dirs {
    pub fn new() -> Dirs {
        // Short paths: QEMU's sockets under the runtime root must fit sun_path.
        let root = tempfile::Builder::new()
            .prefix("dkd")
            .tempdir_in("/tmp")
            .expect("tempdir");
        Dirs { root }
    }

    pub fn state(&self) -> PathBuf {
        self.root.path().join("s")
    }

    pub fn runtime(&self) -> PathBuf {
        self.root.path().join("r")
    }

    pub fn socket(&self) -> PathBuf {
        self.runtime().join("domkitd.sock")
    }

    /// The serial log of domain `name` (the QEMU driver's runtime directory).
    pub fn serial_log(&self, name: &str) -> PathBuf {
        self.runtime().join("qemu").join(name).join("serial.log")
    }
}

/// The domkitd binary: cargo's, or `$DOMKIT_DOMKITD_BIN` (inside the nested Xen dom0, where
/// the tests run from a payload, not from the build tree).
impl Drop for Dirs {
    /// Domains outlive domkitd by design (durable domains): when a test ends, passed or
    /// panicked, the QEMU processes it started (their sockets live in these directories)
    /// are killed, so a failed test leaks no VM.
    fn drop(&mut self) {
        let root = self.root.path().to_string_lossy().into_owned();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            if pid as u32 != std::process::id() && String::from_utf8_lossy(&cmdline).contains(&root)
            {
                // SAFETY: kill(2) with a valid signal on a pid read from /proc; at worst the
                // process is gone already (ESRCH).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

pub fn domkitd_bin() -> PathBuf {
    std::env::var_os("DOMKIT_DOMKITD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_domkitd")))
}

/// The `domkit` CLI binary (package domkit-examples), built beside domkitd by
/// `cargo test --workspace` (examples/tests makes cargo build it), or `$DOMKIT_CLI_BIN`.
pub fn domkit_bin() -> PathBuf {
    let path = std::env::var_os("DOMKIT_CLI_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| domkitd_bin().with_file_name("domkit"));
    assert!(
        path.is_file(),
        "{} is missing: build it first (cargo build -p domkit-examples --bin domkit), or run \
         cargo test --workspace",
        path.display()
    );
    path
}

impl Daemon {
    /// Start domkitd on `dirs` with `extra` arguments; waits until it answers.
    pub fn start(dirs: Dirs, extra: &[&str]) -> Daemon {
        Self::start_shared(std::sync::Arc::new(dirs), extra)
    }

    fn start_shared(dirs: std::sync::Arc<Dirs>, extra: &[&str]) -> Daemon {
        let socket = dirs.socket();
        let log = dirs.root.path().join(format!(
            "domkitd-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let child = Self::spawn(&dirs, extra, &log);
        let mut daemon = Daemon {
            child,
            dirs,
            socket,
            log,
        };
        daemon.wait_ready();
        daemon
    }

    fn spawn(dirs: &Dirs, extra: &[&str], log: &Path) -> Child {
        let logfile = std::fs::File::create(log).expect("log file");
        Command::new(domkitd_bin())
            .arg("--foreground")
            .arg("--state-dir")
            .arg(dirs.state())
            .arg("--runtime-dir")
            .arg(dirs.runtime())
            .arg("--listen")
            .arg(format!("unix:{}", dirs.socket().display()))
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logfile)
            .spawn()
            .expect("spawn domkitd")
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "domkitd exited ({status}) before answering:\n{}",
                    self.log_text()
                );
            }
            if self.log_text().contains("domkitd ready")
                && std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("domkitd did not get ready in 60 s:\n{}", self.log_text());
    }

    pub async fn client(&self) -> Client {
        client::connect(&Target::Unix(self.socket.clone()))
            .await
            .expect("connect to domkitd")
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid with a valid signal number.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(Instant::now() < deadline, "domkitd ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Start a new daemon process on the same directories (after a kill or a stop).
    pub fn restart(mut self, extra: &[&str]) -> Daemon {
        self.kill();
        Daemon::start_shared(self.dirs.clone(), extra)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test guest directory.
pub fn guest_dir() -> PathBuf {
    std::env::var_os("DOMKIT_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/domkit/guest")
        })
}

/// The TOML config of the repo's test guest (as conformance/src/qemu.rs
/// `test_guest_config`: direct kernel boot, TCG, pvpanic, the guest agent).
pub fn guest_toml(name: &str) -> String {
    let dir = guest_dir();
    for f in ["vmlinuz", "initrd.img"] {
        assert!(
            dir.join(f).is_file(),
            "test guest missing: {} (run scripts/build-test-guest.sh or set DOMKIT_GUEST_DIR)",
            dir.join(f).display()
        );
    }
    format!(
        r#"name = "{name}"
memory_mib = 128
on_crash = "preserve"

[boot]
from = "kernel"
kernel = "{}"
initrd = "{}"
cmdline = "console=ttyS0 quiet no_timer_check"

[qemu]
accel = "tcg"
pvpanic = true

[[channels]]
kind = "guest_agent"
"#,
        dir.join("vmlinuz").display(),
        dir.join("initrd.img").display()
    )
}

/// How many times the guest printed its ready line on its serial console so far.
pub fn ready_count(serial_log: &Path) -> usize {
    std::fs::read_to_string(serial_log)
        .unwrap_or_default()
        .matches("DOMKIT-GUEST-READY")
        .count()
}

/// Wait until the guest printed its ready line `count` times on its serial console (its
/// ACPI handler and agent run: a graceful shutdown is heard).
pub async fn wait_guest_ready(serial_log: &Path, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let text = std::fs::read_to_string(serial_log).unwrap_or_default();
        if text.matches("DOMKIT-GUEST-READY").count() >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the guest did not get ready in 180 s; serial log {}:\n{text}",
            serial_log.display()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub fn by_name(name: &str) -> pb::DomainRef {
    client::domain_ref(name)
}

/// The state of `name` as the daemon says (`running (booted)`).
pub async fn state_of(client: &mut Client, name: &str) -> String {
    let info = client.info(by_name(name)).await.expect("info").into_inner();
    domkitd::convert::state_text(info.state.as_ref())
}

/// Poll until `name`'s state text is `want`.
pub async fn wait_state(client: &mut Client, name: &str, want: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let now = state_of(client, name).await;
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} is {now}, not {want}, after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Run the `domkit` CLI against `socket`; (exit code, stdout, stderr).
pub fn cli(socket: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(domkit_bin())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run domkit");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// As [`cli`], asserting success; its stdout.
pub fn cli_ok(socket: &Path, args: &[&str]) -> String {
    let (code, out, err) = cli(socket, args);
    assert_eq!(code, 0, "domkit {args:?} failed ({code}): {err}{out}");
    out
}

/// Run the `domkit` CLI against `socket` with its stderr on a pseudo-terminal (as in an
/// interactive shell) and stdout a pipe; (exit code, stdout, what the terminal showed).
pub fn cli_tty_stderr(socket: &Path, args: &[&str]) -> (i32, String, String) {
    use std::io::Read;
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let mut master = std::fs::File::from(pty.master);
    let child = Command::new(domkit_bin())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(pty.slave))
        .spawn()
        .expect("run domkit");
    // The terminal is read while the command runs (a full pty would block it); the read
    // ends with EIO once the child, the slave's last holder, exits.
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    let out = child.wait_with_output().expect("wait for domkit");
    let tty = reader.join().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        tty,
    )
}

/// `domkit console`: what is typed reaches the guest's shell on its serial console, what it
/// prints comes back, Ctrl-] leaves.
pub fn console_runs_a_command(sock: &Path, name: &str) {
    use std::io::{Read, Write};
    let mut child = Command::new(domkit_bin())
        .arg("--socket")
        .arg(sock)
        .args(["console", name])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("domkit console");
    let mut stdout = child.stdout.take().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let mut stdin = child.stdin.take().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    // The shell may still be starting: type the command until its output shows.
    loop {
        stdin.write_all(b"echo dk-$((6*7))\n").unwrap();
        stdin.flush().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let text = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
        if text.contains("dk-42") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the console never showed the command's output: {text:?}"
        );
    }
    stdin.write_all(&[0x1d]).unwrap();
    stdin.flush().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "Ctrl-] leaves the console: {status}");
    drop(stdin);
    let _ = reader.join();
}

/// A `domkit event DOMAIN --loop --json` process writing to files.
pub struct Follower {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Follower {
    pub fn spawn(socket: &Path, domain: &str, dir: &Path) -> Follower {
        let out = dir.join("follower.out");
        let err = dir.join("follower.err");
        let child = Command::new(domkit_bin())
            .arg("--socket")
            .arg(socket)
            .args(["event", domain, "--loop", "--json"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("spawn domkit event --loop");
        Follower { child, out, err }
    }

    /// [`Follower::spawn`] against `daemon`, returning once its live stream is open (each
    /// `domkit event` opens one, earlier replays included: the follower's is the next one),
    /// at most `within`.
    pub fn subscribed(daemon: &Daemon, domain: &str, within: Duration) -> Follower {
        let opened = daemon.log_text().matches("event stream opened").count();
        let follower = Follower::spawn(&daemon.socket, domain, daemon.dirs.root.path());
        let deadline = Instant::now() + within;
        while daemon.log_text().matches("event stream opened").count() <= opened {
            assert!(Instant::now() < deadline, "the follower never subscribed");
            std::thread::sleep(Duration::from_millis(50));
        }
        follower
    }

    pub fn entries(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Wait until the last printed entry accounts for `seq`.
    pub fn wait_seq(&mut self, seq: u64, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(last) = self.entries().iter().filter_map(last_position).max() {
                if last >= seq {
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "domkit event --loop exited ({status}) {what}:\n{}",
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the follower never got to seq {seq} {what}: {:?}\nstderr: {}",
                self.entries(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `seq` an entry of a per-domain stream accounts for.
pub fn last_position(v: &serde_json::Value) -> Option<u64> {
    match v.get("gap") {
        Some(gap) => gap["last_missing"].as_u64(),
        None => v["seq"].as_u64(),
    }
}

/// Check that `entries` account for seqs `first..=last` each exactly once, in order;
/// return the event kinds (without the guest agent's: §13.4, its timing depends on the
/// guest) and the gap ranges.
pub fn account(
    entries: &[serde_json::Value],
    first: u64,
    last: u64,
) -> (Vec<String>, Vec<(u64, u64)>) {
    let (mut kinds, mut gaps) = (Vec::new(), Vec::new());
    let mut next = first;
    for e in entries {
        match e.get("gap") {
            Some(gap) => {
                let (a, b) = (
                    gap["first_missing"].as_u64().unwrap(),
                    gap["last_missing"].as_u64().unwrap(),
                );
                assert_eq!(a, next, "a gap starts where the events stop: {entries:?}");
                gaps.push((a, b));
                next = b + 1;
            }
            None => {
                assert_eq!(
                    e["seq"].as_u64().unwrap(),
                    next,
                    "every seq once, in order: {entries:?}"
                );
                let event = e["event"].as_str().unwrap_or("?");
                if !event.starts_with("agent_") {
                    kinds.push(format!("{event}({})", e["detail"].as_str().unwrap_or("")));
                }
                next += 1;
            }
        }
    }
    assert_eq!(
        next,
        last + 1,
        "everything up to seq {last} is there: {entries:?}"
    );
    (kinds, gaps)
}

/// The event kinds (`kind(detail)`) of `domkit event ... --json` output, without the guest
/// agent's.
pub fn event_kinds(json_lines: &str) -> Vec<String> {
    json_lines
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            let event = v.get("event")?.as_str()?.to_string();
            // The guest agent coming and going (§13.4) is not a lifecycle step: its timing
            // relative to the others depends on the guest.
            if event.starts_with("agent_") {
                return None;
            }
            Some(match v.get("detail").and_then(|d| d.as_str()) {
                Some(d) => format!("{event}({d})"),
                None => event,
            })
        })
        .collect()
}

/// The event the end state text of a cut save or shutdown is reported by.
pub fn end_event(end: &str) -> &'static str {
    match end {
        "running (save_canceled)" => "resumed(save_canceled)",
        "shutoff (saved)" => "stopped(saved)",
        _ => "stopped(shutdown)",
    }
}
