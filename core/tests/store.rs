//! §11.1-§11.2: the durable store: private directories nobody else controls, atomic writes,
//! definitions and statuses that survive the process.

use domkit_core::store::{
    ensure_private_dir, write_atomic, DefinitionStore, InFlight, StoredStatus,
};
use domkit_core::{DomainConfig, DomainState, PausedReason, RunningReason, ShutoffReason};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;

fn base() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

#[test]
fn s11_1_creates_missing_directories_0700() {
    let b = base();
    let dir = b.path().join("a/b/c");
    ensure_private_dir(&dir).expect("create");
    for d in [b.path().join("a"), b.path().join("a/b"), dir.clone()] {
        let mode = std::fs::metadata(&d).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", d.display());
    }
    ensure_private_dir(&dir).expect("an existing private directory is fine");
}

#[test]
fn s11_1_refuses_a_symlink_anywhere_on_the_path() {
    let b = base();
    let real = b.path().join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
    let link = b.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let err = ensure_private_dir(&link).expect_err("symlink target");
    assert!(err.to_string().contains("symbolic link"), "{err}");
    let err = ensure_private_dir(&link.join("sub")).expect_err("symlink ancestor");
    assert!(err.to_string().contains(&*link.to_string_lossy()), "{err}");
    assert!(
        !real.join("sub").exists(),
        "nothing created through the link"
    );
}

#[test]
fn s11_1_refuses_group_or_other_access_and_foreign_owners() {
    let b = base();
    let open = b.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = ensure_private_dir(&open).expect_err("0755 target");
    assert!(err.to_string().contains("0700"), "{err}");

    let writable = b.path().join("writable");
    std::fs::create_dir(&writable).unwrap();
    std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = ensure_private_dir(&writable.join("sub")).expect_err("world-writable ancestor");
    assert!(err.to_string().contains("may write"), "{err}");

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // Pre-created by another user (the attack of issue 12): refused.
        let foreign = b.path().join("foreign");
        std::fs::create_dir(&foreign).unwrap();
        std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&foreign, Some(4242), Some(4242)).unwrap();
        let err = ensure_private_dir(&foreign).expect_err("foreign owner");
        assert!(err.to_string().contains("uid 4242"), "{err}");
    }
}

#[test]
fn s11_1_root_owned_sticky_ancestors_like_tmp_are_accepted() {
    let meta = std::fs::metadata("/tmp").unwrap();
    if meta.uid() == 0 && meta.mode() & 0o1000 != 0 {
        let b = tempfile::Builder::new().tempdir_in("/tmp").unwrap();
        ensure_private_dir(&b.path().join("ok")).expect("under /tmp");
    }
}

#[test]
fn s11_1_write_atomic_replaces_whole_files_0600_and_leaves_no_temp() {
    let b = base();
    let path = b.path().join("f.json");
    write_atomic(&path, b"old").unwrap();
    write_atomic(&path, b"new").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"new");
    assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
    let names: Vec<_> = std::fs::read_dir(b.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

fn config(name: &str) -> DomainConfig {
    let mut c = DomainConfig::with_kernel(name, 64, PathBuf::from("/boot/vmlinuz"));
    c.uuid = Some(uuid::Uuid::new_v4());
    c
}

#[test]
fn s11_2_definitions_and_statuses_round_trip_and_undefine_removes_them() {
    let b = base();
    let root = b.path().join("state");
    let store = DefinitionStore::open(&root).unwrap();
    let a = config("a");
    let z = config("z");
    store.save_definition(&z).unwrap();
    store.save_definition(&a).unwrap();
    let status = StoredStatus {
        seq: 7,
        state: DomainState::Paused(PausedReason::Save),
        in_flight: Some(InFlight::Save {
            target: "/x/save.img".into(),
            temp: "/x/.save.img.tmp".into(),
            was_paused: false,
            committing: false,
        }),
        pending_end: Some(ShutoffReason::Shutdown),
        devices: None,
    };
    store.save_status(a.uuid.unwrap(), &status).unwrap();

    // A new process opening the same root sees both, in name order.
    let again = DefinitionStore::open(&root).unwrap();
    let all = again.load_all().unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].definition.config, a);
    assert_eq!(all[0].status.as_ref(), Some(&status));
    assert_eq!(all[1].definition.config, z);
    assert_eq!(all[1].status, None);

    again
        .save_status(
            z.uuid.unwrap(),
            &StoredStatus {
                seq: 2,
                state: DomainState::Running(RunningReason::Booted),
                in_flight: None,
                pending_end: None,
                devices: None,
            },
        )
        .unwrap();
    again.remove(z.uuid.unwrap()).unwrap();
    let all = again.load_all().unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].definition.config.name, "a");
}

#[test]
fn s11_2_a_corrupt_record_is_an_error_naming_the_file() {
    let b = base();
    let root = b.path().join("state");
    let store = DefinitionStore::open(&root).unwrap();
    let bad = root
        .join("domains")
        .join(format!("{}.json", uuid::Uuid::new_v4()));
    std::fs::write(&bad, b"{ not json").unwrap();
    let err = store.load_all().expect_err("corrupt");
    assert!(err.to_string().contains(&*bad.to_string_lossy()), "{err}");
}
