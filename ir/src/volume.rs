//! Persistent volumes: host files that are ciphertext at rest, opened only inside a guest.
//!
//! ```text
//! $MVM_HOME/volumes/NAME/volume.json      0600  name, id, size, cipher, its key sealed
//! $MVM_HOME/volumes/NAME/data             0600  the disk, aes-xts-plain64 over 512-byte sectors
//! $MVM_HOME/volumes/NAME/snapshots/S.data 0600  a snapshot's disk, as encrypted as the volume
//! $MVM_HOME/volumes/NAME/snapshots/S.json 0600  its name, time, size and SHA-256
//! $MVM_HOME/keys/volumes.key              0600  the host key that seals each volume's key
//! ```
//!
//! Each volume has a random 512-bit key of its own (AES-256 in XTS mode takes two 256-bit
//! halves), sealed under the host key with the volume's id and name as associated data
//! ([`crate::sealing`]): a `volume.json` moved to another volume does not open. The key leaves
//! the host only over a VM's agent channel, when its runner attaches the volume; it is never in
//! a plan, on a kernel command line, in the audit log or in a state file. A volume is attached
//! to one VM at a time: its runner holds a lock on `data` (as for any disk), and changing a
//! volume here (removing it, snapshots, restores) takes the same lock first.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::fsutil::{atomic_write, read_capped};
use crate::home::MvmHome;
use crate::plan::Timestamp;
use crate::sealing::{self, SealError, Sealed};
use crate::validate::is_identifier;
use crate::{Coded, ErrorClass};

/// The schema of `volume.json`.
pub const SCHEMA: &str = "mvm.volume/v1";
/// The cipher of every volume, as dm-crypt names it.
pub const CIPHER: &str = "aes-xts-plain64";
/// Bytes of a volume's key.
pub const KEY_BYTES: usize = 64;
/// The sector the cipher's tweak counts (dm-crypt's default).
pub const SECTOR_BYTES: u64 = 512;
/// The smallest volume: room for ext4 and its journal.
pub const MIN_BYTES: u64 = 16 << 20;
/// The largest volume.
pub const MAX_BYTES: u64 = 1 << 40;

/// Why a volume could not be used or changed. Its [`Coded::code`] is stable.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// No volume, or no snapshot, of that name.
    #[error("{0}")]
    Unknown(String),
    /// A name, size or snapshot that cannot be.
    #[error("{0}")]
    Invalid(String),
    /// A volume (or snapshot) of that name is there already.
    #[error("{0} exists already")]
    Exists(String),
    /// A VM has the volume attached (its runner holds it).
    #[error("volume {0} is attached to a VM (its runner holds it): stop that VM first")]
    InUse(String),
    /// A volume's record, key or snapshot cannot be trusted: altered, open to others, sealed
    /// for another volume, a snapshot whose bytes do not match its digest.
    #[error("{0}")]
    Untrusted(String),
    /// A file could not be read or written.
    #[error(transparent)]
    Io(#[from] crate::Error),
}

impl From<SealError> for VolumeError {
    fn from(error: SealError) -> Self {
        match error {
            SealError::Untrusted(why) => VolumeError::Untrusted(why),
            SealError::Io(e) => VolumeError::Io(e),
        }
    }
}

impl Coded for VolumeError {
    fn code(&self) -> &str {
        match self {
            VolumeError::Unknown(_) => "VOLUME001",
            VolumeError::Invalid(_) => "VOLUME002",
            VolumeError::Exists(_) => "VOLUME003",
            VolumeError::InUse(_) => "VOLUME004",
            VolumeError::Untrusted(_) => "VOLUME005",
            VolumeError::Io(e) => e.code(),
        }
    }

    fn class(&self) -> ErrorClass {
        match self {
            VolumeError::Untrusted(_) => ErrorClass::Integrity,
            VolumeError::Io(e) => e.class(),
            _ => ErrorClass::InvalidInput,
        }
    }
}

/// What `volume.json` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeMeta {
    /// [`SCHEMA`].
    pub schema_version: String,
    /// Its name, which is its directory's.
    pub name: String,
    /// 16 random bytes in hex: what its key is sealed to.
    pub id: String,
    /// Bytes of its disk.
    pub size_bytes: u64,
    /// [`CIPHER`].
    pub cipher: String,
    /// The filesystem inside (`ext4`).
    pub filesystem: String,
    /// When it was made (RFC 3339).
    pub created_at: String,
    /// Its key, sealed under the host key.
    pub key: Sealed,
}

