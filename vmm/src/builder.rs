//! Assembles a VM top to bottom: memory, KVM VM, boot data, devices, vCPUs — in that order, in
//! [`build`], so a reader can follow a boot without jumping around.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::thread::JoinHandleExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::IoEventAddress;
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::Killable;

use crate::arch::layout::*;
use crate::arch::{acpi, boot};
use crate::devices::acpi_pm::{self, AcpiPm};
use crate::devices::bus::{Bus, SharedDevice};
use crate::devices::cmos::{self, Cmos};
use crate::devices::i8042::{self, I8042};
use crate::devices::serial::{self, ConsoleSink, SerialDevice};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::console::Console as VirtioConsole;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::VirtioDevice;
use crate::devices::IrqLine;
use crate::event_loop::EventLoop;
use crate::exit::{ExitSignal, GuestExit};
use crate::pause::{PauseError, PauseGate, Pauser};
use crate::persist::{Persist, StateError};
use crate::seccomp::{self, ThreadKind};
use crate::snapshot::{self, SavedVm};
use crate::vstate::kick;
use crate::vstate::memory::{self, GuestRam};
use crate::vstate::vcpu::{Vcpu, VcpuContext, VcpuState};
use crate::vstate::vm::Vm;
use crate::VmmError;

/// The most vCPUs (APIC ids fit a byte; a microVM needs few).
pub const MAX_VCPUS: u8 = 32;
/// The least guest RAM: the boot area, the kernel at 1 MiB and up, and room to run.
pub const MIN_MEMORY_MIB: u64 = 4;
/// How long [`MicroVm::stop`] keeps kicking vCPUs before it gives up on joining them.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// What to boot.
pub struct VmConfig {
    /// How many vCPUs.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// The kernel, open: an ELF vmlinux or a bzImage.
    pub kernel: File,
    /// An initramfs, open, placed at the top of low RAM.
    pub initrd: Option<File>,
    /// The kernel command line.
    pub cmdline: String,
    /// Where the serial console's output goes, a line at a time (the runner's bounded log).
    pub console_log: Box<dyn Write + Send>,
    /// Disks, in the order the guest finds them (`vda`, `vdb`, …).
    pub block: Vec<BlockConfig>,
    /// A named virtio-console port to the host (port 1 of a two-port device, as QEMU has
    /// it), after the disks: mvm's agent channel.
    pub console_port: Option<ConsolePort>,
    /// Whether the guest gets a virtio-rng device (after the console).
    pub rng: bool,
    /// Whether guest RAM is made of 2 MiB huge pages ([`memory::create_huge`]).
    pub huge_pages: bool,
}

/// A named virtio-console port: the guest finds it as `/dev/virtio-ports/<name>`.
#[derive(Debug)]
pub struct ConsolePort {
    /// The name announced to the guest.
    pub name: String,
    /// The host's end: what the guest writes arrives here, what is written here reaches it.
    pub host_end: UnixStream,
}

impl std::fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmConfig")
            .field("vcpus", &self.vcpus)
            .field("memory_mib", &self.memory_mib)
            .field("kernel", &self.kernel)
            .field("initrd", &self.initrd)
            .field("cmdline", &self.cmdline)
            .field("block", &self.block)
            .field("console_port", &self.console_port)
            .field("rng", &self.rng)
            .field("huge_pages", &self.huge_pages)
            .finish_non_exhaustive()
    }
}

/// A virtio-blk disk.
#[derive(Debug)]
pub struct BlockConfig {
    /// The backing file, open for reading, and for writing unless `read_only`.
    pub file: File,
    /// Whether the guest may write it.
    pub read_only: bool,
    /// What the device answers to `GET_ID` (the guest's `/sys/block/vdX/serial`).
    pub id: String,
}

impl BlockConfig {
    /// The disk on the file at `path`, opened as the guest may use it: for reading, and for
    /// writing unless `read_only`.
    pub fn open(path: &Path, read_only: bool, id: &str) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        Ok(BlockConfig {
            file,
            read_only,
            id: id.into(),
        })
    }
}

