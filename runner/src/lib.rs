//! `mvm-runner`: admits a signed launch plan, then boots it in a microVM.
//!
//! Empty for now: the QEMU and KVM backends arrive with the runner issues. Admission, the check
//! every boot starts with, is `mvm_ir::admission::PlanAdmission`.
