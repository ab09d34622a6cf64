//! The cache's rules on real files: records, resolving arguments, what rm and prune take,
//! finishing a killed removal, the lock between builds and removals.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use mvm_ir::home::MvmHome;

use super::*;
use crate::oci::{pull_image, ImageRef, RegistryOptions};
use crate::testing::{layer, TestLayout, TAR};

struct Fixture {
    _dir: tempfile::TempDir,
    home: PathBuf,
    cache: ImageCache,
    layout: TestLayout,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let cache = ImageCache::in_home(&MvmHome::at(&home)).unwrap();
    Fixture {
        _dir: dir,
        home,
        cache,
        layout: TestLayout::new(),
    }
}

impl Fixture {
    /// An image of a shared layer and one of its own, pulled and recorded with a bundle at
    /// `bundle` (under `runs/` when `kept`) whose plan digest is `plan`.
    fn image(&self, own: &[u8], bundle: &str, kept: bool) -> (String, PathBuf) {
        let shared = layer(&[("etc/shared", b"shared")]);
        let own = layer(&[("etc/own", own)]);
        let (digest, _) = self.layout.image(
            "amd64",
            &[(TAR, shared.clone(), shared), (TAR, own.clone(), own)],
        );
        let reference = format!("oci:{}", self.layout.dir.path().display());
        let image = ImageRef::new(&reference, &digest, Path::new("/")).unwrap();
        let lock = self.cache.lock_shared().unwrap();
        let pulled = pull_image(&image, &RegistryOptions::default(), self.cache.blobs()).unwrap();
        let path = if kept {
            self.cache.runs_dir().join(bundle)
        } else {
            self.home.join(bundle)
        };
        fs::create_dir_all(&path).unwrap();
        // A signed envelope whose payload is the bundle's name: its plan digest is `plan(name)`.
        let signer = mvm_ir::keys::Signer::generate().unwrap();
        let envelope = mvm_ir::dsse::Envelope::sign("test", bundle.as_bytes(), &signer);
        fs::write(path.join("plan.dsse.json"), envelope.to_json()).unwrap();
        self.cache
            .record_build(
                &lock,
                &BuiltImage {
                    reference,
                    pulled: Some(pulled),
                    digest: digest.clone(),
                    bundle: BundleRecord {
                        path: path.clone(),
                        plan_digest: plan(bundle),
                    },
                },
            )
            .unwrap();
        (digest, path)
    }

    fn inventory(&self, vms: &[VmUse]) -> Inventory {
        let lock = self.cache.lock_shared().unwrap();
        self.cache.inventory(&lock, vms).unwrap()
    }

    fn blob(&self, digest: &str) -> PathBuf {
        self.cache.blobs().blob_dir().join(&digest[7..])
    }
}

fn plan(bundle: &str) -> String {
    mvm_ir::digest::sha256_prefixed(bundle.as_bytes())
}

#[test]
fn records_list_images_with_their_blobs_sizes_and_bundles() {
    let f = fixture();
    let (one, bundle) = f.image(b"one", "one", false);
    let (two, _) = f.image(b"two", "two", true);
    let inventory = f.inventory(&[]);
    assert_eq!(inventory.images.len(), 2);
    let entry = inventory.resolve(&one).unwrap();
    assert_eq!(entry.record.blobs.len(), 4, "manifest, config, two layers");
    let size: u64 = entry
        .record
        .blobs
        .iter()
        .map(|b| fs::metadata(f.blob(&b.digest)).unwrap().len())
        .sum();
    assert_eq!(entry.size, size);
    assert!(entry.unique_size < size, "the first layer is shared");
    assert_eq!(entry.bundles.len(), 1);
    assert_eq!(entry.bundles[0].path, bundle);
    assert!(!entry.bundles[0].managed);
    assert_eq!(entry.bundles[0].plan_digest, Some(plan("one")));
    // A bundle rebuilt from something else is no longer shown as this image's.
    let signer = mvm_ir::keys::Signer::generate().unwrap();
    let other = mvm_ir::dsse::Envelope::sign("test", b"other", &signer);
    fs::write(bundle.join("plan.dsse.json"), other.to_json()).unwrap();
    assert!(f.inventory(&[]).resolve(&one).unwrap().bundles.is_empty());
    assert!(inventory.unreferenced_blobs.is_empty());
    assert!(inventory.resolve(&two).is_ok());
}

