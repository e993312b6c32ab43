//! Runtime glue shared by the drivers: a [`Lifecycle`] behind a lock, with its events
//! published to subscribers and its state watchable, so operations can wait for a state.

use crate::event::DomainEvent;
use crate::lifecycle::{Intent, IntentToken, Lifecycle, Observation, PolicyAction};
use crate::state::{ControlState, DomainState};
use crate::{Error, Operation, Result};
use futures::Stream;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};
use tokio::sync::{broadcast, watch};
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;

/// How many events a subscriber of one domain may fall behind before it loses some (it can
/// tell: the sequence numbers jump and [`EventStream::lost`] counts them), and how many a
/// domain keeps for [`LifecycleCell::subscribe_from`]. Both are the same buffer: the
/// domain's kept events, which its subscribers read at their own position. It grows as
/// events happen (a domain's lifecycle produces a handful per operation), so an idle domain
/// costs nothing; a preallocated broadcast ring cost 11 KiB per domain (1024 slots: 88 KiB).
pub const EVENT_BUFFER: usize = 128;

/// The same for a driver-wide stream (all domains of one driver; one ring per driver).
pub const DRIVER_EVENT_BUFFER: usize = 4096;

/// A stream of uniform events (of one domain, or of all domains of a driver).
///
/// A subscriber that falls more than [`EVENT_BUFFER`] events behind skips the oldest; the
/// number skipped is in [`EventStream::lost`], and the per-domain `seq` shows the gap
/// (`docs/semantics.md` §2.4, §12.2).
pub struct EventStream {
    inner: Source,
    lost: Arc<AtomicU64>,
    /// Events delivered before the live ones (a [`LifecycleCell::subscribe_from`] replay).
    replay: VecDeque<DomainEvent>,
    /// Live events with a `seq` up to this one are dropped (already replayed, or before the
    /// point the subscriber asked to start from). 0 for driver-wide streams.
    skip_through: u64,
}

/// Where a stream's events come from.
enum Source {
    /// A broadcast ring (a driver-wide stream).
    Broadcast(BroadcastStream<DomainEvent>),
    /// One domain's kept events, read from a position of its own.
    Domain(DomainCursor),
}

/// A domain's kept events (the last [`EVENT_BUFFER`], oldest first) and the subscribers
/// waiting for the next one.
struct History {
    events: VecDeque<DomainEvent>,
    /// Subscribers waiting for an event, by subscriber id.
    waiting: Vec<(u64, Waker)>,
    next_subscriber: u64,
    /// The cell is gone: subscribers end after the events they have not read.
    closed: bool,
}

impl History {
    fn wake_all(&mut self) {
        // Waking only schedules the subscriber, which locks after this returns.
        for (_, waker) in self.waiting.drain(..) {
            waker.wake();
        }
    }
}

/// A subscriber's position in a domain's [`History`].
struct DomainCursor {
    history: Arc<Mutex<History>>,
    id: u64,
    /// The `seq` of the next event to deliver.
    next_seq: u64,
}

impl DomainCursor {
    fn poll_next(&mut self, cx: &mut Context<'_>, lost: &AtomicU64) -> Poll<Option<DomainEvent>> {
        let mut history = lock_history(&self.history);
        if let Some(oldest) = history.events.front().map(|ev| ev.seq) {
            if self.next_seq < oldest {
                // Lagged past what is kept: go on with the oldest kept event (§2.4).
                lost.fetch_add(oldest - self.next_seq, Ordering::Relaxed);
                self.next_seq = oldest;
            }
        }
        let at = history.events.partition_point(|ev| ev.seq < self.next_seq);
        if let Some(ev) = history.events.get(at) {
            self.next_seq = ev.seq + 1;
            return Poll::Ready(Some(ev.clone()));
        }
        if history.closed {
            return Poll::Ready(None);
        }
        let id = self.id;
        match history.waiting.iter_mut().find(|(w, _)| *w == id) {
            Some((_, w)) => w.clone_from(cx.waker()),
            None => history.waiting.push((id, cx.waker().clone())),
        }
        Poll::Pending
    }
}

