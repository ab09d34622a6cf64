//! The builder VM's image (`mvm builder fetch`): Nix, busybox and CA certificates from this
//! host's Debian archive, with everything they depend on, plus the static build worker, as an
//! OCI image layout that `mvm build` then turns into a verity-protected image and a signed plan
//! like any other.
//!
//! Every package comes from `apt-get download` (checked by apt against the archive's signed
//! Release files) and is pinned by the sha256 of its `.deb` in [`BuilderManifest`]. Each
//! package's files (`dpkg-deb --fsys-tarfile`, no maintainer script run) are one layer, in
//! package-name order; a last layer holds what the packages' scripts would have made and what
//! mvm adds: `/bin/sh` (busybox), the CA bundle `update-ca-certificates` would write, a Nix
//! configuration for a single-user store, the store's directories, and the worker at
//! [`WORKER`]. Timestamps, owners and the config are fixed, so the same packages and worker
//! give the same image digest.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use mvm_ir::digest::sha256_prefixed;
use mvm_ir::{Coded, ErrorClass};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::bundle::WORKLOAD_UID;
use crate::debian::{self, DebPin, DebianError};

/// The packages asked for; apt adds what they depend on.
pub const PACKAGES: &[&str] = &["nix-bin", "busybox-static", "ca-certificates"];

/// Where the build worker is in the image.
pub const WORKER: &str = "/usr/libexec/mvm/mvm-build-worker";

/// The image's `PATH`.
const PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin";

/// The Nix configuration: one user's store (the workload user owns `/nix`), no build users, no
/// substituters (the builder has no network; the host hands it what it needs).
const NIX_CONF: &str = "build-users-group =\nsandbox = false\nsubstituters =\n\
                        experimental-features = nix-command\n";

/// The manifest's name in the image directory.
pub const MANIFEST_FILE: &str = "builder.json";

