//! virtio-blk: a disk backed by a host file, read-only or read-write, with flush.
//!
//! The capacity is the file's size in whole 512-byte sectors, fixed when the device is made.
//! Requests are parsed and bounds-checked in [`request`]; none reads or writes outside the
//! file's first `capacity` sectors or outside guest memory, and a write to a read-only disk
//! fails with `VIRTIO_BLK_S_IOERR`. Requests run synchronously on the VMM's event loop.

pub mod request;

use std::fs::File;
use std::io;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_ID_BYTES};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::{read_config_space, DeviceError, DeviceEvent, VirtioDevice, FEATURE_VERSION_1};
use crate::vstate::memory::GuestRam;

/// A sector, the unit of the protocol's offsets.
pub const SECTOR_SIZE: u64 = 512;
/// The request queue's size.
pub const QUEUE_SIZE: u16 = 256;

/// A disk.
#[derive(Debug)]
pub struct Block {
    file: File,
    read_only: bool,
    capacity: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    sizes: [u16; 1],
}

impl Block {
    /// A disk on `file`, open for reading (and writing unless `read_only`: whoever opened it
    /// chose, so the device never needs a path); `id` (at most 20 bytes used) is what
    /// `GET_ID` answers.
    pub fn new(file: File, read_only: bool, id: &str) -> io::Result<Self> {
        let capacity = file.metadata()?.len() / SECTOR_SIZE;
        let mut id_bytes = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = id.len().min(id_bytes.len());
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Block {
            file,
            read_only,
            capacity,
            id: id_bytes,
            sizes: [QUEUE_SIZE],
        })
    }

    /// The capacity in sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let ro = if self.read_only {
            1 << VIRTIO_BLK_F_RO
        } else {
            0
        };
        FEATURE_VERSION_1 | (1 << VIRTIO_BLK_F_FLUSH) | ro
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config: only `capacity` (no optional feature is offered).
        read_config_space(&self.capacity.to_le_bytes(), offset, data);
    }

    fn process(
        &mut self,
        _event: DeviceEvent,
        queues: &mut [Queue],
        memory: &GuestRam,
    ) -> Result<bool, DeviceError> {
        let Some(queue) = queues.first_mut() else {
            return Ok(false);
        };
        let chains: Vec<_> = queue.iter(memory)?.collect();
        let returned = !chains.is_empty();
        for chain in chains {
            let head = chain.head_index();
            let written = request::execute(self, chain, memory);
            queue.add_used(memory, head, written)?;
        }
        Ok(returned)
    }
}

#[cfg(test)]
mod tests;
