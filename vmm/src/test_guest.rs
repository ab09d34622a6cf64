//! The purpose-built test guests (`vmm/tests/guest/*.S`): 64-bit code entered the way a
//! Linux kernel is, a few KiB each, which run on any `/dev/kvm` — PVM included, where a stock
//! kernel does not boot. [`assemble`] turns their source into an ELF with the host's `as` and
//! `ld` (binutils); the tests (this crate's and the runner's) and `mvm bench vmm` build them
//! through it, from source. The rest is the harness those tests share: whether this host can
//! run them, the VM most of them get, a console they read back, disks.
//!
//! Only with the `testing` feature: none of it is part of a VM mvm runs.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::{BlockConfig, VmConfig};

/// The code every test guest shares (serial output, ACPI power-off and reset); first.
pub const LIB: &str = include_str!("../tests/guest/lib.S");
/// The guest that checks its boot data, prints on COM1 and powers off (its command line must
/// start with `mvm-test-guest`).
pub const BOOT_CHECK: &str = include_str!("../tests/guest/boot_check.S");
/// The guest that never ends by itself; with `tick` on its command line it writes a line `.`
/// to COM1 every 256 turns of its loop.
pub const SPIN: &str = include_str!("../tests/guest/spin.S");

/// Generous: under PVM the guest's every instruction is emulated (~1 µs each).
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// The most console bytes a [`Console`] keeps in memory (its tail).
const TAIL_LIMIT: usize = 64 << 10;

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

/// Assembles `vmm/tests/guest/<part>.S` for each of `parts` as one stream (shared code
/// first, the guest's own file last) and links the result at 2 MiB into `dir`; returns the
/// ELF's path. Panics on failure: for tests.
pub fn build(dir: &Path, parts: &[&str]) -> PathBuf {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest");
    let sources: Vec<String> = parts
        .iter()
        .map(|part| std::fs::read_to_string(folder.join(format!("{part}.S"))).unwrap())
        .collect();
    let name = parts.last().expect("a guest has a file of its own");
    let sources: Vec<&str> = sources.iter().map(String::as_str).collect();
    assemble(dir, name, &sources).unwrap_or_else(|e| panic!("{e}"))
}

/// The serial console as a test sees it: the last bytes in memory, shared by its clones.
#[derive(Debug, Clone, Default)]
pub struct Console(Arc<Mutex<Vec<u8>>>);

impl Console {
    /// The last bytes of the console, as text.
    pub fn tail(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }

    /// A writer for a VM's console: every byte into `log` and into this console.
    pub fn logging_into(&self, log: File) -> Box<dyn Write + Send> {
        Box::new(Tee {
            log,
            console: self.clone(),
        })
    }
}

struct Tee {
    log: File,
    console: Console,
}

impl Write for Tee {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let mut tail = self
            .console
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        tail.extend_from_slice(bytes);
        let excess = tail.len().saturating_sub(TAIL_LIMIT);
        tail.drain(..excess);
        self.log.write_all(bytes)?;
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.log.flush()
    }
}

/// The machine most test guests get: one vCPU, 64 MiB, the cmdline `mvm-test-guest`, the
/// console logged into `dir/serial.log` and shown in `serial`, no devices beyond the
/// built-in ones. Tests change what they need with `..config(…)`.
pub fn config(dir: &Path, kernel: PathBuf, serial: &Console) -> VmConfig {
    VmConfig {
        vcpus: 1,
        memory_mib: 64,
        kernel: File::open(kernel).unwrap(),
        initrd: None,
        cmdline: "mvm-test-guest".into(),
        console_log: serial.logging_into(File::create(dir.join("serial.log")).unwrap()),
        block: Vec::new(),
        console_port: None,
        rng: false,
        huge_pages: false,
    }
}

/// A disk backed by `path`, named `id`.
pub fn disk(path: &Path, id: &str, read_only: bool) -> BlockConfig {
    BlockConfig::open(path, read_only, id).unwrap()
}

/// Writes a disk image of `sectors` 512-byte sectors, sector `n` starting with `fill(n)`.
pub fn image(path: &Path, sectors: usize, fill: impl Fn(usize) -> Vec<u8>) {
    let mut bytes = Vec::new();
    for n in 0..sectors {
        let mut sector = fill(n);
        sector.resize(512, 0);
        bytes.extend(sector);
    }
    std::fs::write(path, bytes).unwrap();
}

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
