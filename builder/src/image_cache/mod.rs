//! The managed image cache: what `mvm image ls`, `rm`, `prune` and `mvm system df` read and
//! change.
//!
//! In `$MVM_HOME`:
//!
//! ```text
//! cache/blobs/sha256/<hex>   verified blobs (oci::BlobCache), shared by every image naming them
//! cache/images/<hex>.json    one record per image pulled by `mvm build` (record::ImageRecord)
//! cache/lock                 builds hold it shared, `rm` and `prune` exclusive
//! cache/removal.json         a removal decided and not yet finished (the journal)
//! runs/<key>/                bundles `mvm run IMAGE` and `mvm up IMAGE` build and keep
//! ```
//!
//! What it promises:
//!
//! - A record names only blobs that are in the cache, at every instant: a removal is first
//!   written down whole (`removal.json`, atomically), then carried out records first, blobs and
//!   bundles after, and the journal removed last. A removal that was killed is finished by the
//!   next command that takes the lock — any build, `ls`, `rm`, `prune` — before it reads.
//! - A build never loses a blob to a prune: it holds the lock shared from its pull until its
//!   record is written, and a prune holds it exclusive.
//! - Nothing a VM needs is removed: an image whose bundle's plan a named VM (running, stopped,
//!   failed or cold) was admitted with is kept by `prune` and refused by `rm`
//!   ([`CacheError::InUse`]), naming the VM. The caller says which VMs there are ([`VmUse`]):
//!   this crate knows nothing of the runner.
//! - A damaged record is reported ([`Inventory::damaged`]) and never trusted; `prune` removes
//!   it.

mod inventory;
mod record;
mod removal;

#[cfg(test)]
mod tests;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use mvm_ir::fsutil::ExclusiveLock;
use mvm_ir::home::MvmHome;
use mvm_ir::plan::Timestamp;
use mvm_ir::{Coded, ErrorClass};

use crate::oci::{BlobCache, PulledImage};

pub use inventory::{disk_usage, BundleEntry, CacheFile, Damaged, ImageEntry, Inventory, VmUse};
pub use record::{BlobRecord, BundleRecord, ImageRecord, RECORD_SCHEMA};
pub use removal::{Prune, Removal, Removed};

/// The lock file, in the cache directory.
const LOCK_FILE: &str = "lock";
/// The records' directory, in the cache directory.
const IMAGES_DIR: &str = "images";
/// Held while one record is read, changed and written back.
const RECORDS_LOCK: &str = ".lock";
/// The journal of a removal not yet finished, in the cache directory.
const JOURNAL_FILE: &str = "removal.json";

/// Why the cache could not be read or changed. Codes are stable (`docs/errors.md`).
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// No image matches what was asked for.
    #[error("no image in the cache matches {0:?} (see `mvm image ls`)")]
    NoSuchImage(String),
    /// Several images match.
    #[error("{arg:?} matches several images: {}; give more of the digest", matches.join(", "))]
    Ambiguous {
        /// What was asked for.
        arg: String,
        /// The digests it matches.
        matches: Vec<String>,
    },
    /// Not a reference, a digest or a digest prefix of at least 12 hex digits.
    #[error("{arg:?}: {reason}")]
    BadArgument {
        /// What was asked for.
        arg: String,
        /// What is wrong.
        reason: String,
    },
    /// A VM still needs the image.
    #[error("image {digest} is needed by VM {}: remove the VM first (`mvm rm`)", vms.join(", VM "))]
    InUse {
        /// The image.
        digest: String,
        /// The VMs that need it.
        vms: Vec<String>,
    },
    /// A file of the cache could not be read, written, removed or locked.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A record file that is not a record (reported and skipped, never an exit).
    #[error("{path}: damaged image record: {reason}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl Coded for CacheError {
    fn code(&self) -> &str {
        match self {
            CacheError::NoSuchImage(_) => "CACHE001",
            CacheError::Ambiguous { .. } => "CACHE002",
            CacheError::BadArgument { .. } => "CACHE003",
            CacheError::InUse { .. } => "CACHE004",
            CacheError::Io { .. } => "CACHE005",
            CacheError::Damaged { .. } => "CACHE006",
        }
    }

    fn class(&self) -> ErrorClass {
        match self {
            CacheError::Io { .. } => ErrorClass::Io,
            CacheError::NoSuchImage(_)
            | CacheError::Ambiguous { .. }
            | CacheError::BadArgument { .. }
            | CacheError::InUse { .. }
            | CacheError::Damaged { .. } => ErrorClass::InvalidInput,
        }
    }
}

