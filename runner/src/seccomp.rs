//! The runner's own seccomp filter: the syscalls `mvm-runner` may make once its VM runs — one
//! allow-list, to be reviewed as a list.
//!
//! **When.** A launch installs it once the VM is started and its agent has said hello
//! ([`crate::launch`]): admission, the VM's directory, QEMU spawned (or the jailed VMM's child
//! re-executed, or the own VMM's threads started under their own filters) and the agent channel
//! connected are behind it — every process the runner will ever start has been started. What
//! is left is the runner's steady work: the command's exchange (or a named VM's control socket
//! and its relays), audit appends, state files, pause and resume, a cold save, the power-off,
//! the kill of QEMU and the removal of the VM's directory.
//!
//! **Which threads.** The filter is installed with `TSYNC` ([`Reach::Process`]): every thread
//! the runner has then (QEMU's console and stderr readers) gets it, and every thread it starts
//! later (the agent channel's reader, a control client's) inherits it. `TSYNC` cannot stack a
//! filter on a thread that installed one of its own — it would have to replace that thread's
//! filter, and the kernel refuses the whole call — which is the case with the own VMM in this
//! process: its vCPU, device and reaper threads run under their own lists (`mvm_vmm::seccomp`,
//! stricter: a violation kills). Then the filter goes on the calling thread only
//! ([`Reach::ThisThread`]) — the runner's main thread, which starts every later thread — and the
//! VMM's threads keep theirs (the own VMM starts no unfiltered thread). Either way [`install`]
//! then checks `/proc/self/task` and fails (RUN051) unless every thread of the runner is in
//! filter mode.
//!
//! **What a violation does.** An unlisted syscall, or a listed one with arguments outside its
//! conditions, fails with `EPERM` (`SeccompAction::Errno`) instead of killing the process: the
//! runner holds a live VM and the evidence of its run, and a path nobody foresaw (an error path
//! that reads a file a new way) should end in an error that is reported, the VM torn down and
//! `vm.exited` recorded — not a runner killed with its VM's state half written. What matters
//! is refused all the same: no `execve`/`execveat`, no `fork`/`vfork` and no `clone` without
//! `CLONE_THREAD` (no new process, no new namespace), sockets of `AF_UNIX` only (and `AF_INET`,
//! `AF_INET6` when the plan grants egress), no `ptrace`,
//! `mount`, `bpf`, `keyctl`, `setuid` family, module loading, `unshare`/`setns`, `chroot`,
//! `reboot`, `kexec`, `perf_event_open`, `userfaultfd`, `io_uring`, no executable memory.
//! `clone3` is answered `ENOSYS` (its flags sit in a struct the filter cannot read), on which
//! glibc starts threads with `clone`, whose flags it can.
//!
//! **How the list was found.** By tracing, not guessing. Every `mvm-runner` process started by
//! the end-to-end tests of `tests/run.rs` (one-shot runs with a receipt, a timeout, an
//! interrupt, integrity failures; named VMs serving execs, input, background commands, large
//! copies both ways, a cold save refused and done, a wake, stop, a killed runner) was traced with
//! `strace -f` attached as it started, with the filter installed but allowing everything, and
//! every syscall its threads made after the `seccomp` call was collected. The runner's side of
//! the own VMM (pause, save, resume, stop from a runner thread: the kicks and the VM-wide
//! `KVM_GET_*` of a save) and of a jailed VMM (its control socket, the kill, the jail
//! directory's removal) were traced the same way in `runner/tests/seccomp.rs`. Where a call had
//! fixed arguments (`socket`'s family, `ioctl`'s request, `fcntl`'s command, the socket
//! options, `kill`'s signal) the list holds only the ones seen. Beyond the trace: `clock_gettime`
//! (the vDSO falls back to the syscall on some clock sources) and an `AF_UNIX` `socketpair`.
//! Seen in the trace: glibc (2.36) falls back to `clone` on `clone3`'s `ENOSYS`. Calls a
//! runner may make but whose refusal only costs speed stay off the list: glibc's `realloc`
//! copies when `mremap` fails, std's `io::copy` falls back to reads and writes when
//! `copy_file_range` or `sendfile` fail with `EPERM`.

use std::collections::BTreeMap;

use mvm_ir::{Coded, ErrorClass};
use mvm_vmm::seccomp::Allow;
use seccompiler::{sock_filter, BpfProgram, SeccompAction, SeccompFilter, TargetArch};

use crate::codes;

