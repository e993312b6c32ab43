//! The one error type of domkit's public API. Every message says what was wrong or what to do.

use crate::config::ConfigError;
use crate::DomainState;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// An operation of the public API, named in errors and capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// Define a domain.
    Define,
    /// Undefine a domain.
    Undefine,
    /// Start a domain.
    Start,
    /// Pause the vCPUs.
    Pause,
    /// Resume the vCPUs.
    Resume,
    /// Graceful shutdown.
    Shutdown,
    /// Graceful reboot.
    Reboot,
    /// Hard reset.
    Reset,
    /// Hard stop.
    Destroy,
    /// Save to a file.
    Save,
    /// Restore from a file.
    Restore,
    /// Power-management suspend.
    PmSuspend,
    /// Power-management wakeup.
    PmWakeup,
    /// Read the state.
    State,
    /// Wait for an event ([`crate::Domain::wait_for_event`]).
    WaitEvent,
    /// Read the statistics ([`crate::Domain::stats`]).
    Stats,
    /// Open the serial console ([`crate::Domain::console`]).
    Console,
    /// Attach a device ([`crate::Domain::attach_device`], §14).
    AttachDevice,
    /// Detach a device ([`crate::Domain::detach_device`], §14).
    DetachDevice,
    /// Change a CD-ROM's medium ([`crate::Domain::change_media`], §14).
    ChangeMedia,
    /// Talk to the guest agent ([`crate::Domain::guest_agent`]).
    GuestAgent,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = serde_json::to_value(self).unwrap_or_default();
        f.write_str(v.as_str().unwrap_or("?"))
    }
}

/// domkit's error type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No such domain (or other named object).
    #[error("{what} not found: check the name/uuid (list domains to see what exists)")]
    NotFound {
        /// What was looked up, e.g. `domain "web1"`.
        what: String,
    },
    /// A domain with this name or uuid already exists.
    #[error("{what} already exists: pick another name/uuid or undefine the old one")]
    AlreadyExists {
        /// What clashed.
        what: String,
    },
    /// The domain config is invalid.
    #[error("invalid domain config: {0}")]
    InvalidConfig(#[from] ConfigError),
    /// The operation is not allowed in the domain's current state.
    #[error("cannot {operation} a domain that is {current}")]
    InvalidState {
        /// The state the domain was in.
        current: DomainState,
        /// The operation refused.
        operation: Operation,
    },
    /// The backend does not support the operation (never a silent `Ok`).
    #[error("{operation} is not supported by the {backend} backend: {reason}")]
    Unsupported {
        /// The operation.
        operation: Operation,
        /// The backend's name (`qemu`, `libxl`).
        backend: String,
        /// Why, and what to use instead if anything.
        reason: String,
    },
    /// The operation did not finish in time.
    #[error("{operation} timed out after {after:?}{}", hint_suffix(.hint))]
    Timeout {
        /// The operation.
        operation: Operation,
        /// How long was waited.
        after: Duration,
        /// What to do about it (may be empty).
        hint: String,
    },
    /// The backend failed the operation.
    #[error("{backend} backend: {message}")]
    Backend {
        /// The backend's name.
        backend: String,
        /// What the backend said, with context.
        message: String,
    },
    /// The domain's control channel (monitor / hypervisor context) is broken.
    #[error("control channel to domain {domain} is broken: {reason}")]
    ControlBroken {
        /// The domain.
        domain: String,
        /// What broke.
        reason: String,
    },
    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, e.g. `creating save file /x/y`.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The operation was preempted by another one (a `destroy`, §6.0) and did not finish.
    #[error("{operation} was interrupted by a {by}: the domain is now {state}")]
    Interrupted {
        /// The operation that was interrupted.
        operation: Operation,
        /// The operation that preempted it.
        by: Operation,
        /// The state the domain ended in.
        state: DomainState,
    },
    /// A save file that cannot be restored: truncated, damaged, not a domkit save file, or
    /// saved from another domain. Checked before the backend reads the stream; the file is
    /// left as it is.
    #[error("cannot restore from {path}: {reason}")]
    BadSaveFile {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Another manager process holds this driver's root (one manager per root): nothing of
    /// its domains was touched.
    #[error("{path} is in use by another domkit manager{}: stop it, or give this one another root", holder_suffix(.holder_pid))]
    RootInUse {
        /// The lock file of the root.
        path: std::path::PathBuf,
        /// The holder's pid, if it wrote one.
        holder_pid: Option<u32>,
    },
    /// Events a caller asked for are no longer kept, or were dropped while it lagged
    /// (`docs/semantics.md` §12.2): the ones with `after < seq < resumed_at` are missing.
    /// Take a new [`crate::Domain::snapshot`] to resynchronise.
    #[error("events {} of domain {domain} are lost (no longer kept, or dropped while lagging): take a new snapshot() to resynchronise", lost_range(*.after, *.resumed_at))]
    EventsLost {
        /// The domain.
        domain: String,
        /// The last `seq` the caller has (0: none).
        after: u64,
        /// The first `seq` that can still be delivered after the gap.
        resumed_at: u64,
    },
    /// A resource that admits one user at a time is taken (the console's writer, §12.4).
    #[error("{what} is busy: {holder}")]
    Busy {
        /// What is taken, e.g. `console of domain "web1" (writer)`.
        what: String,
        /// Who holds it and what to do, e.g. `another writer is attached; open it read-only`.
        holder: String,
    },
    /// A peer spoke the protocol wrongly (malformed bytes, unexpected reply).
    #[error("protocol error: {message}")]
    Protocol {
        /// What was wrong.
        message: String,
    },
    /// The domain has no guest agent channel (`docs/semantics.md` §13.1).
    #[error("domain {domain} has no guest agent channel: add `[[channels]] kind = \"guest_agent\"` to its config{}", reason_suffix(.reason))]
    NoGuestAgent {
        /// The domain.
        domain: String,
        /// More about why (may be empty).
        reason: String,
    },
    /// A guest agent command failed: the agent's own typed error (unsupported, timeout,
    /// protocol, refused...), with the domain it was for (§13).
    #[error("guest agent of domain {domain}: {source}")]
    GuestAgent {
        /// The domain.
        domain: String,
        /// What the agent client said.
        #[source]
        source: domkit_agent::AgentError,
    },
}

fn reason_suffix(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(" ({reason})")
    }
}

fn lost_range(after: u64, resumed_at: u64) -> String {
    let first = after.saturating_add(1);
    let last = resumed_at.saturating_sub(1);
    if first == last {
        format!("seq {first}")
    } else {
        format!("seq {first}..={last}")
    }
}

fn holder_suffix(pid: &Option<u32>) -> String {
    match pid {
        Some(pid) => format!(" (pid {pid})"),
        None => String::new(),
    }
}

fn hint_suffix(hint: &str) -> String {
    if hint.is_empty() {
        String::new()
    } else {
        format!(": {hint}")
    }
}

impl Error {
    /// An I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// A guest agent error of `domain`.
    pub fn agent(domain: &str, source: domkit_agent::AgentError) -> Self {
        Error::GuestAgent {
            domain: domain.to_owned(),
            source,
        }
    }

    /// A `NotFound` for a domain name.
    pub fn domain_not_found(name: &str) -> Self {
        Error::NotFound {
            what: format!("domain {name:?}"),
        }
    }
}

/// domkit's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
