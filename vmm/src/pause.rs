//! Pausing a running VM: every vCPU and the device thread held still between two of their
//! steps, so that neither the guest nor a device touches guest memory until it is resumed.
//!
//! [`Pauser::pause`] raises a request on the shared [`PauseGate`]; each vCPU thread finds it
//! when it next leaves `KVM_RUN` (it is kicked out with [`kick_signal`], again and again
//! until it is parked, since a kick that lands just before `KVM_RUN` is lost), and the device
//! thread when the gate's eventfd wakes its epoll. A parked thread holds no device lock: it
//! parks only between one exit's handling and the next entry. `pause` returns once all have
//! parked; [`Pauser::resume`] releases them. The VM's end releases them too (the reaper ends
//! the gate before it joins anyone), and no thread is kicked after the gate has ended, so a
//! kick never reaches a thread that was joined.
//!
//! [`kick_signal`]: super::vstate::kick::kick_signal

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::exit::ExitSignal;
use super::vstate::kick::kick_signal;
use super::vstate::vcpu_snapshot::VcpuSnapshot;
use super::VmmError;

/// How long [`Pauser::pause`] waits for every thread to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a vCPU that has not parked is kicked again.
const KICK_INTERVAL: Duration = Duration::from_millis(2);

/// A parked vCPU's state, or why it could not be taken.
type SavedVcpu = Result<VcpuSnapshot, VmmError>;

#[derive(Debug, Default)]
struct GateState {
    /// A pause is asked for: threads park.
    paused: bool,
    /// Threads parked now.
    parked: usize,
    /// The VM is over: nobody parks, nobody is kicked.
    ended: bool,
    /// While a save collects the vCPUs' states: one slot per vCPU, filled by the vCPU's own
    /// thread (only it holds its fd).
    saving: Option<Vec<Option<SavedVcpu>>>,
}

/// Where the VM's threads park while it is paused.
#[derive(Debug)]
pub struct PauseGate {
    state: Mutex<GateState>,
    changed: Condvar,
    /// Written when a pause is asked for: wakes the device thread's epoll.
    wake: EventFd,
}

impl PauseGate {
    /// A gate that holds nobody, or, `paused`, one that parks every thread as it starts (a
    /// restored VM, until it is resumed).
    pub fn new(paused: bool) -> std::io::Result<Self> {
        Ok(PauseGate {
            state: Mutex::new(GateState {
                paused,
                ..GateState::default()
            }),
            changed: Condvar::new(),
            wake: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The eventfd the device thread watches (read it before [`PauseGate::park`]).
    pub fn eventfd(&self) -> &EventFd {
        &self.wake
    }

    /// Parks the calling thread while a pause is asked for and the VM has not ended. A vCPU
    /// thread passes its index and how to take its state, which it does when a save asks.
    pub fn park(&self, mut vcpu: Option<(usize, &mut dyn FnMut() -> SavedVcpu)>) {
        let mut state = self.lock();
        if !state.paused || state.ended {
            return;
        }
        state.parked += 1;
        self.changed.notify_all();
        while state.paused && !state.ended {
            let asked = match (&vcpu, &state.saving) {
                (Some((id, _)), Some(slots)) => slots.get(*id).is_some_and(Option::is_none),
                _ => false,
            };
            if let (true, Some((id, save))) = (asked, vcpu.as_mut()) {
                drop(state);
                let saved = save();
                state = self.lock();
                if let Some(slot) = state.saving.as_mut().and_then(|slots| slots.get_mut(*id)) {
                    *slot = Some(saved);
                }
                self.changed.notify_all();
                continue;
            }
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.parked -= 1;
        self.changed.notify_all();
    }

    /// Waits for a change on the gate, or [`KICK_INTERVAL`] (for whoever waits on the parked).
    fn wait_a_little<'a>(&self, state: MutexGuard<'a, GateState>) -> MutexGuard<'a, GateState> {
        self.changed
            .wait_timeout(state, KICK_INTERVAL)
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }

    /// The VM is over: parked threads go on (to their end), and nobody is kicked any more.
    pub fn end(&self) {
        self.lock().ended = true;
        self.changed.notify_all();
    }
}

/// Why a pause did not happen.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// The VM ended (before or while pausing).
    #[error("the VM has ended")]
    Ended,
    /// A thread did not park in time; the VM was resumed.
    #[error("{parked} of {threads} VM threads stopped within {PAUSE_TIMEOUT:?}; the VM runs on")]
    Timeout {
        /// Threads that parked.
        parked: usize,
        /// Threads that should have.
        threads: usize,
    },
    /// The VM's state was asked for while it runs.
    #[error("the VM is not paused")]
    NotPaused,
    /// A vCPU's state could not be taken.
    #[error("{0}")]
    Vcpu(Box<VmmError>),
    /// A vCPU's thread gave no state in time.
    #[error("vCPU {id} gave no state within {PAUSE_TIMEOUT:?}")]
    VcpuSilent {
        /// The vCPU.
        id: usize,
    },
}

/// Pauses and resumes one VM: its gate, the vCPU threads to kick, and its exit.
#[derive(Debug, Clone)]
pub struct Pauser {
    gate: Arc<PauseGate>,
    vcpus: Arc<Vec<libc::pthread_t>>,
    exit: Arc<ExitSignal>,
}

impl Pauser {
    /// A pauser of the VM whose vCPU threads are `vcpus` and whose device thread also parks
    /// at `gate`.
    pub fn new(gate: Arc<PauseGate>, vcpus: Vec<libc::pthread_t>, exit: Arc<ExitSignal>) -> Self {
        Pauser {
            gate,
            vcpus: Arc::new(vcpus),
            exit,
        }
    }

