//! Layer application: the OCI whiteout rules, and an adversarial corpus where each hostile
//! layer is refused with its own kind.

use super::*;
use crate::tree::Staging;

/// Builds tar streams entry by entry, writing raw header names so that hostile paths (which
/// `tar::Builder` would refuse) can be expressed.
struct LayerBuilder {
    bytes: Vec<u8>,
}

impl LayerBuilder {
    fn new() -> Self {
        Self { bytes: Vec::new() }
    }

    fn raw(self, path: &[u8], kind: EntryType, data: &[u8], link: &[u8], mode: u32) -> Self {
        self.raw_device(path, kind, data, link, mode, (0, 0))
    }

    fn raw_device(
        mut self,
        path: &[u8],
        kind: EntryType,
        data: &[u8],
        link: &[u8],
        mode: u32,
        (major, minor): (u32, u32),
    ) -> Self {
        let mut header = tar::Header::new_ustar();
        header.as_ustar_mut().unwrap().name[..path.len()].copy_from_slice(path);
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_uid(1000);
        header.set_gid(1000);
        header.set_mtime(1_700_000_000);
        header.set_device_major(major).unwrap();
        header.set_device_minor(minor).unwrap();
        if !link.is_empty() {
            header.as_ustar_mut().unwrap().linkname[..link.len()].copy_from_slice(link);
        }
        header.set_cksum();
        self.bytes.extend_from_slice(header.as_bytes());
        self.bytes.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.bytes.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    /// A character or block device node, or a FIFO.
    fn node(self, path: &str, kind: EntryType, major: u32, minor: u32) -> Self {
        self.raw_device(path.as_bytes(), kind, b"", b"", 0o600, (major, minor))
    }

    fn dir(self, path: &str) -> Self {
        self.raw(path.as_bytes(), EntryType::Directory, b"", b"", 0o755)
    }

    fn file(self, path: &str, data: &[u8]) -> Self {
        self.raw(path.as_bytes(), EntryType::Regular, data, b"", 0o644)
    }

    fn symlink(self, path: &str, target: &str) -> Self {
        self.raw(
            path.as_bytes(),
            EntryType::Symlink,
            b"",
            target.as_bytes(),
            0o777,
        )
    }

    fn hardlink(self, path: &str, target: &str) -> Self {
        self.raw(
            path.as_bytes(),
            EntryType::Link,
            b"",
            target.as_bytes(),
            0o644,
        )
    }

    /// A PAX extended header applying `records` to the next entry.
    fn pax(self, records: &[(&str, &[u8])]) -> Self {
        let mut body = Vec::new();
        for (key, value) in records {
            let inner = key.len() + value.len() + 3;
            let mut len = inner + inner.to_string().len();
            if (len).to_string().len() != inner.to_string().len() {
                len += 1;
            }
            body.extend_from_slice(format!("{len} {key}=").as_bytes());
            body.extend_from_slice(value);
            body.push(b'\n');
        }
        self.raw(b"PaxHeader", EntryType::XHeader, &body, b"", 0o644)
    }

    fn finish(mut self) -> Vec<u8> {
        self.bytes.extend(std::iter::repeat_n(0u8, 1024));
        self.bytes
    }
}

fn tree() -> Tree {
    Tree::new(Staging::Memory(Vec::new()))
}

fn skipped(stats: &LayerStats) -> Vec<(&str, SkippedKind)> {
    stats
        .skipped
        .named
        .iter()
        .map(|e| (e.path.as_str(), e.kind))
        .collect()
}

fn apply(tree: &mut Tree, layer: Vec<u8>) -> Result<LayerStats, LayerError> {
    LayerApplier::new(tree, ApplyOptions::default()).apply(&layer[..])
}

/// The node at `path`, without following symlinks.
fn at(tree: &Tree, path: &str) -> Option<NodeId> {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .try_fold(Tree::ROOT, |dir, name| tree.lookup(dir, name.as_bytes()))
}

fn names(tree: &Tree, path: &str) -> Vec<String> {
    let dir = at(tree, path).unwrap();
    tree.entries(dir)
        .unwrap()
        .keys()
        .map(|k| String::from_utf8(k.clone()).unwrap())
        .collect()
}

fn content(tree: &Tree, path: &str) -> Vec<u8> {
    let NodeKind::File(content) = tree.node(at(tree, path).unwrap()).kind else {
        panic!("{path} is not a file")
    };
    let mut out = Vec::new();
    tree.staging().copy_to(content, &mut out).unwrap();
    out
}

#[test]
fn a_layer_builds_the_tree_it_describes() {
    let mut t = tree();
    let layer = LayerBuilder::new()
        .dir("./etc/")
        .file("./etc/hostname", b"mvm\n")
        .symlink("./etc/localtime", "/usr/share/zoneinfo/UTC")
        .hardlink("./etc/hostname.bak", "./etc/hostname")
        .raw(b"./run/fifo", EntryType::Fifo, b"", b"", 0o600)
        .pax(&[
            ("SCHILY.xattr.user.note", b"kept"),
            ("SCHILY.xattr.security.capability", b"\x01\x00\x00\x02"),
        ])
        .file("./bin/ping", b"\x7fELF")
        .finish();
    let stats = apply(&mut t, layer).unwrap();
    assert_eq!(stats.entries, 6);
    assert_eq!(stats.bytes, 8);
    assert_eq!(content(&t, "etc/hostname"), b"mvm\n");
    // `run/` was created implicitly, as tar does.
    assert!(matches!(
        t.node(at(&t, "run").unwrap()).kind,
        NodeKind::Directory(_)
    ));
    assert_eq!(
        at(&t, "etc/hostname"),
        at(&t, "etc/hostname.bak"),
        "a hardlink shares its node"
    );
    let localtime = t.node(at(&t, "etc/localtime").unwrap());
    assert_eq!(
        localtime.kind,
        NodeKind::Symlink(b"/usr/share/zoneinfo/UTC".to_vec())
    );
    let ping = t.node(at(&t, "bin/ping").unwrap());
    assert_eq!(ping.meta.uid, 1000);
    assert_eq!(ping.meta.mtime, 1_700_000_000);
    assert_eq!(
        ping.meta.xattrs.get(&b"user.note"[..]).map(Vec::as_slice),
        Some(&b"kept"[..])
    );
    assert_eq!(ping.meta.xattrs.len(), 2);
    // The FIFO is skipped, and named.
    assert_eq!(at(&t, "run/fifo"), None);
    assert_eq!(names(&t, "run"), Vec::<String>::new());
    assert_eq!(skipped(&stats), [("/run/fifo", SkippedKind::Fifo)]);
    assert_eq!(stats.skipped.total, 1);
}

#[test]
fn long_names_from_gnu_and_pax_headers() {
    let long = format!("./{}/{}", "d".repeat(120), "f".repeat(200));
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(3);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_entry_type(EntryType::Regular);
    builder
        .append_data(&mut header, &long, &b"abc"[..])
        .unwrap();
    let gnu = builder.into_inner().unwrap();
    let mut t = tree();
    apply(&mut t, gnu).unwrap();
    assert_eq!(content(&t, &long), b"abc");

    let pax_long = format!("p/{}", "q".repeat(250));
    let layer = LayerBuilder::new()
        .pax(&[
            ("path", pax_long.as_bytes()),
            ("uid", b"70000"),
            ("mtime", b"1700000000.5"),
        ])
        .file("short", b"x")
        .finish();
    let mut t = tree();
    apply(&mut t, layer).unwrap();
    let node = t.node(at(&t, &pax_long).unwrap());
    assert_eq!(node.meta.uid, 70000);
    assert_eq!(node.meta.mtime, 1_700_000_000);
    assert!(
        at(&t, "short").is_none(),
        "the PAX path replaced the header's"
    );
}

#[test]
fn whiteouts_hide_lower_layers_only() {
    let mut t = tree();
    apply(
        &mut t,
        LayerBuilder::new()
            .file("a/b", b"1")
            .file("a/c", b"2")
            .file("a/d", b"3")
            .finish(),
    )
    .unwrap();
    let stats = apply(
        &mut t,
        LayerBuilder::new()
            .file("a/.wh.b", b"")
            .file("a/.wh.missing", b"")
            .finish(),
    )
    .unwrap();
    assert_eq!(stats.whiteouts, 2);
    assert_eq!(names(&t, "a"), ["c", "d"]);
    // A whiteout does not hide what its own layer adds, in either order.
    apply(
        &mut t,
        LayerBuilder::new()
            .file("a/e", b"4")
            .file("a/.wh.e", b"")
            .finish(),
    )
    .unwrap();
    assert_eq!(names(&t, "a"), ["c", "d", "e"]);
}

#[test]
fn opaque_whiteouts_hide_every_lower_entry_of_their_directory() {
    let mut t = tree();
    apply(
        &mut t,
        LayerBuilder::new()
            .file("a/b", b"1")
            .file("a/sub/c", b"2")
            .file("z", b"3")
            .finish(),
    )
    .unwrap();
    // The new entry comes before the opaque marker: it stays, the lower ones go.
    apply(
        &mut t,
        LayerBuilder::new()
            .file("a/new", b"4")
            .file("a/.wh..wh..opq", b"")
            .finish(),
    )
    .unwrap();
    assert_eq!(names(&t, "a"), ["new"]);
    assert_eq!(names(&t, ""), ["a", "z"]);
}

#[test]
fn replacing_across_types() {
    let mut t = tree();
    apply(
        &mut t,
        LayerBuilder::new()
            .file("x/keep", b"k")
            .file("y", b"file")
            .finish(),
    )
    .unwrap();
    let layer = LayerBuilder::new()
        .raw(b"x/", EntryType::Directory, b"", b"", 0o700)
        .dir("y/")
        .file("y/inside", b"i")
        .finish();
    apply(&mut t, layer).unwrap();
    assert_eq!(
        names(&t, "x"),
        ["keep"],
        "a directory over a directory keeps its children"
    );
    assert_eq!(t.node(at(&t, "x").unwrap()).meta.mode, 0o700);
    assert_eq!(names(&t, "y"), ["inside"], "a directory replaces a file");
    apply(&mut t, LayerBuilder::new().file("y", b"again").finish()).unwrap();
    assert_eq!(content(&t, "y"), b"again", "a file replaces a directory");
}

#[test]
fn symlinks_inside_the_root_are_followed_for_parents() {
    let mut t = tree();
    apply(
        &mut t,
        LayerBuilder::new()
            .dir("usr/lib/")
            .symlink("lib", "usr/lib")
            .symlink("abs", "/usr")
            .finish(),
    )
    .unwrap();
    apply(
        &mut t,
        LayerBuilder::new()
            .file("lib/libc.so", b"c")
            .file("abs/lib/libm.so", b"m")
            .finish(),
    )
    .unwrap();
    assert_eq!(names(&t, "usr/lib"), ["libc.so", "libm.so"]);
    // The symlink itself is replaced, never followed, when it is the entry's own name.
    apply(
        &mut t,
        LayerBuilder::new().file("lib", b"now a file").finish(),
    )
    .unwrap();
    assert_eq!(content(&t, "lib"), b"now a file");
    assert_eq!(names(&t, "usr/lib"), ["libc.so", "libm.so"]);
}

/// What distributions' root filesystems hold in `/dev` (mmdebstrap's Debian, for one): every
/// device node and FIFO is skipped, named with its kind, and never becomes a node.
#[test]
fn device_nodes_and_fifos_are_skipped_and_named() {
    let mut t = tree();
    let layer = LayerBuilder::new()
        .dir("./dev/")
        .node("./dev/console", EntryType::Char, 5, 1)
        .node("./dev/null", EntryType::Char, 1, 3)
        .node("./dev/sda", EntryType::Block, 8, 0)
        .node("./run/initctl", EntryType::Fifo, 0, 0)
        .file("./etc/hostname", b"debian\n")
        .finish();
    let stats = apply(&mut t, layer).unwrap();
    assert_eq!(stats.entries, 6, "skipped entries are counted as entries");
    assert_eq!(stats.skipped.total, 4);
    assert_eq!(
        skipped(&stats),
        [
            ("/dev/console", SkippedKind::Char),
            ("/dev/null", SkippedKind::Char),
            ("/dev/sda", SkippedKind::Block),
            ("/run/initctl", SkippedKind::Fifo),
        ]
    );
    assert_eq!(names(&t, "dev"), Vec::<String>::new());
    // The parent a skipped entry implied is created, as tar does and as for any entry.
    assert_eq!(names(&t, "run"), Vec::<String>::new());
    assert_eq!(names(&t, ""), ["dev", "etc", "run"]);
    assert_eq!(content(&t, "etc/hostname"), b"debian\n");
    let reachable = |t: &Tree| {
        let mut kinds = Vec::new();
        let mut stack = vec![Tree::ROOT];
        while let Some(id) = stack.pop() {
            if let NodeKind::Directory(entries) = &t.node(id).kind {
                stack.extend(entries.values());
            }
            kinds.push(t.node(id).kind.clone());
        }
        kinds
    };
    assert!(!reachable(&t).iter().any(|k| matches!(
        k,
        NodeKind::CharDevice { .. } | NodeKind::BlockDevice { .. } | NodeKind::Fifo
    )));

    // A non-UTF-8 name is named losslessly.
    let mut t = tree();
    let stats = apply(
        &mut t,
        LayerBuilder::new()
            .raw(b"dev/tty\xff\\", EntryType::Char, b"", b"", 0o600)
            .finish(),
    )
    .unwrap();
    assert_eq!(skipped(&stats), [("/dev/tty\\xff\\\\", SkippedKind::Char)]);
}

/// A skipped entry replaces what a lower layer held at its path, as any entry would, and
/// nothing takes its place; whiteouts and hardlinks naming it are exact.
#[test]
fn a_skipped_entry_replaces_and_is_named_consistently() {
    let mut t = tree();
    apply(
        &mut t,
        LayerBuilder::new()
            .file("dev/null", b"a file")
            .file("dev/keep", b"k")
            .file("srv/pipe/inside", b"x")
            .finish(),
    )
    .unwrap();
    let stats = apply(
        &mut t,
        LayerBuilder::new()
            .node("dev/null", EntryType::Char, 1, 3)
            .node("srv/pipe", EntryType::Fifo, 0, 0)
            // A hardlink to a node this layer skipped is the same node: skipped too, named
            // with the target's kind; and a hardlink to that hardlink.
            .hardlink("dev/null2", "dev/null")
            .hardlink("dev/null3", "./dev/null2")
            // A whiteout of what its own layer skipped hides nothing (as for any entry).
            .file("dev/.wh.null", b"")
            .finish(),
    )
    .unwrap();
    assert_eq!(
        names(&t, "dev"),
        ["keep"],
        "the lower file is replaced by nothing"
    );
    assert_eq!(names(&t, "srv"), Vec::<String>::new(), "so is a directory");
    assert_eq!(
        skipped(&stats),
        [
            ("/dev/null", SkippedKind::Char),
            ("/srv/pipe", SkippedKind::Fifo),
            ("/dev/null2", SkippedKind::Char),
            ("/dev/null3", SkippedKind::Char),
        ]
    );
    assert_eq!(stats.whiteouts, 1);

    // A later layer's whiteout of a skipped path is a no-op; its hardlink to a path a lower
    // layer skipped names nothing, a bad hardlink; and it may put a real file there.
    let stats = apply(
        &mut t,
        LayerBuilder::new().file("dev/.wh.null", b"").finish(),
    )
    .unwrap();
    assert_eq!(stats.whiteouts, 1);
    let err = apply(
        &mut t,
        LayerBuilder::new()
            .hardlink("dev/again", "dev/null")
            .finish(),
    )
    .unwrap_err();
    assert_eq!(err.kind, LayerErrorKind::BadHardlink, "{err}");
    apply(
        &mut t,
        LayerBuilder::new()
            .file("dev/null", b"real")
            .hardlink("dev/link", "dev/null")
            .finish(),
    )
    .unwrap();
    assert_eq!(at(&t, "dev/null"), at(&t, "dev/link"));
    assert_eq!(content(&t, "dev/link"), b"real");

    // A skipped path is a path of its layer: named twice, it is a duplicate; a path through
    // it is a directory it implies, and a hardlink to that directory is refused.
    let err = apply(
        &mut tree(),
        LayerBuilder::new()
            .node("p", EntryType::Fifo, 0, 0)
            .file("p", b"x")
            .finish(),
    )
    .unwrap_err();
    assert_eq!(err.kind, LayerErrorKind::DuplicateEntry, "{err}");
    let err = apply(
        &mut tree(),
        LayerBuilder::new()
            .node("p", EntryType::Fifo, 0, 0)
            .file("p/x", b"x")
            .hardlink("h", "p")
            .finish(),
    )
    .unwrap_err();
    assert_eq!(err.kind, LayerErrorKind::BadHardlink, "{err}");
}

/// Skipped entries count against the layer's entry limit: a layer of endless FIFOs is refused.
#[test]
fn skipped_entries_count_against_the_limits() {
    let options = ApplyOptions {
        limits: LayerLimits {
            entries: 10,
            ..LayerLimits::default()
        },
    };
    let layer = |n: usize| {
        (0..n)
            .fold(LayerBuilder::new(), |b, i| {
                b.node(&format!("p{i}"), EntryType::Fifo, 0, 0)
            })
            .finish()
    };
    let mut t = tree();
    let stats = LayerApplier::new(&mut t, options.clone())
        .apply(&layer(10)[..])
        .unwrap();
    assert_eq!(stats.skipped.total, 10);
    let err = LayerApplier::new(&mut tree(), options)
        .apply(&layer(11)[..])
        .unwrap_err();
    assert_eq!(err.kind, LayerErrorKind::LimitExceeded, "{err}");
}

/// Each hostile layer is refused with its own kind, and leaves nothing outside the tree: the
/// applier never touches the host's files, which this checks by watching a directory that the
/// hostile paths aim at.
#[test]
fn adversarial_corpus() {
    let target = tempfile::tempdir().unwrap();
    let escape = format!("../../../../../../../..{}", target.path().display());
    let huge_pax = "v".repeat(2 * 1024 * 1024);
    let cases: Vec<(&str, Vec<u8>, LayerErrorKind)> = vec![
        (
            "traversal",
            LayerBuilder::new().file("../evil", b"x").finish(),
            LayerErrorKind::Traversal,
        ),
        (
            "nested traversal",
            LayerBuilder::new().file("a/../../evil", b"x").finish(),
            LayerErrorKind::Traversal,
        ),
        (
            "absolute path",
            LayerBuilder::new().file("/etc/passwd", b"x").finish(),
            LayerErrorKind::AbsolutePath,
        ),
        (
            "symlink escape then write",
            LayerBuilder::new()
                .symlink("out", &escape)
                .file("out/planted", b"x")
                .finish(),
            LayerErrorKind::SymlinkEscape,
        ),
        (
            "relative symlink climbing out",
            LayerBuilder::new()
                .dir("a/")
                .symlink("a/up", "../..")
                .file("a/up/planted", b"x")
                .finish(),
            LayerErrorKind::SymlinkEscape,
        ),
        (
            "hardlink outside",
            LayerBuilder::new()
                .hardlink("passwd", "../../etc/passwd")
                .finish(),
            LayerErrorKind::BadHardlink,
        ),
        (
            "hardlink to nothing",
            LayerBuilder::new().hardlink("h", "missing").finish(),
            LayerErrorKind::BadHardlink,
        ),
        (
            "hardlink to a directory",
            LayerBuilder::new().dir("d/").hardlink("h", "d").finish(),
            LayerErrorKind::BadHardlink,
        ),
        (
            "duplicate entries",
            LayerBuilder::new().file("a", b"1").file("a", b"2").finish(),
            LayerErrorKind::DuplicateEntry,
        ),
        (
            "huge PAX header",
            LayerBuilder::new()
                .pax(&[("comment", huge_pax.as_bytes())])
                .file("a", b"x")
                .finish(),
            LayerErrorKind::LimitExceeded,
        ),
        (
            "huge GNU long name",
            LayerBuilder::new()
                .raw(
                    b"././@LongLink",
                    EntryType::GNULongName,
                    &vec![b'a'; 100_000],
                    b"",
                    0o644,
                )
                .finish(),
            LayerErrorKind::LimitExceeded,
        ),
        (
            "symlink loop",
            LayerBuilder::new()
                .symlink("a", "b")
                .symlink("b", "a")
                .file("a/x", b"x")
                .finish(),
            LayerErrorKind::LimitExceeded,
        ),
        (
            "name over 255 bytes",
            LayerBuilder::new()
                .pax(&[("path", "n".repeat(300).as_bytes())])
                .file("x", b"")
                .finish(),
            LayerErrorKind::LimitExceeded,
        ),
        (
            "write through a file",
            LayerBuilder::new()
                .file("f", b"x")
                .file("f/child", b"y")
                .finish(),
            LayerErrorKind::NotADirectory,
        ),
        // A device node or FIFO is skipped, not trusted: everything else about it is checked.
        (
            "device node climbing out",
            LayerBuilder::new()
                .node("../dev/null", EntryType::Char, 1, 3)
                .finish(),
            LayerErrorKind::Traversal,
        ),
        (
            "device node at an absolute path",
            LayerBuilder::new()
                .node("/dev/sda", EntryType::Block, 8, 0)
                .finish(),
            LayerErrorKind::AbsolutePath,
        ),
        (
            "FIFO through an escaping symlink",
            LayerBuilder::new()
                .symlink("out", &escape)
                .node("out/fifo", EntryType::Fifo, 0, 0)
                .finish(),
            LayerErrorKind::SymlinkEscape,
        ),
        (
            "device node twice",
            LayerBuilder::new()
                .node("dev/null", EntryType::Char, 1, 3)
                .node("dev/null", EntryType::Char, 1, 3)
                .finish(),
            LayerErrorKind::DuplicateEntry,
        ),
        (
            "device node with oversize extended attributes",
            LayerBuilder::new()
                .pax(&[("SCHILY.xattr.user.big", &vec![b'x'; 70_000])])
                .node("dev/null", EntryType::Char, 1, 3)
                .finish(),
            LayerErrorKind::LimitExceeded,
        ),
        (
            "FIFO as the root",
            LayerBuilder::new()
                .node("./", EntryType::Fifo, 0, 0)
                .finish(),
            LayerErrorKind::NotADirectory,
        ),
        (
            "sparse file",
            LayerBuilder::new()
                .raw(b"sparse", EntryType::GNUSparse, b"", b"", 0o644)
                .finish(),
            LayerErrorKind::UnsupportedEntry,
        ),
        (
            "malformed PAX record",
            LayerBuilder::new()
                .raw(b"PaxHeader", EntryType::XHeader, b"99 path=x\n", b"", 0o644)
                .file("a", b"")
                .finish(),
            LayerErrorKind::Malformed,
        ),
        (
            "truncated archive",
            {
                let mut bytes = LayerBuilder::new().file("big", &[7u8; 4096]).finish();
                bytes.truncate(1000);
                bytes
            },
            LayerErrorKind::Malformed,
        ),
        (
            "PAX size hiding entries in a directory",
            LayerBuilder::new()
                .pax(&[("size", b"4096")])
                .dir("d/")
                .finish(),
            LayerErrorKind::UnsupportedEntry,
        ),
        (
            "PAX sparse file",
            LayerBuilder::new()
                .pax(&[("GNU.sparse.major", b"1"), ("GNU.sparse.minor", b"0")])
                .file("s", b"")
                .finish(),
            LayerErrorKind::UnsupportedEntry,
        ),
        (
            "oversize extended attributes",
            LayerBuilder::new()
                .pax(&[("SCHILY.xattr.user.big", &vec![b'x'; 70_000])])
                .file("x", b"")
                .finish(),
            LayerErrorKind::LimitExceeded,
        ),
        (
            "empty symlink target",
            LayerBuilder::new().symlink("empty", "").finish(),
            LayerErrorKind::Malformed,
        ),
        (
            "write through a dangling symlink",
            LayerBuilder::new()
                .symlink("gone", "missing/dir")
                .file("gone/x", b"x")
                .finish(),
            LayerErrorKind::NotADirectory,
        ),
        (
            "bad header checksum",
            {
                let mut bytes = LayerBuilder::new().file("a", b"x").finish();
                bytes[0] ^= 0x20;
                bytes
            },
            LayerErrorKind::Malformed,
        ),
    ];
    for (name, layer, expected) in cases {
        let mut t = tree();
        let err = apply(&mut t, layer).expect_err(name);
        assert_eq!(err.kind, expected, "{name}: {err}");
        assert_eq!(err.kind.code(), expected.code());
    }
    assert_eq!(
        std::fs::read_dir(target.path()).unwrap().count(),
        0,
        "nothing was written on the host"
    );
}

#[test]
fn implicit_directories_belong_to_their_layer() {
    let mut t = tree();
    // `a/` is created implicitly by `a/x`; the same layer's whiteout of `a` does not hide it.
    apply(
        &mut t,
        LayerBuilder::new()
            .file("a/x", b"1")
            .file(".wh.a", b"")
            .finish(),
    )
    .unwrap();
    assert_eq!(names(&t, "a"), ["x"]);
}

#[test]
fn image_wide_limits_hold_across_layers() {
    let mut t = tree();
    let options = ApplyOptions {
        limits: LayerLimits {
            tree_bytes: 10,
            tree_nodes: 5,
            ..LayerLimits::default()
        },
    };
    let mut applier = LayerApplier::new(&mut t, options);
    applier
        .apply(&LayerBuilder::new().file("a", b"123456").finish()[..])
        .unwrap();
    let err = applier
        .apply(&LayerBuilder::new().file("b", b"123456").finish()[..])
        .unwrap_err();
    assert_eq!(err.kind, LayerErrorKind::LimitExceeded, "{err}");
    let err = applier
        .apply(&LayerBuilder::new().file("c/d/e/f/g", b"").finish()[..])
        .unwrap_err();
    assert_eq!(err.kind, LayerErrorKind::LimitExceeded, "{err}");
}
