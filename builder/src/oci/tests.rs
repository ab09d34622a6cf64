//! Image import from OCI layouts, layout archives and a real registry on loopback, with the
//! failure cases: digest and size mismatches, diff_id mismatches, undecompressible layers,
//! tampered cache files, platform resolution.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};

use super::*;
use crate::tree::{NodeKind, Staging};

/// An OCI image layout written blob by blob, as a publisher would.
pub(crate) struct TestLayout {
    pub dir: tempfile::TempDir,
}

pub(crate) fn sha(bytes: &[u8]) -> String {
    mvm_ir::digest::sha256_prefixed(bytes)
}

/// A tar layer with regular files.
pub(crate) fn layer(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, path, *data).unwrap();
    }
    builder.into_inner().unwrap()
}

pub(crate) fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

pub(crate) fn zstd(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 3).unwrap()
}

pub(crate) const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub(crate) const TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub(crate) const TAR_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

impl TestLayout {
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("blobs/sha256")).unwrap();
        fs::write(
            dir.path().join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        Self { dir }
    }

    pub(crate) fn blob(&self, bytes: &[u8]) -> String {
        let digest = sha(bytes);
        fs::write(self.blob_path(&digest), bytes).unwrap();
        digest
    }

    pub(crate) fn blob_path(&self, digest: &str) -> std::path::PathBuf {
        self.dir.path().join("blobs/sha256").join(&digest[7..])
    }

    /// Writes an image of `layers` (media type, blob, uncompressed tar) for `arch`; returns the
    /// manifest's digest and size.
    pub(crate) fn image(&self, arch: &str, layers: &[(&str, Vec<u8>, Vec<u8>)]) -> (String, usize) {
        let config = json!({
            "architecture": arch, "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|(_, _, tar)| sha(tar)).collect::<Vec<_>>()}
        });
        let config = serde_json::to_vec(&config).unwrap();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": self.blob(&config), "size": config.len()},
            "layers": layers.iter().map(|(media, blob, _)| json!({"mediaType": media, "digest": self.blob(blob), "size": blob.len()})).collect::<Vec<_>>()
        });
        let manifest = serde_json::to_vec(&manifest).unwrap();
        (self.blob(&manifest), manifest.len())
    }

    /// Writes an index of `(manifest digest, size, architecture)` and `index.json` naming it as
    /// `tag`; returns the index digest.
    pub(crate) fn index(&self, manifests: &[(String, usize, &str)], tag: &str) -> String {
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests.iter().map(|(d, s, arch)| json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d, "size": s,
                "platform": {"architecture": arch, "os": "linux"}})).collect::<Vec<_>>()
        });
        let index = serde_json::to_vec(&index).unwrap();
        let digest = self.blob(&index);
        let top = json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest, "size": index.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag}}]});
        fs::write(
            self.dir.path().join("index.json"),
            serde_json::to_vec(&top).unwrap(),
        )
        .unwrap();
        digest
    }

    /// A three-layer image (plain, gzip, zstd) with a whiteout; returns the index digest.
    pub(crate) fn standard(&self) -> String {
        let base = layer(&[
            ("etc/os-release", b"mvm test\n"),
            ("bin/tool", b"v1"),
            ("tmp/scratch", b"x"),
        ]);
        let update = layer(&[("bin/tool", b"v2"), ("tmp/.wh.scratch", b"")]);
        let extra = layer(&[("opt/data", &[42u8; 10_000])]);
        let amd64 = self.image(
            "amd64",
            &[
                (TAR, base.clone(), base),
                (TAR_GZIP, gzip(&update), update),
                (TAR_ZSTD, zstd(&extra), extra),
            ],
        );
        let other = layer(&[("arm", b"arm")]);
        let arm64 = self.image("arm64", &[(TAR, other.clone(), other)]);
        self.index(
            &[(arm64.0, arm64.1, "arm64"), (amd64.0, amd64.1, "amd64")],
            "latest",
        )
    }
}

fn import(image: &ImageRef, cache: &BlobCache) -> Result<(Tree, ImportedImage), OciError> {
    let mut tree = Tree::new(Staging::Memory(Vec::new()));
    let imported = import_image(
        image,
        &RegistryOptions::default(),
        cache,
        &mut tree,
        &ApplyOptions::default(),
    )?;
    Ok((tree, imported))
}

fn file(tree: &Tree, path: &str) -> Option<Vec<u8>> {
    let id = path
        .split('/')
        .try_fold(Tree::ROOT, |dir, name| tree.lookup(dir, name.as_bytes()))?;
    let NodeKind::File(content) = tree.node(id).kind else {
        return None;
    };
    let mut out = Vec::new();
    tree.staging().copy_to(content, &mut out).unwrap();
    Some(out)
}

