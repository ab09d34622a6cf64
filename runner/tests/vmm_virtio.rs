//! mvm's own VMM with virtio-mmio devices, driven by the purpose-built guest
//! `guest/virtio_check.S` on this host's `/dev/kvm` (PVM here: the guest is a small driver of
//! its own, not Linux). The guest finds the devices through the ACPI tables, as Linux would.
//! Skipped, with the reason printed, only when `/dev/kvm` cannot be opened.

mod guest;

use std::path::Path;
use std::time::{Duration, Instant};

use mvm_runner::serial::Console;
use mvm_runner::vmm::{self, BlockConfig, GuestExit, VmConfig};

/// Generous: under PVM the guest's every instruction is emulated (~1 µs each).
const TIMEOUT: Duration = Duration::from_secs(60);

fn disk(path: &Path, sectors: usize, fill: impl Fn(usize) -> Vec<u8>) {
    let mut bytes = Vec::new();
    for n in 0..sectors {
        let mut sector = fill(n);
        sector.resize(512, 0);
        bytes.extend(sector);
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn the_guest_reads_a_read_only_disk_and_writes_a_read_write_one() {
    if let Some(reason) = guest::kvm_unavailable() {
        eprintln!("skipped: {reason}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = guest::build("virtio_check", dir.path());
    let ro = dir.path().join("ro.img");
    disk(&ro, 4, |n| {
        if n == 1 {
            b"mvm-disk-sector-1".to_vec()
        } else {
            vec![0x5a; 512]
        }
    });
    let rw = dir.path().join("rw.img");
    disk(&rw, 4, |_| vec![0; 512]);
    let before_ro = std::fs::read(&ro).unwrap();

    let serial = Console::default();
    let started = Instant::now();
    let vm = vmm::build(VmConfig {
        vcpus: 1,
        memory_mib: 64,
        kernel,
        initrd: None,
        cmdline: "mvm-test-guest".into(),
        serial_log: std::fs::File::create(dir.path().join("serial.log")).unwrap(),
        serial: serial.clone(),
        block: vec![
            BlockConfig {
                path: ro.clone(),
                read_only: true,
                id: "ro".into(),
            },
            BlockConfig {
                path: rw.clone(),
                read_only: false,
                id: "rw".into(),
            },
        ],
    })
    .unwrap();
    let exit = vm.wait(TIMEOUT);
    drop(vm);
    let tail = serial.tail();
    eprintln!(
        "guest ended {exit:?} after {:?}:\n{tail}",
        started.elapsed()
    );
    assert_eq!(exit, Some(GuestExit::PowerOff), "{tail}");
    assert!(tail.contains("mvm-guest: virtio devices=0x2\n"), "{tail}");
    assert!(tail.contains("mvm-guest: device at 0xd0000000 id 0x2\n"));
    assert!(tail.contains("mvm-guest: device at 0xd0001000 id 0x2\n"));
    assert!(tail.contains("mvm-guest: blk read sector 1: mvm-disk-sector-1\n"));
    assert!(tail.contains("mvm-guest: blk read-only disk refused a write\n"));
    assert!(tail.contains("mvm-guest: blk wrote and flushed sector 0\n"));
    assert!(tail.ends_with("mvm-guest: ok\n"));
    assert_eq!(
        std::fs::read(&ro).unwrap(),
        before_ro,
        "the read-only disk is unchanged"
    );
    let written = std::fs::read(&rw).unwrap();
    assert!(written.starts_with(b"mvm-guest-wrote-this"));
    assert_eq!(written.len(), 4 * 512);
}
