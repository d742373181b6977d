//! File-system guards every binary relies on: exclusive locks held for a process's lifetime,
//! the owner-only umask, and the permission check on private keys.
//!
//! Locks are `flock(2)` locks: the kernel drops them when the process dies, however it dies,
//! so a crash never leaves a stale lock behind (unlike a PID file).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation, Mode};

use crate::{Error, Result};

/// Name of the lock file inside a locked folder.
pub const LOCK_FILE: &str = "lock";

/// An exclusive lock on a folder, released when dropped (or when the process exits).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    path: PathBuf,
}

impl DirLock {
    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Take the exclusive lock on `dir` (creating `dir` and `dir/lock` if needed) without waiting.
/// `what` names the folder in the error (e.g. "data folder"). Opening the lock file never
/// truncates or writes it, so a refused second process leaves every byte as it was.
pub fn lock_dir(dir: &Path, what: &'static str) -> Result<DirLock> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, e))?;
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io("cannot open the lock file", &path, e))?;
    lock_file(&file, what, dir, &path)?;
    Ok(DirLock { _file: file, path })
}

/// Take the exclusive lock on an open file without waiting; `path` and `lock` name the guarded
/// thing and the locked file in the error.
pub fn lock_file(file: &File, what: &'static str, path: &Path, lock: &Path) -> Result<()> {
    match flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(Error::Locked {
            what,
            path: path.to_owned(),
            lock: lock.to_owned(),
        }),
        Err(e) => Err(Error::io("cannot lock", lock, e.into())),
    }
}

/// Make every file and folder this process creates owner-only (umask 077): the store, model
/// files, audit logs, node state and results hold an office's decisions and pooled outputs,
/// and keys must never be readable by others. Called first thing in every binary's `main`.
pub fn owner_only_umask() {
    rustix::process::umask(Mode::from_raw_mode(0o077));
}

/// Refuse a private key that anyone but its owner can read or write: a key readable by a
/// shared service account is a key that may already have leaked.
pub fn check_private_key(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io("cannot read", path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::KeyPermissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_a_folder_is_refused_and_writes_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let first = lock_dir(tmp.path(), "data folder").expect("first lock");
        let before = std::fs::read(first.path()).expect("read lock file");
        let err = lock_dir(tmp.path(), "data folder").expect_err("second lock");
        assert!(matches!(err, Error::Locked { .. }), "{err}");
        assert!(err.to_string().contains("in use by another process"), "{err}");
        assert_eq!(std::fs::read(first.path()).expect("read lock file"), before);
        drop(first);
        lock_dir(tmp.path(), "data folder").expect("lock after release");
    }

    #[test]
    fn keys_readable_by_others_are_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let key = tmp.path().join("k.key");
        std::fs::write(&key, b"key").expect("write");
        for (mode, ok) in [
            (0o600, true),
            (0o400, true),
            (0o640, false),
            (0o604, false),
            (0o620, false),
        ] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let result = check_private_key(&key);
            assert_eq!(result.is_ok(), ok, "mode {mode:o}");
            if let Err(e) = result {
                assert!(
                    e.to_string().contains(&format!("chmod 600 {}", key.display())),
                    "{e}"
                );
            }
        }
    }
}
