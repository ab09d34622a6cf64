//! A VM of mvm's own VMM saved while it runs and restored into a new VMM, on this host's
//! `/dev/kvm` (PVM here: the purpose-built guests, not Linux): a 2-vCPU guest keeps ticking
//! after its restore (the second vCPU still waiting for its startup IPI), paused until it is
//! resumed. (The plan's VM saved and woken through the runner's cold state is the runner's
//! `tests/kvm_backend.rs`.) Skipped, with the reason printed, when `/dev/kvm` cannot be
//! opened.

use std::fs::File;
use std::io::Write;
use std::time::{Duration, Instant};

use mvm_vmm::test_guest::{self as guest, Console};
use mvm_vmm::{self as vmm, GuestExit, VmConfig};

/// The `spin` test guest built in `dir`, or `None` (the reason printed) where `/dev/kvm`
/// cannot be opened.
fn spin_guest(dir: &std::path::Path) -> Option<std::path::PathBuf> {
    if let Some(reason) = guest::kvm_unavailable() {
        eprintln!("skipped: {reason}");
        return None;
    }
    Some(guest::build(dir, &["lib", "spin"]))
}

/// The console's text once the guest has ticked `n` times (or the time ran out).
fn ticks(console: &Console, n: usize) -> String {
    let deadline = Instant::now() + guest::TIMEOUT;
    while console.tail().matches(".\n").count() < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    console.tail()
}

#[test]
fn a_guest_with_two_vcpus_ticks_on_after_its_restore() {
    let dir = tempfile::tempdir().unwrap();
    let Some(kernel) = spin_guest(dir.path()) else {
        return;
    };
    let config = |log: &str, console: &Console| VmConfig {
        vcpus: 2,
        cmdline: "tick".into(),
        console_log: console.logging_into(File::create(dir.path().join(log)).unwrap()),
        ..guest::config(dir.path(), kernel.clone(), console)
    };
    let console = Console::default();
    let vm = vmm::build(config("first.log", &console)).unwrap();
    ticks(&console, 5);
    let machine = vm.machine();
    machine.pause().unwrap();
    let mut state = Vec::new();
    machine.save(&mut state).unwrap();
    assert_eq!(vm.stop(), GuestExit::Stopped);

    let console = Console::default();
    let restored_config = config("second.log", &console);
    let ram = vmm::builder::guest_ram(&restored_config).unwrap();
    let mut reader = vmm::snapshot::SnapshotReader::new(&ram);
    reader.write_all(&state).unwrap();
    let saved = vmm::snapshot::parse(&reader.finish().unwrap()).unwrap();
    assert_eq!(saved.vcpus.len(), 2);
    let vm = vmm::restore(restored_config, ram, &saved).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(console.tail(), "", "paused until resumed");
    vm.machine().resume().unwrap();
    // Only ticks: it did not start over (no hello).
    let tail = ticks(&console, 5);
    assert!(tail.matches(".\n").count() >= 5, "{tail}");
    assert!(!tail.contains("spinning"), "{tail}");
    let (end, states) = vm.stop_and_inspect();
    assert_eq!(end, GuestExit::Stopped);
    assert!(
        (0x20_0000..0x21_0000).contains(&states[0].rip),
        "{:x?}",
        states[0]
    );
}

/// A guest saved as a boot snapshot is kept (its RAM a flat image) and restored with its RAM
/// mapped copy-on-write from that image: twice, one after the other, each ticking on where it
/// was saved; the image is byte for byte what was saved after both ran.
#[test]
fn a_guest_mapped_from_its_flat_image_ticks_on_and_leaves_the_image_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let Some(kernel) = spin_guest(dir.path()) else {
        return;
    };
    let config = |log: &str, console: &Console| VmConfig {
        cmdline: "tick".into(),
        console_log: console.logging_into(File::create(dir.path().join(log)).unwrap()),
        ..guest::config(dir.path(), kernel.clone(), console)
    };
    let console = Console::default();
    let vm = vmm::build(config("first.log", &console)).unwrap();
    ticks(&console, 3);
    let machine = vm.machine();
    machine.pause().unwrap();
    let image_path = dir.path().join("memory.flat");
    let image = File::create_new(&image_path).unwrap();
    let saved = machine.save_flat(&image).unwrap();
    drop(image);
    assert_eq!(vm.stop(), GuestExit::Stopped);
    let state = serde_json::to_vec(&saved).unwrap();
    let before = std::fs::read(&image_path).unwrap();
    assert_eq!(before.len() as u64, saved.memory_mib << 20);

    for run in ["second.log", "third.log"] {
        let console = Console::default();
        let image = File::open(&image_path).unwrap();
        let ram = vmm::vstate::memory::map_flat(saved.memory_mib << 20, &image).unwrap();
        let saved = vmm::snapshot::parse(&state).unwrap();
        let vm = vmm::restore(config(run, &console), ram, &saved).unwrap();
        vm.machine().resume().unwrap();
        let tail = ticks(&console, 5);
        assert!(tail.matches(".\n").count() >= 5, "{run}: {tail}");
        assert!(!tail.contains("spinning"), "{run} started over: {tail}");
        assert_eq!(vm.stop(), GuestExit::Stopped);
    }
    assert!(
        std::fs::read(&image_path).unwrap() == before,
        "the image changed"
    );
}
