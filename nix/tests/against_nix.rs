//! mvm's Nix formats against the real Nix: for a table of derivations, the `.drv` bytes Nix
//! writes parse and write back identically, and our `.drv` path and output paths are Nix's;
//! nixbase32 agrees with `nix-hash`; our NAR is `nix-store --dump`'s, and our source path is
//! `nix-store --add`'s. Skipped, with the reason printed, only where Nix is not installed.

mod real_nix;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use mvm_nix::derivation::file::StoreRoot;
use mvm_nix::derivation::hashing::DrvHasher;
use mvm_nix::hash::sha256;
use mvm_nix::nar::{nar_sha256, write_nar};
use mvm_nix::store_path::compute::make_source_path;
use mvm_nix::{nixbase32, Derivation, StorePath};
use real_nix::RealNix;

/// Derivations written with the `derivation` builtin only (no nixpkgs); `@SRC@` stands for a
/// tree added with `nix-store --add`.
const CASES: &[(&str, &str)] = &[
    (
        "trivial",
        r#"derivation { name = "trivial"; system = "x86_64-linux"; builder = "/bin/sh"; }"#,
    ),
    (
        "escaping",
        r#"derivation {
          name = "escaping"; system = "x86_64-linux"; builder = "/bin/sh";
          args = [ "-c" "echo \"$quoted\" > $out" "" ];
          quoted = "a \"quote\", a \\ backslash,\na newline, a\ttab, a\rreturn, a $ sign";
          unicode = "é ☃ \u{0001}";
          "key \"quoted\"" = "x";
        }"#,
    ),
    (
        "multiple-outputs",
        r#"derivation {
          name = "multi"; system = "x86_64-linux"; builder = "/bin/sh";
          outputs = [ "out" "dev" "lib" ];
        }"#,
    ),
    (
        "fixed-flat-sha256",
        r#"derivation {
          name = "fixed-flat"; system = "x86_64-linux"; builder = "/bin/sh";
          outputHashMode = "flat"; outputHashAlgo = "sha256";
          outputHash = "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881";
        }"#,
    ),
    (
        "fixed-recursive-sha256",
        r#"derivation {
          name = "fixed-tree"; system = "x86_64-linux"; builder = "/bin/sh";
          outputHashMode = "recursive"; outputHashAlgo = "sha256";
          outputHash = "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";
        }"#,
    ),
    (
        "fixed-recursive-sha1",
        r#"derivation {
          name = "fixed-sha1"; system = "x86_64-linux"; builder = "/bin/sh";
          outputHashMode = "recursive"; outputHashAlgo = "sha1";
          outputHash = "a9993e364706816aba3e25717850c26c9cd0d89d";
        }"#,
    ),
    (
        "fixed-flat-sha512",
        r#"derivation {
          name = "fixed-sha512"; system = "x86_64-linux"; builder = "/bin/sh";
          outputHashAlgo = "sha512";
          outputHash = "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f";
        }"#,
    ),
    (
        "input-derivations",
        r#"let
          system = "x86_64-linux";
          dep = derivation { name = "dep"; inherit system; builder = "/bin/sh"; };
          multi = derivation {
            name = "multi"; inherit system; builder = "/bin/sh"; outputs = [ "out" "dev" ];
          };
          # Two fixed-output derivations that promise the same output: their modulo hashes
          # are equal, so Nix merges them in the hash of what uses both.
          fetch = builder: derivation {
            name = "fetched"; inherit system builder;
            outputHashAlgo = "sha256";
            outputHash = "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881";
          };
          middle = derivation { name = "middle"; inherit system; builder = "/bin/sh"; d = dep; };
        in derivation {
          name = "depends"; inherit system; builder = "/bin/sh";
          a = dep; b = multi.dev; c = multi.out; d = fetch "/bin/sh"; e = fetch "/bin/bash";
          f = middle;
        }"#,
    ),
    (
        "input-source",
        r#"derivation {
          name = "with-src"; system = "x86_64-linux"; builder = "/bin/sh";
          src = builtins.storePath "@SRC@";
        }"#,
    ),
];

/// What Nix printed for one case of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Recorded {
    label: String,
    drv_path: StorePath,
    outputs: BTreeSet<StorePath>,
    references: BTreeSet<StorePath>,
}

/// The recorded vectors: `cases.txt`, and `store/nix/store/` holding every `.drv` file the
/// cases need (theirs and their inputs').
fn vectors_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

/// `cases.txt`: a `case LABEL` line, then `drv`, `output` and `reference` lines, per case.
fn write_cases(cases: &[Recorded]) -> String {
    let mut text = String::new();
    for case in cases {
        text.push_str(&format!("case {}\ndrv {}\n", case.label, case.drv_path));
        for output in &case.outputs {
            text.push_str(&format!("output {output}\n"));
        }
        for reference in &case.references {
            text.push_str(&format!("reference {reference}\n"));
        }
    }
    text
}

