//! Any bytes through plan admission, twice: as a whole envelope (shape and signature checks),
//! and as a payload signed by a trusted key (so the fuzzer reaches the schema, strict parse,
//! plan rules and window checks behind the signature). Never a panic; never Ok for a payload
//! that is not a valid plan.
#![no_main]

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use mvm_ir::admission::verify_signed_plan;
use mvm_ir::dsse::Envelope;
use mvm_ir::keys::{Signer, TrustStore};
use mvm_ir::plan::PAYLOAD_TYPE;
use time::OffsetDateTime;

fuzz_target!(|data: &[u8]| {
    let signer = Signer::new(SigningKey::from_bytes(&[7u8; 32]));
    let mut trust = TrustStore::default();
    trust.insert(signer.verifying_key());
    let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();

    let _ = verify_signed_plan(data, &trust, now);

    let envelope = Envelope::sign(PAYLOAD_TYPE, data, &signer).to_json();
    if let Ok(verified) = verify_signed_plan(&envelope, &trust, now) {
        assert!(verified.plan.check().is_ok());
    }
});
