//! `oci:DIR` and `oci-archive:FILE`: images from an OCI image layout on disk.
//!
//! A layout's blobs live at `blobs/sha256/<hex>`; since the image is named by digest, the index
//! is not consulted. An archive is unpacked first into a private temporary directory, taking
//! only the layout's own files (`oci-layout`, `index.json`, `blobs/sha256/<hex>`) and refusing
//! anything else in it.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use mvm_ir::digest::is_sha256_hex;

use super::{BlobSource, OciError};

/// A layout directory (or an unpacked archive of one).
pub(crate) struct LayoutSource {
    dir: PathBuf,
    /// Keeps an unpacked archive alive.
    _unpacked: Option<tempfile::TempDir>,
}

impl LayoutSource {
    /// The layout in `dir`.
    pub(crate) fn open(dir: &Path) -> Result<Self, OciError> {
        let marker = dir.join("oci-layout");
        let mut bytes = Vec::new();
        File::open(&marker)
            .and_then(|f| f.take(4096).read_to_end(&mut bytes))
            .map_err(|e| OciError::io(marker.display(), e))?;
        #[derive(serde::Deserialize)]
        struct Marker {
            #[serde(rename = "imageLayoutVersion")]
            version: String,
        }
        let marker: Marker = serde_json::from_slice(&bytes).map_err(|e| OciError::BadDocument {
            what: "oci-layout",
            reason: e.to_string(),
        })?;
        if marker.version != "1.0.0" {
            return Err(OciError::BadDocument {
                what: "oci-layout",
                reason: format!("imageLayoutVersion {:?} is not 1.0.0", marker.version),
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            _unpacked: None,
        })
    }

    /// Unpacks the archive `file` into a private directory and opens it.
    pub(crate) fn unpack_archive(file: &Path) -> Result<Self, OciError> {
        let tmp = tempfile::tempdir().map_err(|e| OciError::io("temporary directory", e))?;
        let archive = File::open(file).map_err(|e| OciError::io(file.display(), e))?;
        let bad = |reason: String| OciError::BadDocument {
            what: "oci-archive",
            reason,
        };
        let blobs = tmp.path().join("blobs/sha256");
        fs::create_dir_all(&blobs).map_err(|e| OciError::io(blobs.display(), e))?;
        let mut tar = tar::Archive::new(archive);
        // Raw entries: a layout's member names are short, so GNU/PAX long-name records (which
        // the tar crate would read without a cap) are refused as unexpected members.
        for entry in tar.entries().map_err(|e| bad(e.to_string()))?.raw(true) {
            let mut entry = entry.map_err(|e| bad(e.to_string()))?;
            let path = entry.path().map_err(|e| bad(e.to_string()))?.into_owned();
            let name = path.to_string_lossy();
            let name = name.trim_start_matches("./");
            let kind = entry.header().entry_type();
            if kind.is_dir() && matches!(name.trim_end_matches('/'), "" | "blobs" | "blobs/sha256")
            {
                continue;
            }
            let dest = match name {
                "oci-layout" | "index.json" => tmp.path().join(name),
                _ => match name.strip_prefix("blobs/sha256/") {
                    Some(hex) if is_sha256_hex(hex) => blobs.join(hex),
                    _ => return Err(bad(format!("unexpected member {name:?}"))),
                },
            };
            if !kind.is_file() {
                return Err(bad(format!("{name:?} is not a regular file")));
            }
            let mut out = File::create(&dest).map_err(|e| OciError::io(dest.display(), e))?;
            io::copy(&mut entry, &mut out).map_err(|e| bad(format!("{name}: {e}")))?;
        }
        let mut source = Self::open(tmp.path())?;
        source._unpacked = Some(tmp);
        Ok(source)
    }
}

impl BlobSource for LayoutSource {
    fn fetch_manifest(&mut self, digest: &str, out: &mut dyn io::Write) -> Result<(), OciError> {
        self.fetch_blob(digest, u64::MAX, out)
    }

    fn fetch_blob(
        &mut self,
        digest: &str,
        _size: u64,
        out: &mut dyn io::Write,
    ) -> Result<(), OciError> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| is_sha256_hex(h))
            .ok_or_else(|| OciError::BlobNotFound(digest.to_string()))?;
        let path = self.dir.join("blobs/sha256").join(hex);
        let mut file = match File::open(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(OciError::BlobNotFound(digest.to_string()))
            }
            other => other.map_err(|e| OciError::io(path.display(), e))?,
        };
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| OciError::io(path.display(), e))?;
            if n == 0 {
                return Ok(());
            }
            out.write_all(&buf[..n])
                .map_err(|e| OciError::io("blob cache", e))?;
        }
    }
}
