//! A named VM's life as its clients see it: started by a runner process that stays up to
//! serve it, reached through its control socket, stopped, woken, removed. The CLI's verbs
//! (`mvm up`, `exec`, `pause`, `resume`, `stop`, `rm`, `wait`, `ls`) are thin over this type,
//! and so are the local API and SDKs that build on it.
//!
//! A VM lives in `$MVM_HOME/vms/<name>`: its state file (written by its runner), its lock
//! (held by its runner while it serves the VM), its control socket, its console log, and its
//! cold state once saved. Everything here reads the state as it really is
//! ([`state::observe`]: a live state whose runner is gone is `failed`), and waits by polling
//! it, each wait with a deadline.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mvm_ir::audit::HostAudit;
use mvm_ir::fsutil::ExclusiveLock;
use mvm_ir::home::MvmHome;
use mvm_ir::ErrorClass;
use serde_json::{json, Value};

use crate::client::{AgentClient, ClientError};
use crate::codes;
use crate::cold;
use crate::state::{self, Phase, VmState};

mod command;
#[cfg(test)]
mod tests;

pub use command::Ran;

/// How long a runner has to let go of a VM it was told to stop or save.
pub const STOP_WAIT: Duration = Duration::from_secs(30);
/// How often a wait looks at the state again.
const POLL: Duration = Duration::from_millis(50);
/// How long the agent has to acknowledge a power-off.
const POWER_OFF_ANSWER: Duration = Duration::from_secs(10);
/// How long the runner has to pause or resume the vCPUs.
const PAUSE_ANSWER: Duration = Duration::from_secs(30);
/// How long a cold save may take: it writes the guest's memory, up to its size at disk speed.
const SAVE_ANSWER: Duration = Duration::from_secs(300);

/// Why a named VM could not be reached or changed. Codes are stable (`docs/errors.md`).
#[derive(Debug, thiserror::Error)]
pub enum NamedVmError {
    /// A name a VM cannot have.
    #[error("{0:?} cannot name a VM: use 1-63 of a-z 0-9 _ . -, starting with a letter or digit")]
    BadName(String),
    /// The name is taken.
    #[error("a VM named {0} exists already; remove it with `mvm rm {0}` first")]
    Exists(String),
    /// No VM has the name, or it is not in a state that allows what was asked.
    #[error("{0}")]
    Unavailable(String),
    /// The VM is live and removing it was not forced.
    #[error("{name} is {phase}: stop it first, or `mvm rm --force`")]
    Live {
        /// The VM.
        name: String,
        /// Where it is.
        phase: &'static str,
    },
    /// The agent refused the request; its own code and message.
    #[error("{}", .0.message)]
    Refused(mvm_protocol::ErrorReply),
    /// The channel to the VM failed.
    #[error(transparent)]
    Channel(ClientError),
    /// The runner exited before the VM was ready, with this status; what it said.
    #[error("the runner exited with status {status} before the VM was ready: {stderr}")]
    RunnerFailed {
        /// Its exit status (125 if it had none).
        status: u8,
        /// Its standard error.
        stderr: String,
    },
    /// The host failed (a file, a lock, the audit chain, a process).
    #[error("{what}: {reason}")]
    Host {
        /// What was being done.
        what: String,
        /// Why it failed.
        reason: String,
    },
}

impl NamedVmError {
    /// The stable code of this error (an agent's refusal keeps the agent's); none for a
    /// failure of the host, and for a runner that failed (it printed its own code).
    pub fn code(&self) -> Option<&str> {
        match self {
            NamedVmError::BadName(_) => Some(codes::RUN035),
            NamedVmError::Exists(_) => Some(codes::RUN034),
            NamedVmError::Unavailable(_) => Some(codes::RUN036),
            NamedVmError::Live { .. } => Some(codes::RUN037),
            NamedVmError::Refused(refusal) => Some(&refusal.code),
            NamedVmError::Channel(_) => Some(codes::RUN025),
            NamedVmError::RunnerFailed { .. } | NamedVmError::Host { .. } => None,
        }
    }

