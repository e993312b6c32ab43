//! Talk to the QEMU guest agent of a running domain: ping, info, run a command.
//!
//! ```sh
//! cargo run -p domkit-examples --example guest_agent
//! ```

use domkit_conformance::qemu::test_guest_config;
use domkit_core::{Domain, Driver, StartOptions};
use domkit_qemu::agent::GuestExecRequest;
use domkit_qemu::{QemuDriver, QemuDriverOptions};
use std::time::Duration;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let guest = domkit_examples::ensure_test_guest()?;
    let runtime = tempfile::tempdir()?;
    let driver = QemuDriver::new(QemuDriverOptions::with_runtime_root(runtime.path()))?;
    let domain = driver
        .create(
            test_guest_config(&guest, "agent-example", Default::default()),
            StartOptions::default(),
        )
        .await?;

    // The agent starts with the guest: retry until it answers.
    let agent = domain.guest_agent().await?;
    let mut tries = 0;
    while agent.ping().await.is_err() {
        tries += 1;
        anyhow::ensure!(tries < 120, "the guest agent never answered");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let info = agent.info().await?;
    println!("qemu-ga {} in the guest", info.version);

    let pid = agent
        .exec(&GuestExecRequest {
            path: "/bin/uname".into(),
            args: vec!["-a".into()],
            env: vec![],
            input: None,
            capture_output: true,
        })
        .await?;
    loop {
        let status = agent.exec_status(pid).await?;
        if status.exited {
            let out = status.out_data.unwrap_or_default();
            println!("guest says: {}", String::from_utf8_lossy(&out).trim());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    domain.destroy().await?;
    Ok(())
}
