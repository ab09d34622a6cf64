//! Running the `mvm` binary from the end-to-end tests, against a state directory of their own.

pub mod bundle;
pub mod guest;
pub mod wait;

use std::path::Path;
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
