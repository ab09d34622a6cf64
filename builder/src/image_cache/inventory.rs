//! What the cache holds, read under its lock: the images with their blobs, bundles and the
//! VMs that need them; blobs no record names; bundles whose image is gone; leftovers of
//! killed builds and fetches; damaged records.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use mvm_ir::digest::sha256_prefixed;
use mvm_ir::dsse::Envelope;
use mvm_ir::plan::MAX_ENVELOPE_BYTES;

use super::{CacheError, CacheLock, ImageCache, ImageRecord};

/// The plan file of a bundle.
const PLAN_FILE: &str = "plan.dsse.json";
/// The prefix of a build's staging directory beside its bundle.
const STAGING_PREFIX: &str = ".mvm-build-";
/// The prefix of a build's directory of its image's blobs (`worker::ImageBlobs`).
const IMAGE_BLOBS_PREFIX: &str = ".image-";

/// A named VM and the plan it was admitted with (any state: running, stopped, failed, cold).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmUse {
    /// Its name.
    pub name: String,
    /// The digest of its plan's payload.
    pub plan_digest: String,
}

/// A file or directory of the cache that is not an image's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheFile {
    /// Where it is.
    pub path: PathBuf,
    /// Its size in bytes (a directory's: its files' together).
    pub size: u64,
    /// When it last changed.
    pub modified: SystemTime,
}

/// A record file that is not a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damaged {
    /// The file.
    pub path: PathBuf,
    /// Its size.
    pub size: u64,
    /// What is wrong with it.
    pub reason: String,
}

/// A bundle directory that is there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleEntry {
    /// The directory.
    pub path: PathBuf,
    /// The digest of its plan's payload, if it has a readable plan.
    pub plan_digest: Option<String>,
    /// Its files' size together.
    pub size: u64,
    /// Whether mvm keeps it (`$MVM_HOME/runs`); mvm never removes other bundles.
    pub managed: bool,
    /// When it was last built.
    pub modified: SystemTime,
    /// The VMs admitted with its plan.
    pub used_by: Vec<String>,
}

/// One image of the cache.
#[derive(Debug, Clone)]
pub struct ImageEntry {
    /// Its record.
    pub record: ImageRecord,
    /// The record's file.
    pub file: PathBuf,
    /// Its blobs' size together.
    pub size: u64,
    /// The size of its blobs no other image names (what removing it frees in the blob cache).
    pub unique_size: u64,
    /// Blobs it names that are not in the cache (a build fetches them again).
    pub missing: Vec<String>,
    /// The bundles built from it that are still there and still its own.
    pub bundles: Vec<BundleEntry>,
    /// The VMs that need it (admitted with the plan of one of its bundles).
    pub used_by: Vec<String>,
}

/// What the cache holds.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    /// The images, by digest.
    pub images: Vec<ImageEntry>,
    /// Record files that are not records.
    pub damaged: Vec<Damaged>,
    /// Blobs in the cache that no record names.
    pub unreferenced_blobs: Vec<CacheFile>,
    /// Bundles mvm keeps whose image has no record (or none naming them).
    pub dangling_bundles: Vec<BundleEntry>,
    /// Temporary files and directories killed fetches, builds and writes left.
    pub leftovers: Vec<CacheFile>,
    /// The blob cache's directory of blobs.
    pub(super) blob_dir: PathBuf,
}

impl ImageCache {
    /// What the cache holds now, with the VMs `vms` that need any of it. Read under `lock`
    /// (shared is enough; any removal was finished when it was taken).
    pub fn inventory(&self, _lock: &CacheLock, vms: &[VmUse]) -> Result<Inventory, CacheError> {
        let (records, damaged) = self.read_records();
        let users = |plan: &str| -> Vec<String> {
            vms.iter()
                .filter(|vm| vm.plan_digest == plan)
                .map(|vm| vm.name.clone())
                .collect()
        };
        let blob_dir = self.blobs.blob_dir().to_path_buf();
        let blob_size = |digest: &str| -> Option<u64> {
            fs::metadata(blob_dir.join(digest.trim_start_matches("sha256:")))
                .ok()
                .filter(|m| m.is_file())
                .map(|m| m.len())
        };
        // How many records name each blob.
        let mut naming: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, record) in &records {
            let unique: BTreeSet<&str> = record.blobs.iter().map(|b| b.digest.as_str()).collect();
            for digest in unique {
                *naming.entry(digest).or_default() += 1;
            }
        }
        let mut recorded_bundles = HashSet::new();
        let mut images = Vec::new();
        for (file, record) in &records {
            let mut size = 0;
            let mut unique_size = 0;
            let mut missing = Vec::new();
            let mut seen = HashSet::new();
            for blob in &record.blobs {
                if !seen.insert(&blob.digest) {
                    continue;
                }
                match blob_size(&blob.digest) {
                    Some(found) => {
                        size += found;
                        if naming.get(blob.digest.as_str()) == Some(&1) {
                            unique_size += found;
                        }
                    }
                    None => missing.push(blob.digest.clone()),
                }
            }
            let mut used_by = BTreeSet::new();
            let mut bundles = Vec::new();
            for bundle in &record.bundles {
                used_by.extend(users(&bundle.plan_digest));
                let Some(entry) = self.bundle(&bundle.path, &users) else {
                    continue;
                };
                // Rebuilt since from something else (a build this cache did not record).
                if entry.plan_digest.as_deref() != Some(&bundle.plan_digest) {
                    continue;
                }
                recorded_bundles.insert(entry.path.clone());
                used_by.extend(entry.used_by.iter().cloned());
                bundles.push(entry);
            }
            images.push(ImageEntry {
                record: record.clone(),
                file: file.clone(),
                size,
                unique_size,
                missing,
                bundles,
                used_by: used_by.into_iter().collect(),
            });
        }
        images.sort_by(|a, b| a.record.digest.cmp(&b.record.digest));

