//! `QmpClient` against a real QEMU 7.2 (`qemu-system-x86_64 -accel tcg -S`, no guest).
//!
//! QEMU comes from `scripts/install-deps.sh` (package qemu-system-x86); without it these
//! tests fail with that message rather than pass unchecked.
//!
//! Every test runs alone (one QEMU at a time: the machine is shared and has 2 cores), kills its
//! QEMU, removes its 0700 temp dir, and checks that no qemu child of this process is left.
//! No assertion depends on timing; timeouts only bound how long a broken test can hang.
//!
//! `record_transcripts` (ignored) re-records tests/fixtures/transcripts/qmp-*.raw from the
//! installed QEMU: `DOMKIT_RECORD=1 cargo test -p domkit-qemu --test qmp_client -- --ignored`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use domkit_qemu::qmp::{
    ConnectionEnd, EventRecvError, QmpClient, QmpError, QmpEvent, QmpEventKind, QmpEventStream,
    RunState,
};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// Bounds how long a broken test can hang; never used to judge speed.
const LONG: Duration = Duration::from_secs(60);

/// One test at a time (see the module doc).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const QEMU: &str = "qemu-system-x86_64";

/// A QEMU process connected to a socket this test listens on, as domkit runs it.
struct Qemu {
    dir: Option<TempDir>,
    child: Option<Child>,
    pid: u32,
}

impl Qemu {
    /// Spawns QEMU (`-S`, no guest) that connects to our listening socket, and accepts it.
    async fn spawn(extra: &[&str]) -> (Self, UnixStream) {
        let dir = tempfile::Builder::new()
            .prefix("domkit-qmp-test-")
            .tempdir()
            .expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod 0700");
        let sock = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&sock).expect("bind QMP socket");
        let chardev = format!("socket,id=qmp,path={},server=off", sock.display());
        let child = Command::new(QEMU)
            .args(["-accel", "tcg", "-S", "-m", "64", "-nodefaults"])
            .args(["-display", "none", "-no-user-config"])
            .args(["-chardev", &chardev, "-mon", "chardev=qmp,mode=control"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("spawning {QEMU} failed ({e}); install it with scripts/install-deps.sh")
            });
        let pid = child.id();
        let mut qemu = Self {
            dir: Some(dir),
            child: Some(child),
            pid,
        };
        let stream = match tokio::time::timeout(LONG, listener.accept()).await {
            Ok(Ok((stream, _))) => stream,
            other => {
                let status = qemu.kill_and_reap();
                panic!("QEMU did not connect: {other:?}, exit {status:?}");
            }
        };
        (qemu, stream)
    }

    /// Spawns QEMU and performs the QMP handshake.
    async fn start(extra: &[&str]) -> (Self, QmpClient) {
        let (qemu, stream) = Self::spawn(extra).await;
        let client = tokio::time::timeout(LONG, QmpClient::handshake(stream))
            .await
            .expect("handshake in time")
            .expect("handshake");
        (qemu, client)
    }

    fn path(&self) -> &Path {
        self.dir
            .as_ref()
            .map(TempDir::path)
            .expect("dir until finish")
    }

    fn kill_and_reap(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = child.kill();
        child.wait().ok()
    }

    /// Waits (bounded) for QEMU to exit by itself and returns its status.
    async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + LONG;
        loop {
            let child = self.child.as_mut().expect("child");
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "QEMU did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills QEMU, removes the temp dir, and checks nothing is left behind.
    fn finish(mut self) {
        self.kill_and_reap();
        let dir = self.dir.take().expect("dir");
        let path = dir.path().to_path_buf();
        dir.close().expect("remove temp dir");
        assert!(!path.exists(), "temp dir left: {}", path.display());
        assert!(
            !Path::new(&format!("/proc/{}", self.pid)).exists(),
            "qemu {} still exists",
            self.pid
        );
        assert_no_qemu_children();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        // Also runs when a test panics: never leave a QEMU behind.
        self.kill_and_reap();
    }
}

/// No `qemu-system-*` process whose parent is this test process.
fn assert_no_qemu_children() {
    common::assert_no_children("qemu", |comm| comm.starts_with("qemu-system"));
}

/// Receives events until one satisfies `pred` (bounded by [`LONG`]).
async fn wait_event(
    events: &mut QmpEventStream,
    what: &str,
    pred: impl Fn(&QmpEvent) -> bool,
) -> QmpEvent {
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(ev)) if pred(&ev) => return ev,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("waiting for {what}: {e}"),
            Err(_) => panic!("no {what} event"),
        }
    }
}

