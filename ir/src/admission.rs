//! Plan admission: the checks a signed plan passes, in a fixed order, before any VM process
//! starts.
//!
//! 1. envelope shape → 2. a signature by a known signer → 3. that signature verifies →
//! 4. payload type → 5. schema version (newer is refused) → 6. strict parse and plan rules →
//! 7. validity window → 8. for a single-use plan, its nonce was never admitted.
//!
//! Each refusal has its own [`Error`] code. [`verify_plan`] runs all eight and consumes nothing,
//! so inspecting or verifying a plan never uses it up; [`PlanAdmission::admit`] runs them and, for a
//! single-use plan, records the nonce in the [`NonceLedger`] in the same locked step.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::digest::sha256_prefixed;
use crate::dsse::Envelope;
use crate::fsutil::{atomic_write, read_capped, ExclusiveLock};
use crate::home::MvmHome;
use crate::keys::TrustStore;
use crate::plan::{LaunchPlan, Timestamp, MAX_ENVELOPE_BYTES, PAYLOAD_TYPE, SCHEMA_VERSION};
use crate::Error;

/// A plan that passed verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedPlan {
    /// The plan.
    pub plan: LaunchPlan,
    /// `sha256:` of the signed payload bytes: the plan's identity in receipts and audit lines.
    pub digest: String,
    /// The trusted key that signed it.
    pub keyid: String,
}

/// Checks 1–7 on an envelope's bytes; see the module documentation.
pub fn verify_signed_plan(
    bytes: &[u8],
    trust: &TrustStore,
    now: OffsetDateTime,
) -> Result<VerifiedPlan, Error> {
    if bytes.len() as u64 > MAX_ENVELOPE_BYTES {
        return Err(Error::TooLarge {
            what: "plan envelope".into(),
            size: bytes.len() as u64,
            limit: MAX_ENVELOPE_BYTES,
        });
    }
    let envelope = Envelope::parse(bytes)?;
    let verified = envelope.verify(trust)?;
    if verified.payload_type != PAYLOAD_TYPE {
        return Err(Error::WrongPayloadType {
            found: verified.payload_type,
            expected: PAYLOAD_TYPE,
        });
    }
    check_schema_version(&verified.payload)?;
    let plan: LaunchPlan =
        serde_json::from_slice(&verified.payload).map_err(|e| Error::InvalidPlan(e.to_string()))?;
    plan.check()?;
    if now < plan.valid_from.0 {
        return Err(Error::PlanNotYetValid(plan.valid_from.to_string()));
    }
    if now >= plan.valid_until.0 {
        return Err(Error::PlanExpired(plan.valid_until.to_string()));
    }
    Ok(VerifiedPlan {
        digest: sha256_prefixed(&verified.payload),
        keyid: verified.keyid,
        plan,
    })
}

/// Checks 1–8 without consuming anything: what `mvm plan verify` reports.
pub fn verify_plan(
    bytes: &[u8],
    trust: &TrustStore,
    ledger: &NonceLedger,
    now: OffsetDateTime,
) -> Result<VerifiedPlan, Error> {
    let verified = verify_signed_plan(bytes, trust, now)?;
    if verified.plan.single_use && ledger.contains(&verified.plan.nonce)? {
        return Err(Error::PlanReplayed(verified.plan.nonce));
    }
    Ok(verified)
}

/// Reads the schema version before the strict parse, so a plan from a newer mvm is refused as
/// such rather than as a plan with unknown fields.
fn check_schema_version(payload: &[u8]) -> Result<(), Error> {
    #[derive(Deserialize)]
    struct Versioned {
        schema_version: serde_json::Value,
    }
    let versioned: Versioned = serde_json::from_slice(payload)
        .map_err(|e| Error::InvalidPlan(format!("no readable schema_version: {e}")))?;
    match versioned.schema_version.as_str() {
        Some(SCHEMA_VERSION) => Ok(()),
        Some(other) => Err(Error::UnsupportedSchema {
            found: other.to_string(),
            supported: SCHEMA_VERSION,
        }),
        None => Err(Error::InvalidPlan("schema_version is not a string".into())),
    }
}

/// Admits plans: what the runner calls before it starts a VM.
#[derive(Debug)]
pub struct PlanAdmission {
    trust: TrustStore,
    ledger: NonceLedger,
}

impl PlanAdmission {
    /// Admission against `trust`, recording single-use nonces in `ledger`.
    pub fn new(trust: TrustStore, ledger: NonceLedger) -> Self {
        Self { trust, ledger }
    }

    /// Verifies the envelope in `bytes` and, for a single-use plan, consumes its nonce.
    pub fn admit(&self, bytes: &[u8], now: OffsetDateTime) -> Result<VerifiedPlan, Error> {
        self.admit_checked(bytes, now, |_| Ok::<(), Error>(()))
            .map(|(verified, ())| verified)
    }

