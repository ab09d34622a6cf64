//! Image import from OCI layouts, layout archives and a real registry on loopback, with the
//! failure cases: digest and size mismatches, diff_id mismatches, undecompressible layers,
//! tampered cache files, platform resolution.

use std::fs;
use std::path::Path;

use serde_json::Value;

use super::*;
use crate::testing::*;
use crate::tree::{NodeKind, Staging};

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
    // The changed file was removed: the next import fetches the blob again and succeeds.
    assert!(!cached.exists());
    let (tree, imported) = import(&layout_ref(&layout, &digest), &cache).unwrap();
    check_standard(&tree, &imported);
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

#[test]
fn a_pulled_image_applies_from_a_directory_of_exactly_its_blobs() {
    let layout = TestLayout::new();
    let digest = layout.standard();
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::at(cache_dir.path()).unwrap();
    // Another image in the same cache, which the selection must leave out.
    let tar = layer(&[("other", b"1")]);
    let (other, _) = layout.image("amd64", &[(TAR, tar.clone(), tar)]);
    import(&layout_ref(&layout, &other), &cache).unwrap();

    let pulled = pull_image(
        &layout_ref(&layout, &digest),
        &RegistryOptions::default(),
        &cache,
    )
    .unwrap();
    assert_eq!(pulled.digest, digest);
    assert_ne!(pulled.manifest_digest, digest, "the index was resolved");
    assert_eq!(pulled.blobs.len(), 6, "index, manifest, config, 3 layers");
    let selected_dir = tempfile::tempdir().unwrap();
    let selected = cache.select(&pulled.blobs, selected_dir.path()).unwrap();
    let mut held: Vec<String> = fs::read_dir(selected_dir.path().join("sha256"))
        .unwrap()
        .map(|e| format!("sha256:{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    held.sort();
    let mut expected = pulled.blobs.clone();
    expected.sort();
    assert_eq!(held, expected, "exactly the image's blobs");

    // The selection alone is enough: nothing is fetched, the source can be gone.
    for entry in fs::read_dir(layout.dir.path().join("blobs/sha256")).unwrap() {
        fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let mut tree = Tree::new(Staging::Memory(Vec::new()));
    let imported = apply_image(&digest, &selected, &mut tree, &ApplyOptions::default()).unwrap();
    check_standard(&tree, &imported);

    // A blob missing from it is missing (OCI006), not fetched from anywhere.
    let last = pulled.blobs.last().unwrap();
    fs::remove_file(selected_dir.path().join("sha256").join(&last[7..])).unwrap();
    let mut tree = Tree::new(Staging::Memory(Vec::new()));
    let err = apply_image(&digest, &selected, &mut tree, &ApplyOptions::default()).unwrap_err();
    assert_eq!(err.code(), "OCI006", "{err}");
}

#[test]
fn a_pull_hashes_cached_blobs_again() {
    let layout = TestLayout::new();
    let digest = layout.standard();
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::at(cache_dir.path()).unwrap();
    let image = layout_ref(&layout, &digest);
    pull_image(&image, &RegistryOptions::default(), &cache).unwrap();
    let layer_blob = sha(&zstd(&layer(&[("opt/data", &[42u8; 10_000])])));
    let cached = cache_dir.path().join("sha256").join(&layer_blob[7..]);
    let mut bytes = fs::read(&cached).unwrap();
    bytes[0] ^= 1;
    fs::write(&cached, bytes).unwrap();
    // The pull, not only the import, catches it: the worker is handed verified blobs only.
    let err = pull_image(&image, &RegistryOptions::default(), &cache).unwrap_err();
    assert_eq!(err.code(), "OCI002", "{err}");
    assert!(!cached.exists(), "the changed file was removed");
    pull_image(&image, &RegistryOptions::default(), &cache).unwrap();
}
