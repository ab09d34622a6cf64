//! Cross-checks against the real EROFS readers.
//!
//! Every image a test writes goes through `fsck.erofs` (structure, superblock checksum, xattr
//! bodies, every data block), `fsck.erofs --extract --preserve` (names, bytes, kinds, modes,
//! owners, symlink targets, device numbers come back as a directory), and a read-only kernel
//! mount (everything again, plus what erofs-utils 1.5 does not extract: xattrs, nlink,
//! hardlink identity as equal inode numbers, and mtimes). The tools are required: a missing
//! one fails the test, it is never skipped.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use crate::erofs::{write_image, Compression, ErofsOptions, ImageSummary};
use crate::tree::{Metadata, NodeId, NodeKind, Staging, Tree};

/// The build time the tests use: non-zero, so compact inodes visibly inherit it.
pub const EPOCH: u64 = 1_700_000_000;

pub fn options() -> ErofsOptions {
    ErofsOptions {
        epoch: EPOCH,
        uuid: None,
        volume_name: b"mvm-test".to_vec(),
        compression: Compression::None,
    }
}

pub fn new_tree() -> Tree {
    Tree::new(Staging::Memory(Vec::new()))
}

pub fn meta(mode: u32) -> Metadata {
    Metadata {
        mode,
        ..Metadata::default()
    }
}

/// Adds `kind` named `name` under `parent`.
pub fn add(tree: &mut Tree, parent: NodeId, name: &[u8], kind: NodeKind, meta: Metadata) -> NodeId {
    let id = tree.add(kind, meta);
    tree.link(parent, name, id).expect("parent is a directory");
    id
}

pub fn add_dir(tree: &mut Tree, parent: NodeId, name: &[u8], meta: Metadata) -> NodeId {
    add(
        tree,
        parent,
        name,
        NodeKind::Directory(BTreeMap::new()),
        meta,
    )
}

pub fn add_file(
    tree: &mut Tree,
    parent: NodeId,
    name: &[u8],
    bytes: &[u8],
    meta: Metadata,
) -> NodeId {
    let id = tree
        .add_file(&mut &bytes[..], meta)
        .expect("staging in memory");
    tree.link(parent, name, id).expect("parent is a directory");
    id
}

/// Bytes that differ at every offset, so misplaced blocks cannot go unnoticed.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
        .collect()
}

/// An image written to a file in its own temporary directory.
pub struct Image {
    pub path: PathBuf,
    pub summary: ImageSummary,
    _dir: TempDir,
}

pub fn write_to_file(tree: &Tree, options: &ErofsOptions) -> Image {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image.erofs");
    let mut file = File::create(&path).unwrap();
    let summary = write_image(tree, &mut file, options).expect("image written");
    assert_eq!(file.metadata().unwrap().len(), summary.size);
    Image {
        path,
        summary,
        _dir: dir,
    }
}

pub fn write_to_vec(tree: &Tree, options: &ErofsOptions) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    write_image(tree, &mut out, options).expect("image written");
    out.into_inner()
}

/// Writes `tree` and checks the image with fsck, its extraction and a kernel mount.
pub fn assert_round_trip(tree: &Tree) -> ImageSummary {
    assert_round_trip_with(tree, &options())
}

/// [`assert_round_trip`] with other options (compression).
pub fn assert_round_trip_with(tree: &Tree, options: &ErofsOptions) -> ImageSummary {
    let image = write_to_file(tree, options);
    let expected = expected(tree);
    fsck(&image.path);
    let extracted = extract(&image.path);
    compare(
        &expected,
        &observe(extracted.path(), false),
        Reader::Extracted,
    );
    let mounted = Mount::new(&image.path);
    compare(&expected, &observe(mounted.path(), true), Reader::Kernel);
    image.summary
}

