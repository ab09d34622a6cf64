//! An address space (port I/O or MMIO) mapping non-overlapping ranges to devices.
//!
//! Built once before the vCPUs start, then only read: a lookup is a `BTreeMap` range query
//! and a device lock. An access outside every range reads as all ones and is otherwise
//! ignored, as on a real bus with nothing decoding the address.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

/// A device on a bus. `offset` is relative to the start of the device's range; `data` is the
/// access (1, 2, 4 or 8 bytes, whatever the guest used).
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device as the bus holds it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Why a device could not be put on a bus.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("bus range {base:#x}+{len:#x} is empty or overlaps another device")]
pub struct Overlap {
    /// The range's start.
    pub base: u64,
    /// Its length.
    pub len: u64,
}

/// Ranges to devices.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<(u64, u64)> = self.ranges.iter().map(|(b, (l, _))| (*b, *l)).collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    /// Puts `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), Overlap> {
        let overlap = Overlap { base, len };
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(overlap.clone())?;
        if let Some((b, (l, _))) = self.ranges.range(..end).next_back() {
            if b + l > base {
                return Err(overlap);
            }
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, address: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (base, (len, device)) = self.ranges.range(..=address).next_back()?;
        let offset = address - base;
        (offset.checked_add(size as u64)? <= *len).then_some((offset, device))
    }

    /// Reads from whatever decodes `address`; returns whether anything did.
    pub fn read(&self, address: u64, data: &mut [u8]) -> bool {
        match self.find(address, data.len()) {
            Some((offset, device)) => {
                device
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to whatever decodes `address`; returns whether anything did.
    pub fn write(&self, address: u64, data: &[u8]) -> bool {
        match self.find(address, data.len()) {
            Some((offset, device)) => {
                device
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Vec<(u64, Vec<u8>)>);

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_device_at_their_offset_and_nothing_else() {
        let device = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::default();
        bus.insert(0x3f8, 8, device.clone()).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fa, &mut data));
        assert_eq!(data, [2]);
        assert!(bus.write(0x3ff, &[7]));
        // Straddling the end, or outside: all ones, nothing written.
        let mut wide = [0u8; 2];
        assert!(!bus.read(0x3ff, &mut wide));
        assert_eq!(wide, [0xff, 0xff]);
        assert!(!bus.write(0x400, &[1]));
        assert!(!bus.write(u64::MAX, &[1, 2]));
        assert_eq!(device.lock().unwrap().0, vec![(7, vec![7])]);
    }

    #[test]
    fn overlapping_or_empty_ranges_are_refused() {
        let mut bus = Bus::default();
        let device = || Arc::new(Mutex::new(Recorder::default())) as SharedDevice;
        bus.insert(0x60, 5, device()).unwrap();
        assert!(bus.insert(0x64, 1, device()).is_err());
        assert!(bus.insert(0x50, 0x11, device()).is_err());
        assert!(bus.insert(0x70, 0, device()).is_err());
        assert!(bus.insert(u64::MAX, 2, device()).is_err());
        bus.insert(0x65, 1, device()).unwrap();
        bus.insert(0x50, 0x10, device()).unwrap();
    }
}
