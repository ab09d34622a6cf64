//! The host's secret store: values encrypted at rest, named by plans, resolved on the host at
//! launch.
//!
//! ```text
//! $MVM_HOME/secrets/store.json  0600  names, bindings, AES-256-GCM ciphertexts
//! $MVM_HOME/keys/secrets.key    0600  the 32-byte key, apart from the store
//! ```
//!
//! Each value is sealed with AES-256-GCM under a fresh 96-bit nonce, its name the associated
//! data: a ciphertext moved to another name, or altered in any bit, does not open (SECRET003).
//! The key lives with the signing keys, not beside the store, so that a copy of the store
//! alone (a backup, a synced folder) holds nothing readable. Both files are 0600 and refused
//! when others may read them. Writes go to a temporary file renamed into place, under a lock,
//! so that two `mvm secret put` never lose one another's secret and a crash leaves the old
//! store whole. Listing never opens a value.
//!
//! A secret is *bound* when it is tied to hosts (`mvm secret bind`): its value then never
//! enters a guest — the guest sees a placeholder, and the host's egress side puts the value
//! into requests to those hosts only. An unbound secret is handed to the command as it is,
//! where the plan's profile allows.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::fsutil::{atomic_write, read_capped};
use crate::home::MvmHome;
use crate::plan::Timestamp;
use crate::sealing;
use crate::validate::is_identifier;
use crate::{Coded, ErrorClass};

/// The largest value a secret may have.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// The most secrets a store holds.
const MAX_SECRETS: usize = 1024;
/// The most hosts one secret is bound to.
const MAX_BINDINGS: usize = 64;
/// The largest store file read.
const MAX_STORE_BYTES: u64 = 128 * 1024 * 1024;
/// The store file's version.
const STORE_VERSION: u32 = 1;
/// What every value's associated data begins with, before its name.
const AAD_PREFIX: &str = "mvm-secret-v1:";

/// Why the store refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// No secret of that name.
    #[error("no secret named {0:?} (see `mvm secret ls`)")]
    Unknown(String),
    /// A name, value or binding that cannot be stored.
    #[error("{0}")]
    Invalid(String),
    /// The store or its key cannot be trusted: a value that does not open, a file that others
    /// may read, a store that does not parse.
    #[error("the secret store: {0}")]
    Store(String),
    /// A file could not be read or written.
    #[error(transparent)]
    Io(#[from] crate::Error),
}

impl From<sealing::SealError> for SecretError {
    fn from(error: sealing::SealError) -> Self {
        match error {
            sealing::SealError::Untrusted(why) => SecretError::Store(why),
            sealing::SealError::Io(e) => SecretError::Io(e),
        }
    }
}

impl Coded for SecretError {
    fn code(&self) -> &str {
        match self {
            SecretError::Unknown(_) => "SECRET001",
            SecretError::Invalid(_) => "SECRET002",
            SecretError::Store(_) => "SECRET003",
            SecretError::Io(e) => e.code(),
        }
    }

    fn class(&self) -> ErrorClass {
        match self {
            SecretError::Unknown(_) | SecretError::Invalid(_) => ErrorClass::InvalidInput,
            SecretError::Store(_) => ErrorClass::Integrity,
            SecretError::Io(e) => e.class(),
        }
    }
}

/// How the host puts a bound secret into a request to its host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Inject {
    /// Wherever the guest wrote the secret's placeholder in a request header.
    Placeholder,
    /// As the value of this header, set on every request.
    Header {
        /// The header's name.
        name: String,
    },
    /// As `Authorization: Bearer VALUE` on every request.
    Bearer,
    /// As `Authorization: Basic base64(VALUE)` on every request (`VALUE` is `user:password`).
    Basic,
}

/// A host (and port) a secret is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    /// An exact DNS name, lowercase.
    pub host: String,
    /// The TCP port.
    pub port: u16,
    /// How the value goes in.
    pub inject: Inject,
}

