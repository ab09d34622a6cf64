//! Virtio devices over the virtio-mmio transport (version 2, split virtqueues through the
//! `virtio-queue` crate).
//!
//! A device ([`VirtioDevice`]) only knows its queues' contents; the [`mmio::MmioTransport`]
//! holds the registers, the queues, the feature negotiation and the interrupt. Notifications
//! come as ioeventfds into the VMM's event loop, interrupts go out as irqfds.
//!
//! The guest's driver is not trusted. Every address and length a descriptor carries is checked
//! against guest memory before use; a malformed request gets an error status when the device
//! can still write one, and is otherwise returned as used with length 0. A queue the device can
//! no longer make sense of (an avail index beyond the queue size, a descriptor index out of
//! range) puts the device into `DEVICE_NEEDS_RESET` and it does no more work until the driver
//! resets it. Descriptor loops end at the queue size (`virtio-queue`'s chain TTL).

pub mod block;
pub mod console;
pub mod mmio;
pub mod persist;
pub mod rng;

use std::os::fd::BorrowedFd;

use virtio_queue::Queue;

use crate::persist::StateError;
use crate::vstate::memory::GuestRam;

/// `VIRTIO_F_VERSION_1`: the modern interface; the only one offered.
pub const FEATURE_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// What woke a device up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceEvent {
    /// The driver notified queue `n`.
    Queue(usize),
    /// The device's host-side file descriptor is ready.
    Host,
}

/// What a device waits for on its host descriptor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostInterest {
    /// Input it has room for.
    pub read: bool,
    /// Room to write output it holds.
    pub write: bool,
}

/// Why a device stopped serving its queues.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The queue's rings contradict themselves.
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
    /// The host side failed in a way the guest cannot be told through a status byte.
    #[error("host I/O: {0}")]
    Host(#[from] std::io::Error),
}

/// The device side of a virtio device.
pub trait VirtioDevice: Send {
    /// The virtio device id (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// The feature bits offered, [`FEATURE_VERSION_1`] included.
    fn features(&self) -> u64;
    /// Each queue's maximum size; their count is the device's queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space (ignored unless a device has writable fields).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Does the work `event` calls for; returns whether any buffer was returned to the driver
    /// (the transport then interrupts it).
    fn process(
        &mut self,
        event: DeviceEvent,
        queues: &mut [Queue],
        memory: &GuestRam,
    ) -> Result<bool, DeviceError>;
    /// Forgets per-driver state on a device reset.
    fn reset(&mut self) {}
    /// A host-side descriptor the event loop should watch for input.
    fn host_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    /// What the device waits for on its host descriptor now: input only while the driver has
    /// posted buffers to put it in, output room only while it holds bytes the host has not
    /// taken.
    fn host_interest(&self, _queues: &[Queue], _memory: &GuestRam) -> HostInterest {
        HostInterest::default()
    }
    /// Its own state beyond its configuration, for a cold save.
    fn save(&self) -> persist::DeviceSnapshot {
        persist::DeviceSnapshot::Stateless
    }
    /// Takes the state `saved` (a device of the same kind saved it), before the device is
    /// used: the part of [`crate::persist::Persist::restore`] a transport
    /// ([`mmio::MmioTransport`]) leaves to its device.
    fn restore(&mut self, saved: &persist::DeviceSnapshot) -> Result<(), StateError> {
        match saved {
            persist::DeviceSnapshot::Stateless => Ok(()),
            _ => Err(StateError::OtherDevice {
                device: "a stateless device",
            }),
        }
    }
}

/// Copies `config[offset..offset + data.len()]` into `data`; bytes beyond the space read 0.
pub fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let end = start.saturating_add(data.len()).min(config.len());
    data[..end - start].copy_from_slice(&config[start..end]);
}

