//! The content-addressed blob cache: `<dir>/sha256/<hex>`, one file per verified blob.
//!
//! A blob enters the cache only after its bytes hashed to its digest (written to a temporary
//! file, checked, then renamed), and is hashed again each time it is used, so a cache file
//! changed on disk is caught before it is read. A second import of the same image fetches
//! nothing.

use std::fs::{self, DirBuilder, File};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use mvm_ir::digest::is_prefixed_sha256;
use mvm_ir::home::MvmHome;

use super::manifest::Descriptor;
use super::verify::LimitedWriter;
use super::{BlobSource, OciError};

/// A directory of verified blobs.
#[derive(Debug, Clone)]
pub struct BlobCache {
    dir: PathBuf,
}

impl BlobCache {
    /// The cache of `home` (`$MVM_HOME/cache/blobs`).
    pub fn in_home(home: &MvmHome) -> Result<Self, OciError> {
        let dir = home
            .ensure("cache")
            .map_err(|e| OciError::io("$MVM_HOME/cache", io::Error::other(e.to_string())))?;
        Self::at(&dir.join("blobs"))
    }

    /// A cache in `dir`, created (mode 0700) if absent.
    pub fn at(dir: &Path) -> Result<Self, OciError> {
        let dir = dir.join("sha256");
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| OciError::io(dir.display(), e))?;
        Ok(Self { dir })
    }

    /// The directory of the blobs themselves (`<dir>/sha256`): one file per blob, named by
    /// its hex digest, and the temporary files of blobs being fetched.
    pub fn blob_dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, digest: &str) -> Result<PathBuf, OciError> {
        if !is_prefixed_sha256(digest) {
            return Err(OciError::BadDocument {
                what: "descriptor",
                reason: format!("digest {digest:?} is not sha256:<64 hex>"),
            });
        }
        Ok(self.dir.join(&digest["sha256:".len()..]))
    }

    /// A cache in `dir` holding exactly the blobs `digests` of this one: each hard-linked (the
    /// same file, no copy), or copied where a link cannot be made. For handing one image's
    /// blobs, and no other's, to a reader confined to `dir`.
    pub fn select(&self, digests: &[String], dir: &Path) -> Result<BlobCache, OciError> {
        let selected = BlobCache::at(dir)?;
        for digest in digests {
            let (from, to) = (self.path(digest)?, selected.path(digest)?);
            if to.exists() {
                continue;
            }
            if fs::hard_link(&from, &to).is_err() {
                fs::copy(&from, &to).map_err(|e| match e.kind() {
                    io::ErrorKind::NotFound => OciError::BlobNotFound(digest.clone()),
                    _ => OciError::io(from.display(), e),
                })?;
            }
        }
        Ok(selected)
    }

    /// Whether `digest` is cached (not yet re-verified).
    pub fn contains(&self, digest: &str) -> bool {
        self.path(digest).is_ok_and(|p| p.is_file())
    }

    /// Makes sure blob `digest` is cached, fetching at most `limit` bytes with `fetch` if not.
    fn ensure(
        &self,
        what: &'static str,
        digest: &str,
        limit: u64,
        fetch: impl FnOnce(&mut dyn Write) -> Result<(), OciError>,
    ) -> Result<PathBuf, OciError> {
        let path = self.path(digest)?;
        if path.is_file() {
            return Ok(path);
        }
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)
            .map_err(|e| OciError::io(self.dir.display(), e))?;
        let mut limited = LimitedWriter::new(io::BufWriter::new(tmp.as_file_mut()), limit);
        fetch(&mut limited).map_err(|e| match e {
            OciError::Io { source, .. } if source.kind() == io::ErrorKind::FileTooLarge => {
                OciError::DigestMismatch {
                    what,
                    digest: digest.to_string(),
                    reason: format!("the source sent more than {limit} bytes"),
                }
            }
            other => other,
        })?;
        let flushed = limited.into_inner().flush();
        flushed.map_err(|e| OciError::io(tmp.path().display(), e))?;
        let file = tmp.as_file_mut();
        file.rewind().map_err(|e| OciError::io(path.display(), e))?;
        let (found, _) = hash(file).map_err(|e| OciError::io(path.display(), e))?;
        if found != digest {
            return Err(OciError::DigestMismatch {
                what,
                digest: digest.to_string(),
                reason: format!("the source sent bytes that hash to {found}"),
            });
        }
        file.sync_all()
            .map_err(|e| OciError::io(path.display(), e))?;
        tmp.persist(&path)
            .map_err(|e| OciError::io(path.display(), e.error))?;
        Ok(path)
    }

    /// The bytes of manifest or index `digest` (at most `limit`), fetched if not cached.
    pub(crate) fn fetch_manifest(
        &self,
        digest: &str,
        limit: u64,
        source: &mut dyn BlobSource,
    ) -> Result<Vec<u8>, OciError> {
        self.ensure("manifest", digest, limit, |out| {
            source.fetch_manifest(digest, out)
        })?;
        self.read_verified(digest, limit)
    }

    /// Makes sure the blob `descriptor` names is cached, and returns its bytes if it is at most
    /// `keep` bytes long (configs), or nothing (layers, read later as streams: `keep` 0).
    pub(crate) fn fetch_blob(
        &self,
        descriptor: &Descriptor,
        keep: u64,
        source: &mut dyn BlobSource,
    ) -> Result<Vec<u8>, OciError> {
        let size = descriptor.size;
        if keep > 0 && size > keep {
            return Err(too_large(descriptor, keep));
        }
        self.ensure("blob", &descriptor.digest, size, |out| {
            source.fetch_blob(&descriptor.digest, size, out)
        })?;
        if keep > 0 {
            return self.read_blob(descriptor, keep);
        }
        Ok(Vec::new())
    }

    /// Makes sure the blob `descriptor` names is cached and matches its digest and size now: a
    /// blob fetched earlier is hashed again (and removed if it changed), one not cached is
    /// fetched and checked on the way in.
    pub(crate) fn fetch_verified(
        &self,
        descriptor: &Descriptor,
        source: &mut dyn BlobSource,
    ) -> Result<(), OciError> {
        if self.contains(&descriptor.digest) {
            self.open_verified(&descriptor.digest, descriptor.size)
                .map(drop)
        } else {
            self.fetch_blob(descriptor, 0, source).map(drop)
        }
    }

    /// The bytes of the cached blob `descriptor` names (a config: at most `keep` bytes),
    /// verified.
    pub(crate) fn read_blob(
        &self,
        descriptor: &Descriptor,
        keep: u64,
    ) -> Result<Vec<u8>, OciError> {
        let size = descriptor.size;
        if size > keep {
            return Err(too_large(descriptor, keep));
        }
        let bytes = self.read_verified(&descriptor.digest, keep)?;
        if bytes.len() as u64 != size {
            return Err(size_mismatch(&descriptor.digest, size, bytes.len() as u64));
        }
        Ok(bytes)
    }

    /// The bytes of cached blob `digest` (at most `limit`), verified.
    pub(crate) fn read_verified(&self, digest: &str, limit: u64) -> Result<Vec<u8>, OciError> {
        let path = self.path(digest)?;
        let mut bytes = Vec::new();
        open(&path, digest)?
            .take(limit.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| OciError::io(path.display(), e))?;
        if bytes.len() as u64 > limit {
            return Err(OciError::BadDocument {
                what: "document",
                reason: format!("{digest} is over {limit} bytes"),
            });
        }
        let found = mvm_ir::digest::sha256_prefixed(&bytes);
        if found != digest {
            return Err(cache_corrupt(&path, digest, &found));
        }
        Ok(bytes)
    }

    /// Opens cached blob `digest`, after hashing it whole and checking its size: verified
    /// before use.
    pub(crate) fn open_verified(&self, digest: &str, size: u64) -> Result<File, OciError> {
        let path = self.path(digest)?;
        let mut file = open(&path, digest)?;
        let (found, len) = hash(&mut file).map_err(|e| OciError::io(path.display(), e))?;
        if found != digest {
            return Err(cache_corrupt(&path, digest, &found));
        }
        if len != size {
            return Err(size_mismatch(digest, size, len));
        }
        file.rewind().map_err(|e| OciError::io(path.display(), e))?;
        Ok(file)
    }
}

