//! One launch, start to end: admit the plan, boot it, run one command, power off, and leave
//! the evidence (audit entries) and nothing else behind.
//!
//! The order is the security argument. Nothing is created and no VM process starts before
//! the plan and its kernel and initramfs have passed [`crate::admission`]; QEMU then boots
//! private copies of exactly the bytes that were hashed. Every way a launch can end has its
//! own stable code and exit status ([`mvm_ir::Coded::code`], [`LaunchError::exit_status`],
//! [`exit`]), so a caller can tell a refused plan from a corrupted root from a command that
//! merely failed.
//!
//! By job: [`error`] (codes and exit statuses), `start` (admission to a running VM process),
//! this module (the one-shot run), [`named`] (serve, wake, keep serving), `vm_dir` (the
//! VM's directory).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mvm_ir::admission::VerifiedPlan;
use mvm_ir::home::MvmHome;
use mvm_ir::plan::Timestamp;
use mvm_ir::receipt::{CommandResult, EgressCounts, EgressDecision, OutputDigest, Receipt};
use mvm_ir::Coded;
use mvm_protocol::{
    codes, ExecRequest, ExitStatus, HelloReply, Integrity, Request, Response, SecretHex,
};
use serde_json::json;

use crate::admission::AdmissionError;
use crate::backend::kvm::jailed::Jail;
use crate::backend::select::{Accel, BackendChoice};
use crate::backend::VmProcess;
use crate::client::{AgentClient, ClientError, Digests, Executed, OutputSink};
use crate::control;
use crate::egress::judge::Denial;
use crate::forward::PortSpec;
use crate::mux::AgentMux;
use crate::secrets::redact::{Redactions, Redactor};
use crate::secrets::{LaunchSecrets, SecretRef};
use egress::{egress_for, serve_proxy, Egress};

mod egress;
pub mod error;
pub mod named;
mod restore;
mod services;
mod start;
mod vm_dir;

pub use error::{exit, Failure, LaunchError};
pub use named::{serve_named, wake_named};
use start::{failure, start, Origin, Started};
use vm_dir::Keep;