        let mut unreferenced_blobs = Vec::new();
        let mut leftovers = Vec::new();
        for entry in read_dir(&blob_dir)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(file) = cache_file(&entry.path()) else {
                continue;
            };
            let is_blob = name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit());
            if !is_blob {
                leftovers.push(file);
            } else if !naming.contains_key(format!("sha256:{name}").as_str()) {
                unreferenced_blobs.push(file);
            }
        }
        // Directories of builds that are gone (a live build holds its directory locked).
        let blobs_root = blob_dir.parent().unwrap_or(&blob_dir).to_path_buf();
        for entry in read_dir(&blobs_root)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let abandoned = name.starts_with(IMAGE_BLOBS_PREFIX)
                && entry.file_type().is_ok_and(|t| t.is_dir())
                && fs::File::open(entry.path()).is_ok_and(|dir| dir.try_lock().is_ok());
            if abandoned {
                leftovers.extend(cache_file(&entry.path()));
            }
        }
        // Records half-written by a killed writer.
        for entry in read_dir(&self.images_dir())? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(".tmp") {
                leftovers.extend(cache_file(&entry.path()));
            }
        }
        let mut dangling_bundles = Vec::new();
        for entry in read_dir(&self.runs)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(STAGING_PREFIX) {
                leftovers.extend(cache_file(&entry.path()));
                continue;
            }
            if name.starts_with('.') || !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if recorded_bundles.contains(&entry.path()) {
                continue;
            }
            dangling_bundles.extend(self.bundle(&entry.path(), &users));
        }
        unreferenced_blobs.sort_by(|a, b| a.path.cmp(&b.path));
        leftovers.sort_by(|a, b| a.path.cmp(&b.path));
        dangling_bundles.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(Inventory {
            images,
            damaged,
            unreferenced_blobs,
            dangling_bundles,
            leftovers,
            blob_dir,
        })
    }

    /// The bundle at `path`, if there is a directory there.
    fn bundle(&self, path: &Path, users: &dyn Fn(&str) -> Vec<String>) -> Option<BundleEntry> {
        let meta = fs::metadata(path).ok().filter(|m| m.is_dir())?;
        let plan_digest = plan_digest(&path.join(PLAN_FILE));
        Some(BundleEntry {
            path: path.to_path_buf(),
            size: disk_usage(path, &mut HashSet::new()).1,
            managed: path.parent() == Some(self.runs.as_path()),
            modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            used_by: plan_digest.as_deref().map(users).unwrap_or_default(),
            plan_digest,
        })
    }
}

/// The digest of the plan payload in the envelope at `path` (not verified: only compared with
/// the digests VMs were admitted with).
fn plan_digest(path: &Path) -> Option<String> {
    let bytes = mvm_ir::fsutil::read_capped(path, MAX_ENVELOPE_BYTES, "plan envelope").ok()?;
    let payload = Envelope::parse(&bytes).ok()?.decode_payload().ok()?;
    Some(sha256_prefixed(&payload))
}

fn read_dir(dir: &Path) -> Result<Vec<fs::DirEntry>, CacheError> {
    match fs::read_dir(dir) {
        Ok(entries) => Ok(entries.flatten().collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(CacheError::io(dir, e)),
    }
}

fn cache_file(path: &Path) -> Option<CacheFile> {
    let meta = fs::symlink_metadata(path).ok()?;
    Some(CacheFile {
        path: path.to_path_buf(),
        size: if meta.is_dir() {
            disk_usage(path, &mut HashSet::new()).1
        } else {
            meta.len()
        },
        modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
    })
}

/// The files under `path` (itself, if a file), not following symlinks: how many, and their
/// size together — a sparse file's (a cold VM's memory) as much as it holds on disk. A file
/// seen before (through `seen`: a hard link) counts once.
pub fn disk_usage(path: &Path, seen: &mut HashSet<(u64, u64)>) -> (u64, u64) {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return (0, 0);
    };
    if meta.is_dir() {
        let mut total = (0, 0);
        for entry in fs::read_dir(path).into_iter().flatten().flatten() {
            let (count, size) = disk_usage(&entry.path(), seen);
            total = (total.0 + count, total.1 + size);
        }
        return total;
    }
    if !seen.insert((meta.dev(), meta.ino())) {
        return (0, 0);
    }
    (1, meta.len().min(meta.blocks() * 512))
}