/// Opens a cached blob; one that is not there is [`OciError::BlobNotFound`].
fn open(path: &Path, digest: &str) -> Result<File, OciError> {
    File::open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => OciError::BlobNotFound(digest.to_string()),
        _ => OciError::io(path.display(), e),
    })
}

fn too_large(descriptor: &Descriptor, limit: u64) -> OciError {
    OciError::BadDocument {
        what: "image config",
        reason: format!(
            "{} is {} bytes, over the {limit}-byte limit",
            descriptor.digest, descriptor.size
        ),
    }
}

fn hash(reader: &mut impl Read) -> io::Result<(String, u64)> {
    mvm_ir::digest::sha256_reader(reader)
}

/// A cached blob that no longer hashes to its name: it is removed, so the next build fetches
/// it again, and this build fails.
fn cache_corrupt(path: &Path, digest: &str, found: &str) -> OciError {
    let _ = fs::remove_file(path);
    OciError::DigestMismatch {
        what: "cached blob",
        digest: digest.to_string(),
        reason: format!("the cache file had changed (it hashed to {found}); it was removed and will be fetched again"),
    }
}

fn size_mismatch(digest: &str, expected: u64, found: u64) -> OciError {
    OciError::DigestMismatch {
        what: "blob",
        digest: digest.to_string(),
        reason: format!("{found} bytes where the descriptor says {expected}"),
    }
}
