//! mvm's own VMM with virtio-mmio devices, driven by the purpose-built guest
//! `guest/virtio_check.S` on this host's `/dev/kvm` (PVM here: the guest is a small driver of
//! its own, not Linux). The guest finds the devices through the ACPI tables, as Linux would,
//! then uses two disks (read-only, read-write), the agent's console channel and the rng.
//! Skipped, with the reason printed, only when `/dev/kvm` cannot be opened.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Instant;

use mvm_vmm::test_guest::{self as guest, Console};
use mvm_vmm::{self as vmm, ConsolePort, GuestExit, VmConfig};

#[test]
fn the_guest_finds_its_devices_and_uses_disks_console_and_rng() {
    if let Some(reason) = guest::kvm_unavailable() {
        eprintln!("skipped: {reason}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = guest::build(dir.path(), &["lib", "virtio", "virtio_check"]);
    let ro = dir.path().join("ro.img");
    guest::image(&ro, 4, |n| {
        if n == 1 {
            b"mvm-disk-sector-1".to_vec()
        } else {
            vec![0x5a; 512]
        }
    });
    let rw = dir.path().join("rw.img");
    guest::image(&rw, 4, |_| vec![0; 512]);
    let before_ro = std::fs::read(&ro).unwrap();

    // The host end of the agent channel: answers the guest's ping, then collects its echo.
    let (vm_end, mut host_end) = UnixStream::pair().unwrap();
    host_end.set_read_timeout(Some(guest::TIMEOUT)).unwrap();
    let host = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        let mut answered = false;
        loop {
            let n = match host_end.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            seen.extend_from_slice(&buf[..n]);
            if !answered && seen.ends_with(b"ping-from-guest") {
                host_end.write_all(b"pong-from-host").unwrap();
                answered = true;
            }
            if seen.ends_with(b"pong-from-host") {
                break;
            }
        }
        seen
    });

    let serial = Console::default();
    let started = Instant::now();
    let vm = vmm::build(VmConfig {
        block: vec![guest::disk(&ro, "ro", true), guest::disk(&rw, "rw", false)],
        console_port: Some(ConsolePort {
            name: "mvm.agent".into(),
            host_end: vm_end,
        }),
        rng: true,
        ..guest::config(dir.path(), kernel, &serial)
    })
    .unwrap();
    let exit = vm.wait(guest::TIMEOUT);
    drop(vm);
    let tail = serial.tail();
    eprintln!(
        "guest ended {exit:?} after {:?}:\n{tail}",
        started.elapsed()
    );
    assert_eq!(exit, Some(GuestExit::PowerOff), "{tail}");
    assert!(tail.contains("mvm-guest: virtio devices=0x4\n"), "{tail}");
    assert!(tail.contains("mvm-guest: device at 0xd0000000 id 0x2\n"));
    assert!(tail.contains("mvm-guest: device at 0xd0001000 id 0x2\n"));
    assert!(tail.contains("mvm-guest: blk read sector 1: mvm-disk-sector-1\n"));
    assert!(tail.contains("mvm-guest: blk read-only disk refused a write\n"));
    assert!(tail.contains("mvm-guest: blk wrote and flushed sector 0\n"));
    assert!(tail.contains("mvm-guest: device at 0xd0002000 id 0x3\n"));
    assert!(tail.contains("mvm-guest: console port 1 is mvm.agent, open\n"));
    assert!(tail.contains("mvm-guest: console received: pong-from-host\n"));
    assert!(tail.contains("mvm-guest: console echoed it back\n"));
    assert!(tail.contains("mvm-guest: device at 0xd0003000 id 0x4\n"));
    assert!(tail.contains("mvm-guest: rng gave 32 bytes, first 8: 0x"));
    assert!(tail.ends_with("mvm-guest: ok\n"));
    assert_eq!(host.join().unwrap(), b"ping-from-guestpong-from-host");
    assert_eq!(
        std::fs::read(&ro).unwrap(),
        before_ro,
        "the read-only disk is unchanged"
    );
    let written = std::fs::read(&rw).unwrap();
    assert!(written.starts_with(b"mvm-guest-wrote-this"));
    assert_eq!(written.len(), 4 * 512);
}

#[test]
fn a_hostile_driver_gets_errors_not_a_dead_vmm() {
    if let Some(reason) = guest::kvm_unavailable() {
        eprintln!("skipped: {reason}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = guest::build(dir.path(), &["lib", "virtio", "hostile"]);
    let ro = dir.path().join("ro.img");
    guest::image(&ro, 4, |n| vec![n as u8; 512]);
    let before = std::fs::read(&ro).unwrap();
    let tail = run_to_power_off(dir.path(), kernel, &ro);
    for line in [
        "stray port and MMIO accesses survived",
        "rings outside guest memory: DEVICE_NEEDS_RESET",
        "avail index beyond the queue: DEVICE_NEEDS_RESET",
        "descriptor loop answered, device still works",
        "sector past the end: IOERR",
        "4 GiB buffer: IOERR",
    ] {
        assert!(tail.contains(&format!("mvm-guest: {line}\n")), "{line}");
    }
    assert_eq!(std::fs::read(&ro).unwrap(), before);
}

#[test]
fn the_guest_takes_a_virtio_interrupt_through_the_ioapic() {
    if let Some(reason) = guest::kvm_unavailable() {
        eprintln!("skipped: {reason}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = guest::build(dir.path(), &["lib", "virtio", "irq_check"]);
    let ro = dir.path().join("ro.img");
    guest::image(&ro, 4, |n| vec![n as u8; 512]);
    let tail = run_to_power_off(dir.path(), kernel, &ro);
    assert!(
        tail.contains("mvm-guest: virtio interrupt on vector 0x30, status 0x1\n"),
        "{tail}"
    );
}

#[test]
fn a_guest_that_powers_off_closes_the_agent_channel_by_itself() {
    if let Some(reason) = guest::kvm_unavailable() {
        eprintln!("skipped: {reason}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = guest::build(dir.path(), &["lib", "boot_check"]);
    let (vm_end, mut host_end) = UnixStream::pair().unwrap();
    host_end.set_read_timeout(Some(guest::TIMEOUT)).unwrap();
    let vm = vmm::build(VmConfig {
        vcpus: 2,
        console_port: Some(ConsolePort {
            name: "mvm.agent".into(),
            host_end: vm_end,
        }),
        ..guest::config(dir.path(), kernel, &Console::default())
    })
    .unwrap();
    // Nobody calls stop: the VM's end alone (vCPU 1 still waiting for a SIPI) releases the
    // devices, so the host reads end-of-file as it would from a QEMU that exited.
    let started = Instant::now();
    let mut rest = Vec::new();
    host_end.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    eprintln!("channel closed {:?} after boot", started.elapsed());
    assert_eq!(vm.ended(), Some(GuestExit::PowerOff));
    assert_eq!(vm.stop(), GuestExit::PowerOff);
}

/// Runs `kernel` with the read-only disk `ro` until it powers off (asserted); its console.
fn run_to_power_off(dir: &Path, kernel: std::path::PathBuf, ro: &Path) -> String {
    let serial = Console::default();
    let vm = vmm::build(VmConfig {
        block: vec![guest::disk(ro, "ro", true)],
        ..guest::config(dir, kernel, &serial)
    })
    .unwrap();
    let exit = vm.wait(guest::TIMEOUT);
    drop(vm);
    let tail = serial.tail();
    eprintln!("{exit:?}\n{tail}");
    assert_eq!(exit, Some(GuestExit::PowerOff), "{tail}");
    tail
}
