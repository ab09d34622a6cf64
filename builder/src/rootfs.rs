//! The untrusted half of a build: image → staged tree → EROFS image → dm-verity tree.
//!
//! Everything here parses bytes from outside (registry JSON, tar, gzip, zstd), so it is what the
//! builder persona runs sandboxed ([`crate::worker`]). Its output is two files in the output
//! directory and a [`RootfsReport`] of what they are; the trusted side hashes the files itself
//! before it signs anything.

use std::collections::BTreeMap;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use mvm_ir::provenance::SkippedEntries;
use mvm_ir::{Coded, ErrorClass};
use serde::{Deserialize, Serialize};

use crate::erofs::{self, Compression, ErofsOptions};
use crate::layer::ApplyOptions;
use crate::nix_image::{stage_closure, NixClosure, NixImageError};
use crate::oci::{self, BlobCache, ImageRef, RegistryOptions, Transport};
use crate::tree::{Metadata, NodeKind, Staging, Tree};
use crate::verity::{self, VerityParams};

/// File name of the root filesystem image in a plan bundle.
pub const ROOTFS_FILE: &str = "rootfs.erofs";
/// File name of its verity hash tree.
pub const VERITY_FILE: &str = "rootfs.verity";

/// Directories the guest mounts over or writes to; created in every image that lacks them.
const MOUNT_POINTS: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
];

/// What to build.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootfsRequest {
    /// The image reference as the workload spells it.
    pub reference: String,
    /// Its pinned digest.
    pub digest: String,
    /// Base for relative `oci:`/`oci-archive:` paths.
    pub base_dir: PathBuf,
    /// The blob cache, which the parent pulls into; the worker is never given it, only a
    /// directory of exactly this image's blobs.
    pub cache_dir: PathBuf,
    /// Where `rootfs.erofs` and `rootfs.verity` are written.
    pub out_dir: PathBuf,
    /// Registries reachable over plain HTTP besides loopback ones.
    pub insecure_registries: Vec<String>,
    /// Show pull progress (the parent's).
    pub progress: bool,
    /// A Nix image instead: the realised closure to stage (`reference` and `digest` then name
    /// it, for reports, and nothing is pulled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nix: Option<NixClosure>,
    /// How the image's files are compressed.
    #[serde(default)]
    pub compression: Compression,
}

/// One layer, for provenance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerReport {
    /// Blob digest.
    pub digest: String,
    /// Uncompressed digest.
    pub diff_id: String,
    /// Media type.
    pub media_type: String,
    /// Blob size.
    pub size: u64,
}

/// What was built.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsReport {
    /// The digest the image was named by.
    pub image_digest: String,
    /// The `linux/amd64` manifest digest.
    pub manifest_digest: String,
    /// Layers, bottom first.
    pub layers: Vec<LayerReport>,
    /// The image config's runtime defaults.
    pub env: Vec<String>,
    /// The config's Entrypoint.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// The config's Cmd.
    #[serde(default)]
    pub cmd: Vec<String>,
    /// Working directory.
    pub working_dir: Option<String>,
    /// The config's User (`NAME`, `UID`, `NAME:GROUP`, `UID:GID`), a group name turned into its
    /// gid from the image's `/etc/group` (the guest resolves user names, not group names).
    #[serde(default)]
    pub user: Option<String>,
    /// The config's Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The config's ExposedPorts (`80/tcp`).
    #[serde(default)]
    pub exposed_ports: Vec<String>,
    /// EROFS image size in bytes.
    pub image_size: u64,
    /// Verity root hash, hex.
    pub root_hash: String,
    /// Verity salt, hex.
    pub salt: String,
    /// Data blocks covered.
    pub data_blocks: u64,
    /// Data block size.
    pub data_block_size: u32,
    /// Hash block size.
    pub hash_block_size: u32,
    /// Offset of the verity superblock in the hash file.
    pub hash_offset: u64,
    /// Device nodes and FIFOs the layers held, left out of the image.
    #[serde(default)]
    pub skipped: SkippedEntries,
    /// How the image's files were compressed, and how many came out smaller.
    #[serde(default)]
    pub compression: CompressionReport,
}

