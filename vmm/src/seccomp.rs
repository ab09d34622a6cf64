//! The syscalls each of the VMM's threads may make once the guest runs — every allow-list in
//! this one file, to be reviewed as a list.
//!
//! Setup (opening `/dev/kvm`, mapping guest RAM, creating vCPUs, eventfds, files) happens on
//! the thread that calls [`build`](super::build), before any filter. Each thread the VMM
//! starts then installs the filter of its [`ThreadKind`] as its first act, before a vCPU runs
//! the guest's first instruction, and reports it back to `build`, which fails (VMM009) rather
//! than run a guest on an unfiltered thread. A syscall not on the list, or a listed one with
//! arguments outside its conditions, kills the whole process (`SECCOMP_RET_KILL_PROCESS`):
//! a VMM thread doing something unexpected is taken to be compromised.
//!
//! What the lists hold, beyond each thread's own work, is what Rust's standard library and
//! glibc need on any thread: `futex` (locks, joins), the allocator's `mmap`/`mprotect` (never
//! executable) / `munmap`/`madvise`, and a thread's end (`sigaltstack`, `rt_sigprocmask`,
//! `exit`). The lists were found by tracing (`strace -f`) the VMM's threads while the test
//! guests of `runner/tests/vmm_{boot,virtio}.rs` used every device and were stopped every
//! way, not by guessing. A filter is installed per thread (no `TSYNC`): the thread that called
//! `build` is not filtered by it — except in a jail, whose main thread installs the
//! [`ThreadKind::Supervisor`] filter once the VM runs, so that every thread of the jailed
//! VMM's process is filtered.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_cpuid2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVMIO,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

use crate::VmmError;

/// The kinds of thread the VMM starts, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread: `KVM_RUN`, and the port and MMIO devices it calls on an exit.
    Vcpu,
    /// The device thread (`event_loop.rs`): epoll, virtqueues, disks, the console socket, rng.
    Events,
    /// The reaper: waits for the VM's end, kicks the vCPUs, joins the threads.
    Reaper,
    /// The jailed VMM's main thread once the VM runs: answers the runner's
    /// pause and resume on its control socket, kicks the vCPUs to pause them, stops the VM and
    /// exits. (Unjailed, that thread is the runner's own, which is not filtered.)
    Supervisor,
}

impl ThreadKind {
    /// Every kind, in the order reports list them.
    pub const ALL: [ThreadKind; 4] = [
        ThreadKind::Vcpu,
        ThreadKind::Events,
        ThreadKind::Reaper,
        ThreadKind::Supervisor,
    ];

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Events => "events",
            ThreadKind::Reaper => "reaper",
            ThreadKind::Supervisor => "supervisor",
        }
    }
}

const fn kvm_io(nr: u32) -> u64 {
    ioctl_expr(_IOC_NONE, KVMIO, nr, 0) as u64
}

const fn kvm_ior(nr: u32, size: usize) -> u64 {
    ioctl_expr(_IOC_READ, KVMIO, nr, size as u32) as u64
}

const fn kvm_iowr(nr: u32, size: usize) -> u64 {
    ioctl_expr(_IOC_READ | _IOC_WRITE, KVMIO, nr, size as u32) as u64
}

/// `KVM_RUN`.
const KVM_RUN: u64 = kvm_io(0x80);
/// `KVM_GET_REGS`, `KVM_GET_SREGS`, `KVM_GET_LAPIC`: where a stopped vCPU was (its report).
const KVM_GET_REGS: u64 = kvm_ior(0x81, std::mem::size_of::<kvm_regs>());
const KVM_GET_SREGS: u64 = kvm_ior(0x83, std::mem::size_of::<kvm_sregs>());
const KVM_GET_LAPIC: u64 = kvm_ior(0x8e, std::mem::size_of::<kvm_lapic_state>());
/// The rest of a vCPU's state, which its own thread reads when a paused VM is saved
/// (`Vcpu::save`).
const KVM_GET_MSRS: u64 = kvm_iowr(0x88, std::mem::size_of::<kvm_msrs>());
const KVM_GET_CPUID2: u64 = kvm_iowr(0x91, std::mem::size_of::<kvm_cpuid2>());
const KVM_GET_MP_STATE: u64 = kvm_ior(0x98, std::mem::size_of::<kvm_mp_state>());
const KVM_GET_VCPU_EVENTS: u64 = kvm_ior(0x9f, std::mem::size_of::<kvm_vcpu_events>());
const KVM_GET_DEBUGREGS: u64 = kvm_ior(0xa1, std::mem::size_of::<kvm_debugregs>());
const KVM_GET_XSAVE: u64 = kvm_ior(0xa4, std::mem::size_of::<kvm_xsave>());
const KVM_GET_XCRS: u64 = kvm_ior(0xa6, std::mem::size_of::<kvm_xcrs>());

