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
//! serial console, recorded by the runner as QEMU's is ([`crate::child`]).
//!
//! The child ([`child_main`]), single-threaded until the VMM starts:
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

use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use rustix::fs::{FileType, Gid, Mode, OFlags, Uid};
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use rustix::process::{Resource, Rlimit};
use rustix::thread::UnshareFlags;
use serde::{Deserialize, Serialize};

use crate::child::ChildVm;
use crate::host::BackendChoice;
use crate::serial::Console;
use crate::vm_process::agent_port;
use mvm_vmm::{self as vmm, BlockConfig, BootFiles, GuestExit, VmSpec};

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

impl JailError {
    /// The stable code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            JailError::NeedsKvm => "RUN043",
            JailError::NotRoot(_) => "RUN044",
            JailError::RootId(_) => "RUN045",
            JailError::Setup { .. } => "RUN046",
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

/// The own VMM running jailed in a child process.
#[derive(Debug)]
pub struct JailedVm {
    child: ChildVm,
    channel: Option<UnixStream>,
    control: UnixStream,
    root: PathBuf,
}

/// What the runner asks of the jailed VMM over its control socket, a byte each; the child
/// answers each with a line, `ok` or why not.
const PAUSE: u8 = b'p';
const RESUME: u8 = b'r';
/// The longest the runner waits for the child's answer: its pause has a deadline of its own.
const CONTROL_ANSWER: Duration = Duration::from_secs(vmm::pause::PAUSE_TIMEOUT.as_secs() + 2);
/// The longest answer read.
const ANSWER_LIMIT: u64 = 512;

/// The runner's end of the jailed VMM's control socket: pauses and resumes the VM in the
/// child ([`serve_control`] is the other end). One request at a time (the runner's
/// [`crate::control::Shared`] holds it under a lock).
#[derive(Debug)]
pub struct JailControl(UnixStream);

impl JailControl {
    fn ask(&mut self, request: u8) -> io::Result<()> {
        self.0.set_read_timeout(Some(CONTROL_ANSWER))?;
        self.0.write_all(&[request])?;
        let mut answer = Vec::new();
        io::BufReader::new((&self.0).take(ANSWER_LIMIT)).read_until(b'\n', &mut answer)?;
        match answer.strip_suffix(b"\n") {
            Some(b"ok") => Ok(()),
            Some(reason) => Err(io::Error::other(
                String::from_utf8_lossy(reason).into_owned(),
            )),
            None => Err(io::Error::other("the jailed VMM did not answer")),
        }
    }
}

impl crate::control::Pausable for JailControl {
    fn pause(&mut self) -> io::Result<()> {
        self.ask(PAUSE)
    }

