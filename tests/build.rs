//! `mvm build` end to end: a busybox image (plus layers exercising whiteouts, an opaque
//! directory, a hardlink and symlinks) pulled by digest from a real registry on loopback, built
//! into a bundle, then checked with the real tools: `fsck.erofs` extracts exactly the expected
//! tree, `veritysetup verify` accepts the hash tree with the plan's root hash, GNU cpio reads the
//! initramfs, `mvm plan verify` admits the plan, and the provenance names what went in.
//!
//! The guest agent arrives with the runner; until then the initramfs carries busybox as a
//! stand-in `/init` (`--agent`), which is all the build needs of it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

mod support;

use support::{dsse_payload as payload, mvm, mvm_json as json};

use mvm_builder::testing::{layer, layer_of, Entry, LocalRegistry, TestLayout, TAR};
use serde_json::Value;

/// One state directory with the kernel fetched, shared by the tests of this file (the fetch
/// downloads ~27 MB).
fn shared_home() -> &'static Path {
    static HOME: OnceLock<tempfile::TempDir> = OnceLock::new();
    HOME.get_or_init(|| {
        let home = support::lasting_tempdir();
        let out = mvm(home.path(), &["kernel", "fetch"]);
        assert!(
            out.status.success(),
            "mvm kernel fetch: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        home
    })
    .path()
}

/// A workload declaration for `image` in `dir`.
fn declare(dir: &Path, reference: &str, digest: &str) -> PathBuf {
    let path = dir.join("mvm.toml");
    fs::write(
        &path,
        format!(
            r#"schema_version = "0"
id = "busybox"

[[apps]]
name = "main"
image = {{ kind = "oci_base", reference = "{reference}", digest = "{digest}" }}
resources = {{ cpu_cores = 1, memory_mb = 256 }}
entrypoints = [{{ kind = "command", command = ["/usr/local/bin/hello"] }}]
env = {{ GREETING = {{ kind = "literal", value = "hi" }}, API_KEY = {{ kind = "secret_ref", name = "api-key" }} }}
"#
        ),
    )
    .unwrap();
    path
}

/// A read-only kernel mount of an EROFS image (as root), unmounted on drop.
struct Mount(PathBuf);

