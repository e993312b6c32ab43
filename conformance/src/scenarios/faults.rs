//! The fault family (issue 15): concurrent callers, a `destroy` that preempts, callers that
//! give up (dropped futures), backends that die mid-operation, bad save files, launch
//! failures, a missing guest agent. Written to `docs/semantics.md` §6.0 (concurrency,
//! preemption, cancellation), §6.3, §6.6, §6.7, §7 and §10, generic over [`TestBackend`]
//! like every other scenario.
//!
//! Timing: a "mid-operation" fault waits for what shows the operation is under way (the
//! `suspended(saving)` event, a save's temporary file growing, the `shutdown_requested(host)`
//! event, a backend handle in `info()`) rather than sleeping, except where nothing
//! observable exists (a reboot waiting for a guest that ignores it).
//!
//! Guests are booted until ready wherever the guest takes part (a Xen PV guest suspends
//! itself for a save; shutdown requests must meet a running guest that ignores them);
//! where it does not (pause/resume storms, start, launch failures) the domain is only
//! started.

use super::{boot_id, shutdown_opts, with_policies};
use crate::backend::{GuestAction, GuestOptions, TestBackend};
use crate::scenario::*;
use domkit_core::{
    CrashedDetail, CrashedReason, Domain, DomainState, Driver, Error, EventKind, EventStream,
    LifecycleAction, Operation, PausedReason, PmSuspendTarget, PmSuspendedDetail,
    PmSuspendedReason, RestoreOptions, ResumedDetail, RunningReason, ShutdownMode, ShutdownOptions,
    ShutdownOutcome, ShutdownRequester, ShutdownWait, ShutoffReason, ShuttingDownReason,
    StartOptions, StartedDetail, StoppedDetail, SuspendedDetail,
};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use EventKind as E;

/// The domain handle of a backend.
type Dom<B> = <<B as TestBackend>::Driver as Driver>::Domain;

/// How long a `destroy` that preempts, or the preempted call's return, may take ("promptly").
const PROMPT: Duration = Duration::from_secs(10);
/// How long a state must stay unchanged to count as settled.
const SETTLE: Duration = Duration::from_secs(1);
/// How long a background part of a cancelled operation may take to settle.
const SETTLE_WITHIN: Duration = Duration::from_secs(90);
/// How long a save dropped at once may take to show its first event when it goes on in the
/// background (a loaded 2-core host; the libxl save helper is a process to start).
const LATE_START: Duration = Duration::from_secs(6);
/// The content of the "older save file" a failed save must leave intact.
const OLDER: &[u8] = b"an older save file: a failed or interrupted save must leave it intact\n";
/// The save file's name in the scenario's save directory.
const SAVE: &str = "dom.save";

fn ignoring() -> GuestOptions {
    GuestOptions {
        ignore_shutdown: true,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------
// Helpers

/// A deterministic pseudo-random sequence (xorshift64), for choices and garbage bytes.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(n);
        out
    }
}

/// Length and a hash of a file's content (to see that a file is untouched).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    hash: u64,
}

fn fingerprint(path: &Path) -> Step<Fingerprint> {
    use std::hash::Hasher;
    use std::io::Read;
    let mut file = std::fs::File::open(path)
        .map_err(|e| Stop::Fail(format!("opening {}: {e}", path.display())))?;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| Stop::Fail(format!("reading {}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.write(&buf[..n]);
        len += n as u64;
    }
    Ok(Fingerprint {
        len,
        hash: hasher.finish(),
    })
}

fn write_file(path: &Path, bytes: &[u8]) -> Step {
    std::fs::write(path, bytes).map_err(|e| Stop::Fail(format!("writing {}: {e}", path.display())))
}

/// A fresh, empty directory for the save files of `domain` (so that a leftover temporary
/// file shows in its listing).
fn save_dir<B: TestBackend>(ctx: &ScenarioCtx<'_, B>, domain: &Dom<B>) -> Step<PathBuf> {
    let dir = ctx
        .backend
        .scratch_dir()
        .join(format!("{}.saves", domain.id().name));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| Stop::Fail(format!("creating {}: {e}", dir.display())))?;
    Ok(dir)
}

/// The directory must hold exactly `want` (no temporary file left behind).
fn expect_listing(dir: &Path, want: &[&str]) -> Step {
    let mut got: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Stop::Fail(format!("listing {}: {e}", dir.display())))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    got.sort();
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    check(got == want, || {
        format!(
            "{} holds {got:?}, expected exactly {want:?} (a temporary or partial file left behind?)",
            dir.display()
        )
    })
}

/// The older file at `path` is intact, byte for byte.
fn expect_older_intact(path: &Path, older: Fingerprint) -> Step {
    if !path.exists() {
        return fail(format!(
            "the older save file at {} is gone (§6.6: a failed save never destroys it)",
            path.display()
        ));
    }
    let now = fingerprint(path)?;
    check(now == older, || {
        format!(
            "the older save file at {} changed ({older:?} -> {now:?}) although the save did not \
             succeed (§6.6)",
            path.display()
        )
    })
}

/// A typed error for a backend that died under the operation (§6.0).
fn is_death_error(e: &Error) -> bool {
    matches!(e, Error::Backend { .. } | Error::ControlBroken { .. })
}

/// `interrupted{operation: op, by: destroy, state: shutoff(destroyed)}` (§6.0).
fn is_interrupted_by_destroy(op: Operation) -> impl Fn(&Error) -> bool {
    move |e| {
        matches!(
            e,
            Error::Interrupted {
                operation,
                by: Operation::Destroy,
                state: DomainState::Shutoff(ShutoffReason::Destroyed),
            } if *operation == op
        )
    }
}

/// Wait for a spawned operation's result.
async fn join<T>(task: tokio::task::JoinHandle<T>, within: Duration, what: &str) -> Step<T> {
    match tokio::time::timeout(within, task).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => fail(format!("{what}: its task failed: {e}")),
        Err(_) => fail(format!("{what} did not return within {within:?}")),
    }
}

