//! The CPU state a 64-bit kernel expects at its entry: long mode with paging on, a flat GDT,
//! identity-mapped low memory, `rsi` pointing at the zero page.
//!
//! This is the state Linux's `startup_64` (ELF vmlinux) and the bzImage's 64-bit entry both
//! accept; they replace the GDT and page tables with their own soon after.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::layout::*;
use crate::vstate::memory::GuestRam;

/// CR0: protected mode.
const X86_CR0_PE: u64 = 1 << 0;
/// CR0: the FPU is an x87 (always 1 on modern CPUs).
const X86_CR0_ET: u64 = 1 << 4;
/// CR0: not write-through (reset value 1; with CD it disables caching).
const X86_CR0_NW: u64 = 1 << 29;
/// CR0: cache disable (reset value 1).
const X86_CR0_CD: u64 = 1 << 30;
/// CR0: paging.
const X86_CR0_PG: u64 = 1 << 31;
/// CR4: physical address extension, needed for long mode.
const X86_CR4_PAE: u64 = 1 << 5;
/// EFER: long mode enable.
const EFER_LME: u64 = 1 << 8;
/// EFER: long mode active.
const EFER_LMA: u64 = 1 << 10;

/// Page-table entry bits: present, writable.
const PTE_PRESENT_RW: u64 = 0x3;
/// Page-directory entry bit: a 2 MiB page.
const PDE_HUGE: u64 = 0x80;

/// The boot GDT: null, 64-bit code (selector 0x08), data (0x10), TSS (0x18).
const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// A GDT descriptor from its flags (access byte in the low 8 bits, G/D/L/AVL in bits 12–15),
/// base and 20-bit limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The KVM segment register a GDT entry at `index` describes.
fn segment(entry: u64, index: u16) -> kvm_segment {
    let flag = |shift: u32| ((entry >> shift) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: {
            let raw = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
            // With 4 KiB granularity the limit counts pages.
            if flag(55) == 1 {
                (raw << 12) | 0xfff
            } else {
                raw
            }
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: flag(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: flag(54),
        s: flag(44),
        l: flag(53),
        g: flag(55),
        avl: flag(52),
        unusable: u8::from(flag(47) == 0),
        padding: 0,
    }
}

/// Writes the boot GDT, an empty IDT and the identity-mapping page tables into guest memory,
/// and returns the special registers that use them.
pub fn setup_long_mode(
    memory: &GuestRam,
    sregs: &mut kvm_sregs,
) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, entry) in GDT.iter().enumerate() {
        memory.write_obj(*entry, GuestAddress(GDT_START + i as u64 * 8))?;
    }
    memory.write_obj(0u64, GuestAddress(IDT_START))?;

    let code = segment(GDT[1], 1);
    let data = segment(GDT[2], 2);
    let tss = segment(GDT[3], 3);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    // PML4[0] -> PDPT; PDPT[i] -> PD i; each PD maps 1 GiB with 2 MiB pages.
    memory.write_obj(PDPTE_START | PTE_PRESENT_RW, GuestAddress(PML4_START))?;
    for gib in 0..IDENTITY_MAPPED_GIB {
        let pd = PDE_START + gib * 0x1000;
        memory.write_obj(pd | PTE_PRESENT_RW, GuestAddress(PDPTE_START + gib * 8))?;
        for i in 0..512u64 {
            let address = (gib << 30) | (i << 21);
            memory.write_obj(
                address | PTE_PRESENT_RW | PDE_HUGE,
                GuestAddress(pd + i * 8),
            )?;
        }
    }
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    // The reset value of CR0 has CD and NW set: a guest left with them runs uncached.
    sregs.cr0 = (sregs.cr0 | X86_CR0_PE | X86_CR0_PG | X86_CR0_ET) & !(X86_CR0_CD | X86_CR0_NW);
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(())
}

/// The general registers at the kernel's 64-bit entry.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2, // bit 1 is reserved and always set
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// The FPU at reset: x87 control word and SSE control/status as after `FNINIT`.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn gdt_entries_decode_to_flat_long_mode_segments() {
        let code = segment(GDT[1], 1);
        assert_eq!((code.selector, code.l, code.db, code.present), (8, 1, 0, 1));
        assert_eq!(
            (code.base, code.limit, code.type_, code.s),
            (0, 0xffff_ffff, 0xb, 1)
        );
        let data = segment(GDT[2], 2);
        assert_eq!(
            (data.selector, data.db, data.type_, data.limit),
            (0x10, 1, 3, 0xffff_ffff)
        );
        let tss = segment(GDT[3], 3);
        assert_eq!((tss.selector, tss.s, tss.type_), (0x18, 0, 0xb));
    }

    #[test]
    fn page_tables_identity_map_low_memory_and_the_mmio_hole() {
        let memory = crate::vstate::memory::create(1 << 20).unwrap();
        let mut sregs = kvm_sregs {
            cr0: 0x6000_0010,
            ..Default::default()
        };
        setup_long_mode(&memory, &mut sregs).unwrap();
        assert_eq!(sregs.cr0 & (X86_CR0_CD | X86_CR0_NW), 0);
        assert_eq!(
            sregs.cr0 & (X86_CR0_PE | X86_CR0_PG),
            X86_CR0_PE | X86_CR0_PG
        );
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        // Walk the tables for an address in the virtio-mmio window.
        let walk = |va: u64| -> u64 {
            let pml4e: u64 = memory
                .read_obj(GuestAddress(PML4_START + ((va >> 39) & 511) * 8))
                .unwrap();
            let pdpte: u64 = memory
                .read_obj(GuestAddress((pml4e & !0xfff) + ((va >> 30) & 511) * 8))
                .unwrap();
            let pde: u64 = memory
                .read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 511) * 8))
                .unwrap();
            assert_eq!(pde & (PDE_HUGE | 1), PDE_HUGE | 1);
            (pde & !0x1f_ffff & !PDE_HUGE) | (va & 0x1f_ffff)
        };
        for va in [0x1234, RSDP_START, VIRTIO_MMIO_START + 0x70, 0xffff_f000] {
            assert_eq!(walk(va), va);
        }
        assert!(memory.last_addr().0 < 1 << 20);
    }
}
