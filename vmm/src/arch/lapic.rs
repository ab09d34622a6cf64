//! Local APIC LINT pins: LVT0 as ExtINT so the 8259 PIC's interrupts reach the CPU through the
//! LAPIC, LVT1 as NMI, as a PC's firmware leaves them.

use kvm_bindings::kvm_lapic_state;

/// Interrupt request register (8 words, 0x10 apart).
pub const APIC_IRR: usize = 0x200;
/// In-service register (8 words, 0x10 apart).
pub const APIC_ISR: usize = 0x100;
/// LVT timer.
pub const APIC_LVTT: usize = 0x320;
/// Timer initial count.
pub const APIC_TMICT: usize = 0x380;
/// Timer current count.
pub const APIC_TMCCT: usize = 0x390;
/// LVT LINT0's register offset.
const APIC_LVT0: usize = 0x350;
/// LVT LINT1's register offset.
const APIC_LVT1: usize = 0x360;
/// Delivery mode NMI.
const APIC_MODE_NMI: u32 = 0x4;
/// Delivery mode ExtINT.
const APIC_MODE_EXTINT: u32 = 0x7;

/// The 32-bit register at `offset`.
pub fn read(state: &kvm_lapic_state, offset: usize) -> u32 {
    get(state, offset)
}

fn get(state: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &state.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        state.regs[offset + i] = byte as _;
    }
}

/// Sets the delivery mode (bits 8–10) of a LVT register, keeping its other bits.
fn with_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Programs LINT0 = ExtINT and LINT1 = NMI.
pub fn set_lint(state: &mut kvm_lapic_state) {
    let lvt0 = get(state, APIC_LVT0);
    set(state, APIC_LVT0, with_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = get(state, APIC_LVT1);
    set(state, APIC_LVT1, with_mode(lvt1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint0_is_extint_and_lint1_nmi() {
        let mut state = kvm_lapic_state::default();
        set(&mut state, APIC_LVT0, 0x0001_0000);
        set_lint(&mut state);
        assert_eq!(get(&state, APIC_LVT0), 0x0001_0700);
        assert_eq!(get(&state, APIC_LVT1), 0x400);
    }
}
