//! Signed run receipts: evidence of what ran, without what it said.
//!
//! A receipt names the plan (by digest) and the VM a command ran in, when it started and
//! ended, how it ended, and the SHA-256 and size of its stdout and stderr as they were passed
//! on (scrubbed of the launch's secrets) — never the output itself, the argv values or the environment. It is a DSSE envelope
//! of type [`PAYLOAD_TYPE`] signed by the host key, and it names the receipt issued before it
//! on this host (`previous`, the SHA-256 of that envelope's bytes), so receipts form a chain
//! that a missing or reordered one breaks.

use serde::{Deserialize, Serialize};

use crate::digest::sha256_prefixed;
use crate::dsse::Envelope;
use crate::fsutil::{atomic_write, read_capped, ExclusiveLock};
use crate::home::MvmHome;
use crate::keys::{Signer, TrustStore};
use crate::plan::Timestamp;
use crate::Error;

/// The DSSE payload type of a run receipt.
pub const PAYLOAD_TYPE: &str = "application/vnd.mvm.receipt.v1+json";
/// The receipt schema this build writes and reads.
pub const SCHEMA_VERSION: &str = "1";
/// The largest receipt envelope read.
pub const MAX_RECEIPT_BYTES: u64 = 64 * 1024;

/// A run receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    /// [`SCHEMA_VERSION`].
    pub schema_version: String,
    /// The admitted plan's digest.
    pub plan_digest: String,
    /// The VM's id.
    pub vm: String,
    /// `sha256:` of the command's argv as JSON (an array of strings): which command, without
    /// its values.
    pub argv_sha256: String,
    /// When the command started.
    pub started_at: Timestamp,
    /// When its answer arrived.
    pub ended_at: Timestamp,
    /// How it ended.
    pub result: CommandResult,
    /// Its standard output as passed on (scrubbed of the launch's secrets).
    pub stdout: OutputDigest,
    /// Its standard error as passed on.
    pub stderr: OutputDigest,
    /// The egress decisions made while it ran, the first [`MAX_EGRESS_DECISIONS`] of them
    /// (empty when the plan grants no egress).
    pub egress: Vec<EgressDecision>,
    /// Every egress decision counted, with the bytes each way.
    #[serde(default)]
    pub egress_counts: EgressCounts,
    /// `sha256:` of the envelope of the receipt issued before this one on this host.
    pub previous: Option<String>,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CommandResult {
    /// It exited with this code.
    Exited {
        /// The exit code.
        code: i32,
    },
    /// A signal ended it.
    Signaled {
        /// The signal number.
        signal: i32,
    },
    /// It ran past its timeout and was killed.
    TimedOut,
}

/// The digest and size of one output stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputDigest {
    /// `sha256:` of the bytes.
    pub sha256: String,
    /// How many.
    pub bytes: u64,
}

/// The most egress decisions a receipt lists one by one; [`Receipt::egress_counts`] counts
/// them all.
pub const MAX_EGRESS_DECISIONS: usize = 256;

/// A decision about one outbound connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressDecision {
    /// The host asked for.
    pub host: String,
    /// The port.
    pub port: u16,
    /// Whether it was let through.
    pub allowed: bool,
    /// The address connected to, when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Why it was refused (`not_granted`, `metadata`, `sni_mismatch`, …), when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Egress connections of a run or a VM, counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressCounts {
    /// Connections let through.
    pub allowed: u64,
    /// Connections refused (by the policy, the SNI check, or because the far end could not
    /// be reached).
    pub denied: u64,
    /// Bytes the guest sent out, over connections that have ended.
    pub bytes_sent: u64,
    /// Bytes that came back to the guest, over connections that have ended.
    pub bytes_received: u64,
}

/// A receipt whose signature by a trusted key verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedReceipt {
    /// The receipt.
    pub receipt: Receipt,
    /// The key that signed it.
    pub keyid: String,
    /// `sha256:` of the envelope's bytes: what the next receipt names as `previous`.
    pub digest: String,
}

