//! Ephemeral ownership on Xen (`docs/semantics.md` §11.0): Xen domains outlive every process
//! by nature, yet an ephemeral driver's domains must die with the manager *process*, however
//! it dies (SIGKILL included), like QEMU's. Two mechanisms:
//!
//! - **The reaper**: a small process forked when the driver opens, holding the read end of a
//!   pipe whose write end only the manager holds (`O_CLOEXEC`: no program the manager
//!   executes inherits it). The manager tells it `+name` before it creates a Xen domain and
//!   `-name` once none of that domain exists. When the manager process dies, the kernel
//!   closes the write end; the reaper reads EOF and runs `xl destroy <name>` (execve with an
//!   argv, no shell) for every name still told, then exits. It is in a session of its own
//!   (a Ctrl-C or a hangup of the manager's terminal does not reach it), ignores the usual
//!   termination signals, keeps no fd of the manager's but the pipe (its stdout/stderr go to
//!   `<runtime root>/reaper.log`), and is double-forked: it is not the manager's child, so
//!   neither libxl nor tokio ever sees its exit. A name, not a domid: a create that has not
//!   returned its domid yet is covered, and Xen domain names are unique.
//! - **Markers**: `<runtime root>/<name>/xen-domain` holds the uuid of a Xen domain the
//!   driver may have made, from before its create until it is gone. The next ephemeral
//!   driver on the same (locked) runtime root destroys the Xen domains those markers name
//!   and removes the directories: what a dead manager left when its reaper could not run
//!   (killed as well, e.g. by a kill of its whole process group or the OOM killer).
//!
//! A dropped ephemeral driver destroys its domains itself (driver.rs), then closes the pipe:
//! the reaper then finds nothing to do.
//!
//! The child runs between `fork` and `_exit`/`execve` in a copy of a multi-threaded process:
//! it calls only async-signal-safe functions (`setsid`, `signal`, `sigprocmask`, `fcntl`,
//! `dup2`, `open`, `close`, `read`, `fork`, `execve`, `waitpid`, `_exit`) and never allocates
//! or locks: everything it needs (the `xl` path, argv and envp as C strings) is prepared
//! before the fork, its table of names is a fixed array on its stack.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The marker file in a domain's runtime directory (its uuid, as text).
pub(crate) const MARKER: &str = "xen-domain";

/// How many names the reaper can hold (more domains than this in one ephemeral driver are
/// still destroyed by the driver's drop and by the next driver's sweep, not by the reaper).
const REAPER_SLOTS: usize = 256;
/// The longest domain name (`domkit_core::config::validate_name`).
const NAME_MAX: usize = 64;

/// Where `xl` is looked for (dom0 installs put it in an sbin directory, often not in a
/// service's PATH).
const XL_CANDIDATES: &[&str] = &[
    "/usr/sbin/xl",
    "/usr/local/sbin/xl",
    "/sbin/xl",
    "/usr/bin/xl",
    "/usr/local/bin/xl",
];

/// The manager's end of the pipe to its reaper.
#[derive(Debug)]
pub(crate) struct Reaper {
    pipe: Mutex<File>,
    runtime_root: PathBuf,
}

/// What the child needs, prepared before the fork (it must not allocate).
struct Prepared {
    xl: CString,
    argv0: CString,
    destroy: CString,
    env_path: CString,
    read_fd: libc::c_int,
    log_fd: libc::c_int,
}

fn find_xl() -> io::Result<PathBuf> {
    let from_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("xl"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    XL_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .chain(from_path)
        .find(|p| p.is_absolute() && p.is_file())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "`xl` not found (in /usr/sbin, /usr/local/sbin, /sbin or PATH): an ephemeral \
                 libxl driver needs it to destroy its domains when its process dies (install \
                 the Xen tools, or open the driver persistent)",
            )
        })
}

