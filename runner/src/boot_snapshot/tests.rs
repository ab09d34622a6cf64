use std::os::unix::fs::PermissionsExt;

use mvm_ir::dsse::Envelope;

use super::*;
use crate::backend::fake::FakeMachine;

fn shape(plan: char) -> Shape {
    Shape {
        plan_digest: format!("sha256:{}", plan.to_string().repeat(64)),
        kernel_sha256: format!("sha256:{}", "b".repeat(64)),
        initramfs_sha256: format!("sha256:{}", "c".repeat(64)),
        backend: "qemu".into(),
        accel: "tcg".into(),
        backend_version: "7.2.15".into(),
        vcpus: 1,
        memory_mib: 256,
    }
}

fn machine(state: &[u8]) -> FakeMachine {
    FakeMachine {
        state: state.to_vec(),
        broken: false,
    }
}

/// A store in a fresh home, and the snapshot of `shape('a')` made in it.
fn made() -> (tempfile::TempDir, Store, Vec<u8>) {
    let home = tempfile::tempdir().unwrap();
    let store = Store::of(&MvmHome::at(home.path())).unwrap();
    let state = b"a booted guest".repeat(4096);
    let made = store
        .save(
            &shape('a'),
            "vm-0123456789ab",
            &mut machine(&state),
            home.path(),
            b"booted\n",
        )
        .unwrap();
    assert_eq!(made.manifest.memory.bytes, state.len() as u64);
    (home, store, state)
}

fn memory_path(store: &Store) -> PathBuf {
    store.dir.join(shape('a').key()).join(MEMORY_FILE)
}

#[test]
fn a_made_snapshot_opens_sealed_for_its_shape_only() {
    let (_home, store, state) = made();
    let mut opened = store.open(&shape('a')).unwrap().expect("made");
    assert!(!opened.hashed, "a sealed memory file is not hashed again");
    assert_eq!(opened.console, b"booted\n");
    let mut read = Vec::new();
    io::Read::read_to_end(&mut opened.memory, &mut read).unwrap();
    assert_eq!(read, state);
    let mode = fs::metadata(memory_path(&store))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o400);

    // Another plan, another machine size, another QEMU: no snapshot.
    assert!(store.open(&shape('d')).unwrap().is_none());
    let bigger = Shape {
        memory_mib: 512,
        ..shape('a')
    };
    assert!(store.open(&bigger).unwrap().is_none());
    let newer = Shape {
        backend_version: "9.2.0".into(),
        ..shape('a')
    };
    assert!(store.open(&newer).unwrap().is_none());

    let listed = store.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key, shape('a').key());
    assert_eq!(listed[0].manifest.as_ref().unwrap().shape, shape('a'));
    assert!(listed[0].bytes > state.len() as u64);

    assert!(store.remove(&shape('a').key()).unwrap());
    assert!(!store.remove(&shape('a').key()).unwrap());
    assert!(store.open(&shape('a')).unwrap().is_none());
    assert!(store.remove("../x").is_err());
}

#[test]
fn a_changed_memory_file_is_hashed_and_refused_and_an_unchanged_one_passes() {
    let (_home, store, _) = made();
    let path = memory_path(&store);
    // Permissions changed and back: the seal breaks (ctime), the bytes still hash right.
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
    let opened = store.open(&shape('a')).unwrap().unwrap();
    assert!(opened.hashed);

    // One byte changed.
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    let mut bytes = fs::read(&path).unwrap();
    bytes[1000] ^= 1;
    fs::write(&path, &bytes).unwrap();
    let refused = store.open(&shape('a')).unwrap_err();
    assert_eq!(refused.code(), "RUN064", "{refused}");

    // Replaced by another file of the same bytes: another inode, hashed, passes.
    bytes[1000] ^= 1;
    let fresh = path.with_extension("new");
    fs::write(&fresh, &bytes).unwrap();
    fs::rename(&fresh, &path).unwrap();
    assert!(store.open(&shape('a')).unwrap().unwrap().hashed);
}

#[test]
fn a_manifest_not_signed_here_or_moved_to_another_key_is_refused() {
    let (home, store, _) = made();
    let dir = store.dir.join(shape('a').key());
    let manifest = dir.join(MANIFEST_FILE);
    let good = fs::read(&manifest).unwrap();

    // Signed by another key.
    let payload = Envelope::parse(&good).unwrap().decode_payload().unwrap();
    let other = mvm_ir::keys::Signer::generate().unwrap();
    fs::write(
        &manifest,
        Envelope::sign(PAYLOAD_TYPE, &payload, &other).to_json(),
    )
    .unwrap();
    assert_eq!(store.open(&shape('a')).unwrap_err().code(), "RUN064");

    // A signature byte flipped.
    let text = String::from_utf8(good.clone()).unwrap();
    let at = text.find("\"sig\": \"").unwrap() + 8;
    let mut flipped = text.into_bytes();
    flipped[at] = if flipped[at] == b'A' { b'B' } else { b'A' };
    fs::write(&manifest, &flipped).unwrap();
    assert_eq!(store.open(&shape('a')).unwrap_err().code(), "RUN064");

    // The whole snapshot of plan `a` put where plan `d`'s would be.
    fs::write(&manifest, &good).unwrap();
    let moved = store.dir.join(shape('d').key());
    fs::rename(&dir, &moved).unwrap();
    assert_eq!(store.open(&shape('d')).unwrap_err().code(), "RUN064");
    let listed = store.list().unwrap();
    assert!(listed[0].manifest.is_err(), "{listed:?}");
    drop(home);
}

#[test]
fn a_failed_save_leaves_nothing_and_a_second_maker_keeps_the_first() {
    let (home, store, state) = made();
    let mut broken = FakeMachine {
        state: b"half".repeat(100),
        broken: true,
    };
    let error = store
        .save(&shape('d'), "vm-1", &mut broken, home.path(), b"")
        .unwrap_err();
    assert_eq!(error.code(), "RUN063");
    assert!(!store.dir.join(shape('d').key()).exists());
    let leftovers: Vec<_> = fs::read_dir(&store.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|name| name.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Made again meanwhile by another launch: the first one stays, this one serves its own.
    let mut other = store
        .save(
            &shape('a'),
            "vm-2",
            &mut machine(b"another boot"),
            home.path(),
            b"",
        )
        .unwrap();
    let mut read = Vec::new();
    io::Read::read_to_end(&mut other.memory, &mut read).unwrap();
    assert_eq!(read, b"another boot");
    let kept = store.open(&shape('a')).unwrap().unwrap();
    assert_eq!(kept.manifest.memory.bytes, state.len() as u64);
    assert_eq!(kept.manifest.made_by, "vm-0123456789ab");
}
