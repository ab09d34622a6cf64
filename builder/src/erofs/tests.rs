//! Images of programmatically built trees, checked by `fsck.erofs`, its extraction and the
//! kernel (see [`harness`]), plus determinism and refusal tests; random trees are in
//! [`random_trees`].

mod compressed;
mod harness;
mod random_trees;

use super::{write_image, ErofsError, ErofsOptions};
use crate::tree::{Content, Metadata, NodeKind, Tree};
use harness::{
    add, add_dir, add_file, assert_round_trip, meta, new_tree, options, pattern, write_to_file,
    write_to_vec, Mount,
};

#[test]
fn erofs_empty_root() {
    let tree = new_tree();
    let summary = assert_round_trip(&tree);
    assert_eq!(summary.inodes, 1);
    assert_eq!(
        summary.blocks, 1,
        "superblock, root inode and its dirents share block 0"
    );
}

#[test]
fn erofs_file_sizes_around_block_boundaries() {
    let mut tree = new_tree();
    let sizes = [
        0,
        1,
        100,
        4064,
        4095,
        4096,
        4097,
        8191,
        8192,
        12289,
        (1 << 20) + 3,
    ];
    for (seed, size) in sizes.into_iter().enumerate() {
        let name = format!("size-{size}");
        add_file(
            &mut tree,
            Tree::ROOT,
            name.as_bytes(),
            &pattern(size, seed as u8),
            meta(0o644),
        );
    }
    assert_round_trip(&tree);
}

#[test]
fn erofs_directory_of_1000_long_names_spans_many_blocks() {
    let mut tree = new_tree();
    let dir = add_dir(&mut tree, Tree::ROOT, b"many", meta(0o755));
    for i in 0..1000 {
        let mut name = format!("{i:04}-").into_bytes();
        name.resize(200 + i % 56, b'a' + (i % 26) as u8);
        add_file(&mut tree, dir, &name, &pattern(i, i as u8), meta(0o640));
    }
    // Names that sort before and after `.` and `..`.
    add_file(&mut tree, dir, b"!first", b"x", meta(0o600));
    add_file(&mut tree, dir, b"-dash", b"y", meta(0o600));
    add_dir(&mut tree, dir, b"\xff-last", meta(0o700));
    assert_round_trip(&tree);
}

#[test]
fn erofs_deep_nesting() {
    let mut tree = new_tree();
    let mut dir = Tree::ROOT;
    for depth in 0..200 {
        add_file(
            &mut tree,
            dir,
            b"f",
            depth.to_string().as_bytes(),
            meta(0o644),
        );
        dir = add_dir(&mut tree, dir, b"d", meta(0o755));
    }
    assert_round_trip(&tree);
}

#[test]
fn erofs_symlinks_short_block_filling_and_longest() {
    let mut tree = new_tree();
    let symlink = |target: Vec<u8>| NodeKind::Symlink(target);
    add(
        &mut tree,
        Tree::ROOT,
        b"one",
        symlink(b"x".to_vec()),
        meta(0o777),
    );
    add(
        &mut tree,
        Tree::ROOT,
        b"abs",
        symlink(b"/usr/bin/env".to_vec()),
        meta(0o777),
    );
    add(
        &mut tree,
        Tree::ROOT,
        b"dangling",
        symlink(b"../nowhere".to_vec()),
        meta(0o777),
    );
    // 32-byte inode + 4064 bytes fill a block exactly; 4095 bytes never fit inline.
    let fills = vec![b'f'; 4064];
    add(
        &mut tree,
        Tree::ROOT,
        b"fills-block",
        symlink(fills),
        meta(0o777),
    );
    let mut longest = b"a/".repeat(2047);
    longest.push(b'z');
    add(
        &mut tree,
        Tree::ROOT,
        b"longest",
        symlink(longest),
        meta(0o777),
    );
    add(
        &mut tree,
        Tree::ROOT,
        b"odd-mode",
        symlink(b"one".to_vec()),
        meta(0o640),
    );
    assert_round_trip(&tree);
}

