//! Disks a launch attaches beyond its root (`--disk FILE:PATH[:ro]`): a host file holding an
//! ext4 filesystem, given to the guest as a virtio-blk disk and mounted by the agent at `PATH`
//! ([`mvm_protocol::Request::Mount`]). The builder VM keeps its Nix store on one.
//!
//! A volume (`--volume NAME:PATH[:ro]`) is such a disk whose file is ciphertext: the runner
//! unseals its key from the host's volume store and hands it to the agent with the mount
//! request, and the guest opens it with dm-crypt.
//!
//! The file is the guest's to write; the host never mounts or parses it. A disk serves one VM
//! at a time: the runner holds an exclusive lock on the file for as long as its VM lives, and
//! a second launch asking for it is refused (RUN062).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::path::PathBuf;

use mvm_ir::home::MvmHome;
use mvm_ir::volume::{VolumeError, VolumeStore};
use rustix::fs::{flock, FlockOperation};
use zeroize::Zeroizing;

/// One disk of a launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchDisk {
    /// The host file, absolute.
    pub file: PathBuf,
    /// Where the guest mounts it.
    pub path: String,
    /// Mounted read-only; a plain disk is also opened so by the VM, a volume is not
    /// ([`LaunchDisk::device_writable`]).
    pub read_only: bool,
    /// Set for a volume (`--volume`): its name and key; the guest opens it with dm-crypt.
    pub volume: Option<AttachedVolume>,
}

/// An encrypted volume a launch attaches ([`mvm_ir::volume`]).
#[derive(Clone, PartialEq, Eq)]
pub struct AttachedVolume {
    /// Its name.
    pub name: String,
    /// Its key, handed to the agent only.
    pub key: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for AttachedVolume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AttachedVolume")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// `NAME:PATH[:ro]` of `--volume`: a volume of this host's store and where the guest mounts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    /// The volume's name.
    pub name: String,
    /// Where the guest mounts it.
    pub path: String,
    /// Mounted read-only.
    pub read_only: bool,
}

impl VolumeSpec {
    /// Parses `NAME:PATH` or `NAME:PATH:ro`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (rest, read_only) = match text.strip_suffix(":ro") {
            Some(rest) => (rest, true),
            None => (text, false),
        };
        let (name, path) = rest
            .split_once(':')
            .filter(|(name, _)| mvm_ir::validate::is_identifier(name))
            .ok_or_else(|| format!("{text:?} is not NAME:/GUEST/PATH[:ro]"))?;
        check_mount_point(path)?;
        Ok(Self {
            name: name.to_string(),
            path: path.to_string(),
            read_only,
        })
    }

    /// The disk this volume is: its file, and its key unsealed from the host's store.
    pub fn resolve(&self, home: &MvmHome) -> Result<LaunchDisk, VolumeError> {
        let store = VolumeStore::open(home)?;
        let meta = store.meta(&self.name)?;
        let key = store.key(&meta)?;
        Ok(LaunchDisk {
            file: store.data_of(&self.name),
            path: self.path.clone(),
            read_only: self.read_only,
            volume: Some(AttachedVolume {
                name: self.name.clone(),
                key,
            }),
        })
    }
}

/// Refuses a guest path a disk cannot be mounted at.
fn check_mount_point(path: &str) -> Result<(), String> {
    match mvm_protocol::is_mount_point(path) {
        true => Ok(()),
        false => Err(format!(
            "{path:?}: a disk is mounted at an absolute path without `.`, `..` or empty \
             components, not `/` and not under /proc, /sys or /dev"
        )),
    }
}

/// The most disks a launch attaches.
pub const MAX_DISKS: usize = 8;

