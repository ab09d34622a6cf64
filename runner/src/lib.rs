//! `mvm-runner`: admits a signed launch plan, then boots it in a microVM.
//!
//! Admission ([`admission`]) comes first and decides everything before any VM process starts or
//! `/dev/kvm` is opened: the plan's envelope, signer, signature, type, schema, rules and window
//! (through `mvm_ir::admission`), then the boot artifacts the plan pins — the kernel and the
//! initramfs read once into memory and hashed there, so what was checked is what boots, and the
//! root filesystem and its verity tree present with the sizes the plan's verity parameters
//! require (their contents are checked block by block by dm-verity in the guest, against the
//! root hash the plan signs). Only then is a single-use plan's nonce consumed.
//!
//! The backends that boot an admitted plan (a supervised QEMU, and mvm's own VMM) arrive with
//! the runner issues.

pub mod admission;
pub mod host;
