//! Boots a kernel with mvm's own VMM, its serial console on standard output, and says how the
//! VM ended. A tool for trying the VMM by hand and for `scripts/vmm-nested-linux` (Linux on
//! this VMM inside a QEMU guest with emulated AMD-V); the runner does not use it.
//!
//! ```text
//! vmm_boot --kernel FILE [--initrd FILE] [--cmdline TEXT] [--memory-mib N] [--vcpus N]
//!          [--timeout-s N]
//! ```

use std::fs::File;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use mvm_vmm::{self as vmm, GuestExit, VmConfig};

fn main() -> ExitCode {
    let mut kernel = None;
    let mut initrd = None;
    let mut cmdline = String::from("console=ttyS0");
    let (mut memory_mib, mut vcpus, mut timeout_s) = (256u64, 1u8, 120u64);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let Some(value) = args.next() else {
            eprintln!("vmm_boot: {flag} needs a value");
            return ExitCode::from(2);
        };
        let number = |v: &str| v.parse::<u64>().ok();
        match flag.as_str() {
            "--kernel" => kernel = Some(PathBuf::from(value)),
            "--initrd" => initrd = Some(PathBuf::from(value)),
            "--cmdline" => cmdline = value,
            "--memory-mib" => memory_mib = number(&value).unwrap_or(0),
            "--vcpus" => {
                vcpus = number(&value)
                    .and_then(|n| u8::try_from(n).ok())
                    .unwrap_or(0)
            }
            "--timeout-s" => timeout_s = number(&value).unwrap_or(0),
            _ => {
                eprintln!("vmm_boot: unknown flag {flag}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(kernel) = kernel else {
        eprintln!("vmm_boot: --kernel is required");
        return ExitCode::from(2);
    };
    let open = |path: PathBuf| {
        File::open(&path).map_err(|e| eprintln!("vmm_boot: {}: {e}", path.display()))
    };
    let (Ok(kernel), Ok(initrd)) = (open(kernel), initrd.map(open).transpose()) else {
        return ExitCode::from(2);
    };
    let started = Instant::now();
    let vm = match vmm::build(VmConfig {
        vcpus,
        memory_mib,
        kernel,
        initrd,
        cmdline,
        console_log: Box::new(std::io::stdout()),
        block: Vec::new(),
        console_port: None,
        rng: true,
        huge_pages: false,
    }) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("vmm_boot: error {}: {e}", e.code());
            return ExitCode::from(1);
        }
    };
    let exit = vm.wait(Duration::from_secs(timeout_s));
    let first = vm.time_to_first_exit();
    let (end, states) = vm.stop_and_inspect();
    if exit.is_none() {
        for state in states {
            println!("vmm_boot: {state:x?}");
        }
    }
    println!(
        "vmm_boot: {} after {} ms (first guest exit after {:?})",
        match exit {
            Some(_) => format!("{end:?}"),
            None => format!("no end within {timeout_s} s; stopped"),
        },
        started.elapsed().as_millis(),
        first.unwrap_or_default(),
    );
    ExitCode::from(u8::from(end != GuestExit::PowerOff))
}
