//! `mvm-agent`: `/init` of the guest's initramfs.
//!
//! It boots the verified root (see [`mvm_agent::boot`]), reports it on the console, and — in
//! this slice, before the host protocol exists — runs the image's shell to print its
//! `/etc/motd`, a first program executed through dm-verity, then powers the guest off.
//! Whatever fails is reported as one `mvm-agent: error <code> <message>` line, followed by a
//! power-off: PID 1 must never exit or panic, which would panic the kernel.

use std::io::Write;
use std::process::Command;

use mvm_agent::boot::{self, console, BootError};

fn main() {
    let started = boot::since_kernel_start();
    std::panic::set_hook(Box::new(|info| {
        let mut last_word = console::reopen();
        if let Some(console) = last_word.as_mut() {
            let _ = writeln!(console, "mvm-agent: error AGENT000 panic: {info}");
        }
        console::power_off(last_word.as_ref())
    }));
    let Ok(mut console) = console::Console::open() else {
        // Nowhere to say it: the power-off itself tells the host the guest failed early.
        console::power_off(None)
    };
    let outcome = boot::run(started).and_then(|booted| {
        console.line(&format!("root ready {}", booted.verity.root_hash));
        console.line(&format!("boot ms {}", booted.timings));
        run_first_command(&mut console)
    });
    if let Err(error) = outcome {
        console.error(&error);
    }
    console.power_off()
}

/// The slice's stand-in for a workload: the image's own shell printing its `/etc/motd`, the
/// first program executed from the verified root. A block of `/bin/sh` that fails verification
/// makes the exec fail with EIO, reported as an integrity error.
const FIRST_COMMAND: [&str; 3] = ["/bin/sh", "-c", "cat /etc/motd"];

fn run_first_command(console: &mut console::Console) -> Result<(), BootError> {
    let [program, args @ ..] = FIRST_COMMAND;
    let status = Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", "/bin:/usr/bin:/sbin:/usr/sbin")
        .status()
        .map_err(|source| {
            if source.raw_os_error() == Some(rustix::io::Errno::IO.raw_os_error()) {
                BootError::Integrity {
                    path: program.into(),
                    source,
                }
            } else {
                BootError::System {
                    what: program.into(),
                    source,
                }
            }
        })?;
    console.line(&format!("{} {status}", FIRST_COMMAND.join(" ")));
    Ok(())
}
