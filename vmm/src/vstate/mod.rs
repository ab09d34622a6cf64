//! The machine's state held by KVM: the [`vm`] (its memory slots and interrupt controllers),
//! its [`vcpu`]s, and the guest [`memory`] the VMM maps.

pub mod kick;
pub mod memory;
pub mod vcpu;
pub mod vcpu_snapshot;
pub mod vm;
