use std::path::PathBuf;

use crate::audit::ChainBreak;
use crate::validate::Report;

/// What kind of failure an [`Error`] is; the CLI maps each class to one exit status.
///
/// Serialized (`integrity`, `invalid_input`, `io`) where a code crosses a process boundary with
/// its class, as in the builder worker's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// A signature, digest, chain or policy check refused the input (exit 1).
    Integrity,
    /// The input is not a well-formed document of its kind (exit 65, `EX_DATAERR`).
    InvalidInput,
    /// The host environment failed: a file could not be read or written (exit 74, `EX_IOERR`).
    Io,
}

/// An error with a stable code: the one registry of error codes is the set of types that
/// implement this trait (with the runner's `codes` module for its `RUN…` codes), and
/// `docs/errors.md` documents every code they return (`tests/error_codes.rs` checks both ways).
///
/// The class travels with the code because the code alone does not say how the CLI must exit:
/// before this trait the CLI kept a table from code strings to classes, which drifted from the
/// types that raise the codes. Now whoever defines a code also decides its class, once, and a
/// code has the same class wherever it is reported.
///
/// Crates that do not depend on `mvm-ir` — `mvm-vmm` (which must depend on no other mvm
/// crate), the guest agent and `mvm-nix` — keep an inherent `code()`, and whoever wraps their
/// errors gives the class: the runner puts a `VMM…` code into the message of its own coded
/// error, a broken agent channel is the runner's RUN025, `mvm nix` classes `NIX…` codes.
pub trait Coded {
    /// The stable code, as printed by the CLI and written in `docs/errors.md`.
    ///
    /// A `&str` borrowed from the error rather than a `&'static str`: a few codes cross a
    /// process boundary and are passed on as they arrived — the builder worker's answer, the
    /// guest agent's refusal of a command — so they are owned by the error that carries them.
    fn code(&self) -> &str;

    /// The class of this error, which decides the CLI's exit status ([`ErrorClass`]).
    fn class(&self) -> ErrorClass;
}

/// Whether `text` has the shape of a stable code: capitals, then three digits (`RUN036`,
/// `AGENT101`). Codes that cross a process boundary in a line of text are found by it.
pub fn is_code(text: &str) -> bool {
    let letters = text.trim_end_matches(|c: char| c.is_ascii_digit());
    text.len() - letters.len() == 3
        && !letters.is_empty()
        && letters.chars().all(|c| c.is_ascii_uppercase())
}

