//! Peers that run in their own process (python `qemu.qmp`, libvirt, and the scale
//! managers), driven one JSON line per request over stdin/stdout.
//!
//! A separate process per peer keeps the peers' memory apart (the scale bench reads each
//! manager's own RSS) and lets python peers run interleaved with domkit in the same run.
//! Every figure is measured inside the worker, around the measured call only.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// A running worker process.
#[derive(Debug)]
pub struct Worker {
    name: String,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    stderr_log: PathBuf,
    /// The worker's first line (its name and version).
    pub hello: Value,
}

impl Worker {
    /// Starts `cmd`; its stderr goes to `stderr_log`. Fails if its first line is not a
    /// successful hello (e.g. a Python module is missing).
    pub fn start(name: &str, mut cmd: Command, stderr_log: PathBuf) -> anyhow::Result<Worker> {
        let log = std::fs::File::create(&stderr_log)?;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting the {name} worker"))?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("worker stdout")?);
        let mut w = Worker {
            name: name.to_string(),
            child,
            stdin,
            stdout,
            stderr_log,
            hello: Value::Null,
        };
        let hello = w.read_reply().context("worker hello")?;
        w.hello = hello;
        Ok(w)
    }

    fn read_reply(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            let err = std::fs::read_to_string(&self.stderr_log).unwrap_or_default();
            let tail: Vec<&str> = err.lines().rev().take(5).collect();
            bail!(
                "the {} worker exited: {}",
                self.name,
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            );
        }
        let v: Value = serde_json::from_str(&line)
            .with_context(|| format!("bad line from the {} worker: {line}", self.name))?;
        if v["ok"] != json!(true) {
            bail!("{} worker: {}", self.name, v["error"]);
        }
        Ok(v)
    }

    /// Sends one request and waits for its reply.
    pub fn call(&mut self, request: Value) -> anyhow::Result<Value> {
        self.send(&request)?;
        self.recv()
    }

    /// Sends one request without waiting (several workers can then work at once).
    pub fn send(&mut self, request: &Value) -> anyhow::Result<()> {
        let mut line = serde_json::to_string(request)?;
        line.push('\n');
        self.stdin.write_all(line.as_bytes())?;
        self.stdin.flush()?;
        Ok(())
    }

    /// Waits for the reply to the request sent last.
    pub fn recv(&mut self) -> anyhow::Result<Value> {
        self.read_reply()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Ask politely (the worker disconnects and cleans up), then insist.
        let _ = self.stdin.write_all(b"{\"op\": \"close\"}\n");
        let _ = self.stdin.flush();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => break,
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