/// Why the runner's filter is not in place (RUN051): the launch fails rather than go on
/// unfiltered.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter could not be compiled.
    #[error("building the runner's seccomp filter: {0}")]
    Build(String),
    /// The kernel refused the filter.
    #[error("installing the runner's seccomp filter: {0}")]
    Install(String),
    /// Whether every thread is filtered could not be checked.
    #[error("checking the runner's seccomp filter: {0}")]
    Check(String),
    /// A thread of the runner is not in seccomp filter mode after the install.
    #[error("the runner's thread {0} is not seccomp-filtered")]
    Unfiltered(String),
}

impl Coded for SeccompError {
    fn code(&self) -> &str {
        codes::RUN051
    }

    fn class(&self) -> ErrorClass {
        ErrorClass::Io
    }
}

/// Which of the runner's threads [`install`] put the filter on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Every thread (`TSYNC`), and every thread started later.
    Process,
    /// The calling thread, and every thread it starts later; the process's other threads (the
    /// own VMM's) are filtered by their own filters.
    ThisThread,
}

/// The namespace flags, which no `clone` of the runner may carry.
const NEW_NAMESPACES: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP) as u64;

/// The level of the socket options every runner sets.
const SOL_SOCKET: u64 = libc::SOL_SOCKET as u64;
/// Timeouts on the Unix sockets (the agent channel, the control socket's clients).
const SOCKET_TIMEOUTS: &[(u64, u64)] = &[
    (SOL_SOCKET, libc::SO_RCVTIMEO as u64),
    (SOL_SOCKET, libc::SO_SNDTIMEO as u64),
];

/// `FIONBIO`: std's `set_nonblocking` on a socket.
const FIONBIO: u64 = libc::FIONBIO;
/// The VM-wide state the own VMM's save reads on the thread that asks for it (a named VM's
/// control thread): `KVM_GET_CLOCK` (`_IOR(KVMIO, 0x7c, struct kvm_clock_data)`, 48 bytes),
/// `KVM_GET_IRQCHIP` (`_IOWR(KVMIO, 0x62, struct kvm_irqchip)`, 520 bytes) and `KVM_GET_PIT2`
/// (`_IOR(KVMIO, 0x9f, struct kvm_pit_state2)`, 112 bytes). Only reads: nothing sets a VM's
/// state once the runner is filtered.
const KVM_GET_CLOCK: u64 = 0x8030_ae7c;
const KVM_GET_IRQCHIP: u64 = 0xc208_ae62;
const KVM_GET_PIT2: u64 = 0x8070_ae9f;

