//! dm-verity: the hash tree over a root filesystem image, byte-identical to `veritysetup format`.
//!
//! The guest opens its root filesystem through dm-verity with the root hash from the signed
//! launch plan, so every block it reads is checked against a Merkle tree computed here. This
//! module writes that tree ([`format`], [`format_file`]) and checks an image against one
//! ([`verify`]).
//!
//! What comes in: a data image whose length is a whole, non-zero number of data blocks, and
//! [`VerityParams`]: block sizes (powers of two from 512 to 65536), a salt (at most 256 bytes),
//! where the hash device begins, and whether it starts with a superblock.
//!
//! What goes out: the hash device exactly as `veritysetup format --hash=sha256` writes it, in
//! hash format 1 (each hash is SHA-256 of salt ‖ block), and a [`VerityTree`] with the root
//! hash and everything the launch plan pins. From `hash_offset` the device holds:
//!
//! - a 512-byte superblock (unless [`Superblock::Omitted`]), zero-padded up to the next hash
//!   block boundary;
//! - the tree, top level first and level 0 (the hashes of the data blocks) last; a hash block
//!   holds `hash_block_size / 32` hashes and the last block of each level is zero-padded.
//!
//! A one-block image has no tree: its root hash is the hash of its one block.
//!
//! What it refuses, with a [`VerityError`]: other block sizes, longer salts, empty or unaligned
//! images, misaligned hash offsets; [`verify`] also names the first corrupt block it finds.
//!
//! Hashing the data blocks is nearly all the work; it is spread over the cores, and the image
//! is streamed in large batches. Only the hashes above level 0 stay in memory: 1/16384 of the
//! image size with 4 KiB blocks.

mod hashing;
mod layout;
mod superblock;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use hashing::{DataBlockHasher, SaltedSha256, Tuning};
use layout::{Layout, Level};
use superblock::SUPERBLOCK_LEN;

/// The hash algorithm, as dm-verity and `veritysetup` name it; the only one mvm writes.
pub const HASH_ALGORITHM: &str = "sha256";
/// Length of a SHA-256 hash, and the room each hash takes in a hash block.
pub const DIGEST_LEN: usize = 32;
/// The longest salt the superblock can hold.
pub const MAX_SALT_LEN: usize = 256;
/// The smallest data or hash block size `veritysetup` accepts.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// The largest data or hash block size mvm accepts.
pub const MAX_BLOCK_SIZE: u32 = 65536;

/// How to build a hash tree. `veritysetup format` takes the same choices as options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityParams {
    /// Bytes per data block, each hashed on its own (`--data-block-size`). The guest kernel can
    /// only open a device whose data blocks are at most its page size (4096 on x86_64).
    pub data_block_size: u32,
    /// Bytes per hash block (`--hash-block-size`).
    pub hash_block_size: u32,
    /// Mixed into every hash so that trees of equal images differ (`--salt`); may be empty.
    pub salt: Vec<u8>,
    /// Whether the hash device begins with a superblock.
    pub superblock: Superblock,
    /// Byte offset in the hash device where the superblock, or the tree if there is none,
    /// begins (`--hash-offset`). With a superblock a multiple of 512, without one a multiple of
    /// the hash block size.
    pub hash_offset: u64,
}

impl VerityParams {
    /// `veritysetup`'s defaults (4096-byte blocks, a superblock at offset 0) with the given
    /// salt and superblock uuid, both fixed so that builds are reproducible.
    pub fn new(salt: Vec<u8>, uuid: [u8; 16]) -> Self {
        Self {
            data_block_size: 4096,
            hash_block_size: 4096,
            salt,
            superblock: Superblock::Written { uuid },
            hash_offset: 0,
        }
    }

    fn validate(&self) -> Result<(), VerityError> {
        for (kind, size) in [
            ("data", self.data_block_size),
            ("hash", self.hash_block_size),
        ] {
            if !size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&size) {
                return Err(VerityError::BadBlockSize { kind, size });
            }
        }
        if self.salt.len() > MAX_SALT_LEN {
            return Err(VerityError::SaltTooLong {
                len: self.salt.len(),
            });
        }
        Ok(())
    }
}

