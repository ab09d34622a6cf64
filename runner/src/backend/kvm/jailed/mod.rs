//! `--jail`: the own VMM in a child process confined the way Firecracker's jailer confines
//! Firecracker.
//!
//! The runner keeps admission, audit, state and the control socket; only the VMM is jailed.
//! [`JailedVm::boot`] re-executes the runner's binary in a hidden mode ([`CHILD_MODE`]) and
//! sends it a [`ChildConfig`] as JSON on its standard input. The runner opens the artifacts
//! itself, as root, before the child exists (the kernel and initramfs for reading, each disk
//! for reading, and for writing only if the guest may write it); they, the agent channel and
//! the control socket (each one end of a socketpair) are inherited as file descriptors, whose
//! numbers the configuration gives. So the jail's uid needs no access to the artifacts, and the jailed
//! VMM can reach no file by a path but `/dev/kvm`. The child's standard output is the guest's
//! serial console, recorded by the runner as QEMU's is ([`crate::backend::child`]).
//!
//! The runner's side is [`parent`] and [`control`]; the child ([`child::child_main`]),
//! single-threaded until the VMM starts:
//! 1. takes the inherited descriptors, each checked before it is trusted: the channel and the
//!    control socket sockets, each artifact a regular file open for exactly the access it was sent for
//!    (`adopt`);
//! 2. leaves the runner's mount, PID, IPC, network and UTS namespaces (`unshare_namespaces`);
//! 3. forks once, so that the VMM is PID 1 of the new PID namespace (`become_pid_one`);
//! 4. builds the jail root on the VM's jail directory: a small tmpfs holding only `dev/kvm`
//!    (a device node owned by the jail's uid) (`build_root`), and `pivot_root`s into it, the
//!    old root detached (`enter_root`);
//! 5. sets resource limits (`set_limits`);
//! 6. drops supplementary groups, gid and uid (real, effective, saved), checks that root
//!    cannot be regained, sets `no_new_privs` (`drop_privileges`), and arms the
//!    parent-death signal again (a credential change clears it, `die_with_parent`);
//! 7. only then opens `/dev/kvm`, inside the jail, and runs the VMM on the inherited files,
//!    its threads installing their seccomp filters as they do unjailed
//!    ([`mvm_vmm::seccomp`]);
//! 8. filters its own thread too (the supervisor's list), then answers the runner's pause and
//!    resume on an inherited control socket ([`JailControl`]) until the guest ends.
//!
//! The mounts exist only in the child's mount namespace, so they vanish with it; the runner
//! kills the child's whole process group at teardown and removes the (then empty) jail
//! directory. How the guest ended crosses back as the child's exit status ([`exit_code`]).

use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::process::ExitStatus;

use mvm_ir::{Coded, ErrorClass};
use mvm_vmm::{GuestExit, VmSpec};
use serde::{Deserialize, Serialize};

use crate::backend::select::BackendChoice;
use crate::codes;

pub mod child;
pub mod control;
pub mod parent;

pub use control::JailControl;
pub use parent::JailedVm;

/// The hidden first argument that makes `mvm-runner` the jailed VMM child.
pub const CHILD_MODE: &str = "--vmm-child";
/// The jail's directory inside the VM's directory.
pub const JAIL_DIR: &str = "jail";
/// The uid and gid a jail runs as when none is given (`nobody`, `nogroup`).
pub const DEFAULT_ID: u32 = 65534;
/// The most file descriptors the jailed VMM may hold: KVM's (system, VM, one per vCPU),
/// eventfds and files per device, epoll, the console and the channel, with room to spare.
pub const MAX_FILES: u64 = 256;
/// The child's exit status when the jail or the VMM could not be set up (its error is on its
/// standard error).
const SETUP_FAILED: i32 = 125;

/// Why a jail was refused or could not be set up. [`JailError::code`] is stable.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// `--jail` with a backend other than `kvm`.
    #[error("--jail confines mvm's own VMM: it needs --backend kvm (QEMU is not jailed)")]
    NeedsKvm,
    /// The runner is not root.
    #[error("--jail needs root (to create namespaces, build the jail and change uid), as Firecracker's jailer does; this runner runs as uid {0}")]
    NotRoot(u32),
    /// The jail would run as root.
    #[error("--jail-{0} 0 would leave the VMM root: give an unprivileged id")]
    RootId(&'static str),
    /// A step of starting the jailed child failed.
    #[error("jail: {step}: {reason}")]
    Setup {
        /// The step.
        step: &'static str,
        /// What went wrong.
        reason: String,
    },
}

/// Delegates to the inherent [`JailError::code`], which stays for callers without the trait.
impl Coded for JailError {
    fn code(&self) -> &str {
        JailError::code(self)
    }

    /// Flags the jail refuses and a jail that could not be set up alike (as the CLI has
    /// always classed `RUN…` codes other than RUN025, RUN031 and RUN032).
    fn class(&self) -> ErrorClass {
        ErrorClass::InvalidInput
    }
}

