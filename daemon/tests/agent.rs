//! The guest agent passthrough (`AgentCommand`, `domkit agent`, virsh `qemu-agent-command`)
//! through a real domkitd process and its real socket, on real QEMU (TCG) with the repo's
//! test guest and its qemu-ga: one guest boot; the agent-less domain is only started paused.
//!
//! Checked: `guest-ping` and `guest-info` return their replies (indented, and one JSON line
//! with `--json`); a command the guest does not know is the agent's typed `unsupported`; a
//! domain without an agent channel is `no_guest_agent` with the library's message and a
//! nonzero exit; malformed commands are `bad_request` (exit 2) without reaching the guest;
//! the read-only socket refuses the verb (exit 6).

mod common;

use common::{cli, cli_ok, Daemon, Dirs};
use domkitd::client::{self, Target};
use domkitd::convert::{detail_of, kind_name};
use domkitd::pb;

/// The test guest's config without its `[[channels]] kind = "guest_agent"`.
fn guest_toml_without_agent(name: &str) -> String {
    let toml = common::guest_toml(name);
    let without = toml.replace("[[channels]]\nkind = \"guest_agent\"\n", "");
    assert_ne!(without, toml, "the test guest config has an agent channel");
    without
}

fn agent_request(name: &str, json: &str) -> pb::AgentCommandRequest {
    pb::AgentCommandRequest {
        domain: Some(common::by_name(name)),
        command_json: json.into(),
        timeout_ms: Some(10_000),
    }
}

#[tokio::test]
async fn agent_passthrough() {
    let dirs = Dirs::new();
    let ro = dirs.root.path().join("ro").join("domkitd-ro.sock");
    let daemon = Daemon::start(dirs, &["--listen-ro", &format!("unix:{}", ro.display())]);
    let sock = daemon.socket.clone();
    let root = daemon.dirs.root.path().to_path_buf();
    let with_agent = root.join("ag1.toml");
    std::fs::write(&with_agent, common::guest_toml("ag1")).unwrap();
    let without_agent = root.join("noag1.toml");
    std::fs::write(&without_agent, guest_toml_without_agent("noag1")).unwrap();
    cli_ok(&sock, &["define", &with_agent.display().to_string()]);
    cli_ok(&sock, &["define", &without_agent.display().to_string()]);
    cli_ok(&sock, &["start", "ag1"]);
    cli_ok(&sock, &["start", "noag1", "--paused"]);
    let ping = r#"{"execute":"guest-ping"}"#;

    // While the guest boots: the checks that do not need its agent.
    // No agent channel: the library's message, exit nonzero; over gRPC the typed kind.
    let (code, out, err) = cli(&sock, &["agent", "noag1", ping]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("domain noag1 has no guest agent channel")
            && err.contains("[[channels]] kind = \"guest_agent\""),
        "{err}"
    );
    let mut c = daemon.client().await;
    let status = c
        .agent_command(agent_request("noag1", ping))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    let detail = detail_of(&status).expect("detail");
    assert_eq!(kind_name(detail.kind), "no_guest_agent");
    assert_eq!(detail.domain, "noag1");
    assert_eq!(status.message(), detail.message);
    assert!(err.contains(&detail.message), "{err}");

    // Malformed commands: bad_request (exit 2), the daemon stays up.
    for bad in [
        "{not json",
        "[]",
        r#"{"arguments":{}}"#,
        r#"{"execute":"guest-ping","arguments":[]}"#,
    ] {
        let (code, out, err) = cli(&sock, &["agent", "ag1", bad]);
        assert_eq!(code, 2, "{bad}: bad_request exits 2: {out}{err}");
        assert!(err.contains("the agent command"), "{bad}: {err}");
        let status = c
            .agent_command(agent_request("ag1", bad))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bad}");
        let detail = detail_of(&status).expect("detail");
        assert_eq!(kind_name(detail.kind), "bad_request", "{bad}");
    }

    // The read-only socket refuses it (before looking at the command).
    let (code, out, err) = cli(&ro, &["agent", "ag1", ping]);
    assert_eq!(code, 6, "permission_denied exits 6: {out}{err}");
    assert!(err.contains("needs full access"), "{err}");
    let mut roc = client::connect(&Target::Unix(ro.clone()))
        .await
        .expect("connect ro");
    let status = roc
        .agent_command(agent_request("ag1", "{not json"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        kind_name(detail_of(&status).expect("detail").kind),
        "permission_denied"
    );

    // The booted guest's qemu-ga answers.
    common::wait_guest_ready(&daemon.dirs.serial_log("ag1"), 1).await;
    let out = cli_ok(&sock, &["agent", "ag1", ping, "--timeout", "10"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap(),
        serde_json::json!({})
    );
    let out = cli_ok(&sock, &["agent", "ag1", ping, "--json"]);
    assert_eq!(out.trim(), r#"{"return":{}}"#);
    let out = cli_ok(
        &sock,
        &["qemu-agent-command", "ag1", r#"{"execute":"guest-info"}"#],
    );
    let info: serde_json::Value = serde_json::from_str(&out).expect("guest-info is JSON");
    assert!(
        info["version"].as_str().is_some_and(|v| !v.is_empty()),
        "{info}"
    );
    let commands = info["supported_commands"].as_array().expect("commands");
    assert!(commands.iter().any(|c| c["name"] == "guest-ping"), "{info}");
    let out = cli_ok(
        &sock,
        &[
            "agent",
            "ag1",
            r#"{"execute":"guest-info","arguments":null}"#,
            "--json",
        ],
    );
    let reply: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(reply["return"]["version"], info["version"]);
    // Over gRPC: the reply is the `return` value's JSON text.
    let reply = c
        .agent_command(agent_request("ag1", ping))
        .await
        .expect("guest-ping over gRPC")
        .into_inner();
    assert_eq!(reply.reply_json, "{}");

    // A command the guest does not know: the agent's own typed error.
    let nope = r#"{"execute":"guest-no-such-command"}"#;
    let (code, out, err) = cli(&sock, &["agent", "ag1", nope]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("guest agent of domain ag1") && err.contains("guest-no-such-command"),
        "{err}"
    );
    let status = c
        .agent_command(agent_request("ag1", nope))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    let detail = detail_of(&status).expect("detail");
    assert_eq!(kind_name(detail.kind), "guest_agent");
    assert_eq!(detail.agent_error, "unsupported");
    assert_eq!(detail.domain, "ag1");
    // The channel is still in step after the error.
    cli_ok(&sock, &["agent", "ag1", ping]);

    cli_ok(&sock, &["destroy", "ag1"]);
    cli_ok(&sock, &["destroy", "noag1"]);
    // A shut-off domain has no agent to talk to: invalid_state (exit 4).
    let (code, out, err) = cli(&sock, &["agent", "ag1", ping]);
    assert_eq!(code, 4, "invalid_state exits 4: {out}{err}");
    assert!(daemon.log_text().contains("agent_command"));
}
