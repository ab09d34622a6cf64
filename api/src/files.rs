//! Files in a sandbox, with the agent's own rules: every operation is done by the agent as
//! the workload user, under the guest's /tmp, symlinks never followed. Bytes are checked by
//! SHA-256 end to end: a file written is spooled here first (its digest is announced to the
//! agent, which keeps the file only if the bytes match), a file read is checked against the
//! digest the agent reports once its bytes have passed.

use std::io::{self, Seek, Write};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mvm_protocol::{FileInfo, FileKind, FsWriteRequest, Request, Response};
use mvm_runner::client::{ClientError, OutputSink};
use mvm_runner::named_vm::{NamedVm, NamedVmError};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::body::Part;
use crate::error::ApiError;
use crate::model::{EntryInfo, EntryList, Written};

/// How long one file operation may take (a large copy, a recursive remove).
const FILE_TIMEOUT: Duration = Duration::from_secs(3600);
/// The largest file written through the API.
pub const MAX_WRITE_BYTES: u64 = 4 << 30;
/// The deepest listing.
const MAX_DEPTH: u32 = 16;
/// The most entries one listing returns.
const MAX_ENTRIES: usize = 10_000;

/// A file's bytes on their way in: spooled to an unnamed temporary file with their digest.
pub struct Spool {
    file: std::fs::File,
    size: u64,
    hash: Sha256,
}

impl Spool {
    /// An empty spool in `dir` (the mvm home: private to its user).
    pub fn new(dir: &std::path::Path) -> Result<Spool, ApiError> {
        Ok(Spool {
            file: tempfile::tempfile_in(dir).map_err(ApiError::host("a spool file"))?,
            size: 0,
            hash: Sha256::new(),
        })
    }

    /// Adds `bytes`; refused past [`MAX_WRITE_BYTES`].
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), ApiError> {
        self.size += bytes.len() as u64;
        if self.size > MAX_WRITE_BYTES {
            return Err(ApiError::TooLarge(MAX_WRITE_BYTES));
        }
        self.hash.update(bytes);
        self.file
            .write_all(bytes)
            .map_err(ApiError::host("spooling the file"))
    }

    /// Writes what was spooled to `path` in `vm` with `mode`; `expected`, a digest the client
    /// announced, must match the bytes that arrived.
    pub fn write_to(
        mut self,
        vm: &NamedVm,
        path: &str,
        mode: u32,
        expected: Option<&str>,
    ) -> Result<Written, ApiError> {
        let sha256 = format!("sha256:{}", hex::encode(self.hash.finalize()));
        if let Some(expected) = expected {
            if expected != sha256 {
                return Err(ApiError::BadRequest(format!(
                    "the body hashes to {sha256}, not the {expected} announced"
                )));
            }
        }
        self.file
            .rewind()
            .map_err(ApiError::host("rewinding the spool"))?;
        let request = FsWriteRequest {
            path: path.into(),
            mode,
            size: self.size,
            sha256: sha256.clone(),
            tar: false,
        };
        let mut client = vm.connect(Arc::default())?;
        client
            .fs_write(request, &mut self.file, FILE_TIMEOUT)
            .map_err(NamedVmError::from)?;
        Ok(Written {
            path: path.into(),
            size: self.size,
            sha256,
        })
    }
}

/// Reads `path` out of `vm`, sending its bytes to `parts` as they arrive; a failure (the
/// agent's refusal, a digest that does not match) is the last part.
pub fn read(vm: &NamedVm, path: &str, parts: mpsc::Sender<Part>) {
    let mut sink = PartSink { parts: &parts };
    let read = vm
        .connect(Arc::default())
        .and_then(|mut client| Ok(client.fs_read(path, false, &mut sink, FILE_TIMEOUT)?));
    if let Err(error) = read {
        // The server answers with it when it comes first; later, it cuts the body short.
        let _ = parts.blocking_send(Err(io::Error::other(ApiError::from(error))));
    }
}

/// A file's bytes as body parts, waiting for room: the client paces the read.
struct PartSink<'a> {
    parts: &'a mpsc::Sender<Part>,
}

