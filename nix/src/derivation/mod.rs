//! Derivations: the build recipes Nix stores as `.drv` files in ATerm form.
//!
//! - [`Derivation::to_aterm`] writes the exact bytes Nix writes; [`Derivation::parse`] reads
//!   them back strictly (see [`parse`]), so parsing then writing gives the input back.
//! - [`hashing`] computes what Nix computes from a derivation: the modulo hash that stands in
//!   for it in the derivations that depend on it, its output paths, and the path of its
//!   `.drv` file.
//! - [`file`] reads `.drv` files from disk and input derivations from a store directory.
//!
//! A derivation's name is not in its ATerm: Nix takes it from the `.drv` file's name, and so
//! do the readers here.

pub mod file;
pub mod hashing;
pub mod parse;
mod write;

use std::collections::{BTreeMap, BTreeSet};

use crate::error::NixError;
use crate::hash::FixedOutputHash;
use crate::store_path::compute::output_path_name;
use crate::store_path::{check_name, StorePath};

/// The file name suffix of a derivation.
pub const DRV_EXTENSION: &str = ".drv";

/// A derivation as Nix stores it. Maps and sets are ordered as Nix writes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derivation {
    /// Its name (`hello` for `…-hello.drv`); not part of the ATerm.
    pub name: String,
    /// Outputs by name (`out`, `dev`…).
    pub outputs: BTreeMap<String, Output>,
    /// The derivations it builds on, each with the outputs it uses.
    pub input_drvs: BTreeMap<StorePath, BTreeSet<String>>,
    /// Store paths it uses directly (sources added to the store).
    pub input_srcs: BTreeSet<StorePath>,
    /// The platform it builds on (`x86_64-linux`).
    pub system: String,
    /// The program that builds it.
    pub builder: String,
    /// The builder's arguments.
    pub args: Vec<String>,
    /// The builder's environment.
    pub env: BTreeMap<String, String>,
}

/// One output of a derivation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A path derived from the derivation's inputs.
    InputAddressed {
        /// The output path.
        path: StorePath,
    },
    /// A path derived from the declared hash of what the build must produce (a download, a
    /// vendored tree).
    Fixed {
        /// The output path.
        path: StorePath,
        /// The declared hash.
        hash: FixedOutputHash,
    },
}

impl Output {
    /// The output path as the derivation states it.
    pub fn path(&self) -> &StorePath {
        match self {
            Output::InputAddressed { path } | Output::Fixed { path, .. } => path,
        }
    }
}

impl Derivation {
    /// The declared hash of its output, when it is a fixed-output derivation (one output,
    /// `out`, with a declared hash).
    pub fn fixed_output(&self) -> Option<&FixedOutputHash> {
        match (self.outputs.len(), self.outputs.get("out")) {
            (1, Some(Output::Fixed { hash, .. })) => Some(hash),
            _ => None,
        }
    }

    /// Checks the rules Nix holds a derivation to, beyond the shape of its ATerm: valid names
    /// for the derivation, its `.drv` file and every output path; a fixed output only as the
    /// single output `out`; input derivations that are `.drv` files with named outputs; no `"`
    /// or `\` in `system`, which Nix writes unescaped.
    pub fn validate(&self) -> Result<(), NixError> {
        check_name(&self.name)?;
        check_name(&format!("{}{DRV_EXTENSION}", self.name))?;
        if self.outputs.is_empty() {
            return Err(NixError::Invalid("a derivation needs an output".into()));
        }
        for (output, kind) in &self.outputs {
            check_output_name(output)?;
            check_name(&output_path_name(&self.name, output))?;
            if matches!(kind, Output::Fixed { .. }) && self.fixed_output().is_none() {
                return Err(NixError::Invalid(
                    "a fixed output must be the derivation's only output and be named \"out\""
                        .into(),
                ));
            }
        }
        for (path, outputs) in &self.input_drvs {
            if !path.name().ends_with(DRV_EXTENSION) {
                return Err(NixError::Invalid(format!(
                    "input derivation {path} is not a .drv file"
                )));
            }
            if outputs.is_empty() {
                return Err(NixError::Invalid(format!(
                    "input derivation {path} names no output"
                )));
            }
            outputs.iter().try_for_each(|o| check_output_name(o))?;
        }
        if self.system.contains(['"', '\\']) {
            return Err(NixError::Invalid(
                "system contains '\"' or '\\', which Nix writes unescaped".into(),
            ));
        }
        Ok(())
    }
}

/// An output name: a non-empty store path name (it becomes part of one).
fn check_output_name(name: &str) -> Result<(), NixError> {
    check_name(name).map_err(|_| {
        NixError::Invalid(format!(
            "invalid output name {:?}",
            crate::error::excerpt(name)
        ))
    })
}

#[cfg(test)]
mod tests;