impl Drop for DomainCursor {
    fn drop(&mut self) {
        let id = self.id;
        lock_history(&self.history)
            .waiting
            .retain(|(w, _)| *w != id);
    }
}

fn lock_history(history: &Mutex<History>) -> MutexGuard<'_, History> {
    // Only pushed to and popped from whole events: a poisoned lock is still consistent.
    history.lock().unwrap_or_else(|p| p.into_inner())
}

impl EventStream {
    /// Wrap a broadcast receiver.
    pub fn new(rx: broadcast::Receiver<DomainEvent>) -> Self {
        EventStream {
            inner: Source::Broadcast(BroadcastStream::new(rx)),
            lost: Arc::new(AtomicU64::new(0)),
            replay: VecDeque::new(),
            skip_through: 0,
        }
    }

    /// A stream of `history`'s events from `seq` `next_seq` on.
    fn of_domain(history: &Arc<Mutex<History>>, next_seq: u64) -> Self {
        let id = {
            let mut h = lock_history(history);
            h.next_subscriber += 1;
            h.next_subscriber
        };
        EventStream {
            inner: Source::Domain(DomainCursor {
                history: history.clone(),
                id,
                next_seq,
            }),
            lost: Arc::new(AtomicU64::new(0)),
            replay: VecDeque::new(),
            skip_through: 0,
        }
    }

    /// Drop live events with a `seq` up to `seq` (for a per-domain stream that should start
    /// after a point already seen).
    pub fn skip_through(&mut self, seq: u64) {
        self.skip_through = self.skip_through.max(seq);
    }

    /// How many events this subscriber lost by lagging.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("lost", &self.lost())
            .finish()
    }
}

