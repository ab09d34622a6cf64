//! A guest restored from a boot snapshot made a machine of its own ([`Request::Renew`]):
//! every guest restored from one snapshot starts with the same kernel RNG state, hostname and
//! clock, so before anything runs in it the host's fresh entropy is mixed into the kernel's
//! input pool (`RNDADDENTROPY`, credited) and the kernel's RNG reseeded from it
//! (`RNDRESEEDCRNG`): from then on `/dev/urandom`, `getrandom` and every key made in the guest
//! differ from its siblings'. `/proc/sys/kernel/random/boot_id` needs nothing: the kernel
//! makes it from its RNG on first read, which comes after this. The machine-id is written
//! anew from the reseeded RNG ([`write_machine_id`]).
//!
//! [`Request::Renew`]: mvm_protocol::Request::Renew

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

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

/// Mixes `entropy` into the kernel's pool, reseeds its RNG, names the guest `hostname` and
/// gives it a machine-id of its own.
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
    rustix::system::sethostname(hostname.as_bytes()).map_err(|e| failed("sethostname", e))?;
    write_machine_id(Path::new("/"))
}

/// Where a machine-id is kept: systemd's, and D-Bus's older copy.
const MACHINE_ID_FILES: [&str; 2] = ["etc/machine-id", "var/lib/dbus/machine-id"];

/// Writes a fresh machine-id (systemd's format: 32 lowercase hex digits and a newline, from
/// the just reseeded RNG) under `root`: to `etc/machine-id` when the image has an `etc`,
/// and to `var/lib/dbus/machine-id` where the image keeps that as a file of its own (a
/// symlink to the first is left alone). The writes land in the root's tmpfs overlay, never
/// in the verified image; each is a new file renamed over the old, so a symlink the image
/// put there is replaced, not followed.
fn write_machine_id(root: &Path) -> Result<(), ErrorReply> {
    let mut id = [0u8; 16];
    rustix::rand::getrandom(&mut id, rustix::rand::GetRandomFlags::empty())
        .map_err(|e| failed("getrandom", e))?;
    let text = format!("{}\n", hex::encode(id));
    for (n, file) in MACHINE_ID_FILES.iter().enumerate() {
        let path = root.join(file);
        let wanted = match n {
            0 => path.parent().is_some_and(Path::is_dir),
            _ => path.symlink_metadata().is_ok_and(|m| m.is_file()),
        };
        if wanted {
            replace(&path, text.as_bytes()).map_err(|e| failed(file, e))?;
        }
    }
    Ok(())
}

/// Puts `bytes` at `path` (mode 0444) by writing a new file beside it and renaming it over.
fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temp = path.with_extension("mvm-new");
    let _ = std::fs::remove_file(&temp);
    let mut file = File::options()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&temp)?;
    file.write_all(bytes)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o444))?;
    std::fs::rename(&temp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entropy of the wrong size or not hex, and a hostname that is no host name, are refused
    /// with the code before anything reaches the kernel.
    /// Each renewal writes a new machine-id of systemd's form over what was there (a symlink
    /// replaced, not followed); D-Bus's copy only where it is a file; nothing without `etc`.
    #[test]
    fn every_renewal_writes_a_machine_id_of_its_own() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::create_dir_all(root.path().join("var/lib/dbus")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("etc/machine-id")).unwrap();
        std::fs::write(root.path().join("var/lib/dbus/machine-id"), "0".repeat(32)).unwrap();
        let read = |file: &str| std::fs::read_to_string(root.path().join(file)).unwrap();
        write_machine_id(root.path()).unwrap();
        let first = read("etc/machine-id");
        assert_eq!(first.len(), 33, "{first:?}");
        assert!(first[..32]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert!(first.ends_with('\n'));
        assert_eq!(read("var/lib/dbus/machine-id"), first);
        assert_eq!(
            std::fs::read(outside.path()).unwrap(),
            b"",
            "followed the symlink"
        );
        write_machine_id(root.path()).unwrap();
        assert_ne!(read("etc/machine-id"), first);
        // D-Bus's copy as a symlink: left a symlink.
        std::fs::remove_file(root.path().join("var/lib/dbus/machine-id")).unwrap();
        std::os::unix::fs::symlink(
            "/etc/machine-id",
            root.path().join("var/lib/dbus/machine-id"),
        )
        .unwrap();
        write_machine_id(root.path()).unwrap();
        let link = root.path().join("var/lib/dbus/machine-id");
        assert!(link.symlink_metadata().unwrap().is_symlink());
        // No `etc`: nothing made.
        let bare = tempfile::tempdir().unwrap();
        write_machine_id(bare.path()).unwrap();
        assert!(!bare.path().join("etc").exists());
    }

    #[test]
    fn malformed_renewals_are_refused_before_the_kernel_sees_them() {
        for entropy in ["zz", "00", &"00".repeat(RENEW_ENTROPY_BYTES + 1)] {
            let refused = renew(&SecretHex(entropy.to_string()), "sandbox-1").unwrap_err();
            assert_eq!(refused.code, codes::RENEW_FAILED);
        }
    }
}
