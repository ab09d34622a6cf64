//! Linux's x86 boot protocol, 64-bit entry: the kernel (ELF vmlinux or bzImage) loaded by
//! linux-loader, the command line, an optional initramfs, and the zero page (`boot_params`)
//! with its e820 map and the RSDP's address.

use std::fs::File;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{self, BzImage, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::*;
use crate::vstate::memory::GuestRam;

/// e820 type: usable RAM.
const E820_RAM: u32 = 1;
/// e820 type: reserved.
const E820_RESERVED: u32 = 2;
/// `boot_flag`: the boot sector signature.
const BOOT_FLAG: u16 = 0xaa55;
/// `header`: "HdrS".
const HDRS_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: undefined loader.
const LOADER_UNDEFINED: u8 = 0xff;
/// `kernel_alignment` when the kernel gives none (an ELF vmlinux).
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;
/// The bzImage's 64-bit entry is this far after its load address.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// The highest address an initramfs may end at when the kernel does not say.
const INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Why a kernel could not be put into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Neither an ELF vmlinux nor a bzImage, or one that does not fit.
    #[error("the kernel is neither a loadable ELF ({elf}) nor a bzImage ({bzimage})")]
    Kernel {
        /// Why the ELF loader refused it.
        elf: loader::Error,
        /// Why the bzImage loader refused it.
        bzimage: loader::Error,
    },
    /// The command line is longer than the kernel takes, or has a NUL.
    #[error("the kernel command line is {0} bytes; at most {max} fit", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    /// The command line contains a NUL byte.
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    /// The initramfs does not fit between the kernel and the end of low RAM.
    #[error("the initramfs ({0} bytes) does not fit in guest RAM after the kernel")]
    InitrdTooLarge(u64),
    /// Guest memory refused a write.
    #[error("writing boot data into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// Reading the initramfs failed.
    #[error("reading the initramfs: {0}")]
    Io(#[from] std::io::Error),
}

/// Where the kernel went and how to enter it.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// The 64-bit entry point.
    pub entry: u64,
    /// The first address after the kernel image.
    pub end: u64,
    /// The bzImage's setup header, to be copied into the zero page.
    pub setup_header: Option<setup_header>,
}

/// Loads `kernel`, trying ELF first and bzImage second.
pub fn load_kernel(memory: &GuestRam, kernel: &mut File) -> Result<LoadedKernel, BootError> {
    let himem = Some(GuestAddress(HIMEM_START));
    let elf = match Elf::load(memory, None, kernel, himem) {
        Ok(r) => {
            return Ok(LoadedKernel {
                entry: r.kernel_load.raw_value(),
                end: r.kernel_end,
                setup_header: None,
            })
        }
        Err(e) => e,
    };
    match BzImage::load(memory, None, kernel, himem) {
        Ok(r) => Ok(LoadedKernel {
            entry: r.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET,
            end: r.kernel_end,
            setup_header: r.setup_header,
        }),
        Err(bzimage) => Err(BootError::Kernel { elf, bzimage }),
    }
}

/// Writes `cmdline` (NUL-terminated) at [`CMDLINE_START`].
pub fn load_cmdline(memory: &GuestRam, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    memory.write_slice(&bytes, GuestAddress(CMDLINE_START))?;
    Ok(())
}

/// Places the initramfs at the top of low RAM (page aligned, below the kernel's limit and
/// above its image); returns its address and size.
pub fn load_initrd(
    memory: &GuestRam,
    kernel: &LoadedKernel,
    initrd: &mut File,
) -> Result<(u64, u64), BootError> {
    let size = initrd.metadata()?.len();
    let limit = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(INITRD_ADDR_MAX)
        .saturating_add(1);
    let low_ram_end = memory.last_addr().raw_value().min(MMIO_HOLE_START - 1) + 1;
    let top = limit.min(low_ram_end);
    let at = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel.end.next_multiple_of(0x1000))
        .ok_or(BootError::InitrdTooLarge(size))?;
    memory.read_exact_volatile_from(GuestAddress(at), initrd, size as usize)?;
    Ok((at, size))
}

/// The e820 map: conventional memory, the reserved ACPI area, RAM from 1 MiB (and above
/// 4 GiB).
pub fn e820_map(memory: &GuestRam) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, size: u64, r#type: u32| boot_e820_entry { addr, size, r#type };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(RSDP_START, ACPI_END - RSDP_START, E820_RESERVED),
    ];
    for region in memory.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.last_addr().raw_value() + 1;
        if end > start {
            map.push(entry(start, end - start, E820_RAM));
        }
    }
    map
}

