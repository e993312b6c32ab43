//! The QMP client: tokio I/O around the pure [`codec`](super::codec).
//!
//! One connection, one task, one lock:
//! - a caller **writes its command itself**, whole, under the connection's lock: a
//!   non-blocking `send` inside a critical section that holds no `await`, so a caller that
//!   gives up (timeout, dropped future) can never leave half a command on the wire. A command
//!   line nearly always fits the socket buffer; when it does not (QEMU not reading), what is
//!   left is queued, whole, under the same lock and written by a short-lived flusher task that
//!   waits for writability, and later commands queue behind it, so the wire keeps whole
//!   commands in call order.
//! - a **reader** task cuts the stream into messages, completes the caller waiting for each
//!   reply directly (the reply's bytes are handed over and the caller deserialises them once
//!   into the type it wants), and appends each event to the connection's event ring. A
//!   command sent while no other is in flight carries no `id` (QEMU reads its monitor one
//!   byte at a time, so an id costs it ~2 µs per digit): its reply, without one either, is
//!   the next in command order; commands sent while others are pending carry small ids and
//!   are matched by them (see `State::wire_id_for_next`). It never waits for anyone. The socket is registered with the runtime for
//!   readability only: a writable edge (QEMU having read a command) wakes no thread.
//! - **events** go to every subscriber through a bounded ring that grows as events arrive
//!   and shrinks once every subscriber has read them, so an idle connection holds no event
//!   memory. A slow subscriber cannot stall replies (or other subscribers); it misses the
//!   oldest events once `event_capacity` are waiting for it and is told how many
//!   ([`EventRecvError::Lagged`]): memory stays bounded whatever a forgotten subscriber does,
//!   and the right reaction to lost events is always the same: re-read the state with
//!   `query-status`.
//!
//! When the connection ends (EOF, reset, I/O or protocol error) every pending command fails at
//! once, subscribers see [`EventRecvError::Closed`] after the last event, the socket is
//! closed, and [`QmpClient::closed`] resolves with the [`ConnectionEnd`].

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::codec::{
    add_id, classify, encode_command_opt_id, parse_message, Incoming, LineFramer, QmpMessage,
    ReplyBody, DEFAULT_MAX_LINE,
};
use super::types::{MigrationInfo, QmpEvent, QmpGreeting, StatusInfo, VersionInfo};

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// QEMU answered the command with an error.
    #[error("QMP command failed: {class}: {desc}")]
    CommandFailed {
        /// QEMU's error class (e.g. `GenericError`, `CommandNotFound`).
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// The connection closed (EOF or reset) before the reply arrived, or was already closed.
    /// [`QmpClient::connection_end`] tells how it ended.
    #[error("QMP connection closed")]
    Disconnected,
    /// No reply within the timeout. The connection stays usable: a late reply is dropped.
    #[error("QMP command `{command}` got no reply within {after:?}")]
    Timeout {
        /// The command (or `greeting` during the handshake).
        command: String,
        /// The timeout that expired.
        after: Duration,
    },
    /// QEMU sent bytes that are not QMP. The connection has been closed.
    #[error("QMP protocol error: {message} (bytes: {excerpt})")]
    Protocol {
        /// What was wrong.
        message: String,
        /// The start of the offending bytes, escaped.
        excerpt: String,
    },
    /// A reply did not have the shape the typed helper expected.
    #[error("unexpected reply to `{command}`: {message}")]
    UnexpectedReply {
        /// The command.
        command: String,
        /// The deserialisation error.
        message: String,
    },
    /// An I/O error other than the peer closing.
    #[error("QMP I/O error: {0}")]
    Io(#[from] io::Error),
}

/// How a QMP connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionEnd {
    /// The peer closed the socket (QEMU exited or closed the monitor).
    Eof,
    /// The socket was reset (`ECONNRESET`/`EPIPE`): QEMU exited while input it had not read
    /// was queued, as happens after `quit`. As final as [`ConnectionEnd::Eof`].
    Reset,
    /// Another I/O error.
    Io {
        /// The error kind.
        kind: io::ErrorKind,
        /// The error text.
        message: String,
    },
    /// The peer sent bytes that are not QMP; the client closed the connection.
    Protocol {
        /// What was wrong.
        message: String,
        /// The start of the offending bytes, escaped.
        excerpt: String,
    },
}

impl ConnectionEnd {
    /// `true` when the peer went away (EOF or reset), `false` for I/O and protocol errors.
    pub fn is_peer_close(&self) -> bool {
        matches!(self, Self::Eof | Self::Reset)
    }

    fn from_io(err: &io::Error) -> Self {
        if is_peer_gone(err) {
            Self::Reset
        } else {
            Self::Io {
                kind: err.kind(),
                message: err.to_string(),
            }
        }
    }

    /// The error a command gets when the connection ended this way.
    fn command_error(&self) -> QmpError {
        match self {
            Self::Eof | Self::Reset => QmpError::Disconnected,
            Self::Io { kind, message } => QmpError::Io(io::Error::new(*kind, message.clone())),
            Self::Protocol { message, excerpt } => QmpError::Protocol {
                message: message.clone(),
                excerpt: excerpt.clone(),
            },
        }
    }
}

impl std::fmt::Display for ConnectionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Eof => f.write_str("EOF"),
            Self::Reset => f.write_str("connection reset"),
            Self::Io { message, .. } => write!(f, "I/O error: {message}"),
            Self::Protocol { message, excerpt } => {
                write!(f, "protocol error: {message} (bytes: {excerpt})")
            }
        }
    }
}

/// `true` for the errors that mean the peer closed its end (reset, broken pipe). Shared with
/// the guest agent client.
pub(crate) fn is_peer_gone(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

/// Tunables of a [`QmpClient`].
#[derive(Debug, Clone)]
pub struct QmpClientOptions {
    /// Timeout of every command that is not given its own.
    pub command_timeout: Duration,
    /// How long to wait for the greeting after the connection opens.
    pub greeting_timeout: Duration,
    /// Events buffered per subscriber before the oldest are dropped (and reported as lag).
    /// A reboot gives a burst of up to ~10 RESET events and a save ~8 MIGRATION events: the
    /// default leaves a subscriber seconds of slack even under an event storm.
    pub event_capacity: usize,
    /// Longest accepted message line, in bytes.
    pub max_line: usize,
}

impl Default for QmpClientOptions {
    fn default() -> Self {
        Self {
            // Generous: the machine is shared and TCG guests are slow; a command that truly
            // hangs is still caught.
            command_timeout: Duration::from_secs(30),
            greeting_timeout: Duration::from_secs(30),
            // A bound, not an allocation: the ring holds only events some subscriber has
            // not read yet (~180 B each). The busiest sequences are a RESET burst (2-10) and
            // a migration's passes; the supervisor drains it continuously, and a lag is
            // reported, never silent.
            event_capacity: 128,
            max_line: DEFAULT_MAX_LINE,
        }
    }
}

/// Why [`QmpEventStream::recv`] returned no event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EventRecvError {
    /// This subscriber fell behind and the given number of oldest events were dropped for it.
    /// The stream continues with the oldest event still buffered; re-read VM state.
    #[error("event subscriber lagged: {0} events dropped")]
    Lagged(u64),
    /// The connection ended and every event has been delivered.
    #[error("QMP connection closed")]
    Closed,
}