impl Mount {
    fn new(image: &Path, at: &Path) -> Self {
        fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "erofs", "-o", "ro,loop"])
            .arg(image)
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount -t erofs (needs root and erofs): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(at.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn sha256_file(path: &Path) -> String {
    mvm_ir::digest::sha256_prefixed(&fs::read(path).unwrap())
}

/// `mvm build DECLARATION --out OUT` with busybox as the stand-in agent; asserts `status`.
fn build(home: &Path, declaration: &Path, out: &Path, status: i32) -> Value {
    let args = [
        "build",
        declaration.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--agent",
        "/bin/busybox",
    ];
    json(home, &args, status)
}

#[test]
fn build_from_a_registry_checked_with_the_real_tools() {
    let home = shared_home();
    let layout = TestLayout::new();
    let (digest, expected) = layout.busybox();
    let registry = LocalRegistry::start();
    fs::write(layout.dir.path().join("index.json"), format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{digest}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"1"}}}}]}}"#,
        fs::metadata(layout.blob_path(&digest)).unwrap().len()
    )).unwrap();
    registry.push(layout.dir.path(), "1", "mvm/busybox");

    let work = tempfile::tempdir().unwrap();
    let declaration = declare(
        work.path(),
        &format!("{}/mvm/busybox", registry.address),
        &digest,
    );
    let out = work.path().join("bundle");
    let built = build(home, &declaration, &out, 0);
    for file in [
        "rootfs.erofs",
        "rootfs.verity",
        "vmlinuz",
        "initramfs",
        "plan.dsse.json",
        "provenance.dsse.json",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    assert_eq!(built["layers"], 2);
    assert_eq!(built["sandbox"]["seccomp"], true);
    assert!(
        matches!(
            built["sandbox"]["landlock_network"].as_str(),
            Some("full" | "unavailable")
        ),
        "{}",
        built["sandbox"]
    );

    // The plan verifies and pins exactly the bundle's files.
    let verified = json(
        home,
        &[
            "plan",
            "verify",
            out.join("plan.dsse.json").to_str().unwrap(),
        ],
        0,
    );
    assert_eq!(verified["plan_digest"], built["plan_digest"]);
    let plan = payload(&out.join("plan.dsse.json"));
    assert_eq!(
        plan["rootfs"]["digest"].as_str().unwrap(),
        sha256_file(&out.join("rootfs.erofs"))
    );
    assert_eq!(
        plan["rootfs"]["verity"]["digest"].as_str().unwrap(),
        sha256_file(&out.join("rootfs.verity"))
    );
    assert_eq!(
        plan["kernel"]["digest"].as_str().unwrap(),
        sha256_file(&out.join("vmlinuz"))
    );
    assert_eq!(
        plan["initramfs"]["digest"].as_str().unwrap(),
        sha256_file(&out.join("initramfs"))
    );
    assert_eq!(plan["policy"]["secrets"][0]["name"], "api-key");
    assert_eq!(plan["policy"]["env"]["GREETING"], "hi");
    assert_eq!(
        plan["policy"]["env"]["PATH"], "/bin",
        "the image's own environment"
    );
    let root_hash = plan["rootfs"]["verity"]["root_hash"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(plan["kernel"]["cmdline"]
        .as_str()
        .unwrap()
        .contains(&format!("mvm.root_hash={root_hash}")));

    // veritysetup accepts our tree with the signed root hash.
    let verity = Command::new("/usr/sbin/veritysetup")
        .arg("verify")
        .arg(out.join("rootfs.erofs"))
        .arg(out.join("rootfs.verity"))
        .arg(&root_hash)
        .output()
        .expect("veritysetup (cryptsetup-bin)");
    assert!(
        verity.status.success(),
        "veritysetup verify: {}",
        String::from_utf8_lossy(&verity.stderr)
    );

    // fsck.erofs checks the image and extracts exactly the image's tree.
    let extracted = work.path().join("extracted");
    let fsck = Command::new("fsck.erofs")
        .arg(format!("--extract={}", extracted.display()))
        .arg(out.join("rootfs.erofs"))
        .output()
        .expect("fsck.erofs (erofs-utils)");
    assert!(
        fsck.status.success(),
        "fsck.erofs: {}",
        String::from_utf8_lossy(&fsck.stderr)
    );
    for (path, content) in &expected {
        assert_eq!(&fs::read(extracted.join(path)).unwrap(), content, "{path}");
    }
    assert!(
        !extracted.join("etc/old.conf").exists(),
        "the whiteout removed it"
    );
    assert!(
        !extracted.join("var/cache/stale").exists(),
        "the opaque directory hid it"
    );
    assert_eq!(
        fs::read_link(extracted.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(
        fs::read_link(extracted.join("etc/motd.link")).unwrap(),
        Path::new("/etc/motd")
    );
    // fsck.erofs 1.5 extracts hardlinks as copies: the kernel's own mount shows the inodes.
    let mount = Mount::new(&out.join("rootfs.erofs"), &work.path().join("mnt"));
    use std::os::unix::fs::MetadataExt;
    let (a, b) = (
        fs::metadata(mount.0.join("srv/data.txt")).unwrap(),
        fs::metadata(mount.0.join("srv/data-link.txt")).unwrap(),
    );
    assert_eq!(a.ino(), b.ino(), "the hardlink shares its inode");
    assert_eq!(a.nlink(), 2);
    assert_eq!(a.mode() & 0o777, 0o640);
    drop(mount);
    for dir in ["proc", "sys", "dev", "tmp", "run"] {
        assert!(extracted.join(dir).is_dir(), "mount point /{dir}");
    }

    // The initramfs holds /init and the modules in their load order.
    let cpio = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "gzip -dc {} | cpio -t --quiet",
            out.join("initramfs").display()
        ))
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&cpio.stdout);
    for member in [
        "init",
        "lib/modules/dm_verity.ko",
        "lib/modules/erofs.ko",
        "etc/mvm/modules",
    ] {
        assert!(
            listing.lines().any(|l| l == member),
            "{member} not in the initramfs:\n{listing}"
        );
    }

    // The provenance verifies and names the image, its layers and the plan.
    let provenance = payload(&out.join("provenance.dsse.json"));
    assert_eq!(
        provenance["predicateType"],
        "https://slsa.dev/provenance/v1"
    );
    let subjects = provenance["subject"].as_array().unwrap();
    let plan_subject = subjects.iter().find(|s| s["name"] == "plan").unwrap();
    assert_eq!(
        format!(
            "sha256:{}",
            plan_subject["digest"]["sha256"].as_str().unwrap()
        ),
        built["plan_digest"].as_str().unwrap()
    );
    let deps = provenance["predicate"]["buildDefinition"]["resolvedDependencies"]
        .as_array()
        .unwrap();
    assert!(deps
        .iter()
        .any(|d| format!("sha256:{}", d["digest"]["sha256"].as_str().unwrap()) == digest));
    assert_eq!(
        deps.iter()
            .filter(|d| d["name"].as_str().unwrap().starts_with("layer "))
            .count(),
        2
    );

    // An image named by tag builds only as an explicit development build, which records the
    // digest the tag resolved to.
    let tagged = format!("{}/mvm/busybox:1", registry.address);
    let unpinned = work.path().join("unpinned");
    let refused = json(
        home,
        &[
            "build",
            "--image",
            &tagged,
            "--out",
            unpinned.to_str().unwrap(),
            "--agent",
            "/bin/busybox",
        ],
        65,
    );
    assert_eq!(refused["error"]["code"], "OCI001");
    let dev = json(
        home,
        &[
            "build",
            "--image",
            &tagged,
            "--allow-unpinned",
            "--profile",
            "dev",
            "--out",
            unpinned.to_str().unwrap(),
            "--agent",
            "/bin/busybox",
        ],
        0,
    );
    assert_eq!(
        dev["rootfs_digest"], built["rootfs_digest"],
        "the tag resolved to the same image"
    );
    let dev_plan = payload(&unpinned.join("plan.dsse.json"));
    assert_eq!(dev_plan["policy"]["profile"], "dev");
    assert_eq!(
        dev_plan["entrypoint"]["command"],
        serde_json::json!(["/bin/sh"]),
        "the image's own Cmd"
    );
    let dev_provenance = payload(&unpinned.join("provenance.dsse.json"));
    let image_dep = &dev_provenance["predicate"]["buildDefinition"]["resolvedDependencies"][0];
    assert_eq!(image_dep["uri"], format!("oci:{tagged}"));
    assert_eq!(
        format!("sha256:{}", image_dep["digest"]["sha256"].as_str().unwrap()),
        digest
    );

    // Reproducible, and served from the cache: with the registry gone, a second build gives
    // the same image bytes and root hash.
    drop(registry);
    let again = work.path().join("again");
    let rebuilt = build(home, &declaration, &again, 0);
    assert_eq!(rebuilt["rootfs_digest"], built["rootfs_digest"]);
    assert_eq!(rebuilt["root_hash"], built["root_hash"]);
    assert_eq!(
        sha256_file(&again.join("rootfs.verity")),
        sha256_file(&out.join("rootfs.verity"))
    );
    assert_eq!(
        sha256_file(&again.join("initramfs")),
        sha256_file(&out.join("initramfs"))
    );

    // Building over an existing bundle replaces it whole.
    build(home, &declaration, &out, 0);
    json(
        home,
        &[
            "plan",
            "verify",
            out.join("plan.dsse.json").to_str().unwrap(),
        ],
        0,
    );
}

