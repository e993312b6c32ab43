//! The guest agent client: tokio I/O around the pure [`codec`](crate::codec), over any byte
//! stream.
//!
//! The agent channel carries one conversation at a time (qemu-ga answers commands strictly in
//! order and has no request ids of its own), so [`GuestAgent`] serialises commands behind an
//! async mutex instead of routing replies. Its state machine is small: the channel is either
//! known clean (*synced*) or not; every command starts by resyncing a channel that is not, and
//! anything that can leave bytes in flight (a timeout, a protocol error, a cancelled call, a
//! no-reply command) marks it not clean.
//!
//! The transport is anything that is `AsyncRead + AsyncWrite`: QEMU serves the virtio-serial
//! port as a unix socket, a Xen PV channel's device model does the same in dom0, and the unit
//! tests use a socket pair. A [`Connector`] makes a new stream when the old one is lost.
//!
//! **The guest is not trusted.** Every byte on the channel is the guest's. The reply line
//! length is capped ([`GuestAgentOptions::max_reply_bytes`]; what is read while skipping to a
//! delimiter is dropped as it arrives), every call has a deadline that covers waiting for the
//! channel, the sync is retried while the agent is not up yet (early boot), and a malformed
//! reply is a typed [`AgentError::Protocol`] after which the channel is resynced with 0xFF.
//! One client serves one domain, so a hung agent only ever delays callers of that agent.

use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::Mutex;

use crate::codec::{
    base64_encode, encode_command, encode_sync_delimited, is_sync_reply, AgentDecoder,
    AgentMessage, MAX_REPLY_LINE,
};
use crate::types::{
    AgentInfo, FileHandle, FileOpenMode, FsFreezeStatus, GuestExecRequest, GuestExecStatus,
    GuestFileRead, GuestFileSeek, GuestFileWrite, GuestFilesystemInfo, GuestFilesystemTrimResponse,
    GuestLogicalProcessor, GuestMemoryBlock, GuestMemoryBlockInfo, GuestMemoryBlockResponse,
    GuestNetworkInterface, SeekWhence, SetUserPassword, ShutdownMode, MAX_FILE_READ_CHUNK,
};

/// Errors of the guest agent client.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// qemu-ga answered with an error.
    #[error("guest agent command failed: {class}: {desc}")]
    CommandFailed {
        /// The error class.
        class: String,
        /// qemu-ga's description.
        desc: String,
    },
    /// The guest cannot run this command: qemu-ga reports it disabled (`-b`/`--block-rpcs`,
    /// or not available on the guest OS), does not know it, or says the feature is not
    /// supported. `reason` is the guest's own words.
    #[error("guest agent command `{command}` is not supported by this guest: {reason}")]
    Unsupported {
        /// The command.
        command: String,
        /// What the guest said.
        reason: String,
    },
    /// No reply in time (the agent may not be running in the guest). The channel will be
    /// resynced before the next command.
    #[error("guest agent command `{command}` got no reply within {after:?}")]
    Timeout {
        /// The command (`guest-sync-delimited` when the resync itself timed out).
        command: String,
        /// The timeout that expired.
        after: Duration,
    },
    /// The connection closed (EOF or reset) while waiting: QEMU or qemu-ga went away.
    #[error("guest agent connection closed")]
    Disconnected,
    /// The agent sent bytes that are not a reply (or a reply line over the size limit). The
    /// channel will be resynced (0xFF + `guest-sync-delimited`) before the next command.
    #[error("guest agent protocol error: {message} (bytes: {excerpt})")]
    Protocol {
        /// What was wrong.
        message: String,
        /// The start of the offending bytes, escaped.
        excerpt: String,
    },
    /// An argument this client refuses to send (e.g. a negative count).
    #[error("invalid guest agent argument: {0}")]
    InvalidArgument(String),
    /// An I/O error other than the peer closing.
    #[error("guest agent I/O error: {0}")]
    Io(#[from] io::Error),
    /// There is no connection and none could be made (e.g. QEMU is gone, or the client was
    /// built from a stream that has since closed).
    #[error("guest agent not connected: {reason}")]
    NotConnected {
        /// Why.
        reason: String,
    },
}

impl AgentError {
    /// Classifies an error reply of `command`: disabled, unknown and unsupported commands are
    /// [`AgentError::Unsupported`], the rest [`AgentError::CommandFailed`].
    pub fn from_reply(command: &str, class: String, desc: String) -> Self {
        let lower = desc.to_ascii_lowercase();
        let unsupported = (class == "CommandNotFound"
            && (lower.contains("disabled") || lower.contains("not been found")))
            || lower.contains("not currently supported")
            || lower.contains("not supported");
        if unsupported {
            AgentError::Unsupported {
                command: command.to_owned(),
                reason: desc,
            }
        } else {
            AgentError::CommandFailed { class, desc }
        }
    }
}

/// Tunables of a [`GuestAgent`].
#[derive(Debug, Clone)]
pub struct GuestAgentOptions {
    /// Timeout of a command that is not given its own. It also bounds the wait for the
    /// channel while another command holds it.
    pub command_timeout: Duration,
    /// Timeout of a resync. A guest without a running agent is detected by this expiring.
    pub sync_timeout: Duration,
    /// While resyncing, how long to wait for the reply to one `guest-sync-delimited` before
    /// sending another (an agent starting in early boot misses the first).
    pub sync_retry_interval: Duration,
    /// How long [`GuestAgent::execute_no_reply`] waits for an error before calling a
    /// command that sends no reply on success a success.
    pub no_reply_grace: Duration,
    /// The longest reply line accepted: the bound on what the guest can make this client
    /// buffer.
    pub max_reply_bytes: usize,
}

impl Default for GuestAgentOptions {
    fn default() -> Self {
        Self {
            // Generous: a TCG guest on a shared 2-core host can be slow to schedule qemu-ga.
            command_timeout: Duration::from_secs(30),
            sync_timeout: Duration::from_secs(10),
            sync_retry_interval: Duration::from_secs(1),
            // qemu-ga rejects a blocked or unsupported command at once, and a failing
            // shutdown/suspend helper within well under a second; 2 s covers a slow guest.
            no_reply_grace: Duration::from_secs(2),
            max_reply_bytes: MAX_REPLY_LINE,
        }
    }
}