/// What a snapshot's `S.json` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotMeta {
    /// Its name.
    pub name: String,
    /// The id of the volume it was taken of.
    pub volume_id: String,
    /// When it was taken (RFC 3339).
    pub created_at: String,
    /// Bytes of its disk.
    pub size_bytes: u64,
    /// `sha256:<hex>` of its disk (ciphertext), checked before it is restored.
    pub sha256: String,
}

/// The volumes of one mvm home.
#[derive(Debug, Clone)]
pub struct VolumeStore {
    dir: PathBuf,
    key: PathBuf,
}

/// A volume being made: a private directory of its own, which becomes the volume only when
/// [`Making::commit`] renames it into place (a failed make leaves nothing under the name).
#[derive(Debug)]
pub struct Making {
    dir: PathBuf,
    target: PathBuf,
    name: String,
}

impl Making {
    /// Where the disk is to be written.
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// A scratch path inside the private directory (for a file that never becomes part of the
    /// volume).
    pub fn scratch(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Writes the record and puts the volume in place.
    pub fn commit(self, meta: &VolumeMeta) -> Result<(), VolumeError> {
        write_json(&self.dir.join("volume.json"), meta)?;
        fs::DirBuilder::new()
            .mode(0o700)
            .create(self.dir.join("snapshots"))
            .map_err(|e| crate::Error::io(&self.dir, e))?;
        fs::rename(&self.dir, &self.target).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists | io::ErrorKind::DirectoryNotEmpty => {
                VolumeError::Exists(format!("volume {}", self.name))
            }
            _ => crate::Error::io(&self.target, e).into(),
        })
    }
}

impl Drop for Making {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl VolumeStore {
    /// The volumes of `home` (their directory made private when absent).
    pub fn open(home: &MvmHome) -> Result<Self, VolumeError> {
        Ok(Self {
            dir: home.ensure("volumes")?,
            key: home.keys_dir()?.join("volumes.key"),
        })
    }

    /// The directory of volume `name` (which may not exist).
    pub fn dir_of(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The disk of volume `name`.
    pub fn data_of(&self, name: &str) -> PathBuf {
        self.dir_of(name).join("data")
    }

    /// Starts making volume `name`: refused when it exists.
    pub fn begin(&self, name: &str) -> Result<Making, VolumeError> {
        check_name(name, "volume")?;
        let target = self.dir_of(name);
        if target.exists() {
            return Err(VolumeError::Exists(format!("volume {name}")));
        }
        let suffix = hex::encode(crate::random_bytes::<6>()?);
        let dir = self.dir.join(format!(".making-{name}-{suffix}"));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| crate::Error::io(&dir, e))?;
        Ok(Making {
            dir,
            target,
            name: name.to_string(),
        })
    }

    /// A fresh key for a new volume, and its record with the key sealed in it.
    pub fn new_volume(
        &self,
        name: &str,
        size_bytes: u64,
    ) -> Result<(Zeroizing<Vec<u8>>, VolumeMeta), VolumeError> {
        let key = Zeroizing::new(crate::random_bytes::<KEY_BYTES>()?.to_vec());
        let meta = self.record(name, size_bytes, &key)?;
        Ok((key, meta))
    }

    /// The record of a new volume `name` whose disk is encrypted under `key` (an imported
    /// one's): a new id, the key sealed to it under this host's key.
    pub fn record(
        &self,
        name: &str,
        size_bytes: u64,
        key: &[u8],
    ) -> Result<VolumeMeta, VolumeError> {
        check_name(name, "volume")?;
        check_size(size_bytes)?;
        if key.len() != KEY_BYTES {
            return Err(VolumeError::Invalid(format!(
                "a volume key is {KEY_BYTES} bytes"
            )));
        }
        let host = sealing::host_key(&self.key, true, "the volumes' host key")?;
        let id = hex::encode(crate::random_bytes::<16>()?);
        let sealed = sealing::seal(&host, &aad(&id, name), key)?;
        Ok(VolumeMeta {
            schema_version: SCHEMA.into(),
            name: name.into(),
            id,
            size_bytes,
            cipher: CIPHER.into(),
            filesystem: "ext4".into(),
            created_at: now(),
            key: sealed,
        })
    }