#[tokio::test]
async fn handshake_and_query_status() {
    let _serial = SERIAL.lock().await;
    let (qemu, client) = Qemu::start(&[]).await;
    let g = client.greeting();
    assert_eq!((g.version.qemu.major, g.version.qemu.minor), (7, 2));
    let status = client.query_status().await.expect("query-status");
    assert_eq!(status.status, RunState::Prelaunch);
    assert!(!status.running);
    let version = client.query_version().await.expect("query-version");
    assert_eq!(version.qemu, g.version.qemu);

    // Round-trip figure for the report only (printed with --nocapture, never asserted).
    let n = 500;
    let start = Instant::now();
    for _ in 0..n {
        client.query_status().await.expect("query-status");
    }
    let per = start.elapsed() / n;
    eprintln!("query-status round trip (sequential, {n} calls): {per:?}");
    drop(client);
    qemu.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commands_from_many_tasks_are_routed_by_id() {
    let _serial = SERIAL.lock().await;
    let (qemu, client) = Qemu::start(&[]).await;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..8 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..200 {
                // query-status replies are identical, so routing is also proven with
                // commands whose error text names them: a mixed-up reply would mismatch.
                let probe = format!("domkit-probe-{task}-{i}");
                let (status, probed) =
                    tokio::join!(client.query_status(), client.execute(&probe, None));
                let status = status.expect("query-status");
                assert_eq!(status.status, RunState::Prelaunch);
                match probed {
                    Err(QmpError::CommandFailed { class, desc }) => {
                        assert_eq!(class, "CommandNotFound");
                        assert_eq!(desc, format!("The command {probe} has not been found"));
                    }
                    other => panic!("{probe}: {other:?}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    eprintln!(
        "8 tasks x 200 x (query-status + probe) = 3200 commands in {:?}",
        start.elapsed()
    );
    drop(client);
    qemu.finish();
}

#[tokio::test]
async fn stop_and_cont_events_reach_two_subscribers() {
    let _serial = SERIAL.lock().await;
    let (qemu, client) = Qemu::start(&[]).await;
    let mut a = client.subscribe();
    let mut b = client.subscribe();
    client.cont().await.expect("cont");
    client.stop().await.expect("stop");
    for events in [&mut a, &mut b] {
        let resume = wait_event(events, "RESUME", |e| e.name == "RESUME").await;
        assert_eq!(resume.kind, QmpEventKind::Resume);
        let stop = wait_event(events, "STOP", |e| e.name == "STOP").await;
        assert_eq!(stop.kind, QmpEventKind::Stop);
        assert!(stop.timestamp.to_system_time().is_some());
        assert!(stop.received_at >= resume.received_at);
    }
    let status = client.query_status().await.expect("status");
    assert_eq!(status.status, RunState::Paused);
    drop(client);
    qemu.finish();
}

#[tokio::test]
async fn unknown_command_is_command_failed() {
    let _serial = SERIAL.lock().await;
    let (qemu, client) = Qemu::start(&[]).await;
    match client.execute("no-such-command", None).await {
        Err(QmpError::CommandFailed { class, desc }) => {
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("no-such-command"), "{desc}");
        }
        other => panic!("{other:?}"),
    }
    match client
        .execute("migrate", Some(json!({"uri": "file:/nonexistent"})))
        .await
    {
        Err(QmpError::CommandFailed { class, .. }) => assert_eq!(class, "GenericError"),
        other => panic!("file: migration is not in 7.2: {other:?}"),
    }
    // The connection is still fine after errors.
    client.query_status().await.expect("still usable");
    drop(client);
    qemu.finish();
}

#[tokio::test]
async fn quit_is_ok_and_eof_is_seen() {
    let _serial = SERIAL.lock().await;
    let (mut qemu, client) = Qemu::start(&[]).await;
    let mut events = client.subscribe();
    client
        .quit()
        .await
        .expect("quit is Ok whether the reply or EOF comes first");
    let end = tokio::time::timeout(LONG, client.closed())
        .await
        .expect("closed resolves");
    assert!(end.is_peer_close(), "{end:?}");
    let shutdown = wait_event(&mut events, "SHUTDOWN", |e| e.name == "SHUTDOWN").await;
    match shutdown.kind {
        QmpEventKind::Shutdown(s) => {
            assert!(!s.guest);
            assert_eq!(s.reason.as_str(), "host-qmp-quit");
        }
        other => panic!("{other:?}"),
    }
    // After the last event, subscribers learn the connection is over.
    assert_eq!(
        tokio::time::timeout(LONG, events.recv())
            .await
            .expect("in time")
            .unwrap_err(),
        EventRecvError::Closed
    );
    assert!(qemu.wait_exit().await.success());
    assert!(matches!(
        client.query_status().await,
        Err(QmpError::Disconnected)
    ));
    drop(client);
    qemu.finish();
}

#[tokio::test]
async fn sigkill_mid_command_fails_it_with_disconnected() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let _serial = SERIAL.lock().await;
    let (mut qemu, client) = Qemu::start(&[]).await;
    let pid = Pid::from_raw(i32::try_from(qemu.pid).expect("pid fits"));
    // SIGSTOP first so the command is certainly in flight (unanswered) when SIGKILL lands.
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
    let pending = tokio::spawn({
        let c = client.clone();
        async move { c.execute_with_timeout("query-status", None, LONG).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !pending.is_finished(),
        "a stopped QEMU cannot have answered"
    );
    let killed_at = Instant::now();
    kill(pid, Signal::SIGKILL).expect("SIGKILL");
    let result = pending.await.expect("join");
    let failed_after = killed_at.elapsed();
    // Disconnected (not Timeout) proves it failed on EOF, long before the 60 s timeout.
    assert!(matches!(result, Err(QmpError::Disconnected)), "{result:?}");
    let end = client.closed().await;
    assert!(end.is_peer_close(), "{end:?}");
    eprintln!("pending command failed {failed_after:?} after SIGKILL ({end})");
    assert!(!qemu.wait_exit().await.success());
    drop(client);
    qemu.finish();
}

#[tokio::test]
async fn garbage_after_greeting_is_a_protocol_error() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let sock = dir.path().join("peer.sock");
    let listener = UnixListener::bind(&sock).expect("bind");
    // A scripted peer (test double, not QEMU): the real greeting, a correct reply to
    // qmp_capabilities, then garbage while a command is pending.
    let peer = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        s.write_all(&transcript("qmp-greeting.raw"))
            .await
            .expect("greeting");
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.expect("capabilities");
        let cmd: Value = serde_json::from_slice(&buf[..n]).expect("json");
        let reply = format!("{{\"return\": {{}}, \"id\": {}}}\r\n", cmd["id"]);
        s.write_all(reply.as_bytes()).await.expect("reply");
        let _ = s.read(&mut buf).await.expect("next command");
        s.write_all(b"\x16\x03\x01 not QMP at all \xff\xfe\r\n")
            .await
            .expect("garbage");
        // The client must close its side; read to EOF (bounded by the test timeout).
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    });
    let stream = UnixStream::connect(&sock).await.expect("connect");
    let client = QmpClient::handshake(stream).await.expect("handshake");
    let result = tokio::time::timeout(LONG, client.query_status())
        .await
        .expect("no hang");
    match result {
        Err(QmpError::Protocol { message, excerpt }) => {
            assert!(message.contains("invalid JSON"), "{message}");
            assert!(excerpt.contains("not QMP"), "{excerpt}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        client.connection_end(),
        Some(ConnectionEnd::Protocol { .. })
    ));
    tokio::time::timeout(LONG, peer)
        .await
        .expect("client closed the socket")
        .expect("peer");
    dir.close().expect("cleanup");
}

#[tokio::test]
async fn send_fd_and_migrate_to_fd_saves_the_vm() {
    let _serial = SERIAL.lock().await;
    let (qemu, client) = Qemu::start(&[]).await;
    let mut events = client.subscribe();
    client
        .migrate_set_capabilities(&[("events", true)])
        .await
        .expect("events capability");
    client.stop().await.expect("stop");
    let image = qemu.path().join("vm.state");
    let file = std::fs::File::create(&image).expect("state file");
    client.send_fd("domkit-save", &file).await.expect("getfd");
    drop(file); // QEMU holds its own copy now.
    client.migrate("fd:domkit-save").await.expect("migrate");
    let done = wait_event(&mut events, "MIGRATION completed/failed", |e| {
        matches!(&e.kind, QmpEventKind::Migration(m)
            if matches!(m.status.as_str(), "completed" | "failed"))
    })
    .await;
    assert_eq!(done.data, json!({"status": "completed"}));
    let info = client.query_migrate().await.expect("query-migrate");
    assert_eq!(
        info.status.map(|s| s.to_string()).as_deref(),
        Some("completed")
    );
    // QEMU announces `completed` from the migration thread before the main loop leaves
    // finish-migrate: wait (bounded) for the run state to follow.
    let mut status = client.query_status().await.expect("status");
    for _ in 0..100 {
        if status.status != RunState::FinishMigrate {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        status = client.query_status().await.expect("status");
    }
    assert_eq!(status.status, RunState::PostMigrate);
    let size = std::fs::metadata(&image).expect("stat").len();
    eprintln!("saved -m 64 VM to fd: {size} bytes");
    assert!(size > 0);
    // The name was consumed by migrate: closefd now fails.
    assert!(matches!(
        client.closefd("domkit-save").await,
        Err(QmpError::CommandFailed { .. })
    ));
    drop(client);
    qemu.finish();
}

#[tokio::test]
async fn qemu_death_is_seen_through_closed() {
    let _serial = SERIAL.lock().await;
    let (mut qemu, client) = Qemu::start(&[]).await;
    assert_eq!(client.connection_end(), None);
    let killed_at = Instant::now();
    qemu.kill_and_reap();
    let end = tokio::time::timeout(LONG, client.closed())
        .await
        .expect("closed");
    eprintln!(
        "closed() resolved {:?} after SIGKILL: {end}",
        killed_at.elapsed()
    );
    assert!(end.is_peer_close(), "{end:?}");
    drop(client);
    qemu.finish();
}

// ---------------------------------------------------------------------------------------
// Transcript recorder (ignored): raw bytes from the installed QEMU for the codec unit tests.
// ---------------------------------------------------------------------------------------

fn transcripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/transcripts")
}

fn transcript(name: &str) -> Vec<u8> {
    let path = transcripts_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A byte-exact QMP conversation (no client library in between).
struct RawQmp {
    stream: UnixStream,
    /// Bytes read but not yet handed out.
    pending: Vec<u8>,
}

impl RawQmp {
    async fn send(&mut self, cmd: Value) {
        let mut bytes = serde_json::to_vec(&cmd).expect("json");
        bytes.push(b'\n');
        self.stream.write_all(&bytes).await.expect("send");
    }

    /// Reads whole lines until `done` accepts one; returns every byte of those lines.
    async fn read_until(&mut self, mut done: impl FnMut(&Value) -> bool) -> Vec<u8> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + LONG;
        loop {
            while let Some(pos) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=pos).collect();
                out.extend_from_slice(&line);
                let v: Value = serde_json::from_slice(&line).expect("QEMU sends JSON");
                if done(&v) {
                    return out;
                }
            }
            let mut buf = vec![0u8; 65536];
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut buf))
                .await
                .expect("recorder timed out")
                .unwrap_or(0); // a reset after quit ends the transcript like EOF
            if n == 0 {
                out.extend_from_slice(&self.pending);
                return out;
            }
            self.pending.extend_from_slice(&buf[..n]);
        }
    }

    /// Sends a command with `id` and reads through its reply.
    async fn exec(&mut self, id: u64, name: &str, args: Option<Value>) -> Vec<u8> {
        self.exec_until(id, name, args, |_| true).await
    }

    /// Sends a command with `id` and reads until both its reply and a line accepted by
    /// `event` were seen (QEMU sends some events before the reply, some after).
    async fn exec_until(
        &mut self,
        id: u64,
        name: &str,
        args: Option<Value>,
        event: impl Fn(&Value) -> bool,
    ) -> Vec<u8> {
        let mut cmd = json!({"execute": name, "id": id});
        if let Some(args) = args {
            cmd["arguments"] = args;
        }
        self.send(cmd).await;
        let (mut replied, mut seen) = (false, false);
        self.read_until(|v| {
            replied |= v.get("id") == Some(&json!(id));
            seen |= event(v);
            replied && seen
        })
        .await
    }

    async fn hmp(&mut self, id: u64, line: &str) -> Vec<u8> {
        self.exec(
            id,
            "human-monitor-command",
            Some(json!({"command-line": line})),
        )
        .await
    }
}

