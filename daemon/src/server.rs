//! The `domkit.v1.Domkit` service: each RPC on the daemon's drivers, one log line per
//! operation (peer, domain, outcome, duration), the access level of the connection it came
//! in on, and the event journal behind `Events`.
//!
//! A lifecycle operation runs in a task of its own: a client that goes away (a dropped
//! request, a killed `domkit`) does not cancel it half-way; it completes and its events
//! are in the journal, like a libvirt job whose virsh was interrupted.

use crate::backend::with_domain;
use crate::backend::{BackendDomain, BackendDriver, Backends};
use crate::convert::{self, daemon_status, error_to_status};
use crate::journal::{Entry, Filter, Item, Journal};
use crate::pb;
use domkit_core::agent::types::NO_REPLY_COMMANDS;
use domkit_core::console::ConsoleAccess;
use domkit_core::{
    Domain, DomainConfig, DomainEvent, Error, PmSuspendTarget, RestoreOptions, ShutdownOptions,
    StartOptions,
};
use futures::{FutureExt, StreamExt};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::broadcast::error::RecvError;
use tonic::{Code, Request, Response, Status};
use uuid::Uuid;

/// What a connection may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Every RPC.
    Full,
    /// Version, List, Lookup, Info, Events.
    ReadOnly,
}

/// The drivers and the journal, shared by every listener.
pub struct DaemonCore {
    backends: Backends,
    journal: Journal,
}

impl DaemonCore {
    /// Serve `backends`, journaling their events into `journal`: subscribes to every
    /// driver, journals what is already queued, declares as gaps the events the journal
    /// never saw (produced while no daemon ran, e.g. reconciled on reattach), then follows
    /// each driver in a task of its own.
    pub async fn new(backends: Backends, journal: Journal) -> Self {
        for driver in backends.drivers() {
            let mut events = driver.subscribe();
            let name = driver.name();
            let reattach = "produced while domkitd was not running (found on reattach)";
            let mut seqs = Vec::new();
            for info in driver.list().await.unwrap_or_default() {
                if let Ok(domain) = driver.lookup_by_uuid(info.id.uuid).await {
                    let seq = with_domain!(&domain, d => d.snapshot().seq);
                    let last = journal.last_seq(info.id.uuid);
                    // What the driver produced while opening (the reconciliation of a
                    // reattach: a save or shutdown a killed daemon left half done) is kept
                    // by the domain: journaled as events, not declared a gap. Only what no
                    // process saw stays a gap.
                    if let Some(last) = last.filter(|&l| l < seq) {
                        for ev in with_domain!(&domain, d => kept_events(d, last, seq)) {
                            journal.record_with(name, ev, reattach);
                        }
                    }
                    seqs.push((info.id, seq, last.is_some()));
                }
            }
            // Events already queued on the subscription were published before the seqs
            // above were read: journal them first, then declare what is still missing.
            while let Some(Some(ev)) = events.next().now_or_never() {
                journal.record_with(name, ev, reattach);
            }
            for (id, seq, known) in seqs {
                let reason = if known {
                    reattach
                } else {
                    "before domkitd's journal knew this domain"
                };
                journal.declare_seq(&id, name, seq, reason);
            }
            let journal = journal.clone();
            tokio::spawn(async move {
                while let Some(ev) = events.next().await {
                    journal.record(name, ev);
                }
            });
        }
        DaemonCore { backends, journal }
    }

    /// The drivers.
    pub fn backends(&self) -> &Backends {
        &self.backends
    }

    /// The journal.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Leave every domain as it is and stop supervising (SIGTERM).
    pub fn detach(&self) {
        for driver in self.backends.drivers() {
            driver.detach();
        }
    }
}