/// Every way an mvm document operation can fail. [`Error::code`] is stable across releases.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read, written or locked.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// An input is larger than mvm accepts for its kind.
    #[error("{what} is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        /// What was being read.
        what: String,
        /// Its size.
        size: u64,
        /// The limit for its kind.
        limit: u64,
    },
    /// Bytes that are not valid UTF-8 where text is required.
    #[error("{what} is not valid UTF-8")]
    NotUtf8 {
        /// What was being read.
        what: String,
    },
    /// Malformed JSON, a wrong type, a missing or an unknown field.
    #[error("{what}: {message}")]
    Parse {
        /// What was being parsed.
        what: String,
        /// The parser's explanation, with line and column where known.
        message: String,
    },
    /// A number that canonical JSON (RFC 8785) cannot carry exactly.
    #[error("number {0} cannot be represented exactly as an IEEE 754 double (RFC 8785)")]
    InexactNumber(String),
    /// The workload parsed but broke validation rules; the report lists every problem.
    #[error("workload is invalid:\n{0}")]
    InvalidWorkload(Report),

    /// A signed envelope of the receipt type whose payload is not a valid run receipt.
    #[error("invalid run receipt: {0}")]
    InvalidReceipt(String),
    /// The envelope is not DSSE-shaped (bad JSON, base64, missing or extra fields).
    #[error("malformed DSSE envelope: {0}")]
    MalformedEnvelope(String),
    /// None of the envelope's signatures is by a key this host trusts.
    #[error("no signature by a trusted key (signed by: {0})")]
    UnknownSigner(String),
    /// A trusted key's signature does not verify over the envelope.
    #[error("signature by {keyid} does not verify")]
    BadSignature {
        /// The key whose signature failed.
        keyid: String,
    },
    /// The envelope carries a payload of another type.
    #[error("payload type is {found:?}, expected {expected:?}")]
    WrongPayloadType {
        /// The envelope's payloadType.
        found: String,
        /// The type this operation accepts.
        expected: &'static str,
    },
    /// A document of a schema version newer than this build understands.
    #[error("schema version {found:?} is not supported (this mvm reads {supported:?})")]
    UnsupportedSchema {
        /// The version found.
        found: String,
        /// The version supported.
        supported: &'static str,
    },
    /// The signed plan payload does not parse strictly or breaks plan rules.
    #[error("invalid plan: {0}")]
    InvalidPlan(String),
    /// The plan's validity window has not opened yet.
    #[error("plan is not valid before {0}")]
    PlanNotYetValid(String),
    /// The plan's validity window has closed.
    #[error("plan expired at {0}")]
    PlanExpired(String),
    /// A single-use plan whose nonce was already admitted.
    #[error("single-use plan with nonce {0} was already admitted")]
    PlanReplayed(String),
    /// The plan of a VM being woken is not the one it was admitted with.
    #[error("the plan's digest is {found}; the VM was admitted with {expected}")]
    PlanChanged {
        /// The digest of the plan offered now.
        found: String,
        /// The digest the VM was admitted with.
        expected: String,
    },
    /// The nonce ledger file is unreadable or corrupt.
    #[error("nonce ledger {}: {reason}", path.display())]
    LedgerCorrupt {
        /// The ledger file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// No key of that name in the key store.
    #[error("no key named {0:?} (see `mvm keys list`)")]
    KeyNotFound(String),
    /// A key name that could not be a file name.
    #[error("invalid key name {0:?}: use 1-64 of [A-Za-z0-9._-], not starting with '.'")]
    InvalidKeyName(String),
    /// `keys generate` for a name that exists.
    #[error("a key named {0:?} already exists")]
    KeyExists(String),
    /// A private key file readable by other users.
    #[error("{} has mode {mode:04o}: private keys must not be readable by group or others (chmod 600)", path.display())]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A key file that is not a valid ed25519 key in the expected encoding.
    #[error("{}: {reason}", path.display())]
    BadKeyFile {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// `keys untrust` of a key id that is not trusted.
    #[error("no trusted key with id {0}")]
    UnknownKeyId(String),
    /// The state directory is unsafe to use.
    #[error("{}: {reason}", path.display())]
    UnsafeHome {
        /// The directory.
        path: PathBuf,
        /// What makes it unsafe.
        reason: String,
    },

    /// The audit chain failed verification.
    #[error("audit chain broken at line {}: {}", .0.line, .0.reason)]
    AuditChain(ChainBreak),
}

impl Error {
    /// The stable code of this error, as printed by the CLI and written in `docs/errors.md`.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Io { .. } => "IO001",
            Error::TooLarge { .. } => "INPUT001",
            Error::NotUtf8 { .. } => "INPUT002",
            Error::Parse { .. } => "INPUT003",
            Error::InexactNumber(_) => "INPUT004",
            Error::InvalidWorkload(_) => "IR000",
            Error::MalformedEnvelope(_) => "PLAN001",
            Error::InvalidReceipt(_) => "RECEIPT001",
            Error::UnknownSigner(_) => "PLAN002",
            Error::BadSignature { .. } => "PLAN003",
            Error::WrongPayloadType { .. } => "PLAN004",
            Error::UnsupportedSchema { .. } => "PLAN005",
            Error::InvalidPlan(_) => "PLAN006",
            Error::PlanNotYetValid(_) => "PLAN007",
            Error::PlanExpired(_) => "PLAN008",
            Error::PlanReplayed(_) => "PLAN009",
            Error::LedgerCorrupt { .. } => "PLAN010",
            Error::PlanChanged { .. } => "PLAN011",
            Error::KeyNotFound(_) => "KEY001",
            Error::InvalidKeyName(_) => "KEY002",
            Error::KeyExists(_) => "KEY003",
            Error::KeyPermissions { .. } => "KEY004",
            Error::BadKeyFile { .. } => "KEY005",
            Error::UnknownKeyId(_) => "KEY006",
            Error::UnsafeHome { .. } => "HOME001",
            Error::AuditChain(b) => b.kind.code(),
        }
    }

    /// The class of this error, which decides the CLI's exit status.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Io { .. } => ErrorClass::Io,
            Error::TooLarge { .. }
            | Error::NotUtf8 { .. }
            | Error::Parse { .. }
            | Error::InexactNumber(_)
            | Error::InvalidWorkload(_)
            | Error::MalformedEnvelope(_)
            | Error::InvalidReceipt(_)
            | Error::InvalidPlan(_)
            | Error::KeyNotFound(_)
            | Error::InvalidKeyName(_)
            | Error::KeyExists(_)
            | Error::UnknownKeyId(_) => ErrorClass::InvalidInput,
            Error::UnknownSigner(_)
            | Error::BadSignature { .. }
            | Error::WrongPayloadType { .. }
            | Error::UnsupportedSchema { .. }
            | Error::PlanNotYetValid(_)
            | Error::PlanExpired(_)
            | Error::PlanReplayed(_)
            | Error::PlanChanged { .. }
            | Error::LedgerCorrupt { .. }
            | Error::KeyPermissions { .. }
            | Error::BadKeyFile { .. }
            | Error::UnsafeHome { .. }
            | Error::AuditChain(_) => ErrorClass::Integrity,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn parse(what: impl Into<String>, err: impl std::fmt::Display) -> Self {
        Error::Parse {
            what: what.into(),
            message: err.to_string(),
        }
    }
}

/// Delegates to the inherent methods, which stay: they return a `&'static str`, and the
/// crate's tests and callers use them without importing the trait.
impl Coded for Error {
    fn code(&self) -> &str {
        Error::code(self)
    }

    fn class(&self) -> ErrorClass {
        Error::class(self)
    }
}