fn check_standard(tree: &Tree, imported: &ImportedImage) {
    assert_eq!(file(tree, "etc/os-release").unwrap(), b"mvm test\n");
    assert_eq!(file(tree, "bin/tool").unwrap(), b"v2");
    assert!(file(tree, "tmp/scratch").is_none(), "the whiteout hid it");
    assert_eq!(file(tree, "opt/data").unwrap(), vec![42u8; 10_000]);
    assert!(
        file(tree, "arm").is_none(),
        "the arm64 image was not chosen"
    );
    assert_eq!(imported.layers.len(), 3);
    assert_eq!(
        imported.config.runtime.cmd,
        Some(vec!["/bin/sh".to_string()])
    );
    assert_ne!(
        imported.digest, imported.manifest_digest,
        "an index was resolved"
    );
}

#[test]
fn layout_import_resolves_the_index_and_applies_layers_in_order() {
    let layout = TestLayout::new();
    let digest = layout.standard();
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::at(cache_dir.path()).unwrap();
    let image = ImageRef::new("oci:layout", &digest, layout.dir.path().parent().unwrap()).unwrap();
    let image = ImageRef {
        transport: Transport::Layout(layout.dir.path().to_path_buf()),
        ..image
    };
    let (tree, imported) = import(&image, &cache).unwrap();
    check_standard(&tree, &imported);

    // A second import is served from the cache: the source can be gone.
    for entry in fs::read_dir(layout.dir.path().join("blobs/sha256")).unwrap() {
        fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let (tree, imported) = import(&image, &cache).unwrap();
    check_standard(&tree, &imported);
}

#[test]
fn layout_archives_are_unpacked_privately() {
    let layout = TestLayout::new();
    let digest = layout.standard();
    let archive = tempfile::NamedTempFile::new().unwrap();
    let mut builder = tar::Builder::new(fs::File::create(archive.path()).unwrap());
    builder.append_dir_all(".", layout.dir.path()).unwrap();
    builder.finish().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::at(cache_dir.path()).unwrap();
    let image = ImageRef::new(
        &format!("oci-archive:{}", archive.path().display()),
        &digest,
        Path::new("/"),
    )
    .unwrap();
    let (tree, imported) = import(&image, &cache).unwrap();
    check_standard(&tree, &imported);

    // An archive with anything but the layout's own files is refused.
    fs::write(layout.dir.path().join("extra"), b"?").unwrap();
    let mut builder = tar::Builder::new(fs::File::create(archive.path()).unwrap());
    builder.append_dir_all(".", layout.dir.path()).unwrap();
    builder.finish().unwrap();
    let fresh_dir = tempfile::tempdir().unwrap();
    let fresh = BlobCache::at(fresh_dir.path()).unwrap();
    assert_eq!(import(&image, &fresh).unwrap_err().code(), "OCI003");
}

fn layout_ref(layout: &TestLayout, digest: &str) -> ImageRef {
    ImageRef::new(
        &format!("oci:{}", layout.dir.path().display()),
        digest,
        Path::new("/"),
    )
    .unwrap()
}

#[test]
fn a_blob_that_does_not_match_its_digest_is_refused_and_not_cached() {
    let layout = TestLayout::new();
    let digest = layout.standard();
    // Corrupt the gzip layer's blob in the source.
    let manifest_digest = {
        let index: Value =
            serde_json::from_slice(&fs::read(layout.blob_path(&digest)).unwrap()).unwrap();
        index["manifests"][1]["digest"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let manifest: Value =
        serde_json::from_slice(&fs::read(layout.blob_path(&manifest_digest)).unwrap()).unwrap();
    let gz = manifest["layers"][1]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let mut bytes = fs::read(layout.blob_path(&gz)).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(layout.blob_path(&gz), &bytes).unwrap();

    let cache_dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::at(cache_dir.path()).unwrap();
    let err = import(&layout_ref(&layout, &digest), &cache).unwrap_err();
    assert_eq!(err.code(), "OCI002", "{err}");
    assert!(!cache.contains(&gz), "a bad blob never enters the cache");
    assert!(cache.contains(&manifest_digest), "good blobs do");
}

#[test]
fn a_source_sending_more_than_the_descriptor_says_is_cut_off() {
    let layout = TestLayout::new();
    let tar = layer(&[("a", b"1")]);
    let (digest, _) = layout.image("amd64", &[(TAR, tar.clone(), tar.clone())]);
    // Grow the layer blob on disk: more bytes than its descriptor's size.
    let path = layout.blob_path(&sha(&tar));
    let mut grown = tar.clone();
    grown.extend_from_slice(&[0u8; 4096]);
    fs::write(&path, grown).unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::at(cache_dir.path()).unwrap();
    let err = import(&layout_ref(&layout, &digest), &cache).unwrap_err();
    assert_eq!(err.code(), "OCI002", "{err}");
    assert!(err.to_string().contains("more than"), "{err}");
}

#[test]
fn a_layer_whose_content_differs_from_its_diff_id_is_refused() {
    let layout = TestLayout::new();
    let real = layer(&[("a", b"1")]);
    let claimed = layer(&[("a", b"2")]);
    // The config claims `claimed`'s diff_id for a blob holding `real`.
    let (digest, _) = layout.image("amd64", &[(TAR_GZIP, gzip(&real), claimed)]);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::at(cache_dir.path()).unwrap();
    let err = import(&layout_ref(&layout, &digest), &cache).unwrap_err();
    assert_eq!(err.code(), "OCI002");
    assert!(err.to_string().contains("diff_id"), "{err}");
}

#[test]
fn a_truncated_gzip_layer_is_a_decompression_error() {
    let layout = TestLayout::new();
    let tar = layer(&[("big", &[7u8; 100_000])]);
    let mut truncated = gzip(&tar);
    truncated.truncate(truncated.len() / 2);
    let (digest, _) = layout.image("amd64", &[(TAR_GZIP, truncated, tar)]);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::at(cache_dir.path()).unwrap();
    let err = import(&layout_ref(&layout, &digest), &cache).unwrap_err();
    assert_eq!(err.code(), "OCI009", "{err}");
}

#[test]
fn a_tampered_cache_file_is_caught_before_use() {
    let layout = TestLayout::new();
    let digest = layout.standard();
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::at(cache_dir.path()).unwrap();
    import(&layout_ref(&layout, &digest), &cache).unwrap();
    let layer_blob = sha(&zstd(&layer(&[("opt/data", &[42u8; 10_000])])));
    let cached = cache_dir.path().join("sha256").join(&layer_blob[7..]);
    let mut bytes = fs::read(&cached).unwrap();
    bytes[0] ^= 1;
    fs::write(&cached, bytes).unwrap();
    let err = import(&layout_ref(&layout, &digest), &cache).unwrap_err();
    assert_eq!(err.code(), "OCI002");
    assert!(err.to_string().contains("cache"), "{err}");
}

#[test]
fn platforms_and_documents() {
    let layout = TestLayout::new();
    let tar = layer(&[("a", b"1")]);
    let arm = layout.image("arm64", &[(TAR, tar.clone(), tar.clone())]);
    let only_arm = layout.index(&[(arm.0.clone(), arm.1, "arm64")], "arm");
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::at(cache_dir.path()).unwrap();
    assert_eq!(
        import(&layout_ref(&layout, &only_arm), &cache)
            .unwrap_err()
            .code(),
        "OCI004"
    );
    // A manifest named directly whose config is not linux/amd64.
    assert_eq!(
        import(&layout_ref(&layout, &arm.0), &cache)
            .unwrap_err()
            .code(),
        "OCI004"
    );
    // A digest the layout does not hold.
    let missing = sha(b"nothing");
    assert_eq!(
        import(&layout_ref(&layout, &missing), &cache)
            .unwrap_err()
            .code(),
        "OCI006"
    );
    // An unsupported layer media type.
    let (odd, _) = layout.image(
        "amd64",
        &[("application/vnd.example.layer", tar.clone(), tar)],
    );
    assert_eq!(
        import(&layout_ref(&layout, &odd), &cache)
            .unwrap_err()
            .code(),
        "OCI005"
    );
    // Not a manifest at all.
    let junk = layout.blob(b"{\"schemaVersion\": 2, \"mediaType\": \"text/plain\"}");
    assert_eq!(
        import(&layout_ref(&layout, &junk), &cache)
            .unwrap_err()
            .code(),
        "OCI003"
    );
}

/// A real registry (Debian's `docker-registry`) on a loopback port, stopped on drop.
pub(crate) struct LocalRegistry {
    child: Child,
    pub address: String,
    _storage: tempfile::TempDir,
}

impl LocalRegistry {
    pub(crate) fn start() -> Self {
        let storage = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address = format!("127.0.0.1:{port}");
        let config = storage.path().join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {address}\n",
                storage.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "docker-registry must be installed (.ci/run installs Debian's docker-registry)",
            );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(&address).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "docker-registry did not listen on {address}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Self {
            child,
            address,
            _storage: storage,
        }
    }

    /// Pushes the layout's `tag` to `repository` with skopeo, keeping every digest.
    pub(crate) fn push(&self, layout: &Path, tag: &str, repository: &str) {
        let out = Command::new("skopeo")
            .args([
                "copy",
                "--all",
                "--preserve-digests",
                "--dest-tls-verify=false",
                "--quiet",
            ])
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repository}:{tag}", self.address))
            .output()
            .expect("skopeo must be installed (.ci/run installs it)");
        assert!(
            out.status.success(),
            "skopeo copy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn registry_import_by_digest_then_from_cache() {
    let layout = TestLayout::new();
    let digest = layout.standard();
    let registry = LocalRegistry::start();
    registry.push(layout.dir.path(), "latest", "mvm/test");
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::at(cache_dir.path()).unwrap();
    let image = ImageRef::new(
        &format!("{}/mvm/test", registry.address),
        &digest,
        Path::new("/"),
    )
    .unwrap();
    let (tree, imported) = import(&image, &cache).unwrap();
    check_standard(&tree, &imported);

    // With the registry gone, the same image still imports: nothing is fetched twice.
    drop(registry);
    let (tree, imported) = import(&image, &cache).unwrap();
    check_standard(&tree, &imported);

    // A digest the registry does not have fails as a registry error, not a panic.
    let registry = LocalRegistry::start();
    let missing = ImageRef::new(
        &format!("{}/mvm/test", registry.address),
        &sha(b"x"),
        Path::new("/"),
    )
    .unwrap();
    assert_eq!(import(&missing, &cache).unwrap_err().code(), "OCI007");
}
