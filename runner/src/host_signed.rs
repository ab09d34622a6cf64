//! Records only this host's key may vouch for — a cold VM's manifest, a boot snapshot's — as
//! DSSE envelopes: written atomically, read back bounded, and believed only when this host's
//! key signed them with the expected payload type. A record another key signed, or one of
//! another kind, is refused whatever it says.

use std::path::Path;

use mvm_ir::dsse::Envelope;
use mvm_ir::fsutil::{atomic_write, read_capped};
use mvm_ir::home::MvmHome;
use mvm_ir::keys::{KeyStore, TrustStore};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Signs `record` (canonical JSON) with the host key of `home` as a `payload_type` envelope,
/// and writes it to `path` (mode 0600), whole or not at all.
pub fn write(
    home: &MvmHome,
    path: &Path,
    payload_type: &str,
    record: &impl Serialize,
) -> Result<(), String> {
    let signer = KeyStore::new(home.clone())
        .host_signer()
        .map_err(|e| format!("the host key: {e}"))?;
    let payload = mvm_ir::canonical::to_vec(record).map_err(|e| format!("the record: {e}"))?;
    let envelope = Envelope::sign(payload_type, &payload, &signer).to_json();
    atomic_write(path, &envelope, 0o600).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Reads the record at `path` (at most `max_bytes`): it must be a `payload_type` envelope the
/// host key of `home` signed.
pub fn read<T: DeserializeOwned>(
    home: &MvmHome,
    path: &Path,
    payload_type: &str,
    max_bytes: u64,
) -> Result<T, String> {
    let bytes = read_capped(path, max_bytes, payload_type).map_err(|e| e.to_string())?;
    let host_key = KeyStore::new(home.clone())
        .host_signer()
        .map_err(|e| format!("the host key: {e}"))?
        .verifying_key();
    let mut trust = TrustStore::default();
    trust.insert(host_key);
    let verified = Envelope::parse(&bytes)
        .and_then(|envelope| envelope.verify(&trust))
        .map_err(|e| e.to_string())?;
    if verified.payload_type != payload_type {
        return Err(format!("it is a {}", verified.payload_type));
    }
    serde_json::from_slice(&verified.payload).map_err(|e| e.to_string())
}
