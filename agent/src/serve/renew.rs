//! A guest restored from a boot snapshot made a machine of its own ([`Request::Renew`]):
//! every guest restored from one snapshot starts with the same kernel RNG state, hostname and
//! clock, so before anything runs in it the host's fresh entropy is mixed into the kernel's
//! input pool (`RNDADDENTROPY`, credited) and the kernel's RNG reseeded from it
//! (`RNDRESEEDCRNG`): from then on `/dev/urandom`, `getrandom` and every key made in the guest
//! differ from its siblings'. `/proc/sys/kernel/random/boot_id` needs nothing: the kernel
//! makes it from its RNG on first read, which comes after this.
//!
//! [`Request::Renew`]: mvm_protocol::Request::Renew

use std::fs::File;

use mvm_protocol::{codes, ErrorReply, SecretHex, RENEW_ENTROPY_BYTES};
use rustix::ioctl::{ioctl, NoArg, Opcode, Setter};

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: Opcode = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: Opcode = 0x5207;

/// `struct rand_pool_info` with its buffer: the bits credited, the buffer's bytes, the bytes.
#[repr(C)]
struct PoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; RENEW_ENTROPY_BYTES],
}

fn failed(what: &str, e: impl std::fmt::Display) -> ErrorReply {
    ErrorReply {
        code: codes::RENEW_FAILED.into(),
        message: format!("{what}: {e}"),
    }
}

/// Mixes `entropy` into the kernel's pool, reseeds its RNG, and names the guest `hostname`.
pub fn renew(entropy: &SecretHex, hostname: &str) -> Result<(), ErrorReply> {
    let bytes = hex::decode(&entropy.0).map_err(|e| failed("the entropy", e))?;
    let buf: [u8; RENEW_ENTROPY_BYTES] = bytes.try_into().map_err(|bytes: Vec<u8>| {
        failed(
            "the entropy",
            format!("{} bytes, not {RENEW_ENTROPY_BYTES}", bytes.len()),
        )
    })?;
    let random = File::options()
        .write(true)
        .open("/dev/random")
        .map_err(|e| failed("/dev/random", e))?;
    let info = PoolInfo {
        entropy_count: (RENEW_ENTROPY_BYTES * 8) as libc::c_int,
        buf_size: RENEW_ENTROPY_BYTES as libc::c_int,
        buf,
    };
    // SAFETY: RNDADDENTROPY reads a `struct rand_pool_info` and the `buf_size` bytes after
    // its header, which `PoolInfo` lays out in the kernel's layout; it writes nothing back.
    #[allow(unsafe_code)]
    unsafe { ioctl(&random, Setter::<RNDADDENTROPY, PoolInfo>::new(info)) }
        .map_err(|e| failed("RNDADDENTROPY", e))?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    #[allow(unsafe_code)]
    unsafe { ioctl(&random, NoArg::<RNDRESEEDCRNG>::new()) }
        .map_err(|e| failed("RNDRESEEDCRNG", e))?;
    let name_fine = !hostname.is_empty()
        && hostname.len() <= 63
        && hostname
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !name_fine {
        return Err(failed(
            "the hostname",
            format!("{hostname:?} is not a host name"),
        ));
    }
    rustix::system::sethostname(hostname.as_bytes()).map_err(|e| failed("sethostname", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entropy of the wrong size or not hex, and a hostname that is no host name, are refused
    /// with the code before anything reaches the kernel.
    #[test]
    fn malformed_renewals_are_refused_before_the_kernel_sees_them() {
        for entropy in ["zz", "00", &"00".repeat(RENEW_ENTROPY_BYTES + 1)] {
            let refused = renew(&SecretHex(entropy.to_string()), "sandbox-1").unwrap_err();
            assert_eq!(refused.code, codes::RENEW_FAILED);
        }
    }
}
