//! One module per command group. Each `run` returns `anyhow::Result<()>`; errors from the
//! crates keep their type inside the `anyhow::Error`, so [`crate::output::Output::error`] can
//! report their stable code and exit status.

pub mod audit;
pub mod bench;
pub mod build;
pub mod builder;
pub mod bundle;
pub mod declaration;
pub mod dev;
pub mod doctor;
pub mod image;
pub mod init;
pub mod ir;
pub mod kernel;
pub mod keys;
pub mod mcp;
pub mod nix;
pub mod plan;
pub mod policy;
pub mod receipt;
pub mod run;
pub mod sandbox;
pub mod secret;
pub mod serve;
pub mod snapshot;
pub mod vm;
pub mod volume;

use std::fmt;

use mvm_ir::audit::HostAudit;
use mvm_ir::home::MvmHome;
use mvm_ir::keys::KeyStore;
use mvm_ir::{Coded, ErrorClass};
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

/// An error from a crate other than `mvm-ir`, or one the CLI raises itself, carrying its stable
/// code and class so that [`crate::output::Output::error`] reports it like the others.
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

impl Coded for CodedError {
    fn code(&self) -> &str {
        &self.code
    }

    fn class(&self) -> ErrorClass {
        self.class
    }
}

/// Wraps an error whose type has a stable code, with the class its type gives it.
pub fn coded(err: impl Coded + fmt::Display) -> anyhow::Error {
    coded_with(err.code(), err.class(), &err)
}

/// Wraps `err` under `code` and `class`, for a code that no [`Coded`] type carries here.
pub fn coded_with(code: &str, class: ErrorClass, err: impl fmt::Display) -> anyhow::Error {
    CodedError {
        code: code.to_string(),
        class,
        message: err.to_string(),
    }
    .into()
}

/// Wraps `err` under `code`, a code the CLI raises itself for an input, an argument or a state
/// it cannot use: invalid input (exit 65).
pub fn coded_as(code: &str, err: impl fmt::Display) -> anyhow::Error {
    coded_with(code, ErrorClass::InvalidInput, err)
}

/// Wraps `err` under `code`, a code the CLI raises itself for a failure of the host (a file,
/// a directory, a program or channel it needs): I/O (exit 74).
pub fn coded_io(code: &str, err: impl fmt::Display) -> anyhow::Error {
    coded_with(code, ErrorClass::Io, err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::{Output, EXIT_INTEGRITY, EXIT_INVALID_INPUT, EXIT_IO};
    use mvm_builder::kernel::KernelError;
    use mvm_runner::client::ClientError;
    use mvm_runner::named_vm::NamedVmError;
    use std::process::ExitCode;

    fn reported(err: anyhow::Error) -> (String, ExitCode) {
        let coded = err.downcast_ref::<CodedError>().unwrap();
        (coded.code.clone(), Output::new(true).error(&err))
    }

    /// The codes the CLI once classed by a table of strings exit as they did.
    #[test]
    fn codes_exit_with_the_status_of_their_class() {
        let pinned = KernelError::DigestMismatch {
            path: "vmlinuz".into(),
            pinned: "a".into(),
            found: "b".into(),
        };
        assert_eq!(
            reported(coded(pinned)),
            ("KERNEL005".into(), ExitCode::from(EXIT_INTEGRITY))
        );
        assert_eq!(
            reported(coded_io("INIT002", "exists")),
            ("INIT002".into(), ExitCode::from(EXIT_IO))
        );
        assert_eq!(
            reported(coded_as("INIT003", "bad name")),
            ("INIT003".into(), ExitCode::from(EXIT_INVALID_INPUT))
        );
        let channel = NamedVmError::from(ClientError::Closed);
        let code = channel.code().unwrap().to_string();
        assert_eq!(
            reported(coded_with(&code, channel.class(), &channel)),
            ("RUN025".into(), ExitCode::from(EXIT_IO))
        );
    }
}
