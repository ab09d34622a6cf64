//! The EROFS on-disk structures this writer emits, encoded field by field in little-endian.
//!
//! The superblock, compact and extended inodes with the flat-plain, flat-inline and
//! compressed (full index) data layouts, directory entries and the inline xattr body; the
//! compressed layout's map header and indexes are in [`super::compress`]. Field
//! meanings follow the kernel's `fs/erofs/erofs_fs.h`; the layout decisions live in
//! [`super::layout`].

/// Every block is 4 KiB: the page size of the guests we boot, and the only size older kernels
/// mount.
pub(super) const BLOCK_SIZE: u64 = 4096;
const BLOCK_SIZE_BITS: u8 = 12;

/// The superblock sits 1 KiB into block 0, leaving room for a boot sector.
pub(super) const SUPERBLOCK_OFFSET: u64 = 1024;
pub(super) const SUPERBLOCK_SIZE: u64 = 128;
const MAGIC: u32 = 0xE0F5_E1E2;
/// The superblock carries a crc32c of block 0 from the superblock on.
const FEATURE_COMPAT_SB_CHKSUM: u32 = 0x1;
/// Compressed data is right-aligned in its block behind zero bytes (`LZ4_0PADDING`): readers
/// skip the zeros to find where it starts.
const FEATURE_INCOMPAT_ZERO_PADDING: u32 = 0x1;

/// Inodes are addressed by nid = byte offset in the metadata area / 32, so every inode starts
/// on a 32-byte boundary.
pub(super) const INODE_SLOT_SIZE: u64 = 32;
pub(super) const COMPACT_INODE_SIZE: u64 = 32;
pub(super) const EXTENDED_INODE_SIZE: u64 = 64;

/// `raw_blkaddr` of an inode that owns no data block (all of its data, if any, is inline).
pub(super) const NO_BLOCK: u32 = u32::MAX;

pub(super) const DIRENT_SIZE: u64 = 12;
/// The longest name a directory entry may carry.
pub(super) const MAX_NAME_LEN: usize = 255;

pub(super) const XATTR_BODY_HEADER_SIZE: usize = 12;
pub(super) const XATTR_ENTRY_HEADER_SIZE: usize = 4;

/// How an inode's data is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DataLayout {
    /// All data in consecutive blocks starting at `raw_blkaddr`; the last one zero-padded.
    FlatPlain = 0,
    /// Whole blocks from `raw_blkaddr`, then the tail (size mod 4096 bytes) right after the
    /// inode and its xattrs, inside the same metadata block.
    FlatInline = 2,
    /// Extents of one block each, mapped by a full index of 8 bytes per logical cluster after
    /// the inode and its xattrs; `i_u` holds the number of blocks.
    CompressedFull = 1,
}

/// Directory entry file types (`EROFS_FT_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FileType {
    Regular = 1,
    Directory = 2,
    CharDevice = 3,
    BlockDevice = 4,
    Fifo = 5,
    Symlink = 7,
}

impl FileType {
    /// The `S_IFMT` bits of `i_mode` for this type.
    pub(super) fn mode_bits(self) -> u16 {
        match self {
            FileType::Regular => 0o100000,
            FileType::Directory => 0o040000,
            FileType::CharDevice => 0o020000,
            FileType::BlockDevice => 0o060000,
            FileType::Fifo => 0o010000,
            FileType::Symlink => 0o120000,
        }
    }
}

/// Where the superblock's uuid is, from the superblock's start.
const UUID_OFFSET: usize = 48;

/// The uuid in the superblock of the image whose first block is `block0`; `None` when it
/// holds no EROFS superblock.
pub fn image_uuid(block0: &[u8]) -> Option<[u8; 16]> {
    let start = SUPERBLOCK_OFFSET as usize;
    let magic = block0.get(start..start + 4)?;
    if u32::from_le_bytes(magic.try_into().ok()?) != MAGIC {
        return None;
    }
    block0
        .get(start + UUID_OFFSET..start + UUID_OFFSET + 16)?
        .try_into()
        .ok()
}

