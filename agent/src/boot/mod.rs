//! Boot: from the kernel handing over to `/init` to the verified root mounted as `/`.
//!
//! [`run`] is the whole sequence, top to bottom, so that a reader can follow a boot in one
//! place: kernel command line, modules, disks, dm-verity, root mounts. Each step lives in its
//! own module; this one only orders them, keeps the timings and names the failures.

pub mod console;
pub mod devmapper;
pub mod hardening;
pub mod loopback;
pub mod modules;
pub mod mounts;

use std::fs;
use std::io;
use std::path::Path;
use std::time::Duration;

use mvm_protocol::cmdline::{self, GuestPolicy, VerityCmdline};

/// The disk holding the EROFS root filesystem image.
pub const DATA_DEVICE: &str = "/dev/vda";
/// The disk holding the image's dm-verity hash tree.
pub const HASH_DEVICE: &str = "/dev/vdb";
/// The device-mapper name of the verified root.
pub const ROOT_DM_NAME: &str = "mvm-root";
/// How long the virtio disks may take to appear after their driver loads. They are probed
/// synchronously under TCG in well under a second; anything near this bound is a broken VM.
pub const DEVICE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the guest could not boot. Every variant has a stable code ([`BootError::code`]) that
/// the host reads off the console.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A system call the boot depends on failed (mounting `/proc`, opening the console…).
    #[error("{what}: {source}")]
    System {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel command line lacks a verity parameter or has a malformed one.
    #[error("kernel command line: {0}")]
    Cmdline(#[from] cmdline::CmdlineError),
    /// A kernel module could not be loaded.
    #[error("module {name}: {source}")]
    Module {
        /// The module's name.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A disk did not appear in time.
    #[error("{path} did not appear within {}s", DEVICE_TIMEOUT.as_secs())]
    DeviceTimeout {
        /// The device node.
        path: &'static str,
    },
    /// Device-mapper refused the verity device.
    #[error("device-mapper {step}: {source}")]
    DeviceMapper {
        /// The ioctl that failed.
        step: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A filesystem could not be mounted or moved.
    #[error("mount {target}: {source}")]
    Mount {
        /// The mount point.
        target: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The agent channel (a virtio-console port) could not be found or opened.
    #[error("agent channel: {source}")]
    Channel {
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A read from the root failed: dm-verity found a block that does not match the signed
    /// tree (it fails such reads with EIO).
    #[error("integrity: {path}: {source}")]
    Integrity {
        /// What was being read.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// The code the agent's panic hook prints (`mvm-agent: error AGENT000 panic: …`): a bug, not
/// a [`BootError`].
pub const PANIC_CODE: &str = "AGENT000";

impl BootError {
    /// The stable code of this error (documented in `docs/errors.md`).
    pub fn code(&self) -> &'static str {
        match self {
            BootError::System { .. } => "AGENT001",
            BootError::Cmdline(_) => "AGENT002",
            BootError::Module { .. } => "AGENT003",
            BootError::DeviceTimeout { .. } => "AGENT004",
            BootError::DeviceMapper { .. } => "AGENT005",
            BootError::Mount { .. } => "AGENT006",
            BootError::Integrity { .. } => "AGENT007",
            BootError::Channel { .. } => "AGENT008",
        }
    }

    pub(crate) fn system(what: impl Into<String>) -> impl FnOnce(io::Error) -> BootError {
        let what = what.into();
        move |source| BootError::System { what, source }
    }
}

/// Milliseconds since the kernel started, at each step of the boot.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// The agent started.
    pub agent: u64,
    /// Every module was loaded.
    pub modules: u64,
    /// The dm-verity device was live.
    pub verity: u64,
    /// The verified root was mounted as `/`.
    pub root: u64,
}

impl std::fmt::Display for Timings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "kernel=0 agent={} modules={} verity={} root={}",
            self.agent, self.modules, self.verity, self.root
        )
    }
}

/// Milliseconds since the kernel started. `CLOCK_BOOTTIME` is the clock `/proc/uptime` reads,
/// at full resolution and without needing `/proc`.
pub fn since_kernel_start() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    u64::try_from(now.tv_sec).unwrap_or(0) * 1000
        + u64::try_from(now.tv_nsec).unwrap_or(0) / 1_000_000
}

/// What a successful boot established.
#[derive(Debug, Clone)]
pub struct Booted {
    /// The verity parameters the root was opened with.
    pub verity: VerityCmdline,
    /// What the plan's profile grants the workload in the guest.
    pub policy: GuestPolicy,
    /// When each step finished.
    pub timings: Timings,
}

/// Boots the guest: everything from an initramfs with `/dev` mounted (see
/// [`console::Console::open`]) to the verified root as `/`. `agent_started` is
/// [`since_kernel_start`] as the agent began.
pub fn run(agent_started: u64) -> Result<Booted, BootError> {
    let mut timings = Timings {
        agent: agent_started,
        ..Timings::default()
    };
    mounts::mount_kernel_filesystems()?;
    let line = fs::read_to_string("/proc/cmdline").map_err(BootError::system("/proc/cmdline"))?;
    let verity = VerityCmdline::parse(&line)?;
    let policy = GuestPolicy::parse(&line)?;

    modules::load_listed(
        Path::new(modules::MODULE_LIST),
        Path::new(modules::MODULE_DIR),
    )?;
    timings.modules = since_kernel_start();

    mounts::wait_for_devices(&[DATA_DEVICE, HASH_DEVICE], DEVICE_TIMEOUT)?;
    let root_device = devmapper::open_verity(ROOT_DM_NAME, DATA_DEVICE, HASH_DEVICE, &verity)?;
    timings.verity = since_kernel_start();

    mounts::mount_root(&root_device)?;
    timings.root = since_kernel_start();
    Ok(Booted {
        verity,
        policy,
        timings,
    })
}
