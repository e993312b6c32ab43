//! Device changes of scope `config` on a REAL persistent QEMU driver (§14.2 with §11.2):
//! the changed definition is on disk before the call returns, the next manager has it, and
//! the next start launches QEMU with it; a refused change leaves the stored file as it was.

mod driver_support;

use domkit_core::{
    ConfigError, DetachOptions, DeviceId, DeviceScope, DeviceSpec, Disk, Domain, Driver, Error,
    Nic, NicBackend, StartOptions,
};
use domkit_qemu::{QemuDriver, QemuDriverOptions};
use driver_support::*;

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).expect("device id")
}

fn stored_definitions(state: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(state.join("domains")).expect("domains dir") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".json") && !name.ends_with(".status.json") {
            out.push(std::fs::read_to_string(&path).expect("read definition"));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s14_2_config_scope_changes_are_durable_and_used_by_the_next_start() {
    init_tracing();
    let base = tempfile::Builder::new()
        .prefix("dkd")
        .tempdir_in("/tmp")
        .expect("roots");
    let state = base.path().join("s");
    let options = || QemuDriverOptions::persistent(&state, base.path().join("r"));
    let image = base.path().join("h1.raw");
    std::fs::write(&image, vec![0u8; 1 << 20]).expect("image");

    let first = QemuDriver::open(options()).await.expect("first manager");
    let domain = first
        .define(guest_config("devs", ""))
        .await
        .expect("define");
    let mut d = Disk::new(&image);
    d.id = Some(id("h1"));
    // Live on a shut-off domain: invalid_state, nothing stored.
    let e = domain
        .attach_device(DeviceSpec::Disk(d.clone()), DeviceScope::Live)
        .await
        .expect_err("live attach of a shut-off domain");
    assert!(matches!(e, Error::InvalidState { .. }), "{e}");
    let before = stored_definitions(&state);
    assert!(!before[0].contains("\"h1\""), "{before:?}");
    domain
        .attach_device(DeviceSpec::Disk(d), DeviceScope::Config)
        .await
        .expect("config attach");
    domain
        .attach_device(
            DeviceSpec::Nic(Nic {
                id: Some(id("n9")),
                mac: Some("52:54:00:dd:06:01".into()),
                backend: NicBackend::User,
            }),
            DeviceScope::Config,
        )
        .await
        .expect("config attach of a NIC");
    let stored = stored_definitions(&state);
    assert!(
        stored[0].contains("\"h1\"") && stored[0].contains("52:54:00:dd:06:01"),
        "the definition on disk lacks the attached devices: {stored:?}"
    );
    // A refused change leaves the file as it was.
    let e = domain
        .attach_device(
            DeviceSpec::Nic(Nic {
                id: Some(id("n10")),
                mac: Some("52:54:00:DD:06:01".into()),
                backend: NicBackend::User,
            }),
            DeviceScope::Config,
        )
        .await
        .expect_err("a MAC in use");
    assert!(
        matches!(e, Error::InvalidConfig(ConfigError::DuplicateMac { .. })),
        "{e}"
    );
    assert_eq!(stored_definitions(&state), stored);
    drop(domain);
    drop(first);

    let second = QemuDriver::open(options()).await.expect("next manager");
    let domain = second.lookup_by_name("devs").await.expect("stored");
    let ids: Vec<String> = domain
        .defined_devices()
        .await
        .expect("defined devices")
        .into_iter()
        .map(|d| d.id.to_string())
        .collect();
    assert_eq!(ids, ["h1", "n9"], "the next manager's definition");
    domain
        .start(StartOptions { paused: true })
        .await
        .expect("start");
    let live: Vec<String> = domain
        .devices()
        .await
        .expect("devices")
        .into_iter()
        .map(|d| d.id.to_string())
        .collect();
    assert_eq!(
        live,
        ["h1", "n9"],
        "the next start has the definition's devices"
    );
    let qmp = domain.qmp().expect("qmp");
    let tree = qmp
        .execute(
            "qom-list",
            Some(serde_json::json!({"path": "/machine/peripheral"})),
        )
        .await
        .expect("qom-list");
    let names: Vec<&str> = tree
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["name"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        names.contains(&"h1") && names.contains(&"n9"),
        "QEMU's devices: {names:?}"
    );
    domain.destroy().await.expect("destroy");
    // Detach from the definition: durable too.
    domain
        .detach_device(
            id("h1"),
            DetachOptions {
                scope: DeviceScope::Config,
                ..Default::default()
            },
        )
        .await
        .expect("config detach");
    assert!(!stored_definitions(&state)[0].contains("\"h1\""));
    second.undefine("devs").await.expect("undefine");
}
