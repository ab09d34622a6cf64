//! The CPUID a vCPU reports: what KVM supports, filtered to what this VMM offers.
//!
//! Each vCPU gets its own APIC id (leaf 1 `EBX[31:24]`, leaf 0xB `EDX`), the hypervisor bit
//! is set, and features the VMM does not emulate are hidden: nested virtualization (VMX, SVM),
//! SMX, and the architectural PMU (leaf 0xA), so a guest never programs counters nobody
//! virtualizes. KVM's paravirtual end-of-interrupt (`KVM_FEATURE_PV_EOI`) is hidden too: with
//! it, Linux nested on emulated AMD-V (`scripts/vmm-nested-linux`) was handed its LAPIC timer
//! interrupt while its interrupts were disabled and deadlocked on its own runqueue lock; without
//! it the same boot finishes (`docs/vmm.md`, "Linux on this VMM, nested"). The guest then
//! acknowledges interrupts with an ordinary LAPIC EOI write, one exit each. Pure functions over
//! the entries, so they are tested without `/dev/kvm`.

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 1 ECX: VMX.
const LEAF1_ECX_VMX: u32 = 1 << 5;
/// Leaf 1 ECX: SMX.
const LEAF1_ECX_SMX: u32 = 1 << 6;
/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 0x8000_0001 ECX: SVM.
const EXT_LEAF1_ECX_SVM: u32 = 1 << 2;
/// KVM's feature leaf (`KVM_CPUID_FEATURES`), at the base where `KVM_GET_SUPPORTED_CPUID`
/// reports it.
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// `KVM_CPUID_FEATURES` EAX: paravirtual end-of-interrupt (`KVM_FEATURE_PV_EOI`).
const KVM_FEATURE_PV_EOI: u32 = 1 << 6;

/// Filters `entries` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `apic_id` of `vcpus`.
pub fn filter(entries: &mut [kvm_cpuid_entry2], apic_id: u8, vcpus: u8) {
    for entry in entries.iter_mut() {
        match entry.function {
            0x1 => {
                entry.ecx &= !(LEAF1_ECX_VMX | LEAF1_ECX_SMX);
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
                // EBX: APIC id, logical processor count, CLFLUSH line size (8 × 8 bytes).
                entry.ebx = (u32::from(apic_id) << 24) | (u32::from(vcpus) << 16) | (8 << 8);
            }
            0xa => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            0xb | 0x1f => entry.edx = u32::from(apic_id),
            0x8000_0001 => entry.ecx &= !EXT_LEAF1_ECX_SVM,
            KVM_CPUID_FEATURES => entry.eax &= !KVM_FEATURE_PV_EOI,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            ecx,
            eax: 7,
            ebx: 7,
            edx: 7,
            ..Default::default()
        }
    }

    #[test]
    fn nested_virtualization_and_the_pmu_are_hidden_and_apic_ids_set() {
        let mut entries = vec![
            leaf(1, LEAF1_ECX_VMX | 1),
            leaf(0xa, 0),
            leaf(0xb, 0),
            leaf(0x8000_0001, 0xff),
        ];
        filter(&mut entries, 3, 4);
        assert_eq!(entries[0].ecx, 1 | LEAF1_ECX_HYPERVISOR);
        assert_eq!(entries[0].ebx >> 24, 3);
        assert_eq!((entries[0].ebx >> 16) & 0xff, 4);
        assert_eq!((entries[1].eax, entries[1].ebx, entries[1].edx), (0, 0, 0));
        assert_eq!(entries[2].edx, 3);
        assert_eq!(entries[3].ecx, 0xff & !EXT_LEAF1_ECX_SVM);
    }

    #[test]
    fn pv_eoi_is_hidden_and_the_other_kvm_features_kept() {
        // What KVM offered in the nested setup: clocksources, async PF, steal time, PV EOI,
        // PV unhalt, PV TLB flush, PV IPIs, poll control, PV sched yield, the stable bit.
        let offered = 0x0100_7efb;
        let mut entries = vec![kvm_cpuid_entry2 {
            function: KVM_CPUID_FEATURES,
            eax: offered,
            ..Default::default()
        }];
        filter(&mut entries, 0, 1);
        assert_eq!(entries[0].eax, offered & !KVM_FEATURE_PV_EOI);
        assert_eq!(entries[0].eax & KVM_FEATURE_PV_EOI, 0);
    }
}