/// The events of `domain` with a `seq` in `after + 1..=upto` that it still keeps (from the
/// oldest kept one when some are gone), without waiting for more.
fn kept_events<D: Domain>(domain: &D, after: u64, upto: u64) -> Vec<DomainEvent> {
    let stream = match domain.subscribe_from(after) {
        Err(Error::EventsLost { resumed_at, .. }) => {
            domain.subscribe_from(resumed_at.saturating_sub(1))
        }
        other => other,
    };
    let Ok(mut stream) = stream else {
        return Vec::new();
    };
    let mut kept = Vec::new();
    while let Some(Some(ev)) = stream.next().now_or_never() {
        if ev.seq > upto {
            break;
        }
        kept.push(ev);
    }
    kept
}

/// The service as one listener serves it.
#[derive(Clone)]
pub struct DomkitService {
    core: Arc<DaemonCore>,
    access: Access,
}

impl DomkitService {
    /// The service on `core` with `access`.
    pub fn new(core: Arc<DaemonCore>, access: Access) -> Self {
        DomkitService { core, access }
    }

    /// The tonic server type of this service.
    pub fn into_server(self) -> pb::domkit_server::DomkitServer<Self> {
        pb::domkit_server::DomkitServer::new(self)
    }

    fn require_full(&self, op: &str, peer: &str) -> Result<(), Status> {
        match self.access {
            Access::Full => Ok(()),
            Access::ReadOnly => {
                tracing::warn!(op, %peer, outcome = "refused", "read-only connection refused a mutating call");
                Err(daemon_status(
                    Code::PermissionDenied,
                    pb::ErrorKind::PermissionDenied,
                    format!(
                        "{op} needs full access: this connection is read-only (list, info and events only)"
                    ),
                ))
            }
        }
    }

    async fn resolve(&self, target: Option<&pb::DomainRef>) -> Result<BackendDomain, Status> {
        match target.and_then(|r| r.domain.as_ref()) {
            Some(pb::domain_ref::Domain::Name(name)) => self
                .core
                .backends
                .lookup_by_name(name)
                .await
                .map_err(|e| error_to_status(&e)),
            Some(pb::domain_ref::Domain::Uuid(text)) => {
                let uuid = parse_uuid(text)?;
                self.core
                    .backends
                    .lookup_by_uuid(uuid)
                    .await
                    .map_err(|e| error_to_status(&e))
            }
            None => Err(bad_request(
                "the request names no domain: give a name or a uuid",
            )),
        }
    }

    /// Run one lifecycle operation on the domain `target` names, in a task of its own,
    /// logging one line with its outcome.
    async fn op<F, Fut, T>(
        &self,
        op: &'static str,
        peer: &str,
        target: Option<&pb::DomainRef>,
        f: F,
    ) -> Result<(BackendDomain, T), Status>
    where
        F: FnOnce(BackendDomain) -> Fut,
        Fut: Future<Output = domkit_core::Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let started = Instant::now();
        let shown = ref_text(target);
        self.require_full(op, peer)?;
        let domain = match self.resolve(target).await {
            Ok(d) => d,
            Err(status) => {
                log_failure(op, &shown, peer, started, &status);
                return Err(status);
            }
        };
        let task = tokio::spawn(f(domain.clone()));
        let result = match task.await {
            Ok(r) => r.map_err(|e| error_to_status(&e)),
            Err(e) => Err(daemon_status(
                Code::Internal,
                pb::ErrorKind::Unspecified,
                format!("the {op} task of domkitd failed: {e}"),
            )),
        };
        match result {
            Ok(value) => {
                let state = with_domain!(&domain, d => d.state());
                tracing::info!(op, domain = %shown, %peer, outcome = "ok", %state, ms = ms(started), "operation");
                Ok((domain, value))
            }
            Err(status) => {
                log_failure(op, &shown, peer, started, &status);
                Err(status)
            }
        }
    }

    fn reply(domain: &BackendDomain) -> pb::OperationReply {
        let backend = domain.backend();
        with_domain!(domain, d => {
            let snapshot = d.snapshot();
            pb::OperationReply {
                id: Some(convert::id_to_pb(d.id(), backend)),
                state: Some(convert::state_to_pb(&snapshot.state)),
                seq: snapshot.seq,
            }
        })
    }

    async fn info_of(domain: &BackendDomain) -> Result<pb::DomainInfo, Error> {
        let backend = domain.backend();
        with_domain!(domain, d => {
            let info = d.info().await?;
            let seq = d.snapshot().seq;
            Ok(convert::info_to_pb(&info, backend, seq))
        })
    }

    async fn simple_op<F, Fut>(
        &self,
        op: &'static str,
        req: Request<pb::DomainRef>,
        f: F,
    ) -> Result<Response<pb::OperationReply>, Status>
    where
        F: FnOnce(BackendDomain) -> Fut,
        Fut: Future<Output = domkit_core::Result<()>> + Send + 'static,
    {
        let peer = peer_of(&req);
        let target = req.into_inner();
        let (domain, ()) = self.op(op, &peer, Some(&target), f).await?;
        Ok(Response::new(Self::reply(&domain)))
    }
}

