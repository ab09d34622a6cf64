//! A real distribution image for the end-to-end tests: Debian bookworm made by `mmdebstrap`
//! (the `minbase` variant plus the packages the tests run), wrapped as a one-layer OCI image
//! layout, its tarball as mmdebstrap wrote it — device nodes (`/dev/null`, `/dev/console`, …)
//! included, as real images have them.
//!
//! Making it costs ~20 s and a download, so it is made once and kept under the target directory,
//! `target/tmp/test-images/debian-<key>/`, where `<key>` digests everything that goes into it
//! (suite, variant, packages, options, `SOURCE_DATE_EPOCH`): a later test run, or another test
//! binary, finds it there. A file lock beside it makes parallel test binaries wait for the one
//! making it, and a `OnceLock` the threads of one binary. It is made in a temporary directory
//! beside its final name and renamed into place, so an interrupted run leaves nothing half-made
//! under that name.
//!
//! No package mirror is named here: mmdebstrap uses its default. `SOURCE_DATE_EPOCH` clamps every
//! time in the tarball, so the same package versions make the same bytes; the mirror's versions
//! move on, which a cached image does not see until the target directory is cleaned.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

use mvm_builder::testing::{TestLayout, TAR};
use serde_json::{json, Value};

/// The suite.
const SUITE: &str = "bookworm";

/// What the image holds beyond `minbase`: `python3` (the smallest set with `ssl`, `sqlite3` and
/// `json`: `python3-minimal` has no `sqlite3`), `nodejs` (the tool contract's `node`), the
/// dynamic `busybox`, and `curl` (the egress tests' HTTPS client).
pub const PACKAGES: &[&str] = &["python3", "nodejs", "busybox", "curl"];

/// `SOURCE_DATE_EPOCH` of the tarball: 2023-11-14.
const EPOCH: &str = "1700000000";

/// mmdebstrap's options besides the suite and the target.
fn options() -> Vec<String> {
    let mut options = vec![
        "--variant=minbase".to_string(),
        format!("--include={}", PACKAGES.join(",")),
        // A merged /usr made by mmdebstrap itself, so that apt does not pull in `usrmerge` and
        // the whole of Perl with it.
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr".to_string(),
        "--aptopt=Acquire::Retries \"3\"".to_string(),
        "--format=tar".to_string(),
        "--quiet".to_string(),
    ];
    // What no test reads: documentation, manual pages, translations (a third of the size).
    for dir in ["doc", "man", "info", "locale"] {
        options.push(format!("--dpkgopt=path-exclude=/usr/share/{dir}/*"));
    }
    options
}

/// The image's config, as Debian's own container images have it.
fn config() -> Value {
    json!({
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Cmd": ["bash"],
    })
}

/// The Debian image, made (or found) once per test run.
pub struct DebianImage {
    /// The OCI image layout directory (it outlives the test run).
    pub layout: PathBuf,
    /// `oci:DIR@sha256:…` of the image index.
    pub reference: String,
    /// How long making (or finding) it took.
    pub took: std::time::Duration,
    /// Whether this test run made it (not found in the cache).
    pub made: bool,
}

/// The Debian image: from the cache, or made now (see the module's doc).
pub fn bookworm() -> &'static DebianImage {
    static IMAGE: OnceLock<DebianImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let started = Instant::now();
        let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-images");
        fs::create_dir_all(&cache).unwrap();
        let mut recipe = vec![SUITE.to_string(), format!("SOURCE_DATE_EPOCH={EPOCH}")];
        recipe.extend(options());
        recipe.push(config().to_string());
        let key = &mvm_builder::testing::sha(recipe.join("\n").as_bytes())[7..23];
        let layout = cache.join(format!("debian-{key}"));

        let lock = fs::File::create(cache.join(format!("debian-{key}.lock"))).unwrap();
        lock.lock().unwrap();
        let made = !layout.join("index.json").exists();
        if made {
            make(&cache, &layout);
        }
        drop(lock);

        let index: Value =
            serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
        let digest = index["manifests"][0]["digest"]
            .as_str()
            .unwrap()
            .to_string();
        DebianImage {
            reference: format!("oci:{}@{digest}", layout.display()),
            layout,
            took: started.elapsed(),
            made,
        }
    })
}

/// Runs mmdebstrap into a tarball in `cache`, then writes the layout beside `layout` and renames
/// it into place.
fn make(cache: &Path, layout: &Path) {
    let staging = tempfile::tempdir_in(cache).unwrap();
    let tarball = staging.path().join("rootfs.tar");
    let out = Command::new("mmdebstrap")
        .args(options())
        .arg(SUITE)
        .arg(&tarball)
        .env("SOURCE_DATE_EPOCH", EPOCH)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "mmdebstrap could not start ({e}): the Debian image test needs it; \
                 `scripts/deps --test` installs it (Debian's mmdebstrap package)"
            )
        });
    assert!(
        out.status.success(),
        "mmdebstrap {SUITE} failed: {}",
        super::describe(&out)
    );

    let tar = fs::read(&tarball).unwrap();
    fs::remove_file(&tarball).unwrap();
    let image = TestLayout::new_in(cache);
    let (manifest, size) = image.image_with_config("amd64", config(), &[(TAR, tar.clone(), tar)]);
    image.index(&[(manifest, size, "amd64")], SUITE);
    fs::rename(image.dir.keep(), layout).unwrap();
}