/// Until `info()` shows a backend handle (a QEMU pid, a Xen domid): the backend domain
/// exists, the operation that creates it is under way.
async fn backend_handle_appears<D: Domain>(domain: &D) {
    loop {
        if let Ok(info) = domain.info().await {
            if info.backend_handle.is_some() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// When, during a save, a fault is injected.
#[derive(Debug, Clone, Copy)]
enum When {
    /// As soon as `suspended(saving)` is seen (the stream is about to start).
    SuspendedSaving,
    /// Once the save's temporary file holds [`MID_STREAM`] bytes (the stream flows).
    StreamWritten,
}

/// How much of a save's stream is written before a [`When::StreamWritten`] fault.
const MID_STREAM: u64 = 256 * 1024;

impl When {
    /// Wait, after `suspended(saving)`, until it is time (or the save has finished).
    async fn wait<T>(self, dir: &Path, task: &tokio::task::JoinHandle<T>) {
        if let When::StreamWritten = self {
            let deadline = Instant::now() + EVENT_TIMEOUT;
            while !task.is_finished() && Instant::now() < deadline {
                if temp_file_bytes(dir) >= MID_STREAM {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }
}

/// The size of the largest file in `dir` other than [`SAVE`] (a save's temporary file).
fn temp_file_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name() != SAVE)
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .max()
        .unwrap_or(0)
}

/// When a cancelled operation's future is dropped.
#[derive(Debug, Clone, Copy)]
enum Cancel {
    /// `tokio::time::timeout` with this duration.
    After(Duration),
    /// As soon as `info()` shows a backend handle.
    AtBackendHandle,
}

/// Run `op` and drop it as `cancel` says; `Some(result)` if it finished first.
async fn run_cancelled<D: Domain, T>(
    domain: &D,
    op: impl Future<Output = domkit_core::Result<T>>,
    cancel: Cancel,
) -> Option<domkit_core::Result<T>> {
    match cancel {
        Cancel::After(d) => tokio::time::timeout(d, op).await.ok(),
        Cancel::AtBackendHandle => {
            tokio::select! {
                r = op => Some(r),
                _ = backend_handle_appears(domain) => None,
            }
        }
    }
}

/// Until the state stops changing ([`SETTLE`]) and no save is under way (`paused(save)`).
async fn settle<D: Domain>(domain: &D, within: Duration) -> Step<DomainState> {
    let deadline = Instant::now() + within;
    let mut last = domain.state();
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = domain.state();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= SETTLE && now != DomainState::Paused(PausedReason::Save) {
            return Ok(now);
        }
        if Instant::now() >= deadline {
            return fail(format!(
                "the state did not settle within {within:?}: still {now} (§6.0: a cancelled \
                 operation completes in the background or never ran)"
            ));
        }
    }
}

/// `state()` tells the truth: active exactly when the host has the backend domain, and
/// running/paused as the backend's vCPUs are.
async fn expect_truthful<B: TestBackend>(ctx: &ScenarioCtx<'_, B>, domain: &Dom<B>) -> Step {
    let state = domain.state();
    let name = domain.id().name.clone();
    let exists = hook(
        "looking for the backend domain",
        ctx.backend.backend_domain_exists(&name).await,
    )?;
    if state.is_active() && !exists {
        return fail(format!(
            "state() says {state} but the host has no backend domain of {name}"
        ));
    }
    if !state.is_active() && exists {
        return expect_no_backend_domain(ctx.backend, &name)
            .await
            .map_err(|_| {
                Stop::Fail(format!(
                    "state() says {state} but the backend domain of {name} runs on"
                ))
            });
    }
    if matches!(state, DomainState::Running(_) | DomainState::Paused(_)) {
        let running = hook(
            "asking the backend whether the vCPUs run",
            ctx.backend.backend_vcpus_running(domain).await,
        )?;
        check(running == state.is_running(), || {
            format!(
                "state() says {state} but the backend's vCPUs are {}",
                if running { "running" } else { "stopped" }
            )
        })?;
    }
    Ok(())
}

/// Collect events until quiet; they must be one of `options`; returns which.
async fn expect_events_one_of(watch: &mut EventWatch, options: &[&[EventKind]]) -> Step<usize> {
    let got = watch.collect_quiet(QUIET).await?;
    match options.iter().position(|o| *o == got.as_slice()) {
        Some(i) => Ok(i),
        None => fail(format!(
            "events {}, expected one of {}",
            kinds_list(&got),
            options
                .iter()
                .map(|o| kinds_list(o))
                .collect::<Vec<_>>()
                .join(" or ")
        )),
    }
}

/// Destroy if active and check `stopped(destroyed)`; a no-op on a shut-off domain.
async fn destroy_checked<D: Domain>(domain: &D, watch: &mut EventWatch) -> Step {
    let was_active = domain.state().is_active();
    domain.destroy().await?;
    if was_active {
        watch
            .expect(&[E::Stopped(StoppedDetail::Destroyed)])
            .await?;
    }
    check(domain.state().is_shutoff(), || {
        format!("after destroy the state is {}", domain.state())
    })
}

/// Restore `path` and check it comes back running (restored).
async fn restore_running<D: Domain>(domain: &D, watch: &mut EventWatch, path: &Path) -> Step {
    domain.restore(path, RestoreOptions::default()).await?;
    watch.expect(&[E::Started(StartedDetail::Restored)]).await?;
    expect_exact_state(domain, DomainState::Running(RunningReason::Restored))
}

// ---------------------------------------------------------------------------------------
// Concurrency

/// The result of one storm caller: (completion order, caller = call order, pause?, result).
type CallerResult = (usize, usize, bool, domkit_core::Result<()>);

/// Make `callers` pause/resume calls on clones of `domain`, one after the other from this
/// task (each call's first poll queues it for the domain's operation lock: that is the call
/// order §6.0 runs them in), each then waited for in its own task, all at once. Returns the
/// calls (`true` = pause) in call order, the tasks, and the completion counter.
fn storm<D: Domain + Clone + 'static>(
    domain: &D,
    callers: usize,
    seed: u64,
) -> (
    Vec<bool>,
    Vec<tokio::task::JoinHandle<CallerResult>>,
    Arc<AtomicUsize>,
) {
    let completed = Arc::new(AtomicUsize::new(0));
    let mut rng = XorShift(seed);
    let mut calls = Vec::with_capacity(callers);
    let mut tasks = Vec::with_capacity(callers);
    for caller in 0..callers {
        let pause = rng.next() & 1 == 0;
        calls.push(pause);
        let d = domain.clone();
        let mut call: Pin<Box<dyn Future<Output = domkit_core::Result<()>> + Send>> =
            Box::pin(async move {
                if pause {
                    d.pause().await
                } else {
                    d.resume().await
                }
            });
        let first = match call.as_mut().poll(&mut std::task::Context::from_waker(
            futures::task::noop_waker_ref(),
        )) {
            Poll::Ready(r) => Some(r),
            Poll::Pending => None,
        };
        let completed = completed.clone();
        tasks.push(tokio::spawn(async move {
            let r = match first {
                Some(r) => r,
                None => call.await,
            };
            let order = completed.fetch_add(1, Ordering::SeqCst);
            (order, caller, pause, r)
        }));
    }
    (calls, tasks, completed)
}

/// The events that pause (`true`) / resume calls starting from running make, in order.
fn transitions(calls: impl IntoIterator<Item = bool>) -> Vec<EventKind> {
    let mut paused = false;
    let mut out = Vec::new();
    for pause in calls {
        if pause != paused {
            out.push(if pause {
                E::Suspended(SuspendedDetail::Paused)
            } else {
                E::Resumed(ResumedDetail::Unpaused)
            });
            paused = pause;
        }
    }
    out
}

/// Events must alternate suspended(paused) / resumed(unpaused) from running, no duplicate.
fn expect_alternating(got: &[EventKind]) -> Step {
    for (i, pair) in got.windows(2).enumerate() {
        check(pair[0] != pair[1], || {
            format!(
                "events {i} and {} are both {} (a duplicate or a lost transition): {}",
                i + 1,
                pair[0],
                kinds_list(got)
            )
        })?;
    }
    check(
        got.iter().all(|k| {
            matches!(
                k,
                E::Suspended(SuspendedDetail::Paused) | E::Resumed(ResumedDetail::Unpaused)
            )
        }) && got
            .first()
            .map_or(true, |k| *k == E::Suspended(SuspendedDetail::Paused)),
        || {
            format!(
                "events must alternate suspended(paused)/resumed(unpaused) from running: {}",
                kinds_list(got)
            )
        },
    )
}

pub(super) async fn storm_pause_resume<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    const CALLERS: usize = 50;
    let (domain, mut watch) = ctx.launch("a", GuestOptions::default()).await?;
    // Subscribed here, before the storm (a spawned task subscribing on its first poll could
    // start after the first calls on a loaded host); told the last seq once the first
    // subscriber has it, so a pause in the events is not taken for the end.
    let (last_tx, last_rx) = tokio::sync::watch::channel(None);
    let observer = tokio::spawn(observe_snapshots(
        domain.clone(),
        domain.subscribe(),
        last_rx,
    ));
    let (calls, tasks, _) = storm(&domain, CALLERS, 0x0015_5eed_0f57_0a11);
    let mut done = Vec::with_capacity(CALLERS);
    for task in tasks {
        done.push(join(task, EVENT_TIMEOUT, "a pause/resume caller").await?);
    }
    for (_, caller, pause, r) in &done {
        if let Err(e) = r {
            let op = if *pause { "pause" } else { "resume" };
            return fail(format!("caller {caller}: {op} failed: {e}"));
        }
    }
    // One at a time in call order (§6.0); each call that changes the state makes exactly
    // one event (§6.2).
    let expected = transitions(calls.iter().copied());
    check(expected.len() >= 2, || {
        "the caller mix made no transitions".into()
    })?;
    done.sort_by_key(|d| d.0);
    let by_completion = transitions(done.iter().map(|d| d.2));
    let last_pause = calls.last().copied().unwrap_or(false);
    let last_completed = done.last().map(|d| (d.1, d.2));
    let want = if last_pause {
        DomainState::Paused(PausedReason::User)
    } else {
        DomainState::Running(RunningReason::Unpaused)
    };
    let state = domain.state();
    check(state == want, || {
        format!(
            "the last call was a {}, the state is {state} (want {want}); last to return: {last_completed:?}",
            if last_pause { "pause" } else { "resume" }
        )
    })?;
    let got = watch.collect_quiet(QUIET).await?;
    let _ = last_tx.send(Some(watch.seen.last().map_or(0, |e| e.seq)));
    expect_alternating(&got)?;
    check(got == expected, || {
        format!(
            "{} events, but the calls in call order make {} transitions ({} in the order they \
             returned): got {}, want {}",
            got.len(),
            expected.len(),
            by_completion.len(),
            kinds_list(&got),
            kinds_list(&expected)
        )
    })?;
    let (seen, problems) = join(observer, EVENT_TIMEOUT, "the snapshot observer").await?;
    check(problems.is_empty(), || {
        format!(
            "§2.4 (state never older than the last event delivered): {}",
            problems.join("; ")
        )
    })?;
    check(seen == got.len(), || {
        format!(
            "a second subscriber saw {seen} events, the first {}",
            got.len()
        )
    })?;
    let snap = domain.snapshot();
    let last_seq = watch.seen.last().map_or(0, |e| e.seq);
    check(snap.state == want && snap.seq == last_seq, || {
        format!(
            "snapshot() says {} at seq {}, want {want} at seq {last_seq}",
            snap.state, snap.seq
        )
    })?;
    expect_truthful(ctx, &domain).await?;
    let info = domain.info().await?;
    check(info.state == want, || {
        format!("info() says {}, state() {want}", info.state)
    })?;
    destroy_checked(&domain, &mut watch).await
}

/// A subscriber that, on each event it is delivered, takes `snapshot()` at once: the state
/// must not be older than that event (its `seq` at least the event's; at the event's own
/// `seq`, the state that event made) (§2.4). Ends [`QUIET`] after the last event; returns
/// how many events it saw and what was wrong.
/// A second subscriber (`events`, subscribed before the operations): counts the events and
/// checks each against `snapshot()` taken when it is delivered, until it has seen the last
/// `seq` the first subscriber reports through `last` (or nothing comes for EVENT_TIMEOUT).
async fn observe_snapshots<D: Domain>(
    domain: D,
    mut events: EventStream,
    mut last: tokio::sync::watch::Receiver<Option<u64>>,
) -> (usize, Vec<String>) {
    use futures::StreamExt;
    let mut seen = 0;
    let mut problems = Vec::new();
    let mut at = 0;
    loop {
        if let Some(end) = *last.borrow_and_update() {
            if at >= end {
                break;
            }
        }
        let ev = tokio::select! {
            ev = tokio::time::timeout(EVENT_TIMEOUT, events.next()) => match ev {
                Ok(Some(ev)) => ev,
                _ => break,
            },
            changed = last.changed() => {
                if changed.is_err() {
                    break; // the scenario ended early
                }
                continue;
            }
        };
        at = ev.seq;
        if matches!(ev.kind, E::AgentConnected | E::AgentDisconnected) {
            continue; // not a lifecycle transition (§13.4); the watch skips them too
        }
        seen += 1;
        let snap = domain.snapshot();
        let made = match ev.kind {
            E::Suspended(SuspendedDetail::Paused) => DomainState::Paused(PausedReason::User),
            E::Resumed(ResumedDetail::Unpaused) => DomainState::Running(RunningReason::Unpaused),
            _ => snap.state,
        };
        if snap.seq < ev.seq {
            problems.push(format!(
                "event {} (seq {}) delivered, snapshot() then says seq {} ({})",
                ev.kind, ev.seq, snap.seq, snap.state
            ));
        } else if snap.seq == ev.seq && snap.state != made {
            problems.push(format!(
                "event {} (seq {}) delivered, snapshot() at that seq says {}",
                ev.kind, ev.seq, snap.state
            ));
        }
    }
    (seen, problems)
}

pub(super) async fn destroy_during_storm<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    const CALLERS: usize = 50;
    let (domain, mut watch) = ctx.launch("a", GuestOptions::default()).await?;
    let (calls, tasks, completed) = storm(&domain, CALLERS, 0x0de5_7e0d_5707_3a11);
    // Destroy while most of the calls are still queued.
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while completed.load(Ordering::SeqCst) < 10 {
        if Instant::now() >= deadline {
            return fail("10 of the pause/resume calls did not complete");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let t0 = Instant::now();
    domain.destroy().await?;
    let took = t0.elapsed();
    check(took < PROMPT, || {
        format!("destroy took {took:?} with pause/resume calls queued (§6.0: it never queues)")
    })?;
    expect_exact_state(&domain, DomainState::Shutoff(ShutoffReason::Destroyed))?;
    let mut done = Vec::with_capacity(CALLERS);
    for task in tasks {
        done.push(join(task, EVENT_TIMEOUT, "a pause/resume caller").await?);
    }
    // Each call ran before the destroy (Ok), was preempted by it (interrupted), or ran on
    // the destroyed domain (invalid_state); none may have turned the end into anything but
    // destroyed (§3: destroy is the intent in force).
    for (_, caller, pause, r) in &done {
        let op = if *pause {
            Operation::Pause
        } else {
            Operation::Resume
        };
        match r {
            Ok(()) => {}
            Err(e) if is_interrupted_by_destroy(op)(e) => {}
            Err(Error::InvalidState {
                current: DomainState::Shutoff(ShutoffReason::Destroyed),
                operation,
            }) if *operation == op => {}
            Err(e) => {
                return fail(format!(
                    "caller {caller} ({op}) around a destroy returned `{e}` (want Ok, \
                     interrupted{{by: destroy}} or invalid_state from shutoff (destroyed))"
                ))
            }
        }
    }
    let ok = done.iter().filter(|d| d.3.is_ok()).count();
    let interrupted = done
        .iter()
        .filter(|d| matches!(d.3, Err(Error::Interrupted { .. })))
        .count();
    tracing::info!(
        "destroy_during_storm: {ok} Ok, {interrupted} interrupted, {} invalid_state",
        CALLERS - ok - interrupted
    );
    let got = watch.collect_quiet(QUIET).await?;
    let Some((last, before)) = got.split_last() else {
        return fail("no event at all; want the transitions, then stopped(destroyed)");
    };
    check(*last == E::Stopped(StoppedDetail::Destroyed), || {
        format!(
            "events end with {last}, want stopped(destroyed): {}",
            kinds_list(&got)
        )
    })?;
    expect_alternating(before)?;
    // The calls that ran did so in call order: their events are a prefix of what all of
    // them would have made.
    let expected = transitions(calls.iter().copied());
    check(expected.starts_with(before), || {
        format!(
            "the events before stopped(destroyed) ({}) are not a prefix of the transitions of \
             the calls in call order ({})",
            kinds_list(before),
            kinds_list(&expected)
        )
    })?;
    expect_truthful(ctx, &domain).await?;
    // Usable again.
    domain.start(StartOptions::default()).await?;
    watch.expect(&[E::Started(StartedDetail::Booted)]).await?;
    destroy_checked(&domain, &mut watch).await
}

// ---------------------------------------------------------------------------------------
// Destroy preempts

pub(super) async fn destroy_preempts_shutdown<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.boot("a", ignoring()).await?;
    let d = domain.clone();
    let task = tokio::spawn(async move {
        d.shutdown(shutdown_opts(
            ShutdownWait::Completed,
            Duration::from_secs(60),
            false,
        ))
        .await
    });
    watch
        .expect(&[E::ShutdownRequested(ShutdownRequester::Host)])
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    if task.is_finished() {
        let r = join(task, PROMPT, "shutdown").await?;
        return fail(format!(
            "shutdown(completed) of a guest that ignores it returned before any destroy: {r:?}"
        ));
    }
    let t0 = Instant::now();
    domain.destroy().await?;
    let took = t0.elapsed();
    check(took < PROMPT, || {
        format!("destroy took {took:?} while a shutdown waited (§6.0: it preempts)")
    })?;
    let r = join(task, PROMPT, "the preempted shutdown").await?;
    expect_err(
        r,
        "interrupted{shutdown, by: destroy, state: shutoff(destroyed)}",
        is_interrupted_by_destroy(Operation::Shutdown),
    )?;
    watch
        .expect(&[E::Stopped(StoppedDetail::Destroyed)])
        .await?;
    expect_exact_state(&domain, DomainState::Shutoff(ShutoffReason::Destroyed))?;
    watch.expect_quiet(QUIET).await?;
    expect_truthful(ctx, &domain).await
}

/// Start the shut-off `domain` again (`started(booted)`) and wait until its guest can act.
async fn start_until_ready<B: TestBackend>(
    ctx: &ScenarioCtx<'_, B>,
    domain: &<B::Driver as Driver>::Domain,
    watch: &mut EventWatch,
) -> Step {
    domain.start(StartOptions::default()).await?;
    watch.expect(&[E::Started(StartedDetail::Booted)]).await?;
    hook(
        "guest ready",
        ctx.backend.wait_guest_ready(domain, BOOT_TIMEOUT).await,
    )
}

pub(super) async fn destroy_preempts_save<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.boot("a", GuestOptions::default()).await?;
    let dir = save_dir(ctx, &domain)?;
    let path = dir.join(SAVE);
    // Destroy as soon as the save stopped the vCPUs, then a little later (mid-stream).
    for (round, when) in [When::SuspendedSaving, When::StreamWritten]
        .into_iter()
        .enumerate()
    {
        if round > 0 {
            // A guest that runs: a Xen PV guest takes part in its own save.
            start_until_ready(ctx, &domain, &mut watch).await?;
        }
        write_file(&path, OLDER)?;
        let older = fingerprint(&path)?;
        let d = domain.clone();
        let p = path.clone();
        let task = tokio::spawn(async move { d.save(&p).await });
        watch
            .expect(&[E::Suspended(SuspendedDetail::Saving)])
            .await?;
        when.wait(&dir, &task).await;
        let t0 = Instant::now();
        domain.destroy().await?;
        let took = t0.elapsed();
        check(took < PROMPT, || {
            format!("round {round}: destroy took {took:?} during a save (§6.0: it preempts)")
        })?;
        let r = join(task, PROMPT, "the save").await?;
        tracing::info!("destroy_preempts_save round {round}: save returned {r:?}");
        let prefix = |m: String| Stop::Fail(format!("round {round} (destroy {when:?}): {m}"));
        match r {
            Ok(()) => {
                // The save won the race: a real, restorable save.
                watch
                    .expect(&[E::Stopped(StoppedDetail::Saved)])
                    .await
                    .map_err(|e| prefix(format!("{e:?}")))?;
                expect_exact_state(&domain, DomainState::Shutoff(ShutoffReason::Saved))?;
                let now = fingerprint(&path)?;
                check(now != older, || {
                    format!(
                        "round {round}: save returned Ok but the file at the path is the older one"
                    )
                })?;
                expect_listing(&dir, &[SAVE])?;
                restore_running(&domain, &mut watch, &path).await?;
                destroy_checked(&domain, &mut watch).await?;
            }
            Err(e) => {
                if !is_interrupted_by_destroy(Operation::Save)(&e) {
                    return Err(prefix(format!(
                        "save returned `{e}`; §6.0 wants interrupted{{save, by: destroy, state: \
                         shutoff(destroyed)}}"
                    )));
                }
                watch
                    .expect(&[E::Stopped(StoppedDetail::Destroyed)])
                    .await
                    .map_err(|e| prefix(format!("{e:?}")))?;
                expect_exact_state(&domain, DomainState::Shutoff(ShutoffReason::Destroyed))?;
                expect_older_intact(&path, older)?;
                expect_listing(&dir, &[SAVE])?;
            }
        }
        watch.expect_quiet(QUIET).await?;
        expect_truthful(ctx, &domain).await?;
    }
    Ok(())
}

