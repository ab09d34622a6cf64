//! The host's ed25519 keys and the set of public keys it trusts.
//!
//! A key's id is the hex sha256 of its raw 32-byte public key. Private keys are PKCS#8 PEM files
//! of mode 0600 (`openssl pkey` reads them) and are never printed; public keys are exported as
//! SubjectPublicKeyInfo PEM, so openssl, cosign or securesystemslib can verify mvm's envelopes.
//! A key generated on this host is trusted by it; other keys are trusted explicitly.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, KeypairBytes,
};
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::Serialize;

use crate::digest::sha256_hex;
use crate::fsutil::{atomic_write, read_capped};
use crate::home::MvmHome;
use crate::Error;

/// The key used when none is named.
pub const DEFAULT_KEY: &str = "default";

/// Key files are tiny; anything larger is not a key.
const MAX_KEY_FILE_BYTES: u64 = 16 * 1024;

/// The id of a public key: hex sha256 of its 32 raw bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    sha256_hex(key.as_bytes())
}

/// A private key ready to sign, with its id.
pub struct Signer {
    key: SigningKey,
    keyid: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Signer")
            .field("keyid", &self.keyid)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Wraps a signing key.
    pub fn new(key: SigningKey) -> Self {
        let keyid = key_id(&key.verifying_key());
        Self { key, keyid }
    }

    /// A fresh random key.
    pub fn generate() -> Result<Self, Error> {
        Ok(Self::new(SigningKey::from_bytes(&crate::random_bytes()?)))
    }

    /// The key id.
    pub fn keyid(&self) -> &str {
        &self.keyid
    }

    /// The public half.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// An ed25519 signature over `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }
}

/// Public keys whose signatures are accepted, by key id.
#[derive(Debug, Clone, Default)]
pub struct TrustStore {
    keys: BTreeMap<String, VerifyingKey>,
}

impl TrustStore {
    /// Adds a key.
    pub fn insert(&mut self, key: VerifyingKey) {
        self.keys.insert(key_id(&key), key);
    }

    /// Whether `keyid` is trusted.
    pub fn contains(&self, keyid: &str) -> bool {
        self.keys.contains_key(keyid)
    }

    /// Verifies an ed25519 `signature` over `message` by the trusted key `keyid`. `None` if the
    /// key is not trusted.
    pub fn verify(&self, keyid: &str, message: &[u8], signature: &[u8; 64]) -> Option<bool> {
        let key = self.keys.get(keyid)?;
        Some(
            key.verify(message, &Signature::from_bytes(signature))
                .is_ok(),
        )
    }
}

/// A key as `keys list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    /// The key's name (own keys) or `None` (trusted public keys only).
    pub name: Option<String>,
    /// The key id.
    pub keyid: String,
    /// Whether this host holds the private key.
    pub private: bool,
    /// Whether signatures by this key are accepted here.
    pub trusted: bool,
}

/// The key store and trust store under `$MVM_HOME`.
#[derive(Debug, Clone)]
pub struct KeyStore {
    home: MvmHome,
}

impl KeyStore {
    /// The stores of `home`.
    pub fn new(home: MvmHome) -> Self {
        Self { home }
    }

    /// Generates key `name`, stores it (private 0600, public 0644) and trusts it.
    pub fn generate(&self, name: &str) -> Result<KeyInfo, Error> {
        check_key_name(name)?;
        let dir = self.home.keys_dir()?;
        let private_path = dir.join(format!("{name}.key"));
        if private_path.exists() {
            return Err(Error::KeyExists(name.into()));
        }
        let signer = Signer::generate()?;
        // PKCS#8 v1 (no embedded public key): the form openssl 3.0 and most tools read.
        let pem = KeypairBytes {
            secret_key: signer.key.to_bytes(),
            public_key: None,
        }
        .to_pkcs8_pem(Default::default())
        .map_err(|e| bad_key(&private_path, e))?;
        let public_pem = public_pem(&signer.verifying_key(), &dir.join(format!("{name}.pub")))?;
        atomic_write(
            &dir.join(format!("{name}.pub")),
            public_pem.as_bytes(),
            0o644,
        )?;
        atomic_write(&private_path, pem.as_bytes(), 0o600)?;
        self.trust_key(&signer.verifying_key())?;
        Ok(KeyInfo {
            name: Some(name.into()),
            keyid: signer.keyid,
            private: true,
            trusted: true,
        })
    }

