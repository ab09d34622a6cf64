//! Long-lived VMs: `mvm up`, `ls`, `exec`, `logs`, `wait`, `stop`, `rm`.
//!
//! `mvm up` starts `mvm-runner --name NAME` in a process group of its own and returns once
//! the agent is ready; that runner owns the VM for its whole life and serves its control
//! socket, `$MVM_HOME/vms/NAME/control.sock`, which the other commands talk to. No daemon:
//! each VM is its own runner process.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use mvm_agent::protocol::{ExecRequest, Integrity, Request};
use mvm_ir::fsutil::ExclusiveLock;
use mvm_ir::receipt::Receipt;
use mvm_runner::client::{AgentClient, ClientError, StdStreams};
use mvm_runner::control::MAX_TIMEOUT;
use mvm_runner::launch::{command_result, exit, LaunchError};
use mvm_runner::state::{self, Phase, VmState};
use serde_json::{json, Value};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use super::run::{plan_to_boot, sibling, ImageOptions};
use super::{coded_as, Host};
use crate::output::Output;

/// Beyond a command's timeout, how long to wait for its answer.
const ANSWER_GRACE: Duration = Duration::from_secs(30);
/// How long `mvm stop` waits for the runner to power the VM off.
const STOP_WAIT: Duration = Duration::from_secs(30);

/// Start a VM that stays up: boot the signed plan (or the image, built first) and return once
/// its agent is ready. Talk to it with `mvm exec NAME`, end it with `mvm stop NAME`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// The image, REFERENCE@sha256:<digest> (built into a cached bundle, as `mvm run` does).
    #[arg(required_unless_present = "plan", conflicts_with = "plan")]
    image: Option<String>,
    /// A signed plan (`plan.dsse.json` of a bundle made by `mvm build`).
    #[arg(long, value_name = "FILE")]
    plan: Option<PathBuf>,
    /// The VM's name (1-63 of a-z 0-9 _ . -).
    #[arg(long)]
    name: String,
    #[command(flatten)]
    image_options: ImageOptions,
    /// Give up when the guest is not ready after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s", value_name = "DURATION")]
    boot_timeout: Duration,
    /// auto, qemu or kvm (see `mvm doctor`).
    #[arg(long, default_value = "auto", value_name = "auto|qemu|kvm")]
    backend: String,
    /// Back guest RAM with 2 MiB huge pages from the host's pool (`/proc/sys/vm/nr_hugepages`);
    /// the kvm backend only (`--backend kvm`).
    #[arg(long)]
    huge_pages: bool,
    /// For an image: the entrypoint to sign into its plan (default: the image's own).
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// Run a command in a running VM; streams its output and exits with its status (as `mvm
/// run` does: 121 integrity failure, 124 timeout, 126/127 not executable/found, 128+N signal).
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The VM.
    name: String,
    /// Kill the command and everything it started after this long.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    timeout: Option<Duration>,
    /// An environment variable for the command, over the plan's (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// The working directory (default: the plan's).
    #[arg(long, value_name = "DIR")]
    cwd: Option<String>,
    /// Write a signed run receipt here once the command has ended (`mvm receipt verify`).
    #[arg(long, value_name = "FILE")]
    receipt: Option<PathBuf>,
    /// Run as this guest user: a name from the image's /etc/passwd, or UID[:GID]; never root
    /// (AGENT114). Default: the workload user, uid 1000.
    #[arg(long, value_name = "USER")]
    user: Option<String>,
    /// Feed this process's standard input to the command (its end closes the command's).
    #[arg(short, long)]
    interactive: bool,
    /// Start the command in the background and print its handle, for `mvm ps`, `mvm wait
    /// NAME --process HANDLE` (its status and the last 64 KiB of its output) and `mvm kill`.
    #[arg(short, long, conflicts_with_all = ["interactive", "receipt"])]
    detach: bool,
    /// The command; the plan's entrypoint when absent.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// Remove a VM's record; a VM still running is refused unless --force (which stops it).
