//! `mvm build` of a `nix_packages` workload, end to end with the real Nix, offline: a package
//! set whose derivations are built by a static busybox (added to a private store), realised
//! by `nix-store --realise`, and its closure (`nix-store -qR`) laid out as `/nix/store/…` in
//! the EROFS root, recorded in provenance with Nix's NAR hashes — then booted under QEMU, its
//! program run. Skipped, with the reason printed, only where Nix is not installed; in CI a
//! missing Nix fails.

mod support;

// mvm-nix's harness for the real Nix; this test uses part of it.
#[allow(dead_code)]
#[path = "../nix/tests/real_nix/mod.rs"]
mod real_nix;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use real_nix::RealNix;
use serde_json::Value;

use support::guest;

/// The package set: `hello` (a script whose interpreter is the store's busybox, so busybox is
/// in its closure), `tools.greet` (a nested attribute path: a `sh` symlink and a data file),
/// `dup` (another `bin/hello`), `broken` (a builder that fails).
const PACKAGES: &str = r#"
let
  bb = ./bb;
  mk = name: script: derivation {
    inherit name;
    system = "x86_64-linux";
    builder = "${bb}/busybox";
    args = [ "sh" "-c" script ];
  };
in
{
  hello = mk "hello" ''
    mkdir -p $out/bin
    printf '#!${bb}/busybox sh\necho hello from nix\n' > $out/bin/hello
    chmod 555 $out/bin/hello
  '';
  tools.greet = mk "greet" ''
    mkdir -p $out/bin $out/share
    ln -s ${bb}/busybox $out/bin/sh
    echo hi > $out/share/greeting
  '';
  dup = mk "dup" ''
    mkdir -p $out/bin
    echo '#!/bin/sh' > $out/bin/hello
  '';
  broken = mk "broken" "echo failing on purpose >&2; exit 3";
}
"#;

struct Fixture {
    nix: RealNix,
    work: tempfile::TempDir,
    home: PathBuf,
}

impl Fixture {
    fn new() -> Option<Self> {
        let nix = RealNix::find()?;
        let work = support::lasting_tempdir();
        let bb = work.path().join("bb");
        fs::create_dir(&bb).unwrap();
        fs::copy("/bin/busybox", bb.join("busybox")).unwrap();
        fs::write(work.path().join("pkgs.nix"), PACKAGES).unwrap();
        let home = work.path().join("home");
        support::mvm_json(&home, &["kernel", "fetch"], 0);
        Some(Self { nix, work, home })
    }

    fn declare(&self, name: &str, packages: &[&str]) -> PathBuf {
        let dir = self.work.path().join(name);
        fs::create_dir_all(&dir).unwrap();
        let packages: Vec<String> = packages.iter().map(|p| format!("{p:?}")).collect();
        fs::write(
            dir.join("mvm.toml"),
            format!(
                r#"schema_version = "0"
id = "{name}"
[[apps]]
name = "main"
entrypoints = [{{ kind = "command", command = ["hello"] }}]
image = {{ kind = "nix_packages", packages = [{}] }}
resources = {{ cpu_cores = 1, memory_mb = 256 }}
"#,
                packages.join(", ")
            ),
        )
        .unwrap();
        dir
    }

    /// `mvm build DIR` against the private store, with the settings every Nix command here
    /// gets (no substituters: offline).
    fn build(&self, dir: &Path, out: &Path) -> Output {
        self.build_with(dir, out, &[])
    }

    fn build_with(&self, dir: &Path, out: &Path, extra: &[&str]) -> Output {
        let pkgs = self.work.path().join("pkgs.nix");
        Command::new(env!("CARGO_BIN_EXE_mvm"))
            .args(["--json", "build"])
            .arg(dir)
            .args(extra)
            .arg("--nix-packages")
            .arg(&pkgs)
            .arg("--nix-store")
            .arg(self.nix.store_root())
            .arg("--agent")
            .arg(guest::static_agent())
            .arg("--out")
            .arg(out)
            .env("MVM_HOME", &self.home)
            .env("NIX_CONFIG", real_nix::NIX_CONFIG)
            .output()
            .unwrap()
    }

