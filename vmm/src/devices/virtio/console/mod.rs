//! virtio-console: the agent's channel. The host side is a stream socket (one end of a
//! socketpair, or a connected unix socket), used non-blocking from the event loop.
//!
//! Two shapes. A *named* console (the agent's, as the guest contract has it) offers
//! `VIRTIO_CONSOLE_F_MULTIPORT` with two ports, like QEMU's `virtio-serial-device,max_ports=2`
//! with a `virtserialport` at 1: port 0 (the console port) is never added, port 1 carries the
//! socket's bytes and is announced with its name, so the guest finds it as
//! `/sys/class/virtio-ports/vportNp1/name`. The control handshake is in [`control`]. An
//! unnamed console is a single port (the guest's `hvc0`) on queues 0 and 1.
//!
//! The data port's receive queue carries host bytes to the guest, its transmit queue guest
//! bytes to the host. Both directions are bounded: at most [`PENDING_LIMIT`] guest bytes wait for a slow
//! host reader — beyond that the device stops taking transmit buffers, so the guest waits —
//! and at most [`INPUT_LIMIT`] host bytes are read ahead of the guest's receive buffers. The
//! socket is only watched while there is somewhere for its bytes to go or bytes for it. A
//! named port gets host bytes only while the guest has it open (its `PORT_OPEN`), as under
//! QEMU: Linux drops what arrives on a port nobody has open.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{RecvFlags, SendFlags};
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend};

use super::persist::DeviceSnapshot;
use super::{
    available, read_config_space, DeviceError, DeviceEvent, HostInterest, VirtioDevice,
    FEATURE_VERSION_1,
};
use crate::persist::StateError;
use crate::vstate::memory::GuestRam;

pub mod control;
pub mod persist;

/// `VIRTIO_CONSOLE_F_MULTIPORT`.
pub const FEATURE_MULTIPORT: u64 = 1 << 1;
/// A named console's port count (`max_nr_ports`).
pub const MAX_PORTS: u32 = 2;
/// The port a named console's socket is on.
pub const DATA_PORT: u32 = 1;
/// Each queue's size.
pub const QUEUE_SIZE: u16 = 64;
/// The most guest output held for the host.
pub const PENDING_LIMIT: usize = 256 << 10;
/// The most host input read ahead of the guest.
pub const INPUT_LIMIT: usize = 64 << 10;

/// The console device.
#[derive(Debug)]
pub struct Console {
    host: UnixStream,
    /// Guest output not yet taken by the host.
    pending: Vec<u8>,
    /// Host input not yet given to the guest.
    input: Vec<u8>,
    host_eof: bool,
    host_gone: bool,
    /// The multiport control channel, for a named console.
    control: Option<control::Control>,
    sizes: Vec<u16>,
}

impl Console {
    /// A console whose host side is `host` (made non-blocking here): a single port, or, with
    /// `port_name`, port [`DATA_PORT`] of a multiport device, announced with that name.
    pub fn new(host: UnixStream, port_name: Option<&str>) -> io::Result<Self> {
        host.set_nonblocking(true)?;
        let control = port_name.map(control::Control::new);
        let queues = match control {
            // Per port a receive and a transmit queue, and the control pair after port 0's.
            Some(_) => 2 * (MAX_PORTS as usize + 1),
            None => 2,
        };
        Ok(Console {
            host,
            pending: Vec::new(),
            input: Vec::new(),
            host_eof: false,
            host_gone: false,
            control,
            sizes: vec![QUEUE_SIZE; queues],
        })
    }

    /// The data port's receive and transmit queues.
    fn data_queues(&self) -> (usize, usize) {
        match self.control {
            Some(_) => (
                2 * (DATA_PORT as usize + 1),
                2 * (DATA_PORT as usize + 1) + 1,
            ),
            None => (0, 1),
        }
    }

    /// Whether host bytes may go to the guest: a named port only while the guest has it open
    /// (its `PORT_OPEN`), as QEMU's virtio-serial holds them back. Linux's `virtio_console`
    /// discards what arrives on a port nobody has open, so bytes sent earlier — the host's
    /// first words, written as soon as the VM starts — would be lost.
    fn guest_listens(&self) -> bool {
        self.control
            .as_ref()
            .is_none_or(control::Control::guest_open)
    }

    /// Sends what the host will take now.
    fn flush(&mut self) {
        while !self.pending.is_empty() && !self.host_gone {
            match rustix::net::send(
                &self.host,
                &self.pending,
                SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
            ) {
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => return,
                Err(_) => {
                    // The host side is gone: the guest's output has nowhere to go.
                    self.host_gone = true;
                    self.pending.clear();
                }
            }
        }
    }

