//! `domkitd` itself: its options, opening the persistent drivers, the listeners, and the
//! orderly exit on SIGTERM/SIGINT (every domain left as it is: the drivers `detach()`).

use crate::backend::{BackendDriver, Backends};
use crate::journal::{Journal, DEFAULT_RETENTION};
use crate::listen::{self, ListenSpec, TlsFiles};
use crate::server::{Access, DaemonCore, DomkitService};
use crate::DaemonError;
use clap::Parser;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The default socket (root).
pub const DEFAULT_SOCKET: &str = "/run/domkit/domkitd.sock";

/// domkitd: the per-host domkit service. Opens the persistent driver of each backend
/// present (QEMU; libxl in a Xen dom0 when built with it) and serves domkit.v1 (gRPC) on
/// Unix sockets and mutual-TLS TCP. Domains outlive the daemon: SIGTERM leaves them as
/// they are, and the next domkitd on the same directories reattaches them.
#[derive(Parser, Debug, Clone)]
#[command(name = "domkitd", version)]
pub struct Options {
    /// Stay in the foreground. domkitd never forks (systemd and tests supervise it); the
    /// flag is accepted so command lines say what they mean.
    #[arg(long)]
    pub foreground: bool,
    /// The state root: definitions and statuses (`DIR/qemu`), the event journal
    /// (`DIR/daemon`). Default: /var/lib/domkit as root, else $XDG_STATE_HOME/domkit.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// The runtime root: the backends' runtime directories (`DIR/qemu`) and the default
    /// socket (`DIR/domkitd.sock`). Default: /run/domkit as root, else
    /// $XDG_RUNTIME_DIR/domkit.
    #[arg(long, value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,
    /// Serve with full access on `unix:PATH` (socket mode 0600) or `tcp:HOST:PORT`
    /// (mutual TLS: needs --tls-cert, --tls-key, --tls-client-ca). Repeatable. Default:
    /// `unix:RUNTIME_DIR/domkitd.sock`.
    #[arg(long, value_name = "SPEC")]
    pub listen: Vec<ListenSpec>,
    /// Serve read-only (Version, List, Lookup, Info, Events) on `unix:PATH` (mode 0666, in
    /// a directory others may enter) or `tcp:HOST:PORT` (mutual TLS). Repeatable.
    #[arg(long, value_name = "SPEC")]
    pub listen_ro: Vec<ListenSpec>,
    /// The daemon's TLS certificate chain (PEM), for tcp listeners.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The daemon's TLS private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// The CA whose certificates clients must present (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// How many journal entries (events and gap markers) are kept for clients resuming
    /// from a cursor.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_RETENTION)]
    pub journal_retention: usize,
    /// Let this group use the full-access Unix sockets too: they become 0660 with this
    /// group (like libvirt's `unix_sock_group`), in a directory the group may enter.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The state root: `--state-dir`, or the one §11.1 names.
pub fn default_state_dir() -> PathBuf {
    domkit_qemu::default_state_root()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/var/lib/domkit"))
}

/// The runtime root: `--runtime-dir`, or the one §11.1 names.
pub fn default_runtime_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/run/domkit");
    }
    domkit_qemu::default_runtime_root()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/run/domkit"))
}

struct Listener {
    spec: ListenSpec,
    access: Access,
}

