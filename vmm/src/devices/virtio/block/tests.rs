//! virtio-blk against guest memory and queues built by hand, as a hostile driver would.

use std::io::Write;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_STATUS};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::devices::virtio::mmio::tests::{drive, read32, write32};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::test_support::{memory, TestQueue};
use crate::devices::IrqLine;

const W: u32 = VRING_DESC_F_WRITE;
const HEADER: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const SECTORS: u64 = 8;

struct Rig {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    memory: GuestRam,
}

/// A disk of 8 sectors, sector n filled with byte n.
fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let mut file = File::create(&path).unwrap();
    for n in 0..SECTORS {
        file.write_all(&[n as u8; SECTOR_SIZE as usize]).unwrap();
    }
    Rig {
        _dir: dir,
        path,
        memory: memory(),
    }
}

/// The disk on `path`, opened as the VMM's builder opens one.
fn open(path: &std::path::Path, read_only: bool, id: &str) -> Block {
    let disk = crate::BlockConfig::open(path, read_only, id).unwrap();
    Block::new(disk.file, disk.read_only, &disk.id).unwrap()
}

impl Rig {
    fn transport(&self, read_only: bool) -> MmioTransport {
        let disk = open(&self.path, read_only, "mvm-test-disk");
        let irq = IrqLine::new(EventFd::new(EFD_NONBLOCK).unwrap());
        MmioTransport::new(Box::new(disk), self.memory.clone(), irq)
    }

