//! Line framing shared by the guest agent and QMP (pure: bytes in, lines out).
//!
//! Both protocols send one JSON object per line. [`LineFramer`] cuts a byte stream into lines
//! with a hard cap on the length of one line, so a peer that never sends a newline (a hostile
//! guest on the agent channel, a broken QEMU on the monitor) cannot make the reader buffer
//! without bound. It lives here, in the lowest crate, so that driver-qemu's QMP codec and the
//! agent codec share one implementation.

/// The longest line accepted by default. `query-qmp-schema` is the largest QEMU 7.2 reply
/// (about 200 KiB); the cap only exists so a peer that never sends a newline cannot make the
/// reader buffer without bound.
pub const DEFAULT_MAX_LINE: usize = 64 * 1024 * 1024;

/// How many bytes of a bad line an error message quotes.
const EXCERPT_LEN: usize = 160;

/// A line was longer than the framer's limit; the stream cannot be trusted any more.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line longer than {limit} bytes without a newline")]
pub struct LineTooLong {
    /// The limit that was exceeded.
    pub limit: usize,
}

/// Splits a byte stream into newline-terminated lines.
///
/// Trailing `\r` is removed and empty lines are skipped. Bytes after the last newline stay
/// buffered until more input arrives.
///
/// The work is linear in the bytes pushed, however many lines arrive at once: taking a line
/// only advances a read offset, and the consumed prefix is compacted away (moving the
/// unconsumed rest to the front) only when it is at least as long as that rest, so every
/// byte moved is paid for by a consumed byte ([`LineFramer::bytes_moved`] counts them).
#[derive(Debug)]
pub struct LineFramer {
    buf: Vec<u8>,
    /// Where the unconsumed bytes start in `buf`; what is before is dead.
    start: usize,
    /// `buf[start..scanned]` is known to hold no newline, so a long line is scanned once.
    scanned: usize,
    max_line: usize,
    /// Bytes shifted by compaction so far.
    moved: u64,
}

impl Default for LineFramer {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_LINE)
    }
}

impl LineFramer {
    /// A framer that rejects lines longer than `max_line` bytes.
    pub fn new(max_line: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            max_line,
            moved: 0,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.compact();
        self.buf.extend_from_slice(bytes);
    }

    /// The bytes received but not yet returned as a line.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Total bytes shifted inside the buffer by compaction so far. It never exceeds the
    /// bytes consumed (returned as lines, skipped, or discarded), which is what keeps the
    /// framer linear; tests and fuzzers check it.
    pub fn bytes_moved(&self) -> u64 {
        self.moved
    }

    /// Takes the next complete line, without its terminator.
    ///
    /// Returns `Ok(None)` when no complete line is buffered yet, and an error when the
    /// buffered partial line already exceeds the limit (a trailing `\r` not counted: it may
    /// be half of the terminator). After `Ok(None)` at most `max_line + 1` bytes are
    /// buffered.
    pub fn next_line(&mut self) -> Result<Option<Vec<u8>>, LineTooLong> {
        loop {
            let Some(offset) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') else {
                self.scanned = self.buf.len();
                // A trailing '\r' may be the first half of the terminator: not counted, so
                // that the outcome does not depend on where the input was cut.
                let partial = &self.buf[self.start..];
                let len = partial.len() - usize::from(partial.last() == Some(&b'\r'));
                if len > self.max_line {
                    return Err(LineTooLong {
                        limit: self.max_line,
                    });
                }
                self.compact();
                return Ok(None);
            };
            let newline = self.scanned + offset;
            let begin = self.start;
            let mut end = newline;
            self.start = newline + 1;
            self.scanned = self.start;
            if end > begin && self.buf[end - 1] == b'\r' {
                end -= 1;
            }
            let line = &self.buf[begin..end];
            if line.len() > self.max_line {
                return Err(LineTooLong {
                    limit: self.max_line,
                });
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Ok(Some(line.to_vec()));
        }
    }

    /// Drops buffered bytes up to and including the first `delimiter`.
    ///
    /// Returns `true` if the delimiter was found. Otherwise every buffered byte is dropped
    /// (they all come before the delimiter that is still to arrive) and `false` is returned.
    pub fn discard_through(&mut self, delimiter: u8) -> bool {
        let found = match self.buf[self.start..].iter().position(|&b| b == delimiter) {
            Some(pos) => {
                self.start += pos + 1;
                true
            }
            None => {
                self.start = self.buf.len();
                false
            }
        };
        self.scanned = self.start;
        self.compact();
        found
    }

    /// Frees a large buffer once nothing is buffered, so an idle connection does not keep the
    /// memory of the largest message it ever received (small buffers are kept: freeing them
    /// would cost an allocation per message).
    pub fn release_if_empty(&mut self) {
        if self.start == self.buf.len() && self.buf.capacity() > 1024 {
            self.buf = Vec::new();
            self.start = 0;
            self.scanned = 0;
        }
    }

    /// Reclaims the consumed prefix once it is at least as long as the unconsumed rest, so
    /// the bytes moved never exceed the bytes consumed since the previous compaction.
    fn compact(&mut self) {
        let live = self.buf.len() - self.start;
        if self.start == 0 || self.start < live {
            return;
        }
        self.buf.copy_within(self.start.., 0);
        self.buf.truncate(live);
        self.scanned -= self.start;
        self.start = 0;
        self.moved += live as u64;
    }
}

/// A byte sequence that is not a message of the protocol (QMP or the guest agent's).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (bytes: {excerpt})")]
pub struct DecodeError {
    /// What was wrong.
    pub message: String,
    /// The start of the offending bytes, escaped for printing.
    pub excerpt: String,
}

impl DecodeError {
    /// An error about `bytes`, quoting their start.
    pub fn new(message: impl Into<String>, bytes: &[u8]) -> Self {
        Self {
            message: message.into(),
            excerpt: excerpt(bytes),
        }
    }
}

/// The start of `bytes` as printable text (non-printable bytes escaped), for error messages.
pub fn excerpt(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(EXCERPT_LEN)];
    let mut out: String = cut.escape_ascii().to_string();
    if bytes.len() > EXCERPT_LEN {
        out.push_str("...");
    }
    out
}
