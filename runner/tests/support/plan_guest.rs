//! The runner's side of the purpose-built test guests (`mvm_vmm::test_guest`): a plan whose
//! kernel is the `virtio_check` guest, its files, and the checks a test makes of the VM a
//! backend runs from it.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use mvm_ir::plan::LaunchPlan;
use mvm_runner::backend::kvm::{spec_for_plan, OwnVmFiles};
use mvm_runner::backend::VmProcess;
use mvm_vmm::VmSpec;

pub use mvm_vmm::test_guest::{build, image, kvm_unavailable, TIMEOUT};

/// The example plan, with the test guest's command line and small resources.
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
pub struct PlanFiles {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub rootfs: PathBuf,
    pub verity: PathBuf,
}

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
        spec_for_plan(plan, &self.own()).unwrap()
    }

    /// As the kvm backend takes them.
    pub fn own(&self) -> OwnVmFiles<'_> {
        OwnVmFiles {
            kernel: &self.kernel,
            initramfs: &self.initramfs,
            rootfs: &self.rootfs,
            verity: &self.verity,
            disks: &[],
        }
    }
}

/// Reads the agent channel until the `virtio_check` guest's ping; the guest then waits for
/// the host's pong.
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
