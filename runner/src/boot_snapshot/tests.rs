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

/// Makes the snapshot of `shape` in `store`: `ram` as the guest's RAM (the backend would have
/// written it), `state` as its saved state.
fn make(
    store: &Store,
    shape: &Shape,
    ram: &[u8],
    state: &[u8],
    console: &[u8],
) -> Result<BootSnapshot, BootSnapshotError> {
    let making = store.making(shape).unwrap();
    fs::write(making.ram_path(), ram).unwrap();
    making.finish("vm-0123456789ab", &mut machine(state), &store.dir, console)
}

/// A store in a fresh home, and the snapshot of `shape('a')` made in it; its RAM.
fn made() -> (tempfile::TempDir, Store, Vec<u8>) {
    let home = tempfile::tempdir().unwrap();
    let store = Store::of(&MvmHome::at(home.path())).unwrap();
    let ram = b"a booted guest".repeat(4096);
    let made = make(&store, &shape('a'), &ram, b"devices", b"booted\n").unwrap();
    assert_eq!(made.manifest.ram.bytes, ram.len() as u64);
    assert_eq!(made.manifest.state.bytes, 7);
    (home, store, ram)
}

fn ram_path(store: &Store) -> PathBuf {
    store.dir.join(shape('a').key()).join(RAM_FILE)
}

fn state_path(store: &Store) -> PathBuf {
    store.dir.join(shape('a').key()).join(STATE_FILE)
}

#[test]
fn a_made_snapshot_opens_sealed_for_its_shape_only() {
    let (_home, store, ram) = made();
    let mut opened = store.open(&shape('a')).unwrap().expect("made");
    assert!(!opened.hashed, "sealed files are not hashed again");
    assert_eq!(opened.console, b"booted\n");
    let mut read = Vec::new();
    io::Read::read_to_end(&mut opened.state, &mut read).unwrap();
    assert_eq!(read, b"devices");
    assert_eq!(opened.ram, ram_path(&store));
    assert_eq!(fs::read(&opened.ram).unwrap(), ram);
    for file in [ram_path(&store), state_path(&store)] {
        let mode = fs::metadata(file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o400);
    }

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
    assert!(listed[0].bytes >= ram.len() as u64);

    // Not removed while a launch restores it: the removal waits, then says so.
    let started = std::time::Instant::now();
    let busy = store.remove(&shape('a').key()).unwrap_err();
    assert!(busy.to_string().contains("being restored"), "{busy}");
    assert!(started.elapsed() >= REMOVE_WAIT);
    opened.release();
    assert!(store.remove(&shape('a').key()).unwrap());
    // What the launch opened still reads what was checked.
    assert_eq!(
        fs::read(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&opened.ram_file)
        ))
        .unwrap(),
        ram
    );
    assert!(!store.remove(&shape('a').key()).unwrap());
    assert!(store.open(&shape('a')).unwrap().is_none());
    assert!(store.remove("../x").is_err());
}