impl Reaper {
    /// Fork the reaper of a driver whose runtime root is `runtime_root` (existing, ours).
    pub(crate) fn spawn(runtime_root: &Path) -> io::Result<Reaper> {
        let xl = find_xl()?;
        let log_path = runtime_root.join("reaper.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&log_path)?;
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: fds is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 returned two fresh fds that nothing else owns.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let nul = |s: &str| CString::new(s).map_err(io::Error::other);
        let prepared = Prepared {
            xl: CString::new(xl.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?,
            argv0: nul("xl")?,
            destroy: nul("destroy")?,
            env_path: nul("PATH=/usr/sbin:/usr/bin:/sbin:/bin")?,
            read_fd: read_end.as_raw_fd(),
            log_fd: log.as_raw_fd(),
        };
        // SAFETY: fork in a multi-threaded process: the child (`intermediate`) only calls
        // fork and _exit, and its child runs `reaper_main`, which only calls
        // async-signal-safe functions on data prepared above (see the module docs).
        let pid = unsafe { libc::fork() };
        match pid {
            -1 => return Err(io::Error::last_os_error()),
            0 => {
                // SAFETY: in the forked child; see above.
                unsafe {
                    match libc::fork() {
                        0 => reaper_main(&prepared),
                        -1 => libc::_exit(1),
                        _ => libc::_exit(0),
                    }
                }
            }
            _ => {}
        }
        drop(read_end);
        drop(log);
        let mut status = 0;
        loop {
            // SAFETY: pid is our child (the intermediate); status is a valid out pointer.
            let r = unsafe { libc::waitpid(pid, &mut status, 0) };
            if r == pid {
                break;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
            return Err(io::Error::other(format!(
                "the reaper could not be forked (intermediate status {status})"
            )));
        }
        tracing::debug!(xl = %xl.display(), log = %log_path.display(), "libxl reaper started");
        Ok(Reaper {
            pipe: Mutex::new(File::from(write_end)),
            runtime_root: runtime_root.to_owned(),
        })
    }

    fn tell(&self, line: &str) {
        let mut pipe = self.pipe.lock().unwrap_or_else(|p| p.into_inner());
        // One write of a short line: atomic on a pipe (< PIPE_BUF), never interleaved.
        if let Err(e) = pipe.write_all(line.as_bytes()) {
            tracing::warn!(error = %e, line = line.trim_end(), "cannot tell the reaper");
        }
    }

    /// A Xen domain named `name` (uuid `uuid`) may exist from now on: marked, and told to
    /// the reaper, before the create.
    pub(crate) fn track(&self, name: &str, uuid: uuid::Uuid) {
        let dir = self.runtime_root.join(name);
        if let Err(e) = domkit_core::store::ensure_private_dir(&dir).and_then(|()| {
            domkit_core::store::write_atomic(&dir.join(MARKER), uuid.to_string().as_bytes())
        }) {
            tracing::warn!(domain = name, error = %e, "cannot write the ephemeral marker");
        }
        self.tell(&format!("+{name}\n"));
    }

    /// No Xen domain of `name` exists any more.
    pub(crate) fn untrack(&self, name: &str) {
        self.tell(&format!("-{name}\n"));
        let marker = self.runtime_root.join(name).join(MARKER);
        match std::fs::remove_file(&marker) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(domain = name, error = %e, "cannot remove the ephemeral marker")
            }
        }
    }
}

/// What a dead ephemeral manager left under `runtime_root`: for each domain directory, the
/// uuid its marker names (`None`: no marker, nothing of Xen to destroy).
pub(crate) fn leftovers(runtime_root: &Path) -> Vec<(PathBuf, Option<uuid::Uuid>)> {
    let Ok(entries) = std::fs::read_dir(runtime_root) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| {
            let uuid = std::fs::read_to_string(e.path().join(MARKER))
                .ok()
                .and_then(|s| s.trim().parse().ok());
            (e.path(), uuid)
        })
        .collect()
}

/// One slot of the reaper's table: a name (NUL-terminated for execve) or free (`len == 0`).
#[derive(Clone, Copy)]
struct Slot {
    name: [u8; NAME_MAX + 1],
    len: usize,
}

const FREE: Slot = Slot {
    name: [0; NAME_MAX + 1],
    len: 0,
};

fn same(slot: &Slot, name: &[u8]) -> bool {
    slot.len == name.len() && slot.name.get(..slot.len) == Some(name)
}

/// Apply one protocol line (`+name` / `-name`) to the table.
fn apply(table: &mut [Slot; REAPER_SLOTS], line: &[u8]) {
    let (op, name) = match line.split_first() {
        Some((op, name)) if !name.is_empty() && name.len() <= NAME_MAX => (*op, name),
        _ => return,
    };
    match op {
        b'+' => {
            if table.iter().any(|s| same(s, name)) {
                return;
            }
            if let Some(slot) = table.iter_mut().find(|s| s.len == 0) {
                slot.name = [0; NAME_MAX + 1];
                if let Some(dst) = slot.name.get_mut(..name.len()) {
                    dst.copy_from_slice(name);
                    slot.len = name.len();
                }
            }
        }
        b'-' => {
            for slot in table.iter_mut().filter(|s| same(s, name)) {
                *slot = FREE;
            }
        }
        _ => {}
    }
}

