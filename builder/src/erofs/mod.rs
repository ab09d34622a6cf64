//! A native, deterministic EROFS image writer over a staged [`Tree`], uncompressed or with
//! LZ4-compressed files.
//!
//! [`write_image`] turns a tree into an image that Linux mounts read-only (`-t erofs`) and that
//! `fsck.erofs` accepts. The same tree always gives the same bytes: nothing depends on node
//! ids, insertion order, the wall clock or randomness.
//!
//! # On-disk contract
//!
//! - **Blocks** are 4 KiB. Block 0 holds nothing in its first 1 KiB, then the 128-byte
//!   superblock: magic, `SB_CHKSUM` with the crc32c of block 0 from offset 1024 on (checksum
//!   field zeroed, not inverted), block size bits 12, root nid, inode count, build time
//!   [`ErofsOptions::epoch`], total blocks, metadata area at block 0, no shared xattr area,
//!   the uuid and volume name, and no incompatible features but `ZERO_PADDING` when a file is
//!   compressed.
//! - **Metadata area**: from block 0, right after the superblock. Inodes are numbered in
//!   breadth-first order from the root (a directory's entries in name order, a hardlinked node
//!   where it is first met) and packed best-fit into 4 KiB blocks: each goes into the block
//!   with the least room that still holds it, else a new one. The root comes first: its nid
//!   is 36, right after the superblock, or 128 if its inline dirents need a block of their own
//!   (nid = byte offset / 32; every inode is 32-byte aligned). An inode is followed
//!   by its inline xattr body and, for `FLAT_INLINE`, its data tail; the three never cross a
//!   block boundary unless the xattrs alone exceed a block (then the inode starts a block).
//! - **Data area**: from the first block after the metadata, each inode's whole data blocks,
//!   contiguous, in walk order. A tail that is not inline gets its own zero-padded block.
//! - **Inodes** are compact (32 bytes) unless uid or gid exceeds 65535, nlink exceeds 65535 or
//!   the size reaches 4 GiB; then extended (64 bytes). Mode, uid, gid and xattrs are the
//!   tree's, exactly. nlink is the number of entries naming a node; a directory's is
//!   2 + its subdirectories. `i_ino` counts inodes from 1 in walk order.
//! - **Timestamps** follow one fixed policy: every inode's mtime is [`ErofsOptions::epoch`].
//!   Compact inodes inherit it from the superblock's build time; extended inodes store the
//!   same value. The tree's per-node `mtime` is deliberately not recorded: it is build noise
//!   that would make images differ between otherwise identical builds.
//! - **Data layouts**: regular files, directories and symlinks whose size is not a multiple of
//!   4096 use `FLAT_INLINE` (whole blocks in the data area, the tail after the inode) when
//!   inode, xattrs and tail fit in one block; otherwise `FLAT_PLAIN`. An inode without data
//!   blocks has `raw_blkaddr` = `0xffffffff`. Devices and fifos carry no data; a device's
//!   number is in `i_u` in the kernel's `new_encode_dev` form.
//! - **Compressed files** ([`Compression`] other than `None`): a regular file whose extents
//!   (each one block: LZ4 data right-aligned behind zeros, or raw bytes) take fewer bytes than
//!   it flat uses `COMPRESSED_FULL`: after the inode and xattrs, 8-aligned, an all-zero map
//!   header (LZ4, 4 KiB clusters), 8 reserved bytes and an 8-byte index per 4 KiB of file
//!   (`compress.rs`); `i_u` holds its block count; its blocks are contiguous in the data area.
//! - **Directories** hold `.` and `..` (the root's `..` is itself) and one 12-byte dirent per
//!   entry, all sorted by name bytes; dirents never straddle a block: a block takes entries
//!   while their headers and names fit, and each block's first `nameoff` / 12 gives its entry
//!   count. The size is the full blocks plus the bytes used in the last one.
//! - **Xattrs** are inline only (layout in `xattr.rs`), in the `user.`, `trusted.`, `security.` and
//!   `system.posix_acl_{access,default}` namespaces.
//! - **UUID**: [`ErofsOptions::uuid`], or else the first 16 bytes of the SHA-256 of the whole
//!   image with the superblock's 128 bytes zeroed.
//!
//! Refused, with an [`ErofsError`] and before anything is written: a root that is not a
//! directory, an entry naming no node, a directory named by more than one entry (a hardlinked
//! directory or a cycle), names that are empty, `.`, `..`, longer than 255 bytes or contain `/`
//! or NUL, mode bits outside `0o7777`, symlink targets that are empty, contain NUL or exceed
//! 4095 bytes, device numbers beyond 12/20 bits, xattrs outside the namespaces above, content
//! outside the staging area, and images beyond 2^32 blocks.

mod compress;
mod format;
mod layout;
mod lz4;
mod writer;
mod xattr;

#[cfg(test)]
mod tests;

use std::io::{self, Seek, Write};

use crate::tree::Tree;

pub use format::image_uuid;
pub use lz4::{LZ4HC_DEFAULT_LEVEL, LZ4HC_MAX_LEVEL};

/// How regular files' data is stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "algorithm", rename_all = "lowercase")]
pub enum Compression {
    /// Uncompressed: every byte readable in place.
    #[default]
    None,
    /// LZ4 (liblz4's fast mode), as `mkfs.erofs -zlz4`.
    Lz4,
    /// LZ4 HC at a level from 1 to 12, as `mkfs.erofs -zlz4hc,LEVEL`: slower to build, smaller.
    Lz4Hc {
        /// The compression level.
        level: u8,
    },
}

impl std::str::FromStr for Compression {
    type Err = String;