/// Writes the zero page at [`ZERO_PAGE_START`].
pub fn write_boot_params(
    memory: &GuestRam,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(header) = kernel.setup_header {
        params.hdr = header;
    } else {
        params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    }
    params.hdr.boot_flag = BOOT_FLAG;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((at, size)) = initrd {
        params.hdr.ramdisk_image = at as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = rsdp;
    let map = e820_map(memory);
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = *entry;
    }
    params.e820_entries = map.len() as u8;
    memory.write_obj(params, GuestAddress(ZERO_PAGE_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_e820_map_leaves_out_the_ebda_and_reserves_acpi() {
        let memory = crate::vstate::memory::create(64 << 20).unwrap();
        let map = e820_map(&memory);
        let got: Vec<(u64, u64, u32)> = map.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            got,
            vec![
                (0, EBDA_START, E820_RAM),
                (RSDP_START, 0x20000, E820_RESERVED),
                (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM),
            ]
        );
    }

    #[test]
    fn a_command_line_too_long_or_with_a_nul_is_refused() {
        let memory = crate::vstate::memory::create(1 << 20).unwrap();
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            load_cmdline(&memory, &long),
            Err(BootError::CmdlineTooLong(_))
        ));
        assert!(matches!(
            load_cmdline(&memory, "a\0b"),
            Err(BootError::CmdlineNul)
        ));
        load_cmdline(&memory, "console=ttyS0").unwrap();
        let mut back = [0u8; 14];
        memory
            .read_slice(&mut back, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&back, b"console=ttyS0\0");
    }

    #[test]
    fn a_bzimage_loads_at_its_code32_start_entered_200_bytes_in() {
        let memory = crate::vstate::memory::create(4 << 20).unwrap();
        // One setup sector after the boot sector, then a 4 KiB "kernel".
        let mut image = vec![0u8; 2 * 512 + 4096];
        image[0x1f1] = 1; // setup_sects
        image[0x1fe..0x200].copy_from_slice(&BOOT_FLAG.to_le_bytes());
        image[0x202..0x206].copy_from_slice(&HDRS_MAGIC.to_le_bytes());
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
        image[0x211] = 1; // loadflags: LOADED_HIGH
        image[0x214..0x218].copy_from_slice(&0x0010_0000u32.to_le_bytes()); // code32_start
        image[0x22c..0x230].copy_from_slice(&0x0100_0000u32.to_le_bytes()); // initrd_addr_max
        image[1024..1028].copy_from_slice(b"KERN");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bzImage");
        std::fs::write(&path, &image).unwrap();
        let kernel = load_kernel(&memory, &mut File::open(&path).unwrap()).unwrap();
        assert_eq!(kernel.entry, 0x10_0200);
        assert_eq!(kernel.end, 0x10_0000 + 4096);
        let header = kernel.setup_header.unwrap();
        assert_eq!({ header.header }, HDRS_MAGIC);
        let mut start = [0u8; 4];
        memory
            .read_slice(&mut start, GuestAddress(0x10_0000))
            .unwrap();
        assert_eq!(&start, b"KERN");

        // The zero page carries its header, the command line and the RSDP.
        write_boot_params(&memory, &kernel, 12, None, RSDP_START).unwrap();
        let params: boot_params = memory.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ params.hdr.version }, 0x020f);
        assert_eq!({ params.hdr.type_of_loader }, LOADER_UNDEFINED);
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ params.acpi_rsdp_addr }, RSDP_START);

        // An initramfs goes below the kernel's initrd_addr_max, page aligned, after the kernel.
        let initrd = dir.path().join("initrd");
        std::fs::write(&initrd, vec![7u8; 10_000]).unwrap();
        let (at, size) = load_initrd(&memory, &kernel, &mut File::open(&initrd).unwrap()).unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(at % 0x1000, 0);
        assert!(at >= kernel.end && at + size <= 4 << 20, "{at:#x}");
        let big = dir.path().join("big");
        std::fs::write(&big, vec![0u8; 4 << 20]).unwrap();
        assert!(matches!(
            load_initrd(&memory, &kernel, &mut File::open(&big).unwrap()),
            Err(BootError::InitrdTooLarge(_))
        ));
    }

    #[test]
    fn garbage_is_neither_elf_nor_bzimage() {
        let memory = crate::vstate::memory::create(4 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let err = load_kernel(&memory, &mut File::open(&path).unwrap()).unwrap_err();
        assert!(matches!(err, BootError::Kernel { .. }), "{err}");
    }
}
