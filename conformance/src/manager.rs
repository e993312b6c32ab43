//! A manager in a process of its own, for the durable-domain scenarios (§11): the scenario
//! starts `domkit --connect URI manager --state-dir S --runtime-dir R`, drives it with one
//! JSON request per line on its stdin, reads one JSON answer per line on its stdout, and
//! SIGKILLs it. Both halves of the protocol are here: [`serve`] (run by the `domkit` CLI on
//! any [`Driver`]) and [`ManagerProcess`] (used by the scenarios).
//!
//! Requests: `{"op": "define", "config": {...}}`, `{"op": "start", "name": N, "paused": B}`,
//! `{"op": "pause"|"resume"|"destroy", "name": N}`, `{"op": "save", "name": N, "path": P}`,
//! `{"op": "shutdown", "name": N, "timeout_s": T}`, `{"op": "state", "name": N}` (answer:
//! `state`, `seq`), `{"op": "list"}` (answer: `names`). Every answer has `ok`; a failure has `error` and `kind` (the error's
//! Debug form). The first line is `{"ready": true, "pid": P}` once the driver is open, or
//! `{"ready": false, "error": ..., "kind": ...}` and exit status 1.

use domkit_core::{
    Domain, DomainConfig, Driver, RestoreOptions, ShutdownOptions, ShutdownWait, StartOptions,
};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;
use tokio::io::AsyncBufReadExt;

fn say(v: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// Report that opening the driver failed (first line) — the caller exits with status 1.
pub fn refuse(error: &domkit_core::Error) {
    say(&json!({"ready": false, "error": error.to_string(), "kind": format!("{error:?}")}));
}

/// Serve requests on stdin until it closes (the process then exits: an ephemeral driver's
/// domains die with it; a persistent one's stay).
pub async fn serve<D: Driver>(driver: D) -> std::io::Result<()> {
    say(&json!({"ready": true, "pid": std::process::id()}));
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        let answer = match serde_json::from_str::<Value>(&line) {
            Ok(req) => handle(&driver, &req).await,
            Err(e) => Err(format!("bad request {line:?}: {e}").into()),
        };
        say(&match answer {
            Ok(mut v) => {
                v["ok"] = json!(true);
                v
            }
            Err(e) => {
                let kind = e
                    .downcast_ref::<domkit_core::Error>()
                    .map(|e| format!("{e:?}"))
                    .unwrap_or_default();
                json!({"ok": false, "error": e.to_string(), "kind": kind})
            }
        });
    }
    Ok(())
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

async fn handle<D: Driver>(driver: &D, req: &Value) -> Result<Value, Failure> {
    let op = req["op"].as_str().unwrap_or("");
    if op == "define" {
        let config: DomainConfig = serde_json::from_value(req["config"].clone())?;
        let d = driver.define(config).await?;
        return Ok(json!({"uuid": d.id().uuid}));
    }
    if op == "list" {
        let names: Vec<String> = driver
            .list()
            .await?
            .into_iter()
            .map(|i| i.id.name)
            .collect();
        return Ok(json!({ "names": names }));
    }
    let name = req["name"].as_str().unwrap_or("");
    let d = driver.lookup_by_name(name).await?;
    match op {
        "start" => {
            let paused = req["paused"].as_bool().unwrap_or(false);
            d.start(StartOptions { paused }).await?
        }
        "pause" => d.pause().await?,
        "resume" => d.resume().await?,
        "destroy" => d.destroy().await?,
        "save" => {
            d.save(Path::new(req["path"].as_str().unwrap_or("")))
                .await?
        }
        "restore" => {
            d.restore(
                Path::new(req["path"].as_str().unwrap_or("")),
                RestoreOptions::default(),
            )
            .await?
        }
        "shutdown" => {
            let secs = req["timeout_s"].as_u64().unwrap_or(60);
            let outcome = d
                .shutdown(ShutdownOptions {
                    wait: ShutdownWait::Completed,
                    timeout: Duration::from_secs(secs),
                    ..ShutdownOptions::default()
                })
                .await?;
            return Ok(json!({ "outcome": outcome }));
        }
        "state" => {
            let snap = d.snapshot();
            return Ok(json!({"state": snap.state, "seq": snap.seq}));
        }
        other => return Err(format!("unknown op {other:?}").into()),
    }
    Ok(json!({}))
}

/// The `domkit` binary that serves as the manager: `$DOMKIT_BIN`, else this process if it
/// is `domkit` (the CLI running the suite), else `domkit` beside the target directory of
/// this test binary (`cargo test --workspace` builds it).
pub fn domkit_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("DOMKIT_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    if exe.file_name().is_some_and(|n| n == "domkit") {
        return Ok(exe);
    }
    let mut dir = exe.parent();
    while let Some(d) = dir {
        let candidate = d.join("domkit");
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent();
        if d.file_name().is_some_and(|n| n == "target") {
            break;
        }
    }
    Err(format!(
        "no `domkit` binary next to {} (build it: cargo build -p domkit-examples, or set \
         DOMKIT_BIN)",
        exe.display()
    ))
}

/// A running manager process (see the module docs).
pub struct ManagerProcess {
    child: Child,
    stdin: ChildStdin,
    out: BufReader<ChildStdout>,
    /// Its pid.
    pub pid: u32,
}

impl std::fmt::Debug for ManagerProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagerProcess")
            .field("pid", &self.pid)
            .finish()
    }
}

impl ManagerProcess {
    /// Start `command` (a `domkit ... manager ...` command line) and wait until it is
    /// ready; `Err` with its answer if it refused to open (e.g. `RootInUse`).
    pub fn spawn(mut command: Command) -> Result<ManagerProcess, Value> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| json!({"ready": false, "error": format!("spawning the manager: {e}")}))?;
        let stdin = child.stdin.take().expect("piped stdin");
        let out = BufReader::new(child.stdout.take().expect("piped stdout"));
        let pid = child.id();
        let mut m = ManagerProcess {
            child,
            stdin,
            out,
            pid,
        };
        let ready = m.read();
        if ready["ready"] != true {
            let _ = m.child.wait();
            return Err(ready);
        }
        Ok(m)
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        match self.out.read_line(&mut line) {
            Ok(0) | Err(_) => json!({"ok": false, "error": "the manager closed its output"}),
            Ok(_) => serde_json::from_str(&line)
                .unwrap_or_else(|e| json!({"ok": false, "error": format!("{line:?}: {e}")})),
        }
    }

    /// Send a request without waiting for its answer (the manager will be killed during it).
    pub fn send(&mut self, request: Value) -> Result<(), String> {
        writeln!(self.stdin, "{request}")
            .and_then(|_| self.stdin.flush())
            .map_err(|e| format!("writing to the manager: {e}"))
    }

    /// Send a request and wait for its answer; `Err` unless it says `ok`.
    pub fn call(&mut self, request: Value) -> Result<Value, String> {
        self.send(request.clone())?;
        let answer = self.read();
        if answer["ok"] == true {
            Ok(answer)
        } else {
            Err(format!("manager: {request} -> {answer}"))
        }
    }

    /// SIGKILL the manager and reap it.
    pub fn sigkill(self) {
        // Drop does it.
    }
}

impl Drop for ManagerProcess {
    /// A manager is never left running: a scenario that stops early kills it (and the
    /// kernel releases its root lock at once).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
