//! Where domkitd listens: Unix sockets (0600 for full access; a read-only socket 0666, like
//! libvirt's `libvirt-sock-ro`) and TCP with mutual TLS. Plaintext TCP is never offered.

use crate::DaemonError;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// One `--listen` / `--listen-ro` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenSpec {
    /// `unix:PATH` (or `unix://PATH`).
    Unix(PathBuf),
    /// `tcp:HOST:PORT` (or `tcp://HOST:PORT`), always with mutual TLS.
    Tcp(String),
}

impl std::str::FromStr for ListenSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("unix:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            let path = PathBuf::from(path);
            if !path.is_absolute() {
                return Err(format!("{s:?}: the socket path must be absolute"));
            }
            return Ok(ListenSpec::Unix(path));
        }
        if let Some(rest) = s.strip_prefix("tcp:") {
            let addr = rest.strip_prefix("//").unwrap_or(rest);
            if addr
                .rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(format!("{s:?}: want tcp:HOST:PORT"));
            }
            return Ok(ListenSpec::Tcp(addr.to_string()));
        }
        Err(format!(
            "{s:?}: want unix:PATH or tcp:HOST:PORT (with --tls-cert, --tls-key, --tls-client-ca)"
        ))
    }
}

impl std::fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenSpec::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenSpec::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

fn setup(msg: impl Into<String>) -> DaemonError {
    DaemonError::Setup(msg.into())
}

/// Make sure `dir` can hold a socket: missing components are created, every component is
/// checked with `lstat` (not a symlink, owned by us or root, not writable by group/other
/// unless root-owned and sticky). With `shared` (a read-only socket lives there) the
/// directory may be 0755 and is created so; otherwise it must be private (0700, via
/// [`domkit_core::store::ensure_private_dir`]).
pub fn ensure_socket_dir(dir: &Path, shared: bool) -> Result<(), DaemonError> {
    if !shared {
        return domkit_core::store::ensure_private_dir(dir)
            .map_err(|e| setup(format!("socket directory {}: {e}", dir.display())));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let mut current = PathBuf::from("/");
    for component in dir.components() {
        match component {
            Component::RootDir => continue,
            Component::Normal(name) => current.push(name),
            _ => return Err(setup(format!("{}: `.` or `..` in the path", dir.display()))),
        }
        if std::fs::symlink_metadata(&current).is_err() {
            match std::fs::DirBuilder::new().mode(0o755).create(&current) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(setup(format!("creating {}: {e}", current.display()))),
            }
        }
        let meta = std::fs::symlink_metadata(&current)
            .map_err(|e| setup(format!("{}: {e}", current.display())))?;
        let bad = |what: &str| {
            setup(format!(
                "socket directory {}: {} {what}",
                dir.display(),
                current.display()
            ))
        };
        if meta.file_type().is_symlink() {
            return Err(bad("is a symlink"));
        }
        if !meta.is_dir() {
            return Err(bad("is not a directory"));
        }
        if meta.uid() != euid && meta.uid() != 0 {
            return Err(bad("is owned by another user"));
        }
        let mode = meta.permissions().mode();
        let sticky_root = meta.uid() == 0 && mode & 0o1000 != 0;
        if mode & 0o022 != 0 && !sticky_root {
            return Err(bad("is writable by group or others"));
        }
    }
    Ok(())
}

/// Bind a Unix socket at `path` with `mode`: a stale socket of a dead daemon is removed;
/// a live one (it accepts) or a non-socket file there is refused.
pub fn bind_unix(path: &Path, mode: u32) -> Result<tokio::net::UnixListener, DaemonError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(setup(format!(
                "{} exists and is not a socket: remove it or listen elsewhere",
                path.display()
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(setup(format!(
                "another domkitd is listening on {}: stop it first",
                path.display()
            )));
        }
        std::fs::remove_file(path)
            .map_err(|e| setup(format!("removing the stale socket {}: {e}", path.display())))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(|e| setup(format!("binding {}: {e}", path.display())))?;
    // The directory is private (full access) or the mode is meant for everyone
    // (read-only), so nobody can use the socket in the instant before this chmod.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| setup(format!("chmod {:o} {}: {e}", mode, path.display())))?;
    Ok(listener)
}

/// The accepted connections of `listener`, each logged with the peer's credentials
/// (SO_PEERCRED).
pub fn unix_incoming(
    listener: tokio::net::UnixListener,
    label: String,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::UnixStream>> + Send + 'static {
    futures::stream::unfold((listener, label), |(listener, label)| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        match &accepted {
            Ok(stream) => match stream.peer_cred() {
                Ok(cred) => {
                    tracing::debug!(listener = %label, uid = cred.uid(), gid = cred.gid(), pid = ?cred.pid(), "connection")
                }
                Err(e) => {
                    tracing::warn!(listener = %label, error = %e, "connection without credentials")
                }
            },
            Err(e) => tracing::warn!(listener = %label, error = %e, "accept failed"),
        }
        Some((accepted, (listener, label)))
    })
}

/// The TLS files of a TCP listener.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The daemon's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA that signs client certificates (PEM): a client must present one.
    pub client_ca: PathBuf,
}

/// The tonic TLS configuration of `files`: the daemon's identity, and client certificates
/// required, signed by the client CA.
pub fn server_tls(files: &TlsFiles) -> Result<tonic::transport::ServerTlsConfig, DaemonError> {
    let read =
        |p: &Path| std::fs::read(p).map_err(|e| setup(format!("reading {}: {e}", p.display())));
    let identity = tonic::transport::Identity::from_pem(read(&files.cert)?, read(&files.key)?);
    let ca = tonic::transport::Certificate::from_pem(read(&files.client_ca)?);
    Ok(tonic::transport::ServerTlsConfig::new()
        .identity(identity)
        .client_ca_root(ca)
        .client_auth_optional(false))
}

/// Give group `gid` the socket `path` (already 0660) and a way into its directory: the
/// directory gets that group and `g+x` (search only: the group cannot list or add entries).
pub fn share_with_group(path: &Path, gid: nix::unistd::Gid) -> Result<(), DaemonError> {
    nix::unistd::chown(path, None, Some(gid))
        .map_err(|e| setup(format!("chgrp {gid} {}: {e}", path.display())))?;
    if let Some(dir) = path.parent() {
        let meta =
            std::fs::symlink_metadata(dir).map_err(|e| setup(format!("{}: {e}", dir.display())))?;
        nix::unistd::chown(dir, None, Some(gid))
            .map_err(|e| setup(format!("chgrp {gid} {}: {e}", dir.display())))?;
        let mode = meta.permissions().mode() & 0o7777;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o010))
            .map_err(|e| setup(format!("chmod g+x {}: {e}", dir.display())))?;
    }
    Ok(())
}
