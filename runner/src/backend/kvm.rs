//! The `kvm` backend: mvm's own VMM ([`mvm_vmm`]) running a plan, on threads of this runner
//! ([`OwnVm`]) or jailed in a child process ([`jailed`]). It gives the guest the contract the
//! QEMU backend gives: the root image and its hash tree as read-only vda and vdb, the agent's
//! console port `mvm.agent` (one end of a socketpair, connected before the guest starts), the
//! serial console in the VM's bounded log.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use mvm_ir::digest::Sha256Writer;
use mvm_ir::plan::LaunchPlan;
use mvm_protocol::PORT_NAME;
use mvm_vmm::snapshot::{self, SavedVm, SnapshotReader};
use mvm_vmm::vstate::memory;
use mvm_vmm::{
    ConsolePort, DiskSpec, GuestExit, Machine, MicroVm, PauseError, VmConfig, VmSpec, VmmError,
};

use super::{copy_hashing, Pausable, SavedMemory, WakeError};
use crate::console_log::{BoundedLog, Console};

pub mod jailed;

/// The own VMM's version, as a boot snapshot's shape names it: the VMM is built into the
/// runner, so a state it saved is restored by the runner of the same version. (A state that
/// no longer parses is refused and made anew whatever the version says.)
pub const VERSION: &str = concat!("mvm-runner ", env!("CARGO_PKG_VERSION"));

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

/// A VM's configuration wired to the runner: its files open, its serial console logged into
/// the VM's log (and kept in `console`), the agent port on one end of a new socketpair whose
/// other end is `host_end`.
struct Wired {
    config: VmConfig,
    console: Console,
    host_end: UnixStream,
}

impl Wired {
    fn new(spec: VmSpec, serial_log: File) -> Result<Self, VmmError> {
        let (guest_end, host_end) = UnixStream::pair().map_err(|e| VmmError::Device {
            device: "agent channel".into(),
            reason: e.to_string(),
        })?;
        let console = Console::default();
        let files = spec.open()?;
        let log = Box::new(BoundedLog::new(serial_log, console.clone()));
        Ok(Wired {
            config: spec.config(files, log, Some(agent_port(guest_end))),
            console,
            host_end,
        })
    }
}

/// The own VMM's machine saving a paused VM the way a boot snapshot keeps it
/// ([`crate::boot_snapshot`]): guest RAM as a flat image in a new file at `ram` (0600; what
/// restored VMs map, [`OwnVm::from_boot_snapshot`]), its state as JSON
/// ([`snapshot::state_json`]) into the file it is given.
pub struct FlatSave {
    /// The paused VM's machine.
    pub machine: Machine,
    /// Where its RAM image goes.
    pub ram: PathBuf,
}

impl Pausable for FlatSave {
    fn pause(&mut self) -> io::Result<()> {
        Pausable::pause(&mut self.machine)
    }

    fn resume(&mut self) -> io::Result<()> {
        Pausable::resume(&mut self.machine)
    }

    fn save(&mut self, _socket: &Path, into: &mut File) -> io::Result<SavedMemory> {
        let failed = |e: VmmError| io::Error::other(format!("{}: {e}", e.code()));
        let ram = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&self.ram)?;
        let state = self.machine.save_flat(&ram).map_err(failed)?;
        let json = snapshot::state_json(&state).map_err(failed)?;
        into.write_all(&json)?;
        Ok(SavedMemory {
            sha256: mvm_ir::digest::sha256_prefixed(&json),
            bytes: json.len() as u64,
        })
    }
}

impl OwnVm {
    /// Boots `spec`, the serial console logged into `serial_log`.
    pub fn boot(spec: VmSpec, serial_log: File) -> Result<Self, VmmError> {
        let wired = Wired::new(spec, serial_log)?;
        let vm = mvm_vmm::build(wired.config)?;
        Ok(Self::running(vm, wired.console, wired.host_end))
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
        let wired = Wired::new(spec, serial_log).map_err(unrestorable)?;
        let ram = mvm_vmm::builder::guest_ram(&wired.config).map_err(unrestorable)?;
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
        let vm = mvm_vmm::restore(wired.config, ram, &saved_vm).map_err(unrestorable)?;
        Ok(Self::running(vm, wired.console, wired.host_end))
    }

    /// Restores a boot snapshot ([`crate::boot_snapshot`]) as `spec`, paused until its
    /// machine resumes it: its device state `saved`, its guest RAM mapped copy-on-write from
    /// the flat image `ram` ([`memory::map_flat`]) — nothing is read until the guest touches
    /// a page, so the restore costs the same at any memory size, what the guest writes stays
    /// its own, and every VM restored from one image shares the pages it has not written.
    /// Both were verified by the snapshot's store.
    pub fn from_boot_snapshot(
        spec: VmSpec,
        serial_log: File,
        ram: &File,
        saved: &SavedVm,
    ) -> Result<Self, VmmError> {
        let wired = Wired::new(spec, serial_log)?;
        let memory =
            memory::map_flat(wired.config.memory_mib << 20, ram).map_err(VmmError::Memory)?;
        let vm = mvm_vmm::restore(wired.config, memory, saved)?;
        Ok(Self::running(vm, wired.console, wired.host_end))
    }

    fn running(vm: MicroVm, console: Console, host_end: UnixStream) -> Self {
        OwnVm {
            vm: Some(vm),
            console,
            channel: Some(host_end),
            ended: None,
        }
    }

    /// What pauses it and saves it as a boot snapshot keeps it, its RAM into a new file at
    /// `ram` ([`FlatSave`]).
    pub fn flat_save(&self, ram: &Path) -> io::Result<FlatSave> {
        match &self.vm {
            Some(vm) => Ok(FlatSave {
                machine: vm.machine(),
                ram: ram.to_path_buf(),
            }),
            None => Err(io::Error::other(PauseError::Ended)),
        }
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