/// Whether the hash device records its parameters in a superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Superblock {
    /// `veritysetup`'s default: a superblock with the parameters and this uuid precedes the
    /// tree, so `veritysetup verify` needs nothing but the root hash.
    Written {
        /// The hash device's uuid (`--uuid`).
        uuid: [u8; 16],
    },
    /// `--no-superblock`: the tree alone; the parameters travel only in the launch plan.
    Omitted,
}

/// A written hash tree: what a launch plan pins and the guest needs to open the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityTree {
    /// The hash of the top tree block (of the data block, for a one-block image).
    pub root_hash: [u8; DIGEST_LEN],
    /// The salt mixed into every hash.
    pub salt: Vec<u8>,
    /// Bytes per data block.
    pub data_block_size: u32,
    /// Bytes per hash block.
    pub hash_block_size: u32,
    /// Data blocks covered: the whole image.
    pub data_blocks: u64,
    /// Where the superblock, or the tree if there is none, begins in the hash device.
    pub hash_offset: u64,
    /// Byte offset of the first tree block in the hash device; divided by the hash block size
    /// it is the kernel table's `hash_start_block`.
    pub tree_offset: u64,
    /// Length of the hash device: the byte offset just past the tree.
    pub hash_device_len: u64,
}

/// Why a tree could not be built or an image did not verify.
#[derive(Debug, thiserror::Error)]
pub enum VerityError {
    /// A block size outside what dm-verity supports.
    #[error(
        "{kind} block size {size} is not a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
    )]
    BadBlockSize {
        /// `data` or `hash`.
        kind: &'static str,
        /// The size asked for.
        size: u32,
    },
    /// A salt longer than the superblock holds.
    #[error("the salt is {len} bytes; dm-verity allows at most {MAX_SALT_LEN}")]
    SaltTooLong {
        /// Its length.
        len: usize,
    },
    /// A hash offset the layout cannot honour.
    #[error("hash offset {offset} refused: {reason}")]
    BadHashOffset {
        /// The offset asked for.
        offset: u64,
        /// Why.
        reason: &'static str,
    },
    /// A data image of no blocks at all.
    #[error("the data image is empty")]
    EmptyData,
    /// A data image that ends in a partial block, which dm-verity could not cover.
    #[error("the data image is {len} bytes, not a whole number of {block_size}-byte data blocks")]
    DataNotBlockAligned {
        /// Its length in bytes.
        len: u64,
        /// The data block size.
        block_size: u32,
    },
    /// Writing the hash device would replace the data image itself.
    #[error("the hash device path names the data image")]
    HashDeviceIsData,
    /// A hash device that ends before the tree it should hold.
    #[error("the hash device is {len} bytes; the tree needs {needed}")]
    HashDeviceTooShort {
        /// Its length in bytes.
        len: u64,
        /// The length the layout needs.
        needed: u64,
    },
    /// The stored superblock is not the one these parameters produce.
    #[error("the hash device's superblock does not match the parameters: {field} differs")]
    SuperblockMismatch {
        /// The first field that differs.
        field: &'static str,
    },
    /// A data block whose hash is not the one stored in the (already verified) tree.
    #[error("data block {block} is corrupt: its hash does not match the tree")]
    CorruptDataBlock {
        /// Index of the block in the data image.
        block: u64,
    },
    /// A hash block whose hash is not the one its (already verified) parent holds; for the top
    /// block, not the root hash.
    #[error("hash block {index} of tree level {level} (at byte {offset} of the hash device) is corrupt, or the root hash is wrong")]
    CorruptHashBlock {
        /// Tree level; 0 holds the hashes of the data blocks.
        level: usize,
        /// Index of the block within its level.
        index: u64,
        /// Byte offset of the block in the hash device.
        offset: u64,
    },
    /// Reading or writing failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The underlying error.
        source: io::Error,
    },
}

/// Maps an I/O error to [`VerityError::Io`] saying what was being done.
fn io_error(context: &'static str) -> impl FnOnce(io::Error) -> VerityError {
    move |source| VerityError::Io { context, source }
}