/// Why the builder image could not be made or opened. Its [`Coded::code`] is stable.
#[derive(Debug, thiserror::Error)]
pub enum BuilderImageError {
    /// apt or dpkg-deb failed, or a package is not what was asked for.
    #[error(transparent)]
    Debian(#[from] DebianError),
    /// The build worker is missing or not a static executable.
    #[error("the build worker {path}: {reason}")]
    Worker {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The stored image is not what its manifest pins.
    #[error("the builder image {path}: {reason}; run `mvm builder fetch` again")]
    Mismatch {
        /// The file.
        path: String,
        /// What differs.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The failure.
        #[source]
        source: io::Error,
    },
}

impl Coded for BuilderImageError {
    fn code(&self) -> &str {
        match self {
            BuilderImageError::Debian(DebianError::Tool { .. }) => "BUILDER001",
            BuilderImageError::Debian(DebianError::BadPackage(_)) => "BUILDER002",
            BuilderImageError::Worker { .. } => "BUILDER003",
            BuilderImageError::Mismatch { .. } => "BUILDER004",
            BuilderImageError::Io { .. } | BuilderImageError::Debian(DebianError::Io { .. }) => {
                "BUILDER005"
            }
        }
    }

    fn class(&self) -> ErrorClass {
        match self {
            BuilderImageError::Mismatch { .. } => ErrorClass::Integrity,
            BuilderImageError::Debian(DebianError::BadPackage(_))
            | BuilderImageError::Worker { .. } => ErrorClass::InvalidInput,
            _ => ErrorClass::Io,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BuilderImageError + '_ {
    move |source| BuilderImageError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What the image was made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuilderManifest {
    /// `"1"`.
    pub schema_version: String,
    /// `sha256:` of the image's OCI manifest: the image's digest.
    pub image_digest: String,
    /// Every package, by name.
    pub packages: Vec<DebPin>,
    /// `sha256:` of the build worker.
    pub worker_sha256: String,
}

/// A builder image in its directory: an OCI image layout and [`MANIFEST_FILE`].
#[derive(Debug, Clone)]
pub struct BuilderImage {
    /// The layout's directory.
    pub dir: PathBuf,
    /// What it was made of.
    pub manifest: BuilderManifest,
}

impl BuilderImage {
    /// The image as `mvm build --image` takes it: `oci:DIR@sha256:…`.
    pub fn reference(&self) -> String {
        format!("oci:{}@{}", self.dir.display(), self.manifest.image_digest)
    }

    /// Makes the image in `dir` (replacing one there) from this host's apt and `worker`.
    pub fn fetch(dir: &Path, worker: &Path) -> Result<Self, BuilderImageError> {
        let worker_bytes = fs::read(worker).map_err(|e| BuilderImageError::Worker {
            path: worker.display().to_string(),
            reason: e.to_string(),
        })?;
        check_static(worker, &worker_bytes)?;
        let packages = debian::depends_closure(PACKAGES)?;
        let work = tempfile::tempdir().map_err(io_err(Path::new("temporary directory")))?;
        let debs = debian::download(&packages, work.path())?;

        let parent = dir.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(parent).map_err(io_err(parent))?;
        let staging = tempfile::Builder::new()
            .prefix(".mvm-builder-")
            .tempdir_in(parent)
            .map_err(io_err(parent))?;
        let layout = Layout::create(staging.path())?;
        let mut pins = Vec::new();
        let mut layers = Vec::new();
        let mut ca_bundle = Vec::new();
        for (package, deb) in &debs {
            pins.push(debian::pin(package, deb)?);
            let files = debian::files_tar(deb)?;
            if package == "ca-certificates" {
                ca_bundle = certificates_of(&files).map_err(io_err(deb))?;
            }
            layers.push(layout.blob(&files)?);
        }
        let own = own_layer(&worker_bytes, &ca_bundle).map_err(io_err(worker))?;
        layers.push(layout.blob(&own)?);
        let image_digest = layout.image(&layers)?;
        let manifest = BuilderManifest {
            schema_version: "1".into(),
            image_digest,
            packages: pins,
            worker_sha256: sha256_prefixed(&worker_bytes),
        };
        let text = serde_json::to_vec_pretty(&manifest).map_err(|e| io_err(dir)(e.into()))?;
        // The whole directory is swapped in at once: a plain write is enough inside it.
        let manifest_path = staging.path().join(MANIFEST_FILE);
        fs::write(&manifest_path, text).map_err(io_err(&manifest_path))?;
        replace_dir(staging, dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    /// The image in `dir`, its layout checked against its manifest: the image's manifest blob
    /// hashes to the pinned digest (and every blob it names is checked by `mvm build` as it
    /// reads it).
    pub fn open(dir: &Path) -> Result<Self, BuilderImageError> {
        let path = dir.join(MANIFEST_FILE);
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        let manifest: BuilderManifest =
            serde_json::from_slice(&bytes).map_err(|e| BuilderImageError::Mismatch {
                path: path.display().to_string(),
                reason: format!("not a builder manifest: {e}"),
            })?;
        let blob = manifest
            .image_digest
            .strip_prefix("sha256:")
            .map(|hex| dir.join("blobs/sha256").join(hex))
            .ok_or_else(|| BuilderImageError::Mismatch {
                path: path.display().to_string(),
                reason: "the image digest is not sha256:".into(),
            })?;
        let found = sha256_prefixed(&fs::read(&blob).map_err(io_err(&blob))?);
        if found != manifest.image_digest {
            return Err(BuilderImageError::Mismatch {
                path: blob.display().to_string(),
                reason: format!("holds {found}, pinned {}", manifest.image_digest),
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
        })
    }
}

/// Refuses a worker that is not a static ELF executable: the image has a dynamic loader, but
/// not necessarily the C library this host built it against.
fn check_static(path: &Path, bytes: &[u8]) -> Result<(), BuilderImageError> {
    use object::Object;
    let refuse = |reason: &str| BuilderImageError::Worker {
        path: path.display().to_string(),
        reason: reason.into(),
    };
    let file = object::File::parse(bytes).map_err(|_| refuse("not an ELF executable"))?;
    if file.architecture() != object::Architecture::X86_64 {
        return Err(refuse("not an x86-64 executable"));
    }
    if file.section_by_name(".interp").is_some() {
        return Err(refuse(
            "asks for a dynamic loader: build it with RUSTFLAGS=\"-C target-feature=+crt-static\" \
             --target x86_64-unknown-linux-gnu",
        ));
    }
    Ok(())
}

/// The certificates of the ca-certificates package, concatenated in name order, as
/// `update-ca-certificates` writes `/etc/ssl/certs/ca-certificates.crt` with every one
/// enabled.
fn certificates_of(files: &[u8]) -> io::Result<Vec<u8>> {
    let mut certificates = Vec::new();
    let mut archive = tar::Archive::new(files);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.display().to_string();
        let is_certificate = path.starts_with("./usr/share/ca-certificates/")
            && path.ends_with(".crt")
            && entry.header().entry_type().is_file();
        if is_certificate {
            let mut pem = Vec::new();
            entry.read_to_end(&mut pem)?;
            certificates.push((path, pem));
        }
    }
    certificates.sort();
    let mut bundle = Vec::new();
    for (_, mut pem) in certificates {
        if !pem.ends_with(b"\n") {
            pem.push(b'\n');
        }
        bundle.extend(pem);
    }
    Ok(bundle)
}

/// mvm's own layer: `/bin/sh`, the CA bundle, the Nix configuration and store, the worker.
fn own_layer(worker: &[u8], ca_bundle: &[u8]) -> io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, uid: u32, size: u64| {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(uid.into());
        header.set_gid(uid.into());
        header.set_mtime(0);
        header.set_size(size);
        header
    };
    let workload = WORKLOAD_UID;
    for (dir, mode, uid) in [
        ("bin", 0o755, 0),
        ("etc", 0o755, 0),
        ("etc/nix", 0o755, 0),
        ("etc/ssl", 0o755, 0),
        ("etc/ssl/certs", 0o755, 0),
        ("nix", 0o755, workload),
        ("nix/store", 0o755, workload),
        ("nix/var", 0o755, workload),
        ("nix/var/nix", 0o755, workload),
        ("usr", 0o755, 0),
        ("usr/libexec", 0o755, 0),
        ("usr/libexec/mvm", 0o755, 0),
    ] {
        let mut h = header(tar::EntryType::Directory, mode, uid, 0);
        builder.append_data(&mut h, dir, io::empty())?;
    }
    let mut link = header(tar::EntryType::Symlink, 0o777, 0, 0);
    builder.append_link(&mut link, "bin/sh", "busybox")?;
    let passwd = format!(
        "root:x:0:0:root:/root:/bin/sh\nmvm:x:{workload}:{workload}:mvm builder:/tmp:/bin/sh\n"
    );
    let group = format!("root:x:0:\nmvm:x:{workload}:\n");
    for (path, bytes, mode) in [
        ("etc/passwd", passwd.as_bytes(), 0o644),
        ("etc/group", group.as_bytes(), 0o644),
        ("etc/nix/nix.conf", NIX_CONF.as_bytes(), 0o644),
        ("etc/ssl/certs/ca-certificates.crt", ca_bundle, 0o644),
        (&WORKER[1..], worker, 0o755),
    ] {
        let mut h = header(tar::EntryType::Regular, mode, 0, bytes.len() as u64);
        builder.append_data(&mut h, path, bytes)?;
    }
    builder.into_inner()
}

/// An OCI image layout being written.
struct Layout {
    blobs: PathBuf,
}

impl Layout {
    fn create(dir: &Path) -> Result<Self, BuilderImageError> {
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        let marker = dir.join("oci-layout");
        fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io_err(&marker))?;
        Ok(Self { blobs })
    }

    /// Stores `bytes`; their digest and size.
    fn blob(&self, bytes: &[u8]) -> Result<(String, u64), BuilderImageError> {
        let digest = sha256_prefixed(bytes);
        let path = self.blobs.join(&digest["sha256:".len()..]);
        fs::write(&path, bytes).map_err(io_err(&path))?;
        Ok((digest, bytes.len() as u64))
    }

    /// Writes the config, the manifest and the index for `layers` (uncompressed tars, bottom
    /// first); the manifest's digest.
    fn image(&self, layers: &[(String, u64)]) -> Result<String, BuilderImageError> {
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Env": [format!("PATH={PATH}")],
                "Cmd": [WORKER],
                "WorkingDir": "/tmp",
            },
            "rootfs": {
                "type": "layers",
                "diff_ids": layers.iter().map(|(digest, _)| digest.clone()).collect::<Vec<_>>(),
            },
        });
        let config = self.blob(config.to_string().as_bytes())?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config.0,
                "size": config.1,
            },
            "layers": layers.iter().map(|(digest, size)| json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": digest,
                "size": size,
            })).collect::<Vec<_>>(),
        });
        let (digest, size) = self.blob(manifest.to_string().as_bytes())?;
        let index = json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest,
                "size": size,
            }],
        });
        let path = self.blobs.join("../../index.json");
        fs::write(&path, index.to_string()).map_err(io_err(&path))?;
        Ok(digest)
    }
}

