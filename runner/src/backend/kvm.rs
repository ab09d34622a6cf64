//! The `kvm` backend: mvm's own VMM ([`mvm_vmm`]) running a plan, on threads of this runner
//! ([`OwnVm`]) or jailed in a child process ([`jailed`]). It gives the guest the contract the
//! QEMU backend gives: the root image and its hash tree as read-only vda and vdb, the agent's
//! console port `mvm.agent` (one end of a socketpair, connected before the guest starts), the
//! serial console in the VM's bounded log.

use std::fs::File;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;

use mvm_ir::digest::Sha256Writer;
use mvm_ir::plan::LaunchPlan;
use mvm_protocol::PORT_NAME;
use mvm_vmm::snapshot::{self, SnapshotReader};
use mvm_vmm::{ConsolePort, DiskSpec, GuestExit, Machine, MicroVm, PauseError, VmSpec, VmmError};

use super::{copy_hashing, Pausable, SavedMemory, WakeError};
use crate::console_log::{BoundedLog, Console};

pub mod jailed;

/// The own VMM in this process pauses by parking its threads ([`mvm_vmm::pause`]) and saves
/// into its snapshot file ([`mvm_vmm::snapshot`]); it needs no socket.
impl Pausable for Machine {
    fn pause(&mut self) -> io::Result<()> {
        Machine::pause(self).map_err(io::Error::other)
    }

    fn resume(&mut self) -> io::Result<()> {
        Machine::resume(self).map_err(io::Error::other)
    }

    fn save(&mut self, _socket: &Path, into: &mut File) -> io::Result<SavedMemory> {
        let mut hashed = Sha256Writer::new(io::BufWriter::new(into));
        Machine::save(self, &mut hashed)
            .map_err(|e| io::Error::other(format!("{}: {e}", e.code())))?;
        let (sha256, bytes) = hashed.finish()?;
        Ok(SavedMemory { sha256, bytes })
    }
}

/// A VM that has ended cannot be paused (nor resumed).
pub(super) struct Ended;

impl Pausable for Ended {
    fn pause(&mut self) -> io::Result<()> {
        Err(io::Error::other(PauseError::Ended))
    }

    fn resume(&mut self) -> io::Result<()> {
        Err(io::Error::other(PauseError::Ended))
    }
}

/// mvm's own VMM running a plan.
#[derive(Debug)]
pub struct OwnVm {
    pub(super) vm: Option<MicroVm>,
    pub(super) console: Console,
    pub(super) channel: Option<UnixStream>,
    ended: Option<GuestExit>,
}

/// The files a plan boots from with the own VMM: the private copies of the kernel and
/// initramfs, and the two disks.
#[derive(Debug, Clone, Copy)]
pub struct OwnVmFiles<'a> {
    /// The kernel (bzImage or ELF vmlinux).
    pub kernel: &'a Path,
    /// The initramfs.
    pub initramfs: &'a Path,
    /// The EROFS image (vda).
    pub rootfs: &'a Path,
    /// Its hash tree (vdb).
    pub verity: &'a Path,
    /// The launch's own disks (vdc on), each with its serial as its id.
    pub disks: &'a [crate::disk::LaunchDisk],
}

/// The guest contract for `plan` booted from `files`: the root image and its hash tree as
/// read-only vda and vdb, no rng.
pub fn spec_for_plan(plan: &LaunchPlan, files: &OwnVmFiles<'_>) -> Result<VmSpec, VmmError> {
    let vcpus = u8::try_from(plan.resources.cpu_cores)
        .map_err(|_| VmmError::Config(format!("{} vCPUs", plan.resources.cpu_cores)))?;
    let disk = |path: &Path, id: &str| DiskSpec {
        path: path.to_path_buf(),
        read_only: true,
        id: id.into(),
    };
    Ok(VmSpec {
        vcpus,
        memory_mib: u64::from(plan.resources.memory_mb),
        kernel: files.kernel.to_path_buf(),
        initrd: Some(files.initramfs.to_path_buf()),
        cmdline: plan.kernel.cmdline.clone(),
        disks: [disk(files.rootfs, "root"), disk(files.verity, "verity")]
            .into_iter()
            .chain(
                files
                    .disks
                    .iter()
                    .enumerate()
                    .map(|(index, launch_disk)| DiskSpec {
                        path: launch_disk.file.clone(),
                        read_only: !launch_disk.device_writable(),
                        id: crate::disk::LaunchDisk::serial(index),
                    }),
            )
            .collect(),
        // Not in the guest contract (the QEMU backend has none).
        rng: false,
        huge_pages: false,
    })
}