    /// The class that goes with [`NamedVmError::code`] (this type is not [`mvm_ir::Coded`]:
    /// some of its errors have no code). A broken channel (RUN025) is I/O, and so are the
    /// errors without a code (a failed runner, the host), whose class goes unused; a name, a
    /// state or a request the VM cannot take — the agent's or the runner's refusal — is
    /// invalid input.
    pub fn class(&self) -> ErrorClass {
        match self {
            NamedVmError::Channel(_)
            | NamedVmError::RunnerFailed { .. }
            | NamedVmError::Host { .. } => ErrorClass::Io,
            NamedVmError::BadName(_)
            | NamedVmError::Exists(_)
            | NamedVmError::Unavailable(_)
            | NamedVmError::Live { .. }
            | NamedVmError::Refused(_) => ErrorClass::InvalidInput,
        }
    }

    fn host(what: impl Into<String>) -> impl FnOnce(String) -> NamedVmError {
        let what = what.into();
        move |reason| NamedVmError::Host { what, reason }
    }
}

impl From<ClientError> for NamedVmError {
    fn from(error: ClientError) -> Self {
        match error {
            ClientError::Refused(refusal) => NamedVmError::Refused(refusal),
            other => NamedVmError::Channel(other),
        }
    }
}

/// The VMs of one mvm home.
#[derive(Debug, Clone)]
pub struct VmHome {
    home: MvmHome,
}

impl VmHome {
    /// The VMs of `home`.
    pub fn new(home: MvmHome) -> Self {
        VmHome { home }
    }

    /// `$MVM_HOME/vms/<name>`, for a valid name (whether or not a VM has it).
    pub fn dir(&self, name: &str) -> Result<PathBuf, NamedVmError> {
        if !state::valid_name(name) {
            return Err(NamedVmError::BadName(name.into()));
        }
        let vms = self
            .home
            .ensure("vms")
            .map_err(|e| NamedVmError::host("the VMs' directory")(e.to_string()))?;
        Ok(vms.join(name))
    }

    /// The VM `name`, which must exist.
    pub fn get(&self, name: &str) -> Result<NamedVm, NamedVmError> {
        let dir = self.dir(name)?;
        if !dir.join(state::STATE_FILE).exists() {
            return Err(NamedVmError::Unavailable(format!(
                "there is no VM named {name}"
            )));
        }
        Ok(NamedVm {
            home: self.home.clone(),
            name: name.into(),
            dir,
        })
    }

    /// Refused if a VM (or anything) has the name `name` already.
    pub fn check_free(&self, name: &str) -> Result<(), NamedVmError> {
        match self.dir(name)?.exists() {
            true => Err(NamedVmError::Exists(name.into())),
            false => Ok(()),
        }
    }

    /// Every named VM's state as it really is, by name; one whose state cannot be read is
    /// reported to `unreadable` and left out.
    pub fn list(&self, mut unreadable: impl FnMut(&Path, state::StateError)) -> Vec<VmState> {
        let Ok(vms) = self.home.ensure("vms") else {
            return Vec::new();
        };
        let mut seen = Vec::new();
        for dir in std::fs::read_dir(&vms).into_iter().flatten().flatten() {
            let dir = dir.path();
            // One-shot runs leave only a console log behind when they fail: not named VMs; a
            // VM being removed is moved aside to a dot-name first.
            let aside = dir
                .file_name()
                .is_some_and(|name| name.as_encoded_bytes().starts_with(b"."));
            if !aside && dir.join(state::STATE_FILE).exists() {
                match state::observe(&dir) {
                    Ok(state) => seen.push(state),
                    Err(e) => unreadable(&dir, e),
                }
            }
        }
        seen.sort_by(|a, b| a.name.cmp(&b.name));
        seen
    }

