//! The virtio-mmio transport, version 2 (virtio 1.x "modern" only): the register window a
//! driver finds through the DSDT, its queues and its interrupt.
//!
//! Registers are 32-bit and must be accessed as such; any other access to them is ignored
//! (reads see 0). The configuration space (from offset 0x100) takes any width. Queue
//! registers can only be written between `FEATURES_OK` and `DRIVER_OK`, as the spec orders; a
//! driver that sets `DRIVER_OK` with a ready queue whose rings fall outside guest memory gets
//! `DEVICE_NEEDS_RESET` instead.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};

use super::persist::{QueueSnapshot, TransportSnapshot};
use super::{DeviceEvent, HostInterest, VirtioDevice, FEATURE_VERSION_1};
use crate::devices::bus::BusDevice;
use crate::devices::IrqLine;
use crate::persist::{Persist, StateError};
use crate::vstate::memory::GuestRam;

/// "virt", little-endian.
const MAGIC: u32 = 0x7472_6976;
/// The transport version (2: modern).
const VERSION: u32 = 2;
/// The vendor id reported: "mvm\0".
const VENDOR: u32 = 0x006d_766d;
/// Offset of the device configuration space.
const CONFIG_START: u64 = VIRTIO_MMIO_CONFIG as u64;

/// A virtio device behind its MMIO registers.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    memory: GuestRam,
    queues: Vec<Queue>,
    irq: IrqLine,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// Puts `device` behind a transport that interrupts through `irq`.
    pub fn new(device: Box<dyn VirtioDevice>, memory: GuestRam, irq: IrqLine) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            // Sizes come from the device's code, not the guest; a size virtio-queue refuses is
            // a programming error caught by the device's own tests.
            .filter_map(|&max| Queue::new(max).ok())
            .collect();
        MmioTransport {
            device,
            memory,
            queues,
            irq,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
        }
    }

    /// The device.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// How many queues the device has.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// The driver status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// What the device waits for on its host descriptor (nothing unless the driver set it up).
    pub fn host_interest(&self) -> HostInterest {
        if self.active() {
            self.device.host_interest(&self.queues, &self.memory)
        } else {
            HostInterest::default()
        }
    }

    fn active(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & (VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED) == 0
    }

    /// Lets the device handle `event` if the driver has set it up, and interrupts the driver if
    /// buffers were returned. A device error puts the device into `DEVICE_NEEDS_RESET`.
    pub fn handle(&mut self, event: DeviceEvent) {
        if !self.active() {
            return;
        }
        if let DeviceEvent::Queue(n) = event {
            if !self.queues.get(n).is_some_and(|q| q.ready()) {
                return;
            }
        }
        match self.device.process(event, &mut self.queues, &self.memory) {
            Ok(true) => self.interrupt(VIRTIO_MMIO_INT_VRING),
            Ok(false) => {}
            Err(_) => {
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                self.interrupt(VIRTIO_MMIO_INT_CONFIG);
            }
        }
    }

    fn interrupt(&mut self, why: u32) {
        self.interrupt_status |= why;
        // The irqfd write fails only if the eventfd counter would overflow: the interrupt
        // is pending anyway.
        let _ = self.irq.trigger();
    }

    fn reset(&mut self) {
        for queue in &mut self.queues {
            queue.reset();
        }
        self.device.reset();
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // Bits are only ever added; clearing one takes a reset.
        let mut added = value & !self.status;
        if value & self.status != self.status {
            return;
        }
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device.features();
            let acceptable = self.driver_features & !offered == 0
                && self.driver_features & FEATURE_VERSION_1 != 0;
            if !acceptable {
                added &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            let features_ok = (self.status | added) & VIRTIO_CONFIG_S_FEATURES_OK != 0;
            let queues_ok = self
                .queues
                .iter()
                .all(|q| !q.ready() || q.is_valid(&self.memory));
            if !features_ok {
                added &= !VIRTIO_CONFIG_S_DRIVER_OK;
            } else if !queues_ok {
                added &= !VIRTIO_CONFIG_S_DRIVER_OK;
                added |= VIRTIO_CONFIG_S_NEEDS_RESET;
            }
        }
        self.status |= added;
    }

    /// Whether queue registers may be written now.
    fn queue_setup_allowed(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn read_register(&self, offset: u32) -> u32 {
        let queue = self.queues.get(self.queue_select as usize);
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_select {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        let setup = self.queue_setup_allowed();
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            // Features are fixed once FEATURES_OK is set.
            VIRTIO_MMIO_DRIVER_FEATURES if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 => {
                let shift = match self.driver_features_select {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                self.driver_features =
                    (self.driver_features & !(0xffff_ffff << shift)) | (u64::from(value) << shift);
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                // Normally consumed by the queue's ioeventfd in KVM; handled here when not.
                self.handle(DeviceEvent::Queue(value as usize));
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !value,
            VIRTIO_MMIO_STATUS => self.set_status(value),
            VIRTIO_MMIO_QUEUE_NUM if setup => {
                if let Some(q) = self.selected_queue() {
                    // virtio-queue refuses (and ignores) sizes that are 0, too large or not a
                    // power of two.
                    q.set_size(value.min(u32::from(u16::MAX)) as u16);
                }
            }
            VIRTIO_MMIO_QUEUE_READY if setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW if setup => {
                self.queue_address(|q, v| q.set_desc_table_address(Some(v), None), value)
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH if setup => {
                self.queue_address(|q, v| q.set_desc_table_address(None, Some(v)), value)
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW if setup => {
                self.queue_address(|q, v| q.set_avail_ring_address(Some(v), None), value)
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH if setup => {
                self.queue_address(|q, v| q.set_avail_ring_address(None, Some(v)), value)
            }
            VIRTIO_MMIO_QUEUE_USED_LOW if setup => {
                self.queue_address(|q, v| q.set_used_ring_address(Some(v), None), value)
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH if setup => {
                self.queue_address(|q, v| q.set_used_ring_address(None, Some(v)), value)
            }
            _ => {}
        }
    }

    fn queue_address(&mut self, set: impl FnOnce(&mut Queue, u32), value: u32) {
        if let Some(q) = self.selected_queue() {
            // virtio-queue refuses (and ignores) misaligned ring addresses.
            set(q, value);
        }
    }
}

impl Persist<'_> for MmioTransport {
    type State = TransportSnapshot;
    /// The device (new, of the saved kind), the new VM's RAM and the transport's interrupt.
    type ConstructorArgs = (Box<dyn VirtioDevice>, GuestRam, IrqLine);
    type Error = StateError;

    fn save(&self) -> Result<TransportSnapshot, StateError> {
        Ok(TransportSnapshot {
            device_type: self.device.device_type(),
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            status: self.status,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(QueueSnapshot::of).collect(),
            device: self.device.save(),
        })
    }

    /// Refused unless `saved` is of a device of this kind with as many queues of the same
    /// sizes. A pending interrupt is raised again, and every ready queue is served once: a
    /// notification the guest made just before the save went to the old VMM's eventfd, and
    /// its buffers would otherwise wait forever.
    fn restore(
        (device, memory, irq): (Box<dyn VirtioDevice>, GuestRam, IrqLine),
        saved: &TransportSnapshot,
    ) -> Result<Self, StateError> {
        let mut transport = MmioTransport::new(device, memory, irq);
        let kind = transport.device.device_type();
        if saved.device_type != kind {
            return Err(StateError::DeviceType {
                saved: saved.device_type,
                device: kind,
            });
        }
        let sizes = transport.device.queue_max_sizes();
        if saved.queues.len() != sizes.len() {
            return Err(StateError::QueueCount {
                saved: saved.queues.len(),
                device: sizes.len(),
            });
        }
        let queues = saved
            .queues
            .iter()
            .zip(sizes)
            .map(|(queue, max)| queue.queue(*max))
            .collect::<Result<Vec<_>, _>>()?;
        transport.device.restore(&saved.device)?;
        transport.queues = queues;
        transport.queue_select = saved.queue_select;
        transport.device_features_select = saved.device_features_select;
        transport.driver_features_select = saved.driver_features_select;
        transport.driver_features = saved.driver_features;
        transport.status = saved.status;
        transport.interrupt_status = saved.interrupt_status;
        transport.config_generation = saved.config_generation;
        if transport.interrupt_status != 0 {
            let _ = transport.irq.trigger();
        }
        for queue in 0..transport.queues.len() {
            transport.handle(DeviceEvent::Queue(queue));
        }
        Ok(transport)
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_START {
            self.device.read_config(offset - CONFIG_START, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_register(offset as u32).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_START {
            self.device.write_config(offset - CONFIG_START, data);
            self.config_generation = self.config_generation.wrapping_add(1);
        } else if let (Ok(bytes), true) = (<[u8; 4]>::try_from(data), offset.is_multiple_of(4)) {
            self.write_register(offset as u32, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::virtio::test_support;
    use crate::devices::virtio::DeviceError;
    use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER};
    use virtio_queue::QueueOwnedT;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// A device that returns every chain it is given as used.
    struct Echo {
        sizes: [u16; 1],
        processed: usize,
    }

    impl VirtioDevice for Echo {
        fn device_type(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            FEATURE_VERSION_1 | 1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_space(&[1, 2, 3, 4], offset, data);
        }
        fn process(
            &mut self,
            _event: DeviceEvent,
            queues: &mut [Queue],
            memory: &GuestRam,
        ) -> Result<bool, DeviceError> {
            let heads: Vec<u16> = queues[0].iter(memory)?.map(|c| c.head_index()).collect();
            for head in &heads {
                queues[0].add_used(memory, *head, 0)?;
                self.processed += 1;
            }
            Ok(!heads.is_empty())
        }
    }

    pub(crate) fn read32(t: &mut MmioTransport, offset: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(offset), &mut b);
        u32::from_le_bytes(b)
    }

    pub(crate) fn write32(t: &mut MmioTransport, offset: u32, value: u32) {
        t.write(u64::from(offset), &value.to_le_bytes());
    }

    /// Takes the transport through feature negotiation and sets up each queue `n` at its test
    /// queue's addresses, then sets DRIVER_OK.
    pub(crate) fn drive(t: &mut MmioTransport, queues: &[(u32, &test_support::TestQueue<'_>)]) {
        write32(t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        write32(
            t,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        write32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write32(t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        write32(t, VIRTIO_MMIO_STATUS, s);
        assert_eq!(read32(t, VIRTIO_MMIO_STATUS), s);
        for (n, q) in queues {
            write32(t, VIRTIO_MMIO_QUEUE_SEL, *n);
            write32(t, VIRTIO_MMIO_QUEUE_NUM, 16);
            write32(t, VIRTIO_MMIO_QUEUE_DESC_LOW, q.desc_table_addr() as u32);
            write32(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, q.avail_addr() as u32);
            write32(t, VIRTIO_MMIO_QUEUE_USED_LOW, q.used_addr() as u32);
            write32(t, VIRTIO_MMIO_QUEUE_READY, 1);
        }
        write32(t, VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
    }

    fn transport(memory: &GuestRam) -> (MmioTransport, EventFd) {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = IrqLine::new(evt.try_clone().unwrap());
        (MmioTransport::new(echo(), memory.clone(), irq), evt)
    }

    fn echo() -> Box<dyn VirtioDevice> {
        Box::new(Echo {
            sizes: [16],
            processed: 0,
        })
    }

    /// A transport of a new echo device restored from `saved`.
    fn restore_echo(
        memory: &GuestRam,
        saved: &TransportSnapshot,
    ) -> Result<(MmioTransport, EventFd), StateError> {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = IrqLine::new(evt.try_clone().unwrap());
        MmioTransport::restore((echo(), memory.clone(), irq), saved).map(|t| (t, evt))
    }

    #[test]
    fn a_driver_negotiates_sets_up_a_queue_and_gets_interrupted() {
        let memory = test_support::memory();
        let (mut t, evt) = transport(&memory);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_MAGIC_VALUE), MAGIC);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_DEVICE_ID), 42);
        write32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 1);
        let mut config = [0u8; 8];
        t.read(CONFIG_START + 2, &mut config);
        assert_eq!(config, [3, 4, 0, 0, 0, 0, 0, 0]);

        let mut q = test_support::TestQueue::new(&memory, 0);
        q.add(&[(0x10_0000, 16, 0), (0x20_0000, 16, 0)]);
        drive(&mut t, &[(0, &q)]);
        assert!(t.active());
        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(q.used_idx(), 1);
        assert_eq!(
            read32(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING
        );
        assert_eq!(evt.read().unwrap(), 1);
        write32(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        // Queue registers are frozen once DRIVER_OK is set.
        write32(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
        // A reset forgets everything.
        write32(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
    }

    #[test]
    fn a_restored_transport_has_its_registers_and_queues_and_serves_what_was_left_waiting() {
        let memory = test_support::memory();
        let (mut t, _evt) = transport(&memory);
        let mut q = test_support::TestQueue::new(&memory, 0);
        q.add(&[(0x10_0000, 16, 0)]);
        drive(&mut t, &[(0, &q)]);
        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(q.used_idx(), 1);
        write32(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        // A second chain made available, its notification lost with the old VMM.
        q.add(&[(0x20_0000, 16, 0)]);
        let saved = t.save().unwrap();
        assert_eq!(saved.device_type, 42);

        let (mut restored, evt) = restore_echo(&memory, &saved).unwrap();
        assert_eq!(q.used_idx(), 2, "the waiting chain was served");
        assert_eq!(evt.read().unwrap(), 1, "and the driver interrupted");
        assert_eq!(read32(&mut restored, VIRTIO_MMIO_STATUS), t.status());
        assert_eq!(read32(&mut restored, VIRTIO_MMIO_QUEUE_READY), 1);
        let state = |t: &MmioTransport| serde_json::to_string(&t.save().unwrap().queues).unwrap();
        assert_ne!(
            state(&restored),
            state(&t),
            "restored on from the saved positions"
        );

        // Another kind of device, or other queues, are refused: no transport is made.
        let mut other = saved.clone();
        other.device_type = 3;
        let refused = restore_echo(&memory, &other).unwrap_err().to_string();
        assert!(refused.contains("type 3"), "{refused}");
        let mut fewer = saved.clone();
        fewer.queues.clear();
        let refused = restore_echo(&memory, &fewer).unwrap_err().to_string();
        assert!(refused.contains("0 queues"), "{refused}");
    }

    #[test]
    fn features_not_offered_or_without_version_1_are_refused() {
        let memory = test_support::memory();
        let (mut t, _evt) = transport(&memory);
        write32(
            &mut t,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        // Legacy driver: no VERSION_1.
        write32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        write32(&mut t, VIRTIO_MMIO_STATUS, 0xb);
        assert_eq!(
            read32(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK,
            0
        );
        // A feature the device does not have.
        write32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1 | 2);
        write32(&mut t, VIRTIO_MMIO_STATUS, 0xb);
        assert_eq!(
            read32(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK,
            0
        );
        // DRIVER_OK without FEATURES_OK does nothing.
        write32(&mut t, VIRTIO_MMIO_STATUS, 0x7);
        assert!(!t.active());
    }

    #[test]
    fn odd_accesses_and_hostile_queue_setups_never_panic() {
        let memory = test_support::memory();
        let (mut t, _evt) = transport(&memory);
        // Unaligned and narrow register accesses are ignored.
        let mut one = [0xffu8; 1];
        t.read(0, &mut one);
        assert_eq!(one, [0]);
        t.write(0x71, &[0xff]);
        t.write(VIRTIO_MMIO_STATUS as u64, &[1, 0]);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_STATUS), 0);
        // Reads far into config space are zero.
        let mut far = [0xffu8; 8];
        t.read(0xff8, &mut far);
        assert_eq!(far, [0; 8]);

        // A queue selected beyond the device's, sizes not a power of two, rings outside RAM.
        let q = test_support::TestQueue::new(&memory, 0);
        write32(&mut t, VIRTIO_MMIO_STATUS, 0x3);
        write32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        write32(&mut t, VIRTIO_MMIO_STATUS, 0xb);
        write32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 7);
        write32(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
        write32(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        write32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        write32(&mut t, VIRTIO_MMIO_QUEUE_NUM, 3);
        write32(&mut t, VIRTIO_MMIO_QUEUE_NUM, 0x10000);
        write32(
            &mut t,
            VIRTIO_MMIO_QUEUE_DESC_LOW,
            q.desc_table_addr() as u32,
        );
        write32(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, q.avail_addr() as u32);
        write32(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, 0xfff0_0000);
        write32(&mut t, VIRTIO_MMIO_QUEUE_USED_HIGH, 0x7);
        write32(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        write32(&mut t, VIRTIO_MMIO_STATUS, 0xf);
        let status = read32(&mut t, VIRTIO_MMIO_STATUS);
        assert_eq!(status & VIRTIO_CONFIG_S_DRIVER_OK, 0);
        assert_ne!(status & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, u32::MAX);
    }

    #[test]
    fn an_avail_index_beyond_the_queue_needs_a_reset() {
        let memory = test_support::memory();
        let (mut t, _evt) = transport(&memory);
        let q = test_support::TestQueue::new(&memory, 0);
        drive(&mut t, &[(0, &q)]);
        q.set_avail_idx(1000);
        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_ne!(
            read32(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
            0
        );
        assert_eq!(
            read32(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_CONFIG
        );
        assert!(!t.active());
    }
}