    /// Takes transmit chains while there is room for their bytes.
    fn transmit(&mut self, queue: &mut Queue, memory: &GuestRam) -> Result<bool, DeviceError> {
        let mut used = false;
        for _ in 0..available(queue, memory)? {
            if self.pending.len() >= PENDING_LIMIT {
                break;
            }
            let Some(chain) = queue.pop_descriptor_chain(memory) else {
                break;
            };
            let head = chain.head_index();
            for desc in chain.collect::<Vec<Descriptor>>() {
                let room = PENDING_LIMIT.saturating_sub(self.pending.len());
                let len = (desc.len() as usize).min(room);
                if desc.is_write_only() || len == 0 {
                    continue;
                }
                let start = self.pending.len();
                self.pending.resize(start + len, 0);
                if memory
                    .read_slice(&mut self.pending[start..], desc.addr())
                    .is_err()
                {
                    // Outside guest memory: this buffer is dropped, the rest of the chain kept.
                    self.pending.truncate(start);
                }
            }
            if self.host_gone {
                self.pending.clear();
            }
            queue.add_used(memory, head, 0)?;
            used = true;
        }
        Ok(used)
    }

    /// Reads host input if there is room for it.
    fn read_host(&mut self) {
        while !self.host_eof && self.input.len() < INPUT_LIMIT {
            let start = self.input.len();
            self.input.resize(INPUT_LIMIT, 0);
            match rustix::net::recv(&self.host, &mut self.input[start..], RecvFlags::DONTWAIT) {
                Ok((0, _)) => {
                    self.input.truncate(start);
                    self.host_eof = true;
                }
                Ok((n, _)) => self.input.truncate(start + n),
                Err(rustix::io::Errno::INTR) => self.input.truncate(start),
                Err(rustix::io::Errno::AGAIN) => {
                    self.input.truncate(start);
                    return;
                }
                Err(_) => {
                    self.input.truncate(start);
                    self.host_eof = true;
                }
            }
        }
    }

    /// Fills the guest's receive buffers with host input.
    fn receive(&mut self, queue: &mut Queue, memory: &GuestRam) -> Result<bool, DeviceError> {
        let mut used = false;
        let mut buffers = available(queue, memory)?;
        while buffers > 0 {
            self.read_host();
            if self.input.is_empty() {
                break;
            }
            let Some(chain) = queue.pop_descriptor_chain(memory) else {
                break;
            };
            buffers -= 1;
            let head = chain.head_index();
            let mut written = 0usize;
            for desc in chain.collect::<Vec<Descriptor>>() {
                if !desc.is_write_only() || written == self.input.len() {
                    continue;
                }
                let len = (desc.len() as usize).min(self.input.len() - written);
                if !GuestMemoryBackend::check_range(memory, desc.addr(), len) {
                    continue;
                }
                if memory
                    .write_slice(&self.input[written..written + len], desc.addr())
                    .is_ok()
                {
                    written += len;
                }
            }
            self.input.drain(..written);
            queue.add_used(memory, head, written as u32)?;
            used = true;
        }
        Ok(used)
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn features(&self) -> u64 {
        match self.control {
            Some(_) => FEATURE_VERSION_1 | FEATURE_MULTIPORT,
            None => FEATURE_VERSION_1,
        }
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_console_config: cols, rows (no size feature: 0), max_nr_ports (read
        // with MULTIPORT), emerg_wr (no emergency-write feature: 0).
        let mut config = [0u8; 12];
        if self.control.is_some() {
            config[4..8].copy_from_slice(&MAX_PORTS.to_le_bytes());
        }
        read_config_space(&config, offset, data);
    }

    fn process(
        &mut self,
        _event: DeviceEvent,
        queues: &mut [Queue],
        memory: &GuestRam,
    ) -> Result<bool, DeviceError> {
        let (receive, transmit) = self.data_queues();
        if queues.len() <= transmit {
            return Ok(false);
        }
        let mut used = false;
        if let Some(control) = &mut self.control {
            let (to_driver, from_driver) = (control::TO_DRIVER, control::FROM_DRIVER);
            used |= control.process(&mut queues[to_driver..=from_driver], memory)?;
        }
        self.flush();
        used |= self.transmit(&mut queues[transmit], memory)?;
        self.flush();
        if self.guest_listens() {
            used |= self.receive(&mut queues[receive], memory)?;
        }
        Ok(used)
    }

    fn save(&self) -> DeviceSnapshot {
        persist::save(self.control.as_ref())
    }

    fn restore(&mut self, saved: &DeviceSnapshot) -> Result<(), StateError> {
        persist::restore(self.control.as_mut(), saved)
    }

    fn reset(&mut self) {
        // Bytes in flight belong to the driver that is going away.
        self.pending.clear();
        if let Some(control) = &mut self.control {
            control.reset();
        }
    }

    fn host_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.host.as_fd())
    }

    fn host_interest(&self, queues: &[Queue], memory: &GuestRam) -> HostInterest {
        let buffers = queues
            .get(self.data_queues().0)
            .and_then(|q| available(q, memory).ok())
            .unwrap_or(0);
        HostInterest {
            read: !self.host_eof
                && buffers > 0
                && self.input.len() < INPUT_LIMIT
                && self.guest_listens(),
            // Room to write matters while output waits; transmit chains left in the queue are
            // taken again once it drains.
            write: !self.host_gone && !self.pending.is_empty(),
        }
    }
}

#[cfg(test)]
mod tests;