/// A running VM. Dropping it stops it.
#[derive(Debug)]
pub struct MicroVm {
    exit: Arc<ExitSignal>,
    machine: Machine,
    /// Joins the vCPU threads and the event loop once the VM ends; says whether all joined.
    reaper: Option<JoinHandle<Reaped>>,
    /// Where the vCPUs were when they stopped (once reaped).
    vcpu_states: Vec<VcpuState>,
    first_exit_us: Arc<AtomicU64>,
    /// Guest RAM and the KVM fds: dropped only once every vCPU thread has been joined (the
    /// [`Machine`] holds them too).
    vm: Option<Arc<Vm>>,
}

/// What a VM's state is saved from: its KVM VM, its devices.
#[derive(Debug)]
struct Parts {
    vm: Arc<Vm>,
    memory_mib: u64,
    serial: Arc<Mutex<SerialDevice>>,
    cmos: Arc<Mutex<Cmos>>,
    i8042: Arc<Mutex<I8042>>,
    /// Not kept alive by this: a VM that ends releases its devices (and closes the agent
    /// channel) whoever holds its machine.
    transports: Vec<Weak<Mutex<MmioTransport>>>,
}

/// Pauses, resumes and saves one VM, from any thread, for as long as it is held.
#[derive(Debug, Clone)]
pub struct Machine {
    pauser: Pauser,
    parts: Arc<Parts>,
}

impl Machine {
    /// See [`Pauser::pause`].
    pub fn pause(&self) -> Result<(), PauseError> {
        self.pauser.pause()
    }

    /// See [`Pauser::resume`].
    pub fn resume(&self) -> Result<(), PauseError> {
        self.pauser.resume()
    }

    /// Writes the paused VM — its vCPUs (taken by their own threads), in-kernel devices,
    /// devices and RAM — to `into` ([`snapshot`]'s format).
    pub fn save(&self, into: &mut impl std::io::Write) -> Result<(), VmmError> {
        let state = self.saved_state()?;
        snapshot::write(into, &state, self.parts.vm.memory())
            .map_err(|e| VmmError::Snapshot(format!("writing: {e}")))
    }

    /// Saves the paused VM as a boot snapshot is kept: its state (what [`Machine::save`]
    /// writes before RAM) returned, its RAM written to `memory` as a flat image
    /// ([`memory::write_flat`]), which [`memory::map_flat`] maps back copy-on-write.
    pub fn save_flat(&self, memory: &File) -> Result<SavedVm, VmmError> {
        let state = self.saved_state()?;
        memory::write_flat(self.parts.vm.memory(), memory)
            .map_err(|e| VmmError::Snapshot(format!("writing the memory image: {e}")))?;
        Ok(state)
    }

    /// Fills guest RAM from `from` to its end with `byte`: a stand-in, for benchmarks, for a
    /// guest that has used all its memory.
    #[cfg(feature = "testing")]
    pub fn fill_ram(&self, from: u64, byte: u8) -> Result<(), VmmError> {
        use vm_memory::{Bytes, GuestAddress};
        let chunk = vec![byte; 1 << 20];
        let memory = self.parts.vm.memory();
        for region in memory.iter() {
            let (start, end) = (region.start_addr().0, region.start_addr().0 + region.len());
            let mut at = start.max(from);
            while at < end {
                let len = chunk.len().min((end - at) as usize);
                memory
                    .write_slice(&chunk[..len], GuestAddress(at))
                    .map_err(|e| VmmError::Memory(format!("filling RAM at {at:#x}: {e}")))?;
                at += len as u64;
            }
        }
        Ok(())
    }

    /// The paused VM's state, everything but RAM.
    fn saved_state(&self) -> Result<SavedVm, VmmError> {
        let vcpus = self
            .pauser
            .vcpu_states()
            .map_err(|e| VmmError::Snapshot(e.to_string()))?;
        let parts = &self.parts;
        let state = SavedVm {
            memory_mib: parts.memory_mib,
            vcpus,
            vm: parts.vm.save()?,
            serial: {
                // Its buffered output belongs to the log, not to its state.
                let mut serial = lock(&parts.serial);
                serial.drain();
                serial.save().map_err(state_error("serial"))?
            },
            cmos: lock(&parts.cmos).save().map_err(state_error("cmos"))?,
            i8042: lock(&parts.i8042).save().map_err(state_error("i8042"))?,
            virtio: parts
                .transports
                .iter()
                .map(|t| {
                    let t = t
                        .upgrade()
                        .ok_or_else(|| VmmError::Snapshot("the VM has ended".into()))?;
                    let saved = lock(&t).save().map_err(state_error("virtio"))?;
                    Ok(saved)
                })
                .collect::<Result<_, VmmError>>()?,
        };
        Ok(state)
    }
}

