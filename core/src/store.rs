//! The durable store of a persistent driver (I/O, backend-independent): private directories
//! nobody else controls, crash-safe file writes, and per-domain records (the definition, and
//! the status a new manager needs to reattach: last `seq`, last state, an operation in
//! flight). `docs/semantics.md` §11 is the normative description.
//!
//! Layout under a driver's state root:
//! - `lock`: held (flock) by the one manager of the root;
//! - `domains/<uuid>.json`: a [`StoredDefinition`], written when a domain is defined;
//! - `domains/<uuid>.status.json`: a [`StoredStatus`], rewritten with every event.

use crate::config::DomainConfig;
use crate::state::{DomainState, ShutoffReason};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use uuid::Uuid;

/// Whether a driver's domains die with its manager process or outlive it (§11).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ownership {
    /// Dies with the manager process (tests, short-lived embedders; QEMU's `machine.py`).
    #[default]
    Ephemeral,
    /// Outlives the manager; the next one reattaches (a host tool).
    Persistent,
}

/// What is wrong with a directory domkit was asked to use.
#[derive(Debug, thiserror::Error)]
#[error("refusing to use {path}: {problem}")]
pub struct UnsafeDir {
    /// The offending path (the directory itself or one of its ancestors).
    pub path: PathBuf,
    /// What is wrong: owner, mode, or a symlink.
    pub problem: String,
}

/// Create `dir` (and missing ancestors) with mode 0700, or verify an existing one: every
/// component, checked with `lstat`, must not be a symlink, must be owned by the effective
/// uid or root, and must not be writable by group or others — except root-owned sticky
/// directories such as `/tmp`, where nobody can rename or remove another user's entries.
/// The directory itself must be owned by the effective uid and have no group/other access.
pub fn ensure_private_dir(dir: &Path) -> Result<(), io::Error> {
    if !dir.is_absolute() {
        return Err(unsafe_dir(dir, "the path is not absolute"));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let mut current = PathBuf::from("/");
    for component in dir.components() {
        match component {
            Component::RootDir => continue,
            Component::Normal(name) => current.push(name),
            _ => return Err(unsafe_dir(dir, "the path has `.` or `..` components")),
        }
        match std::fs::symlink_metadata(&current) {
            Ok(meta) => check_component(&current, &meta, euid, current == dir)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match std::fs::DirBuilder::new().mode(0o700).create(&current) {
                    Ok(()) => {}
                    // Someone else made it between the lstat and here: check theirs.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                }
                let meta = std::fs::symlink_metadata(&current)?;
                check_component(&current, &meta, euid, current == dir)?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn check_component(
    path: &Path,
    meta: &std::fs::Metadata,
    euid: u32,
    is_target: bool,
) -> Result<(), io::Error> {
    if meta.file_type().is_symlink() {
        return Err(unsafe_dir(path, "it is a symbolic link"));
    }
    if !meta.is_dir() {
        return Err(unsafe_dir(path, "it is not a directory"));
    }
    let mode = meta.mode();
    if is_target {
        if meta.uid() != euid {
            return Err(unsafe_dir(
                path,
                &format!("it is owned by uid {}, not by us (uid {euid})", meta.uid()),
            ));
        }
        if mode & 0o077 != 0 {
            return Err(unsafe_dir(
                path,
                &format!(
                    "its mode is {:o}: group and others must have no access (0700)",
                    mode & 0o777
                ),
            ));
        }
        return Ok(());
    }
    if meta.uid() != euid && meta.uid() != 0 {
        return Err(unsafe_dir(
            path,
            &format!(
                "it is owned by uid {}, neither us (uid {euid}) nor root",
                meta.uid()
            ),
        ));
    }
    let sticky = mode & 0o1000 != 0;
    if mode & 0o022 != 0 && !(sticky && meta.uid() == 0) {
        return Err(unsafe_dir(
            path,
            &format!(
                "its mode is {:o}: group or others may write to it",
                mode & 0o7777
            ),
        ));
    }
    Ok(())
}

fn unsafe_dir(path: &Path, problem: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        UnsafeDir {
            path: path.to_owned(),
            problem: problem.to_owned(),
        },
    )
}

/// Replace `path` with `bytes` so that a process killed at any instant leaves either the
/// old or the new content, never a torn file: a temporary file in the same directory
/// (0600, `O_EXCL`), written, fsynced, renamed over `path`, then the directory fsynced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no parent directory"))?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let temp = dir.join(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        Uuid::new_v4().simple()
    ));
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
}

/// A domain's definition as persisted by `define` (removed by `undefine`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredDefinition {
    /// Format version of this record.
    pub format: u32,
    /// The config, with its uuid filled in.
    pub config: DomainConfig,
}