#[test]
fn a_changed_file_is_hashed_and_refused_and_an_unchanged_one_passes() {
    for path in [ram_path, state_path] {
        let (_home, store, _) = made();
        let path = path(&store);
        // Permissions changed and back: the seal breaks (ctime), the bytes still hash right.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        let opened = store.open(&shape('a')).unwrap().unwrap();
        assert!(opened.hashed);

        // One byte changed.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let mut bytes = fs::read(&path).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let refused = store.open(&shape('a')).unwrap_err();
        assert_eq!(refused.code(), "RUN064", "{refused}");

        // Replaced by another file of the same bytes: another inode, hashed, passes.
        bytes[at] ^= 1;
        let fresh = path.with_extension("new");
        fs::write(&fresh, &bytes).unwrap();
        fs::rename(&fresh, &path).unwrap();
        assert!(store.open(&shape('a')).unwrap().unwrap().hashed);
    }
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
    let (home, store, ram) = made();
    let making = store.making(&shape('d')).unwrap();
    fs::write(making.ram_path(), b"ram").unwrap();
    let mut broken = FakeMachine {
        state: b"half".repeat(100),
        broken: true,
    };
    let error = making
        .finish("vm-1", &mut broken, home.path(), b"")
        .unwrap_err();
    assert_eq!(error.code(), "RUN063");
    // Abandoned half way: dropped, nothing left either.
    drop(store.making(&shape('e')).unwrap());
    assert!(!store.dir.join(shape('d').key()).exists());
    let leftovers: Vec<_> = fs::read_dir(&store.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|name| name.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Made again meanwhile by another launch: the first one stays and serves this one too.
    let other = make(&store, &shape('a'), b"another boot", b"other", b"").unwrap();
    assert_eq!(other.manifest.ram.bytes, ram.len() as u64);
    assert_eq!(fs::read(&other.ram).unwrap(), ram);
    let kept = store.open(&shape('a')).unwrap().unwrap();
    assert_eq!(kept.manifest.ram.bytes, ram.len() as u64);
    assert_eq!(store.list().unwrap().len(), 1);
}

/// Sets when the snapshot of `shape` was last used to `ago` before now.
fn used_ago(store: &Store, shape: &Shape, ago: std::time::Duration) {
    let used = File::options()
        .write(true)
        .open(store.dir.join(shape.key()).join(USED_FILE))
        .unwrap();
    used.set_modified(SystemTime::now() - ago).unwrap();
}

#[test]
fn over_its_budget_the_store_drops_the_least_recently_used_never_the_new_or_busy_one() {
    let home = tempfile::tempdir().unwrap();
    let store = Store::of(&MvmHome::at(home.path())).unwrap();
    let hour = std::time::Duration::from_secs(3600);
    for plan in ['a', 'b', 'c', 'd', 'e'] {
        let ram = plan.to_string().repeat(256 * 1024).into_bytes();
        make(&store, &shape(plan), &ram, b"devices", b"").unwrap();
    }
    // a unused for 3 h, b for 2 h, c for 1 h; d restored just now; e the one a launch is
    // about to restore (kept whenever it was last used).
    used_ago(&store, &shape('e'), 5 * hour);
    used_ago(&store, &shape('a'), 3 * hour);
    used_ago(&store, &shape('b'), 2 * hour);
    used_ago(&store, &shape('c'), hour);
    // b no longer verifies: it goes first, however recently used.
    used_ago(&store, &shape('b'), hour / 2);
    fs::write(store.dir.join(shape('b').key()).join(MANIFEST_FILE), b"{}").unwrap();
    let size = |plan: char| {
        let listed = store.list().unwrap();
        listed
            .iter()
            .find(|e| e.key == shape(plan).key())
            .unwrap()
            .bytes
    };
    let each = size('a');
    assert!(each >= 256 * 1024, "{each}");
    let total: u64 = store.list().unwrap().iter().map(|e| e.bytes).sum();
    let keep = shape('e').key();

    // Within budget: nothing goes.
    let budget = |max_bytes| Budget { max_bytes };
    assert_eq!(store.trim(budget(total), &keep).unwrap(), vec![]);
    // One over: the one that does not verify.
    let removed = store.trim(budget(total - 1), &keep).unwrap();
    assert_eq!(removed, vec![(shape('b').key(), each)]);
    // Then by last use: a before c.
    let removed = store.trim(budget(total - 2 * each), &keep).unwrap();
    assert_eq!(removed, vec![(shape('a').key(), each)]);
    // A launch restoring c holds it: not removed, though unused for an hour.
    let mut restoring = store.open(&shape('c')).unwrap().unwrap();
    used_ago(&store, &shape('c'), hour);
    assert_eq!(store.trim(budget(0), &keep).unwrap(), vec![]);
    // Let go: nothing left to spare, c goes; d (restored within the minute) and e stay.
    restoring.release();
    let removed = store.trim(budget(0), &keep).unwrap();
    assert_eq!(removed, vec![(shape('c').key(), each)]);
    // Its open files still read what was checked.
    let mut state = Vec::new();
    io::Read::read_to_end(&mut restoring.state, &mut state).unwrap();
    assert_eq!(state, b"devices");
    let left: Vec<String> = store.list().unwrap().into_iter().map(|e| e.key).collect();
    let mut expected = vec![shape('d').key(), keep];
    expected.sort();
    assert_eq!(left, expected);
    assert!(store.open(&shape('d')).unwrap().is_some());
}

#[test]
fn the_budget_is_read_from_config_toml_and_a_typo_is_refused() {
    let mib = |text: &str| Budget::parse(text).map(|b| b.max_bytes >> 20);
    assert_eq!(mib("").unwrap(), DEFAULT_MAX_DISK_MIB);
    assert_eq!(
        mib("[policy]\nmax_cpu_cores = 2\n").unwrap(),
        DEFAULT_MAX_DISK_MIB
    );
    assert_eq!(mib("[boot_snapshots]\n").unwrap(), DEFAULT_MAX_DISK_MIB);
    assert_eq!(mib("[boot_snapshots]\nmax_disk_mib = 512\n").unwrap(), 512);
    for bad in [
        "[boot_snapshots]\nmax_disk_mb = 512\n",
        "[boot_snapshots]\nmax_disk_mib = 0\n",
        "[boot_snapshots]\nmax_disk_mib = 1073741825\n",
        "[boot_snapshots]\nmax_disk_mib = -1\n",
        "[boot_snapshots]\nmax_disk_mib = \"8G\"\n",
        "[boot_snapshots\n",
    ] {
        let refused = Budget::parse(bad).unwrap_err();
        assert_eq!(refused.code(), "RUN066", "{bad}: {refused}");
        assert!(refused.to_string().contains("config.toml"), "{refused}");
    }
}
