//! The VMM's one device thread: an epoll loop over the virtqueues' ioeventfds, the devices'
//! host-side descriptors and the VM's exit eventfd.
//!
//! A queue notification is a guest write that KVM turns into an eventfd signal without
//! leaving the kernel; the loop hands it to the device's transport. A device's host
//! descriptor (the console's socket) is watched only for what the device waits for — input
//! while the driver has posted receive buffers, output room while it holds unsent bytes — so
//! a guest that posts no buffers, or a host that reads nothing, cannot make the loop spin. While
//! the VM is paused the loop parks at its [`PauseGate`]; it ends when the VM's [`ExitSignal`]
//! is raised.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use seccompiler::BpfProgram;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::DeviceEvent;
use crate::exit::ExitSignal;
use crate::pause::PauseGate;
use crate::seccomp;
use crate::VmmError;

/// What an epoll token stands for.
#[derive(Debug)]
enum Source {
    Exit,
    Pause,
    Queue {
        device: usize,
        queue: usize,
        evt: EventFd,
    },
    Host {
        device: usize,
        fd: RawFd,
    },
}

/// The loop, before it runs.
#[derive(Debug)]
pub struct EventLoop {
    epoll: Epoll,
    sources: Vec<Source>,
    devices: Vec<Arc<Mutex<MmioTransport>>>,
    exit: Arc<ExitSignal>,
    gate: Arc<PauseGate>,
    /// What each source is registered with epoll for now.
    host_armed: Vec<EventSet>,
}

impl EventLoop {
    /// A loop that ends when `exit` is raised and parks at `gate` while the VM is paused.
    pub fn new(exit: Arc<ExitSignal>, gate: Arc<PauseGate>) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        let mut events = EventLoop {
            epoll,
            sources: Vec::new(),
            devices: Vec::new(),
            exit,
            gate,
            host_armed: Vec::new(),
        };
        let fd = events.exit.eventfd().as_raw_fd();
        events.watch(fd, Source::Exit)?;
        let fd = events.gate.eventfd().as_raw_fd();
        events.watch(fd, Source::Pause)?;
        Ok(events)
    }

    fn watch(&mut self, fd: RawFd, source: Source) -> std::io::Result<()> {
        let token = self.sources.len() as u64;
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )?;
        self.sources.push(source);
        self.host_armed.push(EventSet::IN);
        Ok(())
    }

    /// Adds a device whose queue `n` is notified through `queue_events[n]`.
    pub fn add_device(
        &mut self,
        transport: Arc<Mutex<MmioTransport>>,
        queue_events: Vec<EventFd>,
    ) -> std::io::Result<()> {
        let device = self.devices.len();
        for (queue, evt) in queue_events.into_iter().enumerate() {
            let fd = evt.as_raw_fd();
            self.watch(fd, Source::Queue { device, queue, evt })?;
        }
        let host = lock(&transport).device().host_fd().map(|fd| fd.as_raw_fd());
        if let Some(fd) = host {
            // The device owns the descriptor and lives as long as this loop holds it. Not
            // watched until the device asks (see `rearm_hosts`).
            self.sources.push(Source::Host { device, fd });
            self.host_armed.push(EventSet::empty());
        }
        self.devices.push(transport);
        Ok(())
    }

    /// Runs on a thread of its own, filtered by `program`, until the VM's exit is raised.
    pub fn spawn(mut self, program: BpfProgram) -> Result<JoinHandle<()>, VmmError> {
        seccomp::spawn_filtered("vmm-events".into(), program, move || self.run())
    }

    fn run(&mut self) {
        let mut events = vec![EpollEvent::default(); 32];
        self.rearm_hosts();
        while !self.exit.is_raised() {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            for event in &events[..n] {
                match self.sources.get(event.data() as usize) {
                    Some(Source::Exit) | None => return,
                    Some(Source::Pause) => {
                        let _ = self.gate.eventfd().read();
                        // No host input reaches the guest while it is paused.
                        self.gate.park(None);
                    }
                    Some(Source::Queue { device, queue, evt }) => {
                        let _ = evt.read();
                        lock(&self.devices[*device]).handle(DeviceEvent::Queue(*queue));
                    }
                    Some(Source::Host { device, .. }) => {
                        lock(&self.devices[*device]).handle(DeviceEvent::Host);
                    }
                }
            }
            self.rearm_hosts();
        }
    }

    /// Watches each host descriptor for exactly what its device waits for.
    fn rearm_hosts(&mut self) {
        for (token, source) in self.sources.iter().enumerate() {
            let Source::Host { device, fd } = source else {
                continue;
            };
            let interest = lock(&self.devices[*device]).host_interest();
            let mut events = EventSet::empty();
            if interest.read {
                events |= EventSet::IN;
            }
            if interest.write {
                events |= EventSet::OUT;
            }
            if events == self.host_armed[token] {
                continue;
            }
            // Removed rather than masked when nothing is wanted: epoll reports a hang-up even
            // with no events asked for, and a closed peer would keep the loop spinning.
            let operation = if events.is_empty() {
                ControlOperation::Delete
            } else if self.host_armed[token].is_empty() {
                ControlOperation::Add
            } else {
                ControlOperation::Modify
            };
            if self
                .epoll
                .ctl(operation, *fd, EpollEvent::new(events, token as u64))
                .is_ok()
            {
                self.host_armed[token] = events;
            }
        }
    }
}

fn lock(device: &Mutex<MmioTransport>) -> std::sync::MutexGuard<'_, MmioTransport> {
    device.lock().unwrap_or_else(PoisonError::into_inner)
}