/// A byte stream to the agent: any `AsyncRead + AsyncWrite`.
pub trait AgentStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AgentStream for T {}

/// A boxed [`AgentStream`].
pub type BoxedStream = Box<dyn AgentStream>;

/// The future a [`Connector`] returns.
pub type ConnectFuture = Pin<Box<dyn Future<Output = io::Result<BoxedStream>> + Send>>;

/// Makes a new connection to the agent (used on first use and after the old one was lost).
#[derive(Clone)]
pub struct Connector {
    what: String,
    connect: Arc<dyn Fn() -> ConnectFuture + Send + Sync>,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("what", &self.what)
            .finish()
    }
}

impl Connector {
    /// A connector from a function; `what` names the endpoint in errors.
    pub fn new(
        what: impl Into<String>,
        connect: impl Fn() -> ConnectFuture + Send + Sync + 'static,
    ) -> Self {
        Self {
            what: what.into(),
            connect: Arc::new(connect),
        }
    }

    /// Connects to a unix socket (QEMU's chardev, or a Xen channel's device model socket).
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        let path: PathBuf = path.into();
        let what = path.display().to_string();
        Self::new(what, move || {
            let path = path.clone();
            Box::pin(async move {
                let s = UnixStream::connect(&path).await?;
                Ok(Box::new(s) as BoxedStream)
            })
        })
    }

    /// What this connects to.
    pub fn what(&self) -> &str {
        &self.what
    }
}

/// The live connection and what is known about the channel.
struct Channel {
    stream: Option<BoxedStream>,
    decoder: AgentDecoder,
    max_line: usize,
    /// The channel is known to hold no stray bytes in either direction.
    synced: bool,
}

/// What reading one message produced.
enum ReadError {
    Eof,
    Io(io::Error),
    Decode { message: String, excerpt: String },
}

fn is_peer_gone(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

impl Channel {
    fn new(stream: Option<BoxedStream>, max_line: usize) -> Self {
        Self {
            stream,
            decoder: AgentDecoder::with_max_line(max_line),
            max_line,
            synced: false,
        }
    }

    fn drop_connection(&mut self) {
        self.stream = None;
        self.decoder = AgentDecoder::with_max_line(self.max_line);
        self.synced = false;
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), AgentError> {
        let stream = self.stream.as_mut().ok_or_else(not_connected)?;
        let written = async {
            stream.write_all(bytes).await?;
            stream.flush().await
        };
        match written.await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.io_failure(e)),
        }
    }

    async fn read_message(&mut self) -> Result<AgentMessage, ReadError> {
        let mut buf = [0u8; 8192];
        loop {
            match self.decoder.next_message() {
                Ok(Some(msg)) => {
                    self.decoder.release_if_empty();
                    return Ok(msg);
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(ReadError::Decode {
                        message: e.message,
                        excerpt: e.excerpt,
                    })
                }
            }
            let Some(stream) = self.stream.as_mut() else {
                return Err(ReadError::Eof);
            };
            match stream.read(&mut buf).await {
                Ok(0) => return Err(ReadError::Eof),
                Ok(n) => self.decoder.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }

    /// `true` if bytes arrived since the last reply (buffered, or readable right now without
    /// waiting). A read that finds EOF or an error drops the connection (the caller then
    /// reconnects or reports it).
    async fn has_unsolicited_bytes(&mut self) -> bool {
        if self.decoder.buffered_len() > 0 {
            return true;
        }
        let Some(stream) = self.stream.as_mut() else {
            return false;
        };
        let mut buf = [0u8; 8192];
        // `timeout` polls the read once before looking at the (already expired) deadline.
        match tokio::time::timeout(Duration::ZERO, stream.read(&mut buf)).await {
            Err(_) => false,
            Ok(Ok(0)) => {
                self.drop_connection();
                false
            }
            Ok(Ok(n)) => {
                self.decoder.push(&buf[..n]);
                true
            }
            Ok(Err(e)) => {
                let _ = self.io_failure(e);
                false
            }
        }
    }

    /// Turns a read failure into the caller's error, dropping the connection if it is gone.
    fn read_failure(&mut self, err: ReadError) -> AgentError {
        match err {
            ReadError::Eof => {
                self.drop_connection();
                AgentError::Disconnected
            }
            ReadError::Io(e) => self.io_failure(e),
            ReadError::Decode { message, excerpt } => {
                self.synced = false;
                // Whatever is still buffered belongs to the bad reply: drop it up to the next
                // delimiter, which the resync before the next command asks for.
                self.decoder.start_resync();
                AgentError::Protocol { message, excerpt }
            }
        }
    }

    fn io_failure(&mut self, err: io::Error) -> AgentError {
        self.drop_connection();
        if is_peer_gone(&err) {
            AgentError::Disconnected
        } else {
            AgentError::Io(err)
        }
    }

    /// Flushes the channel: 0xFF, `guest-sync-delimited`, then drops everything up to the
    /// reply with our id. Sends a new sync (new id) every `retry` until one is answered: an
    /// agent that was not up yet never saw the first. The caller bounds the whole.
    async fn resync(&mut self, ids: &IdSource, retry: Duration) -> Result<(), AgentError> {
        loop {
            let id = ids.next_sync_id();
            self.decoder.start_resync();
            self.write(&encode_sync_delimited(id)).await?;
            let attempt = async {
                loop {
                    match self.read_message().await {
                        Ok(msg) if is_sync_reply(&msg, id) => return Ok(()),
                        Ok(stale) => {
                            tracing::debug!(?stale, "guest agent: discarded during resync")
                        }
                        // Junk that happens to follow a delimiter (a late reply to an older
                        // sync can precede ours): keep looking after the next delimiter.
                        Err(ReadError::Decode { message, .. }) => {
                            tracing::debug!(%message, "guest agent: junk during resync");
                            self.decoder.start_resync();
                        }
                        Err(e) => return Err(self.read_failure(e)),
                    }
                }
            };
            match tokio::time::timeout(retry, attempt).await {
                Ok(Ok(())) => {
                    self.synced = true;
                    return Ok(());
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => tracing::debug!(id, "guest agent: sync unanswered, retrying"),
            }
        }
    }

    /// Reads until the reply to the command sent with `id`; replies with another id are
    /// stale and dropped.
    async fn read_reply(&mut self, command: &str, id: u64) -> Result<Value, AgentError> {
        loop {
            match self.read_message().await {
                Ok(AgentMessage::Reply { id: got, result }) => {
                    // qemu-ga echoes the id of every command it dispatched (its errors for
                    // disabled or unknown commands included); only its answers to bytes it
                    // could not parse come without one. So a reply without our id is not
                    // ours: stale, junk, or a guest faking replies.
                    let ours = got.as_ref().and_then(Value::as_u64) == Some(id);
                    if !ours {
                        tracing::debug!(?got, "guest agent: stale reply dropped");
                        continue;
                    }
                    return result.map_err(|e| AgentError::from_reply(command, e.class, e.desc));
                }
                Ok(other) => tracing::debug!(?other, "guest agent: unexpected message dropped"),
                Err(e) => return Err(self.read_failure(e)),
            }
        }
    }
}

fn not_connected() -> AgentError {
    AgentError::NotConnected {
        reason: "no connection".into(),
    }
}

/// What a [`GuestAgent::probe`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// A call holds the channel: nothing was sent, nothing is learnt.
    Busy,
    /// The agent answered.
    Answered,
    /// No agent answered; why.
    Silent(String),
}

/// A client for the QEMU guest agent (qemu-ga), over any byte stream.
///
/// On QEMU it connects to the host side of the agent's virtio-serial port, which QEMU serves
/// as a unix socket (`-chardev socket,id=qga0,path=QGA,server=on,wait=off -device
/// virtio-serial -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0`); on Xen to
/// the dom0 socket of the PV channel `org.qemu.guest_agent.0`; in tests to a host qemu-ga
/// started with `-m unix-listen`. Get one for a domain with `domkit_core::Domain::guest_agent`.
///
/// Methods take `&self`; concurrent calls are serialised (the channel carries one
/// conversation). Each command has a timeout, and the channel is resynced with
/// `guest-sync-delimited` before the first command and after any timeout, protocol error or
/// cancelled call, so a command never reads another's reply.
///
/// **One client at a time.** A QEMU chardev socket, like qemu-ga's own unix-listen socket,
/// serves one connection: a second connection is accepted by the kernel but gets no answer
/// until the first closes (its commands time out meanwhile). Hold one `GuestAgent` per VM and
/// [`disconnect`](Self::disconnect) it when another tool needs the channel.
///
/// **Reconnects.** A client with a [`Connector`] reconnects lazily: after the connection was
/// lost, the next command connects again (and resyncs); if that fails it returns
/// [`AgentError::NotConnected`].
pub struct GuestAgent {
    channel: Mutex<Channel>,
    connector: Option<Connector>,
    options: GuestAgentOptions,
    ids: IdSource,
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("connected", &self.stream.is_some())
            .field("synced", &self.synced)
            .finish()
    }
}

