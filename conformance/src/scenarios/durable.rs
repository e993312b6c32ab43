//! The durable family (issue 12, `docs/semantics.md` §11): definitions persist, domains
//! outlive the process that made them, and the next manager on the same roots reattaches
//! them with the same uuid, the next `seq`, the state the evidence supports, the lifecycle
//! policy applied to what happened while no manager ran (events marked `reconciled`), and
//! operations in flight ended consistently. Ephemeral domains die with the manager process.
//!
//! Every scenario gets private roots ([`DurableRoots`]). A manager is either a separate
//! process ([`ManagerProcess`]: `domkit manager`, SIGKILLed) or a driver opened in this
//! process ([`TestBackend::open_persistent`], left by [`TestBackend::detach`]); "away" means
//! that neither runs. Scenarios end by destroying and undefining what they made through a
//! fresh persistent driver, then checking that no backend domain is left.

use crate::backend::{AwayAction, DurableRoots, GuestAction, GuestOptions, TestBackend};
use crate::manager::ManagerProcess;
use crate::scenario::*;
use domkit_core::{
    CrashedDetail, CrashedReason, Domain, DomainEvent, DomainState, Driver, Error, EventKind,
    LifecycleAction, PausedReason, ResumedDetail, RunningReason, ShutdownOptions, ShutdownOutcome,
    ShutdownRequester, ShutdownWait, ShutoffReason, StartedDetail, StoppedDetail, SuspendedDetail,
};
use futures::StreamExt;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

use super::with_policies;
use EventKind as E;

/// The domain handle of a backend.
type Dom<B> = <<B as TestBackend>::Driver as Driver>::Domain;

/// How long a domain of a killed ephemeral manager may take to disappear.
const EPHEMERAL_GONE: Duration = Duration::from_secs(15);
/// Longer than tokio keeps an idle blocking thread (10 s): an ephemeral domain forked from
/// such a thread would die with it (issue 12, item 4).
const IDLE_MANAGER: Duration = Duration::from_secs(12);

/// The roots of one durable scenario and the names of the domains it made.
pub(super) struct Away<'c, 'a, B: TestBackend> {
    ctx: &'c ScenarioCtx<'a, B>,
    roots: DurableRoots,
    names: std::sync::Mutex<Vec<String>>,
}

impl<'c, 'a, B: TestBackend> Away<'c, 'a, B> {
    pub(super) fn new(ctx: &'c ScenarioCtx<'a, B>) -> Step<Self> {
        Ok(Away {
            ctx,
            roots: hook("durable roots", DurableRoots::new())?,
            names: std::sync::Mutex::new(Vec::new()),
        })
    }

