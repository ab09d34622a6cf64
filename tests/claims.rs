//! The security claim ledger (`docs/security/claims.md`) names the tests that show each claim:
//! every file, directory and test function a row names must exist, so a renamed or deleted
//! test cannot leave a claim standing on nothing.

use std::fs;
use std::path::Path;

/// The top-level folders a reference to the repository starts with.
const ROOTS: [&str; 14] = [
    "agent/",
    "api/",
    "builder/",
    "docs/",
    "fuzz/",
    "ir/",
    "nix/",
    "protocol/",
    "runner/",
    "scripts/",
    "sdk/",
    "src/",
    "tests/",
    "vmm/",
];

/// The code spans of one Markdown line.
fn code_spans(line: &str) -> impl Iterator<Item = &str> {
    line.split('`').skip(1).step_by(2)
}

/// Whether `file` defines a function `name` (a test, or a test module's helper): Rust's `fn`
/// or, for the SDKs' Python suites, `def`.
fn defines_fn(file: &str, name: &str) -> bool {
    ["fn", "def"].iter().any(|keyword| {
        file.match_indices(&format!("{keyword} {name}"))
            .any(|(at, found)| {
                let next = file[at + found.len()..].chars().next();
                matches!(next, Some('(') | Some('<'))
            })
    })
}

/// Checks one reference (`path`, `path::module::test`, or `::test` of the `last` path), and
/// returns the path it was about.
fn check(reference: &str, last: Option<&str>, row: usize, broken: &mut Vec<String>) -> String {
    let (path, name) = match reference.split_once("::") {
        Some(("", name)) => (last.unwrap_or_default().to_string(), Some(name)),
        Some((path, name)) => (path.to_string(), Some(name)),
        None => (reference.trim_end_matches('*').to_string(), None),
    };
    let on_disk = Path::new(env!("CARGO_MANIFEST_DIR")).join(&path);
    if path.is_empty() || !on_disk.exists() {
        broken.push(format!(
            "row {row}: `{reference}`: no such file or directory"
        ));
        return path;
    }
    if let Some(name) = name {
        let test = name.rsplit("::").next().unwrap_or(name);
        let source = fs::read_to_string(&on_disk).unwrap_or_default();
        if !defines_fn(&source, test) {
            broken.push(format!("row {row}: `{reference}`: {path} has no fn {test}"));
        }
    }
    path
}

#[test]
fn every_test_a_claim_names_exists() {
    let ledger = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/security/claims.md");
    let ledger = fs::read_to_string(ledger).unwrap();
    let mut broken = Vec::new();
    let mut checked = 0;
    for (row, line) in ledger
        .lines()
        .enumerate()
        .filter(|(_, l)| l.starts_with('|'))
    {
        let mut last: Option<String> = None;
        for span in code_spans(line) {
            let reference = ROOTS.iter().any(|root| span.starts_with(root))
                || (span.starts_with("::") && last.is_some());
            if reference && !span.contains(' ') {
                last = Some(check(span, last.as_deref(), row + 1, &mut broken));
                checked += 1;
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} references found: the ledger's form changed"
    );
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

#[test]
fn a_missing_test_or_file_is_found() {
    let mut broken = Vec::new();
    let path = check("tests/run.rs::no_such_test", None, 1, &mut broken);
    check(
        "::echo_hello_prints_hello_and_exits_0",
        Some(&path),
        1,
        &mut broken,
    );
    check("tests/no_such_file.rs", None, 2, &mut broken);
    check(
        "runner/src/cold.rs::tests::a_failed_save",
        None,
        3,
        &mut broken,
    );
    assert_eq!(
        broken,
        [
            "row 1: `tests/run.rs::no_such_test`: tests/run.rs has no fn no_such_test",
            "row 2: `tests/no_such_file.rs`: no such file or directory",
            "row 3: `runner/src/cold.rs::tests::a_failed_save`: runner/src/cold.rs has no fn a_failed_save",
        ]
    );
}
