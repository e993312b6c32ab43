//! domkitd serving Xen domains: a real domkitd process built with the `libxl` feature, its
//! real socket and the real `domkit` CLI, inside the nested Xen 4.17 dom0 of `xen-host/`
//! (run by `xen-host/run-daemon-tests.sh`), with the harness's PV domU (`xen-host/domu/init`).
//! Ignored elsewhere: they need a Xen dom0 (`--ignored` runs them).
//!
//! - `libxl_every_verb`: define, list, start (and `--paused`), domstate, dominfo, agent,
//!   console, suspend, resume, save (with a second client answered meanwhile), restore,
//!   reboot, shutdown, reset, destroy, undefine and the event history, by the CLI; errors
//!   with their documented exit codes.
//! - `libxl_daemon_killed_mid_save` / `_mid_shutdown`: domkitd SIGKILLed once the operation
//!   is on record in the domain's durable status; the caller fails instead of hanging, the
//!   restarted daemon ends the operation consistently (§11.4), the definition survives.
//!
//! The guest is asked over xenstore, as the conformance harness does (conformance/src/libxl.rs):
//! `report` makes it write its kernel boot id, which tells that it is up and whether it
//! rebooted (the id changes) or was restored intact (the id stays).

mod common;

use common::{account, cli, cli_ok, Daemon, Dirs, Follower};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn env_path(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default))
}

/// The TOML config of the harness's PV domU named `name`.
fn domu_toml(name: &str) -> String {
    let kernel = env_path("DOMKIT_XEN_DOMU_KERNEL", "/domu/vmlinux");
    let initrd = env_path("DOMKIT_XEN_DOMU_INITRD", "/domu/initrd.img");
    for f in [&kernel, &initrd] {
        assert!(f.is_file(), "domU artifact missing: {}", f.display());
    }
    format!(
        r#"backend = "libxl"
name = "{name}"
memory_mib = 128

[boot]
from = "kernel"
kernel = "{}"
initrd = "{}"
cmdline = "console=hvc0 quiet"
"#,
        kernel.display(),
        initrd.display()
    )
}