fn ms(started: Instant) -> u64 {
    started.elapsed().as_millis() as u64
}

fn log_failure(op: &str, domain: &str, peer: &str, started: Instant, status: &Status) {
    let kind = convert::detail_of(status)
        .map(|d| convert::kind_name(d.kind))
        .unwrap_or("unknown");
    tracing::info!(op, %domain, %peer, outcome = "error", kind, error = %status.message(), ms = ms(started), "operation");
}

fn ref_text(target: Option<&pb::DomainRef>) -> String {
    match target.and_then(|r| r.domain.as_ref()) {
        Some(pb::domain_ref::Domain::Name(n)) => n.clone(),
        Some(pb::domain_ref::Domain::Uuid(u)) => u.clone(),
        None => "-".into(),
    }
}

fn bad_request(message: impl Into<String>) -> Status {
    daemon_status(Code::InvalidArgument, pb::ErrorKind::BadRequest, message)
}

/// The command name and arguments of a raw agent command (`{"execute": NAME, "arguments":
/// {...}}`, as `virsh qemu-agent-command` takes it); anything else is a BAD_REQUEST.
fn parse_agent_command(text: &str) -> Result<(String, Option<serde_json::Value>), Status> {
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| bad_request(format!("the agent command is not JSON: {e}")))?;
    let serde_json::Value::Object(mut object) = value else {
        return Err(bad_request(
            "the agent command must be a JSON object: {\"execute\": \"NAME\", \"arguments\": {...}}",
        ));
    };
    let command = match object.remove("execute") {
        Some(serde_json::Value::String(name)) if !name.is_empty() => name,
        Some(_) => {
            return Err(bad_request(
                "the agent command's \"execute\" must be a non-empty string",
            ))
        }
        None => {
            return Err(bad_request(
                "the agent command has no \"execute\": want {\"execute\": \"NAME\", \"arguments\": {...}}",
            ))
        }
    };
    let arguments = match object.remove("arguments") {
        None | Some(serde_json::Value::Null) => None,
        Some(args @ serde_json::Value::Object(_)) => Some(args),
        Some(_) => {
            return Err(bad_request(
                "the agent command's \"arguments\" must be a JSON object",
            ))
        }
    };
    if let Some(key) = object.keys().next() {
        return Err(bad_request(format!(
            "the agent command has an unknown key {key:?}: only \"execute\" and \"arguments\" (the daemon sets the id)"
        )));
    }
    Ok((command, arguments))
}

fn parse_uuid(text: &str) -> Result<Uuid, Status> {
    Uuid::parse_str(text).map_err(|e| bad_request(format!("{text:?} is not a uuid: {e}")))
}

fn absolute_path(text: &str, what: &str) -> Result<PathBuf, Status> {
    let path = PathBuf::from(text);
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(bad_request(format!(
            "the {what} path {text:?} must be absolute (it is a path on domkitd's host)"
        )))
    }
}

