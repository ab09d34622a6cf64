//! Builds the purpose-built test guests in this folder with the host's `as` and `ld`, and says
//! whether this host can run them.
//!
//! The guests are 64-bit code entered the way a Linux kernel is, a few KiB each: they run on
//! any `/dev/kvm`, including this project's PVM hosts, where a stock kernel does not boot.

use std::path::{Path, PathBuf};
use std::process::Command;

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
    let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest");
    let name = parts.last().expect("a guest has a file of its own");
    let object = dir.join(format!("{name}.o"));
    let elf = dir.join(format!("{name}.elf"));
    let mut assemble = Command::new("as");
    assemble.arg("--64").arg("-o").arg(&object);
    for part in parts {
        assemble.arg(sources.join(format!("{part}.S")));
    }
    run(&mut assemble);
    run(Command::new("ld")
        .args([
            "-nostdlib",
            "-static",
            "-e",
            "_start",
            "-Ttext=0x200000",
            "--build-id=none",
        ])
        .args(["-z", "max-page-size=0x1000", "-o"])
        .arg(&elf)
        .arg(&object));
    elf
}

fn run(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e} (binutils' as and ld build the test guest)"));
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