    /// Starts `runner` (an `mvm-runner` serving a VM: `--name` or `--wake`) in a process
    /// group of its own, and waits for its ready line: the VM's state once its agent
    /// answered. A runner that fails first is reaped and its standard error returned.
    pub fn start(&self, mut runner: Command) -> Result<VmState, NamedVmError> {
        let program = runner.get_program().to_string_lossy().into_owned();
        let mut child = runner
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: the terminal's Ctrl-C is not for it once its starter
            // returns.
            .process_group(0)
            .spawn()
            .map_err(|e| NamedVmError::host(format!("starting {program}"))(e.to_string()))?;
        let mut line = String::new();
        if let Some(stdout) = child.stdout.take() {
            let _ = BufReader::new(stdout).read_line(&mut line);
        }
        let ready = serde_json::from_str::<Value>(&line)
            .ok()
            .and_then(|v| serde_json::from_value::<VmState>(v["ready"].clone()).ok());
        if let Some(ready) = ready {
            return Ok(ready);
        }
        // Not the ready line: the runner failed before the VM was ready (its error is on its
        // stderr), or it speaks otherwise — in which case it must not be left running.
        if !line.is_empty() {
            if let Some(group) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
            }
        }
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr);
        }
        let status = child
            .wait()
            .map_err(|e| NamedVmError::host("waiting for the runner")(e.to_string()))?;
        Err(NamedVmError::RunnerFailed {
            status: status.code().map_or(125, |code| code as u8),
            stderr,
        })
    }
}

/// A VM with a name, as its clients see it.
#[derive(Debug, Clone)]
pub struct NamedVm {
    home: MvmHome,
    name: String,
    dir: PathBuf,
}

impl NamedVm {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its state as it really is.
    pub fn state(&self) -> Result<VmState, NamedVmError> {
        state::observe(&self.dir).map_err(|e| NamedVmError::Unavailable(e.to_string()))
    }

    /// Whether it has a cold state saved.
    pub fn is_saved(&self) -> bool {
        cold::is_saved(&self.dir)
    }

    /// Connects to its control socket; refused unless it runs or is paused. `interrupt`
    /// ends the client's waits.
    pub fn connect(&self, interrupt: Arc<AtomicBool>) -> Result<AgentClient, NamedVmError> {
        let seen = self.state()?;
        let name = &self.name;
        if seen.phase == Phase::Cold {
            return Err(NamedVmError::Unavailable(format!(
                "{name} is cold: `mvm resume {name}` wakes it"
            )));
        }
        if !matches!(seen.phase, Phase::Running | Phase::Paused) {
            return Err(NamedVmError::Unavailable(format!(
                "{name} is {}, not running",
                seen.phase.name()
            )));
        }
        let connecting =
            |e: std::io::Error| NamedVmError::host(format!("connecting to {name}"))(e.to_string());
        let stream =
            UnixStream::connect(self.dir.join(state::CONTROL_SOCKET)).map_err(connecting)?;
        AgentClient::over_control_socket(stream, interrupt).map_err(connecting)
    }

    /// Waits until its runner has let go of it (its lock free, the runner process gone):
    /// after a cold save, which ends the runner.
    pub fn wait_released(&self) -> Result<VmState, NamedVmError> {
        let runner = self.state()?.runner_pid;
        let deadline = Instant::now() + STOP_WAIT;
        while self.lock()?.is_none() || process_lives(runner, "mvm-runner") {
            if Instant::now() > deadline {
                return Err(NamedVmError::Unavailable(format!(
                    "the runner of {} did not let go of it",
                    self.name
                )));
            }
            std::thread::sleep(POLL);
        }
        self.state()
    }

