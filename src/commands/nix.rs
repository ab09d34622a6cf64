//! `mvm nix …`: Nix's formats as mvm's own code (`mvm-nix`) reads and computes them.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use mvm_ir::ErrorClass;
use mvm_nix::derivation::file::{DrvFile, StoreRoot};
use mvm_nix::derivation::hashing::DrvHasher;
use mvm_nix::derivation::Output as DrvOutput;
use mvm_nix::NixError;
use serde_json::{json, Map, Value};

use super::CodedError;
use crate::output::Output;

#[derive(Debug, Subcommand)]
pub enum NixCommand {
    /// Derivations (`.drv` files).
    #[command(subcommand)]
    Drv(DrvCommand),
}

#[derive(Debug, Subcommand)]
pub enum DrvCommand {
    /// Parse a .drv (written by Nix or by mvm) and print its store path and output paths as
    /// mvm computes them, with its input derivations and sources.
    ///
    /// Paths are computed from the file's name and contents, never copied from it: an output
    /// path, an output's environment variable or a store-path file name that differs is
    /// refused (NIX008). Input derivations are read from DIR/nix/store (--store).
    /// Exit 65 for a bad derivation, 74 when a file cannot be read.
    Inspect {
        /// The .drv file (`<hash>-<name>.drv` or `<name>.drv`).
        file: PathBuf,
        /// The directory the store is under: `/` for the system's store, or a chroot store's
        /// directory (as in `nix-instantiate --store DIR`).
        #[arg(long, value_name = "DIR", default_value = "/")]
        store: PathBuf,
    },
}

pub fn run(cmd: NixCommand, out: &Output) -> anyhow::Result<()> {
    match cmd {
        NixCommand::Drv(DrvCommand::Inspect { file, store }) => inspect(&file, &store, out),
    }
}

fn inspect(file: &Path, store: &Path, out: &Output) -> anyhow::Result<()> {
    let drv_file = DrvFile::read(file).map_err(coded)?;
    let drv_path = drv_file.store_path().map_err(coded)?;
    let drv = &drv_file.derivation;
    let output_paths = DrvHasher::new(StoreRoot::new(store))
        .verified_output_paths(drv)
        .map_err(|err| {
            let unreadable = err.is_io();
            let err = coded(err);
            if unreadable {
                let dir = store.join("nix/store");
                err.context(format!(
                    "input derivations are read from {} (--store)",
                    dir.display()
                ))
            } else {
                err
            }
        })?;

    let outputs: Map<String, Value> = output_paths
        .iter()
        .map(|(name, path)| {
            let mut output = json!({ "path": path.to_string() });
            if let Some(DrvOutput::Fixed { hash, .. }) = drv.outputs.get(name) {
                output["hash_algo"] = json!(hash.method_algo());
                output["hash"] = json!(hash.hex());
            }
            (name.clone(), output)
        })
        .collect();
    let input_drvs: Map<String, Value> = drv
        .input_drvs
        .iter()
        .map(|(path, outputs)| (path.to_string(), json!(outputs)))
        .collect();
    let input_srcs: Vec<String> = drv.input_srcs.iter().map(ToString::to_string).collect();
    let value = json!({
        "drv_path": drv_path.to_string(),
        "name": drv.name,
        "system": drv.system,
        "builder": drv.builder,
        "outputs": outputs,
        "input_drvs": input_drvs,
        "input_srcs": input_srcs,
    });
    out.result(value, || {
        let mut text = format!("derivation {drv_path}\n  system {}", drv.system);
        for (name, path) in &output_paths {
            text.push_str(&format!("\n  output {name} {path}"));
            if let Some(DrvOutput::Fixed { hash, .. }) = drv.outputs.get(name) {
                text.push_str(&format!(" (fixed, {}:{})", hash.method_algo(), hash.hex()));
            }
        }
        for (path, outputs) in &drv.input_drvs {
            let used: Vec<&str> = outputs.iter().map(String::as_str).collect();
            text.push_str(&format!(
                "\n  input derivation {path} ({})",
                used.join(", ")
            ));
        }
        for path in &drv.input_srcs {
            text.push_str(&format!("\n  input source {path}"));
        }
        text
    });
    Ok(())
}

/// A mvm-nix error with its stable code: unreadable files are I/O failures (exit 74),
/// everything else is a bad derivation (exit 65).
fn coded(err: NixError) -> anyhow::Error {
    CodedError {
        code: err.code().to_string(),
        class: if err.is_io() {
            ErrorClass::Io
        } else {
            ErrorClass::InvalidInput
        },
        message: err.to_string(),
    }
    .into()
}
