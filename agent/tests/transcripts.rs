//! The typed replies of every command, parsed from bytes recorded from the real qemu-ga 7.2
//! inside the QEMU test guest (fixtures/agent-guest-*.raw, see fixtures/README.md). Pure: no
//! I/O besides reading the fixtures.

use domkit_agent::codec::{AgentDecoder, AgentMessage};
use domkit_agent::types::*;
use domkit_agent::AgentError;
use serde_json::Value;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// The one reply in a fixture: `(id, result)`.
fn reply(name: &str) -> (Option<Value>, Result<Value, (String, String)>) {
    let mut dec = AgentDecoder::new();
    dec.push(&fixture(name));
    let mut msgs = Vec::new();
    while let Some(m) = dec.next_message().expect("decodes") {
        msgs.push(m);
    }
    match msgs.as_slice() {
        [AgentMessage::Reply { id, result }] => (
            id.clone(),
            result
                .clone()
                .map_err(|e| (e.class.clone(), e.desc.clone())),
        ),
        other => panic!("{name}: want one reply, got {other:?}"),
    }
}

fn ok<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let (id, result) = reply(name);
    assert!(id.is_some(), "{name}: qemu-ga echoes the command's id");
    serde_json::from_value(result.expect("a return")).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn sync_echoes_the_id() {
    assert_eq!(ok::<i64>("agent-guest-sync.raw"), 4242);
}

#[test]
fn file_commands() {
    let h: FileHandle = ok("agent-guest-file-open.raw");
    assert!(h.0 > 0);
    let w: GuestFileWrite = ok("agent-guest-file-write.raw");
    assert_eq!(w.count, 260);
    let s: GuestFileSeek = ok("agent-guest-file-seek.raw");
    assert_eq!((s.position, s.eof), (0, false));
    let (_, r) = reply("agent-guest-file-read.raw");
    let read = GuestFileRead::from_reply(&r.expect("read")).expect("typed");
    let want: Vec<u8> = (0..=255u8).chain([0xff, 0, b'\n', 0xff]).collect();
    assert_eq!(
        read.data, want,
        "binary data through base64, 0xFF and newlines included"
    );
    assert!(read.eof);
    let _: Value = ok("agent-guest-file-flush.raw");
    let _: Value = ok("agent-guest-file-close.raw");
    let (id, bad) = reply("agent-guest-file-close-bad-handle.raw");
    assert!(
        id.is_some(),
        "errors of a dispatched command carry its id too"
    );
    let (class, desc) = bad.expect_err("bad handle");
    let e = AgentError::from_reply("guest-file-close", class, desc);
    assert!(
        matches!(&e, AgentError::CommandFailed { desc, .. } if desc.contains("has not been found")),
        "a missing handle is a failure, not an unsupported command: {e:?}"
    );
}

#[test]
fn fsfreeze_commands() {
    assert_eq!(ok::<i64>("agent-guest-fsfreeze-freeze.raw"), 1);
    assert_eq!(
        ok::<FsFreezeStatus>("agent-guest-fsfreeze-status-frozen.raw"),
        FsFreezeStatus::Frozen
    );
    assert_eq!(ok::<i64>("agent-guest-fsfreeze-thaw.raw"), 1);
    assert_eq!(ok::<i64>("agent-guest-fsfreeze-freeze-list.raw"), 0);
}

#[test]
fn fstrim_and_fsinfo() {
    let trim: GuestFilesystemTrimResponse = ok("agent-guest-fstrim.raw");
    let p = &trim.paths[0];
    assert_eq!(p.path, "/mnt/domkit");
    assert!(p.trimmed.is_some_and(|t| t > 0) && p.error.is_none());
    let fs: Vec<GuestFilesystemInfo> = ok("agent-guest-get-fsinfo.raw");
    let f = &fs[0];
    assert_eq!(
        (f.mountpoint.as_str(), f.fs_type.as_str()),
        ("/mnt/domkit", "ext2")
    );
    assert!(f.used_bytes.unwrap() < f.total_bytes.unwrap());
    assert!(f.disk.is_empty(), "a loop device has no disk address");
}

#[test]
fn vcpus_and_memory_blocks() {
    let cpus: Vec<GuestLogicalProcessor> = ok("agent-guest-get-vcpus.raw");
    assert_eq!(cpus[0].logical_id, 0);
    assert_eq!(cpus[0].can_offline, Some(false));
    assert_eq!(ok::<i64>("agent-guest-set-vcpus.raw"), 1);
    let blocks: Vec<GuestMemoryBlock> = ok("agent-guest-get-memory-blocks.raw");
    assert!(blocks[0].online);
    let resp: Vec<GuestMemoryBlockResponse> = ok("agent-guest-set-memory-blocks.raw");
    assert_eq!(resp[0].response, GuestMemoryBlockResponseType::Success);
    let info: GuestMemoryBlockInfo = ok("agent-guest-get-memory-block-info.raw");
    assert_eq!(info.size, 128 << 20);
}

#[test]
fn network_password_time_info() {
    let ifaces: Vec<GuestNetworkInterface> = ok("agent-guest-network.raw");
    let lo = &ifaces[0];
    assert!(lo
        .ip_addresses
        .iter()
        .any(|a| a.ip_address == "127.0.0.1" && a.prefix == 8));
    assert_eq!(lo.statistics().expect("stats").rx_errs, 0);
    let _: Value = ok("agent-guest-set-user-password.raw");
    let _: Value = ok("agent-guest-set-time.raw");
    let info: AgentInfo = ok("agent-guest-info.raw");
    for c in SCHEMA_COMMANDS {
        assert!(info.is_enabled(c), "{c} is enabled in the test guest");
    }
    for c in NO_REPLY_COMMANDS {
        assert!(!info.command(c).expect("listed").success_response, "{c}");
    }
}

#[test]
fn password_request_is_base64_and_hidden() {
    let req = SetUserPassword {
        username: "root".into(),
        password: b"s3cret\xff".to_vec(),
        crypted: false,
    };
    let args = req.to_arguments();
    assert_eq!(args["password"], "czNjcmV0/w==");
    assert!(!format!("{req:?}").contains("s3cret"));
}
