//! What a VM boots, as data: a [`VmSpec`] names its files and shapes it, [`VmSpec::open`]
//! opens those files once ([`BootFiles`]), and [`VmSpec::config`] wires them to the host
//! resources of one run (the console's writer, the named port) as a [`VmConfig`].
//!
//! The split lets a spec cross a process boundary (mvm's runner sends it to a jailed VMM
//! child) while the files are opened before any jail, and only named in messages after.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::builder::{BlockConfig, ConsolePort, VmConfig};
use crate::VmmError;

/// What a VM boots, without the host resources it is wired to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmSpec {
    /// How many vCPUs.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// The kernel: an ELF vmlinux or a bzImage.
    pub kernel: PathBuf,
    /// An initramfs.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Disks, in the order the guest finds them (`vda`, `vdb`, …).
    pub disks: Vec<DiskSpec>,
    /// Whether the guest gets a virtio-rng device.
    pub rng: bool,
    /// Whether guest RAM is made of 2 MiB huge pages (a host's choice, not the plan's).
    pub huge_pages: bool,
}

/// A disk of a [`VmSpec`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskSpec {
    /// The backing file on the host.
    pub path: PathBuf,
    /// Whether the guest may write it.
    pub read_only: bool,
    /// What the device answers to `GET_ID` (the guest's `/sys/block/vdX/serial`).
    pub id: String,
}

/// A [`VmSpec`]'s files, open: the VMM reads and writes only these, never a path, so whoever
/// runs it needs no access to the artifacts by name.
#[derive(Debug)]
pub struct BootFiles {
    /// The kernel, open for reading.
    pub kernel: File,
    /// The initramfs, open for reading.
    pub initrd: Option<File>,
    /// The disks, in the spec's order, each open as the guest may use it.
    pub disks: Vec<BlockConfig>,
}

impl VmSpec {
    /// Opens the kernel and initramfs for reading and each disk as the guest may use it.
    pub fn open(&self) -> Result<BootFiles, VmmError> {
        let read = |path: &Path, what: &str| {
            File::open(path)
                .map_err(|e| VmmError::Config(format!("{what} {}: {e}", path.display())))
        };
        let disks = self.disks.iter().map(|disk| {
            BlockConfig::open(&disk.path, disk.read_only, &disk.id).map_err(|e| VmmError::Device {
                device: format!("virtio-blk {}", disk.path.display()),
                reason: e.to_string(),
            })
        });
        Ok(BootFiles {
            kernel: read(&self.kernel, "kernel")?,
            initrd: self
                .initrd
                .as_deref()
                .map(|path| read(path, "initramfs"))
                .transpose()?,
            disks: disks.collect::<Result<_, _>>()?,
        })
    }

    /// The VMM's configuration: this VM booted from `files` (this spec's, opened), its
    /// serial console written to `console_log`, with the named console `port` if any.
    pub fn config(
        self,
        files: BootFiles,
        console_log: Box<dyn Write + Send>,
        port: Option<ConsolePort>,
    ) -> VmConfig {
        VmConfig {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            kernel: files.kernel,
            initrd: files.initrd,
            cmdline: self.cmdline,
            console_log,
            block: files.disks,
            console_port: port,
            rng: self.rng,
            huge_pages: self.huge_pages,
        }
    }
}
