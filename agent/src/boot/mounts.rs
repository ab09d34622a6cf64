//! Mounts: the kernel's own filesystems, then the verified root made `/`.
//!
//! The root is the EROFS image on the dm-verity device, read-only, under an overlay whose
//! upper layer is a tmpfs: the workload can write anywhere, its writes live in guest memory
//! and vanish with the VM, and nothing it writes can reach the signed image. Before the switch
//! `/proc`, `/sys` and `/dev` are moved into the new root, so the console stays open across it.

use std::fs;
use std::io;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use rustix::mount::{mount, mount_move, MountFlags};

use super::BootError;

/// Where the read-only image is mounted (in the initramfs).
const IMAGE_MOUNT: &str = "/mnt/image";
/// The tmpfs holding the overlay's upper and work directories.
const SCRATCH_MOUNT: &str = "/mnt/scratch";
/// The overlay of the two: the future `/`.
const ROOT_MOUNT: &str = "/mnt/root";
/// How often to look for a disk while waiting.
const DEVICE_POLL: Duration = Duration::from_millis(5);

/// Mounts devtmpfs on `/dev` (the initramfs has no device nodes of its own).
pub fn mount_devtmpfs() -> Result<(), BootError> {
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MountFlags::NOSUID,
        "mode=0755",
    )
}

/// Mounts `/proc`, `/sys`, and devpts on `/dev/pts`: without it `/dev/ptmx` opens nothing,
/// and programs that run their children on a pseudoterminal (Nix's builds) fail.
pub fn mount_kernel_filesystems() -> Result<(), BootError> {
    let flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    mount_fs("proc", "/proc", "proc", flags, "")?;
    mount_fs("sysfs", "/sys", "sysfs", flags, "")?;
    let pts_flags = MountFlags::NOSUID | MountFlags::NOEXEC;
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        pts_flags,
        "mode=0620,ptmxmode=0666",
    )
}

/// Mounts the cgroup2 hierarchy at `target` (inside `/sys`, after the switch to the root).
pub fn mount_cgroups(target: &str) -> Result<(), BootError> {
    let flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    mount_fs("cgroup2", target, "cgroup2", flags, "")
}

/// Waits until every one of `paths` exists, for at most `timeout`. Virtio disks appear
/// asynchronously once their driver has probed the virtio-mmio devices ACPI describes.
pub fn wait_for_devices(paths: &[&'static str], timeout: Duration) -> Result<(), BootError> {
    let deadline = Instant::now() + timeout;
    for path in paths {
        while !Path::new(path).exists() {
            if Instant::now() >= deadline {
                return Err(BootError::DeviceTimeout { path });
            }
            thread::sleep(DEVICE_POLL);
        }
    }
    Ok(())
}

/// Mounts the EROFS image on `device` read-only under a tmpfs overlay and makes it `/`.
///
/// An EIO while mounting the image means dm-verity refused a block (the superblock or the
/// root directory does not match the signed tree, or the root hash is wrong): that is an
/// integrity error.
pub fn mount_root(device: &Path) -> Result<(), BootError> {
    let ro = MountFlags::RDONLY | MountFlags::NODEV;
    match mount(device, dir(IMAGE_MOUNT)?, "erofs", ro, None) {
        Ok(()) => {}
        Err(e) if e == rustix::io::Errno::IO => {
            return Err(BootError::Integrity {
                path: format!("mounting {}", device.display()),
                source: e.into(),
            })
        }
        Err(e) => {
            return Err(BootError::Mount {
                target: IMAGE_MOUNT.into(),
                source: e.into(),
            })
        }
    }
    mount_fs(
        "tmpfs",
        SCRATCH_MOUNT,
        "tmpfs",
        MountFlags::NODEV,
        "mode=0755",
    )?;
    let (upper, work) = (
        format!("{SCRATCH_MOUNT}/upper"),
        format!("{SCRATCH_MOUNT}/work"),
    );
    dir(&upper)?;
    dir(&work)?;
    mount_fs(
        "overlay",
        ROOT_MOUNT,
        "overlay",
        MountFlags::NODEV,
        &format!("lowerdir={IMAGE_MOUNT},upperdir={upper},workdir={work}"),
    )?;
    for kernel_fs in ["/proc", "/sys", "/dev"] {
        let target = format!("{ROOT_MOUNT}{kernel_fs}");
        dir(&target)?;
        mount_move(kernel_fs, &target).map_err(mount_error(&target))?;
    }
    switch_root()
}

/// Makes [`ROOT_MOUNT`] the root. The initramfs is the kernel's rootfs, which cannot be
/// `pivot_root`ed away: move the new root over it and chroot into it instead.
fn switch_root() -> Result<(), BootError> {
    rustix::process::chdir(ROOT_MOUNT).map_err(mount_error(ROOT_MOUNT))?;
    mount_move(".", "/").map_err(mount_error("/"))?;
    rustix::process::chroot(".").map_err(mount_error("/"))?;
    rustix::process::chdir("/").map_err(mount_error("/"))
}

fn mount_fs(
    source: &str,
    target: &str,
    fs_type: &str,
    flags: MountFlags,
    data: &str,
) -> Result<(), BootError> {
    let data = std::ffi::CString::new(data).map_err(|e| BootError::Mount {
        target: target.into(),
        source: io::Error::other(e),
    })?;
    mount(source, dir(target)?, fs_type, flags, Some(data.as_c_str())).map_err(mount_error(target))
}

/// Creates the mount point `path` if it is missing, and returns it.
fn dir(path: &str) -> Result<&str, BootError> {
    fs::create_dir_all(path).map_err(|source| BootError::Mount {
        target: path.into(),
        source,
    })?;
    Ok(path)
}

fn mount_error(target: &str) -> impl FnOnce(rustix::io::Errno) -> BootError + '_ {
    move |e| BootError::Mount {
        target: target.into(),
        source: e.into(),
    }
}
