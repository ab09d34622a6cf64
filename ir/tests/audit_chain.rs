//! The audit chain end to end: appends verify, concurrent appenders keep one chain, a torn
//! final line is repaired, and every kind of tampering is found with its own code at the line
//! where it happened.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Instant;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use mvm_ir::audit::{AuditLog, BreakKind, ChainSummary, Entry, GENESIS};
use mvm_ir::canonical;
use mvm_ir::digest::sha256_hex;
use mvm_ir::keys::{Signer, TrustStore};
use mvm_ir::Error;
use proptest::prelude::*;
use serde_json::{json, Map, Value};

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// The fields of the `i`th test entry: a mix of types, nesting, numbers that canonical JSON
/// rewrites, and keys whose UTF-16 order differs from their UTF-8 order.
fn fields(i: u64) -> Map<String, Value> {
    let value = json!({
        "i": i,
        "plan": format!("sha256:{}", sha256_hex(&i.to_be_bytes())),
        "ok": i.is_multiple_of(2),
        "ratio": 2.5,
        "big": 1e21,
        "nested": {"list": [1, "two", null, {"z": 0.1}], "empty": {}},
        "\u{ff61}": "halfwidth ideographic full stop",
        "\u{1f600}": "grinning face",
        "quote\"and\\slash": "line\nbreak\ttab",
    });
    match value {
        Value::Object(map) => map,
        _ => unreachable!(),
    }
}

fn trust_of(signers: &[&Signer]) -> TrustStore {
    let mut trust = TrustStore::default();
    for signer in signers {
        trust.insert(signer.verifying_key());
    }
    trust
}

/// A log in a fresh directory, its signer and a trust store holding the signer's key.
struct Chain {
    dir: tempfile::TempDir,
    log: AuditLog,
    signer: Signer,
    trust: TrustStore,
}

impl Chain {
    fn new() -> Self {
        Self::in_dir(tempfile::tempdir().unwrap())
    }

    fn in_dir(dir: tempfile::TempDir) -> Self {
        let signer = Signer::generate().unwrap();
        let trust = trust_of(&[&signer]);
        Self {
            log: AuditLog::at(dir.path()),
            dir,
            signer,
            trust,
        }
    }

    fn append(&self, i: u64) -> Entry {
        self.log
            .append(&format!("test.event{i}"), fields(i), &self.signer)
            .unwrap()
    }

    fn with_entries(n: u64) -> Self {
        let chain = Self::new();
        for i in 0..n {
            assert_eq!(chain.append(i).seq, i);
        }
        chain
    }

    fn verify(&self) -> Result<ChainSummary, Error> {
        self.log.verify(&self.trust)
    }

    fn lines(&self) -> Vec<String> {
        read_lines(self.log.path())
    }

    fn head_path(&self) -> std::path::PathBuf {
        self.dir.path().join("head.json")
    }
}

fn read_lines(path: &Path) -> Vec<String> {
    let text = fs::read_to_string(path).unwrap();
    assert!(text.is_empty() || text.ends_with('\n'));
    text.lines().map(str::to_string).collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = String::new();
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    fs::write(path, text).unwrap();
}

/// The code and line of a chain break.
fn chain_break(result: Result<ChainSummary, Error>) -> (&'static str, u64) {
    match result {
        Ok(summary) => panic!("expected a chain break, the chain verified: {summary:?}"),
        Err(Error::AuditChain(b)) => {
            assert!(!b.reason.is_empty());
            (b.kind.code(), b.line)
        }
        Err(e) => panic!("expected a chain break, got {} ({e})", e.code()),
    }
}

