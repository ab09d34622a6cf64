//! A vCPU: its boot state (CPUID, MSRs, registers, LAPIC) and the loop that runs it on a thread
//! of its own, handing port and MMIO exits to the buses until the VM is told to stop.
//!
//! Stopping: [`ExitSignal::raise`] sets a flag; the thread that stops the VM then sends the
//! vCPU threads [`kick_signal`](super::kick::kick_signal) until they have all returned. A kick makes `KVM_RUN` return
//! `EINTR`; one that lands just before `KVM_RUN` is covered by the next, so no vCPU sleeps
//! through its stop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use kvm_bindings::{kvm_msr_entry, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use super::memory::GuestRam;
use super::vcpu_snapshot::VcpuSnapshot;
use super::vm::Vm;
use crate::arch::{cpuid, lapic, msr, regs};
use crate::devices::bus::Bus;
use crate::exit::{ExitSignal, GuestExit};
use crate::pause::PauseGate;
use crate::persist::Persist;
use crate::VmmError;

/// What a vCPU thread shares with the rest of the VM.
#[derive(Debug, Clone)]
pub struct VcpuContext {
    /// Port I/O.
    pub pio: Arc<Bus>,
    /// MMIO.
    pub mmio: Arc<Bus>,
    /// The VM's end.
    pub exit: Arc<ExitSignal>,
    /// When the VM was asked for; the first exit of vCPU 0 is measured from it.
    pub started: Instant,
    /// Microseconds from `started` to vCPU 0's first exit (0 until then).
    pub first_exit_us: Arc<AtomicU64>,
    /// Where the vCPU parks while the VM is paused.
    pub gate: Arc<PauseGate>,
}

/// Where a vCPU was when the VM stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VcpuState {
    /// The vCPU.
    pub id: u8,
    /// Its instruction pointer.
    pub rip: u64,
    /// Its flags (bit 9: interrupts enabled).
    pub rflags: u64,
    /// Its stack pointer.
    pub rsp: u64,
    /// `rbx` (where Linux's spinlock slow path keeps the lock's address).
    pub rbx: u64,
    /// Stack words that point into the kernel's text mapping (`0xffffffff80000000` and up).
    pub stack_code: Vec<u64>,
    /// LAPIC timer LVT (vector, mode, mask bit 16).
    pub lapic_timer_lvt: u32,
    /// LAPIC timer initial count.
    pub lapic_timer_initial: u32,
    /// LAPIC timer current count.
    pub lapic_timer_current: u32,
    /// Interrupts requested, not yet delivered (256 bits, low word first).
    pub lapic_irr: Vec<u32>,
    /// Interrupts in service (256 bits, low word first).
    pub lapic_isr: Vec<u32>,
}

/// How many stack words a stopped vCPU's report looks at.
const STACK_WORDS: u64 = 64;
/// Where x86-64 Linux maps its text.
const KERNEL_TEXT: u64 = 0xffff_ffff_8000_0000;

/// The guest-physical address of `va` under the 4-level page tables at `cr3` (4 KiB, 2 MiB
/// and 1 GiB pages); `None` when a level is not present or not in RAM.
fn translate(memory: &GuestRam, cr3: u64, va: u64) -> Option<u64> {
    const PRESENT: u64 = 1;
    const HUGE: u64 = 1 << 7;
    const ADDRESS: u64 = 0x000f_ffff_ffff_f000;
    let mut table = cr3 & ADDRESS;
    for (level, shift) in [39u32, 30, 21, 12].into_iter().enumerate() {
        let index = (va >> shift) & 0x1ff;
        let entry: u64 = memory.read_obj(GuestAddress(table + index * 8)).ok()?;
        if entry & PRESENT == 0 {
            return None;
        }
        let page = 1u64 << shift;
        if level == 3 || (level > 0 && entry & HUGE != 0) {
            return Some((entry & ADDRESS & !(page - 1)) | (va & (page - 1)));
        }
        table = entry & ADDRESS;
    }
    None
}

/// A configured vCPU.
#[derive(Debug)]
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    /// Guest RAM, read (never written) to report a stopped vCPU's stack.
    memory: GuestRam,
    /// The MSRs KVM can save and restore (`KVM_GET_MSR_INDEX_LIST`).
    msr_indices: Vec<u32>,
}

