//! One launch, start to end: admit the plan, boot it, run one command, power off, and leave
//! the evidence (audit entries) and nothing else behind.
//!
//! The order is the security argument. Nothing is created and no VM process starts before
//! the plan and its kernel and initramfs have passed [`crate::admission`]; QEMU then boots
//! private copies of exactly the bytes that were hashed. Every way a launch can end has its
//! own stable code and exit status ([`LaunchError::code`], [`LaunchError::exit_status`],
//! [`exit`]), so a caller can tell a refused plan from a corrupted root from a command that
//! merely failed.

use std::collections::BTreeMap;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mvm_agent::protocol::{
    codes, ErrorReply, ExecRequest, ExitStatus, HelloReply, Integrity, Request,
};
use mvm_ir::admission::{NonceLedger, PlanAdmission, VerifiedPlan};
use mvm_ir::audit::HostAudit;
use mvm_ir::fsutil::ExclusiveLock;
use mvm_ir::home::MvmHome;
use mvm_ir::keys::KeyStore;
use mvm_ir::plan::{LaunchPlan, Timestamp};
use mvm_ir::receipt::{CommandResult, OutputDigest, Receipt};
use serde_json::json;

use crate::admission::{admit_bundle, AdmissionError};
use crate::backend::kvm::jailed::{self, Jail, JailError, JailedVm};
use crate::backend::kvm::{spec_for_plan, OwnVm, OwnVmFiles};
use crate::backend::qemu::{self, VmFiles};
use crate::backend::select::{self, Accel, Backend, BackendChoice, HostError, HostFacts};
use crate::backend::{Pausable, SavedMemory, VmProcess};
use crate::client::{AgentClient, ClientError, Executed, OutputSink};
use crate::cold::{self, ColdError, ColdManifest, ColdSaver, ColdState};
use crate::control;
use crate::mux::AgentMux;
use crate::state::{self, Phase, VmState};
use mvm_vmm::{VmSpec, VmmError};

/// Exit statuses of a launch that did not end with the command's own status. Commands may
/// exit with any status too; the JSON report says which it was.
pub mod exit {
    /// The plan or one of its artifacts was refused: nothing was started.
    pub const REFUSED: u8 = 120;
    /// dm-verity in the guest refused a block of the root: its contents are not the signed ones.
    pub const INTEGRITY: u8 = 121;
    /// The VM did not boot to a ready agent, or died before the command ended.
    pub const VM_FAILED: u8 = 122;
    /// The command ran past its timeout and was killed.
    pub const TIMEOUT: u8 = 124;
    /// The runner itself failed: the host's state, the audit log, a bad argument.
    pub const RUNNER: u8 = 125;
    /// The command exists but cannot be executed (as in a shell).
    pub const NOT_EXECUTABLE: u8 = 126;
    /// The command does not exist (as in a shell).
    pub const NOT_FOUND: u8 = 127;
    /// The runner was interrupted (as a shell reports SIGINT).
    pub const INTERRUPTED: u8 = 130;

    /// The exit status that reports how a command ended: its own code, `128 + signal` for a
    /// signal (as a shell reports it), [`TIMEOUT`] for a timeout.
    pub fn of_command(status: super::ExitStatus) -> u8 {
        match status {
            super::ExitStatus::Exited { code } => (code & 0xff) as u8,
            super::ExitStatus::Signaled { signal } => (128 + signal.clamp(0, 127)) as u8,
            super::ExitStatus::TimedOut => TIMEOUT,
        }
    }
}

/// How long the agent has to acknowledge a power-off, and QEMU to exit after it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Beyond a command's own timeout (which the agent enforces), how long the runner waits for
/// the agent's answer before giving up on the VM.
const ANSWER_GRACE: Duration = Duration::from_secs(30);
/// The console log's name in the VM's state directory.
const SERIAL_LOG: &str = "serial.log";

