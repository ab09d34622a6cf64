//! The error codes in the sources and in the docs are the same set: every code a crate can
//! return is documented, and every documented code is still returned by something.
//!
//! A code in the sources is a string literal that is nothing but a code (`"RUN039"`,
//! `"NIXBUILD004"`): the runner's codes are constants in `runner/src/codes.rs`, the other
//! crates' are literals in their errors' `code()`. A code in the docs is the first cell of a
//! table row in `docs/errors.md`, or in a page it leaves a family of codes to (`ir.md`,
//! `audit.md`, `build.md`); a row may give a range (`AUDIT001–008`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The folders whose `.rs` files define codes: every crate's sources.
const SOURCES: &[&str] = &[
    "src",
    "ir/src",
    "builder/src",
    "nix/src",
    "runner/src",
    "vmm/src",
    "agent/src",
    "protocol/src",
    "api/src",
    "mcp/src",
];

/// `docs/errors.md` and the pages it leaves families of codes to.
const DOCS: &[&str] = &["errors.md", "ir.md", "audit.md", "build.md", "mcp.md"];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Whether `text` is a code: capitals, then exactly three digits.
fn rust_files(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, files);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
}

/// The string literals of `text` that are codes (`"RUN039"`), each with its line.
fn literal_codes(text: &str) -> Vec<(String, usize)> {
    let mut found = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let mut rest = line;
        while let Some(start) = rest.find('"') {
            let after = &rest[start + 1..];
            let end = after
                .find(|c: char| !c.is_ascii_alphanumeric())
                .unwrap_or(after.len());
            if after[end..].starts_with('"') && mvm_ir::is_code(&after[..end]) {
                found.push((after[..end].to_string(), index + 1));
            }
            rest = after;
        }
    }
    found
}

/// Every code the sources define, with where it first appears.
fn source_codes() -> BTreeMap<String, String> {
    let mut files = Vec::new();
    for folder in SOURCES {
        let dir = root().join(folder);
        assert!(dir.is_dir(), "{folder} moved: update SOURCES");
        rust_files(&dir, &mut files);
    }
    files.sort();
    let mut codes = BTreeMap::new();
    for file in files {
        let text = fs::read_to_string(&file).unwrap();
        for (code, line) in literal_codes(&text) {
            let place = format!("{}:{line}", file.strip_prefix(root()).unwrap().display());
            codes.entry(code).or_insert(place);
        }
    }
    codes
}

/// The codes of a table row's first cell: one code, or a range (`AUDIT001–008`,
/// `LAYER001-LAYER010`).
fn cell_codes(cell: &str) -> Vec<String> {
    let cell = cell.trim().trim_matches('`');
    if mvm_ir::is_code(cell) {
        return vec![cell.to_string()];
    }
    let Some((first, last)) = cell.split_once(['–', '-']) else {
        return Vec::new();
    };
    if !mvm_ir::is_code(first) {
        return Vec::new();
    }
    let prefix = first.trim_end_matches(|c: char| c.is_ascii_digit());
    let last = last.trim_start_matches(prefix);
    let (Ok(from), Ok(to)) = (first[prefix.len()..].parse::<u32>(), last.parse::<u32>()) else {
        return Vec::new();
    };
    assert!(
        last.len() == 3 && from < to,
        "a malformed range of codes: {cell}"
    );
    (from..=to).map(|n| format!("{prefix}{n:03}")).collect()
}

/// Every code the docs list, with the page that lists it.
fn documented_codes() -> BTreeMap<String, String> {
    let errors = fs::read_to_string(root().join("docs/errors.md")).unwrap();
    for page in &DOCS[1..] {
        assert!(
            errors.contains(&format!("]({page}")),
            "docs/errors.md no longer leaves codes to {page}: update DOCS"
        );
    }
    let mut codes = BTreeMap::new();
    for page in DOCS {
        let text = fs::read_to_string(root().join("docs").join(page)).unwrap();
        for line in text.lines() {
            let Some(row) = line.trim().strip_prefix('|') else {
                continue;
            };
            let first = row.split('|').next().unwrap_or_default();
            for code in cell_codes(first) {
                codes.entry(code).or_insert_with(|| format!("docs/{page}"));
            }
        }
    }
    codes
}

#[test]
fn codes_are_recognised_in_sources_and_tables() {
    assert_eq!(
        literal_codes(r#"match e { A => "RUN039", B => "OCI002" } "not RUN040" "ab123" "X12""#),
        vec![("RUN039".to_string(), 1), ("OCI002".to_string(), 1)]
    );
    assert_eq!(cell_codes(" NIXBUILD004 "), ["NIXBUILD004"]);
    assert_eq!(cell_codes("`KERNEL005`"), ["KERNEL005"]);
    assert_eq!(
        cell_codes("AUDIT001–003"),
        ["AUDIT001", "AUDIT002", "AUDIT003"]
    );
    assert_eq!(cell_codes("RUN043-RUN044"), ["RUN043", "RUN044"]);
    assert!(cell_codes("code").is_empty());
    assert!(cell_codes("---").is_empty());
    assert!(cell_codes("INTERNAL").is_empty());
}

#[test]
fn every_code_in_the_sources_is_documented_and_every_documented_code_exists() {
    let sources = source_codes();
    let docs = documented_codes();
    // Sanity: both sides found the families they should.
    for code in [
        "RUN001", "RUN047", "PLAN001", "OCI002", "AGENT101", "VMM010", "NIX001",
    ] {
        assert!(
            sources.contains_key(code),
            "{code} not found in the sources"
        );
        assert!(docs.contains_key(code), "{code} not found in the docs");
    }
    let undocumented: Vec<String> = sources
        .iter()
        .filter(|(code, _)| !docs.contains_key(*code))
        .map(|(code, place)| format!("{code} ({place})"))
        .collect();
    let unused: Vec<String> = docs
        .iter()
        .filter(|(code, _)| !sources.contains_key(*code))
        .map(|(code, page)| format!("{code} ({page})"))
        .collect();
    assert!(
        undocumented.is_empty() && unused.is_empty(),
        "codes in the sources but in no docs table: {undocumented:#?}\n\
         codes in the docs that no source defines: {unused:#?}"
    );
    let families: BTreeSet<&str> = sources
        .keys()
        .map(|code| code.trim_end_matches(|c: char| c.is_ascii_digit()))
        .collect();
    assert!(families.len() > 10, "{families:?}");
}
