//! The QMP client: tokio I/O around the pure [`codec`](super::codec).
//!
//! One connection is served by two tasks:
//! - a **reader** that cuts the stream into messages, hands each reply to the caller waiting
//!   for its `id`, and broadcasts each event. It never waits for anyone: replies go through
//!   oneshot channels and events through a `tokio::sync::broadcast` ring, whose `send` never
//!   blocks. A slow subscriber therefore cannot stall replies (or other subscribers); it
//!   misses the oldest events instead and is told how many ([`EventRecvError::Lagged`]).
//!   Broadcast was chosen over one unbounded channel per subscriber because its memory is
//!   bounded whatever a forgotten subscriber does, and because the right reaction to lost
//!   events is the same in every case: re-read the state with `query-status`.
//! - a **writer** that owns the write half, so a caller that gives up (timeout, dropped
//!   future) can never leave half a command on the wire.
//!
//! When the connection ends (EOF, reset, I/O or protocol error) every pending command fails at
//! once, subscribers see [`EventRecvError::Closed`] after the last event, and
//! [`QmpClient::closed`] resolves with the [`ConnectionEnd`].

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::AbortHandle;

use super::codec::{encode_command, parse_message, LineFramer, QmpMessage, DEFAULT_MAX_LINE};
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
            // The ring is allocated up front per connection (~180 B a slot): 4096 slots cost
            // 736 KiB per domain in the scale benchmark. The busiest sequences are a RESET
            // burst (2-10) and a migration's passes; the supervisor drains it continuously,
            // and a lag is reported, never silent.
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

/// A subscription to the events of one QMP connection.
#[derive(Debug)]
pub struct QmpEventStream {
    rx: broadcast::Receiver<QmpEvent>,
}

impl QmpEventStream {
    /// Waits for the next event.
    pub async fn recv(&mut self) -> Result<QmpEvent, EventRecvError> {
        self.rx.recv().await.map_err(|e| match e {
            broadcast::error::RecvError::Lagged(n) => EventRecvError::Lagged(n),
            broadcast::error::RecvError::Closed => EventRecvError::Closed,
        })
    }

    /// Takes the next event if one is buffered, without waiting.
    pub fn try_recv(&mut self) -> Result<Option<QmpEvent>, EventRecvError> {
        match self.rx.try_recv() {
            Ok(ev) => Ok(Some(ev)),
            Err(broadcast::error::TryRecvError::Empty) => Ok(None),
            Err(broadcast::error::TryRecvError::Lagged(n)) => Err(EventRecvError::Lagged(n)),
            Err(broadcast::error::TryRecvError::Closed) => Err(EventRecvError::Closed),
        }
    }
}

type ReplySender = oneshot::Sender<Result<Value, QmpError>>;

/// State shared by the client handles and the reader/writer tasks.
struct Shared {
    state: Mutex<State>,
    end_tx: watch::Sender<Option<ConnectionEnd>>,
}

struct State {
    pending: HashMap<u64, ReplySender>,
    /// Dropped when the connection ends, so subscribers see `Closed`.
    events: Option<broadcast::Sender<QmpEvent>>,
    end: Option<ConnectionEnd>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves the map consistent (every operation on it is
        // a single insert/remove), so a poisoned lock is safe to keep using.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ends the connection once: fails every pending command, closes event subscriptions,
    /// and publishes how it ended.
    fn finish(&self, end: ConnectionEnd) {
        let pending = {
            let mut st = self.lock();
            if st.end.is_some() {
                return;
            }
            tracing::debug!(%end, pending = st.pending.len(), "QMP connection ended");
            st.end = Some(end.clone());
            st.events = None;
            std::mem::take(&mut st.pending)
        };
        for (_, tx) in pending {
            let _ = tx.send(Err(end.command_error()));
        }
        self.end_tx.send_replace(Some(end));
    }

    fn complete(&self, id: u64, result: Result<Value, QmpError>) {
        let tx = self.lock().pending.remove(&id);
        match tx {
            Some(tx) => {
                // The caller may have given up just now; then nobody wants the result.
                let _ = tx.send(result);
            }
            None => tracing::debug!(id, "QMP reply for a command nobody waits for (timed out?)"),
        }
    }

    /// Handles one line from QEMU. An error means the stream is not QMP.
    fn dispatch(&self, line: &[u8]) -> Result<(), ConnectionEnd> {
        let msg = parse_message(line).map_err(|e| ConnectionEnd::Protocol {
            message: e.message,
            excerpt: e.excerpt,
        })?;
        match msg {
            QmpMessage::Reply { id, result } => {
                let result = result.map_err(|e| QmpError::CommandFailed {
                    class: e.class,
                    desc: e.desc,
                });
                match id.as_ref().and_then(Value::as_u64) {
                    Some(id) => self.complete(id, result),
                    None => tracing::warn!(?id, ?result, "QMP reply without a known id dropped"),
                }
            }
            QmpMessage::Event(wire) => {
                let event = QmpEvent::from_wire(
                    wire.name,
                    wire.data,
                    wire.timestamp,
                    Instant::now(),
                    SystemTime::now(),
                );
                tracing::trace!(name = %event.name, "QMP event");
                if let Some(tx) = &self.lock().events {
                    // Err only means nobody is subscribed right now.
                    let _ = tx.send(event);
                }
            }
            QmpMessage::Greeting(_) => tracing::warn!("second QMP greeting ignored"),
            QmpMessage::Unrecognized(v) => tracing::warn!(%v, "unrecognized QMP message ignored"),
        }
        Ok(())
    }
}

/// A command (or a command with a file descriptor) for the writer task.
struct Outgoing {
    id: u64,
    bytes: Vec<u8>,
    fd: Option<OwnedFd>,
}

struct Inner {
    shared: Arc<Shared>,
    outgoing: mpsc::UnboundedSender<Outgoing>,
    next_id: AtomicU64,
    greeting: QmpGreeting,
    options: QmpClientOptions,
    end_rx: watch::Receiver<Option<ConnectionEnd>>,
    early_events: Mutex<Option<broadcast::Receiver<QmpEvent>>>,
    tasks: [AbortHandle; 2],
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: stop the tasks, which drops both socket halves.
        for task in &self.tasks {
            task.abort();
        }
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
        let (mut read, write) = stream.into_split();
        let mut framer = LineFramer::new(options.max_line);
        let greeting = tokio::time::timeout(
            options.greeting_timeout,
            read_greeting(&mut read, &mut framer),
        )
        .await
        .map_err(|_| QmpError::Timeout {
            command: "greeting".into(),
            after: options.greeting_timeout,
        })??;
        tracing::debug!(qemu = ?greeting.version.qemu, "QMP greeting");

