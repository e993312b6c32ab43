//! Launching one QEMU process and owning its files (I/O; after QEMU's python `machine.py`).
//!
//! - Each domain has a private runtime directory (mode 0700) under the driver's runtime root,
//!   holding the QMP socket, the guest agent / channel sockets, the console logs and QEMU's
//!   own stdout/stderr log (files 0600). It is removed when the domain is undefined or the
//!   driver dropped ([`remove_runtime_dir`]).
//! - domkit binds the QMP socket and QEMU inherits it as a listening socket
//!   ([`crate::argv::MONITOR_FD`]): nobody else can take the monitor first, and a later
//!   manager can connect to it again (§11).
//! - Ownership ([`Ownership`]): an **ephemeral** child gets `PR_SET_PDEATHSIG(SIGKILL)` and
//!   `kill_on_drop`, and is forked from one thread that lives as long as the process
//!   (the death signal fires when the *forking thread* exits, and runtime threads may exit
//!   long before the process does). A **persistent** child gets neither: it outlives us, and
//!   its pid and start time go into `pid` in its runtime directory for the next manager
//!   ([`AdoptedProcess`]).
//! - A launch failure is a [`LaunchFailure`] with exit status, argv and QEMU's output, and
//!   always ends with the child killed and reaped.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use std::os::fd::{AsRawFd, FromRawFd};

use tokio::net::UnixStream;
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
    domkit_core::store::ensure_private_dir(root)?;
    let dir = root.join(name);
    match DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            // Ours from an earlier run of this domain (the root is locked by us): verified,
            // and its stale sockets removed.
            domkit_core::store::ensure_private_dir(&dir)?;
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
    pub child: Proc,
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

pub use domkit_core::Ownership;

/// Timeouts of a launch.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// Whether the process dies with us.
    pub ownership: Ownership,
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
    let listener = std::os::unix::net::UnixListener::bind(&paths.qmp_socket)
        .map_err(|e| io_failure("cannot listen on the QMP socket", e, &argv))?;
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
    let ephemeral = options.ownership == Ownership::Ephemeral;
    let mut cmd = Command::new(binary);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        // Its own process group: a terminal's ^C to the manager does not reach QEMU.
        .process_group(0)
        .kill_on_drop(ephemeral);
    let parent = std::process::id();
    let monitor_fd = listener.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (umask, prctl, getppid, dup2, fcntl); it allocates
    // nothing (the error is built from errno).
    unsafe {
        cmd.pre_exec(move || {
            libc::umask(0o077);
            // The monitor listener becomes fd 3 with close-on-exec cleared.
            if monitor_fd == crate::argv::MONITOR_FD {
                if libc::fcntl(monitor_fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(monitor_fd, crate::argv::MONITOR_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            if ephemeral {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The manager died between fork and prctl: die now.
                if libc::getppid() as u32 != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
            }
            Ok(())
        });
    }
    let spawned = if ephemeral {
        spawn_on_forker(cmd).await
    } else {
        cmd.spawn()
    };
    let mut child = spawned.map_err(|e| {
        let what = if e.kind() == io::ErrorKind::NotFound {
            format!("cannot execute {binary}: not found (install QEMU or set qemu.binary)")
        } else {
            format!("cannot execute {binary}: {e}")
        };
        failure(what, None, String::new(), &argv)
    })?;
    // QEMU holds the listener now; ours would only keep a dead QEMU's socket accepting.
    drop(listener);
    let pid = child.id().unwrap_or(0);
    tracing::debug!(pid, argv = %crate::error::shell_quote(&argv), "QEMU spawned");
    if !ephemeral {
        if let Err(e) = write_pid_file(paths, pid) {
            kill_and_reap(&mut child).await;
            return Err(io_failure("cannot record the QEMU pid", e, &argv));
        }
    }

    let connected = tokio::select! {
        connected = tokio::time::timeout(options.connect_timeout, UnixStream::connect(&paths.qmp_socket)) => match connected {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err((format!("connecting to the monitor failed: {e}"), None)),
            Err(_) => Err((format!(
                "the monitor did not accept a connection within {:?}", options.connect_timeout
            ), None)),
        },
        status = child.wait() => Err((
            "QEMU exited before its monitor came up".to_string(),
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
        child: Proc::Owned(child),
        pid,
        qmp,
        events,
        argv,
        log_start,
    })
}

/// Connect to the monitor of a QEMU a previous manager started (§11.3): QEMU accepts a new
/// connection on its inherited listening socket once the old one is gone.
pub async fn connect_adopted(
    adopted: AdoptedProcess,
    paths: &DomainPaths,
    options: &LaunchOptions,
) -> Result<QemuProcess, domkit_core::Error> {
    let pid = adopted.pid();
    let broken = |reason: String| domkit_core::Error::ControlBroken {
        domain: paths.dir.display().to_string(),
        reason,
    };
    let connect = tokio::time::timeout(
        options.connect_timeout,
        UnixStream::connect(&paths.qmp_socket),
    );
    let stream = match connect.await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            return Err(broken(format!(
                "QEMU pid {pid} is alive but its monitor {} refuses a connection: {e}",
                paths.qmp_socket.display()
            )))
        }
        Err(_) => {
            return Err(broken(format!(
                "QEMU pid {pid}: no answer from its monitor within {:?}",
                options.connect_timeout
            )))
        }
    };
    let qmp = QmpClient::handshake_with(stream, options.qmp.clone())
        .await
        .map_err(|e| broken(format!("QMP handshake with QEMU pid {pid} failed: {e}")))?;
    let events = qmp
        .events_since_handshake()
        .ok_or_else(|| broken("the QMP event subscription was already taken".into()))?;
    let log_start = std::fs::metadata(&paths.qemu_log)
        .map(|m| m.len())
        .unwrap_or(0);
    Ok(QemuProcess {
        child: Proc::Adopted(adopted),
        pid,
        qmp,
        events,
        argv: Vec::new(),
        log_start,
    })
}

/// Fork `cmd` on the one thread that lives as long as the process (see the module docs:
/// `PR_SET_PDEATHSIG` is tied to the forking thread).
async fn spawn_on_forker(mut cmd: Command) -> io::Result<Child> {
    type Job = Box<dyn FnOnce() + Send>;
    static FORKER: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<Job>>> =
        std::sync::OnceLock::new();
    let forker = FORKER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("domkit-forker".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .expect("spawning the forker thread");
        std::sync::Mutex::new(tx)
    });
    let runtime = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        // The child's reaping is registered with the caller's runtime.
        let _entered = runtime.enter();
        let _ = tx.send(cmd.spawn());
    });
    forker
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(job)
        .map_err(|_| io::Error::other("the forker thread is gone"))?;
    rx.await
        .map_err(|_| io::Error::other("the forker thread dropped the spawn"))?
}