/// Why a launch failed. Codes are stable (`docs/errors.md`).
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The plan or an artifact it pins was refused.
    #[error(transparent)]
    Refused(#[from] AdmissionError),
    /// The guest reported a block of the root that failed verification.
    #[error("integrity failure in the guest: {0}")]
    Integrity(String),
    /// The guest reported a failed boot, or its kernel panicked.
    #[error("the guest failed to boot: {0}")]
    GuestFailed(String),
    /// The agent did not answer within the boot timeout.
    #[error("the guest did not become ready within {0:?}")]
    BootTimeout(Duration),
    /// QEMU could not start, or exited unexpectedly.
    #[error("the VM process failed: {0}")]
    Backend(String),
    /// A VM of that name exists already (`mvm rm` it first), or its runner still holds it.
    #[error("a VM named {0} exists already; remove it with `mvm rm {0}` first")]
    NameInUse(String),
    /// The runner was told to stop (SIGINT, SIGTERM, SIGHUP); the VM was torn down.
    #[error("interrupted: the VM was stopped")]
    Interrupted,
    /// The agent channel broke or the agent did not answer in time.
    #[error("the agent channel failed: {0}")]
    Channel(#[from] ClientError),
    /// The host's state could not be prepared or cleaned.
    #[error("{what}: {source}")]
    Host {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An audit entry could not be written: mvm does not act without leaving evidence.
    #[error("audit: {0}")]
    Audit(mvm_ir::Error),
    /// A command's audit entry could not be written while the VM served: it was stopped.
    #[error("audit: {0}; the VM was stopped")]
    AuditFailed(String),
    /// The agent refused the command.
    #[error("{}: {}", .0.code, .0.message)]
    CommandRefused(ErrorReply),
    /// A cold VM could not be woken (it stays cold).
    #[error(transparent)]
    Cold(#[from] ColdError),
}

impl LaunchError {
    /// The stable code.
    pub fn code(&self) -> &str {
        match self {
            LaunchError::Refused(e) => e.code(),
            LaunchError::Integrity(_) => "RUN020",
            LaunchError::GuestFailed(_) => "RUN021",
            LaunchError::BootTimeout(_) => "RUN022",
            LaunchError::Backend(_) => "RUN023",
            LaunchError::Channel(_) => "RUN025",
            LaunchError::Host { .. } => "RUN026",
            LaunchError::Audit(_) | LaunchError::AuditFailed(_) => "RUN027",
            LaunchError::CommandRefused(e) => &e.code,
            LaunchError::Interrupted => "RUN033",
            LaunchError::NameInUse(_) => "RUN034",
            LaunchError::Cold(e) => e.code(),
        }
    }

    /// The runner's exit status for this failure ([`exit`]).
    pub fn exit_status(&self) -> u8 {
        match self {
            LaunchError::Refused(AdmissionError::NotRunnable { .. }) => exit::RUNNER,
            LaunchError::Refused(_) | LaunchError::Cold(ColdError::Unverified(_)) => exit::REFUSED,
            LaunchError::Cold(ColdError::Wake(_)) => exit::VM_FAILED,
            LaunchError::Integrity(_) => exit::INTEGRITY,
            LaunchError::GuestFailed(_)
            | LaunchError::BootTimeout(_)
            | LaunchError::Backend(_)
            | LaunchError::Channel(_) => exit::VM_FAILED,
            LaunchError::CommandRefused(e) if e.code == codes::NOT_FOUND => exit::NOT_FOUND,
            LaunchError::CommandRefused(e) if e.code == codes::NOT_EXECUTABLE => {
                exit::NOT_EXECUTABLE
            }
            LaunchError::Interrupted => exit::INTERRUPTED,
            LaunchError::Host { .. }
            | LaunchError::Audit(_)
            | LaunchError::AuditFailed(_)
            | LaunchError::CommandRefused(_)
            | LaunchError::Cold(ColdError::Save(_))
            | LaunchError::NameInUse(_) => exit::RUNNER,
        }
    }

    fn host(what: impl Into<String>) -> impl FnOnce(io::Error) -> LaunchError {
        let what = what.into();
        move |source| LaunchError::Host { what, source }
    }
}

/// A failed launch with what the guest said on its console, when it got that far.
#[derive(Debug)]
pub struct Failure {
    /// What went wrong.
    pub error: LaunchError,
    /// The end of the guest's console, for a failure after the VM started.
    pub console_tail: Option<String>,
    /// The kept console log of the failed VM.
    pub serial_log: Option<PathBuf>,
}

impl From<LaunchError> for Box<Failure> {
    fn from(error: LaunchError) -> Self {
        Box::new(Failure {
            error,
            console_tail: None,
            serial_log: None,
        })
    }
}

/// What to launch and how.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The signed plan; its artifacts are the files beside it.
    pub envelope: PathBuf,
    /// The mvm home: trusted keys, the nonce ledger, the audit log, VM state directories.
    pub home: MvmHome,
    /// The backend asked for; settled for this host once the plan is verified.
    pub backend: BackendChoice,
    /// The command; the plan's entrypoint when empty.
    pub argv: Vec<String>,
    /// The command's timeout; none when absent (the agent caps it at a week).
    pub timeout: Option<Duration>,
    /// How long the guest has to boot to a ready agent.
    pub boot_timeout: Duration,
    /// When the runner started: the origin of [`Finished::ready_ms`].
    pub started: Instant,
    /// Set (by a signal handler) to stop the launch: every wait ends and the VM is torn down.
    pub interrupt: Arc<AtomicBool>,
    /// Run the own VMM jailed as this uid and gid ([`crate::backend::kvm::jailed`]); checked by
    /// [`Jail::check`].
    pub jail: Option<Jail>,
    /// Back the own VMM's guest RAM with 2 MiB huge pages (checked: `--backend kvm` only).
    pub huge_pages: bool,
}

/// A launch that ran its command to the end.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The VM's id.
    pub vm: String,
    /// The admitted plan's digest.
    pub plan_digest: String,
    /// How QEMU ran the guest.
    pub accel: Accel,
    /// How the command ended.
    pub status: ExitStatus,
    /// Its standard output as the host received it: digest and size.
    pub stdout: OutputDigest,
    /// Its standard error as the host received it.
    pub stderr: OutputDigest,
    /// `sha256:` of the command's argv as JSON.
    pub argv_sha256: String,
    /// When the command was sent.
    pub started_at: Timestamp,
    /// When its answer arrived.
    pub ended_at: Timestamp,
    /// The agent's hello: version and boot timings inside the guest.
    pub hello: HelloReply,
    /// From the runner's start to the agent's hello.
    pub ready_ms: u64,
    /// The command's own duration, as the agent measured it.
    pub command_ms: u64,
}

impl Finished {
    /// The run's receipt (unsigned; see [`mvm_ir::receipt::issue`]).
    pub fn receipt(&self) -> Receipt {
        Receipt {
            schema_version: mvm_ir::receipt::SCHEMA_VERSION.into(),
            plan_digest: self.plan_digest.clone(),
            vm: self.vm.clone(),
            argv_sha256: self.argv_sha256.clone(),
            started_at: self.started_at,
            ended_at: self.ended_at,
            result: command_result(self.status),
            stdout: self.stdout.clone(),
            stderr: self.stderr.clone(),
            egress: vec![],
            previous: None,
        }
    }

    /// The runner's exit status: the command's own, `128 + signal` for a signal (as a shell
    /// reports it), [`exit::TIMEOUT`] for a timeout.
    pub fn exit_status(&self) -> u8 {
        exit::of_command(self.status)
    }
}

/// How a command ended, as a receipt says it.
pub fn command_result(status: ExitStatus) -> CommandResult {
    match status {
        ExitStatus::Exited { code } => CommandResult::Exited { code },
        ExitStatus::Signaled { signal } => CommandResult::Signaled { signal },
        ExitStatus::TimedOut => CommandResult::TimedOut,
    }
}

/// Launches `launch`, passing the command's output to `sink` as it arrives.
pub fn launch(launch: &Launch, sink: &mut dyn OutputSink) -> Result<Finished, Box<Failure>> {
    let Started {
        audit,
        plan,
        settled: request,
        accel,
        vm,
        dir,
        listener,
        socket,
        mut vm_process,
    } = start(launch, Origin::Boot(Keep::Nothing), |verified| {
        exec_request(verified, launch)
    })?;

    let mut outcome = boot(launch, listener.as_ref(), &mut vm_process)
        .and_then(|booted| run_command(&mut vm_process, booted, request, sink));
    // The socket's job is done either way; nobody may connect to it later.
    drop(listener);
    let _ = fs::remove_file(&socket);
    if let Ok(ran) = &mut outcome {
        // The guest syncs and powers off; it is killed after the grace either way.
        let _ = ran.client.power_off(SHUTDOWN_GRACE);
        let _ = vm_process.wait_for_exit(SHUTDOWN_GRACE);
    }
    vm_process.kill();
    let outcome = outcome.map(|ran| Finished {
        vm: vm.clone(),
        plan_digest: plan.digest.clone(),
        accel,
        status: ran.executed.reply.status,
        stdout: ran.executed.stdout,
        stderr: ran.executed.stderr,
        hello: ran.hello,
        ready_ms: ran.ready_ms,
        command_ms: ran.executed.reply.duration_ms,
        argv_sha256: ran.argv_sha256,
        started_at: ran.started_at,
        ended_at: ran.ended_at,
    });

    let (reason, exit_status) = match &outcome {
        Ok(finished) => ("command ended", finished.exit_status()),
        Err(error) => (error.code(), error.exit_status()),
    };
    audit
        .append(
            "vm.exited",
            json!({"vm": vm, "reason": reason, "exit_status": exit_status,
               "duration_ms": launch.started.elapsed().as_millis() as u64}),
        )
        .map_err(LaunchError::Audit)?;
    outcome.map_err(|error| failure(error, &vm_process, dir))
}

/// Boots `launch` as the VM `name` and keeps it up, serving its control socket
/// (`vms/<name>/control.sock`) until a client asks for a power-off or a cold save, the runner
/// is told to stop (a signal), or the VM dies. `on_ready` is called once the agent has said
/// hello. The VM's directory keeps its state, console log and lock until `mvm rm`.
pub fn serve_named(
    launch: &Launch,
    name: &str,
    on_ready: &mut dyn FnMut(&VmState),
) -> Result<VmState, Box<Failure>> {
    let started = start(
        launch,
        Origin::Boot(Keep::Record(name.to_string())),
        secrets_resolvable,
    )?;
    serve_started(launch, name, started, None, on_ready)
}

/// Wakes the cold VM `name` and keeps it up as [`serve_named`] does. Its saved state is
/// verified first (see [`cold`]) and its plan admitted again from the envelope its manifest
/// names (`launch.envelope` is not used); a VM that cannot be woken stays cold, its saved
/// state untouched.
pub fn wake_named(
    launch: &Launch,
    name: &str,
    on_ready: &mut dyn FnMut(&VmState),
) -> Result<VmState, Box<Failure>> {
    // Its lock says no runner has it; its saved state says it is cold (even if the runner of
    // an earlier attempt to wake it was killed before it could say so).
    let dir = VmDir::reopen(&launch.home, name)?;
    if !cold::is_saved(&dir.path) {
        let message = format!("{name} was not saved cold");
        return Err(LaunchError::from(ColdError::Wake(message)).into());
    }
    let mut saved = cold::open(&dir.path, name, &launch.home).map_err(LaunchError::from)?;
    // The backend that saved it wakes it: QEMU's state and the own VMM's differ.
    let backend = saved.manifest.backend.parse().map_err(|_| {
        let reason = format!(
            "it was saved by an unknown backend {}",
            saved.manifest.backend
        );
        LaunchError::from(ColdError::Wake(reason))
    })?;
    let launch = Launch {
        envelope: saved.manifest.envelope.clone(),
        backend,
        ..launch.clone()
    };
    let started = start(&launch, Origin::Wake(dir, &mut saved), secrets_resolvable)?;
    serve_started(&launch, name, started, Some(saved), on_ready)
}

/// Writes a VM's new phase to its state file.
type PhaseRecorder = Box<dyn Fn(Phase) -> io::Result<()> + Send + Sync>;

/// How a named VM's serving ended without a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Served {
    /// Powered off on request.
    Stopped,
    /// Saved cold on request: its state is in its directory.
    Cold,
}