/// A [`VmmError::Vcpu`] of vCPU `id` for the step `what`.
fn failed(id: u8, what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmmError {
    move |e| VmmError::Vcpu {
        id,
        what,
        source: e,
    }
}

/// A vCPU is saved by its own thread (only it holds its fd) and made again in the new VM.
impl<'a> Persist<'a> for Vcpu {
    type State = VcpuSnapshot;
    /// The new VM, and the vCPU's id in it.
    type ConstructorArgs = (&'a Vm, u8);
    type Error = VmmError;

    /// The vCPU's whole state, taken on its own thread while the VM is paused, its last exit
    /// completed (`complete_exit`): the multiprocessing state first and pending
    /// events last, as KVM orders them.
    fn save(&self) -> Result<VcpuSnapshot, VmmError> {
        let fail = |what: &'static str| failed(self.id, what);
        let fd = &self.fd;
        let mp_state = fd.get_mp_state().map_err(fail("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(fail("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(fail("KVM_GET_SREGS"))?;
        let xsave = fd.get_xsave().map_err(fail("KVM_GET_XSAVE"))?;
        let xcrs = fd.get_xcrs().map_err(fail("KVM_GET_XCRS"))?;
        let debug_regs = fd.get_debug_regs().map_err(fail("KVM_GET_DEBUGREGS"))?;
        let lapic = fd.get_lapic().map_err(fail("KVM_GET_LAPIC"))?;
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(fail("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let msrs = self.read_msrs()?;
        let events = fd.get_vcpu_events().map_err(fail("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuSnapshot {
            cpuid,
            msrs,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            mp_state,
            events,
        })
    }

    /// Creates vCPU `id` of `vm` in the state `saved` (in the order KVM needs: CPUID first,
    /// the LAPIC before the MSRs that depend on it, pending events last).
    #[allow(unsafe_code)]
    fn restore((vm, id): (&'a Vm, u8), saved: &VcpuSnapshot) -> Result<Self, VmmError> {
        let fail = |what: &'static str| failed(id, what);
        let invalid = |what: &'static str| VmmError::Vcpu {
            id,
            what,
            source: kvm_ioctls::Error::new(libc::EINVAL),
        };
        let vcpu = Self::create(vm, id)?;
        let fd = &vcpu.fd;
        let cpuid = CpuId::from_entries(&saved.cpuid).map_err(|_| invalid("the saved CPUID"))?;
        fd.set_cpuid2(&cpuid).map_err(fail("KVM_SET_CPUID2"))?;
        fd.set_mp_state(saved.mp_state)
            .map_err(fail("KVM_SET_MP_STATE"))?;
        fd.set_regs(&saved.regs).map_err(fail("KVM_SET_REGS"))?;
        fd.set_sregs(&saved.sregs).map_err(fail("KVM_SET_SREGS"))?;
        // SAFETY: a legacy `kvm_xsave` (4 KiB) as `KVM_GET_XSAVE` gave it; this VMM never
        // enables `KVM_CAP_XSAVE2`, so KVM reads exactly that much.
        unsafe { fd.set_xsave(&saved.xsave) }.map_err(fail("KVM_SET_XSAVE"))?;
        // A host without XSAVE has no XCRs: KVM gives none and refuses any (EINVAL).
        if saved.xcrs.nr_xcrs > 0 {
            fd.set_xcrs(&saved.xcrs).map_err(fail("KVM_SET_XCRS"))?;
        }
        fd.set_debug_regs(&saved.debug_regs)
            .map_err(fail("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&saved.lapic).map_err(fail("KVM_SET_LAPIC"))?;
        let msrs = Msrs::from_entries(&saved.msrs).map_err(|_| invalid("the saved MSRs"))?;
        let written = fd.set_msrs(&msrs).map_err(fail("KVM_SET_MSRS"))?;
        if written != saved.msrs.len() {
            return Err(invalid("KVM_SET_MSRS (a saved MSR was refused)"));
        }
        fd.set_vcpu_events(&saved.events)
            .map_err(fail("KVM_SET_VCPU_EVENTS"))?;
        Ok(vcpu)
    }
}

impl Vcpu {
    /// Creates vCPU `id`, without state.
    fn create(vm: &Vm, id: u8) -> Result<Self, VmmError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(failed(id, "KVM_CREATE_VCPU"))?;
        let msr_indices = vm
            .kvm()
            .get_msr_index_list()
            .map_err(failed(id, "KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        Ok(Vcpu {
            id,
            fd,
            memory: vm.memory().clone(),
            msr_indices,
        })
    }

    /// Creates vCPU `id` of `vcpus` and gives it the state of a 64-bit kernel entry at `entry`.
    pub fn new(vm: &Vm, id: u8, vcpus: u8, entry: u64) -> Result<Self, VmmError> {
        let fail = |what: &'static str| failed(id, what);
        let vcpu = Self::create(vm, id)?;
        let fd = &vcpu.fd;

        let mut cpuid = vm
            .kvm()
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(fail("KVM_GET_SUPPORTED_CPUID"))?;
        cpuid::filter(cpuid.as_mut_slice(), id, vcpus);
        fd.set_cpuid2(&cpuid).map_err(fail("KVM_SET_CPUID2"))?;

        let entries = msr::boot_msrs();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VmmError::Vcpu {
            id,
            what: "building the MSR list",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        let written = fd.set_msrs(&msrs).map_err(fail("KVM_SET_MSRS"))?;
        if written != entries.len() {
            return Err(VmmError::Vcpu {
                id,
                what: "KVM_SET_MSRS (an MSR was refused)",
                source: kvm_ioctls::Error::new(libc::EINVAL),
            });
        }

        let mut sregs = fd.get_sregs().map_err(fail("KVM_GET_SREGS"))?;
        regs::setup_long_mode(vm.memory(), &mut sregs)
            .map_err(|e| VmmError::Memory(e.to_string()))?;
        fd.set_sregs(&sregs).map_err(fail("KVM_SET_SREGS"))?;
        fd.set_regs(&regs::boot_regs(entry))
            .map_err(fail("KVM_SET_REGS"))?;
        fd.set_fpu(&regs::boot_fpu()).map_err(fail("KVM_SET_FPU"))?;

        let mut state = fd.get_lapic().map_err(fail("KVM_GET_LAPIC"))?;
        lapic::set_lint(&mut state);
        fd.set_lapic(&state).map_err(fail("KVM_SET_LAPIC"))?;
        Ok(vcpu)
    }

    /// Completes the last port or MMIO read before a save, on the vCPU's own thread while
    /// the VM is paused: a `KVM_RUN` that returns before the guest runs (`immediate_exit`),
    /// so no half-done instruction is lost.
    fn complete_exit(&mut self) -> Result<(), VmmError> {
        self.fd.set_kvm_immediate_exit(1);
        let completed = self.fd.run().map(|_| ());
        self.fd.set_kvm_immediate_exit(0);
        match completed {
            Err(e) if e.errno() != libc::EINTR => {
                Err(failed(self.id, "completing its last exit")(e))
            }
            _ => Ok(()),
        }
    }

    /// Every listed MSR that KVM will read: `KVM_GET_MSRS` stops at the first it cannot
    /// read, which is left out, and the rest are read on.
    fn read_msrs(&self) -> Result<Vec<kvm_msr_entry>, VmmError> {
        let mut read = Vec::with_capacity(self.msr_indices.len());
        let mut rest = &self.msr_indices[..];
        while !rest.is_empty() {
            let entries: Vec<kvm_msr_entry> = rest
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|_| VmmError::Vcpu {
                id: self.id,
                what: "the MSR list",
                source: kvm_ioctls::Error::new(libc::EINVAL),
            })?;
            let n = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(failed(self.id, "KVM_GET_MSRS"))?;
            read.extend_from_slice(&msrs.as_slice()[..n.min(rest.len())]);
            rest = &rest[(n + 1).min(rest.len())..];
        }
        Ok(read)
    }

    /// Runs the vCPU until the VM stops (every way out of the loop raises `ctx.exit`), then
    /// returns where it was: the state a stalled guest is diagnosed from.
    pub fn run(mut self, ctx: VcpuContext) -> VcpuState {
        self.run_loop(&ctx);
        self.state()
    }

    /// Where the vCPU is now (outside `KVM_RUN`); fields KVM refuses to give are 0.
    fn state(&self) -> VcpuState {
        let regs = self.fd.get_regs().unwrap_or_default();
        let cr3 = self.fd.get_sregs().map(|s| s.cr3).unwrap_or_default();
        // The words on the stack that look like code addresses: the call chain, roughly.
        let stack = (0..STACK_WORDS)
            .filter_map(|i| {
                let at = translate(&self.memory, cr3, regs.rsp.wrapping_add(8 * i))?;
                self.memory.read_obj::<u64>(GuestAddress(at)).ok()
            })
            .filter(|word| *word >= KERNEL_TEXT)
            .collect();
        let lapic = self.fd.get_lapic().ok();
        let reg = |offset: usize| lapic.as_ref().map_or(0, |l| lapic::read(l, offset));
        VcpuState {
            id: self.id,
            rip: regs.rip,
            rflags: regs.rflags,
            rsp: regs.rsp,
            rbx: regs.rbx,
            stack_code: stack,
            lapic_timer_lvt: reg(lapic::APIC_LVTT),
            lapic_timer_initial: reg(lapic::APIC_TMICT),
            lapic_timer_current: reg(lapic::APIC_TMCCT),
            lapic_irr: (0..8).map(|i| reg(lapic::APIC_IRR + 0x10 * i)).collect(),
            lapic_isr: (0..8).map(|i| reg(lapic::APIC_ISR + 0x10 * i)).collect(),
        }
    }

    fn run_loop(&mut self, ctx: &VcpuContext) {
        let mut first = self.id == 0;
        while !ctx.exit.is_raised() {
            // Between the last exit's handling and the next entry: no device is mid-access.
            let id = usize::from(self.id);
            ctx.gate.park(Some((id, &mut || {
                self.complete_exit()?;
                Persist::save(&*self)
            })));
            if ctx.exit.is_raised() {
                break;
            }
            let result = self.fd.run();
            if first {
                first = false;
                let us = ctx.started.elapsed().as_micros().max(1) as u64;
                ctx.first_exit_us.store(us, Ordering::SeqCst);
            }
            match result {
                Ok(VcpuExit::IoIn(port, data)) => {
                    ctx.pio.read(u64::from(port), data);
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    ctx.pio.write(u64::from(port), data);
                }
                Ok(VcpuExit::MmioRead(address, data)) => {
                    ctx.mmio.read(address, data);
                }
                Ok(VcpuExit::MmioWrite(address, data)) => {
                    ctx.mmio.write(address, data);
                }
                Ok(VcpuExit::Shutdown) => ctx.exit.raise(GuestExit::TripleFault),
                Ok(VcpuExit::Hlt) => ctx.exit.raise(GuestExit::Failed(format!(
                    "vCPU {} halted with no interrupt controller to wake it",
                    self.id
                ))),
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    let exit = if kind == kvm_bindings::KVM_SYSTEM_EVENT_RESET {
                        GuestExit::Reset
                    } else {
                        GuestExit::PowerOff
                    };
                    ctx.exit.raise(exit);
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => ctx.exit.raise(GuestExit::Failed(format!(
                    "vCPU {} failed to enter the guest (reason {reason:#x}, cpu {cpu})",
                    self.id
                ))),
                Ok(VcpuExit::InternalError) => ctx.exit.raise(GuestExit::Failed(format!(
                    "KVM internal error on vCPU {}",
                    self.id
                ))),
                Ok(other) => ctx.exit.raise(GuestExit::Failed(format!(
                    "vCPU {}: unhandled exit {other:?}",
                    self.id
                ))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => ctx.exit.raise(GuestExit::Failed(format!(
                    "KVM_RUN on vCPU {}: {e}",
                    self.id
                ))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::PML4_START;

    #[test]
    fn translates_through_the_boot_tables_and_a_4k_mapping() {
        let memory = crate::vstate::memory::create(8 << 20).unwrap();
        let mut sregs = kvm_bindings::kvm_sregs::default();
        regs::setup_long_mode(&memory, &mut sregs).unwrap();
        // The boot tables: identity, 2 MiB pages.
        assert_eq!(translate(&memory, PML4_START, 0x12_3456), Some(0x12_3456));
        // Add a 4 KiB mapping: 0xffffffff80001000 -> 0x345000, through tables at 0x300000.
        let va: u64 = 0xffff_ffff_8000_1000;
        let (pdpt, pd, pt) = (0x30_0000u64, 0x30_1000u64, 0x30_2000u64);
        let put = |at: u64, v: u64| memory.write_obj(v, GuestAddress(at)).unwrap();
        put(PML4_START + ((va >> 39) & 0x1ff) * 8, pdpt | 3);
        put(pdpt + ((va >> 30) & 0x1ff) * 8, pd | 3);
        put(pd + ((va >> 21) & 0x1ff) * 8, pt | 3);
        put(pt + ((va >> 12) & 0x1ff) * 8, 0x34_5000 | 3);
        assert_eq!(translate(&memory, PML4_START, va + 0x10), Some(0x34_5010));
        // Not present, and tables outside RAM.
        assert_eq!(translate(&memory, PML4_START, 0xffff_8000_0000_0000), None);
        assert_eq!(translate(&memory, 0xfff0_0000, 0x1000), None);
    }
}