/// A device's state that could not be taken or does not fit, as the VM's error.
fn state_error(device: &str) -> impl Fn(StateError) -> VmmError + '_ {
    move |source| VmmError::DeviceState {
        device: device.into(),
        source,
    }
}

fn lock<T>(device: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    device.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Checks `config`'s vCPUs and memory and maps its guest RAM (all zero).
pub fn guest_ram(config: &VmConfig) -> Result<GuestRam, VmmError> {
    if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
        return Err(VmmError::Config(format!(
            "{} vCPUs; 1 to {MAX_VCPUS} are possible",
            config.vcpus
        )));
    }
    if config.memory_mib < MIN_MEMORY_MIB || config.memory_mib > (1 << 20) {
        return Err(VmmError::Config(format!(
            "{} MiB of memory",
            config.memory_mib
        )));
    }
    let size = config.memory_mib << 20;
    match config.huge_pages {
        true => memory::create_huge(size).map_err(VmmError::Memory),
        false => memory::create(size).map_err(|e| VmmError::Memory(e.to_string())),
    }
}

/// Builds and starts the VM `config` describes.
pub fn build(config: VmConfig) -> Result<MicroVm, VmmError> {
    let started = Instant::now();
    let ram = guest_ram(&config)?;
    assemble(config, ram, None, started)
}

/// Builds the VM `config` describes in the state `saved` (read into `ram` from a saved VM's
/// file, [`snapshot`]), paused: it runs once [`Machine::resume`] lets it. The configuration
/// must be the one it was saved with (vCPUs, memory, devices); the kernel and initramfs are
/// not loaded again (they are in its RAM).
pub fn restore(config: VmConfig, ram: GuestRam, saved: &SavedVm) -> Result<MicroVm, VmmError> {
    let started = Instant::now();
    if saved.memory_mib != config.memory_mib || saved.vcpus.len() != usize::from(config.vcpus) {
        return Err(VmmError::Snapshot(format!(
            "saved with {} vCPUs and {} MiB, restored into {} and {} MiB",
            saved.vcpus.len(),
            saved.memory_mib,
            config.vcpus,
            config.memory_mib
        )));
    }
    assemble(config, ram, Some(saved), started)
}

