//! The serial console as a byte stream (`docs/semantics.md` §12.4): several readers, one
//! writer at a time, ended when the domain stops.
//!
//! A backend owns one [`ConsoleHub`] per running instance and pumps bytes between it and the
//! hypervisor's console (QEMU: a chardev socket; Xen: the console pty): what the guest
//! prints goes to [`ConsoleHub::publish`], what the writer types comes out of the receiver
//! [`ConsoleHub::new`] returned. [`ConsoleHub::close`] (the instance ended) ends every
//! stream. Everything is bounded: the guest controls what it prints, so the output is kept in
//! one ring of [`CONSOLE_BUFFER_BYTES`] per console that every reader reads at its own
//! position; a reader that falls further behind loses the oldest bytes (counted in
//! [`ConsoleStream::lost_bytes`]) rather than making the manager buffer without limit.

use crate::{Error, Result};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::WatchStream;
use tokio_stream::Stream;
use tokio_util::sync::PollSender;

/// How many bytes of output a reader may fall behind before it loses the oldest: the size
/// of the one ring per console (allocated when the hub is made, i.e. on a console's first
/// stream). A serial port sends a byte at a time, so the ring counts bytes, not writes.
pub const CONSOLE_BUFFER_BYTES: usize = 64 * 1024;

/// The most a backend reads from its console at a time, and the largest chunk a write is
/// cut into.
pub const CONSOLE_CHUNK_MAX: usize = 4096;

/// How many chunks of input may wait for the backend (a writer faster than the guest's
/// console waits, it is not buffered without limit).
pub const CONSOLE_INPUT_CHUNKS: usize = 16;

/// What a console stream may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsoleAccess {
    /// Read only: any number of these at once.
    #[default]
    ReadOnly,
    /// Read and write: one at a time; the next is [`Error::Busy`] until it is dropped.
    ReadWrite,
}

/// The backend side of one instance's console.
#[derive(Debug)]
pub struct ConsoleHub {
    domain: String,
    output: Arc<Output>,
    input: mpsc::Sender<Bytes>,
    writer_taken: Arc<AtomicBool>,
}

/// The output ring shared by the hub and its readers.
#[derive(Debug)]
struct Output {
    ring: Mutex<Ring>,
    /// The ring's end offset, bumped on every publish and on close: readers wait on it.
    progress: watch::Sender<u64>,
}

#[derive(Debug)]
struct Ring {
    bytes: VecDeque<u8>,
    /// The absolute offset (bytes since the hub was made) of `bytes[0]`.
    start: u64,
    closed: bool,
}

impl Ring {
    fn end(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }
}

impl Output {
    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        // Only mutated by whole appends and trims: a poisoned lock still holds a ring.
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ConsoleHub {
    /// A hub for the console of `domain`, and the receiver of what its writer types (the
    /// backend forwards it to the guest; dropping it makes writes fail as broken pipe).
    pub fn new(domain: &str) -> (ConsoleHub, mpsc::Receiver<Bytes>) {
        let (input, input_rx) = mpsc::channel(CONSOLE_INPUT_CHUNKS);
        let (progress, _) = watch::channel(0);
        let hub = ConsoleHub {
            domain: domain.to_owned(),
            output: Arc::new(Output {
                ring: Mutex::new(Ring {
                    bytes: VecDeque::with_capacity(CONSOLE_BUFFER_BYTES),
                    start: 0,
                    closed: false,
                }),
                progress,
            }),
            input,
            writer_taken: Arc::new(AtomicBool::new(false)),
        };
        (hub, input_rx)
    }

    /// Give what the guest printed to every reader: appended to the ring, whose oldest
    /// bytes make room (a reader still behind them loses them).
    pub fn publish(&self, bytes: &[u8]) {
        let end = {
            let mut ring = self.output.ring();
            if ring.closed {
                return;
            }
            // Only the last CONSOLE_BUFFER_BYTES of a huge write can ever be read.
            let keep = &bytes[bytes.len().saturating_sub(CONSOLE_BUFFER_BYTES)..];
            let skipped = (bytes.len() - keep.len()) as u64;
            let overflow = (ring.bytes.len() + keep.len()).saturating_sub(CONSOLE_BUFFER_BYTES);
            ring.bytes.drain(..overflow);
            ring.start += overflow as u64;
            if skipped > 0 {
                // Everything kept before is older than the skipped bytes: gone too.
                let dropped = ring.bytes.len() as u64;
                ring.bytes.clear();
                ring.start += dropped + skipped;
            }
            ring.bytes.extend(keep);
            ring.end()
        };
        self.output.progress.send_replace(end);
    }

    /// Whether anyone reads.
    pub fn has_readers(&self) -> bool {
        self.output.progress.receiver_count() > 0
    }

    /// End every stream (the instance ended): readers read what is left, then the end;
    /// writes fail.
    pub fn close(&self) {
        let end = {
            let mut ring = self.output.ring();
            ring.closed = true;
            ring.end()
        };
        self.output.progress.send_replace(end);
    }

    /// Whether [`ConsoleHub::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.output.ring().closed
    }