/// Every syscall the runner may make once its VM runs, by what it is for.
const ALLOWED: &[Allow] = &[
    // --- What std and glibc need on any thread. Locks, condition variables, joins, `Once`.
    Allow::Any(libc::SYS_futex),
    // The allocator (glibc's arenas and `brk` heap); memory is never made executable.
    Allow::Without(libc::SYS_mmap, 2, libc::PROT_EXEC as u64),
    Allow::Without(libc::SYS_mprotect, 2, libc::PROT_EXEC as u64),
    Allow::Any(libc::SYS_munmap),
    Allow::Any(libc::SYS_brk),
    Allow::OneOf(libc::SYS_madvise, 2, &[libc::MADV_DONTNEED as u64]),
    // Signals: the mask around a thread's start and end, std's alternate stack, the return
    // from a handler (SIGINT, SIGTERM, SIGHUP stop a launch; the own VMM's kick), a sleep
    // interrupted by one (SIGCHLD when QEMU ends).
    Allow::Any(libc::SYS_rt_sigprocmask),
    Allow::Any(libc::SYS_sigaltstack),
    Allow::Any(libc::SYS_rt_sigreturn),
    Allow::Any(libc::SYS_restart_syscall),
    // Time: sleeps between polls; the clock when the vDSO falls back to the syscall.
    Allow::Any(libc::SYS_clock_nanosleep),
    Allow::Any(libc::SYS_clock_gettime),
    // std's hash keys; nonces.
    Allow::Any(libc::SYS_getrandom),
    // A thread's or the process's end.
    Allow::Any(libc::SYS_exit),
    Allow::Any(libc::SYS_exit_group),
    // --- Threads (the agent channel's reader, a control client's relay): `clone` only with
    // `CLONE_THREAD` (a thread of this process, never a new process) and no new namespace;
    // what glibc does as a thread starts (robust futexes, `rseq`, its stack size from the
    // CPU set, std's thread name). `pthread_kill` asks for the process's id first.
    Allow::Masked(
        libc::SYS_clone,
        0,
        libc::CLONE_THREAD as u64 | NEW_NAMESPACES,
        libc::CLONE_THREAD as u64,
    ),
    Allow::Any(libc::SYS_set_robust_list),
    Allow::Any(libc::SYS_rseq),
    Allow::Any(libc::SYS_sched_getaffinity),
    Allow::OneOf(libc::SYS_prctl, 0, &[libc::PR_SET_NAME as u64]),
    Allow::Any(libc::SYS_gettid),
    Allow::Any(libc::SYS_getpid),
    // --- Files: audit appends (locked), state files written and renamed into place, the
    // runner's log, a cold save's memory file and manifest, the VM's directory read and
    // removed (and a jail's), the console log kept on a failure.
    Allow::Any(libc::SYS_openat),
    Allow::Any(libc::SYS_read),
    Allow::Any(libc::SYS_write),
    Allow::Any(libc::SYS_close),
    Allow::Any(libc::SYS_lseek),
    Allow::Any(libc::SYS_fsync),
    Allow::Any(libc::SYS_statx),
    Allow::Any(libc::SYS_newfstatat),
    Allow::Any(libc::SYS_readlink),
    Allow::Any(libc::SYS_getdents64),
    Allow::Any(libc::SYS_flock),
    Allow::Any(libc::SYS_fchmod),
    Allow::Any(libc::SYS_chmod),
    Allow::Any(libc::SYS_mkdir),
    Allow::Any(libc::SYS_rename),
    Allow::Any(libc::SYS_unlink),
    Allow::Any(libc::SYS_unlinkat),
    Allow::Any(libc::SYS_rmdir),
    // A named VM's stdout and stderr moved to its runner log once it is ready.
    Allow::Any(libc::SYS_dup2),
    // std's descriptor handling (`try_clone`, close-on-exec, access mode).
    Allow::OneOf(
        libc::SYS_fcntl,
        1,
        &[
            libc::F_DUPFD_CLOEXEC as u64,
            libc::F_GETFD as u64,
            libc::F_SETFD as u64,
            libc::F_GETFL as u64,
        ],
    ),
    // --- Sockets: the agent channel, the control socket and its clients (their uid, from
    // `SO_PEERCRED`, checked against the runner's), QMP, QEMU's migration stream, a jailed
    // VMM's control socket; timeouts on them. Which families, and the calls only egress makes,
    // are in `LOCAL` and `EGRESS`.
    Allow::OneOf(libc::SYS_socketpair, 0, &[libc::AF_UNIX as u64]),
    Allow::Any(libc::SYS_bind),
    Allow::Any(libc::SYS_listen),
    Allow::Any(libc::SYS_accept4),
    Allow::Any(libc::SYS_connect),
    Allow::Any(libc::SYS_sendto),
    Allow::Any(libc::SYS_recvfrom),
    Allow::Any(libc::SYS_shutdown),
    Allow::Any(libc::SYS_ppoll),
    Allow::Any(libc::SYS_getuid),
    // --- The VM's process: QEMU (or a jailed VMM's process group) killed with SIGKILL and
    // reaped; the own VMM's vCPU threads kicked (paused) with its kick signal only.
    Allow::OneOf(libc::SYS_kill, 1, &[libc::SIGKILL as u64]),
    Allow::Any(libc::SYS_wait4),
    Allow::KickSignal(libc::SYS_tgkill, 2),
];

/// What a runner whose plan grants no egress adds: `AF_UNIX` sockets only.
const LOCAL: &[Allow] = &[
    Allow::OneOf(libc::SYS_socket, 0, &[libc::AF_UNIX as u64]),
    Allow::OneOf(
        libc::SYS_ioctl,
        1,
        &[FIONBIO, KVM_GET_CLOCK, KVM_GET_IRQCHIP, KVM_GET_PIT2],
    ),
    Allow::SocketOption(
        libc::SYS_getsockopt,
        &[(SOL_SOCKET, libc::SO_PEERCRED as u64)],
    ),
    Allow::SocketOption(libc::SYS_setsockopt, SOCKET_TIMEOUTS),
];

