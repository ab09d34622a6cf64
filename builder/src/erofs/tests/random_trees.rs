//! Property tests: random valid trees round-trip through every reader; random hostile trees
//! are refused or give an image fsck accepts, and never panic the writer.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::harness::{
    add, assert_round_trip, assert_round_trip_with, fsck, new_tree, options, pattern,
};
use crate::erofs::{write_image, Compression, ErofsOptions};
use crate::tree::{Content, Metadata, Node, NodeId, NodeKind, Staging, Tree};

/// A random tree, built by applying these steps in order.
#[derive(Debug, Clone)]
enum Step {
    Directory {
        parent: usize,
        name: Vec<u8>,
        meta: Metadata,
    },
    File {
        parent: usize,
        name: Vec<u8>,
        size: usize,
        meta: Metadata,
    },
    Symlink {
        parent: usize,
        name: Vec<u8>,
        target: Vec<u8>,
        meta: Metadata,
    },
    Special {
        parent: usize,
        name: Vec<u8>,
        kind: NodeKind,
        meta: Metadata,
    },
    Hardlink {
        parent: usize,
        name: Vec<u8>,
        target: usize,
    },
}

fn name_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => proptest::collection::vec(prop_oneof![b'a'..=b'e', Just(b'.'), Just(b'-')], 1..4),
        1 => proptest::collection::vec(1u8..=255, 1..40),
        1 => (200usize..=255).prop_map(|len| vec![b'L'; len]),
    ]
    .prop_map(|name| {
        name.into_iter()
            .map(|b| if b == b'/' { b'_' } else { b })
            .collect::<Vec<u8>>()
    })
    .prop_filter("not . or ..", |name| name != b"." && name != b"..")
}

fn meta_strategy(user_xattrs: bool) -> impl Strategy<Value = Metadata> {
    let id = prop_oneof![
        Just(0u32),
        Just(1000),
        Just(65535),
        Just(65536),
        Just(u32::MAX - 1)
    ];
    let xattr_name = if user_xattrs {
        prop_oneof![
            Just(&b"user.a"[..]),
            Just(&b"trusted.b"[..]),
            Just(&b"security.c"[..])
        ]
        .boxed()
    } else {
        prop_oneof![Just(&b"trusted.b"[..]), Just(&b"security.c"[..])].boxed()
    };
    let xattrs = proptest::collection::btree_map(
        xattr_name.prop_map(<[u8]>::to_vec),
        proptest::collection::vec(any::<u8>(), 0..300),
        0..3,
    );
    (0u32..=0o7777, id.clone(), id, xattrs).prop_map(|(mode, uid, gid, xattrs)| Metadata {
        mode,
        uid,
        gid,
        mtime: 0,
        xattrs,
    })
}

fn step_strategy() -> impl Strategy<Value = Step> {
    let size = prop_oneof![0usize..64, 4000usize..4200, 8180usize..8200, 0usize..20_000];
    let target = prop_oneof![
        proptest::collection::vec(1u8..=255, 1..64),
        (4000usize..=4095).prop_map(|len| vec![b't'; len]),
    ];
    let special = prop_oneof![
        Just(NodeKind::Fifo),
        (0u32..=0xfff, 0u32..=0xf_ffff)
            .prop_map(|(major, minor)| NodeKind::CharDevice { major, minor }),
        (0u32..=0xfff, 0u32..=0xf_ffff)
            .prop_map(|(major, minor)| NodeKind::BlockDevice { major, minor }),
    ];
    prop_oneof![
        2 => (any::<usize>(), name_strategy(), meta_strategy(true))
            .prop_map(|(parent, name, meta)| Step::Directory { parent, name, meta }),
        4 => (any::<usize>(), name_strategy(), size, meta_strategy(true))
            .prop_map(|(parent, name, size, meta)| Step::File { parent, name, size, meta }),
        1 => (any::<usize>(), name_strategy(), target, meta_strategy(false))
            .prop_map(|(parent, name, target, meta)| Step::Symlink { parent, name, target, meta }),
        1 => (any::<usize>(), name_strategy(), special, meta_strategy(false))
            .prop_map(|(parent, name, kind, meta)| Step::Special { parent, name, kind, meta }),
        1 => (any::<usize>(), name_strategy(), any::<usize>())
            .prop_map(|(parent, name, target)| Step::Hardlink { parent, name, target }),
    ]
}

fn build(steps: &[Step]) -> Tree {
    let mut tree = new_tree();
    let mut directories = vec![Tree::ROOT];
    let mut others: Vec<NodeId> = Vec::new();
    for (seed, step) in steps.iter().enumerate() {
        let pick = |parent: usize| directories[parent % directories.len()];
        match step.clone() {
            Step::Directory { parent, name, meta } => {
                // A name already taken is replaced; what it named becomes unreachable.
                directories.push(add(
                    &mut tree,
                    pick(parent),
                    &name,
                    NodeKind::Directory(BTreeMap::new()),
                    meta,
                ));
            }
            Step::File {
                parent,
                name,
                size,
                meta,
            } => {
                let id = tree
                    .add_file(&mut &pattern(size, seed as u8)[..], meta)
                    .unwrap();
                tree.link(pick(parent), &name, id);
                others.push(id);
            }
            Step::Symlink {
                parent,
                name,
                target,
                meta,
            } => {
                others.push(add(
                    &mut tree,
                    pick(parent),
                    &name,
                    NodeKind::Symlink(target),
                    meta,
                ));
            }
            Step::Special {
                parent,
                name,
                kind,
                meta,
            } => {
                others.push(add(&mut tree, pick(parent), &name, kind, meta));
            }
            Step::Hardlink {
                parent,
                name,
                target,
            } => {
                if !others.is_empty() {
                    tree.link(pick(parent), &name, others[target % others.len()]);
                }
            }
        }
    }
    tree
}