#[derive(Debug, Args)]
pub struct RmArgs {
    /// The VM.
    name: String,
    /// Stop it first if it runs (kill its runner if it does not stop).
    #[arg(long)]
    force: bool,
}

/// Print a VM's console: the guest kernel's and the agent's lines.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The VM.
    name: String,
    /// Keep printing new lines while the VM runs.
    #[arg(short, long)]
    follow: bool,
}

/// What `mvm wait` waits for.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum WaitFor {
    /// The agent answered: commands can run.
    Ready,
    /// The VM has ended (stopped or failed).
    Stopped,
}

/// Wait until a VM is ready (or has ended); exit 0 when it got there, 1 when it cannot any
/// more (a VM that failed never becomes ready; a cold one changes only when resumed or
/// stopped), RUN036 after the timeout. With --process, wait for a command started with `mvm
/// exec --detach` instead: print the last of its output and exit with its status (RUN036 if
/// it still runs at the timeout).
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// The VM.
    name: String,
    /// The state to wait for.
    #[arg(long = "for", value_enum, default_value = "ready")]
    until: WaitFor,
    /// The handle of a background command to wait for.
    #[arg(long, value_name = "HANDLE")]
    process: Option<u64>,
    /// Give up after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s", value_name = "DURATION")]
    timeout: Duration,
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .filter(|(key, _)| !key.is_empty())
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

/// `$MVM_HOME/vms/NAME`, for a valid name.
fn vm_dir(host: &Host, name: &str) -> anyhow::Result<PathBuf> {
    if !state::valid_name(name) {
        return Err(coded_as(
            "RUN035",
            format!("{name:?} cannot name a VM: use 1-63 of a-z 0-9 _ . -, starting with a letter or digit"),
        ));
    }
    Ok(host.home.ensure("vms")?.join(name))
}

/// The state of the VM `name`, as it really is.
fn observe(host: &Host, name: &str) -> anyhow::Result<(PathBuf, VmState)> {
    let dir = vm_dir(host, name)?;
    if !dir.join(state::STATE_FILE).exists() {
        return Err(coded_as("RUN036", format!("there is no VM named {name}")));
    }
    let seen = state::observe(&dir).map_err(|e| coded_as("RUN036", e))?;
    Ok((dir, seen))
}

fn state_json(state: &VmState) -> Value {
    serde_json::to_value(state).unwrap_or(Value::Null)
}

pub fn up(args: UpArgs, out: &Output) -> anyhow::Result<ExitCode> {
    let host = Host::open()?;
    let dir = vm_dir(&host, &args.name)?;
    if dir.exists() {
        return Err(coded_as(
            "RUN034",
            format!(
                "a VM named {} exists already; remove it with `mvm rm {}` first",
                args.name, args.name
            ),
        ));
    }
    let plan = plan_to_boot(
        args.plan.as_deref(),
        args.image.as_deref(),
        &args.image_options,
        &args.command,
    )?;
    let mut runner = runner_command(args.boot_timeout)?;
    runner
        .arg("--plan")
        .arg(&plan)
        .args(["--name", &args.name, "--backend", &args.backend]);
    if args.huge_pages {
        runner.arg("--huge-pages");
    }
    let ready = match start_runner(runner)? {
        Ok(ready) => ready,
        Err(status) => return Ok(status),
    };
    out.result(json!({"vm": state_json(&ready)}), || {
        format!(
            "{} is running ({}, plan {})",
            ready.name, ready.vm, ready.plan_digest
        )
    });
    Ok(ExitCode::SUCCESS)
}

/// `mvm-runner` with the arguments every VM-serving runner gets.
pub(super) fn runner_command(boot_timeout: Duration) -> anyhow::Result<Command> {
    let mut command = Command::new(sibling("MVM_RUNNER", "mvm-runner")?);
    command
        .arg("--boot-timeout")
        .arg(humantime::format_duration(boot_timeout).to_string());
    Ok(command)
}

