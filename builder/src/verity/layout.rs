//! Where each part of the hash device lies: the superblock, then the tree levels.
//!
//! Levels are numbered as `veritysetup` and the kernel number them: level 0 holds the hashes of
//! the data blocks, each level above holds the hashes of the blocks of the level below, and the
//! top level is a single block whose hash is the root hash. On the device the top level comes
//! first and level 0 last. A one-block image has no levels at all.

use super::superblock::SUPERBLOCK_LEN;
use super::{Superblock, VerityError, VerityParams, DIGEST_LEN};

/// One level of the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Level {
    /// Byte offset of its first block in the hash device.
    pub offset: u64,
    /// Number of hash blocks.
    pub blocks: u64,
}

/// The geometry of one hash device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Layout {
    /// Data blocks covered.
    pub data_blocks: u64,
    /// Hash block size in bytes.
    pub hash_block_size: usize,
    /// Digests that fit in one hash block.
    pub hashes_per_block: u64,
    /// Byte offset of the first tree block (the top level).
    pub tree_offset: u64,
    /// The levels, level 0 (hashes of data blocks) first.
    pub levels: Vec<Level>,
    /// Byte offset just past the tree: the length of the hash device.
    pub end: u64,
}

impl Layout {
    /// The layout `veritysetup` uses for `data_blocks` blocks with `params`, which must already
    /// be validated (block sizes in range).
    ///
    /// With a superblock the tree starts at the first hash block boundary (counted from the
    /// start of the device, as the kernel's `hash_start_block` is) after the 512-byte
    /// superblock. Without one it starts at `hash_offset` itself, which must then be a whole
    /// number of hash blocks: `veritysetup` would silently round it down.
    pub fn new(params: &VerityParams, data_blocks: u64) -> Result<Self, VerityError> {
        let hash_block_size = u64::from(params.hash_block_size);
        let offset = params.hash_offset;
        let too_large = || VerityError::BadHashOffset {
            offset,
            reason: "the hash device would end beyond 2^64 bytes",
        };
        let tree_offset = match params.superblock {
            Superblock::Written { .. } => {
                if !offset.is_multiple_of(SUPERBLOCK_LEN as u64) {
                    return Err(VerityError::BadHashOffset {
                        offset,
                        reason: "a superblock must start on a 512-byte boundary",
                    });
                }
                offset
                    .checked_add(SUPERBLOCK_LEN as u64)
                    .and_then(|end| end.checked_next_multiple_of(hash_block_size))
                    .ok_or_else(too_large)?
            }
            Superblock::Omitted => {
                if !offset.is_multiple_of(hash_block_size) {
                    return Err(VerityError::BadHashOffset {
                        offset,
                        reason: "without a superblock the tree must start on a hash block boundary",
                    });
                }
                offset
            }
        };

        let hashes_per_block = hash_block_size / DIGEST_LEN as u64;
        let mut level_sizes = Vec::new();
        let mut blocks_below = data_blocks;
        while blocks_below > 1 {
            blocks_below = blocks_below.div_ceil(hashes_per_block);
            level_sizes.push(blocks_below);
        }

        let mut levels = vec![
            Level {
                offset: 0,
                blocks: 0
            };
            level_sizes.len()
        ];
        let mut position = tree_offset;
        for (level, &blocks) in levels.iter_mut().zip(&level_sizes).rev() {
            *level = Level {
                offset: position,
                blocks,
            };
            position = blocks
                .checked_mul(hash_block_size)
                .and_then(|len| position.checked_add(len))
                .ok_or_else(too_large)?;
        }

        Ok(Self {
            data_blocks,
            hash_block_size: params.hash_block_size as usize,
            hashes_per_block,
            tree_offset,
            levels,
            end: position,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(data_blocks: u64, hash_block_size: u32, superblock: Superblock) -> Layout {
        let params = VerityParams {
            hash_block_size,
            superblock,
            ..VerityParams::new(Vec::new(), [0; 16])
        };
        Layout::new(&params, data_blocks).unwrap()
    }

    fn level_sizes(layout: &Layout) -> Vec<u64> {
        layout.levels.iter().map(|level| level.blocks).collect()
    }

    #[test]
    fn level_counts_follow_the_fan_out() {
        let written = Superblock::Written { uuid: [0; 16] };
        for (data_blocks, expected) in [
            (1, vec![]),
            (2, vec![1]),
            (128, vec![1]),
            (129, vec![2, 1]),
            (128 * 128, vec![128, 1]),
            (128 * 128 + 1, vec![129, 2, 1]),
            (33333, vec![261, 3, 1]),
        ] {
            assert_eq!(
                level_sizes(&layout(data_blocks, 4096, written)),
                expected,
                "{data_blocks}"
            );
        }
        // 512-byte hash blocks hold 16 digests.
        assert_eq!(level_sizes(&layout(1000, 512, written)), vec![63, 4, 1]);
    }

    #[test]
    fn top_level_comes_first_and_level_zero_last() {
        let layout = layout(129, 4096, Superblock::Written { uuid: [0; 16] });
        assert_eq!(layout.tree_offset, 4096);
        assert_eq!(
            layout.levels,
            vec![
                Level {
                    offset: 8192,
                    blocks: 2
                },
                Level {
                    offset: 4096,
                    blocks: 1
                }
            ]
        );
        assert_eq!(layout.end, 16384);
    }

    #[test]
    fn without_superblock_the_tree_starts_at_the_offset() {
        let params = VerityParams {
            superblock: Superblock::Omitted,
            hash_offset: 8192,
            ..VerityParams::new(Vec::new(), [0; 16])
        };
        let layout = Layout::new(&params, 2).unwrap();
        assert_eq!((layout.tree_offset, layout.end), (8192, 12288));
    }

    #[test]
    fn offsets_near_the_end_of_the_address_space_are_refused() {
        let params = VerityParams {
            hash_offset: u64::MAX - 511,
            ..VerityParams::new(Vec::new(), [0; 16])
        };
        assert!(matches!(
            Layout::new(&params, 2),
            Err(VerityError::BadHashOffset { .. })
        ));
    }
}
