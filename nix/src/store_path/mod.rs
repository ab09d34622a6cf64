//! Store paths: `/nix/store/<hash part>-<name>`.
//!
//! The hash part is 32 nixbase32 characters, the 160-bit fold of a sha256 over a fingerprint
//! of what the path holds ([`compute`]). The name follows Nix's rules: 1 to 211 characters of
//! `A-Z a-z 0-9 + - . _ ? =` (Nix 2.8 accepts a leading `.`; so does mvm). Only the store
//! directory `/nix/store` is supported: it is part of every fingerprint, so paths of another
//! store directory would be other paths.

pub mod compute;

use std::fmt;

use crate::error::NixError;
use crate::nixbase32;

/// The store directory every path and fingerprint uses.
pub const STORE_DIR: &str = "/nix/store";

/// Characters in a hash part.
pub const HASH_PART_LEN: usize = nixbase32::encoded_len(DIGEST_LEN);

/// Bytes in a store path's digest.
pub const DIGEST_LEN: usize = 20;

/// The longest name Nix accepts.
pub const MAX_NAME_LEN: usize = 211;

/// A valid store path. Ordered as its text is, the order Nix writes sets of paths in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StorePath {
    /// Checked nixbase32 of a [`DIGEST_LEN`]-byte digest.
    hash_part: String,
    /// Checked against [`check_name`].
    name: String,
}

impl StorePath {
    /// The path with this digest and name.
    pub fn new(digest: &[u8; DIGEST_LEN], name: &str) -> Result<Self, NixError> {
        check_name(name)?;
        Ok(Self {
            hash_part: nixbase32::encode(digest),
            name: name.to_string(),
        })
    }

    /// Parses an absolute path, `/nix/store/<hash part>-<name>`.
    pub fn parse(path: &str) -> Result<Self, NixError> {
        let base = path
            .strip_prefix(STORE_DIR)
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| NixError::store_path(path, format!("not in {STORE_DIR}")))?;
        Self::from_base_name(base)
    }

    /// Parses a base name, `<hash part>-<name>`.
    pub fn from_base_name(base: &str) -> Result<Self, NixError> {
        let (hash_part, name) = base
            .split_at_checked(HASH_PART_LEN)
            .and_then(|(hash, rest)| Some((hash, rest.strip_prefix('-')?)))
            .ok_or_else(|| {
                NixError::store_path(
                    base,
                    format!("not a {HASH_PART_LEN}-character hash part, '-' and a name"),
                )
            })?;
        let digest = nixbase32::decode_array::<DIGEST_LEN>(hash_part)
            .map_err(|e| NixError::store_path(base, format!("hash part: {e}")))?;
        Self::new(&digest, name)
    }

    /// The 32-character hash part.
    pub fn hash_part(&self) -> &str {
        &self.hash_part
    }

    /// The name after the hash part.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `<hash part>-<name>`, the file name in the store directory.
    pub fn base_name(&self) -> String {
        format!("{}-{}", self.hash_part, self.name)
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_DIR}/{}-{}", self.hash_part, self.name)
    }
}

/// Checks `name` against Nix's rules for the part of a store path after the hash.
pub fn check_name(name: &str) -> Result<(), NixError> {
    if name.is_empty() {
        return Err(NixError::store_path(name, "the name is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NixError::store_path(
            name,
            format!("the name is longer than {MAX_NAME_LEN} characters"),
        ));
    }
    if let Some(bad) = name.chars().find(|&c| !is_name_char(c)) {
        return Err(NixError::store_path(
            name,
            format!("{bad:?} is not allowed in a name (only A-Z a-z 0-9 + - . _ ? =)"),
        ));
    }
    Ok(())
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.' | '_' | '?' | '=')
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = "/nix/store/76w21n1f03fs5kw8fnffphx7qrqffw6r-hello.drv";

    #[test]
    fn parses_and_prints_back() {
        let path = StorePath::parse(HELLO).unwrap();
        assert_eq!(path.hash_part(), "76w21n1f03fs5kw8fnffphx7qrqffw6r");
        assert_eq!(path.name(), "hello.drv");
        assert_eq!(path.to_string(), HELLO);
        let digest = nixbase32::decode_array(path.hash_part()).unwrap();
        assert_eq!(StorePath::new(&digest, path.name()).unwrap(), path);
        assert_eq!(StorePath::from_base_name(&path.base_name()).unwrap(), path);
    }

    #[test]
    fn names_follow_nix() {
        for good in [".foo", "-foo", "..", "a?b=c+d_e.f", &"a".repeat(211)] {
            check_name(good).unwrap();
        }
        for bad in ["", "a b", "a/b", "é", &"a".repeat(212)] {
            assert_eq!(check_name(bad).unwrap_err().code(), "NIX002", "{bad:?}");
        }
    }

    #[test]
    fn refuses_malformed_paths() {
        for bad in [
            "",
            "/nix/store",
            "/nix/store/",
            "/gnu/store/76w21n1f03fs5kw8fnffphx7qrqffw6r-hello",
            "/nix/store/76w21n1f03fs5kw8fnffphx7qrqffw6r",
            "/nix/store/76w21n1f03fs5kw8fnffphx7qrqffw6r-",
            "/nix/store/76w21n1f03fs5kw8fnffphx7qrqffw6r_hello",
            "/nix/store/76w21n1f03fs5kw8fnffphx7qrqffw6e-hello",
            "/nix/store/76w21n1f03fs5kw8fnffphx7qrqffw6-hello",
            "/nix/store/76w21n1f03fs5kw8fnffphx7qrqffw6r-hello/bin",
            "/nix/store/éééééééééééééééé-hello",
        ] {
            assert_eq!(
                StorePath::parse(bad).unwrap_err().code(),
                "NIX002",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn orders_as_text() {
        let a = StorePath::parse("/nix/store/00000000000000000000000000000000-b").unwrap();
        let b = StorePath::parse("/nix/store/00000000000000000000000000000001-a").unwrap();
        let c = StorePath::parse("/nix/store/00000000000000000000000000000001-a-b").unwrap();
        assert!(a < b && b < c);
        assert!(a.to_string() < b.to_string() && b.to_string() < c.to_string());
    }
}
