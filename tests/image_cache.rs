//! The managed image cache end to end: `mvm image ls | rm | prune` and `mvm system df`, with
//! real builds from OCI layouts, one real VM (`mvm up`, shared by the checks that need one),
//! and a prune killed midway.

mod support;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use mvm_builder::testing::{gzip, layer, layer_of, Entry, TestLayout, TAR, TAR_GZIP};
use serde_json::Value;

use support::{describe, guest};

/// A home with a kernel fetched once; each test copies it into a home of its own.
fn kernel_home() -> &'static Path {
    static HOME: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, home) = HOME.get_or_init(|| {
        let dir = support::lasting_tempdir();
        let home = dir.path().join("home");
        support::mvm_json(&home, &["kernel", "fetch"], 0);
        (dir, home)
    });
    home
}

/// A fresh home holding the fetched kernel.
fn fresh_home(dir: &Path) -> PathBuf {
    let home = dir.join("home");
    let out = Command::new("cp")
        .arg("-a")
        .arg(kernel_home())
        .arg(&home)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    home
}

use guest::{command, mvm, mvm_json as json};

fn build(home: &Path, image: &str, out: &Path) -> Value {
    json(
        home,
        &[
            "build",
            "--image",
            image,
            "--out",
            out.to_str().unwrap(),
            "--",
            "echo",
            "hi",
        ],
        0,
    )
}

/// A layout with two images sharing their first layer (busybox), each with a layer of its
/// own; their references.
fn two_images(layout: &TestLayout) -> (String, String) {
    let busybox = fs::read("/bin/busybox").unwrap();
    let base = layer_of(&[
        Entry::Dir("bin"),
        Entry::File("bin/busybox", &busybox, 0o755),
        Entry::Symlink("bin/sh", "busybox"),
        Entry::Symlink("bin/echo", "busybox"),
        Entry::Symlink("bin/sleep", "busybox"),
    ]);
    let one = layer(&[("etc/which", b"one\n")]);
    let two = layer(&[("etc/which", b"two\n")]);
    let image = |own: Vec<u8>| {
        let (digest, _) = layout.image(
            "amd64",
            &[
                (TAR_GZIP, gzip(&base), base.clone()),
                (TAR, own.clone(), own),
            ],
        );
        format!("oci:{}@{digest}", layout.dir.path().display())
    };
    (image(one), image(two))
}

fn digest_of(image: &str) -> &str {
    image.rsplit_once('@').unwrap().1
}

/// The blob files of the image `digest` in `layout`: manifest, config, layers.
fn layout_blobs(layout: &TestLayout, digest: &str) -> Vec<String> {
    let manifest: Value =
        serde_json::from_slice(&fs::read(layout.blob_path(digest)).unwrap()).unwrap();
    let mut blobs = vec![digest.to_string()];
    blobs.push(manifest["config"]["digest"].as_str().unwrap().to_string());
    for layer in manifest["layers"].as_array().unwrap() {
        blobs.push(layer["digest"].as_str().unwrap().to_string());
    }
    blobs
}

fn cached(home: &Path, digest: &str) -> PathBuf {
    home.join("cache/blobs/sha256").join(&digest[7..])
}

fn images(listing: &Value) -> Vec<&Value> {
    listing["images"].as_array().unwrap().iter().collect()
}

/// Every image `ls` lists has all its blobs in the cache, and nothing half-removed is left.
fn assert_consistent(home: &Path) -> Value {
    let listing = json(home, &["image", "ls"], 0);
    for image in images(&listing) {
        assert_eq!(image["missing_blobs"], serde_json::json!([]), "{image}");
        for blob in image["blobs"].as_array().unwrap() {
            let path = cached(home, blob["digest"].as_str().unwrap());
            assert!(path.is_file(), "{} is named but gone", path.display());
        }
    }
    assert!(
        !home.join("cache/removal.json").exists(),
        "the removal was not finished"
    );
    listing
}

