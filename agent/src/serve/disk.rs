//! A launch's disk ([`mvm_protocol::Request::Mount`]): an ext4 filesystem in a host file,
//! attached by the runner as a virtio-blk disk with a serial of its choosing, mounted where
//! the launch says.
//!
//! The disk is found by its serial (`/sys/block/vd*/serial`), not by its letter, which depends
//! on the order devices probe in. It is mounted `nosuid,nodev`: whatever the filesystem holds,
//! it gives no one more privilege. A writable disk's root is given to the workload user, whose
//! commands are the ones that write there.

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

/// Mounts the disk with `serial` at `path`.
pub fn mount_disk(
    serial: &str,
    path: &str,
    read_only: bool,
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
