//! What a virtio device and its transport keep across a cold save: the transport's registers
//! and each queue's configuration and ring positions (virtio-queue's `QueueState`), and the
//! few devices that hold more than their configuration — the console's port handshake.
//!
//! Host-side buffers are not saved: a woken VM's host side is a new connection (as QEMU's
//! character devices are), and the runner saves only with no request in flight.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use crate::persist::StateError;

/// A split virtqueue's state: virtio-queue's `QueueState`, field for field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSnapshot {
    max_size: u16,
    next_avail: u16,
    next_used: u16,
    event_idx_enabled: bool,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

impl QueueSnapshot {
    /// The state of `queue`.
    pub fn of(queue: &Queue) -> Self {
        let q = queue.state();
        QueueSnapshot {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }

    /// A queue in this state, checked by virtio-queue (sizes), and refused unless its
    /// maximum size is `max_size` (the device's).
    pub fn queue(&self, max_size: u16) -> Result<Queue, StateError> {
        if self.max_size != max_size {
            return Err(StateError::QueueSize {
                saved: self.max_size,
                device: max_size,
            });
        }
        let mut queue = Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: false,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(StateError::Queue)?;
        queue.set_ready(self.ready);
        Ok(queue)
    }
}

/// A device's own state beyond its configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum DeviceSnapshot {
    /// Nothing (a disk, the rng, an unnamed console).
    Stateless,
    /// A named console's handshake: whether the guest has its port open, and the control
    /// messages not yet taken by the driver.
    Console {
        /// The guest's last `PORT_OPEN`.
        guest_open: bool,
        /// Messages waiting for the driver's buffers.
        outbox: Vec<Vec<u8>>,
    },
}

/// A virtio-mmio transport's state and its device's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportSnapshot {
    /// The device's type, which the restoring device must have.
    pub device_type: u32,
    /// `QueueSel`.
    pub queue_select: u32,
    /// `DeviceFeaturesSel`.
    pub device_features_select: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_select: u32,
    /// The features the driver accepted.
    pub driver_features: u64,
    /// The device status.
    pub status: u32,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// Each queue.
    pub queues: Vec<QueueSnapshot>,
    /// The device's own.
    pub device: DeviceSnapshot,
}