    fn header(&self, kind: u32, sector: u64) {
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&kind.to_le_bytes());
        raw[8..].copy_from_slice(&sector.to_le_bytes());
        self.memory.write_slice(&raw, GuestAddress(HEADER)).unwrap();
        self.memory.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    }

    fn status(&self) -> u8 {
        self.memory.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn file(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

/// Submits one chain on a fresh device; returns (status byte, used length, transport).
fn submit(
    rig: &Rig,
    read_only: bool,
    kind: u32,
    sector: u64,
    descs: &[(u64, u32, u32)],
) -> (u8, u32, MmioTransport) {
    let mut t = rig.transport(read_only);
    let mut q = TestQueue::new(&rig.memory, 0);
    rig.header(kind, sector);
    q.add(descs);
    drive(&mut t, &[(0, &q)]);
    write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(q.used_idx(), 1, "the request was returned");
    (rig.status(), q.used(0).1, t)
}

fn read_request(len: u32) -> Vec<(u64, u32, u32)> {
    vec![(HEADER, 16, 0), (DATA, len, W), (STATUS, 1, W)]
}

#[test]
fn reads_a_sector_and_reports_what_it_wrote() {
    let rig = rig();
    let (status, used, _) = submit(&rig, true, VIRTIO_BLK_T_IN, 3, &read_request(1024));
    assert_eq!((status, used), (VIRTIO_BLK_S_OK as u8, 1025));
    let mut data = vec![0u8; 1024];
    rig.memory
        .read_slice(&mut data, GuestAddress(DATA))
        .unwrap();
    assert!(data[..512].iter().all(|&b| b == 3));
    assert!(data[512..].iter().all(|&b| b == 4));
}

#[test]
fn writes_and_flushes_a_read_write_disk() {
    let rig = rig();
    rig.memory
        .write_slice(&[0xab; 512], GuestAddress(DATA))
        .unwrap();
    let req = vec![(HEADER, 16, 0), (DATA, 512, 0), (STATUS, 1, W)];
    let (status, used, _) = submit(&rig, false, VIRTIO_BLK_T_OUT, 7, &req);
    assert_eq!((status, used), (VIRTIO_BLK_S_OK as u8, 1));
    assert!(rig.file()[7 * 512..].iter().all(|&b| b == 0xab));
    let (status, _, _) = submit(
        &rig,
        false,
        VIRTIO_BLK_T_FLUSH,
        0,
        &[(HEADER, 16, 0), (STATUS, 1, W)],
    );
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
}

#[test]
fn a_read_only_disk_refuses_writes_and_says_so_in_its_features() {
    let rig = rig();
    let before = rig.file();
    let req = vec![(HEADER, 16, 0), (DATA, 512, 0), (STATUS, 1, W)];
    let (status, used, t) = submit(&rig, true, VIRTIO_BLK_T_OUT, 0, &req);
    assert_eq!((status, used), (VIRTIO_BLK_S_IOERR as u8, 1));
    assert_eq!(rig.file(), before);
    assert_ne!(t.device().features() & (1 << VIRTIO_BLK_F_RO), 0);
    // Flush on a read-only disk is a harmless success.
    let (status, _, _) = submit(
        &rig,
        true,
        VIRTIO_BLK_T_FLUSH,
        0,
        &[(HEADER, 16, 0), (STATUS, 1, W)],
    );
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
}

#[test]
fn out_of_range_sectors_and_sizes_are_io_errors() {
    let rig = rig();
    for (sector, len) in [
        (SECTORS, 512),        // one past the end
        (SECTORS - 1, 1024),   // straddles the end
        (u64::MAX / 512, 512), // offset overflows
        (u64::MAX, 512),       // sector * 512 overflows
        (0, 100),              // not whole sectors
        (0, 0xffff_fe00),      // oversize: beyond the disk and guest memory
    ] {
        let (status, used, _) = submit(&rig, true, VIRTIO_BLK_T_IN, sector, &read_request(len));
        assert_eq!(
            (status, used),
            (VIRTIO_BLK_S_IOERR as u8, 1),
            "sector {sector} len {len}"
        );
    }
}

#[test]
fn a_chain_longer_than_4_gib_is_cut_and_returned_unanswered() {
    let rig = rig();
    let (status, used, _) = submit(&rig, true, VIRTIO_BLK_T_IN, 0, &read_request(u32::MAX));
    assert_eq!((status, used), (0xee, 0));
}

#[test]
fn buffers_outside_guest_memory_or_in_the_wrong_direction_are_io_errors() {
    let rig = rig();
    let cases: Vec<Vec<(u64, u32, u32)>> = vec![
        vec![(HEADER, 16, 0), (0xffff_ff00, 512, W), (STATUS, 1, W)], // data beyond RAM
        vec![(HEADER, 16, 0), ((16 << 20) - 256, 512, W), (STATUS, 1, W)], // straddles RAM's end
        vec![(HEADER, 16, 0), (DATA, 512, 0), (STATUS, 1, W)],        // read into RO buffer
        vec![(HEADER, 16, W), (DATA, 512, W), (STATUS, 1, W)],        // writable header
        vec![(HEADER, 8, 0), (DATA, 512, W), (STATUS, 1, W)],         // short header
        vec![(u64::MAX - 4, 16, 0), (DATA, 512, W), (STATUS, 1, W)],  // header wraps
        vec![(STATUS, 1, W)],                                         // no header
    ];
    for descs in cases {
        let (status, used, _) = submit(&rig, true, VIRTIO_BLK_T_IN, 0, &descs);
        assert_eq!((status, used), (VIRTIO_BLK_S_IOERR as u8, 1), "{descs:x?}");
    }
}

#[test]
fn a_request_with_no_usable_status_byte_is_returned_empty() {
    let rig = rig();
    for status in [(STATUS, 1, 0), (STATUS, 0, W), (0xffff_ffff_f000, 1, W)] {
        let descs = vec![(HEADER, 16, 0), (DATA, 512, W), status];
        let (byte, used, _) = submit(&rig, true, VIRTIO_BLK_T_IN, 0, &descs);
        assert_eq!((byte, used), (0xee, 0), "{status:x?}");
    }
}

#[test]
fn unknown_types_are_unsupported_and_get_id_answers() {
    let rig = rig();
    let (status, _, _) = submit(&rig, true, VIRTIO_BLK_T_DISCARD, 0, &read_request(512));
    assert_eq!(status, VIRTIO_BLK_S_UNSUPP as u8);
    let (status, used, _) = submit(&rig, true, VIRTIO_BLK_T_GET_ID, 0, &read_request(20));
    assert_eq!((status, used), (VIRTIO_BLK_S_OK as u8, 21));
    let mut id = [0u8; 13];
    rig.memory.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"mvm-test-disk");
}

#[test]
fn a_descriptor_loop_ends_and_the_device_goes_on() {
    let rig = rig();
    let mut t = rig.transport(true);
    let q = TestQueue::new(&rig.memory, 0);
    rig.header(VIRTIO_BLK_T_IN, 0);
    // 0 -> 1 -> 2 -> 1 -> 2 ...: never ends by itself.
    q.write_desc(0, HEADER, 16, VRING_DESC_F_NEXT, 1);
    q.write_desc(1, DATA, 512, W | VRING_DESC_F_NEXT, 2);
    q.write_desc(2, STATUS, 1, W | VRING_DESC_F_NEXT, 1);
    q.publish(0);
    drive(&mut t, &[(0, &q)]);
    write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(q.used_idx(), 1);
    // The chain was cut at 16 descriptors; whatever it ended on, the device answered and is
    // still usable.
    assert_eq!(
        read32(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
        0
    );
}

#[test]
fn a_head_index_beyond_the_queue_puts_the_device_in_needs_reset() {
    let rig = rig();
    let mut t = rig.transport(true);
    let q = TestQueue::new(&rig.memory, 0);
    q.publish(200);
    drive(&mut t, &[(0, &q)]);
    write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_ne!(
        read32(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
        0
    );
    // Further notifications do nothing until the driver resets the device.
    write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(q.used_idx(), 0);
}

#[test]
fn the_config_space_holds_the_capacity() {
    let rig = rig();
    let disk = open(&rig.path, true, "x");
    let mut cap = [0u8; 8];
    disk.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), SECTORS);
    let mut beyond = [0xffu8; 4];
    disk.read_config(u64::MAX, &mut beyond);
    assert_eq!(beyond, [0; 4]);
}