fn read_cases(text: &str) -> Vec<Recorded> {
    let mut cases: Vec<Recorded> = Vec::new();
    for line in text.lines() {
        let (key, value) = line.split_once(' ').expect("KEY VALUE");
        let path = || StorePath::parse(value).unwrap();
        match key {
            "case" => cases.push(Recorded {
                label: value.into(),
                drv_path: StorePath::parse("/nix/store/00000000000000000000000000000000-x")
                    .unwrap(),
                outputs: BTreeSet::new(),
                references: BTreeSet::new(),
            }),
            "drv" => cases.last_mut().unwrap().drv_path = path(),
            "output" => {
                cases.last_mut().unwrap().outputs.insert(path());
            }
            "reference" => {
                cases.last_mut().unwrap().references.insert(path());
            }
            other => panic!("cases.txt: {other}"),
        }
    }
    cases
}

/// Checks our reading, writing and hashing of the `.drv` at `drv_path` (its bytes `bytes`,
/// the store holding its inputs' under `store_root`) against what Nix said.
fn check_derivation(label: &str, store_root: &Path, bytes: &[u8], nix_said: &Recorded) {
    let drv_path = &nix_said.drv_path;
    let name = drv_path.name().strip_suffix(".drv").unwrap();
    let drv = Derivation::parse(name, bytes).unwrap_or_else(|e| panic!("{label}: {e}"));

    assert_eq!(drv.to_aterm().as_bytes(), bytes, "{label}: written back");
    assert_eq!(&drv.drv_path().unwrap(), drv_path, "{label}: .drv path");

    let mut hasher = DrvHasher::new(StoreRoot::new(store_root));
    let outputs = hasher
        .verified_output_paths(&drv)
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let ours: BTreeSet<StorePath> = outputs.into_values().collect();
    assert_eq!(ours, nix_said.outputs, "{label}: output paths");

    let references: BTreeSet<StorePath> = drv
        .input_srcs
        .iter()
        .chain(drv.input_drvs.keys())
        .cloned()
        .collect();
    assert_eq!(references, nix_said.references, "{label}: references");
}

#[test]
fn derivations_match_nix() {
    let Some(nix) = RealNix::find() else { return };
    let source_dir = tempfile::tempdir().unwrap();
    let source = source_dir.path().join("source-tree");
    make_tree(&source);
    let src = nix.add(&source);

    let mut recorded = Vec::new();
    for (label, expr) in CASES {
        let drv_path = nix.instantiate(label, &expr.replace("@SRC@", &src.to_string()));
        let bytes = fs::read(nix.file(&drv_path)).unwrap();
        let nix_said = Recorded {
            label: label.to_string(),
            outputs: nix.outputs(&drv_path),
            references: nix.references(&drv_path),
            drv_path,
        };
        check_derivation(label, nix.store_root(), &bytes, &nix_said);
        recorded.push(nix_said);
    }

    // Every `.drv` in the store: the cases' and their inputs'.
    let store = nix.store_root().join("nix/store");
    let mut drvs: Vec<(String, Vec<u8>)> = fs::read_dir(&store)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".drv"))
        .map(|name| (name.clone(), fs::read(store.join(&name)).unwrap()))
        .collect();
    drvs.sort();
    let vectors = vectors_dir();
    if std::env::var_os("MVM_RECORD_NIX_VECTORS").is_some() {
        let _ = fs::remove_dir_all(&vectors);
        fs::create_dir_all(vectors.join("store/nix/store")).unwrap();
        fs::write(vectors.join("cases.txt"), write_cases(&recorded)).unwrap();
        for (name, bytes) in &drvs {
            fs::write(vectors.join("store/nix/store").join(name), bytes).unwrap();
        }
        return;
    }
    let on_record = fs::read_to_string(vectors.join("cases.txt")).unwrap();
    assert_eq!(
        read_cases(&on_record),
        recorded,
        "Nix printed other paths than the recorded vectors: MVM_RECORD_NIX_VECTORS=1 records them anew"
    );
    for (name, bytes) in &drvs {
        let kept = fs::read(vectors.join("store/nix/store").join(name))
            .unwrap_or_else(|e| panic!("{name} is not recorded: {e}"));
        assert!(kept == *bytes, "{name} differs from the recorded one");
    }
}

/// The same table from the recorded vectors: runs where Nix is absent too.
#[test]
fn derivations_match_the_recorded_vectors() {
    let vectors = vectors_dir();
    let cases = read_cases(&fs::read_to_string(vectors.join("cases.txt")).unwrap());
    assert_eq!(cases.len(), CASES.len());
    for (case, (label, _)) in cases.iter().zip(CASES) {
        assert_eq!(case.label, *label);
        let store_root = vectors.join("store");
        let bytes = fs::read(store_root.join("nix/store").join(case.drv_path.base_name())).unwrap();
        check_derivation(label, &store_root, &bytes, case);
    }
}

