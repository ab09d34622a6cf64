//! `mvm run`: boot a signed plan (or an image, built into a cached bundle first), run one
//! command in it, and exit with the command's status.
//!
//! The launch itself belongs to `mvm-runner`, a separate minimal binary: this command finds
//! or builds the bundle, then hands the plan to the runner with the terminal attached. The
//! runner verifies the plan before anything starts, whoever calls it.

use mvm_ir::terminal::{printable, Newlines};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use super::bundle::{plan_to_boot, runner_command, sibling, BuildReport, ImageOptions};
use super::vm::{exec::run_in, named_error, vm_home};
use super::{coded_as, coded_io};
use crate::output::Output;
use mvm_protocol::ExecRequest;
use mvm_runner::control::MAX_TIMEOUT;
use mvm_runner::named_vm::NamedVmError;

/// `mvm run`'s own failures (a missing runner, an image that did not build) exit with this,
/// as the runner's do; see `mvm-runner --help` for the others.
const EXIT_RUNNER: u8 = 125;

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
    /// The command: with --plan it replaces the plan's; with an image it replaces the image's
    /// Cmd and follows its Entrypoint, as `docker run IMAGE COMMAND…` does (signed into the
    /// image's cached plan). The plan's (or image's) own when absent.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

impl RunArgs {
    /// The argv asked of the runner: the command line's for a plan; none for an image, whose
    /// plan already carries the command composed with the image's Entrypoint.
    fn argv(&self) -> &[String] {
        match self.image {
            Some(_) => &[],
            None => &self.command,
        }
    }
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
        BuildReport::Stderr,
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
        return Err(coded_io(
            "RUN031",
            format!(
                "the runner {} was not found; install mvm-runner next to mvm or set MVM_RUNNER",
                runner.display()
            ),
        ));
    }
    let mut command = mvm_ir::env::command(&runner);
    command
        .arg("--plan")
        .arg(&plan)
        .args(["--backend", &args.backend])
        .arg("--boot-timeout")
        .arg(humantime::format_duration(args.boot_timeout).to_string());
    if args.huge_pages {
        command.arg("--huge-pages");
    }
    args.image_options.configure_runner(&mut command)?;
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
        .args(args.argv())
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
    let mut runner = runner_command(args.boot_timeout)?;
    runner
        .arg("--plan")
        .arg(plan)
        .args(["--name", &name, "--backend", &args.backend]);
    args.image_options.configure_runner(&mut runner)?;
    if args.huge_pages {
        runner.arg("--huge-pages");
    }
    let vms = vm_home()?;
    match vms.start(runner) {
        Ok(_) => {}
        Err(NamedVmError::RunnerFailed { status, stderr }) => {
            eprint!("{}", printable(&stderr, Newlines::Keep));
            return Ok(ExitCode::from(status));
        }
        Err(e) => return Err(named_error(e)),
    }
    let timeout = args.timeout.unwrap_or(MAX_TIMEOUT).min(MAX_TIMEOUT);
    let request = ExecRequest {
        argv: args.argv().to_vec(),
        env: Default::default(),
        cwd: None,
        timeout_ms: timeout.as_millis() as u64,
        stdin: false,
        user: None,
        tty: None,
    };
    let input = Box::new(std::io::stdin()) as Box<dyn std::io::Read + Send>;
    let ran = run_in(&name, request, Some(input), args.receipt.as_deref());
    let removed = vms
        .get(&name)
        .and_then(|vm| vm.remove(true))
        .map_err(named_error);
    let status = ran?;
    removed?;
    Ok(status)
}
