//! The whole lifecycle through a real domkitd process and its real socket, on real QEMU
//! (TCG) with the repo's test guest: one guest boot per test, every check of the test on
//! that guest.
//!
//! - `cli_lifecycle`: every verb through the `domkit` CLI binary, errors with their exit
//!   codes and the library's messages, the event history resumed from a cursor.
//! - `grpc_kill_restart_cursor_cancel`: the gRPC client; two callers at once; domkitd
//!   SIGKILLed in the middle of a save and restarted (the domain is there, its seq goes on,
//!   what the daemon did not see is a gap marker); a caller that drops its request does
//!   not cancel the operation; events older than the retention are a gap marker; SIGTERM
//!   leaves the running domain alone and the next daemon finds it.

mod common;

use common::{cli, cli_ok, event_kinds, Daemon, Dirs};
use domkitd::pb;
use futures::StreamExt;
use std::time::Duration;

#[tokio::test]
async fn cli_lifecycle() {
    let daemon = Daemon::start(Dirs::new(), &[]);
    let sock = daemon.socket.clone();
    let config = daemon.dirs.root.path().join("vm.toml");
    std::fs::write(&config, common::guest_toml("cli1")).unwrap();
    let config = config.display().to_string();

    // Errors: the library's message, the documented exit code.
    let (code, _, err) = cli(&sock, &["dominfo", "nope"]);
    assert_eq!(code, 3, "not_found exits 3: {err}");
    assert!(
        err.contains(&domkit_core::Error::domain_not_found("nope").to_string()),
        "{err}"
    );
    let bad = daemon.dirs.root.path().join("bad.toml");
    std::fs::write(
        &bad,
        common::guest_toml("bad1").replace("memory_mib = 128", "memory_mib = 1"),
    )
    .unwrap();
    let (code, _, err) = cli(&sock, &["define", &bad.display().to_string()]);
    assert_eq!(code, 8, "invalid_config exits 8: {err}");
    assert!(err.contains("memory_mib = 1 is too small"), "{err}");

    assert!(cli_ok(&sock, &["define", &config]).contains("Domain 'cli1' defined"));
    let (code, _, err) = cli(&sock, &["define", &config]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("already exists"), "{err}");
    assert!(cli_ok(&sock, &["list", "--all"]).contains("cli1"));
    assert!(
        !cli_ok(&sock, &["list"]).contains("cli1"),
        "list shows active domains only"
    );
    assert_eq!(cli_ok(&sock, &["domstate", "cli1"]).trim(), "shutoff");
    let (code, _, err) = cli(&sock, &["suspend", "cli1"]);
    assert_eq!(code, 4, "invalid_state exits 4: {err}");

    cli_ok(&sock, &["start", "cli1"]);
    assert_eq!(
        cli_ok(&sock, &["domstate", "cli1", "--reason"]).trim(),
        "running (booted)"
    );
    let info = cli_ok(&sock, &["dominfo", "cli1"]);
    assert!(
        info.contains("Backend:") && info.contains("qemu") && info.contains("pid "),
        "{info}"
    );
    let info: serde_json::Value =
        serde_json::from_str(&cli_ok(&sock, &["dominfo", "cli1", "--json"])).unwrap();
    assert_eq!(info["memory_mib"], 128);
    cli_ok(&sock, &["suspend", "cli1"]);
    assert_eq!(
        cli_ok(&sock, &["domstate", "cli1", "--reason"]).trim(),
        "paused (user)"
    );
    cli_ok(&sock, &["resume", "cli1"]);
    common::wait_guest_ready(&daemon.dirs.serial_log("cli1"), 1).await;
    common::console_runs_a_command(&sock, "cli1");

    let save = daemon.dirs.root.path().join("cli1.save");
    let save = save.display().to_string();
    // On a terminal the wait shows a progress line (the domain's job, the bytes written),
    // cleared at the end; the result line goes to stdout as without a terminal.
    let (code, out, tty) = common::cli_tty_stderr(&sock, &["save", "cli1", &save]);
    assert_eq!(code, 0, "{out}{tty}");
    assert!(out.contains("Domain 'cli1' saved to"), "{out}");
    assert!(
        tty.contains("saving cli1"),
        "a progress line on the terminal: {tty:?}"
    );
    assert_eq!(
        cli_ok(&sock, &["domstate", "cli1", "--reason"]).trim(),
        "shutoff (saved)"
    );
    // Not a terminal: no progress line, stderr stays empty.
    let (code, out, err) = cli(&sock, &["restore", "cli1", &save]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.is_empty(), "no progress without a terminal: {err:?}");
    assert_eq!(
        cli_ok(&sock, &["domstate", "cli1", "--reason"]).trim(),
        "running (restored)"
    );
    // A restore starts a new QEMU, which may have started a new serial log: count from here.
    let readies = common::ready_count(&daemon.dirs.serial_log("cli1"));
    cli_ok(&sock, &["reset", "cli1"]);
    common::wait_guest_ready(&daemon.dirs.serial_log("cli1"), readies + 1).await;
    let out = cli_ok(
        &sock,
        &[
            "shutdown",
            "cli1",
            "--wait",
            "completed",
            "--timeout",
            "120",
        ],
    );
    assert!(out.contains("has been shut down"), "{out}");
    assert_eq!(
        cli_ok(&sock, &["domstate", "cli1", "--reason"]).trim(),
        "shutoff (shutdown)"
    );

    // The history, resumed from seq 0 of the domain: every event, in order, none twice.
    let history = cli_ok(&sock, &["event", "cli1", "--since", "0", "--json"]);
    assert_eq!(
        event_kinds(&history),
        [
            "defined",
            "started(booted)",
            "suspended(paused)",
            "resumed(unpaused)",
            "suspended(saving)",
            "stopped(saved)",
            "started(restored)",
            "rebooted",
            "shutdown_requested(host)",
            "stopped(shutdown)",
        ],
        "{history}"
    );
    // From a later cursor (the reboot's seq; agent events take seqs too): only what follows.
    let rebooted = history
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "rebooted")
        .and_then(|v| v["seq"].as_u64())
        .expect("the reboot in the history");
    let since = rebooted.to_string();
    let tail = cli_ok(&sock, &["event", "cli1", "--since", &since, "--json"]);
    assert_eq!(
        event_kinds(&tail),
        ["shutdown_requested(host)", "stopped(shutdown)"],
        "{tail}"
    );
    // A live wait ends at the next event (here: undefined).
    let waiter = {
        let sock = sock.clone();
        std::thread::spawn(move || cli(&sock, &["event", "cli1", "--timeout", "30"]))
    };
    std::thread::sleep(Duration::from_millis(500));
    cli_ok(&sock, &["undefine", "cli1"]);
    let (code, out, err) = waiter.join().unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("event undefined for domain cli1"), "{out}");
    let log = daemon.log_text();
    assert!(
        log.contains("op=\"start\"") || log.contains("op=start"),
        "one log line per operation: {log}"
    );
    assert!(
        log.contains("uid=0"),
        "the peer's credentials are logged: {log}"
    );
}

