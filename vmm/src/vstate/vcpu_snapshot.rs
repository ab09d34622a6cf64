//! A vCPU's saved state: plain data, apart from the vCPU that takes and restores it
//! ([`super::vcpu`]), so that what parks the vCPUs to take it ([`crate::pause`]) need not
//! know the vCPU itself.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

/// A vCPU's whole state as KVM holds it: what a saved VM's vCPU is restored from. Taken with
/// the vCPU out of the guest and its last exit completed (its
/// `complete_exit`, then its `Persist::save`, in [`super::vcpu`]).
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuSnapshot {
    /// The CPUID it was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR KVM lists that could be read.
    pub msrs: Vec<kvm_msr_entry>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state (the legacy 4 KiB XSAVE area).
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC.
    pub lapic: kvm_lapic_state,
    /// Running, halted, waiting for a startup IPI…
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts and NMIs.
    pub events: kvm_vcpu_events,
}
