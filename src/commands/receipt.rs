//! `mvm receipt verify`: check a signed run receipt.

use std::path::PathBuf;

use clap::Subcommand;
use mvm_ir::receipt::{self, MAX_RECEIPT_BYTES};
use serde_json::json;

use super::Host;
use crate::output::Output;

#[derive(Debug, Subcommand)]
pub enum ReceiptCommand {
    /// Verify a run receipt (from `mvm run --receipt` or `mvm exec --receipt`): a trusted
    /// signer, the signature, the type and schema. Exit 0 verified, 1 refused, 65 not a receipt.
    Verify {
        /// The receipt file.
        file: PathBuf,
    },
}

pub fn run(cmd: ReceiptCommand, out: &Output) -> anyhow::Result<()> {
    let ReceiptCommand::Verify { file } = cmd;
    let host = Host::open()?;
    let bytes = mvm_ir::fsutil::read_capped(&file, MAX_RECEIPT_BYTES, "receipt")?;
    let verified = receipt::verify(&bytes, &host.keys.trust_store()?)?;
    let r = &verified.receipt;
    out.result(
        json!({"receipt": r, "keyid": verified.keyid, "digest": verified.digest}),
        || {
            format!(
                "verified: signed by {}\nplan {} in {}\n{} → {}: {}\nstdout {} ({} bytes), stderr {} ({} bytes)\nprevious {}",
                verified.keyid,
                r.plan_digest,
                r.vm,
                r.started_at,
                r.ended_at,
                serde_json::to_string(&r.result).unwrap_or_default(),
                r.stdout.sha256,
                r.stdout.bytes,
                r.stderr.sha256,
                r.stderr.bytes,
                r.previous.as_deref().unwrap_or("none (first on this host)")
            )
        },
    );
    Ok(())
}
