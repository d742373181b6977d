//! File-system guards every binary relies on: exclusive locks held for a process's lifetime,
//! the owner-only umask, the permission check on private keys, and the one atomic write.
//!
//! Locks are `flock(2)` locks: the kernel drops them when the process dies, however it dies,
//! so a crash never leaves a stale lock behind (unlike a PID file).

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
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

/// Who may read a file [`atomic_write`] creates (the process umask applies on top).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// 0600: keys, store files, node state, results.
    OwnerOnly,
    /// 0644: certificates and revocation lists, which peers are meant to read.
    Public,
}

/// Replace `path` with `bytes` so that readers, and the disk after a crash, see the old file
/// or the new one, never a part: a temporary file in the same folder (created if missing),
/// written and fsynced, renamed over `path`, then the folder fsynced so the rename lasts.
///
/// The temporary name is unpredictable and opened with `O_CREAT | O_EXCL`: concurrent writers
/// never share one, and in a shared folder another user cannot plant a symlink there and have
/// its target overwritten (the rename replaces a symlink at `path` itself, not its target).
/// Errors name the file that failed.
pub fn atomic_write(path: &Path, bytes: &[u8], access: Access) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, e))?;
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy());
    let mode = match access {
        Access::OwnerOnly => 0o600,
        Access::Public => 0o644,
    };
    let (tmp, mut file) = {
        let mut attempt = 0;
        loop {
            let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)
            {
                Ok(f) => break (tmp, f),
                // 64 random bits: a clash is someone's planted file, so try a fresh name.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 8 => attempt += 1,
                Err(e) => return Err(Error::io("cannot create a temporary file in", dir, e)),
            }
        }
    };
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    drop(file);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io("cannot write", &tmp, e));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io("cannot replace", path, e));
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("cannot sync the folder of", path, e))
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
    fn atomic_writes_replace_whole_files_owner_only_and_leave_no_temporaries() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("sub").join("state.json");
        atomic_write(&path, b"first version", Access::OwnerOnly).expect("write");
        atomic_write(&path, b"second", Access::OwnerOnly).expect("replace");
        assert_eq!(std::fs::read(&path).expect("read"), b"second");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{mode:o}");
        let cert = tmp.path().join("c.pem");
        atomic_write(&cert, b"cert", Access::Public).expect("write");
        let mode = std::fs::metadata(&cert).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode & 0o700, 0o600, "{mode:o}");

        // Writers in parallel: every result is one whole version, and no temporary is left.
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..20 {
                        atomic_write(path, &[t; 4096], Access::OwnerOnly).expect("concurrent write");
                    }
                });
            }
        });
        let last = std::fs::read(&path).expect("read");
        assert!(last.len() == 4096 && last.iter().all(|b| *b == last[0]));
        let names: Vec<_> = std::fs::read_dir(path.parent().expect("dir"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["state.json"], "temporaries left behind");

        // A symlink planted at the final name is replaced, its target left alone.
        let target = tmp.path().join("victim");
        std::fs::write(&target, b"keep").expect("write");
        let link = tmp.path().join("out.json");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        atomic_write(&link, b"new", Access::OwnerOnly).expect("write");
        assert_eq!(std::fs::read(&target).expect("read"), b"keep");
        assert_eq!(std::fs::read(&link).expect("read"), b"new");

        // Failures name the file.
        let err = atomic_write(&tmp.path().join("victim").join("x"), b"", Access::OwnerOnly)
            .expect_err("not a dir");
        assert!(err.to_string().contains("victim"), "{err}");
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
