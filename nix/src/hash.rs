//! Hashes as Nix uses them: sha256 for every fingerprint, the 160-bit XOR-fold that becomes a
//! store path's hash part, and the content hashes that fixed-output derivations declare.
//!
//! Nix hashes content with md5, sha1, sha256 or sha512, but mvm only ever *computes* sha256;
//! the other algorithms appear as declared digests whose length is checked.

use std::io;

use sha2::Digest as _;

use crate::error::NixError;

/// The sha256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(bytes).into()
}

/// A sha256 computed over everything written to it.
#[derive(Default)]
pub struct Sha256Writer(sha2::Sha256);

impl Sha256Writer {
    /// The hash of everything written.
    pub fn finish(self) -> [u8; 32] {
        self.0.finalize().into()
    }
}

impl io::Write for Sha256Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Nix's `compressHash`: `hash` folded onto `N` bytes by XOR, byte `i` into byte `i mod N`.
/// Store paths carry a 20-byte (160-bit) fold of a sha256.
pub fn compress_hash<const N: usize>(hash: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    for (i, byte) in hash.iter().enumerate() {
        out[i % N] ^= byte;
    }
    out
}

/// A hash algorithm a fixed-output derivation may declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HashAlgo {
    /// MD5 (16 bytes).
    Md5,
    /// SHA-1 (20 bytes).
    Sha1,
    /// SHA-256 (32 bytes).
    Sha256,
    /// SHA-512 (64 bytes).
    Sha512,
}

impl HashAlgo {
    /// The name Nix writes.
    pub fn name(self) -> &'static str {
        match self {
            HashAlgo::Md5 => "md5",
            HashAlgo::Sha1 => "sha1",
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha512 => "sha512",
        }
    }

    /// The algorithm Nix writes as `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        [
            HashAlgo::Md5,
            HashAlgo::Sha1,
            HashAlgo::Sha256,
            HashAlgo::Sha512,
        ]
        .into_iter()
        .find(|algo| algo.name() == name)
    }

    /// The length of its digest in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlgo::Md5 => 16,
            HashAlgo::Sha1 => 20,
            HashAlgo::Sha256 => 32,
            HashAlgo::Sha512 => 64,
        }
    }
}

/// What a fixed-output hash is taken over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IngestionMethod {
    /// The bytes of a single regular file.
    Flat,
    /// The NAR serialisation of a file tree (`r:` in a derivation).
    Recursive,
}

/// The content hash a fixed-output derivation declares: its output must hash to this.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FixedOutputHash {
    method: IngestionMethod,
    algo: HashAlgo,
    digest: Vec<u8>,
}

impl FixedOutputHash {
    /// A declared hash; `digest` must be `algo`'s length.
    pub fn new(method: IngestionMethod, algo: HashAlgo, digest: Vec<u8>) -> Result<Self, NixError> {
        if digest.len() != algo.digest_len() {
            return Err(NixError::Invalid(format!(
                "a {} digest is {} bytes, not {}",
                algo.name(),
                algo.digest_len(),
                digest.len()
            )));
        }
        Ok(Self {
            method,
            algo,
            digest,
        })
    }

    /// The hash of a derivation's output fields: `method_algo` as Nix writes it (`r:sha256`,
    /// `sha1`…) and the digest in lowercase hex. Experimental `text:` hashes are unsupported.
    pub fn from_drv_fields(method_algo: &str, hex_digest: &str) -> Result<Self, NixError> {
        if method_algo.starts_with("text:") {
            return Err(NixError::Unsupported(format!(
                "text-hashed output ({method_algo}), an experimental Nix feature"
            )));
        }
        let (method, algo_name) = match method_algo.strip_prefix("r:") {
            Some(rest) => (IngestionMethod::Recursive, rest),
            None => (IngestionMethod::Flat, method_algo),
        };
        let algo = HashAlgo::from_name(algo_name).ok_or_else(|| {
            NixError::Invalid(format!("unknown output hash algorithm {method_algo:?}"))
        })?;
        let lowercase_hex = hex_digest
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let digest = hex::decode(hex_digest)
            .ok()
            .filter(|_| lowercase_hex)
            .ok_or_else(|| {
                NixError::Invalid(format!(
                    "output hash {:?} is not lowercase hex",
                    crate::error::excerpt(hex_digest)
                ))
            })?;
        Self::new(method, algo, digest)
    }

    /// How the content was hashed.
    pub fn method(&self) -> IngestionMethod {
        self.method
    }

    /// The algorithm.
    pub fn algo(&self) -> HashAlgo {
        self.algo
    }

    /// The digest.
    pub fn digest(&self) -> &[u8] {
        &self.digest
    }

    /// Method and algorithm as a derivation writes them: `r:sha256`, `sha1`.
    pub fn method_algo(&self) -> String {
        match self.method {
            IngestionMethod::Flat => self.algo.name().to_string(),
            IngestionMethod::Recursive => format!("r:{}", self.algo.name()),
        }
    }

    /// The digest in lowercase hex, as a derivation writes it.
    pub fn hex(&self) -> String {
        hex::encode(&self.digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compress_folds_by_xor() {
        let hash: Vec<u8> = (0u8..32).collect();
        let folded: [u8; 20] = compress_hash(&hash);
        assert_eq!(folded[0], 20);
        assert_eq!(folded[11], 11 ^ 31);
        assert_eq!(folded[12], 12);
        assert_eq!(compress_hash::<4>(&[1, 2, 3, 4, 1, 2, 3, 4]), [0; 4]);
    }

    #[test]
    fn drv_fields_round_trip() {
        let sha1 = "a9993e364706816aba3e25717850c26c9cd0d89d";
        let hash = FixedOutputHash::from_drv_fields("r:sha1", sha1).unwrap();
        assert_eq!(hash.method(), IngestionMethod::Recursive);
        assert_eq!(hash.method_algo(), "r:sha1");
        assert_eq!(hash.hex(), sha1);
    }

    #[test]
    fn drv_fields_are_checked() {
        let cases = [
            (
                "sha256",
                "a9993e364706816aba3e25717850c26c9cd0d89d",
                "NIX006",
            ),
            ("sha1", "A9993E364706816ABA3E25717850C26C9CD0D89D", "NIX006"),
            ("blake3", "00", "NIX006"),
            ("r:sha1", "zz", "NIX006"),
            ("text:sha256", "00", "NIX007"),
        ];
        for (algo, digest, code) in cases {
            let err = FixedOutputHash::from_drv_fields(algo, digest).unwrap_err();
            assert_eq!(err.code(), code, "{algo} {digest}: {err}");
        }
    }
}