pub(super) async fn destroy_preempts_reboot<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    // 1. A reboot waiting for a guest that ignores the request.
    let (domain, mut watch) = ctx.boot("a", ignoring()).await?;
    let d = domain.clone();
    let task = tokio::spawn(async move {
        d.reboot(ShutdownMode::Default, Duration::from_secs(60))
            .await
    });
    // Nothing observable says the reboot waits (a delivered request is no event under a
    // reboot, §4.5): give it time to get there.
    tokio::time::sleep(Duration::from_secs(1)).await;
    if task.is_finished() {
        let r = join(task, PROMPT, "reboot").await?;
        return fail(format!(
            "reboot of a guest that ignores it returned before any destroy: {r:?}"
        ));
    }
    let t0 = Instant::now();
    domain.destroy().await?;
    let took = t0.elapsed();
    check(took < PROMPT, || {
        format!("destroy took {took:?} while a reboot waited (§6.0: it preempts)")
    })?;
    let r = join(task, PROMPT, "the preempted reboot").await?;
    expect_err(
        r,
        "interrupted{reboot, by: destroy, state: shutoff(destroyed)}",
        is_interrupted_by_destroy(Operation::Reboot),
    )?;
    watch
        .expect(&[E::Stopped(StoppedDetail::Destroyed)])
        .await?;
    expect_exact_state(&domain, DomainState::Shutoff(ShutoffReason::Destroyed))?;
    watch.expect_quiet(QUIET).await?;
    expect_truthful(ctx, &domain).await?;

    // 2. A reboot that happens: destroy as soon as `rebooted` is seen, while the restart
    // is carried out (§4.0a: destroy preempts a restart; no leftover backend domain).
    let (b, mut wb) = ctx.boot("b", GuestOptions::default()).await?;
    let d = b.clone();
    let task = tokio::spawn(async move { d.reboot(ShutdownMode::Default, BOOT_TIMEOUT).await });
    wb.expect(&[E::Rebooted]).await?;
    let t0 = Instant::now();
    b.destroy().await?;
    let took = t0.elapsed();
    check(took < PROMPT, || {
        format!("destroy took {took:?} during a reboot's restart (§6.0: it preempts)")
    })?;
    let r = join(task, PROMPT, "the reboot").await?;
    tracing::info!("destroy_preempts_reboot (restart): reboot returned {r:?}");
    match r {
        Ok(()) => {}
        Err(e) if is_interrupted_by_destroy(Operation::Reboot)(&e) => {}
        Err(e) => {
            return fail(format!(
                "reboot preempted during its restart returned `{e}`; §6.0 wants Ok (it was \
                 done) or interrupted{{reboot, by: destroy}}"
            ))
        }
    }
    wb.expect(&[E::Stopped(StoppedDetail::Destroyed)]).await?;
    expect_exact_state(&b, DomainState::Shutoff(ShutoffReason::Destroyed))?;
    wb.expect_quiet(QUIET).await?;
    expect_truthful(ctx, &b).await
}

