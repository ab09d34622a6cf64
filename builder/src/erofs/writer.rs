//! Emitting a planned image: one sequential pass over metadata then data, then the superblock
//! is filled in (it carries the uuid, which may be a hash of everything else, and a checksum
//! over block 0).

use std::io::{self, BufWriter, Seek, SeekFrom, Write};

use sha2::{Digest, Sha256};

use super::compress::{self, Stored};
use super::format::{
    encode_dirent, DataLayout, InodeHeader, SuperBlock, BLOCK_SIZE, DIRENT_SIZE, INODE_SLOT_SIZE,
    NO_BLOCK, SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE,
};
use super::layout::{Directory, ImagePlan, Payload, PlannedInode};
use super::{ErofsError, ErofsOptions, ImageSummary};
use crate::tree::{Content, Staging, Tree};

const BLOCK: usize = BLOCK_SIZE as usize;
/// How much file content is read from staging per call.
const COPY_CHUNK: usize = 1 << 20;
const ZEROS: [u8; BLOCK] = [0; BLOCK];

pub(super) fn write(
    plan: &ImagePlan<'_>,
    tree: &Tree,
    out: &mut (impl Write + Seek),
    options: &ErofsOptions,
) -> Result<ImageSummary, ErofsError> {
    let base = out.stream_position().map_err(ErofsError::Output)?;
    let mut emitter = Emitter::new(&mut *out, options.uuid);
    // The superblock stays zero for now.
    emitter.pad_to(SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE)?;

    let staging = tree.staging();
    let mut block = [0u8; BLOCK];
    // Packing placed inodes out of walk order; the image is written front to back.
    let mut by_nid: Vec<usize> = (0..plan.inodes.len()).collect();
    by_nid.sort_unstable_by_key(|&index| plan.inodes[index].nid);
    for index in by_nid {
        let inode = &plan.inodes[index];
        emitter.pad_to(inode.nid * INODE_SLOT_SIZE)?;
        emitter.write(&header(plan, index, options.epoch).encode())?;
        emitter.write(&inode.xattrs.bytes)?;
        if let Some(extents) = &inode.extents {
            emitter.pad_to(emitter.position.next_multiple_of(8))?;
            emitter.write(&compress::encode_index(
                extents,
                inode.size(),
                inode.block_addr,
            ))?;
        } else if inode.inline_len() > 0 {
            let inline = inline_tail(plan, inode, staging, &mut block)?;
            emitter.write(inline)?;
        }
    }

    emitter.pad_to(plan.data_start_block * BLOCK_SIZE)?;
    let mut chunk = vec![0u8; COPY_CHUNK];
    for inode in plan
        .inodes
        .iter()
        .filter(|inode| inode.block_addr != NO_BLOCK)
    {
        debug_assert_eq!(emitter.position, u64::from(inode.block_addr) * BLOCK_SIZE);
        if inode.extents.is_some() {
            write_compressed_blocks(&mut emitter, plan, inode, staging, &mut block)?;
        } else {
            write_data_blocks(&mut emitter, plan, inode, staging, &mut chunk)?;
        }
        emitter.pad_to(emitter.position.next_multiple_of(BLOCK_SIZE))?;
    }
    let size = u64::from(plan.blocks) * BLOCK_SIZE;
    emitter.pad_to(size)?;
    let (mut block0, uuid) = emitter.finish()?;
    let compressed_files = plan
        .inodes
        .iter()
        .filter(|inode| inode.extents.is_some())
        .count() as u64;

    let mut volume_name = [0u8; 16];
    volume_name[..options.volume_name.len()].copy_from_slice(&options.volume_name);
    let superblock = SuperBlock {
        // The root is placed first, in block 0 or 1: its nid is below 2^16.
        root_nid: plan.inodes[0].nid as u16,
        inodes: plan.inodes.len() as u64,
        build_time: options.epoch,
        blocks: plan.blocks,
        uuid,
        volume_name,
        compressed: compressed_files > 0,
    };
    superblock.encode_into(&mut block0);
    let superblock_bytes = &block0[SUPERBLOCK_OFFSET as usize..][..SUPERBLOCK_SIZE as usize];
    write_at(out, base + SUPERBLOCK_OFFSET, superblock_bytes, base + size)
        .map_err(ErofsError::Output)?;
    Ok(ImageSummary {
        size,
        blocks: plan.blocks,
        inodes: plan.inodes.len() as u64,
        uuid,
        compressed_files,
    })
}

