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
use std::process::Stdio;

use crate::backend::child::ChildVm;
use crate::backend::{Pausable, SavedMemory};
use qmp::Qmp;

pub use command_line::{arguments, VmFiles};

/// QEMU's QMP socket in the VM's directory: how the runner pauses, resumes and saves it.
pub const QMP_SOCKET: &str = "qmp.sock";

/// A running QEMU.
pub type QemuVm = ChildVm;

/// Starts `qemu` with `args`, its console recorded into `serial_log`. Call it from the thread
/// that outlives the VM (see [`ChildVm::spawn`]).
pub fn spawn(qemu: &Path, args: &[OsString], serial_log: File) -> io::Result<QemuVm> {
    let mut command = mvm_ir::env::command(qemu);
    command.args(args).env_clear().stdin(Stdio::null());
    ChildVm::spawn(&mut command, serial_log)
}

/// QEMU pauses and resumes through QMP (`stop`, `cont`) and saves by migrating to a file.
impl Pausable for Qmp {
    fn pause(&mut self) -> io::Result<()> {
        self.execute("stop")
    }

    fn resume(&mut self) -> io::Result<()> {
        self.execute("cont")
    }

    fn save(&mut self, socket: &Path, into: &mut File) -> io::Result<SavedMemory> {
        migration::save(self, socket, into)
    }
}
