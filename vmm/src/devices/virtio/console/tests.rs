//! virtio-console against a socketpair and queues built by hand.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_STATUS};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as W;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::devices::virtio::mmio::tests::{drive, read32, write32};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::test_support::{memory, TestQueue};
use crate::devices::IrqLine;

fn console(memory: &GuestRam) -> (MmioTransport, UnixStream) {
    let (device_end, host_end) = UnixStream::pair().unwrap();
    let irq = IrqLine::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let device = Console::new(device_end, None).unwrap();
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

fn control_message(memory: &GuestRam, at: u64, id: u32, event: u16, value: u16) {
    memory
        .write_slice(&control::message(id, event, value), GuestAddress(at))
        .unwrap();
}

fn read_message(memory: &GuestRam, at: u64, len: usize) -> (u32, u16, u16, Vec<u8>) {
    let mut raw = vec![0u8; len];
    memory.read_slice(&mut raw, GuestAddress(at)).unwrap();
    let id = u32::from_le_bytes(raw[..4].try_into().unwrap());
    let event = u16::from_le_bytes(raw[4..6].try_into().unwrap());
    let value = u16::from_le_bytes(raw[6..8].try_into().unwrap());
    (id, event, value, raw[8..].to_vec())
}

#[test]
fn a_named_console_announces_its_port_as_linux_expects() {
    let memory = memory();
    let (device_end, mut host) = UnixStream::pair().unwrap();
    let irq = IrqLine::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let device = Console::new(device_end, Some("mvm.agent")).unwrap();
    assert_eq!(device.features() & FEATURE_MULTIPORT, FEATURE_MULTIPORT);
    let mut config = [0u8; 4];
    device.read_config(4, &mut config);
    assert_eq!(u32::from_le_bytes(config), MAX_PORTS);
    let mut t = MmioTransport::new(Box::new(device), memory.clone(), irq);
    assert_eq!(t.queue_count(), 6);
    let mut queues: Vec<TestQueue> = (0..6)
        .map(|n| TestQueue::new(&memory, n * 0x1000))
        .collect();
    for i in 0..4 {
        queues[control::TO_DRIVER].add(&[(0x20_0000 + i * 0x100, 0x100, W)]);
    }
    {
        let all: Vec<(u32, &TestQueue)> = queues
            .iter()
            .enumerate()
            .map(|(n, q)| (n as u32, q))
            .collect();
        drive(&mut t, &all);
    }

    control_message(&memory, 0x10_0000, 0, control::DEVICE_READY, 1);
    queues[control::FROM_DRIVER].add(&[(0x10_0000, 8, 0)]);
    write32(
        &mut t,
        VIRTIO_MMIO_QUEUE_NOTIFY,
        control::FROM_DRIVER as u32,
    );
    assert_eq!(queues[control::TO_DRIVER].used(0).1, 8);
    assert_eq!(
        read_message(&memory, 0x20_0000, 8),
        (1, control::PORT_ADD, 0, vec![])
    );

    control_message(&memory, 0x10_0100, 1, control::PORT_READY, 1);
    queues[control::FROM_DRIVER].add(&[(0x10_0100, 8, 0)]);
    write32(
        &mut t,
        VIRTIO_MMIO_QUEUE_NOTIFY,
        control::FROM_DRIVER as u32,
    );
    assert_eq!(queues[control::TO_DRIVER].used_idx(), 3);
    assert_eq!(
        read_message(&memory, 0x20_0100, 8 + 9),
        (1, control::PORT_NAME, 1, b"mvm.agent".to_vec())
    );
    assert_eq!(
        read_message(&memory, 0x20_0200, 8),
        (1, control::PORT_OPEN, 1, vec![])
    );

    // Host bytes wait for the guest to open the port: Linux drops what comes before.
    host.write_all(b"early").unwrap();
    queues[4].add(&[(0x31_0000, 64, W)]);
    write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 4);
    t.handle(DeviceEvent::Host);
    assert_eq!(
        queues[4].used_idx(),
        0,
        "host bytes before the guest opened"
    );
    assert!(!t.host_interest().read, "the socket is not watched yet");
    let open = |t: &mut MmioTransport, queues: &mut [TestQueue], at: u64, value: u16| {
        control_message(&memory, at, 1, control::PORT_OPEN, value);
        queues[control::FROM_DRIVER].add(&[(at, 8, 0)]);
        write32(t, VIRTIO_MMIO_QUEUE_NOTIFY, control::FROM_DRIVER as u32);
    };
    open(&mut t, &mut queues, 0x10_0200, 1);
    assert_eq!(queues[4].used(0).1, 5);
    let mut early = [0u8; 5];
    memory
        .read_slice(&mut early, GuestAddress(0x31_0000))
        .unwrap();
    assert_eq!(&early, b"early");

    // Port 1's queues carry the socket's bytes.
    memory
        .write_slice(b"hello", GuestAddress(0x30_0000))
        .unwrap();
    queues[5].add(&[(0x30_0000, 5, 0)]);
    write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 5);
    assert_eq!(host_read(&mut host), b"hello");
    host.write_all(b"back").unwrap();
    queues[4].add(&[(0x32_0000, 64, W)]);
    write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 4);
    assert_eq!(queues[4].used(1).1, 4);

    // Closed by the guest: host bytes wait again.
    open(&mut t, &mut queues, 0x10_0300, 0);
    host.write_all(b"late").unwrap();
    queues[4].add(&[(0x33_0000, 64, W)]);
    write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 4);
    t.handle(DeviceEvent::Host);
    assert_eq!(queues[4].used_idx(), 2, "host bytes after the guest closed");
    // Nothing went through port 0's queues.
    assert_eq!(queues[0].used_idx() + queues[1].used_idx(), 0);
}

