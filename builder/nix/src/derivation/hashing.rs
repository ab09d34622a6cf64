//! What Nix computes from a derivation: the path of its `.drv` file, its modulo hash, and its
//! output paths.
//!
//! - The `.drv` file is a text object named `<name>.drv` whose references are the input
//!   sources and input derivations ([`Derivation::drv_path`]).
//! - The *modulo hash* stands in for a derivation inside the ATerm of every derivation that
//!   uses it. A fixed-output derivation's is `sha256("fixed:out:<r:?algo>:<hex>:<out path>")`,
//!   so fetching the same content another way changes nothing downstream. Any other's is the
//!   sha256 of its ATerm with each input derivation's path replaced by the hex of that input's
//!   own modulo hash (outputs used merged when two inputs hash alike).
//! - An input-addressed output's path is `output:<name>` over the modulo hash of the
//!   derivation with its output paths, and the environment variables named after its
//!   outputs, blanked. A fixed output's path comes from its declared hash alone.
//!
//! Input derivations are read through a [`DrvSource`]; each is checked to be the derivation
//! its path names before its hash is used, and each is hashed once.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::write::{write_aterm, Masking};
use super::{Derivation, DRV_EXTENSION};
use crate::error::NixError;
use crate::hash::sha256;
use crate::store_path::compute::{
    make_fixed_output_path, make_output_path, make_text_path, output_path_name,
};
use crate::store_path::StorePath;

/// How many levels of input derivations are followed before giving up; real chains (nixpkgs'
/// bootstrap included) are a few hundred deep at most.
pub const MAX_INPUT_DEPTH: usize = 512;

impl Derivation {
    /// The path of this derivation's `.drv` file: a text object of its ATerm, referring to its
    /// input sources and input derivations.
    pub fn drv_path(&self) -> Result<StorePath, NixError> {
        let references: BTreeSet<StorePath> = self
            .input_srcs
            .iter()
            .chain(self.input_drvs.keys())
            .cloned()
            .collect();
        make_text_path(
            &format!("{}{DRV_EXTENSION}", self.name),
            self.to_aterm().as_bytes(),
            &references,
        )
    }
}

/// What stands for a derivation in the ATerm of those that use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuloHash {
    /// A fixed-output derivation's, for its one output `out`.
    Fixed([u8; 32]),
    /// Any other derivation's, the same for each of its outputs.
    Regular([u8; 32]),
}

impl ModuloHash {
    /// The hash, whichever kind it is.
    pub fn bytes(&self) -> &[u8; 32] {
        match self {
            ModuloHash::Fixed(hash) | ModuloHash::Regular(hash) => hash,
        }
    }
}

/// Where input derivations come from.
pub trait DrvSource {
    /// The derivation whose `.drv` file is `path`.
    fn load(&mut self, path: &StorePath) -> Result<Derivation, NixError>;
}

/// Computes modulo hashes and output paths, reading input derivations from a [`DrvSource`]
/// and remembering each one's hash.
pub struct DrvHasher<S> {
    source: S,
    known: HashMap<StorePath, KnownInput>,
}

/// An input derivation already hashed.
struct KnownInput {
    hash: ModuloHash,
    outputs: BTreeSet<String>,
}

impl<S: DrvSource> DrvHasher<S> {
    /// A hasher reading input derivations from `source`.
    pub fn new(source: S) -> Self {
        Self {
            source,
            known: HashMap::new(),
        }
    }

    /// The modulo hash of `drv`, as the derivations that use it see it.
    pub fn modulo_hash(&mut self, drv: &Derivation) -> Result<ModuloHash, NixError> {
        self.hash(drv, Masking::None, 0)
    }

    /// The output paths Nix gives `drv`, computed from its contents: the paths it states are
    /// not used.
    pub fn output_paths(
        &mut self,
        drv: &Derivation,
    ) -> Result<BTreeMap<String, StorePath>, NixError> {
        if let Some(fixed) = drv.fixed_output() {
            let path = make_fixed_output_path(&output_path_name(&drv.name, "out"), fixed)?;
            return Ok(BTreeMap::from([("out".to_string(), path)]));
        }
        let hash = *self.hash(drv, Masking::Outputs, 0)?.bytes();
        drv.outputs
            .keys()
            .map(|output| Ok((output.clone(), make_output_path(output, &hash, &drv.name)?)))
            .collect()
    }

    /// The output paths of `drv`, once each stated output path and the environment variable
    /// named after each output are found equal to them (the checks Nix makes before it admits
    /// a derivation to its store).
    pub fn verified_output_paths(
        &mut self,
        drv: &Derivation,
    ) -> Result<BTreeMap<String, StorePath>, NixError> {
        let computed = self.output_paths(drv)?;
        for (name, path) in &computed {
            let stated = drv.outputs.get(name).map(|o| o.path().to_string());
            let in_env = drv.env.get(name).cloned();
            for (what, stated) in [("path", stated), ("environment variable", in_env)] {
                let stated = stated.unwrap_or_else(|| "unset".into());
                if stated != path.to_string() {
                    return Err(NixError::Mismatch {
                        what: format!("output {name:?}'s {what}"),
                        stated: crate::error::excerpt(&stated),
                        computed: path.to_string(),
                    });
                }
            }
        }
        Ok(computed)
    }

    fn hash(
        &mut self,
        drv: &Derivation,
        masking: Masking,
        depth: usize,
    ) -> Result<ModuloHash, NixError> {
        if let Some(fixed) = drv.fixed_output() {
            let path = make_fixed_output_path(&output_path_name(&drv.name, "out"), fixed)?;
            let text = format!("fixed:out:{}:{}:{path}", fixed.method_algo(), fixed.hex());
            return Ok(ModuloHash::Fixed(sha256(text.as_bytes())));
        }
        let mut inputs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (path, outputs) in &drv.input_drvs {
            let input = self.input(path, depth + 1)?;
            if let Some(missing) = outputs.iter().find(|o| !input.outputs.contains(*o)) {
                return Err(NixError::InputDrv {
                    path: path.to_string(),
                    reason: format!("it has no output {missing:?}"),
                });
            }
            inputs
                .entry(hex::encode(input.hash.bytes()))
                .or_default()
                .extend(outputs.iter().cloned());
        }
        let aterm = write_aterm(drv, masking, &inputs);
        Ok(ModuloHash::Regular(sha256(aterm.as_bytes())))
    }

    /// The input derivation `path`, loaded, checked and hashed on first use.
    fn input(&mut self, path: &StorePath, depth: usize) -> Result<&KnownInput, NixError> {
        if !self.known.contains_key(path) {
            let unusable = |reason: String| NixError::InputDrv {
                path: path.to_string(),
                reason,
            };
            if depth > MAX_INPUT_DEPTH {
                return Err(unusable(format!(
                    "more than {MAX_INPUT_DEPTH} levels of input derivations"
                )));
            }
            let drv = self.source.load(path).map_err(|e| match e {
                NixError::Io { .. } => e,
                other => unusable(format!("[{}] {other}", other.code())),
            })?;
            let actual = drv.drv_path()?;
            if &actual != path {
                return Err(unusable(format!("its contents are those of {actual}")));
            }
            let hash = self.hash(&drv, Masking::None, depth)?;
            let outputs = drv.outputs.into_keys().collect();
            self.known
                .insert(path.clone(), KnownInput { hash, outputs });
        }
        Ok(&self.known[path])
    }
}