#[test]
fn erofs_hardlinks_share_one_inode() {
    let mut tree = new_tree();
    let a = add_dir(&mut tree, Tree::ROOT, b"a", meta(0o755));
    let b = add_dir(&mut tree, a, b"b", meta(0o755));
    let file = add_file(&mut tree, a, b"file", &pattern(5000, 7), meta(0o644));
    tree.link(b, b"same-file", file);
    tree.link(Tree::ROOT, b"again", file);
    let fifo = add(&mut tree, b, b"fifo", NodeKind::Fifo, meta(0o600));
    tree.link(a, b"fifo-too", fifo);
    let link = add(
        &mut tree,
        Tree::ROOT,
        b"link",
        NodeKind::Symlink(b"a/file".to_vec()),
        meta(0o777),
    );
    tree.link(b, b"link-too", link);
    assert_round_trip(&tree);
}

#[test]
fn erofs_more_than_65535_links_need_an_extended_inode() {
    let mut tree = new_tree();
    let many = add_dir(&mut tree, Tree::ROOT, b"many", meta(0o755));
    let file = add_file(&mut tree, many, b"0", b"shared", meta(0o644));
    for i in 1..70_000u32 {
        tree.link(many, i.to_string().as_bytes(), file);
    }
    // Extracting 70000 copies is slow and proves nothing more: check with fsck and the kernel.
    let image = write_to_file(&tree, &options());
    harness::fsck(&image.path);
    let mounted = Mount::new(&image.path);
    let stat = std::fs::metadata(mounted.path().join("many/69999")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::nlink(&stat), 70_000);
}

#[test]
fn erofs_devices_fifos_and_special_modes() {
    let mut tree = new_tree();
    let dev = add_dir(&mut tree, Tree::ROOT, b"dev", meta(0o755));
    let char_device = |major, minor| NodeKind::CharDevice { major, minor };
    add(&mut tree, dev, b"null", char_device(1, 3), meta(0o666));
    add(
        &mut tree,
        dev,
        b"big",
        char_device(0xfff, 0xf_ffff),
        meta(0o600),
    );
    add(
        &mut tree,
        dev,
        b"mid",
        char_device(259, 0x1234),
        meta(0o600),
    );
    let block_device = NodeKind::BlockDevice { major: 8, minor: 1 };
    add(&mut tree, dev, b"sda1", block_device, meta(0o660));
    add(&mut tree, dev, b"fifo", NodeKind::Fifo, meta(0o620));
    add_file(&mut tree, Tree::ROOT, b"setuid", b"#!", meta(0o4755));
    add_file(&mut tree, Tree::ROOT, b"setgid", b"#!", meta(0o2711));
    add_file(&mut tree, Tree::ROOT, b"no-perms", b"", meta(0));
    add_dir(&mut tree, Tree::ROOT, b"tmp", meta(0o1777));
    add_dir(&mut tree, Tree::ROOT, b"sgid-dir", meta(0o2775));
    tree.node_mut(Tree::ROOT).meta.mode = 0o700;
    assert_round_trip(&tree);
}

#[test]
fn erofs_large_ids_use_extended_inodes() {
    let mut tree = new_tree();
    let owned = |uid, gid, mode| Metadata {
        mode,
        uid,
        gid,
        ..Metadata::default()
    };
    add_file(
        &mut tree,
        Tree::ROOT,
        b"big-uid",
        b"u",
        owned(65536, 0, 0o644),
    );
    add_file(
        &mut tree,
        Tree::ROOT,
        b"big-gid",
        b"g",
        owned(1000, 4_000_000_000, 0o644),
    );
    add_file(
        &mut tree,
        Tree::ROOT,
        b"edge",
        b"e",
        owned(65535, 65535, 0o644),
    );
    add_dir(
        &mut tree,
        Tree::ROOT,
        b"dir",
        owned(100_000, 100_000, 0o750),
    );
    add(
        &mut tree,
        Tree::ROOT,
        b"sym",
        NodeKind::Symlink(b"edge".to_vec()),
        owned(70_000, 1, 0o777),
    );
    assert_round_trip(&tree);
}