    /// Every vCPU thread and the device thread.
    fn threads(&self) -> usize {
        self.vcpus.len() + 1
    }

    /// Stops the VM's threads and returns once they have all stopped. Pausing a paused VM
    /// does nothing; a VM that does not stop within [`PAUSE_TIMEOUT`] is resumed.
    #[allow(unsafe_code)]
    pub fn pause(&self) -> Result<(), PauseError> {
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut state = self.gate.lock();
        state.paused = true;
        let _ = self.gate.wake.write(1);
        loop {
            if state.ended || self.exit.is_raised() {
                state.paused = false;
                self.gate.changed.notify_all();
                return Err(PauseError::Ended);
            }
            if state.parked == self.threads() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let parked = state.parked;
                state.paused = false;
                self.gate.changed.notify_all();
                return Err(PauseError::Timeout {
                    parked,
                    threads: self.threads(),
                });
            }
            // Still under the lock: the gate has not ended, so no vCPU thread has been
            // joined (the reaper ends the gate first, under this lock).
            for thread in self.vcpus.iter() {
                // SAFETY: `thread` is a vCPU thread of this VM that has not been joined (see
                // above), so its pthread_t is valid; the kick signal has a handler
                // (`install_kick_handler`, called before any vCPU thread starts).
                unsafe { libc::pthread_kill(*thread, kick_signal()) };
            }
            state = self.gate.wait_a_little(state);
        }
    }

    /// Every vCPU's state, taken by the vCPU threads of the paused VM (within
    /// [`PAUSE_TIMEOUT`]).
    pub fn vcpu_states(&self) -> Result<Vec<VcpuSnapshot>, PauseError> {
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut state = self.gate.lock();
        if state.ended || self.exit.is_raised() {
            return Err(PauseError::Ended);
        }
        if !state.paused || state.parked != self.threads() {
            return Err(PauseError::NotPaused);
        }
        state.saving = Some((0..self.vcpus.len()).map(|_| None).collect());
        self.gate.changed.notify_all();
        loop {
            let done = state
                .saving
                .as_ref()
                .is_some_and(|slots| slots.iter().all(Option::is_some));
            if done || state.ended || Instant::now() >= deadline {
                break;
            }
            state = self.gate.wait_a_little(state);
        }
        let slots = state.saving.take().unwrap_or_default();
        if state.ended {
            return Err(PauseError::Ended);
        }
        slots
            .into_iter()
            .enumerate()
            .map(|(id, slot)| match slot {
                Some(saved) => saved.map_err(|e| PauseError::Vcpu(Box::new(e))),
                None => Err(PauseError::VcpuSilent { id }),
            })
            .collect()
    }

    /// Lets the VM's threads run again; resuming a running VM does nothing.
    pub fn resume(&self) -> Result<(), PauseError> {
        let mut state = self.gate.lock();
        state.paused = false;
        self.gate.changed.notify_all();
        if state.ended || self.exit.is_raised() {
            return Err(PauseError::Ended);
        }
        Ok(())
    }
}