impl Binding {
    /// Parses `--host H[:P]` (443 when no port) and `--inject` (`header:NAME`, `bearer`,
    /// `basic`; the placeholder when absent).
    pub fn parse(host: &str, inject: Option<&str>) -> Result<Self, SecretError> {
        let invalid = |why: String| SecretError::Invalid(why);
        let (name, port) = match host.rsplit_once(':') {
            Some((name, port)) => {
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| invalid(format!("{host:?}: the port is not 1-65535")))?;
                (name, port)
            }
            None => (host, 443),
        };
        let name = name.to_ascii_lowercase();
        let exact_name = crate::validate::is_egress_host(&name)
            && !name.starts_with("*.")
            && name.parse::<std::net::IpAddr>().is_err()
            && !name.starts_with('[');
        if !exact_name {
            return Err(invalid(format!(
                "{host:?}: a secret is bound to an exact DNS name (no wildcard, no IP address)"
            )));
        }
        let inject = match inject {
            None => Inject::Placeholder,
            Some("bearer") => Inject::Bearer,
            Some("basic") => Inject::Basic,
            Some(other) => match other.strip_prefix("header:") {
                Some(header) if is_header_name(header) => Inject::Header {
                    name: header.to_string(),
                },
                _ => {
                    return Err(invalid(format!(
                        "--inject {other:?}: header:NAME (an HTTP header name), bearer or basic"
                    )))
                }
            },
        };
        Ok(Self {
            host: name,
            port,
            inject,
        })
    }
}

/// Whether `name` is an HTTP header name (an RFC 9110 token) a secret may be injected as:
/// not one that frames the request or names its host.
fn is_header_name(name: &str) -> bool {
    const TCHAR: &[u8] = b"!#$%&'*+-.^_`|~";
    let token = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || TCHAR.contains(&b));
    let framing = ["host", "content-length", "transfer-encoding", "connection"]
        .iter()
        .any(|h| h.eq_ignore_ascii_case(name));
    token && !framing
}

/// What `mvm secret ls` shows of a secret: never its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecretInfo {
    /// The name plans use.
    pub name: String,
    /// When its value was last put.
    pub updated: String,
    /// The hosts it is bound to.
    pub bindings: Vec<Binding>,
}

/// A secret resolved for a launch.
pub struct Resolved {
    /// The value, wiped from memory when dropped.
    pub value: Zeroizing<Vec<u8>>,
    /// The hosts it is bound to (none: unbound).
    pub bindings: Vec<Binding>,
}

impl std::fmt::Debug for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolved")
            .field("value", &"[REDACTED]")
            .field("bindings", &self.bindings)
            .finish()
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    version: u32,
    secrets: BTreeMap<String, Sealed>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sealed {
    /// The 12-byte nonce, base64.
    nonce: String,
    /// The ciphertext and its 16-byte tag, base64.
    ciphertext: String,
    updated: String,
    #[serde(default)]
    bindings: Vec<Binding>,
}

/// The secret store of one state directory.
pub struct SecretStore {
    store: PathBuf,
    key: PathBuf,
}

impl SecretStore {
    /// The store of `home` (its directories made private if absent; nothing else created).
    pub fn open(home: &MvmHome) -> Result<Self, SecretError> {
        Ok(Self {
            store: home.ensure("secrets")?.join("store.json"),
            key: home.keys_dir()?.join("secrets.key"),
        })
    }

    /// Puts `value` under `name`, replacing a value there (its bindings stay).
    pub fn put(&self, name: &str, value: &[u8]) -> Result<(), SecretError> {
        check_name(name)?;
        if value.is_empty() || value.len() > MAX_VALUE_BYTES {
            return Err(SecretError::Invalid(format!(
                "a secret's value is 1 to {MAX_VALUE_BYTES} bytes; this one is {}",
                value.len()
            )));
        }
        let key = self.key(true)?;
        self.edit(|file| {
            if !file.secrets.contains_key(name) && file.secrets.len() >= MAX_SECRETS {
                return Err(SecretError::Invalid(format!(
                    "the store holds {MAX_SECRETS} secrets already"
                )));
            }
            let bindings = file
                .secrets
                .get(name)
                .map(|s| s.bindings.clone())
                .unwrap_or_default();
            let sealed = sealing::seal(&key, &aad(name), value)?;
            file.secrets.insert(
                name.to_string(),
                Sealed {
                    nonce: sealed.nonce,
                    ciphertext: sealed.ciphertext,
                    updated: Timestamp::now().to_string(),
                    bindings,
                },
            );
            Ok(())
        })
    }

    /// Removes `name`; false when there was none.
    pub fn remove(&self, name: &str) -> Result<bool, SecretError> {
        check_name(name)?;
        let mut removed = false;
        self.edit(|file| {
            removed = file.secrets.remove(name).is_some();
            Ok(())
        })?;
        Ok(removed)
    }

