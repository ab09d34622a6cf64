//! Builds the purpose-built test guests in this folder (through
//! `mvm_runner::vmm::test_guest`, with the host's `as` and `ld`), and says whether this host
//! can run them.
//!
//! The guests are 64-bit code entered the way a Linux kernel is, a few KiB each: they run on
//! any `/dev/kvm`, including this project's PVM hosts, where a stock kernel does not boot.

use std::path::{Path, PathBuf};

use mvm_runner::serial::Console;
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
pub fn config(dir: &Path, kernel: PathBuf, serial: &Console) -> VmConfig {
    VmConfig {
        vcpus: 1,
        memory_mib: 64,
        kernel,
        initrd: None,
        cmdline: "mvm-test-guest".into(),
        serial_log: std::fs::File::create(dir.join("serial.log")).unwrap(),
        serial: serial.clone(),
        block: Vec::new(),
        agent_channel: None,
        rng: false,
    }
}

/// A disk backed by `path`, named `id` (not every test binary that shares this module has
/// disks).
#[allow(dead_code)]
pub fn disk(path: &Path, id: &str, read_only: bool) -> BlockConfig {
    BlockConfig {
        path: path.to_path_buf(),
        read_only,
        id: id.into(),
    }
}