/// Starts a runner that serves a VM and waits for its ready line: the VM's state, or the
/// runner's exit status once it failed (its error printed).
pub(super) fn start_runner(mut command: Command) -> anyhow::Result<Result<VmState, ExitCode>> {
    let program = command.get_program().to_owned();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: the terminal's Ctrl-C is not for it once `mvm up` returns.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", program.to_string_lossy()))?;
    let stdout = child.stdout.take().context("the runner's stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let ready = serde_json::from_str::<Value>(&line)
        .ok()
        .and_then(|v| serde_json::from_value::<VmState>(v["ready"].clone()).ok());
    let Some(ready) = ready else {
        // Not the ready line: the runner failed before the VM was ready (its error is on its
        // stderr), or it speaks otherwise — in which case it must not be left running.
        if !line.is_empty() {
            if let Some(group) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
            }
        }
        let mut error = String::new();
        if let Some(mut stderr) = child.stderr.take() {
            let _ = stderr.read_to_string(&mut error);
        }
        let status = child.wait()?;
        eprint!("{error}");
        return Ok(Err(ExitCode::from(status.code().unwrap_or(125) as u8)));
    };
    Ok(Ok(ready))
}

pub fn ls(out: &Output) -> anyhow::Result<()> {
    let host = Host::open()?;
    let vms = host.home.ensure("vms")?;
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&vms)? {
        let dir = entry?.path();
        // One-shot runs leave only a console log behind when they fail: not named VMs.
        if dir.join(state::STATE_FILE).exists() {
            match state::observe(&dir) {
                Ok(state) => seen.push(state),
                Err(e) => eprintln!("mvm: {}: {e}", dir.display()),
            }
        }
    }
    seen.sort_by(|a, b| a.name.cmp(&b.name));
    out.result(
        json!({"vms": seen.iter().map(state_json).collect::<Vec<_>>()}),
        || {
            let mut text = format!(
                "{:<20} {:<9} {:<7} {:<16} {:<21} REASON",
                "NAME", "STATE", "BACKEND", "VM", "STARTED"
            );
            for vm in &seen {
                text.push_str(&format!(
                    "\n{:<20} {:<9} {:<7} {:<16} {:<21} {}",
                    vm.name,
                    vm.phase.name(),
                    vm.backend
                        .map_or_else(|| "-".to_string(), |b| b.to_string()),
                    vm.vm,
                    vm.started_at,
                    vm.reason.as_deref().unwrap_or("")
                ));
            }
            text
        },
    );
    Ok(())
}

/// Connects to the control socket of the running VM `name`.
pub(super) fn connect(
    host: &Host,
    name: &str,
    interrupt: Arc<AtomicBool>,
) -> anyhow::Result<AgentClient> {
    let (dir, seen) = observe(host, name)?;
    if seen.phase == Phase::Cold {
        return Err(coded_as(
            "RUN036",
            format!("{name} is cold: `mvm resume {name}` wakes it"),
        ));
    }
    if !matches!(seen.phase, Phase::Running | Phase::Paused) {
        return Err(coded_as(
            "RUN036",
            format!("{name} is {}, not running", seen.phase.name()),
        ));
    }
    let stream = UnixStream::connect(dir.join(state::CONTROL_SOCKET))
        .with_context(|| format!("connecting to {name}"))?;
    Ok(AgentClient::over_control_socket(stream, interrupt)?)
}

/// An agent's refusal keeps its own code; anything else about the channel is RUN025.
pub(super) fn agent_error(error: ClientError) -> anyhow::Error {
    match error {
        ClientError::Refused(refusal) => coded_as(&refusal.code, refusal.message),
        other => coded_as("RUN025", other),
    }
}

