//! The `qemu` backend: a supervised `qemu-system-x86_64 -M microvm` per VM, a [`ChildVm`]
//! (in a process group of its own, killed with the runner, its standard output the guest's
//! serial console, its standard error kept for error reports).

pub mod command_line;
pub mod migration;
pub mod qmp;

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::child::ChildVm;

pub use command_line::{arguments, VmFiles};

/// A running QEMU.
pub type QemuVm = ChildVm;

/// Starts `qemu` with `args`, its console recorded into `serial_log`. Call it from the thread
/// that outlives the VM (see [`ChildVm::spawn`]).
pub fn spawn(qemu: &Path, args: &[OsString], serial_log: File) -> io::Result<QemuVm> {
    let mut command = Command::new(qemu);
    command.args(args).env_clear().stdin(Stdio::null());
    ChildVm::spawn(&mut command, serial_log)
}
