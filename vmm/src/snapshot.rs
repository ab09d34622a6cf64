//! A paused VM saved to a file, and read back into a new VM: the kvm backend's cold state.
//!
//! The file: the magic [`MAGIC`], the state's length (u64, little-endian) and the state as
//! JSON ([`SavedVm`]: every vCPU, the in-kernel devices, the port devices, the virtio
//! transports), then guest RAM as records of a page's guest-physical address (u64) and its
//! 4 KiB, only for pages that are not all zero (a fresh VM's RAM is zero), in increasing
//! order, ended by the address `u64::MAX`. Nothing may follow.
//!
//! The reader ([`SnapshotReader`]) is pushed the bytes as they are read and hashed, so what
//! is restored is exactly what was hashed; it writes pages straight into the new VM's RAM
//! (which runs nothing yet) and keeps the state's bytes, parsed ([`parse`]) only once the
//! caller has checked the whole file's digest. Every length, address and order is checked:
//! a malformed file is an error ([`VmmError::Snapshot`]), never a panic or a write outside
//! RAM.

use std::io::{self, Write};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::devices::cmos::persist::CmosSnapshot;
use super::devices::i8042::persist::I8042Snapshot;
use super::devices::serial::persist::SerialSnapshot;
use super::devices::virtio::persist::TransportSnapshot;
use super::vstate::memory::GuestRam;
use super::vstate::vcpu_snapshot::VcpuSnapshot;
use super::vstate::vm::VmSnapshot;
use super::VmmError;

/// The file's first bytes (format 1).
pub const MAGIC: &[u8; 8] = b"MVMVMSN1";
/// The largest state read (a few KiB per vCPU and device in practice).
pub const MAX_STATE_BYTES: u64 = 4 << 20;
/// A page of guest RAM.
pub const PAGE: usize = 4096;
/// The address that ends the pages.
const END: u64 = u64::MAX;

/// Everything but RAM.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedVm {
    /// Guest RAM in MiB (the VM it is restored into must have as much).
    pub memory_mib: u64,
    /// Each vCPU, in order.
    pub vcpus: Vec<VcpuSnapshot>,
    /// The PICs, IOAPIC, PIT and clock.
    pub vm: VmSnapshot,
    /// COM1.
    pub serial: SerialSnapshot,
    /// The RTC.
    pub cmos: CmosSnapshot,
    /// The i8042.
    pub i8042: I8042Snapshot,
    /// Each virtio device, in bus order.
    pub virtio: Vec<TransportSnapshot>,
}

fn malformed(reason: impl Into<String>) -> VmmError {
    VmmError::Snapshot(reason.into())
}

/// Writes `state` and the non-zero pages of `memory` to `into`.
pub fn write(into: &mut impl Write, state: &SavedVm, memory: &GuestRam) -> io::Result<()> {
    let json = state_json(state).map_err(io::Error::other)?;
    write_raw(into, &json, memory)
}

/// `state`'s bytes as [`parse`] reads them: what this file holds before RAM, and what a boot
/// snapshot keeps beside its flat RAM image.
pub fn state_json(state: &SavedVm) -> Result<Vec<u8>, VmmError> {
    serde_json::to_vec(state).map_err(|e| malformed(format!("its state: {e}")))
}

/// Writes the state's bytes `json` and the non-zero pages of `memory` to `into`.
fn write_raw(into: &mut impl Write, json: &[u8], memory: &GuestRam) -> io::Result<()> {
    into.write_all(MAGIC)?;
    into.write_all(&(json.len() as u64).to_le_bytes())?;
    into.write_all(json)?;
    let mut page = [0u8; PAGE];
    for region in memory.iter() {
        let start = region.start_addr().0;
        for offset in (0..region.len()).step_by(PAGE) {
            let address = GuestAddress(start + offset);
            memory
                .read_slice(&mut page, address)
                .map_err(|e| io::Error::other(format!("guest RAM at {:#x}: {e}", address.0)))?;
            if page.iter().all(|b| *b == 0) {
                continue;
            }
            into.write_all(&address.0.to_le_bytes())?;
            into.write_all(&page)?;
        }
    }
    into.write_all(&END.to_le_bytes())?;
    into.flush()
}

