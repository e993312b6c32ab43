//! `domkit event --loop` across domkitd restarts, on real QEMU (TCG) with the repo's test
//! guest, a real domkitd process and its real socket, and the real `domkit` CLI binary.
//!
//! `event_loop_survives_daemon_kills_mid_save` and `_mid_shutdown`: one CLI client follows
//! a domain's events while domkitd is SIGKILLed and restarted twice:
//! - between operations: the client reconnects by itself and resumes right after the last
//!   event it printed: every event once, in order, no gap (nothing happened while the
//!   daemon was away);
//! - in the middle of an operation (`domkit save`; `domkit shutdown --wait completed`),
//!   killed once it is on record in the domain's durable status (and for the save, once
//!   its first event is out): the CLI caller fails
//!   instead of hanging, the restarted daemon ends the operation consistently (§11.4: the
//!   save cancelled or committed; the shutdown completed), the definition is intact, and
//!   the followed stream accounts for every `seq` exactly once (an event, or a gap naming
//!   what no daemon saw); the same history replayed with `--since` matches.

mod common;

use common::{account, cli, cli_ok, Daemon, Dirs, Follower};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Every domkitd log of the test (one file per daemon process) and the QEMU logs.
fn all_logs(root: &Path) -> String {
    let mut text = String::new();
    let mut files: Vec<_> = walk(root);
    files.sort();
    for f in files {
        let name = f.display().to_string();
        if name.ends_with(".log") && !name.ends_with("serial.log") {
            text += &format!(
                "== {name}\n{}\n",
                std::fs::read_to_string(&f).unwrap_or_default()
            );
        }
    }
    text
}

/// `domkit event NAME --since SEQ --json`: the journaled history after `seq`.
fn replay(sock: &Path, name: &str, seq: u64) -> Vec<serde_json::Value> {
    cli_ok(
        sock,
        &["event", name, "--since", &seq.to_string(), "--json"],
    )
    .lines()
    .map(|l| serde_json::from_str(l).unwrap())
    .collect()
}

/// The first `seq` the follower accounts for, once it printed something; every seq between
/// the test's cursor `s0` and it must be a guest agent event: the agent connects on its own
/// schedule after boot (§13.4), so its event may fall after `s0` and before the follower's
/// live subscription took its own cursor.
fn follower_start(sock: &Path, name: &str, s0: u64, entries: &[serde_json::Value]) -> u64 {
    let first = match entries.first() {
        Some(e) => match e.get("gap") {
            Some(g) => g["first_missing"].as_u64().unwrap(),
            None => e["seq"].as_u64().unwrap(),
        },
        None => panic!("the follower printed nothing"),
    };
    assert!(
        first > s0,
        "the follower starts after the cursor {s0}: {entries:?}"
    );
    let history = replay(sock, name, s0);
    for e in history
        .iter()
        .filter(|e| e["seq"].as_u64().is_some_and(|q| q < first))
    {
        assert!(
            e["event"].as_str().is_some_and(|k| k.starts_with("agent_")),
            "only agent events fall between the cursor {s0} and the follower's start {first}: {history:?}"
        );
    }
    first
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

async fn seq_of(c: &mut domkitd::client::Client, name: &str) -> u64 {
    c.info(common::by_name(name))
        .await
        .unwrap()
        .into_inner()
        .seq
}

/// The operation domkitd is SIGKILLed in the middle of.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mid {
    /// `domkit save`, killed once the save is on record (`in_flight: save`).
    Save,
    /// `domkit shutdown --wait completed`, killed once the request is on record (state
    /// `shutting_down`).
    Shutdown,
}

#[tokio::test]
async fn event_loop_survives_daemon_kills_mid_save() {
    follow_across_kills(Mid::Save).await;
}

/// Found a driver bug (§11.4, fixed by persisting the lifecycle's `pending_end`): the test
/// guest powers off within milliseconds of the ACPI request, the QEMU driver then quits QEMU,
/// and a kill between that quit and the exit being recorded left `status.json` at
/// `shutting_down(user)` with QEMU gone, which the next daemon called `shutoff(crashed)`.
#[tokio::test]
async fn event_loop_survives_daemon_kills_mid_shutdown() {
    follow_across_kills(Mid::Shutdown).await;
}