/// Who is calling, for the logs: the Unix peer's credentials (SO_PEERCRED), or the TCP
/// peer's address.
pub fn peer_of<T>(req: &Request<T>) -> String {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo, UdsConnectInfo};
    if let Some(info) = req.extensions().get::<UdsConnectInfo>() {
        return match &info.peer_cred {
            Some(cred) => format!(
                "unix uid={} gid={} pid={}",
                cred.uid(),
                cred.gid(),
                cred.pid().map_or("?".into(), |p| p.to_string())
            ),
            None => "unix (credentials unknown)".into(),
        };
    }
    if let Some(info) = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>() {
        return match info.get_ref().remote_addr() {
            Some(addr) => format!("tls {addr}"),
            None => "tls".into(),
        };
    }
    match req.remote_addr() {
        Some(addr) => format!("tcp {addr}"),
        None => "?".into(),
    }
}

/// A config's text with its `backend` key taken out, and that backend (default `qemu`).
/// The config itself is parsed by the library, so its errors are the library's.
fn split_backend(config: &str, json: bool) -> Result<(String, DomainConfig), Error> {
    let mut backend = String::from("qemu");
    let config = if json {
        let mut stripped = None;
        if let Ok(serde_json::Value::Object(mut map)) = serde_json::from_str(config) {
            if let Some(b) = map.remove("backend") {
                backend = b.as_str().unwrap_or_default().to_string();
                stripped = serde_json::to_string(&map).ok();
            }
        }
        DomainConfig::from_json(stripped.as_deref().unwrap_or(config))?
    } else {
        let mut stripped = None;
        if let Ok(mut table) = config.parse::<toml::Table>() {
            if let Some(b) = table.remove("backend") {
                backend = b.as_str().unwrap_or_default().to_string();
                stripped = toml::to_string(&table).ok();
            }
        }
        DomainConfig::from_toml(stripped.as_deref().unwrap_or(config))?
    };
    config.validate()?;
    Ok((backend, config))
}

fn entry_to_pb(entry: Entry) -> pb::EventMessage {
    let item = match entry.item {
        Item::Event { backend, event } => {
            pb::event_message::Entry::Event(convert::event_to_pb(&event, &backend))
        }
        Item::Gap {
            domain,
            first,
            last,
            reason,
        } => pb::event_message::Entry::Gap(pb::Gap {
            domain: domain.map(|(id, backend)| convert::id_to_pb(&id, &backend)),
            first_missing: first,
            last_missing: last,
            reason,
        }),
    };
    pb::EventMessage {
        cursor: entry.cursor,
        entry: Some(item),
    }
}

type EventsStream = Pin<Box<dyn futures::Stream<Item = Result<pb::EventMessage, Status>> + Send>>;
type ConsoleOutputStream =
    Pin<Box<dyn futures::Stream<Item = Result<pb::ConsoleOutput, Status>> + Send>>;

#[tonic::async_trait]
impl pb::domkit_server::Domkit for DomkitService {
    async fn version(
        &self,
        _req: Request<pb::VersionRequest>,
    ) -> Result<Response<pb::VersionReply>, Status> {
        Ok(Response::new(pb::VersionReply {
            daemon_version: env!("CARGO_PKG_VERSION").into(),
            protocol: "domkit.v1".into(),
            backends: self
                .core
                .backends
                .drivers()
                .iter()
                .map(|d| d.name().to_string())
                .collect(),
            read_only: self.access == Access::ReadOnly,
            cursor: Some(self.core.journal.next_cursor().saturating_sub(1)),
        }))
    }

