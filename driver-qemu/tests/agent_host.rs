//! `GuestAgent` against a real qemu-ga 7.2 running ON THE HOST (`-m unix-listen`).
//!
//! Safety: a host qemu-ga acts on the host. Every test starts it with every RPC blocked
//! except a short list of read-only queries ([`ALLOWED`]): the block list is qemu-ga's own
//! `-b ?` listing (so RPCs of a newer qemu-ga are blocked too) plus [`MUST_BLOCK`] in case
//! that listing fails. Before any test command, `guest-info` is checked: if anything outside
//! [`ALLOWED`] is enabled, qemu-ga is killed and the test fails.
//!
//! qemu-ga comes from `scripts/install-deps.sh` (package qemu-guest-agent). Tests run one at
//! a time, kill their qemu-ga, remove their 0700 temp dir and check no qemu-ga child is left.
//!
//! `record_transcripts` (ignored) re-records agent/tests/fixtures/agent-*.raw (crate domkit-agent):
//! `DOMKIT_RECORD=1 cargo test -p domkit-qemu --test agent_host -- --ignored`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use domkit_qemu::agent::{AgentError, GuestAgent, GuestAgentOptions, ShutdownMode};
use serde_json::json;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Bounds how long a broken test can hang; never used to judge speed.
const LONG: Duration = Duration::from_secs(60);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The only RPCs a host qemu-ga may run: they read state and change nothing.
const ALLOWED: &[&str] = &[
    "guest-sync-delimited",
    "guest-sync",
    "guest-ping",
    "guest-info",
    "guest-get-time",
    "guest-network-get-interfaces",
    "guest-fsfreeze-status",
    "guest-get-host-name",
    "guest-get-timezone",
    "guest-get-osinfo",
];

/// Blocked even if `qemu-ga -b ?` lists nothing: every state-changing RPC of 7.2 (and the
/// ones that read host secrets or files).
const MUST_BLOCK: &[&str] = &[
    "guest-shutdown",
    "guest-suspend-disk",
    "guest-suspend-ram",
    "guest-suspend-hybrid",
    "guest-exec",
    "guest-exec-status",
    "guest-file-open",
    "guest-file-close",
    "guest-file-read",
    "guest-file-write",
    "guest-file-seek",
    "guest-file-flush",
    "guest-set-time",
    "guest-set-user-password",
    "guest-set-vcpus",
    "guest-set-memory-blocks",
    "guest-fsfreeze-freeze",
    "guest-fsfreeze-freeze-list",
    "guest-fsfreeze-thaw",
    "guest-fstrim",
    "guest-ssh-get-authorized-keys",
    "guest-ssh-add-authorized-keys",
    "guest-ssh-remove-authorized-keys",
    "guest-get-users",
];

/// A host qemu-ga with everything but [`ALLOWED`] blocked.
struct HostAgent {
    dir: Option<TempDir>,
    child: Option<Child>,
    pid: u32,
    sock: PathBuf,
}

