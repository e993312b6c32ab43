//! Scenario machinery: the per-scenario context (which cleans up every domain it defined),
//! the exact event checker, and results.

use crate::backend::{GuestOptions, TestBackend};
use domkit_core::{
    Domain, DomainConfig, DomainEvent, DomainState, Driver, Error, EventKind, EventStream,
    Operation,
};
use futures::future::BoxFuture;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use std::time::Duration;

/// How long a test guest may take to boot far enough to act (TCG on a loaded machine).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long to wait for an event that an operation or the guest triggers.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long "nothing more happens" is watched for after a scenario's last expected event.
pub const QUIET: Duration = Duration::from_millis(1500);

/// Why a scenario did not pass.
#[derive(Debug, Clone)]
pub enum Stop {
    /// The first divergence from the expected behaviour.
    Fail(String),
    /// The backend said the operation is unsupported (a gap, never a pass).
    Unsupported(String),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        match e {
            Error::Unsupported { .. } | Error::NoGuestAgent { .. } => {
                Stop::Unsupported(e.to_string())
            }
            Error::GuestAgent {
                source: domkit_core::AgentError::Unsupported { .. },
                ..
            } => Stop::Unsupported(e.to_string()),
            other => Stop::Fail(format!("unexpected error: {other}")),
        }
    }
}

/// A scenario step's result.
pub type Step<T = ()> = Result<T, Stop>;

/// Fail with a message.
pub fn fail<T>(msg: impl Into<String>) -> Step<T> {
    Err(Stop::Fail(msg.into()))
}

/// Check a condition.
pub fn check(cond: bool, msg: impl FnOnce() -> String) -> Step {
    if cond {
        Ok(())
    } else {
        Err(Stop::Fail(msg()))
    }
}

/// Turn a hook error into a failure.
pub fn hook<T>(what: &str, r: Result<T, String>) -> Step<T> {
    r.map_err(|e| Stop::Fail(format!("{what}: {e}")))
}

/// A scenario result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Behaved as specified.
    Pass,
    /// Diverged.
    Fail,
    /// The backend does not support what the scenario needs (a gap).
    Unsupported,
}

/// One scenario's report line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioReport {
    /// Scenario name.
    pub name: String,
    /// Verdict.
    pub verdict: Verdict,
    /// The first divergence, or the unsupported reason.
    pub detail: String,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// A scenario: a name, what it checks, and its body (precondition, operations, expected
/// states and events).
pub struct Scenario<B: TestBackend> {
    /// Name (stable; used by `--only`).
    pub name: &'static str,
    /// What it checks, with the `docs/semantics.md` sections.
    pub about: &'static str,
    /// The body.
    pub run: for<'a> fn(&'a ScenarioCtx<'a, B>) -> BoxFuture<'a, Step>,
}

/// Per-scenario context: the backend plus bookkeeping for cleanup.
pub struct ScenarioCtx<'a, B: TestBackend> {
    /// The backend.
    pub backend: &'a B,
    prefix: String,
    defined: Mutex<Vec<String>>,
}

impl<'a, B: TestBackend> ScenarioCtx<'a, B> {
    /// A context whose domain names start with `prefix`.
    pub fn new(backend: &'a B, prefix: String) -> Self {
        ScenarioCtx {
            backend,
            prefix,
            defined: Mutex::new(Vec::new()),
        }
    }

