//! Compressed images end to end: `mvm build --compress lz4hc` writes LZ4 HC clusters that
//! `fsck.erofs` extracts byte for byte and `veritysetup` verifies, the signed provenance records
//! the compression, the guest kernel reads the files back through dm-verity, and a flipped bit
//! in a compressed block is an integrity failure before anything is decompressed.
//!
//! Two boots in one test, one at a time (the hosts have two cores).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use mvm_builder::testing::{gzip, layer_of, Entry, TestLayout, TAR_GZIP};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

mod support;

use support::guest;
use support::{bundle, describe, dsse_payload, text};

/// Lines like a configuration file's or a manual's: compressible several times over.
fn words(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut line = 0u32;
    while out.len() < len {
        line += 1;
        out.extend_from_slice(
            format!(
                "line {line}: the guest reads this file through dm-verity, block {}\n",
                line.wrapping_mul(2_654_435_761) % 9973
            )
            .as_bytes(),
        );
    }
    out.truncate(len);
    out
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// `mvm build --image REFERENCE --compress COMPRESSION` into `out`; its JSON report.
fn build(home: &Path, reference: &str, compression: &str, out: &Path) -> Value {
    guest::mvm_json(
        home,
        &[
            "build",
            "--image",
            reference,
            "--compress",
            compression,
            "--out",
            out.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "sha256sum /usr/share/doc/words.txt /bin/busybox",
        ],
        0,
    )
}

fn checked(tool: &str, args: &[&Path]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e} (scripts/deps --test installs it)"));
    assert!(out.status.success(), "{tool}: {}", describe(&out));
    text(&out.stdout)
}

#[test]
fn a_compressed_image_boots_reads_back_through_verity_and_catches_a_flipped_bit() {
    let work = tempfile::tempdir().unwrap();
    let home = work.path().join("home");
    guest::mvm_json(&home, &["kernel", "fetch"], 0);
    let busybox = fs::read("/bin/busybox").expect("busybox-static");
    let words = words(600_000);
    let layout = TestLayout::new();
    let root = layer_of(&[
        Entry::Dir("bin"),
        Entry::File("bin/busybox", &busybox, 0o755),
        Entry::Symlink("bin/sh", "busybox"),
        Entry::Symlink("bin/sha256sum", "busybox"),
        Entry::Dir("usr"),
        Entry::Dir("usr/share"),
        Entry::Dir("usr/share/doc"),
        Entry::File("usr/share/doc/words.txt", &words, 0o644),
    ]);
    let config = json!({"Env": ["PATH=/bin"]});
    let (digest, _) = layout.image_with_config("amd64", config, &[(TAR_GZIP, gzip(&root), root)]);
    let reference = format!("oci:{}@{digest}", layout.dir.path().display());

    let plain_out = work.path().join("plain");
    let plain = build(&home, &reference, "none", &plain_out);
    let out = work.path().join("lz4hc");
    let built = build(&home, &reference, "lz4hc", &out);
    assert_eq!(
        built["compression"],
        json!({"algorithm": "lz4hc", "level": 9, "compressed_files": 2}),
        "busybox and words.txt shrink; nothing else is a block long"
    );
    assert_eq!(
        plain["compression"],
        json!({"algorithm": "none", "compressed_files": 0})
    );
    let (small, large) = (
        built["image_size"].as_u64().unwrap(),
        plain["image_size"].as_u64().unwrap(),
    );
    assert!(
        small * 10 < large * 7,
        "{small} bytes compressed, {large} plain"
    );
    let recorded = dsse_payload(&out.join("provenance.dsse.json"))["predicate"]["buildDefinition"]
        ["internalParameters"]["compression"]
        .clone();
    assert_eq!(
        recorded, built["compression"],
        "the signed provenance says so"
    );
    // Reproducible: the same input gives the same compressed image.
    let again = work.path().join("again");
    build(&home, &reference, "lz4hc", &again);
    assert_eq!(
        fs::read(out.join("rootfs.erofs")).unwrap(),
        fs::read(again.join("rootfs.erofs")).unwrap()
    );

    // The standard tools accept it: fsck.erofs extracts the same bytes, veritysetup verifies.
    let extracted = work.path().join("extracted");
    let image = out.join("rootfs.erofs");
    checked(
        "fsck.erofs",
        &[
            Path::new(&format!("--extract={}", extracted.display())),
            &image,
        ],
    );
    assert!(fs::read(extracted.join("usr/share/doc/words.txt")).unwrap() == words);
    assert!(fs::read(extracted.join("bin/busybox")).unwrap() == busybox);
    let root_hash = built["root_hash"].as_str().unwrap();
    checked(
        "/usr/sbin/veritysetup",
        &[
            Path::new("verify"),
            &image,
            &out.join("rootfs.verity"),
            Path::new(root_hash),
        ],
    );

    // The guest kernel decompresses through dm-verity.
    let plan = out.join("plan.dsse.json");
    let ran = guest::mvm(&home, &["run", "--plan", plan.to_str().unwrap()]);
    assert_eq!(ran.status.code(), Some(0), "{}", describe(&ran));
    assert_eq!(
        text(&ran.stdout),
        format!(
            "{}  /usr/share/doc/words.txt\n{}  /bin/busybox\n",
            sha256_hex(&words),
            sha256_hex(&busybox)
        )
    );

    // A bit flipped in a compressed block (the image's last: words.txt's last cluster, the
    // breadth-first walk places it after busybox) fails verification before decompression.
    let tampered: PathBuf = bundle::copy(&out, work.path(), "tampered");
    let image = tampered.join("rootfs.erofs");
    let at = fs::metadata(&image).unwrap().len() as usize - 2048;
    bundle::flip_byte(&image, at);
    let plan = tampered.join("plan.dsse.json");
    let report = guest::mvm_json(&home, &["run", "--plan", plan.to_str().unwrap()], 121);
    assert_eq!(report["error"]["code"], "RUN020", "{report}");
}
