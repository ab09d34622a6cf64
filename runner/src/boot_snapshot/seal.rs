//! The cheap check that a boot snapshot's memory file is still the one that was hashed.
//!
//! The memory file is hashed once, as it is written; it is then made read-only (0400, in a
//! 0700 directory of the home) and its inode's identity and times are signed into the
//! manifest. Before a restore the file is `fstat`ed: while device, inode, size, mode, mtime
//! and ctime all match, it has not been written, renamed over or re-permissioned since —
//! any write changes mtime and ctime, and ctime cannot be set back without the privilege to
//! change the host's clock. On any mismatch the whole file is hashed again before use.
//!
//! Not fs-verity: it needs a filesystem built with it (ext4's `verity` feature, not the
//! default on Debian 12) and would tie the store to one. The QEMU backend hashes the state
//! again anyway as it streams it in, and lets the guest run only if it matches.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;

use serde::{Deserialize, Serialize};

/// A memory file's identity and times, as it was left: device, inode, size, mode, mtime and
/// ctime (seconds and nanoseconds) in one string — the manifest's canonical JSON holds only
/// numbers a double represents exactly, which inode numbers and nanosecond times are not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Seal(String);

impl Seal {
    /// The seal of `file` as it is now.
    pub fn of(file: &File) -> io::Result<Self> {
        let m = file.metadata()?;
        Ok(Self(format!(
            "{}:{}:{}:{:o}:{}.{:09}:{}.{:09}",
            m.dev(),
            m.ino(),
            m.size(),
            m.mode(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec()
        )))
    }
}

/// Whether `file` still carries `seal`.
pub fn holds(seal: &Seal, file: &File) -> io::Result<bool> {
    Ok(Seal::of(file)? == *seal)
}