/// How long the agent has to carry out a request of the launch's set-up (a secret file, the
/// VM's CA, its proxy).
const AGENT_SETUP: Duration = Duration::from_secs(10);
/// How long the agent has to acknowledge a power-off, and QEMU to exit after it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Beyond a command's own timeout (which the agent enforces), how long the runner waits for
/// the agent's answer before giving up on the VM.
const ANSWER_GRACE: Duration = Duration::from_secs(30);
/// The console log's name in the VM's state directory.
const SERIAL_LOG: &str = "serial.log";

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
    /// Destinations taken away from the plan's egress grants for this launch (`--deny-host`):
    /// a launch may narrow its signed plan, never widen it.
    pub deny: Vec<Denial>,
    /// Print each egress decision to standard error as it is made (`--net-log`).
    pub net_log: bool,
    /// Host ports forwarded to guest ports, beyond the plan's own (`mvm up --port`).
    pub ports: Vec<PortSpec>,
    /// Variables set in the command's environment (a named VM's every command's), over the
    /// plan's own: `--env`, `--allow-env`. Refused unless the plan's profile and the host's
    /// policy let a client set them (RUN060).
    pub env: BTreeMap<String, String>,
    /// Secrets asked for beyond the plan's (`--secret NAME[:ENV]`), resolved at admission.
    pub secrets: Vec<SecretRef>,
    /// Secrets given as files of the guest's `/run/secrets` (`--secret-file NAME`).
    pub secret_files: Vec<String>,
    /// Host files holding ext4 filesystems, attached as disks and mounted in the guest
    /// (`--disk FILE:PATH[:ro]`).
    pub disks: Vec<crate::disk::LaunchDisk>,
    /// Placeholders to give bound secrets again, by name: a woken VM's (its processes hold
    /// them); empty for a first launch, whose placeholders are drawn fresh.
    pub placeholders: BTreeMap<String, String>,
    /// Boot the kernel even when the plan has a boot snapshot here (`--cold-boot`); none is
    /// made either.
    pub cold_boot: bool,
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
    /// The egress decisions made while it ran (the first 256).
    pub egress: Vec<EgressDecision>,
    /// Every egress decision counted, and the bytes each way.
    pub egress_counts: EgressCounts,
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
            egress: self.egress.clone(),
            egress_counts: self.egress_counts,
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
        settled: mut request,
        secrets,
        accel,
        vm,
        dir,
        listener,
        socket,
        mut vm_process,
        restored,
        disks,
        // Held until the VM is gone.
        disk_locks: _disk_locks,
    } = start(launch, Origin::Boot(Keep::Nothing), |verified| {
        exec_request(verified, launch)
    })?;

    // The secrets' variables over the plan's and the launch's.
    request.env.extend(secrets.env.clone());
    let mut redacting = RedactingSink::new(sink, &secrets.redactions);
    let mut outcome =
        egress_for(launch, &plan.plan, &audit, &vm, None, &secrets).and_then(|egress| {
            let renew_as = restored.as_ref().map(|_| vm.as_str());
            let mut booted = boot(launch, listener.as_ref(), &mut vm_process, renew_as)?;
            mount_disks(&mut booted.client, &disks)?;
            put_secret_files(&mut booted.client, &secrets)?;
            confine(egress.is_some())?;
            run_command(
                launch,
                &mut vm_process,
                booted,
                egress,
                request,
                &mut redacting,
            )
        });
    if let Err(e) = redacting.finish() {
        outcome = outcome.and_then(|_| Err(LaunchError::host("the command's output")(e)));
    }
    if let Ok(ran) = &mut outcome {
        [ran.executed.stdout, ran.executed.stderr] = redacting.shown();
    }
    // The socket's job is done either way; nobody may connect to it later.
    drop(listener);
    let _ = fs::remove_file(&socket);
    if let Ok(ran) = &mut outcome {
        // The guest syncs and powers off; it is killed after the grace either way.
        if let Ok(mut answer) = ran.mux.request(&mvm_protocol::Request::PowerOff) {
            let _ = answer.next_frame_within(SHUTDOWN_GRACE);
        }
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
        egress: ran
            .egress
            .as_ref()
            .map(|e| e.log.decisions())
            .unwrap_or_default(),
        egress_counts: ran
            .egress
            .as_ref()
            .map(|e| e.log.counts())
            .unwrap_or_default(),
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

/// A plan's boot snapshot, checked in use ([`prepare`]).
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The VM that restored it.
    pub vm: String,
    /// The admitted plan's digest.
    pub plan_digest: String,
    /// The boot snapshot's key.
    pub key: String,
    /// From the runner's start to the restored agent's hello and renewal.
    pub ready_ms: u64,
}

/// Makes sure the plan of `launch` has a boot snapshot here (`mvm snapshot make`): restores
/// it — made first when there is none, or the one there is refused — checks that the
/// restored guest answers and takes its renewal, and powers it off. No command runs.
pub fn prepare(launch: &Launch) -> Result<Prepared, Box<Failure>> {
    let Started {
        audit,
        plan,
        vm,
        dir,
        listener,
        socket,
        mut vm_process,
        restored,
        ..
    } = start(launch, Origin::Boot(Keep::Nothing), |_| Ok(()))?;
    let outcome = match restored {
        Some(key) => {
            boot(launch, listener.as_ref(), &mut vm_process, Some(&vm)).map(|mut booted| {
                let _ = booted.client.call(&Request::PowerOff, SHUTDOWN_GRACE, None);
                let _ = vm_process.wait_for_exit(SHUTDOWN_GRACE);
                Prepared {
                    vm: vm.clone(),
                    plan_digest: plan.digest.clone(),
                    key,
                    ready_ms: booted.ready_ms,
                }
            })
        }
        None => Err(crate::boot_snapshot::BootSnapshotError::Make(
            "this launch has no boot snapshot: a single-use plan, --cold-boot, a disk or \
             volume, --jail or --huge-pages"
                .into(),
        )
        .into()),
    };
    drop(listener);
    let _ = fs::remove_file(&socket);
    vm_process.kill();
    let reason = match &outcome {
        Ok(_) => "boot snapshot checked",
        Err(error) => error.code(),
    };
    audit
        .append(
            "vm.exited",
            json!({"vm": vm, "reason": reason,
               "duration_ms": launch.started.elapsed().as_millis() as u64}),
        )
        .map_err(LaunchError::Audit)?;
    outcome.map_err(|error| failure(error, &vm_process, dir))
}

