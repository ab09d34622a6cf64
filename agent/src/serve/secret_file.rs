//! A launch's secret given as a file ([`mvm_protocol::Request::SecretFile`]): for tools that
//! read a credential from a file rather than a variable.
//!
//! The file is `DIR/NAME` (`/run/secrets/NAME` in the guest), mode 0400, owned by the workload
//! user, in a directory only root may write (0755): the workload reads it and can neither
//! change it nor put another in its place. The root's writable layer is a tmpfs, so the bytes
//! live in guest memory and vanish with the VM. It is written through a temporary file
//! renamed into place: a command reading it sees the old bytes or the new, never half.

use std::fs::{self, DirBuilder};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use mvm_protocol::{codes, ErrorReply, SecretHex};

use super::exec::Credentials;

/// The largest secret the host's store holds (64 KiB).
const MAX_BYTES: usize = 64 * 1024;

/// Writes the secret `name` holding `value` into `dir`, owned by `owner` (the agent's own
/// user when `None`, on a host).
pub fn put(
    name: &str,
    value: &SecretHex,
    dir: &Path,
    owner: Option<Credentials>,
) -> Result<(), ErrorReply> {
    let refused = |message: String| ErrorReply {
        code: codes::BAD_REQUEST.into(),
        message,
    };
    if !is_secret_name(name) {
        return Err(refused(format!("{name:?} is not a secret's name")));
    }
    let bytes = hex::decode(&value.0)
        .ok()
        .filter(|bytes| !bytes.is_empty() && bytes.len() <= MAX_BYTES)
        .ok_or_else(|| {
            refused(format!(
                "the secret {name}'s value is not 1 to {MAX_BYTES} hex-encoded bytes"
            ))
        })?;
    let failed = |what: &Path, e: std::io::Error| ErrorReply {
        code: codes::FILE_IO.into(),
        message: format!("{}: {e}", what.display()),
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| failed(dir, e))?;
    let path = dir.join(name);
    let temporary = dir.join(format!(".{name}.mvm-tmp"));
    let _ = fs::remove_file(&temporary);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(&temporary)
        .map_err(|e| failed(&temporary, e))?;
    if let Some(owner) = owner {
        std::os::unix::fs::fchown(&file, Some(owner.uid), Some(owner.gid))
            .map_err(|e| failed(&temporary, e))?;
    }
    file.write_all(&bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| failed(&temporary, e))?;
    fs::rename(&temporary, &path).map_err(|e| failed(&path, e))
}

/// A name of the host's store: `[a-z0-9][a-z0-9._-]*`, at most 63 bytes (never `.`, `..` or a
/// path).
fn is_secret_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=63).contains(&bytes.len())
        && matches!(bytes[0], b'a'..=b'z' | b'0'..=b'9')
        && bytes
            .iter()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn hex_of(bytes: &[u8]) -> SecretHex {
        SecretHex(hex::encode(bytes))
    }

    #[test]
    fn a_secret_file_is_read_only_and_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = dir.path().join("secrets");
        put("db-password", &hex_of(b"first\x00bytes"), &secrets, None).unwrap();
        let path = secrets.join("db-password");
        assert_eq!(fs::read(&path).unwrap(), b"first\x00bytes");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o400
        );
        assert_eq!(
            fs::metadata(&secrets).unwrap().permissions().mode() & 0o777,
            0o755
        );
        put("db-password", &hex_of(b"second"), &secrets, None).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(
            fs::read_dir(&secrets).unwrap().count(),
            1,
            "no temporary file is left"
        );
    }

    #[test]
    fn names_that_are_paths_and_values_that_are_not_hex_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "",
            ".",
            "..",
            "../passwd",
            "a/b",
            "Upper",
            ".hidden",
            &"a".repeat(64),
        ] {
            let refused = put(name, &hex_of(b"x"), dir.path(), None).unwrap_err();
            assert_eq!(refused.code, codes::BAD_REQUEST, "{name:?}");
        }
        for value in ["zz", "", "abc"] {
            let refused = put("ok", &SecretHex(value.into()), dir.path(), None).unwrap_err();
            assert_eq!(refused.code, codes::BAD_REQUEST, "{value:?}");
        }
        let too_big = hex_of(&vec![1u8; MAX_BYTES + 1]);
        assert_eq!(
            put("ok", &too_big, dir.path(), None).unwrap_err().code,
            codes::BAD_REQUEST
        );
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
