//! Why a launch failed, and the exit status each way of failing has: stable codes
//! (`docs/errors.md`) and statuses a caller can tell apart.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use mvm_ir::{Coded, ErrorClass};
use mvm_protocol::{codes, ErrorReply, ExitStatus};

use crate::admission::AdmissionError;
use crate::boot_snapshot::BootSnapshotError;
use crate::client::ClientError;
use crate::cold::ColdError;

/// Exit statuses of a launch that did not end with the command's own status. Commands may
/// exit with any status too; the JSON report says which it was.
pub mod exit {
    /// The plan or one of its artifacts was refused: nothing was started.
    pub const REFUSED: u8 = 120;
    /// dm-verity in the guest refused a block of the root: its contents are not the signed ones.
    pub const INTEGRITY: u8 = 121;
    /// The VM did not boot to a ready agent, or died before the command ended.
    pub const VM_FAILED: u8 = 122;
    /// The command ran past its timeout and was killed.
    pub const TIMEOUT: u8 = 124;
    /// The runner itself failed: the host's state, the audit log, a bad argument.
    pub const RUNNER: u8 = 125;
    /// The command exists but cannot be executed (as in a shell).
    pub const NOT_EXECUTABLE: u8 = 126;
    /// The command does not exist (as in a shell).
    pub const NOT_FOUND: u8 = 127;
    /// The runner was interrupted (as a shell reports SIGINT).
    pub const INTERRUPTED: u8 = 130;

    /// The exit status that reports how a command ended: its own code, `128 + signal` for a
    /// signal (as a shell reports it), [`TIMEOUT`] for a timeout.
    pub fn of_command(status: super::ExitStatus) -> u8 {
        match status {
            super::ExitStatus::Exited { code } => (code & 0xff) as u8,
            super::ExitStatus::Signaled { signal } => (128 + signal.clamp(0, 127)) as u8,
            super::ExitStatus::TimedOut => TIMEOUT,
        }
    }
}