/// Run a Xen tool (no shell); its trimmed stdout.
fn tool(argv: &[&str]) -> Result<String, String> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .map_err(|e| format!("{}: {e}", argv[0]))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{argv:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Ask the domU `name` for its boot id over xenstore and wait for the answer (the domid is
/// re-read each round: a reboot or a restore changes it).
fn guest_boot_id(name: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let mut round = 0u32;
    let mut last = String::new();
    while Instant::now() < deadline {
        round += 1;
        match tool(&["xl", "domid", name]) {
            Ok(domid) => {
                let base = format!("/local/domain/{domid}/data");
                let answer = format!("{base}/domkit-bootid");
                let _ = tool(&["xenstore-rm", &answer]);
                // The guest acts on each new value once (a token per command).
                let command = format!("report {}-{round}", std::process::id());
                match tool(&["xenstore-write", &format!("{base}/domkit-action"), &command]) {
                    Ok(_) => {
                        let until = Instant::now() + Duration::from_secs(3);
                        while Instant::now() < until {
                            if let Ok(id) = tool(&["xenstore-read", &answer]) {
                                if id.len() >= 32 {
                                    return id;
                                }
                            }
                            std::thread::sleep(Duration::from_millis(150));
                        }
                        last = "no answer to `report`".into();
                    }
                    Err(e) => last = e,
                }
            }
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!("the domU {name} did not report within {timeout:?}: {last}");
}

/// Poll `domkit domstate NAME --reason` until it prints one of `want`; that one.
fn wait_domstate(sock: &Path, name: &str, want: &[&str], timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let now = cli_ok(sock, &["domstate", name, "--reason"])
            .trim()
            .to_string();
        if want.contains(&now.as_str()) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "{name} is {now}, not one of {want:?}, after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The event kinds of `domkit event NAME --since 0 --json`, without the guest agent's.
fn history(sock: &Path, name: &str) -> Vec<String> {
    common::event_kinds(&cli_ok(sock, &["event", name, "--since", "0", "--json"]))
}

const BOOT: Duration = Duration::from_secs(240);

#[test]
#[ignore = "needs a Xen dom0: run by xen-host/run-daemon-tests.sh"]
fn libxl_every_verb() {
    let daemon = Daemon::start(Dirs::new(), &[]);
    let sock = daemon.socket.clone();
    let version = cli_ok(&sock, &["daemon-version"]);
    assert!(version.contains("libxl"), "domkitd opened libxl: {version}");

    // Errors: the library's message, the documented exit code.
    let (code, _, err) = cli(&sock, &["dominfo", "nope"]);
    assert_eq!(code, 3, "not_found exits 3: {err}");
    let bad = daemon.dirs.root.path().join("bad.toml");
    std::fs::write(
        &bad,
        domu_toml("bad1").replace("memory_mib = 128", "memory_mib = 1"),
    )
    .unwrap();
    let (code, _, err) = cli(&sock, &["define", &bad.display().to_string()]);
    assert_eq!(code, 8, "invalid_config exits 8: {err}");
    assert!(err.contains("memory_mib = 1 is too small"), "{err}");

    let config = daemon.dirs.root.path().join("xd1.toml");
    // With the guest agent on its PV channel (qemu-ga in the domU, §13.6).
    std::fs::write(
        &config,
        domu_toml("xd1") + "\n[[channels]]\nkind = \"guest_agent\"\n",
    )
    .unwrap();
    assert!(cli_ok(&sock, &["define", &config.display().to_string()]).contains("defined"));
    assert!(cli_ok(&sock, &["list", "--all"]).contains("xd1"));
    let (code, _, err) = cli(&sock, &["resume", "xd1"]);
    assert_eq!(
        code, 4,
        "resume of a shut-off domain is invalid_state (4): {err}"
    );

    cli_ok(&sock, &["start", "xd1"]);
    assert_eq!(
        cli_ok(&sock, &["domstate", "xd1", "--reason"]).trim(),
        "running (booted)"
    );
    let info: serde_json::Value =
        serde_json::from_str(&cli_ok(&sock, &["dominfo", "xd1", "--json"])).unwrap();
    assert_eq!(info["backend"], "libxl", "{info}");
    let boot1 = guest_boot_id("xd1", BOOT);
    // The guest agent passthrough (`virsh qemu-agent-command`): qemu-ga starts after the
    // guest's report loop, so ask until it answers.
    let ping = r#"{"execute":"guest-ping"}"#;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (code, out, err) = cli(&sock, &["agent", "xd1", ping, "--json", "--timeout", "10"]);
        if code == 0 {
            assert_eq!(out.trim(), r#"{"return":{}}"#);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the domU's agent never answered: {code} {out}{err}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The PV console (xenconsoled's pty, hvc0 in the guest, where a shell runs).
    common::console_runs_a_command(&sock, "xd1");

    cli_ok(&sock, &["suspend", "xd1"]);
    assert_eq!(
        cli_ok(&sock, &["domstate", "xd1", "--reason"]).trim(),
        "paused (user)"
    );
    cli_ok(&sock, &["resume", "xd1"]);
    assert_eq!(
        cli_ok(&sock, &["domstate", "xd1", "--reason"]).trim(),
        "running (unpaused)"
    );

    let save = daemon.dirs.root.path().join("xd1.save");
    let save = save.display().to_string();
    // Two clients at once: a second one is answered while the first one's save runs.
    let saver = {
        let (sock, save) = (sock.clone(), save.clone());
        std::thread::spawn(move || cli(&sock, &["save", "xd1", &save]))
    };
    let mut answered = 0;
    while !saver.is_finished() {
        let (code, out, err) = cli(&sock, &["domstate", "xd1", "--reason"]);
        assert_eq!(code, 0, "domstate during the save: {out}{err}");
        answered += 1;
    }
    let (code, out, err) = saver.join().unwrap();
    assert_eq!(code, 0, "save: {out}{err}");
    assert!(
        answered > 0,
        "the second client was answered during the save"
    );
    assert_eq!(
        cli_ok(&sock, &["domstate", "xd1", "--reason"]).trim(),
        "shutoff (saved)"
    );
    cli_ok(&sock, &["restore", "xd1", &save]);
    assert_eq!(
        cli_ok(&sock, &["domstate", "xd1", "--reason"]).trim(),
        "running (restored)"
    );
    assert_eq!(
        guest_boot_id("xd1", BOOT),
        boot1,
        "restored intact: the same kernel boot"
    );

    cli_ok(&sock, &["reboot", "xd1"]);
    let boot2 = guest_boot_id("xd1", BOOT);
    assert_ne!(boot2, boot1, "the reboot booted the kernel again");
    // A running domain's reason says how it came to run; a reboot keeps it (§4.7).
    assert_eq!(
        cli_ok(&sock, &["domstate", "xd1", "--reason"]).trim(),
        "running (restored)"
    );

    cli_ok(
        &sock,
        &["shutdown", "xd1", "--wait", "completed", "--timeout", "120"],
    );
    assert_eq!(
        cli_ok(&sock, &["domstate", "xd1", "--reason"]).trim(),
        "shutoff (shutdown)"
    );
    cli_ok(&sock, &["start", "xd1", "--paused"]);
    assert_eq!(
        cli_ok(&sock, &["domstate", "xd1", "--reason"]).trim(),
        "paused (user)"
    );
    cli_ok(&sock, &["resume", "xd1"]);
    let boot3 = guest_boot_id("xd1", BOOT);
    cli_ok(&sock, &["reset", "xd1"]);
    assert_ne!(
        guest_boot_id("xd1", BOOT),
        boot3,
        "the reset booted the kernel again"
    );
    cli_ok(&sock, &["destroy", "xd1"]);
    assert_eq!(
        cli_ok(&sock, &["domstate", "xd1", "--reason"]).trim(),
        "shutoff (destroyed)"
    );
    assert!(
        tool(&["xl", "domid", "xd1"]).is_err(),
        "destroyed: gone from the toolstack"
    );

    let kinds = history(&sock, "xd1");
    for step in [
        "started(booted)",
        "suspended(paused)",
        "resumed(unpaused)",
        "suspended(saving)",
        "stopped(saved)",
        "started(restored)",
        "rebooted",
        "shutdown_requested(host)",
        "stopped(shutdown)",
        "stopped(destroyed)",
    ] {
        assert!(
            kinds.iter().any(|k| k.starts_with(step)),
            "{step} is in the history: {kinds:?}"
        );
    }

    cli_ok(&sock, &["undefine", "xd1"]);
    assert!(!cli_ok(&sock, &["list", "--all"]).contains("xd1"));
    let (code, _, err) = cli(&sock, &["start", "xd1"]);
    assert_eq!(code, 3, "undefined: not_found: {err}");
}

/// The operation domkitd is SIGKILLed in the middle of.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mid {
    Save,
    Shutdown,
}

#[test]
#[ignore = "needs a Xen dom0: run by xen-host/run-daemon-tests.sh"]
fn libxl_daemon_killed_mid_save() {
    killed_mid(Mid::Save);
}

#[test]
#[ignore = "needs a Xen dom0: run by xen-host/run-daemon-tests.sh"]
fn libxl_daemon_killed_mid_shutdown() {
    killed_mid(Mid::Shutdown);
}

fn killed_mid(mid: Mid) {
    let name = match mid {
        Mid::Save => "xk1",
        Mid::Shutdown => "xk2",
    };
    let mut daemon = Daemon::start(Dirs::new(), &[]);
    let sock = daemon.socket.clone();
    let config = daemon.dirs.root.path().join(format!("{name}.toml"));
    std::fs::write(&config, domu_toml(name)).unwrap();
    cli_ok(&sock, &["define", &config.display().to_string()]);
    cli_ok(&sock, &["start", name]);
    let boot = guest_boot_id(name, BOOT);
    let info: serde_json::Value =
        serde_json::from_str(&cli_ok(&sock, &["dominfo", name, "--json"])).unwrap();
    let uuid = info["uuid"].as_str().expect("uuid").to_string();
    let s0 = info["seq"].as_u64().expect("seq");
    // A CLI client follows the domain's events across the kill (`event --loop`).
    let mut follower = Follower::subscribed(&daemon, name, Duration::from_secs(60));
    let status = daemon
        .dirs
        .state()
        .join("libxl")
        .join("domains")
        .join(format!("{uuid}.status.json"));

    let save = daemon
        .dirs
        .root
        .path()
        .join(format!("{name}.save"))
        .display()
        .to_string();
    let (args, on_record, ends): (Vec<String>, &str, &[&str]) = match mid {
        Mid::Save => (
            vec!["save".into(), name.into(), save.clone()],
            "\"operation\":\"save\"",
            &["running (save_canceled)", "shutoff (saved)"],
        ),
        Mid::Shutdown => (
            vec![
                "shutdown".into(),
                name.into(),
                "--wait".into(),
                "completed".into(),
                "--timeout".into(),
                "120".into(),
            ],
            "shutting_down",
            &["shutoff (shutdown)"],
        ),
    };
    let caller = {
        let sock = sock.clone();
        std::thread::spawn(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cli(&sock, &args)
        })
    };
    // A save is under way once its first event is out (the record precedes it; killed
    // earlier, the save has not touched the domain yet and nothing changes).
    let under_way = || {
        mid != Mid::Save
            || history(&sock, name)
                .iter()
                .any(|k| k == "suspended(saving)")
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !(std::fs::read_to_string(&status)
        .unwrap_or_default()
        .contains(on_record)
        && under_way())
    {
        assert!(
            Instant::now() < deadline,
            "{} never recorded the {mid:?}",
            status.display()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    daemon.kill();
    let (code, out, err) = caller.join().unwrap();
    assert_ne!(
        code, 0,
        "the caller of the cut {mid:?} fails, not hangs: {out}{err}"
    );

    let daemon = daemon.restart(&[]);
    let end = wait_domstate(&sock, name, ends, Duration::from_secs(180));
    assert!(
        cli_ok(&sock, &["list", "--all"]).contains(name),
        "the definition survived the kill"
    );
    // The follower reconnected by itself and accounts for every seq once, in order (an
    // event, or a gap naming what no daemon saw).
    let info: serde_json::Value =
        serde_json::from_str(&cli_ok(&sock, &["dominfo", name, "--json"])).unwrap();
    let s2 = info["seq"].as_u64().expect("seq");
    follower.wait_seq(s2, "after the restart");
    let entries = follower.entries();
    let first = match entries.first().and_then(|e| e.get("gap")) {
        Some(gap) => gap["first_missing"].as_u64(),
        None => entries.first().and_then(|e| e["seq"].as_u64()),
    }
    .expect("the follower printed something");
    assert!(first > s0, "the follower starts after {s0}: {entries:?}");
    let (kinds, gaps) = account(&entries, first, s2);
    assert!(
        follower
            .stderr()
            .contains("reconnected to domkitd; resuming after seq"),
        "the follower says it reconnected: {}",
        follower.stderr()
    );
    eprintln!("followed across the kill mid-{mid:?}: {kinds:?}, gaps {gaps:?}");
    // The end is an event: what the restarted daemon's driver reconciled is journaled.
    let ended = common::end_event(&end);
    assert!(
        kinds.iter().any(|k| k == ended),
        "the end ({end}) is an event: {kinds:?} {gaps:?}"
    );
    drop(follower);
    match end.as_str() {
        "running (save_canceled)" => {
            assert_eq!(
                guest_boot_id(name, BOOT),
                boot,
                "the same guest, running on"
            );
            cli_ok(&sock, &["destroy", name]);
        }
        "shutoff (saved)" => {
            assert!(
                Path::new(&save).is_file(),
                "the committed save file is there"
            );
            cli_ok(&sock, &["restore", name, &save]);
            assert_eq!(guest_boot_id(name, BOOT), boot, "restored intact");
            cli_ok(&sock, &["destroy", name]);
        }
        _ => assert!(
            tool(&["xl", "domid", name]).is_err(),
            "shut down: gone from the toolstack"
        ),
    }
    cli_ok(&sock, &["undefine", name]);
    drop(daemon);
}
