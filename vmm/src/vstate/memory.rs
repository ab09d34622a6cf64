//! Guest RAM: private mappings (vm-memory's mmap backend), laid out by
//! [`crate::arch::layout::ram_ranges`], never backed by a file the guest could share —
//! anonymous, of ordinary pages or of 2 MiB huge pages ([`create_huge`]), or copy-on-write
//! from a flat image of a saved VM's RAM ([`map_flat`]).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

/// The guest's RAM as the VMM sees it.
pub type GuestRam = GuestMemoryMmap<()>;

/// A huge page (x86-64's 2 MiB).
pub const HUGE_PAGE: u64 = 2 << 20;

/// Maps `size` bytes of guest RAM (a whole number of 4 KiB pages), skipping the MMIO hole.
pub fn create(size: u64) -> Result<GuestRam, vm_memory::mmap::FromRangesError> {
    let ranges: Vec<(GuestAddress, usize)> = crate::arch::layout::ram_ranges(size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestRam::from_ranges(&ranges)
}

/// Maps `size` bytes of guest RAM (a whole number of 2 MiB pages) from the host's pool of
/// 2 MiB huge pages (`/proc/sys/vm/nr_hugepages`): fewer TLB misses for the guest, and the
/// memory is the guest's alone from the start. The pages are reserved as the mapping is
/// made, so a pool too small refuses it here — not with a SIGBUS when the guest first
/// touches a page.
pub fn create_huge(size: u64) -> Result<GuestRam, String> {
    if !size.is_multiple_of(HUGE_PAGE) {
        return Err(format!(
            "{} MiB is not a whole number of 2 MiB huge pages",
            size >> 20
        ));
    }
    let regions = crate::arch::layout::ram_ranges(size)
        .into_iter()
        .map(|(start, len)| {
            let flags =
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_HUGE_2MB;
            let mapping = MmapRegion::build(
                None,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
            )
            .map_err(|e| {
                format!(
                    "{} MiB of 2 MiB huge pages: {e} (is /proc/sys/vm/nr_hugepages large enough?)",
                    len >> 20
                )
            })?;
            GuestRegionMmap::new(mapping, GuestAddress(start))
                .ok_or_else(|| format!("a region at {start:#x} overflows"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestRam::from_regions(regions).map_err(|e| e.to_string())
}

/// The page size a flat image is written in.
const PAGE: usize = 4096;

/// Writes `memory` to `file` as a flat image: its regions back to back, in address order, so
/// that byte `n` of the file is byte `n` of RAM counted without the MMIO hole. Pages of zeros
/// are not written: they stay holes of a sparse file. Returns the image's length.
pub fn write_flat(memory: &GuestRam, file: &File) -> io::Result<u64> {
    let mut page = [0u8; PAGE];
    let mut offset = 0u64;
    for region in memory.iter() {
        let start = region.start_addr().0;
        for at in (0..region.len()).step_by(PAGE) {
            memory
                .read_slice(&mut page, GuestAddress(start + at))
                .map_err(|e| io::Error::other(format!("guest RAM at {:#x}: {e}", start + at)))?;
            if page != [0u8; PAGE] {
                file.write_all_at(&page, offset + at)?;
            }
        }
        offset += region.len();
    }
    file.set_len(offset)?;
    Ok(offset)
}

/// Maps `size` bytes of guest RAM from `file`, a flat image of it ([`write_flat`]) exactly
/// that long: each region copy-on-write (`MAP_PRIVATE`) at its offset. Nothing is read until
/// the guest touches a page, so the mapping costs the same at any size; what the guest writes
/// stays in its own pages and never reaches the file; many VMs mapping one image share its
/// unwritten pages in the host's page cache.
pub fn map_flat(size: u64, file: &File) -> Result<GuestRam, String> {
    let length = file
        .metadata()
        .map_err(|e| format!("the memory image: {e}"))?
        .len();
    if length != size {
        return Err(format!(
            "the memory image holds {length} bytes, not the {size} of {} MiB of RAM",
            size >> 20
        ));
    }
    let file = Arc::new(
        file.try_clone()
            .map_err(|e| format!("the memory image: {e}"))?,
    );
    let mut offset = 0u64;
    let regions = crate::arch::layout::ram_ranges(size)
        .into_iter()
        .map(|(start, len)| {
            let mapping = MmapRegion::build(
                Some(FileOffset::from_arc(file.clone(), offset)),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            )
            .map_err(|e| format!("mapping {} MiB of the memory image: {e}", len >> 20))?;
            offset += len;
            GuestRegionMmap::new(mapping, GuestAddress(start))
                .ok_or_else(|| format!("a region at {start:#x} overflows"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestRam::from_regions(regions).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What is written at the start, just below the MMIO hole and at the very end of RAM that
    /// goes on above it comes back at the same guest addresses; the image is sparse (only written pages
    /// take space); a guest write to the mapping never reaches the file.
    #[test]
    fn a_flat_image_maps_back_page_for_page_and_stays_unchanged() {
        let size = (3072 + 4) << 20;
        let ram = create(size).unwrap();
        let last = ram.last_addr();
        let marks = [
            (GuestAddress(0x1000), b"start".as_slice()),
            (GuestAddress((3u64 << 30) - 5), b"below".as_slice()),
            (GuestAddress(last.0 - 3), b"end!".as_slice()),
        ];
        for (address, bytes) in marks {
            ram.write_slice(bytes, address).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let file = File::create_new(&path).unwrap();
        assert_eq!(write_flat(&ram, &file).unwrap(), size);
        drop(file);
        let file = File::open(&path).unwrap();
        let allocated = {
            use std::os::unix::fs::MetadataExt;
            file.metadata().unwrap().blocks() * 512
        };
        assert!(allocated <= 64 * 1024, "{allocated} bytes allocated");

        let mapped = map_flat(size, &file).unwrap();
        for (address, bytes) in marks {
            let mut back = vec![0u8; bytes.len()];
            mapped.read_slice(&mut back, address).unwrap();
            assert_eq!(back, bytes);
        }
        mapped.write_slice(b"guest", GuestAddress(0x1000)).unwrap();
        let mut on_disk = [0u8; 5];
        file.read_exact_at(&mut on_disk, 0x1000).unwrap();
        assert_eq!(&on_disk, b"start");

        assert!(map_flat(size + (2 << 20), &file).is_err());
    }
}
