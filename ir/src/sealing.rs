//! Small values sealed at rest under a host key: AES-256-GCM, a fresh 96-bit nonce each time,
//! and associated data that names what the value is (so a ciphertext moved to another name
//! does not open). The key is a 32-byte file with the signing keys (`$MVM_HOME/keys`), 0600,
//! apart from what it seals: a copy of the sealed files alone holds nothing readable. The
//! secret store and the volumes' keys use it.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::fsutil::read_capped;

/// Why a key could not be had or a value not opened.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The key or a sealed value cannot be trusted: open to others, the wrong size, altered,
    /// or sealed under another key or name.
    #[error("{0}")]
    Untrusted(String),
    /// A file could not be read or written.
    #[error(transparent)]
    Io(#[from] crate::Error),
}

/// A value sealed with AES-256-GCM, base64 on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sealed {
    /// The 12-byte nonce.
    pub nonce: String,
    /// The ciphertext and its tag.
    pub ciphertext: String,
}

/// The 32-byte key in `path`, made (0600, never over one another process made first) when
/// `create` and there is none; `what` names it in errors.
pub fn host_key(path: &Path, create: bool, what: &str) -> Result<Zeroizing<Vec<u8>>, SealError> {
    if create && !path.exists() {
        let key = Zeroizing::new(crate::random_bytes::<32>()?.to_vec());
        // create_new: two first uses at once must not each write a key of their own.
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(mut file) => {
                file.write_all(&key)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| crate::Error::io(path, e))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(crate::Error::io(path, e).into()),
        }
    }
    check_private(path)?;
    let key = Zeroizing::new(read_capped(path, 64, what)?);
    if key.len() != 32 {
        return Err(SealError::Untrusted(format!(
            "{} is not a 32-byte key",
            path.display()
        )));
    }
    Ok(key)
}

/// Refuses a file that others may read or write.
pub fn check_private(path: &Path) -> Result<(), SealError> {
    let meta = fs::metadata(path).map_err(|e| crate::Error::io(path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SealError::Untrusted(format!(
            "{} has mode {mode:04o}: it must not be open to group or others (chmod 600)",
            path.display()
        )));
    }
    Ok(())
}

/// Seals `value` under `key` with `aad` as its associated data.
pub fn seal(key: &[u8], aad: &str, value: &[u8]) -> Result<Sealed, SealError> {
    let nonce = crate::random_bytes::<12>()?;
    let cipher = Aes256Gcm::new_from_slice(key).map_err(|e| SealError::Untrusted(e.to_string()))?;
    let ciphertext = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: value,
                aad: aad.as_bytes(),
            },
        )
        .map_err(|_| SealError::Untrusted("sealing failed".into()))?;
    Ok(Sealed {
        nonce: STANDARD.encode(nonce),
        ciphertext: STANDARD.encode(ciphertext),
    })
}

/// Opens what [`seal`] sealed under `key` with the same `aad`; `None` when it does not open
/// (altered, another key, another name).
pub fn open(key: &[u8], aad: &str, sealed: &Sealed) -> Option<Zeroizing<Vec<u8>>> {
    let nonce = STANDARD.decode(&sealed.nonce).ok()?;
    let ciphertext = STANDARD.decode(&sealed.ciphertext).ok()?;
    if nonce.len() != 12 {
        return None;
    }
    let cipher = Aes256Gcm::new_from_slice(key).ok()?;
    cipher
        .decrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &ciphertext,
                aad: aad.as_bytes(),
            },
        )
        .ok()
        .map(Zeroizing::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_only_with_its_key_and_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        assert!(host_key(&path, false, "test key").is_err());
        let key = host_key(&path, true, "test key").unwrap();
        assert_eq!(*host_key(&path, true, "test key").unwrap(), *key);
        let sealed = seal(&key, "v1:a", b"value").unwrap();
        assert_eq!(open(&key, "v1:a", &sealed).unwrap().as_slice(), b"value");
        assert!(open(&key, "v1:b", &sealed).is_none());
        assert!(open(&[7; 32], "v1:a", &sealed).is_none());
        let mut altered = sealed.clone();
        altered.ciphertext.replace_range(0..1, "A");
        assert!(altered == sealed || open(&key, "v1:a", &altered).is_none());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            host_key(&path, false, "test key"),
            Err(SealError::Untrusted(_))
        ));
    }
}
