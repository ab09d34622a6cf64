//! The kvm backend as a launch uses it (`VmProcess::Own`), on this host's `/dev/kvm` (PVM
//! here: the purpose-built guests of `mvm-vmm`, not Linux). A plan's VM gets the contract
//! devices. Saved while it runs and restored into a new VMM: the `virtio_check` guest is saved
//! while it waits for the host's answer on the agent channel — after it found its devices
//! through ACPI, read its disks and did the console's handshake — and the restored VM, with a
//! new channel, takes the answer, echoes it and powers off: its vCPU, memory, console port,
//! virtqueues and disks came back. A changed file is refused. Skipped, with the reason
//! printed, when `/dev/kvm` cannot be opened.

mod support;

use support::plan_guest as guest;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use mvm_ir::plan::{LaunchPlan, Timestamp};
use mvm_runner::backend::kvm::OwnVm;
use mvm_runner::backend::{SavedMemory, VmProcess};
use mvm_runner::boot_snapshot::{Shape, Store};
use mvm_runner::cold::{ColdError, ColdManifest, ColdState};
use mvm_vmm::VmSpec;

/// A manifest for a state of `memory` (only its digest is looked at by a restore).
fn manifest(memory: SavedMemory) -> ColdManifest {
    ColdManifest {
        schema_version: "mvm.cold-vm/v2".into(),
        name: "test".into(),
        vm: "vm-test".into(),
        plan_digest: "sha256:00".into(),
        envelope: "/nonexistent".into(),
        accel: "kvm".into(),
        backend: "kvm".into(),
        memory,
        generation: 1,
        deny_hosts: vec![],
        ports: vec![],
        env: Default::default(),
        secrets: vec![],
        secret_files: vec![],
        placeholders: Default::default(),
        named_ram: false,
        saved_at: Timestamp::now(),
    }
}

/// Saves the paused `vm` into `path`; what was written.
fn save(vm: &VmProcess, dir: &Path, path: &Path) -> SavedMemory {
    let mut machine = vm.machine(dir).unwrap();
    machine.pause().unwrap();
    let mut file = File::create(path).unwrap();
    let started = Instant::now();
    let saved = machine.save(&dir.join("unused.sock"), &mut file).unwrap();
    eprintln!("saved {} bytes in {:?}", saved.bytes, started.elapsed());
    assert_eq!(
        mvm_ir::digest::sha256_reader(File::open(path).unwrap()).unwrap(),
        (saved.sha256.clone(), saved.bytes)
    );
    saved
}

/// Wakes the VM `state` holds as the runner does: its memory checked against its manifest.
fn wake(spec: VmSpec, log: File, state: &mut ColdState) -> Result<OwnVm, ColdError> {
    OwnVm::restore(spec, log, &mut state.memory, &state.manifest.memory).map_err(ColdError::from)
}

fn cold(path: &Path, memory: SavedMemory) -> ColdState {
    ColdState {
        manifest: manifest(memory),
        memory: File::open(path).unwrap(),
    }
}

/// The `virtio_check` guest booted in `dir` as a plan, saved into `dir/vm.state` while it
/// waits for the host's answer, and stopped: the VM, the plan, its files, what was saved.
/// `None`, the reason printed, when this host has no usable `/dev/kvm`.
fn saved_while_waiting(
    dir: &Path,
) -> Option<(VmProcess, LaunchPlan, guest::PlanFiles, SavedMemory)> {
    if let Some(reason) = guest::kvm_unavailable() {
        eprintln!("skipped: {reason}");
        return None;
    }
    let files = guest::PlanFiles::new(dir);
    let plan = guest::test_plan();
    let log = File::create(dir.join("first.log")).unwrap();
    let mut vm = VmProcess::Own(OwnVm::boot(files.spec(&plan), log).unwrap());
    let mut channel = vm.take_channel().unwrap();
    guest::wait_for_ping(&mut channel, &vm);
    let saved = save(&vm, dir, &dir.join("vm.state"));
    vm.kill();
    Some((vm, plan, files, saved))
}