    /// Loads private key `name`, refusing a file that others can read or that is not an
    /// ed25519 PKCS#8 key.
    pub fn signer(&self, name: &str) -> Result<Signer, Error> {
        check_key_name(name)?;
        let path = self.home.keys_dir()?.join(format!("{name}.key"));
        let meta = match fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::KeyNotFound(name.into()))
            }
            Err(e) => return Err(Error::io(&path, e)),
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(Error::KeyPermissions { path, mode });
        }
        let bytes = read_capped(&path, MAX_KEY_FILE_BYTES, "private key")?;
        let text = std::str::from_utf8(&bytes).map_err(|_| bad_key(&path, "not a PEM file"))?;
        let key = SigningKey::from_pkcs8_pem(text).map_err(|e| {
            bad_key(
                &path,
                format!("not an ed25519 PKCS#8 private key of 32 bytes ({e})"),
            )
        })?;
        Ok(Signer::new(key))
    }

    /// The host's own signing key ([`DEFAULT_KEY`]), generated on first use.
    pub fn host_signer(&self) -> Result<Signer, Error> {
        match self.signer(DEFAULT_KEY) {
            Err(Error::KeyNotFound(_)) => {
                self.generate(DEFAULT_KEY)?;
                self.signer(DEFAULT_KEY)
            }
            other => other,
        }
    }

    /// The public key `name` as SubjectPublicKeyInfo PEM.
    pub fn export(&self, name: &str) -> Result<String, Error> {
        let signer = self.signer(name)?;
        public_pem(&signer.verifying_key(), Path::new(name))
    }

    /// Trusts the SubjectPublicKeyInfo PEM public key in `pem`.
    pub fn trust_pem(&self, pem: &[u8], origin: &Path) -> Result<KeyInfo, Error> {
        let text = std::str::from_utf8(pem).map_err(|_| bad_key(origin, "not a PEM file"))?;
        let key = VerifyingKey::from_public_key_pem(text).map_err(|e| {
            bad_key(
                origin,
                format!("not an ed25519 SubjectPublicKeyInfo public key ({e})"),
            )
        })?;
        self.trust_key(&key)?;
        Ok(KeyInfo {
            name: None,
            keyid: key_id(&key),
            private: false,
            trusted: true,
        })
    }

    /// Stops trusting `keyid`. The private key, if this host has it, is kept.
    pub fn untrust(&self, keyid: &str) -> Result<(), Error> {
        if !crate::digest::is_sha256_hex(keyid) {
            return Err(Error::UnknownKeyId(keyid.into()));
        }
        let path = self.home.trust_dir()?.join(format!("{keyid}.pem"));
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(Error::UnknownKeyId(keyid.into()))
            }
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// Every trusted public key.
    pub fn trust_store(&self) -> Result<TrustStore, Error> {
        let mut store = TrustStore::default();
        for (path, keyid) in self.trusted_files()? {
            let bytes = read_capped(&path, MAX_KEY_FILE_BYTES, "trusted key")?;
            let text = std::str::from_utf8(&bytes).map_err(|_| bad_key(&path, "not a PEM file"))?;
            let key = VerifyingKey::from_public_key_pem(text)
                .map_err(|e| bad_key(&path, format!("not an ed25519 public key ({e})")))?;
            if key_id(&key) != keyid {
                return Err(bad_key(&path, "file name does not match the key's id"));
            }
            store.insert(key);
        }
        Ok(store)
    }

    /// Own keys and trusted keys, own keys first, each by name then id.
    pub fn list(&self) -> Result<Vec<KeyInfo>, Error> {
        let trust = self.trust_store()?;
        let mut infos = Vec::new();
        let dir = self.home.keys_dir()?;
        let mut names: Vec<String> = read_dir_names(&dir)?
            .into_iter()
            .filter_map(|n| n.strip_suffix(".key").map(str::to_string))
            .collect();
        names.sort();
        for name in names {
            let signer = self.signer(&name)?;
            infos.push(KeyInfo {
                trusted: trust.contains(&signer.keyid),
                name: Some(name),
                keyid: signer.keyid,
                private: true,
            });
        }
        for (_, keyid) in self.trusted_files()? {
            if !infos.iter().any(|i| i.keyid == keyid) {
                infos.push(KeyInfo {
                    name: None,
                    keyid,
                    private: false,
                    trusted: true,
                });
            }
        }
        Ok(infos)
    }

    fn trust_key(&self, key: &VerifyingKey) -> Result<(), Error> {
        let path = self.home.trust_dir()?.join(format!("{}.pem", key_id(key)));
        atomic_write(&path, public_pem(key, &path)?.as_bytes(), 0o644)
    }

    fn trusted_files(&self) -> Result<Vec<(PathBuf, String)>, Error> {
        let dir = self.home.trust_dir()?;
        let mut files: Vec<(PathBuf, String)> = read_dir_names(&dir)?
            .into_iter()
            .filter_map(|n| {
                let keyid = n.strip_suffix(".pem")?;
                crate::digest::is_sha256_hex(keyid).then(|| (dir.join(&n), keyid.to_string()))
            })
            .collect();
        files.sort();
        Ok(files)
    }
}

