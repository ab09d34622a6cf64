//! A named VM's state on disk, `$MVM_HOME/vms/<name>/state.json`: written atomically by the
//! runner that owns the VM, which holds `vms/<name>/lock` for as long as it lives. A reader
//! that finds the state still `starting` or `running` but the lock free knows the runner died
//! without saying so (killed, say), and sees the VM as `failed`.

use std::path::{Path, PathBuf};

use mvm_ir::fsutil::{atomic_write, read_capped, ExclusiveLock};
use serde::{Deserialize, Serialize};

use crate::backend::select::Backend;

/// The state file's name in the VM's directory.
pub const STATE_FILE: &str = "state.json";
/// The lock the owning runner holds.
pub const LOCK_FILE: &str = "lock";
/// Where the owning runner writes once the VM is up (its terminal is gone by then).
pub const RUNNER_LOG: &str = "runner.log";
/// What a client keeps beside the VM (the local API's sandbox record: labels, environment,
/// clock): the runner leaves it in place when it ends, and it goes with the VM.
pub const CLIENT_RECORD: &str = "client.json";
/// The control socket the owning runner serves.
pub const CONTROL_SOCKET: &str = "control.sock";

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Booting: the plan was admitted, the agent has not said hello yet.
    Starting,
    /// The agent answered; commands can run.
    Running,
    /// Its vCPUs are stopped (`mvm pause`); memory and devices are kept, commands wait for
    /// `mvm resume`.
    Paused,
    /// Saved to its directory with its runner gone (`mvm pause --cold`); `mvm resume` wakes
    /// it with a new runner.
    Cold,
    /// Powered off on request.
    Stopped,
    /// Ended by a failure (see the reason).
    Failed,
}

impl Phase {
    /// Whether a runner owns the VM in this phase (it has not ended).
    pub fn is_live(self) -> bool {
        matches!(self, Phase::Starting | Phase::Running | Phase::Paused)
    }

    /// The phase's name, as `mvm ls` shows it.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Paused => "paused",
            Phase::Cold => "cold",
            Phase::Stopped => "stopped",
            Phase::Failed => "failed",
        }
    }
}

/// What the state file says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// The VM's name.
    pub name: String,
    /// Its id (as in audit entries).
    pub vm: String,
    /// The admitted plan's digest.
    pub plan_digest: String,
    /// The runner's process id.
    pub runner_pid: u32,
    /// Where it is.
    pub phase: Phase,
    /// The backend that runs it (absent from state files written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<Backend>,
    /// Why it failed or stopped, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the runner started it (RFC 3339).
    pub started_at: String,
    /// The boot snapshot its guest was restored from; absent when it booted (or woke).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_snapshot: Option<String>,
}

/// Why a VM's state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file could not be read or written.
    #[error(transparent)]
    Io(#[from] mvm_ir::Error),
    /// It is not a state file.
    #[error("{path}: not a VM state file: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Whether `name` can name a VM: 1–63 of `a-z 0-9 _ . -`, starting with a letter or digit.
pub fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-'))
}

/// Writes the state file in `dir` (whole or not at all).
pub fn write(dir: &Path, state: &VmState) -> Result<(), StateError> {
    let bytes = serde_json::to_vec_pretty(state).map_err(|e| StateError::Corrupt {
        path: dir.join(STATE_FILE),
        reason: e.to_string(),
    })?;
    Ok(atomic_write(&dir.join(STATE_FILE), &bytes, 0o600)?)
}

/// Reads the state file in `dir` as it is.
pub fn read(dir: &Path) -> Result<VmState, StateError> {
    let path = dir.join(STATE_FILE);
    let bytes = read_capped(&path, 64 * 1024, "VM state")?;
    serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
        path,
        reason: e.to_string(),
    })
}

/// The state of the VM in `dir` as it really is: a VM whose runner is gone while the file
/// still says `starting`, `running` or `paused` is `failed`.
pub fn observe(dir: &Path) -> Result<VmState, StateError> {
    let mut state = read(dir)?;
    if state.phase.is_live() && ExclusiveLock::try_acquire(&dir.join(LOCK_FILE))?.is_some() {
        state.phase = Phase::Failed;
        state.reason = Some("its runner exited without stopping it (killed?)".into());
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(phase: Phase) -> VmState {
        VmState {
            name: "web".into(),
            vm: "vm-0123456789ab".into(),
            plan_digest: format!("sha256:{}", "0".repeat(64)),
            runner_pid: 42,
            phase,
            backend: Some(Backend::Kvm),
            reason: None,
            started_at: "2026-11-29T00:00:00Z".into(),
            boot_snapshot: None,
        }
    }

    #[test]
    fn a_running_vm_whose_runner_is_gone_is_failed() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &state(Phase::Running)).unwrap();
        let held = ExclusiveLock::acquire(&dir.path().join(LOCK_FILE)).unwrap();
        assert_eq!(observe(dir.path()).unwrap().phase, Phase::Running);
        drop(held);
        let seen = observe(dir.path()).unwrap();
        assert_eq!(seen.phase, Phase::Failed);
        assert!(seen.reason.unwrap().contains("runner"));
        // A stopped VM stays stopped without a runner.
        write(dir.path(), &state(Phase::Stopped)).unwrap();
        assert_eq!(observe(dir.path()).unwrap().phase, Phase::Stopped);
    }

    #[test]
    fn names_are_checked_and_bad_state_files_refused() {
        for good in ["web", "a", "ci-1.2_x"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", "-x", "Web", "a/b", "..", &"a".repeat(64)] {
            assert!(!valid_name(bad), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"{\"name\":1}").unwrap();
        assert!(matches!(read(dir.path()), Err(StateError::Corrupt { .. })));
    }
}