/// The superblock's variable fields; everything else is fixed by this writer.
pub(super) struct SuperBlock {
    pub root_nid: u16,
    pub inodes: u64,
    pub build_time: u64,
    pub blocks: u32,
    pub uuid: [u8; 16],
    pub volume_name: [u8; 16],
    /// Some file is compressed: readers must understand zero padding.
    pub compressed: bool,
}

impl SuperBlock {
    /// Encodes the superblock into `block0` (the image's first block, already holding whatever
    /// metadata follows the superblock) and sets its checksum: crc32c over the bytes from the
    /// superblock to the end of block 0, computed with the checksum field zeroed.
    pub(super) fn encode_into(&self, block0: &mut [u8; BLOCK_SIZE as usize]) {
        let start = SUPERBLOCK_OFFSET as usize;
        let mut fields = FieldWriter::new(&mut block0[start..start + SUPERBLOCK_SIZE as usize]);
        fields.u32(MAGIC);
        fields.u32(0); // checksum, filled below
        fields.u32(FEATURE_COMPAT_SB_CHKSUM);
        fields.u8(BLOCK_SIZE_BITS);
        fields.u8(0); // sb_extslots: no superblock extension
        fields.u16(self.root_nid);
        fields.u64(self.inodes);
        fields.u64(self.build_time);
        fields.u32(0); // build_time_nsec
        fields.u32(self.blocks);
        fields.u32(0); // meta_blkaddr: the metadata area starts at block 0
        fields.u32(0); // xattr_blkaddr: no shared xattrs
        fields.bytes(&self.uuid);
        fields.bytes(&self.volume_name);
        fields.u32(if self.compressed {
            FEATURE_INCOMPAT_ZERO_PADDING
        } else {
            0
        });
        // lz4_max_distance 0: LZ4's default 64 KiB window. Then no devices, reserved.
        fields.zeros();
        let checksum = crc32c_unfinalized(&block0[start..]);
        block0[start + 4..start + 8].copy_from_slice(&checksum.to_le_bytes());
    }
}

/// One inode's on-disk header, compact (32 bytes) or extended (64 bytes).
pub(super) struct InodeHeader {
    pub extended: bool,
    pub layout: DataLayout,
    pub xattr_icount: u16,
    /// File type and permission bits.
    pub mode: u16,
    pub nlink: u32,
    pub size: u64,
    /// `raw_blkaddr` for flat files, directories and symlinks; the number of blocks for
    /// compressed files; the encoded device for devices.
    pub block_addr_or_rdev: u32,
    pub ino: u32,
    pub uid: u32,
    pub gid: u32,
    /// Only stored by extended inodes; compact ones take the superblock's build time.
    pub mtime: u64,
}

impl InodeHeader {
    /// The encoded header; its length is [`COMPACT_INODE_SIZE`] or [`EXTENDED_INODE_SIZE`].
    /// The layout must have chosen `extended` for any value a compact inode cannot hold.
    pub(super) fn encode(&self) -> Vec<u8> {
        let len = if self.extended {
            EXTENDED_INODE_SIZE
        } else {
            COMPACT_INODE_SIZE
        };
        let mut bytes = vec![0u8; len as usize];
        let mut fields = FieldWriter::new(&mut bytes);
        fields.u16(u16::from(self.extended) | ((self.layout as u16) << 1));
        fields.u16(self.xattr_icount);
        fields.u16(self.mode);
        if self.extended {
            fields.u16(0); // i_reserved
            fields.u64(self.size);
            fields.u32(self.block_addr_or_rdev);
            fields.u32(self.ino);
            fields.u32(self.uid);
            fields.u32(self.gid);
            fields.u64(self.mtime);
            fields.u32(0); // mtime_nsec
            fields.u32(self.nlink);
        } else {
            fields.u16(self.nlink as u16);
            fields.u32(self.size as u32);
            fields.u32(0); // i_reserved
            fields.u32(self.block_addr_or_rdev);
            fields.u32(self.ino);
            fields.u16(self.uid as u16);
            fields.u16(self.gid as u16);
        }
        fields.zeros();
        bytes
    }
}

