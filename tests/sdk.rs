//! The SDKs against a real mvm: the Python suite (`sdk/python/tests`, pytest) and the
//! TypeScript one (`sdk/typescript/test`, `node --test`) drive real sandboxes — busybox guests
//! booted by `mvm-runner` — through `mvm serve`, which each SDK starts itself. This file
//! prepares what the suites need (a kernel in a fresh mvm home, a busybox image, a virtual
//! environment with httpx and pytest, the TypeScript SDK built with npm) and runs them, one at
//! a time; their output is these tests'.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

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
    "ps",
    "tty",
    "stty",
];

/// The suites run one at a time: the hosts have two cores.
static TURN: Mutex<()> = Mutex::new(());

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A virtual environment with the SDK as a user installs it (which brings httpx) and pytest.
fn python() -> PathBuf {
    let sdk = repo().join("sdk/python");
    support::python_venv("sdk-venv", &[sdk.to_str().unwrap(), "pytest"])
}

/// The value of the `sdk-token` secret.
const SDK_SECRET: &str = "sdk-secret-4b1d9e";

/// A fresh mvm home with a kernel, and a busybox image (with E2B's user and home) in a
/// layout beside it.
struct Fixture {
    dir: tempfile::TempDir,
    image: String,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        guest::mvm_json(&dir.path().join("home"), &["kernel", "fetch"], 0);
        let layout = TestLayout::new_in(dir.path());
        let image = format!(
            "oci:{}@{}",
            layout.dir.path().display(),
            layout.busybox_with_user_home(APPLETS)
        );
        std::mem::forget(layout);
        // An unbound secret the suites' sandboxes are given (`secrets`), whose value the
        // suites check never comes back.
        let value = dir.path().join("sdk-token");
        std::fs::write(&value, SDK_SECRET).unwrap();
        let value = value.to_str().unwrap();
        let home = dir.path().join("home");
        guest::mvm_json(
            &home,
            &["secret", "put", "sdk-token", "--value-file", value],
            0,
        );
        Fixture { dir, image }
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// Runs `suite` against this home, its output going straight to this test's (a long suite
    /// shows its progress), then removes whatever VMs it left (their runners would outlive
    /// the test) and fails if it failed or left any.
    fn run(&self, mut suite: Command) {
        let status = suite
            .env("MVM_HOME", self.home())
            .env("MVM_BIN", env!("CARGO_BIN_EXE_mvm"))
            .env("MVM_RUNNER", guest::runner())
            .env("MVM_AGENT", guest::static_agent())
            .env("MVM_TEST_IMAGE", &self.image)
            .env("MVM_TEST_SECRET", SDK_SECRET)
            .status()
            .unwrap();
        let left = guest::mvm_json(&self.home(), &["ls"], 0);
        for vm in left["vms"].as_array().into_iter().flatten() {
            let name = vm["name"].as_str().unwrap_or_default();
            let _ = guest::mvm(&self.home(), &["rm", "--force", name]);
        }
        assert!(status.success(), "{suite:?} failed: {status}");
        assert!(
            left["vms"].as_array().is_none_or(|vms| vms.is_empty()),
            "the suite left VMs behind: {left}"
        );
    }
}

#[test]
fn the_python_sdk_drives_real_sandboxes() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let fixture = Fixture::new();
    let mut pytest = Command::new(python());
    pytest
        .args(["-m", "pytest", "-v", "-p", "no:cacheprovider", "tests"])
        .current_dir(repo().join("sdk/python"))
        // The source tree, not the installed copy: the suite tests what is checked in.
        .env("PYTHONPATH", repo().join("sdk/python"));
    fixture.run(pytest);
}

#[test]
fn the_typescript_sdk_drives_real_sandboxes() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let sdk = repo().join("sdk/typescript");
    // As its README says: the locked dev dependencies, then the build.
    for step in [&["ci", "--no-audit", "--no-fund"][..], &["run", "build"]] {
        let done = Command::new("npm")
            .args(step)
            .current_dir(&sdk)
            .output()
            .unwrap();
        assert!(done.status.success(), "npm {step:?}: {}", describe(&done));
    }
    packed_and_installed(&sdk);
    let fixture = Fixture::new();
    for file in ["test/sandbox.test.mjs", "test/e2b.test.mjs"] {
        let mut node = Command::new("node");
        node.args(["--test", file]).current_dir(&sdk);
        fixture.run(node);
    }
}

/// As the README says: `npm pack`, and the tarball installed into a project of its own, where
/// both entry points (`mvm-sdk`, `mvm-sdk/compat/e2b`) import with their declarations.
fn packed_and_installed(sdk: &Path) {
    let project = tempfile::tempdir().unwrap();
    let packed = Command::new("npm")
        .args(["pack", "--json", "--pack-destination"])
        .arg(project.path())
        .current_dir(sdk)
        .output()
        .unwrap();
    assert!(packed.status.success(), "npm pack: {}", describe(&packed));
    let listing: serde_json::Value = serde_json::from_slice(&packed.stdout).unwrap();
    let tarball = listing[0]["filename"].as_str().unwrap().to_string();
    let files: Vec<&str> = listing[0]["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["path"].as_str())
        .collect();
    for needed in [
        "dist/index.js",
        "dist/index.d.ts",
        "dist/compat/e2b.js",
        "dist/compat/e2b.d.ts",
    ] {
        assert!(files.contains(&needed), "{needed} not packed: {files:?}");
    }
    std::fs::write(
        project.path().join("package.json"),
        br#"{"type": "module"}"#,
    )
    .unwrap();
    let installed = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--offline"])
        .arg(format!("./{tarball}"))
        .current_dir(project.path())
        .output()
        .unwrap();
    assert!(
        installed.status.success(),
        "npm install: {}",
        describe(&installed)
    );
    let script = "const m = await import('mvm-sdk'); const e = await import('mvm-sdk/compat/e2b'); \
                  if (typeof m.Sandbox.create !== 'function' || typeof e.Sandbox.create !== 'function') \
                  process.exit(1);";
    let imported = Command::new("node")
        .args(["--input-type=module", "-e", script])
        .current_dir(project.path())
        .output()
        .unwrap();
    assert!(
        imported.status.success(),
        "importing the installed package: {}",
        describe(&imported)
    );
}
