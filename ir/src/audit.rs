//! The audit chain: an append-only JSONL log in which every line is signed and names the hash
//! of the line before it.
//!
//! Each line is the canonical JSON of an [`Entry`]: `seq` (0, 1, 2, …), `time`, `event`, `fields`,
//! `prev` (hex sha256 of the previous line's bytes; 64 zeros for the first), `keyid`, and `sig`
//! (ed25519 over the canonical JSON of every other member). A signed head file records the last
//! entry's seq and line hash, so cutting entries off the end is found too.
//!
//! [`AuditLog::verify`] reports the first bad line and why: an edit, a deletion, an insertion, a
//! reordering, a bad signature, an unknown key, a truncation or a malformed line. Appends are
//! serialized across processes by a lock file and fsync'd before they return.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::digest::{is_sha256_hex, sha256_hex};
use crate::fsutil::{atomic_write, read_capped, ExclusiveLock};
use crate::home::MvmHome;
use crate::keys::{KeyStore, Signer, TrustStore};
use crate::plan::Timestamp;
use crate::{canonical, Error};

/// The `prev` of the first entry: sha256 "of nothing" is written as 32 zero bytes.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The longest line an entry may take; longer fields are refused at append.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// One audit entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Position in the chain, from 0.
    pub seq: u64,
    /// When the entry was appended.
    pub time: Timestamp,
    /// What happened, e.g. `plan.verify`.
    pub event: String,
    /// Details; never secrets, argv values or output.
    pub fields: Map<String, Value>,
    /// Hex sha256 of the previous line.
    pub prev: String,
    /// The signing key's id.
    pub keyid: String,
    /// ed25519 signature, base64, over the canonical JSON of the other members.
    pub sig: String,
}

/// What the head file records: the last entry's seq and line hash, signed, so the log cannot
/// be cut short and the head rewritten to match without the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Head {
    seq: u64,
    line_sha256: String,
    keyid: String,
    /// ed25519, base64, over the canonical JSON of the other members.
    sig: String,
}

impl Head {
    fn signed(seq: u64, line_sha256: String, signer: &Signer) -> Result<Self, Error> {
        let mut head = Head {
            seq,
            line_sha256,
            keyid: signer.keyid().to_string(),
            sig: String::new(),
        };
        head.sig = STANDARD.encode(signer.sign(&signed_bytes(&head)?));
        Ok(head)
    }
}

/// How a chain is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakKind {
    /// A line is not an entry (bad JSON, unknown fields, non-canonical form).
    Malformed,
    /// An entry's content was changed after it was signed.
    Edited,
    /// An entry's signature does not verify although its bytes are the ones that were chained.
    BadSignature,
    /// An entry is signed by a key this host does not trust.
    UnknownKey,
    /// Entries are missing between two lines.
    Deleted,
    /// An entry stands where it does not belong (a duplicate or forged sequence number).
    Inserted,
    /// Entries are out of order.
    Reordered,
    /// Entries are missing at the end (the head file names a later entry).
    Truncated,
}

impl BreakKind {
    /// The stable code of this kind of break.
    pub fn code(self) -> &'static str {
        match self {
            BreakKind::Malformed => "AUDIT001",
            BreakKind::Edited => "AUDIT002",
            BreakKind::BadSignature => "AUDIT003",
            BreakKind::UnknownKey => "AUDIT004",
            BreakKind::Deleted => "AUDIT005",
            BreakKind::Inserted => "AUDIT006",
            BreakKind::Reordered => "AUDIT007",
            BreakKind::Truncated => "AUDIT008",
        }
    }
}

/// Where and how a chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainBreak {
    /// 1-based line number of the first bad line (one past the end for a truncation).
    pub line: u64,
    /// The kind of break.
    pub kind: BreakKind,
    /// A human explanation.
    pub reason: String,
}

/// A chain that verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainSummary {
    /// Number of entries.
    pub entries: u64,
    /// Hex sha256 of the last line (the value the next entry's `prev` will carry).
    pub head: String,
}

/// The audit log of one host.
#[derive(Debug, Clone)]
pub struct AuditLog {
    path: PathBuf,
    head: PathBuf,
    lock: PathBuf,
}

/// The host's audit chain with the host's key: what the runner and the CLI append to, one
/// signed entry per event. A failure to record is the caller's failure: mvm does not act
/// without leaving evidence.
pub struct HostAudit {
    log: AuditLog,
    signer: Signer,
}

impl HostAudit {
    /// The chain of `home`, signed with its host key (made on first use).
    pub fn open(home: &MvmHome) -> Result<Self, Error> {
        let signer = KeyStore::new(home.clone()).host_signer()?;
        let log = AuditLog::in_home(home)?;
        Ok(Self { log, signer })
    }

    /// Appends a signed entry for `event` with `fields` (a JSON object; anything else is
    /// recorded as no fields), on disk before it returns.
    pub fn append(&self, event: &str, fields: Value) -> Result<Entry, Error> {
        let fields = match fields {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        self.log.append(event, fields, &self.signer)
    }
}

impl AuditLog {
    /// The log of `home`.
    pub fn in_home(home: &MvmHome) -> Result<Self, Error> {
        Ok(Self::at(&home.audit_dir()?))
    }

