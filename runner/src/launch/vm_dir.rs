//! The VM's private state directory under `$MVM_HOME/vms`, and what of it outlives the launch.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;

use mvm_ir::fsutil::ExclusiveLock;
use mvm_ir::home::MvmHome;

use super::{LaunchError, SERIAL_LOG};
use crate::cold::{self, ColdError};
use crate::state;

/// What a VM's directory keeps when the launch ends.
pub(super) enum Keep {
    /// Nothing: a one-shot run that went well.
    Nothing,
    /// The console log, for the report of a failed run.
    Log,
    /// A named VM's record (state, console log, lock) until `mvm rm`; the directory is
    /// `vms/<name>`.
    Record(String),
}

/// The VM's private state directory, `$MVM_HOME/vms/<id or name>` (mode 0700): the copies of
/// the kernel and initramfs that boot, the agent socket, the console log, and for a named VM
/// its state, lock and control socket. When dropped, what [`Keep`] says stays; the rest goes.
pub(super) struct VmDir {
    pub(super) path: PathBuf,
    pub(super) keep: Keep,
    /// A named VM's lock, held for the runner's life.
    pub(super) _lock: Option<ExclusiveLock>,
}

impl VmDir {
    pub(super) fn create(home: &MvmHome, vm: &str, keep: Keep) -> Result<Self, LaunchError> {
        let vms = home.ensure("vms").map_err(LaunchError::Audit)?;
        let path = match &keep {
            Keep::Record(name) => vms.join(name),
            _ => vms.join(vm),
        };
        DirBuilder::new().mode(0o700).create(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                LaunchError::NameInUse(
                    path.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                )
            } else {
                LaunchError::host(format!("creating {}", path.display()))(e)
            }
        })?;
        let lock = match &keep {
            Keep::Record(name) => Some(
                ExclusiveLock::try_acquire(&path.join(state::LOCK_FILE))
                    .map_err(LaunchError::Audit)?
                    .ok_or_else(|| LaunchError::NameInUse(name.clone()))?,
            ),
            _ => None,
        };
        Ok(Self {
            path,
            keep,
            _lock: lock,
        })
    }

    /// Takes over the directory of the named VM `name`, which its last runner left: holds
    /// its lock, as that runner did.
    pub(super) fn reopen(home: &MvmHome, name: &str) -> Result<Self, LaunchError> {
        let path = home.ensure("vms").map_err(LaunchError::Audit)?.join(name);
        if !path.join(state::STATE_FILE).exists() {
            return Err(ColdError::Wake(format!("there is no VM named {name}")).into());
        }
        let lock = ExclusiveLock::try_acquire(&path.join(state::LOCK_FILE))
            .map_err(LaunchError::Audit)?
            .ok_or_else(|| ColdError::Wake(format!("a runner holds {name} already")))?;
        Ok(Self {
            path,
            keep: Keep::Record(name.to_string()),
            _lock: Some(lock),
        })
    }

    /// The VM's name, for a named VM.
    pub(super) fn name(&self) -> Option<&str> {
        match &self.keep {
            Keep::Record(name) => Some(name),
            _ => None,
        }
    }

    /// Writes `bytes` (already hashed) to a new file only the runner can read.
    pub(super) fn private_copy(&self, name: &str, bytes: &[u8]) -> Result<PathBuf, LaunchError> {
        let path = self.path.join(name);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(LaunchError::host(format!("writing {}", path.display())))?;
        file.write_all(bytes)
            .map_err(LaunchError::host(format!("writing {}", path.display())))?;
        Ok(path)
    }

    /// The console log: new, or for a woken VM the one it had, continued.
    pub(super) fn serial_log(&self, continued: bool) -> Result<File, LaunchError> {
        let path = self.path.join(SERIAL_LOG);
        let mut options = OpenOptions::new();
        match continued {
            true => options.append(true).create(true),
            false => options.write(true).create_new(true),
        };
        options
            .mode(0o600)
            .open(&path)
            .map_err(LaunchError::host(format!("creating {}", path.display())))
    }

    /// Keeps the console log for the failure report; returns its path.
    pub(super) fn keep_log(mut self) -> Option<PathBuf> {
        let log = self.path.join(SERIAL_LOG);
        if matches!(self.keep, Keep::Nothing) {
            self.keep = Keep::Log;
        }
        log.exists().then_some(log)
    }
}

