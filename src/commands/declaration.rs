//! Reading a workload declaration in any of its forms: `workload.json` and `mvm.toml` (read by
//! `mvm-ir`), and `workload.nix` — mkWorkload's attributes, evaluated by the real Nix
//! (`nix-instantiate --eval --strict --json`) with the `mkWorkload` of this mvm (embedded from
//! `modules/`), to the same IR JSON, then parsed and validated like the others.

use std::path::{Path, PathBuf};

use mvm_ir::load::{load_workload, parse_workload, Syntax, MAX_DOCUMENT_BYTES};
use mvm_ir::plan::Profile;
use mvm_ir::validate::{validate, Report};
use mvm_ir::workload::Workload;
use serde::Deserialize;

use super::{coded_as, coded_io};

/// `modules/mk-workload.nix`, the one copy, as built into this binary.
const MK_WORKLOAD: &str = include_str!("../../modules/mk-workload.nix");

/// The file names `mvm build DIR` looks for, in order.
pub const FILE_NAMES: &[&str] = &["mvm.toml", "workload.json", "workload.nix"];

/// A loaded, valid declaration.
pub struct Declaration {
    pub workload: Workload,
    pub report: Report,
    /// The policy profile a `workload.nix` names (never `permissive`: that one only from the
    /// command line).
    pub profile: Option<Profile>,
}

/// Reads, parses and validates the declaration at `path`; a `.nix` file is evaluated first.
pub fn load(path: &Path) -> anyhow::Result<Declaration> {
    if path.extension().is_some_and(|e| e == "nix") {
        return load_nix(path);
    }
    let (workload, report) = load_workload(path)?;
    Ok(Declaration {
        workload,
        report,
        profile: None,
    })
}

/// What the evaluation yields: the IR and the profile.
#[derive(Deserialize)]
struct Evaluated {
    ir: serde_json::Value,
    profile: String,
}

fn load_nix(path: &Path) -> anyhow::Result<Declaration> {
    let file = std::fs::canonicalize(path).map_err(|source| mvm_ir::Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let module_dir = tempfile::tempdir()?;
    let module: PathBuf = module_dir.path().join("mk-workload.nix");
    mvm_ir::fsutil::atomic_write(&module, MK_WORKLOAD.as_bytes(), 0o644)?;
    let out = mvm_ir::env::command("nix-instantiate")
        .args(["--eval", "--strict", "--json", "--argstr", "module"])
        .arg(&module)
        .args(["--argstr", "workload"])
        .arg(&file)
        .args([
            "--expr",
            "{ module, workload }: let w = import module (import workload); in { inherit (w) ir profile; }",
        ])
        .output()
        .map_err(|e| {
            coded_io(
                "NIXDECL001",
                format!(
                    "{} is Nix, and nix-instantiate cannot be run: {e} (install Nix: Debian's nix-bin)",
                    path.display()
                ),
            )
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let message: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        return Err(coded_as(
            "NIXDECL002",
            format!(
                "evaluating {}: {}",
                path.display(),
                message[message.len().saturating_sub(12)..].join("\n")
            ),
        ));
    }
    if out.stdout.len() as u64 > MAX_DOCUMENT_BYTES {
        return Err(mvm_ir::Error::TooLarge {
            what: format!("the IR {} evaluates to", path.display()),
            size: out.stdout.len() as u64,
            limit: MAX_DOCUMENT_BYTES,
        }
        .into());
    }
    let evaluated: Evaluated = serde_json::from_slice(&out.stdout)
        .map_err(|e| coded_as("NIXDECL002", format!("{}: {e}", path.display())))?;
    let workload = parse_workload(&serde_json::to_vec(&evaluated.ir)?, Syntax::Json)?;
    let report = validate(&workload);
    if report.has_errors() {
        return Err(mvm_ir::Error::InvalidWorkload(report).into());
    }
    let profile = match evaluated.profile.as_str() {
        "restrictive" => Profile::Restrictive,
        "standard" => Profile::Standard,
        "dev" => Profile::Dev,
        other => {
            return Err(coded_as(
                "NIXDECL003",
                format!(
                    "{} asks for the {other:?} profile; a declaration may name restrictive, standard or dev (permissive only with --profile)",
                    path.display()
                ),
            ))
        }
    };
    Ok(Declaration {
        workload,
        report,
        profile: Some(profile),
    })
}
