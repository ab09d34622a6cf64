//! The archive `mvm volume export` writes and `mvm volume import` reads, to move a volume to
//! another host: a tar of exactly two regular files,
//!
//! ```text
//! mvm-volume.json   the header: name, size, cipher, the disk's SHA-256, the KDF's
//!                   parameters and salt, the volume's key sealed under the derived key
//! data              the volume's disk as it is stored: ciphertext
//! ```
//!
//! The key is sealed with AES-256-GCM under a key derived from a passphrase with Argon2id (64
//! MiB, 3 passes), its associated data the disk's SHA-256 and size: a disk swapped for
//! another, or a header edited, does not import. Nothing in the archive is readable without
//! the passphrase. Parameters read from an archive are bounded before use, so a crafted one
//! cannot make an import take unbounded memory or time.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context;
use argon2::{Algorithm, Argon2, Params, Version};
use mvm_ir::digest::{sha256_reader, Sha256Writer};
use mvm_ir::sealing::{self, Sealed};
use mvm_ir::volume::{check_size, VolumeError, VolumeMeta, VolumeStore, CIPHER};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::commands::coded;

/// The header's schema.
pub const SCHEMA: &str = "mvm.volume-export/v1";
const HEADER_FILE: &str = "mvm-volume.json";
const DATA_FILE: &str = "data";
/// Argon2id's memory in KiB, passes and lanes for a new archive.
const KDF_MEMORY_KIB: u32 = 64 * 1024;
const KDF_PASSES: u32 = 3;
const KDF_LANES: u32 = 1;

/// What `mvm-volume.json` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// [`SCHEMA`].
    pub schema_version: String,
    /// The volume's name where it was exported.
    pub name: String,
    /// Bytes of the disk.
    pub size_bytes: u64,
    /// [`CIPHER`].
    pub cipher: String,
    /// `sha256:<hex>` of the disk as archived.
    pub data_sha256: String,
    /// How the key that seals the volume's key is derived from the passphrase.
    pub kdf: Kdf,
    /// The volume's key, sealed.
    pub key: Sealed,
}

/// Argon2id's parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kdf {
    /// Always `argon2id`.
    pub algorithm: String,
    /// Memory in KiB, 8 MiB to 1 GiB.
    pub memory_kib: u32,
    /// Passes, 1 to 16.
    pub passes: u32,
    /// Lanes, 1 to 8.
    pub lanes: u32,
    /// 16 random bytes, hex.
    pub salt: String,
}

impl Kdf {
    /// The 32-byte key `passphrase` gives under these parameters; refused when they are out
    /// of bounds.
    fn derive(&self, passphrase: &str) -> Result<Zeroizing<[u8; 32]>, VolumeError> {
        let untrusted = |why: String| VolumeError::Untrusted(format!("the archive's KDF: {why}"));
        let bounded = self.algorithm == "argon2id"
            && (8 * 1024..=1024 * 1024).contains(&self.memory_kib)
            && (1..=16).contains(&self.passes)
            && (1..=8).contains(&self.lanes);
        let salt = hex::decode(&self.salt).map_err(|e| untrusted(e.to_string()))?;
        if !bounded || salt.len() != 16 {
            return Err(untrusted(format!("parameters out of bounds: {self:?}")));
        }
        let params = Params::new(self.memory_kib, self.passes, self.lanes, Some(32))
            .map_err(|e| untrusted(e.to_string()))?;
        let mut key = Zeroizing::new([0u8; 32]);
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password_into(passphrase.as_bytes(), &salt, &mut *key)
            .map_err(|e| untrusted(e.to_string()))?;
        Ok(key)
    }
}

/// What the volume's key is sealed to in an archive: the disk it opens.
fn aad(data_sha256: &str, size_bytes: u64) -> String {
    format!("{SCHEMA}:{data_sha256}:{size_bytes}")
}

