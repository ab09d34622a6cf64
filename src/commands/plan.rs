//! `mvm plan …`: sign, verify and inspect launch plans.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use mvm_ir::admission::{verify_plan, NonceLedger};
use mvm_ir::canonical;
use mvm_ir::digest::sha256_prefixed;
use mvm_ir::dsse::Envelope;
use mvm_ir::fsutil::{atomic_write, read_capped};
use mvm_ir::keys::DEFAULT_KEY;
use mvm_ir::plan::{fresh_nonce, LaunchPlan, Timestamp, MAX_ENVELOPE_BYTES, PAYLOAD_TYPE};
use mvm_ir::Error;
use serde_json::{json, Value};
use time::OffsetDateTime;

use super::Host;
use crate::output::Output;

#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Sign a launch plan (JSON payload) into a DSSE envelope.
    ///
    /// Every signing issues a new plan: a fresh random nonce is drawn. `nonce` and `single_use`
    /// may be left out of the input.
    Sign {
        /// The unsigned plan (launch plan v1 JSON; see `mvm ir schema --plan`).
        plan: PathBuf,
        /// The signing key's name (`default`, the host key, is generated on first use).
        #[arg(long, default_value = DEFAULT_KEY)]
        key: String,
        /// Where to write the envelope.
        #[arg(short, long)]
        output: PathBuf,
        /// Make the plan admissible once only (its nonce is recorded at admission).
        #[arg(long)]
        single_use: bool,
        /// Set the validity window to now … now + DURATION (e.g. `1h`, `30days`).
        #[arg(long, value_parser = humantime::parse_duration)]
        valid_for: Option<Duration>,
    },
    /// Verify a signed plan as the runner would, without consuming it.
    ///
    /// Checks, in order: envelope shape, known signer, signature, payload type, schema version,
    /// strict parse, validity window, and for single-use plans that the nonce was never
    /// admitted. Exit 0 if admissible, 1 if refused, 65 if malformed.
    Verify {
        /// The DSSE envelope.
        envelope: PathBuf,
    },
    /// Show a signed plan and the state of its signatures, without judging or consuming it.
    Inspect {
        /// The DSSE envelope.
        envelope: PathBuf,
    },
}

pub fn run(cmd: PlanCommand, out: &Output) -> anyhow::Result<()> {
    let host = Host::open()?;
    match cmd {
        PlanCommand::Sign {
            plan,
            key,
            output,
            single_use,
            valid_for,
        } => sign(&host, out, &plan, &key, &output, single_use, valid_for),
        PlanCommand::Verify { envelope } => verify(&host, out, &envelope),
        PlanCommand::Inspect { envelope } => inspect(&host, out, &envelope),
    }
}

fn sign(
    host: &Host,
    out: &Output,
    input: &Path,
    key: &str,
    output: &Path,
    single_use: bool,
    valid_for: Option<Duration>,
) -> anyhow::Result<()> {
    let bytes = read_capped(input, MAX_ENVELOPE_BYTES, "plan")?;
    let mut value: Value =
        serde_json::from_slice(&bytes).map_err(|e| Error::InvalidPlan(e.to_string()))?;
    let members = value
        .as_object_mut()
        .ok_or_else(|| Error::InvalidPlan("a plan is a JSON object".into()))?;
    members.insert("nonce".into(), json!(fresh_nonce()?));
    if single_use {
        members.insert("single_use".into(), json!(true));
    } else {
        members.entry("single_use").or_insert(json!(false));
    }
    if let Some(duration) = valid_for {
        let now = OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap_or(OffsetDateTime::now_utc());
        let until = now + duration;
        members.insert("valid_from".into(), json!(Timestamp(now)));
        members.insert("valid_until".into(), json!(Timestamp(until)));
    }
    let plan: LaunchPlan =
        serde_json::from_value(value).map_err(|e| Error::InvalidPlan(e.to_string()))?;
    plan.check()?;
    let payload = canonical::to_vec(&plan)?;
    // The host's default key is created on first use; any other key must exist.
    let signer = if key == DEFAULT_KEY {
        host.keys.host_signer()?
    } else {
        host.keys.signer(key)?
    };
    let envelope = Envelope::sign(PAYLOAD_TYPE, &payload, &signer);
    let digest = sha256_prefixed(&payload);
    host.audit(
        "plan.sign",
        json!({"plan_digest": digest, "keyid": signer.keyid(), "workload_id": plan.workload_id,
               "app": plan.app, "single_use": plan.single_use, "valid_until": plan.valid_until}),
    )?;
    atomic_write(output, &envelope.to_json(), 0o644)
        .with_context(|| format!("writing {}", output.display()))?;
    out.result(
        json!({"plan_digest": digest, "keyid": signer.keyid(), "output": output, "single_use": plan.single_use,
               "valid_from": plan.valid_from, "valid_until": plan.valid_until}),
        || {
            format!(
                "signed {} with {key} ({})\nplan_digest {digest}\nvalid {} .. {}{}",
                output.display(),
                signer.keyid(),
                plan.valid_from,
                plan.valid_until,
                if plan.single_use { ", single use" } else { "" }
            )
        },
    );
    Ok(())
}

