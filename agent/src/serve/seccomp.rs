//! The syscall filter every workload command runs under: installed between `fork` and
//! `execve`, after the command's user is set, so nothing the command runs can drop it
//! (`no_new_privs` is already set on the agent).
//!
//! It is a deny-list, not an allow-list: workloads are arbitrary programs (Python, Node, a
//! shell and whatever they start), and an allow-list that fits them all would allow nearly
//! everything. What it refuses instead is the kernel surface a sandboxed command has no
//! business with, and that most kernel exploits start from. A denied call fails with `EPERM`
//! (`clone3` with `ENOSYS`, see below), as if a capability were missing; the command lives on.
//!
//! | tier | refuses |
//! |---|---|
//! | `essential` | [`KERNEL_SURFACE`], sockets of any family but `AF_UNIX` |
//! | `standard` | [`KERNEL_SURFACE`], `AF_PACKET`; `AF_INET`/`AF_INET6` unless the plan has egress or forwarded ports |
//! | `network` | [`KERNEL_SURFACE`] |
//! | `unrestricted` | nothing |
//!
//! `clone` is refused when its flags ask for a new namespace (`unshare` and `setns` are
//! refused outright), and `clone3` — whose flags sit in memory a filter cannot read — answers
//! `ENOSYS`, on which glibc, musl and Go start threads with `clone`. A call made through the
//! 32-bit (`int 0x80`) entry is another architecture to the filter and kills the process: the
//! guest kernel has no x32 ABI, and every tier is written for x86_64 calls only.

use std::collections::BTreeMap;
use std::sync::Arc;

use mvm_protocol::cmdline::{GuestPolicy, SeccompTier};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Calls refused under every tier but `unrestricted`: tracing and other processes' memory,
/// BPF, the kernel keyring, mounts and namespaces, modules, kexec, reboot, swap, accounting and
/// quotas, performance counters, `userfaultfd`, `io_uring`, raw port I/O, the kernel log,
/// file handles that bypass path checks, and the clocks.
pub const KERNEL_SURFACE: &[(&str, i64)] = &[
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("bpf", libc::SYS_bpf),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("reboot", libc::SYS_reboot),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct", libc::SYS_acct),
    ("quotactl", libc::SYS_quotactl),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("iopl", libc::SYS_iopl),
    ("ioperm", libc::SYS_ioperm),
    ("syslog", libc::SYS_syslog),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
];

/// `clone` flags that make a new namespace.
const NEW_NAMESPACES: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWTIME as libc::c_int) as u64;

/// The compiled filters of a policy, installed on each command as it starts: the `EPERM`
/// filter, then `clone3`'s `ENOSYS`.
#[derive(Debug, Clone)]
pub struct WorkloadFilter {
    programs: Arc<Vec<BpfProgram>>,
}

/// Why a policy's filter could not be compiled.
#[derive(Debug, thiserror::Error)]
#[error("compiling the workload's seccomp filter: {0}")]
pub struct FilterError(String);

impl WorkloadFilter {
    /// The filter of `policy`; `None` for the `unrestricted` tier.
    pub fn of(policy: &GuestPolicy) -> Result<Option<Self>, FilterError> {
        if policy.seccomp == SeccompTier::Unrestricted {
            return Ok(None);
        }
        let condition = |arg, op, value| {
            SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
                .map_err(|e| FilterError(e.to_string()))
        };
        let rule =
            |conditions| SeccompRule::new(conditions).map_err(|e| FilterError(e.to_string()));
        let mut denied: BTreeMap<i64, Vec<SeccompRule>> = KERNEL_SURFACE
            .iter()
            .map(|(_, nr)| (*nr, Vec::new()))
            .collect();
        // A clone that asks for any new namespace: one rule per flag, each matching when
        // that flag is set.
        let mut clone_rules = Vec::new();
        let mut flags = NEW_NAMESPACES;
        while flags != 0 {
            let flag = flags & flags.wrapping_neg();
            flags &= !flag;
            let set = SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )
            .map_err(|e| FilterError(e.to_string()))?;
            clone_rules.push(rule(vec![set])?);
        }
        denied.insert(libc::SYS_clone, clone_rules);
        let family = |f: libc::c_int| f as u64;
        let sockets = match policy.seccomp {
            SeccompTier::Essential => vec![rule(vec![condition(
                0,
                SeccompCmpOp::Ne,
                family(libc::AF_UNIX),
            )?])?],
            SeccompTier::Standard => {
                let mut refused = vec![libc::AF_PACKET];
                if !policy.inet {
                    refused.extend([libc::AF_INET, libc::AF_INET6]);
                }
                refused
                    .into_iter()
                    .map(|f| rule(vec![condition(0, SeccompCmpOp::Eq, family(f))?]))
                    .collect::<Result<_, _>>()?
            }
            SeccompTier::Network | SeccompTier::Unrestricted => Vec::new(),
        };
        if !sockets.is_empty() {
            denied.insert(libc::SYS_socket, sockets);
        }
        let eperm = compile(denied, SeccompAction::Errno(libc::EPERM as u32))?;
        let clone3 = compile(
            BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
            SeccompAction::Errno(libc::ENOSYS as u32),
        )?;
        Ok(Some(Self {
            programs: Arc::new(vec![eperm, clone3]),
        }))
    }

    /// Installs the filters on the calling thread: for a command's `pre_exec`, between `fork`
    /// and `execve`. Makes two `prctl` and two `seccomp` calls and allocates nothing.
    pub fn install(&self) -> std::io::Result<()> {
        for program in self.programs.iter() {
            seccompiler::apply_filter(program).map_err(|e| match e {
                seccompiler::Error::Prctl(e) | seccompiler::Error::Seccomp(e) => e,
                _ => std::io::Error::from_raw_os_error(libc::EINVAL),
            })?;
        }
        Ok(())
    }
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    on_match: SeccompAction,
) -> Result<BpfProgram, FilterError> {
    SeccompFilter::new(rules, SeccompAction::Allow, on_match, TargetArch::x86_64)
        .and_then(BpfProgram::try_from)
        .map_err(|e| FilterError(e.to_string()))
}