/// The agent's channel as the VMM's named console port ([`PORT_NAME`]), its host end
/// `host_end`.
pub fn agent_port(host_end: UnixStream) -> ConsolePort {
    ConsolePort {
        name: PORT_NAME.into(),
        host_end,
    }
}

impl OwnVm {
    /// Boots `spec`, the serial console logged into `serial_log`.
    pub fn boot(spec: VmSpec, serial_log: File) -> Result<Self, VmmError> {
        let (guest_end, host_end) = UnixStream::pair().map_err(|e| VmmError::Device {
            device: "agent channel".into(),
            reason: e.to_string(),
        })?;
        let console = Console::default();
        let files = spec.open()?;
        let log = Box::new(BoundedLog::new(serial_log, console.clone()));
        let vm = mvm_vmm::build(spec.config(files, log, Some(agent_port(guest_end))))?;
        Ok(OwnVm {
            vm: Some(vm),
            console,
            channel: Some(host_end),
            ended: None,
        })
    }

    /// Restores the VM saved in `memory` (a cold VM the own VMM saved, whose digest and size
    /// were `expected`) as `spec` (the plan's files), paused until its machine resumes it.
    /// Its file is read once: hashed as its pages go into the new VM's RAM, and its state
    /// parsed only once that digest is the expected one ([`WakeError::Changed`] otherwise);
    /// what does not restore is [`WakeError::Refused`]. Either way nothing runs.
    pub fn restore(
        spec: VmSpec,
        serial_log: File,
        memory: &mut File,
        expected: &SavedMemory,
    ) -> Result<Self, WakeError> {
        let unrestorable = |e: VmmError| WakeError::Refused(format!("{}: {e}", e.code()));
        let (guest_end, host_end) = UnixStream::pair()
            .map_err(|e| WakeError::Refused(format!("the agent channel: {e}")))?;
        let console = Console::default();
        let opened = spec.open().map_err(unrestorable)?;
        let log = Box::new(BoundedLog::new(serial_log, console.clone()));
        let config = spec.config(opened, log, Some(agent_port(guest_end)));
        let ram = mvm_vmm::builder::guest_ram(&config).map_err(unrestorable)?;
        let mut reader = SnapshotReader::new(&ram);
        let read = copy_hashing(memory, &mut reader);
        let state = reader.finish();
        let seen = read.map_err(|e| match &state {
            Err(malformed) => WakeError::Refused(format!("{}: {malformed}", malformed.code())),
            Ok(_) => WakeError::Refused(format!("reading its state: {e}")),
        })?;
        seen.check(expected)?;
        let saved_vm = state
            .and_then(|state| snapshot::parse(&state))
            .map_err(unrestorable)?;
        let vm = mvm_vmm::restore(config, ram, &saved_vm).map_err(unrestorable)?;
        Ok(OwnVm {
            vm: Some(vm),
            console,
            channel: Some(host_end),
            ended: None,
        })
    }

    /// What pauses, resumes and saves the VM: its machine while it runs; once it ended,
    /// one that says so.
    pub fn machine(&self) -> Box<dyn Pausable> {
        match self.vm.as_ref().map(MicroVm::machine) {
            Some(machine) => Box::new(machine),
            None => Box::new(Ended),
        }
    }

    pub(super) fn poll(&mut self) -> Option<GuestExit> {
        if self.ended.is_none() {
            if let Some(exit) = self.vm.as_ref().and_then(MicroVm::ended) {
                // Joins its threads and flushes the console: the VM is over.
                if let Some(vm) = self.vm.take() {
                    vm.stop();
                }
                self.ended = Some(exit);
            }
        }
        self.ended.clone()
    }

    /// Stops the VM; one that was still running when stopped has where its vCPUs were
    /// written to stderr (the runner's log): what a guest that stopped answering was doing.
    pub(super) fn kill(&mut self) {
        if let Some(vm) = self.vm.take() {
            let running = vm.ended().is_none();
            let (exit, vcpus) = vm.stop_and_inspect();
            if running {
                for vcpu in vcpus {
                    eprintln!(
                        "mvm-runner: stopped while running: vCPU {} at rip {:#x}, rflags {:#x} \
                         (interrupts {}), rsp {:#x}, rbx {:#x}, kernel text on its stack {:x?}",
                        vcpu.id,
                        vcpu.rip,
                        vcpu.rflags,
                        if vcpu.rflags & (1 << 9) != 0 {
                            "on"
                        } else {
                            "off"
                        },
                        vcpu.rsp,
                        vcpu.rbx,
                        vcpu.stack_code
                    );
                }
            }
            self.ended.get_or_insert(exit);
        }
    }
}
