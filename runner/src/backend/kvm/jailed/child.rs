//! The jailed child (`mvm-runner --vmm-child`): takes its inherited descriptors, builds and
//! enters its jail, drops every privilege, then runs the VMM on the inherited files and
//! answers the runner's control requests until the guest ends.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use rustix::fs::{FileType, Gid, Mode, OFlags, Uid};
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use rustix::process::{Resource, Rlimit};
use rustix::thread::UnshareFlags;

use super::control::serve_control;
use super::{exit_code, ChildConfig, Jail, JailError, MAX_FILES, SETUP_FAILED};
use crate::backend::kvm::agent_port;
use mvm_vmm::{self as vmm, BlockConfig, BootFiles, GuestExit};

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
    use std::os::fd::{AsRawFd, IntoRawFd};

    use super::*;
    use crate::backend::kvm::jailed::ArtifactFds;
    use mvm_vmm::VmSpec;

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
}
