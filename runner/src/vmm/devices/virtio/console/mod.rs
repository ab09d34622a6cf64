//! virtio-console with one port and no multiport feature: the agent's channel. The host side
//! is a stream socket (one end of a socketpair, or a connected unix socket), used non-blocking
//! from the event loop.
//!
//! Queue 0 (receive) carries host bytes to the guest, queue 1 (transmit) guest bytes to the
//! host. Both directions are bounded: at most [`PENDING_LIMIT`] guest bytes wait for a slow
//! host reader — beyond that the device stops taking transmit buffers, so the guest waits —
//! and at most [`INPUT_LIMIT`] host bytes are read ahead of the guest's receive buffers. The
//! socket is only watched while there is somewhere for its bytes to go or bytes for it.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{RecvFlags, SendFlags};
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend};

use super::{
    available, read_config_space, DeviceError, DeviceEvent, HostInterest, VirtioDevice,
    FEATURE_VERSION_1,
};
use crate::vmm::vstate::memory::GuestRam;

/// The receive queue (host to guest).
pub const RECEIVE: usize = 0;
/// The transmit queue (guest to host).
pub const TRANSMIT: usize = 1;
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
    sizes: [u16; 2],
}

impl Console {
    /// A console whose host side is `host` (made non-blocking here).
    pub fn new(host: UnixStream) -> io::Result<Self> {
        host.set_nonblocking(true)?;
        Ok(Console {
            host,
            pending: Vec::new(),
            input: Vec::new(),
            host_eof: false,
            host_gone: false,
            sizes: [QUEUE_SIZE, QUEUE_SIZE],
        })
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
        FEATURE_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_console_config (cols, rows, max_nr_ports, emerg_wr): no feature that
        // gives its fields meaning is offered.
        read_config_space(&[0; 12], offset, data);
    }

    fn process(
        &mut self,
        _event: DeviceEvent,
        queues: &mut [Queue],
        memory: &GuestRam,
    ) -> Result<bool, DeviceError> {
        let [receive, transmit] = queues else {
            return Ok(false);
        };
        self.flush();
        let mut used = self.transmit(transmit, memory)?;
        self.flush();
        used |= self.receive(receive, memory)?;
        Ok(used)
    }

    fn reset(&mut self) {
        // Bytes in flight belong to the driver that is going away.
        self.pending.clear();
    }

    fn host_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.host.as_fd())
    }

    fn host_interest(&self, queues: &[Queue], memory: &GuestRam) -> HostInterest {
        let buffers = queues
            .get(RECEIVE)
            .and_then(|q| available(q, memory).ok())
            .unwrap_or(0);
        HostInterest {
            read: !self.host_eof && buffers > 0 && self.input.len() < INPUT_LIMIT,
            // Room to write matters while output waits; transmit chains left in the queue are
            // taken again once it drains.
            write: !self.host_gone && !self.pending.is_empty(),
        }
    }
}

#[cfg(test)]
mod tests;