    /// `none`, `lz4`, `lz4hc` or `lz4hc,LEVEL` (1–12), as `mkfs.erofs -z` spells them.
    fn from_str(text: &str) -> Result<Self, String> {
        let (algorithm, level) = match text.split_once(',') {
            Some((algorithm, level)) => (algorithm, Some(level)),
            None => (text, None),
        };
        match (algorithm, level) {
            ("none", None) => Ok(Compression::None),
            ("lz4", None) => Ok(Compression::Lz4),
            ("lz4hc", None) => Ok(Compression::Lz4Hc {
                level: LZ4HC_DEFAULT_LEVEL,
            }),
            ("lz4hc", Some(level)) => match level.parse::<u8>() {
                Ok(level @ 1..=LZ4HC_MAX_LEVEL) => Ok(Compression::Lz4Hc { level }),
                _ => Err(format!(
                    "the lz4hc level is 1 to {LZ4HC_MAX_LEVEL}, not {level:?}"
                )),
            },
            _ => Err(format!(
                "{text:?} is not a compression: none, lz4, lz4hc or lz4hc,LEVEL"
            )),
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Lz4 => f.write_str("lz4"),
            Compression::Lz4Hc { level } => write!(f, "lz4hc,{level}"),
        }
    }
}

/// How to write an image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErofsOptions {
    /// Seconds since the Unix epoch: the superblock's build time and every inode's mtime.
    pub epoch: u64,
    /// The volume uuid; `None` derives it from the image content.
    pub uuid: Option<[u8; 16]>,
    /// The volume label, at most 16 bytes; empty for none.
    pub volume_name: Vec<u8>,
    /// How file data is compressed.
    pub compression: Compression,
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSummary {
    /// Image length in bytes, a whole number of blocks.
    pub size: u64,
    /// Image length in 4 KiB blocks, as recorded in the superblock.
    pub blocks: u32,
    /// Number of inodes (a hardlinked node counts once).
    pub inodes: u64,
    /// The volume uuid, given or derived.
    pub uuid: [u8; 16],
    /// Regular files stored compressed.
    pub compressed_files: u64,
}

/// Why an image could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ErofsError {
    /// The tree's root node is not a directory.
    #[error("the root of the tree is not a directory")]
    RootNotDirectory,
    /// A directory entry names a node id the tree does not have.
    #[error("{path}: entry names node {node}, which the tree does not have")]
    DanglingEntry {
        /// Path of the entry.
        path: String,
        /// The missing node id.
        node: usize,
    },
    /// A directory is reachable through more than one entry.
    #[error("{path}: directory is already named elsewhere (hardlinked directory or cycle)")]
    DirectoryLinkedTwice {
        /// Path of the second entry.
        path: String,
    },
    /// A directory entry name EROFS (or Linux) cannot carry.
    #[error("{path}: invalid entry name: {reason}")]
    InvalidName {
        /// Path of the entry (the name shown lossily).
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Mode bits beyond permissions, setuid, setgid and sticky.
    #[error("{path}: mode {mode:#o} has bits outside 0o7777")]
    InvalidMode {
        /// Path of the node.
        path: String,
        /// The offending mode.
        mode: u32,
    },
    /// A symlink target that cannot be stored.
    #[error("{path}: invalid symlink target: {reason}")]
    InvalidSymlink {
        /// Path of the symlink.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Device numbers too large for EROFS's 32-bit encoding (12-bit major, 20-bit minor).
    #[error("{path}: device {major}:{minor} does not fit a 12-bit major and 20-bit minor")]
    DeviceNumberTooLarge {
        /// Path of the device node.
        path: String,
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// An extended attribute EROFS cannot store.
    #[error("{path}: xattr {name}: {reason}")]
    InvalidXattr {
        /// Path of the node.
        path: String,
        /// The attribute name (lossy).
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A file's content lies outside the tree's staging area.
    #[error("{path}: staged content {offset}+{len} lies outside the staging area")]
    ContentOutOfRange {
        /// Path of the file.
        path: String,
        /// Claimed offset.
        offset: u64,
        /// Claimed length.
        len: u64,
    },
    /// The volume name is longer than the superblock's 16 bytes.
    #[error("volume name is {0} bytes, at most 16 fit")]
    VolumeNameTooLong(usize),
    /// The image would exceed what 32-bit block addresses (or inode numbers) reach.
    #[error("image too large: more than 2^32 blocks or inodes")]
    ImageTooLarge,
    /// Reading file content from the staging area failed.
    #[error("reading staged content: {0}")]
    Staging(#[source] io::Error),
    /// Writing the image failed.
    #[error("writing the image: {0}")]
    Output(#[source] io::Error),
    /// Keeping compressed clusters until they are written failed.
    #[error("keeping compressed clusters in a temporary file: {0}")]
    Spill(#[source] io::Error),
}

/// Writes `tree` as an EROFS image to `out`, starting at its current position, and leaves
/// `out` positioned at the end of the image.
///
/// The tree is validated and laid out completely before the first byte is written; file
/// contents are then streamed from the staging area, so memory holds the metadata plan but
/// never the image. `Seek` is needed to fill in the superblock (uuid and checksum) last.
pub fn write_image(
    tree: &Tree,
    out: &mut (impl Write + Seek),
    options: &ErofsOptions,
) -> Result<ImageSummary, ErofsError> {
    if options.volume_name.len() > 16 {
        return Err(ErofsError::VolumeNameTooLong(options.volume_name.len()));
    }
    let plan = layout::plan(tree, options.compression)?;
    writer::write(&plan, tree, out, options)
}
