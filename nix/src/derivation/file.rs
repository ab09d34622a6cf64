//! `.drv` files on disk: one given by path, and input derivations found in a store directory.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::hashing::DrvSource;
use super::parse::MAX_DRV_SIZE;
use super::{Derivation, DRV_EXTENSION};
use crate::error::NixError;
use crate::store_path::{StorePath, STORE_DIR};

/// A `.drv` file read from disk.
#[derive(Debug, Clone)]
pub struct DrvFile {
    /// Its derivation, named after the file.
    pub derivation: Derivation,
    /// The store path the file's name claims, when it is named like one
    /// (`<hash part>-<name>.drv`) rather than just `<name>.drv`.
    pub named_path: Option<StorePath>,
}

impl DrvFile {
    /// Reads and parses the file at `path`. Its name must end in `.drv`; the derivation's name
    /// is what comes before, less any hash part.
    pub fn read(path: &Path) -> Result<Self, NixError> {
        let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let stem = file_name.strip_suffix(DRV_EXTENSION).ok_or_else(|| {
            NixError::store_path(
                &path.display().to_string(),
                "a derivation's file name ends in .drv",
            )
        })?;
        let named_path = StorePath::from_base_name(file_name).ok();
        let name = match &named_path {
            Some(named) => named.name().strip_suffix(DRV_EXTENSION).unwrap_or(stem),
            None => stem,
        };
        let derivation = Derivation::parse(name, &read_limited(path)?)?;
        Ok(Self {
            derivation,
            named_path,
        })
    }

    /// The store path of the derivation, computed from its name and contents; refused when
    /// the file is named like a store path and that is another one.
    pub fn store_path(&self) -> Result<StorePath, NixError> {
        let computed = self.derivation.drv_path()?;
        match &self.named_path {
            Some(named) if *named != computed => Err(NixError::Mismatch {
                what: "the file's name".into(),
                stated: named.to_string(),
                computed: computed.to_string(),
            }),
            _ => Ok(computed),
        }
    }
}

/// Input derivations read from a store laid out under a root directory, at
/// `<root>/nix/store/<hash>-<name>.drv`: `/` for the system's store, or the directory of a
/// chroot store (`nix-instantiate --store DIR`).
pub struct StoreRoot {
    store: PathBuf,
}

impl StoreRoot {
    /// The store under `root`.
    pub fn new(root: &Path) -> Self {
        Self {
            store: root.join(STORE_DIR.trim_start_matches('/')),
        }
    }

    /// Where the object `path` lives on disk.
    pub fn file(&self, path: &StorePath) -> PathBuf {
        self.store.join(path.base_name())
    }
}

impl DrvSource for StoreRoot {
    fn load(&mut self, path: &StorePath) -> Result<Derivation, NixError> {
        let name = path
            .name()
            .strip_suffix(DRV_EXTENSION)
            .ok_or_else(|| NixError::Invalid(format!("{path} is not a .drv file")))?;
        Derivation::parse(name, &read_limited(&self.file(path))?)
    }
}

/// The bytes of `path`, refused past [`MAX_DRV_SIZE`] without reading further.
fn read_limited(path: &Path) -> Result<Vec<u8>, NixError> {
    let file = File::open(path).map_err(|e| NixError::io(path, e))?;
    let mut bytes = Vec::new();
    file.take(MAX_DRV_SIZE as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| NixError::io(path, e))?;
    if bytes.len() > MAX_DRV_SIZE {
        let size = std::fs::metadata(path).map_or(bytes.len() as u64, |m| m.len());
        return Err(NixError::TooLarge {
            size,
            limit: MAX_DRV_SIZE as u64,
        });
    }
    Ok(bytes)
}
