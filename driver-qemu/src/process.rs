//! Launching one QEMU process and owning its files (I/O; after QEMU's python `machine.py`).
//!
//! - Each domain has a private runtime directory (mode 0700) under the driver's runtime root,
//!   holding the QMP socket, the guest agent / channel sockets, the console logs and QEMU's
//!   own stdout/stderr log (files 0600). It is removed when the domain is undefined or the
//!   driver dropped ([`remove_runtime_dir`]).
//! - domkit listens on the QMP socket and QEMU connects (`server=off`): nobody else can take
//!   the monitor first, and the socket file is unlinked as soon as QEMU is connected.
//! - The child gets `PR_SET_PDEATHSIG(SIGKILL)` and `kill_on_drop`: it dies with us.
//! - A launch failure is a [`LaunchFailure`] with exit status, argv and QEMU's output, and
//!   always ends with the child killed and reaped.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::process::{Child, Command};

use crate::argv::DomainPaths;
use crate::error::{LaunchFailure, QemuError};
use crate::qmp::{QmpClient, QmpClientOptions, QmpEventStream};

/// The longest path a Unix socket address holds (`sun_path` is 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// How much of QEMU's log a launch failure quotes (the end of it).
const LOG_TAIL: u64 = 8 * 1024;

/// Create (or reuse) the private runtime directory of domain `name` under `root`; both get
/// mode 0700. Stale sockets from an earlier process that did not clean up are removed.
pub fn create_runtime_dir(root: &Path, name: &str) -> io::Result<DomainPaths> {
    DirBuilder::new().recursive(true).mode(0o700).create(root)?;
    let dir = root.join(name);
    match DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
            for entry in std::fs::read_dir(&dir)? {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "sock") {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        Err(e) => return Err(e),
    }
    let paths = DomainPaths::new(dir);
    let longest = paths.dir.join("channel-org.qemu.guest_agent.0.sock");
    if longest.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "runtime directory {} is too long for Unix socket paths ({} bytes max): use a \
                 shorter runtime root",
                paths.dir.display(),
                MAX_SOCKET_PATH
            ),
        ));
    }
    Ok(paths)
}

