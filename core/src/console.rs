//! The serial console as a byte stream (`docs/semantics.md` §12.4): several readers, one
//! writer at a time, ended when the domain stops.
//!
//! A backend owns one [`ConsoleHub`] per running instance and pumps bytes between it and the
//! hypervisor's console (QEMU: a chardev socket; Xen: the console pty): what the guest
//! prints goes to [`ConsoleHub::publish`], what the writer types comes out of the receiver
//! [`ConsoleHub::new`] returned. [`ConsoleHub::close`] (the instance ended) ends every
//! stream. Everything is bounded: the guest controls what it prints, so a reader that does
//! not keep up loses the oldest chunks (counted in [`ConsoleStream::lost_chunks`]) rather than
//! making the manager buffer without limit.

use crate::{Error, Result};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::Stream;
use tokio_util::sync::PollSender;

/// How many chunks of output a reader may fall behind before it loses the oldest.
pub const CONSOLE_OUTPUT_CHUNKS: usize = 64;

/// The largest chunk a backend should publish (it reads at most this much at a time), so a
/// lagging reader's ring holds at most `CONSOLE_OUTPUT_CHUNKS * CONSOLE_CHUNK_MAX` bytes.
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
    /// Taken by [`ConsoleHub::close`]: receivers then see the end of the stream.
    output: Mutex<Option<broadcast::Sender<Bytes>>>,
    input: mpsc::Sender<Bytes>,
    writer_taken: Arc<AtomicBool>,
}

impl ConsoleHub {
    /// A hub for the console of `domain`, and the receiver of what its writer types (the
    /// backend forwards it to the guest; dropping it makes writes fail as broken pipe).
    pub fn new(domain: &str) -> (ConsoleHub, mpsc::Receiver<Bytes>) {
        let (output, _) = broadcast::channel(CONSOLE_OUTPUT_CHUNKS);
        let (input, input_rx) = mpsc::channel(CONSOLE_INPUT_CHUNKS);
        let hub = ConsoleHub {
            domain: domain.to_owned(),
            output: Mutex::new(Some(output)),
            input,
            writer_taken: Arc::new(AtomicBool::new(false)),
        };
        (hub, input_rx)
    }

    fn output(&self) -> std::sync::MutexGuard<'_, Option<broadcast::Sender<Bytes>>> {
        // Only ever replaced whole: a poisoned lock still holds a consistent value.
        self.output.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Give what the guest printed to every reader (none: dropped, nothing is kept).
    pub fn publish(&self, bytes: Bytes) {
        if let Some(tx) = self.output().as_ref() {
            let _ = tx.send(bytes);
        }
    }

    /// Whether anyone reads (a backend may stop pumping output when nobody does).
    pub fn has_readers(&self) -> bool {
        self.output()
            .as_ref()
            .is_some_and(|tx| tx.receiver_count() > 0)
    }

    /// End every stream (the instance ended): readers see the end, writes fail.
    pub fn close(&self) {
        self.output().take();
    }

    /// Whether [`ConsoleHub::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.output().is_none()
    }

    /// A new stream on this console.
    ///
    /// Errors: [`Error::Busy`] for [`ConsoleAccess::ReadWrite`] while another writer is
    /// attached; [`Error::NotFound`] once closed.
    pub fn open(&self, access: ConsoleAccess) -> Result<ConsoleStream> {
        let rx = match self.output().as_ref() {
            Some(tx) => tx.subscribe(),
            None => {
                return Err(Error::NotFound {
                    what: format!("console of domain {:?} (the domain stopped)", self.domain),
                })
            }
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
            output: BroadcastStream::new(rx),
            current: Bytes::new(),
            lost_chunks: 0,
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
    output: BroadcastStream<Bytes>,
    /// The rest of the chunk being read.
    current: Bytes,
    lost_chunks: u64,
    writer: Option<ConsoleWriter>,
    access: ConsoleAccess,
}

impl std::fmt::Debug for ConsoleStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleStream")
            .field("access", &self.access)
            .field("lost_chunks", &self.lost_chunks())
            .finish_non_exhaustive()
    }
}

impl ConsoleStream {
    /// What this stream may do.
    pub fn access(&self) -> ConsoleAccess {
        self.access
    }

    /// How many chunks of output this reader lost by not keeping up (their bytes are gone
    /// from this stream; the backend's console log still has them).
    pub fn lost_chunks(&self) -> u64 {
        self.lost_chunks
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
        loop {
            if !self.current.is_empty() {
                let n = self.current.len().min(buf.remaining());
                let chunk = self.current.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            match Pin::new(&mut self.output).poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => self.current = chunk,
                Poll::Ready(Some(Err(BroadcastStreamRecvError::Lagged(n)))) => {
                    self.lost_chunks += n;
                }
                // The hub closed: end of file.
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