#[test]
fn a_tampered_layer_fails_the_build_and_leaves_no_bundle() {
    let home = shared_home();
    // An image of its own (the shared blob cache already holds the busybox layers, verified,
    // and would rightly serve them whatever the source now holds).
    let layout = TestLayout::new();
    let unique = format!("{:?}", std::time::SystemTime::now());
    let tar = layer(&[("etc/unique", unique.as_bytes())]);
    let (digest, _) = layout.image("amd64", &[(TAR, tar.clone(), tar.clone())]);
    // Corrupt the layer blob in the layout the workload names.
    let mut bytes = tar;
    bytes[600] ^= 0xff;
    fs::write(
        layout.blob_path(&mvm_builder::testing::sha(&layer(&[(
            "etc/unique",
            unique.as_bytes(),
        )]))),
        bytes,
    )
    .unwrap();

    let work = tempfile::tempdir().unwrap();
    let declaration = declare(
        work.path(),
        &format!("oci:{}", layout.dir.path().display()),
        &digest,
    );
    let out = work.path().join("bundle");
    let refused = build(home, &declaration, &out, 1);
    assert_eq!(refused["error"]["code"], "OCI002");
    assert!(!out.exists(), "no bundle is left behind");
    let leftovers: Vec<_> = fs::read_dir(work.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "only the declaration remains: {leftovers:?}"
    );

    // Other refusals: no such app, a missing agent, a directory that is not a bundle.
    let refusal = |out: &Path, agent: &str, extra: &[&str]| -> Value {
        let mut args = vec![
            "build",
            declaration.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--agent",
            agent,
        ];
        args.extend_from_slice(extra);
        json(home, &args, 65)
    };
    assert_eq!(
        refusal(&out, "/bin/busybox", &["--app", "nope"])["error"]["code"],
        "BUILD007"
    );
    assert_eq!(
        refusal(&out, "/nonexistent", &[])["error"]["code"],
        "BUILD008"
    );
    assert_eq!(
        refusal(work.path(), "/bin/busybox", &[])["error"]["code"],
        "BUILD009"
    );
}