/// Remove a domain's runtime directory and everything in it (missing is fine).
pub fn remove_runtime_dir(paths: &DomainPaths) -> io::Result<()> {
    match std::fs::remove_dir_all(&paths.dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Remove the sockets of an ended process from the runtime directory (logs stay).
pub fn remove_sockets(paths: &DomainPaths) {
    if let Ok(entries) = std::fs::read_dir(&paths.dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "sock") {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// A running QEMU whose monitor is connected and negotiated.
#[derive(Debug)]
pub struct QemuProcess {
    /// The child (the supervisor owns it and is the only one to wait on it).
    pub child: Child,
    /// Its pid.
    pub pid: u32,
    /// The monitor.
    pub qmp: QmpClient,
    /// Every event since the handshake.
    pub events: QmpEventStream,
    /// The command line it runs.
    pub argv: Vec<String>,
    /// Where this process's output starts in the QEMU log.
    pub log_start: u64,
}

/// Timeouts of a launch.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// How long QEMU may take to connect to the monitor socket and greet.
    pub connect_timeout: Duration,
    /// QMP client options (command timeout...).
    pub qmp: QmpClientOptions,
}

/// Spawn `argv` and connect its monitor. On any failure the child is killed and reaped.
pub async fn launch(
    argv: Vec<String>,
    paths: &DomainPaths,
    options: &LaunchOptions,
) -> Result<QemuProcess, QemuError> {
    let failure = |what: String, exit_status, output: String, argv: &[String]| {
        QemuError::Launch(Box::new(LaunchFailure {
            what,
            exit_status,
            argv: argv.to_vec(),
            output,
        }))
    };
    let io_failure = |what: &str, e: io::Error, argv: &[String]| {
        failure(format!("{what}: {e}"), None, String::new(), argv)
    };

    let _ = std::fs::remove_file(&paths.qmp_socket);
    let listener = UnixListener::bind(&paths.qmp_socket)
        .map_err(|e| io_failure("cannot listen on the QMP socket", e, &argv))?;
    // Unlinks the socket file however this function ends; QEMU needs it only to connect.
    let _unlink = UnlinkOnDrop(&paths.qmp_socket);
    std::fs::set_permissions(&paths.qmp_socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io_failure("cannot restrict the QMP socket", e, &argv))?;

    let log =
        open_log(&paths.qemu_log).map_err(|e| io_failure("cannot open the QEMU log", e, &argv))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let log_err = log
        .try_clone()
        .map_err(|e| io_failure("cannot open the QEMU log", e, &argv))?;

    let Some((binary, args)) = argv.split_first() else {
        return Err(failure(
            "empty command line".into(),
            None,
            String::new(),
            &argv,
        ));
    };
    let mut cmd = Command::new(binary);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        // Its own process group: a Ctrl-C at our terminal is for us, not for QEMU (which
        // dies with us anyway, through the parent-death signal).
        .process_group(0)
        .kill_on_drop(true);
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // functions may be called: umask(2), prctl(2) and getppid(2) are plain system calls, and
    // the error values are built from raw OS codes without allocating.
    unsafe {
        cmd.pre_exec(move || {
            // Whatever QEMU creates (console logs, channel sockets) is private: 0600 / 0700.
            libc::umask(0o077);
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nobody would kill us.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        let what = if e.kind() == io::ErrorKind::NotFound {
            format!("cannot execute {binary}: not found (install QEMU or set qemu.binary)")
        } else {
            format!("cannot execute {binary}: {e}")
        };
        failure(what, None, String::new(), &argv)
    })?;
    let pid = child.id().unwrap_or(0);
    tracing::debug!(pid, argv = %crate::error::shell_quote(&argv), "QEMU spawned");

    let connected = tokio::select! {
        accepted = tokio::time::timeout(options.connect_timeout, listener.accept()) => match accepted {
            Ok(Ok((stream, _))) => Ok(stream),
            Ok(Err(e)) => Err((format!("accepting the monitor connection failed: {e}"), None)),
            Err(_) => Err((format!(
                "QEMU did not connect to its monitor within {:?}", options.connect_timeout
            ), None)),
        },
        status = child.wait() => Err((
            "QEMU exited before connecting to its monitor".to_string(),
            status.ok(),
        )),
    };
    let stream = match connected {
        Ok(stream) => stream,
        Err((what, status)) => {
            let status = match status {
                Some(s) => Some(s),
                None => kill_and_reap(&mut child).await,
            };
            let output = read_log_since(&paths.qemu_log, log_start);
            return Err(failure(what, status, output, &argv));
        }
    };
    drop(listener);

    let handshake = tokio::select! {
        r = QmpClient::handshake_with(stream, options.qmp.clone()) => r,
        status = child.wait() => {
            let output = read_log_since(&paths.qemu_log, log_start);
            return Err(failure(
                "QEMU exited during the QMP handshake".into(),
                status.ok(),
                output,
                &argv,
            ));
        }
    };
    let qmp = match handshake {
        Ok(qmp) => qmp,
        Err(e) => {
            // QEMU opens its monitor before it builds the machine: one that fails then (no
            // memory for the guest, a bad kernel) closes the handshake and exits at once.
            // Its exit status and output are the error, not the broken handshake.
            let exited = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
            if let Ok(Ok(status)) = exited {
                let output = read_log_since(&paths.qemu_log, log_start);
                return Err(failure(
                    "QEMU exited during the QMP handshake".into(),
                    Some(status),
                    output,
                    &argv,
                ));
            }
            kill_and_reap(&mut child).await;
            return Err(QemuError::qmp("qmp_capabilities", e));
        }
    };
    let Some(events) = qmp.events_since_handshake() else {
        kill_and_reap(&mut child).await;
        return Err(failure(
            "the QMP event subscription was already taken".into(),
            None,
            String::new(),
            &argv,
        ));
    };
    Ok(QemuProcess {
        child,
        pid,
        qmp,
        events,
        argv,
        log_start,
    })
}

/// SIGKILL and reap; returns the exit status if it could be read.
pub async fn kill_and_reap(child: &mut Child) -> Option<std::process::ExitStatus> {
    let _ = child.start_kill();
    child.wait().await.ok()
}

/// QEMU's output written since `offset` (its tail if long), for error messages.
pub fn read_log_since(path: &Path, offset: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = offset.max(len.saturating_sub(LOG_TAIL));
    if file.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    let _ = file.take(LOG_TAIL).read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

fn open_log(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

struct UnlinkOnDrop<'a>(&'a Path);

impl Drop for UnlinkOnDrop<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}