    /// The log in directory `dir` (which must exist).
    pub fn at(dir: &Path) -> Self {
        Self {
            path: dir.join("audit.jsonl"),
            head: dir.join("head.json"),
            lock: dir.join("audit.lock"),
        }
    }

    /// The JSONL file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a signed entry for `event` and returns it once it is on disk.
    pub fn append(
        &self,
        event: &str,
        fields: Map<String, Value>,
        signer: &Signer,
    ) -> Result<Entry, Error> {
        let _guard = ExclusiveLock::acquire(&self.lock)?;
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(|e| Error::io(&self.path, e))?;
        let (seq, prev) = match self.last_line(&mut file)? {
            None => (0, GENESIS.to_string()),
            Some(line) => {
                let last: Entry = serde_json::from_slice(&line).map_err(|e| {
                    Error::AuditChain(ChainBreak {
                        line: 0,
                        kind: BreakKind::Malformed,
                        reason: format!("last line is not an entry ({e}); run `mvm audit verify`"),
                    })
                })?;
                (last.seq + 1, sha256_hex(&line))
            }
        };
        let mut entry = Entry {
            seq,
            time: Timestamp::now(),
            event: event.to_string(),
            fields,
            prev,
            keyid: signer.keyid().to_string(),
            sig: String::new(),
        };
        entry.sig = STANDARD.encode(signer.sign(&signed_bytes(&entry)?));
        let mut line = canonical::to_vec(&entry)?;
        if line.len() > MAX_LINE_BYTES {
            return Err(Error::TooLarge {
                what: "audit entry".into(),
                size: line.len() as u64,
                limit: MAX_LINE_BYTES as u64,
            });
        }
        let line_hash = sha256_hex(&line);
        line.push(b'\n');
        file.write_all(&line)
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io(&self.path, e))?;
        let head = Head::signed(seq, line_hash, signer)?;
        let head_bytes = serde_json::to_vec(&head).map_err(|e| Error::parse("audit head", e))?;
        atomic_write(&self.head, &head_bytes, 0o600)?;
        Ok(entry)
    }

    /// The last complete line of the log, without its newline. A torn final line (a crash
    /// during an append that therefore never returned) is cut off first.
    fn last_line(&self, file: &mut File) -> Result<Option<Vec<u8>>, Error> {
        let io = |e| Error::io(&self.path, e);
        let len = file.seek(SeekFrom::End(0)).map_err(io)?;
        if len == 0 {
            return Ok(None);
        }
        let window = len.min(2 * MAX_LINE_BYTES as u64 + 2);
        file.seek(SeekFrom::Start(len - window)).map_err(io)?;
        let mut tail = Vec::with_capacity(window as usize);
        file.read_to_end(&mut tail).map_err(io)?;
        if tail.last() != Some(&b'\n') {
            let keep = tail.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
            let new_len = len - window + keep as u64;
            file.set_len(new_len).map_err(io)?;
            tail.truncate(keep);
            if new_len == 0 {
                return Ok(None);
            }
        }
        tail.pop();
        let start = tail.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        Ok(Some(tail[start..].to_vec()))
    }

