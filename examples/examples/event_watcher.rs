//! Watch every domain of a driver: the driver-wide event stream, one JSON line per event.
//! Starts two test guests, pauses one, destroys both.
//!
//! ```sh
//! cargo run -p domkit-examples --example event_watcher
//! ```

use domkit_conformance::qemu::test_guest_config;
use domkit_core::{Domain, Driver, StartOptions};
use domkit_qemu::{QemuDriver, QemuDriverOptions};
use futures::StreamExt;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let guest = domkit_examples::ensure_test_guest()?;
    let runtime = tempfile::tempdir()?;
    let driver = QemuDriver::new(QemuDriverOptions::with_runtime_root(runtime.path()))?;

    // Subscribe before anything happens: the stream starts at subscription time.
    let mut all = driver.subscribe();
    let watcher = tokio::spawn(async move {
        while let Some(ev) = all.next().await {
            println!("{}", serde_json::to_string(&ev).unwrap_or_default());
        }
    });

    let a = driver
        .create(
            test_guest_config(&guest, "watch-a", Default::default()),
            StartOptions::default(),
        )
        .await?;
    let b = driver
        .create(
            test_guest_config(&guest, "watch-b", Default::default()),
            StartOptions { paused: true },
        )
        .await?;
    a.pause().await?;
    b.resume().await?;
    a.destroy().await?;
    b.destroy().await?;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    watcher.abort();
    Ok(())
}
