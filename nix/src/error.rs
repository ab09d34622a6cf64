use std::io;
use std::path::PathBuf;

/// Every way reading, checking or writing a Nix format can fail. [`NixError::code`] is stable
/// across releases and listed in `docs/errors.md`.
#[derive(Debug, thiserror::Error)]
pub enum NixError {
    /// Text that is not nixbase32: a character outside the alphabet, a length no byte string
    /// encodes to, or bits set past the end of the value.
    #[error("invalid nixbase32 {input:?}: {reason}")]
    Base32 {
        /// The text (cut short when long).
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Not a store path: wrong directory, a bad hash part, or a name Nix refuses.
    #[error("invalid store path {path:?}: {reason}")]
    StorePath {
        /// The path or name (cut short when long).
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A derivation file larger than mvm reads.
    #[error("derivation is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Bytes that are not a derivation in ATerm form.
    #[error("malformed derivation at byte {offset}: {reason}")]
    Syntax {
        /// Where parsing stopped.
        offset: usize,
        /// What was expected or found.
        reason: String,
    },
    /// An ATerm derivation that Nix would never write: entries out of order or repeated, or an
    /// escape Nix does not produce. Refused so that parsing and writing stay exact inverses.
    #[error("derivation is not in the form Nix writes, at byte {offset}: {reason}")]
    NotCanonical {
        /// Where the departure was found.
        offset: usize,
        /// What it is.
        reason: String,
    },
    /// A well-formed derivation that breaks Nix's rules (a bad output name, a fixed output
    /// with the wrong hash length, a fixed output beside others…).
    #[error("invalid derivation: {0}")]
    Invalid(String),
    /// A derivation of a kind mvm does not compute yet (Nix's experimental content-addressed
    /// derivations).
    #[error("unsupported derivation: {0}")]
    Unsupported(String),
    /// A path a derivation states (an output path, its `env` entry, the `.drv` file's own
    /// name) differs from what its contents give.
    #[error("{what} is {stated}, but the derivation's contents give {computed}")]
    Mismatch {
        /// Which path.
        what: String,
        /// The path as written.
        stated: String,
        /// The path as computed.
        computed: String,
    },
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// An input derivation that cannot be used to hash the one that depends on it.
    #[error("input derivation {path}: {reason}")]
    InputDrv {
        /// The input derivation's store path.
        path: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// A file that a NAR cannot hold (a socket, a FIFO, a device node).
    #[error("{}: {reason}", path.display())]
    Unarchivable {
        /// The file.
        path: PathBuf,
        /// What kind of file it is.
        reason: &'static str,
    },
}

impl NixError {
    /// The stable code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            NixError::Base32 { .. } => "NIX001",
            NixError::StorePath { .. } => "NIX002",
            NixError::TooLarge { .. } => "NIX003",
            NixError::Syntax { .. } => "NIX004",
            NixError::NotCanonical { .. } => "NIX005",
            NixError::Invalid(_) => "NIX006",
            NixError::Unsupported(_) => "NIX007",
            NixError::Mismatch { .. } => "NIX008",
            NixError::Io { .. } => "NIX009",
            NixError::InputDrv { .. } => "NIX010",
            NixError::Unarchivable { .. } => "NIX011",
        }
    }

    /// Whether the host failed (a file could not be read) rather than the input being bad.
    pub fn is_io(&self) -> bool {
        matches!(self, NixError::Io { .. })
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        NixError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn store_path(path: &str, reason: impl Into<String>) -> Self {
        NixError::StorePath {
            path: excerpt(path),
            reason: reason.into(),
        }
    }
}

/// At most 120 characters of untrusted text, so an error message stays readable.
pub(crate) fn excerpt(text: &str) -> String {
    const MAX: usize = 120;
    match text.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}