    /// The name this scenario gives a domain: `<prefix>-<suffix>` (for domains it does not
    /// define through [`ScenarioCtx::define`], and so must clean up itself).
    pub fn domain_name(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.prefix)
    }

    /// The driver.
    pub fn driver(&self) -> &B::Driver {
        self.backend.driver()
    }

    /// Define a test guest named `<prefix>-<suffix>` and subscribe to its events before
    /// anything happens to it (so the watch sees `Started` onwards).
    pub async fn define(
        &self,
        suffix: &str,
        options: GuestOptions,
    ) -> Step<(<B::Driver as Driver>::Domain, EventWatch)> {
        self.define_config(suffix, |name| Ok(self.backend.guest_config(name, options)))
            .await
    }

    /// As [`ScenarioCtx::define`], with the config `make` builds for the domain's name.
    pub async fn define_config(
        &self,
        suffix: &str,
        make: impl FnOnce(&str) -> Result<DomainConfig, String>,
    ) -> Step<(<B::Driver as Driver>::Domain, EventWatch)> {
        let name = self.domain_name(suffix);
        let config = hook("building the domain's config", make(&name))?;
        let domain = self.driver().define(config).await?;
        self.defined
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(name);
        let watch = EventWatch::new(domain.subscribe());
        Ok((domain, watch))
    }

    /// Define and start (running), check `Started(Booted)`, without waiting for the guest
    /// (for scenarios where what the guest runs does not matter: pause, save, destroy...).
    pub async fn launch(
        &self,
        suffix: &str,
        options: GuestOptions,
    ) -> Step<(<B::Driver as Driver>::Domain, EventWatch)> {
        let (domain, mut watch) = self.define(suffix, options).await?;
        domain.start(Default::default()).await?;
        watch
            .expect(&[EventKind::Started(domkit_core::StartedDetail::Booted)])
            .await?;
        expect_state(&domain, |s| s.is_running(), "running after start")?;
        Ok((domain, watch))
    }

    /// Define and start (running), check `Started(Booted)`, and wait for the guest to be
    /// ready.
    pub async fn boot(
        &self,
        suffix: &str,
        options: GuestOptions,
    ) -> Step<(<B::Driver as Driver>::Domain, EventWatch)> {
        let (domain, mut watch) = self.define(suffix, options).await?;
        domain.start(Default::default()).await?;
        watch
            .expect(&[EventKind::Started(domkit_core::StartedDetail::Booted)])
            .await?;
        expect_state(&domain, |s| s.is_running(), "running after start")?;
        hook(
            "waiting for the guest to be ready",
            self.backend.wait_guest_ready(&domain, BOOT_TIMEOUT).await,
        )?;
        Ok((domain, watch))
    }

    /// Destroy and undefine every domain this scenario defined, then check that no backend
    /// domain of any of them is left on the host (the leak check).
    pub async fn cleanup(&self) -> Vec<String> {
        let names = std::mem::take(&mut *self.defined.lock().unwrap_or_else(|p| p.into_inner()));
        let mut problems = Vec::new();
        for name in names {
            match self.driver().lookup_by_name(&name).await {
                Ok(d) => {
                    if let Err(e) = d.destroy().await {
                        problems.push(format!("destroy {name}: {e}"));
                    }
                    if let Err(e) = self.driver().undefine(&name).await {
                        problems.push(format!("undefine {name}: {e}"));
                    }
                }
                Err(Error::NotFound { .. }) => {}
                Err(e) => problems.push(format!("lookup {name}: {e}")),
            }
            if let Err(e) = expect_no_backend_domain(self.backend, &name).await {
                problems.push(match e {
                    Stop::Fail(m) | Stop::Unsupported(m) => m,
                });
            }
        }
        problems
    }
}

/// How long a backend domain may take to disappear from the host after its domain shut off.
pub const TEARDOWN: Duration = Duration::from_secs(5);

