//! The `domkit` CLI verbs that talk to a domkitd, with virsh's names (`define`, `list`,
//! `start`, `shutdown`, `dominfo`, `domstate`, `event`, ...). The `domkit` binary
//! (examples/src/bin/domkit.rs) flattens [`Verb`] into its subcommands and hands them to
//! [`main`].
//!
//! Errors print the library's message (`domkit: error: MESSAGE`) and exit with a code per
//! kind ([`exit`]); output into a closed pipe ends quietly.

use crate::client::{self, ClientError, ClientTls, Target};
use crate::convert::{self, state_text};
use crate::pb;
use clap::{Args, Subcommand, ValueEnum};
use futures::StreamExt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The exit codes of the domkitd verbs (stable; `domkit --help` lists them).
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// The operation failed (any error kind without a code of its own).
    pub const ERROR: u8 = 1;
    /// Bad usage (arguments, address).
    pub const USAGE: u8 = 2;
    /// No such domain (`not_found`).
    pub const NOT_FOUND: u8 = 3;
    /// Not allowed in the domain's state (`invalid_state`).
    pub const INVALID_STATE: u8 = 4;
    /// Timed out (`timeout`).
    pub const TIMEOUT: u8 = 5;
    /// Refused: a read-only connection (`permission_denied`).
    pub const PERMISSION_DENIED: u8 = 6;
    /// domkitd cannot be reached (not running, no permission on the socket, TLS refused).
    pub const UNREACHABLE: u8 = 7;
    /// The domain config is invalid (`invalid_config`).
    pub const INVALID_CONFIG: u8 = 8;
}

/// The help text listing the exit codes.
pub const EXIT_CODES_HELP: &str = "\
Exit codes of the domkitd verbs: 0 ok, 1 operation failed, 2 usage, 3 not_found,
4 invalid_state, 5 timeout, 6 permission_denied (read-only connection), 7 domkitd
unreachable, 8 invalid_config. Errors print the library's message.";

/// How to reach domkitd (global options of `domkit`).
#[derive(Args, Debug, Clone, Default)]
pub struct ConnectArgs {
    /// domkitd's Unix socket (the same as `-c unix://PATH`). Default: $DOMKIT_SOCKET, else
    /// /run/domkit/domkitd.sock as root, else $XDG_RUNTIME_DIR/domkit/domkitd.sock.
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// For `-c tcp://HOST:PORT`: the CA that signed domkitd's certificate (PEM).
    #[arg(long, global = true, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// For `-c tcp://HOST:PORT`: this client's certificate (PEM).
    #[arg(long, global = true, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// For `-c tcp://HOST:PORT`: this client's key (PEM).
    #[arg(long, global = true, value_name = "FILE")]
    pub key: Option<PathBuf>,
}

/// How a shutdown or reboot is asked of the guest.
#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum ModeArg {
    /// The backend's native way.
    Default,
    /// ACPI power button.
    Acpi,
    /// The guest agent.
    Agent,
    /// Xen PV control request.
    Paravirt,
}

impl ModeArg {
    fn to_pb(self) -> pb::ShutdownMode {
        match self {
            ModeArg::Default => pb::ShutdownMode::Default,
            ModeArg::Acpi => pb::ShutdownMode::Acpi,
            ModeArg::Agent => pb::ShutdownMode::Agent,
            ModeArg::Paravirt => pb::ShutdownMode::Paravirt,
        }
    }
}

/// What `shutdown` waits for.
#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum WaitArg {
    /// Until the request reached the guest (virsh's behaviour).
    Acknowledged,
    /// Until the domain is shut off.
    Completed,
}

/// A power-management target.
#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum PmTargetArg {
    /// Suspend to RAM.
    Mem,
    /// Suspend to disk.
    Disk,
}

