//! The runner's side of a jail: the jailed VMM started as a child process of this runner,
//! its artifacts opened here and inherited as descriptors, watched and killed as QEMU is.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mvm_vmm::{BootFiles, GuestExit, VmSpec};

use super::control::JailControl;
use super::{guest_exit, ArtifactFds, ChildConfig, Jail, JailError, CHILD_MODE};
use crate::backend::child::ChildVm;
use crate::console_log::Console;

/// The own VMM running jailed in a child process.
#[derive(Debug)]
pub struct JailedVm {
    child: ChildVm,
    channel: Option<UnixStream>,
    control: UnixStream,
    root: PathBuf,
}

impl JailedVm {
    /// Starts `exe` (the runner's binary) as the jailed VMM of `spec`, jailed as `jail` in
    /// the new directory `root`, its serial console logged into `serial_log`; the artifacts
    /// are opened here, by this process, and passed on open. Call it from the thread that
    /// outlives the VM (see [`ChildVm::spawn`]).
    pub fn boot(
        exe: &Path,
        jail: Jail,
        root: &Path,
        spec: &VmSpec,
        serial_log: File,
    ) -> Result<Self, JailError> {
        let files = spec.open().map_err(|e| JailError::Setup {
            step: "opening the artifacts",
            reason: e.to_string(),
        })?;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(root)
            .map_err(JailError::setup("creating the jail directory"))?;
        Self::start(exe, jail, root, spec, files, serial_log).inspect_err(|_| {
            let _ = std::fs::remove_dir(root);
        })
    }

    /// Starts the child for [`JailedVm::boot`] on the artifacts `files`, the jail directory
    /// made.
    fn start(
        exe: &Path,
        jail: Jail,
        root: &Path,
        spec: &VmSpec,
        files: BootFiles,
        serial_log: File,
    ) -> Result<Self, JailError> {
        let (guest_end, host_end) =
            UnixStream::pair().map_err(JailError::setup("agent channel"))?;
        let guest_end = OwnedFd::from(guest_end);
        let (child_control, control) =
            UnixStream::pair().map_err(JailError::setup("control socket"))?;
        let child_control = OwnedFd::from(child_control);
        let artifact_fds = ArtifactFds {
            kernel: files.kernel.as_raw_fd(),
            initrd: files.initrd.as_ref().map(AsRawFd::as_raw_fd),
            disks: files
                .disks
                .iter()
                .map(|disk| disk.file.as_raw_fd())
                .collect(),
        };
        let config = ChildConfig {
            jail,
            root: root.to_path_buf(),
            spec: spec.clone(),
            channel_fd: guest_end.as_raw_fd(),
            control_fd: child_control.as_raw_fd(),
            artifact_fds,
        };
        let json = serde_json::to_vec(&config).map_err(|e| JailError::Setup {
            step: "configuration",
            reason: e.to_string(),
        })?;
        let (reader, mut writer) = io::pipe().map_err(JailError::setup("configuration pipe"))?;
        // A few KiB (the command line is at most 2 KiB): fits the pipe's buffer.
        writer
            .write_all(&json)
            .map_err(JailError::setup("configuration pipe"))?;
        drop(writer);
        let mut command = mvm_ir::env::command(exe);
        command.arg(CHILD_MODE).env_clear().stdin(reader);
        // The child's ends and the artifacts are closed here once the command (holding them)
        // is dropped.
        inherit(&mut command, guest_end);
        inherit(&mut command, child_control);
        let artifacts = std::iter::once(files.kernel)
            .chain(files.initrd)
            .chain(files.disks.into_iter().map(|disk| disk.file));
        for file in artifacts {
            inherit(&mut command, file.into());
        }
        let child = ChildVm::spawn(&mut command, serial_log).map_err(|e| JailError::Setup {
            step: "starting the jailed VMM",
            reason: format!("{}: {e}", exe.display()),
        })?;
        Ok(JailedVm {
            child,
            channel: Some(host_end),
            control,
            root: root.to_path_buf(),
        })
    }

    /// The child's process id (the namespace's PID 1 is its only child).
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The guest's serial console so far.
    pub fn console(&self) -> &Console {
        self.child.console()
    }

    /// What pauses and resumes the jailed VM.
    pub fn control(&self) -> io::Result<JailControl> {
        Ok(JailControl::new(self.control.try_clone()?))
    }

    /// The agent channel, connected before the guest starts; given out once.
    pub fn take_channel(&mut self) -> Option<UnixStream> {
        self.channel.take()
    }

    /// How the guest ended, if it has (the child's standard error read to its end first).
    pub fn try_wait(&mut self) -> io::Result<Option<GuestExit>> {
        self.wait_for_exit(Duration::ZERO)
    }

    /// Waits up to `timeout` for the guest to end by itself.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> io::Result<Option<GuestExit>> {
        let status = self.child.wait_for_exit(timeout)?;
        Ok(status.map(|status| guest_exit(status, &self.stderr())))
    }

    /// What the child said on its standard error (a setup error, a failed guest's reason).
    pub fn stderr(&self) -> String {
        self.child.stderr()
    }

    /// Kills the child's whole process group, reaps it, and removes the jail directory (its
    /// mounts were only in the child's mount namespace, gone with it).
    pub fn kill(&mut self) {
        self.child.kill();
        let _ = std::fs::remove_dir(&self.root);
    }
}

impl Drop for JailedVm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Lets the child inherit `fd` at the same number: its close-on-exec flag cleared in the
/// child only, after the fork.
#[allow(unsafe_code)]
fn inherit(command: &mut Command, fd: OwnedFd) {
    // SAFETY: the closure runs in the forked child before exec; it makes one raw system call
    // through rustix (fcntl), which neither allocates nor takes locks, and its error is built
    // from an errno without allocating.
    unsafe {
        command.pre_exec(move || {
            rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::empty())?;
            Ok(())
        });
    }
}
