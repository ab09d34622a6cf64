//! Hashing while reading, so blobs are checked against the digests that name them.

use std::io::{self, Read};

use sha2::{Digest, Sha256};

/// A reader that hashes everything read through it, and remembers whether the reader beneath
/// it failed (so a decompression failure can be told from a malformed tar stream above it).
pub(crate) struct DigestingReader<R> {
    inner: R,
    hasher: Sha256,
    failure: Option<String>,
}

impl<R: Read> DigestingReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            failure: None,
        }
    }

    /// The error the inner reader returned, if it did.
    pub(crate) fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// `sha256:<hex>` of everything read.
    pub(crate) fn finish(self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.finalize()))
    }
}

impl<R: Read> Read for DigestingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.hasher.update(&buf[..n]);
                Ok(n)
            }
            Err(e) => {
                self.failure.get_or_insert_with(|| e.to_string());
                Err(e)
            }
        }
    }
}

/// A writer that refuses to grow past `limit` bytes: a source cannot send more than the
/// descriptor promised.
pub(crate) struct LimitedWriter<W> {
    inner: W,
    limit: u64,
    written: u64,
}

impl<W: io::Write> LimitedWriter<W> {
    pub(crate) fn new(inner: W, limit: u64) -> Self {
        Self {
            inner,
            limit,
            written: 0,
        }
    }

    pub(crate) fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: io::Write> io::Write for LimitedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written + buf.len() as u64 > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!("more than the {} bytes expected", self.limit),
            ));
        }
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