/// The VM of `started`, woken from `saved` when given, served until it ends.
fn serve_started(
    launch: &Launch,
    name: &str,
    started: Started<()>,
    mut saved: Option<ColdState>,
    on_ready: &mut dyn FnMut(&VmState),
) -> Result<VmState, Box<Failure>> {
    let Started {
        audit,
        plan,
        accel,
        vm,
        dir,
        listener,
        socket,
        mut vm_process,
        ..
    } = started;
    let mut state = VmState {
        name: name.to_string(),
        vm: vm.clone(),
        plan_digest: plan.digest.clone(),
        runner_pid: std::process::id(),
        phase: Phase::Starting,
        backend: Some(vm_process.backend()),
        reason: None,
        started_at: mvm_ir::plan::Timestamp::now()
            .0
            .replace_nanosecond(0)
            .map(|t| mvm_ir::plan::Timestamp(t).to_string())
            .unwrap_or_default(),
    };
    let record = |state: &VmState| {
        state::write(&dir.path, state).map_err(|e| LaunchError::Host {
            what: "writing the VM's state".into(),
            source: io::Error::other(e.to_string()),
        })
    };
    record(&state)?;

    // A woken guest gets its saved state before the agent channel is awaited; it runs only
    // once what QEMU read hashed to the manifest's digest.
    let woken = match saved.as_mut() {
        Some(saved) => wake(&dir, &mut vm_process, saved, accel).map(Some),
        None => Ok(None),
    };
    let booted = woken.and_then(|machine| {
        boot(launch, listener.as_ref(), &mut vm_process).map(|booted| (booted, machine))
    });
    drop(listener);
    let _ = fs::remove_file(&socket);
    let outcome = booted.and_then(|(mut booted, machine)| {
        // The control socket is there before anyone is told the VM is ready.
        let control_path = dir.path.join(state::CONTROL_SOCKET);
        let control =
            UnixListener::bind(&control_path).map_err(LaunchError::host("control socket"))?;
        fs::set_permissions(&control_path, fs::Permissions::from_mode(0o600))
            .map_err(LaunchError::host("control socket"))?;
        let machine = match machine {
            Some(machine) => machine,
            None => vm_process
                .machine(&dir.path)
                .map_err(|e| LaunchError::Backend(format!("QMP: {e}")))?,
        };
        if saved.take().is_some() {
            // Its clock stood still while it was cold.
            let set = booted
                .client
                .call(&control::clock_now(), Duration::from_secs(5), None);
            if !matches!(set, Ok(mvm_agent::protocol::Response::Done)) {
                eprintln!("mvm-runner: the woken guest did not set its clock");
            }
            // It runs again: its saved state is stale from here on.
            cold::discard(&dir.path).map_err(LaunchError::host("removing the cold state"))?;
            audit
                .append("vm.woken", json!({"vm": vm, "name": name}))
                .map_err(LaunchError::Audit)?;
        }
        state.phase = Phase::Running;
        record(&state)?;
        on_ready(&state);
        let phases = {
            let (dir, state) = (dir.path.clone(), state.clone());
            move |phase| {
                let state = VmState {
                    phase,
                    ..state.clone()
                };
                state::write(&dir, &state).map_err(|e| io::Error::other(e.to_string()))
            }
        };
        // A jailed VMM is not saved: its state would have to leave the jail.
        let jailed = matches!(vm_process, VmProcess::Jailed(_));
        let backend = vm_process.backend();
        let saver = (!jailed).then(|| ColdSaver {
            dir: dir.path.clone(),
            home: launch.home.clone(),
            manifest: ColdManifest {
                schema_version: String::new(),
                name: name.to_string(),
                vm: vm.clone(),
                plan_digest: plan.digest.clone(),
                // Absolute: `mvm resume` may run from anywhere.
                envelope: fs::canonicalize(&launch.envelope)
                    .unwrap_or_else(|_| launch.envelope.clone()),
                accel: accel.to_string(),
                backend: backend.to_string(),
                memory: SavedMemory {
                    sha256: String::new(),
                    bytes: 0,
                },
                saved_at: mvm_ir::plan::Timestamp::now(),
            },
        });
        let serving = keep_serving(
            launch,
            control,
            &plan.plan,
            &mut vm_process,
            booted,
            (&audit, &vm),
            (machine, Box::new(phases), saver),
        );
        let _ = fs::remove_file(&control_path);
        serving
    });
    vm_process.kill();
    // A VM that could not be woken keeps its saved state: it is cold still.
    let still_cold = saved.is_some();
    let (reason, phase) = match &outcome {
        Ok(Served::Cold) => ("saved cold".to_string(), Phase::Cold),
        Ok(Served::Stopped) => ("stopped on request".to_string(), Phase::Stopped),
        Err(error) if still_cold => (error.code().to_string(), Phase::Cold),
        Err(LaunchError::Interrupted) => ("RUN033".to_string(), Phase::Stopped),
        Err(error) => (error.code().to_string(), Phase::Failed),
    };
    state.phase = phase;
    state.reason = Some(match &outcome {
        Ok(_) => reason.clone(),
        Err(error) if still_cold => format!("waking failed: {}: {error}", error.code()),
        Err(error) => format!("{}: {error}", error.code()),
    });
    record(&state)?;
    audit
        .append(
            "vm.exited",
            json!({"vm": vm, "name": name, "reason": reason,
               "duration_ms": launch.started.elapsed().as_millis() as u64}),
        )
        .map_err(LaunchError::Audit)?;
    match outcome {
        Ok(_) | Err(LaunchError::Interrupted) => Ok(state),
        Err(error) => Err(failure(error, &vm_process, dir)),
    }
}

