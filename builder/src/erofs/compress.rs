//! Compressed files: a file's data cut into extents that each fill one physical block, and the
//! full ("legacy") lcluster index that maps the file's 4 KiB logical clusters onto them.
//!
//! Each extent is either LZ4 data that decompresses to more than a block (kept only when it
//! does) or, where the data does not compress, one block of raw bytes. Compressed bytes sit at
//! the end of their block behind zero padding (the `ZERO_PADDING` feature, which tells the
//! reader where they start). Extents are compressed once, while the image is planned, and wait
//! in a spill file until the writer copies them into the data area, so memory holds only the
//! extent list.

use std::fs::File;
use std::io::{self, Seek, Write};
use std::os::unix::fs::FileExt;

use super::format::{FieldWriter, BLOCK_SIZE};
use super::lz4::Compressor;
use super::{Compression, ErofsError};
use crate::tree::{Content, Staging};

const BLOCK: usize = BLOCK_SIZE as usize;

/// The most input one extent may cover. A read anywhere in an extent decompresses it from its
/// start, so this bounds the work of one page read (LZ4 could otherwise pack a megabyte of
/// zeros into a block).
pub(super) const MAX_EXTENT: usize = 256 * 1024;

/// The map header that precedes the indexes (all zero here: LZ4 for both head types, 4 KiB
/// logical clusters, no tail packing, no big clusters), then 8 reserved bytes.
const MAP_HEADER_SIZE: u64 = 8;
const LEGACY_PADDING: u64 = 8;
const INDEX_SIZE: u64 = 8;

/// Logical cluster types, in bits 0–1 of `di_advise`.
const LCLUSTER_PLAIN: u16 = 0;
const LCLUSTER_HEAD: u16 = 1;
const LCLUSTER_NONHEAD: u16 = 2;

/// One extent: `len` bytes of the file from `start`, stored in one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Extent {
    pub start: u64,
    pub len: u64,
    pub stored: Stored,
}

/// How an extent's block holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stored {
    /// The raw bytes, from the block's start (at most a block of them).
    Raw,
    /// A ready block (padding, then LZ4 data) at this offset of the spill file.
    Compressed { spill_offset: u64 },
}

/// Compresses files as the image is planned and keeps their blocks until it is written.
pub(super) struct FileCompressor {
    compressor: Compressor,
    spill: File,
    spilled: u64,
    window: Window,
    out: Box<[u8; BLOCK]>,
}

impl FileCompressor {
    /// `None` for [`Compression::None`].
    pub(super) fn new(compression: Compression) -> Result<Option<Self>, ErofsError> {
        let compressor = match compression {
            Compression::None => return Ok(None),
            Compression::Lz4 => Compressor::fast(),
            Compression::Lz4Hc { level } => Compressor::high(level),
        };
        Ok(Some(Self {
            compressor,
            spill: tempfile::tempfile().map_err(ErofsError::Spill)?,
            spilled: 0,
            window: Window::default(),
            out: Box::new([0; BLOCK]),
        }))
    }

    /// The extents of `content` when they take fewer bytes than the file stored flat (whole
    /// blocks, its tail inline in the metadata), else `None`.
    pub(super) fn compress(
        &mut self,
        staging: &Staging,
        content: Content,
    ) -> Result<Option<Vec<Extent>>, ErofsError> {
        let size = content.len;
        // The index alone is 24 bytes; one block must hold more than a block of data.
        let worth = |extents: usize| extents as u64 * BLOCK_SIZE + index_area_len(0, size) < size;
        if !worth(1) {
            return Ok(None);
        }
        let spilled_before = self.spilled;
        let mut extents = Vec::new();
        let mut pos = 0;
        while pos < size {
            let input = self.window.at(staging, content, pos, MAX_EXTENT)?;
            let (consumed, written) = if input.len() > BLOCK {
                self.compressor.compress_prefix(input, &mut self.out[..])
            } else {
                (0, 0)
            };
            // An extent must reach past its logical cluster (two heads cannot share one), and
            // compressing must beat a raw block.
            let extent = if consumed > BLOCK {
                let mut block = [0u8; BLOCK];
                block[BLOCK - written..].copy_from_slice(&self.out[..written]);
                self.spill.write_all(&block).map_err(ErofsError::Spill)?;
                self.spilled += BLOCK_SIZE;
                Extent {
                    start: pos,
                    len: consumed as u64,
                    stored: Stored::Compressed {
                        spill_offset: self.spilled - BLOCK_SIZE,
                    },
                }
            } else {
                Extent {
                    start: pos,
                    len: input.len().min(BLOCK) as u64,
                    stored: Stored::Raw,
                }
            };
            pos += extent.len;
            extents.push(extent);
            if !worth(extents.len()) {
                // No saving: give the spilled blocks back.
                self.spill
                    .set_len(spilled_before)
                    .map_err(ErofsError::Spill)?;
                self.spilled = spilled_before;
                self.spill
                    .seek(io::SeekFrom::Start(spilled_before))
                    .map_err(ErofsError::Spill)?;
                return Ok(None);
            }
        }
        Ok(Some(extents))
    }