#[test]
fn erofs_xattrs_in_every_namespace() {
    let mut tree = new_tree();
    // A v2 file capability granting cap_net_bind_service (bit 10) as permitted and effective.
    let mut capability = vec![0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00];
    capability.resize(20, 0);
    // version 2; USER_OBJ rwx, USER 1000 r--, GROUP_OBJ r-x, MASK r-x, OTHER r--.
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (1u16, 7u16, u32::MAX),
        (2, 4, 1000),
        (4, 5, u32::MAX),
        (0x10, 5, u32::MAX),
        (0x20, 4, u32::MAX),
    ] {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&id.to_le_bytes());
    }
    let with = |pairs: &[(&[u8], &[u8])]| Metadata {
        mode: 0o750,
        xattrs: pairs
            .iter()
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect(),
        ..Metadata::default()
    };
    add_file(
        &mut tree,
        Tree::ROOT,
        b"ping",
        b"\x7fELF",
        with(&[
            (b"security.capability", &capability),
            (b"user.origin", b"mvm"),
        ]),
    );
    add_file(
        &mut tree,
        Tree::ROOT,
        b"trusted",
        b"t",
        with(&[(b"trusted.overlay.opaque", b"y"), (b"user.empty", b"")]),
    );
    let dir = add_dir(
        &mut tree,
        Tree::ROOT,
        b"acl",
        with(&[
            (b"system.posix_acl_access", &acl),
            (b"system.posix_acl_default", &acl),
        ]),
    );
    add_file(
        &mut tree,
        dir,
        b"inside",
        &pattern(4000, 1),
        with(&[(b"user.tail", b"packs after xattrs")]),
    );
    add(
        &mut tree,
        Tree::ROOT,
        b"sym",
        NodeKind::Symlink(b"ping".to_vec()),
        with(&[(b"trusted.sym", b"on a symlink")]),
    );
    // Bodies larger than a block: the inode cannot keep its tail inline.
    let big: Vec<(Vec<u8>, Vec<u8>)> = (0..3)
        .map(|i| (format!("user.big{i}").into_bytes(), pattern(3000, i)))
        .collect();
    let big_meta = Metadata {
        mode: 0o644,
        xattrs: big.into_iter().collect(),
        ..Metadata::default()
    };
    add_file(
        &mut tree,
        Tree::ROOT,
        b"big-xattrs",
        &pattern(5000, 9),
        big_meta,
    );
    tree.node_mut(Tree::ROOT)
        .meta
        .xattrs
        .insert(b"user.root".to_vec(), b"r".to_vec());
    assert_round_trip(&tree);
}

#[test]
fn erofs_same_tree_same_bytes_whatever_the_insertion_order() {
    let forward = sample_tree(false);
    let first = write_to_vec(&forward, &options());
    assert_eq!(
        first,
        write_to_vec(&forward, &options()),
        "two writes differ"
    );
    let backward = sample_tree(true);
    assert_eq!(
        first,
        write_to_vec(&backward, &options()),
        "insertion order leaked"
    );

    let mut changed = sample_tree(false);
    add_file(&mut changed, Tree::ROOT, b"extra", b"!", meta(0o644));
    let other = write_to_vec(&changed, &options());
    assert_ne!(
        first[1024 + 48..1024 + 64],
        other[1024 + 48..1024 + 64],
        "uuid follows content"
    );

    let fixed = ErofsOptions {
        uuid: Some(*b"0123456789abcdef"),
        ..options()
    };
    let with_uuid = write_to_vec(&forward, &fixed);
    assert_eq!(&with_uuid[1024 + 48..1024 + 64], b"0123456789abcdef");
    assert_eq!(with_uuid.len(), first.len());
}

/// The same content added in opposite orders, with different staging offsets and node ids.
fn sample_tree(reverse: bool) -> Tree {
    let mut tree = new_tree();
    let mut items: Vec<(&[u8], Vec<u8>)> = vec![
        (b"a", pattern(10, 1)),
        (b"b", pattern(5000, 2)),
        (b"c", pattern(0, 3)),
        (b"d", pattern(9000, 4)),
    ];
    if reverse {
        items.reverse();
    }
    let dir = add_dir(&mut tree, Tree::ROOT, b"dir", meta(0o755));
    for (name, bytes) in items {
        let node = add_file(&mut tree, dir, name, &bytes, meta(0o644));
        tree.link(Tree::ROOT, name, node);
    }
    tree
}

#[test]
fn erofs_superblock_fields() {
    let tree = sample_tree(false);
    let options = ErofsOptions {
        epoch: 1234,
        uuid: Some([7; 16]),
        volume_name: b"sixteen-bytes-xx".to_vec(),
        ..ErofsOptions::default()
    };
    let image = write_to_vec(&tree, &options);
    let sb = &image[1024..1152];
    let le32 = |at: usize| u32::from_le_bytes(sb[at..at + 4].try_into().unwrap());
    let le64 = |at: usize| u64::from_le_bytes(sb[at..at + 8].try_into().unwrap());
    assert_eq!(le32(0), 0xE0F5_E1E2, "magic");
    assert_eq!(le32(8), 1, "only SB_CHKSUM");
    assert_eq!(sb[12], 12, "4 KiB blocks");
    assert_eq!(
        u16::from_le_bytes([sb[14], sb[15]]),
        36,
        "root right after the superblock"
    );
    assert_eq!(le64(16), 6, "inodes: root, dir, four files");
    assert_eq!(le64(24), 1234, "build time");
    assert_eq!(le32(36) as usize * 4096, image.len(), "blocks");
    assert_eq!(&sb[48..64], &[7; 16]);
    assert_eq!(&sb[64..80], b"sixteen-bytes-xx");
    assert!(image[..1024].iter().all(|&b| b == 0));
}