fn verify(host: &Host, out: &Output, path: &Path) -> anyhow::Result<()> {
    let bytes = read_capped(path, MAX_ENVELOPE_BYTES, "plan envelope")?;
    let trust = host.keys.trust_store()?;
    let ledger = NonceLedger::in_home(&host.home)?;
    let envelope_digest = sha256_prefixed(&bytes);
    match verify_plan(&bytes, &trust, &ledger, OffsetDateTime::now_utc()) {
        Ok(verified) => {
            host.audit(
                "plan.verify",
                json!({"envelope_digest": envelope_digest, "plan_digest": verified.digest,
                       "keyid": verified.keyid, "result": "ok"}),
            )?;
            let plan = &verified.plan;
            out.result(
                json!({"ok": true, "plan_digest": verified.digest, "keyid": verified.keyid,
                       "workload_id": plan.workload_id, "app": plan.app, "single_use": plan.single_use,
                       "valid_from": plan.valid_from, "valid_until": plan.valid_until}),
                || {
                    format!(
                        "verified: {}/{} plan_digest {}\nsigned by {}\nvalid {} .. {}{}",
                        plan.workload_id,
                        plan.app,
                        verified.digest,
                        verified.keyid,
                        plan.valid_from,
                        plan.valid_until,
                        if plan.single_use { ", single use (not yet admitted)" } else { "" }
                    )
                },
            );
            Ok(())
        }
        Err(err) => {
            host.audit(
                "plan.verify",
                json!({"envelope_digest": envelope_digest, "result": "refused", "code": err.code()}),
            )?;
            Err(err.into())
        }
    }
}

fn inspect(host: &Host, out: &Output, path: &Path) -> anyhow::Result<()> {
    let bytes = read_capped(path, MAX_ENVELOPE_BYTES, "plan envelope")?;
    let envelope = Envelope::parse(&bytes)?;
    let payload = envelope.decode_payload()?;
    let trust = host.keys.trust_store()?;
    let signatures: Vec<Value> = envelope
        .signatures
        .iter()
        .map(|s| {
            let single = Envelope {
                signatures: vec![s.clone()],
                ..envelope.clone()
            };
            let status = match single.verify(&trust) {
                Ok(_) => "valid",
                Err(Error::UnknownSigner(_)) => "untrusted key",
                Err(_) => "invalid",
            };
            json!({"keyid": s.keyid, "status": status})
        })
        .collect();
    let plan: Value = serde_json::from_slice(&payload)
        .unwrap_or_else(|_| json!(String::from_utf8_lossy(&payload)));
    let doc = json!({"payload_type": envelope.payload_type, "plan_digest": sha256_prefixed(&payload),
                     "signatures": signatures, "plan": plan});
    out.result(doc.clone(), || {
        let mut text = format!(
            "payload type {}\nplan_digest {}\n",
            envelope.payload_type,
            sha256_prefixed(&payload)
        );
        for s in &signatures {
            text.push_str(&format!(
                "signature {} ({})\n",
                s["keyid"].as_str().unwrap_or(""),
                s["status"].as_str().unwrap_or("")
            ));
        }
        text.push_str(&serde_json::to_string_pretty(&doc["plan"]).unwrap_or_default());
        text
    });
    Ok(())
}