/// Re-serializes a line after editing its JSON, keeping it canonical.
fn edit_line(line: &str, edit: impl FnOnce(&mut Map<String, Value>)) -> String {
    let mut value: Value = serde_json::from_str(line).unwrap();
    edit(value.as_object_mut().unwrap());
    String::from_utf8(canonical::value_to_vec(&value).unwrap()).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Intact chains
// ---------------------------------------------------------------------------------------------

#[test]
fn an_empty_log_verifies_and_the_first_entry_starts_at_genesis() {
    let chain = Chain::new();
    let summary = chain.verify().unwrap();
    assert_eq!(summary.entries, 0);
    assert_eq!(summary.head, GENESIS);
    assert!(chain.log.tail(5).unwrap().is_empty());

    let first = chain.append(0);
    assert_eq!(first.seq, 0);
    assert_eq!(first.prev, GENESIS);
    assert_eq!(first.keyid, chain.signer.keyid());
    assert_eq!(first.event, "test.event0");
    assert_eq!(first.fields, fields(0));
    assert_eq!(STANDARD.decode(&first.sig).unwrap().len(), 64);
}

#[test]
fn appended_entries_chain_and_the_head_file_names_the_last_line() {
    let chain = Chain::new();
    for i in 0..10 {
        let before = chain.verify().unwrap();
        let entry = chain.append(i);
        assert_eq!(entry.seq, i);
        // Each entry names the hash of the line before it: the head the last verify reported.
        assert_eq!(entry.prev, before.head);
        let after = chain.verify().unwrap();
        assert_eq!(after.entries, i + 1);
        let lines = chain.lines();
        assert_eq!(after.head, sha256_hex(lines.last().unwrap().as_bytes()));
        // Each line is the canonical JSON of the entry that append returned.
        assert_eq!(
            lines.last().unwrap().as_bytes(),
            canonical::to_vec(&entry).unwrap()
        );
        let head: Value = serde_json::from_slice(&fs::read(chain.head_path()).unwrap()).unwrap();
        assert_eq!(head["seq"], json!(i));
        assert_eq!(head["line_sha256"], json!(after.head));
        assert_eq!(head["keyid"], json!(chain.signer.keyid()));
    }
}

#[test]
fn tail_returns_the_last_entries_in_order() {
    let chain = Chain::new();
    let appended: Vec<Entry> = (0..12).map(|i| chain.append(i)).collect();
    assert_eq!(chain.log.tail(3).unwrap(), appended[9..].to_vec());
    assert_eq!(chain.log.tail(1).unwrap(), appended[11..].to_vec());
    assert_eq!(chain.log.tail(12).unwrap(), appended);
    assert_eq!(chain.log.tail(1000).unwrap(), appended);
    assert!(chain.log.tail(0).unwrap().is_empty());
    let seqs: Vec<u64> = chain.log.tail(5).unwrap().iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![7, 8, 9, 10, 11]);
}

/// A directory on tmpfs when there is one: 10 000 appends are 10 000 fsyncs of the log and
/// 10 000 atomic rewrites of the head file.
fn fast_tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::Builder::new()
            .prefix("mvm-audit-")
            .tempdir_in(shm)
        {
            return dir;
        }
    }
    tempfile::tempdir().unwrap()
}

#[test]
fn an_intact_chain_of_ten_thousand_entries_verifies() {
    const N: u64 = 10_000;
    let chain = Chain::in_dir(fast_tempdir());
    let started = Instant::now();
    for i in 0..N {
        let mut small = Map::new();
        small.insert("i".into(), json!(i));
        chain.log.append("bulk", small, &chain.signer).unwrap();
    }
    let appended = started.elapsed();
    let started = Instant::now();
    let summary = chain.verify().unwrap();
    let verified = started.elapsed();
    eprintln!(
        "audit chain of {N} entries in {}: appended in {appended:.2?}, verified in {verified:.2?}",
        chain.dir.path().display()
    );
    assert_eq!(summary.entries, N);
    let lines = chain.lines();
    assert_eq!(lines.len() as u64, N);
    assert_eq!(summary.head, sha256_hex(lines.last().unwrap().as_bytes()));
    let tail = chain.log.tail(2).unwrap();
    assert_eq!((tail[0].seq, tail[1].seq), (N - 2, N - 1));
}