#[test]
fn erofs_refuses_trees_it_cannot_represent() {
    fn refused(tree: &Tree) -> ErofsError {
        let mut out = std::io::Cursor::new(Vec::new());
        let error = write_image(tree, &mut out, &options()).expect_err("must be refused");
        assert!(
            out.get_ref().is_empty(),
            "nothing is written before validation ends"
        );
        error
    }
    let with_name = |name: &[u8]| {
        let mut tree = new_tree();
        add_file(&mut tree, Tree::ROOT, name, b"", meta(0o644));
        tree
    };
    for name in [&b""[..], b"a/b", b"nul\0", b".", b"..", &[b'n'; 256]] {
        assert!(matches!(
            refused(&with_name(name)),
            ErofsError::InvalidName { .. }
        ));
    }

    let mut dangling = new_tree();
    dangling.link(Tree::ROOT, b"ghost", 99);
    assert!(matches!(
        refused(&dangling),
        ErofsError::DanglingEntry { node: 99, .. }
    ));

    let mut twice = new_tree();
    let dir = add_dir(&mut twice, Tree::ROOT, b"d", meta(0o755));
    twice.link(Tree::ROOT, b"e", dir);
    assert!(matches!(
        refused(&twice),
        ErofsError::DirectoryLinkedTwice { .. }
    ));
    let mut cycle = new_tree();
    let dir = add_dir(&mut cycle, Tree::ROOT, b"d", meta(0o755));
    cycle.link(dir, b"up", Tree::ROOT);
    assert!(matches!(
        refused(&cycle),
        ErofsError::DirectoryLinkedTwice { .. }
    ));

    let mut file_root = new_tree();
    file_root.node_mut(Tree::ROOT).kind = NodeKind::Fifo;
    assert!(matches!(refused(&file_root), ErofsError::RootNotDirectory));

    let mut typed_mode = new_tree();
    add_file(&mut typed_mode, Tree::ROOT, b"f", b"", meta(0o100644));
    assert!(matches!(
        refused(&typed_mode),
        ErofsError::InvalidMode { .. }
    ));

    for target in [Vec::new(), vec![b'x'; 4096], b"a\0b".to_vec()] {
        let mut tree = new_tree();
        add(
            &mut tree,
            Tree::ROOT,
            b"l",
            NodeKind::Symlink(target),
            meta(0o777),
        );
        assert!(matches!(refused(&tree), ErofsError::InvalidSymlink { .. }));
    }

    let mut device = new_tree();
    add(
        &mut device,
        Tree::ROOT,
        b"d",
        NodeKind::BlockDevice {
            major: 4096,
            minor: 0,
        },
        meta(0o600),
    );
    assert!(matches!(
        refused(&device),
        ErofsError::DeviceNumberTooLarge { .. }
    ));

    let mut bad_xattr = new_tree();
    bad_xattr
        .node_mut(Tree::ROOT)
        .meta
        .xattrs
        .insert(b"os2.x".to_vec(), Vec::new());
    assert!(matches!(
        refused(&bad_xattr),
        ErofsError::InvalidXattr { .. }
    ));

    for content in [
        Content { offset: 0, len: 1 },
        Content {
            offset: u64::MAX,
            len: 2,
        },
    ] {
        let mut tree = new_tree();
        add(
            &mut tree,
            Tree::ROOT,
            b"f",
            NodeKind::File(content),
            meta(0o644),
        );
        assert!(matches!(
            refused(&tree),
            ErofsError::ContentOutOfRange { .. }
        ));
    }

    let long_name = ErofsOptions {
        volume_name: vec![b'v'; 17],
        ..options()
    };
    let mut out = std::io::Cursor::new(Vec::new());
    assert!(matches!(
        write_image(&new_tree(), &mut out, &long_name),
        Err(ErofsError::VolumeNameTooLong(17))
    ));
}