/// Writes the hash device for the image `data` to `hash_device`, as `veritysetup format`
/// would, and returns the tree's description.
///
/// Nothing before `params.hash_offset` is written. Level 0 is written as it is computed, batch
/// by batch; the levels above are written at the end.
pub fn format<W: Write + Seek>(
    data: &File,
    hash_device: &mut W,
    params: &VerityParams,
) -> Result<VerityTree, VerityError> {
    format_tuned(data, hash_device, params, &Tuning::default())
}

/// [`format`] from one file into another, the way the CLI and builds call it.
///
/// The hash device is written to a temporary file beside `hash`, synced, and renamed over
/// `hash`: a crash leaves the old file or the complete new one, never a part.
pub fn format_file(
    data: &Path,
    hash: &Path,
    params: &VerityParams,
) -> Result<VerityTree, VerityError> {
    let data_file = File::open(data).map_err(io_error("opening the data image"))?;
    if let Ok(existing) = std::fs::metadata(hash) {
        let image = data_file
            .metadata()
            .map_err(io_error("reading the data image"))?;
        if (existing.dev(), existing.ino()) == (image.dev(), image.ino()) {
            return Err(VerityError::HashDeviceIsData);
        }
    }
    let directory = match hash.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let mut staged =
        tempfile::NamedTempFile::new_in(directory).map_err(io_error("creating the hash file"))?;
    let tree = format(&data_file, staged.as_file_mut(), params)?;
    staged
        .as_file()
        .sync_all()
        .map_err(io_error("writing the hash file"))?;
    staged
        .persist(hash)
        .map_err(|failure| io_error("moving the hash file into place")(failure.error))?;
    Ok(tree)
}

/// Checks the image `data` against `hash_device` and `root_hash`, the way the kernel would
/// when every block is read, and names the first corruption found.
///
/// The superblock, if `params` has one, must be exactly the one [`format`] writes. The tree is
/// checked from the root down, so a block is only blamed once its parent is known good: the
/// levels above level 0 first, then each level-0 block followed by the data blocks it covers,
/// in order.
pub fn verify(
    data: &File,
    hash_device: &File,
    params: &VerityParams,
    root_hash: &[u8; DIGEST_LEN],
) -> Result<(), VerityError> {
    verify_tuned(data, hash_device, params, root_hash, &Tuning::default())
}

/// The number of data blocks in `data`, refusing images dm-verity could not cover whole.
fn count_data_blocks(data: &File, block_size: u32) -> Result<u64, VerityError> {
    let len = data
        .metadata()
        .map_err(io_error("reading the data image"))?
        .len();
    if len == 0 {
        return Err(VerityError::EmptyData);
    }
    if !len.is_multiple_of(u64::from(block_size)) {
        return Err(VerityError::DataNotBlockAligned { len, block_size });
    }
    Ok(len / u64::from(block_size))
}

/// The first 32-byte hash in `computed` that differs from the one at the same place in
/// `expected`, by index.
fn first_mismatch(computed: &[u8], expected: &[u8]) -> Option<u64> {
    computed
        .chunks(DIGEST_LEN)
        .zip(expected.chunks(DIGEST_LEN))
        .position(|(computed, expected)| computed != expected)
        .map(|index| index as u64)
}

fn write_at<W: Write + Seek>(device: &mut W, offset: u64, bytes: &[u8]) -> Result<(), VerityError> {
    device
        .seek(SeekFrom::Start(offset))
        .and_then(|_| device.write_all(bytes))
        .map_err(io_error("writing the hash device"))
}

fn read_at(device: &File, offset: u64, bytes: &mut [u8]) -> Result<(), VerityError> {
    device
        .read_exact_at(bytes, offset)
        .map_err(io_error("reading the hash device"))
}

