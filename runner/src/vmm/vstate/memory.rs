//! Guest RAM: anonymous private mappings (vm-memory's mmap backend), laid out by
//! [`crate::vmm::arch::layout::ram_ranges`], never backed by a file the guest could share.

use vm_memory::{GuestAddress, GuestMemoryMmap};

/// The guest's RAM as the VMM sees it.
pub type GuestRam = GuestMemoryMmap<()>;

/// Maps `size` bytes of guest RAM (a whole number of 4 KiB pages), skipping the MMIO hole.
pub fn create(size: u64) -> Result<GuestRam, vm_memory::mmap::FromRangesError> {
    let ranges: Vec<(GuestAddress, usize)> = crate::vmm::arch::layout::ram_ranges(size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestRam::from_ranges(&ranges)
}