    fn resume(&mut self) -> io::Result<()> {
        self.ask(RESUME)
    }
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
        let mut command = Command::new(exe);
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
        Ok(JailControl(self.control.try_clone()?))
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

/// The jailed child's whole life (`mvm-runner --vmm-child`); its exit status.
pub fn child_main() -> i32 {
    match run_child() {
        Ok(exit) => {
            if let GuestExit::Failed(reason) = &exit {
                eprintln!("{reason}");
            }
            exit_code(&exit)
        }
        Err(e) => {
            eprintln!("mvm-runner: error {}: {e}", e.code());
            SETUP_FAILED
        }
    }
}

fn run_child() -> Result<GuestExit, JailError> {
    let mut json = Vec::new();
    io::stdin()
        .read_to_end(&mut json)
        .map_err(JailError::setup("reading the configuration"))?;
    let config: ChildConfig = serde_json::from_slice(&json).map_err(|e| JailError::Setup {
        step: "reading the configuration",
        reason: e.to_string(),
    })?;
    let (channel, control, files) = adopt_all(&config)?;
    unshare_namespaces()?;
    let alive = become_pid_one()?;
    build_root(&config.root, config.jail)?;
    enter_root(&config.root)?;
    set_limits(&files)?;
    drop_privileges(config.jail)?;
    die_with_parent(&alive)?;
    let serial_log = File::from(
        io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .map_err(JailError::setup("serial console"))?,
    );
    let vm_config = config
        .spec
        .config(files, Box::new(serial_log), Some(agent_port(channel)));
    let vm = vmm::build(vm_config).map_err(|e| JailError::Setup {
        step: "building the VM",
        reason: format!("{}: {e}", e.code()),
    })?;
    // From here on every thread of this process is filtered: this one as the supervisor.
    let supervising = vmm::seccomp::filter(vmm::seccomp::ThreadKind::Supervisor)
        .and_then(|filter| vmm::seccomp::install(&filter));
    if let Err(e) = supervising {
        vm.stop();
        return Err(JailError::Setup {
            step: "seccomp",
            reason: format!("{}: {e}", e.code()),
        });
    }
    serve_control(&vm, control);
    Ok(vm.stop())
}

/// Answers the runner's requests on `control` until the VM ends, or until the runner closes
/// its end (then the VM is stopped: nobody would be left to supervise it).
fn serve_control(vm: &vmm::MicroVm, mut control: UnixStream) {
    use rustix::event::{poll, PollFd, PollFlags};
    let machine = vm.machine();
    while vm.ended().is_none() {
        let mut fds = [
            PollFd::new(&control, PollFlags::IN),
            PollFd::from_borrowed_fd(vm.exit_eventfd(), PollFlags::IN),
        ];
        if poll(&mut fds, None).is_err_and(|e| e != rustix::io::Errno::INTR) {
            return;
        }
        if fds[0].revents().is_empty() {
            continue;
        }
        let mut request = [0u8];
        match control.read(&mut request) {
            Ok(1) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            _ => return,
        }
        let answer = match request[0] {
            PAUSE => machine.pause(),
            RESUME => machine.resume(),
            other => {
                let _ = writeln!(control, "unknown request {other:#04x}");
                continue;
            }
        };
        let written = match answer {
            Ok(()) => control.write_all(b"ok\n"),
            Err(e) => writeln!(control, "{e}"),
        };
        if written.is_err() {
            return;
        }
    }
}

/// What an inherited descriptor must be before it is trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inherited {
    /// A socket (the agent channel, the control socket).
    Socket,
    /// A regular file open for reading, and for writing exactly if `writable`.
    File {
        /// Whether it must be open for writing too.
        writable: bool,
    },
}

/// Takes the agent channel, the control socket and the artifacts `config` says the child
/// inherited, each checked by [`adopt`], no number given twice; the artifacts as the VMM
/// boots from them.
fn adopt_all(config: &ChildConfig) -> Result<(UnixStream, UnixStream, BootFiles), JailError> {
    let (spec, fds) = (&config.spec, &config.artifact_fds);
    let mismatch = |what: String| JailError::Setup {
        step: "inherited descriptors",
        reason: what,
    };
    if fds.disks.len() != spec.disks.len() || fds.initrd.is_some() != spec.initrd.is_some() {
        return Err(mismatch(format!(
            "descriptors for {} disks and {} initramfs, for a VM of {} and {}",
            fds.disks.len(),
            u8::from(fds.initrd.is_some()),
            spec.disks.len(),
            u8::from(spec.initrd.is_some())
        )));
    }
    let mut numbers = [config.channel_fd, config.control_fd, fds.kernel]
        .into_iter()
        .chain(fds.initrd)
        .chain(fds.disks.iter().copied());
    let mut seen = std::collections::BTreeSet::new();
    if let Some(twice) = numbers.find(|fd| !seen.insert(*fd)) {
        return Err(mismatch(format!("descriptor {twice} given twice")));
    }
    let read = Inherited::File { writable: false };
    let channel = adopt(config.channel_fd, "agent channel", Inherited::Socket)?;
    let control = adopt(config.control_fd, "control socket", Inherited::Socket)?;
    let kernel = adopt(
        fds.kernel,
        &format!("kernel {}", spec.kernel.display()),
        read,
    )?;
    let initrd = match (fds.initrd, &spec.initrd) {
        (Some(fd), Some(path)) => Some(adopt(fd, &format!("initramfs {}", path.display()), read)?),
        _ => None,
    };
    let mut disks = Vec::with_capacity(spec.disks.len());
    for (disk, fd) in spec.disks.iter().zip(&fds.disks) {
        let what = format!("disk {} {}", disk.id, disk.path.display());
        let file = adopt(
            *fd,
            &what,
            Inherited::File {
                writable: !disk.read_only,
            },
        )?;
        disks.push(BlockConfig {
            file: file.into(),
            read_only: disk.read_only,
            id: disk.id.clone(),
        });
    }
    let files = BootFiles {
        kernel: kernel.into(),
        initrd: initrd.map(File::from),
        disks,
    };
    Ok((channel.into(), control.into(), files))
}

/// Takes the inherited descriptor `fd` (named `what` in errors), after checking it is what
/// `expected` says: the number came over a pipe, and what it names is checked before it is
/// trusted.
#[allow(unsafe_code)]
fn adopt(fd: RawFd, what: &str, expected: Inherited) -> Result<OwnedFd, JailError> {
    let bad = |reason: &str| JailError::Setup {
        step: "inherited descriptor",
        reason: format!("{what}: descriptor {fd}: {reason}"),
    };
    if fd <= 2 {
        return Err(bad("not an inherited descriptor"));
    }
    // SAFETY: only borrowed for fstat and fcntl, which fail cleanly on a closed descriptor.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let stat = rustix::fs::fstat(borrowed).map_err(|e| bad(&io::Error::from(e).to_string()))?;
    let file_type = FileType::from_raw_mode(stat.st_mode);
    match expected {
        Inherited::Socket if file_type != FileType::Socket => return Err(bad("not a socket")),
        Inherited::Socket => {}
        Inherited::File { writable } => {
            if file_type != FileType::RegularFile {
                return Err(bad("not a regular file"));
            }
            let flags = rustix::fs::fcntl_getfl(borrowed)
                .map_err(|e| bad(&io::Error::from(e).to_string()))?;
            let (wanted, access) = if writable {
                (OFlags::RDWR, "open for reading and writing")
            } else {
                (OFlags::RDONLY, "open for reading only")
            };
            if flags.contains(OFlags::PATH) || flags & OFlags::RWMODE != wanted {
                return Err(bad(&format!("not {access}")));
            }
        }
    }
    // SAFETY: the descriptor is open (fstat succeeded), of the kind expected, inherited from
    // the runner for this purpose, and owned by nothing else in this process (`adopt_all`
    // takes each number once).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// New mount, PID, IPC, network and UTS namespaces: the VMM sees none of the host's mounts,
/// processes, System V IPC, network interfaces or host name. The PID namespace applies to the
/// children made after it ([`become_pid_one`]).
#[allow(unsafe_code)]
fn unshare_namespaces() -> Result<(), JailError> {
    let flags = UnshareFlags::NEWNS
        | UnshareFlags::NEWPID
        | UnshareFlags::NEWIPC
        | UnshareFlags::NEWNET
        | UnshareFlags::NEWUTS;
    // SAFETY: no descriptor table is unshared (no `FILES`), and this process has one thread.
    unsafe { rustix::thread::unshare_unsafe(flags) }.map_err(|e| JailError::Setup {
        step: "unshare (mount, pid, ipc, net, uts)",
        reason: io::Error::from(e).to_string(),
    })
}

/// Forks once: the child is PID 1 of the new PID namespace (so it sees no other process, and
/// everything it could start dies with it) and goes on; this process waits for it and exits
/// with its status. The child dies with this process (`PR_SET_PDEATHSIG`), as this one does
/// with the runner ([`die_with_parent`]). Returns, in the child, its end of a pipe only the
/// parent holds open: a hang-up on it means the parent is gone.
#[allow(unsafe_code)]
fn become_pid_one() -> Result<io::PipeReader, JailError> {
    let (alive, parent_holds) = io::pipe().map_err(JailError::setup("fork"))?;
    // SAFETY: this process has one thread (the VMM's start later), so the child may do
    // anything after the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(JailError::setup("fork")(io::Error::last_os_error()));
    }
    if pid == 0 {
        drop(parent_holds);
        die_with_parent(&alive)?;
        return Ok(alive);
    }
    drop(alive);
    let pid = rustix::process::Pid::from_raw(pid).ok_or_else(|| JailError::Setup {
        step: "fork",
        reason: "no process id".into(),
    })?;
    let status = loop {
        match rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty()) {
            Ok(Some((_, status))) => break status,
            Err(rustix::io::Errno::INTR) | Ok(None) => continue,
            Err(_) => std::process::exit(SETUP_FAILED),
        }
    };
    let code = match (status.exit_status(), status.terminating_signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => SETUP_FAILED,
    };
    drop(parent_holds);
    std::process::exit(code)
}