/// Why a launch failed. Codes are stable (`docs/errors.md`).
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The plan or an artifact it pins was refused.
    #[error(transparent)]
    Refused(#[from] AdmissionError),
    /// The guest reported a block of the root that failed verification.
    #[error("integrity failure in the guest: {0}")]
    Integrity(String),
    /// The guest reported a failed boot, or its kernel panicked.
    #[error("the guest failed to boot: {0}")]
    GuestFailed(String),
    /// The agent did not answer within the boot timeout.
    #[error("the guest did not become ready within {0:?}")]
    BootTimeout(Duration),
    /// QEMU could not start, or exited unexpectedly.
    #[error("the VM process failed: {0}")]
    Backend(String),
    /// A VM of that name exists already (`mvm rm` it first), or its runner still holds it.
    #[error("a VM named {0} exists already; remove it with `mvm rm {0}` first")]
    NameInUse(String),
    /// The runner was told to stop (SIGINT, SIGTERM, SIGHUP); the VM was torn down.
    #[error("interrupted: the VM was stopped")]
    Interrupted,
    /// A disk the launch asks for cannot be attached.
    #[error("disk: {0}")]
    Disk(String),
    /// The agent channel broke or the agent did not answer in time.
    #[error("the agent channel failed: {0}")]
    Channel(#[from] ClientError),
    /// The host's state could not be prepared or cleaned.
    #[error("{what}: {source}")]
    Host {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An audit entry could not be written: mvm does not act without leaving evidence.
    #[error("audit: {0}")]
    Audit(mvm_ir::Error),
    /// A command's audit entry could not be written while the VM served: it was stopped.
    #[error("audit: {0}; the VM was stopped")]
    AuditFailed(String),
    /// The agent refused the command.
    #[error("{}: {}", .0.code, .0.message)]
    CommandRefused(ErrorReply),
    /// A cold VM could not be woken (it stays cold).
    #[error(transparent)]
    Cold(#[from] ColdError),
    /// A boot snapshot could not be made, or one found in use turned out not to be the one
    /// that was made.
    #[error(transparent)]
    BootSnapshot(#[from] BootSnapshotError),
    /// A volume (`--volume`) could not be had: unknown, or its record or key untrusted.
    #[error(transparent)]
    Volume(#[from] mvm_ir::volume::VolumeError),
}

/// The code the runner prints with its exit status; an agent's refusal of the command keeps the
/// agent's code.
impl Coded for LaunchError {
    fn code(&self) -> &str {
        match self {
            LaunchError::Refused(e) => e.code(),
            LaunchError::Integrity(_) => crate::codes::RUN020,
            LaunchError::GuestFailed(_) => crate::codes::RUN021,
            LaunchError::BootTimeout(_) => crate::codes::RUN022,
            LaunchError::Backend(_) => crate::codes::RUN023,
            LaunchError::Channel(_) => crate::codes::RUN025,
            LaunchError::Host { .. } => crate::codes::RUN026,
            LaunchError::Audit(_) | LaunchError::AuditFailed(_) => crate::codes::RUN027,
            LaunchError::CommandRefused(e) => &e.code,
            LaunchError::Interrupted => crate::codes::RUN033,
            LaunchError::NameInUse(_) => crate::codes::RUN034,
            LaunchError::Disk(_) => crate::codes::RUN062,
            LaunchError::Cold(e) => Coded::code(e),
            LaunchError::BootSnapshot(e) => e.code(),
            LaunchError::Volume(e) => e.code(),
        }
    }

    /// A broken agent channel (RUN025) is I/O; an admission or cold-state error keeps its
    /// class; the rest are classed as the CLI has always classed `RUN…` and `AGENT…` codes.
    /// The runner's exit status is not this class but [`LaunchError::exit_status`].
    fn class(&self) -> ErrorClass {
        match self {
            LaunchError::Refused(e) => e.class(),
            LaunchError::Cold(e) => Coded::class(e),
            LaunchError::BootSnapshot(e) => e.class(),
            LaunchError::Volume(e) => e.class(),
            LaunchError::Channel(_) => ErrorClass::Io,
            LaunchError::Integrity(_)
            | LaunchError::GuestFailed(_)
            | LaunchError::BootTimeout(_)
            | LaunchError::Backend(_)
            | LaunchError::Host { .. }
            | LaunchError::Audit(_)
            | LaunchError::AuditFailed(_)
            | LaunchError::CommandRefused(_)
            | LaunchError::Interrupted
            | LaunchError::NameInUse(_)
            | LaunchError::Disk(_) => ErrorClass::InvalidInput,
        }
    }
}

impl LaunchError {
    /// The runner's exit status for this failure ([`exit`]).
    pub fn exit_status(&self) -> u8 {
        match self {
            // A policy's refusal is a refusal of the plan as this launch asks for it.
            LaunchError::Refused(AdmissionError::NotRunnable { code, .. })
                if [
                    crate::codes::RUN059,
                    crate::codes::RUN060,
                    crate::codes::RUN061,
                ]
                .contains(&code.as_str()) =>
            {
                exit::REFUSED
            }
            LaunchError::Refused(AdmissionError::NotRunnable { .. }) => exit::RUNNER,
            LaunchError::Refused(_)
            | LaunchError::Volume(mvm_ir::volume::VolumeError::Untrusted(_))
            | LaunchError::Cold(ColdError::Unverified(_))
            | LaunchError::BootSnapshot(BootSnapshotError::Refused(_)) => exit::REFUSED,
            LaunchError::Cold(ColdError::Wake(_))
            | LaunchError::BootSnapshot(BootSnapshotError::Make(_)) => exit::VM_FAILED,
            LaunchError::Integrity(_) => exit::INTEGRITY,
            LaunchError::GuestFailed(_)
            | LaunchError::BootTimeout(_)
            | LaunchError::Backend(_)
            | LaunchError::Channel(_) => exit::VM_FAILED,
            LaunchError::CommandRefused(e) if e.code == codes::NOT_FOUND => exit::NOT_FOUND,
            LaunchError::CommandRefused(e) if e.code == codes::NOT_EXECUTABLE => {
                exit::NOT_EXECUTABLE
            }
            LaunchError::Interrupted => exit::INTERRUPTED,
            LaunchError::Host { .. }
            | LaunchError::Audit(_)
            | LaunchError::AuditFailed(_)
            | LaunchError::CommandRefused(_)
            | LaunchError::Cold(ColdError::Save(_))
            | LaunchError::NameInUse(_)
            | LaunchError::Volume(_)
            | LaunchError::Disk(_)
            | LaunchError::BootSnapshot(BootSnapshotError::Config(_)) => exit::RUNNER,
        }
    }

    pub(super) fn host(what: impl Into<String>) -> impl FnOnce(io::Error) -> LaunchError {
        let what = what.into();
        move |source| LaunchError::Host { what, source }
    }
}

/// A failed launch with what the guest said on its console, when it got that far.
#[derive(Debug)]
pub struct Failure {
    /// What went wrong.
    pub error: LaunchError,
    /// The end of the guest's console, for a failure after the VM started.
    pub console_tail: Option<String>,
    /// The kept console log of the failed VM.
    pub serial_log: Option<PathBuf>,
}

impl From<LaunchError> for Box<Failure> {
    fn from(error: LaunchError) -> Self {
        Box::new(Failure {
            error,
            console_tail: None,
            serial_log: None,
        })
    }
}
