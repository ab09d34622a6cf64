//! The SDKs against a real mvm: the Python suite (`sdk/python/tests`, pytest) drives real
//! sandboxes — busybox guests booted by `mvm-runner` — through `mvm serve`, which the SDK
//! starts itself. This file prepares what the suite needs (a kernel in a fresh mvm home, a
//! busybox image, a virtual environment with httpx and pytest, built once and kept) and runs
//! it; its output is this test's.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use mvm_builder::testing::TestLayout;

use support::{describe, guest};

/// The applets the suites' commands use.
const APPLETS: &[&str] = &[
    "sh",
    "cat",
    "echo",
    "sleep",
    "ls",
    "env",
    "mkdir",
    "wc",
    "sha256sum",
    "ln",
    "pwd",
    "true",
    "rm",
];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A virtual environment with the SDK's dependency and pytest, made once and kept under the
/// test target directory (PyPI is reached only the first time).
fn python() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sdk-venv");
    let python = venv.join("bin/python");
    let ready = venv.join(".mvm-ready");
    if !ready.exists() {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .output()
            .unwrap();
        assert!(
            made.status.success(),
            "python3 -m venv: {}",
            describe(&made)
        );
        // The SDK as a user installs it (which brings httpx), and pytest.
        let installed = Command::new(&python)
            .args(["-m", "pip", "install", "--quiet"])
            .arg(repo().join("sdk/python"))
            .arg("pytest")
            .output()
            .unwrap();
        assert!(
            installed.status.success(),
            "pip install sdk/python pytest: {}",
            describe(&installed)
        );
        std::fs::write(&ready, b"").unwrap();
    }
    python
}

#[test]
fn the_python_sdk_drives_real_sandboxes() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    guest::mvm_json(&home, &["kernel", "fetch"], 0);
    let layout = TestLayout::new_in(dir.path());
    let image = format!(
        "oci:{}@{}",
        layout.dir.path().display(),
        layout.busybox_with(APPLETS)
    );
    let python = python();
    let run = Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"])
        .current_dir(repo().join("sdk/python"))
        // The source tree, not the installed copy: the suite tests what is checked in.
        .env("PYTHONPATH", repo().join("sdk/python"))
        .env("MVM_HOME", &home)
        .env("MVM_BIN", env!("CARGO_BIN_EXE_mvm"))
        .env("MVM_RUNNER", guest::runner())
        .env("MVM_AGENT", guest::static_agent())
        .env("MVM_TEST_IMAGE", &image)
        .output()
        .unwrap();
    // Whatever the suite left running goes (its runners would outlive the test).
    let left = guest::mvm_json(&home, &["ls"], 0);
    for vm in left["vms"].as_array().into_iter().flatten() {
        let name = vm["name"].as_str().unwrap_or_default();
        let _ = guest::mvm(&home, &["rm", "--force", name]);
    }
    println!("{}", String::from_utf8_lossy(&run.stdout));
    assert!(run.status.success(), "pytest: {}", describe(&run));
    assert!(
        left["vms"].as_array().is_none_or(|vms| vms.is_empty()),
        "the suite left VMs behind: {left}"
    );
}