    fn built(&self, dir: &Path, out: &Path) -> Value {
        let result = self.build(dir, out);
        assert!(
            result.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&result.stdout),
            String::from_utf8_lossy(&result.stderr)
        );
        serde_json::from_slice(&result.stdout).unwrap()
    }

    fn refused(&self, dir: &Path, status: i32) -> Value {
        let result = self.build(dir, &self.work.path().join("refused"));
        assert_eq!(
            result.status.code(),
            Some(status),
            "{}",
            String::from_utf8_lossy(&result.stderr)
        );
        assert!(!self.work.path().join("refused").exists());
        serde_json::from_slice(&result.stdout).unwrap()
    }

    /// The store path an attribute realises to, by Nix.
    fn realise(&self, attr: &str) -> String {
        let drv = self.nix.run_on_store(
            "nix-instantiate",
            &[
                self.work.path().join("pkgs.nix").as_os_str(),
                OsStr::new("-A"),
                OsStr::new(attr),
            ],
        );
        let drv = String::from_utf8(drv).unwrap();
        let out = self.nix.run_on_store(
            "nix-store",
            &[OsStr::new("--realise"), OsStr::new(drv.trim())],
        );
        String::from_utf8(out).unwrap().trim().to_string()
    }

    fn on_disk(&self, store_path: &str) -> PathBuf {
        self.nix
            .store_root()
            .join(store_path.trim_start_matches('/'))
    }
}

/// The shared fixture with one workload built: `hello` and `tools.greet`.
fn shared() -> Option<&'static (Fixture, PathBuf)> {
    static SHARED: OnceLock<Option<(Fixture, PathBuf)>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let fx = Fixture::new()?;
            let dir = fx.declare("nix-hello", &["hello", "tools.greet"]);
            let bundle = fx.work.path().join("bundle");
            fx.built(&dir, &bundle);
            Some((fx, bundle))
        })
        .as_ref()
}

fn provenance(bundle: &Path) -> Value {
    support::dsse_payload(&bundle.join("provenance.dsse.json"))
}

/// Every node under `dir`: path → ("file", bytes, executable) | ("link", target) | ("dir").
fn listing(dir: &Path) -> BTreeMap<String, (String, Vec<u8>, bool)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (String, Vec<u8>, bool)>) {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).unwrap();
                out.insert(rel, ("link".into(), target.to_str().unwrap().into(), false));
            } else if meta.is_dir() {
                out.insert(rel, ("dir".into(), vec![], false));
                walk(root, &path, out);
            } else {
                let exec = meta.permissions().mode() & 0o100 != 0;
                out.insert(rel, ("file".into(), fs::read(&path).unwrap(), exec));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

#[test]
fn the_root_is_the_closure_nix_realised_and_provenance_names_it() {
    let Some((fx, bundle)) = shared() else { return };
    let hello = fx.realise("hello");
    let greet = fx.realise("tools.greet");

    // What Nix says the closure is, and each path's NAR hash.
    let closure: BTreeSet<String> = String::from_utf8(fx.nix.run_on_store(
        "nix-store",
        &[OsStr::new("-qR"), OsStr::new(&hello), OsStr::new(&greet)],
    ))
    .unwrap()
    .lines()
    .map(String::from)
    .collect();
    assert_eq!(closure.len(), 3, "hello, greet and busybox: {closure:?}");

    // The image holds exactly those paths, byte for byte, and the profile.
    let extracted = fx.work.path().join("extracted");
    let fsck = Command::new("fsck.erofs")
        .arg(format!("--extract={}", extracted.display()))
        .arg(bundle.join("rootfs.erofs"))
        .output()
        .expect("fsck.erofs (erofs-utils) is installed by scripts/deps --test");
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stderr)
    );
    let in_image: BTreeSet<String> = fs::read_dir(extracted.join("nix/store"))
        .unwrap()
        .map(|e| format!("/nix/store/{}", e.unwrap().file_name().to_str().unwrap()))
        .collect();
    assert_eq!(in_image, closure);
    for path in &closure {
        let ours = extracted.join(path.trim_start_matches('/'));
        assert_eq!(listing(&ours), listing(&fx.on_disk(path)), "{path}");
    }
    let link = |name: &str| fs::read_link(extracted.join("bin").join(name)).unwrap();
    assert_eq!(link("hello"), Path::new(&hello).join("bin/hello"));
    assert_eq!(link("sh"), Path::new(&greet).join("bin/sh"));
    assert_eq!(fs::read_dir(extracted.join("bin")).unwrap().count(), 2);

    // Provenance: a Nix build, each package's derivation, every closure path with Nix's hash.
    let statement = provenance(bundle);
    let definition = &statement["predicate"]["buildDefinition"];
    assert_eq!(
        definition["buildType"],
        "https://mvm.dev/build/nix-rootfs/v1"
    );
    let deps = definition["resolvedDependencies"].as_array().unwrap();
    let recorded: BTreeMap<String, String> = deps
        .iter()
        .filter(|d| d["name"].as_str().unwrap().starts_with("/nix/store/"))
        .map(|d| {
            let name = d["name"].as_str().unwrap().to_string();
            (name, d["digest"]["sha256"].as_str().unwrap().to_string())
        })
        .collect();
    assert_eq!(recorded.keys().cloned().collect::<BTreeSet<_>>(), closure);
    for (path, digest) in &recorded {
        let hash = String::from_utf8(fx.nix.run_on_store(
            "nix-store",
            &[OsStr::new("-q"), OsStr::new("--hash"), OsStr::new(path)],
        ))
        .unwrap();
        let nix32 = hash.trim().strip_prefix("sha256:").unwrap();
        let bytes = mvm_nix::nixbase32::decode(nix32).unwrap();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(*digest, hex, "{path}");
    }
    for attr in ["hello", "tools.greet"] {
        let package = deps
            .iter()
            .find(|d| d["name"] == format!("nix package {attr}"))
            .unwrap_or_else(|| panic!("no dependency for {attr}: {deps:?}"));
        assert!(package["uri"].as_str().unwrap().ends_with(".drv"));
    }

    // The plan verifies, and a second build gives the same root.
    support::mvm_json(
        &fx.home,
        &[
            "plan",
            "verify",
            bundle.join("plan.dsse.json").to_str().unwrap(),
        ],
        0,
    );
    let again = fx.work.path().join("again");
    let second = fx.built(&fx.declare("nix-hello", &["hello", "tools.greet"]), &again);
    let first_image = fs::read(bundle.join("rootfs.erofs")).unwrap();
    assert_eq!(fs::read(again.join("rootfs.erofs")).unwrap(), first_image);
    assert_eq!(
        second["root_hash"],
        provenance(bundle)["predicate"]["buildDefinition"]["internalParameters"]["verity"]
            ["root_hash"]
    );
}