/// Where the reader is in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Magic,
    Length,
    State,
    Address,
    Page(u64),
    Done,
}

/// Reads a saved VM pushed to it as bytes ([`Write`]), pages into `memory`.
#[derive(Debug)]
pub struct SnapshotReader<'m> {
    memory: &'m GuestRam,
    stage: Stage,
    /// The bytes of the field being read.
    field: Vec<u8>,
    /// How many that field has.
    want: usize,
    state: Vec<u8>,
    /// The last page's address: pages come in increasing order, each once.
    last: Option<u64>,
    /// The first error: everything after it is refused.
    failed: Option<String>,
}

impl<'m> SnapshotReader<'m> {
    /// A reader filling `memory` (a new VM's, all zero).
    pub fn new(memory: &'m GuestRam) -> Self {
        SnapshotReader {
            memory,
            stage: Stage::Magic,
            field: Vec::with_capacity(PAGE),
            want: MAGIC.len(),
            state: Vec::new(),
            last: None,
            failed: None,
        }
    }

    /// The state's bytes, once the whole file was read and nothing followed it.
    pub fn finish(self) -> Result<Vec<u8>, VmmError> {
        if let Some(reason) = self.failed {
            return Err(malformed(reason));
        }
        match self.stage {
            Stage::Done => Ok(self.state),
            _ => Err(malformed("the file ends early")),
        }
    }

    /// Takes a whole field; the stage after it.
    fn field_done(&mut self, field: &[u8]) -> Result<(Stage, usize), String> {
        let word = || u64::from_le_bytes(field.try_into().unwrap_or_default());
        Ok(match self.stage {
            Stage::Magic if field == MAGIC => (Stage::Length, 8),
            Stage::Magic => return Err("not a saved VM (its magic is wrong)".into()),
            Stage::Length => match word() {
                0 => return Err("its state is empty".into()),
                n if n > MAX_STATE_BYTES => return Err(format!("its state is {n} bytes")),
                n => (Stage::State, n as usize),
            },
            Stage::State => {
                self.state = field.to_vec();
                (Stage::Address, 8)
            }
            Stage::Address => match word() {
                END => (Stage::Done, 0),
                address => {
                    self.check_page(address)?;
                    (Stage::Page(address), PAGE)
                }
            },
            Stage::Page(address) => {
                self.memory
                    .write_slice(field, GuestAddress(address))
                    .map_err(|e| format!("page {address:#x}: {e}"))?;
                self.last = Some(address);
                (Stage::Address, 8)
            }
            Stage::Done => return Err("bytes follow its end".into()),
        })
    }

    /// Refuses a page address that is unaligned, not after the last, or not wholly in RAM.
    fn check_page(&self, address: u64) -> Result<(), String> {
        if !address.is_multiple_of(PAGE as u64) {
            return Err(format!("page address {address:#x} is not page-aligned"));
        }
        if self.last.is_some_and(|last| address <= last) {
            return Err(format!("page {address:#x} is out of order"));
        }
        let last_byte = address.checked_add(PAGE as u64 - 1).map(GuestAddress);
        let in_ram = |at: GuestAddress| self.memory.address_in_range(at);
        if !in_ram(GuestAddress(address)) || !last_byte.is_some_and(in_ram) {
            return Err(format!("page {address:#x} is outside guest RAM"));
        }
        Ok(())
    }
}

