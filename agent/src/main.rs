//! `mvm-agent`: `/init` of the guest's initramfs.
//!
//! It boots the verified root (see [`mvm_agent::boot`]), reports it on the console, and — in
//! this slice, before the host protocol exists — shows the image's `/etc/motd` as a first read
//! through dm-verity, then powers the guest off. Whatever fails is reported as one
//! `mvm-agent: error <code> <message>` line, followed by a power-off: PID 1 must never exit or
//! panic, which would panic the kernel.

use std::io::{self, Write};

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
    match boot::run(started).and_then(|booted| {
        console.line(&format!("root ready {}", booted.verity.root_hash));
        console.line(&format!("boot ms {}", booted.timings));
        show_motd(&mut console)
    }) {
        Ok(()) => {}
        Err(error) => console.error(&error),
    }
    console.power_off()
}

/// Prints the image's `/etc/motd`, if it has one: the first file read through dm-verity. A
/// block that fails verification makes the read fail with EIO, reported as an integrity error.
fn show_motd(console: &mut console::Console) -> Result<(), BootError> {
    match std::fs::read("/etc/motd") {
        Ok(motd) => {
            for line in String::from_utf8_lossy(&motd).lines() {
                console.line(&format!("motd: {line}"));
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) if source.raw_os_error() == Some(rustix::io::Errno::IO.raw_os_error()) => {
            Err(BootError::Integrity {
                path: "/etc/motd".into(),
                source,
            })
        }
        Err(source) => Err(BootError::System {
            what: "/etc/motd".into(),
            source,
        }),
    }
}