#[test]
fn what_cannot_be_an_image_is_refused() {
    let Some((fx, _)) = shared() else { return };
    let unknown = fx.refused(&fx.declare("unknown", &["nope"]), 65);
    assert_eq!(unknown["error"]["code"], "NIXBUILD002", "{unknown}");
    let collision = fx.refused(&fx.declare("collision", &["hello", "dup"]), 65);
    assert_eq!(collision["error"]["code"], "NIXBUILD005", "{collision}");
    let message = collision["error"]["message"].as_str().unwrap();
    assert!(message.contains("bin/hello"), "{message}");
    let broken = fx.refused(&fx.declare("broken", &["broken"]), 74);
    assert_eq!(broken["error"]["code"], "NIXBUILD003", "{broken}");
    let message = broken["error"]["message"].as_str().unwrap();
    assert!(message.contains("failing on purpose"), "{message}");
}

/// A store path whose files changed after Nix recorded its hash is an integrity failure: its
/// NAR hash, as mvm computes it, is not Nix's.
#[test]
fn a_store_path_changed_after_nix_recorded_it_is_refused() {
    let Some(fx) = Fixture::new() else { return };
    let greet = fx.realise("tools.greet");
    let file = fx.on_disk(&greet).join("share/greeting");
    let dir = file.parent().unwrap().to_path_buf();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&file, "tampered\n").unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o444)).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o555)).unwrap();

    let refused = fx.refused(&fx.declare("tampered", &["tools.greet"]), 1);
    assert_eq!(refused["error"]["code"], "NIXBUILD004", "{refused}");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(message.contains(&greet), "{message}");
}

/// A workload.nix builds like an mvm.toml; the profile it names is the plan's unless
/// `--profile` says otherwise.
#[test]
fn a_workload_nix_builds_with_its_profile() {
    let Some((fx, _)) = shared() else { return };
    let dir = fx.work.path().join("from-nix");
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("workload.nix"),
        r#"{ name = "from-nix"; packages = [ "hello" ]; entrypoint = [ "hello" ]; profile = "restrictive"; }"#,
    )
    .unwrap();
    let plan_profile = |bundle: &Path| {
        let plan = support::dsse_payload(&bundle.join("plan.dsse.json"));
        plan["policy"]["profile"].as_str().unwrap().to_string()
    };
    let bundle = fx.work.path().join("from-nix-bundle");
    fx.built(&dir, &bundle);
    assert_eq!(plan_profile(&bundle), "restrictive");
    let flagged = fx.work.path().join("from-nix-dev");
    let out = fx.build_with(&dir, &flagged, &["--profile", "dev"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(plan_profile(&flagged), "dev");
}

/// The image boots: the guest agent opens the root through dm-verity and runs the package's
/// program, found through the `/bin` profile, its interpreter the store's busybox.
#[test]
fn a_nix_image_boots_and_runs_its_program() {
    let Some((fx, bundle)) = shared() else { return };
    let out = Command::new(env!("CARGO_BIN_EXE_mvm"))
        .args(["run", "--plan"])
        .arg(bundle.join("plan.dsse.json"))
        .args(["--", "hello"])
        .env("MVM_HOME", &fx.home)
        .env("MVM_RUNNER", guest::runner())
        .env("MVM_AGENT", guest::static_agent())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from nix\n");
}