/// [`format`], with the hashing work cut up as `tuning` says.
fn format_tuned<W: Write + Seek>(
    data: &File,
    hash_device: &mut W,
    params: &VerityParams,
    tuning: &Tuning,
) -> Result<VerityTree, VerityError> {
    params.validate()?;
    let data_blocks = count_data_blocks(data, params.data_block_size)?;
    let layout = Layout::new(params, data_blocks)?;
    let salted = SaltedSha256::new(&params.salt);
    let mut hasher = DataBlockHasher::new(data, &salted, params.data_block_size as usize, tuning);

    let mut root_hash = [0; DIGEST_LEN];
    match layout.levels.split_first() {
        None => hasher
            .hash(0, &mut root_hash)
            .map_err(io_error("reading the data image"))?,
        Some((level_zero, upper_levels)) => {
            let mut entries = write_level_zero(
                &mut hasher,
                &salted,
                &layout,
                level_zero,
                hash_device,
                tuning,
            )?;
            for level in upper_levels {
                entries.resize(level.blocks as usize * layout.hash_block_size, 0);
                write_at(hash_device, level.offset, &entries)?;
                entries = salted.digests_of(&entries, layout.hash_block_size);
            }
            // The top level is one block, so `entries` now holds exactly its hash.
            root_hash.copy_from_slice(&entries);
        }
    }

    if let Superblock::Written { uuid } = &params.superblock {
        let mut head = vec![0; (layout.tree_offset - params.hash_offset) as usize];
        head[..SUPERBLOCK_LEN].copy_from_slice(&superblock::encode(params, uuid, data_blocks));
        write_at(hash_device, params.hash_offset, &head)?;
    }
    hash_device
        .flush()
        .map_err(io_error("writing the hash device"))?;

    Ok(VerityTree {
        root_hash,
        salt: params.salt.clone(),
        data_block_size: params.data_block_size,
        hash_block_size: params.hash_block_size,
        data_blocks,
        hash_offset: params.hash_offset,
        tree_offset: layout.tree_offset,
        hash_device_len: layout.end,
    })
}

/// Hashes every data block and writes level 0, one batch at a time; returns the hashes of the
/// level-0 blocks, which are the entries of level 1.
fn write_level_zero<W: Write + Seek>(
    hasher: &mut DataBlockHasher,
    salted: &SaltedSha256,
    layout: &Layout,
    level_zero: &Level,
    hash_device: &mut W,
    tuning: &Tuning,
) -> Result<Vec<u8>, VerityError> {
    let hash_block_size = layout.hash_block_size;
    let batch_blocks = tuning.batch_blocks(
        hasher.block_size(),
        layout.hashes_per_block,
        layout.data_blocks,
    );
    let mut batch_entries = vec![0; batch_blocks as usize * DIGEST_LEN];
    let mut parent_entries = vec![0; level_zero.blocks as usize * DIGEST_LEN];

    for first_block in (0..layout.data_blocks).step_by(batch_blocks as usize) {
        let block_count = batch_blocks.min(layout.data_blocks - first_block) as usize;
        let entries_len = block_count * DIGEST_LEN;
        let level_bytes = &mut batch_entries[..entries_len.next_multiple_of(hash_block_size)];
        hasher
            .hash(first_block, &mut level_bytes[..entries_len])
            .map_err(io_error("reading the data image"))?;
        level_bytes[entries_len..].fill(0);
        write_at(
            hash_device,
            level_zero.offset + first_block * DIGEST_LEN as u64,
            level_bytes,
        )?;

        let first_hash_block = (first_block / layout.hashes_per_block) as usize;
        let parents_len = level_bytes.len() / hash_block_size * DIGEST_LEN;
        let parents = &mut parent_entries[first_hash_block * DIGEST_LEN..][..parents_len];
        salted.digest_blocks(level_bytes, hash_block_size, parents);
    }
    Ok(parent_entries)
}