impl OutputSink for PartSink<'_> {
    fn stdout(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.parts
            .blocking_send(Ok(Bytes::copy_from_slice(bytes)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
    }

    fn stderr(&mut self, _: &[u8]) -> io::Result<()> {
        Ok(())
    }
}

/// Describes one path (a symlink itself).
pub fn stat(vm: &NamedVm, path: &str) -> Result<EntryInfo, ApiError> {
    match ask(vm, Request::FsStat { path: path.into() })? {
        Response::FsStat(info) => Ok(entry(parent_of(path), &info)),
        other => Err(unexpected(&other)),
    }
}

/// Lists `path` to `depth` levels (1: its entries only), directories before what they hold.
pub fn list(vm: &NamedVm, path: &str, depth: u32) -> Result<EntryList, ApiError> {
    if !(1..=MAX_DEPTH).contains(&depth) {
        return Err(ApiError::BadRequest(format!(
            "depth {depth} is not 1-{MAX_DEPTH}"
        )));
    }
    let mut client = vm.connect(Arc::default())?;
    let mut listing = EntryList {
        entries: Vec::new(),
        truncated: false,
    };
    let mut pending = vec![(path.trim_end_matches('/').to_string(), 1)];
    while let Some((dir, level)) = pending.pop() {
        let answer = client
            .call(&Request::FsList { path: dir.clone() }, FILE_TIMEOUT, None)
            .map_err(NamedVmError::from)?;
        let Response::FsList { entries, truncated } = answer else {
            return Err(unexpected(&answer));
        };
        listing.truncated |= truncated;
        let parent = if dir.is_empty() { "/" } else { dir.as_str() };
        let mut below = Vec::new();
        for info in &entries {
            if listing.entries.len() == MAX_ENTRIES {
                listing.truncated = true;
                return Ok(listing);
            }
            let entry = entry(parent, info);
            if info.kind == FileKind::Directory && level < depth {
                below.push((entry.path.clone(), level + 1));
            }
            listing.entries.push(entry);
        }
        // Depth first, in the agent's order.
        pending.extend(below.into_iter().rev());
    }
    Ok(listing)
}

/// Asks the agent for one file operation.
pub fn ask(vm: &NamedVm, request: Request) -> Result<Response, ApiError> {
    let mut client = vm.connect(Arc::default())?;
    Ok(client
        .call(&request, FILE_TIMEOUT, None)
        .map_err(NamedVmError::from)?)
}

/// The path of `path`'s parent directory.
fn parent_of(path: &str) -> &str {
    let trimmed = path.trim_end_matches('/');
    match trimmed.rfind('/') {
        Some(0) | None => "/",
        Some(at) => &trimmed[..at],
    }
}

fn entry(parent: &str, info: &FileInfo) -> EntryInfo {
    let path = match parent {
        "/" => format!("/{}", info.name),
        parent => format!("{parent}/{}", info.name),
    };
    EntryInfo {
        name: info.name.clone(),
        path,
        kind: match info.kind {
            FileKind::File => "file",
            FileKind::Directory => "directory",
            FileKind::Symlink => "symlink",
            FileKind::Other => "other",
        }
        .into(),
        size: info.size,
        mode: info.mode,
        uid: info.uid,
        modified: crate::rfc3339(info.modified).unwrap_or_default(),
    }
}

fn unexpected(response: &Response) -> ApiError {
    ApiError::Vm(NamedVmError::Channel(ClientError::Protocol(format!(
        "an unexpected answer {response:?}"
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_and_paths() {
        assert_eq!(parent_of("/tmp/a/b"), "/tmp/a");
        assert_eq!(parent_of("/tmp/"), "/");
        assert_eq!(parent_of("/tmp"), "/");
        let info = FileInfo {
            name: "x".into(),
            kind: FileKind::File,
            size: 1,
            mode: 0o644,
            uid: 1000,
            modified: 0,
        };
        assert_eq!(entry("/tmp", &info).path, "/tmp/x");
        assert_eq!(entry("/", &info).path, "/x");
        assert_eq!(entry("/", &info).modified, "1970-01-01T00:00:00Z");
    }

    #[test]
    fn a_spool_counts_hashes_and_stops_at_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::new(dir.path()).unwrap();
        spool.push(b"hello").unwrap();
        assert_eq!(spool.size, 5);
        assert_eq!(
            hex::encode(spool.hash.clone().finalize()),
            mvm_ir::digest::sha256_hex(b"hello")
        );
        spool.size = MAX_WRITE_BYTES;
        assert!(matches!(spool.push(b"x"), Err(ApiError::TooLarge(_))));
    }
}
