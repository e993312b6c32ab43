//! The guest agent of a REAL test guest (qemu-ga 7.2 inside the QEMU test guest), reached
//! through `domkit_core::Domain::guest_agent` and, for recording, through the domain's
//! virtio-serial socket directly.
//!
//! `record_guest_transcripts` (ignored) re-records the fixtures of the commands that change
//! guest state (file I/O, freeze, trim, vCPUs, memory blocks, password), which a host qemu-ga
//! must not run: `DOMKIT_RECORD=1 cargo test -p domkit-qemu --test agent_guest -- --ignored`.
//! They go to agent/tests/fixtures/agent-guest-*.raw (crate domkit-agent).

mod driver_support;

use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use domkit_core::{Domain, Error};
use domkit_qemu::agent::{
    FileOpenMode, GuestAgent, GuestAgentOptions, GuestLogicalProcessor, SeekWhence, SetUserPassword,
};
use driver_support::*;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;

/// A stream that keeps a copy of every byte read (what the agent sent).
struct Tee {
    inner: UnixStream,
    log: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for Tee {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            let new = buf.filled()[before..].to_vec();
            self.log.lock().unwrap().extend_from_slice(&new);
        }
        r
    }
}

impl AsyncWrite for Tee {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_agent_through_the_trait_and_no_channel_is_typed() {
    let h = Harness::new();
    let mut config = guest_config("nochan", "");
    config.channels.clear();
    let bare = h.define(config).await;
    bare.start(Default::default()).await.expect("start");
    h.track(&bare);
    match Domain::guest_agent(&bare).await {
        Err(e @ Error::NoGuestAgent { .. }) => {
            assert!(e.to_string().contains("kind = \"guest_agent\""), "{e}")
        }
        other => panic!("want no_guest_agent, got {other:?}"),
    }
    bare.destroy().await.expect("destroy");

    let domain = h.define(guest_config("withchan", "")).await;
    h.boot(&domain).await;
    let agent = Domain::guest_agent(&domain).await.expect("agent");
    agent.ping().await.expect("ping");
    let info = agent.info().await.expect("info");
    assert!(info.is_enabled("guest-file-open"));
    domain.destroy().await.expect("destroy");
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "re-records fixtures: DOMKIT_RECORD=1 ... -- --ignored"]
async fn record_guest_transcripts() {
    if std::env::var_os("DOMKIT_RECORD").is_none() {
        eprintln!("set DOMKIT_RECORD=1 to overwrite agent/tests/fixtures/agent-guest-*.raw");
        return;
    }
    let h = Harness::new();
    let domain = h.define(guest_config("recorder", "")).await;
    h.boot(&domain).await;
    // Free the channel (one client at a time), then talk to it through a tee.
    domain
        .guest_agent()
        .await
        .expect("agent")
        .disconnect()
        .await;
    let socket = domain.runtime_dir().join("agent.sock");
    let log = Arc::new(Mutex::new(Vec::new()));
    let tee = Tee {
        inner: UnixStream::connect(&socket).await.expect("connect"),
        log: log.clone(),
    };
    let agent = GuestAgent::from_stream(tee, GuestAgentOptions::default());
    agent.sync().await.expect("sync");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/tests/fixtures");
    let take = |name: &str| {
        let bytes = std::mem::take(&mut *log.lock().unwrap());
        std::fs::write(dir.join(format!("agent-guest-{name}.raw")), &bytes).expect("write");
        eprintln!("recorded agent-guest-{name}.raw ({} bytes)", bytes.len());
    };
    // A freezable, trimmable filesystem for the fsfreeze/fsinfo/fstrim replies.
    let mount = domkit_qemu::agent::GuestExecRequest {
        path: "/bin/sh".into(),
        args: vec![
            "-c".into(),
            "mkdir -p /mnt/domkit; dd if=/dev/zero of=/tmp/fs.img bs=1M count=8 2>/dev/null; \
             dev=$(losetup -f); losetup $dev /tmp/fs.img; mke2fs -q $dev; mount $dev /mnt/domkit"
                .into(),
        ],
        ..Default::default()
    };
    let pid = agent.exec(&mount).await.expect("exec mount");
    while !agent.exec_status(pid).await.expect("status").exited {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    log.lock().unwrap().clear();

    agent.guest_sync(4242).await.expect("guest-sync");
    take("sync");
    let h1 = agent
        .file_open("/tmp/rec.bin", FileOpenMode::WriteRead)
        .await
        .expect("open");
    take("file-open");
    let data: Vec<u8> = (0..=255u8).chain([0xff, 0, b'\n', 0xff]).collect();
    agent.file_write(h1, &data).await.expect("write");
    take("file-write");
    agent.file_flush(h1).await.expect("flush");
    take("file-flush");
    agent.file_seek(h1, 0, SeekWhence::Set).await.expect("seek");
    take("file-seek");
    agent.file_read(h1, 4096).await.expect("read");
    take("file-read");
    agent.file_close(h1).await.expect("close");
    take("file-close");
    let _ = agent
        .execute("guest-file-close", Some(json!({"handle": 999_999})))
        .await;
    take("file-close-bad-handle");
    agent.fsfreeze_freeze().await.expect("freeze");
    take("fsfreeze-freeze");
    agent.fsfreeze_status().await.expect("status");
    take("fsfreeze-status-frozen");
    agent.fsfreeze_thaw().await.expect("thaw");
    take("fsfreeze-thaw");
    let _ = agent.fsfreeze_freeze_list(Some(&["/"])).await;
    take("fsfreeze-freeze-list");
    let _ = agent.fsfreeze_thaw().await;
    log.lock().unwrap().clear();
    let _ = agent.fstrim(None).await;
    take("fstrim");
    agent.get_fsinfo().await.expect("fsinfo");
    take("get-fsinfo");
    let vcpus = agent.get_vcpus().await.expect("vcpus");
    take("get-vcpus");
    let _ = agent
        .set_vcpus(&[GuestLogicalProcessor {
            logical_id: vcpus[0].logical_id,
            online: true,
            can_offline: None,
        }])
        .await;
    take("set-vcpus");
    let blocks = agent.get_memory_blocks().await;
    take("get-memory-blocks");
    if let Ok(blocks) = blocks {
        let _ = agent
            .set_memory_blocks(&blocks[..blocks.len().min(1)])
            .await;
        take("set-memory-blocks");
    }
    let _ = agent.get_memory_block_info().await;
    take("get-memory-block-info");
    let _ = agent.network_get_interfaces().await;
    take("network");
    let _ = agent
        .set_user_password(&SetUserPassword {
            username: "root".into(),
            password: b"domkit-test".to_vec(),
            crypted: false,
        })
        .await;
    take("set-user-password");
    agent.set_time(None).await.expect("set-time from rtc");
    take("set-time");
    agent.info().await.expect("info");
    take("info");
    drop(agent);
    domain.destroy().await.expect("destroy");
    h.finish().await;
}
