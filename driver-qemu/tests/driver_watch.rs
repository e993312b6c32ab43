//! Watching a REAL QEMU domain across managers (§12.4, §12.5 with §11): a persistent
//! manager that detaches leaves the console socket to the next one, which streams the
//! console and reads the statistics of the domain it reattached; the console log is written
//! by QEMU with or without a stream.

mod driver_support;

use std::time::{Duration, Instant};

use domkit_core::{ConsoleAccess, ConsoleStream, Domain, Driver, StartOptions};
use domkit_qemu::{QemuDriver, QemuDriverOptions};
use driver_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn read_until(console: &mut ConsoleStream, seen: &mut Vec<u8>, needle: &str) {
    let deadline = Instant::now() + LONG;
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(seen).contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, console.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{needle:?} not on the console; seen: {:?}",
                    String::from_utf8_lossy(seen)
                )
            })
            .expect("console read");
        assert!(n > 0, "the console ended before {needle:?}");
        seen.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_and_stats_after_a_detach_go_to_the_next_manager() {
    init_tracing();
    let base = tempfile::Builder::new()
        .prefix("dkw")
        .tempdir_in("/tmp")
        .expect("roots");
    let options = || QemuDriverOptions::persistent(base.path().join("s"), base.path().join("r"));
    let first = QemuDriver::open(options()).await.expect("first manager");
    let domain = first
        .define(guest_config("watched", ""))
        .await
        .expect("define");
    domain
        .start(StartOptions { paused: true })
        .await
        .expect("start paused");
    // The first manager connects to the console socket, then detaches.
    let console = domain
        .console(ConsoleAccess::ReadWrite)
        .await
        .expect("console");
    let first_stats = domain.stats().await.expect("stats");
    assert_eq!(first_stats.cpu.vcpus.len(), 1);
    first.detach();
    drop(console);
    drop(domain);
    drop(first);

    let second = QemuDriver::open(options()).await.expect("next manager");
    let domain = second.lookup_by_name("watched").await.expect("reattached");
    let mut console = tokio::time::timeout(
        Duration::from_secs(10),
        domain.console(ConsoleAccess::ReadWrite),
    )
    .await
    .expect("the console socket accepts the next manager")
    .expect("console");
    domain.resume().await.expect("resume");
    let mut seen = Vec::new();
    read_until(&mut console, &mut seen, READY).await;
    // The shell answers what the next manager types.
    let deadline = Instant::now() + LONG;
    while !String::from_utf8_lossy(&seen).contains("dk-42") {
        assert!(Instant::now() < deadline, "the shell never answered");
        console
            .write_all(b"echo dk-$((6*7))\n")
            .await
            .expect("type");
        let mut buf = [0u8; 4096];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_secs(3), console.read(&mut buf)).await
        {
            seen.extend_from_slice(&buf[..n]);
        }
    }
    let stats = domain
        .stats()
        .await
        .expect("stats of the reattached domain");
    assert!(stats.state.is_running(), "{stats:?}");
    let (Some(before), Some(after)) = (first_stats.cpu.total_ns, stats.cpu.total_ns) else {
        panic!("cpu time unknown: {first_stats:?} / {stats:?}");
    };
    assert!(
        after > before,
        "the same QEMU's cpu time went {before} -> {after}"
    );
    assert_eq!(
        stats.cpu.vcpus[0].host_thread, first_stats.cpu.vcpus[0].host_thread,
        "the same vCPU thread, asked again by the new instance"
    );
    // QEMU wrote the console log all along (logfile= of the socket chardev).
    let log = std::fs::read_to_string(domain.serial_log()).expect("serial log");
    assert!(log.contains(READY) && log.contains("dk-42"), "{log:?}");

    domain.destroy().await.expect("destroy");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), console.read_to_end(&mut rest))
        .await
        .expect("the stream ends when the domain stops")
        .expect("eof");
    second.undefine("watched").await.expect("undefine");
    second.close().await.expect("close");
}
