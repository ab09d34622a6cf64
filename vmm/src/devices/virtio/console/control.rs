//! The multiport control channel: 8-byte messages `{le32 id, le16 event, le16 value}` (a
//! name follows `PORT_NAME`), driver to device on queue 3, device to driver on queue 2.
//!
//! The handshake, as Linux's `virtio_console` drives it: the driver says `DEVICE_READY`; the
//! device adds its one port (`PORT_ADD`); the driver says `PORT_READY`; the device names the
//! port (`PORT_NAME`) and says its host side is open (`PORT_OPEN`). Anything else the driver
//! sends is noted or ignored. At most [`OUTBOX_LIMIT`] messages wait for the driver's buffers,
//! so a driver repeating `DEVICE_READY` cannot grow the device's memory.

use std::collections::VecDeque;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend};

use super::DATA_PORT;
use crate::devices::virtio::{available, DeviceError};
use crate::vstate::memory::GuestRam;

/// The control receive queue (device to driver).
pub const TO_DRIVER: usize = 2;
/// The control transmit queue (driver to device).
pub const FROM_DRIVER: usize = 3;
/// The most messages waiting for the driver.
pub const OUTBOX_LIMIT: usize = 16;
/// A message without a name.
pub(super) const MESSAGE_SIZE: usize = 8;
/// The longest port name sent.
pub(super) const NAME_LIMIT: usize = 128;

/// `VIRTIO_CONSOLE_DEVICE_READY`.
pub const DEVICE_READY: u16 = 0;
/// `VIRTIO_CONSOLE_PORT_ADD`.
pub const PORT_ADD: u16 = 1;
/// `VIRTIO_CONSOLE_PORT_READY`.
pub const PORT_READY: u16 = 3;
/// `VIRTIO_CONSOLE_PORT_OPEN`.
pub const PORT_OPEN: u16 = 6;
/// `VIRTIO_CONSOLE_PORT_NAME`.
pub const PORT_NAME: u16 = 7;

/// A control message's bytes.
pub fn message(id: u32, event: u16, value: u16) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(MESSAGE_SIZE);
    bytes.extend_from_slice(&id.to_le_bytes());
    bytes.extend_from_slice(&event.to_le_bytes());
    bytes.extend_from_slice(&value.to_le_bytes());
    bytes
}

/// The control channel's state.
#[derive(Debug)]
pub struct Control {
    name: Vec<u8>,
    pub(super) outbox: VecDeque<Vec<u8>>,
    /// Whether the guest has the port open (its last `PORT_OPEN`).
    pub(super) guest_open: bool,
}

impl Control {
    /// A channel announcing [`DATA_PORT`] as `name`.
    pub fn new(name: &str) -> Self {
        let mut name = name.as_bytes().to_vec();
        name.truncate(NAME_LIMIT);
        Control {
            name,
            outbox: VecDeque::new(),
            guest_open: false,
        }
    }

    /// Whether the guest has opened the port.
    pub fn guest_open(&self) -> bool {
        self.guest_open
    }

    /// Forgets the handshake (device reset).
    pub fn reset(&mut self) {
        self.outbox.clear();
        self.guest_open = false;
    }

    fn send(&mut self, bytes: Vec<u8>) {
        if self.outbox.len() < OUTBOX_LIMIT {
            self.outbox.push_back(bytes);
        }
    }

    fn receive(&mut self, id: u32, event: u16, value: u16) {
        match (event, id) {
            (DEVICE_READY, _) if value == 1 => self.send(message(DATA_PORT, PORT_ADD, 0)),
            (PORT_READY, DATA_PORT) if value == 1 => {
                let mut name = message(DATA_PORT, PORT_NAME, 1);
                name.extend_from_slice(&self.name);
                self.send(name);
                self.send(message(DATA_PORT, PORT_OPEN, 1));
            }
            (PORT_OPEN, DATA_PORT) => self.guest_open = value == 1,
            _ => {}
        }
    }

    /// Reads the driver's messages and answers into its buffers. `queues` are the control
    /// pair, [`TO_DRIVER`] first.
    pub fn process(
        &mut self,
        queues: &mut [Queue],
        memory: &GuestRam,
    ) -> Result<bool, DeviceError> {
        let [to_driver, from_driver] = queues else {
            return Ok(false);
        };
        let mut used = false;
        for _ in 0..available(from_driver, memory)? {
            let Some(chain) = from_driver.pop_descriptor_chain(memory) else {
                break;
            };
            let head = chain.head_index();
            let mut raw = [0u8; MESSAGE_SIZE];
            let mut got = 0;
            for desc in chain.collect::<Vec<Descriptor>>() {
                let len = (desc.len() as usize).min(MESSAGE_SIZE - got);
                if desc.is_write_only() || len == 0 {
                    continue;
                }
                if memory
                    .read_slice(&mut raw[got..got + len], desc.addr())
                    .is_ok()
                {
                    got += len;
                }
            }
            if got == MESSAGE_SIZE {
                let id = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
                self.receive(
                    id,
                    u16::from_le_bytes([raw[4], raw[5]]),
                    u16::from_le_bytes([raw[6], raw[7]]),
                );
            }
            from_driver.add_used(memory, head, 0)?;
            used = true;
        }
        let mut buffers = available(to_driver, memory)?;
        while buffers > 0 && !self.outbox.is_empty() {
            let Some(chain) = to_driver.pop_descriptor_chain(memory) else {
                break;
            };
            buffers -= 1;
            let head = chain.head_index();
            let message = self.outbox.pop_front().unwrap_or_default();
            let mut written = 0;
            for desc in chain.collect::<Vec<Descriptor>>() {
                let len = (desc.len() as usize).min(message.len() - written);
                if !desc.is_write_only() || len == 0 {
                    continue;
                }
                if !GuestMemoryBackend::check_range(memory, desc.addr(), len) {
                    continue;
                }
                if memory
                    .write_slice(&message[written..written + len], desc.addr())
                    .is_ok()
                {
                    written += len;
                }
            }
            to_driver.add_used(memory, head, written as u32)?;
            used = true;
        }
        Ok(used)
    }
}
