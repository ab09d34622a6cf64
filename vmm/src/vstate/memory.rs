//! Guest RAM: anonymous private mappings (vm-memory's mmap backend), laid out by
//! [`crate::arch::layout::ram_ranges`], never backed by a file the guest could share —
//! of ordinary pages, or of 2 MiB huge pages ([`create_huge`]).

use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

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
