//! x86_64 boot setup: the memory [`layout`], the kernel and zero page ([`boot`]), the CPU's
//! entry state ([`regs`], [`cpuid`], [`msr`], [`lapic`]) and the [`acpi`] tables.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod lapic;
pub mod layout;
pub mod msr;
pub mod regs;
