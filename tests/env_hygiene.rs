//! Environment hygiene, walked: every place the shipped code starts a process goes through
//! `mvm_ir::env::command`, which leaves the denylist's variables (`LD_PRELOAD`, `BASH_ENV`,
//! `PYTHONPATH`, a password manager's session…) out of what the child inherits. A new
//! `Command::new` in shipped code fails here until it does, or is listed below with why.

use std::fs;
use std::path::{Path, PathBuf};

/// The source folders of the shipped crates.
const SOURCES: &[&str] = &[
    "src",
    "ir/src",
    "runner/src",
    "builder/src",
    "api/src",
    "nix/src",
    "vmm/src",
    "protocol/src",
    "agent/src",
];

/// The places that may start a process otherwise, and why.
const EXEMPT: &[(&str, &str)] = &[
    ("ir/src/env.rs", "the one constructor, which removes the denied variables"),
    (
        "agent/src/serve/exec.rs",
        "the guest's workload command: its environment is cleared and holds only what the host checked",
    ),
    (
        "vmm/src/test_guest.rs",
        "assembles the VMM's test guest with `as` and `ld`; mvm-vmm depends on no other mvm crate",
    ),
];

/// What starts a process.
const STARTS: &[&str] = &["Command::new(", "process::Command::new("];

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            // Test harnesses and fixtures are not shipped.
            if name != "tests" {
                rust_files(&path, found);
            }
        } else if name.ends_with(".rs") && name != "tests.rs" && name != "testing.rs" {
            found.push(path);
        }
    }
}

/// The shipped part of a source file: what comes before its `#[cfg(test)]` module.
fn shipped(source: &str) -> &str {
    let test_module = ["#[cfg(test)]\nmod ", "#[cfg(test)]\npub(crate) mod "]
        .iter()
        .filter_map(|start| source.find(start))
        .min();
    &source[..test_module.unwrap_or(source.len())]
}

#[test]
fn every_process_the_host_starts_leaves_the_denied_variables_out() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in SOURCES {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 100, "only {} files found", files.len());
    let mut starts = 0;
    let mut unscrubbed = Vec::new();
    for file in &files {
        let relative = file
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .to_string();
        let source = fs::read_to_string(file).unwrap();
        for (number, line) in shipped(&source).lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            if line.contains("mvm_ir::env::command(") {
                starts += 1;
            } else if STARTS.iter().any(|start| line.contains(start))
                && !EXEMPT.iter().any(|(path, _)| *path == relative)
            {
                unscrubbed.push(format!("{relative}:{}: {}", number + 1, line.trim()));
            }
        }
    }
    assert!(
        unscrubbed.is_empty(),
        "processes started without mvm_ir::env::command:\n{}",
        unscrubbed.join("\n")
    );
    // QEMU, the runner, the build worker, Nix, dpkg-deb, apt-get…: the walk saw them.
    assert!(
        starts >= 15,
        "only {starts} places start a process through it"
    );
}

#[test]
fn qemu_started_by_mvm_inherits_nothing_denied() {
    // `mvm doctor` asks `$MVM_QEMU --version`: here a script that keeps its environment.
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("environment");
    let qemu = dir.path().join("qemu");
    fs::write(
        &qemu,
        format!(
            "#!/bin/sh\nenv > '{}'\necho 'QEMU emulator version 7.2.0'\n",
            seen.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&qemu, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let _ = std::process::Command::new(env!("CARGO_BIN_EXE_mvm"))
        .args(["--json", "doctor"])
        .env("MVM_HOME", dir.path().join("home"))
        .env("MVM_QEMU", &qemu)
        .env("BASH_FUNC_poison%%", "() { :; }")
        .env("PYTHONPATH", "/poison")
        .env("OP_SESSION_poison", "token")
        .env("MVM_HYGIENE_KEPT", "kept")
        .output()
        .unwrap();
    let environment = fs::read_to_string(&seen).expect("mvm doctor ran $MVM_QEMU --version");
    assert!(
        environment.contains("MVM_HYGIENE_KEPT=kept"),
        "{environment}"
    );
    for poison in ["BASH_FUNC_poison", "PYTHONPATH", "OP_SESSION_poison"] {
        assert!(
            !environment.contains(poison),
            "{poison} reached QEMU: {environment}"
        );
    }
}