#[test]
fn arguments_resolve_to_one_image_or_fail_with_their_code() {
    let f = fixture();
    let (one, _) = f.image(b"one", "one", false);
    f.image(b"two", "two", false);
    let inventory = f.inventory(&[]);
    let code = |arg: &str| {
        inventory
            .resolve(arg)
            .map(drop)
            .unwrap_err()
            .code()
            .to_string()
    };
    assert_eq!(inventory.resolve(&one[..19]).unwrap().record.digest, one);
    assert_eq!(inventory.resolve(&one[7..19]).unwrap().record.digest, one);
    assert_eq!(
        inventory
            .resolve(&one[7..].to_uppercase())
            .unwrap()
            .record
            .digest,
        one
    );
    assert_eq!(code(&one[7..18]), "CACHE003");
    assert_eq!(code("sha256:xyz"), "CACHE003");
    assert_eq!(code(&"0".repeat(64)), "CACHE001");
    assert_eq!(code("registry.example/none"), "CACHE001");
    let reference = format!("oci:{}", f.layout.dir.path().display());
    assert_eq!(code(&reference), "CACHE002");
    let pinned = format!("{reference}@{one}");
    assert_eq!(inventory.resolve(&pinned).unwrap().record.digest, one);
}

#[test]
fn rm_keeps_shared_blobs_and_refuses_what_a_vm_needs() {
    let f = fixture();
    let (one, kept) = f.image(b"one", "one", true);
    let (two, _) = f.image(b"two", "two", false);
    let web = VmUse {
        name: "web".into(),
        plan_digest: plan("one"),
    };
    let refused = f.inventory(&[web]).plan_rm(&one).unwrap_err();
    assert_eq!(refused.code(), "CACHE004");
    assert!(refused.to_string().contains("web"), "{refused}");

    let inventory = f.inventory(&[]);
    let removal = inventory.plan_rm(&one).unwrap();
    let lock = f.cache.lock_exclusive(|| {}).unwrap();
    f.cache.remove(&lock, &removal, None).unwrap();
    drop(lock);
    let after = f.inventory(&[]);
    assert_eq!(after.images.len(), 1);
    let shared = &after.resolve(&two).unwrap().record.blobs;
    for blob in &inventory.resolve(&one).unwrap().record.blobs {
        let stays = shared.iter().any(|b| b.digest == blob.digest);
        assert_eq!(f.blob(&blob.digest).exists(), stays, "{}", blob.digest);
    }
    assert!(!kept.exists(), "the bundle kept for it goes");
    assert!(after.unreferenced_blobs.is_empty());
}

#[test]
fn prune_takes_what_nothing_names_and_with_all_unused_images() {
    let f = fixture();
    let (one, _) = f.image(b"one", "one", true);
    let (two, _) = f.image(b"two", "two", false);
    // A blob no record names, a fetch's temporary file, a killed build's staging directory,
    // a kept bundle whose image is gone, a damaged record.
    let stray = f.blob(&format!("sha256:{}", "1".repeat(64)));
    fs::write(&stray, b"stray").unwrap();
    let temp = f.cache.blobs().blob_dir().join(".tmpXYZ");
    fs::write(&temp, b"partial").unwrap();
    let staging = f.cache.runs_dir().join(".mvm-build-abc");
    fs::create_dir(&staging).unwrap();
    let dangling = f.cache.runs_dir().join("0123456789abcdef");
    fs::create_dir(&dangling).unwrap();
    let damaged = f
        .home
        .join("cache/images")
        .join(format!("{}.json", "2".repeat(64)));
    fs::write(&damaged, b"{").unwrap();

    let inventory = f.inventory(&[VmUse {
        name: "web".into(),
        plan_digest: plan("one"),
    }]);
    assert_eq!(inventory.damaged.len(), 1);
    assert_eq!(inventory.unreferenced_blobs.len(), 1);
    assert_eq!(inventory.leftovers.len(), 2);
    assert_eq!(inventory.dangling_bundles.len(), 1);

    // Nothing is old enough yet.
    let young = inventory.plan_prune(
        Prune {
            all: true,
            older_than: Some(Duration::from_secs(3600)),
        },
        SystemTime::now(),
    );
    assert!(young.is_empty(), "{young:?}");

    let plain = inventory.plan_prune(Prune::default(), SystemTime::now());
    assert!(plain.images.is_empty());
    assert_eq!(
        (
            plain.blobs.len(),
            plain.leftovers.len(),
            plain.damaged.len()
        ),
        (1, 2, 1)
    );
    assert_eq!(plain.bundles.len(), 1);

    let all = inventory.plan_prune(
        Prune {
            all: true,
            older_than: None,
        },
        SystemTime::now(),
    );
    assert_eq!(all.images.len(), 1);
    assert_eq!(all.images[0].record.digest, two);
    assert_eq!(all.kept, vec![(one.clone(), vec!["web".to_string()])]);
    let lock = f.cache.lock_exclusive(|| {}).unwrap();
    f.cache.remove(&lock, &all, None).unwrap();
    drop(lock);
    for gone in [&stray, &temp, &staging, &dangling, &damaged] {
        assert!(!gone.exists(), "{} stays", gone.display());
    }
    let after = f.inventory(&[]);
    assert_eq!(after.images.len(), 1);
    assert!(after.images[0].missing.is_empty());
}

