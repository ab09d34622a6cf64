//! Running the `mvm` binary from the end-to-end tests, against a state directory of their own.

pub mod bundle;
pub mod debian;
pub mod guest;
#[allow(dead_code)] // only the egress and secrets tests serve upstreams
pub mod upstream;
pub mod wait;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// Runs `mvm ARGS` with `MVM_HOME` set to `home`.
pub fn mvm(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mvm"))
        .args(args)
        .env("MVM_HOME", home)
        .output()
        .unwrap()
}

/// Runs `mvm --json ARGS`, asserts the exit status, and parses what it printed.
pub fn mvm_json(home: &Path, args: &[&str], status: i32) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = mvm(home, &all);
    assert_eq!(
        out.status.code(),
        Some(status),
        "mvm {args:?}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A work directory holding a home (`work/home`) with the guest kernel fetched, as the tests'
/// fixtures begin.
#[allow(dead_code)] // not every test binary boots guests
pub fn home_with_kernel() -> (tempfile::TempDir, PathBuf) {
    let work = tempfile::tempdir().unwrap();
    let home = work.path().join("home");
    mvm_json(&home, &["kernel", "fetch"], 0);
    (work, home)
}

/// Output bytes as text (lossy).
#[allow(dead_code)] // not every test binary prints outputs
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A process's status and both its streams, for a failed assertion.
#[allow(dead_code)] // not every test binary prints outputs
pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// The payload of the DSSE envelope in `envelope` (a plan, a provenance, a receipt), parsed.
#[allow(dead_code)] // not every test binary reads envelopes
pub fn dsse_payload(envelope: &Path) -> Value {
    let envelope: Value = serde_json::from_slice(&fs::read(envelope).unwrap()).unwrap();
    let bytes = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        envelope["payload"].as_str().unwrap(),
    )
    .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// A process a test serves from (an upstream server), killed when the test ends, however it
/// ends.
#[allow(dead_code)] // not every test binary serves
pub struct Served(std::process::Child);

#[allow(dead_code)] // not every test binary serves
impl Served {
    /// Starts `command` with its stdout piped, and returns it with the first line it prints
    /// (what it says once it is ready: its port, `ready`).
    pub fn start(command: &mut Command) -> (Self, String) {
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let served = Self(child);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
        (served, line)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Python virtual environment under the test target directory, `name`, with `packages`
/// (pip's arguments: names, pins, paths) installed, made once and kept (PyPI is reached only
/// the first time); its `python`.
#[allow(dead_code)] // only the SDK and MCP tests use Python
pub fn python_venv(name: &str, packages: &[&str]) -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
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
        let installed = Command::new(&python)
            .args(["-m", "pip", "install", "--quiet"])
            .args(packages)
            .output()
            .unwrap();
        assert!(
            installed.status.success(),
            "pip install {packages:?}: {}",
            describe(&installed)
        );
        fs::write(&ready, b"").unwrap();
    }
    python
}

/// Packs the directory `dir` (an OCI layout) into the tar file `archive`: an `oci-archive:`.
#[allow(dead_code)] // only the build tests make archives
pub fn tar_dir(dir: &Path, archive: &Path) {
    let tarred = Command::new("tar")
        .arg("-C")
        .arg(dir)
        .arg("-cf")
        .arg(archive)
        .arg(".")
        .status()
        .unwrap();
    assert!(tarred.success(), "tar of {}", dir.display());
}
