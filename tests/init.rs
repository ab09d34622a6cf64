//! `mvm init`: every template scaffolds the files of `templates/NAME` byte for byte, its
//! declaration validates, and a second init over it is refused without touching anything.
//! The nix template's declaration is Nix: it is evaluated with the real Nix where installed
//! (everywhere in CI), and the rest of the test runs without it.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// Every file under `dir`, by path relative to it, with its bytes.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string();
                out.insert(rel, fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn templates(home: &Path) -> Vec<Value> {
    let listed = support::mvm_json(home, &["init", "--list"], 0);
    listed["templates"].as_array().unwrap().clone()
}

/// `mvm ir validate` of the declaration `mvm init` wrote into `dir`: mvm.toml, or the nix
/// template's workload.nix (`None` where Nix is not installed).
fn validate_scaffold(home: &Path, dir: &Path) -> Option<Value> {
    let toml = dir.join("mvm.toml");
    if toml.exists() {
        return Some(support::mvm_json(
            home,
            &["ir", "validate", toml.to_str().unwrap()],
            0,
        ));
    }
    // The nix template: `mvm ir validate` evaluates workload.nix with the real Nix.
    if Command::new("nix-instantiate")
        .arg("--version")
        .output()
        .is_err()
    {
        let reason = "nix-instantiate is not installed: the nix template's workload.nix \
                      cannot be evaluated (install nix-bin: scripts/deps --test)";
        assert!(std::env::var_os("CI").is_none(), "{reason}");
        eprintln!("skipping the nix template's evaluation: {reason}");
        return None;
    }
    let file = dir.join("workload.nix");
    let valid = support::mvm_json(home, &["ir", "validate", file.to_str().unwrap()], 0);
    Some(valid)
}

#[test]
fn every_template_scaffolds_its_files_validates_and_is_never_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("state");
    let listed = templates(&home);
    let dirs: Vec<String> = tree(&Path::new(REPO).join("templates"))
        .keys()
        .map(|k| k.split('/').next().unwrap().to_string())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let names: Vec<&str> = listed.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, dirs, "one template per directory of templates/");
    assert!(names.len() >= 4);

    for t in &listed {
        let name = t["name"].as_str().unwrap();
        let dir = tmp.path().join(name);
        let dir_arg = dir.to_str().unwrap();
        let done = support::mvm_json(&home, &["init", dir_arg, "--template", name], 0);
        assert_eq!(done["template"], name);

        // Exactly the template's files, byte for byte: one source of truth.
        let source = tree(&Path::new(REPO).join("templates").join(name));
        let written = tree(&dir);
        assert_eq!(
            written.keys().collect::<Vec<_>>(),
            source.keys().collect::<Vec<_>>(),
            "{name}"
        );
        assert!(
            written == source,
            "{name}: files differ from templates/{name}"
        );
        assert!(
            written.contains_key(".github/workflows/mvm.yml") && written.contains_key("README.md"),
            "{name}: a template has a README and a CI workflow"
        );
        let workflow = String::from_utf8(written[".github/workflows/mvm.yml"].clone()).unwrap();
        for needed in [
            "secrets.MVM_SIGNING_KEY",
            "plan.dsse.json",
            "provenance.dsse.json",
        ] {
            assert!(
                workflow.contains(needed),
                "{name}: the workflow lacks {needed}"
            );
        }

        if let Some(valid) = validate_scaffold(&home, &dir) {
            assert_eq!(valid["ok"], true);
            assert_eq!(valid["id"], t["id"], "{name}");
        }

        // A second init is refused (74, INIT002) and leaves every file as it was.
        let again = support::mvm_json(&home, &["init", dir_arg, "--template", name], 74);
        assert_eq!(again["error"]["code"], "INIT002");
        assert!(tree(&dir) == source, "{name}: a refused init changed files");
    }
}

#[test]
fn name_sets_the_workload_id_in_every_file() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("state");
    for (template, old) in [("python", "python-tool"), ("nix", "nix-workload")] {
        let dir = tmp.path().join(template);
        let dir_arg = dir.to_str().unwrap();
        let done = support::mvm_json(
            &home,
            &["init", dir_arg, "-t", template, "--name", "my-tool"],
            0,
        );
        assert_eq!(done["id"], "my-tool");
        for (path, bytes) in tree(&dir) {
            let text = String::from_utf8(bytes).unwrap();
            assert!(!text.contains(old), "{template}/{path} still says {old}");
        }
        if let Some(valid) = validate_scaffold(&home, &dir) {
            assert_eq!(valid["id"], "my-tool", "{template}");
        }
    }
}

#[test]
fn one_existing_file_means_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("state");
    let dir = tmp.path().join("app");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("README.md"), "mine\n").unwrap();
    // A dangling symlink counts as there: nothing is written through it.
    std::os::unix::fs::symlink(tmp.path().join("elsewhere"), dir.join("flake.nix")).unwrap();

    let refused = support::mvm_json(&home, &["init", dir.to_str().unwrap()], 74);
    assert_eq!(refused["error"]["code"], "INIT002");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("README.md") && message.contains("flake.nix"),
        "{message}"
    );
    assert_eq!(fs::read(dir.join("README.md")).unwrap(), b"mine\n");
    assert!(!tmp.path().join("elsewhere").exists());
    let mut left: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    left.sort();
    assert_eq!(left, vec![dir.join("README.md"), dir.join("flake.nix")]);
}

#[test]
fn unknown_templates_and_bad_names_are_refused_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("state");
    let dir = tmp.path().join("new");
    let dir_arg = dir.to_str().unwrap();

    let unknown = support::mvm_json(&home, &["init", dir_arg, "-t", "cobol"], 65);
    assert_eq!(unknown["error"]["code"], "INIT001");
    for bad in ["My-Tool", "-x", "a/b", ""] {
        let flag = format!("--name={bad}");
        let refused = support::mvm_json(&home, &["init", dir_arg, &flag], 65);
        assert_eq!(refused["error"]["code"], "INIT003", "{bad:?}");
    }
    assert!(!dir.exists());

    // The default template is the flake's default: python.
    let done = support::mvm_json(&home, &["init", dir_arg], 0);
    assert_eq!(done["template"], "python");
}