/// Any node kind, with field values a writer must refuse mixed in: content past the staging
/// area, empty, overlong or NUL-holding targets, device numbers beyond 12/20 bits.
fn hostile_kind() -> impl Strategy<Value = NodeKind> {
    let valid_content = (0..HOSTILE_STAGED, 0u64..5000).prop_map(|(offset, len)| Content {
        offset,
        len: len.min(HOSTILE_STAGED - offset),
    });
    let any_content =
        (any::<u64>(), any::<u64>()).prop_map(|(offset, len)| Content { offset, len });
    prop_oneof![
        3 => Just(NodeKind::Directory(BTreeMap::new())),
        3 => valid_content.prop_map(NodeKind::File),
        1 => any_content.prop_map(NodeKind::File),
        2 => proptest::collection::vec(1u8..=255, 1..100).prop_map(NodeKind::Symlink),
        1 => proptest::collection::vec(any::<u8>(), 0..4200).prop_map(NodeKind::Symlink),
        1 => (0u32..0x1000, 0u32..0x10_0000)
            .prop_map(|(major, minor)| NodeKind::CharDevice { major, minor }),
        1 => (any::<u32>(), any::<u32>())
            .prop_map(|(major, minor)| NodeKind::BlockDevice { major, minor }),
        1 => Just(NodeKind::Fifo),
    ]
}

/// Metadata, mostly valid; sometimes with type bits in the mode or xattrs EROFS cannot store.
fn hostile_meta() -> impl Strategy<Value = Metadata> {
    let mode = prop_oneof![20 => 0u32..=0o7777, 1 => any::<u32>()];
    let xattr_name = prop_oneof![
        4 => Just(b"user.ok".to_vec()),
        4 => Just(b"security.capability".to_vec()),
        1 => Just(b"user.".to_vec()),
        1 => Just(b"os2.x".to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 0..300),
    ];
    let xattrs = prop_oneof![
        6 => Just(BTreeMap::new()),
        1 => proptest::collection::btree_map(
            xattr_name,
            proptest::collection::vec(any::<u8>(), 0..100),
            1..3,
        ),
    ];
    (mode, any::<u32>(), any::<u32>(), xattrs).prop_map(|(mode, uid, gid, xattrs)| Metadata {
        mode,
        uid,
        gid,
        mtime: 0,
        xattrs,
    })
}

const HOSTILE_STAGED: u64 = 20_000;

/// Entry names, mostly valid, sometimes empty, `.`/`..`, overlong or holding `/` or NUL.
fn hostile_name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => proptest::collection::vec(b'a'..=b'c', 1..3),
        1 => proptest::collection::vec(any::<u8>(), 0..300),
        1 => prop_oneof![Just(b".".to_vec()), Just(b"..".to_vec()), Just(Vec::new())],
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn erofs_random_trees_round_trip(steps in proptest::collection::vec(step_strategy(), 0..40)) {
        let tree = build(&steps);
        assert_round_trip(&tree);
    }

    /// The same random trees, LZ4-compressed wherever that saves a block.
    #[test]
    fn erofs_random_trees_round_trip_compressed(
        steps in proptest::collection::vec(step_strategy(), 0..40),
    ) {
        let tree = build(&steps);
        assert_round_trip_with(&tree, &ErofsOptions { compression: Compression::Lz4, ..options() });
    }

    /// Arbitrary graphs (dangling ids, cycles, directories linked twice, a non-directory root)
    /// of arbitrary nodes: the writer refuses with an error or writes an image fsck accepts;
    /// it never panics.
    #[test]
    fn erofs_hostile_trees_are_refused_or_valid(
        root_is_directory in proptest::bool::weighted(0.9),
        root in (hostile_kind(), hostile_meta()),
        nodes in proptest::collection::vec((hostile_kind(), hostile_meta()), 0..10),
        links in proptest::collection::vec((0usize..12, hostile_name(), 0usize..13), 0..20),
    ) {
        let mut tree = Tree::new(Staging::Memory(pattern(HOSTILE_STAGED as usize, 5)));
        let root_kind = if root_is_directory { NodeKind::Directory(BTreeMap::new()) } else { root.0 };
        *tree.node_mut(Tree::ROOT) = Node { kind: root_kind, meta: root.1 };
        for (kind, meta) in nodes {
            tree.add(kind, meta);
        }
        for (dir, name, child) in links {
            // The tree ignores links from non-directories and unknown ids; `child` may dangle.
            tree.link(dir, &name, child);
        }
        let image = tempfile::NamedTempFile::new().unwrap();
        let mut file = image.reopen().unwrap();
        if write_image(&tree, &mut file, &options()).is_ok() {
            fsck(image.path());
        }
    }
}