    /// Reads the spilled block at `offset`.
    pub(super) fn read_block(&self, offset: u64, block: &mut [u8; BLOCK]) -> io::Result<()> {
        self.spill.read_exact_at(block, offset)
    }
}

/// A sliding view of one file's staged bytes, refilled in large reads.
#[derive(Default)]
struct Window {
    content: Option<Content>,
    /// File offset of `bytes[0]`.
    start: u64,
    bytes: Vec<u8>,
}

impl Window {
    /// Up to `want` bytes of `content` from `pos` (fewer only at its end). Positions only
    /// move forward within one file.
    fn at(
        &mut self,
        staging: &Staging,
        content: Content,
        pos: u64,
        want: usize,
    ) -> Result<&[u8], ErofsError> {
        if self.content != Some(content) {
            *self = Window {
                content: Some(content),
                start: pos,
                bytes: Vec::with_capacity(2 * want),
            };
        }
        let end = content.len.min(pos + want as u64);
        if end > self.start + self.bytes.len() as u64 {
            // Keep what is left from `pos` (less than `want`), then read up to two windows'
            // worth, so a refill happens at most once per `want` bytes consumed.
            self.bytes.drain(..(pos - self.start) as usize);
            self.start = pos;
            let have = self.bytes.len();
            let fill_to = content.len.min(pos + 2 * want as u64);
            self.bytes.resize((fill_to - pos) as usize, 0);
            staging
                .read_at(content, pos + have as u64, &mut self.bytes[have..])
                .map_err(ErofsError::Staging)?;
        }
        let from = (pos - self.start) as usize;
        Ok(&self.bytes[from..from + (end - pos) as usize])
    }
}

/// Bytes after the inode's xattrs that hold its map header and indexes, from `meta_end` (the
/// byte offset where inode and xattrs end): alignment to 8, header, padding, one index per
/// logical cluster.
pub(super) fn index_area_len(meta_end: u64, size: u64) -> u64 {
    meta_end.next_multiple_of(8) - meta_end
        + MAP_HEADER_SIZE
        + LEGACY_PADDING
        + INDEX_SIZE * size.div_ceil(BLOCK_SIZE)
}