#[test]
fn two_images_are_listed_and_removing_one_keeps_the_shared_blobs() {
    let work = tempfile::tempdir().unwrap();
    let home = fresh_home(work.path());
    let layout = TestLayout::new();
    let (one, two) = two_images(&layout);
    let (out_one, out_two) = (work.path().join("one"), work.path().join("two"));
    build(&home, &one, &out_one);
    let built_two = build(&home, &two, &out_two);

    let listing = json(&home, &["image", "ls"], 0);
    let listed = images(&listing);
    assert_eq!(listed.len(), 2, "{listing}");
    for (image, out) in [(&one, &out_one), (&two, &out_two)] {
        let digest = digest_of(image);
        let entry = listed.iter().find(|i| i["digest"] == digest).unwrap();
        let blobs = layout_blobs(&layout, digest);
        let size: u64 = blobs
            .iter()
            .map(|b| fs::metadata(layout.blob_path(b)).unwrap().len())
            .sum();
        assert_eq!(entry["size"], size, "{entry}");
        assert_eq!(entry["blobs"].as_array().unwrap().len(), blobs.len());
        assert_eq!(entry["references"][0], image.rsplit_once('@').unwrap().0);
        assert_eq!(entry["bundles"][0]["path"], out.to_str().unwrap());
        assert_eq!(entry["bundles"][0]["managed"], false);
        assert_eq!(entry["used_by"], serde_json::json!([]));
        // Its own layer and config are unique; the busybox layer is shared.
        assert!(entry["unique_size"].as_u64().unwrap() < size);
    }
    assert_eq!(
        listed
            .iter()
            .find(|i| i["digest"] == digest_of(&two))
            .unwrap()["bundles"][0]["plan_digest"],
        built_two["plan_digest"]
    );
    // The table, for people.
    let table = mvm(&home, &["image", "ls"]);
    let text = support::text(&table.stdout);
    assert!(
        text.contains("REFERENCE") && text.contains(&digest_of(&one)[..19]),
        "{text}"
    );

    // Unknown, too short, ambiguous: refused with their codes.
    let unknown = json(&home, &["image", "rm", "sha256:0123456789abcdef"], 65);
    assert_eq!(unknown["error"]["code"], "CACHE001");
    let short = json(&home, &["image", "rm", &digest_of(&one)[7..15]], 65);
    assert_eq!(short["error"]["code"], "CACHE003");
    let reference = one.rsplit_once('@').unwrap().0;
    let ambiguous = json(&home, &["image", "rm", reference], 65);
    assert_eq!(ambiguous["error"]["code"], "CACHE002", "{ambiguous}");

    // Removing the first by a 12-digit prefix keeps the layer the second shares.
    let prefix = &digest_of(&one)[7..19];
    let removed = json(&home, &["image", "rm", prefix], 0);
    assert_eq!(
        removed["removed"][0]["images"][0]["digest"],
        digest_of(&one)
    );
    let (blobs_one, blobs_two) = (
        layout_blobs(&layout, digest_of(&one)),
        layout_blobs(&layout, digest_of(&two)),
    );
    for blob in &blobs_one {
        assert_eq!(
            cached(&home, blob).exists(),
            blobs_two.contains(blob),
            "{blob}"
        );
    }
    // The user's bundle is never removed.
    assert!(out_one.join("plan.dsse.json").is_file());
    let listing = assert_consistent(&home);
    assert_eq!(images(&listing).len(), 1);
    assert_eq!(images(&listing)[0]["digest"], digest_of(&two));

    // The second still builds, from the cache alone: the layout has no blobs any more.
    for entry in fs::read_dir(layout.dir.path().join("blobs/sha256")).unwrap() {
        fs::remove_file(entry.unwrap().path()).unwrap();
    }
    build(&home, &two, &work.path().join("two-again"));
    let listing = json(&home, &["image", "ls"], 0);
    assert_eq!(images(&listing)[0]["bundles"].as_array().unwrap().len(), 2);

    let df = json(&home, &["system", "df"], 0);
    let row = |what: &str| {
        df["usage"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["what"] == what)
            .unwrap()
            .clone()
    };
    assert_eq!(row("images")["count"], 1);
    assert_eq!(row("images")["size"], images(&listing)[0]["size"]);
    assert_eq!(row("images")["reclaimable"], images(&listing)[0]["size"]);
    assert_eq!(row("bundles")["count"], 2);
    assert_eq!(row("kernels")["count"], 1);
}

