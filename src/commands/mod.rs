//! One module per command group. Each `run` returns `anyhow::Result<()>`; errors from the
//! crates keep their type inside the `anyhow::Error`, so [`crate::output::Output::error`] can
//! report their stable code and exit status.

pub mod audit;
pub mod bench;
pub mod build;
pub mod bundle;
pub mod declaration;
pub mod doctor;
pub mod init;
pub mod ir;
pub mod kernel;
pub mod keys;
pub mod nix;
pub mod plan;
pub mod receipt;
pub mod run;
pub mod vm;

use std::fmt;

use mvm_ir::audit::HostAudit;
use mvm_ir::home::MvmHome;
use mvm_ir::keys::KeyStore;
use mvm_ir::ErrorClass;
use serde_json::Value;

/// The host's state directory and what lives in it.
pub struct Host {
    pub home: MvmHome,
    pub keys: KeyStore,
}

impl Host {
    pub fn open() -> anyhow::Result<Self> {
        let home = MvmHome::from_env()?;
        Ok(Self {
            keys: KeyStore::new(home.clone()),
            home,
        })
    }

    /// Appends a signed entry to the audit chain. A failure to record is a failure of the
    /// command: mvm does not act without leaving evidence.
    pub fn audit(&self, event: &str, fields: Value) -> anyhow::Result<()> {
        HostAudit::open(&self.home)?.append(event, fields)?;
        Ok(())
    }
}

/// An error from a crate other than `mvm-ir`, carrying its stable code and class so that
/// [`crate::output::Output::error`] reports it like the others.
#[derive(Debug)]
pub struct CodedError {
    pub code: String,
    pub class: ErrorClass,
    pub message: String,
}

impl fmt::Display for CodedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CodedError {}

/// The class of a builder error code: digests and pins that do not match are integrity
/// failures, unreachable registries and local files are I/O, everything else is bad input.
pub fn class_of(code: &str) -> ErrorClass {
    match code {
        "OCI002" | "KERNEL005" | "NIXBUILD004" => ErrorClass::Integrity,
        "OCI007" | "OCI008" | "LAYER011" | "BUILD003" | "BUILD004" | "BUILD005" | "KERNEL001"
        | "KERNEL006" | "BENCH001" | "INIT002" | "INIT004" | "NIXBUILD001" | "NIXBUILD003"
        | "NIXBUILD006" | "RUN031" | "RUN032" | "RUN025" => ErrorClass::Io,
        _ => ErrorClass::InvalidInput,
    }
}

/// Wraps an error that has a stable code.
pub fn coded_as(code: &str, err: impl fmt::Display) -> anyhow::Error {
    CodedError {
        code: code.to_string(),
        class: class_of(code),
        message: err.to_string(),
    }
    .into()
}

/// Wraps a kernel store error.
pub fn coded(err: mvm_builder::kernel::KernelError) -> anyhow::Error {
    coded_as(err.code(), err)
}