/// The map header and one 8-byte index per logical cluster of a `size`-byte file whose
/// extents are stored in consecutive blocks from `first_block`.
///
/// A logical cluster where an extent starts is its head (HEAD for compressed, PLAIN for raw)
/// with the extent's offset in the cluster and block address; a cluster an extent passes
/// through is NONHEAD with the distance back to that head and forward to the cluster where
/// the next extent starts. Where the last extent ends inside a later cluster, that cluster
/// gets a PLAIN entry with the end offset, so readers learn where the data stops.
pub(super) fn encode_index(extents: &[Extent], size: u64, first_block: u32) -> Vec<u8> {
    let clusters = size.div_ceil(BLOCK_SIZE) as usize;
    let mut entries: Vec<Option<[u8; 8]>> = vec![None; clusters];
    let entry = |advise: u16, cluster_offset: u16, last: u32| {
        let mut bytes = [0u8; 8];
        let mut fields = FieldWriter::new(&mut bytes);
        fields.u16(advise);
        fields.u16(cluster_offset);
        fields.u32(last);
        bytes
    };
    let nonhead = |back: u64, forward: u64| {
        // Both fit 16 bits: an extent covers at most MAX_EXTENT bytes = 64 clusters.
        entry(
            LCLUSTER_NONHEAD,
            0,
            u32::from(back as u16) | (u32::from(forward as u16) << 16),
        )
    };
    for (index, extent) in extents.iter().enumerate() {
        let head = (extent.start / BLOCK_SIZE) as usize;
        let kind = match extent.stored {
            Stored::Raw => LCLUSTER_PLAIN,
            Stored::Compressed { .. } => LCLUSTER_HEAD,
        };
        let offset = (extent.start % BLOCK_SIZE) as u16;
        entries[head] = Some(entry(kind, offset, first_block + index as u32));
        let end = extent.start + extent.len;
        let next_head = (end / BLOCK_SIZE) as usize;
        for (cluster, slot) in entries
            .iter_mut()
            .enumerate()
            .take(next_head.min(clusters))
            .skip(head + 1)
        {
            *slot = Some(nonhead(
                (cluster - head) as u64,
                (next_head - cluster) as u64,
            ));
        }
        let is_last = index + 1 == extents.len();
        if is_last && next_head > head && next_head < clusters {
            entries[next_head] = Some(entry(LCLUSTER_PLAIN, (end % BLOCK_SIZE) as u16, 0));
        }
    }
    let mut bytes = vec![0u8; (MAP_HEADER_SIZE + LEGACY_PADDING) as usize];
    for slot in entries {
        // Extents cover the file contiguously, so every cluster got an entry.
        bytes.extend_from_slice(&slot.unwrap_or_default());
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(start: u64, len: u64) -> Extent {
        Extent {
            start,
            len,
            stored: Stored::Raw,
        }
    }

    fn packed(start: u64, len: u64) -> Extent {
        Extent {
            start,
            len,
            stored: Stored::Compressed { spill_offset: 0 },
        }
    }

    /// (type, clusterofs, blkaddr or deltas) of each index.
    fn decode(bytes: &[u8]) -> Vec<(u16, u16, u32)> {
        assert!(bytes[..16].iter().all(|&b| b == 0), "header and padding");
        bytes[16..]
            .chunks(8)
            .map(|index| {
                (
                    u16::from_le_bytes([index[0], index[1]]),
                    u16::from_le_bytes([index[2], index[3]]),
                    u32::from_le_bytes([index[4], index[5], index[6], index[7]]),
                )
            })
            .collect()
    }

    #[test]
    fn heads_nonheads_and_the_final_end_mark() {
        // 30 000 bytes: a compressed extent of 10 000, a raw block, one of 9 000, a raw
        // remainder of 6 904 that ends inside cluster 7.
        let extents = [
            packed(0, 10_000),
            raw(10_000, 4096),
            packed(14_096, 9_000),
            raw(23_096, 6_904),
        ];
        let deltas = |back: u32, forward: u32| back | (forward << 16);
        assert_eq!(
            decode(&encode_index(&extents, 30_000, 100)),
            [
                (LCLUSTER_HEAD, 0, 100),
                (LCLUSTER_NONHEAD, 0, deltas(1, 1)),
                (LCLUSTER_PLAIN, 10_000 - 8192, 101),
                (LCLUSTER_HEAD, 14_096 - 12_288, 102),
                (LCLUSTER_NONHEAD, 0, deltas(1, 1)),
                (LCLUSTER_PLAIN, 23_096 - 20_480, 103),
                (LCLUSTER_NONHEAD, 0, deltas(1, 1)),
                (LCLUSTER_PLAIN, 30_000 - 28_672, 0),
            ]
        );
    }

    #[test]
    fn an_extent_ending_on_a_cluster_boundary_needs_no_end_mark() {
        let extents = [packed(0, 12_288)];
        let deltas = |back: u32, forward: u32| back | (forward << 16);
        assert_eq!(
            decode(&encode_index(&extents, 12_288, 7)),
            [
                (LCLUSTER_HEAD, 0, 7),
                (LCLUSTER_NONHEAD, 0, deltas(1, 2)),
                (LCLUSTER_NONHEAD, 0, deltas(2, 1)),
            ]
        );
    }

    #[test]
    fn a_last_extent_inside_its_head_cluster_has_no_end_mark() {
        let extents = [packed(0, 9_000), raw(9_000, 1_000)];
        let index = decode(&encode_index(&extents, 10_000, 1));
        assert_eq!(index[2], (LCLUSTER_PLAIN, 9_000 - 8192, 2));
        assert_eq!(index.len(), 3);
    }

    #[test]
    fn the_index_area_is_aligned_to_eight() {
        assert_eq!(index_area_len(64, 8192), 16 + 16);
        assert_eq!(index_area_len(76, 8193), 4 + 16 + 24);
    }
}