impl HostAgent {
    fn block_list() -> Vec<String> {
        let listed = Command::new("qemu-ga")
            .args(["-b", "?"])
            .output()
            .unwrap_or_else(|e| {
                panic!("running qemu-ga failed ({e}); install it with scripts/install-deps.sh")
            });
        let mut block: Vec<String> = String::from_utf8_lossy(&listed.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .chain(MUST_BLOCK.iter().map(|s| (*s).to_owned()))
            .filter(|rpc| !ALLOWED.contains(&rpc.as_str()))
            .collect();
        block.sort();
        block.dedup();
        block
    }

    async fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("domkit-qga-test-")
            .tempdir()
            .expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod 0700");
        let sock = dir.path().join("qga.sock");
        let block = Self::block_list().join(",");
        let child = Command::new("qemu-ga")
            .args(["-m", "unix-listen", "-p"])
            .arg(&sock)
            .arg("-t")
            .arg(dir.path())
            .arg("-f")
            .arg(dir.path().join("qemu-ga.pid"))
            .arg("-l")
            .arg(dir.path().join("qemu-ga.log"))
            .args(["-b", &block])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn qemu-ga");
        let pid = child.id();
        let agent = Self {
            dir: Some(dir),
            child: Some(child),
            pid,
            sock,
        };
        let deadline = Instant::now() + LONG;
        while !agent.sock.exists() {
            assert!(
                Instant::now() < deadline,
                "qemu-ga never created its socket"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        agent
    }

    /// Connects a client and refuses to go on if anything unsafe is enabled.
    async fn client(&mut self, options: GuestAgentOptions) -> GuestAgent {
        let agent = GuestAgent::connect_with(&self.sock, options)
            .await
            .expect("connect");
        self.check_only_allowed_enabled(&agent).await;
        agent
    }

    async fn check_only_allowed_enabled(&mut self, agent: &GuestAgent) {
        let info = agent.info().await.expect("guest-info");
        let unsafe_enabled: Vec<&str> = info
            .supported_commands
            .iter()
            .filter(|c| c.enabled && !ALLOWED.contains(&c.name.as_str()))
            .map(|c| c.name.as_str())
            .collect();
        if !unsafe_enabled.is_empty() {
            self.kill_and_reap();
            panic!("host qemu-ga had non-query RPCs enabled, killed it: {unsafe_enabled:?}");
        }
    }

    fn kill_and_reap(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn finish(mut self) {
        self.kill_and_reap();
        let dir = self.dir.take().expect("dir");
        let path = dir.path().to_path_buf();
        dir.close().expect("remove temp dir");
        assert!(!path.exists());
        assert!(!Path::new(&format!("/proc/{}", self.pid)).exists());
        assert_no_agent_children();
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

/// No qemu-ga (or QEMU) process whose parent is this test process.
fn assert_no_agent_children() {
    common::assert_no_children("qemu-ga/qemu", |comm| {
        comm == "qemu-ga" || comm.starts_with("qemu-system")
    });
}

fn options() -> GuestAgentOptions {
    GuestAgentOptions {
        command_timeout: LONG,
        sync_timeout: LONG,
        no_reply_grace: Duration::from_secs(2),
        ..GuestAgentOptions::default()
    }
}

fn assert_blocked<T: std::fmt::Debug>(result: Result<T, AgentError>, rpc: &str) {
    match result {
        Err(AgentError::Unsupported { command, reason }) => {
            assert_eq!(command, rpc);
            assert!(reason.contains("has been disabled"), "{rpc}: {reason}");
        }
        other => panic!("{rpc} must be blocked on the host, got {other:?}"),
    }
}

#[tokio::test]
async fn ping_info_time_and_interfaces() {
    let _serial = SERIAL.lock().await;
    let mut host = HostAgent::start().await;
    let agent = host.client(options()).await;
    agent.ping().await.expect("ping");
    let info = agent.info().await.expect("info");
    assert!(info.version.starts_with("7.2"), "{}", info.version);
    for rpc in [
        "guest-shutdown",
        "guest-exec",
        "guest-file-open",
        "guest-set-time",
    ] {
        let entry = info.command(rpc).expect("qemu-ga 7.2 knows it");
        assert!(!entry.enabled, "{rpc} shows enabled=false");
    }
    assert!(info.is_enabled("guest-ping"));
    let guest_ns = agent.get_time().await.expect("get-time");
    let host_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    // Same machine, same clock: equal to within a minute (a sanity check, not timing).
    assert!((i128::from(guest_ns) - host_ns as i128).abs() < 60_000_000_000);
    let ifaces = agent.network_get_interfaces().await.expect("interfaces");
    let lo = ifaces.iter().find(|i| i.name == "lo").expect("lo");
    assert!(lo.ip_addresses.iter().any(|a| a.ip_address == "127.0.0.1"));
    assert_eq!(
        agent.fsfreeze_status().await.expect("fsfreeze-status"),
        domkit_qemu::agent::FsFreezeStatus::Thawed
    );

    let n: u32 = 2000;
    let start = Instant::now();
    for _ in 0..n {
        agent.ping().await.expect("ping");
    }
    eprintln!(
        "guest-ping round trip (host qemu-ga): {:?}",
        start.elapsed() / n
    );
    drop(agent);
    host.finish();
}

#[tokio::test]
async fn blocked_commands_fail_and_shutdown_is_not_ok() {
    let _serial = SERIAL.lock().await;
    let mut host = HostAgent::start().await;
    let agent = host.client(options()).await;
    // A no-reply command that is refused answers an error within the grace period: that
    // must be Unsupported (the guest's reason), never mistaken for "no reply = accepted".
    assert_blocked(
        agent.shutdown(ShutdownMode::Powerdown).await,
        "guest-shutdown",
    );
    assert_blocked(agent.suspend_ram().await, "guest-suspend-ram");
    assert_blocked(agent.suspend_disk().await, "guest-suspend-disk");
    assert_blocked(agent.suspend_hybrid().await, "guest-suspend-hybrid");
    let exec = domkit_qemu::agent::GuestExecRequest {
        path: "/bin/true".into(),
        ..Default::default()
    };
    assert_blocked(agent.exec(&exec).await, "guest-exec");
    assert_blocked(agent.exec_status(1).await, "guest-exec-status");
    assert_blocked(agent.set_time(None).await, "guest-set-time");
    assert_blocked(agent.fsfreeze_freeze().await, "guest-fsfreeze-freeze");
    assert_blocked(agent.fsfreeze_thaw().await, "guest-fsfreeze-thaw");
    match agent.execute("guest-no-such-rpc", None).await {
        Err(AgentError::Unsupported { command, reason }) => {
            assert_eq!(command, "guest-no-such-rpc");
            assert!(reason.contains("has not been found"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    agent.ping().await.expect("still usable after errors");
    drop(agent);
    host.finish();
}

#[tokio::test]
async fn dirty_channel_is_resynced_before_the_first_command() {
    let _serial = SERIAL.lock().await;
    let mut host = HostAgent::start().await;
    let mut stream = UnixStream::connect(&host.sock).await.expect("connect");
    // A previous user left half a command and some garbage on the channel.
    stream
        .write_all(b"{\"execute\":\"guest-ping\"")
        .await
        .expect("write");
    stream.write_all(b"}garbage{\"exec").await.expect("write");
    let agent = GuestAgent::from_stream(stream, options());
    host.check_only_allowed_enabled(&agent).await;
    for _ in 0..3 {
        agent.ping().await.expect("ping after resync");
    }
    let info = agent.info().await.expect("info");
    assert!(info.version.starts_with("7.2"));
    drop(agent);
    host.finish();
}

#[tokio::test]
async fn timeout_then_resync_drops_the_late_reply() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let _serial = SERIAL.lock().await;
    let mut host = HostAgent::start().await;
    let agent = host.client(options()).await;
    let pid = Pid::from_raw(i32::try_from(host.pid).expect("pid"));
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
    let result = agent
        .execute_with_timeout("guest-get-time", None, Duration::from_millis(300))
        .await;
    kill(pid, Signal::SIGCONT).expect("SIGCONT");
    match result {
        Err(AgentError::Timeout { command, .. }) => assert_eq!(command, "guest-get-time"),
        other => panic!("{other:?}"),
    }
    // qemu-ga now answers the timed-out get-time; the resync must discard that reply so the
    // ping below gets its own ({}), not a number.
    let v = agent.execute("guest-ping", None).await.expect("ping");
    assert_eq!(v, json!({}));
    drop(agent);
    host.finish();
}

/// One connection at a time: the kernel accepts a second connection into the listen backlog,
/// but qemu-ga (like a QEMU chardev) serves it only after the first closes.
#[tokio::test]
async fn second_client_waits_until_the_first_disconnects() {
    let _serial = SERIAL.lock().await;
    let mut host = HostAgent::start().await;
    let first = host.client(options()).await;
    let second_opts = GuestAgentOptions {
        sync_timeout: Duration::from_millis(500),
        ..options()
    };
    let second = GuestAgent::connect_with(&host.sock, second_opts)
        .await
        .expect("connect succeeds (listen backlog)");
    match second.ping().await {
        Err(AgentError::Timeout { command, .. }) => assert_eq!(command, "guest-sync-delimited"),
        other => panic!("second client must not be served yet: {other:?}"),
    }
    first.ping().await.expect("first still served");
    first.disconnect().await;
    // Now qemu-ga accepts the second connection and reads what was queued (the old sync),
    // then our new sync: the resync skips the stale answer.
    let deadline = Instant::now() + LONG;
    loop {
        match second.ping().await {
            Ok(()) => break,
            Err(AgentError::Timeout { .. }) if Instant::now() < deadline => {}
            Err(e) => panic!("{e}"),
        }
    }
    host.check_only_allowed_enabled(&second).await;
    drop((first, second));
    host.finish();
}

#[tokio::test]
async fn killed_agent_gives_disconnected_then_not_connected() {
    let _serial = SERIAL.lock().await;
    let mut host = HostAgent::start().await;
    let agent = host.client(options()).await;
    agent.ping().await.expect("ping");
    host.kill_and_reap();
    match agent.ping().await {
        Err(AgentError::Disconnected) => {}
        other => panic!("{other:?}"),
    }
    // The lazy reconnect finds nobody listening.
    match agent.ping().await {
        Err(AgentError::NotConnected { reason }) => assert!(reason.contains("qga.sock")),
        other => panic!("{other:?}"),
    }
    drop(agent);
    host.finish();
}

/// The agent socket of a QEMU with no guest: the client connects to the chardev, and a
/// resync times out instead of hanging (this is how "no agent in the guest" looks).
#[tokio::test]
async fn qemu_chardev_without_guest_agent_times_out() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let qga = dir.path().join("qga.sock");
    let chardev = format!("socket,id=qga0,path={},server=on,wait=off", qga.display());
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-S",
            "-m",
            "64",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args([
            "-no-user-config",
            "-chardev",
            &chardev,
            "-device",
            "virtio-serial",
        ])
        .args([
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn qemu-system-x86_64 (scripts/install-deps.sh)");
    let deadline = Instant::now() + LONG;
    while !qga.exists() {
        assert!(
            Instant::now() < deadline,
            "QEMU never created the agent socket"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let opts = GuestAgentOptions {
        sync_timeout: Duration::from_millis(500),
        ..options()
    };
    let agent = GuestAgent::connect_with(&qga, opts).await.expect("connect");
    let result = agent.ping().await;
    let _ = qemu.kill();
    let _ = qemu.wait();
    match result {
        Err(AgentError::Timeout { command, .. }) => assert_eq!(command, "guest-sync-delimited"),
        other => panic!("{other:?}"),
    }
    // QEMU is gone: the socket reports EOF.
    assert!(matches!(
        agent.ping().await,
        Err(AgentError::Disconnected | AgentError::NotConnected { .. })
    ));
    drop(agent);
    let path = dir.path().to_path_buf();
    dir.close().expect("cleanup");
    assert!(!path.exists());
    assert_no_agent_children();
}

// ---------------------------------------------------------------------------------------
// Transcript recorder (ignored): raw bytes from the host qemu-ga for the codec unit tests.
// ---------------------------------------------------------------------------------------

/// Must match `RECORDED_SYNC_ID` in src/agent/codec.rs.
const RECORDED_SYNC_ID: u64 = 1_234_567;

struct RawAgent {
    stream: UnixStream,
}

impl RawAgent {
    /// Writes `bytes`, then reads until the received bytes end with a line that satisfies
    /// `done`.
    async fn talk(&mut self, bytes: &[u8], done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        self.stream.write_all(bytes).await.expect("write");
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + LONG;
        loop {
            if out.ends_with(b"\n") {
                let body = &out[..out.len() - 1];
                let last = body
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(body, |p| &body[p + 1..]);
                if done(last) {
                    return out;
                }
            }
            let mut buf = vec![0u8; 65536];
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut buf))
                .await
                .expect("recorder timed out")
                .expect("read");
            assert!(n > 0, "qemu-ga closed");
            out.extend_from_slice(&buf[..n]);
        }
    }

    async fn command(&mut self, line: &str) -> Vec<u8> {
        self.talk(format!("{line}\n").as_bytes(), |_| true).await
    }
}

#[tokio::test]
#[ignore = "re-records fixtures; run with DOMKIT_RECORD=1"]
async fn record_transcripts() {
    if std::env::var_os("DOMKIT_RECORD").is_none() {
        eprintln!("set DOMKIT_RECORD=1 to overwrite agent/tests/fixtures/agent-*.raw");
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut host = HostAgent::start().await;
    // The safety check goes through the client, on its own connection, closed again before
    // the raw one is made (one client at a time).
    let checker = host.client(options()).await;
    drop(checker);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/tests/fixtures");
    std::fs::create_dir_all(&dir).expect("fixtures dir");
    let save = |name: &str, bytes: &[u8]| {
        std::fs::write(dir.join(name), bytes).expect("write fixture");
        eprintln!("recorded {name} ({} bytes)", bytes.len());
    };
    let mut raw = RawAgent {
        stream: UnixStream::connect(&host.sock).await.expect("connect"),
    };

    // Dirty channel: half a command, garbage, an unread ping reply, then 0xFF + sync.
    raw.stream
        .write_all(b"{\"execute\":\"guest-ping\"}\n")
        .await
        .expect("ping");
    raw.stream
        .write_all(b"{\"execute\":\"guest-ping\"")
        .await
        .expect("half");
    raw.stream.write_all(b"}garbage}\n").await.expect("garbage");
    let mut sync = vec![0xff];
    sync.extend_from_slice(
        json!({"execute": "guest-sync-delimited", "arguments": {"id": RECORDED_SYNC_ID}})
            .to_string()
            .as_bytes(),
    );
    sync.push(b'\n');
    let mut want = vec![0xff];
    want.extend_from_slice(format!("{{\"return\": {RECORDED_SYNC_ID}}}").as_bytes());
    let dirty = raw.talk(&sync, |last| last == want.as_slice()).await;
    save("agent-dirty-resync.raw", &dirty);

    save(
        "agent-ping.raw",
        &raw.command(r#"{"execute":"guest-ping"}"#).await,
    );
    save(
        "agent-ping-id.raw",
        &raw.command(r#"{"execute":"guest-ping","id":42}"#).await,
    );
    save(
        "agent-get-time.raw",
        &raw.command(r#"{"execute":"guest-get-time"}"#).await,
    );
    save(
        "agent-info.raw",
        &raw.command(r#"{"execute":"guest-info"}"#).await,
    );
    save(
        "agent-network.raw",
        &raw.command(r#"{"execute":"guest-network-get-interfaces"}"#)
            .await,
    );
    save(
        "agent-fsfreeze-status.raw",
        &raw.command(r#"{"execute":"guest-fsfreeze-status"}"#).await,
    );
    save(
        "agent-blocked.raw",
        &raw.command(r#"{"execute":"guest-shutdown"}"#).await,
    );
    save(
        "agent-not-found.raw",
        &raw.command(r#"{"execute":"guest-no-such-rpc"}"#).await,
    );
    drop(raw);
    host.finish();
}

#[test]
fn block_list_covers_every_non_query_rpc() {
    let block = HostAgent::block_list();
    for rpc in MUST_BLOCK {
        assert!(block.iter().any(|b| b == rpc), "{rpc} not blocked");
    }
    for rpc in ALLOWED {
        assert!(!block.iter().any(|b| b == rpc), "{rpc} blocked");
    }
}