/// How many chains the driver has made available and the device not yet taken; an index more
/// than a queue's size ahead is a driver error.
pub fn available(queue: &Queue, memory: &GuestRam) -> Result<u16, DeviceError> {
    use virtio_queue::QueueT;
    let avail = queue.avail_idx(memory, std::sync::atomic::Ordering::Acquire)?;
    let pending = avail.0.wrapping_sub(queue.next_avail());
    if pending > queue.size() {
        return Err(DeviceError::Queue(
            virtio_queue::Error::InvalidAvailRingIndex,
        ));
    }
    Ok(pending)
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Guest memory and a driver's side of a queue, for driving a device without a VM.
    //!
    //! The rings are laid out here rather than by `virtio_queue::mock::MockSplitQueue`,
    //! whose used ring overlaps the end of its avail ring once more than 10 of 16 entries
    //! are in use.

    use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use vm_memory::{Bytes, GuestAddress};

    use crate::vstate::memory::{self, GuestRam};

    /// The queue size the tests use.
    pub const SIZE: u16 = 16;

    /// 16 MiB of guest RAM.
    pub fn memory() -> GuestRam {
        memory::create(16 << 20).unwrap()
    }

    /// The driver's side of a 16-entry queue: descriptors at `base`, the avail ring at
    /// `base + 0x100`, the used ring at `base + 0x200`.
    pub struct TestQueue<'a> {
        memory: &'a GuestRam,
        base: u64,
        next_desc: u16,
    }

    impl<'a> TestQueue<'a> {
        /// A queue at `base`, its rings zeroed.
        pub fn new(memory: &'a GuestRam, base: u64) -> Self {
            memory
                .write_slice(&[0u8; 0x300], GuestAddress(base))
                .unwrap();
            TestQueue {
                memory,
                base,
                next_desc: 0,
            }
        }

        /// The descriptor table's address.
        pub fn desc_table_addr(&self) -> u64 {
            self.base
        }

        /// The avail ring's address.
        pub fn avail_addr(&self) -> u64 {
            self.base + 0x100
        }

        /// The used ring's address.
        pub fn used_addr(&self) -> u64 {
            self.base + 0x200
        }

        /// Writes `descs` (address, length, flags) as one chain and makes it available;
        /// returns its head. Descriptors are reused round the table: at most 16 in flight.
        pub fn add(&mut self, descs: &[(u64, u32, u32)]) -> u16 {
            let head = self.next_desc;
            for (i, &(addr, len, flags)) in descs.iter().enumerate() {
                let index = self.next_desc;
                let last = i + 1 == descs.len();
                let flags = if last {
                    flags
                } else {
                    flags | VRING_DESC_F_NEXT
                };
                let next = if last { 0 } else { (index + 1) % SIZE };
                self.write_desc(index, addr, len, flags, next);
                self.next_desc = (self.next_desc + 1) % SIZE;
            }
            self.publish(head);
            head
        }

        /// Writes descriptor `index` as given, links and all.
        pub fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u32, next: u16) {
            let raw = RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next));
            let at = self.base + 16 * u64::from(index);
            self.memory.write_obj(raw, GuestAddress(at)).unwrap();
        }

        /// Appends `head` to the available ring.
        pub fn publish(&self, head: u16) {
            let idx = self.avail_idx();
            let slot = self.avail_addr() + 4 + u64::from(idx % SIZE) * 2;
            self.memory.write_obj(head, GuestAddress(slot)).unwrap();
            self.set_avail_idx(idx.wrapping_add(1));
        }

        /// The avail ring's index.
        pub fn avail_idx(&self) -> u16 {
            self.memory
                .read_obj(GuestAddress(self.avail_addr() + 2))
                .unwrap()
        }

        /// Sets the avail ring's index, as a driver (or a hostile one) would.
        pub fn set_avail_idx(&self, idx: u16) {
            self.memory
                .write_obj(idx, GuestAddress(self.avail_addr() + 2))
                .unwrap();
        }

        /// How many chains the device has returned.
        pub fn used_idx(&self) -> u16 {
            self.memory
                .read_obj(GuestAddress(self.used_addr() + 2))
                .unwrap()
        }

        /// The `n`th used element: (head, length written).
        pub fn used(&self, n: u16) -> (u32, u32) {
            let at = self.used_addr() + 4 + 8 * u64::from(n % SIZE);
            let id: u32 = self.memory.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.memory.read_obj(GuestAddress(at + 4)).unwrap();
            (id, len)
        }
    }
}
