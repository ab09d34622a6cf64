//! Long-lived VMs: `mvm up`, `ls`, `exec`, `pause`, `resume`, `logs`, `wait`, `stop`, `rm`,
//! and (in the files beside) `ps`, `kill`, `cp` and `fs`.
//!
//! `mvm up` starts `mvm-runner --name NAME` in a process group of its own and returns once
//! the agent is ready; that runner owns the VM for its whole life and serves its control
//! socket, `$MVM_HOME/vms/NAME/control.sock`, which the other commands talk to. No daemon:
//! each VM is its own runner process. The lifecycle itself is `mvm_runner::named_vm`; these
//! are thin verbs over it.

use mvm_ir::terminal::{printable, Newlines};
use std::io::{self, Write};

use anyhow::Context;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use mvm_runner::client::{AgentClient, ClientError};
use mvm_runner::named_vm::{NamedVm, NamedVmError, VmHome};
use mvm_runner::state::{Phase, VmState};
use serde_json::{json, Value};

use super::bundle::{plan_to_boot, runner_command, BuildReport, ImageOptions};
use super::{coded_as, coded_with, Host};
use crate::output::Output;

pub mod copy;
pub mod exec;
pub mod fs;
pub mod process;
pub mod service;
pub mod terminal;

pub use exec::ExecArgs;

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
    /// Forward [ADDRESS:]HOST_PORT on the host to GUEST_PORT on the guest's loopback
    /// (repeatable). ADDRESS is 127.0.0.1 unless given, and must be loopback unless `[ports]
    /// listen` in `$MVM_HOME/config.toml` lists it; HOST_PORT 0 picks a free one (`mvm port
    /// ls` shows it). The listener ends with the VM.
    #[arg(long, value_name = "[ADDRESS:]HOST_PORT:GUEST_PORT")]
    port: Vec<String>,
    /// Return once the agent is ready, without waiting for the plan's services to be healthy.
    #[arg(long)]
    no_wait: bool,
    /// How long to wait for the plan's services to be healthy (or, without a health check, to
    /// have run 2 s); past it, or once one failed or the probe says unhealthy: RUN065, the VM
    /// left running.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m", value_name = "DURATION")]
    health_timeout: Duration,
    /// For an image: the command signed into its plan, replacing the image's Cmd after its
    /// Entrypoint as `docker run IMAGE COMMAND…` does (default: the image's own).
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// `mvm port`.
#[derive(Debug, clap::Subcommand)]
pub enum PortCommand {
    /// List a VM's forwarded ports: host address and port, guest port.
    Ls {
        /// The VM.
        name: String,
    },
}

pub fn port(command: PortCommand, out: &Output) -> anyhow::Result<()> {
    let PortCommand::Ls { name } = command;
    let named = named(&name)?;
    let ports = mvm_runner::forward::recorded(named.dir());
    out.result(json!({"vm": name, "ports": ports}), || {
        let mut text = format!("{:<24} GUEST", "HOST");
        for port in &ports {
            let host = std::net::SocketAddr::new(port.address, port.host);
            text.push_str(&format!("\n{host:<24} {}", port.guest));
        }
        text
    });
    Ok(())
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
    /// Keep printing new lines while the VM runs (and, with --service, while the service
    /// may still write).
    #[arg(short, long)]
    follow: bool,
    /// The output of this service of the plan instead (the last 256 KiB the agent keeps,
    /// stdout and stderr as they came, with the supervisor's own `[mvm]` lines).
    #[arg(long, value_name = "SERVICE")]
    service: Option<String>,
}

/// What `mvm wait` waits for.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum WaitFor {
    /// The agent answered: commands can run.
    Ready,
    /// The VM has ended (stopped or failed).
    Stopped,
    /// The plan's services are healthy (or, without a health check, have run 2 s).
    Healthy,
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
    /// The same as --for healthy: the plan's services are healthy; exit 1 (RUN065) once one
    /// failed or the probe says unhealthy.
    #[arg(long, conflicts_with_all = ["until", "process"])]
    healthy: bool,
    /// The handle of a background command to wait for.
    #[arg(long, value_name = "HANDLE")]
    process: Option<u64>,
    /// Give up after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s", value_name = "DURATION")]
    timeout: Duration,
}