/// The cases exercise what their names say (a table that lost a feature would still pass).
#[test]
fn the_cases_cover_what_they_claim() {
    let Some(nix) = RealNix::find() else { return };
    let drv = |label: &str| {
        let expr = CASES.iter().find(|(l, _)| *l == label).unwrap().1;
        let path = nix.instantiate(label, expr);
        let name = path.name().strip_suffix(".drv").unwrap().to_string();
        let bytes = fs::read(nix.file(&path)).unwrap();
        (
            Derivation::parse(&name, &bytes).unwrap(),
            String::from_utf8(bytes).unwrap(),
        )
    };
    let (_, escaping) = drv("escaping");
    for escape in [r#"\""#, r"\\", r"\n", r"\t", r"\r"] {
        assert!(escaping.contains(escape), "no {escape} in {escaping}");
    }
    let (multi, _) = drv("multiple-outputs");
    assert_eq!(multi.outputs.len(), 3);
    let (depends, _) = drv("input-derivations");
    assert_eq!(depends.input_drvs.len(), 5);
    let mut hasher = DrvHasher::new(StoreRoot::new(nix.store_root()));
    let fixed: Vec<_> = depends
        .input_drvs
        .keys()
        .filter(|p| p.name() == "fetched.drv")
        .map(|p| {
            let bytes = fs::read(nix.file(p)).unwrap();
            hasher
                .modulo_hash(&Derivation::parse("fetched", &bytes).unwrap())
                .unwrap()
        })
        .collect();
    assert_eq!(fixed.len(), 2);
    assert_eq!(
        fixed[0], fixed[1],
        "the twin fixed-output inputs hash alike"
    );
}

#[test]
fn nixbase32_matches_nix_hash() {
    let Some(nix) = RealNix::find() else { return };
    let mut cases: Vec<(&str, Vec<u8>)> = ["", "x", "hello world", "mvm"]
        .iter()
        .map(|s| ("sha256", sha256(s.as_bytes()).to_vec()))
        .collect();
    cases.push(("md5", (0u8..16).collect()));
    cases.push(("sha1", (0u8..20).map(|b| b.wrapping_mul(37)).collect()));
    cases.push(("sha256", vec![0xff; 32]));
    cases.push(("sha256", vec![0; 32]));
    cases.push(("sha512", (0u8..64).map(|b| 255 - b).collect()));
    for (algo, bytes) in cases {
        let hex = hex::encode(&bytes);
        let out = nix.run("nix-hash", &["--type", algo, "--to-base32", &hex]);
        let theirs = String::from_utf8(out).unwrap();
        let ours = nixbase32::encode(&bytes);
        assert_eq!(ours, theirs.trim(), "{algo} {hex}");
        assert_eq!(nixbase32::decode(&ours).unwrap(), bytes);
        let back = nix.run("nix-hash", &["--type", algo, "--to-base16", &ours]);
        assert_eq!(String::from_utf8(back).unwrap().trim(), hex);
    }
}

#[test]
fn nar_matches_nix_store_dump() {
    let Some(nix) = RealNix::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    make_tree(&tree);
    for path in [tree.clone(), tree.join("exec"), tree.join("link-up")] {
        let mut ours = Vec::new();
        write_nar(&path, &mut ours).unwrap();
        let theirs = nix.run("nix-store", &[OsStr::new("--dump"), path.as_os_str()]);
        assert!(
            ours == theirs,
            "NAR of {} differs from nix-store --dump",
            path.display()
        );
    }
}

#[test]
fn source_path_matches_nix_store_add() {
    let Some(nix) = RealNix::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    make_tree(&tree);
    let file = dir.path().join("a-file");
    fs::write(&file, "contents\n").unwrap();
    for path in [tree, file] {
        let name = path.file_name().unwrap().to_str().unwrap();
        let ours = make_source_path(name, nar_sha256(&path).unwrap()).unwrap();
        assert_eq!(ours, nix.add(&path), "{}", path.display());
    }
}

/// A tree with every kind of node a NAR holds and the corners of its encoding: empty and
/// executable files, lengths on and off the 8-byte padding, dangling and relative symlinks,
/// empty and nested directories, names that sort differently as bytes than as text would
/// (upper case, dots, dashes, a byte that is not UTF-8).
fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("sub/deeper")).unwrap();
    fs::create_dir(root.join("empty-dir")).unwrap();
    let files: &[(&str, &[u8])] = &[
        ("empty", b""),
        ("eight", b"12345678"),
        ("nine", b"123456789"),
        ("Upper", b"sorts before lower case"),
        (".hidden", b"dot"),
        ("a-b", b"dash"),
        ("a.b", b"dot"),
        ("sub/deeper/file", b"nested\n"),
    ];
    for (name, contents) in files {
        fs::write(root.join(name), contents).unwrap();
    }
    fs::write(root.join(OsStr::from_bytes(b"not-utf8-\xff")), b"bytes").unwrap();
    let exec = root.join("exec");
    fs::write(&exec, b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(&exec, fs::Permissions::from_mode(0o755)).unwrap();
    symlink("../nowhere", root.join("link-up")).unwrap();
    symlink("/nix/store/dangling", root.join("link-abs")).unwrap();
    symlink("sub", root.join("link-dir")).unwrap();
}
