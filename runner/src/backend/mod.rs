//! The backends that run a plan's VM, behind one seam: a supervised QEMU process ([`qemu`]),
//! or mvm's own VMM ([`kvm`]) on threads of this runner or jailed in a child process. Which one
//! runs is chosen for the host by [`select`].
//!
//! Both give the guest the same contract — the plan's kernel, initramfs and command line, the
//! root image and its hash tree as read-only disks vda and vdb, the agent's console port named
//! `mvm.agent`, the serial console in the VM's bounded log — and the launch sees both the same
//! way ([`VmProcess`]): a console, a way to learn that the VM ended, a way to end it, and a
//! machine that pauses, resumes and saves it ([`Pausable`]). The agent channel of QEMU is a
//! unix socket QEMU connects to; that of the own VMM is one end of a socketpair, connected
//! before the guest starts.
//!
//! Nothing here knows of named VMs, cold states, control sockets or launches: those build on
//! this module (`cold`, `control`, `launch`), never the other way.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use mvm_vmm::GuestExit;
use serde::{Deserialize, Serialize};

use crate::console_log::Console;

pub mod child;
#[cfg(test)]
pub(crate) mod fake;
pub mod kvm;
pub mod qemu;
pub mod select;

pub use select::Backend;

use kvm::jailed::JailedVm;
use kvm::OwnVm;
use qemu::qmp::Qmp;
use qemu::QemuVm;

/// Stops and restarts a VM's vCPUs (QEMU's QMP `stop`/`cont`; the kvm backend's own), and
/// saves a stopped VM's state.
pub trait Pausable: Send {
    /// Stops the vCPUs; memory and devices are kept.
    fn pause(&mut self) -> io::Result<()>;
    /// Lets them run again.
    fn resume(&mut self) -> io::Result<()>;
    /// Writes the stopped VM's memory and device state into `into`, through a socket it may
    /// make at `socket`.
    fn save(&mut self, socket: &Path, into: &mut File) -> io::Result<SavedMemory> {
        let _ = (socket, into);
        Err(io::Error::other("this backend cannot save a VM"))
    }
}

/// The saved state's digest and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedMemory {
    /// `sha256:` of the bytes.
    pub sha256: String,
    /// How many.
    pub bytes: u64,
}

impl SavedMemory {
    /// Refused unless this is what `expected` says was saved.
    pub fn check(&self, expected: &SavedMemory) -> Result<(), WakeError> {
        if self != expected {
            return Err(WakeError::Changed {
                seen: self.clone(),
                expected: expected.clone(),
            });
        }
        Ok(())
    }
}

/// Why a backend could not wake a saved VM; nothing runs, and the VM stays saved.
#[derive(Debug, thiserror::Error)]
pub enum WakeError {
    /// What was read is not what was saved.
    #[error("its memory is {} ({} bytes), the manifest says {} ({} bytes)", seen.sha256, seen.bytes, expected.sha256, expected.bytes)]
    Changed {
        /// What was read.
        seen: SavedMemory,
        /// What was saved.
        expected: SavedMemory,
    },
    /// The backend could not take the saved state.
    #[error("{0}")]
    Refused(String),
}

/// Copies `from` to `to` until `from` ends, hashing what passes.
pub(crate) fn copy_hashing(from: &mut impl Read, to: &mut impl Write) -> io::Result<SavedMemory> {
    let (sha256, bytes) = mvm_ir::digest::sha256_reader(Tee { from, to: &mut *to })?;
    to.flush()?;
    Ok(SavedMemory { sha256, bytes })
}

/// A reader that writes everything it reads to `to` as well.
struct Tee<R, W> {
    from: R,
    to: W,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let n = self.from.read(buffer)?;
        self.to.write_all(&buffer[..n])?;
        Ok(n)
    }
}

/// A running VM.
#[derive(Debug)]
pub enum VmProcess {
    /// QEMU, in a process group of its own.
    Qemu(QemuVm),
    /// mvm's own VMM, in this process.
    Own(OwnVm),
    /// mvm's own VMM, jailed in a child process ([`kvm::jailed`]).
    Jailed(JailedVm),
}

impl VmProcess {
    /// The backend that runs it.
    pub fn backend(&self) -> Backend {
        match self {
            VmProcess::Qemu(_) => Backend::Qemu,
            VmProcess::Own(_) | VmProcess::Jailed(_) => Backend::Kvm,
        }
    }