/// Streams a cold VM's saved state into the QEMU started to wake it, checks the digest of
/// what was streamed, and only then lets the guest run; returns the machine controls.
fn wake(
    dir: &VmDir,
    vm: &mut VmProcess,
    saved: &mut ColdState,
    accel: Accel,
) -> Result<Box<dyn Pausable>, LaunchError> {
    if saved.manifest.accel != accel.to_string() {
        return Err(ColdError::Wake(format!(
            "it was saved under {}, this host runs {accel}",
            saved.manifest.accel
        ))
        .into());
    }
    let VmProcess::Qemu(_) = vm else {
        // The own VMM restored it as it started, its state verified then; it waits paused.
        let mut machine = vm
            .machine(&dir.path)
            .map_err(|e| ColdError::Wake(e.to_string()))?;
        machine
            .resume()
            .map_err(|e| ColdError::Wake(format!("letting the guest run: {e}")))?;
        return Ok(machine);
    };
    let wake_socket = dir.path.join(cold::WAKE_SOCKET);
    let loaded = qemu::migration::load(
        &wake_socket,
        &mut saved.memory,
        &dir.path.join(qemu::QMP_SOCKET),
    );
    let _ = fs::remove_file(&wake_socket);
    let (mut qmp, streamed) = loaded.map_err(|e| {
        let stderr = vm.stderr();
        ColdError::Wake(match stderr.is_empty() {
            true => e.to_string(),
            false => format!("{e}; QEMU: {stderr}"),
        })
    })?;
    cold::check_memory(&saved.manifest, &streamed)?;
    qmp.resume()
        .map_err(|e| ColdError::Wake(format!("letting the guest run: {e}")))?;
    Ok(Box::new(qmp))
}

