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
//! ([`backend`]: QEMU, or mvm's own VMM [`mvm_vmm`] on this runner's threads or jailed in a
//! child process — chosen for the host by [`backend::select`]), the agent channel
//! ([`client`]) for the hello and the command, the power-off, and the audit entries. A named VM
//! stays up instead ([`launch::named`]): its runner keeps its [`state`] on disk and serves its
//! [`control`] socket, relaying clients' requests over the one agent channel ([`mux`]), and
//! can save it [`cold`]. The guest's serial console is kept in a bounded log
//! ([`console_log`]). A guest's egress connections are judged by [`egress`]: the plan's
//! grants and the operator's configuration against the addresses a name really has.
//!
//! The modules depend on each other in one direction: `backend` ← `cold` ← `control` ←
//! `launch` (the workspace's `tests/architecture.rs` checks it). The runner links no builder,
//! no HTTP client and no registry client.

pub mod admission;
pub mod backend;
pub mod boot_snapshot;
pub mod client;
pub mod codes;
pub mod cold;
pub mod console_log;
pub mod control;
pub mod disk;
pub mod egress;
pub mod forward;
pub mod host_signed;
pub mod launch;
pub mod mux;
pub mod named_vm;
pub mod seccomp;
pub mod secrets;
pub mod state;