    /// The backend's name, for messages ("QEMU exited …").
    pub fn name(&self) -> &'static str {
        match self {
            VmProcess::Qemu(_) => "QEMU",
            VmProcess::Own(_) => "the VM",
            VmProcess::Jailed(_) => "the jailed VM",
        }
    }

    /// The process whose end of the agent channel is trusted: QEMU's, the jailed VMM's
    /// child's, or this runner's.
    pub fn pid(&self) -> u32 {
        match self {
            VmProcess::Qemu(qemu) => qemu.pid(),
            VmProcess::Own(_) => std::process::id(),
            VmProcess::Jailed(jailed) => jailed.pid(),
        }
    }

    /// The guest's serial console so far.
    pub fn console(&self) -> &Console {
        match self {
            VmProcess::Qemu(qemu) => qemu.console(),
            VmProcess::Own(own) => &own.console,
            VmProcess::Jailed(jailed) => jailed.console(),
        }
    }

    /// The agent channel, if the backend connected it before the guest started (the own
    /// VMM); `None` means accept it on the VM's socket (QEMU). Given out once.
    pub fn take_channel(&mut self) -> Option<UnixStream> {
        match self {
            VmProcess::Qemu(_) => None,
            VmProcess::Own(own) => own.channel.take(),
            VmProcess::Jailed(jailed) => jailed.take_channel(),
        }
    }

    /// How the VM ended, if it has.
    pub fn try_wait(&mut self) -> io::Result<Option<String>> {
        match self {
            VmProcess::Qemu(qemu) => Ok(qemu.try_wait()?.map(|status| status.to_string())),
            VmProcess::Own(own) => Ok(own.poll().map(|exit| describe(&exit))),
            VmProcess::Jailed(jailed) => Ok(jailed.try_wait()?.map(|exit| describe(&exit))),
        }
    }

    /// Waits up to `timeout` for the VM to end by itself.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> io::Result<Option<String>> {
        match self {
            VmProcess::Qemu(qemu) => Ok(qemu.wait_for_exit(timeout)?.map(|s| s.to_string())),
            VmProcess::Own(own) => {
                let deadline = Instant::now() + timeout;
                loop {
                    if let Some(exit) = own.poll() {
                        return Ok(Some(describe(&exit)));
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    if let Some(vm) = &own.vm {
                        vm.wait(left);
                    }
                }
            }
            VmProcess::Jailed(jailed) => Ok(jailed.wait_for_exit(timeout)?.map(|e| describe(&e))),
        }
    }

    /// What the backend said on its way out (QEMU's or the jailed VMM's standard error;
    /// nothing for the own VMM in this process, whose ends are described by
    /// [`VmProcess::try_wait`]).
    pub fn stderr(&self) -> String {
        match self {
            VmProcess::Qemu(qemu) => qemu.stderr(),
            VmProcess::Own(_) => String::new(),
            VmProcess::Jailed(jailed) => jailed.stderr(),
        }
    }

    /// What pauses and resumes the VM: QEMU's QMP socket in the VM's directory `dir`, the
    /// own VMM's pauser, or the jailed VMM's control socket.
    pub fn machine(&self, dir: &Path) -> io::Result<Box<dyn Pausable>> {
        match self {
            VmProcess::Qemu(_) => Ok(Box::new(Qmp::connect(&dir.join(qemu::QMP_SOCKET))?)),
            VmProcess::Own(own) => Ok(own.machine()),
            VmProcess::Jailed(jailed) => Ok(Box::new(jailed.control()?)),
        }
    }

    /// What pauses the VM and saves it the way a boot snapshot keeps it
    /// ([`crate::boot_snapshot`]): its device state alone, its RAM in the file `ram`. QEMU
    /// (booted with its RAM shared in that file, [`qemu::command_line::ram_file_arguments`])
    /// is told to leave RAM out of the state it streams (`x-ignore-shared`), through the QMP
    /// socket in the VM's directory `dir`; the own VMM writes RAM there as a flat image. A
    /// jailed VM is never saved.
    pub fn boot_snapshot_machine(&self, dir: &Path, ram: &Path) -> io::Result<Box<dyn Pausable>> {
        match self {
            VmProcess::Qemu(_) => {
                let mut qmp = Qmp::connect(&dir.join(qemu::QMP_SOCKET))?;
                qemu::migration::set_ignore_shared(&mut qmp, true)?;
                Ok(Box::new(qmp))
            }
            VmProcess::Own(own) => Ok(Box::new(own.flat_save(ram)?)),
            VmProcess::Jailed(_) => Err(io::Error::other("a jailed VM is never saved")),
        }
    }

    /// Ends the VM now, if it has not ended.
    pub fn kill(&mut self) {
        match self {
            VmProcess::Qemu(qemu) => qemu.kill(),
            VmProcess::Own(own) => own.kill(),
            VmProcess::Jailed(jailed) => jailed.kill(),
        }
    }
}

/// A guest's end in words.
fn describe(exit: &GuestExit) -> String {
    match exit {
        GuestExit::PowerOff => "the guest powered off".into(),
        GuestExit::Reset => "the guest reset".into(),
        GuestExit::TripleFault => "the guest triple-faulted".into(),
        GuestExit::Failed(reason) => reason.clone(),
        GuestExit::Stopped => "stopped by the runner".into(),
    }
}