impl JailError {
    /// The stable code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            JailError::NeedsKvm => codes::RUN043,
            JailError::NotRoot(_) => codes::RUN044,
            JailError::RootId(_) => codes::RUN045,
            JailError::Setup { .. } => codes::RUN046,
        }
    }

    /// A [`JailError::Setup`] for `step`.
    fn setup(step: &'static str) -> impl FnOnce(io::Error) -> JailError {
        move |e| JailError::Setup {
            step,
            reason: e.to_string(),
        }
    }
}

impl From<rustix::io::Errno> for JailError {
    fn from(errno: rustix::io::Errno) -> Self {
        JailError::Setup {
            step: "system call",
            reason: io::Error::from(errno).to_string(),
        }
    }
}

/// Who the jailed VMM runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jail {
    /// Its uid (real, effective and saved).
    pub uid: u32,
    /// Its gid (real, effective and saved); it has no supplementary groups.
    pub gid: u32,
}

impl Jail {
    /// A jail for `uid`:`gid`, refused unless the backend asked for is `kvm`, the runner runs
    /// as root (`euid`), and neither id is 0.
    pub fn check(uid: u32, gid: u32, backend: BackendChoice, euid: u32) -> Result<Self, JailError> {
        if backend != BackendChoice::Kvm {
            return Err(JailError::NeedsKvm);
        }
        if euid != 0 {
            return Err(JailError::NotRoot(euid));
        }
        if uid == 0 {
            return Err(JailError::RootId("uid"));
        }
        if gid == 0 {
            return Err(JailError::RootId("gid"));
        }
        Ok(Jail { uid, gid })
    }
}

/// What the jailed child is sent on its standard input.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChildConfig {
    /// Who it runs as.
    pub jail: Jail,
    /// The jail directory (on the host), which becomes its root.
    pub root: PathBuf,
    /// The VM; its host paths only name the artifacts in messages.
    pub spec: VmSpec,
    /// The inherited descriptor of the guest's end of the agent channel.
    pub channel_fd: RawFd,
    /// The inherited descriptor of the child's end of its control socket ([`JailControl`]).
    pub control_fd: RawFd,
    /// The inherited descriptors of the artifacts, opened by the runner.
    pub artifact_fds: ArtifactFds,
}

/// The descriptor numbers a jailed VMM inherits its artifacts at, as in its [`VmSpec`].
#[derive(Debug, Serialize, Deserialize)]
pub struct ArtifactFds {
    /// The kernel, open for reading.
    pub kernel: RawFd,
    /// The initramfs, open for reading.
    pub initrd: Option<RawFd>,
    /// The disks, in the spec's order, each open for reading, and for writing only if the
    /// guest may write it.
    pub disks: Vec<RawFd>,
}

/// The child's exit status for how its guest ended (read back by [`JailedVm::try_wait`]).
pub fn exit_code(exit: &GuestExit) -> i32 {
    match exit {
        GuestExit::PowerOff => 0,
        GuestExit::Reset => 1,
        GuestExit::TripleFault => 2,
        GuestExit::Failed(_) => 3,
        GuestExit::Stopped => 4,
    }
}

/// How the guest ended, read back from the child's exit `status` ([`exit_code`]); anything
/// else is a failure, told by the child's `stderr`.
fn guest_exit(status: ExitStatus, stderr: &str) -> GuestExit {
    match status.code() {
        Some(0) => GuestExit::PowerOff,
        Some(1) => GuestExit::Reset,
        Some(2) => GuestExit::TripleFault,
        Some(4) => GuestExit::Stopped,
        _ => GuestExit::Failed(format!("the jailed VMM ended ({status}): {stderr}")),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    #[test]
    fn a_jail_needs_the_kvm_backend_root_and_unprivileged_ids() {
        let check =
            |uid, gid, backend, euid| Jail::check(uid, gid, backend, euid).map_err(|e| e.code());
        assert_eq!(check(1000, 1000, BackendChoice::Qemu, 0), Err("RUN043"));
        assert_eq!(check(1000, 1000, BackendChoice::Auto, 0), Err("RUN043"));
        assert_eq!(check(1000, 1000, BackendChoice::Kvm, 1000), Err("RUN044"));
        assert_eq!(check(0, 1000, BackendChoice::Kvm, 0), Err("RUN045"));
        assert_eq!(check(1000, 0, BackendChoice::Kvm, 0), Err("RUN045"));
        assert_eq!(
            check(1000, 1001, BackendChoice::Kvm, 0),
            Ok(Jail {
                uid: 1000,
                gid: 1001
            })
        );
    }

    #[test]
    fn the_child_exit_status_says_how_the_guest_ended() {
        for exit in [
            GuestExit::PowerOff,
            GuestExit::Reset,
            GuestExit::TripleFault,
            GuestExit::Stopped,
        ] {
            let status = ExitStatus::from_raw(exit_code(&exit) << 8);
            assert_eq!(guest_exit(status, ""), exit);
        }
        let failed = guest_exit(ExitStatus::from_raw(SETUP_FAILED << 8), "RUN046 jail: dev");
        assert!(
            matches!(failed, GuestExit::Failed(reason) if reason.ends_with("RUN046 jail: dev"))
        );
    }
}