/// The VMs of this host's mvm home.
pub(super) fn vm_home() -> anyhow::Result<VmHome> {
    Ok(VmHome::new(Host::open()?.home))
}

/// The VM `name`, which must exist.
fn named(name: &str) -> anyhow::Result<NamedVm> {
    vm_home()?.get(name).map_err(named_error)
}

/// A named VM's error as the CLI reports it: with its stable code, or (a failure of the
/// host) as an internal error.
pub(super) fn named_error(error: NamedVmError) -> anyhow::Error {
    match error.code() {
        Some(code) => super::coded_with(code, error.class(), &error),
        None => anyhow::Error::new(error),
    }
}

/// Starts `runner` and waits for its VM to be ready: its state, or the runner's own exit
/// status once it failed (its error printed).
fn start(vms: &VmHome, runner: std::process::Command) -> anyhow::Result<Result<VmState, ExitCode>> {
    match vms.start(runner) {
        Ok(ready) => Ok(Ok(ready)),
        Err(NamedVmError::RunnerFailed { status, stderr }) => {
            eprint!("{}", printable(&stderr, Newlines::Keep));
            Ok(Err(ExitCode::from(status)))
        }
        Err(e) => Err(named_error(e)),
    }
}

fn state_json(state: &VmState) -> Value {
    serde_json::to_value(state).unwrap_or(Value::Null)
}

pub fn up(args: UpArgs, out: &Output) -> anyhow::Result<ExitCode> {
    let vms = vm_home()?;
    vms.check_free(&args.name).map_err(named_error)?;
    let plan = plan_to_boot(
        args.plan.as_deref(),
        args.image.as_deref(),
        &args.image_options,
        &args.command,
        BuildReport::Stderr,
    )?;
    let mut runner = runner_command(args.boot_timeout)?;
    runner
        .arg("--plan")
        .arg(&plan)
        .args(["--name", &args.name, "--backend", &args.backend])
        .args(args.port.iter().map(|port| format!("--port={port}")));
    args.image_options.configure_runner(&mut runner)?;
    if args.huge_pages {
        runner.arg("--huge-pages");
    }
    let ready = match start(&vms, runner)? {
        Ok(ready) => ready,
        Err(status) => return Ok(status),
    };
    let services = match args.no_wait {
        true => None,
        false => Some(service::await_ready(&args.name, args.health_timeout)?),
    };
    let mut result = json!({"vm": state_json(&ready)});
    if let Some(report) = services.as_ref().filter(|r| !r.services.is_empty()) {
        result["services"] = json!(report);
    }
    out.result(result, || {
        let health = match services.as_ref().filter(|r| !r.services.is_empty()) {
            Some(report) => format!(
                "; services {}",
                report
                    .health
                    .as_ref()
                    .map_or("running", |h| h.status.name())
            ),
            None => String::new(),
        };
        format!(
            "{} is running ({}, plan {}){health}",
            ready.name, ready.vm, ready.plan_digest
        )
    });
    Ok(ExitCode::SUCCESS)
}

