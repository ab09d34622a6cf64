//! The 512-byte verity superblock that `veritysetup` puts at the start of the hash device.
//!
//! The kernel never reads it (its table carries every parameter); it is what lets
//! `veritysetup verify` and `veritysetup open` find the parameters. All integers are
//! little-endian; every byte not named below is zero.

use std::ops::Range;

use super::{VerityParams, HASH_ALGORITHM};

/// Length of the superblock in bytes.
pub(super) const SUPERBLOCK_LEN: usize = 512;

const SIGNATURE: &[u8; 8] = b"verity\0\0";
/// The superblock format version; the only one there is.
const SUPERBLOCK_VERSION: u32 = 1;
/// Hash format 1 hashes the salt before each block (format 0, Chrome OS's, hashes it after).
const HASH_TYPE: u32 = 1;

const SIGNATURE_AT: Range<usize> = 0..8;
const VERSION_AT: Range<usize> = 8..12;
const HASH_TYPE_AT: Range<usize> = 12..16;
const UUID_AT: Range<usize> = 16..32;
const ALGORITHM_AT: Range<usize> = 32..64;
const DATA_BLOCK_SIZE_AT: Range<usize> = 64..68;
const HASH_BLOCK_SIZE_AT: Range<usize> = 68..72;
const DATA_BLOCKS_AT: Range<usize> = 72..80;
const SALT_SIZE_AT: Range<usize> = 80..82;
const SALT_AT: Range<usize> = 88..344;

/// Every region of the superblock, in order, with the name a mismatch is reported under.
const REGIONS: [(&str, Range<usize>); 12] = [
    ("signature", SIGNATURE_AT),
    ("version", VERSION_AT),
    ("hash type", HASH_TYPE_AT),
    ("uuid", UUID_AT),
    ("algorithm", ALGORITHM_AT),
    ("data block size", DATA_BLOCK_SIZE_AT),
    ("hash block size", HASH_BLOCK_SIZE_AT),
    ("data blocks", DATA_BLOCKS_AT),
    ("salt size", SALT_SIZE_AT),
    ("padding", SALT_SIZE_AT.end..SALT_AT.start),
    ("salt", SALT_AT),
    ("padding", SALT_AT.end..SUPERBLOCK_LEN),
];

/// The superblock for `data_blocks` blocks hashed with `params` (already validated: the salt
/// fits) under `uuid`.
pub(super) fn encode(
    params: &VerityParams,
    uuid: &[u8; 16],
    data_blocks: u64,
) -> [u8; SUPERBLOCK_LEN] {
    let mut superblock = [0; SUPERBLOCK_LEN];
    superblock[SIGNATURE_AT].copy_from_slice(SIGNATURE);
    superblock[VERSION_AT].copy_from_slice(&SUPERBLOCK_VERSION.to_le_bytes());
    superblock[HASH_TYPE_AT].copy_from_slice(&HASH_TYPE.to_le_bytes());
    superblock[UUID_AT].copy_from_slice(uuid);
    superblock[ALGORITHM_AT][..HASH_ALGORITHM.len()].copy_from_slice(HASH_ALGORITHM.as_bytes());
    superblock[DATA_BLOCK_SIZE_AT].copy_from_slice(&params.data_block_size.to_le_bytes());
    superblock[HASH_BLOCK_SIZE_AT].copy_from_slice(&params.hash_block_size.to_le_bytes());
    superblock[DATA_BLOCKS_AT].copy_from_slice(&data_blocks.to_le_bytes());
    let salt_size = params.salt.len() as u16;
    superblock[SALT_SIZE_AT].copy_from_slice(&salt_size.to_le_bytes());
    superblock[SALT_AT][..params.salt.len()].copy_from_slice(&params.salt);
    superblock
}

/// The name of the first region where `stored` differs from `expected`, if any.
pub(super) fn first_difference(
    stored: &[u8; SUPERBLOCK_LEN],
    expected: &[u8; SUPERBLOCK_LEN],
) -> Option<&'static str> {
    REGIONS
        .into_iter()
        .find(|(_, region)| stored[region.clone()] != expected[region.clone()])
        .map(|(name, _)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_tile_the_superblock() {
        let mut next = 0;
        for (name, region) in REGIONS {
            assert_eq!(region.start, next, "{name}");
            next = region.end;
        }
        assert_eq!(next, SUPERBLOCK_LEN);
    }

    #[test]
    fn a_difference_is_named_by_its_field() {
        let params = VerityParams::new(vec![0xab; 3], [7; 16]);
        let expected = encode(&params, &[7; 16], 10);
        assert_eq!(first_difference(&expected, &expected), None);
        let mut stored = expected;
        stored[SALT_AT.start + 1] ^= 1;
        assert_eq!(first_difference(&stored, &expected), Some("salt"));
        stored[DATA_BLOCKS_AT.start] ^= 1;
        assert_eq!(first_difference(&stored, &expected), Some("data blocks"));
    }
}
