//! One virtio-blk request: a readable 16-byte header (type, reserved, sector), data buffers,
//! and a writable status byte last. Everything in it comes from the guest and is checked
//! before any I/O: descriptor directions, lengths (data in whole sectors), the sector range
//! against the disk's capacity (overflow-checked), and every buffer against guest memory.

use std::io::{Seek, SeekFrom};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemoryBackend};

use super::{Block, SECTOR_SIZE};
use crate::vstate::memory::GuestRam;

/// The header's size.
const HEADER_SIZE: u32 = 16;

/// Why a request failed: the status byte the guest gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// `VIRTIO_BLK_S_IOERR`: malformed, out of range, read-only, or the host I/O failed.
    Io,
    /// `VIRTIO_BLK_S_UNSUPP`: a request type this device does not do.
    Unsupported,
}

/// Runs the request `chain` describes; returns how many bytes were written into guest
/// memory (data and status), the used length. A chain without a writable status byte at its
/// end cannot be answered and is returned with length 0.
pub fn execute(disk: &mut Block, chain: DescriptorChain<&GuestRam>, memory: &GuestRam) -> u32 {
    // Bounded: virtio-queue stops a chain after `queue size` descriptors (loops included).
    let descriptors: Vec<Descriptor> = chain.collect();
    let Some((status, rest)) = descriptors.split_last() else {
        return 0;
    };
    if !status.is_write_only() || status.len() < 1 || !in_memory(memory, status) {
        return 0;
    }
    let (code, written) = match run(disk, rest, memory) {
        Ok(written) => (VIRTIO_BLK_S_OK, written),
        Err(Failure::Io) => (VIRTIO_BLK_S_IOERR, 0),
        Err(Failure::Unsupported) => (VIRTIO_BLK_S_UNSUPP, 0),
    };
    if memory.write_obj(code as u8, status.addr()).is_err() {
        return 0;
    }
    written.saturating_add(1)
}

fn in_memory(memory: &GuestRam, desc: &Descriptor) -> bool {
    GuestMemoryBackend::check_range(memory, desc.addr(), desc.len() as usize)
}

fn run(disk: &mut Block, descriptors: &[Descriptor], memory: &GuestRam) -> Result<u32, Failure> {
    let (header, data) = descriptors.split_first().ok_or(Failure::Io)?;
    if header.is_write_only() || header.len() < HEADER_SIZE {
        return Err(Failure::Io);
    }
    let mut raw = [0u8; HEADER_SIZE as usize];
    memory
        .read_slice(&mut raw, header.addr())
        .map_err(|_| Failure::Io)?;
    let kind = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let sector = u64::from_le_bytes([
        raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15],
    ]);

    match kind {
        VIRTIO_BLK_T_IN => {
            let offset = check_data(disk, data, memory, sector, true)?;
            let mut position = offset;
            for desc in data {
                disk.file
                    .seek(SeekFrom::Start(position))
                    .map_err(|_| Failure::Io)?;
                memory
                    .read_exact_volatile_from(desc.addr(), &mut disk.file, desc.len() as usize)
                    .map_err(|_| Failure::Io)?;
                position += u64::from(desc.len());
            }
            u32::try_from(position - offset).map_err(|_| Failure::Io)
        }
        VIRTIO_BLK_T_OUT => {
            if disk.read_only {
                return Err(Failure::Io);
            }
            let mut position = check_data(disk, data, memory, sector, false)?;
            for desc in data {
                disk.file
                    .seek(SeekFrom::Start(position))
                    .map_err(|_| Failure::Io)?;
                memory
                    .write_all_volatile_to(desc.addr(), &mut disk.file, desc.len() as usize)
                    .map_err(|_| Failure::Io)?;
                position += u64::from(desc.len());
            }
            Ok(0)
        }
        VIRTIO_BLK_T_FLUSH => {
            if !disk.read_only {
                disk.file.sync_data().map_err(|_| Failure::Io)?;
            }
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            let desc = data.first().ok_or(Failure::Io)?;
            if !desc.is_write_only() || !in_memory(memory, desc) {
                return Err(Failure::Io);
            }
            let n = (desc.len() as usize).min(disk.id.len());
            memory
                .write_slice(&disk.id[..n], desc.addr())
                .map_err(|_| Failure::Io)?;
            Ok(n as u32)
        }
        _ => Err(Failure::Unsupported),
    }
}

/// Checks a read's (`into_guest`) or write's data buffers: their direction, that each lies in
/// guest memory, that together they are whole sectors, and that they fit the disk from
/// `sector` on. Returns the byte offset in the file.
fn check_data(
    disk: &Block,
    data: &[Descriptor],
    memory: &GuestRam,
    sector: u64,
    into_guest: bool,
) -> Result<u64, Failure> {
    let mut total: u64 = 0;
    for desc in data {
        if desc.is_write_only() != into_guest || !in_memory(memory, desc) {
            return Err(Failure::Io);
        }
        total += u64::from(desc.len());
    }
    if !total.is_multiple_of(SECTOR_SIZE) {
        return Err(Failure::Io);
    }
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or(Failure::Io)?;
    let end = offset.checked_add(total).ok_or(Failure::Io)?;
    if end > disk.capacity * SECTOR_SIZE {
        return Err(Failure::Io);
    }
    Ok(offset)
}