pub fn ls(out: &Output) -> anyhow::Result<()> {
    let vms = vm_home()?;
    let seen = vms.list(|dir, e| eprintln!("mvm: {}: {e}", dir.display()));
    let listed: Vec<Value> = seen
        .iter()
        .map(|vm| {
            let mut value = state_json(vm);
            if let Some(counts) = vms.get(&vm.name).ok().and_then(|vm| vm.egress_counts()) {
                value["egress"] = json!(counts);
            }
            value
        })
        .collect();
    // Asked of each running VM's agent: a paused one cannot say.
    let services: Vec<Option<service::ServicesReport>> = seen
        .iter()
        .map(|vm| {
            let running = vm.phase == Phase::Running;
            running
                .then(|| connect(&vm.name, Arc::default()).ok())
                .flatten()
                .and_then(|mut client| service::report(&mut client, None).ok())
                .filter(|report| !report.services.is_empty())
        })
        .collect();
    let listed: Vec<Value> = listed
        .into_iter()
        .zip(&services)
        .map(|(mut value, report)| {
            if let Some(report) = report {
                value["services"] = json!(report);
            }
            value
        })
        .collect();
    out.result(json!({"vms": listed}), || {
        let mut text = format!(
            "{:<20} {:<9} {:<10} {:<7} {:<16} {:<21} REASON",
            "NAME", "STATE", "HEALTH", "BACKEND", "VM", "STARTED"
        );
        for (vm, report) in seen.iter().zip(&services) {
            text.push_str(&format!(
                "\n{:<20} {:<9} {:<10} {:<7} {:<16} {:<21} {}",
                vm.name,
                vm.phase.name(),
                report.as_ref().map_or("-", service::health_word),
                vm.backend
                    .map_or_else(|| "-".to_string(), |b| b.to_string()),
                vm.vm,
                vm.started_at,
                vm.reason.as_deref().unwrap_or("")
            ));
        }
        text
    });
    Ok(())
}

/// Connects to the control socket of the running VM `name`.
pub(super) fn connect(name: &str, interrupt: Arc<AtomicBool>) -> anyhow::Result<AgentClient> {
    named(name)?.connect(interrupt).map_err(named_error)
}

/// An agent's refusal keeps its own code; anything else about the channel is RUN025.
pub(super) fn agent_error(error: ClientError) -> anyhow::Error {
    named_error(NamedVmError::from(error))
}

/// Pauses (stops the vCPUs of) the running VM `name`; `cold` saves it to disk too, and
/// returns once its runner has let go of it.
pub fn pause(name: &str, cold: bool, out: &Output) -> anyhow::Result<()> {
    let seen = named(name)?.pause(cold).map_err(named_error)?;
    out.result(json!({"vm": state_json(&seen)}), || {
        format!("{name} is {}", seen.phase.name())
    });
    Ok(())
}

/// Lets the paused VM `name` run again, or wakes it from cold with a new runner.
pub fn resume(name: &str, boot_timeout: Duration, out: &Output) -> anyhow::Result<ExitCode> {
    let vms = vm_home()?;
    let vm = vms.get(name).map_err(named_error)?;
    let seen = vm.state().map_err(named_error)?;
    let seen = if !seen.phase.is_live() && vm.is_saved() {
        let mut runner = runner_command(boot_timeout)?;
        runner.args(["--wake", name]);
        match start(&vms, runner)? {
            Ok(ready) => ready,
            Err(status) => return Ok(status),
        }
    } else {
        vm.resume().map_err(named_error)?
    };
    out.result(json!({"vm": state_json(&seen)}), || {
        format!("{name} is {}", seen.phase.name())
    });
    Ok(ExitCode::SUCCESS)
}

pub fn stop(name: &str, out: &Output) -> anyhow::Result<()> {
    let vm = named(name)?;
    let state = match vm.state().map_err(named_error)?.phase {
        Phase::Cold => vm.discard_cold(),
        _ => vm.stop(),
    }
    .map_err(named_error)?;
    out.result(json!({"vm": state_json(&state)}), || {
        format!("{name} is {}", state.phase.name())
    });
    Ok(())
}

pub fn rm(args: RmArgs, out: &Output) -> anyhow::Result<()> {
    named(&args.name)?.remove(args.force).map_err(named_error)?;
    out.result(json!({"removed": args.name}), || {
        format!("removed {}", args.name)
    });
    Ok(())
}