// ---------------------------------------------------------------------------------------
// Cancellation (§6.0 cancel safety)

/// The operation right after a start or restore that was cancelled (§6.0), at once: it
/// queues behind the background part of the create. Either the create ran (the pause finds
/// the domain up: `started(how)`, `suspended(paused)`, `paused(user)`), or it was dropped
/// before it ran (only possible if it did not finish first: then the pause finds it shut
/// off, and it stays so with no event).
async fn pause_after_cancelled_create<D: Domain>(
    domain: &D,
    watch: &mut EventWatch,
    before: DomainState,
    may_never_have_run: bool,
    cancel: Cancel,
    what: &str,
    how: StartedDetail,
) -> Step {
    let paused = domain.pause().await;
    tracing::info!(
        "cancel_{what} {cancel:?}: may never have run: {may_never_have_run}; pause: {paused:?}"
    );
    match paused {
        Ok(()) => {
            expect_events_one_of(
                watch,
                &[&[E::Started(how), E::Suspended(SuspendedDetail::Paused)]],
            )
            .await?;
            expect_exact_state(domain, DomainState::Paused(PausedReason::User))
        }
        Err(Error::InvalidState { current, .. }) if current.is_shutoff() && may_never_have_run => {
            let settled = settle(domain, SETTLE_WITHIN).await?;
            check(settled == before, || {
                format!(
                    "{cancel:?}: pause saw {current}, then the state became {settled}: the \
                     {what} went on after the next operation ran (§6.0: it queues behind the \
                     background part)"
                )
            })?;
            watch.expect_quiet(QUIET).await
        }
        Err(e) => fail(format!(
            "pause right after a {what} cancelled {cancel:?}: {e} (§6.0: a cancelled {what} \
             completes in the background)"
        )),
    }
}

pub(super) async fn cancel_start<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.define("a", GuestOptions::default()).await?;
    for cancel in [
        Cancel::After(Duration::from_millis(1)),
        Cancel::After(Duration::from_millis(30)),
        Cancel::AtBackendHandle,
    ] {
        let before = domain.state();
        let finished = run_cancelled(&domain, domain.start(StartOptions::default()), cancel).await;
        if let Some(Err(e)) = &finished {
            return fail(format!("start ({cancel:?}) failed: {e}"));
        }
        pause_after_cancelled_create(
            &domain,
            &mut watch,
            before,
            finished.is_none(),
            cancel,
            "start",
            StartedDetail::Booted,
        )
        .await?;
        settle(&domain, SETTLE_WITHIN).await?;
        expect_truthful(ctx, &domain).await?;
        destroy_checked(&domain, &mut watch).await?;
        expect_truthful(ctx, &domain).await?;
    }
    // And a plain start still works.
    domain.start(StartOptions::default()).await?;
    watch.expect(&[E::Started(StartedDetail::Booted)]).await?;
    destroy_checked(&domain, &mut watch).await
}