    /// The record of volume `name`, checked: private, of this schema and cipher, naming itself.
    pub fn meta(&self, name: &str) -> Result<VolumeMeta, VolumeError> {
        check_name(name, "volume")?;
        let path = self.dir_of(name).join("volume.json");
        if !path.exists() {
            return Err(VolumeError::Unknown(format!(
                "no volume named {name:?} (see `mvm volume ls`)"
            )));
        }
        let meta: VolumeMeta = read_json(&path)?;
        let sane = meta.schema_version == SCHEMA
            && meta.name == name
            && meta.cipher == CIPHER
            && meta.filesystem == "ext4"
            && check_size(meta.size_bytes).is_ok();
        if !sane {
            return Err(VolumeError::Untrusted(format!(
                "{}: not a volume record of {SCHEMA} for {name}",
                path.display()
            )));
        }
        Ok(meta)
    }

    /// The key of the volume `meta` describes, unsealed.
    pub fn key(&self, meta: &VolumeMeta) -> Result<Zeroizing<Vec<u8>>, VolumeError> {
        let host = sealing::host_key(&self.key, false, "the volumes' host key")?;
        sealing::open(&host, &aad(&meta.id, &meta.name), &meta.key)
            .filter(|key| key.len() == KEY_BYTES)
            .ok_or_else(|| {
                VolumeError::Untrusted(format!(
                    "the key of volume {} does not open: its record was altered or moved, or \
                     sealed under another host key",
                    meta.name
                ))
            })
    }

    /// Every volume, by name; a directory that is not one is reported through `damaged`.
    pub fn list(
        &self,
        mut damaged: impl FnMut(&str, VolumeError),
    ) -> Result<Vec<VolumeMeta>, VolumeError> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(|e| crate::Error::io(&self.dir, e))? {
            let entry = entry.map_err(|e| crate::Error::io(&self.dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') {
                names.push(name);
            }
        }
        names.sort();
        let mut volumes = Vec::new();
        for name in names {
            match self.meta(&name) {
                Ok(meta) => volumes.push(meta),
                Err(e) => damaged(&name, e),
            }
        }
        Ok(volumes)
    }

    /// Holds volume `name` for a change made here: refused while a VM has it attached. The
    /// hold lasts as long as the returned file is open.
    pub fn hold(&self, name: &str) -> Result<File, VolumeError> {
        self.meta(name)?;
        let data = self.data_of(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&data)
            .map_err(|e| crate::Error::io(&data, e))?;
        match file.try_lock() {
            Ok(()) => Ok(file),
            Err(fs::TryLockError::WouldBlock) => Err(VolumeError::InUse(name.into())),
            Err(fs::TryLockError::Error(e)) => Err(crate::Error::io(&data, e).into()),
        }
    }

    /// Removes volume `name` with its snapshots; refused while a VM has it attached.
    pub fn remove(&self, name: &str) -> Result<(), VolumeError> {
        let _held = self.hold(name)?;
        let suffix = hex::encode(crate::random_bytes::<6>()?);
        let doomed = self.dir.join(format!(".removing-{name}-{suffix}"));
        let dir = self.dir_of(name);
        fs::rename(&dir, &doomed).map_err(|e| crate::Error::io(&dir, e))?;
        fs::remove_dir_all(&doomed).map_err(|e| crate::Error::io(&doomed, e))?;
        Ok(())
    }

    /// Takes snapshot `snapshot` of volume `name` (refused while attached): its disk copied
    /// (`copy_file_range`, which clones the extents where the filesystem has reflinks),
    /// hashed, and recorded. Returns its record.
    pub fn snapshot(&self, name: &str, snapshot: &str) -> Result<SnapshotMeta, VolumeError> {
        check_name(snapshot, "snapshot")?;
        let meta = self.meta(name)?;
        let _held = self.hold(name)?;
        let dir = self.dir_of(name).join("snapshots");
        let (data, record) = snapshot_paths(&dir, snapshot);
        if record.exists() {
            return Err(VolumeError::Exists(format!(
                "snapshot {snapshot} of {name}"
            )));
        }
        let partial = dir.join(format!(".{snapshot}.partial"));
        let source = self.data_of(name);
        fs::copy(&source, &partial).map_err(|e| crate::Error::io(&source, e))?;
        let (sha256, size_bytes) = hash_file(&partial)?;
        fs::rename(&partial, &data).map_err(|e| crate::Error::io(&data, e))?;
        let taken = SnapshotMeta {
            name: snapshot.into(),
            volume_id: meta.id,
            created_at: now(),
            size_bytes,
            sha256,
        };
        write_json(&record, &taken)?;
        Ok(taken)
    }