#[test]
fn an_image_builds_without_a_declaration() {
    let home = shared_home();
    let layout = TestLayout::new();
    let (digest, _) = layout.busybox();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("bundle");
    let image = format!("oci:{}@{digest}", layout.dir.path().display());
    let args = [
        "build",
        "--image",
        &image,
        "--out",
        out.to_str().unwrap(),
        "--agent",
        "/bin/busybox",
        "--",
        "/bin/echo",
        "hi",
    ];
    let built = json(home, &args, 0);
    let plan = payload(&out.join("plan.dsse.json"));
    assert_eq!(
        plan["entrypoint"]["command"],
        serde_json::json!(["/bin/echo", "hi"])
    );
    assert_eq!(plan["policy"]["profile"], "standard");
    json(
        home,
        &[
            "plan",
            "verify",
            out.join("plan.dsse.json").to_str().unwrap(),
        ],
        0,
    );
    // The same image as an `oci-archive:`, which the worker unpacks itself (no network, no
    // cache), builds the same root filesystem.
    let archive = work.path().join("busybox.tar");
    support::tar_dir(layout.dir.path(), &archive);
    let from_archive = work.path().join("from-archive");
    let archived = json(
        home,
        &[
            "build",
            "--image",
            &format!("oci-archive:{}@{digest}", archive.display()),
            "--out",
            from_archive.to_str().unwrap(),
            "--agent",
            "/bin/busybox",
        ],
        0,
    );
    assert_eq!(archived["rootfs_digest"], built["rootfs_digest"]);
    assert_eq!(
        archived["sandbox"]["landlock"],
        built["sandbox"]["landlock"]
    );
    // A tag without --allow-unpinned, or a bad reference, is refused before anything is built.
    let refused = json(
        home,
        &[
            "build",
            "--image",
            "busybox",
            "--out",
            out.to_str().unwrap(),
        ],
        65,
    );
    assert_eq!(refused["error"]["code"], "OCI001");
}

