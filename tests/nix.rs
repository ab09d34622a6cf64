//! `mvm nix drv inspect` on derivations made by the real Nix: the paths mvm computes equal
//! what `nix show-derivation` reports, and bad derivations get their codes and exit statuses.
//! Skipped, with the reason printed, only where Nix is not installed.

mod support;

// mvm-nix's harness for the real Nix; this test uses part of it.
#[allow(dead_code)]
#[path = "../nix/tests/real_nix/mod.rs"]
mod real_nix;

use std::ffi::OsStr;
use std::fs;
use std::path::Path;

use mvm_nix::StorePath;
use real_nix::RealNix;
use serde_json::{json, Value};

/// A derivation with every part `inspect` prints: two input derivations (one of them
/// fixed-output, one used for two outputs), an input source, two outputs.
const EXPR: &str = r#"
let
  system = "x86_64-linux";
  dep = derivation {
    name = "dep"; inherit system; builder = "/bin/sh"; outputs = [ "out" "dev" ];
  };
  fetched = derivation {
    name = "fetched"; inherit system; builder = "/bin/sh";
    outputHashMode = "recursive"; outputHashAlgo = "sha256";
    outputHash = "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881";
  };
in derivation {
  name = "app"; inherit system; builder = "/bin/sh"; outputs = [ "out" "doc" ];
  args = [ "-c" "echo \"built\"\n" ];
  a = dep; b = dep.dev; c = fetched; src = builtins.storePath "@SRC@";
}
"#;

struct Fixture {
    nix: RealNix,
    home: tempfile::TempDir,
    drv: StorePath,
}

impl Fixture {
    fn new() -> Option<Self> {
        let nix = RealNix::find()?;
        let home = tempfile::tempdir().unwrap();
        let src = home.path().join("src");
        fs::create_dir(&src).unwrap();
        fs::write(src.join("main.sh"), "echo hi\n").unwrap();
        let src = nix.add(&src);
        let drv = nix.instantiate("app", &EXPR.replace("@SRC@", &src.to_string()));
        Some(Self { nix, home, drv })
    }

    fn inspect(&self, file: &Path, store: &Path, status: i32) -> Value {
        let (file, store) = (file.to_str().unwrap(), store.to_str().unwrap());
        support::mvm_json(
            &self.home.path().join("state"),
            &["nix", "drv", "inspect", file, "--store", store],
            status,
        )
    }

    /// A copy of the `.drv` named `name`, its bytes changed by `edit`.
    fn copy(&self, name: &str, edit: impl FnOnce(String) -> String) -> std::path::PathBuf {
        let aterm = fs::read_to_string(self.nix.file(&self.drv)).unwrap();
        let path = self.home.path().join(name);
        fs::write(&path, edit(aterm)).unwrap();
        path
    }
}

#[test]
fn inspect_computes_what_nix_reports() {
    let Some(fx) = Fixture::new() else { return };
    let shown = fx.nix.run_on_store(
        "nix",
        &[OsStr::new("show-derivation"), fx.drv.to_string().as_ref()],
    );
    let shown: Value = serde_json::from_slice(&shown).unwrap();
    let theirs = &shown[fx.drv.to_string()];

    let ours = fx.inspect(&fx.nix.file(&fx.drv), fx.nix.store_root(), 0);
    assert_eq!(ours["drv_path"], json!(fx.drv.to_string()));
    assert_eq!(ours["name"], "app");
    let outputs = ours["outputs"].as_object().unwrap();
    assert_eq!(outputs.len(), 2);
    for (name, output) in outputs {
        assert_eq!(output["path"], theirs["outputs"][name]["path"], "{name}");
    }
    assert_eq!(ours["input_drvs"], theirs["inputDrvs"]);
    assert_eq!(ours["input_srcs"], theirs["inputSrcs"]);
    assert_eq!(ours["input_drvs"].as_object().unwrap().len(), 2);

    // A copy named without its hash part gives the same store path.
    let plain = fx.copy("app.drv", |aterm| aterm);
    let copied = fx.inspect(&plain, fx.nix.store_root(), 0);
    assert_eq!(copied, ours);

    // The text form names the same paths.
    let text = support::mvm(
        &fx.home.path().join("state"),
        &[
            "nix",
            "drv",
            "inspect",
            plain.to_str().unwrap(),
            "--store",
            fx.nix.store_root().to_str().unwrap(),
        ],
    );
    assert!(text.status.success());
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.starts_with(&format!("derivation {}\n", fx.drv)),
        "{text}"
    );
    for output in outputs.values() {
        assert!(text.contains(output["path"].as_str().unwrap()), "{text}");
    }
}

#[test]
fn inspect_refuses_bad_derivations_with_codes() {
    let Some(fx) = Fixture::new() else { return };
    let store = fx.nix.store_root();
    let base = fx.drv.base_name();
    let error = |value: Value| value["error"]["code"].as_str().unwrap().to_string();
    let message = |value: &Value| value["error"]["message"].as_str().unwrap().to_string();

    let truncated = fx.copy("truncated.drv", |a| a[..a.len() - 1].to_string());
    assert_eq!(error(fx.inspect(&truncated, store, 65)), "NIX004");

    let unsorted = fx.copy("unsorted.drv", |a| a.replacen("[(\"doc\"", "[(\"zdoc\"", 1));
    assert_eq!(error(fx.inspect(&unsorted, store, 65)), "NIX005");

    // Edited: the output paths it states are no longer those its contents give.
    let edited = fx.copy("edited.drv", |a| {
        a.replace("echo \\\"built", "echo \\\"evil")
    });
    let refused = fx.inspect(&edited, store, 65);
    assert_eq!(error(refused.clone()), "NIX008");
    assert!(message(&refused).contains("output"), "{refused}");

    // Named as another derivation's store path.
    let renamed = fx.copy(&base.replace("-app.drv", "-other.drv"), |a| a);
    let refused = fx.inspect(&renamed, store, 65);
    assert_eq!(error(refused.clone()), "NIX008");
    assert!(message(&refused).contains("file's name"), "{refused}");

    let not_drv = fx.copy("app.txt", |a| a);
    assert_eq!(error(fx.inspect(&not_drv, store, 65)), "NIX002");

    // Input derivations are read from the store given; an empty one has none of them.
    let empty = tempfile::tempdir().unwrap();
    let missing = fx.inspect(&fx.nix.file(&fx.drv), empty.path(), 74);
    assert_eq!(error(missing), "NIX009");
    let absent = fx.home.path().join("absent.drv");
    assert_eq!(error(fx.inspect(&absent, store, 74)), "NIX009");
}