/// Follow `rs1`'s events with the CLI while domkitd is killed between operations, then in
/// the middle of `mid`; check the followed stream, the end state, the definition.
async fn follow_across_kills(mid: Mid) {
    let daemon = Daemon::start(Dirs::new(), &[]);
    let sock = daemon.socket.clone();
    let config = daemon.dirs.root.path().join("rs1.toml");
    std::fs::write(&config, common::guest_toml("rs1")).unwrap();
    cli_ok(&sock, &["define", &config.display().to_string()]);
    cli_ok(&sock, &["start", "rs1"]);
    common::wait_guest_ready(&daemon.dirs.serial_log("rs1"), 1).await;

    // The agent connects on its own schedule after boot (§13.4): wait for it, so that its
    // event does not fall while no daemon runs (the next daemon would reconcile it into a
    // gap, which phase 1 says cannot happen).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !replay(&sock, "rs1", 0)
        .iter()
        .any(|e| e["event"] == "agent_connected")
    {
        assert!(Instant::now() < deadline, "the guest agent never connected");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut c = daemon.client().await;
    let s0 = seq_of(&mut c, "rs1").await;
    // Subscribed (live: it takes the current seq first, then opens the stream).
    let mut follower = Follower::subscribed(&daemon, "rs1", Duration::from_secs(30));

    // Phase 1: a kill between operations. Nothing happens while no daemon runs: the
    // resumed stream has no gap.
    c.pause(common::by_name("rs1")).await.unwrap();
    c.resume(common::by_name("rs1")).await.unwrap();
    follower.wait_seq(s0 + 2, "before the first kill");
    let mut daemon = daemon;
    daemon.kill();
    // The follower is retrying now; give it a few attempts against no daemon.
    std::thread::sleep(Duration::from_millis(1000));
    let daemon = daemon.restart(&[]);
    let mut c = daemon.client().await;
    c.pause(common::by_name("rs1")).await.unwrap();
    c.resume(common::by_name("rs1")).await.unwrap();
    let s1 = seq_of(&mut c, "rs1").await;
    follower.wait_seq(s1, "after the first restart");
    let first = follower_start(&sock, "rs1", s0, &follower.entries());
    let (kinds, gaps) = account(&follower.entries(), first, s1);
    assert!(
        gaps.is_empty(),
        "no gap: the daemon missed nothing: {gaps:?}; history {:?}",
        replay(&sock, "rs1", 0)
    );
    assert_eq!(
        kinds,
        [
            "suspended(paused)",
            "resumed(unpaused)",
            "suspended(paused)",
            "resumed(unpaused)"
        ]
    );
    assert!(
        follower
            .stderr()
            .contains("reconnected to domkitd; resuming after seq"),
        "the follower says it reconnected: {}",
        follower.stderr()
    );

    // Phase 2: a kill in the middle of an operation, once it is on record in the domain's
    // durable status (as conformance `manager_killed_mid_save`/`_mid_shutdown` do).
    let save = daemon
        .dirs
        .root
        .path()
        .join("rs1.save")
        .display()
        .to_string();
    let (args, on_record, ends): (Vec<&str>, &str, &[&str]) = match mid {
        Mid::Save => (
            vec!["save", "rs1", &save],
            "\"operation\":\"save\"",
            &["running (save_canceled)", "shutoff (saved)"],
        ),
        Mid::Shutdown => (
            vec!["shutdown", "rs1", "--wait", "completed", "--timeout", "120"],
            "shutting_down",
            &["shutoff (shutdown)"],
        ),
    };
    let uuid = c
        .info(common::by_name("rs1"))
        .await
        .unwrap()
        .into_inner()
        .id
        .unwrap()
        .uuid;
    let status = daemon
        .dirs
        .state()
        .join("qemu")
        .join("domains")
        .join(format!("{uuid}.status.json"));
    let caller = {
        let sock = sock.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        std::thread::spawn(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cli(&sock, &args)
        })
    };
    // A save is under way once its first event is out (the record precedes it; killed
    // earlier, the save has not touched the domain yet and nothing changes).
    let under_way = |f: &Follower| match mid {
        Mid::Save => f
            .entries()
            .iter()
            .any(|e| e["event"] == "suspended" && e["detail"] == "saving"),
        Mid::Shutdown => false,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(std::fs::read_to_string(&status)
        .unwrap_or_default()
        .contains(on_record)
        && (mid != Mid::Save || under_way(&follower)))
    {
        assert!(
            Instant::now() < deadline,
            "{} never recorded the {mid:?}",
            status.display()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut daemon = daemon;
    daemon.kill();
    let (code, out, err) = caller.join().unwrap();
    assert_ne!(
        code, 0,
        "the caller of the cut {mid:?} fails, not hangs: {out}{err}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let daemon = daemon.restart(&[]);
    let mut c = daemon.client().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let end = loop {
        let state = common::state_of(&mut c, "rs1").await;
        if ends.contains(&state.as_str()) {
            break state;
        }
        if Instant::now() >= deadline || state.starts_with("shutoff") {
            panic!(
                "rs1 is {state}, not one of {ends:?}, after the kill mid-{mid:?}; \
                 events {:?}; daemon logs:\n{}",
                follower.entries(),
                all_logs(daemon.dirs.root.path())
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let s2 = seq_of(&mut c, "rs1").await;
    follower.wait_seq(s2, "after the second restart");
    let entries = follower.entries();
    let (kinds, gaps) = account(&entries, first, s2);
    let started = match mid {
        Mid::Save => "suspended(saving)",
        Mid::Shutdown => "shutdown_requested(host)",
    };
    // The start is an event, or inside a gap after s1: the killed daemon produced it (the
    // durable status has it) but was killed before its journal had it.
    assert!(
        kinds.iter().any(|k| k == started) || gaps.iter().any(|&(a, _)| a > s1),
        "the start ({started}) is accounted for: {kinds:?} {gaps:?}"
    );
    // The end is an event, seen by the new daemon (reconciled on reattach, journaled from
    // the domain's kept events, or live); nothing else is missing.
    let ended = common::end_event(&end);
    assert!(
        kinds.iter().any(|k| k == ended),
        "the end ({end}) is accounted for: {kinds:?} {gaps:?}"
    );
    // The definition survived both kills.
    assert!(cli_ok(&sock, &["list", "--all"]).contains("rs1"));

    // The same history replayed from the follower's start: the same entries.
    let replay = replay(&sock, "rs1", first - 1);
    let strip = |v: &[serde_json::Value]| -> Vec<String> {
        v.iter()
            .map(|e| match e.get("gap") {
                Some(g) => format!("gap {}..={}", g["first_missing"], g["last_missing"]),
                None => format!("{} {} {}", e["seq"], e["event"], e["detail"]),
            })
            .collect()
    };
    eprintln!("followed across two kills: {:?}", strip(&entries));
    eprintln!("follower stderr:\n{}", follower.stderr());
    assert_eq!(strip(&replay), strip(&entries), "live and replayed agree");
    drop(follower);

    if end == "running (save_canceled)" {
        c.destroy(common::by_name("rs1")).await.unwrap();
    }
    c.undefine(common::by_name("rs1")).await.unwrap();
}