/// The events of one connection, shared by its subscribers.
///
/// A bounded broadcast whose memory follows what it holds: an event stays only while a
/// subscriber that was there when it arrived has not read it, and at most `capacity` are kept
/// (the oldest go first, which the subscribers that had not read them see as a lag).
/// `tokio::sync::broadcast` allocates every slot up front instead (128 slots of a
/// `QmpEvent` are ~23 KiB per connection, most of a paused domain's memory).
struct EventRing {
    /// Unread events, oldest first, each with how many subscribers still have to read it.
    buf: VecDeque<(QmpEvent, usize)>,
    /// Position of `buf[0]` in the connection's event sequence (0 = the first event).
    head: u64,
    capacity: usize,
    /// Subscribers alive.
    receivers: usize,
    /// Subscribers waiting for the next event, by subscriber id.
    waiting: Vec<(u64, Waker)>,
    next_receiver: u64,
    closed: bool,
}

impl EventRing {
    /// Drops the events every subscriber has read, and the buffer itself once empty after a
    /// burst (a `VecDeque` never shrinks on its own).
    fn trim(&mut self) {
        while self.buf.front().is_some_and(|(_, unread)| *unread == 0) {
            self.buf.pop_front();
            self.head += 1;
        }
        if self.buf.is_empty() && self.buf.capacity() > 8 {
            self.buf = VecDeque::new();
        }
    }

    fn end(&self) -> u64 {
        self.head + self.buf.len() as u64
    }

    fn wake_all(&mut self) {
        // Waking only schedules the subscriber's task, so it is done under the lock: no
        // subscriber can poll (and lock) before this returns.
        for (_, waker) in self.waiting.drain(..) {
            waker.wake();
        }
    }
}

struct EventHub {
    ring: Mutex<EventRing>,
}

