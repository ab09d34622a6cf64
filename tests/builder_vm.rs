//! The builder VM's image (`mvm builder fetch`): Nix, busybox and CA certificates with what
//! they depend on, from this host's apt, each `.deb` pinned (checked here against the
//! archive's own SHA256 field), plus the static build worker; built into a signed plan that
//! boots, and Nix runs in it. The same packages and worker give the same image, byte for byte;
//! a stored image off its pin is refused.

mod support;

use std::fs;
use std::process::Command;

use support::{describe, guest, text};

#[test]
fn the_builder_image_is_pinned_reproducible_and_runs_nix() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    guest::mvm_json(&home, &["kernel", "fetch"], 0);
    let worker = guest::static_worker().to_str().unwrap().to_string();

    let fetched = guest::mvm_json(&home, &["builder", "fetch", "--worker", &worker], 0);
    let manifest = &fetched["manifest"];
    let packages = manifest["packages"].as_array().unwrap();
    for wanted in ["nix-bin", "busybox-static", "ca-certificates", "libc6"] {
        assert!(
            packages.iter().any(|p| p["package"] == wanted),
            "{wanted} is missing: {manifest}"
        );
    }
    // Each pin is the archive's own: apt's index says the same SHA256 for that version.
    for pinned in packages
        .iter()
        .filter(|p| p["package"] == "nix-bin" || p["package"] == "libc6")
    {
        let name = pinned["package"].as_str().unwrap();
        let version = pinned["version"].as_str().unwrap();
        let shown = Command::new("apt-cache")
            .args(["show", &format!("{name}={version}")])
            .output()
            .unwrap();
        let sha = text(&shown.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("SHA256: ").map(str::to_string))
            .unwrap_or_else(|| panic!("{}", describe(&shown)));
        assert_eq!(pinned["sha256"], format!("sha256:{sha}"), "{pinned}");
    }
    let worker_digest = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            fs::read(&worker).unwrap()
        ))
    );
    assert_eq!(manifest["worker_sha256"], worker_digest.as_str());
    let bundle = &fetched["bundle"];
    let plan = home.join("builder/bundle/plan.dsse.json");
    assert!(plan.is_file(), "{fetched}");

    // The same packages and worker: the same image, rootfs and verity root.
    let again = guest::mvm_json(&home, &["builder", "fetch", "--worker", &worker], 0);
    assert_eq!(again["manifest"]["image_digest"], manifest["image_digest"]);
    assert_eq!(again["bundle"]["rootfs_digest"], bundle["rootfs_digest"]);
    assert_eq!(again["bundle"]["root_hash"], bundle["root_hash"]);

    let doctor = guest::mvm(&home, &["--json", "doctor"]);
    let doctor: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap();
    let row = doctor["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "builder-image")
        .cloned()
        .unwrap_or_default();
    assert_eq!(row["status"], "ok", "{doctor}");

    // It boots from its signed plan, and Nix evaluates in it (as the workload user, with a
    // store of its own); the worker and the CA bundle are where they belong.
    let plan_arg = plan.to_str().unwrap();
    let script = "nix-instantiate --eval --expr '6 * 7'; nix-store --version; \
                  ls -l /usr/libexec/mvm/mvm-build-worker; \
                  grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt";
    let out = guest::mvm(
        &home,
        &["run", "--plan", plan_arg, "--", "sh", "-c", script],
    );
    assert!(out.status.success(), "{}", describe(&out));
    let said = text(&out.stdout);
    let mut lines = said.lines();
    assert_eq!(lines.next(), Some("42"), "{said}");
    assert!(
        lines
            .next()
            .is_some_and(|l| l.starts_with("nix-store (Nix) 2.")),
        "{said}"
    );
    assert!(
        lines.next().is_some_and(|l| l.starts_with("-rwxr-xr-x")),
        "{said}"
    );
    let certificates: u32 = lines.next().unwrap_or("0").trim().parse().unwrap_or(0);
    assert!(certificates > 100, "{said}");

    // A stored image that no longer matches its pin is refused, by `show` and by the doctor.
    let digest = manifest["image_digest"].as_str().unwrap();
    let blob = home
        .join("builder/image/blobs/sha256")
        .join(&digest["sha256:".len()..]);
    let mut bytes = fs::read(&blob).unwrap();
    bytes[10] ^= 1;
    fs::write(&blob, bytes).unwrap();
    let shown = guest::mvm_json(&home, &["builder", "show"], 1);
    assert_eq!(shown["error"]["code"], "BUILDER004", "{shown}");
    let doctor = guest::mvm(&home, &["--json", "doctor"]);
    assert_eq!(doctor.status.code(), Some(1), "{}", describe(&doctor));
}