/// `pid` in the runtime directory: `<pid> <start time>` for the next manager (§11).
fn write_pid_file(paths: &DomainPaths, pid: u32) -> io::Result<()> {
    let start = process_start_time(pid)?;
    domkit_core::store::write_atomic(
        &paths.dir.join("pid"),
        format!("{pid} {start}\n").as_bytes(),
    )
}

/// The start time of `pid` (field 22 of `/proc/<pid>/stat`, clock ticks since boot): with
/// the pid, it names one process even after pids wrap.
pub fn process_start_time(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces and parentheses: fields after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad /proc stat"))?;
    rest.split_whitespace()
        .nth(19)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad /proc stat"))
}

/// True if `pid` has exited and waits to be reaped.
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, rest) = stat.rsplit_once(')')?;
            rest.split_whitespace().next().map(|s| s == "Z" || s == "X")
        })
        .unwrap_or(true)
}

/// The pid and start time a previous manager recorded for a domain, if any.
pub fn read_pid_file(paths: &DomainPaths) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(paths.dir.join("pid")).ok()?;
    let mut fields = text.split_whitespace();
    Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
}

/// A QEMU process the supervisor watches: our child, or one a previous manager started.
#[derive(Debug)]
pub enum Proc {
    /// Our child: waited for (and reaped) with tokio.
    Owned(Child),
    /// Not our child (its parent was a previous manager): watched through a pidfd.
    Adopted(AdoptedProcess),
}

impl Proc {
    /// Wait until the process exited (its status, when it is our child).
    pub async fn wait(&mut self) -> io::Result<Option<std::process::ExitStatus>> {
        match self {
            Proc::Owned(child) => child.wait().await.map(Some),
            Proc::Adopted(p) => p.wait().await.map(|()| None),
        }
    }

    /// Send SIGKILL (asynchronously; [`Proc::wait`] sees the end).
    pub fn start_kill(&mut self) -> io::Result<()> {
        match self {
            Proc::Owned(child) => child.start_kill(),
            Proc::Adopted(p) => p.kill(),
        }
    }
}

/// A QEMU process started by a previous manager, held by a pidfd (no pid-reuse race).
#[derive(Debug)]
pub struct AdoptedProcess {
    pid: u32,
    pidfd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl AdoptedProcess {
    /// Take hold of `pid` if it is still the process that started at `start_time`.
    pub fn open(pid: u32, start_time: u64) -> io::Result<Self> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the syscall returned a new fd that nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
        // Checked after the pidfd is held: the pidfd names this process for good. A zombie
        // (killed, not yet reaped by whoever inherited it) has ended.
        if process_start_time(pid)? != start_time || is_zombie(pid) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("pid {pid} is another process now"),
            ));
        }
        // SAFETY: the OwnedFd is ours alone and moves into the AsyncFd, which deregisters it
        // before it is closed; nothing else uses the fd meanwhile.
        let pidfd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(|e| e.into_parts().1)?;
        Ok(AdoptedProcess { pid, pidfd })
    }

    /// The pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    async fn wait(&self) -> io::Result<()> {
        // A pidfd becomes readable when the process exits.
        let mut guard = self.pidfd.readable().await?;
        guard.retain_ready();
        Ok(())
    }

    fn kill(&self) -> io::Result<()> {
        // SAFETY: pidfd_send_signal on our own pidfd, no siginfo, no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.get_ref().as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
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
