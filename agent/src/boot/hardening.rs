//! What every command can count on and cannot undo, set once the verified root is `/`.
//!
//! The guest kernel is the only way a workload could forge what the guest reports (exit
//! statuses, the root's integrity), so it is made a small target: the kernel settings below
//! close what an unprivileged process never needs — attaching to another process, reading
//! kernel addresses and logs, user namespaces, unprivileged BPF and userfaultfd, loading line
//! disciplines or a new kernel — and turn on the link protections distributions set at boot
//! and a bare initramfs does not. Each is required: a kernel that lacks one does not boot
//! workloads (AGENT001 names it).

use std::fs;

use super::mounts;
use super::BootError;

/// `/proc/sys` settings, path and value.
pub const SYSCTLS: [(&str, &str); 14] = [
    // Yama: no process may attach to another with ptrace (not even root's; set for good).
    ("kernel/yama/ptrace_scope", "3"),
    ("kernel/dmesg_restrict", "1"),
    ("kernel/kptr_restrict", "2"),
    ("kernel/perf_event_paranoid", "3"),
    ("kernel/unprivileged_bpf_disabled", "1"),
    ("kernel/kexec_load_disabled", "1"),
    ("user/max_user_namespaces", "0"),
    ("vm/unprivileged_userfaultfd", "0"),
    ("dev/tty/ldisc_autoload", "0"),
    ("fs/suid_dumpable", "0"),
    // No hard link to a file the user cannot write, no following another user's symlink,
    // FIFO or regular file in a sticky directory (`/tmp`).
    ("fs/protected_hardlinks", "1"),
    ("fs/protected_symlinks", "1"),
    ("fs/protected_fifos", "2"),
    ("fs/protected_regular", "2"),
];

/// Where commands get their cgroups: the guest's cgroup2 hierarchy.
pub const COMMAND_CGROUPS: &str = "/sys/fs/cgroup";

/// Sets [`SYSCTLS`] and mounts the cgroup2 hierarchy commands are contained in.
pub fn apply() -> Result<(), BootError> {
    for (knob, value) in SYSCTLS {
        let path = format!("/proc/sys/{knob}");
        fs::write(&path, value).map_err(BootError::system(path))?;
    }
    mounts::mount_cgroups(COMMAND_CGROUPS)
}