/// Run the daemon until SIGTERM/SIGINT.
pub async fn run(options: Options) -> Result<(), DaemonError> {
    let state_dir = options.state_dir.clone().unwrap_or_else(default_state_dir);
    let runtime_dir = options
        .runtime_dir
        .clone()
        .unwrap_or_else(default_runtime_dir);
    for (what, dir) in [("--state-dir", &state_dir), ("--runtime-dir", &runtime_dir)] {
        if !dir.is_absolute() {
            return Err(DaemonError::Setup(format!(
                "{what} {} must be an absolute path",
                dir.display()
            )));
        }
    }
    let mut listeners: Vec<Listener> = options
        .listen
        .iter()
        .map(|spec| Listener {
            spec: spec.clone(),
            access: Access::Full,
        })
        .collect();
    if listeners.is_empty() {
        listeners.push(Listener {
            spec: ListenSpec::Unix(runtime_dir.join("domkitd.sock")),
            access: Access::Full,
        });
    }
    listeners.extend(options.listen_ro.iter().map(|spec| Listener {
        spec: spec.clone(),
        access: Access::ReadOnly,
    }));
    let tls = match (&options.tls_cert, &options.tls_key, &options.tls_client_ca) {
        (Some(cert), Some(key), Some(ca)) => Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: ca.clone(),
        }),
        (None, None, None) => None,
        _ => {
            return Err(DaemonError::Setup(
                "TLS needs all three of --tls-cert, --tls-key and --tls-client-ca".into(),
            ))
        }
    };
    if tls.is_none()
        && listeners
            .iter()
            .any(|l| matches!(l.spec, ListenSpec::Tcp(_)))
    {
        return Err(DaemonError::Setup(
            "plaintext TCP is never offered: a tcp listener needs --tls-cert, --tls-key and \
             --tls-client-ca (clients must present a certificate signed by that CA)"
                .into(),
        ));
    }

    // The drivers first: they lock their roots, so a second daemon on the same
    // directories stops here (root_in_use, with the holder's pid) before touching sockets.
    domkit_core::store::ensure_private_dir(&state_dir)
        .map_err(|e| DaemonError::Setup(format!("state directory {}: {e}", state_dir.display())))?;
    let qemu = domkit_qemu::QemuDriver::open(domkit_qemu::QemuDriverOptions::persistent(
        state_dir.join("qemu"),
        runtime_dir.join("qemu"),
    ))
    .await?;
    let mut drivers = vec![BackendDriver::Qemu(qemu)];
    drivers.extend(other_backends(&state_dir, &runtime_dir).await?);
    let journal_dir = state_dir.join("daemon");
    domkit_core::store::ensure_private_dir(&journal_dir).map_err(|e| {
        DaemonError::Setup(format!("journal directory {}: {e}", journal_dir.display()))
    })?;
    let journal_path = journal_dir.join("journal.jsonl");
    let journal = Journal::open(&journal_path, options.journal_retention).map_err(|e| {
        DaemonError::Setup(format!(
            "opening the journal {}: {e}",
            journal_path.display()
        ))
    })?;
    let backend_names: Vec<&str> = drivers.iter().map(BackendDriver::name).collect();
    let backend_names = backend_names.join(",");
    let core = Arc::new(DaemonCore::new(Backends::new(drivers), journal).await);

    // Socket directories: private unless a read-only socket lives there.
    let unix_dirs: Vec<(PathBuf, bool)> = listeners
        .iter()
        .filter_map(|l| match &l.spec {
            ListenSpec::Unix(p) => p
                .parent()
                .map(|d| (d.to_path_buf(), l.access == Access::ReadOnly)),
            ListenSpec::Tcp(_) => None,
        })
        .collect();
    for (dir, _) in &unix_dirs {
        // A group-accessible or read-only socket needs a directory others may enter.
        let shared =
            options.socket_group.is_some() || unix_dirs.iter().any(|(d, ro)| d == dir && *ro);
        listen::ensure_socket_dir(dir, shared)?;
    }

    let socket_gid = match &options.socket_group {
        None => None,
        Some(name) => match nix::unistd::Group::from_name(name) {
            Ok(Some(group)) => Some(group.gid),
            Ok(None) => {
                return Err(DaemonError::Setup(format!(
                    "--socket-group {name:?}: no such group"
                )))
            }
            Err(e) => {
                return Err(DaemonError::Setup(format!(
                    "--socket-group {name:?}: cannot look it up: {e}"
                )))
            }
        },
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut servers = Vec::new();
    let mut sockets = Vec::new();
    for listener in &listeners {
        let service = DomkitService::new(core.clone(), listener.access).into_server();
        let label = format!(
            "{}{}",
            listener.spec,
            if listener.access == Access::ReadOnly {
                " (read-only)"
            } else {
                ""
            }
        );
        let stop = wait_stop(stop_rx.clone());
        match &listener.spec {
            ListenSpec::Unix(path) => {
                let mode = match (listener.access, socket_gid) {
                    (Access::ReadOnly, _) => 0o666,
                    (Access::Full, Some(_)) => 0o660,
                    (Access::Full, None) => 0o600,
                };
                let socket = listen::bind_unix(path, mode)?;
                if let (Access::Full, Some(gid)) = (listener.access, socket_gid) {
                    listen::share_with_group(path, gid)?;
                }
                sockets.push(path.clone());
                let incoming = listen::unix_incoming(socket, label.clone());
                servers.push(tokio::spawn(async move {
                    tonic::transport::Server::builder()
                        .add_service(service)
                        .serve_with_incoming_shutdown(incoming, stop)
                        .await
                }));
            }
            ListenSpec::Tcp(addr) => {
                let Some(files) = &tls else {
                    return Err(DaemonError::Setup("a tcp listener needs TLS".into()));
                };
                let config = listen::server_tls(files)?;
                let socket = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| DaemonError::Setup(format!("binding tcp:{addr}: {e}")))?;
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(socket);
                let builder = tonic::transport::Server::builder()
                    .tls_config(config)
                    .map_err(|e| DaemonError::Setup(format!("TLS for tcp:{addr}: {e}")))?;
                let mut builder = builder;
                servers.push(tokio::spawn(async move {
                    builder
                        .add_service(service)
                        .serve_with_incoming_shutdown(incoming, stop)
                        .await
                }));
            }
        }
        tracing::info!(listen = %label, "listening");
    }
    tracing::info!(
        state_dir = %state_dir.display(),
        runtime_dir = %runtime_dir.display(),
        backends = %backend_names,
        pid = std::process::id(),
        "domkitd ready"
    );

    wait_for_signal().await?;
    tracing::info!("stopping: every domain is left as it is (the next domkitd reattaches)");
    core.detach();
    let _ = stop_tx.send(true);
    // In-flight calls get a moment to answer; whatever still runs (a long shutdown wait)
    // is ended with the process, which the persistent driver's next open handles (§11.4).
    let _ = tokio::time::timeout(Duration::from_secs(2), futures::future::join_all(servers)).await;
    for path in sockets {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("domkitd stopped");
    Ok(())
}

