//! The raw baseline: a blocking QMP client with no abstraction at all.
//!
//! One command is "write one line, read lines until the reply": the practical limit of a
//! QMP client, since QEMU handles one command of a monitor at a time (pipelining cannot
//! beat it). Replies are recognised by their first bytes, never parsed; only an event whose
//! latency is measured is parsed, after the clock was read. The fan-out baseline drives N
//! such connections from one thread with `poll(2)`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde_json::Value;

/// `query-status`, as the raw client sends it.
pub const QUERY_STATUS: &[u8] = b"{\"execute\":\"query-status\"}\n";
const CAPABILITIES: &[u8] = b"{\"execute\":\"qmp_capabilities\"}\n";
/// `cont`.
pub const CONT: &[u8] = b"{\"execute\":\"cont\"}\n";
/// `stop`.
pub const STOP: &[u8] = b"{\"execute\":\"stop\"}\n";
const QUIT: &[u8] = b"{\"execute\":\"quit\"}\n";

/// How long any raw read may block before the bench gives up (a hung QEMU is a failure,
/// not a figure).
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// QEMU events start with their timestamp; replies with `return` or `error`.
fn is_event(line: &[u8]) -> bool {
    line.starts_with(b"{\"timestamp\"")
}

/// A blocking QMP connection.
#[derive(Debug)]
pub struct RawQmp {
    write: UnixStream,
    read: BufReader<UnixStream>,
    line: Vec<u8>,
}

impl RawQmp {
    /// Connects to a listening monitor and negotiates.
    pub fn connect(path: &Path) -> io::Result<RawQmp> {
        Self::negotiate(UnixStream::connect(path)?)
    }

    /// Reads the greeting and sends `qmp_capabilities` over an open connection.
    pub fn negotiate(stream: UnixStream) -> io::Result<RawQmp> {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        let mut qmp = RawQmp {
            read: BufReader::new(stream.try_clone()?),
            write: stream,
            line: Vec::with_capacity(512),
        };
        qmp.read_line()?; // greeting
        qmp.cmd(CAPABILITIES)?;
        Ok(qmp)
    }

