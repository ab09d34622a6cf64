//! A cgroup of its own for every command: what a command leaves behind is exactly what is
//! left in its cgroup, however it got away from the command's process group (`setsid`, a
//! double fork, a chain of them). The command enters its cgroup between its fork and its exec,
//! so nothing it runs starts outside; it cannot leave, as moving a process needs write access
//! to `cgroup.procs` files that belong to root. `cgroup.kill` (Linux 5.14) kills the whole
//! cgroup at once, forks in progress included, so no sweep has to race a fork bomb.
//!
//! The cgroup is removed once it is empty; until then it is killed again at each try.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Where the commands' cgroups are made: a directory of a cgroup2 file system.
#[derive(Debug)]
pub struct CommandGroups {
    parent: PathBuf,
    next: u64,
}

impl CommandGroups {
    /// Commands' cgroups in `parent`, which must be a cgroup2 directory (its children must
    /// have `cgroup.kill`, which [`CommandGroups::create`] opens).
    pub fn new(parent: &Path) -> io::Result<Self> {
        if !parent.join("cgroup.procs").exists() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{} is not a cgroup directory", parent.display()),
            ));
        }
        Ok(Self {
            parent: parent.to_path_buf(),
            next: 1,
        })
    }

    /// A new, empty cgroup for one command (root's, 0755: the command cannot write to it).
    pub fn create(&mut self) -> io::Result<CommandGroup> {
        let dir = loop {
            let dir = self.parent.join(format!("command-{}", self.next));
            self.next += 1;
            match DirBuilder::new().mode(0o755).create(&dir) {
                Ok(()) => break dir,
                // Left by an agent before this one (a test's, on a host): a fresh name.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        };
        let open = |file: &str| {
            OpenOptions::new()
                .write(true)
                .custom_flags(rustix::fs::OFlags::CLOEXEC.bits() as i32)
                .open(dir.join(file))
        };
        match (open("cgroup.procs"), open("cgroup.kill")) {
            (Ok(procs), Ok(kill)) => Ok(CommandGroup { dir, procs, kill }),
            (Err(e), _) | (_, Err(e)) => {
                let _ = fs::remove_dir(&dir);
                Err(e)
            }
        }
    }
}

/// One command's cgroup.
#[derive(Debug)]
pub struct CommandGroup {
    dir: PathBuf,
    /// Open for writing by the agent: the command writes `0` to it to enter, after it has
    /// become the workload user (the kernel checks the opener's rights, not the writer's).
    procs: File,
    kill: File,
}

impl CommandGroup {
    /// The descriptor a new process writes `0` to, to enter ([`enter`]).
    pub fn procs_fd(&self) -> RawFd {
        self.procs.as_fd().as_raw_fd()
    }

    /// Kills every process in it.
    pub fn kill(&self) {
        let _ = (&self.kill).write_all(b"1");
    }

    /// Kills what is left in it and removes it once it is empty; whether it is gone.
    pub fn try_remove(&self) -> bool {
        self.kill();
        match fs::remove_dir(&self.dir) {
            Ok(()) => true,
            Err(e) => e.kind() == io::ErrorKind::NotFound,
        }
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// A cgroup given up on (a spawn that failed, a VM powering off) is still killed, and
/// removed if it is empty.
impl Drop for CommandGroup {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is open as `procs`. Called
/// in a new process between fork and exec: one system call, no allocation.
#[allow(unsafe_code)]
pub fn enter(procs: RawFd) -> io::Result<()> {
    // SAFETY: `procs` is the descriptor of a `CommandGroup` that outlives the spawn: the
    // parent holds it open until the child has exec'd (or failed to), and the child's copy
    // is closed by the exec (CLOEXEC).
    let procs = unsafe { std::os::fd::BorrowedFd::borrow_raw(procs) };
    rustix::io::write(procs, b"0")?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A cgroup2 directory of this host to make commands' cgroups in, or why there is none.
    pub(crate) fn host_cgroup() -> Result<tempfile::TempDir, String> {
        let mounts = fs::read_to_string("/proc/self/mounts").map_err(|e| e.to_string())?;
        let root = mounts
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let (_, at, kind) = (fields.next(), fields.next()?, fields.next()?);
                (kind == "cgroup2").then(|| PathBuf::from(at))
            })
            .next()
            .ok_or("no cgroup2 file system is mounted")?;
        let parent = tempfile::Builder::new()
            .prefix("mvm-agent-test-")
            .tempdir_in(&root)
            .map_err(|e| format!("cannot make a cgroup in {}: {e}", root.display()))?;
        match parent.path().join("cgroup.kill").exists() {
            true => Ok(parent),
            false => Err("this kernel's cgroups have no cgroup.kill".into()),
        }
    }

    #[test]
    fn a_directory_that_is_no_cgroup_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let error = CommandGroups::new(dir.path()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::Unsupported);
    }

    #[test]
    fn every_process_a_command_leaves_behind_is_killed_and_its_cgroup_removed() {
        let parent = match host_cgroup() {
            Ok(parent) => parent,
            Err(why) => {
                eprintln!("skipped: {why}: the cgroup containment is shown in a guest only");
                return;
            }
        };
        let mut groups = CommandGroups::new(parent.path()).unwrap();
        let group = groups.create().unwrap();
        let second = groups.create().unwrap();
        assert_ne!(group.dir(), second.dir());
        // Sixteen chains, each forking its successor into a new session and exiting: no
        // process group or pid to chase.
        let chain = "touch \"$0\"; sleep 0.05; setsid sh -c \"$1\" \"$0\" \"$1\" &";
        let heartbeat = tempfile::NamedTempFile::new().unwrap();
        let script = format!(
            "for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16; do \
             setsid sh -c '{chain}' '{}' '{chain}' & done",
            heartbeat.path().display()
        );
        let procs = group.procs_fd();
        let mut command = std::process::Command::new("sh");
        command.args(["-c", &script]);
        // SAFETY: `enter` makes one system call and allocates nothing.
        #[allow(unsafe_code)]
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || enter(procs));
        }
        assert!(command.status().unwrap().success());
        std::thread::sleep(std::time::Duration::from_millis(300));
        let members = fs::read_to_string(group.dir().join("cgroup.procs")).unwrap();
        assert!(!members.trim().is_empty(), "the chains run in the cgroup");

        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !group.try_remove() {
            assert!(
                std::time::Instant::now() < deadline,
                "the cgroup never emptied"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!group.dir().exists());
        let beat = || fs::metadata(heartbeat.path()).unwrap().modified().unwrap();
        let stopped = beat();
        std::thread::sleep(std::time::Duration::from_millis(500));
        assert_eq!(beat(), stopped, "a chain still beats");
        assert!(second.try_remove());
    }
}