#[test]
fn a_saved_vm_restored_into_a_new_vmm_carries_on_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let Some((mut vm, plan, files, saved)) = saved_while_waiting(dir.path()) else {
        return;
    };
    let log = |name: &str| File::create(dir.path().join(name)).unwrap();
    let state = dir.path().join("vm.state");
    assert_eq!(
        vm.try_wait().unwrap().as_deref(),
        Some("stopped by the runner")
    );
    let before = vm.console().tail();
    assert!(!before.contains("console received"), "{before}");
    // Zero pages are left out: far less than the 64 MiB of RAM.
    assert!(saved.bytes < 8 << 20, "{} bytes", saved.bytes);

    // Restored twice from the same file: the VMM restores what it is given (that a state
    // wakes once is the runner's rule, `cold::consume`).
    for round in 0..2 {
        let mut state = cold(&state, saved.clone());
        let own = wake(files.spec(&plan), log("second.log"), &mut state).unwrap();
        let mut vm = VmProcess::Own(own);
        let mut channel = vm.take_channel().unwrap();
        // Paused until resumed: nothing runs, the answer waits.
        channel.write_all(b"pong-from-host").unwrap();
        assert_eq!(vm.wait_for_exit(Duration::from_millis(300)).unwrap(), None);
        vm.machine(dir.path()).unwrap().resume().unwrap();
        let tail = guest::assert_powered_off(&mut vm);
        // It went on from where it was saved: no boot, no device discovery, no disk read (it
        // may still have been about to say it sent its ping).
        assert!(
            tail.contains("mvm-guest: console received: pong-from-host\n"),
            "{round}: {tail}"
        );
        for before_the_save in ["virtio check", "devices=", "blk read", "port 1 is"] {
            assert!(!tail.contains(before_the_save), "{round}: {tail}");
        }
        assert!(tail.ends_with("mvm-guest: ok\n"), "{round}: {tail}");
        // The echo came back on the new channel.
        channel.set_read_timeout(Some(guest::TIMEOUT)).unwrap();
        let mut echoed = Vec::new();
        channel.read_to_end(&mut echoed).unwrap();
        assert!(echoed.ends_with(b"pong-from-host"), "{round}: {echoed:?}");
    }
}

#[test]
fn a_changed_or_foreign_state_is_refused_and_nothing_runs() {
    let dir = tempfile::tempdir().unwrap();
    let Some((_vm, plan, files, saved)) = saved_while_waiting(dir.path()) else {
        return;
    };
    let log = || File::create(dir.path().join("serial.log")).unwrap();
    let path = dir.path().join("vm.state");
    let restore = |plan: &LaunchPlan, memory: SavedMemory| {
        wake(files.spec(plan), log(), &mut cold(&path, memory)).map(|_| ())
    };

    // One byte of a page changed: its digest is not the manifest's (RUN041).
    let original = std::fs::read(&path).unwrap();
    let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.seek(SeekFrom::Start(saved.bytes - 100)).unwrap();
    file.write_all(&[original[saved.bytes as usize - 100] ^ 1])
        .unwrap();
    let refused = restore(&plan, saved.clone()).unwrap_err();
    assert!(matches!(refused, ColdError::Unverified(_)), "{refused}");
    assert_eq!(refused.code(), "RUN041");
    std::fs::write(&path, &original).unwrap();

    // Garbage whose digest the manifest names: not a state (RUN042, VMM010).
    std::fs::write(&path, b"not a saved VM at all").unwrap();
    let (sha256, bytes) = mvm_ir::digest::sha256_reader(File::open(&path).unwrap()).unwrap();
    let refused = restore(&plan, SavedMemory { sha256, bytes }).unwrap_err();
    assert_eq!(refused.code(), "RUN042");
    assert!(refused.to_string().contains("VMM010"), "{refused}");
    std::fs::write(&path, &original).unwrap();

    // The right state for another machine: 2 vCPUs and 128 MiB (RUN042).
    let mut bigger = plan.clone();
    bigger.resources.cpu_cores = 2;
    bigger.resources.memory_mb = 128;
    let refused = restore(&bigger, saved.clone()).unwrap_err();
    assert_eq!(refused.code(), "RUN042");
    assert!(
        refused
            .to_string()
            .contains("saved with 1 vCPUs and 64 MiB"),
        "{refused}"
    );

    // And the untouched state still restores.
    restore(&plan, saved).unwrap();
}