/// One allowed syscall and the argument conditions it is allowed with: the terms of every
/// allow-list in mvm (this crate's threads', and the runner's own).
#[derive(Debug, Clone, Copy)]
pub enum Allow {
    /// Any arguments.
    Any(libc::c_long),
    /// Argument `arg` equal to one of `values`.
    OneOf(libc::c_long, u8, &'static [u64]),
    /// Argument `arg` with none of the bits of `mask` set.
    Without(libc::c_long, u8, u64),
    /// Argument `arg`, masked with `mask`, equal to `value`.
    Masked(libc::c_long, u8, u64, u64),
    /// A socket option: the level (argument 1) and the option (argument 2) one of the
    /// `(level, option)` pairs.
    SocketOption(libc::c_long, &'static [(u64, u64)]),
    /// Argument `arg` equal to the vCPU kick signal (a real-time signal, known at run time).
    KickSignal(libc::c_long, u8),
}

/// What every VMM thread needs from the runtime (std and glibc), whatever its job.
const RUNTIME: &[Allow] = &[
    // Locks, condition variables, joins, `Once`.
    Allow::Any(libc::SYS_futex),
    // The allocator; memory is never made executable.
    Allow::Without(libc::SYS_mmap, 2, libc::PROT_EXEC as u64),
    Allow::Without(libc::SYS_mprotect, 2, libc::PROT_EXEC as u64),
    Allow::Any(libc::SYS_munmap),
    Allow::OneOf(
        libc::SYS_madvise,
        2,
        &[libc::MADV_DONTNEED as u64, libc::MADV_FREE as u64],
    ),
    // A thread's end: std's alternate signal stack, glibc's signal mask, the exit.
    Allow::Any(libc::SYS_sigaltstack),
    Allow::Any(libc::SYS_rt_sigprocmask),
    Allow::Any(libc::SYS_exit),
    // The return from the kick handler.
    Allow::Any(libc::SYS_rt_sigreturn),
    // Times, when the host's clock source makes the vDSO fall back to the syscall.
    Allow::Any(libc::SYS_clock_gettime),
    // Eventfds (irqfds, the exit signal), the serial log, closing what the thread owned.
    Allow::Any(libc::SYS_write),
    Allow::Any(libc::SYS_close),
    // std checks, in debug builds, that a descriptor it closes is open.
    Allow::OneOf(libc::SYS_fcntl, 1, &[libc::F_GETFD as u64]),
];

/// A vCPU's own work: running the guest and, on an exit, the port and MMIO devices — the
/// UART (its log, its irqfd), the CMOS clock, the power-off and reset registers, the virtio
/// transports' registers — and reading (never setting) its own state.
const VCPU: &[Allow] = &[Allow::OneOf(
    libc::SYS_ioctl,
    1,
    &[
        KVM_RUN,
        KVM_GET_REGS,
        KVM_GET_SREGS,
        KVM_GET_LAPIC,
        KVM_GET_MSRS,
        KVM_GET_CPUID2,
        KVM_GET_MP_STATE,
        KVM_GET_VCPU_EVENTS,
        KVM_GET_DEBUGREGS,
        KVM_GET_XSAVE,
        KVM_GET_XCRS,
    ],
)];

/// The device thread's own work: epoll, queue eventfds, disks, the console socket, the rng.
const EVENTS: &[Allow] = &[
    Allow::Any(libc::SYS_epoll_wait),
    Allow::Any(libc::SYS_epoll_ctl),
    // Eventfds, the console socket, disks (a seek, then a read or write).
    Allow::Any(libc::SYS_read),
    Allow::Any(libc::SYS_lseek),
    Allow::Any(libc::SYS_fdatasync),
    Allow::Any(libc::SYS_recvfrom),
    Allow::Any(libc::SYS_sendto),
    // The rng, from the blocking pool only (no flags).
    Allow::OneOf(libc::SYS_getrandom, 2, &[0]),
];

/// The reaper's own work: waiting on the exit eventfd, kicking vCPU threads (glibc's
/// `pthread_kill`: its pid, then `tgkill` — only with the kick signal), sleeping between
/// kicks.
const REAPER: &[Allow] = &[
    Allow::Any(libc::SYS_ppoll),
    Allow::Any(libc::SYS_getpid),
    Allow::KickSignal(libc::SYS_tgkill, 2),
    Allow::Any(libc::SYS_clock_nanosleep),
];

/// The jailed supervisor's own work: waiting on its control socket and the VM's end, reading a
/// request and sending the answer, kicking vCPU threads to pause them (as the reaper does),
/// and the process's exit.
const SUPERVISOR: &[Allow] = &[
    Allow::Any(libc::SYS_ppoll),
    Allow::Any(libc::SYS_recvfrom),
    Allow::Any(libc::SYS_sendto),
    Allow::Any(libc::SYS_getpid),
    Allow::KickSignal(libc::SYS_tgkill, 2),
    Allow::Any(libc::SYS_exit_group),
];

/// The allow-list of `kind`: the runtime's and its own.
fn allowed(kind: ThreadKind) -> Vec<Allow> {
    let own = match kind {
        ThreadKind::Vcpu => VCPU,
        ThreadKind::Events => EVENTS,
        ThreadKind::Reaper => REAPER,
        ThreadKind::Supervisor => SUPERVISOR,
    };
    RUNTIME.iter().chain(own).copied().collect()
}

impl Allow {
    /// The syscall's number and the rules it is allowed under, for a `SeccompFilter`.
    pub fn rules(&self) -> Result<(i64, Vec<SeccompRule>), seccompiler::BackendError> {
        // The arguments looked at are 32-bit to the kernel (ints, an ioctl's `cmd`, `clone`'s
        // flags, `mmap`'s and `mprotect`'s protection bits), whatever the caller left in the
        // upper half.
        let on = |arg: u8, op: SeccompCmpOp, value: u64| {
            SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
                .and_then(|condition| SeccompRule::new(vec![condition]))
        };
        Ok(match *self {
            Allow::Any(nr) => (nr, Vec::new()),
            Allow::OneOf(nr, arg, values) => (
                nr,
                values
                    .iter()
                    .map(|v| on(arg, SeccompCmpOp::Eq, *v))
                    .collect::<Result<_, _>>()?,
            ),
            Allow::Without(nr, arg, mask) => (nr, vec![on(arg, SeccompCmpOp::MaskedEq(mask), 0)?]),
            Allow::Masked(nr, arg, mask, value) => {
                (nr, vec![on(arg, SeccompCmpOp::MaskedEq(mask), value)?])
            }
            Allow::SocketOption(nr, options) => (
                nr,
                options
                    .iter()
                    .map(|(level, name)| {
                        let level = SeccompCondition::new(
                            1,
                            SeccompCmpArgLen::Dword,
                            SeccompCmpOp::Eq,
                            *level,
                        )?;
                        let option = SeccompCondition::new(
                            2,
                            SeccompCmpArgLen::Dword,
                            SeccompCmpOp::Eq,
                            *name,
                        )?;
                        SeccompRule::new(vec![level, option])
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Allow::KickSignal(nr, arg) => {
                let signal = super::vstate::kick::kick_signal() as u64;
                (nr, vec![on(arg, SeccompCmpOp::Eq, signal)?])
            }
        })
    }
}

/// How many syscalls each kind of thread may make.
pub fn allowed_counts() -> Vec<(ThreadKind, usize)> {
    ThreadKind::ALL
        .into_iter()
        .map(|kind| (kind, allowed(kind).len()))
        .collect()
}

/// The compiled filter of `kind`: allow what is listed, kill the process for anything else.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, VmmError> {
    let fail = |e: String| VmmError::Seccomp(format!("{} filter: {e}", kind.name()));
    let rules = allowed(kind)
        .iter()
        .map(Allow::rules)
        .collect::<Result<BTreeMap<_, _>, _>>()
        .map_err(|e| fail(e.to_string()))?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| fail(e.to_string()))?;
    BpfProgram::try_from(filter).map_err(|e| fail(e.to_string()))
}

/// Installs `program` on the calling thread (and so on every thread it starts later).
pub fn install(program: &BpfProgram) -> Result<(), VmmError> {
    seccompiler::apply_filter(program).map_err(|e| VmmError::Seccomp(format!("installing: {e}")))
}

/// Starts a thread named `name` that installs `program` before it runs `work`, and returns
/// once the filter is in place — or the error, the thread then ending without running `work`.
pub fn spawn_filtered<T, F>(
    name: String,
    program: BpfProgram,
    work: F,
) -> Result<JoinHandle<T>, VmmError>
where
    T: Default + Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (installed_tx, installed) = mpsc::sync_channel(1);
    let handle = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let result = install(&program);
            let filtered = result.is_ok();
            let _ = installed_tx.send(result);
            if filtered {
                work()
            } else {
                T::default()
            }
        })
        .map_err(VmmError::Thread)?;
    let result = installed.recv().unwrap_or_else(|_| {
        Err(VmmError::Seccomp(
            "the thread ended before installing its filter".into(),
        ))
    });
    match result {
        Ok(()) => Ok(handle),
        Err(e) => {
            let _ = handle.join();
            Err(e)
        }
    }
}