impl Write for SnapshotReader<'_> {
    fn write(&mut self, mut bytes: &[u8]) -> io::Result<usize> {
        let taken = bytes.len();
        while !bytes.is_empty() && self.failed.is_none() {
            if self.stage == Stage::Done {
                self.failed = Some("bytes follow its end".into());
                break;
            }
            let n = (self.want - self.field.len()).min(bytes.len());
            self.field.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.field.len() == self.want {
                let field = std::mem::take(&mut self.field);
                match self.field_done(&field) {
                    Ok((stage, want)) => {
                        self.stage = stage;
                        self.want = want;
                        self.field = field;
                        self.field.clear();
                    }
                    Err(reason) => self.failed = Some(reason),
                }
            }
        }
        match &self.failed {
            Some(reason) => Err(io::Error::new(io::ErrorKind::InvalidData, reason.clone())),
            None => Ok(taken),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The state read by a [`SnapshotReader`], parsed.
pub fn parse(state: &[u8]) -> Result<SavedVm, VmmError> {
    serde_json::from_slice(state).map_err(|e| malformed(format!("its state: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory;

    fn reader_takes(bytes: &[u8], memory: &GuestRam) -> Result<Vec<u8>, VmmError> {
        let mut reader = SnapshotReader::new(memory);
        // In uneven pieces, as a file is read.
        for piece in bytes.chunks(1000) {
            if reader.write_all(piece).is_err() {
                break;
            }
        }
        reader.finish()
    }

    fn file(state: &[u8], pages: &[(u64, u8)]) -> Vec<u8> {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&(state.len() as u64).to_le_bytes());
        bytes.extend_from_slice(state);
        for (address, fill) in pages {
            bytes.extend_from_slice(&address.to_le_bytes());
            bytes.extend_from_slice(&[*fill; PAGE]);
        }
        bytes.extend_from_slice(&END.to_le_bytes());
        bytes
    }

    #[test]
    fn pages_written_are_read_back_and_zero_pages_are_left_out() {
        // Two RAM regions (below and above the MMIO hole would need 3.x GiB; one is enough
        // to show the order and the holes).
        let source = memory::create(8 << 20).unwrap();
        source
            .write_slice(&[7u8; 10], GuestAddress(0x1234))
            .unwrap();
        source
            .write_slice(&[9u8; PAGE], GuestAddress(0x70_0000))
            .unwrap();
        let mut written = Vec::new();
        write_raw(&mut written, b"{\"x\":1}", &source).unwrap();
        // Two pages, not 2048: all-zero pages are left out.
        assert_eq!(written, {
            let mut first = [0u8; PAGE];
            first[0x234..0x23e].fill(7);
            let mut expected = file(b"{\"x\":1}", &[(0x70_0000, 9)]);
            let at = MAGIC.len() + 8 + 7;
            let mut record = 0x1000u64.to_le_bytes().to_vec();
            record.extend_from_slice(&first);
            expected.splice(at..at, record);
            expected
        });
        let target = memory::create(8 << 20).unwrap();
        assert_eq!(reader_takes(&written, &target).unwrap(), b"{\"x\":1}");
        let mut page = [0u8; PAGE];
        for (at, from) in [(0x1000, &source), (0x70_0000, &source), (0x2000, &source)] {
            let mut expected = [0u8; PAGE];
            from.read_slice(&mut expected, GuestAddress(at)).unwrap();
            target.read_slice(&mut page, GuestAddress(at)).unwrap();
            assert_eq!(page, expected, "{at:#x}");
        }
    }

    #[test]
    fn malformed_files_are_refused_with_their_reason() {
        let memory = memory::create(8 << 20).unwrap();
        let refused = |bytes: Vec<u8>, why: &str| {
            let error = reader_takes(&bytes, &memory).unwrap_err();
            assert_eq!(error.code(), "VMM010");
            assert!(error.to_string().contains(why), "{error} ({why})");
        };
        refused(b"NOTASNAP".to_vec(), "magic");
        refused(file(b"{}", &[])[..20].to_vec(), "ends early");
        refused(file(b"", &[]), "empty");
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&(MAX_STATE_BYTES + 1).to_le_bytes());
        refused(huge, "bytes");
        refused(file(b"{}", &[(0x1001, 1)]), "not page-aligned");
        refused(file(b"{}", &[(0x2000, 1), (0x1000, 1)]), "out of order");
        refused(file(b"{}", &[(0x2000, 1), (0x2000, 1)]), "out of order");
        refused(file(b"{}", &[(8 << 20, 1)]), "outside guest RAM");
        refused(file(b"{}", &[(u64::MAX - 4095, 1)]), "outside guest RAM");
        let mut trailing = file(b"{}", &[]);
        trailing.push(0);
        refused(trailing, "follow its end");
        assert_eq!(parse(b"{}").unwrap_err().code(), "VMM010");
    }
}