    /// Binds `name` to `binding`'s host and port (replacing a binding to the same ones).
    pub fn bind(&self, name: &str, binding: Binding) -> Result<(), SecretError> {
        check_name(name)?;
        self.edit(|file| {
            let sealed = file
                .secrets
                .get_mut(name)
                .ok_or_else(|| SecretError::Unknown(name.into()))?;
            sealed
                .bindings
                .retain(|b| (b.host.as_str(), b.port) != (binding.host.as_str(), binding.port));
            if sealed.bindings.len() >= MAX_BINDINGS {
                return Err(SecretError::Invalid(format!(
                    "{name} is bound to {MAX_BINDINGS} hosts already"
                )));
            }
            sealed.bindings.push(binding);
            Ok(())
        })
    }

    /// Takes `name`'s binding to `host:port` away; false when there was none.
    pub fn unbind(&self, name: &str, host: &str, port: u16) -> Result<bool, SecretError> {
        check_name(name)?;
        let mut removed = false;
        self.edit(|file| {
            let sealed = file
                .secrets
                .get_mut(name)
                .ok_or_else(|| SecretError::Unknown(name.into()))?;
            let before = sealed.bindings.len();
            sealed
                .bindings
                .retain(|b| !(b.host.eq_ignore_ascii_case(host) && b.port == port));
            removed = sealed.bindings.len() != before;
            Ok(())
        })?;
        Ok(removed)
    }

    /// Every secret's name, time and bindings; no value is opened.
    pub fn list(&self) -> Result<Vec<SecretInfo>, SecretError> {
        let file = self.read()?;
        Ok(file
            .secrets
            .into_iter()
            .map(|(name, sealed)| SecretInfo {
                name,
                updated: sealed.updated,
                bindings: sealed.bindings,
            })
            .collect())
    }

    /// Opens the values of `names`; a name the store does not hold is `None`.
    pub fn resolve(
        &self,
        names: &[&str],
    ) -> Result<BTreeMap<String, Option<Resolved>>, SecretError> {
        let file = self.read()?;
        let mut out = BTreeMap::new();
        let key = match names.iter().any(|n| file.secrets.contains_key(*n)) {
            true => Some(self.key(false)?),
            false => None,
        };
        for name in names {
            let resolved = match (file.secrets.get(*name), &key) {
                (Some(sealed), Some(key)) => Some(Resolved {
                    value: open(key, name, sealed)?,
                    bindings: sealed.bindings.clone(),
                }),
                _ => None,
            };
            out.insert((*name).to_string(), resolved);
        }
        Ok(out)
    }

    /// The key, made (32 random bytes, 0600) when `create` and there is none.
    fn key(&self, create: bool) -> Result<Zeroizing<Vec<u8>>, SecretError> {
        Ok(sealing::host_key(
            &self.key,
            create,
            "the secret store's key",
        )?)
    }

    fn read(&self) -> Result<StoreFile, SecretError> {
        if !self.store.exists() {
            return Ok(StoreFile {
                version: STORE_VERSION,
                secrets: BTreeMap::new(),
            });
        }
        check_private(&self.store)?;
        let bytes = read_capped(&self.store, MAX_STORE_BYTES, "the secret store")?;
        let file: StoreFile = serde_json::from_slice(&bytes)
            .map_err(|e| SecretError::Store(format!("{}: {e}", self.store.display())))?;
        if file.version != STORE_VERSION {
            return Err(SecretError::Store(format!(
                "{} is version {}; this mvm reads {STORE_VERSION}",
                self.store.display(),
                file.version
            )));
        }
        Ok(file)
    }

    /// Reads, changes and writes the store back whole, under its lock.
    fn edit(
        &self,
        change: impl FnOnce(&mut StoreFile) -> Result<(), SecretError>,
    ) -> Result<(), SecretError> {
        let lock_path = self.store.with_extension("lock");
        let lock = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| crate::Error::io(&lock_path, e))?;
        File::lock(&lock).map_err(|e| crate::Error::io(&lock_path, e))?;
        let mut file = self.read()?;
        change(&mut file)?;
        let bytes =
            serde_json::to_vec_pretty(&file).map_err(|e| SecretError::Store(e.to_string()))?;
        atomic_write(&self.store, &bytes, 0o600)?;
        Ok(())
    }
}

fn aad(name: &str) -> String {
    format!("{AAD_PREFIX}{name}")
}

fn open(key: &[u8], name: &str, sealed: &Sealed) -> Result<Zeroizing<Vec<u8>>, SecretError> {
    let value = sealing::Sealed {
        nonce: sealed.nonce.clone(),
        ciphertext: sealed.ciphertext.clone(),
    };
    sealing::open(key, &aad(name), &value).ok_or_else(|| {
        SecretError::Store(format!("the value of {name:?} does not open: altered, moved from another name, or sealed under another key"))
    })
}