impl LaunchDisk {
    /// Parses `FILE:PATH` or `FILE:PATH:ro`; `FILE` is made absolute against the current
    /// directory, `PATH` must be absolute.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (rest, read_only) = match text.strip_suffix(":ro") {
            Some(rest) => (rest, true),
            None => (text, false),
        };
        let (file, path) = rest
            .rsplit_once(':')
            .filter(|(file, path)| !file.is_empty() && path.starts_with('/'))
            .ok_or_else(|| format!("{text:?} is not FILE:/GUEST/PATH[:ro]"))?;
        check_mount_point(path)?;
        let file = std::path::absolute(file).map_err(|e| format!("{file}: {e}"))?;
        Ok(Self {
            file,
            path: path.to_string(),
            read_only,
            volume: None,
        })
    }

    /// The serial the `index`th disk of a launch has in the guest, which the agent finds it by.
    pub fn serial(index: usize) -> String {
        format!("mvm-disk{index}")
    }

    /// Whether the VM gets the disk writable: a plain disk unless read-only; a volume always,
    /// the guest mounting its filesystem read-only instead — the kernel must be able to replay
    /// the journal the volume's last VM left (every VM ends without unmounting), which a
    /// read-only device refuses. A volume's lock is therefore exclusive, `:ro` or not.
    pub fn device_writable(&self) -> bool {
        !self.read_only || self.volume.is_some()
    }

    /// Opens the file and locks it for this launch alone: the lock lasts as long as the
    /// returned file is open.
    pub fn lock(&self) -> Result<File, String> {
        let name = self.file.display();
        let file = OpenOptions::new()
            .read(true)
            .write(self.device_writable())
            .open(&self.file)
            .map_err(|e| format!("{name}: {e}"))?;
        let meta = file.metadata().map_err(|e| format!("{name}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("{name} is not a regular file"));
        }
        let operation = match self.device_writable() {
            false => FlockOperation::NonBlockingLockShared,
            true => FlockOperation::NonBlockingLockExclusive,
        };
        flock(&file, operation)
            .map_err(|_| format!("{name} is attached to another VM (its runner holds it)"))?;
        Ok(file)
    }
}

impl fmt::Display for LaunchDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.volume {
            Some(volume) => write!(f, "volume {}:{}", volume.name, self.path)?,
            None => write!(f, "{}:{}", self.file.display(), self.path)?,
        }
        if self.read_only {
            f.write_str(":ro")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_is_file_then_guest_path_then_maybe_ro() {
        let disk = LaunchDisk::parse("/var/lib/store.img:/nix").unwrap();
        assert_eq!(disk.file, PathBuf::from("/var/lib/store.img"));
        assert_eq!((disk.path.as_str(), disk.read_only), ("/nix", false));
        let disk = LaunchDisk::parse("/a:b/c.img:/work:ro").unwrap();
        assert_eq!(disk.file, PathBuf::from("/a:b/c.img"));
        assert_eq!((disk.path.as_str(), disk.read_only), ("/work", true));
        assert_eq!(disk.to_string(), "/a:b/c.img:/work:ro");
        assert!(LaunchDisk::parse("relative.img:/x")
            .unwrap()
            .file
            .is_absolute());
        for refused in [
            "/x.img",
            "/x.img:nix",
            ":/nix",
            "/x.img:",
            "/x.img:/",
            "/x.img:/proc/x",
        ] {
            assert!(LaunchDisk::parse(refused).is_err(), "{refused}");
        }
    }

    /// A writable disk serves one launch; a second is refused until the first lets go.
    #[test]
    fn a_writable_disk_is_locked_to_one_launch() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("disk.img");
        std::fs::write(&file, [0u8; 512]).unwrap();
        let disk = LaunchDisk::parse(&format!("{}:/data", file.display())).unwrap();
        let held = disk.lock().unwrap();
        let refused = disk.lock().unwrap_err();
        assert!(refused.contains("another VM"), "{refused}");
        drop(held);
        disk.lock().unwrap();
        let missing = LaunchDisk::parse("/nonexistent/disk.img:/data").unwrap();
        assert!(missing.lock().is_err());
        let directory = LaunchDisk::parse(&format!("{}:/data:ro", dir.path().display())).unwrap();
        assert!(directory.lock().unwrap_err().contains("not a regular file"));
    }
}