    fn read_line(&mut self) -> io::Result<()> {
        self.line.clear();
        if self.read.read_until(b'\n', &mut self.line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    /// Sends one command line and reads up to its reply (events before it are skipped).
    pub fn cmd(&mut self, command: &[u8]) -> io::Result<()> {
        self.write.write_all(command)?;
        loop {
            self.read_line()?;
            if !is_event(&self.line) {
                if self.line.starts_with(b"{\"error\"") {
                    return Err(io::Error::other(
                        String::from_utf8_lossy(&self.line).into_owned(),
                    ));
                }
                return Ok(());
            }
        }
    }

    /// Sends `command` and returns the latency of `event` (QEMU's timestamp to the moment
    /// this client read its line), in microseconds. QEMU sends STOP/RESUME before the
    /// reply, but both orders are handled.
    pub fn cmd_event_latency(&mut self, command: &[u8], event: &str) -> io::Result<f64> {
        self.write.write_all(command)?;
        let mut latency = None;
        let mut replied = false;
        while latency.is_none() || !replied {
            self.read_line()?;
            if is_event(&self.line) {
                let now = SystemTime::now();
                let v: Value = serde_json::from_slice(&self.line)?;
                if v["event"] == event {
                    latency = Some(qemu_event_age_us(&v, now));
                }
            } else {
                replied = true;
            }
        }
        Ok(latency.unwrap_or(f64::NAN))
    }

    /// `quit`, tolerating QEMU closing the socket before the reply.
    pub fn quit(mut self) {
        if self.write.write_all(QUIT).is_ok() {
            let _ = self.read_line();
        }
    }
}

/// Microseconds from an event's QEMU timestamp (wall clock, as QEMU stamps it) to `now`.
pub fn qemu_event_age_us(event: &Value, now: SystemTime) -> f64 {
    let ts = &event["timestamp"];
    let qemu_us =
        ts["seconds"].as_i64().unwrap_or(0) * 1_000_000 + ts["microseconds"].as_i64().unwrap_or(0);
    let now_us = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    (now_us - qemu_us) as f64
}

/// Milestones of one raw start: spawn -> monitor negotiated -> running, then quit -> gone.
#[derive(Debug, Clone, Copy)]
pub struct RawStart {
    /// Spawn to QMP negotiated.
    pub qmp_ready: Duration,
    /// Spawn to `cont` answered (vCPUs running).
    pub running: Duration,
    /// `quit` sent to the process reaped.
    pub destroy: Duration,
}

/// Starts `argv` the bare way (bind, spawn with the listener inherited, connect, negotiate,
/// `cont`), then ends it with `quit` and `waitpid`: the same steps as domkit's launch.
pub fn start_and_quit(argv: &[String], qmp_socket: &Path, log: &Path) -> anyhow::Result<RawStart> {
    let _ = std::fs::remove_file(qmp_socket);
    let listener = UnixListener::bind(qmp_socket)?;
    let t0 = Instant::now();
    let mut child = super::qemu::spawn_qemu_with_monitor(argv, log, &listener)?;
    drop(listener);
    let result = (|| -> anyhow::Result<RawStart> {
        let mut qmp = RawQmp::connect(qmp_socket)?;
        let qmp_ready = t0.elapsed();
        qmp.cmd(CONT)?;
        let running = t0.elapsed();
        let t1 = Instant::now();
        qmp.quit();
        child.wait()?;
        Ok(RawStart {
            qmp_ready,
            running,
            destroy: t1.elapsed(),
        })
    })();
    if result.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_file(qmp_socket);
    result
}

/// N raw connections driven from one thread with `poll(2)`: the fan-out baseline.
#[derive(Debug, Default)]
pub struct RawFanout {
    conns: Vec<UnixStream>,
    bufs: Vec<Vec<u8>>,
}

impl RawFanout {
    /// Adds a negotiated connection.
    pub fn push(&mut self, qmp: RawQmp) {
        // Nothing is buffered after negotiation (QEMU sends nothing unasked while paused).
        self.conns.push(qmp.write);
        self.bufs.push(Vec::with_capacity(256));
    }

    /// Number of connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Sends `query-status` on every connection, then polls until every reply is in.
    pub fn query_all(&mut self) -> io::Result<Duration> {
        let t0 = Instant::now();
        for c in &mut self.conns {
            c.write_all(QUERY_STATUS)?;
        }
        let mut pending: Vec<usize> = (0..self.conns.len()).collect();
        let mut chunk = [0u8; 4096];
        while !pending.is_empty() {
            let mut fds: Vec<PollFd<'_>> = pending
                .iter()
                .map(|&i| PollFd::new(self.conns[i].as_fd(), PollFlags::POLLIN))
                .collect();
            if poll(
                &mut fds,
                PollTimeout::try_from(30_000).map_err(io::Error::other)?,
            )? == 0
            {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "fan-out reply missing",
                ));
            }
            let ready: Vec<bool> = fds
                .iter()
                .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                .collect();
            drop(fds);
            let mut still = Vec::with_capacity(pending.len());
            for (k, &i) in pending.iter().enumerate() {
                if !ready[k] {
                    still.push(i);
                    continue;
                }
                let n = self.conns[i].read(&mut chunk)?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                let buf = &mut self.bufs[i];
                buf.extend_from_slice(&chunk[..n]);
                if take_reply(buf) {
                    continue;
                }
                still.push(i);
            }
            pending = still;
        }
        Ok(t0.elapsed())
    }
}

/// Drops complete lines from `buf`; true if one of them was a reply.
fn take_reply(buf: &mut Vec<u8>) -> bool {
    let mut replied = false;
    while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
        if !is_event(&buf[..pos]) {
            replied = true;
        }
        buf.drain(..=pos);
    }
    replied
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_and_events_are_told_apart() {
        let mut buf = b"{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"STOP\"}\r\n{\"ret"
            .to_vec();
        assert!(!take_reply(&mut buf));
        buf.extend_from_slice(b"urn\": {}}\r\n");
        assert!(take_reply(&mut buf));
        assert!(buf.is_empty());
    }

    #[test]
    fn event_age() {
        let v: Value = serde_json::json!({"timestamp": {"seconds": 10, "microseconds": 5}});
        let now = SystemTime::UNIX_EPOCH + Duration::from_micros(10_000_105);
        assert_eq!(qemu_event_age_us(&v, now), 100.0);
    }
}