    /// The snapshots of volume `name`, oldest first.
    pub fn snapshots(&self, name: &str) -> Result<Vec<SnapshotMeta>, VolumeError> {
        self.meta(name)?;
        let dir = self.dir_of(name).join("snapshots");
        let mut taken = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| crate::Error::io(&dir, e))? {
            let path = entry.map_err(|e| crate::Error::io(&dir, e))?.path();
            if path.extension().is_some_and(|e| e == "json") {
                taken.push(read_json::<SnapshotMeta>(&path)?);
            }
        }
        taken.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.name.cmp(&b.name)));
        Ok(taken)
    }

    /// Puts snapshot `snapshot` back as volume `name`'s disk (refused while attached), after
    /// checking its bytes against its digest; the snapshot stays. Returns its record.
    pub fn restore(&self, name: &str, snapshot: &str) -> Result<SnapshotMeta, VolumeError> {
        check_name(snapshot, "snapshot")?;
        let meta = self.meta(name)?;
        let held = self.hold(name)?;
        let dir = self.dir_of(name).join("snapshots");
        let (data, record) = snapshot_paths(&dir, snapshot);
        if !record.exists() {
            return Err(VolumeError::Unknown(format!(
                "volume {name} has no snapshot {snapshot:?} (see `mvm volume snapshots {name}`)"
            )));
        }
        let taken: SnapshotMeta = read_json(&record)?;
        if taken.volume_id != meta.id || taken.name != snapshot {
            return Err(VolumeError::Untrusted(format!(
                "snapshot {snapshot} was not taken of volume {name}"
            )));
        }
        let partial = self.dir_of(name).join(".data.partial");
        fs::copy(&data, &partial).map_err(|e| crate::Error::io(&data, e))?;
        let (sha256, size_bytes) = hash_file(&partial)?;
        if sha256 != taken.sha256 || size_bytes != taken.size_bytes {
            let _ = fs::remove_file(&partial);
            return Err(VolumeError::Untrusted(format!(
                "snapshot {snapshot} of {name} is {sha256}, {size_bytes} bytes; it was taken as \
                 {}, {} bytes",
                taken.sha256, taken.size_bytes
            )));
        }
        // Still held: no VM can attach the volume between the check and the swap.
        let target = self.data_of(name);
        fs::rename(&partial, &target).map_err(|e| crate::Error::io(&target, e))?;
        drop(held);
        Ok(taken)
    }
}

/// Now, RFC 3339 to the second.
fn now() -> String {
    let now = Timestamp::now().0;
    Timestamp(now.replace_nanosecond(0).unwrap_or(now)).to_string()
}

/// What a volume's key is sealed to.
fn aad(id: &str, name: &str) -> String {
    format!("{SCHEMA}:{id}:{name}")
}

fn snapshot_paths(dir: &Path, snapshot: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{snapshot}.data")),
        dir.join(format!("{snapshot}.json")),
    )
}

fn check_name(name: &str, what: &str) -> Result<(), VolumeError> {
    match is_identifier(name) {
        true => Ok(()),
        false => Err(VolumeError::Invalid(format!(
            "{name:?} is not a {what} name: 1-63 of [a-z0-9._-], starting with a letter or digit"
        ))),
    }
}

/// A size a volume may have: a whole number of 4 KiB blocks from [`MIN_BYTES`] to
/// [`MAX_BYTES`].
pub fn check_size(bytes: u64) -> Result<(), VolumeError> {
    if !(MIN_BYTES..=MAX_BYTES).contains(&bytes) || !bytes.is_multiple_of(4096) {
        return Err(VolumeError::Invalid(format!(
            "a volume is 16 MiB to 1 TiB in whole 4 KiB blocks; {bytes} bytes is not"
        )));
    }
    Ok(())
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), VolumeError> {
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| VolumeError::Invalid(format!("{}: {e}", path.display())))?;
    Ok(atomic_write(path, &bytes, 0o600)?)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, VolumeError> {
    sealing::check_private(path)?;
    let bytes = read_capped(path, 64 * 1024, "a volume record")?;
    serde_json::from_slice(&bytes)
        .map_err(|e| VolumeError::Untrusted(format!("{}: {e}", path.display())))
}