    /// Verifies the whole chain against `trust`.
    pub fn verify(&self, trust: &TrustStore) -> Result<ChainSummary, Error> {
        let lines = match File::open(&self.path) {
            Ok(file) => read_lines(file).map_err(|e| Error::io(&self.path, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Error::io(&self.path, e)),
        };
        let head = self.read_head()?;
        verify_lines(&lines, head.as_ref(), trust).map_err(Error::AuditChain)
    }

    /// The last `n` entries, oldest first. Lines that do not parse are skipped: `tail` shows,
    /// `verify` judges.
    pub fn tail(&self, n: usize) -> Result<Vec<Entry>, Error> {
        let lines = match File::open(&self.path) {
            Ok(file) => read_lines(file).map_err(|e| Error::io(&self.path, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Error::io(&self.path, e)),
        };
        let start = lines.len().saturating_sub(n);
        Ok(lines[start..]
            .iter()
            .filter_map(|l| serde_json::from_slice(l).ok())
            .collect())
    }

    fn read_head(&self) -> Result<Option<Head>, Error> {
        match read_capped(&self.head, 4096, "audit head") {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                Error::AuditChain(ChainBreak {
                    line: 0,
                    kind: BreakKind::Malformed,
                    reason: format!("head file {} is corrupt: {e}", self.head.display()),
                })
            }),
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// The bytes a signature covers: the canonical JSON of a record without its `sig` member.
fn signed_bytes<T: Serialize>(record: &T) -> Result<Vec<u8>, Error> {
    let mut value = serde_json::to_value(record).map_err(|e| Error::parse("audit record", e))?;
    if let Value::Object(members) = &mut value {
        members.remove("sig");
    }
    canonical::value_to_vec(&value)
}

/// Whether `sig` (base64) is a signature by trusted key `keyid` over `record`.
fn signature_verifies<T: Serialize>(
    record: &T,
    keyid: &str,
    sig: &str,
    trust: &TrustStore,
) -> bool {
    STANDARD
        .decode(sig)
        .ok()
        .and_then(|sig| <[u8; 64]>::try_from(sig).ok())
        .zip(signed_bytes(record).ok())
        .and_then(|(sig, message)| trust.verify(keyid, &message, &sig))
        .unwrap_or(false)
}

fn read_lines(file: File) -> std::io::Result<Vec<Vec<u8>>> {
    let mut lines = Vec::new();
    for line in BufReader::new(file).split(b'\n') {
        lines.push(line?);
    }
    Ok(lines)
}

fn broken(index: usize, kind: BreakKind, reason: impl Into<String>) -> ChainBreak {
    ChainBreak {
        line: index as u64 + 1,
        kind,
        reason: reason.into(),
    }
}

/// Verifies parsed lines; the first problem wins.
fn verify_lines(
    lines: &[Vec<u8>],
    head: Option<&Head>,
    trust: &TrustStore,
) -> Result<ChainSummary, ChainBreak> {
    let mut entries = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        let entry: Entry = serde_json::from_slice(line)
            .map_err(|e| broken(i, BreakKind::Malformed, format!("not an audit entry: {e}")))?;
        entries.push(entry);
    }
    let mut prev_hash = GENESIS.to_string();
    for (i, (entry, line)) in entries.iter().zip(lines).enumerate() {
        let expected = i as u64;
        if entry.seq != expected {
            return Err(classify_sequence_break(&entries, i));
        }
        if !trust.contains(&entry.keyid) {
            return Err(broken(
                i,
                BreakKind::UnknownKey,
                format!("signed by untrusted key {}", entry.keyid),
            ));
        }
        let this_hash = sha256_hex(line);
        // Whether the next line vouches for these exact bytes: then they are as first written.
        let chained = lines
            .get(i + 1)
            .is_some_and(|_| entries[i + 1].prev == this_hash);
        if !signature_verifies(entry, &entry.keyid, &entry.sig, trust) {
            return Err(if chained {
                broken(
                    i,
                    BreakKind::BadSignature,
                    "the signature does not verify over the entry",
                )
            } else {
                broken(
                    i,
                    BreakKind::Edited,
                    "the entry does not match its signature: it was changed after signing",
                )
            });
        }
        if canonical::to_vec(entry).ok().as_deref() != Some(line.as_slice()) {
            return Err(broken(
                i,
                BreakKind::Edited,
                "the line is not the canonical form of its entry",
            ));
        }
        if entry.prev != prev_hash {
            return Err(broken(
                i,
                BreakKind::Edited,
                format!("prev does not match line {}: that line was changed", i),
            ));
        }
        prev_hash = this_hash;
    }
    let last = entries.len() as u64;
    let Some(head) = head else {
        if last == 0 {
            return Ok(ChainSummary {
                entries: 0,
                head: prev_hash,
            });
        }
        return Err(ChainBreak {
            line: last + 1,
            kind: BreakKind::Truncated,
            reason: "the head file is missing: entries may have been cut off the end".into(),
        });
    };
    if !signature_verifies(head, &head.keyid, &head.sig, trust) {
        return Err(ChainBreak {
            line: last + 1,
            kind: BreakKind::BadSignature,
            reason: "the head file's signature does not verify".into(),
        });
    }
    if head.seq >= last {
        return Err(ChainBreak {
            line: last + 1,
            kind: BreakKind::Truncated,
            reason: format!(
                "the head file records entry {} but the log ends after {last} entries",
                head.seq
            ),
        });
    }
    // A crash between the append and the head update leaves the head one entry behind;
    // the entry it names must still be the one it recorded.
    let recorded = &lines[head.seq as usize];
    if !is_sha256_hex(&head.line_sha256) || sha256_hex(recorded) != head.line_sha256 {
        return Err(broken(
            head.seq as usize,
            BreakKind::Edited,
            "the line differs from the one the head file recorded",
        ));
    }
    Ok(ChainSummary {
        entries: entries.len() as u64,
        head: prev_hash,
    })
}

/// Names the break when entry `i` has the wrong sequence number. Every line before `i` is in
/// order, so a number from the past is an insertion, and a number from the future is a reordering
/// if the expected entry shows up later, else a deletion.
fn classify_sequence_break(entries: &[Entry], i: usize) -> ChainBreak {
    let expected = i as u64;
    let seq = entries[i].seq;
    if seq < expected {
        broken(
            i,
            BreakKind::Inserted,
            format!("entry numbered {seq} stands where entry {expected} belongs"),
        )
    } else if entries[i + 1..].iter().any(|e| e.seq == expected) {
        broken(
            i,
            BreakKind::Reordered,
            format!("entry {seq} stands before entry {expected}"),
        )
    } else {
        broken(
            i,
            BreakKind::Deleted,
            format!("entries {expected} to {} are missing", seq - 1),
        )
    }
}
