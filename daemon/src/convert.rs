//! Conversions between the library's types (`domkit_core`) and the wire types of
//! `domkit.v1` (`crate::pb`), both ways, and the error mapping of docs/daemon.md: every
//! [`domkit_core::Error`] variant becomes a gRPC status code plus a typed [`pb::ErrorDetail`]
//! whose `message` is the library's message, word for word.

use crate::pb;
use domkit_core::{
    AgentError, ConfigError, ControlState, DomainEvent, DomainId, DomainInfo, DomainState, Error,
    EventKind, Operation, ShutdownMode, ShutdownOutcome, ShutdownWait,
};
use prost::Message as _;
use tonic::{Code, Status};

/// The wire form of a domain state.
pub fn state_to_pb(state: &DomainState) -> pb::DomainState {
    let name = match state {
        DomainState::NoState => pb::StateName::NoState,
        DomainState::Running(_) => pb::StateName::Running,
        DomainState::Blocked(_) => pb::StateName::Blocked,
        DomainState::Paused(_) => pb::StateName::Paused,
        DomainState::ShuttingDown(_) => pb::StateName::ShuttingDown,
        DomainState::Shutoff(_) => pb::StateName::Shutoff,
        DomainState::Crashed(_) => pb::StateName::Crashed,
        DomainState::PmSuspended(_) => pb::StateName::PmSuspended,
    };
    pb::DomainState {
        name: name as i32,
        reason: state.reason_name(),
    }
}

/// The library's state for a wire state, `None` if the peer sent a state or reason this
/// version does not know.
pub fn state_from_pb(state: &pb::DomainState) -> Option<DomainState> {
    let name = match pb::StateName::try_from(state.name).ok()? {
        pb::StateName::Unspecified => return None,
        pb::StateName::NoState => return Some(DomainState::NoState),
        pb::StateName::Running => "running",
        pb::StateName::Blocked => "blocked",
        pb::StateName::Paused => "paused",
        pb::StateName::ShuttingDown => "shutting_down",
        pb::StateName::Shutoff => "shutoff",
        pb::StateName::Crashed => "crashed",
        pb::StateName::PmSuspended => "pm_suspended",
    };
    serde_json::from_value(serde_json::json!({"state": name, "reason": state.reason})).ok()
}

/// A wire state as text, the way the library prints a state (`running (booted)`).
pub fn state_text(state: Option<&pb::DomainState>) -> String {
    match state.and_then(state_from_pb) {
        Some(s) => s.to_string(),
        None => "unknown".into(),
    }
}

/// The wire form of an operation. Mapped by the library's serde name (`pm_suspend` ->
/// `OPERATION_PM_SUSPEND`), so an operation the library gains maps as soon as the schema
/// names it, and to `OPERATION_UNSPECIFIED` until then.
pub fn operation_to_pb(op: Operation) -> pb::Operation {
    let name = serde_json::to_value(op)
        .ok()
        .and_then(|v| v.as_str().map(str::to_ascii_uppercase))
        .unwrap_or_default();
    pb::Operation::from_str_name(&format!("OPERATION_{name}")).unwrap_or(pb::Operation::Unspecified)
}

/// The library's operation for a wire one (`None` for unspecified/unknown values).
pub fn operation_from_pb(op: i32) -> Option<Operation> {
    let wire = pb::Operation::try_from(op).ok()?;
    let name = wire
        .as_str_name()
        .strip_prefix("OPERATION_")?
        .to_ascii_lowercase();
    serde_json::from_value(serde_json::Value::String(name)).ok()
}

/// The wire form of a domain identity on `backend`.
pub fn id_to_pb(id: &DomainId, backend: &str) -> pb::DomainIdentity {
    pb::DomainIdentity {
        name: id.name.clone(),
        uuid: id.uuid.to_string(),
        backend: backend.to_string(),
    }
}

/// The wire form of a control state.
pub fn control_to_pb(control: &ControlState) -> pb::ControlState {
    use pb::control_state::Kind;
    match control {
        ControlState::Ok => pb::ControlState {
            kind: Kind::Ok as i32,
            ..Default::default()
        },
        ControlState::Job { operation } => pb::ControlState {
            kind: Kind::Job as i32,
            operation: operation_to_pb(*operation) as i32,
            reason: String::new(),
        },
        ControlState::Broken { reason } => pb::ControlState {
            kind: Kind::Broken as i32,
            operation: 0,
            reason: reason.clone(),
        },
    }
}

