//! `mvm`: the command line of the mvm microVM runtime. Thin by design: every rule lives in the
//! crates (`mvm-ir` for documents, keys and the audit chain); this binary parses arguments,
//! calls them, and turns their results into text or JSON and an exit status.

mod commands;
mod output;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::output::Output;

/// A security-first microVM runtime and Nix-centric build-and-run toolchain.
///
/// Exit status: 0 ok; 1 a verification or integrity check refused the input (or a `doctor`
/// check failed); 2 usage error;
/// 65 the input is not a valid document; 74 a file could not be read or written.
#[derive(Debug, Parser)]
#[command(name = "mvm", version, propagate_version = true)]
struct Cli {
    /// Print machine-readable JSON on stdout (errors too) instead of text.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Workload IR: validate, digest, print the JSON Schema.
    #[command(subcommand)]
    Ir(commands::ir::IrCommand),
    /// Launch plans: sign, verify, inspect.
    #[command(subcommand)]
    Plan(commands::plan::PlanCommand),
    /// Policy profiles: what a plan (or a profile) allows here, and why (show, explain).
    #[command(subcommand)]
    Policy(commands::policy::PolicyCommand),
    /// Secrets: put, ls, rm, bind, unbind (values encrypted here; guests see them by reference).
    #[command(subcommand)]
    Secret(commands::secret::SecretCommand),
    /// Encrypted persistent volumes: create, ls, rm, snapshot, snapshots, restore.
    #[command(subcommand)]
    Volume(commands::volume::VolumeCommand),
    /// Signing keys and the keys this host trusts.
    #[command(subcommand)]
    Keys(commands::keys::KeysCommand),
    /// The signed, hash-chained audit log.
    #[command(subcommand)]
    Audit(commands::audit::AuditCommand),
    /// Start a new workload from a template (python, node, oci, nix); never overwrites.
    Init(commands::init::InitArgs),
    /// Build a workload into a signed plan bundle.
    Build(commands::build::BuildArgs),
    /// The image cache: ls, rm, prune.
    #[command(subcommand)]
    Image(commands::image::ImageCommand),
    /// mvm's disk use: df.
    #[command(subcommand)]
    System(commands::image::SystemCommand),
    /// Run a command in a fresh microVM booted from a signed plan or an image.
    Run(commands::run::RunArgs),
    /// Boot snapshots (a plan's guest saved once booted, restored instead of booting): ls,
    /// rm, prune, make.
    #[command(subcommand)]
    Snapshot(commands::snapshot::SnapshotCommand),
    /// Start a VM that stays up, named; returns once its agent is ready.
    Up(commands::vm::UpArgs),
    /// List named VMs and their state.
    Ls,
    /// Run a command in a running VM.
    Exec(commands::vm::ExecArgs),
    /// A login shell on a terminal in a running VM (`mvm exec -t` of bash, else sh); only
    /// where the plan's profile grants a terminal (`dev`).
    Shell(commands::vm::terminal::ShellArgs),
    /// Copy a file or directory into or out of a running VM (one side NAME:/tmp/path).
    Cp(commands::vm::copy::CpArgs),
    /// Files in a running VM under /tmp: ls, stat, mkdir, rm, mv.
    #[command(subcommand)]
    Fs(commands::vm::fs::FsCommand),
    /// List the commands running in a VM (and background ones not yet waited for).
    Ps(commands::vm::process::PsArgs),
    /// Send a signal to a background command of a VM.
    Kill(commands::vm::process::KillArgs),
    /// Pause a running VM: its vCPUs stop, its memory and devices are kept; commands are
    /// refused (RUN039) until `mvm resume`. With --cold, save it to disk and end its runner:
    /// it then holds no memory or CPU until `mvm resume` wakes it.
    Pause {
        /// The VM.
        name: String,
        /// Save its memory and device state to `$MVM_HOME/vms/NAME/cold` (signed with the host
        /// key) and let its runner and QEMU go. Refused (RUN040) while requests are in flight;
        /// background commands are kept. qemu backend only.
        #[arg(long)]
        cold: bool,
    },
    /// Let a paused VM run again, or wake a cold one: a new runner checks its saved state
    /// (host signature, memory digest) and admits its plan again before the guest runs on.
    Resume {
        /// The VM.
        name: String,
        /// For a cold VM: give up when its agent does not answer after this long.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "60s", value_name = "DURATION")]
        boot_timeout: std::time::Duration,
    },
    /// Power a running VM off.
    Stop {
        /// The VM.
        name: String,
    },
    /// Print a VM's console (the guest kernel's and the agent's lines).
    Logs(commands::vm::LogsArgs),
    /// A VM's forwarded ports: ls.
    #[command(subcommand)]
    Port(commands::vm::PortCommand),
    /// Wait until a VM is ready, or has ended.
    Wait(commands::vm::WaitArgs),
    /// Remove a VM's record (a running one only with --force).
    Rm(commands::vm::RmArgs),
    /// Signed run receipts: verify.
    #[command(subcommand)]
    Receipt(commands::receipt::ReceiptCommand),
    /// Nix formats as mvm computes them: inspect derivations.
    #[command(subcommand)]
    Nix(commands::nix::NixCommand),
    /// Guest kernels: fetch and pin the Debian cloud kernel.
    #[command(subcommand)]
    Kernel(commands::kernel::KernelCommand),
    /// The builder VM's image: fetch (Nix and its dependencies from Debian, pinned, plus the
    /// static build worker, built into a signed plan), show.
    #[command(subcommand)]
    Builder(commands::builder::BuilderCommand),
    /// The builder VM that stays up, for `mvm build --persona vm|auto`: up, status, logs, down.
    #[command(subcommand)]
    Dev(commands::dev::DevCommand),
    /// Check what this host can run: virtualization and backend, QEMU, guest kernel and agent,
    /// state directory, signing key, registries. Exit status 1 when a check fails.
    Doctor,
    /// Measure mvm against the standard tools (medians and ratios from one run).
    #[command(subcommand)]
    Bench(commands::bench::BenchCommand),
    /// Serve the local API the SDKs use ($MVM_HOME/api.sock).
    Serve(commands::serve::ServeArgs),
    /// Serve mvm's sandboxes as MCP tools over stdio (docs/mcp.md).
    Mcp(commands::mcp::McpArgs),
    /// The agent tool contract: run (one JSON request on stdin, one response on stdout),
    /// schema.
    #[command(subcommand)]
    Tool(commands::mcp::ToolCommand),
    /// The API's sandboxes: ls (with labels and time left), kill, set-timeout.
    #[command(subcommand)]
    Sandbox(commands::sandbox::SandboxCommand),
    /// The confined builder worker (started by `mvm build`; reads a request on stdin).
    #[command(hide = true)]
    BuildWorker,
}