    async fn define(
        &self,
        req: Request<pb::DefineRequest>,
    ) -> Result<Response<pb::DomainInfo>, Status> {
        let peer = peer_of(&req);
        let started = Instant::now();
        self.require_full("define", &peer)?;
        let r = req.into_inner();
        let json = r.format == pb::ConfigFormat::Json as i32;
        let result = async {
            let (backend, config) =
                split_backend(&r.config, json).map_err(|e| ("-".to_string(), e))?;
            let name = config.name.clone();
            let Some(driver) = self.core.backends.driver(&backend) else {
                let known: Vec<&str> = self
                    .core
                    .backends
                    .drivers()
                    .iter()
                    .map(BackendDriver::name)
                    .collect();
                return Err((
                    name,
                    Error::Unsupported {
                        operation: domkit_core::Operation::Define,
                        backend: backend.clone(),
                        reason: format!("this domkitd drives {} only", known.join(", ")),
                    },
                ));
            };
            // Names are unique on the host, across backends.
            if self.core.backends.lookup_by_name(&name).await.is_ok() {
                return Err((
                    name.clone(),
                    Error::AlreadyExists {
                        what: format!("domain {name:?}"),
                    },
                ));
            }
            let domain = driver.define(config).await.map_err(|e| (name.clone(), e))?;
            let info = Self::info_of(&domain)
                .await
                .map_err(|e| (name.clone(), e))?;
            Ok((name, info))
        }
        .await
        .map_err(|(name, e): (String, Error)| (name, error_to_status(&e)));
        // A config that does not parse has no name: log it as "-".
        let result = match result {
            Err((_, status)) if status.code() == Code::InvalidArgument => {
                Err(("-".to_string(), status))
            }
            other => other,
        };
        match result {
            Ok((name, info)) => {
                tracing::info!(op = "define", domain = %name, %peer, outcome = "ok", ms = ms(started), "operation");
                Ok(Response::new(info))
            }
            Err((name, status)) => {
                log_failure("define", &name, &peer, started, &status);
                Err(status)
            }
        }
    }

    async fn undefine(
        &self,
        req: Request<pb::DomainRef>,
    ) -> Result<Response<pb::OperationReply>, Status> {
        let peer = peer_of(&req);
        let target = req.into_inner();
        let core = self.core.clone();
        let (domain, ()) = self
            .op("undefine", &peer, Some(&target), move |d| async move {
                let name = d.id().name;
                match core.backends.driver(d.backend()) {
                    Some(driver) => driver.undefine(&name).await,
                    None => Err(Error::domain_not_found(&name)),
                }
            })
            .await?;
        Ok(Response::new(Self::reply(&domain)))
    }

    async fn list(&self, req: Request<pb::ListRequest>) -> Result<Response<pb::ListReply>, Status> {
        let all = req.get_ref().all;
        let mut domains = Vec::new();
        for driver in self.core.backends.drivers() {
            let infos = driver.list().await.map_err(|e| error_to_status(&e))?;
            for info in infos {
                if !all && !info.state.is_active() {
                    continue;
                }
                let seq = match driver.lookup_by_uuid(info.id.uuid).await {
                    Ok(d) => with_domain!(&d, x => x.snapshot().seq),
                    Err(_) => 0,
                };
                domains.push(convert::info_to_pb(&info, driver.name(), seq));
            }
        }
        domains.sort_by(|a, b| {
            let name = |i: &pb::DomainInfo| i.id.as_ref().map(|i| i.name.clone());
            name(a).cmp(&name(b))
        });
        Ok(Response::new(pb::ListReply { domains }))
    }

    async fn lookup(
        &self,
        req: Request<pb::DomainRef>,
    ) -> Result<Response<pb::DomainIdentity>, Status> {
        let domain = self.resolve(Some(req.get_ref())).await?;
        Ok(Response::new(convert::id_to_pb(
            &domain.id(),
            domain.backend(),
        )))
    }

    async fn info(&self, req: Request<pb::DomainRef>) -> Result<Response<pb::DomainInfo>, Status> {
        let domain = self.resolve(Some(req.get_ref())).await?;
        let info = Self::info_of(&domain)
            .await
            .map_err(|e| error_to_status(&e))?;
        Ok(Response::new(info))
    }