/// Serves the control socket of a booted VM until it should stop; then powers it off, unless
/// it was saved cold. Returns how it ended.
fn keep_serving(
    launch: &Launch,
    control: UnixListener,
    plan: &LaunchPlan,
    vm: &mut VmProcess,
    booted: Booted,
    (audit, vm_id): (&Arc<HostAudit>, &str),
    (machine, phases, cold): (Box<dyn Pausable>, PhaseRecorder, Option<ColdSaver>),
) -> Result<Served, LaunchError> {
    let (stream, last_stream) = booted
        .client
        .into_stream()
        .map_err(LaunchError::host("agent channel"))?;
    let shared = Arc::new(control::Shared {
        mux: AgentMux::new(stream, last_stream).map_err(LaunchError::host("agent channel"))?,
        plan: plan.clone(),
        hello: booted.hello,
        stop: Arc::new(AtomicBool::new(false)),
        audit: Arc::clone(audit),
        vm: vm_id.to_string(),
        corrupted: AtomicBool::new(false),
        audit_failure: Default::default(),
        machine: Mutex::new(machine),
        paused: AtomicBool::new(false),
        phases,
        cold,
        saved_cold: AtomicBool::new(false),
    });
    let mut vm_exited = false;
    let mut channel_closed = false;
    control::serve(&control, &shared, || {
        vm_exited = !matches!(vm.try_wait(), Ok(None));
        channel_closed = shared.mux.is_closed();
        !vm_exited && !channel_closed && !launch.interrupt.load(Ordering::Relaxed)
    })
    .map_err(LaunchError::host("control socket"))?;
    drop(control);
    if shared.saved_cold.load(Ordering::Relaxed) {
        // Its state is on disk; the guest must not run another instruction.
        return Ok(Served::Cold);
    }
    if channel_closed && !vm_exited {
        return Err(LaunchError::Channel(ClientError::Closed));
    }
    if vm_exited {
        return Err(LaunchError::Backend(format!(
            "the VM exited while serving: {}",
            vm.stderr()
        )));
    }
    // Stop: a paused guest runs again to hear it, the agent is asked to power off and given
    // the grace, then the caller kills QEMU.
    let _ = shared.set_paused(false);
    if let Ok(mut answer) = shared.mux.request(&Request::PowerOff) {
        let _ = answer.next_frame_within(SHUTDOWN_GRACE);
    }
    let _ = vm.wait_for_exit(SHUTDOWN_GRACE);
    if shared.corrupted.load(Ordering::Relaxed) {
        return Err(LaunchError::Integrity(
            "dm-verity refused a block of the root while a command ran; the VM was stopped".into(),
        ));
    }
    let audit_failure = shared
        .audit_failure
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    if let Some(failure) = audit_failure {
        return Err(LaunchError::AuditFailed(failure));
    }
    if launch.interrupt.load(Ordering::Relaxed) {
        return Err(LaunchError::Interrupted);
    }
    Ok(Served::Stopped)
}

/// A launch up to a VM process running: the plan admitted, the VM's directory and private
/// files made, QEMU started, `vm.started` recorded.
struct Started<T> {
    audit: Arc<HostAudit>,
    plan: VerifiedPlan,
    /// What the caller settled on the verified plan before it was used up.
    settled: T,
    accel: Accel,
    vm: String,
    dir: VmDir,
    /// The socket QEMU connects the agent channel to (none for the own VMM).
    listener: Option<UnixListener>,
    socket: PathBuf,
    vm_process: VmProcess,
}

