//! How a VM ends: the first [`GuestExit`] recorded wins, and the recording wakes whoever waits
//! (an eventfd, so an epoll loop can wait on it too) and tells the vCPU threads to stop.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rustix::event::EventfdFlags;

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest wrote soft-off (S5) to the ACPI sleep control register.
    PowerOff,
    /// The guest asked for a reset (ACPI reset register or the i8042's pulse); a microVM
    /// does not reboot, so this ends it too.
    Reset,
    /// The vCPU hit a triple fault (`KVM_EXIT_SHUTDOWN`).
    TripleFault,
    /// KVM could not run the vCPU any more.
    Failed(String),
    /// The host stopped it.
    Stopped,
}

/// The shared "this VM is over" flag.
#[derive(Debug)]
pub struct ExitSignal {
    stopping: AtomicBool,
    reason: Mutex<Option<GuestExit>>,
    evt: OwnedFd,
}

impl ExitSignal {
    /// A signal nobody has raised.
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            stopping: AtomicBool::new(false),
            reason: Mutex::new(None),
            evt: rustix::event::eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)?,
        })
    }

    /// Records `exit` unless another came first, and wakes the waiters.
    pub fn raise(&self, exit: GuestExit) {
        let mut reason = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
        if reason.is_none() {
            *reason = Some(exit);
        }
        self.stopping.store(true, Ordering::SeqCst);
        let _ = rustix::io::write(&self.evt, &1u64.to_ne_bytes());
    }

    /// Whether the VM is stopping.
    pub fn is_raised(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// The first recorded reason.
    pub fn reason(&self) -> Option<GuestExit> {
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The eventfd written on every raise, for an epoll loop to watch.
    pub fn eventfd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.evt)
    }

    /// Waits up to `timeout` for a raise; returns the reason if there was one.
    pub fn wait(&self, timeout: Duration) -> Option<GuestExit> {
        let mut fds = [rustix::event::PollFd::new(
            &self.evt,
            rustix::event::PollFlags::IN,
        )];
        let deadline = std::time::Instant::now() + timeout;
        while !self.is_raised() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            let ts = rustix::event::Timespec::try_from(left).unwrap_or(rustix::event::Timespec {
                tv_sec: 1,
                tv_nsec: 0,
            });
            let _ = rustix::event::poll(&mut fds, Some(&ts));
        }
        self.reason()
    }
}
