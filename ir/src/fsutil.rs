//! The one atomic-write helper and the one capped-read helper of mvm.
//!
//! Stored state is never rewritten in place: a new version is written to a temporary file in
//! the same directory, synced, and renamed over the old one, so a crash leaves either the old or
//! the new file whole. Untrusted inputs are read through [`read_capped`] so a huge file is refused
//! before it is held in memory.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::Error;

/// Writes `bytes` to `path` atomically (temp file + fsync + rename + directory fsync), with
/// permission bits `mode`.
pub fn atomic_write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    write_via_temp(path, bytes, mode, |tmp, path| fs::rename(tmp, path))
}

/// Like [`atomic_write`], but never replaces anything: the whole file appears at `path`, or
/// nothing does and the error is [`std::io::ErrorKind::AlreadyExists`] when something (a file,
/// a directory, a symlink even dangling) is already there, also when it appeared meanwhile.
pub fn atomic_create(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    // link(2) refuses an existing target, atomically, where rename(2) would replace it.
    write_via_temp(path, bytes, mode, |tmp, path| {
        fs::hard_link(tmp, path)?;
        fs::remove_file(tmp)
    })
}

fn write_via_temp(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    put_in_place: impl FnOnce(&Path, &Path) -> std::io::Result<()>,
) -> Result<(), Error> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::io(path, std::io::Error::other("path has no file name")))?;
    let nonce: [u8; 6] = crate::random_bytes()?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        hex::encode(nonce)
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed `mode`; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        put_in_place(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| Error::io(path, e))
}

/// Reads at most `limit` bytes of `path`; a larger file is refused with [`Error::TooLarge`].
/// `-` reads standard input.
pub fn read_capped(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>, Error> {
    let mut bytes = Vec::new();
    let read = if path == Path::new("-") {
        std::io::stdin()
            .lock()
            .take(limit + 1)
            .read_to_end(&mut bytes)
    } else {
        File::open(path).and_then(|f| f.take(limit + 1).read_to_end(&mut bytes))
    };
    read.map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(Error::TooLarge {
            what: what.to_string(),
            size: bytes.len() as u64,
            limit,
        });
    }
    Ok(bytes)
}

/// An exclusive advisory lock on a lock file, held until dropped. Serializes writers of one
/// piece of state across threads and processes.
#[derive(Debug)]
pub struct ExclusiveLock {
    file: File,
}

impl ExclusiveLock {
    /// Blocks until the lock on `path` (created with mode 0600 if absent) is held.
    pub fn acquire(path: &Path) -> Result<Self, Error> {
        let file = open_lock_file(path)?;
        file.lock().map_err(|e| Error::io(path, e))?;
        Ok(Self { file })
    }
}

impl ExclusiveLock {
    /// The lock on `path` if nobody holds it now, without waiting; `None` while it is held.
    pub fn try_acquire(path: &Path) -> Result<Option<Self>, Error> {
        let file = open_lock_file(path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Self { file })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(Error::io(path, e)),
        }
    }
}

/// The lock file at `path`, created with mode 0600 if absent.
fn open_lock_file(path: &Path) -> Result<File, Error> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

impl Drop for ExclusiveLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_not_taken_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let held = ExclusiveLock::try_acquire(&path).unwrap().expect("free");
        assert!(ExclusiveLock::try_acquire(&path).unwrap().is_none());
        drop(held);
        assert!(ExclusiveLock::try_acquire(&path).unwrap().is_some());
    }

    #[test]
    fn atomic_write_replaces_whole_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        atomic_write(&path, b"one", 0o600).unwrap();
        atomic_write(&path, b"two", 0o640).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn atomic_create_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mvm.toml");
        atomic_create(&path, b"one", 0o644).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"one");
        let refused = |path: &Path| match atomic_create(path, b"two", 0o644).unwrap_err() {
            Error::Io { source, .. } => source.kind() == std::io::ErrorKind::AlreadyExists,
            other => panic!("{other}"),
        };
        assert!(refused(&path));
        assert_eq!(fs::read(&path).unwrap(), b"one");
        // A dangling symlink is something there too: nothing is written through it.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("absent"), &link).unwrap();
        assert!(refused(&link));
        assert!(!dir.path().join("absent").exists());
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn read_capped_refuses_oversize() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        fs::write(&path, vec![b'x'; 11]).unwrap();
        assert_eq!(read_capped(&path, 11, "f").unwrap().len(), 11);
        let err = read_capped(&path, 10, "f").unwrap_err();
        assert_eq!(err.code(), "INPUT001");
    }
}
