//! Compressed images: LZ4 and LZ4 HC files read back byte for byte by `fsck.erofs`, its
//! extraction and the kernel, whatever mix of compressible and incompressible data they hold.

use super::harness::{add_file, assert_round_trip_with, meta, new_tree, options, write_to_vec};
use crate::erofs::{Compression, ErofsOptions, LZ4HC_DEFAULT_LEVEL, LZ4HC_MAX_LEVEL};
use crate::tree::Tree;

/// Text-like bytes: long words from a small vocabulary, compressible more than 3:1 by either
/// compressor (as configuration files and scripts are), so every file a test expects to
/// shrink does.
fn words(len: usize, seed: u32) -> Vec<u8> {
    const WORDS: [&str; 6] = [
        "the guest mounts ",
        "an image through verity; ",
        "every block ",
        "is hashed once\n",
        "before it is read ",
        "by the kernel, ",
    ];
    let mut out = Vec::with_capacity(len + 16);
    let mut state = seed.wrapping_mul(2_654_435_761) | 1;
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        out.extend_from_slice(WORDS[state as usize % WORDS.len()].as_bytes());
    }
    out.truncate(len);
    out
}

/// Bytes no compressor shrinks (xorshift).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// Alternating stretches of text and of bytes that do not compress, so raw extents start
/// mid-cluster and compressed ones follow them.
fn mixed(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut seed = 0;
    while out.len() < len {
        out.extend_from_slice(&words(20_000 + seed as usize * 1_000, seed));
        out.extend_from_slice(&noise(9_999, u64::from(seed)));
        seed += 1;
    }
    out.truncate(len);
    out
}

fn with(compression: Compression) -> ErofsOptions {
    ErofsOptions {
        compression,
        ..options()
    }
}

/// The files and whether each should come out compressed.
fn sample() -> (Tree, u64) {
    let mut tree = new_tree();
    let mut compressed = 0;
    let mut file = |tree: &mut Tree, name: &str, bytes: Vec<u8>, expect: bool| {
        compressed += u64::from(expect);
        add_file(tree, Tree::ROOT, name.as_bytes(), &bytes, meta(0o644))
    };
    for size in [8192, 8193, 12_287, 12_288, 20_000, 100_001, (1 << 20) + 3] {
        file(
            &mut tree,
            &format!("text-{size}"),
            words(size, size as u32),
            true,
        );
    }
    file(&mut tree, "mixed", mixed(300_000), true);
    file(&mut tree, "zeros", vec![0; 3 << 20], true);
    // A block and a half of text in one block: fewer bytes than a block and an inline tail.
    file(&mut tree, "one-block", words(6000, 1), true);
    // A file within one block is never compressed: its tail goes inline.
    file(&mut tree, "small", words(4096, 1), false);
    file(&mut tree, "random", noise(50_000, 9), false);
    let with_xattrs = file(&mut tree, "xattrs", words(30_000, 5), true);
    // A 12-byte xattr body after the 32-byte inode: the index starts 4 bytes later, aligned.
    tree.node_mut(with_xattrs)
        .meta
        .xattrs
        .insert(b"user.k".to_vec(), b"v".to_vec());
    let linked = tree.lookup(Tree::ROOT, b"text-20000").unwrap();
    tree.link(Tree::ROOT, b"hardlink", linked).unwrap();
    (tree, compressed)
}

#[test]
fn erofs_lz4_and_lz4hc_files_read_back_through_every_reader() {
    let (tree, compressed) = sample();
    let flat = write_to_vec(&tree, &options()).len();
    for compression in [
        Compression::Lz4,
        Compression::Lz4Hc {
            level: LZ4HC_DEFAULT_LEVEL,
        },
        Compression::Lz4Hc {
            level: LZ4HC_MAX_LEVEL,
        },
    ] {
        let summary = assert_round_trip_with(&tree, &with(compression));
        assert_eq!(summary.compressed_files, compressed, "{compression:?}");
        assert!(
            summary.size * 2 < flat as u64,
            "{compression:?}: {} bytes against {flat} flat",
            summary.size
        );
    }
}

#[test]
fn erofs_compressed_images_are_reproducible_and_differ_by_level() {
    let (tree, _) = sample();
    let lz4 = write_to_vec(&tree, &with(Compression::Lz4));
    assert!(lz4 == write_to_vec(&tree, &with(Compression::Lz4)));
    let hc = write_to_vec(&tree, &with(Compression::Lz4Hc { level: 12 }));
    assert!(hc == write_to_vec(&tree, &with(Compression::Lz4Hc { level: 12 })));
    assert!(hc.len() < lz4.len(), "hc {} vs lz4 {}", hc.len(), lz4.len());
}

#[test]
fn erofs_an_image_with_nothing_worth_compressing_stays_plain() {
    let mut tree = new_tree();
    add_file(&mut tree, Tree::ROOT, b"r", &noise(40_000, 3), meta(0o600));
    add_file(&mut tree, Tree::ROOT, b"s", &words(4_000, 3), meta(0o600));
    let plain = write_to_vec(&tree, &options());
    assert!(plain == write_to_vec(&tree, &with(Compression::Lz4)));
}