/// Builds the VM `config` describes in `ram`: booting its kernel, or restored from `saved`.
fn assemble(
    config: VmConfig,
    ram: GuestRam,
    saved: Option<&SavedVm>,
    started: Instant,
) -> Result<MicroVm, VmmError> {
    kick::install_kick_handler()?;
    // The in-kernel interrupt controllers, PIT and clock, in their saved state if restored.
    let vm = Arc::new(match saved {
        Some(saved) => Vm::restore(ram.clone(), &saved.vm)?,
        None => Vm::new(ram.clone())?,
    });

    // Boot data: kernel, command line, initramfs (none for a restored VM: they are in RAM).
    let mut config = config;
    let boot = match saved {
        Some(_) => None,
        None => {
            let kernel = boot::load_kernel(&ram, &mut config.kernel)?;
            boot::load_cmdline(&ram, &config.cmdline)?;
            let initrd = match &mut config.initrd {
                Some(file) => Some(boot::load_initrd(&ram, &kernel, file)?),
                None => None,
            };
            Some((kernel, initrd))
        }
    };
    let mut virtio: Vec<(String, Box<dyn VirtioDevice>)> = Vec::new();
    for disk in config.block {
        let name = format!("virtio-blk {}", disk.id);
        let device =
            Block::new(disk.file, disk.read_only, &disk.id).map_err(|e| VmmError::Device {
                device: name.clone(),
                reason: e.to_string(),
            })?;
        virtio.push((name, Box::new(device)));
    }
    if let Some(port) = config.console_port {
        let device =
            VirtioConsole::new(port.host_end, Some(&port.name)).map_err(|e| VmmError::Device {
                device: "virtio-console".into(),
                reason: e.to_string(),
            })?;
        virtio.push(("virtio-console".into(), Box::new(device)));
    }
    if config.rng {
        virtio.push(("virtio-rng".into(), Box::new(Rng::default())));
    }
    if virtio.len() > VIRTIO_MMIO_MAX {
        return Err(VmmError::Config(format!(
            "{} virtio devices; at most {VIRTIO_MMIO_MAX} fit",
            virtio.len()
        )));
    }
    // ACPI tables and the zero page (a restored VM has them in RAM).
    let entry = match (&boot, saved) {
        (Some((kernel, initrd)), _) => {
            let acpi_layout = acpi::AcpiLayout {
                vcpus: config.vcpus,
                virtio_devices: virtio.len(),
            };
            let rsdp = acpi::write_tables(&ram, &acpi_layout)?;
            boot::write_boot_params(&ram, kernel, config.cmdline.len(), *initrd, rsdp)?;
            kernel.entry
        }
        (None, Some(saved)) if saved.virtio.len() != virtio.len() => {
            return Err(VmmError::Snapshot(format!(
                "saved with {} virtio devices, restored with {}",
                saved.virtio.len(),
                virtio.len()
            )));
        }
        (None, _) => 0,
    };

    // Devices.
    let exit = Arc::new(ExitSignal::new().map_err(VmmError::Thread)?);
    let serial_irq = irq_line(&vm, SERIAL_GSI, "serial")?;
    let sink = ConsoleSink::new(config.console_log);
    let (serial, i8042, cmos) = match saved {
        Some(saved) => (
            SerialDevice::restore((serial_irq, sink), &saved.serial)
                .map_err(state_error("serial"))?,
            I8042::restore(exit.clone(), &saved.i8042).map_err(state_error("i8042"))?,
            Cmos::restore((), &saved.cmos).map_err(state_error("cmos"))?,
        ),
        None => (
            SerialDevice::new(serial_irq, sink),
            I8042::new(exit.clone()),
            Cmos::default(),
        ),
    };
    let serial = Arc::new(Mutex::new(serial));
    let i8042 = Arc::new(Mutex::new(i8042));
    let cmos = Arc::new(Mutex::new(cmos));
    let mut pio = Bus::default();
    let mut put = |base: u16, len: u64, device: SharedDevice, name: &str| {
        pio.insert(u64::from(base), len, device)
            .map_err(|e| VmmError::Device {
                device: name.into(),
                reason: e.to_string(),
            })
    };
    put(SERIAL_PORT, serial::PORTS, serial.clone(), "serial")?;
    put(I8042_DATA_PORT, i8042::PORTS, i8042.clone(), "i8042")?;
    put(CMOS_PORT, cmos::PORTS, cmos.clone(), "cmos")?;
    put(
        ACPI_SLEEP_CONTROL_PORT,
        acpi_pm::PORTS,
        Arc::new(Mutex::new(AcpiPm::new(exit.clone()))),
        "acpi-pm",
    )?;
    let mut mmio = Bus::default();
    // A restored VM starts paused: its threads park before their first step.
    let gate = Arc::new(PauseGate::new(saved.is_some()).map_err(VmmError::Thread)?);
    let mut events = EventLoop::new(exit.clone(), gate.clone()).map_err(VmmError::Thread)?;
    let mut transports = Vec::with_capacity(virtio.len());
    for (n, (name, device)) in virtio.into_iter().enumerate() {
        let base = virtio_mmio_base(n);
        let fail = |reason: String| VmmError::Device {
            device: name.clone(),
            reason,
        };
        let irq = irq_line(&vm, virtio_gsi(n), &name)?;
        let queues = device.queue_max_sizes().len();
        let transport = match saved {
            Some(saved) => MmioTransport::restore((device, ram.clone(), irq), &saved.virtio[n])
                .map_err(state_error(&name))?,
            None => MmioTransport::new(device, ram.clone(), irq),
        };
        let transport = Arc::new(Mutex::new(transport));
        transports.push(Arc::downgrade(&transport));
        let mut queue_events = Vec::with_capacity(queues);
        for queue in 0..queues {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| fail(format!("eventfd: {e}")))?;
            let notify = IoEventAddress::Mmio(base + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY));
            vm.fd()
                .register_ioevent(&evt, &notify, queue as u32)
                .map_err(|e| fail(format!("KVM_IOEVENTFD: {e}")))?;
            queue_events.push(evt);
        }
        mmio.insert(base, VIRTIO_MMIO_SIZE, transport.clone())
            .map_err(|e| fail(e.to_string()))?;
        events
            .add_device(transport, queue_events)
            .map_err(|e| fail(format!("epoll: {e}")))?;
    }
    // Each thread the VM starts from here on runs filtered from its first act (`seccomp.rs`);
    // the filters are compiled before any starts.
    let (events_filter, vcpu_filter, reaper_filter) = (
        seccomp::filter(ThreadKind::Events)?,
        seccomp::filter(ThreadKind::Vcpu)?,
        seccomp::filter(ThreadKind::Reaper)?,
    );
    let events = events.spawn(events_filter)?;

    // The vCPUs' state; each vCPU on its own thread.
    let vcpus = (0..config.vcpus)
        .map(|id| match saved {
            Some(saved) => Vcpu::restore((&vm, id), &saved.vcpus[usize::from(id)]),
            None => Vcpu::new(&vm, id, config.vcpus, entry),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ctx = VcpuContext {
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        exit: exit.clone(),
        started,
        first_exit_us: Arc::new(AtomicU64::new(0)),
        gate: gate.clone(),
    };
    let mut vcpu_threads = Vec::with_capacity(vcpus.len());
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        let ctx = ctx.clone();
        let spawned =
            seccomp::spawn_filtered(format!("vcpu{id}"), vcpu_filter.clone(), move || {
                vcpu.run(ctx)
            });
        match spawned {
            Ok(handle) => vcpu_threads.push(handle),
            Err(e) => {
                exit.raise(GuestExit::Stopped);
                if !reap(&exit, &gate, vcpu_threads, Some(events), &serial).all_joined {
                    std::mem::forget(vm);
                }
                return Err(e);
            }
        }
    }
    // The reaper ends the VM's threads as soon as it ends, however it ends: a guest that
    // powers off releases its devices (and closes the agent channel) without waiting for
    // the host to call `stop`.
    let pauser = Pauser::new(
        gate.clone(),
        vcpu_threads.iter().map(|h| h.as_pthread_t()).collect(),
        exit.clone(),
    );
    let reaper = {
        let (exit, serial) = (exit.clone(), serial.clone());
        seccomp::spawn_filtered("vmm-reaper".into(), reaper_filter, move || {
            while exit.wait(Duration::from_secs(3600)).is_none() {}
            reap(&exit, &gate, vcpu_threads, Some(events), &serial)
        })
    };
    let reaper = match reaper {
        Ok(handle) => handle,
        Err(e) => {
            // The vCPU threads went with the reaper that could not start: they are told to
            // stop, and their memory is leaked rather than unmapped under them.
            exit.raise(GuestExit::Stopped);
            std::mem::forget(vm);
            return Err(e);
        }
    };
    let parts = Parts {
        vm: vm.clone(),
        memory_mib: config.memory_mib,
        serial,
        cmos,
        i8042,
        transports,
    };
    Ok(MicroVm {
        exit,
        machine: Machine {
            pauser,
            parts: Arc::new(parts),
        },
        reaper: Some(reaper),
        vcpu_states: Vec::new(),
        first_exit_us: ctx.first_exit_us.clone(),
        vm: Some(vm),
    })
}