/// The reaper process. Never returns.
///
/// # Safety
/// Only in a child forked from this process, with `p` prepared before the fork.
unsafe fn reaper_main(p: &Prepared) -> ! {
    // SAFETY: this runs in a forked child of a multi-threaded process: every call below is
    // async-signal-safe, on fds this process owns and on C strings prepared before the
    // fork; nothing allocates, locks or unwinds (no indexing that can panic).
    unsafe {
        libc::setsid();
        for sig in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGPIPE,
        ] {
            libc::signal(sig, libc::SIG_IGN);
        }
        // The manager's handlers (tokio's) must not run here, and waitpid needs SIGCHLD default.
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        // fds: 0 = /dev/null, 1 and 2 = the log, 3 = the pipe; nothing else of the manager's
        // (a socket or pipe kept open here would hide the manager's death from its peers).
        let read_fd = libc::fcntl(p.read_fd, libc::F_DUPFD, 10);
        let log_fd = libc::fcntl(p.log_fd, libc::F_DUPFD, 10);
        if read_fd < 0 || log_fd < 0 {
            libc::_exit(2);
        }
        let null = libc::open(b"/dev/null\0".as_ptr().cast(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
        }
        libc::dup2(log_fd, 1);
        libc::dup2(log_fd, 2);
        libc::dup2(read_fd, 3);
        libc::fcntl(3, libc::F_SETFD, libc::FD_CLOEXEC);
        if libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32) != 0 {
            for fd in 4..4096 {
                libc::close(fd);
            }
        }

        let mut table = [FREE; REAPER_SLOTS];
        let mut line = [0u8; NAME_MAX + 2];
        let mut line_len = 0usize;
        let mut overlong = false;
        let mut buf = [0u8; 512];
        loop {
            let n = libc::read(3, buf.as_mut_ptr().cast(), buf.len());
            if n < 0 {
                if *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                break;
            }
            if n == 0 {
                break; // EOF: the manager process is gone
            }
            for &b in buf.iter().take(n as usize) {
                if b == b'\n' {
                    if !overlong {
                        apply(&mut table, line.get(..line_len).unwrap_or(&[]));
                    }
                    line_len = 0;
                    overlong = false;
                } else if let Some(slot) = line.get_mut(line_len) {
                    *slot = b;
                    line_len += 1;
                } else {
                    overlong = true;
                }
            }
        }

        let envp = [p.env_path.as_ptr(), std::ptr::null()];
        let mut children = [0 as libc::pid_t; REAPER_SLOTS];
        for (slot, child) in table.iter().zip(children.iter_mut()) {
            if slot.len == 0 {
                continue;
            }
            let name = CStr::from_bytes_until_nul(&slot.name);
            let Ok(name) = name else { continue };
            let argv = [
                p.argv0.as_ptr(),
                p.destroy.as_ptr(),
                name.as_ptr(),
                std::ptr::null(),
            ];
            match libc::fork() {
                0 => {
                    libc::execve(p.xl.as_ptr(), argv.as_ptr(), envp.as_ptr());
                    libc::_exit(127);
                }
                pid if pid > 0 => *child = pid,
                _ => {}
            }
        }
        for &pid in children.iter().filter(|&&pid| pid > 0) {
            let mut status = 0;
            while libc::waitpid(pid, &mut status, 0) < 0 && *libc::__errno_location() == libc::EINTR
            {
            }
        }
        libc::_exit(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(table: &[Slot; REAPER_SLOTS]) -> Vec<String> {
        table
            .iter()
            .filter(|s| s.len > 0)
            .map(|s| String::from_utf8_lossy(&s.name[..s.len]).into_owned())
            .collect()
    }

    #[test]
    fn the_table_keeps_what_was_told_and_not_untold() {
        let mut t = [FREE; REAPER_SLOTS];
        apply(&mut t, b"+web1");
        apply(&mut t, b"+web2");
        apply(&mut t, b"+web1");
        apply(&mut t, b"-web2");
        apply(&mut t, b"+web3");
        assert_eq!(names(&t), vec!["web1", "web3"]);
        // Garbage and overlong names are ignored, never a panic.
        apply(&mut t, b"");
        apply(&mut t, b"+");
        apply(&mut t, b"?x");
        apply(&mut t, &[b'+'; 200]);
        assert_eq!(names(&t), vec!["web1", "web3"]);
        let name64 = [b'a'; 64];
        let mut line = vec![b'+'];
        line.extend_from_slice(&name64);
        apply(&mut t, &line);
        assert_eq!(names(&t).len(), 3);
        let slot = t.iter().find(|s| s.len == 64).unwrap();
        assert_eq!(slot.name[64], 0, "NUL-terminated for execve");
    }

    #[test]
    fn a_full_table_drops_new_names_without_harm() {
        let mut t = [FREE; REAPER_SLOTS];
        for i in 0..REAPER_SLOTS + 10 {
            apply(&mut t, format!("+d{i}").as_bytes());
        }
        assert_eq!(names(&t).len(), REAPER_SLOTS);
    }
}
