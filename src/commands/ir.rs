//! `mvm ir …`: check and identify Workload IR documents.

use std::path::PathBuf;

use clap::Subcommand;
use mvm_ir::load::ir_digest;
use mvm_ir::schema::{plan_schema, workload_schema};
use serde_json::json;

use crate::output::Output;

#[derive(Debug, Subcommand)]
pub enum IrCommand {
    /// Parse and validate a workload (workload.json, mvm.toml, or workload.nix evaluated with
    /// Nix; `-` reads JSON from stdin).
    ///
    /// Every problem is reported at once, each with a stable code (IR001…) and a JSON pointer.
    /// Exit 0 if valid (warnings allowed), 65 if not.
    Validate {
        /// The declaration.
        file: PathBuf,
    },
    /// Print the workload's ir_digest: sha256 of its RFC 8785 canonical JSON.
    Digest {
        /// The declaration.
        file: PathBuf,
    },
    /// Print the JSON Schema of Workload IR v0 (or of launch plan v1 with --plan).
    Schema {
        /// The launch plan payload's schema instead.
        #[arg(long)]
        plan: bool,
    },
}

pub fn run(cmd: IrCommand, out: &Output) -> anyhow::Result<()> {
    match cmd {
        IrCommand::Validate { file } => {
            let super::declaration::Declaration {
                workload, report, ..
            } = super::declaration::load(&file)?;
            let digest = ir_digest(&workload)?;
            out.result(
                json!({"ok": true, "id": workload.id, "apps": workload.apps.len(), "ir_digest": digest, "issues": report.issues}),
                || {
                    let mut text = format!(
                        "valid: workload {} ({} app{}), ir_digest {digest}",
                        workload.id,
                        workload.apps.len(),
                        if workload.apps.len() == 1 { "" } else { "s" }
                    );
                    if !report.issues.is_empty() {
                        text.push_str(&format!("\n{report}"));
                    }
                    text
                },
            );
        }
        IrCommand::Digest { file } => {
            let workload = super::declaration::load(&file)?.workload;
            let digest = ir_digest(&workload)?;
            out.result(json!({"ir_digest": digest}), || digest.clone());
        }
        IrCommand::Schema { plan } => {
            let schema = if plan {
                plan_schema()
            } else {
                workload_schema()
            };
            println!("{}", serde_json::to_string_pretty(&schema)?);
        }
    }
    Ok(())
}