async fn raw_session(extra: &[&str]) -> (Qemu, RawQmp, Vec<u8>) {
    let (qemu, stream) = Qemu::spawn(extra).await;
    let mut raw = RawQmp {
        stream,
        pending: Vec::new(),
    };
    let greeting = raw.read_until(|v| v.get("QMP").is_some()).await;
    let caps = raw.exec(1, "qmp_capabilities", None).await;
    (qemu, raw, [greeting, caps].concat())
}

fn is_event(v: &Value, name: &str) -> bool {
    v.get("event") == Some(&json!(name))
}

#[tokio::test]
#[ignore = "re-records fixtures; run with DOMKIT_RECORD=1"]
async fn record_transcripts() {
    if std::env::var_os("DOMKIT_RECORD").is_none() {
        eprintln!("set DOMKIT_RECORD=1 to overwrite tests/fixtures/transcripts/qmp-*.raw");
        return;
    }
    let _serial = SERIAL.lock().await;
    let dir = transcripts_dir();
    std::fs::create_dir_all(&dir).expect("fixtures dir");
    let save = |name: &str, bytes: &[u8]| {
        std::fs::write(dir.join(name), bytes).expect("write fixture");
        eprintln!("recorded {name} ({} bytes)", bytes.len());
    };

    // Greeting, returns, error, stop/cont, reset, powerdown, unknown event, quit.
    let (qemu, mut q, start) = raw_session(&[]).await;
    let greeting_len = start.iter().position(|&b| b == b'\n').expect("line") + 1;
    let greeting = &start[..greeting_len];
    save("qmp-greeting.raw", greeting);
    let status = q.exec(2, "query-status", None).await;
    let returns = [
        &start[greeting_len..],
        &status,
        &q.exec(3, "query-version", None).await,
    ]
    .concat();
    save("qmp-returns.raw", &returns);
    save("qmp-error.raw", &q.exec(7, "no-such-command", None).await);
    let stop_cont = [
        q.exec(10, "cont", None).await,
        q.exec(11, "stop", None).await,
    ]
    .concat();
    save("qmp-stop-cont.raw", &stop_cont);
    // SeaBIOS answers a reset with a reset of its own (RESET{guest:true}) only once it
    // has completed POST: let it run first.
    q.exec(12, "cont", None).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    q.exec(13, "stop", None).await;
    let mut reset = q.exec(20, "system_reset", None).await;
    reset.extend(
        q.exec_until(21, "cont", None, |v| {
            is_event(v, "RESET") && v["data"]["guest"] == json!(true)
        })
        .await,
    );
    save("qmp-reset.raw", &reset);
    // Paused, so firmware activity cannot add events to the following transcripts.
    q.exec(22, "stop", None).await;
    save(
        "qmp-powerdown.raw",
        &q.exec(30, "system_powerdown", None).await,
    );
    let job = json!({"job-id": "j1", "options": {
        "driver": "file", "filename": qemu.path().join("job.img"), "size": 1048576}});
    let unknown = q
        .exec_until(40, "blockdev-create", Some(job), |v| {
            is_event(v, "JOB_STATUS_CHANGE") && v["data"]["status"] == "concluded"
        })
        .await;
    save("qmp-unknown-event.raw", &unknown);
    q.exec(41, "job-dismiss", Some(json!({"id": "j1"}))).await;
    q.send(json!({"execute": "quit", "id": 50})).await;
    save("qmp-quit.raw", &q.read_until(|_| false).await); // to EOF/reset
    qemu.finish();

    // Malformed (derived from real bytes): a query-status reply cut in the middle, then
    // binary garbage.
    let malformed = [
        greeting,
        &status[..status.len() / 2],
        b"\r\n\x00\xffnot json\r\n".as_slice(),
    ]
    .concat();
    save("qmp-malformed.raw", &malformed);

    // Migration events (save to a pipe; fd: gives the same events, see the fd test).
    let (qemu, mut q, _) = raw_session(&[]).await;
    let caps = json!({"capabilities": [{"capability": "events", "state": true}]});
    q.exec(2, "migrate-set-capabilities", Some(caps)).await;
    q.exec(3, "stop", None).await;
    let uri = format!("exec:cat > {}", qemu.path().join("state").display());
    let mig = q
        .exec_until(4, "migrate", Some(json!({ "uri": uri })), |v| {
            is_event(v, "MIGRATION") && v["data"]["status"] == "completed"
        })
        .await;
    save("qmp-migrate.raw", &mig);
    qemu.finish();

    // GUEST_PANICKED: pvpanic's I/O port written through HMP (no guest needed).
    let (qemu, mut q, _) = raw_session(&["-device", "pvpanic", "-action", "panic=pause"]).await;
    save("qmp-guest-panicked.raw", &q.hmp(2, "o /b 0x505 1").await);
    qemu.finish();

    // SUSPEND/WAKEUP: once SeaBIOS has enabled the ACPI PM block at 0x600, writing
    // SLP_TYP=1|SLP_EN to PM1a_CNT (0x604) is an S3 request.
    let (qemu, mut q, _) = raw_session(&[]).await;
    q.exec(2, "cont", None).await;
    let mut id = 10;
    let mut s3 = loop {
        id += 1;
        let out = q.hmp(id, "o /w 0x604 0x2400").await;
        if String::from_utf8_lossy(&out).contains("\"SUSPEND\"") {
            break out;
        }
        assert!(id < 100, "firmware never enabled ACPI PM");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    s3.extend(
        q.exec_until(200, "system_wakeup", None, |v| is_event(v, "WAKEUP"))
            .await,
    );
    save("qmp-suspend-wakeup.raw", &s3);
    qemu.finish();
}