    /// Pauses it (stops its vCPUs); `cold` saves it to its directory as well, and returns
    /// once its runner has let go of it (a cold VM has no process).
    pub fn pause(&self, cold: bool) -> Result<VmState, NamedVmError> {
        let mut client = self.connect(Arc::default())?;
        let (request, answer_within) = match cold {
            true => (mvm_protocol::Request::Save, SAVE_ANSWER),
            false => (mvm_protocol::Request::Pause, PAUSE_ANSWER),
        };
        client.call(&request, answer_within, None)?;
        match cold {
            // The runner is gone once it let go, with the guest's memory (which a process
            // takes a while to give back on a busy host).
            true => self.wait_released(),
            false => self.state(),
        }
    }

    /// Lets it run again once paused. A cold VM is woken by a new runner instead
    /// ([`VmHome::start`] with `--wake`).
    pub fn resume(&self) -> Result<VmState, NamedVmError> {
        let mut client = self.connect(Arc::default())?;
        client.call(&mvm_protocol::Request::Resume, PAUSE_ANSWER, None)?;
        self.state()
    }

    /// Asks its runner to power it off, and waits until it has.
    pub fn stop(&self) -> Result<VmState, NamedVmError> {
        let mut client = self.connect(Arc::default())?;
        client
            .power_off(POWER_OFF_ANSWER)
            .map_err(NamedVmError::Channel)?;
        self.wait_until(STOP_WAIT, |seen| !seen.phase.is_live())?
            .map_err(|_| {
                NamedVmError::Unavailable(format!(
                    "{} did not stop within {}s",
                    self.name,
                    STOP_WAIT.as_secs()
                ))
            })
    }

    /// Stops a cold VM for good: its saved state is removed, under its lock (no runner may
    /// be waking it meanwhile), and the discard audited.
    pub fn discard_cold(&self) -> Result<VmState, NamedVmError> {
        let Some(_lock) = self.lock()? else {
            return Err(NamedVmError::Unavailable(format!(
                "{} is being woken",
                self.name
            )));
        };
        let mut seen = self.state()?;
        self.audit("vm.discarded", json!({"name": seen.name, "vm": seen.vm}))?;
        cold::discard(&self.dir)
            .and_then(|()| cold::forget(&self.home, &seen.vm))
            .map_err(|e| NamedVmError::host("removing the cold state")(e.to_string()))?;
        seen.phase = Phase::Stopped;
        seen.reason = Some("stopped while cold: its saved state was discarded".into());
        state::write(&self.dir, &seen)
            .map_err(|e| NamedVmError::host("writing the state")(e.to_string()))?;
        Ok(seen)
    }

    /// Removes it and its directory; one still live is stopped first when `force` says so
    /// (its runner killed if it will not stop), else refused.
    pub fn remove(self, force: bool) -> Result<(), NamedVmError> {
        // Another remover may have won already: the VM is then gone, as if it never was.
        let gone = || NamedVmError::Unavailable(format!("there is no VM named {}", self.name));
        let seen = match self.state() {
            Err(_) if !self.dir.join(state::STATE_FILE).exists() => return Err(gone()),
            seen => seen?,
        };
        if seen.phase.is_live() {
            if !force {
                return Err(NamedVmError::Live {
                    name: self.name,
                    phase: seen.phase.name(),
                });
            }
            if self.stop().is_err() {
                self.kill_runner(&seen)?;
            }
        }
        // The runner may still be finishing after writing `stopped`: wait until it has let
        // go of the VM, and hold its lock while removing, so no runner works in the
        // directory meanwhile. Another remover may win the lock.
        let deadline = Instant::now() + STOP_WAIT;
        let _lock = loop {
            match self.lock() {
                Ok(Some(lock)) if self.dir.join(state::STATE_FILE).exists() => break lock,
                Ok(Some(_)) => return Err(gone()),
                Err(_) if !self.dir.exists() => return Err(gone()),
                Err(e) => return Err(e),
                Ok(None) => {}
            }
            if Instant::now() > deadline {
                return Err(NamedVmError::Unavailable(format!(
                    "the runner of {} still holds it",
                    self.name
                )));
            }
            std::thread::sleep(POLL);
        };
        // Moved aside first, in one step: its name is free at once and never shows a
        // half-removed VM, and a remover still waiting finds no lock file to make anew.
        let removing =
            self.dir
                .with_file_name(format!(".removing-{}-{}", self.name, std::process::id()));
        let host = |what: &str| NamedVmError::host(format!("{what} {}", self.dir.display()));
        std::fs::rename(&self.dir, &removing).map_err(|e| host("moving aside")(e.to_string()))?;
        let mut attempts = 0;
        loop {
            match std::fs::remove_dir_all(&removing) {
                Ok(()) => break,
                // A remover that looked the directory up before it moved may still make its
                // lock file in it, after the listing: gone when it is removed again.
                Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty && attempts < 10 => {
                    attempts += 1;
                    std::thread::sleep(POLL);
                }
                Err(e) => return Err(host("removing")(e.to_string())),
            }
        }
        cold::forget(&self.home, &seen.vm)
            .map_err(|e| NamedVmError::host("forgetting its cold generation")(e.to_string()))?;
        self.audit("vm.removed", json!({"name": self.name, "vm": seen.vm}))
    }