async fn define_guest(c: &mut domkitd::client::Client, name: &str) {
    c.define(pb::DefineRequest {
        config: common::guest_toml(name),
        format: pb::ConfigFormat::Toml as i32,
    })
    .await
    .expect("define");
}

fn kind_of(status: &tonic::Status) -> &'static str {
    domkitd::convert::detail_of(status)
        .map(|d| domkitd::convert::kind_name(d.kind))
        .unwrap_or("none")
}

#[tokio::test]
async fn grpc_kill_restart_cursor_cancel() {
    let retention = ["--journal-retention", "8"];
    let daemon = Daemon::start(Dirs::new(), &retention);
    let mut c = daemon.client().await;
    define_guest(&mut c, "g1").await;

    // Two callers at once: the operations are serialised; one starts the domain, the
    // other is refused as the library refuses a second start.
    let (a, b) = {
        let (mut c1, mut c2) = (daemon.client().await, daemon.client().await);
        let start = |paused| pb::StartRequest {
            domain: Some(common::by_name("g1")),
            paused,
        };
        tokio::join!(c1.start(start(false)), c2.start(start(false)))
    };
    let results = [a.map(|_| ()), b.map(|_| ())];
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    let refused = results.iter().find_map(|r| r.as_ref().err()).unwrap();
    assert_eq!(kind_of(refused), "invalid_state", "{refused:?}");
    common::wait_guest_ready(&daemon.dirs.serial_log("g1"), 1).await;

    let before = c.info(common::by_name("g1")).await.unwrap().into_inner();
    // SIGKILL in the middle of a save.
    let save = daemon.dirs.root.path().join("g1.save");
    let saver = {
        let mut c = daemon.client().await;
        let path = save.display().to_string();
        tokio::spawn(async move {
            c.save(pb::SaveRequest {
                domain: Some(common::by_name("g1")),
                path,
            })
            .await
        })
    };
    // The save is under way (it has touched the domain: paused for it, or done) before the
    // kill. Not its job showing: killed then, the save may not have started and nothing
    // changes; not the seq moving: the guest agent's events move it too (§13.4).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let info = c.info(common::by_name("g1")).await.unwrap().into_inner();
        let state = domkitd::convert::state_text(info.state.as_ref());
        if state == "paused (save)" || state == "shutoff (saved)" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the save never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut daemon = daemon;
    daemon.kill();
    assert!(
        saver.await.unwrap().is_err(),
        "the killed daemon did not answer"
    );
    let daemon = daemon.restart(&retention);
    let mut c = daemon.client().await;
    let after = c
        .info(common::by_name("g1"))
        .await
        .expect("g1 survived")
        .into_inner();
    assert_eq!(after.id, before.id, "same domain, same uuid");
    assert!(
        after.seq > before.seq,
        "seq went on: {} -> {}",
        before.seq,
        after.seq
    );
    let state = domkitd::convert::state_text(after.state.as_ref());
    assert!(
        state == "running (save_canceled)" || state == "shutoff (saved)",
        "a save cut by a kill ends cancelled or committed, not {state}"
    );

    // The domain's events after the last one seen before the kill: each seq once, in
    // order, what the daemon never saw as a gap; no hole, no duplicate.
    let mut stream = c
        .events(pb::EventsRequest {
            domain: Some(common::by_name("g1")),
            since: Some(before.seq),
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut next = before.seq + 1;
    while let Some(msg) = stream.next().await {
        match msg.unwrap().entry.unwrap() {
            pb::event_message::Entry::Event(ev) => {
                assert_eq!(ev.seq, next, "events in order, none twice");
                next += 1;
            }
            pb::event_message::Entry::Gap(gap) => {
                assert_eq!(
                    gap.first_missing, next,
                    "a gap starts where the events stop"
                );
                next = gap.last_missing + 1;
            }
        }
    }
    assert_eq!(
        next,
        after.seq + 1,
        "everything up to the current seq is accounted for"
    );

    // A caller that drops its request does not cancel the operation: it completes.
    let target_state = if state == "shutoff (saved)" {
        let mut c2 = daemon.client().await;
        let path = save.display().to_string();
        let call = tokio::spawn(async move {
            c2.restore(pb::RestoreRequest {
                domain: Some(common::by_name("g1")),
                path,
                paused: None,
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        call.abort();
        "running (restored)"
    } else {
        let mut c2 = daemon.client().await;
        let path = save.display().to_string();
        let call = tokio::spawn(async move {
            c2.save(pb::SaveRequest {
                domain: Some(common::by_name("g1")),
                path,
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        call.abort();
        "shutoff (saved)"
    };
    common::wait_state(&mut c, "g1", target_state, Duration::from_secs(120)).await;
    if target_state == "shutoff (saved)" {
        c.restore(pb::RestoreRequest {
            domain: Some(common::by_name("g1")),
            path: save.display().to_string(),
            paused: None,
        })
        .await
        .expect("restore");
    }
    // A few more events, so the retention (8 entries) is exceeded.
    for _ in 0..3 {
        c.pause(common::by_name("g1")).await.unwrap();
        c.resume(common::by_name("g1")).await.unwrap();
    }
    let mut stream = c
        .events(pb::EventsRequest {
            domain: None,
            since: Some(0),
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    match first.entry.unwrap() {
        pb::event_message::Entry::Gap(gap) => {
            assert!(gap.domain.is_none(), "a host-wide cursor range");
            assert_eq!(gap.first_missing, 1);
            assert!(
                gap.reason.contains("older than what domkitd keeps"),
                "{}",
                gap.reason
            );
        }
        other => panic!("a cursor older than the retention starts with a gap, not {other:?}"),
    }
    let mut stream = c
        .events(pb::EventsRequest {
            domain: Some(common::by_name("g1")),
            since: Some(0),
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    match stream.next().await.unwrap().unwrap().entry.unwrap() {
        pb::event_message::Entry::Gap(gap) => {
            assert_eq!(gap.first_missing, 1, "a per-domain seq range");
            assert!(gap.domain.is_some());
        }
        other => panic!("expected a gap, got {other:?}"),
    }

    // SIGTERM leaves the running domain alone; the next daemon finds it as it was.
    let running = c.info(common::by_name("g1")).await.unwrap().into_inner();
    assert_eq!(
        domkitd::convert::state_text(running.state.as_ref()),
        "running (unpaused)"
    );
    let mut daemon = daemon;
    let status = daemon.terminate();
    assert!(status.success(), "SIGTERM is an orderly exit: {status}");
    assert!(!daemon.socket.exists(), "the socket is removed on exit");
    let pid: i32 = running
        .backend_handle
        .trim_start_matches("pid ")
        .parse()
        .expect("qemu pid");
    // SAFETY: signal 0 only checks that the process exists.
    let alive = unsafe { libc::kill(pid, 0) };
    assert_eq!(alive, 0, "QEMU outlived the stopped daemon");
    let daemon = daemon.restart(&retention);
    let mut c = daemon.client().await;
    let again = c.info(common::by_name("g1")).await.unwrap().into_inner();
    assert_eq!(
        again.backend_handle, running.backend_handle,
        "the same QEMU"
    );
    assert!(again.seq >= running.seq);
    c.destroy(common::by_name("g1")).await.unwrap();
    c.undefine(common::by_name("g1")).await.unwrap();
}
