//! The bundle the end-to-end tests boot: an OCI image of busybox plus `/data/canary.bin`
//! (64 KiB that occur nowhere else in the image, for reading back and for flipping bytes),
//! built by `mvm build` with the static agent. Not every test file uses every helper.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};

use mvm_builder::testing::{gzip, layer_of, Entry, TestLayout, TAR_GZIP};
use sha2::{Digest, Sha256};

use super::guest;

/// The file system block size of the EROFS image (and the verity data block size).
pub const BLOCK: usize = 4096;

/// A bundle built into a directory.
pub struct Built {
    /// The bundle directory (`plan.dsse.json`, kernel, initramfs, root image, hash tree).
    pub bundle: PathBuf,
    /// `oci:DIR@sha256:…` of the image (its layout is kept in `dir`).
    pub image: String,
    /// The bytes of `/data/canary.bin`.
    pub canary: Vec<u8>,
}

/// Builds the test image and its bundle into `dir/bundle`, signed by `home`'s key, whose
/// kernel store must hold a kernel (`mvm kernel fetch`).
pub fn build(home: &Path, dir: &Path) -> Built {
    let canary: Vec<u8> = (0u32..16 * 1024)
        .flat_map(|i| Sha256::digest(i.to_le_bytes())[..4].to_vec())
        .collect();
    let layout = TestLayout::new_in(dir);
    let busybox = fs::read("/bin/busybox").unwrap();
    let root = layer_of(&[
        Entry::Dir("bin"),
        Entry::File("bin/busybox", &busybox, 0o755),
        Entry::Symlink("bin/sh", "busybox"),
        Entry::Symlink("bin/echo", "busybox"),
        Entry::Symlink("bin/cat", "busybox"),
        Entry::Symlink("bin/id", "busybox"),
        Entry::Symlink("bin/sleep", "busybox"),
        Entry::Symlink("bin/nproc", "busybox"),
        Entry::Symlink("bin/grep", "busybox"),
        Entry::Dir("etc"),
        Entry::File("etc/motd", b"from the image\n", 0o644),
        Entry::File(
            "etc/passwd",
            b"root:x:0:0::/root:/bin/sh\nbuilder:x:2000:2001::/tmp:/bin/sh\n",
            0o644,
        ),
        Entry::File("srv/secret.txt", b"root only\n", 0o600),
        Entry::Dir("data"),
        Entry::File("data/canary.bin", &canary, 0o644),
    ]);
    let (digest, _) = layout.image("amd64", &[(TAR_GZIP, gzip(&root), root)]);
    let image = format!("oci:{}@{digest}", layout.dir.path().display());
    let bundle = dir.join("bundle");
    mvm_build(home, &image, &bundle);
    std::mem::forget(layout);
    Built {
        bundle,
        image,
        canary,
    }
}

/// `mvm build --image IMAGE --out OUT --agent AGENT -- echo entrypoint`.
fn mvm_build(home: &Path, image: &str, out: &Path) {
    let agent = guest::static_agent().to_str().unwrap();
    let args = ["build", "--image", image, "--out", out.to_str().unwrap()];
    let args: Vec<&str> = args
        .into_iter()
        .chain(["--agent", agent, "--", "echo", "entrypoint"])
        .collect();
    super::mvm_json(home, &args, 0);
}

/// A copy of `bundle` in `dir/name`, to change.
pub fn copy(bundle: &Path, dir: &Path, name: &str) -> PathBuf {
    let copy = dir.join(name);
    fs::create_dir(&copy).unwrap();
    for entry in fs::read_dir(bundle).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    copy
}

/// Copies the files of `from` (not its subdirectories) into a new 0700 directory `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(to).unwrap();
    fs::set_permissions(to, fs::Permissions::from_mode(0o700)).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// Flips the lowest bit of the byte at `at` in `file`.
pub fn flip_byte(file: &Path, at: usize) {
    let mut bytes = fs::read(file).unwrap();
    bytes[at] ^= 0x01;
    fs::write(file, bytes).unwrap();
}

/// Where `needle` occurs in `haystack`, which must hold it exactly once.
pub fn find(haystack: &[u8], needle: &[u8]) -> usize {
    let at = memchr::memmem::find(haystack, needle).expect("needle not found");
    assert!(
        memchr::memmem::find(&haystack[at + 1..], needle).is_none(),
        "the needle occurs more than once"
    );
    at
}

/// The first block of `image` holding bytes of `canary`, and where it starts.
pub fn canary_block(image: &[u8], canary: &[u8]) -> (usize, Vec<u8>) {
    let inside = find(image, &canary[BLOCK..BLOCK + 256]);
    let start = inside / BLOCK * BLOCK;
    (start, image[start..start + BLOCK].to_vec())
}

/// Flips a byte in the canary's data in `bundle`'s root image.
pub fn flip_canary_data(bundle: &Path, canary: &[u8]) {
    let image = bundle.join("rootfs.erofs");
    let (start, _) = canary_block(&fs::read(&image).unwrap(), canary);
    flip_byte(&image, start + 100);
}
