//! SHA-256 of blocks as dm-verity format 1 computes it, and the parallel hashing of data blocks.
//!
//! Hashing the data blocks is nearly all the work of building or checking a tree, so it is
//! spread over threads: a call hashes a run of consecutive blocks, cut into tasks that the
//! threads take in turn; each thread reads its task's blocks with positioned reads (no shared
//! file cursor) into a buffer of its own and hashes them into the task's slice of the output.
//! The output does not depend on the thread count or on how the run is cut.

use std::fs::File;
use std::num::NonZeroUsize;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, PoisonError};
use std::{io, panic, thread};

use sha2::digest::Output;
use sha2::{Digest, Sha256};

use super::DIGEST_LEN;

/// SHA-256 with the salt already absorbed.
///
/// Format 1 hashes `salt ‖ block` for every block, so each block's hash starts from the same
/// state; cloning it skips re-hashing the salt for each of millions of blocks.
#[derive(Clone)]
pub(super) struct SaltedSha256(Sha256);

impl SaltedSha256 {
    pub fn new(salt: &[u8]) -> Self {
        Self(Sha256::new_with_prefix(salt))
    }

    /// The hash of one block.
    pub fn digest(&self, block: &[u8]) -> [u8; DIGEST_LEN] {
        self.0.clone().chain_update(block).finalize().into()
    }

    /// Hashes each `block_size` block of `blocks` into the matching 32 bytes of `digests`.
    pub fn digest_blocks(&self, blocks: &[u8], block_size: usize, digests: &mut [u8]) {
        for (block, digest) in blocks
            .chunks_exact(block_size)
            .zip(digests.chunks_exact_mut(DIGEST_LEN))
        {
            let mut hasher = self.0.clone();
            hasher.update(block);
            hasher.finalize_into(Output::<Sha256>::from_mut_slice(digest));
        }
    }

    /// The hashes of each `block_size` block of `blocks`, concatenated.
    pub fn digests_of(&self, blocks: &[u8], block_size: usize) -> Vec<u8> {
        let mut digests = vec![0; blocks.len() / block_size * DIGEST_LEN];
        self.digest_blocks(blocks, block_size, &mut digests);
        digests
    }
}

/// How the data blocks are cut up for hashing. Only speed and memory depend on it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Tuning {
    /// Threads hashing at once.
    pub threads: NonZeroUsize,
    /// Data bytes a thread reads and hashes per task: large enough that reads are cheap, small
    /// enough that the threads finish a batch at nearly the same time.
    pub task_bytes: usize,
    /// Data bytes per batch, the unit in which the bottom level is produced and written; its
    /// hashes are the only per-block state in memory.
    pub batch_bytes: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            threads: thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
            task_bytes: 1 << 20,
            batch_bytes: 256 << 20,
        }
    }
}

impl Tuning {
    /// Data blocks per batch: about `batch_bytes` of data, rounded up to whole level-0 hash
    /// blocks so that every batch's hashes start a fresh hash block, and no more than the image
    /// needs.
    pub fn batch_blocks(
        &self,
        data_block_size: usize,
        hashes_per_block: u64,
        data_blocks: u64,
    ) -> u64 {
        let wanted = (self.batch_bytes / data_block_size).max(1) as u64;
        wanted.min(data_blocks).next_multiple_of(hashes_per_block)
    }
}

/// Hashes blocks of a data image, spread over [`Tuning::threads`] threads.
pub(super) struct DataBlockHasher<'a> {
    data: &'a File,
    salted: &'a SaltedSha256,
    block_size: usize,
    task_blocks: usize,
    /// The calling thread's read buffer, kept across calls.
    own_buffer: Vec<u8>,
    /// A read buffer for each helper thread, kept across calls.
    helper_buffers: Vec<Vec<u8>>,
}

impl<'a> DataBlockHasher<'a> {
    pub fn new(
        data: &'a File,
        salted: &'a SaltedSha256,
        block_size: usize,
        tuning: &Tuning,
    ) -> Self {
        Self {
            data,
            salted,
            block_size,
            task_blocks: (tuning.task_bytes / block_size).max(1),
            own_buffer: Vec::new(),
            helper_buffers: vec![Vec::new(); tuning.threads.get() - 1],
        }
    }

    /// Bytes per data block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Hashes data blocks `first_block..` into `digests`, one 32-byte digest per block.
    pub fn hash(&mut self, first_block: u64, digests: &mut [u8]) -> io::Result<()> {
        let task_digest_bytes = self.task_blocks * DIGEST_LEN;
        let task_count = digests.len().div_ceil(task_digest_bytes);
        let tasks = Mutex::new(digests.chunks_mut(task_digest_bytes).enumerate());
        let (data, salted, block_size, task_blocks) = (
            self.data,
            self.salted,
            self.block_size,
            self.task_blocks as u64,
        );

        let work = |buffer: &mut Vec<u8>| -> io::Result<()> {
            loop {
                let next = tasks.lock().unwrap_or_else(PoisonError::into_inner).next();
                let Some((task, task_digests)) = next else {
                    return Ok(());
                };
                let len = task_digests.len() / DIGEST_LEN * block_size;
                if buffer.len() < len {
                    buffer.resize(len, 0);
                }
                let blocks = &mut buffer[..len];
                let first = first_block + task as u64 * task_blocks;
                data.read_exact_at(blocks, first * block_size as u64)?;
                salted.digest_blocks(blocks, block_size, task_digests);
            }
        };

        let helper_count = self.helper_buffers.len().min(task_count.saturating_sub(1));
        let helper_buffers = &mut self.helper_buffers[..helper_count];
        let own_buffer = &mut self.own_buffer;
        thread::scope(|scope| {
            let helpers: Vec<_> = helper_buffers
                .iter_mut()
                .map(|buffer| scope.spawn(|| work(buffer)))
                .collect();
            let mut result = work(own_buffer);
            for helper in helpers {
                let helper_result = helper
                    .join()
                    .unwrap_or_else(|payload| panic::resume_unwind(payload));
                result = result.and(helper_result);
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn salted_digest_is_sha256_of_salt_then_block() {
        let salted = SaltedSha256::new(b"salt");
        assert_eq!(
            salted.digest(b"block"),
            <[u8; 32]>::from(Sha256::digest(b"saltblock"))
        );
        let digests = salted.digests_of(b"ab", 1);
        assert_eq!(digests[..32], salted.digest(b"a"));
        assert_eq!(digests[32..], salted.digest(b"b"));
    }

    #[test]
    fn batches_cover_whole_hash_blocks() {
        let tuning = Tuning {
            batch_bytes: 256 << 20,
            ..Tuning::default()
        };
        assert_eq!(tuning.batch_blocks(4096, 128, 1 << 30), 65536);
        assert_eq!(tuning.batch_blocks(4096, 128, 1000), 1024);
        let tiny = Tuning {
            batch_bytes: 1,
            ..tuning
        };
        assert_eq!(tiny.batch_blocks(512, 16, 1000), 16);
    }
}
