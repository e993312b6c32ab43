//! The conformance suite against the real QEMU backend (TCG, the repo's test guest).
//! Needs `scripts/build-test-guest.sh` to have run; fails (never silently passes) otherwise.
//! `DOMKIT_CONFORMANCE_ONLY=pattern` runs a subset; `DOMKIT_CONFORMANCE_RECORD=FILE` writes
//! the results record (`docs/conformance/qemu.json`'s format) there.

use domkit_conformance::qemu::QemuTestBackend;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_on_qemu() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
    let backend = QemuTestBackend::new().unwrap_or_else(|e| panic!("{e}"));
    let only = std::env::var("DOMKIT_CONFORMANCE_ONLY").ok();
    let report = domkit_conformance::run(&backend, only.as_deref()).await;
    println!("{}", report.table());
    println!("{}", report.summary_line());
    if let Some(path) = std::env::var_os("DOMKIT_CONFORMANCE_RECORD") {
        let path = std::path::PathBuf::from(path);
        report
            .write_record(&path, "cargo test -p domkit-conformance (scripts/test.sh)")
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
    assert!(!report.scenarios.is_empty(), "no scenario ran");
    assert!(report.ok(), "conformance failures:\n{}", report.table());
}