/// A root filesystem as distributions make them (mmdebstrap's Debian holds `/dev/console`,
/// `/dev/null` and friends) builds: the device nodes are skipped, counted and named in the
/// output and the signed provenance, and the image `fsck.erofs` accepts holds none of them.
#[test]
fn device_nodes_in_a_layer_are_skipped_and_named() {
    let home = shared_home();
    let layout = TestLayout::new();
    let tar = layer_of(&[
        Entry::Dir("dev"),
        Entry::CharDevice("dev/console", 5, 1),
        Entry::CharDevice("dev/null", 1, 3),
        Entry::File("etc/debian_version", b"12.11\n", 0o644),
    ]);
    let (digest, _) = layout.image("amd64", &[(TAR, tar.clone(), tar)]);
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("bundle");
    let image = format!("oci:{}@{digest}", layout.dir.path().display());
    let build_args = |out: &Path| -> Vec<String> {
        ["build", "--image", &image, "--out", out.to_str().unwrap()]
            .into_iter()
            .chain(["--agent", "/bin/busybox"])
            .map(String::from)
            .collect()
    };
    let args = build_args(&out);
    let built = json(
        home,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        0,
    );
    let expected = serde_json::json!({"total": 2, "named": [
        {"path": "/dev/console", "kind": "char"},
        {"path": "/dev/null", "kind": "char"},
    ]});
    assert_eq!(built["skipped_entries"], expected);
    let provenance = payload(&out.join("provenance.dsse.json"));
    assert_eq!(
        provenance["predicate"]["buildDefinition"]["internalParameters"]["skipped_entries"],
        expected
    );

    let extracted = work.path().join("extracted");
    let fsck = Command::new("fsck.erofs")
        .arg(format!("--extract={}", extracted.display()))
        .arg(out.join("rootfs.erofs"))
        .output()
        .expect("fsck.erofs (erofs-utils)");
    assert!(
        fsck.status.success(),
        "fsck.erofs: {}",
        String::from_utf8_lossy(&fsck.stderr)
    );
    assert!(extracted.join("dev").is_dir());
    assert_eq!(fs::read_dir(extracted.join("dev")).unwrap().count(), 0);
    assert_eq!(
        fs::read(extracted.join("etc/debian_version")).unwrap(),
        b"12.11\n"
    );

    // The human output says so in one line.
    let again = work.path().join("again");
    let args = build_args(&again);
    let human = mvm(home, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(human.status.success());
    let stdout = String::from_utf8_lossy(&human.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("skipped 2 device nodes and FIFOs")
                && l.ends_with(": /dev/console, /dev/null")),
        "{stdout}"
    );
}

/// `mvm build --image REF [--entrypoint X] [-- CMD…]` for an image whose config sets
/// Entrypoint, Cmd, Env (one of them LD_PRELOAD), WorkingDir, User, Labels and ExposedPorts.
/// Returns the JSON result, the plan, the provenance and what went to stderr.
fn build_configured(
    home: &Path,
    user: &str,
    extra: &[&str],
    out: &Path,
) -> (Value, Value, Value, String) {
    let layout = TestLayout::new();
    let tar = layer_of(&[
        Entry::Dir("etc"),
        Entry::File("etc/group", b"root:x:0:\nstaff:x:50:\n", 0o644),
        Entry::Dir("srv"),
    ]);
    let config = serde_json::json!({
        "Entrypoint": ["/bin/sh", "-c"],
        "Cmd": ["echo $GREETING from $(pwd)"],
        "Env": ["PATH=/bin", "GREETING=hello", "LD_PRELOAD=/lib/evil.so"],
        "WorkingDir": "/srv",
        "User": user,
        "Labels": {"org.opencontainers.image.title": "configured"},
        "ExposedPorts": {"8080/tcp": {}},
    });
    let (digest, _) = layout.image_with_config("amd64", config, &[(TAR, tar.clone(), tar)]);
    let image = format!("oci:{}@{digest}", layout.dir.path().display());
    let mut args = vec![
        "--json",
        "build",
        "--image",
        &image,
        "--out",
        out.to_str().unwrap(),
        "--agent",
        "/bin/busybox",
    ];
    args.extend_from_slice(extra);
    let ran = mvm(home, &args);
    let stderr = String::from_utf8_lossy(&ran.stderr).into_owned();
    assert!(ran.status.success(), "mvm build: {stderr}");
    let result: Value = serde_json::from_slice(&ran.stdout).unwrap();
    let plan = payload(&out.join("plan.dsse.json"));
    let provenance = payload(&out.join("provenance.dsse.json"));
    (result, plan, provenance, stderr)
}