/// Arms `PR_SET_PDEATHSIG` (SIGKILL when the parent dies), then checks the parent did not die
/// before: it still holds its end of the pipe `alive` (`getppid` cannot tell, it is 0 in the
/// new namespace either way). Called again after the uid drop, which clears the signal.
fn die_with_parent(alive: &io::PipeReader) -> Result<(), JailError> {
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
    let mut fds = [rustix::event::PollFd::new(
        alive,
        rustix::event::PollFlags::IN,
    )];
    rustix::event::poll(&mut fds, Some(&rustix::time::Timespec::default()))?;
    if fds[0].revents().contains(rustix::event::PollFlags::HUP) {
        return Err(JailError::Setup {
            step: "fork",
            reason: "the parent died before the child was armed to die with it".into(),
        });
    }
    Ok(())
}

/// Builds the jail root on `root`: mount propagation made private first (nothing done here
/// reaches the host's namespace, nothing of the host's arrives later), then a tmpfs (nosuid,
/// noexec, a few KiB) holding only `dev/kvm`, made as a device node the jail's uid owns — the
/// host's node stays root's. The artifacts are not in it: the VMM has them as inherited
/// descriptors.
fn build_root(root: &Path, jail: Jail) -> Result<(), JailError> {
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
    )?;
    rustix::mount::mount(
        "tmpfs",
        root,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NOEXEC,
        Some(c"mode=0755,size=64k,nr_inodes=64"),
    )?;
    // Traversable by the jail's uid whatever the umask.
    let dev = root.join("dev");
    std::fs::create_dir(&dev).map_err(JailError::setup("dev"))?;
    std::fs::set_permissions(&dev, std::fs::Permissions::from_mode(0o755))
        .map_err(JailError::setup("dev"))?;
    let kvm = rustix::fs::stat("/dev/kvm")?;
    let node = dev.join("kvm");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &node,
        FileType::CharacterDevice,
        Mode::RUSR | Mode::WUSR,
        kvm.st_rdev,
    )?;
    rustix::fs::chown(
        &node,
        Some(Uid::from_raw(jail.uid)),
        Some(Gid::from_raw(jail.gid)),
    )?;
    Ok(())
}