    async fn start(
        &self,
        req: Request<pb::StartRequest>,
    ) -> Result<Response<pb::OperationReply>, Status> {
        let peer = peer_of(&req);
        let r = req.into_inner();
        let options = StartOptions { paused: r.paused };
        let (domain, ()) = self
            .op("start", &peer, r.domain.as_ref(), move |d| async move {
                with_domain!(&d, x => x.start(options).await)
            })
            .await?;
        Ok(Response::new(Self::reply(&domain)))
    }

    async fn shutdown(
        &self,
        req: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownReply>, Status> {
        let peer = peer_of(&req);
        let r = req.into_inner();
        let mut options = ShutdownOptions {
            mode: convert::shutdown_mode_from_pb(r.mode),
            wait: convert::shutdown_wait_from_pb(r.wait),
            destroy_on_timeout: r.destroy_on_timeout,
            ..ShutdownOptions::default()
        };
        if r.timeout_ms > 0 {
            options.timeout = Duration::from_millis(r.timeout_ms);
        }
        let (domain, outcome) = self
            .op("shutdown", &peer, r.domain.as_ref(), move |d| async move {
                with_domain!(&d, x => x.shutdown(options).await)
            })
            .await?;
        Ok(Response::new(pb::ShutdownReply {
            outcome: convert::shutdown_outcome_to_pb(outcome) as i32,
            result: Some(Self::reply(&domain)),
        }))
    }

    async fn reboot(
        &self,
        req: Request<pb::RebootRequest>,
    ) -> Result<Response<pb::OperationReply>, Status> {
        let peer = peer_of(&req);
        let r = req.into_inner();
        let mode = convert::shutdown_mode_from_pb(r.mode);
        let timeout = if r.timeout_ms > 0 {
            Duration::from_millis(r.timeout_ms)
        } else {
            Duration::from_secs(60)
        };
        let (domain, ()) = self
            .op("reboot", &peer, r.domain.as_ref(), move |d| async move {
                with_domain!(&d, x => x.reboot(mode, timeout).await)
            })
            .await?;
        Ok(Response::new(Self::reply(&domain)))
    }

    async fn reset(
        &self,
        req: Request<pb::DomainRef>,
    ) -> Result<Response<pb::OperationReply>, Status> {
        self.simple_op("reset", req, |d| async move {
            with_domain!(&d, x => x.reset().await)
        })
        .await
    }

    async fn destroy(
        &self,
        req: Request<pb::DomainRef>,
    ) -> Result<Response<pb::OperationReply>, Status> {
        self.simple_op("destroy", req, |d| async move {
            with_domain!(&d, x => x.destroy().await)
        })
        .await
    }

    async fn pause(
        &self,
        req: Request<pb::DomainRef>,
    ) -> Result<Response<pb::OperationReply>, Status> {
        self.simple_op("pause", req, |d| async move {
            with_domain!(&d, x => x.pause().await)
        })
        .await
    }

    async fn resume(
        &self,
        req: Request<pb::DomainRef>,
    ) -> Result<Response<pb::OperationReply>, Status> {
        self.simple_op("resume", req, |d| async move {
            with_domain!(&d, x => x.resume().await)
        })
        .await
    }

    async fn save(
        &self,
        req: Request<pb::SaveRequest>,
    ) -> Result<Response<pb::OperationReply>, Status> {
        let peer = peer_of(&req);
        let r = req.into_inner();
        let path = absolute_path(&r.path, "save file")?;
        let (domain, ()) = self
            .op("save", &peer, r.domain.as_ref(), move |d| async move {
                with_domain!(&d, x => x.save(&path).await)
            })
            .await?;
        Ok(Response::new(Self::reply(&domain)))
    }

    async fn restore(
        &self,
        req: Request<pb::RestoreRequest>,
    ) -> Result<Response<pb::OperationReply>, Status> {
        let peer = peer_of(&req);
        let r = req.into_inner();
        let path = absolute_path(&r.path, "save file")?;
        let options = RestoreOptions { paused: r.paused };
        let (domain, ()) = self
            .op("restore", &peer, r.domain.as_ref(), move |d| async move {
                with_domain!(&d, x => x.restore(&path, options).await)
            })
            .await?;
        Ok(Response::new(Self::reply(&domain)))
    }

    async fn pm_suspend(
        &self,
        req: Request<pb::PmSuspendRequest>,
    ) -> Result<Response<pb::OperationReply>, Status> {
        let peer = peer_of(&req);
        let r = req.into_inner();
        let target = match pb::PmSuspendTarget::try_from(r.target) {
            Ok(pb::PmSuspendTarget::Disk) => PmSuspendTarget::Disk,
            _ => PmSuspendTarget::Memory,
        };
        let (domain, ()) = self
            .op(
                "pm_suspend",
                &peer,
                r.domain.as_ref(),
                move |d| async move { with_domain!(&d, x => x.pm_suspend(target).await) },
            )
            .await?;
        Ok(Response::new(Self::reply(&domain)))
    }

    async fn pm_wakeup(
        &self,
        req: Request<pb::DomainRef>,
    ) -> Result<Response<pb::OperationReply>, Status> {
        self.simple_op("pm_wakeup", req, |d| async move {
            with_domain!(&d, x => x.pm_wakeup().await)
        })
        .await
    }

    async fn agent_command(
        &self,
        req: Request<pb::AgentCommandRequest>,
    ) -> Result<Response<pb::AgentCommandReply>, Status> {
        let peer = peer_of(&req);
        let r = req.into_inner();
        // Refuse a read-only connection before looking at the command.
        self.require_full("agent_command", &peer)?;
        let (command, arguments) = match parse_agent_command(&r.command_json) {
            Ok(parsed) => parsed,
            Err(status) => {
                log_failure(
                    "agent_command",
                    &ref_text(r.domain.as_ref()),
                    &peer,
                    Instant::now(),
                    &status,
                );
                return Err(status);
            }
        };
        let timeout = r.timeout_ms.filter(|&ms| ms > 0).map(Duration::from_millis);
        let (_, reply) = self
            .op(
                "agent_command",
                &peer,
                r.domain.as_ref(),
                move |d| async move {
                    let name = d.id().name;
                    let agent = with_domain!(&d, x => x.guest_agent().await)?;
                    let agent_err = |e| Error::agent(&name, e);
                    if NO_REPLY_COMMANDS.contains(&command.as_str()) {
                        agent
                            .execute_no_reply(&command, arguments)
                            .await
                            .map_err(agent_err)?;
                        return Ok(serde_json::Value::Object(Default::default()));
                    }
                    let timeout = timeout.unwrap_or(agent.options().command_timeout);
                    agent
                        .execute_with_timeout(&command, arguments, timeout)
                        .await
                        .map_err(agent_err)
                },
            )
            .await?;
        Ok(Response::new(pb::AgentCommandReply {
            reply_json: reply.to_string(),
        }))
    }

    type ConsoleStream = ConsoleOutputStream;

    async fn console(
        &self,
        req: Request<tonic::Streaming<pb::ConsoleInput>>,
    ) -> Result<Response<Self::ConsoleStream>, Status> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let peer = peer_of(&req);
        self.require_full("console", &peer)?;
        let mut inputs = req.into_inner();
        let open = match inputs.message().await? {
            Some(pb::ConsoleInput {
                input: Some(pb::console_input::Input::Open(open)),
            }) => open,
            _ => {
                return Err(bad_request(
                    "a console stream starts with an `open` message naming the domain",
                ))
            }
        };
        let started = Instant::now();
        let shown = ref_text(open.domain.as_ref());
        let domain = self.resolve(open.domain.as_ref()).await?;
        let access = if open.read_write {
            ConsoleAccess::ReadWrite
        } else {
            ConsoleAccess::ReadOnly
        };
        let console = match with_domain!(&domain, d => d.console(access).await) {
            Ok(c) => c,
            Err(e) => {
                let status = error_to_status(&e);
                log_failure("console", &shown, &peer, started, &status);
                return Err(status);
            }
        };
        tracing::info!(op = "console", domain = %shown, %peer, outcome = "ok", read_write = open.read_write, "console opened");
        let (mut reader, mut writer) = tokio::io::split(console);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::ConsoleOutput, Status>>(64);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let n = tokio::select! {
                    _ = tx.closed() => return,
                    n = reader.read(&mut buf) => n,
                };
                match n {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let out = pb::ConsoleOutput {
                            data: buf[..n].to_vec(),
                        };
                        if tx.send(Ok(out)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        tokio::spawn(async move {
            while let Ok(Some(msg)) = inputs.message().await {
                if let Some(pb::console_input::Input::Data(data)) = msg.input {
                    if writer.write_all(&data).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type EventsStream = EventsStream;

    async fn events(
        &self,
        req: Request<pb::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let peer = peer_of(&req);
        let r = req.into_inner();
        let filter = match r.domain.as_ref().and_then(|d| d.domain.as_ref()) {
            None => Filter::All,
            Some(pb::domain_ref::Domain::Uuid(text)) => Filter::Uuid(parse_uuid(text)?),
            Some(pb::domain_ref::Domain::Name(name)) => {
                match self.core.backends.lookup_by_name(name).await {
                    Ok(d) => Filter::Uuid(d.id().uuid),
                    // A name that is not defined now: the kept events of its past
                    // incarnations, when a cursor asks for history; live, nothing can come.
                    Err(Error::NotFound { .. }) if r.since.is_some() => Filter::Name(name.clone()),
                    Err(e) => return Err(error_to_status(&e)),
                }
            }
        };
        tracing::info!(op = "events", domain = %ref_text(r.domain.as_ref()), %peer, since = ?r.since, follow = r.follow, "event stream opened");
        let sub = self.core.journal.subscribe(&filter, r.since);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::EventMessage, Status>>(64);
        let follow = r.follow;
        tokio::spawn(async move {
            let mut follower = sub.follower;
            let mut live = sub.live;
            for entry in sub.backlog {
                if tx.send(Ok(entry_to_pb(entry))).await.is_err() {
                    return;
                }
            }
            if !follow {
                return;
            }
            loop {
                let entry = tokio::select! {
                    _ = tx.closed() => return,
                    received = live.recv() => match received {
                        Ok(entry) => entry,
                        // The follower sees the jump in cursors or seqs and sends a gap.
                        Err(RecvError::Lagged(_)) => continue,
                        Err(RecvError::Closed) => return,
                    },
                };
                for out in follower.next_live(&entry) {
                    if tx.send(Ok(entry_to_pb(out))).await.is_err() {
                        return;
                    }
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_commands_parse_or_are_bad_requests() {
        let (name, args) = parse_agent_command(r#"{"execute":"guest-ping"}"#).unwrap();
        assert_eq!((name.as_str(), args), ("guest-ping", None));
        let (name, args) =
            parse_agent_command(r#"{"execute":"guest-exec","arguments":{"path":"/bin/true"}}"#)
                .unwrap();
        assert_eq!(name, "guest-exec");
        assert_eq!(args, Some(serde_json::json!({"path": "/bin/true"})));
        for bad in [
            "",
            "{",
            "[]",
            r#""guest-ping""#,
            r#"{}"#,
            r#"{"execute":1}"#,
            r#"{"execute":""}"#,
            r#"{"execute":"guest-ping","arguments":[1]}"#,
            r#"{"execute":"guest-ping","id":7}"#,
        ] {
            let status = parse_agent_command(bad).expect_err(bad);
            assert_eq!(status.code(), Code::InvalidArgument, "{bad}");
            let detail = convert::detail_of(&status).expect("detail");
            assert_eq!(convert::kind_name(detail.kind), "bad_request", "{bad}");
        }
    }
}