/// The verbs served by domkitd. DOMAIN is a name or a uuid.
#[derive(Subcommand, Debug, Clone)]
pub enum Verb {
    /// Define a domain from a TOML/JSON config file (`.json` is JSON), via domkitd. A
    /// top-level `backend = "qemu" | "libxl"` picks the backend.
    Define {
        /// The config file.
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Forget a shut-off domain.
    Undefine {
        /// The domain.
        domain: String,
    },
    /// List active domains (`--all`: every defined domain).
    List {
        /// Also list shut-off domains.
        #[arg(long)]
        all: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Start a shut-off domain.
    Start {
        /// The domain.
        domain: String,
        /// Start with the vCPUs paused.
        #[arg(long)]
        paused: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ask the guest to shut down (returns once the request reached it, unless
    /// `--wait completed`).
    Shutdown {
        /// The domain.
        domain: String,
        /// How to ask.
        #[arg(long, value_enum, default_value = "default")]
        mode: ModeArg,
        /// What to wait for.
        #[arg(long, value_enum, default_value = "acknowledged")]
        wait: WaitArg,
        /// Seconds to wait (default 60).
        #[arg(long, value_name = "S")]
        timeout: Option<u64>,
        /// Destroy the domain if it did not shut down in time.
        #[arg(long)]
        destroy_on_timeout: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ask the guest to reboot; returns when it did.
    Reboot {
        /// The domain.
        domain: String,
        /// How to ask.
        #[arg(long, value_enum, default_value = "default")]
        mode: ModeArg,
        /// Seconds to wait (default 60).
        #[arg(long, value_name = "S")]
        timeout: Option<u64>,
    },
    /// Hard reset.
    Reset {
        /// The domain.
        domain: String,
    },
    /// Hard stop.
    Destroy {
        /// The domain.
        domain: String,
    },
    /// Pause the vCPUs.
    Suspend {
        /// The domain.
        domain: String,
    },
    /// Resume the vCPUs.
    Resume {
        /// The domain.
        domain: String,
    },
    /// Save the domain's state to FILE (a path on domkitd's host) and stop it.
    Save {
        /// The domain.
        domain: String,
        /// The save file (made absolute against the current directory).
        file: PathBuf,
    },
    /// Restore a shut-off domain from FILE (written by `save` of this domain).
    Restore {
        /// The domain.
        domain: String,
        /// The save file.
        file: PathBuf,
        /// Leave the vCPUs paused after the restore.
        #[arg(long, conflicts_with = "running")]
        paused: bool,
        /// Run the vCPUs after the restore (even if saved paused).
        #[arg(long)]
        running: bool,
    },
    /// Put the guest to sleep.
    Dompmsuspend {
        /// The domain.
        domain: String,
        /// The sleep state.
        #[arg(value_enum, default_value = "mem")]
        target: PmTargetArg,
    },
    /// Wake a sleeping guest.
    Dompmwakeup {
        /// The domain.
        domain: String,
    },
    /// A domain's summary.
    Dominfo {
        /// The domain.
        domain: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A domain's state.
    Domstate {
        /// The domain.
        domain: String,
        /// Also print the reason (`running (booted)`).
        #[arg(long)]
        reason: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print lifecycle events: wait for the next one (`--loop`: keep following), of one
    /// domain or of all. `--since` resumes after a cursor (a seq with a domain, a host-wide
    /// cursor without one), replaying the kept events; missing ones are shown as a gap.
    Event {
        /// Only this domain.
        domain: Option<String>,
        /// Keep printing events until interrupted (or --timeout).
        #[arg(long = "loop")]
        follow: bool,
        /// Stop after S seconds.
        #[arg(long, value_name = "S")]
        timeout: Option<u64>,
        /// Resume after this cursor (see above); without --loop, print what is kept and exit.
        #[arg(long, value_name = "CURSOR")]
        since: Option<u64>,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Attach to the domain's serial console (Ctrl-] leaves). Read-write unless
    /// --read-only; one writer at a time.
    Console {
        /// The domain.
        domain: String,
        /// Only watch: type nothing (any number of these at once).
        #[arg(long)]
        read_only: bool,
    },
    /// Run a raw guest agent command (virsh `qemu-agent-command`) and print its `return`
    /// value as JSON (`{}` for guest-shutdown/guest-suspend-*, which send no reply). The
    /// domain needs `[[channels]] kind = "guest_agent"`. Full access.
    #[command(visible_alias = "qemu-agent-command")]
    Agent {
        /// The domain.
        domain: String,
        /// The command: `{"execute": "NAME", "arguments": {...}}`.
        command: String,
        /// Seconds to wait for the reply (default: the agent client's).
        #[arg(long, value_name = "S")]
        timeout: Option<u64>,
        /// Print one JSON line, `{"return": VALUE}` (default: the value, indented).
        #[arg(long)]
        json: bool,
    },
    /// The daemon's version and backends, and this connection's access level.
    DaemonVersion {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The in-process connections of `domkit demo/run/conformance`; for a domkitd verb they
/// mean the local daemon.
const HYPERVISOR_URIS: &[&str] = &[
    "qemu:///session",
    "qemu:///system",
    "qemu",
    "libxl:///",
    "xen:///",
    "libxl",
    "xen",
];

/// The default socket of this user (see [`ConnectArgs::socket`]).
pub fn default_socket() -> PathBuf {
    crate::daemon::default_runtime_dir().join("domkitd.sock")
}

/// Where to connect: `connect` when it is a domkitd address (`unix://`, `tcp://`), else
/// `--socket` / `$DOMKIT_SOCKET`, else the default socket. A hypervisor URI (`qemu:///...`,
/// the in-process backends of `demo`/`run`/`conformance`) means the default socket.
pub fn target(connect: Option<&str>, args: &ConnectArgs) -> Result<Target, ClientError> {
    let tls = ClientTls {
        ca: args.ca.clone(),
        cert: args.cert.clone(),
        key: args.key.clone(),
    };
    match connect {
        Some(uri) if uri.starts_with("unix:") || uri.starts_with("tcp:") => Target::parse(uri, tls),
        Some(uri) if !HYPERVISOR_URIS.contains(&uri) => Err(ClientError::Usage(format!(
            "{uri:?} is not a domkitd address: use unix:///PATH or tcp://HOST:PORT"
        ))),
        _ => Ok(Target::Unix(
            args.socket
                .clone()
                .or_else(|| std::env::var_os("DOMKIT_SOCKET").map(PathBuf::from))
                .unwrap_or_else(default_socket),
        )),
    }
}

/// Run `verb` against the domkitd `connect`/`args` name and return the exit code.
pub fn main(connect: Option<&str>, args: &ConnectArgs, verb: Verb) -> u8 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("domkit: error: cannot start the async runtime: {e}");
            return exit::ERROR;
        }
    };
    let result = runtime.block_on(async {
        let target = target(connect, args)?;
        let mut client = client::connect(&target).await?;
        match verb {
            Verb::Event {
                domain,
                follow: true,
                timeout,
                since,
                json,
            } => {
                let deadline =
                    timeout.map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
                follow_events(&target, client, domain, since, deadline, json).await
            }
            verb => run(&mut client, verb).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(Failure::Client(e)) => {
            eprintln!("domkit: error: {e}");
            exit_code(&e)
        }
        // The reader went away (`| head`): end quietly.
        Err(Failure::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => exit::OK,
        Err(Failure::Output(e)) => {
            eprintln!("domkit: error: writing the output: {e}");
            exit::ERROR
        }
    }
}

/// The exit code for an error.
pub fn exit_code(e: &ClientError) -> u8 {
    match e {
        ClientError::Remote(r) => match r.kind() {
            "not_found" => exit::NOT_FOUND,
            "invalid_state" => exit::INVALID_STATE,
            "timeout" => exit::TIMEOUT,
            "permission_denied" => exit::PERMISSION_DENIED,
            "invalid_config" => exit::INVALID_CONFIG,
            "bad_request" => exit::USAGE,
            "guest_agent" if r.detail.agent_error == "timeout" => exit::TIMEOUT,
            _ => exit::ERROR,
        },
        ClientError::Unreachable { .. } => exit::UNREACHABLE,
        ClientError::Usage(_) => exit::USAGE,
        ClientError::Transport { .. } | ClientError::Io { .. } => exit::ERROR,
    }
}

/// Why a verb did not finish.
#[derive(Debug)]
pub enum Failure {
    /// The daemon (or reaching it) failed.
    Client(ClientError),
    /// Printing failed (a closed pipe is not reported).
    Output(std::io::Error),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::Client(e)
    }
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        Failure::Client(s.into())
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Output(e)
    }
}

fn absolute(path: &Path) -> Result<String, ClientError> {
    std::path::absolute(path)
        .map(|p| p.display().to_string())
        .map_err(|e| ClientError::Io {
            context: format!("making {} absolute", path.display()),
            source: e,
        })
}

fn reply_json(r: &pb::OperationReply) -> serde_json::Value {
    let state = r.state.as_ref().and_then(convert::state_from_pb);
    serde_json::json!({
        "domain": r.id.as_ref().map(|i| i.name.clone()),
        "uuid": r.id.as_ref().map(|i| i.uuid.clone()),
        "state": state,
        "seq": r.seq,
    })
}

fn info_json(i: &pb::DomainInfo) -> serde_json::Value {
    let state = i.state.as_ref().and_then(convert::state_from_pb);
    let control = i.control.as_ref().map(|c| {
        serde_json::json!({
            "kind": pb::control_state::Kind::try_from(c.kind).map(|k| k.as_str_name().trim_start_matches("KIND_").to_ascii_lowercase()).unwrap_or_default(),
            "operation": convert::operation_from_pb(c.operation),
            "reason": c.reason,
        })
    });
    serde_json::json!({
        "name": i.id.as_ref().map(|i| i.name.clone()),
        "uuid": i.id.as_ref().map(|i| i.uuid.clone()),
        "backend": i.id.as_ref().map(|i| i.backend.clone()),
        "state": state,
        "control": control,
        "vcpus": i.vcpus,
        "memory_mib": i.memory_mib,
        "backend_handle": i.backend_handle,
        "seq": i.seq,
    })
}

fn control_text(c: Option<&pb::ControlState>) -> String {
    use pb::control_state::Kind;
    match c {
        Some(c) => match Kind::try_from(c.kind) {
            Ok(Kind::Ok) => "ok".into(),
            Ok(Kind::Job) => format!(
                "job: {}",
                convert::operation_from_pb(c.operation).map_or("?".into(), |o| o.to_string())
            ),
            Ok(Kind::Broken) => format!("broken: {}", c.reason),
            _ => "unknown".into(),
        },
        None => "unknown".into(),
    }
}

fn name_of(id: Option<&pb::DomainIdentity>) -> String {
    id.map(|i| i.name.clone()).unwrap_or_default()
}

/// Print `text` (one line) to stdout.
fn say(text: impl std::fmt::Display) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()?;
    Ok(())
}

/// The human form of an event-stream entry.
pub fn entry_text(msg: &pb::EventMessage) -> String {
    match &msg.entry {
        Some(pb::event_message::Entry::Event(ev)) => {
            let what = if ev.detail.is_empty() {
                ev.kind.clone()
            } else {
                format!("{}({})", ev.kind, ev.detail)
            };
            format!(
                "event {what} for domain {}: seq {} cursor {}{}",
                name_of(ev.domain.as_ref()),
                ev.seq,
                msg.cursor,
                if ev.reconciled { " (reconciled)" } else { "" }
            )
        }
        Some(pb::event_message::Entry::Gap(gap)) => match &gap.domain {
            Some(d) => format!(
                "gap: events seq {}..={} of domain {} are missing: {}",
                gap.first_missing, gap.last_missing, d.name, gap.reason
            ),
            None => format!(
                "gap: journal entries cursor {}..={} are missing: {}",
                gap.first_missing, gap.last_missing, gap.reason
            ),
        },
        None => "(empty entry)".into(),
    }
}

/// The JSON form of an event-stream entry.
pub fn entry_json(msg: &pb::EventMessage) -> serde_json::Value {
    match &msg.entry {
        Some(pb::event_message::Entry::Event(ev)) => serde_json::json!({
            "cursor": msg.cursor,
            "domain": ev.domain.as_ref().map(|d| serde_json::json!({"name": d.name, "uuid": d.uuid, "backend": d.backend})),
            "seq": ev.seq,
            "timestamp_us": ev.timestamp_us,
            "event": ev.kind,
            "detail": if ev.detail.is_empty() { serde_json::Value::Null } else { ev.detail.clone().into() },
            "reconciled": ev.reconciled,
        }),
        Some(pb::event_message::Entry::Gap(gap)) => serde_json::json!({
            "cursor": msg.cursor,
            "gap": {
                "domain": gap.domain.as_ref().map(|d| serde_json::json!({"name": d.name, "uuid": d.uuid, "backend": d.backend})),
                "first_missing": gap.first_missing,
                "last_missing": gap.last_missing,
                "reason": gap.reason,
            }
        }),
        None => serde_json::Value::Null,
    }
}

/// Run one verb on a connected client.
pub async fn run(client: &mut client::Client, verb: Verb) -> Result<u8, Failure> {
    use client::domain_ref;
    match verb {
        Verb::Define { file, json } => {
            let text = std::fs::read_to_string(&file).map_err(|e| ClientError::Io {
                context: format!("reading config {}", file.display()),
                source: e,
            })?;
            let format = if file.extension().is_some_and(|e| e == "json") {
                pb::ConfigFormat::Json
            } else {
                pb::ConfigFormat::Toml
            };
            let info = client
                .define(pb::DefineRequest {
                    config: text,
                    format: format as i32,
                })
                .await?
                .into_inner();
            if json {
                say(info_json(&info))?;
            } else {
                let id = info.id.clone().unwrap_or_default();
                say(format_args!(
                    "Domain '{}' defined ({}, {})",
                    id.name, id.uuid, id.backend
                ))?;
            }
        }
        Verb::Undefine { domain } => {
            client.undefine(domain_ref(&domain)).await?;
            say(format_args!("Domain '{domain}' has been undefined"))?;
        }
        Verb::List { all, json } => {
            let list = client.list(pb::ListRequest { all }).await?.into_inner();
            if json {
                let v: Vec<_> = list.domains.iter().map(info_json).collect();
                say(serde_json::Value::Array(v))?;
            } else {
                say(format_args!(
                    " {:<24} {:<28} {:<8} {}",
                    "Name", "State", "Backend", "Handle"
                ))?;
                say("-".repeat(72))?;
                for d in &list.domains {
                    let id = d.id.clone().unwrap_or_default();
                    say(format_args!(
                        " {:<24} {:<28} {:<8} {}",
                        id.name,
                        state_text(d.state.as_ref()),
                        id.backend,
                        if d.backend_handle.is_empty() {
                            "-"
                        } else {
                            &d.backend_handle
                        }
                    ))?;
                }
            }
        }
        Verb::Start {
            domain,
            paused,
            json,
        } => {
            let progress = Progress::start(client, json, "starting", &domain, None);
            let request = pb::StartRequest {
                domain: Some(domain_ref(&domain)),
                paused,
            };
            let r = with_progress(progress, client.clone().start(request))
                .await?
                .into_inner();
            if json {
                say(reply_json(&r))?;
            } else {
                say(format_args!(
                    "Domain '{domain}' started{}",
                    if paused { " (paused)" } else { "" }
                ))?;
            }
        }
        Verb::Shutdown {
            domain,
            mode,
            wait,
            timeout,
            destroy_on_timeout,
            json,
        } => {
            let wait = match wait {
                WaitArg::Acknowledged => pb::ShutdownWait::Acknowledged,
                WaitArg::Completed => pb::ShutdownWait::Completed,
            };
            let progress = if wait == pb::ShutdownWait::Completed {
                Progress::start(client, json, "shutting down", &domain, None)
            } else {
                None
            };
            let request = pb::ShutdownRequest {
                domain: Some(domain_ref(&domain)),
                mode: mode.to_pb() as i32,
                wait: wait as i32,
                timeout_ms: timeout.map_or(0, |s| s.saturating_mul(1000)),
                destroy_on_timeout,
            };
            let r = with_progress(progress, client.clone().shutdown(request))
                .await?
                .into_inner();
            let outcome = pb::ShutdownOutcome::try_from(r.outcome)
                .unwrap_or(pb::ShutdownOutcome::Unspecified);
            if json {
                let mut v = r.result.as_ref().map(reply_json).unwrap_or_default();
                v["outcome"] = outcome
                    .as_str_name()
                    .trim_start_matches("SHUTDOWN_OUTCOME_")
                    .to_ascii_lowercase()
                    .into();
                say(v)?;
            } else {
                say(match outcome {
                    pb::ShutdownOutcome::Acknowledged => {
                        format!("Domain '{domain}' is being shutdown")
                    }
                    pb::ShutdownOutcome::Completed => {
                        format!("Domain '{domain}' has been shut down")
                    }
                    pb::ShutdownOutcome::Destroyed => {
                        format!("Domain '{domain}' did not shut down in time and was destroyed")
                    }
                    pb::ShutdownOutcome::Unspecified => {
                        format!("Domain '{domain}': shutdown returned")
                    }
                })?;
            }
        }
        Verb::Reboot {
            domain,
            mode,
            timeout,
        } => {
            let progress = Progress::start(client, false, "rebooting", &domain, None);
            let request = pb::RebootRequest {
                domain: Some(domain_ref(&domain)),
                mode: mode.to_pb() as i32,
                timeout_ms: timeout.map_or(0, |s| s.saturating_mul(1000)),
            };
            with_progress(progress, client.clone().reboot(request)).await?;
            say(format_args!("Domain '{domain}' rebooted"))?;
        }
        Verb::Reset { domain } => {
            client.reset(domain_ref(&domain)).await?;
            say(format_args!("Domain '{domain}' was reset"))?;
        }
        Verb::Destroy { domain } => {
            client.destroy(domain_ref(&domain)).await?;
            say(format_args!("Domain '{domain}' destroyed"))?;
        }
        Verb::Suspend { domain } => {
            client.pause(domain_ref(&domain)).await?;
            say(format_args!("Domain '{domain}' suspended"))?;
        }
        Verb::Resume { domain } => {
            client.resume(domain_ref(&domain)).await?;
            say(format_args!("Domain '{domain}' resumed"))?;
        }
        Verb::Save { domain, file } => {
            let path = absolute(&file)?;
            let progress =
                Progress::start(client, false, "saving", &domain, Some(path.clone().into()));
            let request = pb::SaveRequest {
                domain: Some(domain_ref(&domain)),
                path: path.clone(),
            };
            with_progress(progress, client.clone().save(request)).await?;
            say(format_args!("Domain '{domain}' saved to {path}"))?;
        }
        Verb::Restore {
            domain,
            file,
            paused,
            running,
        } => {
            let path = absolute(&file)?;
            let paused = if paused {
                Some(true)
            } else if running {
                Some(false)
            } else {
                None
            };
            let progress = Progress::start(client, false, "restoring", &domain, None);
            let request = pb::RestoreRequest {
                domain: Some(domain_ref(&domain)),
                path: path.clone(),
                paused,
            };
            with_progress(progress, client.clone().restore(request)).await?;
            say(format_args!("Domain '{domain}' restored from {path}"))?;
        }
        Verb::Dompmsuspend { domain, target } => {
            let target = match target {
                PmTargetArg::Mem => pb::PmSuspendTarget::Memory,
                PmTargetArg::Disk => pb::PmSuspendTarget::Disk,
            };
            client
                .pm_suspend(pb::PmSuspendRequest {
                    domain: Some(domain_ref(&domain)),
                    target: target as i32,
                })
                .await?;
            say(format_args!("Domain '{domain}' successfully suspended"))?;
        }
        Verb::Dompmwakeup { domain } => {
            client.pm_wakeup(domain_ref(&domain)).await?;
            say(format_args!("Domain '{domain}' successfully woken up"))?;
        }
        Verb::Dominfo { domain, json } => {
            let i = client.info(domain_ref(&domain)).await?.into_inner();
            if json {
                say(info_json(&i))?;
            } else {
                let id = i.id.clone().unwrap_or_default();
                let rows = [
                    ("Name", id.name),
                    ("UUID", id.uuid),
                    ("Backend", id.backend),
                    ("State", state_text(i.state.as_ref())),
                    ("Control", control_text(i.control.as_ref())),
                    ("CPU(s)", i.vcpus.to_string()),
                    ("Memory", format!("{} MiB", i.memory_mib)),
                    (
                        "Handle",
                        if i.backend_handle.is_empty() {
                            "-".into()
                        } else {
                            i.backend_handle.clone()
                        },
                    ),
                    ("Last seq", i.seq.to_string()),
                ];
                for (k, v) in rows {
                    say(format_args!("{:<15} {v}", format!("{k}:")))?;
                }
            }
        }
        Verb::Domstate {
            domain,
            reason,
            json,
        } => {
            let i = client.info(domain_ref(&domain)).await?.into_inner();
            let state = i.state.as_ref().and_then(convert::state_from_pb);
            if json {
                say(serde_json::json!({"state": state, "seq": i.seq}))?;
            } else {
                match state {
                    Some(s) if reason => say(s)?,
                    Some(s) => say(s.name())?,
                    None => say("unknown")?,
                }
            }
        }
        Verb::Event {
            domain,
            follow,
            timeout,
            since,
            json,
        } => {
            let request = pb::EventsRequest {
                domain: domain.as_deref().map(domain_ref),
                since,
                // Without --loop and with --since: the kept events, then exit.
                follow: follow || since.is_none(),
            };
            let mut stream = client.events(request).await?.into_inner();
            let deadline = timeout.map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
            let mut printed = 0u64;
            loop {
                let next = match deadline {
                    Some(at) => match tokio::time::timeout_at(at, stream.next()).await {
                        Ok(n) => n,
                        Err(_) => break,
                    },
                    None => stream.next().await,
                };
                let Some(msg) = next else { break };
                let msg = msg?;
                if json {
                    say(entry_json(&msg))?;
                } else {
                    say(entry_text(&msg))?;
                }
                printed += 1;
                if !follow && since.is_none() {
                    break;
                }
            }
            if !json && follow {
                eprintln!("events received: {printed}");
            }
        }
        Verb::Console { domain, read_only } => return console(client, &domain, !read_only).await,
        Verb::Agent {
            domain,
            command,
            timeout,
            json,
        } => {
            let request = pb::AgentCommandRequest {
                domain: Some(domain_ref(&domain)),
                command_json: command,
                timeout_ms: timeout.map(|s| s.saturating_mul(1000)),
            };
            let reply = client.agent_command(request).await?.into_inner();
            let value: serde_json::Value =
                serde_json::from_str(&reply.reply_json).map_err(|e| ClientError::Transport {
                    code: tonic::Code::DataLoss,
                    message: format!("domkitd sent an agent reply that is not JSON: {e}"),
                })?;
            if json {
                say(serde_json::json!({ "return": value }))?;
            } else {
                let text =
                    serde_json::to_string_pretty(&value).unwrap_or_else(|_| value.to_string());
                say(text)?;
            }
        }
        Verb::DaemonVersion { json } => {
            let v = client.version(pb::VersionRequest {}).await?.into_inner();
            if json {
                say(serde_json::json!({
                    "daemon_version": v.daemon_version,
                    "protocol": v.protocol,
                    "backends": v.backends,
                    "read_only": v.read_only,
                }))?;
            } else {
                say(format_args!(
                    "domkitd {} ({}), backends: {}, access: {}",
                    v.daemon_version,
                    v.protocol,
                    v.backends.join(", "),
                    if v.read_only { "read-only" } else { "full" }
                ))?;
            }
        }
    }
    Ok(exit::OK)
}

/// A progress line on stderr while a long operation runs (start, save, restore, reboot,
/// shutdown --wait completed): a spinner with the elapsed time, the domain's state and job
/// as the daemon reports them (polled every 250 ms on the same connection), and for a save
/// to a file this host can see, the bytes written so far and the rate. Only on a terminal
/// and never with --json: piped output stays plain lines.
pub struct Progress {
    bar: indicatif::ProgressBar,
    ticker: tokio::task::JoinHandle<()>,
}

/// Whether a progress line is shown: stderr is a terminal and the output is not JSON.
pub fn progress_wanted(json: bool) -> bool {
    use std::io::IsTerminal;
    !json && std::io::stderr().is_terminal()
}

/// The size of the temporary file a save to `target` is writing (`.<name>.domkit-tmp-*` on
/// QEMU, `.<name>.*.tmp` on libxl, next to the target), if this host sees it.
pub fn save_temp_size(target: &Path) -> Option<u64> {
    let name = target.file_name()?.to_string_lossy().into_owned();
    let prefix = format!(".{name}.");
    let dir = target.parent()?;
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(&prefix) && (n.contains("domkit-tmp") || n.ends_with(".tmp"))
        })
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .max()
}

impl Progress {
    /// Start showing `what DOMAIN` (if [`progress_wanted`]); `save_target`: the save file
    /// whose temporary file's growth is shown.
    pub fn start(
        client: &client::Client,
        json: bool,
        what: &str,
        domain: &str,
        save_target: Option<PathBuf>,
    ) -> Option<Progress> {
        if !progress_wanted(json) {
            return None;
        }
        let bar = indicatif::ProgressBar::new_spinner();
        let style = indicatif::ProgressStyle::with_template("{spinner} {prefix} {elapsed} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
        bar.set_style(style);
        bar.set_prefix(format!("{what} {domain}"));
        bar.enable_steady_tick(Duration::from_millis(120));
        let (mut c, b, d) = (client.clone(), bar.clone(), domain.to_string());
        let ticker = tokio::spawn(async move {
            let started = std::time::Instant::now();
            loop {
                let mut parts = Vec::new();
                if let Ok(info) = c.info(client::domain_ref(&d)).await {
                    let info = info.into_inner();
                    parts.push(state_text(info.state.as_ref()));
                    if info
                        .control
                        .as_ref()
                        .is_some_and(|ctl| ctl.kind == pb::control_state::Kind::Job as i32)
                    {
                        parts.push(control_text(info.control.as_ref()));
                    }
                }
                if let Some(bytes) = save_target.as_deref().and_then(save_temp_size) {
                    let secs = started.elapsed().as_secs_f64().max(0.001);
                    let mib = bytes as f64 / 1048576.0;
                    parts.push(format!("{mib:.1} MiB written, {:.1} MiB/s", mib / secs));
                }
                b.set_message(parts.join(", "));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        Some(Progress { bar, ticker })
    }

    /// Stop and clear the line.
    pub fn finish(self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }
}

/// Run `fut` with a progress line (see [`Progress`]).
async fn with_progress<T>(
    progress: Option<Progress>,
    fut: impl std::future::Future<Output = T>,
) -> T {
    let out = fut.await;
    if let Some(p) = progress {
        p.finish();
    }
    out
}

/// Where a followed event stream resumes after a reconnection: the last entry it printed
/// (a domain's `seq` with a domain, a host-wide cursor without one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    /// The stream is of one domain (its `seq`s) rather than host-wide (cursors).
    pub per_domain: bool,
    /// The last position accounted for (printed as an event or inside a printed gap).
    pub last: Option<u64>,
}

impl Resume {
    /// Account for `msg`, printed: the position after which a new stream resumes.
    pub fn advance(&mut self, msg: &pb::EventMessage) {
        let at = match &msg.entry {
            Some(pb::event_message::Entry::Event(ev)) if self.per_domain => ev.seq,
            Some(pb::event_message::Entry::Event(_)) => msg.cursor,
            // A gap of the stream's own positions: resume after its range.
            Some(pb::event_message::Entry::Gap(gap)) if self.per_domain || gap.domain.is_none() => {
                gap.last_missing
            }
            // Host-wide, a domain's seq range journaled as an entry: its cursor.
            Some(pb::event_message::Entry::Gap(_)) if msg.cursor > 0 => msg.cursor,
            Some(pb::event_message::Entry::Gap(_)) | None => return,
        };
        self.last = Some(self.last.map_or(at, |l| l.max(at)));
    }
}

/// Is `e` the daemon going away (killed, restarted, its socket gone) rather than a typed
/// refusal? Such a failure of a followed stream is retried; a refusal is not.
fn is_disconnect(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Unreachable { .. } | ClientError::Transport { .. }
    )
}

/// `event --loop`: follow the events, and when domkitd goes away (killed, restarted,
/// upgraded) reconnect and resume right after the last entry printed, so the output has
/// every event once, in order, and an explicit gap for what the daemon could not keep
/// (docs/daemon.md, "Events"). A typed refusal (an unknown domain) ends it; so do
/// `deadline` and a closed stdout.
async fn follow_events(
    target: &Target,
    mut client: client::Client,
    domain: Option<String>,
    since: Option<u64>,
    deadline: Option<tokio::time::Instant>,
    json: bool,
) -> Result<u8, Failure> {
    let mut resume = Resume {
        per_domain: domain.is_some(),
        last: since,
    };
    // Live only: take the current position first, so that a reconnection before the first
    // event still resumes from now (not from "live again", which would lose what happened
    // while the daemon was away).
    if resume.last.is_none() {
        resume.last = match &domain {
            Some(d) => Some(client.info(client::domain_ref(d)).await?.into_inner().seq),
            None => {
                client
                    .version(pb::VersionRequest {})
                    .await?
                    .into_inner()
                    .cursor
            }
        };
    }
    let mut printed = 0u64;
    let mut connected = true;
    'streams: loop {
        if !connected {
            match reconnect(target, deadline).await? {
                Some(c) => client = c,
                None => break,
            }
            eprintln!(
                "domkit: reconnected to domkitd; resuming after {} {}",
                if resume.per_domain { "seq" } else { "cursor" },
                resume.last.map_or("(live)".to_string(), |l| l.to_string())
            );
        }
        let request = pb::EventsRequest {
            domain: domain.as_deref().map(client::domain_ref),
            since: resume.last,
            follow: true,
        };
        let opened = match deadline {
            Some(at) => match tokio::time::timeout_at(at, client.events(request)).await {
                Ok(r) => r,
                Err(_) => break,
            },
            None => client.events(request).await,
        };
        let mut stream = match opened {
            Ok(r) => r.into_inner(),
            Err(status) => {
                let e = ClientError::from(status);
                if !is_disconnect(&e) {
                    return Err(e.into());
                }
                eprintln!("domkit: domkitd went away ({e}); reconnecting to {target}");
                connected = false;
                continue;
            }
        };
        loop {
            let next = match deadline {
                Some(at) => match tokio::time::timeout_at(at, stream.next()).await {
                    Ok(n) => n,
                    Err(_) => break 'streams,
                },
                None => stream.next().await,
            };
            let msg = match next {
                Some(Ok(msg)) => msg,
                Some(Err(status)) => {
                    let e = ClientError::from(status);
                    if !is_disconnect(&e) {
                        return Err(e.into());
                    }
                    eprintln!("domkit: domkitd went away ({e}); reconnecting to {target}");
                    connected = false;
                    continue 'streams;
                }
                // A followed stream ends only when the daemon stops (SIGTERM).
                None => {
                    eprintln!("domkit: domkitd closed the event stream; reconnecting to {target}");
                    connected = false;
                    continue 'streams;
                }
            };
            if json {
                say(entry_json(&msg))?;
            } else {
                say(entry_text(&msg))?;
            }
            resume.advance(&msg);
            printed += 1;
        }
    }
    if !json {
        eprintln!("events received: {printed}");
    }
    Ok(exit::OK)
}

/// Connect again to a daemon that went away, every 200 ms until it answers; `None` once
/// `deadline` passed. A refusal that is not the daemon's absence (a bad TLS file) ends it.
async fn reconnect(
    target: &Target,
    deadline: Option<tokio::time::Instant>,
) -> Result<Option<client::Client>, Failure> {
    loop {
        // Not in a tight loop against a daemon that is going away.
        tokio::time::sleep(Duration::from_millis(200)).await;
        match client::connect(target).await {
            Ok(c) => return Ok(Some(c)),
            Err(e) if is_disconnect(&e) => {
                if deadline.is_some_and(|at| tokio::time::Instant::now() >= at) {
                    return Ok(None);
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The escape character of `console`: Ctrl-] (as virsh and telnet).
const ESCAPE: u8 = 0x1d;

/// The terminal in raw mode for as long as this lives (keystrokes go to the guest as
/// typed: Ctrl-C interrupts the guest's program, not `domkit`).
struct RawTerminal {
    saved: nix::sys::termios::Termios,
}

impl RawTerminal {
    /// Raw mode on stdin, if it is a terminal.
    fn enable() -> Option<RawTerminal> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        use std::io::IsTerminal;
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        use nix::sys::termios::{tcsetattr, SetArg};
        let _ = tcsetattr(std::io::stdin(), SetArg::TCSANOW, &self.saved);
    }
}

/// `console DOMAIN`: stdin to the guest's console (read-write), its output to stdout, until
/// Ctrl-] or the domain stops.
async fn console(
    client: &mut client::Client,
    domain: &str,
    read_write: bool,
) -> Result<u8, Failure> {
    use std::io::Read;
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::ConsoleInput>(64);
    let open = pb::ConsoleInput {
        input: Some(pb::console_input::Input::Open(pb::ConsoleOpen {
            domain: Some(client::domain_ref(domain)),
            read_write,
        })),
    };
    // The channel is empty: the first message always fits.
    let _ = tx.try_send(open);
    let mut output = client
        .console(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let raw = RawTerminal::enable();
    eprint!("Connected to domain '{domain}'\r\nEscape character is ^] (Ctrl-])\r\n");
    let (escape_tx, mut escape_rx) = tokio::sync::oneshot::channel::<()>();
    // stdin has no async reader that a runtime can cancel: a thread of its own, ended
    // with the process.
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 1024];
        loop {
            let n = match stdin.read(&mut buf) {
                // End of input: type nothing more, keep showing the output.
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            let (keys, escaped) = match chunk.iter().position(|b| *b == ESCAPE) {
                Some(at) => (&chunk[..at], true),
                None => (chunk, false),
            };
            if read_write && !keys.is_empty() {
                let data = pb::ConsoleInput {
                    input: Some(pb::console_input::Input::Data(keys.to_vec())),
                };
                if tx.blocking_send(data).is_err() {
                    return;
                }
            }
            if escaped {
                let _ = escape_tx.send(());
                return;
            }
        }
    });
    let mut input_open = true;
    let result = loop {
        let msg = tokio::select! {
            escaped = &mut escape_rx, if input_open => match escaped {
                Ok(()) => break Ok(()),
                // stdin ended without the escape: keep showing the output.
                Err(_) => {
                    input_open = false;
                    continue;
                }
            },
            msg = output.next() => msg,
        };
        match msg {
            Some(Ok(out)) => {
                let mut stdout = std::io::stdout().lock();
                if let Err(e) = stdout.write_all(&out.data).and_then(|()| stdout.flush()) {
                    break Err(Failure::Output(e));
                }
            }
            Some(Err(status)) => break Err(Failure::from(status)),
            None => break Ok(()),
        }
    };
    drop(raw);
    eprintln!();
    result.map(|()| exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_errors_exit_with_their_code() {
        use domkit_core::{AgentError, Error};
        let code_of = |e: Error| exit_code(&ClientError::from(convert::error_to_status(&e)));
        let timeout = AgentError::Timeout {
            command: "guest-ping".into(),
            after: Duration::from_secs(1),
        };
        assert_eq!(code_of(Error::agent("web1", timeout)), exit::TIMEOUT);
        let failed = AgentError::CommandFailed {
            class: "GenericError".into(),
            desc: "no".into(),
        };
        assert_eq!(code_of(Error::agent("web1", failed)), exit::ERROR);
        let none = Error::NoGuestAgent {
            domain: "web1".into(),
            reason: String::new(),
        };
        assert_eq!(code_of(none), exit::ERROR);
    }

    fn event(cursor: u64, seq: u64) -> pb::EventMessage {
        pb::EventMessage {
            cursor,
            entry: Some(pb::event_message::Entry::Event(pb::Event {
                seq,
                kind: "resumed".into(),
                ..Default::default()
            })),
        }
    }

    fn gap(cursor: u64, first: u64, last: u64) -> pb::EventMessage {
        pb::EventMessage {
            cursor,
            entry: Some(pb::event_message::Entry::Gap(pb::Gap {
                first_missing: first,
                last_missing: last,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn resume_position_per_domain_is_the_seq() {
        let mut r = Resume {
            per_domain: true,
            last: Some(3),
        };
        r.advance(&event(40, 4));
        assert_eq!(r.last, Some(4));
        // A gap of the domain's seqs: resume after its end.
        r.advance(&gap(0, 5, 9));
        assert_eq!(r.last, Some(9));
        r.advance(&event(50, 10));
        assert_eq!(r.last, Some(10));
    }

    #[test]
    fn resume_position_host_wide_is_the_cursor() {
        let mut r = Resume {
            per_domain: false,
            last: None,
        };
        r.advance(&event(7, 1));
        assert_eq!(r.last, Some(7));
        r.advance(&gap(12, 8, 12));
        assert_eq!(r.last, Some(12));
        // Never backwards.
        r.advance(&event(5, 2));
        assert_eq!(r.last, Some(12));
        // A domain's seq range journaled while the daemon was away: its own cursor.
        let mut domain_gap = gap(13, 2, 3);
        if let Some(pb::event_message::Entry::Gap(g)) = &mut domain_gap.entry {
            g.domain = Some(pb::DomainIdentity::default());
        }
        r.advance(&domain_gap);
        assert_eq!(r.last, Some(13));
    }
}
