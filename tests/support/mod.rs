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
use std::sync::Once;

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
    let work = lasting_tempdir();
    let home = work.path().join("home");
    mvm_json(&home, &["kernel", "fetch"], 0);
    (work, home)
}

/// A temporary directory for a fixture shared through a `static`. Statics are never dropped, so
/// a plain `TempDir` there would outlive the test binary — a fixture's home with its images and
/// boot snapshots holds hundreds of MiB, and a whole run's worth fills a small disk. These are
/// made in one directory per test process, removed as the process exits; the directories of
/// processes that were killed instead are removed by the next test binary that makes one.
#[allow(dead_code)] // not every test binary shares a fixture
pub fn lasting_tempdir() -> tempfile::TempDir {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| {
        remove_dirs_of_dead_processes();
        extern "C" fn remove_own() {
            let _ = fs::remove_dir_all(lasting_parent(std::process::id()));
        }
        // SAFETY: `remove_own` is a plain `extern "C" fn` with no arguments that touches no
        // state torn down before `exit` runs its handlers; registering it has no other effect.
        #[allow(unsafe_code)]
        let registered = unsafe { libc::atexit(remove_own) };
        assert_eq!(
            registered, 0,
            "atexit refused the clean-up of shared fixtures"
        );
    });
    let parent = lasting_parent(std::process::id());
    fs::create_dir_all(&parent).unwrap();
    tempfile::tempdir_in(parent).unwrap()
}

const LASTING_PREFIX: &str = "mvm-test-fixtures-";

fn lasting_parent(pid: u32) -> PathBuf {
    std::env::temp_dir().join(format!("{LASTING_PREFIX}{pid}"))
}

fn remove_dirs_of_dead_processes() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.strip_prefix(LASTING_PREFIX))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// The audit events of `home`, oldest first: each `{"event": …, "fields": {…}, …}`.
#[allow(dead_code)] // not every test binary reads the audit log
pub fn audit_events(home: &Path) -> Vec<Value> {
    fs::read_to_string(home.join("audit").join("audit.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// Runs `openssl ARGS` on the host in `dir`, which must succeed.
#[allow(dead_code)] // only the tests with TLS make certificates
pub fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", describe(&out));
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
