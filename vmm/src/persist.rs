//! How a part of the VM is saved with a cold VM and made again in a new one.
//!
//! Every device and the KVM state ([`crate::vstate`]) implement [`Persist`]: its state is a
//! plain serializable type (the snapshot file's JSON, [`crate::snapshot`]), its restore a
//! constructor that takes the new VM's resources and checks the state before anything of it
//! is used. A state that does not fit is a [`StateError`], reported as `VMM010`.

/// A part of the VM that is saved and restored.
pub trait Persist<'a>: Sized {
    /// What is saved.
    type State;
    /// What a restore needs besides the state: the new VM's resources for this part.
    type ConstructorArgs;
    /// Why a state could not be taken, or does not fit.
    type Error: std::error::Error;

    /// Its state now; the VM is paused.
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// It, made again from `state` with `args`; refused, with nothing half-built, if
    /// the state does not fit.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}

/// A device's saved state that does not fit the device it is restored into.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The RTC's NVRAM has another size.
    #[error("cmos: {0} bytes of NVRAM")]
    CmosNvram(usize),
    /// The i8042 holds more answers than it would.
    #[error("i8042: {0} buffered answers")]
    I8042Output(usize),
    /// vm-superio refused the UART's registers.
    #[error("serial: {0}")]
    Serial(vm_superio::serial::Error<std::io::Error>),
    /// A virtio transport was saved for another kind of device.
    #[error("a device of type {saved} saved for type {device}")]
    DeviceType {
        /// The saved device's type.
        saved: u32,
        /// This device's.
        device: u32,
    },
    /// A virtio transport was saved with another number of queues.
    #[error("{saved} queues saved for {device}")]
    QueueCount {
        /// How many were saved.
        saved: usize,
        /// How many the device has.
        device: usize,
    },
    /// A queue was saved with another maximum size.
    #[error("a queue of at most {saved} entries where the device has {device}")]
    QueueSize {
        /// The saved maximum.
        saved: u16,
        /// The device's.
        device: u16,
    },
    /// virtio-queue refused a queue's state.
    #[error("queue: {0}")]
    Queue(virtio_queue::Error),
    /// A device was given the state of another kind of device.
    #[error("{device}: a state of another device")]
    OtherDevice {
        /// The device.
        device: &'static str,
    },
    /// A console's handshake holds more control messages than it would.
    #[error("console: {0} control messages waiting")]
    ConsoleOutbox(usize),
}