impl EventHub {
    fn new(capacity: usize) -> Self {
        EventHub {
            ring: Mutex::new(EventRing {
                buf: VecDeque::new(),
                head: 0,
                capacity: capacity.max(1),
                receivers: 0,
                waiting: Vec::new(),
                next_receiver: 0,
                closed: false,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, EventRing> {
        // Every update leaves the ring consistent (one push, pop or counter at a time).
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn subscribe(self: &Arc<Self>) -> QmpEventStream {
        let mut ring = self.lock();
        ring.receivers += 1;
        let id = ring.next_receiver;
        ring.next_receiver += 1;
        QmpEventStream {
            hub: self.clone(),
            id,
            pos: ring.end(),
        }
    }

    fn publish(&self, event: QmpEvent) {
        let mut ring = self.lock();
        if ring.closed || ring.receivers == 0 {
            // Nobody subscribed: nobody can ever read it.
            return;
        }
        if ring.buf.len() >= ring.capacity {
            ring.buf.pop_front();
            ring.head += 1;
        }
        let readers = ring.receivers;
        ring.buf.push_back((event, readers));
        ring.wake_all();
    }

    fn close(&self) {
        let mut ring = self.lock();
        ring.closed = true;
        ring.wake_all();
    }
}

/// A subscription to the events of one QMP connection.
pub struct QmpEventStream {
    hub: Arc<EventHub>,
    id: u64,
    /// Position of the next event this subscriber reads.
    pos: u64,
}

impl std::fmt::Debug for QmpEventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpEventStream")
            .field("pos", &self.pos)
            .finish_non_exhaustive()
    }
}

impl QmpEventStream {
    /// Waits for the next event.
    pub async fn recv(&mut self) -> Result<QmpEvent, EventRecvError> {
        poll_fn(|cx| self.poll_next(Some(cx.waker()))).await
    }

    /// Takes the next event if one is buffered, without waiting.
    pub fn try_recv(&mut self) -> Result<Option<QmpEvent>, EventRecvError> {
        match self.poll_next(None) {
            Poll::Ready(Ok(ev)) => Ok(Some(ev)),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Ok(None),
        }
    }

    /// The next event, a lag, the end, or (registering `waker` if given) nothing yet. Changes
    /// nothing unless it returns `Ready`, so `recv` is cancel-safe.
    fn poll_next(&mut self, waker: Option<&Waker>) -> Poll<Result<QmpEvent, EventRecvError>> {
        let mut ring = self.hub.lock();
        if self.pos < ring.head {
            let lost = ring.head - self.pos;
            self.pos = ring.head;
            return Poll::Ready(Err(EventRecvError::Lagged(lost)));
        }
        let index = (self.pos - ring.head) as usize;
        if index < ring.buf.len() {
            self.pos += 1;
            let event = if index == 0 && ring.buf[0].1 <= 1 {
                // The last reader of the oldest event takes it instead of a copy.
                let (event, _) = ring.buf.pop_front().expect("index 0 exists");
                ring.head += 1;
                event
            } else {
                let slot = &mut ring.buf[index];
                slot.1 = slot.1.saturating_sub(1);
                slot.0.clone()
            };
            ring.trim();
            return Poll::Ready(Ok(event));
        }
        if ring.closed {
            return Poll::Ready(Err(EventRecvError::Closed));
        }
        if let Some(waker) = waker {
            let id = self.id;
            match ring.waiting.iter_mut().find(|(w, _)| *w == id) {
                Some((_, w)) => w.clone_from(waker),
                None => ring.waiting.push((id, waker.clone())),
            }
        }
        Poll::Pending
    }
}

impl Drop for QmpEventStream {
    fn drop(&mut self) {
        let mut ring = self.hub.lock();
        ring.receivers -= 1;
        let id = self.id;
        ring.waiting.retain(|(w, _)| *w != id);
        let from = self.pos.saturating_sub(ring.head) as usize;
        for slot in ring.buf.iter_mut().skip(from) {
            slot.1 = slot.1.saturating_sub(1);
        }
        ring.trim();
    }
}

/// A command sent (or queued) whose reply has not been taken yet.
struct Waiter {
    /// The call's own key, increasing in send order: how its caller finds it.
    key: u64,
    /// The `id` the command carries on the wire; `None`: sent without one (see
    /// [`State::wire_id_for_next`]).
    wire: Option<u64>,
    waker: Option<Waker>,
    reply: Option<Result<ReplyBody, QmpError>>,
    /// The caller gave up (timeout, dropped future) before the reply came. The entry stays
    /// until QEMU answers, so that the late reply is recognised as this command's and
    /// dropped, and its wire id (or the id-less slot) is not given to another command
    /// meanwhile.
    abandoned: bool,
}

/// A command (and maybe a descriptor) not yet fully written.
struct Outgoing {
    /// The key of its [`Waiter`].
    key: u64,
    bytes: Vec<u8>,
    /// Bytes of `bytes` already on the wire.
    sent: usize,
    /// Rides on the command's first byte as `SCM_RIGHTS`; `None` once sent.
    fd: Option<OwnedFd>,
}

type Socket = Arc<AsyncFd<StdUnixStream>>;

/// State shared by the client handles, the reader and the flusher.
struct Shared {
    state: Mutex<State>,
    events: Arc<EventHub>,
    end_tx: watch::Sender<Option<ConnectionEnd>>,
}

struct State {
    /// Commands waiting for their reply, in send order (by increasing key; replies come in
    /// command order, so the one looked for is nearly always first).
    pending: VecDeque<Waiter>,
    /// The key of the next command.
    next_key: u64,
    /// The socket while the connection is open; taken when it ends, which closes it once the
    /// reader is gone.
    sock: Option<Socket>,
    /// Commands not yet fully written, whole and in call order (only when a write would
    /// have blocked).
    backlog: VecDeque<Outgoing>,
    /// The task writing `backlog`, while there is one.
    flusher: Option<AbortHandle>,
    end: Option<ConnectionEnd>,
}

impl State {
    fn index_of(&self, key: u64) -> Option<usize> {
        let at = self.pending.partition_point(|w| w.key < key);
        self.pending.get(at).filter(|w| w.key == key).map(|_| at)
    }

    fn remove_waiter(&mut self, key: u64) {
        if let Some(at) = self.index_of(key) {
            self.pending.remove(at);
        }
    }

    /// The wire id of a command about to be sent: none when no other command is in flight,
    /// otherwise the smallest id no command in flight has.
    ///
    /// QEMU answers a monitor's commands one at a time, in the order they came (domkit never
    /// enables out-of-band execution), so a reply without an id is the lone id-less command's:
    /// at most one is ever in flight, as it is only sent when nothing else is pending (an
    /// abandoned command still waiting for its late reply counts). Commands sent while others
    /// are in flight carry ids and are matched by them, whatever order a peer answers in.
    /// Ids are kept small because QEMU reads its monitor one byte at a time (see
    /// [`encode_command_opt_id`]): the sequential caller's command is the bare command,
    /// byte for byte what a hand-written client sends.
    fn wire_id_for_next(&self) -> Option<u64> {
        if self.pending.is_empty() {
            return None;
        }
        let mut small = 0u64;
        for id in self.pending.iter().filter_map(|w| w.wire) {
            if id < 64 {
                small |= 1 << id;
            }
        }
        if small != u64::MAX {
            return Some(u64::from(small.trailing_ones()));
        }
        // 64 ids in flight: one past the largest is free.
        let largest = self.pending.iter().filter_map(|w| w.wire).max();
        Some(largest.map_or(0, |id| id + 1))
    }

    /// Gives the command sent with wire id `wire` its result and wakes its caller; a late
    /// reply to an abandoned command removes it.
    fn complete(&mut self, wire: Option<u64>, result: Result<ReplyBody, QmpError>) {
        let Some(at) = self.pending.iter().position(|w| w.wire == wire) else {
            tracing::debug!(?wire, "QMP reply for a command nobody waits for");
            return;
        };
        self.resolve(at, result);
    }

    /// [`complete`](Self::complete) for the command with `key` (a write that failed).
    fn fail(&mut self, key: u64, error: QmpError) {
        if let Some(at) = self.index_of(key) {
            self.resolve(at, Err(error));
        }
    }

    fn resolve(&mut self, at: usize, result: Result<ReplyBody, QmpError>) {
        let w = &mut self.pending[at];
        if w.abandoned {
            tracing::debug!(wire = ?w.wire, "QMP reply for a command its caller gave up on");
            self.pending.remove(at);
        } else if w.reply.is_none() {
            w.reply = Some(result);
            if let Some(waker) = w.waker.take() {
                // Only schedules the caller's task; it locks after this returns.
                waker.wake();
            }
        } else {
            tracing::debug!(wire = ?w.wire, "second QMP reply for one command dropped");
        }
    }

    /// Writes `msg` now if nothing is queued before it and the socket takes it; otherwise
    /// queues what is left of it, whole, for the flusher. Under the lock and without an
    /// await: a caller dropped at any point leaves either nothing or the whole command.
    fn send_or_queue(&mut self, shared: &Arc<Shared>, mut msg: Outgoing) -> Result<(), QmpError> {
        let Some(sock) = &self.sock else {
            return Err(QmpError::Disconnected);
        };
        if self.backlog.is_empty() {
            match write_some(sock.get_ref(), &mut msg) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    // Fail this command only; the reader decides when the connection is over
                    // (it still has to deliver whatever QEMU wrote before going away).
                    tracing::debug!(key = msg.key, error = %e, "QMP write failed");
                    return Err(write_error(e));
                }
            }
        }
        tracing::debug!(key = msg.key, "QMP socket full: command queued");
        self.backlog.push_back(msg);
        if self.flusher.is_none() {
            let task = tokio::spawn(flush_backlog(shared.clone()));
            self.flusher = Some(task.abort_handle());
        }
        Ok(())
    }
}

fn write_error(e: io::Error) -> QmpError {
    if is_peer_gone(&e) {
        QmpError::Disconnected
    } else {
        QmpError::Io(e)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves the state consistent (every operation on it
        // is a single insert/remove/assignment), so a poisoned lock is safe to keep using.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ends the connection once: fails every pending command, closes event subscriptions,
    /// releases the socket and publishes how it ended.
    fn finish(&self, end: ConnectionEnd) {
        let sock = {
            let mut st = self.lock();
            if st.end.is_some() {
                return;
            }
            tracing::debug!(%end, pending = st.pending.len(), "QMP connection ended");
            st.end = Some(end.clone());
            // No reply will come now: abandoned commands are gone, the others fail.
            st.pending.retain(|w| !w.abandoned);
            for w in st.pending.iter_mut() {
                if w.reply.is_none() {
                    w.reply = Some(Err(end.command_error()));
                }
                if let Some(waker) = w.waker.take() {
                    waker.wake();
                }
            }
            st.backlog.clear();
            if let Some(flusher) = st.flusher.take() {
                flusher.abort();
            }
            st.sock.take()
        };
        self.events.close();
        self.end_tx.send_replace(Some(end));
        drop(sock);
    }

    /// The reply to `id` once it is there (or the connection's end). Cancel-safe: the entry
    /// stays until the caller's guard removes it.
    fn poll_reply(&self, key: u64, waker: &Waker) -> Poll<Result<ReplyBody, QmpError>> {
        let mut st = self.lock();
        let Some(at) = st.index_of(key) else {
            let end = st.end.as_ref().map(ConnectionEnd::command_error);
            return Poll::Ready(Err(end.unwrap_or(QmpError::Disconnected)));
        };
        let w = &mut st.pending[at];
        if let Some(reply) = w.reply.take() {
            st.pending.remove(at);
            return Poll::Ready(reply);
        }
        match &mut w.waker {
            Some(w) => w.clone_from(waker),
            None => w.waker = Some(waker.clone()),
        }
        Poll::Pending
    }

    /// Handles one line from QEMU. An error means the stream is not QMP.
    fn dispatch(&self, line: Vec<u8>) -> Result<(), ConnectionEnd> {
        let msg = classify(line).map_err(|e| ConnectionEnd::Protocol {
            message: e.message,
            excerpt: e.excerpt,
        })?;
        match msg {
            Incoming::Reply { id, result } => {
                let result = result.map_err(|e| QmpError::CommandFailed {
                    class: e.class,
                    desc: e.desc,
                });
                // No id (or a peer echoing a missing one as null): the reply to the one
                // command sent without an id.
                match id {
                    None | Some(Value::Null) => self.lock().complete(None, result),
                    Some(id) => match id.as_u64() {
                        Some(id) => self.lock().complete(Some(id), result),
                        None => {
                            tracing::warn!(%id, ?result, "QMP reply with a foreign id dropped")
                        }
                    },
                }
            }
            Incoming::Event(wire) => {
                let event = QmpEvent::from_wire(
                    wire.name,
                    wire.data,
                    wire.timestamp,
                    Instant::now(),
                    SystemTime::now(),
                );
                tracing::trace!(name = %event.name, "QMP event");
                self.events.publish(event);
            }
            Incoming::Greeting(_) => tracing::warn!("second QMP greeting ignored"),
            Incoming::Unrecognized(v) => tracing::warn!(%v, "unrecognized QMP message ignored"),
        }
        Ok(())
    }
}

struct Inner {
    shared: Arc<Shared>,
    greeting: QmpGreeting,
    options: QmpClientOptions,
    end_rx: watch::Receiver<Option<ConnectionEnd>>,
    early_events: Mutex<Option<QmpEventStream>>,
    reader: AbortHandle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: stop the reader and any flusher and let go of the socket,
        // which closes it; subscribers still holding a stream see it end.
        self.reader.abort();
        let sock = {
            let mut st = self.shared.lock();
            if let Some(flusher) = st.flusher.take() {
                flusher.abort();
            }
            st.backlog.clear();
            st.sock.take()
        };
        drop(sock);
        self.shared.events.close();
    }
}

/// An asynchronous QMP client for one QEMU monitor connection.
///
/// Cheap to clone; every clone talks over the same connection, and any number of tasks can
/// have commands in flight at once (each gets its own reply, matched by `id`). The connection
/// closes when the last clone is dropped.
#[derive(Clone)]
pub struct QmpClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("qemu", &self.inner.greeting.version.qemu)
            .field("end", &self.connection_end())
            .finish_non_exhaustive()
    }
}