fn check_name(name: &str) -> Result<(), SecretError> {
    match is_identifier(name) {
        true => Ok(()),
        false => Err(SecretError::Invalid(format!(
            "{name:?} is not a secret name: 1-63 of [a-z0-9._-], starting with a letter or digit"
        ))),
    }
}

/// Refuses a store file that others may read or write.
fn check_private(path: &Path) -> Result<(), SecretError> {
    Ok(sealing::check_private(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn store() -> (tempfile::TempDir, SecretStore) {
        let dir = tempfile::tempdir().unwrap();
        let home = MvmHome::at(dir.path().join("home"));
        let store = SecretStore::open(&home).unwrap();
        (dir, store)
    }

    #[test]
    fn a_value_put_is_resolved_and_never_stored_in_the_clear() {
        let (dir, store) = store();
        store.put("api-token", b"s3cr3t-VALUE-0001").unwrap();
        let resolved = store.resolve(&["api-token", "absent"]).unwrap();
        assert_eq!(
            &resolved["api-token"].as_ref().unwrap().value[..],
            b"s3cr3t-VALUE-0001"
        );
        assert!(resolved["absent"].is_none());
        let on_disk = fs::read(dir.path().join("home/secrets/store.json")).unwrap();
        assert!(!String::from_utf8_lossy(&on_disk).contains("s3cr3t"));
        for file in ["secrets/store.json", "keys/secrets.key"] {
            let mode = fs::metadata(dir.path().join("home").join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert!(!format!("{listed:?}").contains("s3cr3t"));
        assert!(!format!("{:?}", resolved["api-token"]).contains("s3cr3t"));
    }

    #[test]
    fn a_ciphertext_moved_or_altered_does_not_open() {
        let (dir, store) = store();
        store.put("one", b"first value").unwrap();
        store.put("two", b"second value").unwrap();
        let path = dir.path().join("home/secrets/store.json");
        let mut file: serde_json::Value =
            serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        file["secrets"]["two"] = file["secrets"]["one"].clone();
        fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
        let err = store.resolve(&["two"]).unwrap_err();
        assert_eq!(err.code(), "SECRET003", "{err}");
        assert!(!err.to_string().contains("first value"));
    }

    #[test]
    fn a_store_or_key_open_to_others_is_refused() {
        let (dir, store) = store();
        store.put("one", b"value").unwrap();
        let key = dir.path().join("home/keys/secrets.key");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(store.resolve(&["one"]).unwrap_err().code(), "SECRET003");
    }

    #[test]
    fn bindings_are_exact_names_and_survive_a_new_value() {
        let (_dir, store) = store();
        store.put("tok", b"v1").unwrap();
        store
            .bind(
                "tok",
                Binding::parse("API.example.com", Some("bearer")).unwrap(),
            )
            .unwrap();
        store
            .bind("tok", Binding::parse("api.example.com:8443", None).unwrap())
            .unwrap();
        store.put("tok", b"v2").unwrap();
        let bindings = &store.list().unwrap()[0].bindings;
        assert_eq!(bindings.len(), 2);
        assert_eq!(
            (bindings[0].host.as_str(), bindings[0].port),
            ("api.example.com", 443)
        );
        assert_eq!(bindings[0].inject, Inject::Bearer);
        assert_eq!(bindings[1].inject, Inject::Placeholder);
        assert!(store.unbind("tok", "api.example.com", 8443).unwrap());
        assert_eq!(store.list().unwrap()[0].bindings.len(), 1);
        for bad in [
            "*.example.com",
            "192.0.2.1",
            "[2001:db8::1]",
            "api.example.com:0",
            "a b",
        ] {
            assert!(Binding::parse(bad, None).is_err(), "{bad}");
        }
        for bad in ["header:Host", "header:", "header:a b", "token"] {
            assert!(
                Binding::parse("api.example.com", Some(bad)).is_err(),
                "{bad}"
            );
        }
        assert_eq!(
            store
                .bind("nope", Binding::parse("api.example.com", None).unwrap())
                .unwrap_err()
                .code(),
            "SECRET001"
        );
    }

    #[test]
    fn names_and_sizes_are_checked() {
        let (_dir, store) = store();
        assert_eq!(store.put("Bad Name", b"x").unwrap_err().code(), "SECRET002");
        assert_eq!(store.put("ok", b"").unwrap_err().code(), "SECRET002");
        let big = vec![b'x'; MAX_VALUE_BYTES + 1];
        assert_eq!(store.put("ok", &big).unwrap_err().code(), "SECRET002");
        assert!(!store.remove("ok").unwrap());
    }
}
