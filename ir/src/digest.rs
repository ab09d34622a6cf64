//! The one sha256 helper of mvm, and the `sha256:<hex>` digest form used in documents.

use sha2::{Digest as _, Sha256};

/// Hex of the sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha256(bytes))
}

/// The sha256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// `sha256:<hex>` and length of everything `reader` yields, read in a stream.
pub fn sha256_reader(mut reader: impl std::io::Read) -> std::io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let len = std::io::copy(&mut reader, &mut hasher)?;
    Ok((format!("sha256:{}", hex::encode(hasher.finalize())), len))
}

/// A writer that passes everything on to `inner` and hashes what `inner` took: for a stream
/// produced by pushing (the reader's form is [`sha256_reader`]).
#[derive(Debug)]
pub struct Sha256Writer<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: std::io::Write> Sha256Writer<W> {
    /// A writer into `inner`.
    pub fn new(inner: W) -> Self {
        Sha256Writer {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// Flushes `inner`; `sha256:<hex>` and length of everything written.
    pub fn finish(mut self) -> std::io::Result<(String, u64)> {
        self.inner.flush()?;
        Ok((
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
            self.len,
        ))
    }
}

impl<W: std::io::Write> std::io::Write for Sha256Writer<W> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(bytes)?;
        self.hasher.update(&bytes[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// `sha256:<hex>` of `bytes`, the form documents carry.
pub fn sha256_prefixed(bytes: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(bytes))
}

/// Whether `s` is a lowercase 64-digit hex string (a sha256 in hex).
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && is_lower_hex(s)
}

/// Whether `s` is made of lowercase hex digits only (the empty string is).
pub fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether `s` is `sha256:` followed by 64 lowercase hex digits.
pub fn is_prefixed_sha256(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(is_sha256_hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(is_prefixed_sha256(&sha256_prefixed(b"abc")));
        assert!(!is_prefixed_sha256("sha256:BA7816BF"));
        assert!(!is_sha256_hex(&"A".repeat(64)));
    }

    #[test]
    fn the_writer_and_the_reader_agree() {
        use std::io::Write;
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let mut out = Vec::new();
        let mut writer = Sha256Writer::new(&mut out);
        for piece in bytes.chunks(999) {
            writer.write_all(piece).unwrap();
        }
        let written = writer.finish().unwrap();
        assert_eq!(out, bytes);
        assert_eq!(written, sha256_reader(&bytes[..]).unwrap());
        assert_eq!(written.0, sha256_prefixed(&bytes));
    }
}