impl QmpClient {
    /// Connects to a QMP socket QEMU listens on (`-qmp unix:PATH,server=on`) and negotiates.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path).await?;
        Self::handshake(stream).await
    }

    /// Negotiates QMP over an already connected stream with default options: reads the
    /// greeting and sends `qmp_capabilities`.
    ///
    /// This is the constructor for the usual domkit setup, where domkit listens and QEMU
    /// connects (`-chardev socket,path=...,server=off -mon chardev=...,mode=control`).
    pub async fn handshake(stream: UnixStream) -> Result<Self, QmpError> {
        Self::handshake_with(stream, QmpClientOptions::default()).await
    }

    /// [`QmpClient::handshake`] with explicit options.
    pub async fn handshake_with(
        stream: UnixStream,
        options: QmpClientOptions,
    ) -> Result<Self, QmpError> {
        // Registered for readability only: with tokio's stream (read and write interest,
        // edge-triggered) every command woke a worker a second time, for nothing, when QEMU
        // read it and the socket became writable again.
        let sock: Socket = Arc::new(register(stream.into_std()?, Interest::READABLE)?);
        let mut framer = LineFramer::new(options.max_line);
        let greeting =
            tokio::time::timeout(options.greeting_timeout, read_greeting(&sock, &mut framer))
                .await
                .map_err(|_| QmpError::Timeout {
                    command: "greeting".into(),
                    after: options.greeting_timeout,
                })??;
        tracing::debug!(qemu = ?greeting.version.qemu, "QMP greeting");

        let events = Arc::new(EventHub::new(options.event_capacity));
        let early = events.subscribe();
        let (end_tx, end_rx) = watch::channel(None);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: VecDeque::new(),
                next_key: 0,
                sock: Some(sock.clone()),
                backlog: VecDeque::new(),
                flusher: None,
                end: None,
            }),
            events,
            end_tx,
        });
        let reader = tokio::spawn(reader_loop(sock, framer, shared.clone()));
        let client = Self {
            inner: Arc::new(Inner {
                shared,
                greeting,
                options,
                end_rx,
                early_events: Mutex::new(Some(early)),
                reader: reader.abort_handle(),
            }),
        };
        client.execute("qmp_capabilities", None).await?;
        Ok(client)
    }

    /// The greeting QEMU sent (its version and capabilities).
    pub fn greeting(&self) -> &QmpGreeting {
        &self.inner.greeting
    }

    /// The default command timeout of this client.
    pub fn default_timeout(&self) -> Duration {
        self.inner.options.command_timeout
    }

    /// Subscribes to events received from now on.
    pub fn subscribe(&self) -> QmpEventStream {
        // Once the connection has ended the ring is closed: the stream reports Closed at once.
        self.inner.shared.events.subscribe()
    }

    /// The one subscription that has existed since the handshake, so its holder misses no
    /// event at all (a [`subscribe`](Self::subscribe) call races with events arriving right
    /// after the handshake). Returns `None` after the first call.
    ///
    /// Until taken it holds up to `event_capacity` events (older ones are dropped, which the
    /// taker sees as [`EventRecvError::Lagged`]).
    pub fn events_since_handshake(&self) -> Option<QmpEventStream> {
        self.inner
            .early_events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// How the connection ended, or `None` while it is open.
    pub fn connection_end(&self) -> Option<ConnectionEnd> {
        self.inner.end_rx.borrow().clone()
    }

    /// Resolves when the connection ends (QEMU exited, the socket failed, or QEMU sent
    /// garbage), with how it ended. Resolves at once if it already has. The reader notices
    /// EOF as soon as the kernel reports it, so this is the way to detect QEMU's death.
    pub async fn closed(&self) -> ConnectionEnd {
        let mut rx = self.inner.end_rx.clone();
        let end = match rx.wait_for(Option::is_some).await {
            Ok(end) => end.clone(),
            // The sender lives in `Shared`, which `self` keeps alive; unreachable in practice.
            Err(_) => None,
        };
        end.unwrap_or(ConnectionEnd::Eof)
    }

    /// Runs a command with the default timeout and returns its raw `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.execute_with_timeout(command, arguments, self.default_timeout())
            .await
    }

    /// Runs a command with an explicit timeout.
    pub async fn execute_with_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        self.execute_typed_with_timeout(command, arguments, timeout)
            .await
    }

    /// Runs a command and deserialises its `return` value (unknown fields are ignored unless
    /// `T` keeps them).
    pub async fn execute_typed<T: DeserializeOwned>(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<T, QmpError> {
        self.execute_typed_with_timeout(command, arguments, self.default_timeout())
            .await
    }

    /// [`execute_typed`](Self::execute_typed) with an explicit timeout.
    pub async fn execute_typed_with_timeout<T: DeserializeOwned>(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<T, QmpError> {
        let body = self
            .call(command, arguments.as_ref(), None, timeout)
            .await?;
        // The reply's bytes straight into `T`: parsed once.
        body.decode().map_err(|e| QmpError::UnexpectedReply {
            command: command.to_owned(),
            message: e.to_string(),
        })
    }

    /// `query-status`.
    pub async fn query_status(&self) -> Result<StatusInfo, QmpError> {
        self.execute_typed("query-status", None).await
    }

    /// `query-version`.
    pub async fn query_version(&self) -> Result<VersionInfo, QmpError> {
        self.execute_typed("query-version", None).await
    }

    /// `stop`: pause the vCPUs (a STOP event follows unless already paused).
    pub async fn stop(&self) -> Result<(), QmpError> {
        self.run_unit("stop", None).await
    }

    /// `cont`: run the vCPUs (RESUME; QEMU sends the event before the reply).
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.run_unit("cont", None).await
    }

    /// `system_reset`.
    pub async fn system_reset(&self) -> Result<(), QmpError> {
        self.run_unit("system_reset", None).await
    }

    /// `system_powerdown`: press the ACPI power button (the guest decides what to do).
    pub async fn system_powerdown(&self) -> Result<(), QmpError> {
        self.run_unit("system_powerdown", None).await
    }

    /// `system_wakeup`: wake a guest from S3.
    pub async fn system_wakeup(&self) -> Result<(), QmpError> {
        self.run_unit("system_wakeup", None).await
    }

    /// `quit`: make QEMU exit.
    ///
    /// Succeeds when the reply arrives **or** the connection closes or resets first: QEMU
    /// 7.2 often exits before its reply is read, so EOF after `quit` is the expected outcome.
    /// Await [`closed`](Self::closed) to know the socket is gone.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.run_unit("quit", None).await {
            Ok(()) | Err(QmpError::Disconnected) => Ok(()),
            Err(QmpError::Io(e)) if is_peer_gone(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Passes a file descriptor to QEMU under `fdname`: sends `getfd` with `fd` attached as
    /// `SCM_RIGHTS` ancillary data. QEMU keeps its own copy; the caller keeps `fd`.
    ///
    /// Use the name in commands that take one, e.g. `migrate` with uri `fd:NAME` to save a VM
    /// to a file. Release it with [`closefd`](Self::closefd) if QEMU did not consume it.
    pub async fn send_fd(&self, fdname: &str, fd: impl AsFd) -> Result<(), QmpError> {
        // If the socket is full the command waits in the backlog: it needs a descriptor that
        // outlives the borrow.
        let fd = fd.as_fd().try_clone_to_owned()?;
        let args = json!({ "fdname": fdname });
        self.call("getfd", Some(&args), Some(fd), self.default_timeout())
            .await
            .map(drop)
    }

    /// `closefd`: drop a descriptor passed with [`send_fd`](Self::send_fd).
    pub async fn closefd(&self, fdname: &str) -> Result<(), QmpError> {
        self.run_unit("closefd", Some(json!({ "fdname": fdname })))
            .await
    }

    /// `migrate-set-capabilities` with the given `(capability, state)` pairs; e.g.
    /// `[("events", true)]` for MIGRATION/MIGRATION_PASS events.
    pub async fn migrate_set_capabilities(&self, caps: &[(&str, bool)]) -> Result<(), QmpError> {
        let caps: Vec<Value> = caps
            .iter()
            .map(|(name, state)| json!({ "capability": name, "state": state }))
            .collect();
        self.run_unit(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": caps })),
        )
        .await
    }

    /// `migrate` to `uri` (e.g. `fd:NAME`, `exec:cat > FILE`). Returns when the migration
    /// has started; follow it with MIGRATION events or [`query_migrate`](Self::query_migrate).
    pub async fn migrate(&self, uri: &str) -> Result<(), QmpError> {
        self.run_unit("migrate", Some(json!({ "uri": uri }))).await
    }

    /// `query-migrate`.
    pub async fn query_migrate(&self) -> Result<MigrationInfo, QmpError> {
        self.execute_typed("query-migrate", None).await
    }

    /// A command whose `return` value is not looked at: its bytes are not even parsed.
    async fn run_unit(&self, command: &str, arguments: Option<Value>) -> Result<(), QmpError> {
        self.call(command, arguments.as_ref(), None, self.default_timeout())
            .await
            .map(drop)
    }

    async fn call(
        &self,
        command: &str,
        arguments: Option<&Value>,
        fd: Option<OwnedFd>,
        timeout: Duration,
    ) -> Result<ReplyBody, QmpError> {
        let shared = &self.inner.shared;
        // Serialised before the lock; the id, if any, is added under it.
        let mut bytes = encode_command_opt_id(None, command, arguments);
        let key = {
            let mut st = shared.lock();
            if let Some(end) = &st.end {
                return Err(end.command_error());
            }
            let wire = st.wire_id_for_next();
            if let Some(id) = wire {
                add_id(&mut bytes, id);
            }
            let key = st.next_key;
            st.next_key += 1;
            st.pending.push_back(Waiter {
                key,
                wire,
                waker: None,
                reply: None,
                abandoned: false,
            });
            let msg = Outgoing {
                key,
                bytes,
                sent: 0,
                fd,
            };
            if let Err(e) = st.send_or_queue(shared, msg) {
                st.remove_waiter(key);
                return Err(e);
            }
            key
        };
        // However this future ends (reply, timeout, dropped), the guard settles the entry.
        let _pending = PendingGuard { shared, key };
        let reply = poll_fn(|cx| shared.poll_reply(key, cx.waker()));
        match tokio::time::timeout(timeout, reply).await {
            Ok(result) => result,
            Err(_) => Err(QmpError::Timeout {
                command: command.to_owned(),
                after: timeout,
            }),
        }
    }
}

struct PendingGuard<'a> {
    shared: &'a Shared,
    key: u64,
}