/// `sha256:<hex>` and the size of the file at `path`.
fn hash_file(path: &Path) -> Result<(String, u64), VolumeError> {
    let file = File::open(path).map_err(|e| crate::Error::io(path, e))?;
    Ok(crate::digest::sha256_reader(file).map_err(|e| crate::Error::io(path, e))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, VolumeStore) {
        let dir = tempfile::tempdir().unwrap();
        let home = MvmHome::at(dir.path().join("home"));
        let store = VolumeStore::open(&home).unwrap();
        (dir, store)
    }

    /// A volume whose disk is `bytes`, made as `mvm volume create` makes one.
    fn make(store: &VolumeStore, name: &str, bytes: &[u8]) -> Zeroizing<Vec<u8>> {
        let (key, meta) = store.new_volume(name, MIN_BYTES).unwrap();
        let making = store.begin(name).unwrap();
        atomic_write(&making.data(), bytes, 0o600).unwrap();
        making.commit(&meta).unwrap();
        key
    }

    #[test]
    fn a_volume_keeps_its_key_sealed_to_itself() {
        let (_dir, store) = store();
        let key = make(&store, "data", b"disk");
        assert_eq!(key.len(), KEY_BYTES);
        let meta = store.meta("data").unwrap();
        assert_eq!(*store.key(&meta).unwrap(), *key);
        assert!(
            !fs::read_to_string(store.dir_of("data").join("volume.json"))
                .unwrap()
                .contains(&hex::encode(&key[..]))
        );
        assert!(matches!(store.begin("data"), Err(VolumeError::Exists(_))));
        // A record moved to another volume does not open there.
        make(&store, "other", b"disk");
        let moved = VolumeMeta {
            name: "other".into(),
            ..meta.clone()
        };
        assert!(matches!(store.key(&moved), Err(VolumeError::Untrusted(_))));
        let listed: Vec<String> = store
            .list(|_, _| {})
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(listed, ["data", "other"]);
        assert!(matches!(store.meta("nope"), Err(VolumeError::Unknown(_))));
        assert!(matches!(store.meta("../x"), Err(VolumeError::Invalid(_))));
        for bad in [0, MIN_BYTES - 4096, MIN_BYTES + 1, MAX_BYTES + 4096] {
            assert!(store.new_volume("x", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn snapshots_restore_what_was_there_unless_changed_or_attached() {
        let (_dir, store) = store();
        make(&store, "data", b"first");
        let taken = store.snapshot("data", "s1").unwrap();
        assert_eq!(taken.size_bytes, 5);
        assert!(matches!(
            store.snapshot("data", "s1"),
            Err(VolumeError::Exists(_))
        ));
        fs::write(store.data_of("data"), b"second").unwrap();
        store.restore("data", "s1").unwrap();
        assert_eq!(fs::read(store.data_of("data")).unwrap(), b"first");
        assert_eq!(store.snapshots("data").unwrap(), [taken]);
        // A changed snapshot is refused and nothing is swapped.
        fs::write(store.dir_of("data").join("snapshots/s1.data"), b"forged").unwrap();
        fs::write(store.data_of("data"), b"third").unwrap();
        assert!(matches!(
            store.restore("data", "s1"),
            Err(VolumeError::Untrusted(_))
        ));
        assert_eq!(fs::read(store.data_of("data")).unwrap(), b"third");
        assert!(matches!(
            store.restore("data", "s2"),
            Err(VolumeError::Unknown(_))
        ));
        // Attached (a runner's lock): nothing changes it.
        let attached = File::open(store.data_of("data")).unwrap();
        attached.lock().unwrap();
        assert!(matches!(
            store.snapshot("data", "s3"),
            Err(VolumeError::InUse(_))
        ));
        assert!(matches!(store.remove("data"), Err(VolumeError::InUse(_))));
        drop(attached);
        store.remove("data").unwrap();
        assert!(!store.dir_of("data").exists());
    }
}