pub fn logs(args: LogsArgs) -> anyhow::Result<()> {
    if let Some(name) = &args.service {
        return service::logs(&args.name, name, args.follow);
    }
    let vm = named(&args.name)?;
    let dir = vm.dir();
    let log = std::fs::File::open(dir.join("serial.log"))
        .with_context(|| format!("{}'s console log", args.name))?;
    let mut log = io::BufReader::new(log);
    let mut out = io::stdout().lock();
    loop {
        show_lines(&mut log, &mut out)?;
        let running = vm.state().is_ok_and(|now| now.phase.is_live());
        if !args.follow || !running {
            // One more pass: what was written just before the VM ended.
            return show_lines(&mut log, &mut out);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Copies what `log` holds now to `out`, a line at a time, its control characters made
/// visible: the console is the guest's, and the terminal must not obey it.
fn show_lines(log: &mut impl io::BufRead, out: &mut impl Write) -> anyhow::Result<()> {
    let mut line = Vec::new();
    while log.read_until(b'\n', &mut line)? > 0 {
        out.write_all(printable(&String::from_utf8_lossy(&line), Newlines::Keep).as_bytes())?;
        line.clear();
    }
    out.flush()?;
    Ok(())
}

pub fn wait(args: WaitArgs, out: &Output) -> anyhow::Result<ExitCode> {
    if let Some(handle) = args.process {
        return process::wait(&args.name, handle, args.timeout, out);
    }
    if args.healthy || matches!(args.until, WaitFor::Healthy) {
        return wait_healthy(&args, out);
    }
    let vm = named(&args.name)?;
    let until = args.until;
    let settled = vm
        .wait_until(args.timeout, |seen| {
            let reached = match until {
                WaitFor::Ready | WaitFor::Healthy => seen.phase == Phase::Running,
                WaitFor::Stopped => matches!(seen.phase, Phase::Stopped | Phase::Failed),
            };
            // A cold VM changes only when told to (`mvm resume`, `mvm stop`).
            let unreachable = seen.phase == Phase::Cold
                || matches!(until, WaitFor::Ready)
                    && matches!(seen.phase, Phase::Stopped | Phase::Failed);
            reached || unreachable
        })
        .map_err(named_error)?;
    let seen = settled.map_err(|seen| {
        coded_as(
            "RUN036",
            format!(
                "{} is still {} after {}",
                args.name,
                seen.phase.name(),
                humantime::format_duration(args.timeout)
            ),
        )
    })?;
    let reached = match until {
        WaitFor::Ready | WaitFor::Healthy => seen.phase == Phase::Running,
        WaitFor::Stopped => matches!(seen.phase, Phase::Stopped | Phase::Failed),
    };
    out.result(json!({"vm": state_json(&seen), "reached": reached}), || {
        format!("{} is {}", seen.name, seen.phase.name())
    });
    Ok(if reached {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `mvm wait --healthy`: the VM ready first, then its services, within the one timeout.
fn wait_healthy(args: &WaitArgs, out: &Output) -> anyhow::Result<ExitCode> {
    let started = std::time::Instant::now();
    let settled = named(&args.name)?
        .wait_until(args.timeout, |seen| seen.phase != Phase::Starting)
        .map_err(named_error)?;
    let seen = settled.unwrap_or_else(|seen| seen);
    if seen.phase != Phase::Running {
        return Err(coded_with(
            "RUN065",
            mvm_ir::ErrorClass::Integrity,
            format!(
                "{} is {}: its services are not healthy",
                args.name,
                seen.phase.name()
            ),
        ));
    }
    let left = args.timeout.saturating_sub(started.elapsed());
    let report = service::await_ready(&args.name, left)?;
    out.result(json!({"services": report, "reached": true}), || {
        let status = report
            .health
            .as_ref()
            .map_or("running", |h| h.status.name());
        format!("{}'s services are {status}", args.name)
    });
    Ok(ExitCode::SUCCESS)
}
