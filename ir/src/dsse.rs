//! DSSE envelopes (Dead Simple Signing Envelope, v1.0) with ed25519 signatures.
//!
//! The signature covers the pre-authentication encoding [`pae`] of the payload type and payload,
//! so a payload can never be re-read as another type. `keyid` is the signer's [`key_id`]. Parsing
//! checks the envelope's shape only; [`Envelope::verify`] then requires a signature by a trusted
//! key and refuses any signature by a trusted key that does not verify.
//!
//! [`key_id`]: crate::keys::key_id

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::digest::is_sha256_hex;
use crate::keys::{Signer, TrustStore};
use crate::Error;

/// Envelopes with more signatures than this are refused as malformed.
const MAX_SIGNATURES: usize = 8;

/// A DSSE envelope as it is stored and sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Envelope {
    /// The payload, base64 (standard alphabet, padded).
    pub payload: String,
    /// The payload's media type.
    pub payload_type: String,
    /// One or more signatures over `pae(payload_type, payload)`.
    pub signatures: Vec<EnvelopeSignature>,
}

/// One signature of an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvelopeSignature {
    /// Hex sha256 of the signer's raw public key.
    pub keyid: String,
    /// The ed25519 signature, base64.
    pub sig: String,
}

/// An envelope whose signature by a trusted key verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The trusted key that signed.
    pub keyid: String,
    /// The payload type (not yet checked against what the caller expects).
    pub payload_type: String,
    /// The decoded payload.
    pub payload: Vec<u8>,
}

/// The DSSE v1 pre-authentication encoding:
/// `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`, lengths in ASCII decimal.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload_type.len() + payload.len() + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

impl Envelope {
    /// Signs `payload` as `payload_type` with `signer`.
    pub fn sign(payload_type: &str, payload: &[u8], signer: &Signer) -> Self {
        let sig = signer.sign(&pae(payload_type, payload));
        Envelope {
            payload: STANDARD.encode(payload),
            payload_type: payload_type.to_string(),
            signatures: vec![EnvelopeSignature {
                keyid: signer.keyid().to_string(),
                sig: STANDARD.encode(sig),
            }],
        }
    }

    /// Parses an envelope and checks its shape (fields, base64, key id and signature sizes).
    pub fn parse(bytes: &[u8]) -> Result<Self, Error> {
        let envelope: Envelope =
            serde_json::from_slice(bytes).map_err(|e| Error::MalformedEnvelope(e.to_string()))?;
        envelope.decode_payload()?;
        if envelope.signatures.is_empty() {
            return Err(Error::MalformedEnvelope("no signatures".into()));
        }
        if envelope.signatures.len() > MAX_SIGNATURES {
            return Err(Error::MalformedEnvelope(format!(
                "{} signatures, more than {MAX_SIGNATURES}",
                envelope.signatures.len()
            )));
        }
        for signature in &envelope.signatures {
            if !is_sha256_hex(&signature.keyid) {
                return Err(Error::MalformedEnvelope(format!(
                    "keyid {:?} is not 64 lowercase hex digits",
                    signature.keyid
                )));
            }
            decode_signature(&signature.sig)?;
        }
        Ok(envelope)
    }

    /// The decoded payload.
    pub fn decode_payload(&self) -> Result<Vec<u8>, Error> {
        STANDARD
            .decode(&self.payload)
            .map_err(|e| Error::MalformedEnvelope(format!("payload is not base64: {e}")))
    }

    /// Verifies the envelope against `trust`: at least one signature must be by a trusted key,
    /// and every signature by a trusted key must verify.
    pub fn verify(&self, trust: &TrustStore) -> Result<Verified, Error> {
        let payload = self.decode_payload()?;
        let message = pae(&self.payload_type, &payload);
        let mut good = None;
        for signature in &self.signatures {
            let sig = decode_signature(&signature.sig)?;
            match trust.verify(&signature.keyid, &message, &sig) {
                None => continue,
                Some(false) => {
                    return Err(Error::BadSignature {
                        keyid: signature.keyid.clone(),
                    })
                }
                Some(true) => good = good.or(Some(signature.keyid.clone())),
            }
        }
        let keyid = good.ok_or_else(|| {
            let signers: Vec<&str> = self.signatures.iter().map(|s| s.keyid.as_str()).collect();
            Error::UnknownSigner(signers.join(", "))
        })?;
        Ok(Verified {
            keyid,
            payload_type: self.payload_type.clone(),
            payload,
        })
    }

    /// The envelope as pretty JSON, as mvm writes it to files.
    pub fn to_json(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }
}

fn decode_signature(sig: &str) -> Result<[u8; 64], Error> {
    let bytes = STANDARD
        .decode(sig)
        .map_err(|e| Error::MalformedEnvelope(format!("signature is not base64: {e}")))?;
    bytes.try_into().map_err(|b: Vec<u8>| {
        Error::MalformedEnvelope(format!("signature is {} bytes, not 64", b.len()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The worked example of the DSSE protocol text (protocol.md, "Test vectors").
    #[test]
    fn pae_matches_the_protocol_example() {
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ");
    }

    fn trusted(signer: &Signer) -> TrustStore {
        let mut trust = TrustStore::default();
        trust.insert(signer.verifying_key());
        trust
    }

    #[test]
    fn sign_then_verify_and_refusals() {
        let signer = Signer::generate().unwrap();
        let envelope = Envelope::sign("text/plain", b"payload", &signer);
        let parsed = Envelope::parse(&envelope.to_json()).unwrap();
        let verified = parsed.verify(&trusted(&signer)).unwrap();
        assert_eq!(verified.payload, b"payload");
        assert_eq!(verified.keyid, signer.keyid());

        let stranger = Signer::generate().unwrap();
        assert_eq!(
            parsed.verify(&trusted(&stranger)).unwrap_err().code(),
            "PLAN002"
        );

        let mut retyped = parsed.clone();
        retyped.payload_type = "text/html".into();
        assert_eq!(
            retyped.verify(&trusted(&signer)).unwrap_err().code(),
            "PLAN003"
        );

        for bad in [
            &b"{}"[..],
            br#"{"payload":"!!","payloadType":"t","signatures":[]}"#,
            br#"{"payload":"","payloadType":"t","signatures":[]}"#,
            br#"{"payload":"","payloadType":"t","signatures":[{"keyid":"x","sig":""}]}"#,
            br#"{"payload":"","payloadType":"t","signatures":[],"extra":1}"#,
            b"\xff\xfe",
        ] {
            assert_eq!(Envelope::parse(bad).unwrap_err().code(), "PLAN001");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// verify(sign(x)) holds, and flipping any bit of the payload or signature fails.
        #[test]
        fn any_flip_fails(payload in prop::collection::vec(any::<u8>(), 0..256), flip in any::<usize>(), bit in 0u8..8) {
            let signer = Signer::generate().unwrap();
            let trust = trusted(&signer);
            let envelope = Envelope::sign("application/octet-stream", &payload, &signer);
            prop_assert_eq!(envelope.verify(&trust).unwrap().payload, payload.clone());

            let mut sig = decode_signature(&envelope.signatures[0].sig).unwrap();
            let mut body = payload.clone();
            if body.is_empty() || flip % 2 == 0 {
                sig[(flip / 2) % 64] ^= 1 << bit;
            } else {
                let at = (flip / 2) % body.len();
                body[at] ^= 1 << bit;
            }
            let mut tampered = envelope.clone();
            tampered.payload = STANDARD.encode(&body);
            tampered.signatures[0].sig = STANDARD.encode(sig);
            prop_assert!(tampered.verify(&trust).is_err());
        }
    }
}
