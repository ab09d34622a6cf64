//! `mvm run`: boot a signed plan (or an image, built into a cached bundle first), run one
//! command in it, and exit with the command's status.
//!
//! The launch itself belongs to `mvm-runner`, a separate minimal binary: this command finds
//! or builds the bundle, then hands the plan to the runner with the terminal attached. The
//! runner verifies the plan before anything starts, whoever calls it.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use mvm_builder::kernel::KernelStore;
use mvm_ir::admission::verify_signed_plan;
use mvm_ir::digest::{sha256_hex, sha256_reader};
use mvm_ir::plan::MAX_ENVELOPE_BYTES;
use serde_json::json;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use super::{coded_as, Host};
use crate::output::Output;
use mvm_agent::protocol::ExecRequest;
use mvm_runner::control::MAX_TIMEOUT;

/// `mvm run`'s own failures (a missing runner, an image that did not build) exit with this,
/// as the runner's do; see `mvm-runner --help` for the others.
const EXIT_RUNNER: u8 = 125;
/// A cached bundle is rebuilt when its plan expires sooner than this.
const MIN_VALIDITY_LEFT: time::Duration = time::Duration::minutes(10);

/// Run a command in a fresh microVM: boot the signed plan, run, power off.
///
/// Give a plan bundle with --plan, or an image (REFERENCE@sha256:<digest>: registry, oci:DIR
/// or oci-archive:FILE), which is built and signed into a cached bundle first (rebuilt when
/// the image, resources, agent or kernel change). The plan, kernel and initramfs are verified
/// before anything starts; the root filesystem is checked block by block by dm-verity in the
/// guest; the command runs as an unprivileged user with no network.
///
/// Exit status: the command's own; 128+N when signal N ended it; 120 plan refused; 121
/// integrity failure; 122 the VM failed to boot or died; 124 the command timed out; 125 mvm
/// failed (including a build that failed); 126 command not executable; 127 command not found;
/// 130 interrupted (the VM was torn down).
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The image to run, REFERENCE@sha256:<digest>.
    #[arg(required_unless_present = "plan", conflicts_with = "plan")]
    image: Option<String>,
    /// A signed plan (`plan.dsse.json` of a bundle made by `mvm build`).
    #[arg(long, value_name = "FILE")]
    plan: Option<PathBuf>,
    #[command(flatten)]
    image_options: ImageOptions,
    /// Kill the command and everything it started after this long (`30s`, `5m`).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    timeout: Option<Duration>,
    /// Give up when the guest is not ready after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s", value_name = "DURATION")]
    boot_timeout: Duration,
    /// auto (the best this host can do; see `mvm doctor`), qemu, or kvm.
    #[arg(long, default_value = "auto", value_name = "auto|qemu|kvm")]
    backend: String,
    /// Back guest RAM with 2 MiB huge pages from the host's pool (`/proc/sys/vm/nr_hugepages`);
    /// the kvm backend only (`--backend kvm`).
    #[arg(long)]
    huge_pages: bool,
    /// Write a signed run receipt here once the command has ended (`mvm receipt verify`).
    #[arg(long, value_name = "FILE")]
    receipt: Option<PathBuf>,
    /// Feed this process's standard input to the command. The VM is then run as `mvm up`
    /// (named run-<random>), `mvm exec -i` and `mvm rm --force` do, input flowing through its
    /// control socket; a run killed before its end leaves that VM for `mvm rm`. Not with --json.
    #[arg(short, long)]
    interactive: bool,
    /// The command; the plan's (or image's) own when absent.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// How an image is built into a bundle (`mvm run IMAGE`, `mvm up IMAGE`).
#[derive(Debug, Args)]
pub struct ImageOptions {
    /// Virtual CPUs (images only: a plan's resources are signed into it).
    #[arg(long, conflicts_with = "plan")]
    cpus: Option<u32>,
    /// Memory in MiB (images only: a plan's resources are signed into it).
    #[arg(long, conflicts_with = "plan", value_name = "MIB")]
    memory: Option<u32>,
    /// The guest agent for building an image (default: $MVM_AGENT, or mvm-agent next to mvm).
    #[arg(long, conflicts_with = "plan")]
    agent: Option<PathBuf>,
}