/// What reaping found.
#[derive(Debug, Default)]
struct Reaped {
    all_joined: bool,
    states: Vec<VcpuState>,
}

/// Once `exit` is raised: releases the threads parked at `gate` (and ends it, so that no
/// pause kicks a thread from here on), kicks the vCPU threads out of `KVM_RUN` until they
/// return (for at most [`STOP_TIMEOUT`]), joins them and the event loop, and passes on the
/// console's last bytes. Says whether every vCPU thread was joined, and where they were.
fn reap(
    exit: &ExitSignal,
    gate: &PauseGate,
    vcpus: Vec<JoinHandle<VcpuState>>,
    events: Option<JoinHandle<()>>,
    serial: &Mutex<SerialDevice>,
) -> Reaped {
    debug_assert!(exit.is_raised());
    gate.end();
    let deadline = Instant::now() + STOP_TIMEOUT;
    while vcpus.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
        for handle in vcpus.iter().filter(|h| !h.is_finished()) {
            let _ = handle.kill(kick::kick_signal());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    if let Some(events) = events {
        // Raising the exit wrote the eventfd the loop watches: it returns promptly.
        let _ = events.join();
    }
    let mut reaped = Reaped {
        all_joined: true,
        states: Vec::new(),
    };
    for handle in vcpus {
        if handle.is_finished() {
            if let Ok(state) = handle.join() {
                reaped.states.push(state);
            }
        } else {
            reaped.all_joined = false;
        }
    }
    serial
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .drain();
    reaped
}

/// An interrupt line on `gsi`: an eventfd registered as an irqfd.
fn irq_line(vm: &Vm, gsi: u32, device: &str) -> Result<IrqLine, VmmError> {
    let fail = |reason: String| VmmError::Device {
        device: device.into(),
        reason,
    };
    let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| fail(format!("eventfd: {e}")))?;
    vm.fd()
        .register_irqfd(&evt, gsi)
        .map_err(|e| fail(format!("KVM_IRQFD on GSI {gsi}: {e}")))?;
    Ok(IrqLine::new(evt))
}