impl Drop for VmDir {
    fn drop(&mut self) {
        // A named VM that never got a state file never started: nothing to keep, and its
        // name must not stay taken.
        let unrecorded = !self.path.join(state::STATE_FILE).exists();
        let kept: &[&str] = match self.keep {
            Keep::Nothing => &[],
            Keep::Record(_) if unrecorded => &[],
            Keep::Log => &[SERIAL_LOG],
            Keep::Record(_) => &[
                SERIAL_LOG,
                state::STATE_FILE,
                state::LOCK_FILE,
                state::RUNNER_LOG,
                state::CLIENT_RECORD,
                cold::COLD_DIR,
            ],
        };
        if kept.is_empty() {
            let _ = fs::remove_dir_all(&self.path);
            return;
        }
        if let Ok(entries) = fs::read_dir(&self.path) {
            for entry in entries.flatten() {
                if !kept.iter().any(|name| entry.file_name() == *name) {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::state::{Phase, VmState};
    use mvm_ir::Coded;

    fn mode(path: &std::path::Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn record(dir: &VmDir, name: &str) {
        let state = VmState {
            name: name.into(),
            vm: "vm-1".into(),
            plan_digest: "sha256:00".into(),
            runner_pid: std::process::id(),
            phase: Phase::Running,
            backend: None,
            reason: None,
            started_at: "2026-12-04T00:00:00Z".into(),
            boot_snapshot: None,
        };
        state::write(&dir.path, &state).unwrap();
    }

    #[test]
    fn a_one_shot_run_leaves_nothing_and_a_failed_one_only_its_log() {
        let home = tempfile::tempdir().unwrap();
        let home = MvmHome::at(home.path());
        let dir = VmDir::create(&home, "vm-a", Keep::Nothing).unwrap();
        assert_eq!(mode(&dir.path), 0o700);
        let kernel = dir.private_copy("vmlinuz", b"kernel bytes").unwrap();
        assert_eq!(mode(&kernel), 0o600);
        assert_eq!(fs::read(&kernel).unwrap(), b"kernel bytes");
        // A copy is new or refused: nothing already there is overwritten.
        assert!(dir.private_copy("vmlinuz", b"other").is_err());
        let path = dir.path.clone();
        drop(dir);
        assert!(!path.exists());

        let dir = VmDir::create(&home, "vm-b", Keep::Nothing).unwrap();
        dir.serial_log(false).unwrap().write_all(b"boot\n").unwrap();
        dir.private_copy("initrd", b"i").unwrap();
        let log = dir.keep_log().unwrap();
        assert_eq!(fs::read(&log).unwrap(), b"boot\n");
        let left: Vec<_> = fs::read_dir(log.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [SERIAL_LOG]);
    }

    #[test]
    fn a_named_vm_holds_its_name_and_keeps_its_record_only_once_recorded() {
        let home = tempfile::tempdir().unwrap();
        let home = MvmHome::at(home.path());
        let keep = || Keep::Record("web".into());
        let dir = VmDir::create(&home, "vm-1", keep()).unwrap();
        assert_eq!(dir.name(), Some("web"));
        assert!(dir.path.ends_with("vms/web"));
        let taken = VmDir::create(&home, "vm-2", keep()).err().unwrap();
        assert_eq!(taken.code(), "RUN034");
        // Never recorded: it never started, and its name is free again.
        drop(dir);
        assert!(!home.root().join("vms/web").exists());

        let dir = VmDir::create(&home, "vm-3", keep()).unwrap();
        record(&dir, "web");
        dir.serial_log(false).unwrap();
        dir.private_copy("vmlinuz", b"k").unwrap();
        // While its runner holds it, nobody else takes it over.
        let held = VmDir::reopen(&home, "web").err().unwrap();
        assert_eq!(held.code(), "RUN042");
        let path = dir.path.clone();
        drop(dir);
        let mut left: Vec<_> = fs::read_dir(&path)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, [state::LOCK_FILE, SERIAL_LOG, state::STATE_FILE]);
        // Its last runner gone, a new one takes it over (to wake it), appending to its log.
        let again = VmDir::reopen(&home, "web").unwrap();
        again
            .serial_log(true)
            .unwrap()
            .write_all(b"woken\n")
            .unwrap();
        assert_eq!(fs::read(path.join(SERIAL_LOG)).unwrap(), b"woken\n");
        assert_eq!(
            VmDir::reopen(&home, "nobody").err().unwrap().code(),
            "RUN042"
        );
    }
}
