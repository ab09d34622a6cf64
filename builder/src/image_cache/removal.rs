//! Removing from the cache: which things `rm` and `prune` remove, and doing it so that a
//! removal killed at any instant leaves a consistent cache.
//!
//! The order: the whole removal is written to the journal (`removal.json`, atomically), then
//! the records go, then blobs, leftovers and bundles, and the journal last. Until the records
//! are gone every blob they name is still there; once they are gone nothing names what is
//! left to remove. Whoever takes the lock next finds the journal and finishes it (removing
//! what is still there), so a removal is never half done for longer than until the next
//! command.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use mvm_ir::fsutil::{atomic_write, read_capped};
use mvm_ir::plan::Timestamp;
use serde::{Deserialize, Serialize};

use super::inventory::{BundleEntry, CacheFile, ImageEntry, Inventory};
use super::{CacheError, CacheLock, ImageCache};

/// The smallest digest prefix `rm` takes.
pub const MIN_PREFIX: usize = 12;

/// What a prune removes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Prune {
    /// Also images no VM needs (else only what nothing names: unreferenced blobs, bundles
    /// whose image is gone, leftovers, damaged records).
    pub all: bool,
    /// Only what was not used (images) or changed (the rest) within this long.
    pub older_than: Option<Duration>,
}

/// What a removal removes (decided under the lock, carried out by [`ImageCache::remove`]).
#[derive(Debug, Clone, Default)]
pub struct Removal {
    /// Images whose records go.
    pub images: Vec<ImageEntry>,
    /// Blobs no remaining image names.
    pub blobs: Vec<CacheFile>,
    /// Bundles mvm keeps (`$MVM_HOME/runs`) whose image goes or is gone.
    pub bundles: Vec<BundleEntry>,
    /// Leftovers of killed fetches, builds and writes.
    pub leftovers: Vec<CacheFile>,
    /// Record files that are not records.
    pub damaged: Vec<CacheFile>,
    /// Images a prune keeps because VMs need them, with the VMs.
    pub kept: Vec<(String, Vec<String>)>,
}

impl Removal {
    /// The bytes it frees.
    pub fn bytes(&self) -> u64 {
        self.blobs.iter().map(|f| f.size).sum::<u64>()
            + self.bundles.iter().map(|b| b.size).sum::<u64>()
            + self.leftovers.iter().map(|f| f.size).sum::<u64>()
            + self.damaged.iter().map(|f| f.size).sum::<u64>()
    }

    /// Whether it removes nothing.
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
            && self.blobs.is_empty()
            && self.bundles.is_empty()
            && self.leftovers.is_empty()
            && self.damaged.is_empty()
    }
}

/// What a removal did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Removed {
    /// Files and directories removed.
    pub entries: usize,
}

/// The journal: paths only, in the order they go.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Journal {
    records: Vec<PathBuf>,
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

impl Inventory {
    /// The one image `arg` names: `REFERENCE@sha256:…`, a digest, a prefix of at least
    /// [`MIN_PREFIX`] hex digits of its digest or manifest digest (with or without
    /// `sha256:`), or a reference as written.
    pub fn resolve(&self, arg: &str) -> Result<&ImageEntry, CacheError> {
        let bad = |reason: &str| CacheError::BadArgument {
            arg: arg.to_string(),
            reason: reason.to_string(),
        };
        let matches: Vec<&ImageEntry> = if let Some((reference, digest)) = arg.rsplit_once('@') {
            self.images
                .iter()
                .filter(|i| {
                    (i.record.digest == digest || i.record.manifest_digest == digest)
                        && i.record.references.iter().any(|r| r == reference)
                })
                .collect()
        } else if let Some(hex) = digest_prefix(arg) {
            if hex.len() < MIN_PREFIX {
                return Err(bad(&format!(
                    "a digest prefix needs at least {MIN_PREFIX} hex digits"
                )));
            }
            if hex.len() > 64 {
                return Err(bad("a sha256 digest has 64 hex digits"));
            }
            let hex = hex.to_ascii_lowercase();
            self.images
                .iter()
                .filter(|i| {
                    [&i.record.digest, &i.record.manifest_digest]
                        .iter()
                        .any(|d| d.trim_start_matches("sha256:").starts_with(&hex))
                })
                .collect()
        } else if arg.starts_with("sha256:") {
            return Err(bad("not sha256:<hex>"));
        } else {
            self.images
                .iter()
                .filter(|i| i.record.references.iter().any(|r| r == arg))
                .collect()
        };
        match matches.as_slice() {
            [] => Err(CacheError::NoSuchImage(arg.to_string())),
            [one] => Ok(one),
            many => Err(CacheError::Ambiguous {
                arg: arg.to_string(),
                matches: many.iter().map(|i| i.record.digest.clone()).collect(),
            }),
        }
    }