/// An operation that was in flight when the status was written, with what a new manager
/// needs to end it consistently (§11.4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "operation", rename_all = "snake_case")]
pub enum InFlight {
    /// A save to `target`, written under `temp`; `committing` once the rename may have
    /// happened (the temporary file is gone exactly when it did).
    Save {
        /// The final name.
        target: PathBuf,
        /// The temporary file being written.
        temp: PathBuf,
        /// Whether the vCPUs were stopped before the save began.
        was_paused: bool,
        /// The file is being renamed to `target`.
        committing: bool,
    },
}

/// What a new manager needs to continue a domain: its last event `seq` and state, and any
/// operation in flight. Rewritten atomically with every event of the domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredStatus {
    /// The last `seq` used (the next manager continues after it).
    pub seq: u64,
    /// The state after that event.
    pub state: DomainState,
    /// An operation in flight, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<InFlight>,
    /// The end the manager had decided and was carrying out (a guest poweroff completing a
    /// shutdown, a crash under `on_crash = destroy`: [`crate::Lifecycle::pending_end`]), so
    /// that a next manager which finds the backend domain gone reports that end, not an
    /// unexplained one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_end: Option<ShutoffReason>,
    /// The backend's record of the running instance's devices, hotplugged ones included
    /// (§14.3): the next manager reattaches with it. Opaque to the core.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<serde_json::Value>,
}

/// A domain found in a state root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDomain {
    /// Its definition.
    pub definition: StoredDefinition,
    /// Its status, if one was written (none for a domain defined but never changed).
    pub status: Option<StoredStatus>,
}

/// The per-domain records of one state root (see the module docs for the layout).
#[derive(Debug, Clone)]
pub struct DefinitionStore {
    dir: PathBuf,
}

/// The current [`StoredDefinition::format`].
pub const DEFINITION_FORMAT: u32 = 1;

impl DefinitionStore {
    /// Open (create 0700 or verify) `<state_root>/domains`.
    pub fn open(state_root: &Path) -> io::Result<Self> {
        ensure_private_dir(state_root)?;
        let dir = state_root.join("domains");
        ensure_private_dir(&dir)?;
        Ok(DefinitionStore { dir })
    }

    fn definition_path(&self, uuid: Uuid) -> PathBuf {
        self.dir.join(format!("{uuid}.json"))
    }

    fn status_path(&self, uuid: Uuid) -> PathBuf {
        self.dir.join(format!("{uuid}.status.json"))
    }

    /// Persist a definition (durable when this returns).
    pub fn save_definition(&self, config: &DomainConfig) -> io::Result<()> {
        let uuid = config
            .uuid
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "config without uuid"))?;
        let record = StoredDefinition {
            format: DEFINITION_FORMAT,
            config: config.clone(),
        };
        let json = serde_json::to_vec_pretty(&record).map_err(io::Error::other)?;
        write_atomic(&self.definition_path(uuid), &json)
    }

    /// Persist a domain's status.
    pub fn save_status(&self, uuid: Uuid, status: &StoredStatus) -> io::Result<()> {
        let json = serde_json::to_vec(status).map_err(io::Error::other)?;
        write_atomic(&self.status_path(uuid), &json)
    }

    /// Remove a domain's records durably (undefine): the definition first, so a crash in
    /// between leaves no definition (a leftover status is ignored and removed on load).
    pub fn remove(&self, uuid: Uuid) -> io::Result<()> {
        for path in [self.definition_path(uuid), self.status_path(uuid)] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        File::open(&self.dir)?.sync_all()
    }

    /// Every stored domain. A record that cannot be read is an error naming the file (it
    /// cannot be torn: writes are atomic); leftover temporary files are removed.
    pub fn load_all(&self) -> io::Result<Vec<StoredDomain>> {
        let mut out = Vec::new();
        let mut statuses = std::collections::BTreeSet::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.contains(".tmp-") {
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            if let Some(uuid) = name.strip_suffix(".status.json") {
                statuses.insert(uuid.to_owned());
                continue;
            }
            let Some(uuid) = name.strip_suffix(".json") else {
                continue;
            };
            let Ok(uuid) = uuid.parse::<Uuid>() else {
                continue;
            };
            let definition: StoredDefinition = read_json(&entry.path())?;
            let status_path = self.status_path(uuid);
            let status = match std::fs::metadata(&status_path) {
                Ok(_) => Some(read_json(&status_path)?),
                Err(_) => None,
            };
            out.push(StoredDomain { definition, status });
        }
        // A status without its definition: an undefine that crashed half-way.
        for uuid in statuses {
            if !self.dir.join(format!("{uuid}.json")).exists() {
                let _ = std::fs::remove_file(self.dir.join(format!("{uuid}.status.json")));
            }
        }
        out.sort_by(|a, b| a.definition.config.name.cmp(&b.definition.config.name));
        Ok(out)
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> io::Result<T> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a valid domkit record: {e}", path.display()),
        )
    })
}

/// Make a file private to us (0600), e.g. one another program created for domkit.
pub fn restrict_file(path: &Path) -> io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}
