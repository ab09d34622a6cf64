//! Guests for the end-to-end tests: the static guest agent, the runner, and the CLI and build
//! worker for guests that run them.
//!
//! The agent must be a static binary (the initramfs has no dynamic loader). The workspace links
//! every binary statically (`.cargo/config.toml`), so these are the binaries of the build the
//! tests run in: `cargo test` has built the CLI and whatever the packages under test need, and
//! the rest are built here once per test binary, into the same target directory with the same
//! profile and flags — a link at most. Not every test file uses every helper.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The binaries a guest may carry, with their packages: the agent, the runner (static, as a
/// jailed runner must be) and the build worker (the builder VM's image, `mvm builder fetch
/// --worker`).
const GUEST_BINARIES: &[(&str, &str)] = &[
    ("mvm-agent", "mvm-agent"),
    ("mvm-runner", "mvm-runner"),
    ("mvm-builder", "mvm-build-worker"),
];

/// The directory the tested CLI was built in (`target/<triple>/<profile>`), with every
/// binary of [`GUEST_BINARIES`] built there and up to date.
fn built_binaries() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_BIN_EXE_mvm")).parent().unwrap();
        let target_dir = dir.parent().and_then(Path::parent).unwrap();
        let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        build
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .arg("build")
            .arg("--target-dir")
            .arg(target_dir);
        if dir.ends_with("release") {
            build.arg("--release");
        }
        for (package, binary) in GUEST_BINARIES {
            build.args(["-p", package, "--bin", binary]);
        }
        let out = build.output().unwrap();
        assert!(
            out.status.success(),
            "building the guests' binaries: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir.to_path_buf()
    })
}

/// The static binary `name`: the CLI, or one of [`GUEST_BINARIES`].
fn static_binary(name: &str) -> &'static Path {
    static CHECKED: OnceLock<Vec<(String, PathBuf)>> = OnceLock::new();
    let checked = CHECKED.get_or_init(|| {
        let cli = PathBuf::from(env!("CARGO_BIN_EXE_mvm"));
        let guests = GUEST_BINARIES
            .iter()
            .map(|(_, binary)| built_binaries().join(binary));
        std::iter::once(cli)
            .chain(guests)
            .map(|path| {
                assert!(
                    !has_interpreter(&fs::read(&path).unwrap()),
                    "{} asks for a dynamic loader: not static (is .cargo/config.toml in effect?)",
                    path.display()
                );
                let name = path.file_name().unwrap().to_str().unwrap().to_string();
                (name, path)
            })
            .collect()
    });
    let (_, path) = checked.iter().find(|(binary, _)| binary == name).unwrap();
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