/// Where a launch's VM comes from.
enum Origin<'a> {
    /// A fresh boot, in a new directory that keeps what [`Keep`] says.
    Boot(Keep),
    /// A cold VM woken: its directory (locked) and its verified state (the own VMM restores
    /// from it as it starts; QEMU is streamed it once started).
    Wake(VmDir, &'a mut ColdState),
}

fn start<T>(
    launch: &Launch,
    origin: Origin<'_>,
    settle: impl FnOnce(&VerifiedPlan) -> Result<T, AdmissionError>,
) -> Result<Started<T>, Box<Failure>> {
    let again = match &origin {
        Origin::Boot(_) => None,
        Origin::Wake(_, saved) => Some(saved.manifest.plan_digest.clone()),
    };
    let again = again.as_deref();
    let audit = Arc::new(HostAudit::open(&launch.home).map_err(LaunchError::Audit)?);
    let trust = KeyStore::new(launch.home.clone())
        .trust_store()
        .map_err(|e| LaunchError::Refused(e.into()))?;
    let ledger = NonceLedger::in_home(&launch.home).map_err(|e| LaunchError::Refused(e.into()))?;
    let admission = PlanAdmission::new(trust, ledger);
    // The command and the backend are settled on the verified plan, before a single-use plan
    // is used up; only then is `/dev/kvm` looked at or QEMU asked its version.
    let admitted = admit_bundle(
        &launch.envelope,
        &admission,
        time::OffsetDateTime::now_utc(),
        again,
        |verified| {
            let settled = settle(verified)?;
            let unavailable = |e: HostError| AdmissionError::NotRunnable {
                code: e.code().into(),
                reason: e.to_string(),
            };
            // One look at the host: the QEMU it found is the one that runs.
            let facts = HostFacts::detect();
            let selected = select::select(launch.backend, &facts).map_err(unavailable)?;
            let qemu = match selected.backend {
                Backend::Qemu => Some(facts.qemu.map_err(unavailable)?.path),
                Backend::Kvm => None,
            };
            Ok((settled, selected.accel, qemu))
        },
    );
    let (admitted, (settled, accel, qemu)) = match admitted {
        Ok(admitted) => admitted,
        Err(error) => {
            let fields = json!({"plan": launch.envelope, "code": error.code()});
            // The refusal stands whether or not it could be recorded.
            let _ = audit.append("plan.refused", fields);
            return Err(LaunchError::Refused(error).into());
        }
    };
    let plan = admitted.plan;
    let woken = again.is_some();
    let (vm, dir, saved) = match origin {
        Origin::Boot(keep) => {
            let vm = format!(
                "vm-{}",
                &mvm_ir::plan::fresh_nonce().map_err(LaunchError::Audit)?[..12]
            );
            let dir = VmDir::create(&launch.home, &vm, keep)?;
            (vm, dir, None)
        }
        Origin::Wake(dir, saved) => (saved.manifest.vm.clone(), dir, Some(saved)),
    };
    audit
        .append(
            match woken {
                true => "plan.readmitted",
                false => "plan.admitted",
            },
            json!({
                "vm": vm,
                "name": dir.name(),
                "plan_digest": plan.digest,
                "signer": plan.keyid,
                "workload": plan.plan.workload_id,
                "app": plan.plan.app,
                "single_use": plan.plan.single_use,
            }),
        )
        .map_err(LaunchError::Audit)?;

    let kernel = dir.private_copy("kernel", &admitted.artifacts.kernel)?;
    let initramfs = dir.private_copy("initramfs", &admitted.artifacts.initramfs)?;
    let socket = dir.path.join("agent.sock");
    let serial_log = dir.serial_log(woken)?;
    let (listener, vm_process) = match qemu {
        Some(qemu) => {
            let listener =
                UnixListener::bind(&socket).map_err(LaunchError::host("agent socket"))?;
            fs::set_permissions(&socket, fs::Permissions::from_mode(0o600))
                .map_err(LaunchError::host("agent socket"))?;
            listener
                .set_nonblocking(true)
                .map_err(LaunchError::host("agent socket"))?;
            let files = VmFiles {
                kernel: &kernel,
                initramfs: &initramfs,
                rootfs: &admitted.artifacts.rootfs,
                verity: &admitted.artifacts.verity,
                agent_socket: &socket,
                qmp_socket: &dir.path.join(qemu::QMP_SOCKET),
            };
            let mut args = qemu::arguments(&plan.plan, &files, accel);
            if woken {
                let socket = dir.path.join(cold::WAKE_SOCKET);
                let incoming = qemu::migration::incoming_argument(&socket)
                    .map_err(|e| ColdError::Wake(e.to_string()))
                    .map_err(LaunchError::from)?;
                args.extend(["-incoming".into(), incoming.into()]);
            }
            let vm_process = qemu::spawn(&qemu, &args, serial_log)
                .map_err(|e| LaunchError::Backend(format!("starting {}: {e}", qemu.display())))?;
            (Some(listener), VmProcess::Qemu(vm_process))
        }
        None => {
            let files = OwnVmFiles {
                kernel: &kernel,
                initramfs: &initramfs,
                rootfs: &admitted.artifacts.rootfs,
                verity: &admitted.artifacts.verity,
            };
            let vmm_failed = |e: VmmError| LaunchError::Backend(format!("{}: {e}", e.code()));
            let spec = VmSpec {
                huge_pages: launch.huge_pages,
                ..spec_for_plan(&plan.plan, &files).map_err(vmm_failed)?
            };
            let vm = match (launch.jail, saved) {
                (Some(_), Some(_)) => {
                    let reason = "a jailed VM is never saved cold".to_string();
                    return Err(LaunchError::from(ColdError::Wake(reason)).into());
                }
                (Some(jail), None) => {
                    VmProcess::Jailed(boot_jailed(jail, &dir, &spec, serial_log)?)
                }
                (None, Some(saved)) => VmProcess::Own(
                    OwnVm::restore(spec, serial_log, &mut saved.memory, &saved.manifest.memory)
                        .map_err(|e| LaunchError::from(ColdError::from(e)))?,
                ),
                (None, None) => VmProcess::Own(OwnVm::boot(spec, serial_log).map_err(vmm_failed)?),
            };
            (None, vm)
        }
    };
    audit.append(
        "vm.started",
        json!({"vm": vm, "backend": vm_process.backend().to_string(), "accel": accel.to_string(),
               "pid": vm_process.pid(), "woken": woken,
               "jailed": matches!(vm_process, VmProcess::Jailed(_))}),
    ).map_err(LaunchError::Audit)?;
    Ok(Started {
        audit,
        plan,
        settled,
        accel,
        vm,
        dir,
        listener,
        socket,
        vm_process,
    })
}