    /// A new stream on this console.
    ///
    /// Errors: [`Error::Busy`] for [`ConsoleAccess::ReadWrite`] while another writer is
    /// attached; [`Error::NotFound`] once closed.
    pub fn open(&self, access: ConsoleAccess) -> Result<ConsoleStream> {
        let position = {
            let ring = self.output.ring();
            if ring.closed {
                return Err(Error::NotFound {
                    what: format!("console of domain {:?} (the domain stopped)", self.domain),
                });
            }
            ring.end()
        };
        let writer = match access {
            ConsoleAccess::ReadOnly => None,
            ConsoleAccess::ReadWrite => {
                if self
                    .writer_taken
                    .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    return Err(Error::Busy {
                        what: format!("console of domain {:?} (writer)", self.domain),
                        holder: "another read-write stream is attached: close it, or open this one read-only".into(),
                    });
                }
                Some(ConsoleWriter {
                    tx: PollSender::new(self.input.clone()),
                    _slot: WriterSlot(self.writer_taken.clone()),
                })
            }
        };
        Ok(ConsoleStream {
            output: self.output.clone(),
            progress: WatchStream::new(self.output.progress.subscribe()),
            position,
            lost_bytes: 0,
            writer,
            access,
        })
    }
}

/// Holds the hub's single writer slot; frees it when dropped.
#[derive(Debug)]
struct WriterSlot(Arc<AtomicBool>);

impl Drop for WriterSlot {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

#[derive(Debug)]
struct ConsoleWriter {
    tx: PollSender<Bytes>,
    _slot: WriterSlot,
}

/// One stream on a domain's serial console: [`AsyncRead`] yields what the guest prints
/// from the moment it was opened, [`AsyncWrite`] types into the guest (read-write streams
/// only). Reading returns end-of-file when the domain stopped.
pub struct ConsoleStream {
    output: Arc<Output>,
    /// Wakes the reader when the ring grew or closed.
    progress: WatchStream<u64>,
    /// The absolute offset of the next byte this stream reads.
    position: u64,
    lost_bytes: u64,
    writer: Option<ConsoleWriter>,
    access: ConsoleAccess,
}

impl std::fmt::Debug for ConsoleStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleStream")
            .field("access", &self.access)
            .field("position", &self.position)
            .field("lost_bytes", &self.lost_bytes)
            .finish_non_exhaustive()
    }
}

impl ConsoleStream {
    /// What this stream may do.
    pub fn access(&self) -> ConsoleAccess {
        self.access
    }

    /// How many bytes of output this reader lost by falling more than
    /// [`CONSOLE_BUFFER_BYTES`] behind (the backend's console log still has them).
    pub fn lost_bytes(&self) -> u64 {
        self.lost_bytes
    }

    /// Give up writing (frees the writer slot for another stream); reading goes on.
    pub fn release_writer(&mut self) {
        self.writer = None;
    }
}

impl AsyncRead for ConsoleStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            {
                let ring = this.output.ring();
                if this.position < ring.start {
                    this.lost_bytes += ring.start - this.position;
                    this.position = ring.start;
                }
                let end = ring.end();
                if this.position < end {
                    let from = (this.position - ring.start) as usize;
                    let n = ((end - this.position) as usize).min(buf.remaining());
                    let (front, back) = ring.bytes.as_slices();
                    if from < front.len() {
                        let first = &front[from..front.len().min(from + n)];
                        buf.put_slice(first);
                        buf.put_slice(&back[..n - first.len()]);
                    } else {
                        let at = from - front.len();
                        buf.put_slice(&back[at..at + n]);
                    }
                    this.position += n as u64;
                    return Poll::Ready(Ok(()));
                }
                if ring.closed {
                    return Poll::Ready(Ok(())); // end of file
                }
            }
            // Nothing new: wait for the next publish or close. The watch remembers what
            // this stream has seen, so one that happened since the check above wakes it.
            match Pin::new(&mut this.progress).poll_next(cx) {
                Poll::Ready(Some(_)) => continue,
                // The hub and its sender are gone: nothing more will come.
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

fn broken_pipe() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "the console is closed: the domain stopped",
    )
}

impl AsyncWrite for ConsoleStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let Some(writer) = self.writer.as_mut() else {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "this console stream is read-only (or its writer was released)",
            )));
        };
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        match writer.tx.poll_reserve(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => return Poll::Ready(Err(broken_pipe())),
            Poll::Pending => return Poll::Pending,
        }
        let n = buf.len().min(CONSOLE_CHUNK_MAX);
        match writer.tx.send_item(Bytes::copy_from_slice(&buf[..n])) {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(_) => Poll::Ready(Err(broken_pipe())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Handed to the backend's pump: nothing is held here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.writer = None;
        Poll::Ready(Ok(()))
    }
}
