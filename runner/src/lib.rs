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
//! [`launch`] is the whole run: admission, the VM's private state directory, the backend
//! ([`qemu`], chosen for the host by [`host`]), the agent channel ([`client`]) for the hello
//! and the command, the power-off, and the audit entries. A named VM stays up instead: its
//! runner keeps its [`state`] on disk and serves its [`control`] socket, relaying clients'
//! requests over the one agent channel ([`mux`]). With `--jail` the own VMM ([`mvm_vmm`]) runs in a
//! child process confined by [`jail`] (namespaces, `pivot_root`, an unprivileged uid, resource
//! limits); QEMU and the jailed VMM are both supervised child processes ([`child`]). The runner
//! links no builder, no HTTP client and no registry client.

pub mod admission;
pub mod backend;
pub mod client;
pub mod cold;
pub mod control;
pub mod launch;
pub mod mux;
pub mod serial;
pub mod state;