    pub(super) fn backend(&self) -> &'a B {
        self.ctx.backend
    }

    /// A domain name of this scenario (remembered for the cleanup).
    pub(super) fn name(&self, suffix: &str) -> String {
        let name = self.ctx.domain_name(suffix);
        self.names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(name.clone());
        name
    }

    /// The test guest's config as JSON, for a manager process.
    fn config_json(&self, name: &str, options: GuestOptions) -> Step<Value> {
        let config = self.backend().guest_config(name, options);
        serde_json::to_value(&config).map_err(|e| Stop::Fail(format!("config as JSON: {e}")))
    }

    /// A manager process on the roots, ready.
    fn manager(&self, ephemeral: bool) -> Step<ManagerProcess> {
        let command = hook(
            "the manager's command",
            self.backend().manager_command(&self.roots, ephemeral),
        )?;
        ManagerProcess::spawn(command)
            .map_err(|answer| Stop::Fail(format!("the manager did not open: {answer}")))
    }

    /// A persistent driver on the roots, in this process.
    pub(super) async fn open(&self) -> Step<B::Driver> {
        self.backend()
            .open_persistent(&self.roots)
            .await
            .map_err(|e| Stop::Fail(format!("opening the roots: {e}")))
    }

    /// The next manager's view of `name`: reattached, same uuid.
    pub(super) async fn reattached(
        &self,
        driver: &B::Driver,
        name: &str,
        uuid: &str,
    ) -> Step<Dom<B>> {
        let domain = driver
            .lookup_by_name(name)
            .await
            .map_err(|e| Stop::Fail(format!("{name} after reattach: {e}")))?;
        let got = domain.id().uuid.to_string();
        check(got == uuid, || {
            format!("{name} came back with uuid {got}, was {uuid}")
        })?;
        Ok(domain)
    }

    /// Define and start `name` in a driver of this process and wait for its guest; the
    /// domain's uuid and `seq`.
    async fn boot_here(
        &self,
        driver: &B::Driver,
        name: &str,
        options: GuestOptions,
    ) -> Step<(String, u64)> {
        let domain = driver
            .define(self.backend().guest_config(name, options))
            .await?;
        let since = domain.snapshot().seq;
        domain.start(Default::default()).await?;
        hook(
            "waiting for the guest to be ready",
            self.backend().wait_guest_ready(&domain, BOOT_TIMEOUT).await,
        )?;
        let seq = settled_seq(&domain, since).await?;
        Ok((domain.id().uuid.to_string(), seq))
    }

    /// Wait until no backend domain of `name` is on the host.
    async fn expect_gone(&self, name: &str, within: Duration) -> Step {
        let deadline = Instant::now() + within;
        loop {
            let exists = hook(
                "looking for the backend domain",
                self.backend().backend_domain_exists(name).await,
            )?;
            if !exists {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return fail(format!(
                    "the backend domain of {name} still exists {within:?} later"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// End of a scenario, also after a failure: destroy and undefine everything on the
    /// roots, then the leak check; the body's `result` first.
    pub(super) async fn finish(&self, result: Step) -> Step {
        let mut problems = Vec::new();
        // A killed manager's lock is released by the kernel when it dies; a driver of this
        // process that a failed step dropped releases it at once.
        let mut driver = None;
        for _ in 0..50 {
            match self.backend().open_persistent(&self.roots).await {
                Ok(d) => {
                    driver = Some(d);
                    break;
                }
                Err(Error::RootInUse { .. }) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => {
                    problems.push(format!("opening the roots for the cleanup: {e}"));
                    break;
                }
            }
        }
        if let Some(driver) = driver {
            match driver.list().await {
                Ok(infos) => {
                    for info in infos {
                        let name = info.id.name;
                        if let Ok(d) = driver.lookup_by_name(&name).await {
                            if let Err(e) = d.destroy().await {
                                problems.push(format!("destroy {name}: {e}"));
                            }
                        }
                        if let Err(e) = driver.undefine(&name).await {
                            problems.push(format!("undefine {name}: {e}"));
                        }
                    }
                }
                Err(e) => problems.push(format!("list: {e}")),
            }
            drop(driver);
        }
        let names = std::mem::take(&mut *self.names.lock().unwrap_or_else(|p| p.into_inner()));
        for name in names {
            if let Err(Stop::Fail(m) | Stop::Unsupported(m)) =
                expect_no_backend_domain(self.backend(), &name).await
            {
                problems.push(m);
            }
        }
        if problems.is_empty() {
            result
        } else {
            result.and(fail(format!("cleanup: {}", problems.join("; "))))
        }
    }
}

/// A manager's answer to `state`: the state and the last `seq`.
fn manager_state(manager: &mut ManagerProcess, name: &str) -> Step<(DomainState, u64)> {
    let answer = hook(
        "the manager's state",
        manager.call(json!({"op": "state", "name": name})),
    )?;
    let state: DomainState = serde_json::from_value(answer["state"].clone())
        .map_err(|e| Stop::Fail(format!("the manager's state {answer}: {e}")))?;
    let seq = answer["seq"]
        .as_u64()
        .ok_or_else(|| Stop::Fail(format!("no seq in {answer}")))?;
    Ok((state, seq))
}

/// Define `config` in a manager process; its uuid.
fn manager_define(manager: &mut ManagerProcess, config: Value) -> Step<String> {
    let answer = hook(
        "define through the manager",
        manager.call(json!({"op": "define", "config": config})),
    )?;
    answer["uuid"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| Stop::Fail(format!("no uuid in {answer}")))
}

/// The events of `domain` after `seq` (those a reattach produced are in its ring), checked
/// exactly: kinds in order, `seq + 1` onwards, and which of them are reconciled.
async fn expect_since<D: Domain>(
    domain: &D,
    seq: u64,
    want: &[(EventKind, bool)],
) -> Step<Vec<DomainEvent>> {
    let mut stream = domain
        .subscribe_from(seq)
        .map_err(|e| Stop::Fail(format!("subscribe_from({seq}): {e}")))?;
    let mut got: Vec<DomainEvent> = Vec::new();
    let describe = |got: &[DomainEvent]| {
        got.iter()
            .map(|e| {
                format!(
                    "{}#{}{}",
                    e.kind,
                    e.seq,
                    if e.reconciled { " (reconciled)" } else { "" }
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    // The guest agent's events (§13.4) come whenever the guest's agent opens or closes its
    // port: skipped, the seq check going on across them.
    let mut skipped = 0u64;
    for (i, (kind, reconciled)) in want.iter().enumerate() {
        let ev = loop {
            match tokio::time::timeout(EVENT_TIMEOUT, stream.next()).await {
                Ok(Some(ev))
                    if matches!(
                        ev.kind,
                        EventKind::AgentConnected | EventKind::AgentDisconnected
                    ) =>
                {
                    skipped += 1;
                }
                other => break other,
            }
        };
        let ev = match ev {
            Ok(Some(ev)) => ev,
            _ => {
                return fail(format!(
                    "after seq {seq}: expected {}, got [{}] then nothing",
                    kinds_list(&want.iter().map(|w| w.0).collect::<Vec<_>>()),
                    describe(&got)
                ))
            }
        };
        let ok = ev.kind == *kind
            && ev.seq == seq + 1 + skipped + i as u64
            && ev.reconciled == *reconciled;
        got.push(ev);
        if !ok {
            return fail(format!(
                "after seq {seq}: expected {} (reconciled: {:?}), got [{}]",
                kinds_list(&want.iter().map(|w| w.0).collect::<Vec<_>>()),
                want.iter().map(|w| w.1).collect::<Vec<_>>(),
                describe(&got)
            ));
        }
    }
    Ok(got)
}

/// The domain's `seq` once the connect event of its guest agent (§13.4) after `since` is
/// in (at once for a domain without an agent channel). A `seq` taken before it could not be
/// replayed from by the next manager: the event is in this manager's ring only. A backend
/// that probes the agent (Xen) reports it a moment after the guest answers.
async fn settled_seq<D: Domain>(domain: &D, since: u64) -> Step<u64> {
    if domain.guest_agent().await.is_err() {
        return Ok(domain.snapshot().seq);
    }
    let mut stream = domain
        .subscribe_from(since)
        .map_err(|e| Stop::Fail(format!("subscribe_from({since}): {e}")))?;
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(ev)) if ev.kind == EventKind::AgentConnected => break,
            Ok(Some(_)) => {}
            _ => return fail(format!("no agent_connected after seq {since}")),
        }
    }
    Ok(domain.snapshot().seq)
}

/// `true` if the domain's `seq` is `seq`, not counting guest agent events (§13.4) after it:
/// those come whenever the guest's agent opens or closes its port, manager or not.
async fn seq_is<D: Domain>(domain: &D, seq: u64) -> Step<bool> {
    let now = domain.snapshot().seq;
    if now < seq {
        return Ok(false);
    }
    let mut stream = domain
        .subscribe_from(seq)
        .map_err(|e| Stop::Fail(format!("subscribe_from({seq}): {e}")))?;
    for _ in seq..now {
        match tokio::time::timeout(Duration::from_secs(1), stream.next()).await {
            Ok(Some(ev))
                if matches!(
                    ev.kind,
                    EventKind::AgentConnected | EventKind::AgentDisconnected
                ) => {}
            _ => return Ok(false),
        }
    }
    Ok(true)
}

/// Wait until `domain` is in a state `pred` accepts.
async fn wait_state<D: Domain>(
    domain: &D,
    within: Duration,
    what: &str,
    pred: impl Fn(&DomainState) -> bool,
) -> Step<DomainState> {
    let deadline = Instant::now() + within;
    loop {
        let state = domain.state();
        if pred(&state) {
            return Ok(state);
        }
        if Instant::now() >= deadline {
            return fail(format!(
                "expected {what} within {within:?}, state is {state}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn names_of(infos: &[domkit_core::DomainInfo]) -> Vec<String> {
    let mut names: Vec<String> = infos.iter().map(|i| i.id.name.clone()).collect();
    names.sort();
    names
}

/// The files in `dir`, sorted.
fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

// ---------------------------------------------------------------------------------------
// Scenarios

/// A running domain survives its manager's SIGKILL; the next manager finds it running with
/// the same uuid and `seq`, controls it, and shuts it down gracefully.
pub(super) async fn reattach_running<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let away = &Away::new(ctx)?;
    let result: Step = async {
        let name = away.name("run");
        let mut manager = away.manager(false)?;
        let uuid = manager_define(
            &mut manager,
            away.config_json(&name, GuestOptions::default())?,
        )?;
        hook("start", manager.call(json!({"op": "start", "name": name})))?;
        let (state, seq) = manager_state(&mut manager, &name)?;
        check(state == DomainState::Running(RunningReason::Booted), || {
            format!("the manager reports {state} after start")
        })?;
        manager.sigkill();
        check(
            hook(
                "backend domain",
                away.backend().backend_domain_exists(&name).await,
            )?,
            || "a persistent domain died with its manager".into(),
        )?;

        let driver = away.open().await?;
        let domain = away.reattached(&driver, &name, &uuid).await?;
        expect_exact_state(&domain, DomainState::Running(RunningReason::Booted))?;
        let snap = domain.snapshot();
        check(seq_is(&domain, seq).await?, || {
            format!(
                "nothing happened while away, yet seq is {} (was {seq})",
                snap.seq
            )
        })?;
        hook(
            "the guest answers the new manager",
            away.backend().wait_guest_ready(&domain, BOOT_TIMEOUT).await,
        )?;
        // Its guest agent too, through the trait (§13.6: the channel's socket lives in the
        // runtime directory with the backend instance, and outlived the manager).
        let agent = domain.guest_agent().await?;
        let deadline = Instant::now() + BOOT_TIMEOUT;
        while let Err(e) = agent.ping().await {
            if Instant::now() > deadline {
                return fail(format!(
                    "the reattached domain's agent does not answer: {e}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        drop(agent);
        let outcome = domain
            .shutdown(ShutdownOptions {
                wait: ShutdownWait::Completed,
                timeout: EVENT_TIMEOUT,
                ..ShutdownOptions::default()
            })
            .await?;
        check(outcome == ShutdownOutcome::Completed, || {
            format!("shutdown after reattach returned {outcome:?}")
        })?;
        expect_since(
            &domain,
            seq,
            &[
                (E::ShutdownRequested(ShutdownRequester::Host), false),
                (E::Stopped(StoppedDetail::Shutdown), false),
            ],
        )
        .await?;
        expect_exact_state(&domain, DomainState::Shutoff(ShutoffReason::Shutdown))?;
        away.expect_gone(&name, TEARDOWN).await
    }
    .await;
    away.finish(result).await
}

/// A domain started paused survives its manager; the next one finds it paused, resumes it.
pub(super) async fn reattach_paused<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let away = &Away::new(ctx)?;
    let result: Step = async {
        let name = away.name("paused");
        let mut manager = away.manager(false)?;
        let uuid = manager_define(
            &mut manager,
            away.config_json(&name, GuestOptions::default())?,
        )?;
        hook(
            "start paused",
            manager.call(json!({"op": "start", "name": name, "paused": true})),
        )?;
        let (state, seq) = manager_state(&mut manager, &name)?;
        check(state == DomainState::Paused(PausedReason::User), || {
            format!("the manager reports {state} after a paused start")
        })?;
        manager.sigkill();

        let driver = away.open().await?;
        let domain = away.reattached(&driver, &name, &uuid).await?;
        expect_exact_state(&domain, DomainState::Paused(PausedReason::User))?;
        check(
            !hook("vCPUs", away.backend().backend_vcpus_running(&domain).await)?,
            || "the backend runs the vCPUs of a domain reattached as paused".into(),
        )?;
        domain.resume().await?;
        domain.destroy().await?;
        expect_since(
            &domain,
            seq,
            &[
                (E::Resumed(ResumedDetail::Unpaused), false),
                (E::Stopped(StoppedDetail::Destroyed), false),
            ],
        )
        .await?;
        away.expect_gone(&name, TEARDOWN).await
    }
    .await;
    away.finish(result).await
}

/// Shut-off definitions survive (never started, and stopped); `already_exists` for a
/// persisted name; `undefine` is durable.
pub(super) async fn reattach_definitions<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let away = &Away::new(ctx)?;
    let result: Step = async {
        let (never, stopped) = (away.name("never"), away.name("stopped"));
        let mut manager = away.manager(false)?;
        let never_uuid = manager_define(
            &mut manager,
            away.config_json(&never, GuestOptions::default())?,
        )?;
        let stopped_uuid = manager_define(
            &mut manager,
            away.config_json(&stopped, GuestOptions::default())?,
        )?;
        hook(
            "start",
            manager.call(json!({"op": "start", "name": stopped})),
        )?;
        hook(
            "destroy",
            manager.call(json!({"op": "destroy", "name": stopped})),
        )?;
        manager.sigkill();

        let driver = away.open().await?;
        let listed = names_of(&driver.list().await?);
        let mut want = vec![never.clone(), stopped.clone()];
        want.sort();
        check(listed == want, || {
            format!("after a restart list() shows {listed:?}, want {want:?}")
        })?;
        let a = away.reattached(&driver, &never, &never_uuid).await?;
        expect_exact_state(&a, DomainState::Shutoff(ShutoffReason::Unknown))?;
        let b = away.reattached(&driver, &stopped, &stopped_uuid).await?;
        expect_exact_state(&b, DomainState::Shutoff(ShutoffReason::Destroyed))?;
        expect_err(
            driver
                .define(away.backend().guest_config(&never, GuestOptions::default()))
                .await
                .map(|_| ()),
            "already_exists for a persisted name",
            |e| matches!(e, Error::AlreadyExists { .. }),
        )?;
        driver.undefine(&stopped).await?;
        drop((a, b));
        away.backend().detach(driver);

        let driver = away.open().await?;
        let listed = names_of(&driver.list().await?);
        check(listed == [never.clone()], || {
            format!("after undefine and a restart list() shows {listed:?}")
        })?;
        expect_err(
            driver.lookup_by_name(&stopped).await.map(|_| ()),
            "not_found for an undefined domain",
            |e| matches!(e, Error::NotFound { .. }),
        )?;
        away.backend().detach(driver);
        Ok(())
    }
    .await;
    away.finish(result).await
}

/// The guest powers off while no manager runs: the next manager reconciles it and applies
/// each `on_poweroff`. The events are those of a live poweroff. Those the core derives from
/// the fact found on reattach are marked reconciled, including the transitions of the policy
/// it announces with it (a restart's `started`); those of a later backend fact (the end of
/// a destroy's teardown) are not (§11.3).
pub(super) async fn poweroff_while_away<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    while_away(
        ctx,
        GuestAction::Poweroff,
        |policy| with_policies(policy, LifecycleAction::Restart, LifecycleAction::Destroy),
        |policy| match policy {
            LifecycleAction::Destroy => (
                vec![
                    (E::ShutdownRequested(ShutdownRequester::Guest), true),
                    (E::Stopped(StoppedDetail::Shutdown), false),
                ],
                DomainState::Shutoff(ShutoffReason::Shutdown),
            ),
            LifecycleAction::Restart => (
                vec![
                    (E::ShutdownRequested(ShutdownRequester::Guest), true),
                    (E::Stopped(StoppedDetail::Shutdown), true),
                    (E::Started(StartedDetail::Booted), true),
                ],
                DomainState::Running(RunningReason::Booted),
            ),
            LifecycleAction::Preserve => (
                vec![
                    (E::ShutdownRequested(ShutdownRequester::Guest), true),
                    (E::Suspended(SuspendedDetail::Paused), true),
                ],
                DomainState::Paused(PausedReason::ShuttingDown),
            ),
        },
    )
    .await
}

/// The guest panics while no manager runs: reconciled, then each `on_crash`.
pub(super) async fn crash_while_away<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    while_away(
        ctx,
        GuestAction::Panic,
        |policy| with_policies(LifecycleAction::Destroy, LifecycleAction::Restart, policy),
        |policy| match policy {
            LifecycleAction::Destroy => (
                vec![
                    (E::Crashed(CrashedDetail::Panicked), true),
                    (E::Stopped(StoppedDetail::Crashed), false),
                ],
                DomainState::Shutoff(ShutoffReason::Crashed),
            ),
            LifecycleAction::Restart => (
                vec![
                    (E::Crashed(CrashedDetail::Panicked), true),
                    (E::Stopped(StoppedDetail::Crashed), true),
                    (E::Started(StartedDetail::Booted), true),
                ],
                DomainState::Running(RunningReason::Booted),
            ),
            LifecycleAction::Preserve => (
                vec![(E::Crashed(CrashedDetail::Panicked), true)],
                DomainState::Crashed(CrashedReason::Panicked),
            ),
        },
    )
    .await
}

type Expected = (Vec<(EventKind, bool)>, DomainState);

/// Three domains (policy destroy, restart, preserve) booted by a driver of this process,
/// which then detaches; the guests do `action` while no manager runs; the next manager
/// must show each policy's events and state.
async fn while_away<B: TestBackend>(
    ctx: &ScenarioCtx<'_, B>,
    action: GuestAction,
    options: fn(LifecycleAction) -> GuestOptions,
    expected: fn(LifecycleAction) -> Expected,
) -> Step {
    let away = &Away::new(ctx)?;
    let result: Step = async {
        use LifecycleAction::*;
        let policies = [Destroy, Restart, Preserve];
        let names: Vec<String> = ["destroy", "restart", "preserve"]
            .iter()
            .map(|s| away.name(s))
            .collect();
        let first = away.open().await?;
        let booted = futures::future::join_all(
            policies
                .iter()
                .zip(&names)
                .map(|(p, name)| away.boot_here(&first, name, options(*p))),
        )
        .await;
        let mut before = Vec::new();
        for b in booted {
            before.push(b?);
        }
        away.backend().detach(first);
        for name in &names {
            hook(
                "the guest acts while no manager runs",
                away.backend()
                    .act_while_away(&away.roots, name, AwayAction::Guest(action))
                    .await,
            )?;
        }

        let driver = away.open().await?;
        for ((policy, name), (uuid, seq)) in policies.iter().zip(&names).zip(&before) {
            let domain = away.reattached(&driver, name, uuid).await?;
            let (events, state) = expected(*policy);
            expect_since(&domain, *seq, &events)
                .await
                .map_err(|e| prefix_stop(&format!("{name} ({policy:?})"), e))?;
            wait_state(&domain, EVENT_TIMEOUT, &state.to_string(), |s| *s == state)
                .await
                .map_err(|e| prefix_stop(&format!("{name} ({policy:?})"), e))?;
        }
        // The manager that reattached them ends them (a restarted one included) and the
        // backend lets them go.
        for name in &names {
            driver.lookup_by_name(name).await?.destroy().await?;
            away.expect_gone(name, TEARDOWN * 3).await?;
        }
        Ok(())
    }
    .await;
    away.finish(result).await
}

/// A domain its lifecycle policy restarted (a new backend domain: a new QEMU process, a new
/// Xen domid) while a manager watched, then left by that manager: the next manager adopts the
/// restarted instance (same uuid, same seq, running(booted), the guest answers). Then the
/// same with the restart done by a reattach (the guest powered off while away): a third
/// manager adopts that instance, and its destroy ends it on the host. The previous
/// manager's restart must have reached the store (the new domid / process and monitor), or
/// the next one would see a vanished domain and leave the restarted one running unmanaged.
pub(super) async fn reattach_after_restart<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let away = &Away::new(ctx)?;
    let result: Step = async {
        use LifecycleAction::*;
        let name = away.name("restarted");
        let first = away.open().await?;
        let (uuid, seq) = away
            .boot_here(&first, &name, with_policies(Restart, Destroy, Destroy))
            .await?;
        let domain = first.lookup_by_name(&name).await?;
        hook(
            "guest poweroff",
            away.backend()
                .guest_do(&domain, GuestAction::Poweroff)
                .await,
        )?;
        let seq = away.restarted(&domain, seq, false).await?;
        drop(domain);
        away.backend().detach(first);
        let second = away.open().await?;
        let domain = away.adopted_running(&second, &name, &uuid, seq).await?;
        let seq = away.agent_seen_again(&domain, seq).await?;

        // Now the restart is the next manager's: the guest powers off while none runs, the
        // reattach restarts it (reconciled), that manager leaves too, and a third one must
        // find the instance the second one started.
        drop(domain);
        away.backend().detach(second);
        hook(
            "the guest powers off while no manager runs",
            away.backend()
                .act_while_away(&away.roots, &name, AwayAction::Guest(GuestAction::Poweroff))
                .await,
        )?;
        let third = away.open().await?;
        let domain = away.reattached(&third, &name, &uuid).await?;
        let seq = away.restarted(&domain, seq, true).await?;
        drop(domain);
        away.backend().detach(third);
        let fourth = away.open().await?;
        let domain = away.adopted_running(&fourth, &name, &uuid, seq).await?;
        domain.destroy().await?;
        expect_since(
            &domain,
            seq,
            &[(E::Stopped(StoppedDetail::Destroyed), false)],
        )
        .await?;
        away.expect_gone(&name, TEARDOWN).await
    }
    .await;
    away.finish(result).await
}

impl<B: TestBackend> Away<'_, '_, B> {
    /// `domain` was restarted by its `on_poweroff = restart` policy after `seq` (events
    /// `reconciled` or live) and its guest is up again; the `seq` it is at now.
    async fn restarted(&self, domain: &Dom<B>, seq: u64, reconciled: bool) -> Step<u64> {
        expect_since(
            domain,
            seq,
            &[
                (E::ShutdownRequested(ShutdownRequester::Guest), reconciled),
                (E::Stopped(StoppedDetail::Shutdown), reconciled),
                (E::Started(StartedDetail::Booted), reconciled),
            ],
        )
        .await?;
        hook(
            "the restarted guest is ready",
            self.backend().wait_guest_ready(domain, BOOT_TIMEOUT).await,
        )?;
        settled_seq(domain, seq).await
    }

    /// The `seq` to carry on from an adopted running domain: a backend that probes the agent
    /// (Xen, §13.4) reports it connected again in the new manager (wait for that event: the
    /// manager after this one could not replay it); one that follows the port does not.
    async fn agent_seen_again(&self, domain: &Dom<B>, seq: u64) -> Step<u64> {
        if self.backend().agent_events_follow_the_port() {
            return Ok(seq);
        }
        settled_seq(domain, seq).await
    }

    /// The next manager's `name`, left running at `seq`: same uuid, `running(booted)`, the
    /// same `seq`, and its guest answers.
    async fn adopted_running(
        &self,
        driver: &B::Driver,
        name: &str,
        uuid: &str,
        seq: u64,
    ) -> Step<Dom<B>> {
        let domain = self.reattached(driver, name, uuid).await?;
        expect_exact_state(&domain, DomainState::Running(RunningReason::Booted))?;
        // Agent events aside: a backend that probes the agent (Xen, §13.4) reports it
        // connected again once the new manager's probe is answered.
        check(seq_is(&domain, seq).await?, || {
            format!(
                "nothing happened while away, yet seq is {} (was {seq})",
                domain.snapshot().seq
            )
        })?;
        hook(
            "the restarted guest answers the new manager",
            self.backend().wait_guest_ready(&domain, BOOT_TIMEOUT).await,
        )?;
        Ok(domain)
    }
}

fn prefix_stop(what: &str, stop: Stop) -> Stop {
    match stop {
        Stop::Fail(m) => Stop::Fail(format!("{what}: {m}")),
        Stop::Unsupported(m) => Stop::Unsupported(format!("{what}: {m}")),
    }
}

/// The backend domain is ended behind every manager's back while none runs: the next one
/// reports it shut off with the backend's documented reason (§10, §11.3), reconciled.
pub(super) async fn destroyed_while_away<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let away = &Away::new(ctx)?;
    let result: Step = async {
        let name = away.name("killed");
        let first = away.open().await?;
        let domain = first
            .define(away.backend().guest_config(&name, GuestOptions::default()))
            .await?;
        domain.start(Default::default()).await?;
        let (uuid, seq) = (domain.id().uuid.to_string(), domain.snapshot().seq);
        drop(domain);
        away.backend().detach(first);
        let reason = hook(
            "ending the backend domain while away",
            away.backend()
                .act_while_away(&away.roots, &name, AwayAction::Kill)
                .await,
        )?
        .ok_or_else(|| Stop::Fail("the kill hook gave no shutoff reason".into()))?;
        let detail = match reason {
            ShutoffReason::Crashed => StoppedDetail::Crashed,
            ShutoffReason::Destroyed => StoppedDetail::Destroyed,
            other => return fail(format!("unexpected documented reason {other:?}")),
        };

        let driver = away.open().await?;
        let domain = away.reattached(&driver, &name, &uuid).await?;
        expect_since(&domain, seq, &[(E::Stopped(detail), true)]).await?;
        expect_exact_state(&domain, DomainState::Shutoff(reason))?;
        // Startable again under the new manager.
        domain.start(Default::default()).await?;
        expect_state(&domain, |s| s.is_running(), "running after a new start")?;
        domain.destroy().await?;
        Ok(())
    }
    .await;
    away.finish(result).await
}

/// The manager process is SIGKILLed in the middle of a save (its temporary file exists):
/// the next manager finds either the file committed under its final name and the domain
/// `shutoff(saved)` (and the file restores), or nothing under the final name, no temporary
/// file, and the domain running as before (§11.4).
pub(super) async fn manager_killed_mid_save<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let away = &Away::new(ctx)?;
    let result: Step = async {
        let name = away.name("midsave");
        let save_dir = ctx.backend.scratch_dir().join(&name);
        std::fs::create_dir_all(&save_dir)
            .map_err(|e| Stop::Fail(format!("{}: {e}", save_dir.display())))?;
        let target = save_dir.join("dom.save");
        // The guest takes part in a Xen PV save: boot it first, here, then hand it over.
        let first = away.open().await?;
        let (uuid, _) = away
            .boot_here(&first, &name, GuestOptions::default())
            .await?;
        away.backend().detach(first);

        let mut manager = away.manager(false)?;
        hook(
            "save request",
            manager.send(json!({"op": "save", "name": name, "path": target})),
        )?;
        let deadline = Instant::now() + EVENT_TIMEOUT;
        while files_in(&save_dir).is_empty() {
            if Instant::now() >= deadline {
                return fail("the save never created a file");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Into the stream.
        tokio::time::sleep(Duration::from_millis(200)).await;
        manager.sigkill();

        let driver = away.open().await?;
        let domain = away.reattached(&driver, &name, &uuid).await?;
        let state = wait_state(&domain, EVENT_TIMEOUT, "running or shutoff(saved)", |s| {
            s.is_running() || *s == DomainState::Shutoff(ShutoffReason::Saved)
        })
        .await?;
        let left = files_in(&save_dir);
        if state == DomainState::Shutoff(ShutoffReason::Saved) {
            check(left == ["dom.save"], || {
                format!("committed, yet the directory holds {left:?}")
            })?;
            domain.restore(&target, Default::default()).await?;
            expect_state(&domain, |s| s.is_running(), "running after the restore")?;
        } else {
            check(left.is_empty(), || {
                format!("rolled back, yet the directory holds {left:?}")
            })?;
            check(
                hook("vCPUs", away.backend().backend_vcpus_running(&domain).await)?,
                || "rolled back to running, yet the backend's vCPUs are stopped".into(),
            )?;
        }
        domain.destroy().await?;
        Ok(())
    }
    .await;
    away.finish(result).await
}

/// The manager process is SIGKILLed while its shutdown waits (the request acknowledged):
/// the guest powers off while no manager runs, and the next manager completes the shutdown
/// as `shutoff(shutdown)` under the policy (§11.4).
pub(super) async fn manager_killed_mid_shutdown<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let away = &Away::new(ctx)?;
    let result: Step = async {
        let name = away.name("midshut");
        let first = away.open().await?;
        let (uuid, _) = away
            .boot_here(&first, &name, GuestOptions::default())
            .await?;
        away.backend().detach(first);

        let mut manager = away.manager(false)?;
        hook(
            "shutdown request",
            manager.send(json!({"op": "shutdown", "name": name, "timeout_s": 120})),
        )?;
        // Killed once the request is on record (the status says shutting_down).
        let status = away
            .roots
            .state
            .join("domains")
            .join(format!("{uuid}.status.json"));
        let deadline = Instant::now() + EVENT_TIMEOUT;
        while !std::fs::read_to_string(&status)
            .unwrap_or_default()
            .contains("shutting_down")
        {
            if Instant::now() >= deadline {
                return fail(format!(
                    "{} never recorded the shutdown request",
                    status.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        manager.sigkill();

        let driver = away.open().await?;
        let domain = away.reattached(&driver, &name, &uuid).await?;
        wait_state(&domain, EVENT_TIMEOUT, "shutoff(shutdown)", |s| {
            *s == DomainState::Shutoff(ShutoffReason::Shutdown)
        })
        .await?;
        away.expect_gone(&name, TEARDOWN).await
    }
    .await;
    away.finish(result).await
}

/// A second manager on the same roots (a process, or a driver here, also two opening at
/// once) is refused with `root_in_use` naming the holder, and the holder keeps working.
pub(super) async fn second_manager_refused<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let away = &Away::new(ctx)?;
    let result: Step = async {
        let name = away.name("held");
        let mut manager = away.manager(false)?;
        manager_define(
            &mut manager,
            away.config_json(&name, GuestOptions::default())?,
        )?;
        let second = away.backend().manager_command(&away.roots, false);
        match ManagerProcess::spawn(hook("the manager's command", second)?) {
            Ok(m) => {
                m.sigkill();
                return fail("a second manager process opened roots that are in use");
            }
            Err(answer) => check(
                answer["kind"].as_str().unwrap_or("").contains("RootInUse"),
                || format!("the second manager's refusal is not root_in_use: {answer}"),
            )?,
        }
        match away.backend().open_persistent(&away.roots).await {
            Err(Error::RootInUse { holder_pid, .. }) => {
                check(holder_pid == Some(manager.pid), || {
                    format!(
                        "root_in_use names pid {holder_pid:?}, the holder is {}",
                        manager.pid
                    )
                })?
            }
            Err(e) => return fail(format!("want root_in_use, got {e}")),
            Ok(_) => return fail("a second driver opened roots that are in use"),
        }
        let (state, _) = manager_state(&mut manager, &name)?;
        check(
            state == DomainState::Shutoff(ShutoffReason::Unknown),
            || format!("the holder's domain is {state} after the refusals"),
        )?;
        manager.sigkill();

        // Two opening at once: exactly one gets the roots.
        let (a, b) = futures::join!(
            away.backend().open_persistent(&away.roots),
            away.backend().open_persistent(&away.roots)
        );
        let me = Some(std::process::id());
        match (a, b) {
            (Ok(d), Err(Error::RootInUse { holder_pid, .. }))
            | (Err(Error::RootInUse { holder_pid, .. }), Ok(d)) => {
                check(holder_pid == me, || {
                    format!("root_in_use names {holder_pid:?}, not this process")
                })?;
                check(names_of(&d.list().await?) == [name.clone()], || {
                    "the winner does not see the definition".into()
                })?;
                away.backend().detach(d);
                Ok(())
            }
            (a, b) => fail(format!(
                "two concurrent opens: want one Ok and one root_in_use, got {:?} / {:?}",
                a.map(|_| ()),
                b.map(|_| ())
            )),
        }
    }
    .await;
    away.finish(result).await
}

/// `seq` continues across managers (SIGKILLed, then an orderly detach), never reused.
pub(super) async fn seq_continues<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let away = &Away::new(ctx)?;
    let result: Step = async {
        let name = away.name("seq");
        let mut manager = away.manager(false)?;
        let uuid = manager_define(
            &mut manager,
            away.config_json(&name, GuestOptions::default())?,
        )?;
        hook("start", manager.call(json!({"op": "start", "name": name})))?;
        hook("pause", manager.call(json!({"op": "pause", "name": name})))?;
        let (_, seq) = manager_state(&mut manager, &name)?;
        manager.sigkill();

        let driver = away.open().await?;
        let domain = away.reattached(&driver, &name, &uuid).await?;
        expect_exact_state(&domain, DomainState::Paused(PausedReason::User))?;
        check(seq_is(&domain, seq).await?, || {
            format!(
                "seq {} after reattach, the manager said {seq}",
                domain.snapshot().seq
            )
        })?;
        domain.resume().await?;
        expect_since(
            &domain,
            seq,
            &[(E::Resumed(ResumedDetail::Unpaused), false)],
        )
        .await?;
        drop(domain);
        away.backend().detach(driver);

        let driver = away.open().await?;
        let domain = away.reattached(&driver, &name, &uuid).await?;
        expect_exact_state(&domain, DomainState::Running(RunningReason::Unpaused))?;
        check(seq_is(&domain, seq + 1).await?, || {
            format!(
                "seq {} after an orderly detach, want {}",
                domain.snapshot().seq,
                seq + 1
            )
        })?;
        domain.pause().await?;
        domain.destroy().await?;
        expect_since(
            &domain,
            seq + 1,
            &[
                (E::Suspended(SuspendedDetail::Paused), false),
                (E::Stopped(StoppedDetail::Destroyed), false),
            ],
        )
        .await?;
        Ok(())
    }
    .await;
    away.finish(result).await
}

/// Opening the roots is cancel-safe: an `open` dropped at 1 ms, 50 ms and 300 ms leaves the
/// roots usable, the domain untouched, and the next `open` reattaches it as before.
pub(super) async fn open_cancelled<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let away = &Away::new(ctx)?;
    let result: Step = async {
        let name = away.name("cancel");
        let mut manager = away.manager(false)?;
        let uuid = manager_define(
            &mut manager,
            away.config_json(&name, GuestOptions::default())?,
        )?;
        hook("start", manager.call(json!({"op": "start", "name": name})))?;
        let (state, seq) = manager_state(&mut manager, &name)?;
        manager.sigkill();
        for ms in [1, 50, 300] {
            if let Ok(opened) = tokio::time::timeout(
                Duration::from_millis(ms),
                away.backend().open_persistent(&away.roots),
            )
            .await
            {
                // Done before the deadline: leave it the orderly way.
                let driver = opened.map_err(|e| Stop::Fail(format!("open: {e}")))?;
                away.backend().detach(driver);
            }
            check(
                hook(
                    "backend domain",
                    away.backend().backend_domain_exists(&name).await,
                )?,
                || format!("the domain is gone after an open dropped at {ms} ms"),
            )?;
        }
        let driver = away.open().await?;
        let domain = away.reattached(&driver, &name, &uuid).await?;
        expect_exact_state(&domain, state)?;
        check(seq_is(&domain, seq).await?, || {
            format!(
                "seq {} after cancelled opens, want {seq} (nothing happened)",
                domain.snapshot().seq
            )
        })?;
        domain.destroy().await?;
        Ok(())
    }
    .await;
    away.finish(result).await
}

/// Ephemeral: the domain lives as long as the manager process (also idle past tokio's
/// blocking-thread lifetime) and dies with its SIGKILL; the next ephemeral manager on the
/// same roots starts clean.
pub(super) async fn ephemeral_dies_with_manager<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let away = &Away::new(ctx)?;
    let result: Step = async {
        let name = away.name("eph");
        let mut manager = away.manager(true)?;
        manager_define(
            &mut manager,
            away.config_json(&name, GuestOptions::default())?,
        )?;
        hook("start", manager.call(json!({"op": "start", "name": name})))?;
        tokio::time::sleep(IDLE_MANAGER).await;
        let (state, _) = manager_state(&mut manager, &name)?;
        check(state.is_running(), || {
            format!("an ephemeral domain is {state} while its manager lives")
        })?;
        check(
            hook(
                "backend domain",
                away.backend().backend_domain_exists(&name).await,
            )?,
            || "the backend domain of an idle ephemeral manager is gone".into(),
        )?;
        manager.sigkill();
        away.expect_gone(&name, EPHEMERAL_GONE).await?;
        let mut next = away.manager(true)?;
        let listed = hook("list", next.call(json!({"op": "list"})))?;
        check(listed["names"] == json!([]), || {
            format!("the next ephemeral manager knows {listed}")
        })?;
        let stale = away.roots.runtime.join(&name);
        check(!stale.exists(), || {
            format!(
                "the next ephemeral manager left the dead one's {}",
                stale.display()
            )
        })?;
        next.sigkill();
        Ok(())
    }
    .await;
    away.finish(result).await
}