    /// Removing the image `arg` names: refused while a VM needs it. Its blobs that another
    /// image names stay; the bundles mvm keeps for it go (others' are the user's).
    pub fn plan_rm(&self, arg: &str) -> Result<Removal, CacheError> {
        let image = self.resolve(arg)?;
        if !image.used_by.is_empty() {
            return Err(CacheError::InUse {
                digest: image.record.digest.clone(),
                vms: image.used_by.clone(),
            });
        }
        Ok(self.removing(vec![image.clone()], |_| false, |_| false))
    }

    /// What `prune` removes, as of `now`.
    pub fn plan_prune(&self, prune: Prune, now: SystemTime) -> Removal {
        let old_enough = |time: SystemTime| match prune.older_than {
            None => true,
            Some(age) => now.duration_since(time).is_ok_and(|d| d >= age),
        };
        let mut kept = Vec::new();
        let mut images = Vec::new();
        if prune.all {
            for image in &self.images {
                if !image.used_by.is_empty() {
                    kept.push((image.record.digest.clone(), image.used_by.clone()));
                } else if old_enough(system_time(&image.record.last_used)) {
                    images.push(image.clone());
                }
            }
        }
        let mut removal = self.removing(
            images,
            |f| old_enough(f.modified),
            |b| old_enough(b.modified),
        );
        removal.kept = kept;
        removal
    }

    /// The removal of `images`, with the blobs no remaining image names, the bundles mvm
    /// keeps for them, and — where `take_file`/`take_bundle` say so — unreferenced blobs,
    /// leftovers, damaged records and dangling bundles.
    fn removing(
        &self,
        images: Vec<ImageEntry>,
        take_file: impl Fn(&CacheFile) -> bool,
        take_bundle: impl Fn(&BundleEntry) -> bool,
    ) -> Removal {
        let going: BTreeSet<&str> = images.iter().map(|i| i.record.digest.as_str()).collect();
        let staying: BTreeSet<&str> = self
            .images
            .iter()
            .filter(|i| !going.contains(i.record.digest.as_str()))
            .flat_map(|i| i.record.blobs.iter().map(|b| b.digest.as_str()))
            .collect();
        let mut blobs = Vec::new();
        let mut freed = BTreeSet::new();
        for image in &images {
            for blob in &image.record.blobs {
                if staying.contains(blob.digest.as_str()) || image.missing.contains(&blob.digest) {
                    continue;
                }
                if freed.insert(blob.digest.clone()) {
                    blobs.push(CacheFile {
                        path: self
                            .blob_dir
                            .join(blob.digest.trim_start_matches("sha256:")),
                        size: blob.size,
                        modified: SystemTime::UNIX_EPOCH,
                    });
                }
            }
        }
        blobs.extend(
            self.unreferenced_blobs
                .iter()
                .filter(|f| take_file(f))
                .cloned(),
        );
        let mut bundles: Vec<BundleEntry> = images
            .iter()
            .flat_map(|i| i.bundles.iter())
            .filter(|b| b.managed && b.used_by.is_empty())
            .cloned()
            .collect();
        bundles.extend(
            self.dangling_bundles
                .iter()
                .filter(|b| b.managed && b.used_by.is_empty() && take_bundle(b))
                .cloned(),
        );
        let damaged = self
            .damaged
            .iter()
            .map(|d| CacheFile {
                path: d.path.clone(),
                size: d.size,
                modified: fs::symlink_metadata(&d.path)
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH),
            })
            .filter(&take_file)
            .collect();
        Removal {
            blobs,
            bundles,
            leftovers: self
                .leftovers
                .iter()
                .filter(|f| take_file(f))
                .cloned()
                .collect(),
            damaged,
            images,
            kept: Vec::new(),
        }
    }
}