/// Starts the own VMM jailed as `jail` in the VM's directory, the runner's own binary
/// re-executed as the child (which gets the artifacts as descriptors the runner opened: the
/// jail's uid needs no access to them).
fn boot_jailed(
    jail: Jail,
    dir: &VmDir,
    spec: &VmSpec,
    serial_log: File,
) -> Result<JailedVm, LaunchError> {
    let jail_failed = |e: JailError| LaunchError::Backend(format!("{}: {e}", e.code()));
    let root = dir.path.join(jailed::JAIL_DIR);
    JailedVm::boot(Path::new("/proc/self/exe"), jail, &root, spec, serial_log).map_err(jail_failed)
}

/// The failure report for `error`: the console's tail, and its log kept unless the run was
/// stopped on purpose.
fn failure(error: LaunchError, vm: &VmProcess, dir: VmDir) -> Box<Failure> {
    let serial_log = match error {
        LaunchError::Interrupted => None,
        _ => dir.keep_log(),
    };
    Box::new(Failure {
        error,
        console_tail: Some(vm.console().tail()),
        serial_log,
    })
}

/// A guest whose agent said hello.
struct Booted {
    client: AgentClient,
    hello: HelloReply,
    ready_ms: u64,
}

/// A command that ran to the end, with the channel still open for the power-off.
struct Ran {
    hello: HelloReply,
    ready_ms: u64,
    argv_sha256: String,
    executed: Executed,
    started_at: Timestamp,
    ended_at: Timestamp,
    client: AgentClient,
}

/// Waits for the agent channel (QEMU connects it; the own VMM's is connected already) and
/// the agent's hello.
fn boot(
    launch: &Launch,
    listener: Option<&UnixListener>,
    vm: &mut VmProcess,
) -> Result<Booted, LaunchError> {
    let boot_deadline = Instant::now() + launch.boot_timeout;
    let stream = match (vm.take_channel(), listener) {
        (Some(stream), _) => stream,
        (None, Some(listener)) => accept_from(listener, vm, boot_deadline, launch)?,
        (None, None) => return Err(LaunchError::Backend("no agent channel".into())),
    };
    let mut client = AgentClient::new(stream, Arc::clone(&launch.interrupt))
        .map_err(LaunchError::host("agent channel"))?;
    let left = boot_deadline.saturating_duration_since(Instant::now());
    let hello = client
        .hello(left)
        .map_err(|e| why_the_guest_stopped(vm, e, Some(launch.boot_timeout)))?;
    Ok(Booted {
        client,
        hello,
        ready_ms: launch.started.elapsed().as_millis() as u64,
    })
}

/// Runs the one command of a launch.
fn run_command(
    vm: &mut VmProcess,
    booted: Booted,
    request: ExecRequest,
    sink: &mut dyn OutputSink,
) -> Result<Ran, LaunchError> {
    let Booted {
        mut client,
        hello,
        ready_ms,
    } = booted;
    let answer_timeout = Duration::from_millis(request.timeout_ms) + ANSWER_GRACE;
    let argv_sha256 =
        mvm_ir::digest::sha256_prefixed(&serde_json::to_vec(&request.argv).map_err(|e| {
            LaunchError::Host {
                what: "the command".into(),
                source: io::Error::other(e),
            }
        })?);
    let started_at = Timestamp::now();
    let executed = client
        .exec(request, answer_timeout, sink)
        .map_err(|e| match e {
            ClientError::Refused(refusal) if refusal.code == codes::INTEGRITY => {
                LaunchError::Integrity(refusal.message)
            }
            ClientError::Refused(refusal) => LaunchError::CommandRefused(refusal),
            ClientError::Output(source) => LaunchError::Host {
                what: "passing on the command's output".into(),
                source,
            },
            other => why_the_guest_stopped(vm, other, None),
        })?;
    if executed.reply.integrity == Integrity::Corrupted {
        return Err(LaunchError::Integrity(
            "dm-verity refused a block of the root while the command ran; \
             its output cannot be trusted"
                .into(),
        ));
    }
    Ok(Ran {
        hello,
        ready_ms,
        argv_sha256,
        executed,
        started_at,
        ended_at: Timestamp::now(),
        client,
    })
}

