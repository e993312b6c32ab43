//! Who may use domkitd's sockets, checked with a real unprivileged user running the real
//! `domkit` CLI binary against a real domkitd (no domain is needed):
//! - the default full-access socket (0600, root's) refuses the user: `domkit` exits 7
//!   (unreachable) with the OS's `Permission denied`, whatever groups the user has;
//! - with `--socket-group G` a member of G is admitted with full access (a mutation reaches
//!   the library: a bad config is the library's `invalid_config`), the same user without
//!   the group is refused;
//! - the read-only socket admits the user read-only: queries answer, a mutation is
//!   `permission_denied` (exit 6).
//!
//! The user and group (`domkit-test`, `domkit-test-sock`) are created with `useradd` /
//! `groupadd` when absent (CI runs as root on a fresh Debian 12); the CLI runs as that user
//! through `initgroups`/`setgid`/`setuid` in the child before `exec`. Not root: skipped,
//! saying so.

mod common;

use common::{Daemon, Dirs};
use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const USER: &str = "domkit-test";
const GROUP: &str = "domkit-test-sock";

/// The unprivileged test user: uid, primary gid.
struct TestUser {
    uid: u32,
    gid: u32,
}

fn run_ok(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Create the group and the user (a member of it) if they do not exist yet.
fn ensure_user() -> TestUser {
    if nix::unistd::Group::from_name(GROUP).unwrap().is_none() {
        run_ok("groupadd", &["--system", GROUP]);
    }
    if nix::unistd::User::from_name(USER).unwrap().is_none() {
        run_ok(
            "useradd",
            &[
                "--system",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                "--groups",
                GROUP,
                USER,
            ],
        );
    }
    let group = nix::unistd::Group::from_name(GROUP).unwrap().unwrap();
    if !group.mem.iter().any(|m| m == USER) {
        run_ok("usermod", &["--append", "--groups", GROUP, USER]);
    }
    let user = nix::unistd::User::from_name(USER).unwrap().unwrap();
    assert_ne!(user.uid.as_raw(), 0);
    TestUser {
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    }
}

/// Run `domkit ARGS` as the test user: with its groups from /etc/group (`initgroups`),
/// or with only its primary group (`with_groups = false`). (exit code, stdout, stderr).
fn cli_as(
    user: &TestUser,
    with_groups: bool,
    domkit: &Path,
    socket: &Path,
    args: &[&str],
) -> (i32, String, String) {
    let name = CString::new(USER).unwrap();
    let (uid, gid) = (user.uid, user.gid);
    let mut cmd = Command::new(domkit);
    cmd.arg("--socket")
        .arg(socket)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::null())
        .current_dir("/");
    // SAFETY: between fork and exec only async-signal-safe calls on data prepared before
    // the fork (initgroups reads /etc/group, as login does; the child is single-threaded).
    unsafe {
        cmd.pre_exec(move || {
            let groups_ok = if with_groups {
                libc::initgroups(name.as_ptr(), gid as libc::gid_t)
            } else {
                let g = gid as libc::gid_t;
                libc::setgroups(1, &g)
            };
            if groups_ok != 0
                || libc::setgid(gid as libc::gid_t) != 0
                || libc::setuid(uid as libc::uid_t) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("run domkit as the test user");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `domkit` binary at a path the test user may reach (the build tree is usually under
/// root's 0700 home), in `dir`: a hard link (the binary is 0755 already; no 180 MB copy of
/// a debug build), or a copy on another file system.
fn user_runnable_cli(dir: &Path) -> PathBuf {
    let path = dir.join("domkit");
    if std::fs::hard_link(common::domkit_bin(), &path).is_err() {
        std::fs::copy(common::domkit_bin(), &path).expect("copy domkit");
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// The test's directories, which the user may traverse (but not list or write) down to the
/// daemon's own directories, whose modes are domkitd's business.
fn traversable_dirs() -> Dirs {
    let dirs = Dirs::new();
    std::fs::set_permissions(dirs.root.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    dirs
}

#[test]
fn a_non_root_user_is_refused_admitted_by_group_and_read_only_on_the_ro_socket() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (creates a user and switches to it)");
        return;
    }
    let user = ensure_user();

    // The default: 0600, root's. Refused even with the group (it is not the socket's).
    let daemon = Daemon::start(traversable_dirs(), &[]);
    let domkit = user_runnable_cli(daemon.dirs.root.path());
    let (code, out, err) = cli_as(&user, true, &domkit, &daemon.socket, &["list", "--all"]);
    assert_eq!(code, 7, "refused on the 0600 socket (exit 7): {out}{err}");
    assert!(err.contains("Permission denied"), "{err}");
    assert!(err.contains("cannot reach domkitd"), "{err}");
    drop(daemon);

    // --socket-group: the group's members get full access, others nothing; the read-only
    // socket serves anyone, read-only.
    let dirs = traversable_dirs();
    let ro = dirs.root.path().join("ro").join("domkitd-ro.sock");
    let daemon = Daemon::start(
        dirs,
        &[
            "--socket-group",
            GROUP,
            "--listen-ro",
            &format!("unix:{}", ro.display()),
        ],
    );
    let domkit = user_runnable_cli(daemon.dirs.root.path());
    let sock = &daemon.socket;

    let (code, out, err) = cli_as(&user, true, &domkit, sock, &["daemon-version", "--json"]);
    assert_eq!(code, 0, "a member of {GROUP} is admitted: {out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["read_only"], false, "full access: {out}");
    // A mutation reaches the library: the bad config's own error, exit 8.
    let bad = daemon.dirs.root.path().join("bad.toml");
    std::fs::write(&bad, "name = \"perm1\"\nmemory_mib = 1\n").unwrap();
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, out, err) = cli_as(
        &user,
        true,
        &domkit,
        sock,
        &["define", &bad.display().to_string()],
    );
    assert_eq!(
        code, 8,
        "the member's define reached the library: {out}{err}"
    );
    let log = daemon.log_text();
    assert!(
        log.contains(&format!("uid={}", user.uid)),
        "the member's credentials are logged: {log}"
    );

    let (code, out, err) = cli_as(&user, false, &domkit, sock, &["list", "--all"]);
    assert_eq!(code, 7, "without the group: refused: {out}{err}");
    assert!(err.contains("Permission denied"), "{err}");

    let (code, out, err) = cli_as(&user, false, &domkit, &ro, &["daemon-version", "--json"]);
    assert_eq!(code, 0, "the read-only socket admits anyone: {out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["read_only"], true, "{out}");
    let (code, out, err) = cli_as(&user, false, &domkit, &ro, &["list", "--all"]);
    assert_eq!(code, 0, "list is read-only: {out}{err}");
    let (code, out, err) = cli_as(&user, false, &domkit, &ro, &["destroy", "any"]);
    assert_eq!(code, 6, "a mutation on the read-only socket: {out}{err}");
    assert!(err.contains("read-only"), "{err}");
}