/// What a runner whose plan grants egress adds ([`crate::egress`]): IPv4 and IPv6 sockets for
/// the connections it dials (TCP, with a timeout: a nonblocking `connect`, `poll`, its
/// `SO_ERROR`) and for the host's resolver (glibc's DNS over UDP: both queries at once with
/// `sendmmsg`, the answer's size with `FIONREAD`, and the source address of each candidate
/// with `getsockname` when it sorts them). Still no raw, packet or netlink socket.
const EGRESS: &[Allow] = &[
    Allow::OneOf(
        libc::SYS_socket,
        0,
        &[
            libc::AF_UNIX as u64,
            libc::AF_INET as u64,
            libc::AF_INET6 as u64,
        ],
    ),
    Allow::OneOf(
        libc::SYS_ioctl,
        1,
        &[
            FIONBIO,
            libc::FIONREAD,
            KVM_GET_CLOCK,
            KVM_GET_IRQCHIP,
            KVM_GET_PIT2,
        ],
    ),
    Allow::SocketOption(
        libc::SYS_getsockopt,
        &[
            (SOL_SOCKET, libc::SO_PEERCRED as u64),
            (SOL_SOCKET, libc::SO_ERROR as u64),
        ],
    ),
    Allow::SocketOption(
        libc::SYS_setsockopt,
        &[
            (SOL_SOCKET, libc::SO_RCVTIMEO as u64),
            (SOL_SOCKET, libc::SO_SNDTIMEO as u64),
            (libc::SOL_IP as u64, libc::IP_RECVERR as u64),
            (libc::SOL_IPV6 as u64, libc::IPV6_RECVERR as u64),
        ],
    ),
    // glibc's resolver reads the host name (for the search domain) with `uname`.
    Allow::Any(libc::SYS_uname),
    Allow::Any(libc::SYS_poll),
    Allow::Any(libc::SYS_sendmmsg),
    Allow::Any(libc::SYS_getsockname),
];

/// The list for a runner with or without egress.
fn allowed(egress: bool) -> impl Iterator<Item = &'static Allow> {
    ALLOWED
        .iter()
        .chain(if egress { EGRESS } else { LOCAL }.iter())
}

/// How many syscalls the runner's filter allows, with or without egress.
pub fn allowed_count(egress: bool) -> usize {
    allowed(egress).count()
}

/// `clone3` answered `ENOSYS` before anything else is looked at: glibc then starts the thread
/// with `clone`, whose flags the list can check. (Any architecture's syscall of that number is
/// answered so: a refusal is never unsafe.)
fn clone3_unsupported() -> [sock_filter; 3] {
    let statement = |code: u32, k: u32| sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    [
        // The syscall's number: `seccomp_data.nr`, at offset 0.
        statement(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
        sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: libc::SYS_clone3 as u32,
        },
        statement(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | (libc::ENOSYS as u32 & libc::SECCOMP_RET_DATA),
        ),
    ]
}

/// The compiled filter: `clone3` answered `ENOSYS`, the list allowed (with egress's additions
/// when `egress`), anything else `EPERM`.
pub fn filter(egress: bool) -> Result<BpfProgram, SeccompError> {
    let fail = |e: String| SeccompError::Build(e);
    let rules = allowed(egress)
        .map(Allow::rules)
        .collect::<Result<BTreeMap<_, _>, _>>()
        .map_err(|e| fail(e.to_string()))?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| fail(e.to_string()))?;
    let listed = BpfProgram::try_from(filter).map_err(|e| fail(e.to_string()))?;
    Ok(clone3_unsupported().into_iter().chain(listed).collect())
}

/// Installs the runner's filter on every thread of this process (`TSYNC`), or — when a thread
/// has a filter of its own, which `TSYNC` cannot replace — on the calling thread; then checks
/// that every thread of the process is filtered. `egress`: the plan grants egress, and the
/// runner dials out for it.
pub fn install(egress: bool) -> Result<Reach, SeccompError> {
    let program = filter(egress)?;
    let reach = match seccompiler::apply_filter_all_threads(&program) {
        Ok(()) => Reach::Process,
        Err(seccompiler::Error::ThreadSync(_)) => {
            seccompiler::apply_filter(&program)
                .map_err(|e| SeccompError::Install(e.to_string()))?;
            Reach::ThisThread
        }
        Err(e) => return Err(SeccompError::Install(e.to_string())),
    };
    let unfiltered = unfiltered_threads()
        .map_err(|e| SeccompError::Check(format!("reading /proc/self/task: {e}")))?;
    match unfiltered.into_iter().next() {
        Some(tid) => Err(SeccompError::Unfiltered(tid)),
        None => Ok(reach),
    }
}

/// The threads of this process that are not in seccomp filter mode.
fn unfiltered_threads() -> std::io::Result<Vec<String>> {
    let mut unfiltered = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task")? {
        let tid = entry?.file_name().to_string_lossy().into_owned();
        let status = match std::fs::read_to_string(format!("/proc/self/task/{tid}/status")) {
            Ok(status) => status,
            // It ended since the directory was read.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mode = status
            .lines()
            .find_map(|line| line.strip_prefix("Seccomp:"))
            .map(str::trim);
        if mode != Some("2") {
            unfiltered.push(tid);
        }
    }
    Ok(unfiltered)
}
