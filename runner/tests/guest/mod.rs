//! Builds the purpose-built test guests in this folder (through
//! `mvm_runner::vmm::test_guest`, with the host's `as` and `ld`), and says whether this host
//! can run them.
//!
//! The guests are 64-bit code entered the way a Linux kernel is, a few KiB each: they run on
//! any `/dev/kvm`, including this project's PVM hosts, where a stock kernel does not boot.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mvm_ir::plan::LaunchPlan;
use mvm_runner::serial::Console;
use mvm_runner::vm_process::{OwnVmFiles, VmProcess, VmSpec};
use mvm_runner::vmm::{test_guest, BlockConfig, VmConfig};

/// Why this host cannot run a VM of our own, if it cannot: no `/dev/kvm` openable
/// read-write. Tests print the reason and skip.
pub fn kvm_unavailable() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm cannot be opened read-write ({e})")),
    }
}

/// Assembles `guest/<part>.S` for each of `parts` as one stream (shared code first, the
/// guest's own file last) and links the result at 2 MiB into `dir`; returns the ELF's path.
pub fn build(dir: &Path, parts: &[&str]) -> PathBuf {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest");
    let sources: Vec<String> = parts
        .iter()
        .map(|part| std::fs::read_to_string(folder.join(format!("{part}.S"))).unwrap())
        .collect();
    let name = parts.last().expect("a guest has a file of its own");
    let sources: Vec<&str> = sources.iter().map(String::as_str).collect();
    test_guest::assemble(dir, name, &sources).unwrap_or_else(|e| panic!("{e}"))
}

/// The machine most test guests get: one vCPU, 64 MiB, the cmdline `mvm-test-guest`, the
/// console logged into `dir/serial.log` and shown in `serial`, no devices beyond the
/// built-in ones. Tests change what they need with `..config(…)`.
#[allow(dead_code)]
pub fn config(dir: &Path, kernel: PathBuf, serial: &Console) -> VmConfig {
    VmConfig {
        vcpus: 1,
        memory_mib: 64,
        kernel: std::fs::File::open(kernel).unwrap(),
        initrd: None,
        cmdline: "mvm-test-guest".into(),
        serial_log: std::fs::File::create(dir.join("serial.log")).unwrap(),
        serial: serial.clone(),
        block: Vec::new(),
        agent_channel: None,
        rng: false,
        huge_pages: false,
    }
}

/// A disk backed by `path`, named `id` (not every test binary that shares this module has
/// disks).
#[allow(dead_code)]
pub fn disk(path: &Path, id: &str, read_only: bool) -> BlockConfig {
    BlockConfig::open(path, read_only, id).unwrap()
}

/// Generous: under PVM the guest's every instruction is emulated (~1 µs each).
#[allow(dead_code)]
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Writes a disk image of `sectors` 512-byte sectors, sector `n` starting with `fill(n)`.
#[allow(dead_code)]
pub fn image(path: &Path, sectors: usize, fill: impl Fn(usize) -> Vec<u8>) {
    let mut bytes = Vec::new();
    for n in 0..sectors {
        let mut sector = fill(n);
        sector.resize(512, 0);
        bytes.extend(sector);
    }
    std::fs::write(path, bytes).unwrap();
}

/// The example plan, with the test guest's command line and small resources.
#[allow(dead_code)]
pub fn test_plan() -> LaunchPlan {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/plan/plan.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json["nonce"] = "00".repeat(16).into();
    json["single_use"] = false.into();
    json["kernel"]["cmdline"] = "mvm-test-guest".into();
    json["resources"]["cpu_cores"] = 1.into();
    json["resources"]["memory_mb"] = 64.into();
    serde_json::from_value(json).unwrap()
}

/// The files a plan boots from, made for the `virtio_check` guest: the guest as the kernel,
/// a dummy initramfs, a root image and hash tree whose sector 1 is the marker the guest
/// reads.
#[allow(dead_code)]
pub struct PlanFiles {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub rootfs: PathBuf,
    pub verity: PathBuf,
}

#[allow(dead_code)]
impl PlanFiles {
    /// Builds them in `dir`.
    pub fn new(dir: &Path) -> Self {
        let marker = |n: usize| {
            if n == 1 {
                b"mvm-disk-sector-1".to_vec()
            } else {
                vec![0; 512]
            }
        };
        let files = PlanFiles {
            kernel: build(dir, &["lib", "virtio", "virtio_check"]),
            initramfs: dir.join("initramfs"),
            rootfs: dir.join("rootfs.erofs"),
            verity: dir.join("rootfs.verity"),
        };
        image(&files.rootfs, 4, marker);
        image(&files.verity, 2, marker);
        std::fs::write(&files.initramfs, vec![0x1f; 4096]).unwrap();
        files
    }

    /// The VM the kvm backend makes of `plan` booted from these files.
    pub fn spec(&self, plan: &LaunchPlan) -> VmSpec {
        VmSpec::for_plan(plan, &self.own()).unwrap()
    }

    /// As the kvm backend takes them.
    pub fn own(&self) -> OwnVmFiles<'_> {
        OwnVmFiles {
            kernel: &self.kernel,
            initramfs: &self.initramfs,
            rootfs: &self.rootfs,
            verity: &self.verity,
        }
    }
}

/// Reads the agent channel until the `virtio_check` guest's ping; the guest then waits for
/// the host's pong.
#[allow(dead_code)]
pub fn wait_for_ping(channel: &mut UnixStream, vm: &VmProcess) {
    channel.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 64];
    while !seen.ends_with(b"ping-from-guest") {
        let n = match channel.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            read => read.unwrap(),
        };
        assert_ne!(
            n,
            0,
            "the channel closed early: {}\n{}",
            vm.console().tail(),
            vm.stderr()
        );
        seen.extend_from_slice(&buf[..n]);
    }
}

/// Waits for `vm` to end, asserts the guest powered off; its console.
#[allow(dead_code)]
pub fn assert_powered_off(vm: &mut VmProcess) -> String {
    let ended = vm.wait_for_exit(TIMEOUT).unwrap();
    let tail = vm.console().tail();
    eprintln!("{ended:?}\n{tail}\n{}", vm.stderr());
    assert_eq!(ended.as_deref(), Some("the guest powered off"), "{tail}");
    assert_eq!(
        vm.try_wait().unwrap().as_deref(),
        Some("the guest powered off")
    );
    tail
}

/// What the `virtio_check` guest reports of a plan's contract devices: vda and vdb, the root
/// and its hash tree, both read-only; the agent port; no rng.
#[allow(dead_code)]
pub fn assert_contract_devices(tail: &str) {
    assert!(tail.contains("mvm-guest: virtio devices=0x3\n"), "{tail}");
    assert_eq!(
        tail.matches("mvm-guest: blk read-only disk refused a write\n")
            .count(),
        2
    );
    assert!(tail.contains("mvm-guest: blk read sector 1: mvm-disk-sector-1\n"));
    assert!(tail.contains("mvm-guest: console port 1 is mvm.agent, open\n"));
    assert!(tail.contains("mvm-guest: console received: pong-from-host\n"));
    assert!(tail.ends_with("mvm-guest: ok\n"));
}