/// Asks the agent for `request`, which it answers [`Response::Done`]; an agent that cannot
/// fails the launch, saying it could not do `what`.
pub(super) fn agent_done(
    client: &mut AgentClient,
    request: &Request,
    what: &str,
) -> Result<(), LaunchError> {
    match client.call(request, AGENT_SETUP, None) {
        Ok(Response::Done) => Ok(()),
        Ok(other) => Err(LaunchError::Channel(crate::client::unexpected(&other))),
        Err(ClientError::Refused(refusal)) => Err(LaunchError::GuestFailed(format!(
            "the agent could not {what}: {}: {}",
            refusal.code, refusal.message
        ))),
        Err(e) => Err(LaunchError::Channel(e)),
    }
}

/// Writes the launch's secret files in the guest (`--secret-file`), before any command runs.
fn put_secret_files(client: &mut AgentClient, secrets: &LaunchSecrets) -> Result<(), LaunchError> {
    for (name, bytes) in &secrets.files {
        let request = Request::SecretFile {
            name: name.clone(),
            value: SecretHex(hex::encode(bytes.as_slice())),
        };
        agent_done(client, &request, "write a secret file")?;
    }
    Ok(())
}

/// Mounts the launch's disks in the guest (`--disk`), before any command runs.
pub(super) fn mount_disks(
    client: &mut AgentClient,
    disks: &[crate::disk::LaunchDisk],
) -> Result<(), LaunchError> {
    for (index, disk) in disks.iter().enumerate() {
        let request = Request::Mount {
            serial: crate::disk::LaunchDisk::serial(index),
            path: disk.path.clone(),
            read_only: disk.read_only,
            key: disk
                .volume
                .as_ref()
                .map(|volume| SecretHex(hex::encode(volume.key.as_slice()))),
        };
        agent_done(client, &request, &format!("mount the disk {disk}"))?;
    }
    Ok(())
}

/// The command's output on its way to `sink`, scrubbed of the launch's secrets, and the
/// digests of what was passed on: the receipt records what was shown, never a digest of
/// output that held a value (one a guess could be checked against).
struct RedactingSink<'a> {
    sink: &'a mut dyn OutputSink,
    stdout: Redactor<'a>,
    stderr: Redactor<'a>,
    shown: Digests,
}

impl<'a> RedactingSink<'a> {
    fn new(sink: &'a mut dyn OutputSink, redactions: &'a Redactions) -> Self {
        Self {
            sink,
            stdout: redactions.redactor(),
            stderr: redactions.redactor(),
            shown: Digests::default(),
        }
    }

    /// Passes on what was held back for a value that might have continued.
    fn finish(&mut self) -> io::Result<()> {
        let (stdout, stderr) = (self.stdout.finish(), self.stderr.finish());
        self.shown.stdout(&stdout);
        self.sink.stdout(&stdout)?;
        self.shown.stderr(&stderr);
        self.sink.stderr(&stderr)
    }

    /// The digests of what was passed on, stdout's and stderr's.
    fn shown(self) -> [OutputDigest; 2] {
        self.shown.finish()
    }
}

