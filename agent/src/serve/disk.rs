//! A launch's disk ([`mvm_protocol::Request::Mount`]): an ext4 filesystem in a host file,
//! attached by the runner as a virtio-blk disk with a serial of its choosing, mounted where
//! the launch says.
//!
//! The disk is found by its serial (`/sys/block/vd*/serial`), not by its letter, which depends
//! on the order devices probe in. It is mounted `nosuid,nodev`: whatever the filesystem holds,
//! it gives no one more privilege. A writable disk's root is given to the workload user, whose
//! commands are the ones that write there.
//!
//! An encrypted volume comes with its key: the disk is opened with dm-crypt
//! (`aes-xts-plain64`, the key in the kernel from then on) and the filesystem mounted from that
//! device. Its ext4 journal makes a volume whose VM was killed mid-write mount again.

use std::fs::{self, DirBuilder};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use mvm_protocol::{codes, ErrorReply};
use rustix::mount::{mount, MountFlags};

use super::exec::Credentials;

/// How long a disk has to appear: virtio disks probe asynchronously, and the runner asks
/// right after the hello.
const APPEAR_WITHIN: Duration = Duration::from_secs(10);

/// Mounts the disk with `serial` at `path`; with `key` (hex), through dm-crypt.
pub fn mount_disk(
    serial: &str,
    path: &str,
    read_only: bool,
    key: Option<&str>,
    owner: Option<Credentials>,
) -> Result<(), ErrorReply> {
    let failed = |message: String| ErrorReply {
        code: codes::MOUNT_FAILED.into(),
        message,
    };
    if !mvm_protocol::is_mount_point(path) {
        return Err(ErrorReply {
            code: codes::BAD_REQUEST.into(),
            message: format!("{path:?} is not a mount point a disk may have"),
        });
    }
    let target = Path::new(path);
    let device = find_by_serial(Path::new("/sys/block"), serial, APPEAR_WITHIN)
        .ok_or_else(|| failed(format!("no disk with serial {serial:?} appeared")))?;
    let device = match key {
        // Writable under a read-only mount: a journal left by the volume's last VM is
        // replayed (the runner gives volumes writable devices for this).
        Some(key) => open_volume(serial, &device, key)?,
        None => device,
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(target)
        .map_err(|e| failed(format!("{}: {e}", target.display())))?;
    let mut flags = MountFlags::NOSUID | MountFlags::NODEV;
    if read_only {
        flags |= MountFlags::RDONLY;
    }
    mount(&device, target, "ext4", flags, None).map_err(|e| {
        failed(format!(
            "mounting {} (ext4) at {path}: {e}",
            device.display()
        ))
    })?;
    if let (false, Some(owner)) = (read_only, owner) {
        std::os::unix::fs::chown(target, Some(owner.uid), Some(owner.gid))
            .map_err(|e| failed(format!("{path}: {e}")))?;
    }
    Ok(())
}

/// Opens the encrypted volume on `device` with dm-crypt under `key` (128 hex digits); the
/// path of the device that shows its plaintext.
fn open_volume(serial: &str, device: &Path, key: &str) -> Result<PathBuf, ErrorReply> {
    let failed = |message: String| ErrorReply {
        code: codes::VOLUME_FAILED.into(),
        message,
    };
    if key.len() != 128 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(failed("a volume's key is 64 bytes of hex".into()));
    }
    let name = device
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let size = Path::new("/sys/block").join(&name).join("size");
    let sectors: u64 = fs::read_to_string(&size)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .filter(|sectors| *sectors > 0)
        .ok_or_else(|| failed(format!("{}: no size", size.display())))?;
    crate::boot::devmapper::open_crypt(
        &format!("mvm-crypt-{serial}"),
        &device.to_string_lossy(),
        sectors,
        key,
    )
    .map_err(|e| failed(format!("opening {} with dm-crypt: {e}", device.display())))
}

/// `/dev/<name>` of the block device under `sys_block` whose `serial` is `serial`, waiting up
/// to `within` for it to appear.
fn find_by_serial(sys_block: &Path, serial: &str, within: Duration) -> Option<PathBuf> {
    let deadline = Instant::now() + within;
    loop {
        let found = fs::read_dir(sys_block).ok().and_then(|entries| {
            entries.flatten().find_map(|entry| {
                let theirs = fs::read_to_string(entry.path().join("serial")).ok()?;
                (theirs.trim_end() == serial).then(|| Path::new("/dev").join(entry.file_name()))
            })
        });
        if found.is_some() || Instant::now() >= deadline {
            return found;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The disk is the one whose serial matches, whatever its letter; none matching is none.
    #[test]
    fn a_disk_is_found_by_its_serial() {
        let sys = tempfile::tempdir().unwrap();
        for (name, serial) in [("vda", "root\n"), ("vdb", "verity"), ("vdc", "mvm-disk0\n")] {
            fs::create_dir(sys.path().join(name)).unwrap();
            fs::write(sys.path().join(name).join("serial"), serial).unwrap();
        }
        fs::create_dir(sys.path().join("loop0")).unwrap();
        let found = find_by_serial(sys.path(), "mvm-disk0", Duration::ZERO);
        assert_eq!(found, Some(PathBuf::from("/dev/vdc")));
        assert_eq!(
            find_by_serial(sys.path(), "mvm-disk1", Duration::ZERO),
            None
        );
    }
}
