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
use crate::hash::{sha256, FixedOutputHash};
use crate::store_path::compute::{
    make_fixed_output_path, make_output_path, make_text_path, output_path_name,
};
use crate::store_path::StorePath;

/// How many levels of input derivations are followed before giving up: real chains (nixpkgs'
/// bootstrap included) are far shorter, and each level pending holds a derivation in memory.
pub const MAX_INPUT_DEPTH: usize = 1024;

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
        self.hash(drv, Masking::None)
    }

    /// The output paths Nix gives `drv`, computed from its contents: the paths it states are
    /// not used.
    pub fn output_paths(
        &mut self,
        drv: &Derivation,
    ) -> Result<BTreeMap<String, StorePath>, NixError> {
        if let Some(fixed) = drv.fixed_output() {
            let path = fixed_output_path(drv, fixed)?;
            return Ok(BTreeMap::from([("out".to_string(), path)]));
        }
        let hash = *self.hash(drv, Masking::Outputs)?.bytes();
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

    /// The modulo hash of `drv`, learning the input derivations it reaches first.
    fn hash(&mut self, drv: &Derivation, masking: Masking) -> Result<ModuloHash, NixError> {
        if drv.fixed_output().is_none() {
            self.learn_inputs(drv)?;
        }
        self.hash_known(drv, masking)
    }

    /// The modulo hash of a fixed-output derivation, or of one whose inputs are all known.
    fn hash_known(&self, drv: &Derivation, masking: Masking) -> Result<ModuloHash, NixError> {
        if let Some(fixed) = drv.fixed_output() {
            let path = fixed_output_path(drv, fixed)?;
            let text = format!("fixed:out:{}:{}:{path}", fixed.method_algo(), fixed.hex());
            return Ok(ModuloHash::Fixed(sha256(text.as_bytes())));
        }
        let mut inputs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (path, outputs) in &drv.input_drvs {
            let unusable = |reason: String| NixError::InputDrv {
                path: path.to_string(),
                reason,
            };
            let input = self
                .known
                .get(path)
                .ok_or_else(|| unusable("it was not hashed before its user".into()))?;
            if let Some(missing) = outputs.iter().find(|o| !input.outputs.contains(*o)) {
                return Err(unusable(format!("it has no output {missing:?}")));
            }
            inputs
                .entry(hex::encode(input.hash.bytes()))
                .or_default()
                .extend(outputs.iter().cloned());
        }
        let aterm = write_aterm(drv, masking, &inputs);
        Ok(ModuloHash::Regular(sha256(aterm.as_bytes())))
    }

    /// Loads, checks and hashes every input derivation `drv` reaches that is not known yet:
    /// depth first, with a stack of its own, since chains can be deeper than a thread's stack
    /// would allow. A fixed-output input's own inputs are never needed.
    fn learn_inputs(&mut self, drv: &Derivation) -> Result<(), NixError> {
        // Derivations whose inputs are being learnt, each with the index of the next input to
        // look at; `drv`'s own index is apart, as `drv` is not an input.
        let mut pending: Vec<(StorePath, Derivation, usize)> = Vec::new();
        let mut drv_next = 0;
        loop {
            let unknown = {
                let (inputs, next) = match pending.last_mut() {
                    Some((_, top, next)) => (&top.input_drvs, next),
                    None => (&drv.input_drvs, &mut drv_next),
                };
                let found = inputs
                    .keys()
                    .enumerate()
                    .skip(*next)
                    .find(|(_, path)| !self.known.contains_key(*path));
                *next = found.map_or(inputs.len(), |(index, _)| index + 1);
                found.map(|(_, path)| path.clone())
            };
            match unknown {
                Some(path) if pending.len() >= MAX_INPUT_DEPTH => {
                    return Err(NixError::InputDrv {
                        path: path.to_string(),
                        reason: format!("more than {MAX_INPUT_DEPTH} levels of input derivations"),
                    });
                }
                Some(path) => {
                    let input = self.load_checked(&path)?;
                    if input.fixed_output().is_some() {
                        self.remember(path, input)?;
                    } else {
                        pending.push((path, input, 0));
                    }
                }
                None => match pending.pop() {
                    Some((path, done, _)) => self.remember(path, done)?,
                    None => return Ok(()),
                },
            }
        }
    }

    /// Hashes an input derivation whose own inputs are known, and keeps what its users need.
    fn remember(&mut self, path: StorePath, drv: Derivation) -> Result<(), NixError> {
        let hash = self.hash_known(&drv, Masking::None)?;
        let outputs = drv.outputs.into_keys().collect();
        self.known.insert(path, KnownInput { hash, outputs });
        Ok(())
    }

    /// The input derivation `path` from the source, checked to be the one its path names.
    fn load_checked(&mut self, path: &StorePath) -> Result<Derivation, NixError> {
        let unusable = |reason: String| NixError::InputDrv {
            path: path.to_string(),
            reason,
        };
        let drv = self.source.load(path).map_err(|e| match e {
            NixError::Io { .. } => e,
            other => unusable(format!("[{}] {other}", other.code())),
        })?;
        let actual = drv.drv_path()?;
        if &actual != path {
            return Err(unusable(format!("its contents are those of {actual}")));
        }
        Ok(drv)
    }
}

/// The path of a fixed-output derivation's one output, `out`.
fn fixed_output_path(drv: &Derivation, fixed: &FixedOutputHash) -> Result<StorePath, NixError> {
    make_fixed_output_path(&output_path_name(&drv.name, "out"), fixed)
}