/// Accepts the agent channel's connection, from the VM process and nobody else.
fn accept_from(
    listener: &UnixListener,
    vm: &mut VmProcess,
    deadline: Instant,
    launch: &Launch,
) -> Result<UnixStream, LaunchError> {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let peer = rustix::net::sockopt::socket_peercred(&stream)
                    .map_err(|e| LaunchError::host("agent socket peer")(e.into()))?;
                if peer.pid.as_raw_nonzero().get() as u32 == vm.pid() {
                    stream
                        .set_nonblocking(false)
                        .map_err(LaunchError::host("agent socket"))?;
                    return Ok(stream);
                }
                // Not the VM: the directory is private, but refuse it all the same.
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(LaunchError::host("agent socket")(e)),
        }
        if let Some(status) = vm
            .try_wait()
            .map_err(LaunchError::host("waiting for the VM"))?
        {
            return Err(LaunchError::Backend(format!(
                "{} exited ({status}) before connecting: {}",
                vm.name(),
                vm.stderr()
            )));
        }
        if launch.interrupt.load(Ordering::Relaxed) {
            return Err(LaunchError::Interrupted);
        }
        if Instant::now() >= deadline {
            return Err(LaunchError::BootTimeout(launch.boot_timeout));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Turns a broken or silent channel into the reason the guest gave, if it gave one: the
/// agent's error line on the console (an integrity failure has its own), a kernel panic, or
/// QEMU's own exit. `booting` is the boot timeout while the guest is booting: silence then is
/// a boot timeout; later it is a channel failure.
fn why_the_guest_stopped(
    vm: &mut VmProcess,
    error: ClientError,
    booting: Option<Duration>,
) -> LaunchError {
    if matches!(error, ClientError::Interrupted) {
        return LaunchError::Interrupted;
    }
    if matches!(error, ClientError::Closed | ClientError::Timeout(_)) {
        // The console reader may still be catching up with the last lines.
        let _ = vm.wait_for_exit(Duration::from_secs(2));
    }
    let console = vm.console();
    if let Some(failure) = console.agent_failure() {
        return if failure.code == codes::INTEGRITY {
            LaunchError::Integrity(failure.line)
        } else {
            LaunchError::GuestFailed(failure.line)
        };
    }
    if console.kernel_panicked() {
        return LaunchError::GuestFailed("the guest kernel panicked".into());
    }
    match (error, vm.try_wait(), booting) {
        (ClientError::Timeout(_), Ok(None), Some(limit)) => LaunchError::BootTimeout(limit),
        (_, Ok(Some(status)), _) => LaunchError::Backend(format!(
            "{} exited ({status}); {}",
            vm.name(),
            match vm.stderr() {
                stderr if stderr.is_empty() => "it printed nothing".to_string(),
                stderr => stderr,
            }
        )),
        (error, _, _) => LaunchError::Channel(error),
    }
}

/// The exec request for the plan: the command line's argv or the plan's entrypoint, the
/// plan's environment and working directory.
/// Refuses a plan that needs secrets: the runner cannot resolve secret references yet.
fn secrets_resolvable(plan: &VerifiedPlan) -> Result<(), AdmissionError> {
    let required: Vec<&str> = plan
        .plan
        .policy
        .secrets
        .iter()
        .filter(|s| !s.optional)
        .map(|s| s.name.as_str())
        .collect();
    if required.is_empty() {
        return Ok(());
    }
    Err(AdmissionError::NotRunnable {
        code: "RUN030".into(),
        reason: format!(
            "the plan needs secrets ({}); secret references are not resolved by this runner yet",
            required.join(", ")
        ),
    })
}

fn exec_request(plan: &VerifiedPlan, launch: &Launch) -> Result<ExecRequest, AdmissionError> {
    secrets_resolvable(plan)?;
    let timeout = launch.timeout.unwrap_or(control::MAX_TIMEOUT);
    let asked = ExecRequest {
        argv: launch.argv.clone(),
        env: BTreeMap::new(),
        cwd: None,
        timeout_ms: timeout.as_millis().min(u128::from(u64::MAX)) as u64,
        stdin: false,
        user: None,
    };
    // The same defaults as a named VM's commands get; no client variables to refuse here.
    let request = control::with_plan_defaults(&plan.plan, asked).map_err(|reason| {
        AdmissionError::NotRunnable {
            code: "RUN029".into(),
            reason,
        }
    })?;
    if request.argv.is_empty() {
        return Err(AdmissionError::NotRunnable {
            code: "RUN029".into(),
            reason: "no command: give one after `--`, or build the plan with an entrypoint".into(),
        });
    }
    Ok(request)
}

/// What a VM's directory keeps when the launch ends.
enum Keep {
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
struct VmDir {
    path: PathBuf,
    keep: Keep,
    /// A named VM's lock, held for the runner's life.
    _lock: Option<ExclusiveLock>,
}

impl VmDir {
    fn create(home: &MvmHome, vm: &str, keep: Keep) -> Result<Self, LaunchError> {
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
    fn reopen(home: &MvmHome, name: &str) -> Result<Self, LaunchError> {
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
    fn name(&self) -> Option<&str> {
        match &self.keep {
            Keep::Record(name) => Some(name),
            _ => None,
        }
    }

    /// Writes `bytes` (already hashed) to a new file only the runner can read.
    fn private_copy(&self, name: &str, bytes: &[u8]) -> Result<PathBuf, LaunchError> {
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
    fn serial_log(&self, continued: bool) -> Result<File, LaunchError> {
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
    fn keep_log(mut self) -> Option<PathBuf> {
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