pub(super) async fn cancel_save<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.boot("a", GuestOptions::default()).await?;
    let dir = save_dir(ctx, &domain)?;
    let path = dir.join(SAVE);

    // 1., 2. Dropped once suspended(saving) is seen, and once the stream flows.
    for when in [When::SuspendedSaving, When::StreamWritten] {
        write_file(&path, OLDER)?;
        let older = fingerprint(&path)?;
        let mut saw_saving = false;
        let finished = tokio::select! {
            biased;
            seen = async {
                watch.expect(&[E::Suspended(SuspendedDetail::Saving)]).await?;
                saw_saving = true;
                if let When::StreamWritten = when {
                    while temp_file_bytes(&dir) < MID_STREAM {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
                Ok::<(), Stop>(())
            } => { seen?; None }
            r = domain.save(&path) => Some(r),
        };
        tracing::info!("cancel_save {when:?}: finished first: {finished:?}");
        if let Some(r) = finished {
            // Finished before it could be dropped: still must be a whole save.
            r?;
            if !saw_saving {
                watch
                    .expect(&[E::Suspended(SuspendedDetail::Saving)])
                    .await?;
            }
            watch.expect(&[E::Stopped(StoppedDetail::Saved)]).await?;
        } else {
            let settled = settle(&domain, SETTLE_WITHIN).await?;
            if settled != DomainState::Shutoff(ShutoffReason::Saved) {
                expect_older_intact(&path, older)?;
                expect_listing(&dir, &[SAVE])?;
                return fail(format!(
                    "save dropped {when:?}: the domain settled {settled}, events {}; §6.0: a \
                     running save completes in the background, its file committed exactly as \
                     if awaited",
                    kinds_list(&watch.collect_quiet(QUIET).await?)
                ));
            }
            watch.expect(&[E::Stopped(StoppedDetail::Saved)]).await?;
        }
        check(fingerprint(&path)? != older, || {
            "the domain is shutoff(saved) but the file at the path is the older one".into()
        })?;
        expect_listing(&dir, &[SAVE])?;
        watch.expect_quiet(QUIET).await?;
        expect_truthful(ctx, &domain).await?;
        restore_running(&domain, &mut watch, &path).await?;
    }

    // 3. Dropped at once (1 ms).
    write_file(&path, OLDER)?;
    let older = fingerprint(&path)?;
    let finished = run_cancelled(
        &domain,
        domain.save(&path),
        Cancel::After(Duration::from_millis(1)),
    )
    .await;
    let mut settled = settle(&domain, SETTLE_WITHIN).await?;
    tracing::info!("cancel_save 1 ms: finished first: {finished:?}; settled {settled}");
    if let Some(r) = finished {
        r?;
    }
    // A save the drop left to finish in the background may begin late on a loaded host
    // (the libxl save helper is a process to start): a quiet `running` for SETTLE is not
    // yet "never ran". Its first event within LATE_START decides.
    let mut late = Vec::new();
    if settled == DomainState::Running(RunningReason::Restored) {
        late = watch.collect_quiet(LATE_START).await?;
        if !late.is_empty() {
            settled = settle(&domain, SETTLE_WITHIN).await?;
            tracing::info!("cancel_save 1 ms: began late ({late:?}); settled {settled}");
        }
    }
    expect_truthful(ctx, &domain).await?;
    match settled {
        DomainState::Shutoff(ShutoffReason::Saved) => {
            let want = [
                E::Suspended(SuspendedDetail::Saving),
                E::Stopped(StoppedDetail::Saved),
            ];
            check(want.starts_with(&late), || {
                format!(
                    "a late background save showed {} (expected {})",
                    kinds_list(&late),
                    kinds_list(&want)
                )
            })?;
            watch.expect(&want[late.len()..]).await?;
            check(fingerprint(&path)? != older, || {
                "the domain is shutoff(saved) but the file at the path is the older one".into()
            })?;
            expect_listing(&dir, &[SAVE])?;
            restore_running(&domain, &mut watch, &path).await?;
        }
        DomainState::Running(RunningReason::Restored) if late.is_empty() => {
            // Dropped before it ran: nothing happened (quiet for LATE_START), and a new
            // save works.
            expect_older_intact(&path, older)?;
            expect_listing(&dir, &[SAVE])?;
            domain.save(&path).await?;
            watch
                .expect(&[
                    E::Suspended(SuspendedDetail::Saving),
                    E::Stopped(StoppedDetail::Saved),
                ])
                .await?;
            expect_listing(&dir, &[SAVE])?;
            restore_running(&domain, &mut watch, &path).await?;
        }
        other => {
            return fail(format!(
                "save dropped after 1 ms: the domain settled {other}, events {}; §6.0: it \
                 completes in the background (saved) or never ran (running)",
                kinds_list(&watch.collect_quiet(QUIET).await?)
            ))
        }
    }
    watch.expect_quiet(QUIET).await?;
    destroy_checked(&domain, &mut watch).await
}

pub(super) async fn cancel_restore<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.boot("a", GuestOptions::default()).await?;
    let dir = save_dir(ctx, &domain)?;
    let path = dir.join(SAVE);
    domain.save(&path).await?;
    watch
        .expect(&[
            E::Suspended(SuspendedDetail::Saving),
            E::Stopped(StoppedDetail::Saved),
        ])
        .await?;
    let saved = fingerprint(&path)?;
    for cancel in [
        Cancel::After(Duration::from_millis(1)),
        Cancel::AtBackendHandle,
    ] {
        let before = domain.state();
        let finished = run_cancelled(
            &domain,
            domain.restore(&path, RestoreOptions::default()),
            cancel,
        )
        .await;
        if let Some(Err(e)) = &finished {
            return fail(format!("restore ({cancel:?}) failed: {e}"));
        }
        pause_after_cancelled_create(
            &domain,
            &mut watch,
            before,
            finished.is_none(),
            cancel,
            "restore",
            StartedDetail::Restored,
        )
        .await?;
        settle(&domain, SETTLE_WITHIN).await?;
        expect_truthful(ctx, &domain).await?;
        check(fingerprint(&path)? == saved, || {
            "the save file changed during a restore (§6.7: untouched)".into()
        })?;
        expect_listing(&dir, &[SAVE])?;
        destroy_checked(&domain, &mut watch).await?;
        expect_truthful(ctx, &domain).await?;
    }
    restore_running(&domain, &mut watch, &path).await?;
    destroy_checked(&domain, &mut watch).await
}

pub(super) async fn cancel_shutdown<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.boot("a", ignoring()).await?;
    let wait_long = shutdown_opts(ShutdownWait::Completed, Duration::from_secs(60), false);

    // 1. Dropped at once: the request goes out in the background; the next operation
    // queues behind that, and a pending request leaves the domain operable (§6.3).
    let finished = run_cancelled(
        &domain,
        domain.shutdown(wait_long),
        Cancel::After(Duration::from_millis(1)),
    )
    .await;
    if let Some(r) = finished {
        return fail(format!(
            "shutdown(completed) of a guest that ignores it returned within 1 ms: {r:?}"
        ));
    }
    domain.pause().await?;
    expect_events_one_of(
        &mut watch,
        &[
            &[
                E::ShutdownRequested(ShutdownRequester::Host),
                E::Suspended(SuspendedDetail::Paused),
            ],
            &[E::Suspended(SuspendedDetail::Paused)],
        ],
    )
    .await?;
    expect_exact_state(&domain, DomainState::Paused(PausedReason::User))?;
    expect_truthful(ctx, &domain).await?;
    domain.resume().await?;
    watch.expect(&[E::Resumed(ResumedDetail::Unpaused)]).await?;
    expect_exact_state(&domain, DomainState::Running(RunningReason::Unpaused))?;

    // 2. Dropped while waiting (after shutdown_requested(host)): the waiting stops, the
    // request stays with the guest.
    let finished = tokio::select! {
        biased;
        seen = watch.expect(&[E::ShutdownRequested(ShutdownRequester::Host)]) => { seen?; None }
        r = domain.shutdown(wait_long) => Some(r),
    };
    if let Some(r) = finished {
        return fail(format!(
            "shutdown(completed) of a guest that ignores it returned: {r:?}"
        ));
    }
    let settled = settle(&domain, SETTLE_WITHIN).await?;
    check(
        settled == DomainState::ShuttingDown(ShuttingDownReason::User),
        || {
            format!("after the dropped shutdown the domain settled {settled}, want shutting_down (user)")
        },
    )?;
    watch.expect_quiet(QUIET).await?;
    expect_truthful(ctx, &domain).await?;
    // Sent again: accepted, no new event (a repeat).
    let outcome = domain
        .shutdown(shutdown_opts(
            ShutdownWait::Acknowledged,
            Duration::from_secs(10),
            false,
        ))
        .await?;
    check(outcome == ShutdownOutcome::Acknowledged, || {
        format!("shutdown(acknowledged) again returned {outcome:?}")
    })?;
    watch.expect_quiet(QUIET).await?;
    domain.pause().await?;
    watch
        .expect(&[E::Suspended(SuspendedDetail::Paused)])
        .await?;
    destroy_checked(&domain, &mut watch).await
}

// ---------------------------------------------------------------------------------------
// The backend dies mid-operation (§6.0, §10)

/// Kill the backend domain; `Err` if the hook could not (e.g. the domain had ended).
async fn kill<B: TestBackend>(
    ctx: &ScenarioCtx<'_, B>,
    domain: &Dom<B>,
) -> Result<ShutoffReason, String> {
    let reason = ctx.backend.kill_out_of_band(domain).await?;
    if !matches!(reason, ShutoffReason::Crashed | ShutoffReason::Destroyed) {
        return Err(format!(
            "§10 allows crashed or destroyed, the backend documents {reason:?}"
        ));
    }
    Ok(reason)
}