impl MicroVm {
    /// Waits up to `timeout` for the VM to end by itself; `None` if it is still running.
    pub fn wait(&self, timeout: Duration) -> Option<GuestExit> {
        self.exit.wait(timeout)
    }

    /// Time from the start of [`build`] to vCPU 0's first exit from the guest — an upper
    /// bound on the time to the guest's first instruction.
    pub fn time_to_first_exit(&self) -> Option<Duration> {
        match self.first_exit_us.load(Ordering::SeqCst) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Where guest RAM is mapped in this process (host virtual addresses): what to leave out
    /// when accounting for the VMM's own memory.
    pub fn guest_ram_host_ranges(&self) -> Vec<std::ops::Range<usize>> {
        self.vm.as_ref().map_or_else(Vec::new, |vm| {
            vm.memory()
                .iter()
                .map(|region| {
                    let start = region.as_ptr() as usize;
                    start..start + region.len() as usize
                })
                .collect()
        })
    }

    /// What pauses, resumes and saves this VM (from any thread).
    pub fn machine(&self) -> Machine {
        self.machine.clone()
    }

    /// Readable once the VM has ended (to poll it beside other descriptors).
    pub fn exit_eventfd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.exit.eventfd()
    }

    /// Why the VM ended, if it has.
    pub fn ended(&self) -> Option<GuestExit> {
        self.exit.reason()
    }

    /// Stops the VM like [`MicroVm::stop`], and also says where each vCPU was — what a guest
    /// that stalled was doing.
    pub fn stop_and_inspect(mut self) -> (GuestExit, Vec<VcpuState>) {
        let exit = self.shut_down();
        (exit, std::mem::take(&mut self.vcpu_states))
    }

    /// Stops the VM (if it has not stopped by itself), joins its threads and flushes its
    /// console; returns why it ended.
    pub fn stop(mut self) -> GuestExit {
        self.shut_down()
    }

    fn shut_down(&mut self) -> GuestExit {
        self.exit.raise(GuestExit::Stopped);
        if let Some(reaper) = self.reaper.take() {
            let reaped = reaper.join().unwrap_or_default();
            self.vcpu_states = reaped.states;
            if !reaped.all_joined {
                // A vCPU that did not stop in time may still be inside the guest: its memory
                // and fds are leaked rather than unmapped under it.
                std::mem::forget(self.vm.take());
            }
        }
        self.exit.reason().unwrap_or(GuestExit::Stopped)
    }
}

impl Drop for MicroVm {
    fn drop(&mut self) {
        self.shut_down();
    }
}