/// Check that no backend domain named `name` is on the host (waiting up to [`TEARDOWN`] for
/// one being torn down).
pub async fn expect_no_backend_domain<B: TestBackend>(backend: &B, name: &str) -> Step {
    let deadline = std::time::Instant::now() + TEARDOWN;
    loop {
        let exists = hook(
            "looking for the backend domain",
            backend.backend_domain_exists(name).await,
        )?;
        if !exists {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return fail(format!(
                "a backend domain of {name} is left on the host {TEARDOWN:?} after it shut off"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Check the domain's current state.
pub fn expect_state<D: Domain>(
    domain: &D,
    pred: impl Fn(&DomainState) -> bool,
    what: &str,
) -> Step {
    let s = domain.state();
    check(pred(&s), || format!("expected {what}, state is {s}"))
}

/// Check the domain's state is exactly `want`.
pub fn expect_exact_state<D: Domain>(domain: &D, want: DomainState) -> Step {
    let s = domain.state();
    check(s == want, || format!("expected state {want}, got {s}"))
}

/// Check that `r` is an error of the given kind.
pub fn expect_err<T: std::fmt::Debug>(
    r: domkit_core::Result<T>,
    what: &str,
    pred: impl Fn(&Error) -> bool,
) -> Step {
    match r {
        Ok(v) => fail(format!("expected {what}, got Ok({v:?})")),
        Err(e) if pred(&e) => Ok(()),
        Err(e) => fail(format!("expected {what}, got error: {e}")),
    }
}

/// Check an `InvalidState` error for `op`.
pub fn is_invalid_state(op: Operation) -> impl Fn(&Error) -> bool {
    move |e| matches!(e, Error::InvalidState { operation, .. } if *operation == op)
}

/// `[a, b, c]` for event kinds.
pub fn kinds_list(kinds: &[EventKind]) -> String {
    let v: Vec<String> = kinds.iter().map(|k| k.to_string()).collect();
    format!("[{}]", v.join(", "))
}

/// Reads a domain's events and checks them exactly: kinds in order, and sequence numbers
/// contiguous (no event lost, none duplicated).
pub struct EventWatch {
    stream: EventStream,
    /// Only this domain's events count (a driver-wide stream, while other scenarios run).
    only: Option<String>,
    last_seq: Option<u64>,
    /// Deliver the guest agent's lifecycle events (§13.4). Off by default: they are not
    /// lifecycle transitions and come whenever the guest's agent opens or closes its port,
    /// so every other scenario skips them (keeping the `seq` check across them).
    agent_events: bool,
    /// Every event seen, for failure messages.
    pub seen: Vec<DomainEvent>,
}

impl EventWatch {
    /// Watch `stream`.
    pub fn new(stream: EventStream) -> Self {
        EventWatch {
            stream,
            only: None,
            last_seq: None,
            agent_events: false,
            seen: Vec::new(),
        }
    }

    /// This watch with the guest agent's `agent_connected` / `agent_disconnected` events
    /// delivered (the agent scenarios, §13.4).
    pub fn with_agent_events(mut self) -> Self {
        self.agent_events = true;
        self
    }

    /// Watch the events of the domain named `name` in a driver-wide `stream` (the events of
    /// other domains, e.g. of scenarios running at the same time, are skipped).
    pub fn for_domain(stream: EventStream, name: &str) -> Self {
        EventWatch {
            only: Some(name.to_string()),
            ..EventWatch::new(stream)
        }
    }

    async fn next(&mut self, timeout: Duration) -> Option<DomainEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Ok(Some(ev)) => {
                    if self.only.as_ref().is_some_and(|n| *n != ev.domain.name) {
                        continue;
                    }
                    self.seen.push(ev.clone());
                    if !self.agent_events
                        && matches!(
                            ev.kind,
                            EventKind::AgentConnected | EventKind::AgentDisconnected
                        )
                    {
                        // Skipped, but the seq check goes on across it.
                        if self.last_seq.is_some_and(|l| ev.seq == l + 1) {
                            self.last_seq = Some(ev.seq);
                        }
                        continue;
                    }
                    return Some(ev);
                }
                _ => return None,
            }
        }
    }

    fn kinds(evs: &[DomainEvent]) -> String {
        let v: Vec<String> = evs.iter().map(|e| e.kind.to_string()).collect();
        format!("[{}]", v.join(", "))
    }

    /// The next events must be exactly `want`, in order, with contiguous sequence numbers.
    pub async fn expect(&mut self, want: &[EventKind]) -> Step {
        self.expect_within(want, EVENT_TIMEOUT).await
    }

    /// As [`EventWatch::expect`] with a timeout per event.
    pub async fn expect_within(&mut self, want: &[EventKind], timeout: Duration) -> Step {
        let mut got = Vec::new();
        for w in want {
            let Some(ev) = self.next(timeout).await else {
                return fail(format!(
                    "expected events {want:?}, got {} then nothing for {timeout:?}",
                    Self::kinds(&got)
                ));
            };
            if let Some(last) = self.last_seq {
                if ev.seq != last + 1 {
                    return fail(format!(
                        "event seq jumped from {last} to {} ({} lost or reordered)",
                        ev.seq, ev.kind
                    ));
                }
            }
            self.last_seq = Some(ev.seq);
            let ok = ev.kind == *w;
            got.push(ev);
            if !ok {
                return fail(format!(
                    "expected events {:?}, got {}",
                    want.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
                    Self::kinds(&got)
                ));
            }
        }
        Ok(())
    }

    /// Every event until none arrives for `quiet` (at most [`EVENT_TIMEOUT`] in all), with
    /// contiguous sequence numbers.
    pub async fn collect_quiet(&mut self, quiet: Duration) -> Step<Vec<EventKind>> {
        let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
        let mut got = Vec::new();
        while let Some(ev) = self.next(quiet).await {
            if let Some(last) = self.last_seq {
                if ev.seq != last + 1 {
                    return fail(format!(
                        "event seq jumped from {last} to {} ({} lost or reordered)",
                        ev.seq, ev.kind
                    ));
                }
            }
            self.last_seq = Some(ev.seq);
            got.push(ev.kind);
            if std::time::Instant::now() >= deadline {
                return fail(format!(
                    "events keep coming for {EVENT_TIMEOUT:?}: {}",
                    kinds_list(&got)
                ));
            }
        }
        Ok(got)
    }

    /// No event may arrive for `quiet`.
    pub async fn expect_quiet(&mut self, quiet: Duration) -> Step {
        match self.next(quiet).await {
            None => Ok(()),
            Some(ev) => fail(format!(
                "unexpected extra event {} (seq {})",
                ev.kind, ev.seq
            )),
        }
    }
}
