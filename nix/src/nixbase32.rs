//! Nix's base-32, the encoding of store path hash parts and of hashes on Nix's command line.
//!
//! It is not RFC 4648: the alphabet leaves out `e`, `o`, `u` and `t` (so no words appear in
//! store paths), and the string starts with the *last* 5-bit group of the value — bit `5n` of
//! the byte string, counted little-endian, is the lowest bit of the `n`-th character from the
//! end. Decoding is strict: a character outside the alphabet, a length that no byte string
//! encodes to, or bits set beyond the value's end are refused, so every valid text decodes to
//! exactly one byte string and encodes back to itself.

use crate::error::{excerpt, NixError};

/// The 32 digits, in value order.
const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Each byte's value as a digit, or `INVALID`.
const DIGITS: [u8; 256] = digit_table();
const INVALID: u8 = 0xff;

const fn digit_table() -> [u8; 256] {
    let mut table = [INVALID; 256];
    let mut value = 0;
    while value < ALPHABET.len() {
        table[ALPHABET[value] as usize] = value as u8;
        value += 1;
    }
    table
}

/// How many characters `bytes` bytes encode to: every bit, rounded up to whole digits.
pub const fn encoded_len(bytes: usize) -> usize {
    (bytes * 8).div_ceil(5)
}

/// The nixbase32 text of `bytes`.
pub fn encode(bytes: &[u8]) -> String {
    (0..encoded_len(bytes.len()))
        .rev()
        .map(|n| {
            let bit = n * 5;
            let (i, shift) = (bit / 8, bit % 8);
            let low = u16::from(bytes[i]) >> shift;
            let high = bytes.get(i + 1).map_or(0, |&b| u16::from(b) << (8 - shift));
            char::from(ALPHABET[usize::from((low | high) & 0x1f)])
        })
        .collect()
}

/// The bytes `text` encodes.
pub fn decode(text: &str) -> Result<Vec<u8>, NixError> {
    let input = text.as_bytes();
    let len = input.len() * 5 / 8;
    if encoded_len(len) != input.len() {
        return Err(invalid(text, "no byte string encodes to this length"));
    }
    let mut out = vec![0u8; len];
    for (n, &c) in input.iter().rev().enumerate() {
        let digit = DIGITS[usize::from(c)];
        if digit == INVALID {
            return Err(invalid(text, "a character outside Nix's base-32 alphabet"));
        }
        let bit = n * 5;
        let (i, shift) = (bit / 8, bit % 8);
        let spread = u16::from(digit) << shift;
        out[i] |= spread as u8;
        let carry = (spread >> 8) as u8;
        match out.get_mut(i + 1) {
            Some(next) => *next |= carry,
            None if carry != 0 => return Err(invalid(text, "bits set past the end of the value")),
            None => {}
        }
    }
    Ok(out)
}

/// The `N` bytes `text` encodes; any other length is refused.
pub fn decode_array<const N: usize>(text: &str) -> Result<[u8; N], NixError> {
    if text.len() != encoded_len(N) {
        return Err(invalid(text, "wrong length for this hash"));
    }
    let bytes = decode(text)?;
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes);
    Ok(out)
}

fn invalid(text: &str, reason: &'static str) -> NixError {
    NixError::Base32 {
        input: excerpt(text),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Vectors printed by Nix 2.8: `nix-hash --type sha256 --to-base32 <hex>` (and sha1, md5).
    const VECTORS: &[(&str, &str)] = &[
        (
            // sha256("x")
            "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881",
            "10a83a91g1r50bdw8g4hn47m7j7m6angpabwc80l9c16nx11cw9d",
        ),
        (
            // sha256("")
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
        ),
        // sha1("abc")
        (
            "a9993e364706816aba3e25717850c26c9cd0d89d",
            "kpcd173cq987hw957sx6m0868wv3x6d9",
        ),
        // md5("abc")
        (
            "900150983cd24fb0d6963f7d28e17f72",
            "3jgzhjhz9zjvbb0kyj7jc500ch",
        ),
    ];

    #[test]
    fn encodes_like_nix() {
        for (hex, text) in VECTORS {
            let bytes = hex::decode(hex).unwrap();
            assert_eq!(encode(&bytes), *text);
            assert_eq!(decode(text).unwrap(), bytes);
        }
    }

    #[test]
    fn lengths_follow_the_bit_count() {
        assert_eq!(encoded_len(0), 0);
        assert_eq!(encoded_len(16), 26);
        assert_eq!(encoded_len(20), 32);
        assert_eq!(encoded_len(32), 52);
        assert_eq!(encoded_len(64), 103);
        assert_eq!(encode(&[]), "");
        assert_eq!(decode("").unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn refuses_what_no_bytes_encode_to() {
        for bad in ["e", "0e00", "1", "aaa", "0000000000000000000000000000000u"] {
            let err = decode(bad).unwrap_err();
            assert_eq!(err.code(), "NIX001", "{bad}: {err}");
        }
        // Two digits hold 10 bits for one byte: the top two bits must stay clear.
        assert_eq!(decode("7z").unwrap(), vec![0xff]);
        assert_eq!(decode("8z").unwrap_err().code(), "NIX001");
        assert_eq!(decode_array::<20>("00").unwrap_err().code(), "NIX001");
    }

    proptest! {
        #[test]
        fn round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let text = encode(&bytes);
            prop_assert_eq!(text.len(), encoded_len(bytes.len()));
            prop_assert_eq!(decode(&text).unwrap(), bytes);
        }

        #[test]
        fn never_panics_and_accepts_only_its_own_output(text in "[0-9a-z]{0,60}") {
            if let Ok(bytes) = decode(&text) {
                prop_assert_eq!(encode(&bytes), text);
            }
        }
    }
}