pub(super) async fn killed_mid_save<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.boot("a", GuestOptions::default()).await?;
    let dir = save_dir(ctx, &domain)?;
    let path = dir.join(SAVE);
    for (round, when) in [When::SuspendedSaving, When::StreamWritten]
        .into_iter()
        .enumerate()
    {
        if round > 0 {
            // A guest that runs: a Xen PV guest takes part in its own save.
            start_until_ready(ctx, &domain, &mut watch).await?;
        }
        write_file(&path, OLDER)?;
        let older = fingerprint(&path)?;
        let d = domain.clone();
        let p = path.clone();
        let task = tokio::spawn(async move { d.save(&p).await });
        watch
            .expect(&[E::Suspended(SuspendedDetail::Saving)])
            .await?;
        when.wait(&dir, &task).await;
        let killed = kill(ctx, &domain).await;
        let r = join(task, PROMPT, "the save whose backend was killed").await?;
        tracing::info!("killed_mid_save round {round}: kill {killed:?}, save {r:?}");
        let at = format!("round {round} (kill {when:?})");
        match (r, killed) {
            (Ok(()), _) => {
                // The save finished first.
                watch.expect(&[E::Stopped(StoppedDetail::Saved)]).await?;
                expect_exact_state(&domain, DomainState::Shutoff(ShutoffReason::Saved))?;
                check(fingerprint(&path)? != older, || {
                    format!("{at}: save returned Ok but the file is the older one")
                })?;
                expect_listing(&dir, &[SAVE])?;
            }
            (Err(e), Ok(reason)) => {
                check(is_death_error(&e), || {
                    format!("{at}: save returned `{e}`; §6.0 wants backend or control_broken")
                })?;
                let detail = domkit_core::lifecycle::stopped_detail(reason);
                let got = watch.collect_quiet(QUIET).await?;
                check(got == [E::Stopped(detail)], || {
                    format!(
                        "{at}: events {} after the kill, want [{}] (§10; never saved)",
                        kinds_list(&got),
                        E::Stopped(detail)
                    )
                })?;
                expect_exact_state(&domain, DomainState::Shutoff(reason))?;
                expect_older_intact(&path, older)?;
                expect_listing(&dir, &[SAVE])?;
            }
            (Err(e), Err(k)) => {
                return fail(format!(
                    "{at}: the kill failed ({k}) and the save failed too: {e}"
                ))
            }
        }
        expect_truthful(ctx, &domain).await?;
    }
    // The domain is usable again.
    domain.start(StartOptions::default()).await?;
    watch.expect(&[E::Started(StartedDetail::Booted)]).await?;
    destroy_checked(&domain, &mut watch).await
}

pub(super) async fn killed_mid_restore<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.boot("a", GuestOptions::default()).await?;
    let dir = save_dir(ctx, &domain)?;
    let path = dir.join(SAVE);
    domain.save(&path).await?;
    watch
        .expect(&[
            E::Suspended(SuspendedDetail::Saving),
            E::Stopped(StoppedDetail::Saved),
        ])
        .await?;
    let saved = fingerprint(&path)?;
    let d = domain.clone();
    let p = path.clone();
    let task = tokio::spawn(async move { d.restore(&p, RestoreOptions::default()).await });
    tokio::select! {
        _ = backend_handle_appears(&domain) => {}
        _ = tokio::time::sleep(EVENT_TIMEOUT) => {
            return fail("no backend handle appeared during the restore");
        }
    }
    let killed = kill(ctx, &domain).await;
    let r = join(task, PROMPT, "the restore whose backend was killed").await?;
    tracing::info!("killed_mid_restore: kill {killed:?}, restore {r:?}");
    match (r, killed) {
        (Ok(()), Ok(reason)) => {
            // Restored first, then killed.
            let detail = domkit_core::lifecycle::stopped_detail(reason);
            watch
                .expect(&[E::Started(StartedDetail::Restored), E::Stopped(detail)])
                .await?;
            expect_exact_state(&domain, DomainState::Shutoff(reason))?;
        }
        (Ok(()), Err(k)) => {
            return fail(format!(
                "the kill failed ({k}) although the restore had created a backend domain"
            ))
        }
        (Err(e), Ok(reason)) => {
            check(is_death_error(&e), || {
                format!("restore returned `{e}`; §6.0 wants backend or control_broken")
            })?;
            // §6.0/§10 (the backend's out-of-band end) or §6.7/§2.3 (a failed restore).
            let which = expect_events_one_of(
                &mut watch,
                &[
                    &[E::Stopped(domkit_core::lifecycle::stopped_detail(reason))],
                    &[E::Stopped(StoppedDetail::Failed)],
                ],
            )
            .await?;
            let want = if which == 0 {
                reason
            } else {
                ShutoffReason::Failed
            };
            tracing::info!("after the kill the domain ended {want:?}");
            expect_exact_state(&domain, DomainState::Shutoff(want))?;
        }
        (Err(e), Err(k)) => {
            return fail(format!(
                "the kill failed ({k}) and the restore failed too: {e}"
            ))
        }
    }
    expect_truthful(ctx, &domain).await?;
    check(fingerprint(&path)? == saved, || {
        "the save file changed (§6.7: untouched)".into()
    })?;
    expect_listing(&dir, &[SAVE])?;
    // The file still restores.
    restore_running(&domain, &mut watch, &path).await?;
    destroy_checked(&domain, &mut watch).await
}

pub(super) async fn killed_mid_shutdown<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.boot("a", ignoring()).await?;
    let d = domain.clone();
    let task = tokio::spawn(async move {
        d.shutdown(shutdown_opts(
            ShutdownWait::Completed,
            Duration::from_secs(60),
            false,
        ))
        .await
    });
    watch
        .expect(&[E::ShutdownRequested(ShutdownRequester::Host)])
        .await?;
    let reason = hook("out-of-band kill", kill(ctx, &domain).await)?;
    let t0 = Instant::now();
    let r = join(task, PROMPT, "the shutdown whose backend was killed").await?;
    let took = t0.elapsed();
    expect_err(
        r,
        "a backend or control_broken error naming the end",
        is_death_error,
    )?;
    check(took < Duration::from_secs(5), || {
        format!("the waiting shutdown took {took:?} to return after the kill (§6.3: at once)")
    })?;
    let detail = domkit_core::lifecycle::stopped_detail(reason);
    let got = watch.collect_quiet(QUIET).await?;
    check(got == [E::Stopped(detail)], || {
        format!(
            "events {} after the kill, want [{}] (§6.0, §10: an out-of-band end, not a shutdown)",
            kinds_list(&got),
            E::Stopped(detail)
        )
    })?;
    expect_exact_state(&domain, DomainState::Shutoff(reason))?;
    expect_truthful(ctx, &domain).await?;
    domain.start(StartOptions::default()).await?;
    watch.expect(&[E::Started(StartedDetail::Booted)]).await?;
    destroy_checked(&domain, &mut watch).await
}

pub(super) async fn crash_mid_shutdown<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    use LifecycleAction::*;
    for (suffix, on_crash) in [("a", Destroy), ("b", Preserve)] {
        let options = GuestOptions {
            ignore_shutdown: true,
            ..with_policies(Destroy, Restart, on_crash)
        };
        let (domain, mut watch) = ctx.boot(suffix, options).await?;
        let d = domain.clone();
        let task = tokio::spawn(async move {
            d.shutdown(shutdown_opts(
                ShutdownWait::Completed,
                Duration::from_secs(60),
                false,
            ))
            .await
        });
        watch
            .expect(&[E::ShutdownRequested(ShutdownRequester::Host)])
            .await?;
        hook(
            "guest panic",
            ctx.backend.guest_do(&domain, GuestAction::Panic).await,
        )?;
        watch.expect(&[E::Crashed(CrashedDetail::Panicked)]).await?;
        let t0 = Instant::now();
        let end = if on_crash == Destroy {
            watch.expect(&[E::Stopped(StoppedDetail::Crashed)]).await?;
            DomainState::Shutoff(ShutoffReason::Crashed)
        } else {
            DomainState::Crashed(CrashedReason::Panicked)
        };
        let r = join(task, PROMPT, "the shutdown the guest's crash ended").await?;
        let took = t0.elapsed();
        tracing::info!("crash_mid_shutdown on_crash={on_crash:?}: shutdown {r:?} after {took:?}");
        expect_err(
            r,
            &format!("a backend error naming the crash (on_crash = {on_crash:?})"),
            |e| matches!(e, Error::Backend { .. }),
        )?;
        check(took < Duration::from_secs(5), || {
            format!(
                "shutdown(completed) returned {took:?} after the crash (on_crash = \
                 {on_crash:?}; §6.3: at once)"
            )
        })?;
        expect_exact_state(&domain, end)?;
        watch.expect_quiet(QUIET).await?;
        destroy_checked(&domain, &mut watch).await?;
    }
    Ok(())
}

