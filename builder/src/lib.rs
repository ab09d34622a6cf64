//! The mvm builder: Workload IR → root filesystem image, dm-verity tree, initramfs and a signed
//! launch plan.
//!
//! Empty for now: OCI import, the EROFS writer, the verity tree and plan assembly arrive with the
//! builder issue. The launch plan types it will fill are in `mvm_ir::plan`.
