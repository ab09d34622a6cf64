//! Where everything sits in guest-physical memory and I/O space. One table, so that the boot
//! setup, the ACPI tables and the devices cannot disagree.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries)             0x0000_7000  boot_params ("zero page")
//! 0x0000_0520  IDT (empty)                 0x0000_8ff0  initial stack (grows down)
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000–0xefff four PDs (identity map of 4 GiB, 2 MiB pages)
//! 0x0002_0000  kernel command line (up to CMDLINE_MAX_SIZE)
//! 0x0009_fc00  EBDA: not RAM            0x000e_0000  ACPI tables, RSDP first (reserved to 1 MiB)
//! 0x0010_0000  RAM from here: the kernel, then the initramfs near the top of low RAM
//! 0xc000_0000  end of low RAM; the MMIO hole up to 4 GiB, RAM above 4 GiB continues
//! 0xd000_0000  virtio-mmio windows, 4 KiB each       0xfec0_0000 IOAPIC, 0xfee0_0000 LAPIC
//! ```

/// The GDT's address.
pub const GDT_START: u64 = 0x500;
/// The IDT's address (an empty table: the guest installs its own before enabling interrupts).
pub const IDT_START: u64 = 0x520;
/// The zero page (`struct boot_params`) handed to the kernel in `rsi`.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// The initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// The top-level page table.
pub const PML4_START: u64 = 0x9000;
/// The page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// The first of the four page directories (one per GiB mapped).
pub const PDE_START: u64 = 0xb000;
/// How many GiB the boot page tables identity-map: all of low RAM and the MMIO hole, so a
/// small guest can reach its devices without building tables of its own.
pub const IDENTITY_MAPPED_GIB: u64 = 4;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// The longest command line, terminating NUL included (Linux's x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// The start of the BIOS data area that ends conventional memory.
pub const EBDA_START: u64 = 0x9fc00;
/// The RSDP, where the ACPI spec lets an OS search for it.
pub const RSDP_START: u64 = 0xe0000;
/// The end of the ACPI table area (and of the first MiB).
pub const ACPI_END: u64 = 0x10_0000;
/// Where high memory starts; kernels load at or above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// The end of RAM below the MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// Where RAM continues above the hole.
pub const RAM_ABOVE_4G: u64 = 1 << 32;
/// The first virtio-mmio window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// The size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The most virtio-mmio devices (their GSIs must stay below the IOAPIC's 24 pins).
pub const VIRTIO_MMIO_MAX: usize = 16;
/// The GSI of the first virtio-mmio device; device `n` has `VIRTIO_GSI_BASE + n`.
pub const VIRTIO_GSI_BASE: u32 = 5;
/// The IOAPIC's MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// The KVM TSS area (three pages) just below the BIOS area at the top of 4 GiB.
pub const KVM_TSS_START: u64 = 0xfffb_d000;
/// The KVM identity-map page, right after the TSS.
pub const KVM_IDENTITY_MAP_START: u64 = KVM_TSS_START + 0x3000;

/// The COM1 8250 UART's first port.
pub const SERIAL_PORT: u16 = 0x3f8;
/// The 8250's GSI (ISA IRQ 4).
pub const SERIAL_GSI: u32 = 4;
/// The i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// The i8042 command/status port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// The CMOS index port (the data port follows it).
pub const CMOS_PORT: u16 = 0x70;
/// The ACPI sleep control register (FADT `SLEEP_CONTROL_REG`), one byte.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// The ACPI sleep status register (FADT `SLEEP_STATUS_REG`), one byte.
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// The ACPI reset register (FADT `RESET_REG`), one byte.
pub const ACPI_RESET_PORT: u16 = 0x602;
/// The value the guest writes to [`ACPI_RESET_PORT`] to reset.
pub const ACPI_RESET_VALUE: u8 = 0x01;
/// The `SLP_TYP` the DSDT's `_S5_` object gives for soft-off.
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;

/// The address of virtio-mmio window `n`.
pub const fn virtio_mmio_base(n: usize) -> u64 {
    VIRTIO_MMIO_START + n as u64 * VIRTIO_MMIO_SIZE
}

/// The GSI of virtio-mmio device `n`.
pub const fn virtio_gsi(n: usize) -> u32 {
    VIRTIO_GSI_BASE + n as u32
}

/// The guest RAM ranges for `size` bytes of memory: below the MMIO hole, and the rest above
/// 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_HOLE_START), (RAM_ABOVE_4G, size - MMIO_HOLE_START)]
    }
}

// The fixed areas do not overlap; checked when this file compiles.
const _: () = {
    assert!(GDT_START + 4 * 8 <= IDT_START);
    assert!(ZERO_PAGE_START + 0x1000 <= BOOT_STACK_POINTER);
    assert!(BOOT_STACK_POINTER < PML4_START);
    assert!(PDE_START + IDENTITY_MAPPED_GIB * 0x1000 <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    assert!(virtio_mmio_base(VIRTIO_MMIO_MAX) <= IOAPIC_START);
    assert!(virtio_gsi(VIRTIO_MMIO_MAX - 1) < 24);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_mmio_hole() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, MMIO_HOLE_START), (RAM_ABOVE_4G, 1 << 30)]
        );
    }
}