fn read_dir_names(dir: &Path) -> Result<Vec<String>, Error> {
    let entries = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if let Some(name) = entry.file_name().to_str() {
            if !name.starts_with('.') {
                names.push(name.to_string());
            }
        }
    }
    Ok(names)
}

fn public_pem(key: &VerifyingKey, path: &Path) -> Result<String, Error> {
    key.to_public_key_pem(Default::default())
        .map_err(|e| bad_key(path, e))
}

fn bad_key(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::BadKeyFile {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn check_key_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidKeyName(name.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, KeyStore) {
        let tmp = tempfile::tempdir().unwrap();
        let store = KeyStore::new(MvmHome::at(tmp.path().join("home")));
        (tmp, store)
    }

    #[test]
    fn generate_trust_export_untrust() {
        let (_tmp, store) = store();
        let info = store.generate("ci").unwrap();
        assert!(info.private && info.trusted);
        assert_eq!(store.generate("ci").unwrap_err().code(), "KEY003");
        assert!(store.trust_store().unwrap().contains(&info.keyid));
        let pem = store.export("ci").unwrap();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"));
        store.untrust(&info.keyid).unwrap();
        assert!(!store.trust_store().unwrap().contains(&info.keyid));
        assert_eq!(store.untrust(&info.keyid).unwrap_err().code(), "KEY006");
        let again = store
            .trust_pem(pem.as_bytes(), Path::new("ci.pem"))
            .unwrap();
        assert_eq!(again.keyid, info.keyid);
        let listed = store.list().unwrap();
        assert_eq!(listed, vec![info]);
    }

    #[test]
    fn key_files_are_checked() {
        let (_tmp, store) = store();
        store.generate("k").unwrap();
        let path = store.home.keys_dir().unwrap().join("k.key");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(store.signer("k").unwrap_err().code(), "KEY004");

        fs::write(
            &path,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(store.signer("k").unwrap_err().code(), "KEY005");

        fs::write(&path, [0xffu8; 40]).unwrap();
        assert_eq!(store.signer("k").unwrap_err().code(), "KEY005");

        assert_eq!(store.signer("nope").unwrap_err().code(), "KEY001");
        assert_eq!(store.signer("../x").unwrap_err().code(), "KEY002");
        assert_eq!(
            store
                .trust_pem(b"not pem", Path::new("x"))
                .unwrap_err()
                .code(),
            "KEY005"
        );
    }

    #[test]
    fn debug_never_prints_key_material() {
        let signer = Signer::generate().unwrap();
        let shown = format!("{signer:?}");
        assert!(shown.contains(signer.keyid()));
        assert!(!shown.contains(&hex::encode(signer.key.to_bytes())));
    }
}
