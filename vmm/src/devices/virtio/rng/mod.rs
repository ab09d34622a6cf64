//! virtio-rng: fills the guest's buffers with bytes from the host's `getrandom`.
//!
//! At most [`REQUEST_LIMIT`] bytes per chain; readable descriptors and buffers outside guest
//! memory are skipped, and the used length says how many bytes were written.

use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend};

use super::{available, DeviceError, DeviceEvent, VirtioDevice, FEATURE_VERSION_1};
use crate::vstate::memory::GuestRam;

/// The request queue's size.
pub const QUEUE_SIZE: u16 = 64;
/// The most bytes given for one chain.
pub const REQUEST_LIMIT: usize = 64 << 10;

/// The entropy device.
#[derive(Debug)]
pub struct Rng {
    sizes: [u16; 1],
}

impl Default for Rng {
    fn default() -> Self {
        Rng {
            sizes: [QUEUE_SIZE],
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn features(&self) -> u64 {
        FEATURE_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
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
        let mut used = false;
        let mut bytes = Vec::new();
        for _ in 0..available(queue, memory)? {
            let Some(chain) = queue.pop_descriptor_chain(memory) else {
                break;
            };
            let head = chain.head_index();
            let mut written = 0usize;
            for desc in chain.collect::<Vec<Descriptor>>() {
                let len = (desc.len() as usize).min(REQUEST_LIMIT - written);
                if !desc.is_write_only() || len == 0 {
                    continue;
                }
                if !GuestMemoryBackend::check_range(memory, desc.addr(), len) {
                    continue;
                }
                bytes.resize(len, 0);
                fill_random(&mut bytes)?;
                if memory.write_slice(&bytes, desc.addr()).is_ok() {
                    written += len;
                }
            }
            queue.add_used(memory, head, written as u32)?;
            used = true;
        }
        Ok(used)
    }
}

/// Fills `buffer` from the kernel's CSPRNG.
fn fill_random(buffer: &mut [u8]) -> Result<(), DeviceError> {
    let mut filled = 0;
    while filled < buffer.len() {
        match rustix::rand::getrandom(&mut buffer[filled..], rustix::rand::GetRandomFlags::empty())
        {
            Ok(n) => filled += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(DeviceError::Host(e.into())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::tests::{drive, write32};
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::test_support::{memory, TestQueue};
    use crate::devices::IrqLine;
    use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as W;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn fills_writable_buffers_and_skips_hostile_ones() {
        let memory = memory();
        let irq = IrqLine::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let mut t = MmioTransport::new(Box::new(Rng::default()), memory.clone(), irq);
        let mut q = TestQueue::new(&memory, 0);
        q.add(&[(0x10_0000, 64, W)]);
        q.add(&[(0x20_0000, 64, 0), (0xffff_0000, 64, W), (0x30_0000, 16, W)]);
        q.add(&[((16 << 20) - 100, 4096, W)]);
        q.add(&[(0x40_0000, u32::MAX / 2, W)]);
        drive(&mut t, &[(0, &q)]);
        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(q.used_idx(), 4);
        assert_eq!(q.used(0), (0, 64));
        assert_eq!(
            q.used(1).1,
            16,
            "only the writable buffer inside guest memory"
        );
        assert_eq!(
            q.used(2).1,
            0,
            "a buffer running past guest memory gets nothing"
        );
        assert_eq!(
            q.used(3).1,
            REQUEST_LIMIT as u32,
            "a huge buffer gets the cap"
        );
        let mut got = [0u8; 64];
        memory
            .read_slice(&mut got, GuestAddress(0x10_0000))
            .unwrap();
        assert_ne!(got, [0u8; 64]);
        let mut untouched = [0u8; 64];
        memory
            .read_slice(&mut untouched, GuestAddress(0x20_0000))
            .unwrap();
        assert_eq!(untouched, [0u8; 64], "a readable buffer is not written");
    }
}
