//! LZ4 "fixed output" compression: as much input as fits into one block's worth of output.
//!
//! EROFS stores compressed data in physical clusters of whole blocks, so the compressor is
//! asked the reverse question of the usual one: not "how small does this input get" but "how
//! much input fits into 4096 bytes". liblz4 answers it with `LZ4_compress_destSize` and
//! `LZ4_compress_HC_destSize` (the functions `mkfs.erofs` uses); they are reached here through
//! the copy of liblz4 that `lz4-sys` builds and links statically, so the output depends only
//! on the pinned crate, never on the host's library.

use std::os::raw::{c_char, c_int, c_void};

// The `lz4-sys` crate compiles liblz4 (lz4.c and lz4hc.c) into a static library; naming it
// links that library, whose destSize functions its own bindings do not declare.
use lz4_sys as _;

#[allow(unsafe_code)]
extern "C" {
    fn LZ4_compress_destSize(
        src: *const c_char,
        dst: *mut c_char,
        src_size: *mut c_int,
        target_dst_size: c_int,
    ) -> c_int;
    fn LZ4_sizeofStateHC() -> c_int;
    fn LZ4_compress_HC_destSize(
        state: *mut c_void,
        src: *const c_char,
        dst: *mut c_char,
        src_size: *mut c_int,
        target_dst_size: c_int,
        level: c_int,
    ) -> c_int;
}

/// The LZ4 HC level `mkfs.erofs -zlz4hc` uses when none is given (liblz4's default).
pub const LZ4HC_DEFAULT_LEVEL: u8 = 9;
/// The highest LZ4 HC level liblz4 has.
pub const LZ4HC_MAX_LEVEL: u8 = 12;

/// One compressor with its working memory, reused for every cluster of a build.
pub(super) enum Compressor {
    Fast,
    High {
        level: c_int,
        /// liblz4's HC state: `LZ4_sizeofStateHC()` bytes, 8-byte aligned.
        state: Vec<u64>,
    },
}

impl Compressor {
    pub(super) fn fast() -> Self {
        Compressor::Fast
    }

    /// LZ4 HC at `level`, clamped to 1..=12.
    pub(super) fn high(level: u8) -> Self {
        // SAFETY: a pure function of liblz4's build, no arguments.
        #[allow(unsafe_code)]
        let bytes = unsafe { LZ4_sizeofStateHC() };
        let words = usize::try_from(bytes).unwrap_or(0).div_ceil(8);
        Compressor::High {
            level: c_int::from(level.clamp(1, LZ4HC_MAX_LEVEL)),
            state: vec![0; words],
        }
    }

    /// Compresses a prefix of `input` into `output`, as long a prefix as fits. Returns
    /// (input bytes consumed, output bytes written); (0, 0) when nothing could be compressed.
    pub(super) fn compress_prefix(&mut self, input: &[u8], output: &mut [u8]) -> (usize, usize) {
        let mut consumed = c_int::try_from(input.len()).unwrap_or(c_int::MAX);
        let capacity = c_int::try_from(output.len()).unwrap_or(c_int::MAX);
        let written = match self {
            // SAFETY: `input` is readable for `consumed` bytes and `output` writable for
            // `capacity` bytes (both clamped to the slices' lengths); liblz4 reads and writes
            // within those bounds and only writes `consumed` back.
            #[allow(unsafe_code)]
            Compressor::Fast => unsafe {
                LZ4_compress_destSize(
                    input.as_ptr().cast(),
                    output.as_mut_ptr().cast(),
                    &mut consumed,
                    capacity,
                )
            },
            // SAFETY: as above; `state` is `LZ4_sizeofStateHC()` bytes, 8-byte aligned as
            // liblz4 requires, and owned exclusively by this call.
            #[allow(unsafe_code)]
            Compressor::High { level, state } => unsafe {
                LZ4_compress_HC_destSize(
                    state.as_mut_ptr().cast(),
                    input.as_ptr().cast(),
                    output.as_mut_ptr().cast(),
                    &mut consumed,
                    capacity,
                    *level,
                )
            },
        };
        match (usize::try_from(consumed), usize::try_from(written)) {
            (Ok(consumed), Ok(written))
                if written > 0 && written <= output.len() && consumed <= input.len() =>
            {
                (consumed, written)
            }
            _ => (0, 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(len: usize) -> Vec<u8> {
        let words = ["erofs ", "cluster ", "block ", "verity ", "guest "];
        let mut out = Vec::with_capacity(len);
        let mut state = 7u32;
        while out.len() < len {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            out.extend_from_slice(words[(state >> 16) as usize % words.len()].as_bytes());
        }
        out.truncate(len);
        out
    }

    #[test]
    fn a_prefix_that_fills_the_block_decompresses_to_itself() {
        let input = text(256 * 1024);
        for mut compressor in [Compressor::fast(), Compressor::high(LZ4HC_DEFAULT_LEVEL)] {
            let mut block = [0u8; 4096];
            let (consumed, written) = compressor.compress_prefix(&input, &mut block);
            assert!(consumed > 4096 && written <= 4096, "{consumed} {written}");
            let back = lz4_flex::block::decompress(&block[..written], consumed).unwrap();
            assert_eq!(back, input[..consumed]);
        }
    }

    #[test]
    fn high_compression_fits_more_than_fast() {
        let input = text(512 * 1024);
        let mut block = [0u8; 4096];
        let fast = Compressor::fast().compress_prefix(&input, &mut block).0;
        let high = Compressor::high(LZ4HC_MAX_LEVEL)
            .compress_prefix(&input, &mut block)
            .0;
        assert!(high > fast, "hc {high} vs fast {fast}");
    }

    #[test]
    fn random_bytes_do_not_fit_more_than_a_block() {
        let mut state = 1u64;
        let input: Vec<u8> = (0..16384)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let mut block = [0u8; 4096];
        let (consumed, written) = Compressor::fast().compress_prefix(&input, &mut block);
        assert!(consumed <= 4096 && written <= 4096);
    }
}