/// Makes `root` this process's `/`: `pivot_root` with the old root stacked under the new one,
/// then detached, so no path leads back to the host's files; the jail's tmpfs is then made
/// read-only.
fn enter_root(root: &Path) -> Result<(), JailError> {
    std::env::set_current_dir(root).map_err(JailError::setup("chdir"))?;
    rustix::process::pivot_root(".", ".")?;
    rustix::mount::unmount(".", UnmountFlags::DETACH)?;
    std::env::set_current_dir("/").map_err(JailError::setup("chdir"))?;
    rustix::mount::mount_remount(
        "/",
        MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NOEXEC,
        c"",
    )?;
    Ok(())
}

/// Resource limits, soft and hard alike (an unprivileged process cannot raise them again): no
/// core dumps (guest memory would be in them), at most [`MAX_FILES`] descriptors, and no file
/// written beyond the largest writable disk's size (0 when every disk is read-only; the VMM
/// writes nothing else). No process limit: it counts every process of the uid on the host,
/// and the PID namespace and the VMM's seccomp filters already keep the VMM from starting
/// processes.
fn set_limits(files: &BootFiles) -> Result<(), JailError> {
    let mut largest_write = 0;
    for disk in files.disks.iter().filter(|disk| !disk.read_only) {
        let size = disk
            .file
            .metadata()
            .map_err(JailError::setup("disk size"))?
            .len();
        largest_write = largest_write.max(size);
    }
    for (resource, limit) in [
        (Resource::Core, 0),
        (Resource::Nofile, MAX_FILES),
        (Resource::Fsize, largest_write),
    ] {
        rustix::process::setrlimit(
            resource,
            Rlimit {
                current: Some(limit),
                maximum: Some(limit),
            },
        )?;
    }
    Ok(())
}