pub(super) async fn killed_mid_start<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.define("a", GuestOptions::default()).await?;
    for round in 0..2 {
        let d = domain.clone();
        let task = tokio::spawn(async move { d.start(StartOptions::default()).await });
        tokio::select! {
            _ = backend_handle_appears(&domain) => {}
            _ = tokio::time::sleep(EVENT_TIMEOUT) => {
                return fail("no backend handle appeared during the start");
            }
        }
        let killed = kill(ctx, &domain).await;
        let r = join(task, PROMPT, "the start whose backend was killed").await?;
        tracing::info!("killed_mid_start round {round}: kill {killed:?}, start {r:?}");
        match (r, killed) {
            (Ok(()), Ok(reason)) => {
                let detail = domkit_core::lifecycle::stopped_detail(reason);
                let got = watch.collect_quiet(QUIET).await?;
                check(
                    got == [E::Started(StartedDetail::Booted), E::Stopped(detail)],
                    || {
                        format!(
                            "round {round}: start returned Ok, then the kill: events {}, want \
                         [started(booted), {}]",
                            kinds_list(&got),
                            E::Stopped(detail)
                        )
                    },
                )?;
                expect_exact_state(&domain, DomainState::Shutoff(reason))?;
            }
            (Ok(()), Err(k)) => {
                return fail(format!(
                    "round {round}: the kill failed ({k}) although the start had created a \
                     backend domain"
                ))
            }
            (Err(e), Ok(reason)) => {
                check(is_death_error(&e), || {
                    format!(
                        "round {round}: start returned `{e}`; §6.0 wants backend or control_broken"
                    )
                })?;
                let which = expect_events_one_of(
                    &mut watch,
                    &[
                        &[E::Stopped(domkit_core::lifecycle::stopped_detail(reason))],
                        &[E::Stopped(StoppedDetail::Failed)],
                    ],
                )
                .await?;
                let want = if which == 0 {
                    reason
                } else {
                    ShutoffReason::Failed
                };
                tracing::info!("round {round}: after the kill the domain ended {want:?}");
                expect_exact_state(&domain, DomainState::Shutoff(want))?;
            }
            (Err(e), Err(k)) => {
                return fail(format!(
                    "round {round}: the kill failed ({k}) and the start failed too: {e}"
                ))
            }
        }
        expect_truthful(ctx, &domain).await?;
    }
    domain.start(StartOptions::default()).await?;
    watch.expect(&[E::Started(StartedDetail::Booted)]).await?;
    destroy_checked(&domain, &mut watch).await
}

// ---------------------------------------------------------------------------------------
// One answer per (operation, state)

/// Every wait of shutdown from a state that cannot act on it: `invalid_state`, nothing
/// changes (§6.3).
async fn shutdown_refused<D: Domain>(domain: &D, watch: &mut EventWatch, what: &str) -> Step {
    let before = domain.state();
    for wait in [ShutdownWait::Completed, ShutdownWait::Acknowledged] {
        let t0 = Instant::now();
        let r = domain
            .shutdown(shutdown_opts(wait, Duration::from_secs(5), false))
            .await;
        let took = t0.elapsed();
        expect_err(
            r,
            &format!("invalid_state(shutdown) from {what} ({wait:?})"),
            is_invalid_state(Operation::Shutdown),
        )?;
        check(took < Duration::from_secs(2), || {
            format!("shutdown from {what} took {took:?} to be refused")
        })?;
    }
    watch.expect_quiet(QUIET).await?;
    expect_exact_state(domain, before)
}

pub(super) async fn shutdown_paused<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    use LifecycleAction::*;
    let (domain, mut watch) = ctx
        .boot("a", with_policies(Preserve, Restart, Preserve))
        .await?;
    // paused
    domain.pause().await?;
    watch
        .expect(&[E::Suspended(SuspendedDetail::Paused)])
        .await?;
    shutdown_refused(&domain, &mut watch, "paused").await?;
    expect_truthful(ctx, &domain).await?;
    domain.resume().await?;
    watch.expect(&[E::Resumed(ResumedDetail::Unpaused)]).await?;
    expect_exact_state(&domain, DomainState::Running(RunningReason::Unpaused))?;
    // pm_suspended (where the backend can)
    if ctx
        .driver()
        .capabilities()
        .check(Operation::PmSuspend)
        .is_ok()
    {
        domain.pm_suspend(PmSuspendTarget::Memory).await?;
        watch
            .expect(&[E::PmSuspended(PmSuspendedDetail::Memory)])
            .await?;
        expect_exact_state(&domain, DomainState::PmSuspended(PmSuspendedReason::Memory))?;
        shutdown_refused(&domain, &mut watch, "pm_suspended").await?;
        domain.pm_wakeup().await?;
        watch.expect(&[E::Started(StartedDetail::Wakeup)]).await?;
        hook(
            "guest ready after wakeup",
            ctx.backend.wait_guest_ready(&domain, BOOT_TIMEOUT).await,
        )?;
    }
    // a crash kept by on_crash = preserve
    hook(
        "guest panic",
        ctx.backend.guest_do(&domain, GuestAction::Panic).await,
    )?;
    watch.expect(&[E::Crashed(CrashedDetail::Panicked)]).await?;
    expect_exact_state(&domain, DomainState::Crashed(CrashedReason::Panicked))?;
    shutdown_refused(&domain, &mut watch, "crashed (preserved)").await?;
    destroy_checked(&domain, &mut watch).await?;
    // a poweroff kept by on_poweroff = preserve
    start_until_ready(ctx, &domain, &mut watch).await?;
    hook(
        "guest poweroff",
        ctx.backend.guest_do(&domain, GuestAction::Poweroff).await,
    )?;
    watch
        .expect(&[
            E::ShutdownRequested(ShutdownRequester::Guest),
            E::Suspended(SuspendedDetail::Paused),
        ])
        .await?;
    expect_exact_state(&domain, DomainState::Paused(PausedReason::ShuttingDown))?;
    shutdown_refused(&domain, &mut watch, "a preserved poweroff").await?;
    destroy_checked(&domain, &mut watch).await
}

// ---------------------------------------------------------------------------------------
// Bad save files (§6.7)

pub(super) async fn restore_corrupt<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (a, mut wa) = ctx.boot("a", GuestOptions::default()).await?;
    let (b, mut wb) = ctx.boot("b", GuestOptions::default()).await?;
    let dir = save_dir(ctx, &a)?;
    let real = dir.join("a.save");
    let foreign = dir.join("b.save");
    let saved = [
        E::Suspended(SuspendedDetail::Saving),
        E::Stopped(StoppedDetail::Saved),
    ];
    a.save(&real).await?;
    wa.expect(&saved).await?;
    b.save(&foreign).await?;
    wb.expect(&saved).await?;

    let bytes =
        std::fs::read(&real).map_err(|e| Stop::Fail(format!("reading {}: {e}", real.display())))?;
    let stream_start = hook(
        "finding the stream in a save file",
        ctx.backend.save_stream_start(&real),
    )? as usize;
    check(stream_start + 16384 < bytes.len(), || {
        format!(
            "the save file is {} bytes, its stream starts at {stream_start}",
            bytes.len()
        )
    })?;
    let mut rng = XorShift(0x0bad_5a7e_f11e);
    let mut cases: Vec<(&str, PathBuf)> = Vec::new();
    let mut add = |name: &'static str, content: Vec<u8>| -> Step {
        let path = dir.join(format!("{name}.save"));
        write_file(&path, &content)?;
        cases.push((name, path));
        Ok(())
    };
    add("truncated", bytes[..bytes.len() / 2].to_vec())?;
    add("random", rng.bytes(1 << 20))?;
    let mid = stream_start + (bytes.len() - stream_start) / 2;
    let mut damaged = bytes.clone();
    for byte in &mut damaged[mid..mid + 4096] {
        *byte ^= 0x5a;
    }
    add("damaged_stream", damaged)?;
    // One bit, in what is most likely guest memory: nothing in the backend's own stream
    // format may notice, the file is damaged all the same.
    let mut flipped = bytes.clone();
    flipped[mid + 2048] ^= 0x01;
    add("flipped_bit", flipped)?;
    let mut garbage = bytes[..stream_start].to_vec();
    garbage.extend_from_slice(&rng.bytes(1 << 20));
    add("header_then_garbage", garbage)?;
    add("header_only", bytes[..stream_start].to_vec())?;
    drop(bytes);
    cases.push(("foreign", foreign.clone()));

    // Every case is tried (and the domain brought back to shut off after one that went
    // wrong), so one run reports them all.
    let mut failures = Vec::new();
    for (case, path) in &cases {
        if let Err(Stop::Fail(m)) = bad_file_refused(ctx, &a, &mut wa, case, path).await {
            failures.push(m);
            let _ = a.destroy().await;
            let _ = wa.collect_quiet(QUIET).await;
        }
    }
    check(failures.is_empty(), || failures.join("; "))?;
    wa.expect_quiet(QUIET).await?;
    // After all that, the real file restores.
    restore_running(&a, &mut wa, &real).await?;
    destroy_checked(&a, &mut wa).await
}