impl CacheError {
    fn io(path: &Path, source: io::Error) -> Self {
        CacheError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The image cache of one mvm home.
#[derive(Debug, Clone)]
pub struct ImageCache {
    /// `$MVM_HOME/cache`.
    root: PathBuf,
    /// `$MVM_HOME/runs`: bundles mvm keeps for images it runs.
    runs: PathBuf,
    blobs: BlobCache,
}

/// The cache's lock, held until dropped (shared by builds, exclusive for removals).
#[derive(Debug)]
pub struct CacheLock {
    file: File,
    exclusive: bool,
}

impl Drop for CacheLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

/// An image a build used, for its record.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The reference as written (without the digest).
    pub reference: String,
    /// Its blobs, as the pull listed them (none for an `oci-archive:` image, which is not
    /// cached).
    pub pulled: Option<PulledImage>,
    /// The digest it was named by.
    pub digest: String,
    /// The bundle built from it, and its plan's digest.
    pub bundle: BundleRecord,
}

impl ImageCache {
    /// The cache of `home`, its directories created (0700) if absent.
    pub fn in_home(home: &MvmHome) -> Result<Self, CacheError> {
        let ensure = |sub: &str| {
            home.ensure(sub).map_err(|e| match e {
                mvm_ir::Error::Io { path, source } => CacheError::Io { path, source },
                other => {
                    CacheError::io(&home.root().join(sub), io::Error::other(other.to_string()))
                }
            })
        };
        let root = ensure("cache")?;
        let runs = ensure("runs")?;
        let blobs = BlobCache::at(&root.join("blobs"))
            .map_err(|e| CacheError::io(&root.join("blobs"), io::Error::other(e.to_string())))?;
        let images = root.join(IMAGES_DIR);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&images)
            .map_err(|e| CacheError::io(&images, e))?;
        Ok(Self { root, runs, blobs })
    }

    /// The blob cache.
    pub fn blobs(&self) -> &BlobCache {
        &self.blobs
    }

    /// Where mvm keeps the bundles of images it runs (`$MVM_HOME/runs`).
    pub fn runs_dir(&self) -> &Path {
        &self.runs
    }

    fn images_dir(&self) -> PathBuf {
        self.root.join(IMAGES_DIR)
    }

    fn journal(&self) -> PathBuf {
        self.root.join(JOURNAL_FILE)
    }