pub fn exec(args: ExecArgs, out: &Output) -> anyhow::Result<ExitCode> {
    let timeout = args.timeout.unwrap_or(MAX_TIMEOUT).min(MAX_TIMEOUT);
    let request = ExecRequest {
        argv: args.command,
        env: args.env.into_iter().collect::<BTreeMap<_, _>>(),
        cwd: args.cwd,
        timeout_ms: timeout.as_millis() as u64,
        stdin: false,
        user: args.user,
    };
    if args.detach {
        let host = Host::open()?;
        let mut client = connect(&host, &args.name, Arc::default())?;
        return super::process::spawn(&mut client, request, out);
    }
    let input = args
        .interactive
        .then(|| Box::new(io::stdin()) as Box<dyn Read + Send>);
    run_in(&args.name, request, input, args.receipt.as_deref())
}

/// Runs `request` in the VM `name`, feeding it `input`; streams its output, writes its
/// receipt when asked, and returns its exit status.
pub(super) fn run_in(
    name: &str,
    request: ExecRequest,
    input: Option<Box<dyn Read + Send>>,
    receipt: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let host = Host::open()?;
    let interrupt = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM, SIGHUP] {
        signal_hook::flag::register(signal, Arc::clone(&interrupt))?;
    }
    let (_, vm) = observe(&host, name)?;
    let mut client = connect(&host, name, interrupt)?;
    let started_at = mvm_ir::plan::Timestamp::now();
    let argv_sha256 = mvm_ir::digest::sha256_prefixed(&serde_json::to_vec(&request.argv)?);
    let answer_timeout = Duration::from_millis(request.timeout_ms) + ANSWER_GRACE;
    let executed = match client.exec_with_input(request, input, answer_timeout, &mut StdStreams) {
        Ok(executed) => executed,
        Err(ClientError::Refused(refusal)) => {
            let error = LaunchError::CommandRefused(refusal);
            // The agent's code leads its message already.
            eprintln!("mvm: error {error}");
            return Ok(ExitCode::from(error.exit_status()));
        }
        Err(ClientError::Interrupted) => return Ok(ExitCode::from(exit::INTERRUPTED)),
        Err(e) => return Err(coded_as("RUN025", e)),
    };
    let reply = &executed.reply;
    if reply.integrity == Integrity::Corrupted {
        eprintln!("mvm: error RUN020: dm-verity refused a block of the root while the command ran; its output cannot be trusted");
        return Ok(ExitCode::from(exit::INTEGRITY));
    }
    if let Some(path) = receipt {
        let receipt = Receipt {
            schema_version: mvm_ir::receipt::SCHEMA_VERSION.into(),
            plan_digest: vm.plan_digest,
            vm: vm.vm,
            argv_sha256,
            started_at,
            ended_at: mvm_ir::plan::Timestamp::now(),
            result: command_result(reply.status),
            stdout: executed.stdout.clone(),
            stderr: executed.stderr.clone(),
            egress: vec![],
            previous: None,
        };
        mvm_ir::receipt::issue(&host.home, receipt, &host.keys.host_signer()?, |bytes| {
            mvm_ir::fsutil::atomic_write(path, bytes, 0o644)
        })?;
    }
    Ok(ExitCode::from(exit::of_command(reply.status)))
}