pub fn run(args: RunArgs, out: &Output) -> ExitCode {
    match launch(args, out) {
        Ok(code) => code,
        Err(err) => {
            let _ = out.error(&err);
            ExitCode::from(EXIT_RUNNER)
        }
    }
}

fn launch(args: RunArgs, out: &Output) -> anyhow::Result<ExitCode> {
    let plan = plan_to_boot(
        args.plan.as_deref(),
        args.image.as_deref(),
        &args.image_options,
        &args.command,
    )?;
    if args.interactive {
        if out.is_json() {
            return Err(coded_as(
                "RUN029",
                "`mvm run -i` streams the command's output; --json is for runs without input",
            ));
        }
        return run_with_input(&args, &plan);
    }
    let runner = sibling("MVM_RUNNER", "mvm-runner")?;
    if !runner.is_file() {
        return Err(coded_as(
            "RUN031",
            format!(
                "the runner {} was not found; install mvm-runner next to mvm or set MVM_RUNNER",
                runner.display()
            ),
        ));
    }
    let mut command = Command::new(&runner);
    command
        .arg("--plan")
        .arg(&plan)
        .args(["--backend", &args.backend])
        .arg("--boot-timeout")
        .arg(humantime::format_duration(args.boot_timeout).to_string());
    if args.huge_pages {
        command.arg("--huge-pages");
    }
    if let Some(timeout) = args.timeout {
        command
            .arg("--timeout")
            .arg(humantime::format_duration(timeout).to_string());
    }
    if out.is_json() {
        command.arg("--json");
    }
    if let Some(receipt) = &args.receipt {
        command.arg("--receipt").arg(std::path::absolute(receipt)?);
    }
    // Ctrl-C reaches the runner too (same process group): mvm stays to report its status. A
    // signal sent to mvm alone is passed on, so the runner tears the VM down properly.
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM, SIGHUP] {
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    let mut child = command
        .arg("--")
        .args(&args.command)
        .spawn()
        .with_context(|| format!("starting {}", runner.display()))?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if stop.swap(false, Ordering::Relaxed) {
            if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let code = match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
    ) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => 128u8.saturating_add(signal as u8),
        (None, None) => EXIT_RUNNER,
    };
    Ok(ExitCode::from(code))
}

/// `mvm run -i`: `up` under a fresh name, `exec -i`, then `rm --force`, whatever the
/// command's end.
fn run_with_input(args: &RunArgs, plan: &Path) -> anyhow::Result<ExitCode> {
    let name = format!(
        "run-{}",
        &mvm_ir::plan::fresh_nonce().map_err(anyhow::Error::from)?[..10]
    );
    let mut runner = super::vm::runner_command(args.boot_timeout)?;
    runner
        .arg("--plan")
        .arg(plan)
        .args(["--name", &name, "--backend", &args.backend]);
    if args.huge_pages {
        runner.arg("--huge-pages");
    }
    if let Err(status) = super::vm::start_runner(runner)? {
        return Ok(status);
    }
    let timeout = args.timeout.unwrap_or(MAX_TIMEOUT).min(MAX_TIMEOUT);
    let request = ExecRequest {
        argv: args.command.clone(),
        env: Default::default(),
        cwd: None,
        timeout_ms: timeout.as_millis() as u64,
        stdin: false,
        user: None,
    };
    let input = Box::new(std::io::stdin()) as Box<dyn std::io::Read + Send>;
    let ran = super::vm::run_in(&name, request, Some(input), args.receipt.as_deref());
    let removed = super::vm::remove(&Host::open()?, &name, true);
    let status = ran?;
    removed?;
    Ok(status)
}

