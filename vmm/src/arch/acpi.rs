//! The ACPI tables that tell a guest what this machine has, written by the `acpi_tables` crate.
//!
//! A hardware-reduced platform: no PM timer, no GPE blocks, no SCI. The FADT names byte-wide
//! port registers for sleep control/status and reset ([`super::layout`]); the MADT lists one
//! local APIC per vCPU and the IOAPIC; the DSDT describes COM1, the soft-off state `_S5_` and
//! every virtio-mmio device (`_HID "LNRO0005"`, a 4 KiB window and an edge, active-high GSI),
//! the only way the Debian kernel finds virtio-mmio devices (it lacks the cmdline method).
//!
//! Tables are placed from [`RSDP_START`] up, RSDP first, each 16-byte aligned; they must end
//! before [`ACPI_END`], a range the e820 map marks reserved.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress};

use super::layout::*;
use crate::vstate::memory::GuestRam;

/// The OEM id in every table.
const OEM_ID: [u8; 6] = *b"MVM   ";

/// What the ACPI tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiLayout {
    /// How many vCPUs (local APIC ids 0..n).
    pub vcpus: u8,
    /// How many virtio-mmio devices, in windows 0..n.
    pub virtio_devices: usize,
}

/// Why the tables could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit below 1 MiB.
    #[error("the ACPI tables need {0} bytes, more than the area below 1 MiB holds")]
    TooLarge(u64),
    /// Guest memory refused a write.
    #[error("writing the ACPI tables: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Serializes an AML object or table.
fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    table.to_aml_bytes(&mut out);
    out
}

/// Serializes a device named `name` with `children`.
fn device(name: &str, children: &[&dyn Aml]) -> Vec<u8> {
    bytes(&aml::Device::new(name.into(), children.to_vec()))
}

/// The DSDT's body: COM1, `_S5_`, and the virtio-mmio devices.
fn dsdt(layout: &AcpiLayout) -> Vec<u8> {
    let mut sb = Vec::new();
    let io = aml::IO::new(SERIAL_PORT, SERIAL_PORT, 1, 8);
    let irq = aml::Interrupt::new(true, true, false, false, SERIAL_GSI);
    let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
    let hid = aml::EISAName::new("PNP0501");
    sb.extend(device(
        "COM1",
        &[
            &aml::Name::new("_HID".into(), &hid),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    ));
    for n in 0..layout.virtio_devices {
        let window =
            aml::Memory32Fixed::new(true, virtio_mmio_base(n) as u32, VIRTIO_MMIO_SIZE as u32);
        let irq = aml::Interrupt::new(true, true, false, false, virtio_gsi(n));
        let crs = aml::ResourceTemplate::new(vec![&window, &irq]);
        let uid = n as u32;
        sb.extend(device(
            &format!("VR{n:02X}"),
            &[
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &uid),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        ));
    }
    let mut body = aml::Scope::raw("\\_SB_".into(), sb);
    let s5_type = ACPI_S5_SLEEP_TYPE;
    body.extend(bytes(&aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&s5_type, &aml::ZERO]),
    )));
    body
}

/// A byte-wide system I/O register at `port`.
fn port_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        port.into(),
    )
}