    /// Verifies the envelope in `bytes`, runs the caller's own checks on the verified plan
    /// (the runner's artifact digests), and only when they pass consumes a single-use plan's
    /// nonce: a plan refused for a bad artifact is not used up.
    pub fn admit_checked<T, E: From<Error>>(
        &self,
        bytes: &[u8],
        now: OffsetDateTime,
        check: impl FnOnce(&VerifiedPlan) -> Result<T, E>,
    ) -> Result<(VerifiedPlan, T), E> {
        let verified = verify_signed_plan(bytes, &self.trust, now)?;
        // A replay is refused before the caller's checks run (they may look at the host); the
        // record below is what decides, under the ledger's lock, when two admissions race.
        if verified.plan.single_use && self.ledger.contains(&verified.plan.nonce)? {
            return Err(Error::PlanReplayed(verified.plan.nonce.clone()).into());
        }
        let checked = check(&verified)?;
        if verified.plan.single_use {
            self.ledger
                .record(&verified.plan.nonce, verified.plan.valid_until, now)?;
        }
        Ok((verified, checked))
    }

    /// Verifies the envelope in `bytes` as the plan of a VM it was admitted for already (a
    /// cold VM being woken, whose manifest names `digest`): everything
    /// [`Self::admit_checked`] checks — the signer still trusted, the window still open — but
    /// the single-use ledger: the plan is not used again, its VM goes on.
    pub fn readmit_checked<T, E: From<Error>>(
        &self,
        bytes: &[u8],
        now: OffsetDateTime,
        digest: &str,
        check: impl FnOnce(&VerifiedPlan) -> Result<T, E>,
    ) -> Result<(VerifiedPlan, T), E> {
        let verified = verify_signed_plan(bytes, &self.trust, now)?;
        if verified.digest != digest {
            return Err(Error::PlanChanged {
                found: verified.digest,
                expected: digest.into(),
            }
            .into());
        }
        let checked = check(&verified)?;
        Ok((verified, checked))
    }
}

/// The nonces of admitted single-use plans, each kept until its plan's `valid_until` (after
/// which the plan is refused as expired anyway).
///
/// One JSON file, rewritten atomically under an exclusive lock, so concurrent admissions of the
/// same plan — threads or processes — admit it exactly once. A ledger that cannot be read is an
/// error, never an empty ledger: failing open would let a replay through.
#[derive(Debug, Clone)]
pub struct NonceLedger {
    path: PathBuf,
    lock: PathBuf,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LedgerFile {
    version: u32,
    /// nonce → valid_until of its plan.
    nonces: BTreeMap<String, Timestamp>,
}

/// The ledger file format version.
const LEDGER_VERSION: u32 = 1;

/// The ledger file's size limit: about 600 000 live nonces (about 100 bytes each).
const MAX_LEDGER_BYTES: u64 = 64 * 1024 * 1024;

impl NonceLedger {
    /// The ledger of `home`.
    pub fn in_home(home: &MvmHome) -> Result<Self, Error> {
        Ok(Self::at(&home.ledger_dir()?))
    }

    /// A ledger in directory `dir` (which must exist).
    pub fn at(dir: &Path) -> Self {
        Self {
            path: dir.join("nonces.json"),
            lock: dir.join("nonces.lock"),
        }
    }

    /// Whether `nonce` was admitted (and its plan has not yet expired).
    pub fn contains(&self, nonce: &str) -> Result<bool, Error> {
        Ok(self.read()?.nonces.contains_key(nonce))
    }

    /// Records `nonce`, refusing one already recorded. Expired entries are pruned on the way.
    pub fn record(
        &self,
        nonce: &str,
        valid_until: Timestamp,
        now: OffsetDateTime,
    ) -> Result<(), Error> {
        let _guard = ExclusiveLock::acquire(&self.lock)?;
        let mut ledger = self.read()?;
        ledger.nonces.retain(|_, until| until.0 > now);
        if ledger.nonces.contains_key(nonce) {
            return Err(Error::PlanReplayed(nonce.to_string()));
        }
        ledger.nonces.insert(nonce.to_string(), valid_until);
        ledger.version = LEDGER_VERSION;
        let bytes = serde_json::to_vec(&ledger).map_err(|e| self.corrupt(e))?;
        atomic_write(&self.path, &bytes, 0o600)
    }

    fn read(&self) -> Result<LedgerFile, Error> {
        let bytes = match read_capped(&self.path, MAX_LEDGER_BYTES, "nonce ledger") {
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(LedgerFile::default())
            }
            Err(too_large @ Error::TooLarge { .. }) => return Err(self.corrupt(too_large)),
            other => other?,
        };
        let ledger: LedgerFile = serde_json::from_slice(&bytes).map_err(|e| self.corrupt(e))?;
        if ledger.version != LEDGER_VERSION {
            return Err(self.corrupt(format!("unknown ledger version {}", ledger.version)));
        }
        Ok(ledger)
    }

    fn corrupt(&self, reason: impl std::fmt::Display) -> Error {
        Error::LedgerCorrupt {
            path: self.path.clone(),
            reason: reason.to_string(),
        }
    }
}