#[test]
fn a_killed_removal_is_finished_by_whoever_takes_the_lock_next() {
    let f = fixture();
    let (one, _) = f.image(b"one", "one", false);
    let inventory = f.inventory(&[]);
    let removal = inventory.plan_rm(&one).unwrap();
    // Killed after the journal and the record went, before the blobs did.
    let journal = serde_json::json!({
        "records": [removal.images[0].file],
        "files": removal.blobs.iter().map(|b| &b.path).collect::<Vec<_>>(),
        "dirs": [],
    });
    fs::write(
        f.home.join("cache/removal.json"),
        serde_json::to_vec(&journal).unwrap(),
    )
    .unwrap();
    fs::remove_file(&removal.images[0].file).unwrap();
    assert!(removal.blobs.iter().all(|b| b.path.exists()));
    // A build's lock finishes it first.
    drop(f.cache.lock_shared().unwrap());
    assert!(!f.home.join("cache/removal.json").exists());
    assert!(removal.blobs.iter().all(|b| !b.path.exists()));
    assert!(f.inventory(&[]).images.is_empty());
}

#[test]
fn a_journal_removes_nothing_outside_the_cache() {
    let f = fixture();
    let outside = f.home.join("keys");
    fs::create_dir_all(&outside).unwrap();
    let escape = f.home.join("cache/../keys");
    let journal = serde_json::json!({"records": [], "files": [escape], "dirs": [outside, "/tmp"]});
    fs::write(
        f.home.join("cache/removal.json"),
        serde_json::to_vec(&journal).unwrap(),
    )
    .unwrap();
    drop(f.cache.lock_exclusive(|| {}).unwrap());
    assert!(outside.is_dir());
    assert!(!f.home.join("cache/removal.json").exists());
}

#[test]
fn a_removal_waits_for_the_builds_holding_the_cache() {
    let f = fixture();
    let build = f.cache.lock_shared().unwrap();
    let also = f.cache.lock_shared().unwrap();
    let (tx, rx) = mpsc::channel();
    let cache = f.cache.clone();
    let remover = std::thread::spawn(move || {
        let waited = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = waited.clone();
        let lock = cache
            .lock_exclusive(move || flag.store(true, std::sync::atomic::Ordering::SeqCst))
            .unwrap();
        tx.send(waited.load(std::sync::atomic::Ordering::SeqCst))
            .unwrap();
        drop(lock);
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        rx.try_recv().is_err(),
        "the removal did not wait for the builds"
    );
    drop(build);
    drop(also);
    assert!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        "it said it waited"
    );
    remover.join().unwrap();
}

#[test]
fn damaged_records_are_reported_never_trusted() {
    let f = fixture();
    let (one, _) = f.image(b"one", "one", false);
    let dir = f.home.join("cache/images");
    let good = fs::read(dir.join(format!("{}.json", &one[7..]))).unwrap();
    let other = format!("{}.json", "3".repeat(64));
    for bytes in [
        b"{".to_vec(),
        b"[]".to_vec(),
        vec![0xff; 10],
        // A good record under another digest's name.
        good.clone(),
        String::from_utf8(good.clone())
            .unwrap()
            .replace("mvm.image/v1", "mvm.image/v9")
            .into_bytes(),
    ] {
        fs::write(dir.join(&other), &bytes).unwrap();
        let inventory = f.inventory(&[]);
        assert_eq!(inventory.images.len(), 1);
        assert_eq!(
            inventory.damaged.len(),
            1,
            "{}",
            String::from_utf8_lossy(&bytes)
        );
        assert_eq!(inventory.damaged[0].path, dir.join(&other));
    }
}
