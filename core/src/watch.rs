//! Waiting for events without races (`docs/semantics.md` §12.1-§12.3): which events a wait
//! is for ([`EventFilter`]), and [`EventStream::wait_for`], the uniform counterpart of QEMU
//! python `machine.py`'s `event_wait(name, timeout, match)`.
//!
//! Race-free "do X, then wait until Y": take [`crate::Domain::snapshot`] (or
//! [`crate::Domain::subscribe_from`] a `seq` already seen) *before* doing X, then wait on
//! its stream: an event that happens between the two is in the stream, exactly once.

use crate::cell::EventStream;
use crate::event::{DomainEvent, EventKind};
use crate::{Error, Operation, Result};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// An event's name without its detail (`stopped` for `stopped(saved)`), for a filter that
/// accepts any detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventName {
    /// [`EventKind::Defined`].
    Defined,
    /// [`EventKind::Undefined`].
    Undefined,
    /// [`EventKind::Started`].
    Started,
    /// [`EventKind::Suspended`].
    Suspended,
    /// [`EventKind::Resumed`].
    Resumed,
    /// [`EventKind::Stopped`].
    Stopped,
    /// [`EventKind::ShutdownRequested`].
    ShutdownRequested,
    /// [`EventKind::Rebooted`].
    Rebooted,
    /// [`EventKind::PmSuspended`].
    PmSuspended,
    /// [`EventKind::Crashed`].
    Crashed,
    /// [`EventKind::DeviceAdded`].
    DeviceAdded,
    /// [`EventKind::DeviceRemoved`].
    DeviceRemoved,
    /// [`EventKind::DeviceRemovalFailed`].
    DeviceRemovalFailed,
    /// [`EventKind::AgentConnected`].
    AgentConnected,
    /// [`EventKind::AgentDisconnected`].
    AgentDisconnected,
}

impl EventName {
    /// The name of `kind`.
    pub fn of(kind: &EventKind) -> EventName {
        match kind {
            EventKind::Defined => EventName::Defined,
            EventKind::Undefined => EventName::Undefined,
            EventKind::Started(_) => EventName::Started,
            EventKind::Suspended(_) => EventName::Suspended,
            EventKind::Resumed(_) => EventName::Resumed,
            EventKind::Stopped(_) => EventName::Stopped,
            EventKind::ShutdownRequested(_) => EventName::ShutdownRequested,
            EventKind::Rebooted => EventName::Rebooted,
            EventKind::PmSuspended(_) => EventName::PmSuspended,
            EventKind::Crashed(_) => EventName::Crashed,
            EventKind::DeviceAdded(_) => EventName::DeviceAdded,
            EventKind::DeviceRemoved(_) => EventName::DeviceRemoved,
            EventKind::DeviceRemovalFailed(_) => EventName::DeviceRemovalFailed,
            EventKind::AgentConnected => EventName::AgentConnected,
            EventKind::AgentDisconnected => EventName::AgentDisconnected,
        }
    }
}

impl fmt::Display for EventName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = serde_json::to_value(self).unwrap_or_default();
        f.write_str(v.as_str().unwrap_or("?"))
    }
}

/// Which events a wait accepts.
#[derive(Clone)]
pub enum EventFilter {
    /// Any event.
    Any,
    /// Exactly this kind and detail (`stopped(saved)`).
    Kind(EventKind),
    /// This name, any detail (`stopped`).
    Name(EventName),
    /// Any of these kinds (exact detail).
    AnyOf(Vec<EventKind>),
    /// Whatever the predicate accepts (e.g. a `seq` above some value, or `reconciled`).
    Matching(Arc<dyn Fn(&DomainEvent) -> bool + Send + Sync>),
}

impl EventFilter {
    /// A filter from a predicate.
    pub fn matching(pred: impl Fn(&DomainEvent) -> bool + Send + Sync + 'static) -> Self {
        EventFilter::Matching(Arc::new(pred))
    }

    /// Whether `event` passes.
    pub fn matches(&self, event: &DomainEvent) -> bool {
        match self {
            EventFilter::Any => true,
            EventFilter::Kind(kind) => event.kind == *kind,
            EventFilter::Name(name) => EventName::of(&event.kind) == *name,
            EventFilter::AnyOf(kinds) => kinds.contains(&event.kind),
            EventFilter::Matching(pred) => pred(event),
        }
    }
}

impl fmt::Debug for EventFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for EventFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventFilter::Any => f.write_str("any event"),
            EventFilter::Kind(kind) => write!(f, "{kind}"),
            EventFilter::Name(name) => write!(f, "{name}(*)"),
            EventFilter::AnyOf(kinds) => {
                let names: Vec<String> = kinds.iter().map(ToString::to_string).collect();
                write!(f, "one of [{}]", names.join(", "))
            }
            EventFilter::Matching(_) => f.write_str("an event matching a predicate"),
        }
    }
}

impl From<EventKind> for EventFilter {
    fn from(kind: EventKind) -> Self {
        EventFilter::Kind(kind)
    }
}

impl From<EventName> for EventFilter {
    fn from(name: EventName) -> Self {
        EventFilter::Name(name)
    }
}

impl EventStream {
    /// The next event `filter` accepts, skipping the others, within `timeout` (§12.3).
    ///
    /// Errors: [`Error::Timeout`] (operation `wait_event`) when none came in time;
    /// [`Error::EventsLost`] when this stream lagged and dropped events before one matched
    /// (the awaited event may be among them: take a new snapshot and look at its state);
    /// [`Error::NotFound`] when the stream ended (the domain was undefined or its driver
    /// dropped) before one matched.
    pub async fn wait_for(
        &mut self,
        filter: &EventFilter,
        timeout: Duration,
    ) -> Result<DomainEvent> {
        let lost_before = self.lost();
        let mut last_seen: Option<(String, u64)> = None;
        let wait = async {
            while let Some(event) = self.next().await {
                if self.lost() > lost_before {
                    // Only a per-domain gap can be named exactly; a driver-wide stream's
                    // events carry the seq of their own domain.
                    let after = match &last_seen {
                        Some((name, seq)) if *name == event.domain.name => *seq,
                        _ => 0,
                    };
                    return Err(Error::EventsLost {
                        domain: event.domain.name.clone(),
                        after,
                        resumed_at: event.seq,
                    });
                }
                if filter.matches(&event) {
                    return Ok(event);
                }
                last_seen = Some((event.domain.name.clone(), event.seq));
            }
            Err(Error::NotFound {
                what: format!(
                    "the event stream (it ended before {filter}: the domain was undefined or its driver dropped)"
                ),
            })
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout {
                operation: Operation::WaitEvent,
                after: timeout,
                hint: format!("no {filter} came"),
            }),
        }
    }
}