/// The compression an image was built with, for the build's output and provenance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompressionReport {
    /// The algorithm (and level) asked for.
    #[serde(flatten)]
    pub compression: Compression,
    /// Regular files stored compressed (the others did not shrink by a block).
    pub compressed_files: u64,
}

/// Why a root filesystem could not be built; its [`Coded::code`] is the code of the cause.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// Importing the image failed.
    #[error(transparent)]
    Oci(#[from] oci::OciError),
    /// Writing the EROFS image failed.
    #[error("writing the EROFS image: {0}")]
    Erofs(#[from] erofs::ErofsError),
    /// Writing the verity tree failed.
    #[error("writing the verity tree: {0}")]
    Verity(#[from] verity::VerityError),
    /// Staging a Nix closure failed.
    #[error(transparent)]
    Nix(#[from] NixImageError),
    /// Creating or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Coded for RootfsError {
    fn code(&self) -> &str {
        match self {
            RootfsError::Oci(e) => e.code(),
            RootfsError::Nix(e) => e.code(),
            RootfsError::Erofs(_) => "BUILD001",
            RootfsError::Verity(_) => "BUILD002",
            RootfsError::Io { .. } => "BUILD003",
        }
    }

    /// The cause's class; a file that could not be written (BUILD003) is I/O.
    fn class(&self) -> ErrorClass {
        match self {
            RootfsError::Oci(e) => e.class(),
            RootfsError::Nix(e) => e.class(),
            RootfsError::Erofs(_) | RootfsError::Verity(_) => ErrorClass::InvalidInput,
            RootfsError::Io { .. } => ErrorClass::Io,
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RootfsError + '_ {
    move |source| RootfsError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Imports the image, writes `rootfs.erofs` and `rootfs.verity` into `out_dir`, and reports.
///
/// `blobs` is a cache directory already holding every blob of a registry or `oci:` image
/// ([`oci::pull_image`] into it): nothing is fetched here. An `oci-archive:` image is unpacked
/// and verified into a private cache in `out_dir`; a Nix image needs neither.
///
/// Reproducible: the image, its uuid and the verity salt and uuid are all derived from the
/// content, so the same image always gives the same bytes and root hash.
pub fn build_rootfs(
    request: &RootfsRequest,
    blobs: Option<&Path>,
) -> Result<RootfsReport, RootfsError> {
    if let Some(closure) = &request.nix {
        return build_nix_rootfs(request, closure);
    }
    let image = ImageRef::new(&request.reference, &request.digest, &request.base_dir)?;
    let staging = Staging::temp_file_in(&request.out_dir).map_err(io(&request.out_dir))?;
    let mut tree = Tree::new(staging);
    let apply = ApplyOptions::default();
    let imported = match (&image.transport, blobs) {
        (Transport::Archive(_), _) => {
            let private = tempfile::tempdir_in(&request.out_dir).map_err(io(&request.out_dir))?;
            let cache = BlobCache::at(private.path())?;
            oci::import_image(
                &image,
                &RegistryOptions::default(),
                &cache,
                &mut tree,
                &apply,
            )?
        }
        (_, Some(blobs)) => {
            oci::apply_image(&image.digest, &BlobCache::at(blobs)?, &mut tree, &apply)?
        }
        (_, None) => return Err(oci::OciError::BlobNotFound(image.digest).into()),
    };
    let runtime = &imported.config.runtime;
    let user = runtime
        .user
        .as_deref()
        .filter(|u| !u.is_empty())
        .map(|u| numeric_group(u, &tree));
    let mut skipped = SkippedEntries::default();
    for layer in &imported.layers {
        skipped.append(&layer.stats.skipped);
    }
    let report = RootfsReport {
        image_digest: imported.digest,
        manifest_digest: imported.manifest_digest,
        layers: imported
            .layers
            .into_iter()
            .map(|l| LayerReport {
                digest: l.digest,
                diff_id: l.diff_id,
                media_type: l.media_type,
                size: l.size,
            })
            .collect(),
        env: runtime.env.clone().unwrap_or_default(),
        entrypoint: runtime.entrypoint.clone().unwrap_or_default(),
        cmd: runtime.cmd.clone().unwrap_or_default(),
        working_dir: runtime.working_dir.clone().filter(|d| !d.is_empty()),
        user,
        labels: runtime.labels.clone().unwrap_or_default(),
        exposed_ports: runtime.exposed_ports.clone(),
        skipped,
        ..RootfsReport::default()
    };
    write_image(tree, &request.out_dir, request.compression, report)
}

/// `spec` with a group name after `:` replaced by its gid from the image's `/etc/group`; as
/// given when there is no group, it is numeric, or the name is not found (the guest then
/// refuses it when a command runs).
fn numeric_group(spec: &str, tree: &Tree) -> String {
    let Some((user, group)) = spec.split_once(':') else {
        return spec.to_string();
    };
    if group.is_empty() || group.parse::<u32>().is_ok() {
        return spec.to_string();
    }
    let gid = read_etc(tree, b"group").and_then(|text| {
        text.lines().find_map(|line| {
            let mut fields = line.split(':');
            let (name, _, gid) = (fields.next()?, fields.next()?, fields.next()?);
            (name == group).then(|| gid.parse::<u32>().ok())?
        })
    });
    match gid {
        Some(gid) => format!("{user}:{gid}"),
        None => spec.to_string(),
    }
}

/// The text of the regular file `/etc/NAME` of the staged tree (at most 1 MiB; symlinks are
/// not followed).
fn read_etc(tree: &Tree, name: &[u8]) -> Option<String> {
    const MAX: u64 = 1 << 20;
    let etc = tree.lookup(Tree::ROOT, b"etc")?;
    let file = tree.lookup(etc, name)?;
    let NodeKind::File(content) = tree.node(file).kind else {
        return None;
    };
    if content.len > MAX {
        return None;
    }
    let mut bytes = vec![0; content.len as usize];
    tree.staging().read_at(content, 0, &mut bytes).ok()?;
    String::from_utf8(bytes).ok()
}

/// A Nix image: the closure staged (each path checked against its NAR hash) into the tree.
fn build_nix_rootfs(
    request: &RootfsRequest,
    closure: &NixClosure,
) -> Result<RootfsReport, RootfsError> {
    let staging = Staging::temp_file_in(&request.out_dir).map_err(io(&request.out_dir))?;
    let mut tree = Tree::new(staging);
    stage_closure(closure, &mut tree)?;
    let digest = closure.digest();
    let report = RootfsReport {
        image_digest: digest.clone(),
        manifest_digest: digest,
        ..RootfsReport::default()
    };
    write_image(tree, &request.out_dir, request.compression, report)
}

/// Adds the mount points, writes `rootfs.erofs` and `rootfs.verity` into `out_dir`, and
/// completes `report` with what they are.
fn write_image(
    mut tree: Tree,
    out_dir: &Path,
    compression: Compression,
    report: RootfsReport,
) -> Result<RootfsReport, RootfsError> {
    add_mount_points(&mut tree);

    let rootfs_path = out_dir.join(ROOTFS_FILE);
    let staged = tempfile::NamedTempFile::new_in(out_dir).map_err(io(out_dir))?;
    let mut writer = BufWriter::new(staged.as_file());
    let summary = erofs::write_image(
        &tree,
        &mut writer,
        &ErofsOptions {
            volume_name: b"mvm-rootfs".to_vec(),
            compression,
            ..ErofsOptions::default()
        },
    )?;
    writer.into_inner().map_err(|e| RootfsError::Io {
        path: rootfs_path.display().to_string(),
        source: e.into_error(),
    })?;
    staged.as_file().sync_all().map_err(io(&rootfs_path))?;
    staged.persist(&rootfs_path).map_err(|e| RootfsError::Io {
        path: rootfs_path.display().to_string(),
        source: e.error,
    })?;
    drop(tree);

    let report = RootfsReport {
        image_size: summary.size,
        compression: CompressionReport {
            compression,
            compressed_files: summary.compressed_files,
        },
        ..report
    };
    write_verity(out_dir, summary.uuid, report)
}

/// Writes `rootfs.verity` for the image `rootfs.erofs` in `out_dir`, whose superblock holds
/// `uuid`, and completes `report` with the tree. The host builder persona runs it after the
/// image; the builder VM's host side runs it again over the image the VM gave back.
pub fn write_verity(
    out_dir: &Path,
    uuid: [u8; 16],
    report: RootfsReport,
) -> Result<RootfsReport, RootfsError> {
    // Salt and uuid from the image's own uuid (itself derived from the content): reproducible,
    // yet different for every image.
    let seed = mvm_ir::digest::sha256(&[b"mvm verity salt".as_slice(), &uuid].concat());
    let params = VerityParams::new(seed.to_vec(), uuid);
    let tree = verity::format_file(
        &out_dir.join(ROOTFS_FILE),
        &out_dir.join(VERITY_FILE),
        &params,
    )?;
    Ok(RootfsReport {
        root_hash: hex::encode(tree.root_hash),
        salt: hex::encode(&tree.salt),
        data_blocks: tree.data_blocks,
        data_block_size: tree.data_block_size,
        hash_block_size: tree.hash_block_size,
        hash_offset: tree.hash_offset,
        ..report
    })
}

/// Makes the guest's mount points directories: missing ones are created, and anything else at
/// those names (a file, or a symlink that would redirect the mount) is replaced.
fn add_mount_points(tree: &mut Tree) {
    for (name, mode) in MOUNT_POINTS {
        let existing = tree.lookup(Tree::ROOT, name.as_bytes());
        if existing.is_some_and(|id| matches!(tree.node(id).kind, NodeKind::Directory(_))) {
            continue;
        }
        let dir = tree.add(
            NodeKind::Directory(Default::default()),
            Metadata {
                mode: *mode,
                ..Metadata::default()
            },
        );
        tree.link(Tree::ROOT, name.as_bytes(), dir);
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use mvm_ir::provenance::SkippedKind;

    use super::*;
    use crate::testing::{layer_of, Entry, TestLayout, TAR};

    fn request_for(layout: &TestLayout, digest: String, out: &Path) -> RootfsRequest {
        RootfsRequest {
            reference: format!("oci:{}", layout.dir.path().display()),
            digest,
            base_dir: layout.dir.path().to_path_buf(),
            cache_dir: PathBuf::new(),
            out_dir: out.to_path_buf(),
            insecure_registries: vec![],
            progress: false,
            nix: None,
            compression: Default::default(),
        }
    }

    /// The report carries the config's Entrypoint and Cmd apart (the build composes them with
    /// the command line's as `docker run` does), its User with a group name turned into the
    /// gid the image's `/etc/group` gives it, its Labels and ExposedPorts.
    #[test]
    fn the_image_config_is_reported() {
        let layout = TestLayout::new();
        let tar = layer_of(&[
            Entry::Dir("etc"),
            Entry::File("etc/group", b"root:x:0:\nstaff:x:50:app\n", 0o644),
        ]);
        let config = serde_json::json!({
            "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"], "Env": ["GREETING=hello"],
            "WorkingDir": "/srv", "User": "app:staff",
            "Labels": {"org.opencontainers.image.title": "demo"},
            "ExposedPorts": {"8080/tcp": {}, "53/udp": {}},
        });
        let (digest, _) = layout.image_with_config("amd64", config, &[(TAR, tar.clone(), tar)]);
        let out = tempfile::tempdir().unwrap();
        let blobs = layout.dir.path().join("blobs");
        let report = build_rootfs(&request_for(&layout, digest, out.path()), Some(&blobs)).unwrap();
        assert_eq!(report.entrypoint, ["/bin/sh", "-c"]);
        assert_eq!(report.cmd, ["echo hi"]);
        assert_eq!(report.env, ["GREETING=hello"]);
        assert_eq!(report.working_dir.as_deref(), Some("/srv"));
        assert_eq!(report.user.as_deref(), Some("app:50"));
        assert_eq!(report.labels["org.opencontainers.image.title"], "demo");
        assert_eq!(report.exposed_ports, ["53/udp", "8080/tcp"]);

        // A group the image does not have, or a numeric one, is left as written.
        let tree = Tree::new(Staging::temp_file().unwrap());
        assert_eq!(numeric_group("app:nogroup", &tree), "app:nogroup");
        assert_eq!(numeric_group("2000:2001", &tree), "2000:2001");
        assert_eq!(numeric_group("2000", &tree), "2000");
    }

    /// A root filesystem as distributions make them holds `/dev` nodes and FIFOs: it builds,
    /// the nodes are left out of the image, and the report names each with its kind.
    #[test]
    fn device_nodes_and_fifos_are_left_out_and_named() {
        let layout = TestLayout::new();
        let tar = layer_of(&[
            Entry::Dir("dev"),
            Entry::CharDevice("dev/console", 5, 1),
            Entry::CharDevice("dev/null", 1, 3),
            Entry::BlockDevice("dev/vda", 254, 0),
            Entry::Fifo("run/initctl"),
            Entry::File("etc/hostname", b"debian\n", 0o644),
        ]);
        let (digest, _) = layout.image("amd64", &[(TAR, tar.clone(), tar)]);
        let out = tempfile::tempdir().unwrap();
        let request = RootfsRequest {
            reference: format!("oci:{}", layout.dir.path().display()),
            digest,
            base_dir: layout.dir.path().to_path_buf(),
            cache_dir: PathBuf::new(),
            out_dir: out.path().to_path_buf(),
            insecure_registries: vec![],
            progress: false,
            nix: None,
            compression: Default::default(),
        };
        let report = build_rootfs(&request, Some(&layout.dir.path().join("blobs"))).unwrap();
        assert_eq!(report.skipped.total, 4);
        let named: Vec<(&str, SkippedKind)> = report
            .skipped
            .named
            .iter()
            .map(|e| (e.path.as_str(), e.kind))
            .collect();
        assert_eq!(
            named,
            [
                ("/dev/console", SkippedKind::Char),
                ("/dev/null", SkippedKind::Char),
                ("/dev/vda", SkippedKind::Block),
                ("/run/initctl", SkippedKind::Fifo),
            ]
        );
        // As the parent reads it from the worker.
        let sent = serde_json::to_vec(&report).unwrap();
        assert_eq!(
            serde_json::from_slice::<RootfsReport>(&sent).unwrap(),
            report
        );

        // fsck.erofs accepts the image, and it holds no node of any of them.
        let extracted = out.path().join("extracted");
        let fsck = Command::new("fsck.erofs")
            .arg(format!("--extract={}", extracted.display()))
            .arg(out.path().join(ROOTFS_FILE))
            .output()
            .expect("fsck.erofs (erofs-utils)");
        assert!(
            fsck.status.success(),
            "fsck.erofs: {}",
            String::from_utf8_lossy(&fsck.stderr)
        );
        assert_eq!(std::fs::read_dir(extracted.join("dev")).unwrap().count(), 0);
        assert_eq!(std::fs::read_dir(extracted.join("run")).unwrap().count(), 0);
        assert_eq!(
            std::fs::read(extracted.join("etc/hostname")).unwrap(),
            b"debian\n"
        );
    }
}