#[test]
fn a_prune_killed_midway_leaves_a_consistent_cache_and_is_finished_by_the_next_command() {
    let work = tempfile::tempdir().unwrap();
    let home = fresh_home(work.path());
    let layout = TestLayout::new();
    let (one, _) = two_images(&layout);
    // Many blobs: an image of 60 layers.
    let layers: Vec<_> = (0..60)
        .map(|i| {
            let tar = layer(&[(format!("data/{i}").as_str(), format!("{i}\n").as_bytes())]);
            (TAR, tar.clone(), tar)
        })
        .collect();
    let mut all = vec![];
    let busybox = fs::read("/bin/busybox").unwrap();
    let base = layer_of(&[
        Entry::Dir("bin"),
        Entry::File("bin/busybox", &busybox, 0o755),
        Entry::Symlink("bin/sh", "busybox"),
    ]);
    all.push((TAR, base.clone(), base));
    all.extend(layers);
    let (digest, _) = layout.image("amd64", &all);
    let many = format!("oci:{}@{digest}", layout.dir.path().display());
    build(&home, &one, &work.path().join("one"));
    build(&home, &many, &work.path().join("many"));
    // A damaged record is reported, never fatal.
    let damaged = home
        .join("cache/images")
        .join(format!("{}.json", "ab".repeat(32)));
    fs::write(&damaged, b"{not json").unwrap();
    let listing = json(&home, &["image", "ls"], 0);
    assert_eq!(images(&listing).len(), 2);
    assert_eq!(listing["damaged"][0]["path"], damaged.to_str().unwrap());
    let text = mvm(&home, &["image", "ls"]);
    assert!(
        support::text(&text.stderr).contains("CACHE006"),
        "{}",
        describe(&text)
    );

    // Paused after 10 removals, then killed.
    let mut prune = command(&home, &["image", "prune", "--all"])
        .env("MVM_TEST_PAUSE_AFTER_REMOVALS", "10")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(prune.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("paused after 10") {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "prune ended without pausing"
        );
    }
    prune.kill().unwrap();
    prune.wait().unwrap();
    assert!(
        home.join("cache/removal.json").exists(),
        "no removal was under way"
    );
    let left = fs::read_dir(home.join("cache/blobs/sha256"))
        .unwrap()
        .count();
    assert!(left > 0, "the prune was not killed midway");

    // The next command finishes it: no record names a missing blob, nothing is half gone.
    let listing = assert_consistent(&home);
    assert_eq!(images(&listing).len(), 0, "{listing}");
    assert_eq!(listing["damaged"], serde_json::json!([]));
    let pruned = json(&home, &["image", "prune", "--all"], 0);
    assert_eq!(pruned["images"], serde_json::json!([]), "{pruned}");
    assert_eq!(
        fs::read_dir(home.join("cache/blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
    // And a build works again.
    build(&home, &many, &work.path().join("many-again"));
    assert_eq!(images(&assert_consistent(&home)).len(), 1);
}

#[test]
fn a_prune_keeps_and_rm_refuses_what_a_named_vm_needs() {
    let work = tempfile::tempdir().unwrap();
    let home = fresh_home(work.path());
    let layout = TestLayout::new();
    let (one, two) = two_images(&layout);
    build(&home, &two, &work.path().join("two"));
    let up = mvm(&home, &["up", &one, "--name", "web", "--", "sleep", "600"]);
    assert!(up.status.success(), "{}", describe(&up));
    struct RemoveOnDrop<'a>(&'a Path);
    impl Drop for RemoveOnDrop<'_> {
        fn drop(&mut self) {
            let _ = mvm(self.0, &["rm", "--force", "web"]);
        }
    }
    let _web = RemoveOnDrop(&home);

    let listing = json(&home, &["image", "ls"], 0);
    let entry = images(&listing)
        .into_iter()
        .find(|i| i["digest"] == digest_of(&one))
        .unwrap()
        .clone();
    assert_eq!(entry["used_by"], serde_json::json!(["web"]));
    assert_eq!(entry["bundles"][0]["managed"], true);
    let kept_bundle = PathBuf::from(entry["bundles"][0]["path"].as_str().unwrap());

    let refused = json(&home, &["image", "rm", digest_of(&one)], 65);
    assert_eq!(refused["error"]["code"], "CACHE004");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("web"),
        "{refused}"
    );
    let text = mvm(&home, &["image", "rm", digest_of(&one)]);
    assert_eq!(text.status.code(), Some(65));
    assert!(
        support::text(&text.stderr).contains("error[CACHE004]"),
        "{}",
        describe(&text)
    );

    let pruned = json(&home, &["image", "prune", "--all"], 0);
    assert_eq!(pruned["kept"][0]["digest"], digest_of(&one), "{pruned}");
    assert_eq!(pruned["kept"][0]["needed_by"], serde_json::json!(["web"]));
    assert_eq!(pruned["images"][0]["digest"], digest_of(&two));
    assert!(kept_bundle.join("plan.dsse.json").is_file());
    let listing = assert_consistent(&home);
    assert_eq!(images(&listing).len(), 1);

    let df = json(&home, &["system", "df"], 0);
    let vms = df["usage"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["what"] == "vms")
        .unwrap();
    assert_eq!(vms["count"], 1);
    assert_eq!(vms["reclaimable"], 0, "a running VM is not reclaimable");

    // Saved cold (no runner, its state on disk), the VM still needs it.
    let cold = mvm(&home, &["pause", "web", "--cold"]);
    assert!(cold.status.success(), "{}", describe(&cold));
    let refused = json(&home, &["image", "rm", digest_of(&one)], 65);
    assert_eq!(refused["error"]["code"], "CACHE004", "{refused}");
    let pruned = json(&home, &["image", "prune", "--all"], 0);
    assert_eq!(pruned["kept"][0]["digest"], digest_of(&one), "{pruned}");
    assert_eq!(pruned["kept"][0]["needed_by"], serde_json::json!(["web"]));
    assert!(kept_bundle.join("plan.dsse.json").is_file());

    // Stopped (the cold state discarded), the VM still needs it; removed, it does not.
    let stop = mvm(&home, &["stop", "web"]);
    assert!(stop.status.success(), "{}", describe(&stop));
    assert_eq!(
        json(&home, &["image", "rm", digest_of(&one)], 65)["error"]["code"],
        "CACHE004"
    );
    let rm = mvm(&home, &["rm", "web"]);
    assert!(rm.status.success(), "{}", describe(&rm));
    let pruned = json(&home, &["image", "prune", "--all"], 0);
    assert_eq!(pruned["images"][0]["digest"], digest_of(&one), "{pruned}");
    assert!(!kept_bundle.exists(), "the bundle mvm kept for it stays");
    assert!(pruned["bytes_freed"].as_u64().unwrap() > 0);
}
