//! mvm's own VMM boots the purpose-built test guest (`guest/boot_check.S`) on this host's
//! `/dev/kvm` — PVM here, not hardware virtualization, which is why the guest is a few hundred
//! bytes of 64-bit code and not Linux. Skipped, with the reason printed, only when `/dev/kvm`
//! cannot be opened.

use std::time::{Duration, Instant};

use mvm_vmm::test_guest::{self as guest, Console};
use mvm_vmm::{self as vmm, GuestExit, VmConfig};

/// Generous: under PVM the guest's every instruction is emulated (~1 µs each).
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn the_test_guest_checks_its_boot_data_prints_and_powers_off() {
    if let Some(reason) = guest::kvm_unavailable() {
        eprintln!("skipped: {reason}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = guest::build(dir.path(), &["lib", "boot_check"]);
    let log = dir.path().join("serial.log");
    let console = Console::default();
    let cmdline = "mvm-test-guest console=ttyS0 token=4f2a";
    let rss_before = rss_kib();
    let started = Instant::now();
    let vm = vmm::build(VmConfig {
        cmdline: cmdline.into(),
        ..guest::config(dir.path(), kernel, &console)
    })
    .unwrap();
    let exit = vm.wait(BOOT_TIMEOUT);
    let first_exit = vm.time_to_first_exit();
    let rss_running = rss_kib();
    let end = vm.stop();
    let elapsed = started.elapsed();
    let tail = console.tail();
    eprintln!(
        "guest ended {end:?} after {elapsed:?} (first exit {first_exit:?}; \
         test process RSS {rss_before} KiB before, {rss_running} KiB with the VM):\n{tail}"
    );
    assert_eq!(exit, Some(GuestExit::PowerOff), "console:\n{tail}");
    assert!(tail.contains("mvm-guest: hello from 64-bit mode\n"));
    assert!(tail.contains(&format!("mvm-guest: cmdline={cmdline}\n")));
    assert!(tail.contains("mvm-guest: rsdp=0xe0000\n"));
    assert!(tail.ends_with("mvm-guest: ok\n"), "{tail}");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        tail,
        "the log has every line"
    );
}

#[test]
fn a_guest_that_fails_a_check_is_seen_to_fail() {
    if let Some(reason) = guest::kvm_unavailable() {
        eprintln!("skipped: {reason}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = guest::build(dir.path(), &["lib", "boot_check"]);
    let console = Console::default();
    let vm = vmm::build(VmConfig {
        cmdline: "not-the-marker".into(),
        ..guest::config(dir.path(), kernel, &console)
    })
    .unwrap();
    assert_eq!(vm.wait(BOOT_TIMEOUT), Some(GuestExit::Reset));
    drop(vm);
    assert!(
        console.tail().contains("mvm-guest: FAIL cmdline marker"),
        "{}",
        console.tail()
    );
}

/// This process's resident set in KiB (0 if unknown).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Boots `guest` with `vcpus` and `cmdline`; returns the VM and its serial console.
fn boot(
    guest: &[&str],
    vcpus: u8,
    cmdline: &str,
    dir: &std::path::Path,
) -> (vmm::MicroVm, Console) {
    let console = Console::default();
    let vm = vmm::build(VmConfig {
        vcpus,
        cmdline: cmdline.into(),
        ..guest::config(dir, guest::build(dir, guest), &console)
    })
    .unwrap();
    (vm, console)
}

#[test]
fn the_other_vcpus_wait_for_a_startup_ipi_and_the_guest_still_powers_off() {
    if let Some(reason) = guest::kvm_unavailable() {
        eprintln!("skipped: {reason}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (vm, console) = boot(&["lib", "boot_check"], 4, "mvm-test-guest smp", dir.path());
    assert_eq!(
        vm.wait(BOOT_TIMEOUT),
        Some(GuestExit::PowerOff),
        "{}",
        console.tail()
    );
    let started = Instant::now();
    assert_eq!(vm.stop(), GuestExit::PowerOff);
    // Three vCPUs sat in KVM_RUN waiting for a SIPI; stopping kicked them out.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        console.tail().matches("mvm-guest: hello").count(),
        1,
        "only the BSP ran"
    );
}

#[test]
fn a_guest_that_never_stops_is_stopped_by_the_host() {
    if let Some(reason) = guest::kvm_unavailable() {
        eprintln!("skipped: {reason}");
        return;
    }
    for cmdline in ["spin", "halt"] {
        let dir = tempfile::tempdir().unwrap();
        let (vm, console) = boot(&["lib", "spin"], 2, cmdline, dir.path());
        assert_eq!(vm.wait(Duration::from_millis(500)), None, "{cmdline}");
        let started = Instant::now();
        let (end, states) = vm.stop_and_inspect();
        assert_eq!(end, GuestExit::Stopped);
        let took = started.elapsed();
        // vCPU 0 is caught in the guest's code (linked at 2 MiB), interrupts off.
        let bsp = &states[0];
        assert!(
            (0x20_0000..0x21_0000).contains(&bsp.rip),
            "{cmdline}: {bsp:x?}"
        );
        assert_eq!(bsp.rflags & (1 << 9), 0, "{cmdline}: {bsp:x?}");
        assert_eq!(bsp.lapic_irr.len(), 8);
        eprintln!("{cmdline}: stopped in {took:?}");
        assert!(took < Duration::from_secs(2), "{cmdline}: {took:?}");
        assert!(console.tail().contains("mvm-guest: spinning"), "{cmdline}");
    }
}

/// The size of the serial log in `dir`: the tick guest's progress.
fn logged(dir: &std::path::Path) -> u64 {
    std::fs::metadata(dir.join("serial.log")).map_or(0, |m| m.len())
}

/// Waits up to `timeout` for the serial log in `dir` to grow past `than`.
fn grows_past(dir: &std::path::Path, than: u64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if logged(dir) > than {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn a_paused_guest_makes_no_progress_until_it_is_resumed_and_stops_while_paused() {
    if let Some(reason) = guest::kvm_unavailable() {
        eprintln!("skipped: {reason}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Two vCPUs: the BSP ticks, the AP waits for a startup IPI inside KVM_RUN — both must
    // be brought out of the guest.
    let (vm, console) = boot(&["lib", "spin"], 2, "tick", dir.path());
    let pauser = vm.machine();
    assert!(
        grows_past(dir.path(), 0, BOOT_TIMEOUT),
        "the guest ticks: {}",
        console.tail()
    );
    let mut took = Vec::new();
    for round in 0..20 {
        let started = Instant::now();
        pauser.pause().unwrap();
        took.push(started.elapsed());
        // Pausing a paused VM changes nothing.
        pauser.pause().unwrap();
        let still = logged(dir.path());
        std::thread::sleep(Duration::from_millis(if round == 0 { 500 } else { 50 }));
        assert_eq!(
            logged(dir.path()),
            still,
            "round {round}: no tick while paused"
        );
        pauser.resume().unwrap();
        assert!(
            grows_past(dir.path(), still, Duration::from_secs(10)),
            "round {round}: ticking again after the resume"
        );
    }
    took.sort();
    eprintln!("pause took {:?} (median) .. {:?}", took[10], took[19]);
    assert!(took[19] < Duration::from_secs(1), "{took:?}");

    // Stopped while paused: the parked threads are released and joined.
    pauser.pause().unwrap();
    let started = Instant::now();
    assert_eq!(vm.stop(), GuestExit::Stopped);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(matches!(pauser.resume(), Err(vmm::PauseError::Ended)));
    assert!(matches!(pauser.pause(), Err(vmm::PauseError::Ended)));
}

#[test]
fn a_guest_halted_inside_kvm_is_paused_and_resumed() {
    if let Some(reason) = guest::kvm_unavailable() {
        eprintln!("skipped: {reason}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (vm, console) = boot(&["lib", "spin"], 1, "halt", dir.path());
    let deadline = Instant::now() + BOOT_TIMEOUT;
    while !console.tail().contains("spinning") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let pauser = vm.machine();
    pauser.pause().unwrap();
    pauser.resume().unwrap();
    assert_eq!(vm.wait(Duration::from_millis(200)), None, "still halted");
    assert_eq!(vm.stop(), GuestExit::Stopped);
}

/// Sets the host's pool of 2 MiB huge pages to `pages`; whether it could.
fn set_huge_pages(pages: u64) -> bool {
    std::fs::write("/proc/sys/vm/nr_hugepages", pages.to_string()).is_ok()
        && huge_pages() == Some(pages)
}

fn huge_pages() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The page size the kernel backs the mapping that starts at `start` with, from smaps.
fn kernel_page_size_kib(start: usize) -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let header = format!("{start:x}-");
    let block = smaps
        .split('\n')
        .skip_while(|line| !line.starts_with(&header));
    block
        .skip(1)
        .find_map(|line| line.strip_prefix("KernelPageSize:"))
        .and_then(|size| size.trim().trim_end_matches("kB").trim().parse().ok())
}

#[test]
fn guest_ram_of_huge_pages_comes_from_the_host_pool_or_is_refused() {
    if let Some(reason) = guest::kvm_unavailable() {
        eprintln!("skipped: {reason}");
        return;
    }
    let Some(before) = huge_pages() else {
        eprintln!("skipped: /proc/sys/vm/nr_hugepages cannot be read");
        return;
    };
    if !set_huge_pages(0) {
        eprintln!("skipped: the pool of huge pages cannot be changed (needs root)");
        return;
    }
    // The host's pool as it was, however the test ends.
    struct Restore(u64);
    impl Drop for Restore {
        fn drop(&mut self) {
            set_huge_pages(self.0);
        }
    }
    let _restore = Restore(before);
    let dir = tempfile::tempdir().unwrap();
    let kernel = guest::build(dir.path(), &["lib", "boot_check"]);
    let boot = |memory_mib: u64| {
        let console = Console::default();
        let vm = vmm::build(VmConfig {
            memory_mib,
            huge_pages: true,
            cmdline: "mvm-test-guest console=ttyS0".into(),
            ..guest::config(dir.path(), kernel.clone(), &console)
        });
        (vm, console)
    };
    // An empty pool: refused as the VM is built, not with a SIGBUS later.
    let refused = boot(64).0.unwrap_err();
    assert_eq!(refused.code(), "VMM002");
    assert!(refused.to_string().contains("huge pages"), "{refused}");
    // 64 MiB is 32 huge pages; 40 leave room.
    assert!(set_huge_pages(40));
    let odd = boot(65).0.unwrap_err();
    assert_eq!(odd.code(), "VMM002");
    assert!(odd.to_string().contains("whole number of 2 MiB"), "{odd}");
    let (vm, console) = boot(64);
    let vm = vm.unwrap();
    let ranges = vm.guest_ram_host_ranges();
    assert_eq!(
        kernel_page_size_kib(ranges[0].start),
        Some(2048),
        "guest RAM is mapped with 2 MiB pages"
    );
    assert_eq!(vm.wait(BOOT_TIMEOUT), Some(GuestExit::PowerOff));
    assert!(
        console.tail().ends_with("mvm-guest: ok\n"),
        "{}",
        console.tail()
    );
}
