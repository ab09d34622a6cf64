//! Plan admission for the runner: a plan bundle in, verified boot artifacts out.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use mvm_ir::admission::{PlanAdmission, VerifiedPlan};
use mvm_ir::digest::sha256_prefixed;
use mvm_ir::plan::{LaunchPlan, MAX_ENVELOPE_BYTES};
use mvm_ir::{Coded, ErrorClass};
use mvm_protocol::cmdline::VerityCmdline;
use time::OffsetDateTime;

use crate::codes;

pub mod host_policy;

/// The largest kernel the runner reads.
const MAX_KERNEL_BYTES: u64 = 128 << 20;
/// The largest initramfs the runner reads.
const MAX_INITRAMFS_BYTES: u64 = 1 << 30;

/// Why a plan was not admitted. Its [`Coded::code`] is stable.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    /// The plan itself was refused (signature, trust, window, replay, …).
    #[error(transparent)]
    Plan(#[from] mvm_ir::Error),
    /// A file the plan pins is missing or not a regular file.
    #[error("{what} {path}: {reason}")]
    MissingArtifact {
        /// Which artifact.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// A file's bytes differ from the digest the plan pins.
    #[error("{what} {path} hashes to {found}, the plan pins {pinned}")]
    DigestMismatch {
        /// Which artifact.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The digest the plan pins.
        pinned: String,
        /// What the file hashes to.
        found: String,
    },
    /// The kernel command line does not carry exactly the plan's verity parameters, or names
    /// another init: the guest would verify (or run) something other than what the plan pins.
    #[error("the plan's kernel command line {0}")]
    Cmdline(String),
    /// The plan cannot run here as asked (no command, secrets, no usable backend); checked
    /// before a single-use plan is used up.
    #[error("{reason}")]
    NotRunnable {
        /// The stable code.
        code: String,
        /// Why.
        reason: String,
    },
    /// The root filesystem or its hash tree is not the size the verity parameters require.
    #[error("{what} {path} is {found} bytes, the plan's verity parameters need {expected}")]
    WrongSize {
        /// Which artifact.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Its size.
        found: u64,
        /// The size required.
        expected: String,
    },
}

impl Coded for AdmissionError {
    fn code(&self) -> &str {
        match self {
            AdmissionError::Plan(e) => e.code(),
            AdmissionError::MissingArtifact { .. } => codes::RUN001,
            AdmissionError::DigestMismatch { .. } => codes::RUN002,
            AdmissionError::WrongSize { .. } => codes::RUN003,
            AdmissionError::Cmdline(_) => codes::RUN004,
            AdmissionError::NotRunnable { code, .. } => code,
        }
    }

    /// The plan's own refusal keeps its class; the runner's refusals are classed as the CLI
    /// has always classed `RUN…` codes other than RUN025, RUN031 and RUN032.
    fn class(&self) -> ErrorClass {
        match self {
            AdmissionError::Plan(e) => e.class(),
            AdmissionError::MissingArtifact { .. }
            | AdmissionError::DigestMismatch { .. }
            | AdmissionError::WrongSize { .. }
            | AdmissionError::Cmdline(_)
            | AdmissionError::NotRunnable { .. } => ErrorClass::InvalidInput,
        }
    }
}

/// What boots: the kernel and initramfs as checked (in memory), and the paths of the root
/// filesystem and its hash tree.
#[derive(Debug)]
pub struct BootArtifacts {
    /// The kernel's bytes, hashed.
    pub kernel: Vec<u8>,
    /// The initramfs's bytes, hashed.
    pub initramfs: Vec<u8>,
    /// The EROFS image.
    pub rootfs: PathBuf,
    /// Its verity hash tree.
    pub verity: PathBuf,
}

/// An admitted plan and its artifacts.
#[derive(Debug)]
pub struct Admitted {
    /// The verified plan.
    pub plan: VerifiedPlan,
    /// What it boots.
    pub artifacts: BootArtifacts,
}

/// Admits the plan envelope at `envelope` (its artifacts are the files beside it), then runs
/// `prepare` on the verified plan (what the caller must settle before using it up: the
/// command, the backend), consuming a single-use plan's nonce only if everything passed.
/// `again` is for a VM that was admitted already (a cold one being woken): the plan must have
/// that digest, and is not used up again.
pub fn admit_bundle<T>(
    envelope: &Path,
    admission: &PlanAdmission,
    now: OffsetDateTime,
    again: Option<&str>,
    prepare: impl FnOnce(&VerifiedPlan) -> Result<T, AdmissionError>,
) -> Result<(Admitted, T), AdmissionError> {
    let bytes = mvm_ir::fsutil::read_capped(envelope, MAX_ENVELOPE_BYTES, "plan envelope")?;
    let bundle = envelope
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let check = |verified: &VerifiedPlan| {
        check_cmdline(&verified.plan)?;
        // Absolute paths: a backend must never read a relative name as something else
        // (QEMU takes `name:` at the start of a drive's file as a protocol).
        let bundle = fs::canonicalize(bundle).map_err(|e| AdmissionError::MissingArtifact {
            what: "bundle directory",
            path: bundle.to_path_buf(),
            reason: e.to_string(),
        })?;
        let artifacts = load_artifacts(&bundle, &verified.plan)?;
        Ok::<_, AdmissionError>((artifacts, prepare(verified)?))
    };
    let (plan, (artifacts, prepared)) = match again {
        None => admission.admit_checked(&bytes, now, check)?,
        Some(digest) => admission.readmit_checked(&bytes, now, digest, check)?,
    };
    Ok((Admitted { plan, artifacts }, prepared))
}

/// The kernel command line must carry the plan's own verity parameters, read exactly as the
/// guest agent reads them, and must not hand the boot to another init.
pub fn check_cmdline(plan: &LaunchPlan) -> Result<(), AdmissionError> {
    let cmdline = &plan.kernel.cmdline;
    if let Some(word) = cmdline
        .split_ascii_whitespace()
        .find(|w| w.starts_with("init=") || w.starts_with("rdinit="))
    {
        return Err(AdmissionError::Cmdline(format!(
            "names another init ({word})"
        )));
    }
    let parsed = VerityCmdline::parse(cmdline)
        .map_err(|e| AdmissionError::Cmdline(format!("is not readable by the agent: {e}")))?;
    let pinned = &plan.rootfs.verity;
    let agrees = parsed.root_hash == pinned.root_hash
        && parsed.salt == pinned.salt
        && parsed.data_blocks == pinned.data_blocks
        && parsed.hash_offset == pinned.hash_offset
        && parsed.block_size == pinned.data_block_size
        && parsed.block_size == pinned.hash_block_size;
    if !agrees {
        return Err(AdmissionError::Cmdline(
            "disagrees with the plan's verity parameters".into(),
        ));
    }
    Ok(())
}

/// Reads and checks the artifacts `plan` pins in `bundle`.
pub fn load_artifacts(bundle: &Path, plan: &LaunchPlan) -> Result<BootArtifacts, AdmissionError> {
    let kernel = read_pinned(
        "kernel",
        &bundle.join(&plan.kernel.path),
        &plan.kernel.digest,
        MAX_KERNEL_BYTES,
    )?;
    let initramfs = read_pinned(
        "initramfs",
        &bundle.join(&plan.initramfs.path),
        &plan.initramfs.digest,
        MAX_INITRAMFS_BYTES,
    )?;
    let verity = &plan.rootfs.verity;
    let rootfs = bundle.join(&plan.rootfs.path);
    let rootfs_len = regular_file_len("root filesystem", &rootfs)?;
    let data_len = verity
        .data_blocks
        .checked_mul(u64::from(verity.data_block_size));
    if data_len != Some(rootfs_len) {
        return Err(AdmissionError::WrongSize {
            what: "root filesystem",
            path: rootfs,
            found: rootfs_len,
            expected: format!(
                "{} blocks of {}",
                verity.data_blocks, verity.data_block_size
            ),
        });
    }
    let tree = bundle.join(&verity.path);
    let tree_len = regular_file_len("verity tree", &tree)?;
    // At least the superblock's block and one hash block after the offset.
    let minimum = verity
        .hash_offset
        .saturating_add(2 * u64::from(verity.hash_block_size));
    if tree_len < minimum {
        return Err(AdmissionError::WrongSize {
            what: "verity tree",
            path: tree,
            found: tree_len,
            expected: format!("at least {minimum}"),
        });
    }
    Ok(BootArtifacts {
        kernel,
        initramfs,
        rootfs,
        verity: tree,
    })
}

/// Reads `path` once (refusing anything but a regular file, and more than `limit` bytes) and
/// checks its digest on the bytes read.
fn read_pinned(
    what: &'static str,
    path: &Path,
    pinned: &str,
    limit: u64,
) -> Result<Vec<u8>, AdmissionError> {
    let missing = |reason: String| AdmissionError::MissingArtifact {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(|e| missing(e.to_string()))?;
    let meta = file.metadata().map_err(|e| missing(e.to_string()))?;
    if !meta.is_file() {
        return Err(missing("not a regular file".into()));
    }
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| missing(e.to_string()))?;
    if bytes.len() as u64 > limit {
        return Err(missing(format!("over the {limit}-byte limit")));
    }
    let found = sha256_prefixed(&bytes);
    if found != pinned {
        return Err(AdmissionError::DigestMismatch {
            what,
            path: path.to_path_buf(),
            pinned: pinned.to_string(),
            found,
        });
    }
    Ok(bytes)
}

fn regular_file_len(what: &'static str, path: &Path) -> Result<u64, AdmissionError> {
    let meta = fs::metadata(path).map_err(|e| AdmissionError::MissingArtifact {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if !meta.is_file() {
        return Err(AdmissionError::MissingArtifact {
            what,
            path: path.to_path_buf(),
            reason: "not a regular file".into(),
        });
    }
    Ok(meta.len())
}

#[cfg(test)]
mod tests;
