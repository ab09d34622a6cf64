//! The purpose-built test guests (`runner/tests/guest/*.S`): 64-bit code entered the way a
//! Linux kernel is, a few KiB each, which run on any `/dev/kvm` — PVM included, where a stock
//! kernel does not boot. [`assemble`] turns their source into an ELF with the host's `as` and
//! `ld` (binutils); the tests and `mvm bench vmm` both build them through it, from source.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The code every test guest shares (serial output, ACPI power-off and reset); first.
pub const LIB: &str = include_str!("../../tests/guest/lib.S");
/// The guest that checks its boot data, prints on COM1 and powers off (its command line must
/// start with `mvm-test-guest`).
pub const BOOT_CHECK: &str = include_str!("../../tests/guest/boot_check.S");

/// Assembles `sources` as one stream, in order (shared code first), and links the result at
/// 2 MiB as `dir/<name>.elf`; returns its path.
pub fn assemble(dir: &Path, name: &str, sources: &[&str]) -> io::Result<PathBuf> {
    let source = dir.join(format!("{name}.S"));
    let object = dir.join(format!("{name}.o"));
    let elf = dir.join(format!("{name}.elf"));
    std::fs::write(&source, sources.join("\n"))?;
    run(Command::new("as")
        .arg("--64")
        .arg("-o")
        .arg(&object)
        .arg(&source))?;
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
        .arg(&object))?;
    Ok(elf)
}

fn run(command: &mut Command) -> io::Result<()> {
    let program = command.get_program().to_string_lossy().into_owned();
    let output = command.output().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("{program}: {e} (binutils' as and ld build the test guests)"),
        )
    })?;
    if output.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{program} failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    )))
}