/// The plan a command boots: the one given, or the cached bundle's for the image (built when
/// needed, with `command` as its entrypoint).
pub(super) fn plan_to_boot(
    plan: Option<&Path>,
    image: Option<&str>,
    options: &ImageOptions,
    command: &[String],
) -> anyhow::Result<PathBuf> {
    match (plan, image) {
        (Some(plan), _) => Ok(plan.to_path_buf()),
        (None, Some(image)) => Ok(cached_bundle(image, options, command)?.join("plan.dsse.json")),
        (None, None) => Err(coded_as("RUN029", "give an image or --plan")),
    }
}

/// The bundle for `image` with these resources, agent and kernel under `$MVM_HOME/runs`,
/// built (by `mvm build`, its output on stderr) unless one with a valid plan is there.
fn cached_bundle(
    image: &str,
    options: &ImageOptions,
    command: &[String],
) -> anyhow::Result<PathBuf> {
    let host = Host::open()?;
    let agent = match &options.agent {
        Some(agent) => agent.clone(),
        None => sibling("MVM_AGENT", "mvm-agent")?,
    };
    let agent_digest = std::fs::File::open(&agent)
        .and_then(sha256_reader)
        .map_err(|e| {
            coded_as(
                "BUILD008",
                format!(
                    "the guest agent {}: {e}; build mvm-agent or pass --agent",
                    agent.display()
                ),
            )
        })?;
    let kernel = KernelStore::at(&host.home.ensure("kernels")?)
        .latest()
        .map_err(super::coded)?;
    // Everything the bundle is made from: the command too, since the build signs it into the
    // plan as the entrypoint a run without a command uses.
    let key = json!({
        "image": image,
        "cpus": options.cpus,
        "memory": options.memory,
        "command": command,
        "agent": agent_digest.0,
        "kernel": kernel.manifest.vmlinuz.digest,
        "modules": kernel.manifest.modules.iter().map(|m| &m.file.digest).collect::<Vec<_>>(),
    });
    let dir = host
        .home
        .ensure("runs")?
        .join(&sha256_hex(key.to_string().as_bytes())[..16]);
    if still_valid(&host, &dir.join("plan.dsse.json")) {
        return Ok(dir);
    }
    let mvm = std::env::current_exe()?;
    let mut build = Command::new(mvm);
    build
        .args(["build", "--image", image, "--out"])
        .arg(&dir)
        .arg("--agent")
        .arg(&agent);
    if let Some(cpus) = options.cpus {
        build.args(["--cpus", &cpus.to_string()]);
    }
    if let Some(memory) = options.memory {
        build.args(["--memory", &memory.to_string()]);
    }
    if !command.is_empty() {
        build.arg("--").args(command);
    }
    // The build's report goes to stderr: stdout is the command's.
    let status = build
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .context("starting mvm build")?;
    if !status.success() {
        return Err(coded_as(
            "RUN032",
            format!("building {image} failed ({status}); see the build's error above"),
        ));
    }
    Ok(dir)
}

/// Whether the plan at `envelope` verifies now and stays valid a while longer.
fn still_valid(host: &Host, envelope: &Path) -> bool {
    let Ok(bytes) = mvm_ir::fsutil::read_capped(envelope, MAX_ENVELOPE_BYTES, "plan envelope")
    else {
        return false;
    };
    let Ok(trust) = host.keys.trust_store() else {
        return false;
    };
    let now = time::OffsetDateTime::now_utc();
    verify_signed_plan(&bytes, &trust, now)
        .is_ok_and(|verified| verified.plan.valid_until.0 - MIN_VALIDITY_LEFT > now)
}

/// `$VARIABLE`, or the file `name` next to the mvm executable.
pub(super) fn sibling(variable: &str, name: &str) -> anyhow::Result<PathBuf> {
    match std::env::var_os(variable) {
        Some(path) => Ok(PathBuf::from(path)),
        None => Ok(std::env::current_exe()?.with_file_name(name)),
    }
}