/// Writes `bytes` at `offset`, then leaves `out` at `end`.
fn write_at(out: &mut (impl Write + Seek), offset: u64, bytes: &[u8], end: u64) -> io::Result<()> {
    out.seek(SeekFrom::Start(offset))?;
    out.write_all(bytes)?;
    out.seek(SeekFrom::Start(end))?;
    out.flush()
}

/// The on-disk header of inode `index`.
fn header(plan: &ImagePlan<'_>, index: usize, epoch: u64) -> InodeHeader {
    let inode = &plan.inodes[index];
    let block_addr_or_rdev = match (&inode.payload, &inode.extents) {
        (Payload::Device { encoded, .. }, _) => *encoded,
        (Payload::Fifo, _) => 0,
        // The compressed blocks count, as `i_u.compressed_blocks`; at most the image's.
        (_, Some(extents)) => extents.len() as u32,
        (Payload::Directory(_) | Payload::File(_) | Payload::Symlink(_), None) => inode.block_addr,
    };
    InodeHeader {
        extended: inode.extended,
        layout: inode.layout,
        xattr_icount: inode.xattrs.icount,
        // The layout refused modes beyond 0o7777.
        mode: inode.file_type().mode_bits() | inode.meta.mode as u16,
        nlink: inode.nlink,
        size: inode.size(),
        block_addr_or_rdev,
        // The layout refused more than u32::MAX inodes.
        ino: index as u32 + 1,
        uid: inode.meta.uid,
        gid: inode.meta.gid,
        mtime: epoch,
    }
}

/// The bytes stored inline after `inode`, rendered into `block` when they are not at hand.
fn inline_tail<'b>(
    plan: &ImagePlan<'_>,
    inode: &'b PlannedInode<'_>,
    staging: &Staging,
    block: &'b mut [u8; BLOCK],
) -> Result<&'b [u8], ErofsError> {
    let start = inode.block_data_len();
    let len = inode.inline_len() as usize;
    Ok(match &inode.payload {
        Payload::File(content) => {
            read_staged(staging, *content, start, &mut block[..len])?;
            &block[..len]
        }
        Payload::Symlink(target) => &target[start as usize..],
        Payload::Directory(directory) => {
            let last = directory.blocks.len() - 1;
            let used = render_dirent_block(plan, directory, last, block);
            &block[..used]
        }
        Payload::Device { .. } | Payload::Fifo => &[],
    })
}

/// Writes the part of `inode`'s data that lives in data blocks, without the final padding.
fn write_data_blocks<W: Write>(
    emitter: &mut Emitter<W>,
    plan: &ImagePlan<'_>,
    inode: &PlannedInode<'_>,
    staging: &Staging,
    chunk: &mut [u8],
) -> Result<(), ErofsError> {
    let len = inode.block_data_len();
    match &inode.payload {
        Payload::File(content) => {
            let mut done = 0;
            while done < len {
                let n = (len - done).min(chunk.len() as u64) as usize;
                read_staged(staging, *content, done, &mut chunk[..n])?;
                emitter.write(&chunk[..n])?;
                done += n as u64;
            }
        }
        Payload::Symlink(target) => emitter.write(&target[..len as usize])?,
        Payload::Directory(directory) => {
            let mut block = [0u8; BLOCK];
            let full_blocks = len.div_ceil(BLOCK_SIZE) as usize;
            for index in 0..full_blocks {
                render_dirent_block(plan, directory, index, &mut block);
                emitter.write(&block)?;
            }
        }
        Payload::Device { .. } | Payload::Fifo => {}
    }
    Ok(())
}