impl Stream for EventStream {
    type Item = DomainEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<DomainEvent>> {
        if let Some(ev) = self.replay.pop_front() {
            return Poll::Ready(Some(ev));
        }
        let this = &mut *self;
        let inner = match &mut this.inner {
            Source::Domain(cursor) => loop {
                match cursor.poll_next(cx, &this.lost) {
                    Poll::Ready(Some(ev)) if ev.seq <= this.skip_through => continue,
                    other => return other,
                }
            },
            Source::Broadcast(inner) => inner,
        };
        loop {
            match Pin::new(&mut *inner).poll_next(cx) {
                Poll::Ready(Some(Ok(ev))) if ev.seq <= this.skip_through => continue,
                Poll::Ready(Some(Ok(ev))) => return Poll::Ready(Some(ev)),
                Poll::Ready(Some(Err(BroadcastStreamRecvError::Lagged(n)))) => {
                    this.lost.fetch_add(n, Ordering::Relaxed);
                    continue;
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A [`Lifecycle`] shared between a domain's operations and its event task.
///
/// Locking: a plain mutex held for the pure state-machine step and the publication of its
/// events and state, never across an await. Publishing under the lock is what orders events:
/// two observers at once (an event task and an operation) cannot deliver seq N+1 before N,
/// and the state watch is never older than the last event delivered (§5).
pub struct LifecycleCell {
    inner: Mutex<Lifecycle>,
    /// The last [`EVENT_BUFFER`] events, oldest first: what every subscriber of the domain
    /// reads (at its own position) and what [`LifecycleCell::subscribe_from`] replays from.
    /// Pushed to only while `inner` is held, so it always ends at the lifecycle's
    /// `last_seq`. Grows as events happen: an idle domain costs nothing.
    history: Arc<Mutex<History>>,
    driver_events: Option<broadcast::Sender<DomainEvent>>,
    state_tx: watch::Sender<DomainState>,
    persist: Option<PersistHook>,
}

/// Called under the cell's lock after every step that produced events, before they are
/// published (a persistent driver records `seq` and state there, §11).
pub type PersistHook = Box<dyn Fn(&Lifecycle) + Send + Sync>;

impl std::fmt::Debug for LifecycleCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LifecycleCell")
            .field("inner", &self.inner)
            .field("persist", &self.persist.is_some())
            .finish_non_exhaustive()
    }
}

impl LifecycleCell {
    /// Wrap `lifecycle`; events are also sent to `driver_events` (the driver-wide stream).
    pub fn new(
        lifecycle: Lifecycle,
        driver_events: Option<broadcast::Sender<DomainEvent>>,
    ) -> Self {
        let (state_tx, _) = watch::channel(lifecycle.state());
        LifecycleCell {
            inner: Mutex::new(lifecycle),
            history: Arc::new(Mutex::new(History {
                events: VecDeque::new(),
                waiting: Vec::new(),
                next_subscriber: 0,
                closed: false,
            })),
            driver_events,
            state_tx,
            persist: None,
        }
    }

    /// As [`LifecycleCell::new`], with `persist` called before each publication.
    pub fn with_persist(
        lifecycle: Lifecycle,
        driver_events: Option<broadcast::Sender<DomainEvent>>,
        persist: PersistHook,
    ) -> Self {
        let mut cell = LifecycleCell::new(lifecycle, driver_events);
        cell.persist = Some(persist);
        cell
    }

    /// Run the persist hook now (an operation recorded something of its own, e.g. a save
    /// in flight).
    pub fn persist_now(&self) {
        if let Some(persist) = &self.persist {
            persist(&self.lock());
        }
    }

    fn lock(&self) -> MutexGuard<'_, Lifecycle> {
        // A panic while holding the lock cannot leave the pure state machine half-updated in
        // a way worse than its last step, so recover the guard.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run `f` on the lifecycle under the lock (for reads and intent handling).
    pub fn with<R>(&self, f: impl FnOnce(&mut Lifecycle) -> R) -> R {
        f(&mut self.lock())
    }

    /// The current state.
    pub fn state(&self) -> DomainState {
        self.lock().state()
    }

    /// The control-channel state.
    pub fn control(&self) -> ControlState {
        self.lock().control().clone()
    }

    /// Set the control-channel state.
    pub fn set_control(&self, control: ControlState) {
        self.lock().set_control(control);
    }

    /// Apply an observation now, publish its events, and return the policy action.
    pub fn observe(&self, obs: Observation) -> Option<PolicyAction> {
        self.observe_as(obs, false)
    }

    /// As [`LifecycleCell::observe`], for a fact a new manager found on reattach (its
    /// events are marked `reconciled`, §11.3).
    pub fn observe_reconciled(&self, obs: Observation) -> Option<PolicyAction> {
        self.observe_as(obs, true)
    }

    fn observe_as(&self, obs: Observation, reconciled: bool) -> Option<PolicyAction> {
        let mut lc = self.lock();
        let end_before = lc.pending_end();
        let outcome = if reconciled {
            lc.observe_reconciled(obs, SystemTime::now())
        } else {
            lc.observe(obs, SystemTime::now())
        };
        // A decided end is recorded before the driver carries it out, even when the
        // observation has no event of its own (a guest poweroff completing a pending
        // shutdown): a manager killed before the backend domain is gone leaves that end.
        if !outcome.events.is_empty() || lc.pending_end() != end_before {
            if let Some(persist) = &self.persist {
                persist(&lc);
            }
        }
        // Under the lock: see the type's docs.
        self.state_tx.send_replace(lc.state());
        for ev in outcome.events {
            self.send(ev);
        }
        outcome.action
    }

    /// Produce and publish an event outside `observe` (e.g. `Defined`), under the lock so
    /// it is ordered with every other event of the domain.
    pub fn emit(&self, make: impl FnOnce(&mut Lifecycle, SystemTime) -> DomainEvent) {
        let mut lc = self.lock();
        let ev = make(&mut lc, SystemTime::now());
        if let Some(persist) = &self.persist {
            persist(&lc);
        }
        self.send(ev);
    }

    /// Send one event to both streams; the caller holds the lock.
    fn send(&self, ev: DomainEvent) {
        tracing::debug!(domain = %ev.domain.name, seq = ev.seq, event = %ev.kind, "domain event");
        if let Some(d) = &self.driver_events {
            let _ = d.send(ev.clone());
        }
        let mut history = lock_history(&self.history);
        if history.events.len() >= EVENT_BUFFER {
            history.events.pop_front();
        }
        history.events.push_back(ev);
        history.wake_all();
    }

    /// Subscribe to this domain's events (from now on).
    pub fn subscribe(&self) -> EventStream {
        let lc = self.lock();
        // Under the lock: the stream starts right after the last event published.
        EventStream::of_domain(&self.history, lc.last_seq() + 1)
    }

    /// The current state, the `seq` of the last event it reflects, and a stream of every
    /// event after that one: taken under one lock, so no event falls between the snapshot
    /// and the stream and none is in both (§5).
    pub fn snapshot_and_subscribe(&self) -> (DomainState, u64, EventStream) {
        let lc = self.lock();
        (
            lc.state(),
            lc.last_seq(),
            EventStream::of_domain(&self.history, lc.last_seq() + 1),
        )
    }

    /// Every event after `after`, none twice, then the live ones (§12.1): the events with a
    /// `seq` above `after` that are still kept are replayed first. `after` at or beyond the
    /// last event: the stream starts with the first event above `after`.
    ///
    /// [`Error::EventsLost`] if some event after `after` is no longer kept (only the last
    /// [`EVENT_BUFFER`] are): resynchronise with [`LifecycleCell::snapshot_and_subscribe`].
    pub fn subscribe_from(&self, after: u64) -> Result<EventStream> {
        let lc = self.lock();
        let last = lc.last_seq();
        // Under the lock: the kept events end at `last`, and later ones are pushed after it.
        if after < last {
            let resumed_at = lock_history(&self.history)
                .events
                .front()
                .map_or(last + 1, |ev| ev.seq);
            if resumed_at > after + 1 {
                return Err(Error::EventsLost {
                    domain: lc.id().name.clone(),
                    after,
                    resumed_at,
                });
            }
        }
        // The kept events above `after` are read first, then the live ones: one sequence,
        // no seam.
        Ok(EventStream::of_domain(&self.history, after + 1))
    }

    /// Stash `intent` until the returned guard is dropped; other operations' intents stay.
    pub fn intent(&self, intent: Intent) -> IntentGuard<'_> {
        let token = self.lock().push_intent(intent);
        IntentGuard {
            cell: self,
            token: Some(token),
        }
    }

    /// Wait until the state satisfies `pred`, at most `timeout`.
    pub async fn wait_for(
        &self,
        operation: Operation,
        timeout: Duration,
        pred: impl Fn(&DomainState) -> bool,
    ) -> Result<DomainState> {
        let mut rx = self.state_tx.subscribe();
        let wait = async {
            loop {
                let current = *rx.borrow_and_update();
                if pred(&current) {
                    return Ok(current);
                }
                if rx.changed().await.is_err() {
                    return Err(());
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(state)) => Ok(state),
            Ok(Err(())) | Err(_) => Err(Error::Timeout {
                operation,
                after: timeout,
                hint: format!("the domain is still {}", self.state()),
            }),
        }
    }
}

impl Drop for LifecycleCell {
    fn drop(&mut self) {
        // Subscribers end once they have read what is kept (as a dropped broadcast sender
        // ends its receivers): the domain was undefined or its driver dropped.
        let mut history = lock_history(&self.history);
        history.closed = true;
        history.wake_all();
    }
}

/// Keeps an [`Intent`] stashed in a [`LifecycleCell`]; removes exactly that one on drop.
#[derive(Debug)]
pub struct IntentGuard<'a> {
    cell: &'a LifecycleCell,
    token: Option<IntentToken>,
}

impl Drop for IntentGuard<'_> {
    fn drop(&mut self) {
        if let Some(token) = self.token.take() {
            self.cell.lock().pop_intent(token);
        }
    }
}