#[test]
fn the_kvm_backend_gives_a_plan_the_contract_devices() {
    if let Some(reason) = guest::kvm_unavailable() {
        eprintln!("skipped: {reason}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let files = guest::PlanFiles::new(dir.path());
    let serial_log = std::fs::File::create(dir.path().join("serial.log")).unwrap();
    let own = OwnVm::boot(files.spec(&guest::test_plan()), serial_log).unwrap();
    let mut vm = VmProcess::Own(own);
    assert_eq!(vm.pid(), std::process::id());
    let mut channel = vm
        .take_channel()
        .expect("connected before the guest starts");
    assert!(vm.take_channel().is_none());
    guest::wait_for_ping(&mut channel, &vm);
    channel.write_all(b"pong-from-host").unwrap();
    let tail = guest::assert_powered_off(&mut vm);
    guest::assert_contract_devices(&tail);
    vm.kill();
}

#[test]
fn huge_pages_are_refused_unless_the_backend_is_kvm() {
    for backend in ["auto", "qemu"] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_mvm-runner"))
            .args(["--huge-pages", "--backend", backend])
            .args(["--plan", "/nonexistent/plan.dsse.json"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(125), "{backend}: {stderr}");
        assert!(stderr.contains("error RUN047"), "{backend}: {stderr}");
    }
}

#[test]
fn a_boot_snapshot_is_restored_by_many_vms_mapping_one_ram_image_none_writing_it() {
    if let Some(reason) = guest::kvm_unavailable() {
        eprintln!("skipped: {reason}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let store = Store::of(&mvm_ir::home::MvmHome::at(home.path())).unwrap();
    let files = guest::PlanFiles::new(dir.path());
    let plan = guest::test_plan();
    let shape = Shape {
        plan_digest: format!("sha256:{}", "a".repeat(64)),
        kernel_sha256: format!("sha256:{}", "b".repeat(64)),
        initramfs_sha256: format!("sha256:{}", "c".repeat(64)),
        backend: "kvm".into(),
        accel: "kvm".into(),
        backend_version: mvm_runner::backend::kvm::VERSION.into(),
        vcpus: 1,
        memory_mib: 64,
    };

    // Made as a launch makes it: booted, paused where it waits for the host's answer, its
    // RAM written flat into the snapshot and its state beside it.
    let log = File::create(dir.path().join("boot.log")).unwrap();
    let mut booted = VmProcess::Own(OwnVm::boot(files.spec(&plan), log).unwrap());
    let mut channel = booted.take_channel().unwrap();
    guest::wait_for_ping(&mut channel, &booted);
    let making = store.making(&shape).unwrap();
    let mut machine = booted
        .boot_snapshot_machine(dir.path(), &making.ram_path())
        .unwrap();
    machine.pause().unwrap();
    let made = making
        .finish("vm-test", machine.as_mut(), dir.path(), b"booted\n")
        .unwrap();
    booted.kill();
    // Flat: byte n of the file is byte n of RAM; sparse where the guest never wrote.
    assert_eq!(made.manifest.ram.bytes, 64 << 20);
    let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&made.ram).unwrap());
    assert!(
        allocated * 512 < 16 << 20,
        "{} bytes allocated",
        allocated * 512
    );

    // Three VMs restored from it at once, each mapping the one image: each takes the answer
    // on its own channel where the snapshot left off — no boot, no device discovery — echoes
    // it and powers off.
    let restored: Vec<_> = (0..3)
        .map(|n| {
            let mut opened = store.open(&shape).unwrap().expect("made");
            assert!(!opened.hashed, "sealed files are not hashed again");
            let mut state = Vec::new();
            opened.state.read_to_end(&mut state).unwrap();
            let saved = mvm_vmm::snapshot::parse(&state).unwrap();
            let log = File::create(dir.path().join(format!("restored-{n}.log"))).unwrap();
            let own = OwnVm::from_boot_snapshot(files.spec(&plan), log, &opened.ram_file, &saved)
                .unwrap();
            VmProcess::Own(own)
        })
        .collect();
    for (n, mut vm) in restored.into_iter().enumerate() {
        let mut channel = vm.take_channel().unwrap();
        channel.write_all(b"pong-from-host").unwrap();
        // Paused until resumed: nothing runs, the answer waits.
        assert_eq!(vm.wait_for_exit(Duration::from_millis(200)).unwrap(), None);
        vm.machine(dir.path()).unwrap().resume().unwrap();
        let tail = guest::assert_powered_off(&mut vm);
        assert!(
            tail.contains("mvm-guest: console received: pong-from-host\n"),
            "{n}: {tail}"
        );
        for before_the_save in ["virtio check", "devices=", "blk read", "port 1 is"] {
            assert!(!tail.contains(before_the_save), "{n}: {tail}");
        }
        assert!(tail.ends_with("mvm-guest: ok\n"), "{n}: {tail}");
        channel.set_read_timeout(Some(guest::TIMEOUT)).unwrap();
        let mut echoed = Vec::new();
        channel.read_to_end(&mut echoed).unwrap();
        assert!(echoed.ends_with(b"pong-from-host"), "{n}: {echoed:?}");
    }
    // What they wrote stayed their own: the image is what was signed.
    let (sha256, bytes) = mvm_ir::digest::sha256_reader(File::open(&made.ram).unwrap()).unwrap();
    assert_eq!(
        SavedMemory { sha256, bytes },
        made.manifest.ram,
        "the RAM image changed"
    );
    // A RAM image of another size is refused by the VMM, not mapped short.
    let short = dir.path().join("short");
    std::fs::write(&short, vec![0u8; 1 << 20]).unwrap();
    let saved = {
        let mut opened = store.open(&shape).unwrap().unwrap();
        let mut state = Vec::new();
        opened.state.read_to_end(&mut state).unwrap();
        mvm_vmm::snapshot::parse(&state).unwrap()
    };
    let log = File::create(dir.path().join("short.log")).unwrap();
    let refused =
        OwnVm::from_boot_snapshot(files.spec(&plan), log, &File::open(&short).unwrap(), &saved)
            .unwrap_err();
    assert!(refused.to_string().contains("1048576 bytes"), "{refused}");
}