/// The image's own config reaches the signed plan as `docker run` composes it: Entrypoint +
/// Cmd (a `--` command replaces Cmd; `--entrypoint` replaces Entrypoint and drops Cmd), Env
/// under the plan's (LD_PRELOAD dropped, said once), WorkingDir as the cwd, User as the
/// commands' default user (root mapped to the workload user, said once); Labels and
/// ExposedPorts land in the provenance, not the plan.
#[test]
fn an_images_config_is_honoured_as_docker_run_does() {
    let home = shared_home();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("bundle");

    let (result, plan, provenance, stderr) = build_configured(home, "2000:staff", &[], &out);
    let entrypoint = &plan["entrypoint"];
    assert_eq!(
        entrypoint["command"],
        serde_json::json!(["/bin/sh", "-c", "echo $GREETING from $(pwd)"])
    );
    assert_eq!(entrypoint["cwd"], "/srv");
    // A group name is turned into its gid from the image's /etc/group.
    assert_eq!(entrypoint["user"], "2000:50");
    let env = &plan["policy"]["env"];
    assert_eq!(env["GREETING"], "hello");
    assert_eq!(env["PATH"], "/bin");
    assert!(env.get("LD_PRELOAD").is_none(), "{env}");
    assert_eq!(
        stderr.matches("LD_PRELOAD").count(),
        1,
        "LD_PRELOAD dropped, said once: {stderr}"
    );
    assert_eq!(result["warnings"].as_array().unwrap().len(), 1);
    assert!(
        !plan.to_string().contains("8080"),
        "ports stay out of the plan"
    );
    let image = &provenance["predicate"]["buildDefinition"]["resolvedDependencies"][0];
    assert_eq!(image["name"], "image");
    assert_eq!(
        image["annotations"]["labels"]["org.opencontainers.image.title"],
        "configured"
    );
    assert_eq!(
        image["annotations"]["exposed_ports"],
        serde_json::json!(["8080/tcp"])
    );

    // `-- CMD` replaces Cmd and keeps Entrypoint.
    let (_, plan, _, _) = build_configured(home, "2000", &["--", "echo replaced"], &out);
    assert_eq!(
        plan["entrypoint"]["command"],
        serde_json::json!(["/bin/sh", "-c", "echo replaced"])
    );
    assert_eq!(plan["entrypoint"]["user"], "2000");
    // `--entrypoint X` replaces Entrypoint and drops Cmd; with `--`, the command follows it.
    let (_, plan, _, _) = build_configured(home, "2000", &["--entrypoint", "/bin/echo"], &out);
    assert_eq!(
        plan["entrypoint"]["command"],
        serde_json::json!(["/bin/echo"])
    );
    let (_, plan, _, _) = build_configured(
        home,
        "2000",
        &["--entrypoint", "/bin/echo", "--", "hi", "there"],
        &out,
    );
    assert_eq!(
        plan["entrypoint"]["command"],
        serde_json::json!(["/bin/echo", "hi", "there"])
    );

    // Root, by name or number: no user in the plan (the workload user), said once.
    for root in ["root", "0:0"] {
        let (result, plan, _, stderr) = build_configured(home, root, &[], &out);
        assert!(plan["entrypoint"].get("user").is_none(), "{plan}");
        let said = "the image runs as root; mvm runs it as the workload user 1000";
        assert_eq!(stderr.matches(said).count(), 1, "{stderr}");
        assert_eq!(result["warnings"].as_array().unwrap().len(), 2);
    }
}
