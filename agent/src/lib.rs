//! The mvm guest agent (PID 1 in the guest); the wire protocol it speaks is `mvm-protocol`.
//!
//! What comes in: a Debian cloud kernel that has just unpacked the initramfs the builder wrote
//! (this agent as `/init`, the kernel modules under `/lib/modules`, their load order in
//! `/etc/mvm/modules`) and a kernel command line, signed in the launch plan, that carries the
//! root filesystem's dm-verity parameters (`mvm.root_hash`, `mvm.salt`, `mvm.data_blocks`,
//! `mvm.hash_offset`, `mvm.block_size`). `/dev/vda` is the EROFS image, `/dev/vdb` its hash
//! tree.
//!
//! What goes out, in [`boot`]: the image opened through dm-verity with the signed root hash,
//! mounted read-only under a tmpfs overlay and made the root, with one
//! `mvm-agent: root ready <root_hash>` line and the boot timings on the console. Every block
//! the guest reads from then on is checked against the signed tree.
//!
//! What it refuses: a malformed or incomplete command line, a module that does not load, disks
//! that do not appear, a root that fails verification. Each failure is one
//! `mvm-agent: error <code> <message>` line on the console and a power-off — never a panic,
//! which for PID 1 would be a kernel panic.
//!
//! Then, in [`serve`], the agent answers the host over the virtio-console port named
//! `mvm.agent`, in the protocol both sides share (`mvm-protocol`): a hello with the boot
//! timings, commands run as an unprivileged user with their output streamed back, and a
//! power-off.
//!
//! The guest has no network interface: [`proxy`] reads what the workload's clients ask of the
//! egress proxy the agent serves inside the guest (HTTP `CONNECT` and forwarding, SOCKS5), for
//! the host to judge; [`serve`] carries each connection the host opens over the channel, and
//! the host's connections to the guest's forwarded ports the other way. Its only interface,
//! loopback, is brought up at boot.

pub mod boot;
pub mod proxy;
pub mod serve;