/// Writes a compressed file's blocks: each extent's spilled block, or its raw bytes padded to
/// a block.
fn write_compressed_blocks<W: Write>(
    emitter: &mut Emitter<W>,
    plan: &ImagePlan<'_>,
    inode: &PlannedInode<'_>,
    staging: &Staging,
    block: &mut [u8; BLOCK],
) -> Result<(), ErofsError> {
    let (Payload::File(content), Some(extents), Some(compressor)) =
        (&inode.payload, &inode.extents, &plan.compressor)
    else {
        return Ok(());
    };
    debug_assert_eq!(inode.layout, DataLayout::CompressedFull);
    for extent in extents {
        match extent.stored {
            Stored::Compressed { spill_offset } => compressor
                .read_block(spill_offset, block)
                .map_err(ErofsError::Spill)?,
            Stored::Raw => {
                block.fill(0);
                let len = extent.len as usize;
                read_staged(staging, *content, extent.start, &mut block[..len])?;
            }
        }
        emitter.write(&block[..])?;
    }
    Ok(())
}

/// Renders dirent block `index` of `directory` into `block` (zero-filled past its end) and
/// returns the bytes it uses: the dirent headers, then the names back to back. Each header's
/// `nameoff` points at its name; the first one's also tells how many headers there are.
fn render_dirent_block(
    plan: &ImagePlan<'_>,
    directory: &Directory<'_>,
    index: usize,
    block: &mut [u8; BLOCK],
) -> usize {
    block.fill(0);
    let entries = &directory.entries[directory.blocks[index].clone()];
    let mut name_offset = entries.len() * DIRENT_SIZE as usize;
    for (slot, entry) in entries.iter().enumerate() {
        let header_at = slot * DIRENT_SIZE as usize;
        // The layout keeps every block within 4 KiB, so offsets fit in 16 bits.
        encode_dirent(
            &mut block[header_at..],
            plan.inodes[entry.inode].nid,
            name_offset as u16,
            entry.file_type,
        );
        block[name_offset..name_offset + entry.name.len()].copy_from_slice(entry.name);
        name_offset += entry.name.len();
    }
    name_offset
}

fn read_staged(
    staging: &Staging,
    content: Content,
    at: u64,
    buf: &mut [u8],
) -> Result<(), ErofsError> {
    staging
        .read_at(content, at, buf)
        .map_err(ErofsError::Staging)
}

/// The image as it is written: tracks the position, keeps a copy of block 0 for the
/// superblock checksum, and hashes everything when the uuid is to be derived from content.
struct Emitter<W: Write> {
    out: BufWriter<W>,
    position: u64,
    block0: Box<[u8; BLOCK]>,
    uuid: Uuid,
}

enum Uuid {
    Given([u8; 16]),
    /// The hash of the image so far (its superblock still zero).
    FromContent(Sha256),
}

impl<W: Write> Emitter<W> {
    fn new(out: W, uuid: Option<[u8; 16]>) -> Self {
        Self {
            out: BufWriter::with_capacity(COPY_CHUNK, out),
            position: 0,
            block0: Box::new([0; BLOCK]),
            uuid: uuid.map_or_else(|| Uuid::FromContent(Sha256::new()), Uuid::Given),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), ErofsError> {
        if self.position < BLOCK_SIZE {
            let at = self.position as usize;
            let n = bytes.len().min(BLOCK - at);
            self.block0[at..at + n].copy_from_slice(&bytes[..n]);
        }
        if let Uuid::FromContent(hasher) = &mut self.uuid {
            hasher.update(bytes);
        }
        self.out.write_all(bytes).map_err(ErofsError::Output)?;
        self.position += bytes.len() as u64;
        Ok(())
    }

    /// Writes zeros up to `offset`.
    fn pad_to(&mut self, offset: u64) -> Result<(), ErofsError> {
        while self.position < offset {
            let n = (offset - self.position).min(BLOCK_SIZE) as usize;
            self.write(&ZEROS[..n])?;
        }
        Ok(())
    }

    /// Flushes, returning block 0 as written and the uuid, given or derived.
    fn finish(mut self) -> Result<(Box<[u8; BLOCK]>, [u8; 16]), ErofsError> {
        self.out.flush().map_err(ErofsError::Output)?;
        let uuid = match self.uuid {
            Uuid::Given(uuid) => uuid,
            Uuid::FromContent(hasher) => {
                let digest = hasher.finalize();
                let mut uuid = [0u8; 16];
                uuid.copy_from_slice(&digest[..16]);
                uuid
            }
        };
        Ok((self.block0, uuid))
    }
}