/// Pauses (stops the vCPUs of) the running VM `name`; `cold` saves it to disk too, and
/// returns once its runner has let go of it.
pub fn pause(name: &str, cold: bool, out: &Output) -> anyhow::Result<()> {
    let host = Host::open()?;
    let mut client = connect(&host, name, Arc::default())?;
    let (request, answer_within) = match cold {
        // Saving writes the guest's memory: up to its size at disk speed.
        true => (Request::Save, Duration::from_secs(300)),
        false => (Request::Pause, Duration::from_secs(30)),
    };
    client
        .call(&request, answer_within, None)
        .map_err(agent_error)?;
    let (dir, mut seen) = observe(&host, name)?;
    if cold {
        // Cold means no process: its runner has let go of the VM and is gone, with the
        // guest's memory (which a process takes a while to give back, on a busy host).
        let deadline = Instant::now() + STOP_WAIT;
        while ExclusiveLock::try_acquire(&dir.join(state::LOCK_FILE))?.is_none()
            || process_lives(seen.runner_pid, "mvm-runner")
        {
            if Instant::now() > deadline {
                return Err(coded_as(
                    "RUN036",
                    format!("the runner of {name} did not let go of it"),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        seen = observe(&host, name)?.1;
    }
    out.result(json!({"vm": state_json(&seen)}), || {
        format!("{name} is {}", seen.phase.name())
    });
    Ok(())
}

/// Lets the paused VM `name` run again, or wakes it from cold with a new runner.
pub fn resume(name: &str, boot_timeout: Duration, out: &Output) -> anyhow::Result<ExitCode> {
    let host = Host::open()?;
    let (dir, seen) = observe(&host, name)?;
    let seen = if !seen.phase.is_live() && mvm_runner::cold::is_saved(&dir) {
        let mut runner = runner_command(boot_timeout)?;
        runner.args(["--wake", name]);
        match start_runner(runner)? {
            Ok(ready) => ready,
            Err(status) => return Ok(status),
        }
    } else {
        let mut client = connect(&host, name, Arc::default())?;
        client
            .call(&Request::Resume, Duration::from_secs(30), None)
            .map_err(agent_error)?;
        observe(&host, name)?.1
    };
    out.result(json!({"vm": state_json(&seen)}), || {
        format!("{name} is {}", seen.phase.name())
    });
    Ok(ExitCode::SUCCESS)
}

pub fn stop(name: &str, out: &Output) -> anyhow::Result<()> {
    let host = Host::open()?;
    let (dir, seen) = observe(&host, name)?;
    let state = match seen.phase {
        Phase::Cold => discard_cold(&host, &dir, seen)?,
        _ => stop_and_wait(&host, name)?,
    };
    out.result(json!({"vm": state_json(&state)}), || {
        format!("{name} is {}", state.phase.name())
    });
    Ok(())
}

/// Stops a cold VM for good: its saved state is removed, under its lock (no runner may be
/// waking it meanwhile).
fn discard_cold(host: &Host, dir: &Path, mut seen: VmState) -> anyhow::Result<VmState> {
    let Some(_lock) = ExclusiveLock::try_acquire(&dir.join(state::LOCK_FILE))? else {
        return Err(coded_as("RUN036", format!("{} is being woken", seen.name)));
    };
    host.audit("vm.discarded", json!({"name": seen.name, "vm": seen.vm}))?;
    mvm_runner::cold::discard(dir)?;
    seen.phase = Phase::Stopped;
    seen.reason = Some("stopped while cold: its saved state was discarded".into());
    state::write(dir, &seen)?;
    Ok(seen)
}

/// Asks the runner of `name` to power its VM off, and waits until it has.
fn stop_and_wait(host: &Host, name: &str) -> anyhow::Result<VmState> {
    let mut client = connect(host, name, Arc::default())?;
    client
        .power_off(Duration::from_secs(10))
        .map_err(|e| coded_as("RUN025", e))?;
    let (dir, _) = observe(host, name)?;
    let deadline = Instant::now() + STOP_WAIT;
    loop {
        let seen = state::observe(&dir).map_err(|e| coded_as("RUN036", e))?;
        if !seen.phase.is_live() {
            return Ok(seen);
        }
        if Instant::now() > deadline {
            return Err(coded_as(
                "RUN036",
                format!("{name} did not stop within {}s", STOP_WAIT.as_secs()),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn rm(args: RmArgs, out: &Output) -> anyhow::Result<()> {
    let host = Host::open()?;
    remove(&host, &args.name, args.force)?;
    out.result(json!({"removed": args.name}), || {
        format!("removed {}", args.name)
    });
    Ok(())
}

/// Removes the VM `name` and its directory; one still live is stopped first when `force`
/// says so, else refused.
pub(super) fn remove(host: &Host, name: &str, force: bool) -> anyhow::Result<()> {
    let (dir, seen) = observe(host, name)?;
    if seen.phase.is_live() {
        if !force {
            return Err(coded_as(
                "RUN037",
                format!(
                    "{} is {}: stop it first, or `mvm rm --force`",
                    name,
                    seen.phase.name()
                ),
            ));
        }
        if stop_and_wait(host, name).is_err() {
            kill_runner(&dir, &seen)?;
        }
    }
    // The runner may still be finishing after writing `stopped`: wait until it has let go of
    // the VM, and hold its lock while removing, so no runner works in the directory meanwhile.
    let deadline = Instant::now() + STOP_WAIT;
    let _lock = loop {
        if let Some(lock) = ExclusiveLock::try_acquire(&dir.join(state::LOCK_FILE))? {
            break lock;
        }
        if Instant::now() > deadline {
            return Err(coded_as(
                "RUN036",
                format!("the runner of {} still holds it", name),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    host.audit("vm.removed", json!({"name": name, "vm": seen.vm}))?;
    Ok(())
}

/// Whether process `pid`, named `name`, is there and not yet a zombie (a pid can be reused:
/// a process of another name is not it).
fn process_lives(pid: u32, name: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let (comm, rest) = stat.rsplit_once(')').unwrap_or_default();
        comm.ends_with(&format!("({name}")) && !rest.trim_start().starts_with('Z')
    })
}

/// Kills the runner of a VM that would not stop (its QEMU dies with it), once it is sure the
/// process is that runner: it still holds the VM's lock.
fn kill_runner(dir: &Path, seen: &VmState) -> anyhow::Result<()> {
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
        let alive = state::observe(dir).is_ok_and(|now| now.phase.is_live());
        if serving_it && alive {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
    let deadline = Instant::now() + STOP_WAIT;
    while state::observe(dir).is_ok_and(|now| now.phase.is_live()) {
        if Instant::now() > deadline {
            return Err(coded_as("RUN036", "the VM's runner did not exit"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

pub fn logs(args: LogsArgs) -> anyhow::Result<()> {
    let host = Host::open()?;
    let (dir, _) = observe(&host, &args.name)?;
    let mut log = std::fs::File::open(dir.join("serial.log"))
        .with_context(|| format!("{}'s console log", args.name))?;
    let mut out = io::stdout().lock();
    loop {
        io::copy(&mut log, &mut out)?;
        out.flush()?;
        let running = state::observe(&dir).is_ok_and(|now| now.phase.is_live());
        if !args.follow || !running {
            // One more pass: what was written just before the VM ended.
            io::copy(&mut log, &mut out)?;
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn wait(args: WaitArgs, out: &Output) -> anyhow::Result<ExitCode> {
    if let Some(handle) = args.process {
        return super::process::wait(&args.name, handle, args.timeout, out);
    }
    let host = Host::open()?;
    let deadline = Instant::now() + args.timeout;
    loop {
        let (_, seen) = observe(&host, &args.name)?;
        let reached = match args.until {
            WaitFor::Ready => seen.phase == Phase::Running,
            WaitFor::Stopped => matches!(seen.phase, Phase::Stopped | Phase::Failed),
        };
        // A cold VM changes only when told to (`mvm resume`, `mvm stop`).
        let unreachable = seen.phase == Phase::Cold
            || matches!(args.until, WaitFor::Ready)
                && matches!(seen.phase, Phase::Stopped | Phase::Failed);
        if reached || unreachable {
            out.result(json!({"vm": state_json(&seen), "reached": reached}), || {
                format!("{} is {}", seen.name, seen.phase.name())
            });
            return Ok(if reached {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        if Instant::now() > deadline {
            return Err(coded_as(
                "RUN036",
                format!(
                    "{} is still {} after {}",
                    args.name,
                    seen.phase.name(),
                    humantime::format_duration(args.timeout)
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