/// Drops to the jail's identity: no supplementary groups, then gid, then uid (real, effective
/// and saved — with all three non-zero the kernel clears every capability). Checks root cannot
/// be regained, then sets `no_new_privs` (no exec can grant anything again). One thread:
/// the per-thread calls are the process's.
fn drop_privileges(jail: Jail) -> Result<(), JailError> {
    let (uid, gid) = (Uid::from_raw(jail.uid), Gid::from_raw(jail.gid));
    rustix::thread::set_thread_groups(&[])?;
    rustix::thread::set_thread_res_gid(gid, gid, gid)?;
    rustix::thread::set_thread_res_uid(uid, uid, uid)?;
    if rustix::thread::set_thread_res_uid(Uid::ROOT, Uid::ROOT, Uid::ROOT).is_ok()
        || rustix::thread::set_thread_res_gid(Gid::ROOT, Gid::ROOT, Gid::ROOT).is_ok()
    {
        return Err(JailError::Setup {
            step: "dropping privileges",
            reason: "root could be regained".into(),
        });
    }
    rustix::thread::set_no_new_privs(true)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::IntoRawFd;
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

    /// What [`adopt`] says of the descriptor `fd` expected as `expected`: its error's code
    /// and message, or nothing if it took it (then closed here).
    fn adopted(fd: RawFd, expected: Inherited) -> Result<(), (&'static str, String)> {
        adopt(fd, "disk vda /d", expected)
            .map(drop)
            .map_err(|e| (e.code(), e.to_string()))
    }

    #[test]
    fn an_inherited_descriptor_is_checked_before_it_is_trusted() {
        let read = Inherited::File { writable: false };
        let write = Inherited::File { writable: true };
        let refused = |fd, expected, why: &str| {
            let (code, message) = adopted(fd, expected).unwrap_err();
            assert_eq!(code, "RUN046");
            let prefix = format!("jail: inherited descriptor: disk vda /d: descriptor {fd}: ");
            assert!(message.starts_with(&prefix), "{message}");
            assert!(message.ends_with(why), "{message}");
        };
        refused(0, read, "not an inherited descriptor");
        // Far above any descriptor a test opens: closed.
        refused(1 << 20, read, "Bad file descriptor (os error 9)");
        let (pipe, _writer) = io::pipe().unwrap();
        refused(pipe.as_raw_fd(), read, "not a regular file");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, b"disk").unwrap();
        let dir_fd = File::open(dir.path()).unwrap();
        refused(dir_fd.as_raw_fd(), read, "not a regular file");
        let read_write = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        refused(read_write.as_raw_fd(), read, "not open for reading only");
        let read_only = File::open(&path).unwrap();
        refused(
            read_only.as_raw_fd(),
            write,
            "not open for reading and writing",
        );
        refused(read_only.as_raw_fd(), Inherited::Socket, "not a socket");
        let (socket, _peer) = UnixStream::pair().unwrap();
        refused(socket.as_raw_fd(), read, "not a regular file");

        // What is right is taken, and owned from then on (closed when dropped).
        assert_eq!(adopted(socket.into_raw_fd(), Inherited::Socket), Ok(()));
        assert_eq!(adopted(read_only.into_raw_fd(), read), Ok(()));
        assert_eq!(adopted(read_write.into_raw_fd(), write), Ok(()));
    }

    #[test]
    fn descriptors_given_twice_or_for_other_artifacts_are_refused_before_any_is_taken() {
        let spec = VmSpec {
            vcpus: 1,
            memory_mib: 64,
            kernel: "/k".into(),
            initrd: None,
            cmdline: String::new(),
            disks: vec![mvm_vmm::DiskSpec {
                path: "/d".into(),
                read_only: true,
                id: "root".into(),
            }],
            rng: false,
            huge_pages: false,
        };
        let child = |channel_fd, artifact_fds| ChildConfig {
            jail: Jail { uid: 1, gid: 1 },
            root: "/jail".into(),
            spec: spec.clone(),
            channel_fd,
            control_fd: 11,
            artifact_fds,
        };
        let refusal = |config: &ChildConfig| {
            let e = adopt_all(config).unwrap_err();
            (e.code(), e.to_string())
        };
        let twice = child(
            7,
            ArtifactFds {
                kernel: 8,
                initrd: None,
                disks: vec![7],
            },
        );
        assert_eq!(
            refusal(&twice),
            (
                "RUN046",
                "jail: inherited descriptors: descriptor 7 given twice".into()
            )
        );
        // The control socket's number given again for an artifact.
        let control_twice = child(
            7,
            ArtifactFds {
                kernel: 11,
                initrd: None,
                disks: vec![8],
            },
        );
        assert!(refusal(&control_twice)
            .1
            .ends_with("descriptor 11 given twice"));
        let other = child(
            7,
            ArtifactFds {
                kernel: 8,
                initrd: Some(9),
                disks: vec![10],
            },
        );
        let (code, message) = refusal(&other);
        assert_eq!(code, "RUN046");
        assert!(
            message.contains("1 initramfs, for a VM of 1 and 0"),
            "{message}"
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
