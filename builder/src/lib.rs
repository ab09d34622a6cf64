//! The mvm builder: Workload IR → root filesystem image, dm-verity tree, initramfs and a signed
//! launch plan.
//!
//! The pieces, in the order a build runs them:
//!
//! - [`tree`]: the staged root filesystem: an in-memory tree of nodes whose file contents live
//!   in a private staging file. Layers are applied to it; nothing is extracted onto the host.
//! - [`layer`]: OCI layer tar streams applied to the tree: whiteouts, hardlinks, symlinks,
//!   xattrs; traversal, absolute paths and symlink escapes refused.
//! - [`oci`]: images pinned by digest from a registry, an OCI layout or a layout archive, every
//!   blob verified before use and kept in a content-addressed cache.
//! - [`rootfs`]: image → tree → EROFS → verity, the part that parses untrusted bytes, and
//!   [`worker`], which runs it confined in a child process (the host builder persona), or
//!   [`vm_persona`], in the builder VM.
//! - [`nix_image`]: `nix_packages` realised by the real Nix into a store closure (checked
//!   against mvm-nix's own derivation and NAR hashing), staged as `/nix/store` and `/bin`.
//! - [`erofs`]: a native, deterministic EROFS image writer over a [`tree::Tree`].
//! - [`image_cache`]: records of the images builds pulled, what VMs need, and crash-safe
//!   removal of the rest (`mvm image ls/rm/prune`, `mvm system df`).
//! - [`kernel`]: the Debian cloud kernel and the modules the guest needs, pinned by sha256.
//! - [`builder_image`]: the builder VM's image, Nix and its dependencies from Debian packages
//!   plus the static worker, as an OCI layout; [`debian`]: apt and dpkg-deb for both.
//! - [`initramfs`]: the deterministic, gzip-compressed `newc` archive with the agent as `/init`.
//! - [`bundle`]: the trusted half: kernel + initramfs + every file hashed → launch plan and
//!   provenance, for the caller to sign.
//! - [`bench`]: measurements against mkfs.erofs and veritysetup, for `mvm bench`.
//! - [`verity`]: the dm-verity hash tree over an image, byte-identical to `veritysetup format`.

pub mod bench;
pub mod builder_image;
pub mod bundle;
pub mod debian;
pub mod erofs;
pub mod image_cache;
pub mod initramfs;
pub mod kernel;
pub mod layer;
pub mod log_lines;
pub mod nix_image;
pub mod oci;
pub mod rootfs;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tree;
pub mod verity;
pub mod vm_persona;
pub mod worker;