    fn lock_file(&self) -> Result<File, CacheError> {
        let path = self.root.join(LOCK_FILE);
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| CacheError::io(&path, e))
    }

    /// The lock a build holds from its pull until its record is written: shared with other
    /// builds, never with a removal. A removal that was killed is finished first.
    pub fn lock_shared(&self) -> Result<CacheLock, CacheError> {
        let path = self.root.join(LOCK_FILE);
        loop {
            if self.journal().exists() {
                drop(self.lock_exclusive(|| {})?);
            }
            let file = self.lock_file()?;
            file.lock_shared().map_err(|e| CacheError::io(&path, e))?;
            // A remover killed between the check and the lock left a journal: finish it first.
            if !self.journal().exists() {
                return Ok(CacheLock {
                    file,
                    exclusive: false,
                });
            }
        }
    }

    /// The lock a removal holds: no build runs meanwhile. `waiting` is called once if builds
    /// hold it now (the lock is then waited for). A removal that was killed is finished first.
    pub fn lock_exclusive(&self, waiting: impl FnOnce()) -> Result<CacheLock, CacheError> {
        let path = self.root.join(LOCK_FILE);
        let file = self.lock_file()?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                waiting();
                file.lock().map_err(|e| CacheError::io(&path, e))?;
            }
            Err(fs::TryLockError::Error(e)) => return Err(CacheError::io(&path, e)),
        }
        let lock = CacheLock {
            file,
            exclusive: true,
        };
        self.finish_removal(&lock)?;
        Ok(lock)
    }

    /// Records what a build used and built, under `lock` (held since the pull): the image's
    /// blobs, references and use time, and the bundle — which no other record names any more
    /// (a bundle directory rebuilt from another image is that image's now).
    pub fn record_build(&self, _lock: &CacheLock, built: &BuiltImage) -> Result<(), CacheError> {
        let _records = self.records_lock()?;
        let now = Timestamp::now();
        let dir = self.images_dir();
        let path = dir.join(record::file_name(&built.digest));
        let mut blobs = Vec::new();
        if let Some(pulled) = &built.pulled {
            for digest in &pulled.blobs {
                let file = self
                    .blobs
                    .blob_dir()
                    .join(digest.trim_start_matches("sha256:"));
                let size = fs::metadata(&file)
                    .map_err(|e| CacheError::io(&file, e))?
                    .len();
                if !blobs.iter().any(|b: &BlobRecord| &b.digest == digest) {
                    blobs.push(BlobRecord {
                        digest: digest.clone(),
                        size,
                    });
                }
            }
        }
        let manifest_digest = built
            .pulled
            .as_ref()
            .map_or_else(|| built.digest.clone(), |p| p.manifest_digest.clone());
        let mut record = match ImageRecord::read(&path) {
            Ok(mut old) => {
                old.blobs = blobs;
                old.manifest_digest = manifest_digest;
                old.last_used = now;
                old
            }
            // None yet, or a damaged one: written anew.
            Err(CacheError::Io { ref source, .. }) if source.kind() != io::ErrorKind::NotFound => {
                return Err(CacheError::io(
                    &path,
                    io::Error::new(source.kind(), source.to_string()),
                ))
            }
            Err(_) => ImageRecord {
                schema_version: RECORD_SCHEMA.into(),
                digest: built.digest.clone(),
                manifest_digest,
                references: Vec::new(),
                blobs,
                first_pulled: now,
                last_used: now,
                bundles: Vec::new(),
            },
        };
        if !record.references.contains(&built.reference) {
            record.references.push(built.reference.clone());
        }
        record.bundles.retain(|b| b.path != built.bundle.path);
        record.bundles.push(built.bundle.clone());
        record.write(&dir)?;
        // The bundle is this image's now, no other's.
        for (other_path, other) in self.read_records().0 {
            if other_path == path || !other.bundles.iter().any(|b| b.path == built.bundle.path) {
                continue;
            }
            let mut other = other;
            other.bundles.retain(|b| b.path != built.bundle.path);
            other.write(&dir)?;
        }
        Ok(())
    }

    /// Notes that the image `digest` was used now (a run of a bundle kept for it), if it has a
    /// record.
    pub fn touch(&self, digest: &str) -> Result<(), CacheError> {
        let _lock = self.lock_shared()?;
        let _records = self.records_lock()?;
        let dir = self.images_dir();
        if let Ok(mut record) = ImageRecord::read(&dir.join(record::file_name(digest))) {
            record.last_used = Timestamp::now();
            record.write(&dir)?;
        }
        Ok(())
    }

    fn records_lock(&self) -> Result<ExclusiveLock, CacheError> {
        let path = self.images_dir().join(RECORDS_LOCK);
        ExclusiveLock::acquire(&path)
            .map_err(|e| CacheError::io(&path, io::Error::other(e.to_string())))
    }

    /// Every record file, read: the records, and the files that are not records.
    fn read_records(&self) -> (Vec<(PathBuf, ImageRecord)>, Vec<Damaged>) {
        let mut records = Vec::new();
        let mut damaged = Vec::new();
        let Ok(entries) = fs::read_dir(self.images_dir()) else {
            return (records, damaged);
        };
        let mut paths: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|x| x == "json")
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        paths.sort();
        for path in paths {
            match ImageRecord::read(&path) {
                Ok(record) => records.push((path, record)),
                Err(e) => damaged.push(Damaged {
                    size: fs::symlink_metadata(&path).map_or(0, |m| m.len()),
                    path,
                    reason: match e {
                        CacheError::Damaged { reason, .. } => reason,
                        other => other.to_string(),
                    },
                }),
            }
        }
        (records, damaged)
    }
}