/// A command that exits with a status of its own (the guest command's), or with an error's.
fn exit_code(result: anyhow::Result<ExitCode>, out: &Output) -> ExitCode {
    result.unwrap_or_else(|err| out.error(&err))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let out = Output::new(cli.json);
    let result = match cli.command {
        Command::Ir(cmd) => commands::ir::run(cmd, &out),
        Command::Plan(cmd) => commands::plan::run(cmd, &out),
        Command::Keys(cmd) => commands::keys::run(cmd, &out),
        Command::Secret(cmd) => commands::secret::run(cmd, &out),
        Command::Volume(cmd) => commands::volume::run(cmd, &out),
        Command::Policy(cmd) => return exit_code(commands::policy::run(cmd, &out), &out),
        Command::Audit(cmd) => commands::audit::run(cmd, &out),
        Command::Init(args) => commands::init::run(args, &out),
        Command::Build(args) => commands::build::run(args, &out),
        Command::Image(cmd) => commands::image::run(cmd, &out),
        Command::System(cmd) => commands::image::system(cmd, &out),
        Command::Run(args) => return commands::run::run(args, &out),
        Command::Up(args) => return exit_code(commands::vm::up(args, &out), &out),
        Command::Snapshot(cmd) => commands::snapshot::run(cmd, &out),
        Command::Ls => commands::vm::ls(&out),
        Command::Exec(args) => return exit_code(commands::vm::exec::exec(args, &out), &out),
        Command::Shell(args) => return exit_code(commands::vm::terminal::shell(args), &out),
        Command::Stop { name } => commands::vm::stop(&name, &out),
        Command::Pause { name, cold } => commands::vm::pause(&name, cold, &out),
        Command::Resume { name, boot_timeout } => {
            return exit_code(commands::vm::resume(&name, boot_timeout, &out), &out)
        }
        Command::Cp(args) => commands::vm::copy::cp(args, &out),
        Command::Fs(cmd) => commands::vm::fs::run(cmd, &out),
        Command::Ps(args) => commands::vm::process::ps(args, &out),
        Command::Kill(args) => commands::vm::process::kill(args, &out),
        Command::Rm(args) => commands::vm::rm(args, &out),
        Command::Logs(args) => commands::vm::logs(args),
        Command::Port(cmd) => commands::vm::port(cmd, &out),
        Command::Receipt(cmd) => commands::receipt::run(cmd, &out),
        Command::Wait(args) => return exit_code(commands::vm::wait(args, &out), &out),
        Command::Nix(cmd) => commands::nix::run(cmd, &out),
        Command::Kernel(cmd) => commands::kernel::run(cmd, &out),
        Command::Builder(cmd) => commands::builder::run(cmd, &out),
        Command::Dev(cmd) => return exit_code(commands::dev::run(cmd, &out), &out),
        Command::Bench(cmd) => commands::bench::run(cmd, &out),
        Command::Doctor => return commands::doctor::run(&out),
        Command::Serve(args) => return exit_code(commands::serve::serve(args, &out), &out),
        Command::Sandbox(cmd) => commands::sandbox::run(cmd, &out),
        Command::Mcp(args) => return exit_code(commands::mcp::mcp(args), &out),
        Command::Tool(cmd) => return exit_code(commands::mcp::tool(cmd), &out),
        Command::BuildWorker => return mvm_builder::worker::serve(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => out.error(&err),
    }
}