/// Writes one 12-byte directory entry header: the child's nid, where its name starts in the
/// block, and its file type.
pub(super) fn encode_dirent(slot: &mut [u8], nid: u64, name_offset: u16, file_type: FileType) {
    let mut fields = FieldWriter::new(&mut slot[..DIRENT_SIZE as usize]);
    fields.u64(nid);
    fields.u16(name_offset);
    fields.u8(file_type as u8);
    fields.u8(0);
}

/// The kernel's `new_encode_dev`: 12 bits of major, 20 bits of minor. `None` if either does
/// not fit.
pub(super) fn encode_device(major: u32, minor: u32) -> Option<u32> {
    if major > 0xfff || minor > 0xf_ffff {
        return None;
    }
    Some((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12))
}

/// Sequential little-endian field writer over a fixed buffer.
pub(super) struct FieldWriter<'b> {
    buf: &'b mut [u8],
    at: usize,
}

impl<'b> FieldWriter<'b> {
    pub(super) fn new(buf: &'b mut [u8]) -> Self {
        Self { buf, at: 0 }
    }

    pub(super) fn bytes(&mut self, bytes: &[u8]) {
        self.buf[self.at..self.at + bytes.len()].copy_from_slice(bytes);
        self.at += bytes.len();
    }

    pub(super) fn u8(&mut self, value: u8) {
        self.bytes(&[value]);
    }

    pub(super) fn u16(&mut self, value: u16) {
        self.bytes(&value.to_le_bytes());
    }

    pub(super) fn u32(&mut self, value: u32) {
        self.bytes(&value.to_le_bytes());
    }

    pub(super) fn u64(&mut self, value: u64) {
        self.bytes(&value.to_le_bytes());
    }

    /// Zeroes the rest of the buffer (reserved fields).
    pub(super) fn zeros(&mut self) {
        self.buf[self.at..].fill(0);
        self.at = self.buf.len();
    }
}

/// CRC-32C (Castagnoli, reflected) seeded with all ones and *not* inverted at the end: the
/// variant EROFS stores (the standard CRC-32C is the bitwise NOT of this).
fn crc32c_unfinalized(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut crc = i as u32;
            let mut bit = 0;
            while bit < 8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0x82F6_3B78
                } else {
                    crc >> 1
                };
                bit += 1;
            }
            table[i] = crc;
            i += 1;
        }
        table
    };
    bytes.iter().fold(!0u32, |crc, &byte| {
        TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The catalogued CRC-32C check value of "123456789" is 0xE3069283 after the final
        // inversion EROFS leaves out.
        assert_eq!(!crc32c_unfinalized(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn device_numbers_use_the_kernel_split() {
        assert_eq!(encode_device(8, 1), Some(0x0801));
        assert_eq!(encode_device(0xfff, 0xf_ffff), Some(0xffff_ffff));
        assert_eq!(encode_device(1, 0x1234), Some(0x0120_0134));
        assert_eq!(encode_device(0x1000, 0), None);
        assert_eq!(encode_device(0, 0x10_0000), None);
    }

    #[test]
    fn inode_headers_have_their_fixed_sizes() {
        let header = InodeHeader {
            extended: false,
            layout: DataLayout::FlatInline,
            xattr_icount: 0,
            mode: 0o100644,
            nlink: 1,
            size: 5,
            block_addr_or_rdev: NO_BLOCK,
            ino: 1,
            uid: 0,
            gid: 0,
            mtime: 0,
        };
        let compact = header.encode();
        assert_eq!(compact.len() as u64, COMPACT_INODE_SIZE);
        assert_eq!(&compact[..2], &[4, 0], "version 0, layout 2 << 1");
        let extended = InodeHeader {
            extended: true,
            ..header
        }
        .encode();
        assert_eq!(extended.len() as u64, EXTENDED_INODE_SIZE);
        assert_eq!(&extended[..2], &[5, 0]);
    }
}
