//! Save and restore of a REAL test guest: guest state survives; a paused save restores
//! paused; failed saves (unwritable directory, disk full mid-stream, a directory as path)
//! leave the domain as it was, no partial file, and an older file at the path untouched.

mod driver_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use domkit_core::{
    Domain, DomainState, Error, EventKind, PausedReason, RestoreOptions, ResumedDetail,
    RunningReason, ShutoffReason, StartedDetail, StoppedDetail, SuspendedDetail,
};
use driver_support::*;

const MARK: &str = "domkit-save-mark-4711";
const OLD: &[u8] = b"an older, good save file";

fn is_root() -> bool {
    nix::unistd::getuid().is_root()
}

/// A small tmpfs (root only), unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().expect("mount point");
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "domkit-test",
            ])
            .arg(dir.path())
            .status()
            .expect("mount")
            .success();
        assert!(ok, "mounting a tmpfs failed");
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn remount_ro(&self) {
        let ok = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(self.dir.path())
            .status()
            .expect("remount")
            .success();
        assert!(ok, "remount ro failed");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn listing(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("ls")
        .flatten()
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_saves_leave_domain_and_older_file_untouched() {
    let h = Harness::new();
    let domain = h.define(guest_config("savefail", "")).await;
    let log = EventLog::new(&domain);
    h.boot(&domain).await;
    log.take().await;

    // 1. Unwritable directory holding an older file: fails before the domain is touched.
    let (ro_guard, ro_dir): (Option<Tmpfs>, PathBuf);
    let plain = tempfile::tempdir().expect("dir");
    if is_root() {
        // chmod does not stop root: use a read-only mount.
        let fs = Tmpfs::mount("1m");
        std::fs::write(fs.path().join("old.save"), OLD).expect("old file");
        fs.remount_ro();
        ro_dir = fs.path().to_path_buf();
        ro_guard = Some(fs);
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(plain.path().join("old.save"), OLD).expect("old file");
        std::fs::set_permissions(plain.path(), std::fs::Permissions::from_mode(0o500))
            .expect("chmod");
        ro_dir = plain.path().to_path_buf();
        ro_guard = None;
    }
    let target = ro_dir.join("old.save");
    let err = domain.save(&target).await.expect_err("unwritable");
    eprintln!("unwritable dir: {err}");
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert_eq!(domain.state(), DomainState::Running(RunningReason::Booted));
    assert_eq!(std::fs::read(&target).expect("old"), OLD);
    assert_eq!(listing(&ro_dir), [target]);
    drop(ro_guard);

    // 2. A directory as the path: refused before anything happens.
    let err = domain.save(plain.path()).await.expect_err("a directory");
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(
        log.take().await.is_empty(),
        "nothing happened to the domain"
    );

    // 3. Disk full in the middle of the stream (root only: needs a small tmpfs): the vCPUs
    //    were stopped for the save and run again; the temp file is gone, the old file kept.
    if is_root() {
        let fs = Tmpfs::mount("8m");
        let target = fs.path().join("web.save");
        std::fs::write(&target, OLD).expect("old file");
        let err = domain.save(&target).await.expect_err("disk full");
        eprintln!("disk full: {err}");
        assert_eq!(
            domain.state(),
            DomainState::Running(RunningReason::SaveCanceled)
        );
        assert_eq!(
            log.take().await,
            [
                EventKind::Suspended(SuspendedDetail::Saving),
                EventKind::Resumed(ResumedDetail::SaveCanceled),
            ]
        );
        assert_eq!(std::fs::read(&target).expect("old"), OLD);
        assert_eq!(listing(fs.path()), [target]);
        // The guest still works.
        assert_eq!(sh(&domain, "echo alive").await.trim(), "alive");
    } else {
        eprintln!("not root: the disk-full save check needs a tmpfs mount and is skipped");
    }
    domain.destroy().await.expect("destroy");
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_restore_keeps_guest_state_and_paused_save_restores_paused() {
    let h = Harness::new();
    let domain = h.define(guest_config("saver", "")).await;
    let log = EventLog::new(&domain);
    h.boot(&domain).await;
    sh(&domain, &format!("echo {MARK} > /tmp/mark")).await;
    log.take().await;

    let dir = tempfile::tempdir().expect("save dir");
    let path = dir.path().join("saver.save");
    std::fs::write(&path, OLD).expect("an older file, replaced on success");

    let t = Instant::now();
    domain.save(&path).await.expect("save");
    let save_time = t.elapsed();
    assert_eq!(domain.state(), DomainState::Shutoff(ShutoffReason::Saved));
    assert_eq!(
        log.take().await,
        [
            EventKind::Suspended(SuspendedDetail::Saving),
            EventKind::Stopped(StoppedDetail::Saved),
        ]
    );
    assert_eq!(
        listing(dir.path()),
        std::slice::from_ref(&path),
        "no temp file left"
    );
    let size = std::fs::metadata(&path).expect("saved").len();
    assert!(size > 1_000_000, "save file is {size} bytes");

    let t = Instant::now();
    domain
        .restore(&path, RestoreOptions::default())
        .await
        .expect("restore");
    let restore_time = t.elapsed();
    h.track(&domain);
    assert_eq!(
        domain.state(),
        DomainState::Running(RunningReason::Restored)
    );
    assert_eq!(
        log.take().await,
        [EventKind::Started(StartedDetail::Restored)]
    );
    assert_eq!(sh(&domain, "cat /tmp/mark").await.trim(), MARK);
    eprintln!("save {save_time:?} ({size} bytes), restore {restore_time:?}");

    // Saved paused -> restored paused.
    domain.pause().await.expect("pause");
    domain.save(&path).await.expect("save paused");
    assert_eq!(
        log.take().await,
        [
            EventKind::Suspended(SuspendedDetail::Paused),
            EventKind::Stopped(StoppedDetail::Saved),
        ]
    );
    domain
        .restore(&path, RestoreOptions::default())
        .await
        .expect("restore paused");
    h.track(&domain);
    assert_eq!(domain.state(), DomainState::Paused(PausedReason::User));
    assert_eq!(
        log.take().await,
        [
            EventKind::Started(StartedDetail::Restored),
            EventKind::Suspended(SuspendedDetail::Paused),
        ]
    );
    domain.resume().await.expect("resume");
    assert_eq!(sh(&domain, "cat /tmp/mark").await.trim(), MARK);
    domain.destroy().await.expect("destroy");

    // A file that is not a save: typed error, Shutoff(Failed), the file kept.
    let bogus = dir.path().join("bogus.save");
    std::fs::write(&bogus, b"not a save file").expect("bogus");
    let err = domain
        .restore(&bogus, RestoreOptions::default())
        .await
        .expect_err("bogus file");
    eprintln!("bogus restore: {err}");
    assert_eq!(domain.state(), DomainState::Shutoff(ShutoffReason::Failed));
    assert!(bogus.exists());
    h.finish().await;
}
