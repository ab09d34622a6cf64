//! The KVM VM: `/dev/kvm` opened, guest RAM registered as memory slots, the in-kernel
//! interrupt controllers (8259 PICs and IOAPIC) and the PIT created.

#![allow(unsafe_code)]

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use super::memory::GuestRam;
use crate::arch::layout::{KVM_IDENTITY_MAP_START, KVM_TSS_START};
use crate::persist::Persist;
use crate::VmmError;

/// The in-kernel devices' state: the two PICs, the IOAPIC, the PIT, the KVM clock.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// The master 8259.
    pub pic_master: kvm_irqchip,
    /// The slave 8259.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The PIT.
    pub pit: kvm_pit_state2,
    /// The guest's kvmclock.
    pub clock: kvm_clock_data,
}

/// A KVM VM with its memory.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    memory: GuestRam,
}

impl Vm {
    /// Opens `/dev/kvm`, creates a VM, registers `memory`, and creates the irqchip and PIT.
    pub fn new(memory: GuestRam) -> Result<Self, VmmError> {
        let kvm = Kvm::new().map_err(|e| VmmError::Kvm("opening /dev/kvm", e))?;
        let fd = kvm
            .create_vm()
            .map_err(|e| VmmError::Kvm("KVM_CREATE_VM", e))?;
        for (slot, region) in memory.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| VmmError::Memory(e.to_string()))?;
            let slot_region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range is a live mapping owned by `memory`, which this `Vm`
            // keeps until after the VM fd (and with it every vCPU's access) is closed: the
            // `fd` field is dropped before `memory` as fields drop in declaration order.
            unsafe { fd.set_user_memory_region(slot_region) }
                .map_err(|e| VmmError::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
        }
        fd.set_tss_address(KVM_TSS_START as usize)
            .map_err(|e| VmmError::Kvm("KVM_SET_TSS_ADDR", e))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_START)
            .map_err(|e| VmmError::Kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
        fd.create_irq_chip()
            .map_err(|e| VmmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| VmmError::Kvm("KVM_CREATE_PIT2", e))?;
        Ok(Vm { kvm, fd, memory })
    }

    /// The KVM system fd.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestRam {
        &self.memory
    }
}

impl Persist<'_> for Vm {
    type State = VmSnapshot;
    /// The new VM's RAM.
    type ConstructorArgs = GuestRam;
    type Error = VmmError;

    /// The in-kernel devices' state (the vCPUs paused).
    fn save(&self) -> Result<VmSnapshot, VmmError> {
        let chip = |id: u32, what: &'static str| {
            let mut chip = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut chip)
                .map(|()| chip)
                .map_err(|e| VmmError::Kvm(what, e))
        };
        let mut clock = self
            .fd
            .get_clock()
            .map_err(|e| VmmError::Kvm("KVM_GET_CLOCK", e))?;
        // `KVM_SET_CLOCK` takes only the clock, no flags (`TSC_STABLE` and the rest are
        // KVM's to report).
        clock.flags = 0;
        Ok(VmSnapshot {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP (PIC master)")?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (IOAPIC)")?,
            pit: self
                .fd
                .get_pit2()
                .map_err(|e| VmmError::Kvm("KVM_GET_PIT2", e))?,
            clock,
        })
    }

    /// A new VM ([`Vm::new`]) whose in-kernel devices have the state `saved`, before any
    /// device or vCPU is attached to it.
    fn restore(memory: GuestRam, saved: &VmSnapshot) -> Result<Self, VmmError> {
        let vm = Vm::new(memory)?;
        let chips = [
            (&saved.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&saved.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&saved.ioapic, KVM_IRQCHIP_IOAPIC),
        ];
        for (chip, id) in chips {
            if chip.chip_id != id {
                return Err(VmmError::Snapshot(format!(
                    "interrupt controller {} saved as {id}",
                    chip.chip_id
                )));
            }
            vm.fd
                .set_irqchip(chip)
                .map_err(|e| VmmError::Kvm("KVM_SET_IRQCHIP", e))?;
        }
        vm.fd
            .set_pit2(&saved.pit)
            .map_err(|e| VmmError::Kvm("KVM_SET_PIT2", e))?;
        vm.fd
            .set_clock(&saved.clock)
            .map_err(|e| VmmError::Kvm("KVM_SET_CLOCK", e))?;
        Ok(vm)
    }
}