/// [`verify`], with the hashing work cut up as `tuning` says.
fn verify_tuned(
    data: &File,
    hash_device: &File,
    params: &VerityParams,
    root_hash: &[u8; DIGEST_LEN],
    tuning: &Tuning,
) -> Result<(), VerityError> {
    params.validate()?;
    let data_blocks = count_data_blocks(data, params.data_block_size)?;
    let layout = Layout::new(params, data_blocks)?;
    let device_len = hash_device
        .metadata()
        .map_err(io_error("reading the hash device"))?
        .len();
    if device_len < layout.end {
        return Err(VerityError::HashDeviceTooShort {
            len: device_len,
            needed: layout.end,
        });
    }
    if let Superblock::Written { uuid } = &params.superblock {
        let mut stored = [0; SUPERBLOCK_LEN];
        read_at(hash_device, params.hash_offset, &mut stored)?;
        let expected = superblock::encode(params, uuid, data_blocks);
        if let Some(field) = superblock::first_difference(&stored, &expected) {
            return Err(VerityError::SuperblockMismatch { field });
        }
    }

    let salted = SaltedSha256::new(&params.salt);
    let mut hasher = DataBlockHasher::new(data, &salted, params.data_block_size as usize, tuning);
    let Some((level_zero, upper_levels)) = layout.levels.split_first() else {
        let mut digest = [0; DIGEST_LEN];
        hasher
            .hash(0, &mut digest)
            .map_err(io_error("reading the data image"))?;
        if digest != *root_hash {
            return Err(VerityError::CorruptDataBlock { block: 0 });
        }
        return Ok(());
    };

    // From the top down, each level's blocks must hash to the entries of the level above,
    // already checked; the top block must hash to the root hash.
    let mut parent_entries = root_hash.to_vec();
    for (below_top, level) in upper_levels.iter().enumerate().rev() {
        let mut level_bytes = vec![0; level.blocks as usize * layout.hash_block_size];
        read_at(hash_device, level.offset, &mut level_bytes)?;
        let digests = salted.digests_of(&level_bytes, layout.hash_block_size);
        if let Some(index) = first_mismatch(&digests, &parent_entries) {
            return Err(VerityError::CorruptHashBlock {
                level: below_top + 1,
                index,
                offset: level.offset + index * layout.hash_block_size as u64,
            });
        }
        parent_entries = level_bytes;
    }

    verify_level_zero(
        &mut hasher,
        &salted,
        &layout,
        level_zero,
        hash_device,
        &parent_entries,
        tuning,
    )
}

/// Checks level 0 against the entries of level 1 (or the root hash) and the data blocks
/// against level 0, one batch at a time.
fn verify_level_zero(
    hasher: &mut DataBlockHasher,
    salted: &SaltedSha256,
    layout: &Layout,
    level_zero: &Level,
    hash_device: &File,
    parent_entries: &[u8],
    tuning: &Tuning,
) -> Result<(), VerityError> {
    let hash_block_size = layout.hash_block_size;
    let batch_blocks = tuning.batch_blocks(
        hasher.block_size(),
        layout.hashes_per_block,
        layout.data_blocks,
    );
    let mut stored_entries = vec![0; batch_blocks as usize * DIGEST_LEN];
    let mut data_digests = vec![0; batch_blocks as usize * DIGEST_LEN];

    for first_block in (0..layout.data_blocks).step_by(batch_blocks as usize) {
        let block_count = batch_blocks.min(layout.data_blocks - first_block) as usize;
        let entries_len = block_count * DIGEST_LEN;
        let stored = &mut stored_entries[..entries_len.next_multiple_of(hash_block_size)];
        read_at(
            hash_device,
            level_zero.offset + first_block * DIGEST_LEN as u64,
            stored,
        )?;
        let computed = &mut data_digests[..entries_len];
        hasher
            .hash(first_block, computed)
            .map_err(io_error("reading the data image"))?;

        let first_hash_block = first_block / layout.hashes_per_block;
        for ((index, hash_block), data_digests) in (first_hash_block..)
            .zip(stored.chunks(hash_block_size))
            .zip(computed.chunks(hash_block_size))
        {
            let parent = &parent_entries[index as usize * DIGEST_LEN..][..DIGEST_LEN];
            if salted.digest(hash_block) != parent {
                return Err(VerityError::CorruptHashBlock {
                    level: 0,
                    index,
                    offset: level_zero.offset + index * hash_block_size as u64,
                });
            }
            if let Some(within) = first_mismatch(data_digests, hash_block) {
                return Err(VerityError::CorruptDataBlock {
                    block: index * layout.hashes_per_block + within,
                });
            }
        }
    }
    Ok(())
}