impl Drop for PendingGuard<'_> {
    /// After the reply was taken the entry is gone already. Before it, the entry is marked
    /// abandoned and stays until QEMU's late reply (or the connection's end) removes it.
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        let ended = st.end.is_some();
        if let Some(at) = st.index_of(self.key) {
            let w = &mut st.pending[at];
            if ended || w.reply.is_some() {
                st.pending.remove(at);
            } else {
                w.abandoned = true;
                w.waker = None;
            }
        }
    }
}

/// Registers `stream` (non-blocking) with the runtime for `interest` only.
fn register(stream: StdUnixStream, interest: Interest) -> io::Result<AsyncFd<StdUnixStream>> {
    // SAFETY: the `AsyncFd` owns `stream`, whose descriptor stays open and the same for the
    // stream's whole life: it is only closed when the stream (inside the `AsyncFd`) is dropped.
    unsafe { AsyncFd::register_with_interest(stream, interest) }.map_err(io::Error::from)
}

/// Writes as much of `msg` as the socket takes now: `Ok(true)` once all of it is written,
/// `Ok(false)` when the socket is full (the rest stays in `msg`).
fn write_some(sock: &StdUnixStream, msg: &mut Outgoing) -> io::Result<bool> {
    use nix::sys::socket::{send, MsgFlags};
    // MSG_NOSIGNAL: a peer that went away is an EPIPE error, not a process-killing SIGPIPE.
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    let raw = sock.as_raw_fd();
    while msg.sent < msg.bytes.len() {
        let written = match &msg.fd {
            // The descriptor rides on the first bytes; the rest, if any, follows as plain data.
            Some(fd) => send_with_fd(raw, &msg.bytes, fd.as_raw_fd()),
            None => send(raw, &msg.bytes[msg.sent..], flags).map_err(io::Error::from),
        };
        match written {
            Ok(n) => {
                msg.sent += n;
                msg.fd = None;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Writes the backlog whenever the socket is writable again, until it is empty (then the
/// task ends: a flusher only exists while QEMU is not reading fast enough). It waits on a
/// second registration of the socket, for writability only, so the reader's stays
/// readable-only.
async fn flush_backlog(shared: Arc<Shared>) {
    let fail_all = |e: &io::Error| {
        let mut st = shared.lock();
        let failed: Vec<u64> = st.backlog.drain(..).map(|m| m.key).collect();
        for key in failed {
            st.fail(key, write_error(io::Error::new(e.kind(), e.to_string())));
        }
        st.flusher = None;
    };
    let Some(sock) = shared.lock().sock.clone() else {
        return;
    };
    let writable = match sock
        .get_ref()
        .try_clone()
        .and_then(|dup| register(dup, Interest::WRITABLE))
    {
        Ok(w) => w,
        Err(e) => return fail_all(&e),
    };
    drop(sock);
    loop {
        let mut ready = match writable.writable().await {
            Ok(r) => r,
            Err(e) => return fail_all(&e),
        };
        let mut st = shared.lock();
        if st.end.is_some() {
            st.backlog.clear();
            st.flusher = None;
            return;
        }
        loop {
            let Some(front) = st.backlog.front_mut() else {
                st.flusher = None;
                return;
            };
            match write_some(writable.get_ref(), front) {
                Ok(true) => {
                    st.backlog.pop_front();
                }
                Ok(false) => {
                    ready.clear_ready();
                    break;
                }
                Err(e) => {
                    // Fail this command only, as a direct write would have.
                    tracing::debug!(error = %e, "QMP write failed");
                    if let Some(msg) = st.backlog.pop_front() {
                        st.fail(msg.key, write_error(e));
                    }
                }
            }
        }
    }
}

thread_local! {
    /// Every reader on a thread reads into this buffer and keeps only the bytes of a partial
    /// line (in its framer): a connection holds no read buffer of its own while idle.
    static READ_BUF: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; 16 * 1024].into_boxed_slice());
}

/// Reads what the socket has into `framer`; `Ok(0)` at EOF.
async fn read_into(sock: &AsyncFd<StdUnixStream>, framer: &mut LineFramer) -> io::Result<usize> {
    loop {
        let mut ready = sock.readable().await?;
        let read = READ_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            let mut stream: &StdUnixStream = ready.get_inner();
            let n = stream.read(&mut buf[..])?;
            framer.push(&buf[..n]);
            Ok::<_, io::Error>((n, n < buf.len()))
        });
        match read {
            Ok((0, _)) => return Ok(0),
            Ok((n, drained)) => {
                // A short read emptied the socket: wait for the next edge without a read that
                // would only say EAGAIN (tokio's own streams do the same).
                if drained {
                    ready.clear_ready();
                }
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready.clear_ready(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

async fn read_greeting(sock: &Socket, framer: &mut LineFramer) -> Result<QmpGreeting, QmpError> {
    loop {
        let line = framer.next_line().map_err(|e| QmpError::Protocol {
            message: e.to_string(),
            excerpt: super::codec::excerpt(framer.buffered()),
        })?;
        if let Some(line) = line {
            let protocol = |message: String| QmpError::Protocol {
                message,
                excerpt: super::codec::excerpt(&line),
            };
            return match parse_message(&line) {
                Ok(QmpMessage::Greeting(g)) => Ok(g),
                Ok(_) => Err(protocol("expected the QMP greeting".into())),
                Err(e) => Err(protocol(e.message)),
            };
        }
        let n = read_into(sock, framer).await.map_err(write_error)?;
        if n == 0 {
            return Err(QmpError::Disconnected);
        }
    }
}

async fn reader_loop(sock: Socket, mut framer: LineFramer, shared: Arc<Shared>) {
    let end = 'conn: loop {
        // Lines first: the framer may already hold some from the handshake.
        loop {
            match framer.next_line() {
                Ok(Some(line)) => {
                    if let Err(end) = shared.dispatch(line) {
                        break 'conn end;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    break 'conn ConnectionEnd::Protocol {
                        message: e.to_string(),
                        excerpt: super::codec::excerpt(framer.buffered()),
                    }
                }
            }
        }
        framer.release_if_empty();
        match read_into(&sock, &mut framer).await {
            Ok(0) => {
                if !framer.buffered().is_empty() {
                    tracing::warn!(
                        bytes = %super::codec::excerpt(framer.buffered()),
                        "QMP connection closed mid-message"
                    );
                }
                break ConnectionEnd::Eof;
            }
            Ok(_) => {}
            Err(e) => break ConnectionEnd::from_io(&e),
        }
    };
    shared.finish(end);
    // Returning drops the reader's handle on the socket; `finish` dropped the callers' one:
    // the socket closes.
}

/// One `sendmsg` of `bytes` with `fd` as `SCM_RIGHTS`. Non-blocking: `WouldBlock` leaves the
/// command (descriptor included) for the flusher.
fn send_with_fd(sock: RawFd, bytes: &[u8], fd: RawFd) -> io::Result<usize> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    let iov = [io::IoSlice::new(bytes)];
    let fds = [fd];
    let cmsgs = [ControlMessage::ScmRights(&fds)];
    // MSG_NOSIGNAL: a peer that went away is an EPIPE error, not a process-killing SIGPIPE.
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    sendmsg::<UnixAddr>(sock, &iov, &cmsgs, flags, None).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    //! Routing logic against a [`ScriptedPeer`]: a test double that plays QEMU's side of
    //! the socket from a script. It checks the client's framing and id routing only; real
    //! QEMU behaviour is tested in tests/qmp_client.rs.

    use super::*;
    use std::collections::HashMap;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

    const GREETING: &[u8] = include_bytes!("../../tests/fixtures/transcripts/qmp-greeting.raw");
    const LONG: Duration = Duration::from_secs(30);

    /// Test double for QEMU's end of the socket, driven step by step by the test.
    struct ScriptedPeer {
        reader: BufReader<tokio::net::unix::OwnedReadHalf>,
        writer: tokio::net::unix::OwnedWriteHalf,
    }

    impl ScriptedPeer {
        /// A connected (peer, client-side stream) pair; the greeting is already written.
        async fn new() -> (Self, UnixStream) {
            let (ours, theirs) = UnixStream::pair().expect("socketpair");
            let (r, w) = ours.into_split();
            let mut peer = Self {
                reader: BufReader::new(r),
                writer: w,
            };
            peer.send(GREETING).await;
            (peer, theirs)
        }

        async fn send(&mut self, bytes: &[u8]) {
            self.writer.write_all(bytes).await.expect("peer write");
        }

        /// Reads one command and returns (id, execute). The id is `null` for a command sent
        /// without one, which a reply may echo as `"id": null` (the client takes that as no
        /// id, as it takes QEMU's reply without an id).
        async fn read_command(&mut self) -> (Value, String) {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).await.expect("peer read");
            assert!(n > 0, "client closed");
            let v: Value = serde_json::from_str(&line).expect("client sends JSON");
            let id = v["id"].clone();
            assert!(id.is_null() || id.is_u64(), "numeric id or none: {line}");
            (id, v["execute"].as_str().expect("execute").to_owned())
        }

        /// Answers the handshake's qmp_capabilities.
        async fn accept_capabilities(&mut self) {
            let (id, cmd) = self.read_command().await;
            assert_eq!(cmd, "qmp_capabilities");
            self.send(format!("{{\"return\": {{}}, \"id\": {id}}}\r\n").as_bytes())
                .await;
        }
    }

    async fn connected() -> (QmpClient, ScriptedPeer) {
        let (mut peer, stream) = ScriptedPeer::new().await;
        let (client, ()) = tokio::join!(
            async { QmpClient::handshake(stream).await.expect("handshake") },
            peer.accept_capabilities()
        );
        (client, peer)
    }

    #[tokio::test]
    async fn replies_are_routed_by_id_with_events_interleaved() {
        let (client, mut peer) = connected().await;
        let mut events = client.subscribe();
        let a = tokio::spawn({
            let c = client.clone();
            async move { c.execute("cmd-a", None).await }
        });
        let b = tokio::spawn({
            let c = client.clone();
            async move { c.execute("cmd-b", None).await }
        });
        let mut ids = HashMap::new();
        for _ in 0..2 {
            let (id, cmd) = peer.read_command().await;
            ids.insert(cmd, id);
        }
        // Answer in reverse order, with events before, between and in the same write.
        let script = format!(
            concat!(
                "{{\"timestamp\": {{\"seconds\": 1, \"microseconds\": 2}}, \"event\": \"STOP\"}}\r\n",
                "{{\"return\": \"for-b\", \"id\": {b}}}\r\n",
                "{{\"timestamp\": {{\"seconds\": 1, \"microseconds\": 3}}, \"event\": \"NEW_THING\", \"data\": {{\"x\": 1}}}}\r\n",
                "{{\"id\": {a}, \"error\": {{\"class\": \"GenericError\", \"desc\": \"for-a\"}}}}\r\n",
            ),
            a = ids["cmd-a"],
            b = ids["cmd-b"]
        );
        // Split mid-line to exercise framing across reads.
        let (first, second) = script.as_bytes().split_at(50);
        peer.send(first).await;
        peer.send(second).await;

        assert_eq!(b.await.expect("join").expect("ok"), json!("for-b"));
        match a.await.expect("join") {
            Err(QmpError::CommandFailed { class, desc }) => {
                assert_eq!((class.as_str(), desc.as_str()), ("GenericError", "for-a"));
            }
            other => panic!("{other:?}"),
        }
        let e1 = events.recv().await.expect("STOP");
        assert_eq!(e1.name, "STOP");
        let e2 = events.recv().await.expect("unknown event");
        assert_eq!(e2.name, "NEW_THING");
        assert_eq!(e2.data, json!({"x": 1}));
        assert!(e1.received_at <= e2.received_at);
    }

    #[tokio::test]
    async fn slow_subscriber_lags_but_never_blocks_replies() {
        let (mut peer, stream) = ScriptedPeer::new().await;
        let options = QmpClientOptions {
            event_capacity: 4,
            ..QmpClientOptions::default()
        };
        let (client, ()) = tokio::join!(
            async {
                QmpClient::handshake_with(stream, options)
                    .await
                    .expect("hs")
            },
            peer.accept_capabilities()
        );
        let mut idle = client.subscribe(); // never read until the end
        let call = tokio::spawn({
            let c = client.clone();
            async move { c.execute("query-status", None).await }
        });
        let (id, _) = peer.read_command().await;
        let mut script = String::new();
        for i in 0..100 {
            script.push_str(&format!(
                "{{\"timestamp\": {{\"seconds\": {i}, \"microseconds\": 0}}, \"event\": \"RESET\", \"data\": {{\"guest\": true, \"reason\": \"guest-reset\"}}}}\r\n"
            ));
        }
        script.push_str(&format!("{{\"return\": {{}}, \"id\": {id}}}\r\n"));
        peer.send(script.as_bytes()).await;
        assert_eq!(call.await.expect("join").expect("reply"), json!({}));
        assert_eq!(idle.recv().await.unwrap_err(), EventRecvError::Lagged(96));
        let next = idle.recv().await.expect("oldest kept");
        assert_eq!(next.timestamp.seconds, 96);
    }

    #[tokio::test]
    async fn garbage_fails_pending_calls_with_protocol_error() {
        let (client, mut peer) = connected().await;
        let mut events = client.subscribe();
        let call = tokio::spawn({
            let c = client.clone();
            async move { c.execute_with_timeout("query-status", None, LONG).await }
        });
        let _ = peer.read_command().await;
        peer.send(b"{\"return\": {}, \"id\": \x00garbage\r\n").await;
        match call.await.expect("join") {
            Err(QmpError::Protocol { message, excerpt }) => {
                assert!(message.contains("invalid JSON"), "{message}");
                assert!(excerpt.contains("garbage"), "{excerpt}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            client.closed().await,
            ConnectionEnd::Protocol { .. }
        ));
        assert_eq!(events.recv().await.unwrap_err(), EventRecvError::Closed);
        // Later calls fail the same way instead of hanging.
        assert!(matches!(
            client.execute("query-status", None).await,
            Err(QmpError::Protocol { .. })
        ));
        // And the client closed its end.
        let mut rest = Vec::new();
        peer.reader.read_to_end(&mut rest).await.expect("EOF");
    }

    #[tokio::test]
    async fn eof_fails_pending_with_disconnected_and_quit_is_ok() {
        let (client, mut peer) = connected().await;
        let pending = tokio::spawn({
            let c = client.clone();
            async move { c.execute("query-status", None).await }
        });
        let quit = tokio::spawn({
            let c = client.clone();
            async move { c.quit().await }
        });
        let _ = peer.read_command().await;
        let _ = peer.read_command().await;
        drop(peer);
        assert!(matches!(
            pending.await.expect("join"),
            Err(QmpError::Disconnected)
        ));
        quit.await
            .expect("join")
            .expect("quit after EOF is success");
        assert_eq!(client.closed().await, ConnectionEnd::Eof);
        assert!(matches!(
            client.subscribe().recv().await,
            Err(EventRecvError::Closed)
        ));
    }

    #[tokio::test]
    async fn timeout_leaves_connection_usable_and_late_reply_is_dropped() {
        let (client, mut peer) = connected().await;
        let err = tokio::join!(
            client.execute_with_timeout("slow", None, Duration::from_millis(50)),
            peer.read_command()
        );
        let (slow_id, _) = err.1;
        assert!(matches!(err.0, Err(QmpError::Timeout { ref command, .. }) if command == "slow"));
        let next = tokio::spawn({
            let c = client.clone();
            async move { c.execute("fast", None).await }
        });
        let (fast_id, _) = peer.read_command().await;
        peer.send(
            format!(
                "{{\"return\": \"late\", \"id\": {slow_id}}}\r\n{{\"return\": \"fast\", \"id\": {fast_id}}}\r\n"
            )
            .as_bytes(),
        )
        .await;
        assert_eq!(next.await.expect("join").expect("ok"), json!("fast"));
        assert_eq!(client.connection_end(), None);
    }

    /// The lone command in flight goes without an id (QEMU answers it without one), one sent
    /// while another is in flight takes the smallest free id, and the late reply to an
    /// abandoned id-less command is dropped, never given to a later command.
    #[tokio::test]
    async fn ids_only_while_another_command_is_in_flight() {
        let (client, mut peer) = connected().await;
        let call = |name: &'static str| {
            let c = client.clone();
            tokio::spawn(async move { c.execute(name, None).await })
        };
        let one = call("one");
        let (id, _) = peer.read_command().await;
        assert!(id.is_null(), "alone: no id, got {id}");
        let two = call("two");
        let (id, _) = peer.read_command().await;
        assert_eq!(id, json!(0));
        let three = call("three");
        assert_eq!(peer.read_command().await.0, json!(1));
        // In any order: by id, and the reply without one is the id-less command's.
        peer.send(
            b"{\"return\": 3, \"id\": 1}\r\n{\"return\": 1}\r\n{\"return\": 2, \"id\": 0}\r\n",
        )
        .await;
        assert_eq!(one.await.expect("join").expect("one"), json!(1));
        assert_eq!(two.await.expect("join").expect("two"), json!(2));
        assert_eq!(three.await.expect("join").expect("three"), json!(3));

        let (slow, (id, _)) = tokio::join!(
            client.execute_with_timeout("slow", None, Duration::from_millis(50)),
            peer.read_command()
        );
        assert!(id.is_null());
        assert!(matches!(slow, Err(QmpError::Timeout { .. })), "{slow:?}");
        // The abandoned command still waits for its reply: the next one needs an id.
        let next = call("next");
        assert_eq!(peer.read_command().await.0, json!(0));
        peer.send(b"{\"return\": \"late\"}\r\n{\"return\": \"next\", \"id\": 0}\r\n")
            .await;
        assert_eq!(next.await.expect("join").expect("next"), json!("next"));
        assert!(client.inner.shared.lock().pending.is_empty());
        // Nothing in flight again: no id.
        let last = call("last");
        assert!(peer.read_command().await.0.is_null());
        peer.send(b"{\"return\": \"last\"}\r\n").await;
        assert_eq!(last.await.expect("join").expect("last"), json!("last"));
    }

    #[tokio::test]
    async fn events_since_handshake_sees_events_before_any_subscribe() {
        let (client, mut peer) = connected().await;
        peer.send(
            b"{\"timestamp\": {\"seconds\": 5, \"microseconds\": 6}, \"event\": \"RESUME\"}\r\n",
        )
        .await;
        let mut early = client.events_since_handshake().expect("first take");
        assert!(client.events_since_handshake().is_none());
        let ev = early.recv().await.expect("event");
        assert_eq!(ev.name, "RESUME");
        assert_eq!(ev.timestamp.seconds, 5);
    }

    /// A command bigger than the socket buffer is queued and written by the flusher; a caller
    /// that gives up meanwhile still leaves its whole command on the wire (never half), and a
    /// later command follows it, whole, in call order.
    #[tokio::test]
    async fn full_socket_keeps_whole_commands_in_order_when_a_caller_gives_up() {
        let (client, mut peer) = connected().await;
        let blob = "x".repeat(4 << 20); // far more than a Unix socket buffer holds
        let big = tokio::spawn({
            let c = client.clone();
            let blob = blob.clone();
            async move { c.execute("big", Some(json!({ "blob": blob }))).await }
        });
        // Until the big command is queued (its caller is waiting for the reply).
        while client.inner.shared.lock().backlog.is_empty() {
            tokio::task::yield_now().await;
        }
        let small = tokio::spawn({
            let c = client.clone();
            async move { c.execute("small", None).await }
        });
        tokio::task::yield_now().await;
        big.abort();
        assert!(big.await.expect_err("aborted").is_cancelled());

        let mut line = String::new();
        peer.reader.read_line(&mut line).await.expect("read big");
        let v: Value = serde_json::from_str(&line).expect("the whole big command");
        assert_eq!(v["execute"], "big");
        assert_eq!(
            v["arguments"]["blob"].as_str().map(str::len),
            Some(blob.len())
        );
        let (small_id, cmd) = peer.read_command().await;
        assert_eq!(cmd, "small");
        peer.send(
            format!(
                "{{\"return\": \"late\", \"id\": {}}}\r\n{{\"return\": \"ok\", \"id\": {small_id}}}\r\n",
                v["id"]
            )
            .as_bytes(),
        )
        .await;
        assert_eq!(small.await.expect("join").expect("reply"), json!("ok"));
        let st = client.inner.shared.lock();
        assert!(st.backlog.is_empty() && st.flusher.is_none() && st.pending.is_empty());
    }

    /// The event ring holds only what some subscriber has not read: once every subscriber
    /// has read an event (or dropped its stream) it is gone, and a new subscriber does not
    /// see older events.
    #[tokio::test]
    async fn event_ring_keeps_only_unread_events() {
        let (client, mut peer) = connected().await;
        drop(client.events_since_handshake());
        let mut a = client.subscribe();
        let mut b = client.subscribe();
        let buffered = |c: &QmpClient| c.inner.shared.events.lock().buf.len();
        peer.send(b"{\"timestamp\": {\"seconds\": 1, \"microseconds\": 0}, \"event\": \"STOP\"}\r\n{\"timestamp\": {\"seconds\": 2, \"microseconds\": 0}, \"event\": \"RESUME\"}\r\n")
            .await;
        assert_eq!(a.recv().await.expect("a 1").timestamp.seconds, 1);
        assert_eq!(a.recv().await.expect("a 2").timestamp.seconds, 2);
        assert_eq!(buffered(&client), 2, "b has read neither");
        assert_eq!(b.recv().await.expect("b 1").timestamp.seconds, 1);
        assert_eq!(buffered(&client), 1);
        let mut late = client.subscribe();
        assert!(
            matches!(late.try_recv(), Ok(None)),
            "no older event for a new subscriber"
        );
        drop(b);
        assert_eq!(buffered(&client), 0, "the last reader's stream is gone");
        drop(late);
    }

    #[tokio::test]
    async fn handshake_rejects_non_greeting() {
        let (ours, theirs) = UnixStream::pair().expect("pair");
        let (_r, mut w) = ours.into_split();
        w.write_all(b"{\"return\": {}}\r\n").await.expect("write");
        match QmpClient::handshake(theirs).await {
            Err(QmpError::Protocol { message, .. }) => assert!(message.contains("greeting")),
            other => panic!("{other:?}"),
        }
    }
}
