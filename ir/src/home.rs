//! The host's mvm state directory (`$MVM_HOME`, default `~/.mvm`) and its layout.
//!
//! ```text
//! $MVM_HOME/            0700
//!   keys/NAME.key       0600  PKCS#8 PEM ed25519 private key
//!   keys/NAME.pub             SubjectPublicKeyInfo PEM
//!   trust/KEYID.pem           public keys whose signatures this host accepts
//!   ledger/nonces.json  0600  admitted single-use plan nonces (pruned after valid_until)
//!   audit/audit.jsonl   0600  the signed, hash-chained audit log
//! ```
//! The directory is refused if another user owns it or it is writable by group or others:
//! whoever can write there can plant a trusted key.

use std::fs::{self, DirBuilder};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::Error;

/// The mvm state directory of this host.
#[derive(Debug, Clone)]
pub struct MvmHome {
    root: PathBuf,
}

impl MvmHome {
    /// `$MVM_HOME`, else `$HOME/.mvm`. Nothing is created until [`MvmHome::ensure`].
    pub fn from_env() -> Result<Self, Error> {
        if let Some(dir) = std::env::var_os("MVM_HOME").filter(|v| !v.is_empty()) {
            return Ok(Self::at(dir));
        }
        let home = std::env::var_os("HOME")
            .filter(|v| !v.is_empty())
            .ok_or_else(|| Error::UnsafeHome {
                path: PathBuf::from("~/.mvm"),
                reason: "neither MVM_HOME nor HOME is set".into(),
            })?;
        Ok(Self::at(Path::new(&home).join(".mvm")))
    }

    /// A state directory at `root`.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the directory and `sub` (mode 0700) if absent, checks they are safe, and returns
    /// the path of `sub`.
    pub fn ensure(&self, sub: &str) -> Result<PathBuf, Error> {
        let dir = self.root.join(sub);
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| Error::io(&dir, e))?;
        check_private_dir(&self.root)?;
        check_private_dir(&dir)?;
        Ok(dir)
    }

    /// The private key store.
    pub fn keys_dir(&self) -> Result<PathBuf, Error> {
        self.ensure("keys")
    }

    /// The trusted public keys.
    pub fn trust_dir(&self) -> Result<PathBuf, Error> {
        self.ensure("trust")
    }

    /// The single-use nonce ledger directory.
    pub fn ledger_dir(&self) -> Result<PathBuf, Error> {
        self.ensure("ledger")
    }

    /// The audit log directory.
    pub fn audit_dir(&self) -> Result<PathBuf, Error> {
        self.ensure("audit")
    }

    /// The operator's `config.toml` (each of its sections belongs to one part of mvm), as
    /// text: `None` when there is none. Capped at 1 MiB.
    pub fn config_text(&self) -> Result<Option<String>, Error> {
        let path = self.root.join(CONFIG_FILE);
        match crate::fsutil::read_capped(&path, MAX_CONFIG_BYTES, CONFIG_FILE) {
            Ok(bytes) => String::from_utf8(bytes)
                .map(Some)
                .map_err(|_| Error::NotUtf8 {
                    what: CONFIG_FILE.into(),
                }),
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }
}

/// The operator's settings file in the state directory.
pub const CONFIG_FILE: &str = "config.toml";
/// The largest `config.toml` read.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Refuses a directory owned by another user or writable by group or others.
fn check_private_dir(dir: &Path) -> Result<(), Error> {
    let meta = fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    // `/proc/self` is owned by this process's effective uid: no unsafe `geteuid` call needed.
    let me = fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(meta.uid());
    if meta.uid() != me {
        return Err(Error::UnsafeHome {
            path: dir.to_path_buf(),
            reason: format!("owned by uid {}, not by this user ({me})", meta.uid()),
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(Error::UnsafeHome {
            path: dir.to_path_buf(),
            reason: format!("mode {mode:04o} lets others write here (chmod 700)"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_private_dirs_and_refuses_writable_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let home = MvmHome::at(tmp.path().join("h"));
        let keys = home.keys_dir().unwrap();
        assert_eq!(
            fs::metadata(&keys).unwrap().permissions().mode() & 0o777,
            0o700
        );
        fs::set_permissions(&keys, fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(home.keys_dir().unwrap_err().code(), "HOME001");
    }
}