/// Writes volume `name` to `file` (replaced whole once written, 0600); its header.
pub fn export(
    store: &VolumeStore,
    name: &str,
    file: &Path,
    passphrase: &str,
) -> anyhow::Result<Header> {
    let meta = store.meta(name).map_err(coded)?;
    // Held throughout: no VM writes the disk while it is hashed and archived.
    let _held = store.hold(name).map_err(coded)?;
    let key = store.key(&meta).map_err(coded)?;
    let data = store.data_of(name);
    let (data_sha256, size_bytes) = sha256_reader(File::open(&data)?)?;
    let kdf = Kdf {
        algorithm: "argon2id".into(),
        memory_kib: KDF_MEMORY_KIB,
        passes: KDF_PASSES,
        lanes: KDF_LANES,
        salt: hex::encode(mvm_ir::random_bytes::<16>().map_err(coded)?),
    };
    let sealing_key = kdf.derive(passphrase).map_err(coded)?;
    let sealed = sealing::seal(&sealing_key[..], &aad(&data_sha256, size_bytes), &key)
        .map_err(|e| coded(VolumeError::from(e)))?;
    let header = Header {
        schema_version: SCHEMA.into(),
        name: meta.name.clone(),
        size_bytes,
        cipher: meta.cipher.clone(),
        data_sha256,
        kdf,
        key: sealed,
    };
    let dir = std::path::absolute(file)?
        .parent()
        .map(Path::to_path_buf)
        .context("the archive has no directory")?;
    let staged = tempfile::Builder::new()
        .prefix(".mvm-volume-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .tempfile_in(&dir)?;
    {
        let mut tar = tar::Builder::new(staged.as_file());
        let json = serde_json::to_vec_pretty(&header)?;
        append(
            &mut tar,
            HEADER_FILE,
            json.len() as u64,
            &mut json.as_slice(),
        )?;
        append(&mut tar, DATA_FILE, size_bytes, &mut File::open(&data)?)?;
        tar.finish()?;
    }
    staged.as_file().sync_all()?;
    staged.persist(file)?;
    Ok(header)
}

fn append(
    tar: &mut tar::Builder<&File>,
    path: &str,
    size: u64,
    bytes: &mut dyn Read,
) -> io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(size);
    header.set_mode(0o600);
    header.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut header, path, bytes)
}

/// Makes a volume (named `name`, or as exported) from the archive `file`: the key opened with
/// `passphrase`, the disk checked against its digest as it is copied in. Its record and the
/// archive's header.
pub fn import(
    store: &VolumeStore,
    file: &Path,
    name: Option<&str>,
    passphrase: &str,
) -> anyhow::Result<(VolumeMeta, Header)> {
    let refused = |why: String| coded(VolumeError::Untrusted(format!("{}: {why}", file.display())));
    let archive = File::open(file).with_context(|| file.display().to_string())?;
    let mut archive = tar::Archive::new(archive);
    let mut entries = archive.entries()?;
    let mut next = |expected: &str| -> anyhow::Result<tar::Entry<'_, File>> {
        let entry = entries
            .next()
            .ok_or_else(|| refused(format!("it ends before {expected}")))??;
        let path = entry.path()?.to_string_lossy().into_owned();
        if path != expected || entry.header().entry_type() != tar::EntryType::Regular {
            return Err(refused(format!("{path:?} where {expected} should be")));
        }
        Ok(entry)
    };
    let mut json = Vec::new();
    next(HEADER_FILE)?.take(64 * 1024).read_to_end(&mut json)?;
    let header: Header =
        serde_json::from_slice(&json).map_err(|e| refused(format!("its header: {e}")))?;
    if header.schema_version != SCHEMA || header.cipher != CIPHER {
        return Err(refused(format!(
            "not a {SCHEMA} archive of a {CIPHER} volume"
        )));
    }
    check_size(header.size_bytes).map_err(coded)?;
    let sealing_key = header.kdf.derive(passphrase).map_err(coded)?;
    let key = sealing::open(
        &sealing_key[..],
        &aad(&header.data_sha256, header.size_bytes),
        &header.key,
    )
    .ok_or_else(|| {
        refused("the passphrase does not open its key, or its header was altered".into())
    })?;
    let name = name.unwrap_or(&header.name).to_string();
    let making = store.begin(&name).map_err(coded)?;
    let mut data = next(DATA_FILE)?;
    if data.header().size()? != header.size_bytes {
        return Err(refused("its disk is not the size its header says".into()));
    }
    let target = making.data();
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&target)?;
    let synced = written.try_clone()?;
    let mut hashing = Sha256Writer::new(written);
    io::copy(&mut data, &mut hashing)?;
    let (found, _) = hashing.finish()?;
    synced.sync_all()?;
    if found != header.data_sha256 {
        return Err(refused(format!(
            "its disk is {found}, its header says {}",
            header.data_sha256
        )));
    }
    let meta = store
        .record(&name, header.size_bytes, &key)
        .map_err(coded)?;
    making.commit(&meta).map_err(coded)?;
    Ok((meta, header))
}