/// Puts the finished `staging` directory in place of `dir` (the old one, if any, removed after).
fn replace_dir(staging: tempfile::TempDir, dir: &Path) -> Result<(), BuilderImageError> {
    let staged = staging.keep();
    if dir.exists() {
        let old = dir.with_extension("old");
        let _ = fs::remove_dir_all(&old);
        fs::rename(dir, &old).map_err(io_err(dir))?;
        fs::rename(&staged, dir).map_err(io_err(dir))?;
        let _ = fs::remove_dir_all(&old);
    } else {
        fs::rename(&staged, dir).map_err(io_err(dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_own_layer_is_the_same_bytes_every_time() {
        let a = own_layer(b"worker", b"ca").unwrap();
        assert_eq!(a, own_layer(b"worker", b"ca").unwrap());
        let mut archive = tar::Archive::new(a.as_slice());
        let entries: Vec<(String, u64, u32)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().display().to_string(),
                    h.uid().unwrap(),
                    h.mode().unwrap(),
                )
            })
            .collect();
        assert!(entries.contains(&("usr/libexec/mvm/mvm-build-worker".into(), 0, 0o755)));
        assert!(entries.contains(&("nix/store".into(), u64::from(WORKLOAD_UID), 0o755)));
    }

    #[test]
    fn a_dynamic_or_foreign_worker_is_refused() {
        // This test binary is static, as the workspace links every binary
        // (`.cargo/config.toml`); the host's shell is Debian's dynamic dash.
        let here = std::env::current_exe().unwrap();
        check_static(&here, &fs::read(&here).unwrap()).unwrap();
        let shell = fs::canonicalize("/bin/sh").unwrap();
        let refused = check_static(&shell, &fs::read(&shell).unwrap()).unwrap_err();
        assert_eq!(refused.code(), "BUILDER003");
        assert!(refused.to_string().contains("dynamic loader"), "{refused}");
        assert!(check_static(&here, b"#!/bin/sh\n").is_err());
    }

    #[test]
    fn a_stored_image_off_its_pin_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::create(dir.path()).unwrap();
        let layer = layout.blob(&own_layer(b"w", b"").unwrap()).unwrap();
        let digest = layout.image(&[layer]).unwrap();
        let manifest = BuilderManifest {
            schema_version: "1".into(),
            image_digest: digest.clone(),
            packages: vec![],
            worker_sha256: sha256_prefixed(b"w"),
        };
        fs::write(
            dir.path().join(MANIFEST_FILE),
            serde_json::to_vec(&manifest).unwrap(),
        )
        .unwrap();
        let opened = BuilderImage::open(dir.path()).unwrap();
        assert_eq!(
            opened.reference(),
            format!("oci:{}@{digest}", dir.path().display())
        );
        let blob = dir.path().join("blobs/sha256").join(&digest[7..]);
        let mut bytes = fs::read(&blob).unwrap();
        bytes[0] ^= 1;
        fs::write(&blob, bytes).unwrap();
        assert_eq!(
            BuilderImage::open(dir.path()).unwrap_err().code(),
            "BUILDER004"
        );
    }
}
