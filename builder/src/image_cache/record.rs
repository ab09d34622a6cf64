//! One image record, `$MVM_HOME/cache/images/<hex>.json`: what `mvm build` pulled or used, and
//! the bundles it built from it. Written whole (temp + rename) or not at all; read strictly,
//! so a damaged file is told apart from a record and never trusted.

use std::path::{Path, PathBuf};

use mvm_ir::digest::is_prefixed_sha256;
use mvm_ir::fsutil::{atomic_write, read_capped};
use mvm_ir::plan::Timestamp;
use serde::{Deserialize, Serialize};

use super::CacheError;

/// The schema of a record.
pub const RECORD_SCHEMA: &str = "mvm.image/v1";
/// The largest record read.
const MAX_RECORD_BYTES: u64 = 1024 * 1024;

/// What the cache knows of one image, named by the digest it was pulled by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRecord {
    /// [`RECORD_SCHEMA`].
    pub schema_version: String,
    /// The digest the image was named by (a manifest's or an index's).
    pub digest: String,
    /// Its `linux/amd64` manifest's digest (the same unless `digest` names an index).
    pub manifest_digest: String,
    /// The references it was pulled from, as written (`registry/repo`, `oci:DIR`, …).
    pub references: Vec<String>,
    /// Every blob of it in the blob cache: index, manifest, config, layers.
    pub blobs: Vec<BlobRecord>,
    /// When a build first pulled it.
    pub first_pulled: Timestamp,
    /// When a build or a run last used it.
    pub last_used: Timestamp,
    /// The bundles built from it, each with the digest of the plan it was signed with.
    pub bundles: Vec<BundleRecord>,
}

/// A blob of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobRecord {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
}

/// A bundle built from an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleRecord {
    /// The bundle directory (absolute).
    pub path: PathBuf,
    /// The digest of its signed plan's payload, as VMs' states name it.
    pub plan_digest: String,
}

/// The file name of the record of `digest`.
pub fn file_name(digest: &str) -> String {
    format!("{}.json", digest.trim_start_matches("sha256:"))
}

impl ImageRecord {
    /// Reads and checks the record at `path`: a file that is not a record of the digest its
    /// name gives is [`CacheError::Damaged`].
    pub fn read(path: &Path) -> Result<Self, CacheError> {
        let damaged = |reason: String| CacheError::Damaged {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = read_capped(path, MAX_RECORD_BYTES, "image record").map_err(|e| match e {
            mvm_ir::Error::Io { source, .. } => CacheError::io(path, source),
            other => damaged(other.to_string()),
        })?;
        let record: ImageRecord =
            serde_json::from_slice(&bytes).map_err(|e| damaged(e.to_string()))?;
        if record.schema_version != RECORD_SCHEMA {
            return Err(damaged(format!(
                "schema {:?}, not {RECORD_SCHEMA}",
                record.schema_version
            )));
        }
        let digests = [&record.digest, &record.manifest_digest]
            .into_iter()
            .chain(record.blobs.iter().map(|b| &b.digest))
            .chain(record.bundles.iter().map(|b| &b.plan_digest));
        if let Some(bad) = digests.into_iter().find(|d| !is_prefixed_sha256(d)) {
            return Err(damaged(format!("{bad:?} is not sha256:<64 hex>")));
        }
        if path.file_name().and_then(|n| n.to_str()) != Some(&file_name(&record.digest)) {
            return Err(damaged(format!(
                "it records {}, which its name does not give",
                record.digest
            )));
        }
        if let Some(bundle) = record.bundles.iter().find(|b| !b.path.is_absolute()) {
            return Err(damaged(format!(
                "bundle path {} is not absolute",
                bundle.path.display()
            )));
        }
        Ok(record)
    }

    /// Writes the record into `dir`, whole or not at all.
    pub fn write(&self, dir: &Path) -> Result<(), CacheError> {
        let path = dir.join(file_name(&self.digest));
        let bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| CacheError::io(&path, std::io::Error::other(e.to_string())))?;
        atomic_write(&path, &bytes, 0o600).map_err(|e| match e {
            mvm_ir::Error::Io { source, .. } => CacheError::io(&path, source),
            other => CacheError::io(&path, std::io::Error::other(other.to_string())),
        })
    }

    /// The sum of its blobs' sizes.
    pub fn size(&self) -> u64 {
        self.blobs.iter().map(|b| b.size).sum()
    }
}