/// The hex digits of `arg` if it is a digest or a prefix of one (`sha256:` optional).
fn digest_prefix(arg: &str) -> Option<&str> {
    let hex = arg.strip_prefix("sha256:").unwrap_or(arg);
    (!hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

fn system_time(t: &Timestamp) -> SystemTime {
    let seconds = t.0.unix_timestamp();
    if seconds >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds as u64)
    } else {
        SystemTime::UNIX_EPOCH
    }
}

impl ImageCache {
    /// Carries out `removal` under the exclusive `lock`: journal, records, blobs and
    /// leftovers, bundles, journal. `pause_after` (a testing hook) stops for a minute after
    /// that many entries were removed, for a test to kill the process there.
    pub fn remove(
        &self,
        lock: &CacheLock,
        removal: &Removal,
        pause_after: Option<usize>,
    ) -> Result<Removed, CacheError> {
        debug_assert!(lock.exclusive);
        if removal.is_empty() {
            return Ok(Removed::default());
        }
        let journal = Journal {
            records: removal
                .images
                .iter()
                .map(|i| i.file.clone())
                .chain(removal.damaged.iter().map(|f| f.path.clone()))
                .collect(),
            files: removal
                .blobs
                .iter()
                .map(|f| f.path.clone())
                .chain(removal.leftovers.iter().map(|f| f.path.clone()))
                .collect(),
            dirs: removal.bundles.iter().map(|b| b.path.clone()).collect(),
        };
        let path = self.journal();
        let bytes = serde_json::to_vec_pretty(&journal)
            .map_err(|e| CacheError::io(&path, io::Error::other(e.to_string())))?;
        atomic_write(&path, &bytes, 0o600).map_err(|e| ir_io(&path, e))?;
        self.carry_out(&journal, pause_after)
    }

    /// Finishes a removal that was killed, if there is one (under the exclusive lock).
    pub(super) fn finish_removal(&self, lock: &CacheLock) -> Result<(), CacheError> {
        debug_assert!(lock.exclusive);
        let path = self.journal();
        let bytes = match read_capped(&path, 64 * 1024 * 1024, "cache journal") {
            Ok(bytes) => bytes,
            Err(mvm_ir::Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Ok(())
            }
            Err(e) => return Err(ir_io(&path, e)),
        };
        match serde_json::from_slice::<Journal>(&bytes) {
            Ok(journal) => self.carry_out(&journal, None).map(drop),
            // Written whole or not at all: one that does not parse was not written by mvm, and
            // nothing was removed by it. Let it go.
            Err(_) => fs::remove_file(&path).map_err(|e| CacheError::io(&path, e)),
        }
    }

    fn carry_out(
        &self,
        journal: &Journal,
        pause_after: Option<usize>,
    ) -> Result<Removed, CacheError> {
        let mut removed = Removed::default();
        let steps = journal
            .records
            .iter()
            .chain(&journal.files)
            .map(|p| (p, false))
            .chain(journal.dirs.iter().map(|p| (p, true)));
        for (path, is_dir) in steps {
            if !self.is_ours(path) {
                continue;
            }
            let result = if is_dir {
                fs::remove_dir_all(path)
            } else {
                match fs::symlink_metadata(path) {
                    Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
                    _ => fs::remove_file(path),
                }
            };
            match result {
                Ok(()) => removed.entries += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(CacheError::io(path, e)),
            }
            if pause_after == Some(removed.entries) {
                eprintln!(
                    "mvm: paused after {} removals (MVM_TEST_PAUSE_AFTER_REMOVALS)",
                    removed.entries
                );
                std::thread::sleep(Duration::from_secs(60));
            }
        }
        let path = self.journal();
        fs::remove_file(&path).or_else(|e| match e.kind() {
            io::ErrorKind::NotFound => Ok(()),
            _ => Err(CacheError::io(&path, e)),
        })?;
        Ok(removed)
    }

    /// Whether `path` is inside the cache or the kept bundles, without `..`: a journal only
    /// ever removes there.
    fn is_ours(&self, path: &Path) -> bool {
        path.is_absolute()
            && !path.components().any(|c| matches!(c, Component::ParentDir))
            && (path.starts_with(&self.root) || path.starts_with(&self.runs))
            && path != self.root
            && path != self.runs
    }
}

fn ir_io(path: &Path, e: mvm_ir::Error) -> CacheError {
    match e {
        mvm_ir::Error::Io { source, .. } => CacheError::io(path, source),
        other => CacheError::io(path, io::Error::other(other.to_string())),
    }
}
