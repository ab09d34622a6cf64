//! mvm's own VMM: a KVM microVM with only the devices mvm's guest contract needs.
//!
//! [`builder::build`] assembles a VM top to bottom from a [`builder::VmConfig`] — guest RAM
//! ([`vstate::memory`]), the KVM VM and its interrupt controllers ([`vstate::vm`]), the
//! kernel, command line, initramfs, zero page and ACPI tables ([`arch`]), the devices
//! ([`devices`]) and one thread per vCPU ([`vstate::vcpu`]) — and returns a running
//! [`builder::MicroVm`]. The VM ends when the guest powers off or resets, when a vCPU cannot
//! go on, or when the host stops it; each way is a [`exit::GuestExit`].
//!
//! Everything the guest controls (port and MMIO accesses, and later virtqueue contents) is
//! input to be checked: a device ignores what it does not understand, and no guest action
//! panics the VMM. Setup failures are [`VmmError`]s with stable codes (`VMM0xx`).

pub mod arch;
pub mod builder;
pub mod devices;
pub mod event_loop;
pub mod exit;
pub mod pause;
pub mod persist;
pub mod seccomp;
pub mod snapshot;
pub mod spec;
#[cfg(feature = "testing")]
pub mod test_guest;
pub mod vstate;

pub use builder::{build, restore, BlockConfig, ConsolePort, Machine, MicroVm, VmConfig};
pub use exit::GuestExit;
pub use pause::{PauseError, Pauser};
pub use persist::Persist;
pub use spec::{BootFiles, DiskSpec, VmSpec};

/// Why a VM could not be built or started. [`VmmError::code`] is stable.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// A KVM ioctl on the system or VM fd failed.
    #[error("{0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// Guest memory could not be mapped or written.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The kernel, command line or initramfs could not be loaded.
    #[error(transparent)]
    Boot(#[from] arch::boot::BootError),
    /// The ACPI tables could not be written.
    #[error(transparent)]
    Acpi(#[from] arch::acpi::AcpiError),
    /// A vCPU could not be given its boot state.
    #[error("vCPU {id}: {what}: {source}")]
    Vcpu {
        /// The vCPU.
        id: u8,
        /// The step that failed.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// A device could not be created or wired (its eventfd, irqfd, backing file or bus slot).
    #[error("device {device}: {reason}")]
    Device {
        /// The device.
        device: String,
        /// What went wrong.
        reason: String,
    },
    /// A thread or signal handler could not be set up.
    #[error("starting the VM's threads: {0}")]
    Thread(std::io::Error),
    /// The configuration asks for something this VMM does not do.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// A thread's seccomp filter could not be built or installed: the guest is not started.
    #[error("seccomp: {0}")]
    Seccomp(String),
    /// A saved VM could not be read or restored (its file is malformed, or does not fit the
    /// VM it is restored into).
    #[error("saved VM: {0}")]
    Snapshot(String),
    /// A device's saved state does not fit the device it is restored into.
    #[error("saved VM: {device}: {source}")]
    DeviceState {
        /// The device.
        device: String,
        /// What does not fit.
        source: persist::StateError,
    },
}

impl VmmError {
    /// The stable code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            VmmError::Kvm(..) => "VMM001",
            VmmError::Memory(_) => "VMM002",
            VmmError::Boot(_) => "VMM003",
            VmmError::Acpi(_) => "VMM004",
            VmmError::Vcpu { .. } => "VMM005",
            VmmError::Device { .. } => "VMM006",
            VmmError::Thread(_) => "VMM007",
            VmmError::Config(_) => "VMM008",
            VmmError::Seccomp(_) => "VMM009",
            VmmError::Snapshot(_) | VmmError::DeviceState { .. } => "VMM010",
        }
    }
}