/// Runs an erofs-utils tool, failing the test if it is missing or reports a problem.
fn run_erofs_utils(tool: &str, args: &[&OsStr]) -> String {
    let output = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|error| {
            panic!(
                "cannot run {tool} ({error}): erofs-utils is required for these tests; \
             `.ci/run` installs it (scripts/deps --test), or `apt-get install erofs-utils`"
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{tool} {args:?} failed:\n{text}");
    text
}

pub fn fsck(image: &Path) {
    run_erofs_utils("fsck.erofs", &[image.as_os_str()]);
}

/// Extracts with `fsck.erofs`, preserving owners and permissions (we run as root).
pub fn extract(image: &Path) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    let extract = format!("--extract={}", dir.path().display());
    run_erofs_utils(
        "fsck.erofs",
        &[
            OsStr::new(&extract),
            OsStr::new("--preserve"),
            image.as_os_str(),
        ],
    );
    dir
}

/// A read-only kernel mount of an image, unmounted on drop.
pub struct Mount {
    dir: TempDir,
}

impl Mount {
    pub fn new(image: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let output = Command::new("mount")
            .args(["-t", "erofs", "-o", "ro"])
            .arg(image)
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            output.status.success(),
            "mounting the image failed (the tests run as root on a kernel with erofs, as \
             `.ci/run` does): {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let status = Command::new("umount").arg(self.dir.path()).status();
        if !matches!(status, Ok(status) if status.success()) {
            eprintln!("could not unmount {}", self.dir.path().display());
        }
    }
}

/// A node as a reader should see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Directory,
    File(Vec<u8>),
    Symlink(Vec<u8>),
    CharDevice(u32, u32),
    BlockDevice(u32, u32),
    Fifo,
}

#[derive(Debug)]
pub struct ExpectedNode {
    node: NodeId,
    kind: Kind,
    meta: Metadata,
    nlink: u64,
}

/// Every path reachable in `tree` (relative, `b""` for the root) and what it should be.
pub fn expected(tree: &Tree) -> BTreeMap<Vec<u8>, ExpectedNode> {
    let counts = tree.link_counts();
    let mut out = BTreeMap::new();
    let mut stack = vec![(Vec::new(), Tree::ROOT)];
    while let Some((path, id)) = stack.pop() {
        let node = tree.node(id);
        let (kind, nlink) = match &node.kind {
            NodeKind::Directory(entries) => {
                for (name, &child) in entries {
                    let mut child_path = path.clone();
                    if !child_path.is_empty() {
                        child_path.push(b'/');
                    }
                    child_path.extend_from_slice(name);
                    stack.push((child_path, child));
                }
                let subdirs = entries
                    .values()
                    .filter(|&&child| matches!(tree.node(child).kind, NodeKind::Directory(_)))
                    .count();
                (Kind::Directory, 2 + subdirs as u64)
            }
            NodeKind::File(content) => {
                let mut bytes = Vec::new();
                tree.staging().copy_to(*content, &mut bytes).unwrap();
                (Kind::File(bytes), u64::from(counts[id]))
            }
            NodeKind::Symlink(target) => (Kind::Symlink(target.clone()), u64::from(counts[id])),
            NodeKind::CharDevice { major, minor } => {
                (Kind::CharDevice(*major, *minor), u64::from(counts[id]))
            }
            NodeKind::BlockDevice { major, minor } => {
                (Kind::BlockDevice(*major, *minor), u64::from(counts[id]))
            }
            NodeKind::Fifo => (Kind::Fifo, u64::from(counts[id])),
        };
        out.insert(
            path,
            ExpectedNode {
                node: id,
                kind,
                meta: node.meta.clone(),
                nlink,
            },
        );
    }
    out
}