/// The drivers of the backends other than QEMU that this host has: libxl in a Xen dom0
/// (when built with the `libxl` feature), persistent on `STATE/libxl` and `RUNTIME/libxl`.
#[cfg(feature = "libxl")]
async fn other_backends(
    state_dir: &Path,
    runtime_dir: &Path,
) -> Result<Vec<BackendDriver>, DaemonError> {
    let dom0 = std::fs::read_to_string("/proc/xen/capabilities")
        .map(|c| c.contains("control_d"))
        .unwrap_or(false);
    if !dom0 {
        tracing::info!(
            "not a Xen dom0 (/proc/xen/capabilities has no control_d): libxl not opened"
        );
        return Ok(Vec::new());
    }
    let options =
        domkit_libxl::LibxlOptions::persistent(state_dir.join("libxl"), runtime_dir.join("libxl"));
    let driver = domkit_libxl::LibxlDriver::open(options).await?;
    Ok(vec![BackendDriver::Libxl(driver)])
}

/// Without the `libxl` feature there is no other backend.
#[cfg(not(feature = "libxl"))]
async fn other_backends(
    _state_dir: &Path,
    _runtime_dir: &Path,
) -> Result<Vec<BackendDriver>, DaemonError> {
    Ok(Vec::new())
}

async fn wait_stop(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn wait_for_signal() -> Result<(), DaemonError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| DaemonError::Setup(format!("SIGTERM handler: {e}")))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| DaemonError::Setup(format!("SIGINT handler: {e}")))?;
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "signal received"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "signal received"),
    }
    Ok(())
}
