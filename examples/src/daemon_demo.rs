//! `domkit demo` as users run domkit: a private `domkitd` (its own state and runtime
//! directories and socket, in a 0700 temporary directory) is started, the test guest's
//! whole lifecycle is driven through its gRPC API (define, start, pause, resume, save,
//! restore, reboot, graceful shutdown, undefine) while its event stream is printed, and
//! the daemon is stopped again with SIGTERM (exit 0, its socket removed). Nothing is left
//! behind: on a failed step or Ctrl-C the domain is destroyed and undefined first.

use anyhow::{bail, Context as _};
use domkit_conformance::GuestOptions;
use domkitd::client::{self, Client, Target};
use domkitd::pb;
use futures::StreamExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A `domkitd --foreground` on private directories, stopped (SIGTERM) when dropped.
pub struct PrivateDaemon {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
    log: PathBuf,
}

/// The `domkitd` binary: `$DOMKITD`, else the one beside this executable (a cargo build
/// puts them side by side), else the first on `$PATH`.
pub fn domkitd_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("DOMKITD") {
        return Ok(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        let beside = exe.with_file_name("domkitd");
        if beside.is_file() {
            return Ok(beside);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("domkitd");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!(
        "domkitd not found (beside this domkit, on $PATH, or $DOMKITD)\nhint: build it with \
         `cargo build -p domkitd --bin domkitd` (scripts/demo.sh does)"
    )
}

impl PrivateDaemon {
    /// Start `domkitd --foreground --state-dir D/s --runtime-dir D/r --listen unix:D/r/domkitd.sock`
    /// on a new private directory D; returns once it answers.
    pub fn start() -> anyhow::Result<PrivateDaemon> {
        let binary = domkitd_binary()?;
        // Short: QEMU's sockets under the runtime directory must fit sun_path. 0700.
        let dir = tempfile::Builder::new()
            .prefix("dkdemo")
            .tempdir_in("/tmp")
            .context("creating the demo's private directory")?;
        let socket = dir.path().join("r").join("domkitd.sock");
        let log = dir.path().join("domkitd.log");
        let logfile = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&log)
            .context("creating domkitd's log file")?;
        let child = Command::new(&binary)
            .arg("--foreground")
            .arg("--state-dir")
            .arg(dir.path().join("s"))
            .arg("--runtime-dir")
            .arg(dir.path().join("r"))
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logfile)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut daemon = PrivateDaemon {
            child,
            dir,
            socket,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = daemon.child.try_wait()? {
                bail!(
                    "domkitd exited ({status}) before answering; its log:\n{}",
                    daemon.log_text()
                );
            }
            if daemon.log_text().contains("domkitd ready")
                && std::os::unix::net::UnixStream::connect(&daemon.socket).is_ok()
            {
                return Ok(daemon);
            }
            if Instant::now() >= deadline {
                bail!(
                    "domkitd did not answer in 60 s; its log:\n{}",
                    daemon.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The runtime directory (the QEMU driver's `qemu/NAME/serial.log` are there).
    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.path().join("r")
    }

    /// Its private directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A client on its socket.
    pub async fn client(&self) -> anyhow::Result<Client> {
        Ok(client::connect(&Target::Unix(self.socket.clone())).await?)
    }

    /// SIGTERM (domkitd detaches, removes its socket, exits 0); SIGKILL after 30 s.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .context("SIGTERM to domkitd")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let status = self.child.wait()?;
                bail!("domkitd ignored SIGTERM for 30 s and was killed ({status})");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PrivateDaemon {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(Some(_))) && self.stop().is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// How many times the guest printed its ready line (its ACPI handler and agent run).
fn ready_count(serial_log: &Path) -> usize {
    std::fs::read_to_string(serial_log)
        .unwrap_or_default()
        .matches("DOMKIT-GUEST-READY")
        .count()
}

async fn wait_ready(serial_log: &Path, count: usize, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while ready_count(serial_log) < count {
        if Instant::now() >= deadline {
            bail!(
                "the guest did not get ready in {timeout:?} (serial log {})",
                serial_log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Time one step and print it (as the in-process demo does).
async fn step<T, F, E>(name: &str, t0: Instant, json: bool, fut: F) -> anyhow::Result<T>
where
    F: std::future::Future<Output = Result<T, E>>,
    E: Into<anyhow::Error>,
{
    let started = Instant::now();
    let r = fut
        .await
        .map_err(Into::into)
        .with_context(|| format!("demo step `{name}` failed"))?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    // Let the event printer show the step's events before the step's own line.
    tokio::time::sleep(Duration::from_millis(20)).await;
    if json {
        println!(
            "{}",
            serde_json::json!({"step": name, "ms": (ms * 10.0).round() / 10.0, "elapsed_s": t0.elapsed().as_secs_f64()})
        );
    } else {
        println!("== {name:<34} {ms:9.1} ms");
    }
    Ok(r)
}

fn rpc<T>(r: Result<domkitd::Response<T>, domkitd::Status>) -> Result<T, client::ClientError> {
    r.map(domkitd::Response::into_inner).map_err(Into::into)
}

/// `domkit demo` on QEMU through a private domkitd; the exit code.
pub async fn run(json: bool) -> anyhow::Result<u8> {
    let t0 = Instant::now();
    let guest = crate::ensure_test_guest()?;
    let mut daemon = PrivateDaemon::start()?;
    let name = format!("domkit-demo-{}", std::process::id());
    let config =
        domkit_conformance::qemu::test_guest_config(&guest, &name, GuestOptions::default());
    let mut c = daemon.client().await?;
    let version = rpc(c.version(pb::VersionRequest {}).await)?;
    let info = rpc(c
        .define(pb::DefineRequest {
            config: serde_json::to_string(&config)?,
            format: pb::ConfigFormat::Json as i32,
        })
        .await)?;
    let id = info.id.clone().unwrap_or_default();
    if json {
        println!(
            "{}",
            serde_json::json!({"daemon": {"pid": daemon.pid(), "socket": daemon.socket().display().to_string(), "version": version.daemon_version}, "domain": id.name, "uuid": id.uuid, "backend": id.backend})
        );
    } else {
        println!(
            "domkit demo through a private domkitd {} (pid {}, unix://{}): domain {} ({}, {})",
            version.daemon_version,
            daemon.pid(),
            daemon.socket().display(),
            id.name,
            id.uuid,
            id.backend
        );
    }
    // Every event of the domain from its definition on, as the daemon streams them.
    let mut events = rpc(c
        .events(pb::EventsRequest {
            domain: Some(client::domain_ref(&name)),
            since: Some(0),
            follow: true,
        })
        .await)?;
    let printer = tokio::spawn(async move {
        while let Some(Ok(msg)) = events.next().await {
            let elapsed = t0.elapsed().as_secs_f64();
            if json {
                let mut v = domkitd::cli::entry_json(&msg);
                v["elapsed_s"] = serde_json::json!((elapsed * 1000.0).round() / 1000.0);
                println!("{v}");
            } else {
                println!("+{elapsed:8.3}s  {}", domkitd::cli::entry_text(&msg));
            }
        }
    });
    let serial_log = daemon
        .runtime_dir()
        .join("qemu")
        .join(&name)
        .join("serial.log");
    let save = daemon.dir().join("demo.save");
    let steps = steps(&mut c, &name, &serial_log, &save, t0, json);
    let result = tokio::select! {
        r = steps => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    if result.is_err() {
        let _ = c.destroy(client::domain_ref(&name)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = c.undefine(client::domain_ref(&name)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    printer.abort();
    let status = daemon.stop()?;
    let final_state = result?;
    anyhow::ensure!(status.success(), "domkitd did not stop cleanly: {status}");
    if json {
        println!(
            "{}",
            serde_json::json!({"daemon_stopped": status.code(), "final_state": final_state, "elapsed_s": t0.elapsed().as_secs_f64()})
        );
    } else {
        println!(
            "domkitd stopped (SIGTERM, exit {}); demo finished in {:.1} s; final state: {final_state}",
            status.code().unwrap_or(-1),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(0)
}

/// The lifecycle; the final state's text.
async fn steps(
    c: &mut Client,
    name: &str,
    serial_log: &Path,
    save: &Path,
    t0: Instant,
    json: bool,
) -> anyhow::Result<String> {
    let d = || Some(client::domain_ref(name));
    let ready = Duration::from_secs(180);
    let mut c2 = c.clone();
    step("start", t0, json, async {
        rpc(c2
            .start(pb::StartRequest {
                domain: d(),
                paused: false,
            })
            .await)
    })
    .await?;
    step(
        "wait for the guest to boot",
        t0,
        json,
        wait_ready(serial_log, 1, ready),
    )
    .await?;
    step("suspend", t0, json, async {
        rpc(c2.pause(client::domain_ref(name)).await)
    })
    .await?;
    step("resume", t0, json, async {
        rpc(c2.resume(client::domain_ref(name)).await)
    })
    .await?;
    let path = save.display().to_string();
    step("save", t0, json, async {
        rpc(c2
            .save(pb::SaveRequest {
                domain: d(),
                path: path.clone(),
            })
            .await)
    })
    .await?;
    let size = std::fs::metadata(save).map(|m| m.len()).unwrap_or(0);
    if !json {
        println!(
            "   save file: {} ({:.1} MiB)",
            save.display(),
            size as f64 / 1048576.0
        );
    }
    step("restore", t0, json, async {
        rpc(c2
            .restore(pb::RestoreRequest {
                domain: d(),
                path: path.clone(),
                paused: None,
            })
            .await)
    })
    .await?;
    let _ = std::fs::remove_file(save);
    // A restore starts a new QEMU (maybe a new serial log): count from here.
    let readies = ready_count(serial_log);
    step("reboot", t0, json, async {
        rpc(c2
            .reboot(pb::RebootRequest {
                domain: d(),
                mode: pb::ShutdownMode::Default as i32,
                timeout_ms: ready.as_millis() as u64,
            })
            .await)
    })
    .await?;
    step(
        "wait for the guest to boot again",
        t0,
        json,
        wait_ready(serial_log, readies + 1, ready),
    )
    .await?;
    let outcome = step("graceful shutdown (wait: completed)", t0, json, async {
        rpc(c2
            .shutdown(pb::ShutdownRequest {
                domain: d(),
                mode: pb::ShutdownMode::Default as i32,
                wait: pb::ShutdownWait::Completed as i32,
                timeout_ms: 120_000,
                destroy_on_timeout: true,
            })
            .await)
    })
    .await?;
    let info = rpc(c.info(client::domain_ref(name)).await)?;
    let state = domkitd::convert::state_text(info.state.as_ref());
    anyhow::ensure!(
        state == "shutoff (shutdown)",
        "after shutdown (outcome {}) the domain is {state}",
        outcome.outcome
    );
    Ok(state)
}