/// The wire form of a domain summary; `seq` is the last event's.
pub fn info_to_pb(info: &DomainInfo, backend: &str, seq: u64) -> pb::DomainInfo {
    pb::DomainInfo {
        id: Some(id_to_pb(&info.id, backend)),
        state: Some(state_to_pb(&info.state)),
        control: Some(control_to_pb(&info.control)),
        vcpus: info.vcpus,
        memory_mib: info.memory_mib,
        backend_handle: info.backend_handle.clone().unwrap_or_default(),
        seq,
    }
}

/// The wire form of an event.
pub fn event_to_pb(ev: &DomainEvent, backend: &str) -> pb::Event {
    let value = serde_json::to_value(ev.kind).unwrap_or_default();
    let field = |k: &str| {
        value
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    pb::Event {
        domain: Some(id_to_pb(&ev.domain, backend)),
        seq: ev.seq,
        timestamp_us: ev.timestamp_us,
        kind: field("event"),
        detail: field("detail"),
        reconciled: ev.reconciled,
    }
}

/// The library's event kind for a wire event (`None` if this version does not know it).
pub fn event_kind_from_pb(ev: &pb::Event) -> Option<EventKind> {
    let value = if ev.detail.is_empty() {
        serde_json::json!({"event": ev.kind})
    } else {
        serde_json::json!({"event": ev.kind, "detail": ev.detail})
    };
    serde_json::from_value(value).ok()
}

/// The library's shutdown mode for a wire one.
pub fn shutdown_mode_from_pb(mode: i32) -> ShutdownMode {
    match pb::ShutdownMode::try_from(mode) {
        Ok(pb::ShutdownMode::Acpi) => ShutdownMode::Acpi,
        Ok(pb::ShutdownMode::Agent) => ShutdownMode::Agent,
        Ok(pb::ShutdownMode::Paravirt) => ShutdownMode::Paravirt,
        Ok(pb::ShutdownMode::Default) | Err(_) => ShutdownMode::Default,
    }
}

/// The library's shutdown wait for a wire one.
pub fn shutdown_wait_from_pb(wait: i32) -> ShutdownWait {
    match pb::ShutdownWait::try_from(wait) {
        Ok(pb::ShutdownWait::Acknowledged) => ShutdownWait::Acknowledged,
        Ok(pb::ShutdownWait::Completed) | Err(_) => ShutdownWait::Completed,
    }
}

/// The wire form of a shutdown outcome.
pub fn shutdown_outcome_to_pb(outcome: ShutdownOutcome) -> pb::ShutdownOutcome {
    match outcome {
        ShutdownOutcome::Acknowledged => pb::ShutdownOutcome::Acknowledged,
        ShutdownOutcome::Completed => pb::ShutdownOutcome::Completed,
        ShutdownOutcome::Destroyed => pb::ShutdownOutcome::Destroyed,
    }
}

/// Which check of a config failed, and the field at fault when the check names one.
fn config_error_fields(e: &ConfigError) -> (&'static str, String) {
    match e {
        ConfigError::Parse { .. } => ("parse", String::new()),
        ConfigError::BadName { .. } => ("bad_name", "name".into()),
        ConfigError::MemoryTooSmall(_) => ("memory_too_small", "memory_mib".into()),
        ConfigError::BadVcpus(_) => ("bad_vcpus", "vcpus".into()),
        ConfigError::MissingFile { field, .. } => ("missing_file", field.clone()),
        ConfigError::RelativePath { field, .. } => ("relative_path", field.clone()),
        ConfigError::BadBootDisk { .. } => ("bad_boot_disk", "boot.index".into()),
        ConfigError::BadMac { index, .. } => ("bad_mac", format!("nics[{index}].mac")),
        ConfigError::BadChannel { index, .. } => ("bad_channel", format!("channels[{index}]")),
        ConfigError::SocketPathTooLong { what, .. } => ("socket_path_too_long", what.clone()),
        ConfigError::BadCmdline(_) => ("bad_cmdline", "boot.cmdline".into()),
        ConfigError::BadDeviceId { .. } => ("bad_device_id", String::new()),
        ConfigError::DuplicateDeviceId { .. } => ("duplicate_device_id", String::new()),
        ConfigError::DuplicateMac { .. } => ("duplicate_mac", String::new()),
        ConfigError::NotAFile { field, .. } => ("not_a_file", field.clone()),
        ConfigError::MissingBridge { .. } => ("missing_bridge", String::new()),
        ConfigError::NoFreeSlot { .. } => ("no_free_slot", String::new()),
        ConfigError::BadDeviceChange { .. } => ("bad_device_change", String::new()),
        // ConfigError is non-exhaustive: a newer check is reported by its message alone.
        _ => ("other", String::new()),
    }
}

/// The agent error's kind name and typed fields in `d`, and its status code.
fn agent_error_fields(e: &AgentError, d: &mut pb::ErrorDetail) -> Code {
    let (name, code) = match e {
        AgentError::CommandFailed { class, desc } => {
            d.agent_class = class.clone();
            d.reason = desc.clone();
            ("command_failed", Code::FailedPrecondition)
        }
        AgentError::Unsupported { reason, .. } => {
            d.reason = reason.clone();
            ("unsupported", Code::Unimplemented)
        }
        AgentError::Timeout { after, .. } => {
            d.after_ms = after.as_millis() as u64;
            ("timeout", Code::DeadlineExceeded)
        }
        AgentError::Disconnected => ("disconnected", Code::Unavailable),
        AgentError::NotConnected { .. } => ("not_connected", Code::Unavailable),
        AgentError::Protocol { .. } => ("protocol", Code::Internal),
        AgentError::InvalidArgument(_) => ("invalid_argument", Code::InvalidArgument),
        AgentError::Io(source) => {
            d.io_error = source.to_string();
            d.os_errno = source.raw_os_error().unwrap_or(0);
            ("io", Code::Internal)
        }
    };
    d.agent_error = name.into();
    code
}

/// The typed detail of a library error.
pub fn error_detail(e: &Error) -> (Code, pb::ErrorDetail) {
    use pb::ErrorKind as K;
    let mut d = pb::ErrorDetail {
        message: e.to_string(),
        ..Default::default()
    };
    let code = match e {
        Error::NotFound { what } => {
            d.kind = K::NotFound as i32;
            d.what = what.clone();
            Code::NotFound
        }
        Error::AlreadyExists { what } => {
            d.kind = K::AlreadyExists as i32;
            d.what = what.clone();
            Code::AlreadyExists
        }
        Error::InvalidConfig(ce) => {
            d.kind = K::InvalidConfig as i32;
            let (check, field) = config_error_fields(ce);
            d.config_error = check.into();
            d.field = field;
            Code::InvalidArgument
        }
        Error::InvalidState { current, operation } => {
            d.kind = K::InvalidState as i32;
            d.current = Some(state_to_pb(current));
            d.operation = operation_to_pb(*operation) as i32;
            Code::FailedPrecondition
        }
        Error::Unsupported {
            operation,
            backend,
            reason,
        } => {
            d.kind = K::Unsupported as i32;
            d.operation = operation_to_pb(*operation) as i32;
            d.backend = backend.clone();
            d.reason = reason.clone();
            Code::Unimplemented
        }
        Error::Timeout {
            operation,
            after,
            hint,
        } => {
            d.kind = K::Timeout as i32;
            d.operation = operation_to_pb(*operation) as i32;
            d.after_ms = after.as_millis() as u64;
            d.hint = hint.clone();
            Code::DeadlineExceeded
        }
        Error::Backend { backend, message } => {
            d.kind = K::Backend as i32;
            d.backend = backend.clone();
            d.reason = message.clone();
            Code::Internal
        }
        Error::ControlBroken { domain, reason } => {
            d.kind = K::ControlBroken as i32;
            d.domain = domain.clone();
            d.reason = reason.clone();
            Code::Unavailable
        }
        Error::Io { context, source } => {
            d.kind = K::Io as i32;
            d.context = context.clone();
            d.io_error = source.to_string();
            d.os_errno = source.raw_os_error().unwrap_or(0);
            Code::Internal
        }
        Error::Interrupted {
            operation,
            by,
            state,
        } => {
            d.kind = K::Interrupted as i32;
            d.operation = operation_to_pb(*operation) as i32;
            d.by = operation_to_pb(*by) as i32;
            d.current = Some(state_to_pb(state));
            Code::Aborted
        }
        Error::BadSaveFile { path, reason } => {
            d.kind = K::BadSaveFile as i32;
            d.path = path.display().to_string();
            d.reason = reason.clone();
            Code::InvalidArgument
        }
        Error::RootInUse { path, holder_pid } => {
            d.kind = K::RootInUse as i32;
            d.path = path.display().to_string();
            d.holder_pid = *holder_pid;
            Code::Unavailable
        }
        Error::EventsLost {
            domain,
            after,
            resumed_at,
        } => {
            d.kind = K::EventsLost as i32;
            d.domain = domain.clone();
            d.after_seq = *after;
            d.resumed_at_seq = *resumed_at;
            Code::OutOfRange
        }
        Error::Busy { what, holder } => {
            d.kind = K::Busy as i32;
            d.what = what.clone();
            d.reason = holder.clone();
            Code::ResourceExhausted
        }
        Error::Protocol { message } => {
            d.kind = K::Protocol as i32;
            d.reason = message.clone();
            Code::Internal
        }
        Error::NoGuestAgent { domain, reason } => {
            d.kind = K::NoGuestAgent as i32;
            d.domain = domain.clone();
            d.reason = reason.clone();
            Code::FailedPrecondition
        }
        Error::GuestAgent { domain, source } => {
            d.kind = K::GuestAgent as i32;
            d.domain = domain.clone();
            d.reason = source.to_string();
            agent_error_fields(source, &mut d)
        }
        // Error is non-exhaustive: a newer variant keeps its message.
        _ => Code::Unknown,
    };
    (code, d)
}

/// A gRPC status carrying `detail` (its message is the detail's).
pub fn status_with_detail(code: Code, detail: &pb::ErrorDetail) -> Status {
    Status::with_details(code, detail.message.clone(), detail.encode_to_vec().into())
}

/// The gRPC status of a library error.
pub fn error_to_status(e: &Error) -> Status {
    let (code, detail) = error_detail(e);
    status_with_detail(code, &detail)
}

/// A daemon-level refusal (not a library error): `kind` with `message`.
pub fn daemon_status(code: Code, kind: pb::ErrorKind, message: impl Into<String>) -> Status {
    let detail = pb::ErrorDetail {
        kind: kind as i32,
        message: message.into(),
        ..Default::default()
    };
    status_with_detail(code, &detail)
}

/// The typed detail of a status a peer sent, if it carries one.
pub fn detail_of(status: &Status) -> Option<pb::ErrorDetail> {
    if status.details().is_empty() {
        return None;
    }
    pb::ErrorDetail::decode(status.details()).ok()
}

/// The snake_case name of an error kind, as docs/semantics.md §7 spells it.
pub fn kind_name(kind: i32) -> &'static str {
    use pb::ErrorKind as K;
    match K::try_from(kind).unwrap_or(K::Unspecified) {
        K::Unspecified => "unknown",
        K::NotFound => "not_found",
        K::AlreadyExists => "already_exists",
        K::InvalidConfig => "invalid_config",
        K::InvalidState => "invalid_state",
        K::Unsupported => "unsupported",
        K::Timeout => "timeout",
        K::Backend => "backend",
        K::ControlBroken => "control_broken",
        K::Io => "io",
        K::Interrupted => "interrupted",
        K::BadSaveFile => "bad_save_file",
        K::RootInUse => "root_in_use",
        K::Protocol => "protocol",
        K::PermissionDenied => "permission_denied",
        K::BadRequest => "bad_request",
        K::EventsLost => "events_lost",
        K::Busy => "busy",
        K::NoGuestAgent => "no_guest_agent",
        K::GuestAgent => "guest_agent",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use domkit_core::{PausedReason, ShutoffReason};
    use std::time::Duration;

    #[test]
    fn states_round_trip() {
        for s in [
            DomainState::NoState,
            DomainState::Paused(PausedReason::User),
            DomainState::Shutoff(ShutoffReason::Saved),
        ] {
            assert_eq!(state_from_pb(&state_to_pb(&s)), Some(s));
        }
    }

    #[test]
    fn every_error_keeps_its_message_and_kind() {
        let errors = [
            (Error::domain_not_found("web1"), "not_found", Code::NotFound),
            (
                Error::InvalidState {
                    current: DomainState::Shutoff(ShutoffReason::Unknown),
                    operation: Operation::Pause,
                },
                "invalid_state",
                Code::FailedPrecondition,
            ),
            (
                Error::Timeout {
                    operation: Operation::Shutdown,
                    after: Duration::from_secs(3),
                    hint: "h".into(),
                },
                "timeout",
                Code::DeadlineExceeded,
            ),
            (
                Error::io("reading x", std::io::Error::from_raw_os_error(13)),
                "io",
                Code::Internal,
            ),
            (
                Error::NoGuestAgent {
                    domain: "web1".into(),
                    reason: String::new(),
                },
                "no_guest_agent",
                Code::FailedPrecondition,
            ),
            (
                Error::agent(
                    "web1",
                    AgentError::Timeout {
                        command: "guest-ping".into(),
                        after: Duration::from_secs(2),
                    },
                ),
                "guest_agent",
                Code::DeadlineExceeded,
            ),
            (
                Error::agent(
                    "web1",
                    AgentError::Unsupported {
                        command: "guest-exec".into(),
                        reason: "disabled".into(),
                    },
                ),
                "guest_agent",
                Code::Unimplemented,
            ),
        ];
        for (e, kind, code) in errors {
            let status = error_to_status(&e);
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), e.to_string());
            let d = detail_of(&status).expect("detail");
            assert_eq!(kind_name(d.kind), kind);
            assert_eq!(d.message, e.to_string());
        }
    }
}