impl OutputSink for RedactingSink<'_> {
    fn stdout(&mut self, bytes: &[u8]) -> io::Result<()> {
        let scrubbed = self.stdout.push(bytes);
        self.shown.stdout(&scrubbed);
        self.sink.stdout(&scrubbed)
    }

    fn stderr(&mut self, bytes: &[u8]) -> io::Result<()> {
        let scrubbed = self.stderr.push(bytes);
        self.shown.stderr(&scrubbed);
        self.sink.stderr(&scrubbed)
    }
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
    mux: AgentMux,
    egress: Option<Egress>,
}

/// Waits for the agent channel (QEMU connects it; the own VMM's is connected already) and
/// the agent's hello; a guest restored from a boot snapshot is then renewed as the VM
/// `renew_as` ([`restore::renew`]) before anything else is asked of it.
fn boot(
    launch: &Launch,
    listener: Option<&UnixListener>,
    vm: &mut VmProcess,
    renew_as: Option<&str>,
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
    if let Some(vm) = renew_as {
        restore::renew(&mut client, vm)?;
    }
    Ok(Booted {
        client,
        hello,
        ready_ms: launch.started.elapsed().as_millis() as u64,
    })
}

/// Puts the runner under its own seccomp filter ([`crate::seccomp`]), once the VM runs and its
/// agent said hello: every process the runner starts has been started. A runner that cannot be
/// filtered does not go on (RUN051). Sockets to the network are allowed only when the launch
/// carries egress.
fn confine(egress: bool) -> Result<(), LaunchError> {
    crate::seccomp::install(egress).map(drop).map_err(|e| {
        LaunchError::Refused(AdmissionError::NotRunnable {
            code: e.code().into(),
            reason: e.to_string(),
        })
    })
}

/// Runs the one command of a launch, its egress served while it runs.
fn run_command(
    launch: &Launch,
    vm: &mut VmProcess,
    booted: Booted,
    egress: Option<Egress>,
    request: ExecRequest,
    sink: &mut dyn OutputSink,
) -> Result<Ran, LaunchError> {
    let Booted {
        mut client,
        hello,
        ready_ms,
    } = booted;
    if let Some(egress) = &egress {
        serve_proxy(&mut client, egress)?;
    }
    let (stream, last_stream) = client
        .into_stream()
        .map_err(LaunchError::host("agent channel"))?;
    let opener = egress.as_ref().map(|e| Arc::clone(&e.handler));
    let mux = AgentMux::serving(stream, last_stream, opener)
        .map_err(LaunchError::host("agent channel"))?;
    let answer_timeout = Duration::from_millis(request.timeout_ms) + ANSWER_GRACE;
    let argv_sha256 =
        mvm_ir::digest::sha256_prefixed(&serde_json::to_vec(&request.argv).map_err(|e| {
            LaunchError::Host {
                what: "the command".into(),
                source: io::Error::other(e),
            }
        })?);
    let started_at = Timestamp::now();
    let executed = mux
        .exec(request, answer_timeout, &launch.interrupt, sink)
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
        mux,
        egress,
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

/// The exec request for the plan: the command line's argv or the plan's entrypoint, with the
/// plan's environment and working directory.
fn exec_request(plan: &VerifiedPlan, launch: &Launch) -> Result<ExecRequest, AdmissionError> {
    let timeout = launch.timeout.unwrap_or(control::MAX_TIMEOUT);
    let asked = ExecRequest {
        argv: launch.argv.clone(),
        env: launch.env.clone(),
        cwd: None,
        timeout_ms: timeout.as_millis().min(u128::from(u64::MAX)) as u64,
        stdin: false,
        user: None,
        tty: None,
    };
    // The same defaults as a named VM's commands get; the launch's variables were checked at
    // admission (RUN060).
    let request = control::with_plan_defaults(&plan.plan, &BTreeMap::new(), &Ok(()), asked)
        .map_err(|(_, reason)| AdmissionError::NotRunnable {
            code: crate::codes::RUN029.into(),
            reason,
        })?;
    if request.argv.is_empty() {
        return Err(AdmissionError::NotRunnable {
            code: crate::codes::RUN029.into(),
            reason: "no command: give one after `--`, or build the plan with an entrypoint".into(),
        });
    }
    Ok(request)
}