#[test]
fn a_flood_of_control_messages_is_bounded_and_short_ones_ignored() {
    let memory = memory();
    let (device_end, _host) = UnixStream::pair().unwrap();
    let irq = IrqLine::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let device = Console::new(device_end, Some("mvm.agent")).unwrap();
    let mut t = MmioTransport::new(Box::new(device), memory.clone(), irq);
    let mut queues: Vec<TestQueue> = (0..6)
        .map(|n| TestQueue::new(&memory, n * 0x1000))
        .collect();
    {
        let all: Vec<(u32, &TestQueue)> = queues
            .iter()
            .enumerate()
            .map(|(n, q)| (n as u32, q))
            .collect();
        drive(&mut t, &all);
    }
    control_message(&memory, 0x10_0000, 0, control::DEVICE_READY, 1);
    for round in 1..=4u16 {
        for _ in 0..15 {
            queues[control::FROM_DRIVER].add(&[(0x10_0000, 8, 0)]);
        }
        queues[control::FROM_DRIVER].add(&[(0x10_0000, 4, 0)]); // too short: ignored
        write32(
            &mut t,
            VIRTIO_MMIO_QUEUE_NOTIFY,
            control::FROM_DRIVER as u32,
        );
        assert_eq!(queues[control::FROM_DRIVER].used_idx(), 16 * round);
    }
    // 60 DEVICE_READYs, but only OUTBOX_LIMIT answers wait for buffers.
    for i in 0..16 {
        queues[control::TO_DRIVER].add(&[(0x20_0000 + i * 0x100, 0x100, W)]);
    }
    write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, control::TO_DRIVER as u32);
    assert_eq!(
        queues[control::TO_DRIVER].used_idx(),
        control::OUTBOX_LIMIT as u16
    );
    queues[control::TO_DRIVER].add(&[(0x20_0000, 0x100, W)]);
    write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, control::TO_DRIVER as u32);
    assert_eq!(
        queues[control::TO_DRIVER].used_idx(),
        control::OUTBOX_LIMIT as u16
    );
    assert_eq!(
        read32(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
        0
    );
}