/// A restore of the bad file `path` is `bad_save_file` at once, the domain ends
/// `shutoff(failed)` with its event, the file is untouched and no backend domain is left.
async fn bad_file_refused<B: TestBackend>(
    ctx: &ScenarioCtx<'_, B>,
    domain: &Dom<B>,
    watch: &mut EventWatch,
    case: &str,
    path: &Path,
) -> Step {
    let before = fingerprint(path)?;
    let t0 = Instant::now();
    let r = domain.restore(path, RestoreOptions::default()).await;
    let took = t0.elapsed();
    tracing::info!("restore_corrupt {case}: {took:?}: {r:?}");
    match r {
        Err(Error::BadSaveFile { .. }) => {}
        Ok(()) => return fail(format!("{case}: restore returned Ok (§6.7: bad_save_file)")),
        Err(e) => {
            return fail(format!(
                "{case}: restore returned `{e}` (§6.7: bad_save_file)"
            ))
        }
    }
    check(took < Duration::from_secs(5), || {
        format!(
            "{case}: the bad file took {took:?} to be refused (§6.7: found before the backend \
             reads the stream; §7: never a hang)"
        )
    })?;
    watch
        .expect(&[E::Stopped(StoppedDetail::Failed)])
        .await
        .map_err(|e| match e {
            Stop::Fail(m) => Stop::Fail(format!("{case}: {m} (§6.7, §2.3)")),
            other => other,
        })?;
    let state = domain.state();
    check(state == DomainState::Shutoff(ShutoffReason::Failed), || {
        format!("{case}: the state is {state}, want shutoff (failed)")
    })?;
    check(fingerprint(path)? == before, || {
        format!("{case}: restore changed the file (§6.7: untouched)")
    })?;
    expect_no_backend_domain(ctx.backend, &domain.id().name)
        .await
        .map_err(|e| match e {
            Stop::Fail(m) => Stop::Fail(format!("{case}: {m}")),
            other => other,
        })
}

// ---------------------------------------------------------------------------------------
// A shutdown request the guest ignores leaves the domain operable (§6.3)

pub(super) async fn shutdown_ignored_then_operable<B: TestBackend>(
    ctx: &ScenarioCtx<'_, B>,
) -> Step {
    let (domain, mut watch) = ctx.boot("a", ignoring()).await?;
    let before = boot_id(ctx, &domain).await?;
    let t0 = Instant::now();
    let r = domain
        .shutdown(shutdown_opts(
            ShutdownWait::Completed,
            Duration::from_secs(2),
            false,
        ))
        .await;
    let took = t0.elapsed();
    expect_err(r, "timeout", |e| matches!(e, Error::Timeout { .. }))?;
    check(took < Duration::from_secs(5), || {
        format!("shutdown(timeout = 2 s) returned its timeout after {took:?}")
    })?;
    watch
        .expect(&[E::ShutdownRequested(ShutdownRequester::Host)])
        .await?;
    expect_exact_state(&domain, DomainState::ShuttingDown(ShuttingDownReason::User))?;
    domain.pause().await?;
    watch
        .expect(&[E::Suspended(SuspendedDetail::Paused)])
        .await?;
    expect_exact_state(&domain, DomainState::Paused(PausedReason::User))?;
    expect_truthful(ctx, &domain).await?;
    domain.resume().await?;
    watch.expect(&[E::Resumed(ResumedDetail::Unpaused)]).await?;
    expect_exact_state(&domain, DomainState::Running(RunningReason::Unpaused))?;
    expect_truthful(ctx, &domain).await?;
    // Pending again, then saved straight from shutting_down(user).
    let outcome = domain
        .shutdown(shutdown_opts(
            ShutdownWait::Acknowledged,
            Duration::from_secs(30),
            false,
        ))
        .await?;
    check(outcome == ShutdownOutcome::Acknowledged, || {
        format!("shutdown(acknowledged) returned {outcome:?}")
    })?;
    watch
        .expect(&[E::ShutdownRequested(ShutdownRequester::Host)])
        .await?;
    expect_exact_state(&domain, DomainState::ShuttingDown(ShuttingDownReason::User))?;
    let dir = save_dir(ctx, &domain)?;
    let path = dir.join(SAVE);
    domain.save(&path).await?;
    watch
        .expect(&[
            E::Suspended(SuspendedDetail::Saving),
            E::Stopped(StoppedDetail::Saved),
        ])
        .await?;
    expect_exact_state(&domain, DomainState::Shutoff(ShutoffReason::Saved))?;
    expect_listing(&dir, &[SAVE])?;
    restore_running(&domain, &mut watch, &path).await?;
    let after = boot_id(ctx, &domain).await?;
    check(before == after, || {
        format!("guest state not intact: boot id {before} before, {after} after the restore")
    })?;
    watch.expect_quiet(QUIET).await?;
    destroy_checked(&domain, &mut watch).await
}

// ---------------------------------------------------------------------------------------
// Launch failures carry the backend's reason (§6.1)

pub(super) async fn launch_failure_reason<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let mut reasons: &'static [&'static str] = &[];
    let (domain, mut watch) = ctx
        .define_config("a", |name| {
            let (config, r) = ctx.backend.launch_failure_config(name)?;
            reasons = r;
            Ok(config)
        })
        .await?;
    let name = domain.id().name.clone();
    for attempt in 0..2 {
        let r = domain.start(StartOptions::default()).await;
        let msg = match r {
            Ok(()) => {
                return fail(format!(
                    "attempt {attempt}: a domain with a garbage kernel started (state {})",
                    domain.state()
                ))
            }
            Err(e @ Error::Unsupported { .. }) => return Err(e.into()),
            Err(e) => e.to_string(),
        };
        check(reasons.iter().any(|r| msg.contains(r)), || {
            format!(
                "attempt {attempt}: the error does not carry the backend's reason (any of \
                 {reasons:?}, §6.1): {msg}"
            )
        })?;
        watch.expect(&[E::Stopped(StoppedDetail::Failed)]).await?;
        expect_exact_state(&domain, DomainState::Shutoff(ShutoffReason::Failed))?;
        expect_no_backend_domain(ctx.backend, &name).await?;
    }
    watch.expect_quiet(QUIET).await
}

// ---------------------------------------------------------------------------------------
// No agent channel (§6.3, §6.8)

pub(super) async fn agent_absent<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let options = GuestOptions {
        no_agent: true,
        ..Default::default()
    };
    let (domain, mut watch) = ctx.launch("a", options).await?;
    let is_unsupported = |e: &Error| matches!(e, Error::Unsupported { .. });
    let t0 = Instant::now();
    let r = domain
        .shutdown(ShutdownOptions {
            mode: ShutdownMode::Agent,
            wait: ShutdownWait::Completed,
            timeout: Duration::from_secs(10),
            destroy_on_timeout: false,
        })
        .await;
    let took = t0.elapsed();
    expect_err(
        r,
        "unsupported (agent-mode shutdown, no agent)",
        is_unsupported,
    )?;
    check(took <= Duration::from_secs(1), || {
        format!("agent-mode shutdown without an agent took {took:?} to be refused")
    })?;
    if ctx.backend.pm_suspend_uses_agent() {
        let t0 = Instant::now();
        let r = domain.pm_suspend(PmSuspendTarget::Memory).await;
        let took = t0.elapsed();
        expect_err(
            r,
            "unsupported (pm_suspend(memory), no agent)",
            is_unsupported,
        )?;
        check(took <= Duration::from_secs(1), || {
            format!("pm_suspend without an agent took {took:?} to be refused")
        })?;
    }
    watch.expect_quiet(QUIET).await?;
    expect_exact_state(&domain, DomainState::Running(RunningReason::Booted))?;
    domain.pause().await?;
    watch
        .expect(&[E::Suspended(SuspendedDetail::Paused)])
        .await?;
    destroy_checked(&domain, &mut watch).await
}