impl fmt::Debug for GuestAgent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestAgent")
            .field("connector", &self.connector)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl GuestAgent {
    /// Connects to the agent socket at `path` with default options. No command is sent yet.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, AgentError> {
        Self::connect_with(path, GuestAgentOptions::default()).await
    }

    /// [`connect`](Self::connect) with explicit options.
    pub async fn connect_with(
        path: impl AsRef<Path>,
        options: GuestAgentOptions,
    ) -> Result<Self, AgentError> {
        let connector = Connector::unix(path.as_ref());
        let stream = (connector.connect)().await?;
        Ok(Self::with_connector(Some(stream), connector, options))
    }

    /// A client that connects with `connector` (now if `stream` is `None`, lazily on the
    /// first command), and again whenever the connection was lost.
    pub fn with_connector(
        stream: Option<BoxedStream>,
        connector: Connector,
        options: GuestAgentOptions,
    ) -> Self {
        Self {
            channel: Mutex::new(Channel::new(stream, options.max_reply_bytes)),
            connector: Some(connector),
            options,
            ids: IdSource::new(),
        }
    }

    /// Wraps an already connected stream (which may hold junk: the first command resyncs).
    /// Such a client cannot reconnect.
    pub fn from_stream(stream: impl AgentStream, options: GuestAgentOptions) -> Self {
        Self {
            channel: Mutex::new(Channel::new(
                Some(Box::new(stream)),
                options.max_reply_bytes,
            )),
            connector: None,
            options,
            ids: IdSource::new(),
        }
    }

    /// The options in force.
    pub fn options(&self) -> &GuestAgentOptions {
        &self.options
    }

    /// Closes the connection (waiting for a command in progress to finish), freeing the
    /// channel for another client. A client with a connector reconnects on its next command.
    pub async fn disconnect(&self) {
        self.channel.lock().await.drop_connection();
    }

    /// Takes the channel, waiting at most `timeout` for a command in progress (a hung agent
    /// holds it until that command's own timeout).
    async fn lock(
        &self,
        command: &str,
        timeout: Duration,
    ) -> Result<tokio::sync::MutexGuard<'_, Channel>, AgentError> {
        tokio::time::timeout(timeout, self.channel.lock())
            .await
            .map_err(|_| AgentError::Timeout {
                command: command.to_owned(),
                after: timeout,
            })
    }

    /// Resyncs the channel now (normally done automatically when needed).
    pub async fn sync(&self) -> Result<(), AgentError> {
        let mut ch = self
            .lock("guest-sync-delimited", self.options.sync_timeout)
            .await?;
        ch.synced = false;
        self.ready(&mut ch).await
    }

    /// Connects if needed and resyncs if the channel is not known clean.
    async fn ready(&self, ch: &mut Channel) -> Result<(), AgentError> {
        let was_connected = ch.stream.is_some();
        if ch.synced && ch.has_unsolicited_bytes().await {
            // The guest wrote while nobody asked (a restarted or hostile agent): whatever it
            // is, it is not the reply to the command about to go out.
            tracing::debug!("guest agent: unsolicited bytes on an idle channel: resync");
            ch.synced = false;
        }
        // The connection closed while idle: reconnect if possible, else say it closed (the
        // next call then says it is not connected).
        let lost_while_idle = was_connected && ch.stream.is_none();
        if lost_while_idle && self.connector.is_none() {
            return Err(AgentError::Disconnected);
        }
        if ch.stream.is_none() {
            let Some(connector) = &self.connector else {
                return Err(AgentError::NotConnected {
                    reason: "connection closed and the client cannot reconnect".into(),
                });
            };
            let stream = match (connector.connect)().await {
                Ok(stream) => stream,
                Err(_) if lost_while_idle => return Err(AgentError::Disconnected),
                Err(e) => {
                    return Err(AgentError::NotConnected {
                        reason: format!("connecting to {}: {e}", connector.what),
                    })
                }
            };
            *ch = Channel::new(Some(stream), self.options.max_reply_bytes);
        }
        if !ch.synced {
            let after = self.options.sync_timeout;
            let retry = self
                .options
                .sync_retry_interval
                .max(Duration::from_millis(50));
            match tokio::time::timeout(after, ch.resync(&self.ids, retry)).await {
                Ok(result) => result?,
                Err(_) => {
                    return Err(AgentError::Timeout {
                        command: "guest-sync-delimited".into(),
                        after,
                    })
                }
            }
        }
        Ok(())
    }

    /// Runs a command with the default timeout and returns its raw `return` value (what
    /// `virsh qemu-agent-command` does).
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, AgentError> {
        self.execute_with_timeout(command, arguments, self.options.command_timeout)
            .await
    }

    /// Runs a command with an explicit timeout (the resync before it, if any, has its own).
    pub async fn execute_with_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        let mut ch = self.lock(command, timeout).await?;
        self.ready(&mut ch).await?;
        let id = self.ids.next_command_id();
        let bytes = encode_command(command, arguments.as_ref(), Some(id));
        // Not clean until the reply is in: a timeout or a dropped future leaves it dirty.
        ch.synced = false;
        let exchange = async {
            ch.write(&bytes).await?;
            ch.read_reply(command, id).await
        };
        let result = match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => {
                return Err(AgentError::Timeout {
                    command: command.to_owned(),
                    after: timeout,
                })
            }
        };
        if matches!(
            result,
            Ok(_) | Err(AgentError::CommandFailed { .. } | AgentError::Unsupported { .. })
        ) {
            ch.synced = true;
        }
        result
    }

    /// A liveness probe for drivers that cannot see the agent open its channel (Xen PV
    /// channels, `docs/semantics.md` §13.4): `guest-ping`, resync included, all within
    /// `within`. [`Probe::Busy`] without sending anything when a call holds the channel (the
    /// channel is in use: nothing is learnt); [`Probe::Answered`] when the agent answered;
    /// [`Probe::Silent`] with why when it did not (not connected, no answer in time, junk).
    pub async fn probe(&self, within: Duration) -> Probe {
        let Ok(mut ch) = self.channel.try_lock() else {
            return Probe::Busy;
        };
        let exchange = async {
            self.ready(&mut ch).await?;
            let id = self.ids.next_command_id();
            let bytes = encode_command("guest-ping", None, Some(id));
            ch.synced = false;
            ch.write(&bytes).await?;
            let r = ch.read_reply("guest-ping", id).await;
            if matches!(
                r,
                Ok(_) | Err(AgentError::CommandFailed { .. } | AgentError::Unsupported { .. })
            ) {
                ch.synced = true;
            }
            r
        };
        match tokio::time::timeout(within, exchange).await {
            // An error reply is an answer too: an agent is there.
            Ok(Ok(_) | Err(AgentError::CommandFailed { .. } | AgentError::Unsupported { .. })) => {
                Probe::Answered
            }
            Ok(Err(e)) => Probe::Silent(e.to_string()),
            Err(_) => Probe::Silent(format!("no answer within {within:?}")),
        }
    }

    /// Runs a command and deserialises its `return` value.
    pub async fn execute_typed<T: DeserializeOwned>(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<T, AgentError> {
        let value = self.execute(command, arguments).await?;
        serde_json::from_value(value).map_err(|e| AgentError::Protocol {
            message: format!("unexpected reply to {command}: {e}"),
            excerpt: String::new(),
        })
    }

    /// Runs a command that sends **no reply on success** (`guest-shutdown`,
    /// `guest-suspend-ram`, `guest-suspend-disk`, `guest-suspend-hybrid`).
    ///
    /// Success cannot be observed on the channel, so it is inferred:
    /// - an **error reply** within the grace period ([`GuestAgentOptions::no_reply_grace`])
    ///   is returned as [`AgentError::Unsupported`] or [`AgentError::CommandFailed`] (e.g.
    ///   the command is blocked, or the guest cannot suspend);
    /// - **no reply** within the grace period, or **EOF** (QEMU exited with the guest), is
    ///   `Ok(())`: the command was accepted. Confirm the effect with the domain's events
    ///   (shutdown, pm-suspended), which is where it shows;
    /// - a success reply (an agent that does send one) is `Ok(())` too.
    ///
    /// The channel is resynced before the next command, so a late reply cannot confuse it.
    pub async fn execute_no_reply(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<(), AgentError> {
        self.execute_no_reply_with_grace(command, arguments, self.options.no_reply_grace)
            .await
    }

    /// [`execute_no_reply`](Self::execute_no_reply) with an explicit grace period.
    pub async fn execute_no_reply_with_grace(
        &self,
        command: &str,
        arguments: Option<Value>,
        grace: Duration,
    ) -> Result<(), AgentError> {
        let write_timeout = self.options.command_timeout;
        let mut ch = self.lock(command, write_timeout).await?;
        self.ready(&mut ch).await?;
        let id = self.ids.next_command_id();
        let bytes = encode_command(command, arguments.as_ref(), Some(id));
        ch.synced = false;
        match tokio::time::timeout(write_timeout, ch.write(&bytes)).await {
            Ok(written) => written?,
            Err(_) => {
                return Err(AgentError::Timeout {
                    command: command.to_owned(),
                    after: write_timeout,
                })
            }
        }
        match tokio::time::timeout(grace, ch.read_reply(command, id)).await {
            Err(_) => {
                tracing::debug!(command, "guest agent: no reply within grace: accepted");
                Ok(())
            }
            Ok(Ok(_)) => {
                ch.synced = true;
                Ok(())
            }
            Ok(Err(AgentError::Disconnected)) => Ok(()),
            Ok(Err(e @ (AgentError::CommandFailed { .. } | AgentError::Unsupported { .. }))) => {
                ch.synced = true;
                Err(e)
            }
            Ok(Err(e)) => Err(e),
        }
    }

    // --------------------------------------------------------------------------------------
    // The schema's commands, one typed method each.
    // --------------------------------------------------------------------------------------

    /// `guest-sync-delimited`: flushes the channel (0xFF first) and checks the echoed id.
    /// Done automatically before the first command and after any error; this forces one.
    pub async fn sync_delimited(&self) -> Result<(), AgentError> {
        self.sync().await
    }

    /// `guest-sync` (the older, undelimited sync) with `id`: returns the echoed id. Prefer
    /// [`sync_delimited`](Self::sync_delimited), which can skip junk on the channel.
    pub async fn guest_sync(&self, id: i64) -> Result<i64, AgentError> {
        let got: i64 = self
            .execute_typed("guest-sync", Some(json!({ "id": id })))
            .await?;
        if got != id {
            return Err(AgentError::Protocol {
                message: format!("guest-sync answered id {got}, sent {id}"),
                excerpt: String::new(),
            });
        }
        Ok(got)
    }

    /// `guest-ping`.
    pub async fn ping(&self) -> Result<(), AgentError> {
        self.execute("guest-ping", None).await.map(drop)
    }

    /// `guest-info`: version and the enabled state of every command.
    pub async fn info(&self) -> Result<AgentInfo, AgentError> {
        self.execute_typed("guest-info", None).await
    }

    /// `guest-get-time`: the guest's clock, in nanoseconds since the Unix epoch.
    pub async fn get_time(&self) -> Result<i64, AgentError> {
        self.execute_typed("guest-get-time", None).await
    }

    /// `guest-set-time`: set the guest clock to `nanos` since the epoch, or (with `None`)
    /// from the guest's RTC.
    pub async fn set_time(&self, nanos: Option<i64>) -> Result<(), AgentError> {
        let args = nanos.map(|t| json!({ "time": t }));
        self.execute("guest-set-time", args).await.map(drop)
    }

    /// `guest-shutdown` with `mode`. Sends no reply on success: see
    /// [`execute_no_reply`](Self::execute_no_reply) for how success is decided.
    pub async fn shutdown(&self, mode: ShutdownMode) -> Result<(), AgentError> {
        self.execute_no_reply("guest-shutdown", Some(json!({ "mode": mode })))
            .await
    }

    /// `guest-file-open`: opens `path` in the guest with `mode`.
    pub async fn file_open(
        &self,
        path: &str,
        mode: FileOpenMode,
    ) -> Result<FileHandle, AgentError> {
        self.execute_typed(
            "guest-file-open",
            Some(json!({ "path": path, "mode": mode.as_str() })),
        )
        .await
    }

    /// `guest-file-close`.
    pub async fn file_close(&self, handle: FileHandle) -> Result<(), AgentError> {
        self.execute("guest-file-close", Some(json!({ "handle": handle.0 })))
            .await
            .map(drop)
    }

    /// `guest-file-read` of at most `count` bytes (clamped to
    /// [`MAX_FILE_READ_CHUNK`]); the data comes back base64-decoded.
    pub async fn file_read(
        &self,
        handle: FileHandle,
        count: usize,
    ) -> Result<GuestFileRead, AgentError> {
        let count = count.min(MAX_FILE_READ_CHUNK);
        let reply = self
            .execute(
                "guest-file-read",
                Some(json!({ "handle": handle.0, "count": count })),
            )
            .await?;
        let read = GuestFileRead::from_reply(&reply).map_err(|message| AgentError::Protocol {
            message: format!("guest-file-read: {message}"),
            excerpt: String::new(),
        })?;
        if read.data.len() > count {
            return Err(AgentError::Protocol {
                message: format!(
                    "guest-file-read returned {} bytes, {count} asked",
                    read.data.len()
                ),
                excerpt: String::new(),
            });
        }
        Ok(read)
    }

    /// `guest-file-write` of `data` (sent base64-encoded).
    pub async fn file_write(
        &self,
        handle: FileHandle,
        data: &[u8],
    ) -> Result<GuestFileWrite, AgentError> {
        self.execute_typed(
            "guest-file-write",
            Some(
                json!({ "handle": handle.0, "buf-b64": base64_encode(data), "count": data.len() }),
            ),
        )
        .await
    }

    /// `guest-file-seek` to `offset` from `whence`.
    pub async fn file_seek(
        &self,
        handle: FileHandle,
        offset: i64,
        whence: SeekWhence,
    ) -> Result<GuestFileSeek, AgentError> {
        self.execute_typed(
            "guest-file-seek",
            Some(json!({ "handle": handle.0, "offset": offset, "whence": whence })),
        )
        .await
    }

    /// `guest-file-flush`.
    pub async fn file_flush(&self, handle: FileHandle) -> Result<(), AgentError> {
        self.execute("guest-file-flush", Some(json!({ "handle": handle.0 })))
            .await
            .map(drop)
    }

    /// `guest-fsfreeze-status`.
    pub async fn fsfreeze_status(&self) -> Result<FsFreezeStatus, AgentError> {
        self.execute_typed("guest-fsfreeze-status", None).await
    }

    /// `guest-fsfreeze-freeze`: returns the number of filesystems frozen.
    pub async fn fsfreeze_freeze(&self) -> Result<i64, AgentError> {
        self.execute_typed("guest-fsfreeze-freeze", None).await
    }

    /// `guest-fsfreeze-freeze-list`: freezes the filesystems mounted at `mountpoints` (all,
    /// with `None`); returns how many were frozen.
    pub async fn fsfreeze_freeze_list(
        &self,
        mountpoints: Option<&[&str]>,
    ) -> Result<i64, AgentError> {
        let args = mountpoints.map(|m| json!({ "mountpoints": m }));
        self.execute_typed("guest-fsfreeze-freeze-list", args).await
    }

    /// `guest-fsfreeze-thaw`: returns the number of filesystems thawed.
    pub async fn fsfreeze_thaw(&self) -> Result<i64, AgentError> {
        self.execute_typed("guest-fsfreeze-thaw", None).await
    }

    /// `guest-fstrim`, discarding free extents of at least `minimum` bytes (`None`: all).
    pub async fn fstrim(
        &self,
        minimum: Option<u64>,
    ) -> Result<GuestFilesystemTrimResponse, AgentError> {
        let args = minimum.map(|m| json!({ "minimum": m }));
        self.execute_typed("guest-fstrim", args).await
    }

    /// `guest-suspend-disk` (S4). No reply on success, see
    /// [`execute_no_reply`](Self::execute_no_reply); QEMU then shuts down.
    pub async fn suspend_disk(&self) -> Result<(), AgentError> {
        self.execute_no_reply("guest-suspend-disk", None).await
    }

    /// `guest-suspend-ram` (S3). No reply on success, see
    /// [`execute_no_reply`](Self::execute_no_reply); the domain's pm-suspended event confirms
    /// it.
    pub async fn suspend_ram(&self) -> Result<(), AgentError> {
        self.execute_no_reply("guest-suspend-ram", None).await
    }

    /// `guest-suspend-hybrid`. No reply on success, see
    /// [`execute_no_reply`](Self::execute_no_reply).
    pub async fn suspend_hybrid(&self) -> Result<(), AgentError> {
        self.execute_no_reply("guest-suspend-hybrid", None).await
    }

    /// `guest-network-get-interfaces`.
    pub async fn network_get_interfaces(&self) -> Result<Vec<GuestNetworkInterface>, AgentError> {
        self.execute_typed("guest-network-get-interfaces", None)
            .await
    }

    /// `guest-get-vcpus`: the guest's logical CPUs.
    pub async fn get_vcpus(&self) -> Result<Vec<GuestLogicalProcessor>, AgentError> {
        self.execute_typed("guest-get-vcpus", None).await
    }

    /// `guest-set-vcpus`: brings the listed CPUs on- or offline; returns how many of them
    /// (from the start of the list) were processed.
    pub async fn set_vcpus(&self, vcpus: &[GuestLogicalProcessor]) -> Result<i64, AgentError> {
        let vcpus: Vec<Value> = vcpus
            .iter()
            .map(|v| json!({ "logical-id": v.logical_id, "online": v.online }))
            .collect();
        self.execute_typed("guest-set-vcpus", Some(json!({ "vcpus": vcpus })))
            .await
    }

    /// `guest-get-memory-blocks`.
    pub async fn get_memory_blocks(&self) -> Result<Vec<GuestMemoryBlock>, AgentError> {
        self.execute_typed("guest-get-memory-blocks", None).await
    }

    /// `guest-set-memory-blocks`: brings the listed blocks on- or offline; one response per
    /// block.
    pub async fn set_memory_blocks(
        &self,
        blocks: &[GuestMemoryBlock],
    ) -> Result<Vec<GuestMemoryBlockResponse>, AgentError> {
        let blocks: Vec<Value> = blocks
            .iter()
            .map(|b| json!({ "phys-index": b.phys_index, "online": b.online }))
            .collect();
        self.execute_typed(
            "guest-set-memory-blocks",
            Some(json!({ "mem-blks": blocks })),
        )
        .await
    }

    /// `guest-get-memory-block-info`: the size of a memory block.
    pub async fn get_memory_block_info(&self) -> Result<GuestMemoryBlockInfo, AgentError> {
        self.execute_typed("guest-get-memory-block-info", None)
            .await
    }

    /// `guest-get-fsinfo`: the guest's mounted filesystems and the disks under them.
    pub async fn get_fsinfo(&self) -> Result<Vec<GuestFilesystemInfo>, AgentError> {
        self.execute_typed("guest-get-fsinfo", None).await
    }

    /// `guest-set-user-password` (the password is sent base64-encoded, never logged).
    pub async fn set_user_password(&self, request: &SetUserPassword) -> Result<(), AgentError> {
        self.execute("guest-set-user-password", Some(request.to_arguments()))
            .await
            .map(drop)
    }

    /// `guest-exec`: starts a program in the guest and returns its pid (poll it with
    /// [`exec_status`](Self::exec_status)).
    pub async fn exec(&self, request: &GuestExecRequest) -> Result<i64, AgentError> {
        let reply = self
            .execute("guest-exec", Some(request.to_arguments()))
            .await?;
        reply
            .get("pid")
            .and_then(Value::as_i64)
            .ok_or_else(|| AgentError::Protocol {
                message: "guest-exec reply without a pid".into(),
                excerpt: reply.to_string(),
            })
    }

    /// `guest-exec-status` of `pid`, with the captured output base64-decoded.
    pub async fn exec_status(&self, pid: i64) -> Result<GuestExecStatus, AgentError> {
        let reply = self
            .execute("guest-exec-status", Some(json!({ "pid": pid })))
            .await?;
        GuestExecStatus::from_reply(&reply).map_err(|message| AgentError::Protocol {
            message: format!("guest-exec-status: {message}"),
            excerpt: String::new(),
        })
    }
}

/// Ids for commands and syncs.
///
/// Sync ids are unpredictable so that a reply to another client's (or an earlier run's) sync
/// cannot be mistaken for ours; std's `RandomState` is randomly keyed per process, which is
/// enough for that without a dependency. They stay below 2^31 because qemu-ga parses them
/// as int and some agents (the Windows build) have been picky about large values.
#[derive(Debug)]
struct IdSource {
    counter: AtomicU64,
    random: std::collections::hash_map::RandomState,
}

impl IdSource {
    fn new() -> Self {
        Self {
            counter: AtomicU64::new(1),
            random: std::collections::hash_map::RandomState::new(),
        }
    }

    fn next_command_id(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed)
    }

    fn next_sync_id(&self) -> u64 {
        let mut h = self.random.build_hasher();
        h.write_u64(self.counter.fetch_add(1, Ordering::Relaxed));
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        // Never 0, never above i32::MAX.
        (h.finish() % 0x7fff_fffe) + 1
    }
}

