//! virtio-console against a socketpair and queues built by hand.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_STATUS};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as W;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::vmm::devices::virtio::mmio::tests::{drive, read32, write32};
use crate::vmm::devices::virtio::mmio::MmioTransport;
use crate::vmm::devices::virtio::test_support::{memory, TestQueue};
use crate::vmm::devices::IrqLine;

fn console(memory: &GuestRam) -> (MmioTransport, UnixStream) {
    let (device_end, host_end) = UnixStream::pair().unwrap();
    let irq = IrqLine::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let device = Console::new(device_end).unwrap();
    (
        MmioTransport::new(Box::new(device), memory.clone(), irq),
        host_end,
    )
}

fn host_read(host: &mut UnixStream) -> Vec<u8> {
    host.set_nonblocking(true).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    while let Ok(n) = host.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

#[test]
fn bytes_go_both_ways() {
    let memory = memory();
    let (mut t, mut host) = console(&memory);
    let mut rx = TestQueue::new(&memory, 0);
    let mut tx = TestQueue::new(&memory, 0x1000);
    memory
        .write_slice(b"hello ", GuestAddress(0x10_0000))
        .unwrap();
    memory
        .write_slice(b"host", GuestAddress(0x10_1000))
        .unwrap();
    tx.add(&[(0x10_0000, 6, 0), (0x10_1000, 4, 0)]);
    drive(&mut t, &[(0, &rx), (1, &tx)]);
    write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    assert_eq!(tx.used_idx(), 1);
    assert_eq!(host_read(&mut host), b"hello host");

    // Host input waits for a receive buffer, then fills it.
    host.write_all(b"from the host").unwrap();
    t.handle(DeviceEvent::Host);
    assert_eq!(rx.used_idx(), 0);
    assert!(
        !t.host_interest().read,
        "no buffers: the socket is not watched"
    );
    rx.add(&[(0x20_0000, 8, W), (0x20_1000, 64, W)]);
    assert!(t.host_interest().read);
    write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(rx.used(0), (0, 13));
    let mut got = [0u8; 13];
    memory
        .read_slice(&mut got[..8], GuestAddress(0x20_0000))
        .unwrap();
    memory
        .read_slice(&mut got[8..], GuestAddress(0x20_1000))
        .unwrap();
    assert_eq!(&got, b"from the host");
}

#[test]
fn a_host_that_does_not_read_stops_the_guest_not_the_vmm() {
    let memory = memory();
    let (mut t, mut host) = console(&memory);
    let rx = TestQueue::new(&memory, 0);
    let mut tx = TestQueue::new(&memory, 0x1000);
    // 15 chains of 64 KiB: more than the socket buffer and the pending limit hold.
    for i in 0..15u64 {
        tx.add(&[(0x10_0000 + i * 0x1_0000, 0x1_0000, 0)]);
    }
    drive(&mut t, &[(0, &rx), (1, &tx)]);
    write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    let taken = tx.used_idx();
    assert!(taken < 15, "the device stopped taking output ({taken})");
    assert!(
        t.host_interest().write,
        "and waits for the host to make room"
    );
    let mut total = 0;
    for _ in 0..20 {
        total += host_read(&mut host).len();
        t.handle(DeviceEvent::Host);
    }
    total += host_read(&mut host).len();
    assert_eq!(tx.used_idx(), 15);
    assert_eq!(total, 15 * 0x1_0000);
    assert!(!t.host_interest().write);
}

#[test]
fn hostile_buffers_and_a_vanished_host_are_survived() {
    let memory = memory();
    let (mut t, host) = console(&memory);
    let mut rx = TestQueue::new(&memory, 0);
    let mut tx = TestQueue::new(&memory, 0x1000);
    tx.add(&[
        (0xffff_0000, 64, 0),
        (u64::MAX - 8, 64, 0),
        (0x10_0000, 0, 0),
    ]);
    rx.add(&[(0xffff_0000, 64, W), (0x10_0000, 4, 0)]);
    drive(&mut t, &[(0, &rx), (1, &tx)]);
    write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    assert_eq!(tx.used_idx(), 1);
    drop(host);
    tx.add(&[(0x10_0000, 64, 0)]);
    write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(
        tx.used_idx(),
        2,
        "output to a closed host is dropped, not stuck"
    );
    assert_eq!(rx.used_idx(), 0, "a closed host gives no input");
    assert_eq!(t.host_interest(), HostInterest::default());
    assert_eq!(
        read32(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
        0
    );
}
