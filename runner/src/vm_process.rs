//! The VM a launch runs, whichever backend boots it: a supervised QEMU process ([`qemu`]), or
//! mvm's own VMM ([`vmm`]) on threads of this runner.
//!
//! Both give the guest the same contract — the plan's kernel, initramfs and command line, the
//! root image and its hash tree as read-only disks vda and vdb, the agent's console port named
//! `mvm.agent`, the serial console in the VM's bounded log — and the launch sees both the same
//! way: a console, a way to learn that the VM ended, a way to end it. The agent channel of
//! QEMU is a unix socket QEMU connects to; that of the own VMM is one end of a socketpair,
//! connected before the guest starts.
//!
//! [`qemu`]: crate::qemu
//! [`vmm`]: mvm_vmm

use std::fs::File;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use mvm_ir::plan::LaunchPlan;

use crate::cold::{self, ColdError, ColdState, SavedMemory};
use crate::control::Pausable;
use crate::host::Backend;
use crate::jail::JailedVm;
use crate::qemu::qmp::Qmp;
use crate::qemu::QemuVm;
use crate::serial::{BoundedLog, Console};
use crate::state::MACHINE_SOCKET;
use mvm_agent::serve::channel::PORT_NAME;
use mvm_ir::digest::Sha256Writer;
use mvm_vmm::snapshot::{self, SnapshotReader};
use mvm_vmm::{ConsolePort, DiskSpec, GuestExit, Machine, MicroVm, PauseError, VmSpec, VmmError};

/// A running VM.
#[derive(Debug)]
pub enum VmProcess {
    /// QEMU, in a process group of its own.
    Qemu(QemuVm),
    /// mvm's own VMM, in this process.
    Own(OwnVm),
    /// mvm's own VMM, jailed in a child process ([`crate::jail`]).
    Jailed(JailedVm),
}

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
struct Ended;

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
    vm: Option<MicroVm>,
    console: Console,
    channel: Option<UnixStream>,
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
        disks: vec![disk(files.rootfs, "root"), disk(files.verity, "verity")],
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

    /// Restores the VM `saved` holds (a cold VM the own VMM saved) as `spec` (the plan's
    /// files), paused until its machine resumes it. Its file is read once: hashed as its
    /// pages go into the new VM's RAM, and its state parsed only once that digest is the
    /// manifest's (RUN041 otherwise); what does not restore is RUN042. Either way the VM
    /// stays cold.
    pub fn restore(
        spec: VmSpec,
        serial_log: File,
        saved: &mut ColdState,
    ) -> Result<Self, ColdError> {
        let unrestorable = |e: VmmError| ColdError::Wake(format!("{}: {e}", e.code()));
        let (guest_end, host_end) =
            UnixStream::pair().map_err(|e| ColdError::Wake(format!("the agent channel: {e}")))?;
        let console = Console::default();
        let opened = spec.open().map_err(unrestorable)?;
        let log = Box::new(BoundedLog::new(serial_log, console.clone()));
        let config = spec.config(opened, log, Some(agent_port(guest_end)));
        let ram = mvm_vmm::builder::guest_ram(&config).map_err(unrestorable)?;
        let mut reader = SnapshotReader::new(&ram);
        let read = cold::copy_hashing(&mut saved.memory, &mut reader);
        let state = reader.finish();
        let seen = read.map_err(|e| match &state {
            Err(malformed) => ColdError::Wake(format!("{}: {malformed}", malformed.code())),
            Ok(_) => ColdError::Wake(format!("reading its state: {e}")),
        })?;
        cold::check_memory(&saved.manifest, &seen)?;
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

    /// What pauses, resumes and saves the VM, while it runs.
    pub fn machine(&self) -> Option<Machine> {
        self.vm.as_ref().map(MicroVm::machine)
    }

    fn poll(&mut self) -> Option<GuestExit> {
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
    fn kill(&mut self) {
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
            VmProcess::Qemu(_) => Ok(Box::new(Qmp::connect(&dir.join(MACHINE_SOCKET))?)),
            VmProcess::Own(own) => Ok(match own.machine() {
                Some(machine) => Box::new(machine),
                None => Box::new(Ended),
            }),
            VmProcess::Jailed(jailed) => Ok(Box::new(jailed.control()?)),
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