        let (events_tx, early_rx) = broadcast::channel(options.event_capacity.max(1));
        let (end_tx, end_rx) = watch::channel(None);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: HashMap::new(),
                events: Some(events_tx),
                end: None,
            }),
            end_tx,
        });
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(reader_loop(read, framer, shared.clone()));
        let writer = tokio::spawn(writer_loop(write, out_rx, shared.clone(), end_rx.clone()));
        let client = Self {
            inner: Arc::new(Inner {
                shared,
                outgoing: out_tx,
                next_id: AtomicU64::new(1),
                greeting,
                options,
                end_rx,
                early_events: Mutex::new(Some(early_rx)),
                tasks: [reader.abort_handle(), writer.abort_handle()],
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
        match &self.inner.shared.lock().events {
            Some(tx) => QmpEventStream { rx: tx.subscribe() },
            None => {
                // Already closed: a stream that reports Closed at once.
                let (_, rx) = broadcast::channel(1);
                QmpEventStream { rx }
            }
        }
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
            .map(|rx| QmpEventStream { rx })
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
        self.call(command, arguments.as_ref(), None, timeout).await
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
        let value = self
            .execute_with_timeout(command, arguments, timeout)
            .await?;
        serde_json::from_value(value).map_err(|e| QmpError::UnexpectedReply {
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
        self.execute("stop", None).await.map(drop)
    }

    /// `cont`: run the vCPUs (RESUME; QEMU sends the event before the reply).
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.execute("cont", None).await.map(drop)
    }

    /// `system_reset`.
    pub async fn system_reset(&self) -> Result<(), QmpError> {
        self.execute("system_reset", None).await.map(drop)
    }

    /// `system_powerdown`: press the ACPI power button (the guest decides what to do).
    pub async fn system_powerdown(&self) -> Result<(), QmpError> {
        self.execute("system_powerdown", None).await.map(drop)
    }

    /// `system_wakeup`: wake a guest from S3.
    pub async fn system_wakeup(&self) -> Result<(), QmpError> {
        self.execute("system_wakeup", None).await.map(drop)
    }

    /// `quit`: make QEMU exit.
    ///
    /// Succeeds when the reply arrives **or** the connection closes or resets first: QEMU
    /// 7.2 often exits before its reply is read, so EOF after `quit` is the expected outcome.
    /// Await [`closed`](Self::closed) to know the socket is gone.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.execute("quit", None).await {
            Ok(_) | Err(QmpError::Disconnected) => Ok(()),
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
        // The writer task sends later; it needs a descriptor that outlives the borrow.
        let fd = fd.as_fd().try_clone_to_owned()?;
        let args = json!({ "fdname": fdname });
        self.call("getfd", Some(&args), Some(fd), self.default_timeout())
            .await
            .map(drop)
    }

    /// `closefd`: drop a descriptor passed with [`send_fd`](Self::send_fd).
    pub async fn closefd(&self, fdname: &str) -> Result<(), QmpError> {
        self.execute("closefd", Some(json!({ "fdname": fdname })))
            .await
            .map(drop)
    }

    /// `migrate-set-capabilities` with the given `(capability, state)` pairs; e.g.
    /// `[("events", true)]` for MIGRATION/MIGRATION_PASS events.
    pub async fn migrate_set_capabilities(&self, caps: &[(&str, bool)]) -> Result<(), QmpError> {
        let caps: Vec<Value> = caps
            .iter()
            .map(|(name, state)| json!({ "capability": name, "state": state }))
            .collect();
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": caps })),
        )
        .await
        .map(drop)
    }

    /// `migrate` to `uri` (e.g. `fd:NAME`, `exec:cat > FILE`). Returns when the migration
    /// has started; follow it with MIGRATION events or [`query_migrate`](Self::query_migrate).
    pub async fn migrate(&self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate", Some(json!({ "uri": uri })))
            .await
            .map(drop)
    }

    /// `query-migrate`.
    pub async fn query_migrate(&self) -> Result<MigrationInfo, QmpError> {
        self.execute_typed("query-migrate", None).await
    }

    async fn call(
        &self,
        command: &str,
        arguments: Option<&Value>,
        fd: Option<OwnedFd>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let shared = &self.inner.shared;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut st = shared.lock();
            if let Some(end) = &st.end {
                return Err(end.command_error());
            }
            st.pending.insert(id, tx);
        }
        // Removes the pending entry however this future ends (timeout, or dropped).
        let _pending = PendingGuard { shared, id };
        let msg = Outgoing {
            id,
            bytes: encode_command(id, command, arguments),
            fd,
        };
        if self.inner.outgoing.send(msg).is_err() {
            // Writer gone: the connection is over.
            return Err(self
                .connection_end()
                .map_or(QmpError::Disconnected, |e| e.command_error()));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(QmpError::Disconnected),
            Err(_) => Err(QmpError::Timeout {
                command: command.to_owned(),
                after: timeout,
            }),
        }
    }
}

struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
    }
}

async fn read_greeting(
    read: &mut OwnedReadHalf,
    framer: &mut LineFramer,
) -> Result<QmpGreeting, QmpError> {
    let mut buf = vec![0u8; 4096];
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
        let n = read.read(&mut buf).await.map_err(|e| {
            if is_peer_gone(&e) {
                QmpError::Disconnected
            } else {
                QmpError::Io(e)
            }
        })?;
        if n == 0 {
            return Err(QmpError::Disconnected);
        }
        framer.push(&buf[..n]);
    }
}

async fn reader_loop(mut read: OwnedReadHalf, mut framer: LineFramer, shared: Arc<Shared>) {
    // QMP messages are small; a larger reply just takes more reads.
    let mut buf = vec![0u8; 8 * 1024];
    let end = 'conn: loop {
        // Lines first: the framer may already hold some from the handshake.
        loop {
            match framer.next_line() {
                Ok(Some(line)) => {
                    if let Err(end) = shared.dispatch(&line) {
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
        match read.read(&mut buf).await {
            Ok(0) => {
                if !framer.buffered().is_empty() {
                    tracing::warn!(
                        bytes = %super::codec::excerpt(framer.buffered()),
                        "QMP connection closed mid-message"
                    );
                }
                break ConnectionEnd::Eof;
            }
            Ok(n) => framer.push(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break ConnectionEnd::from_io(&e),
        }
    };
    shared.finish(end);
    // Returning drops the read half; the writer stops on the end notification and drops the
    // write half, which closes the socket.
}

async fn writer_loop(
    mut write: OwnedWriteHalf,
    mut outgoing: mpsc::UnboundedReceiver<Outgoing>,
    shared: Arc<Shared>,
    mut end: watch::Receiver<Option<ConnectionEnd>>,
) {
    loop {
        let msg = tokio::select! {
            msg = outgoing.recv() => match msg {
                Some(msg) => msg,
                None => return,
            },
            _ = end.wait_for(Option::is_some) => return,
        };
        if let Err(e) = write_message(&mut write, &msg).await {
            // Fail this command only; the reader decides when the connection is over (it
            // still has to deliver whatever QEMU wrote before going away).
            tracing::debug!(id = msg.id, error = %e, "QMP write failed");
            let err = if is_peer_gone(&e) {
                QmpError::Disconnected
            } else {
                QmpError::Io(e)
            };
            shared.complete(msg.id, Err(err));
        }
    }
}

async fn write_message(write: &mut OwnedWriteHalf, msg: &Outgoing) -> io::Result<()> {
    let mut sent = 0;
    if let Some(fd) = &msg.fd {
        let stream: &UnixStream = write.as_ref();
        let sock = stream.as_raw_fd();
        let fd = fd.as_raw_fd();
        // The descriptor rides on the first bytes; the rest, if any, follows as plain data.
        sent = stream
            .async_io(Interest::WRITABLE, || send_with_fd(sock, &msg.bytes, fd))
            .await?;
    }
    write.write_all(&msg.bytes[sent..]).await
}

/// One `sendmsg` of `bytes` with `fd` as `SCM_RIGHTS`. Non-blocking: `WouldBlock` makes
/// tokio wait for writability and retry.
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
    use tokio::io::{AsyncBufReadExt, BufReader};

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

        /// Reads one command and returns (id, execute).
        async fn read_command(&mut self) -> (u64, String) {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).await.expect("peer read");
            assert!(n > 0, "client closed");
            let v: Value = serde_json::from_str(&line).expect("client sends JSON");
            let id = v["id"].as_u64().expect("numeric id");
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