#[test]
fn concurrent_appenders_build_one_chain() {
    const THREADS: usize = 8;
    const EACH: u64 = 50;
    let dir = tempfile::tempdir().unwrap();
    let signers: Vec<Arc<Signer>> = (0..THREADS)
        .map(|_| Arc::new(Signer::generate().unwrap()))
        .collect();
    let trust = trust_of(&signers.iter().map(|s| s.as_ref()).collect::<Vec<_>>());
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = signers
        .iter()
        .enumerate()
        .map(|(t, signer)| {
            let (signer, barrier, path) =
                (signer.clone(), barrier.clone(), dir.path().to_path_buf());
            thread::spawn(move || {
                // Every thread has its own handle: they contend through the lock file.
                let log = AuditLog::at(&path);
                barrier.wait();
                (0..EACH)
                    .map(|i| {
                        let mut f = Map::new();
                        f.insert("thread".into(), json!(t));
                        f.insert("i".into(), json!(i));
                        log.append("concurrent", f, &signer).unwrap().seq
                    })
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    let mut seqs: Vec<u64> = Vec::new();
    for handle in handles {
        let mine = handle.join().unwrap();
        // A thread's own appends come back in increasing order.
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "{mine:?}");
        seqs.extend(mine);
    }
    seqs.sort_unstable();
    let total = THREADS as u64 * EACH;
    assert_eq!(
        seqs,
        (0..total).collect::<Vec<_>>(),
        "every seq handed out exactly once"
    );

    let log = AuditLog::at(dir.path());
    let summary = log.verify(&trust).unwrap();
    assert_eq!(summary.entries, total);
    let entries = log.tail(total as usize + 10).unwrap();
    assert_eq!(
        entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (0..total).collect::<Vec<_>>()
    );
    for (t, signer) in signers.iter().enumerate() {
        let mine: Vec<u64> = entries
            .iter()
            .filter(|e| e.fields["thread"] == json!(t))
            .inspect(|e| assert_eq!(e.keyid, signer.keyid()))
            .map(|e| e.fields["i"].as_u64().unwrap())
            .collect();
        assert_eq!(mine, (0..EACH).collect::<Vec<_>>(), "thread {t}");
    }
}

#[test]
fn a_torn_final_line_is_cut_off_by_the_next_append() {
    let chain = Chain::with_entries(3);
    let intact = fs::read(chain.log.path()).unwrap();
    // A crash in the middle of writing entry 3: part of a line, no newline.
    let partial = chain.lines()[1].as_bytes()[..40].to_vec();
    OpenOptions::new()
        .append(true)
        .open(chain.log.path())
        .unwrap()
        .write_all(&partial)
        .unwrap();
    // Until it is repaired, verification reports the torn line.
    assert_eq!(chain_break(chain.verify()), ("AUDIT001", 4));

    let entry = chain.append(3);
    assert_eq!(entry.seq, 3);
    assert_eq!(entry.prev, sha256_hex(chain.lines()[2].as_bytes()));
    let bytes = fs::read(chain.log.path()).unwrap();
    assert!(bytes.starts_with(&intact), "the complete lines were kept");
    assert_eq!(chain.verify().unwrap().entries, 4);
    assert_eq!(chain.lines().len(), 4);
}

#[test]
fn a_log_that_is_only_a_torn_line_restarts_at_genesis() {
    let chain = Chain::new();
    fs::write(chain.log.path(), b"{\"event\":\"test.ev").unwrap();
    let entry = chain.append(0);
    assert_eq!((entry.seq, entry.prev.as_str()), (0, GENESIS));
    assert_eq!(chain.verify().unwrap().entries, 1);
}

#[test]
fn a_head_file_one_entry_behind_is_accepted() {
    // A crash between writing the line and updating the head leaves the head one behind.
    let chain = Chain::with_entries(5);
    let old_head = fs::read(chain.head_path()).unwrap();
    chain.append(5);
    fs::write(chain.head_path(), &old_head).unwrap();
    assert_eq!(chain.verify().unwrap().entries, 6);
    // The next append brings it up to date.
    chain.append(6);
    let head: Value = serde_json::from_slice(&fs::read(chain.head_path()).unwrap()).unwrap();
    assert_eq!(head["seq"], json!(6));
}

// ---------------------------------------------------------------------------------------------
// Tampering
// ---------------------------------------------------------------------------------------------

/// A head file for `seq` and `line_sha256`, signed by `signer` as `AuditLog::append` signs it.
fn signed_head(signer: &Signer, seq: u64, line_sha256: &str) -> Vec<u8> {
    let unsigned = json!({"seq": seq, "line_sha256": line_sha256, "keyid": signer.keyid()});
    let sig = signer.sign(&canonical::to_vec(&unsigned).unwrap());
    let mut head = unsigned;
    head["sig"] = json!(STANDARD.encode(sig));
    serde_json::to_vec(&head).unwrap()
}

type Tamper = Box<dyn Fn(&mut Vec<String>, &mut Vec<u8>, &Signer)>;

/// Each tampering of a 10-entry chain (lines 1..=10, seq 0..=9) with the code and 1-based line
/// that verification must report.
fn tampering() -> Vec<(&'static str, Tamper, (&'static str, u64))> {
    vec![
        (
            "a field value edited in a middle line",
            Box::new(|l, _, _| l[4] = edit_line(&l[4], |m| m["fields"]["i"] = json!(99))),
            ("AUDIT002", 5),
        ),
        (
            "the event of the first line edited",
            Box::new(|l, _, _| l[0] = edit_line(&l[0], |m| m["event"] = json!("test.nothing"))),
            ("AUDIT002", 1),
        ),
        (
            "the time of the last line edited",
            Box::new(|l, _, _| {
                l[9] = edit_line(&l[9], |m| m["time"] = json!("2000-01-01T00:00:00Z"))
            }),
            ("AUDIT002", 10),
        ),
        (
            "a middle line's prev pointed elsewhere",
            Box::new(|l, _, _| {
                let other = sha256_hex(l[2].as_bytes());
                l[4] = edit_line(&l[4], |m| m["prev"] = json!(other));
            }),
            ("AUDIT002", 5),
        ),
        (
            "a middle line re-serialized non-canonically (same entry, different bytes)",
            Box::new(|l, _, _| l[4] = l[4].replacen('{', "{ ", 1)),
            ("AUDIT002", 5),
        ),
        (
            "a middle line's keyid swapped for another trusted-looking id",
            Box::new(|l, _, _| l[4] = edit_line(&l[4], |m| m["keyid"] = json!(sha256_hex(b"x")))),
            ("AUDIT004", 5),
        ),
        (
            "a middle line deleted",
            Box::new(|l, _, _| drop(l.remove(4))),
            ("AUDIT005", 5),
        ),
        (
            "the first line deleted",
            Box::new(|l, _, _| drop(l.remove(0))),
            ("AUDIT005", 1),
        ),
        (
            "a range of middle lines cut out",
            Box::new(|l, _, _| drop(l.drain(3..7))),
            ("AUDIT005", 4),
        ),
        (
            "a duplicate of an earlier line inserted in the middle",
            Box::new(|l, _, _| {
                let copy = l[1].clone();
                l.insert(5, copy);
            }),
            ("AUDIT006", 6),
        ),
        (
            "the last line duplicated at the end",
            Box::new(|l, _, _| {
                let copy = l[9].clone();
                l.push(copy);
            }),
            ("AUDIT006", 11),
        ),
        (
            "two adjacent middle lines swapped",
            Box::new(|l, _, _| l.swap(4, 5)),
            ("AUDIT007", 5),
        ),
        (
            "two distant lines swapped",
            Box::new(|l, _, _| l.swap(2, 7)),
            ("AUDIT007", 3),
        ),
        (
            "the last line moved to the front",
            Box::new(|l, _, _| {
                let last = l.pop().unwrap();
                l.insert(0, last);
            }),
            ("AUDIT007", 1),
        ),
        (
            "the last two lines cut off",
            Box::new(|l, _, _| l.truncate(8)),
            ("AUDIT008", 9),
        ),
        (
            "every line cut off",
            Box::new(|l, _, _| l.clear()),
            ("AUDIT008", 1),
        ),
        (
            "a garbage line in the middle",
            Box::new(|l, _, _| l[4] = "garbage \u{1} not json".into()),
            ("AUDIT001", 5),
        ),
        (
            "a blank line inserted",
            Box::new(|l, _, _| l.insert(5, String::new())),
            ("AUDIT001", 6),
        ),
        (
            "a middle line cut in half",
            Box::new(|l, _, _| {
                let half = l[4].len() / 2;
                l[4].truncate(half);
            }),
            ("AUDIT001", 5),
        ),
        (
            "an unknown member added to a middle line",
            Box::new(|l, _, _| {
                l[4] = edit_line(&l[4], |m| drop(m.insert("admin".into(), json!(true))))
            }),
            ("AUDIT001", 5),
        ),
        (
            "a middle line replaced by a JSON array",
            Box::new(|l, _, _| l[4] = "[]".into()),
            ("AUDIT001", 5),
        ),
        (
            "the head file rewritten without the key to name a different last line",
            Box::new(|_, head, _| {
                let mut h: Value = serde_json::from_slice(head).unwrap();
                h["line_sha256"] = json!(sha256_hex(b"other"));
                *head = serde_json::to_vec(&h).unwrap();
            }),
            ("AUDIT003", 11),
        ),
        (
            "the last two lines cut off and the head rewritten without the key to match",
            Box::new(|l, head, _| {
                l.truncate(8);
                let mut h: Value = serde_json::from_slice(head).unwrap();
                h["seq"] = json!(7);
                h["line_sha256"] = json!(sha256_hex(l[7].as_bytes()));
                *head = serde_json::to_vec(&h).unwrap();
            }),
            ("AUDIT003", 9),
        ),
        (
            "the last two lines cut off and the head file deleted",
            Box::new(|l, head, _| {
                l.truncate(8);
                head.clear();
            }),
            ("AUDIT008", 9),
        ),
        (
            "a head signed by a trusted key naming the last line with the wrong hash",
            Box::new(|_, head, signer| *head = signed_head(signer, 9, &sha256_hex(b"other"))),
            ("AUDIT002", 10),
        ),
        (
            "a head signed by a trusted key naming an earlier entry with the wrong hash",
            Box::new(|l, head, signer| {
                *head = signed_head(signer, 6, &sha256_hex(l[3].as_bytes()));
            }),
            ("AUDIT002", 7),
        ),
        (
            "the head file is garbage",
            Box::new(|_, head, _| *head = b"not json".to_vec()),
            ("AUDIT001", 0),
        ),
    ]
}

#[test]
fn every_tampering_is_found_with_its_kind_and_line() {
    let original = Chain::with_entries(10);
    original.verify().unwrap();
    let lines = original.lines();
    let head = fs::read(original.head_path()).unwrap();
    let mut failures = Vec::new();
    let table = tampering();
    for (name, tamper, expected) in &table {
        let mut l = lines.clone();
        let mut h = head.clone();
        tamper(&mut l, &mut h, &original.signer);
        assert!(
            l != lines || h != head,
            "{name}: the tampering changed nothing"
        );
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::at(dir.path());
        write_lines(log.path(), &l);
        if !h.is_empty() {
            fs::write(dir.path().join("head.json"), &h).unwrap();
        }
        match log.verify(&original.trust) {
            Err(Error::AuditChain(b)) if (b.kind.code(), b.line) == *expected => {}
            Err(Error::AuditChain(b)) => failures.push(format!(
                "{name}: expected {expected:?}, got ({:?}, {}) {:?}: {}",
                b.kind.code(),
                b.line,
                b.kind,
                b.reason
            )),
            Err(e) => failures.push(format!(
                "{name}: expected {expected:?}, got {} ({e})",
                e.code()
            )),
            Ok(s) => failures.push(format!("{name}: expected {expected:?}, verified {s:?}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        table.len(),
        failures.join("\n")
    );
}

#[test]
fn each_break_kind_has_its_stable_code() {
    let kinds = [
        (BreakKind::Malformed, "AUDIT001"),
        (BreakKind::Edited, "AUDIT002"),
        (BreakKind::BadSignature, "AUDIT003"),
        (BreakKind::UnknownKey, "AUDIT004"),
        (BreakKind::Deleted, "AUDIT005"),
        (BreakKind::Inserted, "AUDIT006"),
        (BreakKind::Reordered, "AUDIT007"),
        (BreakKind::Truncated, "AUDIT008"),
    ];
    for (kind, code) in kinds {
        assert_eq!(kind.code(), code);
    }
}

#[test]
fn a_forged_signature_on_a_chained_line_is_a_bad_signature() {
    let chain = Chain::with_entries(5);
    // Replace the signature of the last line (seq 4) with a well-formed signature, by the same
    // trusted key, over other bytes; then let later appends chain onto these exact bytes.
    let mut lines = chain.lines();
    let forged = STANDARD.encode(chain.signer.sign(b"some other message"));
    lines[4] = edit_line(&lines[4], |m| m["sig"] = json!(forged));
    write_lines(chain.log.path(), &lines);
    for i in 5..10 {
        chain.append(i);
    }
    let lines = chain.lines();
    let next: Entry = serde_json::from_str(&lines[5]).unwrap();
    assert_eq!(
        next.prev,
        sha256_hex(lines[4].as_bytes()),
        "the forged line is chained"
    );
    assert_eq!(chain_break(chain.verify()), ("AUDIT003", 5));
}

#[test]
fn a_forged_signature_on_an_unchained_line_is_an_edit() {
    // The same forgery in the middle, without re-chaining: the next line vouches for other bytes.
    let chain = Chain::with_entries(10);
    let mut lines = chain.lines();
    let forged = STANDARD.encode(chain.signer.sign(b"some other message"));
    lines[4] = edit_line(&lines[4], |m| m["sig"] = json!(forged));
    write_lines(chain.log.path(), &lines);
    assert_eq!(chain_break(chain.verify()), ("AUDIT002", 5));
}

#[test]
fn a_log_signed_by_an_untrusted_key_is_refused() {
    let chain = Chain::with_entries(4);
    // Nobody trusted.
    assert_eq!(
        chain_break(chain.log.verify(&TrustStore::default())),
        ("AUDIT004", 1)
    );
    // Another host's key only.
    let stranger = Signer::generate().unwrap();
    assert_eq!(
        chain_break(chain.log.verify(&trust_of(&[&stranger]))),
        ("AUDIT004", 1)
    );

    // Entries appended by an untrusted key after trusted ones: found at the first of them.
    for i in 4..7 {
        chain.log.append("stranger", fields(i), &stranger).unwrap();
    }
    assert_eq!(chain_break(chain.verify()), ("AUDIT004", 5));
    // Trusting the stranger too makes the mixed chain whole.
    assert_eq!(
        chain
            .log
            .verify(&trust_of(&[&chain.signer, &stranger]))
            .unwrap()
            .entries,
        7
    );
}

#[test]
fn an_entry_re_signed_by_a_trusted_key_but_not_rechained_is_found() {
    // An insider with a trusted key rewrites entry 4 and signs it properly: the entry verifies on
    // its own, but the next line's prev names the original bytes.
    let chain = Chain::with_entries(10);
    let mut lines = chain.lines();
    let mut forged: Entry = serde_json::from_str(&lines[4]).unwrap();
    forged.event = "test.rewritten".into();
    let mut unsigned = serde_json::to_value(&forged).unwrap();
    unsigned.as_object_mut().unwrap().remove("sig");
    forged.sig = STANDARD.encode(
        chain
            .signer
            .sign(&canonical::value_to_vec(&unsigned).unwrap()),
    );
    lines[4] = String::from_utf8(canonical::to_vec(&forged).unwrap()).unwrap();
    write_lines(chain.log.path(), &lines);
    // The rewritten line alone is well signed: only the chain catches it, at the line after.
    assert_eq!(chain_break(chain.verify()), ("AUDIT002", 6));
}

#[test]
fn append_refuses_to_chain_onto_a_garbage_last_line() {
    let chain = Chain::with_entries(3);
    let mut lines = chain.lines();
    lines.push("garbage".into());
    write_lines(chain.log.path(), &lines);
    let err = chain
        .log
        .append("next", fields(3), &chain.signer)
        .unwrap_err();
    assert_eq!(err.code(), "AUDIT001", "{err}");
    // Nothing was appended after the garbage.
    assert_eq!(chain.lines(), lines);
    assert_eq!(chain_break(chain.verify()), ("AUDIT001", 4));
}

#[test]
fn a_refused_append_leaves_the_chain_intact() {
    let chain = Chain::with_entries(3);
    let before = fs::read(chain.log.path()).unwrap();
    let head_before = fs::read(chain.head_path()).unwrap();

    let mut huge = Map::new();
    huge.insert(
        "blob".into(),
        json!("x".repeat(mvm_ir::audit::MAX_LINE_BYTES)),
    );
    let err = chain
        .log
        .append("too.big", huge, &chain.signer)
        .unwrap_err();
    assert_eq!(err.code(), "INPUT001", "{err}");

    let mut inexact = Map::new();
    inexact.insert("n".into(), json!(u64::MAX));
    let err = chain
        .log
        .append("inexact", inexact, &chain.signer)
        .unwrap_err();
    assert_eq!(err.code(), "INPUT004", "{err}");

    assert_eq!(fs::read(chain.log.path()).unwrap(), before);
    assert_eq!(fs::read(chain.head_path()).unwrap(), head_before);
    assert_eq!(chain.verify().unwrap().entries, 3);
    assert_eq!(chain.append(3).seq, 3);
    assert_eq!(chain.verify().unwrap().entries, 4);
}

proptest! {
    // Each case signs and verifies once; ed25519 is slow in an unoptimized build.
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever numbers and strings an entry carries, the line written verifies: canonical JSON
    /// read back and written again gives the same bytes.
    #[test]
    fn any_fields_round_trip_through_the_chain(
        float in any::<f64>().prop_filter("finite", |f| f.is_finite()),
        int in -(1i64 << 53)..=(1i64 << 53),
        text in "\\PC{0,40}",
        key in "\\PC{1,12}",
    ) {
        let chain = Chain::new();
        let mut f = Map::new();
        f.insert("float".into(), json!(float));
        f.insert("int".into(), json!(int));
        f.insert("text".into(), json!(text));
        f.insert(key, json!([float, int]));
        let entry = chain.log.append("random", f, &chain.signer).unwrap();
        let summary = chain.log.verify(&chain.trust);
        prop_assert!(summary.is_ok(), "{:?} for {:?}", summary, entry.fields);
        // What is read back is the canonical form of what was appended (0.0 reads back as 0).
        let back = chain.log.tail(1).unwrap();
        prop_assert_eq!(back.len(), 1);
        prop_assert_eq!(canonical::to_vec(&back[0]).unwrap(), canonical::to_vec(&entry).unwrap());
    }
}