/// Builds every table and writes them into guest memory; returns the RSDP's address.
pub fn write_tables(memory: &GuestRam, layout: &AcpiLayout) -> Result<u64, AcpiError> {
    let mut tables: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut next = RSDP_START + Rsdp::len() as u64;
    let mut place = |data: Vec<u8>, tables: &mut Vec<(u64, Vec<u8>)>| -> u64 {
        let at = next.next_multiple_of(16);
        next = at + data.len() as u64;
        tables.push((at, data));
        at
    };

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"MVMDSDT ", 1);
    dsdt.append_slice(&self::dsdt(layout));
    let dsdt_at = place(dsdt.as_slice().to_vec(), &mut tables);

    let mut fadt = FADTBuilder::new(OEM_ID, *b"MVMFACP ", 1)
        .dsdt_64(dsdt_at)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    fadt.reset_reg = port_register(ACPI_RESET_PORT);
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.sleep_control_reg = port_register(ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = port_register(ACPI_SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"mvm\0\0\0\0\0").into();
    let fadt_at = place(bytes(&fadt.finalize()), &mut tables);

    let mut madt = MADT::new(
        OEM_ID,
        *b"MVMAPIC ",
        1,
        LocalInterruptController::Address(LAPIC_START as u32),
    );
    for id in 0..layout.vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    let madt_at = place(bytes(&madt), &mut tables);

    let mut xsdt = XSDT::new(OEM_ID, *b"MVMXSDT ", 1);
    xsdt.add_entry(fadt_at);
    xsdt.add_entry(madt_at);
    let xsdt_at = place(bytes(&xsdt), &mut tables);

    if next > ACPI_END {
        return Err(AcpiError::TooLarge(next - RSDP_START));
    }
    memory.write_slice(
        &bytes(&Rsdp::new(OEM_ID, xsdt_at)),
        GuestAddress(RSDP_START),
    )?;
    for (at, data) in tables {
        memory.write_slice(&data, GuestAddress(at))?;
    }
    Ok(RSDP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(memory: &GuestRam, at: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        memory.read_slice(&mut out, GuestAddress(at)).unwrap();
        out
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// Reads a whole table at `at`, checking its checksum.
    fn table(memory: &GuestRam, at: u64) -> Vec<u8> {
        let header = read(memory, at, 36);
        let table = read(memory, at, u32_at(&header, 4) as usize);
        assert_eq!(
            table.iter().fold(0u8, |a, b| a.wrapping_add(*b)),
            0,
            "checksum"
        );
        table
    }

    #[test]
    fn an_os_finds_the_devices_from_the_rsdp() {
        let memory = crate::vstate::memory::create(2 << 20).unwrap();
        let layout = AcpiLayout {
            vcpus: 2,
            virtio_devices: 3,
        };
        assert_eq!(write_tables(&memory, &layout).unwrap(), RSDP_START);

        let rsdp = read(&memory, RSDP_START, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp[..20].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let xsdt = table(&memory, u64_at(&rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(&xsdt, o))
            .collect();
        let tables: Vec<Vec<u8>> = entries.iter().map(|&at| table(&memory, at)).collect();
        let fadt = tables.iter().find(|t| &t[..4] == b"FACP").unwrap();
        let madt = tables.iter().find(|t| &t[..4] == b"APIC").unwrap();

        let flags = u32_at(fadt, 112);
        assert_ne!(flags & Flags::HwReducedAcpi as u32, 0);
        assert_ne!(flags & Flags::ResetRegSup as u32, 0);
        // RESET_REG at 116 (GAS: space, width, offset, access, address), value at 128.
        assert_eq!(fadt[116], 1);
        assert_eq!(u64_at(fadt, 120), ACPI_RESET_PORT as u64);
        assert_eq!(fadt[128], ACPI_RESET_VALUE);
        // SLEEP_CONTROL_REG at 244, SLEEP_STATUS_REG at 256.
        assert_eq!(u64_at(fadt, 248), ACPI_SLEEP_CONTROL_PORT as u64);
        assert_eq!(u64_at(fadt, 260), ACPI_SLEEP_STATUS_PORT as u64);

        // MADT: two local APICs (type 0) and one IOAPIC (type 1).
        let mut types = Vec::new();
        let mut at = 44;
        while at < madt.len() {
            types.push(madt[at]);
            at += madt[at + 1] as usize;
        }
        assert_eq!(types, vec![0, 0, 1]);

        let dsdt = table(&memory, u64_at(fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        let hits = dsdt.windows(8).filter(|w| w == b"LNRO0005").count();
        assert_eq!(hits, 3);
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        // The third device's window and GSI are in its _CRS.
        let base = (virtio_mmio_base(2) as u32).to_le_bytes();
        assert!(dsdt.windows(4).any(|w| w == base));
    }
}
