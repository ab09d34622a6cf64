//! Guests for the end-to-end tests: the static guest agent, the runner, and the CLI and build
//! worker for guests that run them, built by the tests themselves.
//!
//! The agent must be a static binary (the initramfs has no dynamic loader), which the root
//! package's build cannot give: it is built with cargo, `+crt-static` and an explicit
//! `--target` (so that build scripts stay dynamic), into its own directory under
//! `CARGO_TARGET_TMPDIR`, where it is kept between runs. Not every test file uses every helper.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const TARGET: &str = "x86_64-unknown-linux-gnu";

fn cargo() -> Command {
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo.current_dir(env!("CARGO_MANIFEST_DIR"));
    cargo
}

/// The binaries a guest may carry, with their packages: the agent, the runner, the CLI (for a
/// guest that runs mvm itself: the nested kvm test's) and the build worker (the builder VM's
/// image, `mvm builder fetch --worker`). The runner needs no static linking, but it does no
/// harm: it makes it self-contained, as a jailed runner must be.
const STATIC_BINARIES: &[(&str, &str)] = &[
    ("mvm-agent", "mvm-agent"),
    ("mvm-runner", "mvm-runner"),
    ("mvm", "mvm"),
    ("mvm-builder", "mvm-build-worker"),
];

/// The static binaries by name, built once per test run, all in one cargo build (they share
/// most dependencies, which one build compiles once). Release, but without link-time
/// optimisation: a test wants them built soon more than running a little faster.
fn static_binaries() -> &'static [(&'static str, PathBuf)] {
    static BINARIES: OnceLock<Vec<(&'static str, PathBuf)>> = OnceLock::new();
    BINARIES.get_or_init(|| {
        let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("agent-static");
        let mut build = cargo();
        build.args(["build", "--release", "--target", TARGET]);
        for (package, binary) in STATIC_BINARIES {
            build.args(["-p", package, "--bin", binary]);
        }
        let out = build
            .arg("--target-dir")
            .arg(&target_dir)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .env("CARGO_PROFILE_RELEASE_LTO", "false")
            .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "16")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "building the static binaries: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let release = target_dir.join(TARGET).join("release");
        STATIC_BINARIES
            .iter()
            .map(|(_, binary)| {
                let path = release.join(binary);
                assert!(
                    !has_interpreter(&fs::read(&path).unwrap()),
                    "{} asks for a dynamic loader: not static",
                    path.display()
                );
                (*binary, path)
            })
            .collect()
    })
}

/// The static binary `name` (one of [`STATIC_BINARIES`]).
fn static_binary(name: &str) -> &'static Path {
    let (_, path) = static_binaries()
        .iter()
        .find(|(binary, _)| *binary == name)
        .unwrap();
    path
}

/// A static `mvm` (the CLI), for a machine that has no other: the nested kvm test's guest.
pub fn static_cli() -> &'static Path {
    static_binary("mvm")
}

/// The static build worker the builder VM's image carries (`mvm builder fetch --worker`).
pub fn static_worker() -> &'static Path {
    static_binary("mvm-build-worker")
}

/// The static guest agent.
pub fn static_agent() -> &'static Path {
    static_binary("mvm-agent")
}

/// `mvm-runner` (pass it to `mvm run` as `MVM_RUNNER`).
pub fn runner() -> &'static Path {
    static_binary("mvm-runner")
}

/// The command `mvm ARGS` with `MVM_HOME` set to `home`, and this test run's runner and
/// static agent.
pub fn command(home: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mvm"));
    command
        .args(args)
        .env("MVM_HOME", home)
        .env("MVM_RUNNER", runner())
        .env("MVM_AGENT", static_agent());
    command
}

/// Runs [`command`].
pub fn mvm(home: &Path, args: &[&str]) -> Output {
    command(home, args).output().unwrap()
}

/// `mvm --json ARGS` as [`mvm`] runs it, its exit status checked, its output parsed.
pub fn mvm_json(home: &Path, args: &[&str], status: i32) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = mvm(home, &all);
    assert_eq!(
        out.status.code(),
        Some(status),
        "mvm {args:?}\n{}",
        super::describe(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What `mvm ls --json` says of the VM `name` of `home`.
pub fn listed(home: &Path, name: &str) -> serde_json::Value {
    let listed = mvm_json(home, &["ls"], 0);
    listed["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|vm| vm["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} is not listed: {listed}"))
}

/// A named VM of `home`, removed (`mvm rm --force`) when this is dropped, so that a failing test
/// leaves no runner behind.
pub struct RemoveOnDrop<'a> {
    /// The VM's state directory.
    pub home: &'a Path,
    /// Its name.
    pub name: &'a str,
}

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        let _ = mvm(self.home, &["rm", "--force", self.name]);
    }
}

/// Whether an ELF64 executable has a `PT_INTERP` program header (a dynamic loader to run it).
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    assert_eq!(&elf[..5], b"\x7fELF\x02", "not an ELF64 file");
    let u16_at = |at: usize| usize::from(u16::from_le_bytes(elf[at..at + 2].try_into().unwrap()));
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    (0..count).any(|i| {
        let at = phoff + i * size;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == PT_INTERP
    })
}

/// A home with the guest kernel fetched and a busybox image of `applets` (`oci:DIR@sha256:…`),
/// both in one [`super::lasting_tempdir`]: what a test binary's shared fixture begins with.
pub fn home_and_busybox(applets: &[&str]) -> (tempfile::TempDir, PathBuf, String) {
    let dir = super::lasting_tempdir();
    let home = dir.path().join("home");
    mvm_json(&home, &["kernel", "fetch"], 0);
    let layout = mvm_builder::testing::TestLayout::new_in(dir.path());
    let digest = layout.busybox_with(applets);
    let image = format!("oci:{}@{digest}", layout.dir.path().display());
    // Inside `dir`, which outlives it: not removed on its own.
    std::mem::forget(layout);
    (dir, home, image)
}