#[cfg(test)]
mod tests {
    //! The client's channel logic against a scripted peer (a test double for qemu-ga's
    //! byte-level behaviour, taken from recorded 7.2 transcripts). Real qemu-ga is tested
    //! in tests/agent_host.rs.

    use super::*;
    use tokio::io::{AsyncBufReadExt, BufReader};

    fn fast() -> GuestAgentOptions {
        GuestAgentOptions {
            command_timeout: Duration::from_secs(30),
            sync_timeout: Duration::from_secs(30),
            no_reply_grace: Duration::from_millis(200),
            ..GuestAgentOptions::default()
        }
    }

    /// Reads one request line from the client; returns (had flush byte, JSON).
    async fn read_request(r: &mut BufReader<tokio::net::unix::OwnedReadHalf>) -> (bool, Value) {
        let mut line = Vec::new();
        r.read_until(b'\n', &mut line).await.expect("read");
        let flushed = line.first() == Some(&0xff);
        let json = if flushed { &line[1..] } else { &line[..] };
        (flushed, serde_json::from_slice(json).expect("json"))
    }

    #[tokio::test]
    async fn first_command_resyncs_past_junk_and_stale_replies() {
        let (client_end, peer_end) = UnixStream::pair().expect("pair");
        let (r, mut w) = peer_end.into_split();
        let mut r = BufReader::new(r);
        let agent = GuestAgent::from_stream(client_end, fast());
        let peer = tokio::spawn(async move {
            // Junk already queued before the client says anything.
            w.write_all(b"{\"return\": {}}\n{\"return\": 5, \"id\": 5}\n")
                .await
                .expect("w");
            let (flushed, sync) = read_request(&mut r).await;
            assert!(flushed, "resync starts with 0xFF");
            let id = sync["arguments"]["id"].as_u64().expect("sync id");
            // What qemu-ga 7.2 sends: a parse error for 0xFF, then the delimited reply.
            w.write_all(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\uFFFD'\"}}\n")
                .await
                .expect("w");
            w.write_all(b"\x00\n").await.expect("w"); // more junk
            let mut reply = vec![0xff];
            reply.extend_from_slice(format!("{{\"return\": {id}}}\n").as_bytes());
            w.write_all(&reply).await.expect("w");
            let (flushed, ping) = read_request(&mut r).await;
            assert!(!flushed);
            assert_eq!(ping["execute"], "guest-ping");
            let pid = ping["id"].clone();
            // A stale reply with another id first, then ours.
            w.write_all(format!("{{\"return\": {{}}, \"id\": 999999}}\n{{\"return\": {{\"ok\": 1}}, \"id\": {pid}}}\n").as_bytes())
                .await
                .expect("w");
        });
        let v = agent.execute("guest-ping", None).await.expect("ping");
        assert_eq!(v, json!({"ok": 1}));
        peer.await.expect("peer");
    }

    #[tokio::test]
    async fn no_reply_command_error_and_silence() {
        let (client_end, peer_end) = UnixStream::pair().expect("pair");
        let (r, mut w) = peer_end.into_split();
        let mut r = BufReader::new(r);
        let agent = GuestAgent::from_stream(client_end, fast());
        let peer = tokio::spawn(async move {
            for round in 0..2 {
                let (_, sync) = read_request(&mut r).await;
                let id = sync["arguments"]["id"].as_u64().expect("id");
                let mut reply = vec![0xff];
                reply.extend_from_slice(format!("{{\"return\": {id}}}\n").as_bytes());
                w.write_all(&reply).await.expect("w");
                let (_, cmd) = read_request(&mut r).await;
                assert_eq!(cmd["execute"], "guest-shutdown");
                if round == 0 {
                    // As qemu-ga 7.2 answers a disabled command: with the command's id.
                    let id = &cmd["id"];
                    w.write_all(format!("{{\"error\": {{\"class\": \"CommandNotFound\", \"desc\": \"Command guest-shutdown has been disabled\"}}, \"id\": {id}}}\n").as_bytes())
                        .await
                        .expect("w");
                }
                // Round 1: silence, as a real successful shutdown.
            }
            r // keep the socket open
        });
        match agent.shutdown(ShutdownMode::Powerdown).await {
            Err(AgentError::Unsupported { command, reason }) => {
                assert_eq!(command, "guest-shutdown");
                assert!(reason.contains("disabled"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // An explicit resync (the script expects one per round), then the same command
        // answered by silence: that is success.
        agent.sync().await.expect("sync");
        agent
            .shutdown(ShutdownMode::Powerdown)
            .await
            .expect("silence within grace = accepted");
        let _keep = peer.await.expect("peer");
    }

    #[tokio::test]
    async fn eof_is_disconnected_then_not_connected() {
        let (client_end, peer_end) = UnixStream::pair().expect("pair");
        let agent = GuestAgent::from_stream(client_end, fast());
        drop(peer_end);
        assert!(matches!(agent.ping().await, Err(AgentError::Disconnected)));
        assert!(matches!(
            agent.ping().await,
            Err(AgentError::NotConnected { .. })
        ));
    }

    /// Answers the next sync request (skipping anything else) with its id.
    async fn answer_sync(
        r: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
        w: &mut tokio::net::unix::OwnedWriteHalf,
    ) {
        loop {
            let (_, req) = read_request(r).await;
            if req["execute"] == "guest-sync-delimited" {
                let id = req["arguments"]["id"].as_u64().expect("id");
                let mut reply = vec![0xff];
                reply.extend_from_slice(format!("{{\"return\": {id}}}\n").as_bytes());
                w.write_all(&reply).await.expect("w");
                return;
            }
        }
    }

    /// Test double: a probe is answered by a peer that answers the sync and the ping, is
    /// `Silent` (bounded by its own timeout) when the peer reads and never answers, and
    /// `Busy` without sending anything while a call holds the channel.
    #[tokio::test]
    async fn probe_answered_silent_and_busy() {
        let (client_end, peer_end) = UnixStream::pair().expect("pair");
        let (r, mut w) = peer_end.into_split();
        let mut r = BufReader::new(r);
        let agent = GuestAgent::from_stream(client_end, fast());
        let (go_silent_tx, go_silent) = tokio::sync::oneshot::channel::<()>();
        let peer = tokio::spawn(async move {
            answer_sync(&mut r, &mut w).await;
            let (_, ping) = read_request(&mut r).await;
            assert_eq!(ping["execute"], "guest-ping");
            let id = &ping["id"];
            w.write_all(format!("{{\"return\": {{}}, \"id\": {id}}}\n").as_bytes())
                .await
                .expect("w");
            let _ = go_silent.await;
            // Silent from now on: read everything, answer nothing.
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut r, &mut sink).await;
        });
        assert_eq!(agent.probe(Duration::from_secs(30)).await, Probe::Answered);
        go_silent_tx.send(()).expect("peer");
        match agent.probe(Duration::from_millis(300)).await {
            Probe::Silent(why) => assert!(why.contains("no answer"), "{why}"),
            other => panic!("{other:?}"),
        }
        // A call holds the channel: the probe sends nothing.
        let held = agent.channel.lock().await;
        assert_eq!(agent.probe(Duration::from_secs(1)).await, Probe::Busy);
        drop(held);
        drop(agent);
        peer.abort();
    }

    /// Test double: a peer that floods a line without newline past the limit, then sends
    /// fake replies (no id, wrong id), then behaves.
    #[tokio::test]
    async fn hostile_peer_is_bounded_typed_and_resynced() {
        let (client_end, peer_end) = UnixStream::pair().expect("pair");
        let (r, mut w) = peer_end.into_split();
        let mut r = BufReader::new(r);
        let opts = GuestAgentOptions {
            max_reply_bytes: 64 * 1024,
            ..fast()
        };
        let agent = GuestAgent::from_stream(client_end, opts);
        let peer = tokio::spawn(async move {
            answer_sync(&mut r, &mut w).await;
            let (_, cmd) = read_request(&mut r).await;
            assert_eq!(cmd["execute"], "guest-get-time");
            // 1 MiB without a newline: over the 64 KiB limit.
            w.write_all(&vec![b'x'; 1 << 20]).await.expect("w");
            w.write_all(b"\n").await.expect("w");
            // The next command resyncs first; a fake reply without id, one with another id,
            // then the real one.
            answer_sync(&mut r, &mut w).await;
            let (_, cmd) = read_request(&mut r).await;
            let id = cmd["id"].clone();
            w.write_all(format!("{{\"return\": 1}}\n{{\"return\": 2, \"id\": 999999}}\n{{\"return\": 3, \"id\": {id}}}\n").as_bytes())
                .await
                .expect("w");
            // Unsolicited bytes while idle: the next command must resync first.
            w.write_all(b"\xff{\"return\": 77}\ngarbage\n")
                .await
                .expect("w");
            answer_sync(&mut r, &mut w).await;
            let (_, cmd) = read_request(&mut r).await;
            let id = cmd["id"].clone();
            w.write_all(format!("{{\"return\": 4, \"id\": {id}}}\n").as_bytes())
                .await
                .expect("w");
            (r, w)
        });
        match agent.get_time().await {
            Err(AgentError::Protocol { message, .. }) => {
                assert!(message.contains("65536"), "{message}")
            }
            other => panic!("over-long reply: {other:?}"),
        }
        assert_eq!(agent.get_time().await.expect("after resync"), 3);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(agent.get_time().await.expect("after unsolicited bytes"), 4);
        let _keep = peer.await.expect("peer");
    }

    /// Test double: an agent that is not up yet ignores the first syncs; the client keeps
    /// sending new ones until one is answered.
    #[tokio::test]
    async fn sync_is_retried_until_the_agent_is_up() {
        let (client_end, peer_end) = UnixStream::pair().expect("pair");
        let (r, mut w) = peer_end.into_split();
        let mut r = BufReader::new(r);
        let opts = GuestAgentOptions {
            sync_retry_interval: Duration::from_millis(100),
            ..fast()
        };
        let agent = GuestAgent::from_stream(client_end, opts);
        let peer = tokio::spawn(async move {
            for _ in 0..3 {
                let (flushed, req) = read_request(&mut r).await;
                assert!(flushed && req["execute"] == "guest-sync-delimited");
            }
            answer_sync(&mut r, &mut w).await;
            let (_, cmd) = read_request(&mut r).await;
            let id = cmd["id"].clone();
            w.write_all(format!("{{\"return\": {{}}, \"id\": {id}}}\n").as_bytes())
                .await
                .expect("w");
            (r, w)
        });
        agent.ping().await.expect("ping once the agent answers");
        let _keep = peer.await.expect("peer");
    }

    /// A hung agent holds the channel; another caller waits at most its own timeout.
    #[tokio::test]
    async fn waiting_for_a_hung_call_is_bounded() {
        let (client_end, peer_end) = UnixStream::pair().expect("pair");
        let agent = std::sync::Arc::new(GuestAgent::from_stream(client_end, fast()));
        let hung = {
            let agent = agent.clone();
            tokio::spawn(async move { agent.ping().await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t0 = std::time::Instant::now();
        match agent
            .execute_with_timeout("guest-ping", None, Duration::from_millis(200))
            .await
        {
            Err(AgentError::Timeout { .. }) => {}
            other => panic!("{other:?}"),
        }
        assert!(t0.elapsed() < Duration::from_secs(2));
        hung.abort();
        drop(peer_end);
    }

    #[test]
    fn sync_ids_are_in_range_and_differ() {
        let ids = IdSource::new();
        let a: Vec<u64> = (0..100).map(|_| ids.next_sync_id()).collect();
        assert!(a.iter().all(|&id| (1..=0x7fff_ffff).contains(&id)));
        let mut dedup = a.clone();
        dedup.sort_unstable();
        dedup.dedup();
        assert!(dedup.len() > 90);
    }
}
