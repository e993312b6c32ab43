//! The QEMU driver's own errors, and their mapping into domkit's [`Error`].
//!
//! Every message says what went wrong and what to do about it.

use std::fmt;
use std::process::ExitStatus;
use std::time::Duration;

use domkit_core::{Error, Operation};

use crate::qmp::QmpError;

/// The backend name used in core errors.
pub const BACKEND: &str = "qemu";

/// QEMU could not be launched, or exited / failed before its monitor was usable (after QEMU's
/// python `VMLaunchFailure`: the exit status, the command and the output say why).
#[derive(Debug)]
pub struct LaunchFailure {
    /// What failed, e.g. `qemu exited before connecting to the monitor`.
    pub what: String,
    /// The exit status, when the process ran and exited.
    pub exit_status: Option<ExitStatus>,
    /// The full command line, one element per argument.
    pub argv: Vec<String>,
    /// QEMU's captured stdout/stderr (possibly truncated at the start).
    pub output: String,
}

impl fmt::Display for LaunchFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QEMU failed to launch: {}", self.what)?;
        if let Some(status) = self.exit_status {
            write!(f, " ({status})")?;
        }
        let output = self.output.trim();
        if !output.is_empty() {
            write!(f, "; QEMU said: {output}")?;
        }
        write!(f, "; command: {}", shell_quote(&self.argv))?;
        f.write_str(
            "; check the binary (qemu.binary / PATH) and the config, or run the command by hand",
        )
    }
}

impl std::error::Error for LaunchFailure {}

/// Errors of the QEMU driver before they are mapped into [`Error`].
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// QEMU did not come up.
    #[error("{0}")]
    Launch(Box<LaunchFailure>),
    /// A QMP command failed.
    #[error("QMP `{command}`: {source}")]
    Qmp {
        /// The command.
        command: String,
        /// The QMP client's error.
        #[source]
        source: QmpError,
    },
}

impl QemuError {
    /// Wrap a QMP error with the command it came from.
    pub fn qmp(command: &str, source: QmpError) -> Self {
        QemuError::Qmp {
            command: command.to_owned(),
            source,
        }
    }

    /// Map into domkit's error for `operation` on `domain`.
    pub fn into_core(self, operation: Operation, domain: &str) -> Error {
        match self {
            QemuError::Launch(failure) => Error::Backend {
                backend: BACKEND.into(),
                message: failure.to_string(),
            },
            QemuError::Qmp { command, source } => qmp_to_core(operation, domain, &command, source),
        }
    }
}

/// Map a QMP error from `command`, sent for `operation` on `domain`, into domkit's error.
pub fn qmp_to_core(operation: Operation, domain: &str, command: &str, err: QmpError) -> Error {
    match err {
        QmpError::CommandFailed { class, desc } => Error::Backend {
            backend: BACKEND.into(),
            message: format!(
                "{operation}: QEMU refused `{command}`: {class}: {desc} (check the domain's \
                 state; the QEMU log in its runtime directory may say more)"
            ),
        },
        QmpError::Timeout { after, .. } => Error::Timeout {
            operation,
            after,
            hint: format!(
                "QEMU did not answer `{command}`; it may be overloaded or hung: retry, or \
                 destroy the domain"
            ),
        },
        QmpError::Protocol { message, excerpt } => Error::Protocol {
            message: format!(
                "QEMU monitor of {domain} sent bytes that are not QMP during `{command}`: \
                 {message} (bytes: {excerpt}); the monitor connection was closed, destroy the \
                 domain to recover"
            ),
        },
        QmpError::UnexpectedReply { message, .. } => Error::Protocol {
            message: format!("unexpected reply to `{command}` from QEMU: {message}"),
        },
        QmpError::Disconnected => Error::ControlBroken {
            domain: domain.to_owned(),
            reason: format!(
                "the QMP connection closed during `{command}` ({operation}): QEMU exited or \
                 closed its monitor; the domain's state says which"
            ),
        },
        QmpError::Io(e) => Error::ControlBroken {
            domain: domain.to_owned(),
            reason: format!("QMP I/O error during `{command}` ({operation}): {e}"),
        },
    }
}

/// A [`Error::Timeout`] with a hint.
pub fn timeout(operation: Operation, after: Duration, hint: impl Into<String>) -> Error {
    Error::Timeout {
        operation,
        after,
        hint: hint.into(),
    }
}

/// A [`Error::Backend`] of this backend.
pub fn backend(message: impl Into<String>) -> Error {
    Error::Backend {
        backend: BACKEND.into(),
        message: message.into(),
    }
}

/// The argv as a shell-pasteable line (for humans: error messages and logs only).
pub fn shell_quote(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@%".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_failure_message_has_status_output_and_command() {
        use std::os::unix::process::ExitStatusExt;
        let failure = LaunchFailure {
            what: "qemu exited before connecting to the monitor".into(),
            exit_status: Some(ExitStatus::from_raw(1 << 8)),
            argv: vec!["qemu-system-x86_64".into(), "-append".into(), "a b".into()],
            output: "qemu-system-x86_64: -foo: invalid option\n".into(),
        };
        let msg = QemuError::Launch(Box::new(failure))
            .into_core(Operation::Start, "d")
            .to_string();
        assert!(msg.contains("exit status: 1"), "{msg}");
        assert!(msg.contains("invalid option"), "{msg}");
        assert!(msg.contains("qemu-system-x86_64 -append 'a b'"), "{msg}");
    }

    #[test]
    fn qmp_errors_map_to_typed_core_errors() {
        let e = qmp_to_core(
            Operation::Resume,
            "d",
            "cont",
            QmpError::CommandFailed {
                class: "GenericError".into(),
                desc: "Resetting the Virtual Machine is required".into(),
            },
        );
        assert!(matches!(e, Error::Backend { .. }), "{e}");
        let e = qmp_to_core(Operation::Pause, "d", "stop", QmpError::Disconnected);
        assert!(matches!(e, Error::ControlBroken { .. }), "{e}");
        let e = qmp_to_core(
            Operation::Pause,
            "d",
            "stop",
            QmpError::Timeout {
                command: "stop".into(),
                after: Duration::from_secs(1),
            },
        );
        assert!(matches!(e, Error::Timeout { .. }), "{e}");
        let e = qmp_to_core(
            Operation::Pause,
            "d",
            "stop",
            QmpError::Protocol {
                message: "invalid JSON".into(),
                excerpt: "xx".into(),
            },
        );
        assert!(matches!(e, Error::Protocol { .. }), "{e}");
    }
}
