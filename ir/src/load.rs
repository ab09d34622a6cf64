//! Reading workload declarations: JSON (`workload.json`) or TOML (`mvm.toml`), both mapping
//! onto the same [`Workload`] types, size-capped and strictly parsed.

use std::path::Path;

use crate::fsutil::read_capped;
use crate::validate::{validate, Report};
use crate::workload::Workload;
use crate::{canonical, digest, Error};

/// The largest declaration mvm reads.
pub const MAX_DOCUMENT_BYTES: u64 = 1024 * 1024;

/// The syntax a declaration is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    /// Workload IR JSON.
    Json,
    /// `mvm.toml`: the same fields as the IR, in TOML.
    Toml,
}

impl Syntax {
    /// TOML for a `.toml` file name, JSON otherwise.
    pub fn of_path(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => Syntax::Toml,
            _ => Syntax::Json,
        }
    }
}

/// Parses a declaration strictly: malformed syntax, wrong types, missing or unknown fields are
/// refused. Semantic rules are checked by [`validate`].
pub fn parse_workload(bytes: &[u8], syntax: Syntax) -> Result<Workload, Error> {
    if bytes.len() as u64 > MAX_DOCUMENT_BYTES {
        return Err(Error::TooLarge {
            what: "workload declaration".into(),
            size: bytes.len() as u64,
            limit: MAX_DOCUMENT_BYTES,
        });
    }
    match syntax {
        Syntax::Json => serde_json::from_slice(bytes).map_err(|e| Error::parse("workload JSON", e)),
        Syntax::Toml => {
            let text = std::str::from_utf8(bytes).map_err(|_| Error::NotUtf8 {
                what: "mvm.toml".into(),
            })?;
            toml::from_str(text).map_err(|e| Error::parse("mvm.toml", e.message()))
        }
    }
}

/// Reads, parses and validates the declaration at `path` (`-` for standard input, read as JSON).
/// Returns the workload with its warnings; a workload with errors is refused with
/// [`Error::InvalidWorkload`].
pub fn load_workload(path: &Path) -> Result<(Workload, Report), Error> {
    let bytes = read_capped(path, MAX_DOCUMENT_BYTES, "workload declaration")?;
    let workload = parse_workload(&bytes, Syntax::of_path(path))?;
    let report = validate(&workload);
    if report.has_errors() {
        return Err(Error::InvalidWorkload(report));
    }
    Ok((workload, report))
}

/// `sha256:<hex>` of the workload's canonical JSON: the same for the same meaning, whatever the
/// syntax or formatting it was declared in.
pub fn ir_digest(workload: &Workload) -> Result<String, Error> {
    Ok(digest::sha256_prefixed(&canonical::to_vec(workload)?))
}
