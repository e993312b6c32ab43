//! One manager per root (I/O, backend-independent): an exclusive `flock` on `<root>/lock`, held for the
//! driver's life. A second process opening the same root gets [`Error::RootInUse`] with the
//! holder's pid and touches nothing (it would otherwise delete the first one's live sockets).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use nix::fcntl::{Flock, FlockArg};

/// The held lock; released when dropped (the kernel also releases it when the process dies,
/// however it dies).
#[derive(Debug)]
pub struct RootLock {
    _file: Flock<File>,
}

impl RootLock {
    /// Take the lock of `root` (which exists), or fail with the holder's pid.
    pub fn acquire(root: &Path) -> Result<RootLock> {
        let path: PathBuf = root.join("lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| Error::io(format!("opening the root lock {}", path.display()), e))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut locked) => {
                // Our pid, for the error a second manager gets.
                let written = locked
                    .set_len(0)
                    .and_then(|_| locked.rewind())
                    .and_then(|_| writeln!(locked, "{}", std::process::id()));
                if let Err(e) = written {
                    tracing::debug!(error = %e, "cannot write the pid into the root lock");
                }
                Ok(RootLock { _file: locked })
            }
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                Err(Error::RootInUse {
                    path,
                    holder_pid: text.trim().parse().ok(),
                })
            }
            Err((_, errno)) => Err(Error::io(
                format!("locking the root {}", path.display()),
                std::io::Error::from(errno),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_root_names_the_holder() {
        let root = tempfile::tempdir().expect("root");
        let first = RootLock::acquire(root.path()).expect("first");
        match RootLock::acquire(root.path()) {
            Err(Error::RootInUse { holder_pid, .. }) => {
                assert_eq!(holder_pid, Some(std::process::id()))
            }
            other => panic!("want root_in_use, got {other:?}"),
        }
        drop(first);
        RootLock::acquire(root.path()).expect("free again after the holder is gone");
    }
}