/// Issues `receipt` on `home`'s chain: sets `previous` to the last receipt issued there,
/// signs it with `signer`, hands the envelope's bytes to `store`, and only once that succeeded
/// records it as the last — a receipt that was never stored leaves no gap in the chain.
pub fn issue(
    home: &MvmHome,
    mut receipt: Receipt,
    signer: &Signer,
    store: impl FnOnce(&[u8]) -> Result<(), Error>,
) -> Result<Vec<u8>, Error> {
    let dir = home.ensure("receipts")?;
    let _guard = ExclusiveLock::acquire(&dir.join("lock"))?;
    let head = dir.join("head");
    receipt.previous = match read_capped(&head, 128, "receipt chain head") {
        Ok(bytes) => Some(String::from_utf8_lossy(&bytes).trim().to_string()),
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    receipt.schema_version = SCHEMA_VERSION.into();
    let payload = crate::canonical::to_vec(&receipt)?;
    let bytes = Envelope::sign(PAYLOAD_TYPE, &payload, signer).to_json();
    store(&bytes)?;
    atomic_write(&head, sha256_prefixed(&bytes).as_bytes(), 0o600)?;
    Ok(bytes)
}

/// Verifies a receipt envelope: shape, a trusted signer, the signature, the payload type,
/// and a strictly parsed receipt of a schema this build reads.
pub fn verify(bytes: &[u8], trust: &TrustStore) -> Result<VerifiedReceipt, Error> {
    if bytes.len() as u64 > MAX_RECEIPT_BYTES {
        return Err(Error::TooLarge {
            what: "receipt".into(),
            size: bytes.len() as u64,
            limit: MAX_RECEIPT_BYTES,
        });
    }
    let verified = Envelope::parse(bytes)?.verify(trust)?;
    if verified.payload_type != PAYLOAD_TYPE {
        return Err(Error::WrongPayloadType {
            found: verified.payload_type,
            expected: PAYLOAD_TYPE,
        });
    }
    let receipt: Receipt = serde_json::from_slice(&verified.payload)
        .map_err(|e| Error::InvalidReceipt(e.to_string()))?;
    if receipt.schema_version != SCHEMA_VERSION {
        return Err(Error::UnsupportedSchema {
            found: receipt.schema_version,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(VerifiedReceipt {
        receipt,
        keyid: verified.keyid,
        digest: sha256_prefixed(bytes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt() -> Receipt {
        let at = Timestamp::now();
        Receipt {
            schema_version: String::new(),
            plan_digest: format!("sha256:{}", "a".repeat(64)),
            vm: "vm-0123456789ab".into(),
            argv_sha256: sha256_prefixed(br#"["echo","hello"]"#),
            started_at: at,
            ended_at: at,
            result: CommandResult::Exited { code: 0 },
            stdout: OutputDigest {
                sha256: sha256_prefixed(b"hello\n"),
                bytes: 6,
            },
            stderr: OutputDigest {
                sha256: sha256_prefixed(b""),
                bytes: 0,
            },
            egress: vec![],
            egress_counts: EgressCounts::default(),
            previous: None,
        }
    }

    #[test]
    fn receipts_chain_and_any_flipped_bit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let home = MvmHome::at(dir.path().join("home"));
        let signer = Signer::generate().unwrap();
        let mut trust = TrustStore::default();
        trust.insert(signer.verifying_key());

        let first = issue(&home, receipt(), &signer, |_| Ok(())).unwrap();
        // A receipt that could not be stored does not become the chain's head.
        let unstored = issue(&home, receipt(), &signer, |_| {
            Err(Error::InvalidReceipt("disk full".into()))
        });
        assert!(unstored.is_err());
        let second = issue(&home, receipt(), &signer, |_| Ok(())).unwrap();
        let first = verify(&first, &trust).unwrap();
        let second_bytes = second.clone();
        let second = verify(&second, &trust).unwrap();
        assert_eq!(first.receipt.previous, None);
        assert_eq!(second.receipt.previous, Some(first.digest));
        assert_eq!(second.receipt.stdout.bytes, 6);

        for at in 0..second_bytes.len() {
            for bit in [0x01, 0x80] {
                let mut flipped = second_bytes.clone();
                flipped[at] ^= bit;
                assert!(
                    verify(&flipped, &trust).is_err(),
                    "a flip of bit {bit:#x} at byte {at} verified"
                );
            }
        }
        assert!(matches!(
            verify(&second_bytes, &TrustStore::default()),
            Err(Error::UnknownSigner(_))
        ));
    }

    #[test]
    fn a_plan_envelope_is_not_a_receipt() {
        let signer = Signer::generate().unwrap();
        let mut trust = TrustStore::default();
        trust.insert(signer.verifying_key());
        let plan = Envelope::sign(crate::plan::PAYLOAD_TYPE, b"{}", &signer).to_json();
        assert_eq!(verify(&plan, &trust).unwrap_err().code(), "PLAN004");
        let junk = Envelope::sign(PAYLOAD_TYPE, br#"{"vm":1}"#, &signer).to_json();
        assert_eq!(verify(&junk, &trust).unwrap_err().code(), "RECEIPT001");
    }
}
