//! The devices a guest sees, one folder each, and the [`bus`] that routes port and MMIO
//! accesses to them.
//!
//! Legacy devices ([`serial`], [`i8042`], [`cmos`], [`acpi_pm`]) answer port I/O on the vCPU
//! thread that trapped it. Every device treats what the guest writes as hostile: an access it
//! does not understand is ignored (reads see all ones), never a panic.

pub mod acpi_pm;
pub mod bus;
pub mod cmos;
pub mod i8042;
pub mod serial;
pub mod virtio;

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line backed by an eventfd registered with KVM as an irqfd: writing it raises
/// the GSI without a trip through the VMM's vCPU threads.
#[derive(Debug)]
pub struct IrqLine(EventFd);

impl IrqLine {
    /// A line on `evt` (registered as an irqfd by the caller).
    pub fn new(evt: EventFd) -> Self {
        IrqLine(evt)
    }

    /// Raises the interrupt.
    pub fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }

    /// The eventfd, for registering it.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        IrqLine::trigger(self)
    }
}