    /// Waits up to `timeout` for its state to satisfy `reached`: `Ok(state)` once it does,
    /// `Err(state)` with the last state seen if the time ran out first.
    pub fn wait_until(
        &self,
        timeout: Duration,
        mut reached: impl FnMut(&VmState) -> bool,
    ) -> Result<Result<VmState, VmState>, NamedVmError> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.state()?;
            if reached(&seen) {
                return Ok(Ok(seen));
            }
            if Instant::now() > deadline {
                return Ok(Err(seen));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Its lock, if no runner holds it.
    fn lock(&self) -> Result<Option<ExclusiveLock>, NamedVmError> {
        ExclusiveLock::try_acquire(&self.dir.join(state::LOCK_FILE))
            .map_err(|e| NamedVmError::host("the VM's lock")(e.to_string()))
    }

    fn audit(&self, event: &str, fields: Value) -> Result<(), NamedVmError> {
        HostAudit::open(&self.home)
            .and_then(|audit| audit.append(event, fields))
            .map(drop)
            .map_err(|e| NamedVmError::host("the audit chain")(e.to_string()))
    }

    /// Kills the runner of a VM that would not stop (its VM dies with it), once it is sure
    /// the process is that runner: an `mvm-runner` serving this very VM, which is still
    /// live. Then waits for the state to say it is not.
    fn kill_runner(&self, seen: &VmState) -> Result<(), NamedVmError> {
        // Only a process that is an mvm-runner serving this very VM: a pid can be reused.
        let serving_it = std::fs::read(format!("/proc/{}/cmdline", seen.runner_pid))
            .map(|cmdline| {
                let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
                args.first()
                    .is_some_and(|program| program.ends_with(b"mvm-runner"))
                    && args.windows(2).any(|pair| {
                        matches!(pair[0], b"--name" | b"--wake") && pair[1] == seen.name.as_bytes()
                    })
            })
            .unwrap_or(false);
        if let Some(pid) = rustix::process::Pid::from_raw(seen.runner_pid as i32) {
            let alive = self.state().is_ok_and(|now| now.phase.is_live());
            if serving_it && alive {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        match self.wait_until(STOP_WAIT, |now| !now.phase.is_live()) {
            Ok(Err(_)) => Err(NamedVmError::Unavailable(
                "the VM's runner did not exit".into(),
            )),
            // Reached, or its state no longer reads as live.
            Ok(Ok(_)) | Err(_) => Ok(()),
        }
    }
}

/// Whether process `pid`, named `name`, is there and not yet a zombie (a pid can be reused:
/// a process of another name is not it).
fn process_lives(pid: u32, name: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let (comm, rest) = stat.rsplit_once(')').unwrap_or_default();
        comm.ends_with(&format!("({name}")) && !rest.trim_start().starts_with('Z')
    })
}