/// A node as found on the host.
#[derive(Debug)]
pub struct Observed {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    ino: u64,
    nlink: u64,
    mtime: i64,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// Everything under `root`, keyed like [`expected`].
pub fn observe(root: &Path, with_xattrs: bool) -> BTreeMap<Vec<u8>, Observed> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(Vec::new(), root.to_path_buf())];
    while let Some((path, host)) = stack.pop() {
        let stat = fs::symlink_metadata(&host).unwrap();
        let file_type = stat.file_type();
        let kind = if file_type.is_dir() {
            for entry in fs::read_dir(&host).unwrap() {
                let entry = entry.unwrap();
                let mut child = path.clone();
                if !child.is_empty() {
                    child.push(b'/');
                }
                child.extend_from_slice(entry.file_name().as_bytes());
                stack.push((child, entry.path()));
            }
            Kind::Directory
        } else if file_type.is_file() {
            Kind::File(fs::read(&host).unwrap())
        } else if file_type.is_symlink() {
            Kind::Symlink(fs::read_link(&host).unwrap().into_os_string().into_vec())
        } else if file_type.is_char_device() {
            let (major, minor) = split_dev(stat.rdev());
            Kind::CharDevice(major, minor)
        } else if file_type.is_block_device() {
            let (major, minor) = split_dev(stat.rdev());
            Kind::BlockDevice(major, minor)
        } else if file_type.is_fifo() {
            Kind::Fifo
        } else {
            panic!("unexpected file type at {}", host.display());
        };
        let xattrs = if with_xattrs {
            xattr::list(&host)
                .unwrap()
                .map(|name| {
                    let value = xattr::get(&host, &name).unwrap().unwrap_or_default();
                    (name.as_bytes().to_vec(), value)
                })
                .collect()
        } else {
            BTreeMap::new()
        };
        out.insert(
            path,
            Observed {
                kind,
                mode: stat.mode() & 0o7777,
                uid: stat.uid(),
                gid: stat.gid(),
                ino: stat.ino(),
                nlink: stat.nlink(),
                mtime: stat.mtime(),
                xattrs,
            },
        );
    }
    out
}

/// glibc's `major()`/`minor()` of a 64-bit `dev_t`.
fn split_dev(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major as u32, minor as u32)
}

/// Which reader produced an observation, and so what it can show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    /// `fsck.erofs --extract`: no xattrs, hardlinks become copies, symlink modes are the
    /// host's, and setuid/setgid are lost on everything but directories.
    Extracted,
    /// The kernel: everything.
    Kernel,
}

pub fn compare(
    expected: &BTreeMap<Vec<u8>, ExpectedNode>,
    observed: &BTreeMap<Vec<u8>, Observed>,
    reader: Reader,
) {
    let expected_paths: Vec<_> = expected.keys().map(|p| show(p)).collect();
    let observed_paths: Vec<_> = observed.keys().map(|p| show(p)).collect();
    assert_eq!(expected_paths, observed_paths, "{reader:?}: paths differ");
    let mut ino_of_node: BTreeMap<NodeId, u64> = BTreeMap::new();
    for (path, want) in expected {
        let got = &observed[path];
        let at = format!("{reader:?} /{}", show(path));
        assert!(want.kind == got.kind, "{at}: kind or content differs");
        assert_eq!(
            (got.uid, got.gid),
            (want.meta.uid, want.meta.gid),
            "{at}: owner"
        );
        // The mode bits the reader can show: fsck.erofs 1.5 leaves symlinks at 0777, and it
        // chmods before it chowns, which clears setuid and setgid on all but directories.
        let shown = match (reader, &want.kind) {
            (Reader::Kernel, _) | (Reader::Extracted, Kind::Directory) => 0o7777,
            (Reader::Extracted, Kind::Symlink(_)) => 0,
            (Reader::Extracted, _) => 0o1777,
        };
        assert_eq!(
            got.mode & shown,
            want.meta.mode & shown,
            "{at}: mode {:o}",
            got.mode
        );
        if reader == Reader::Kernel {
            assert_eq!(got.xattrs, want.meta.xattrs, "{at}: xattrs");
            assert_eq!(got.nlink, want.nlink, "{at}: nlink");
            assert_eq!(got.mtime, EPOCH as i64, "{at}: mtime");
            let ino = *ino_of_node.entry(want.node).or_insert(got.ino);
            assert_eq!(got.ino, ino, "{at}: not the same inode as its other names");
        }
    }
    if reader == Reader::Kernel {
        let distinct: std::collections::BTreeSet<_> = ino_of_node.values().collect();
        assert_eq!(
            distinct.len(),
            ino_of_node.len(),
            "distinct nodes share an inode"
        );
    }
}

fn show(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}
