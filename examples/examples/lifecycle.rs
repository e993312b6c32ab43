//! A domain's whole life in a few lines: define, start, pause, resume, save, restore,
//! graceful shutdown. Uses the repo's test guest.
//!
//! ```sh
//! bash scripts/build-test-guest.sh
//! cargo run -p domkit-examples --example lifecycle
//! ```

use domkit_core::{
    Accel, Boot, Channel, ChannelKind, Domain, DomainConfig, Driver, ShutdownOptions, StartOptions,
};
use domkit_qemu::{QemuDriver, QemuDriverOptions};
use futures::StreamExt;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let guest = domkit_examples::ensure_test_guest()?;
    let runtime = tempfile::tempdir()?;
    let driver = QemuDriver::new(QemuDriverOptions::with_runtime_root(runtime.path()))?;

    let mut config = DomainConfig::with_kernel("lifecycle-example", 128, guest.join("vmlinuz"));
    config.boot = Boot::Kernel {
        kernel: guest.join("vmlinuz"),
        initrd: Some(guest.join("initrd.img")),
        cmdline: "console=ttyS0 quiet no_timer_check".into(),
    };
    config.channels.push(Channel {
        kind: ChannelKind::GuestAgent,
        name: None,
    });
    config.qemu.accel = Accel::Tcg;

    let domain = driver.define(config).await?;
    let mut events = domain.subscribe();
    tokio::spawn(async move {
        while let Some(ev) = events.next().await {
            println!("event #{}: {}", ev.seq, ev.kind);
        }
    });

    domain.start(StartOptions::default()).await?;
    println!("state: {}", domain.state());
    domain.pause().await?;
    domain.resume().await?;

    let save = runtime.path().join("vm.save");
    domain.save(&save).await?;
    println!("state after save: {}", domain.state());
    domain.restore(&save, Default::default()).await?;
    println!("state after restore: {}", domain.state());

    // Give the guest time to start its ACPI handler, then shut down gracefully;
    // destroy if it does not comply within the timeout.
    tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    let outcome = domain
        .shutdown(ShutdownOptions {
            destroy_on_timeout: true,
            ..Default::default()
        })
        .await?;
    println!("shutdown: {outcome:?}, state: {}", domain.state());
    Ok(())
}
