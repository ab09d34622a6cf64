//! `mvm exec`: a command in a running VM, in the foreground (its output streamed, its exit
//! status returned, a receipt on request) or in the background (`--detach`).

use mvm_ir::terminal::{printable, Newlines};
use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use mvm_protocol::{ExecRequest, Integrity};
use mvm_runner::client::{ClientError, StdStreams};
use mvm_runner::control::MAX_TIMEOUT;
use mvm_runner::launch::{exit, LaunchError};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use mvm_runner::client::AgentClient;
use mvm_runner::named_vm::{NamedVm, NamedVmError};

use super::{connect, named, named_error};
use crate::output::Output;

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
    /// Run it on a terminal in the guest, of this terminal's size: this terminal goes into
    /// raw mode — every key reaches the guest's terminal, which acts on Ctrl-C, Ctrl-Z and
    /// Ctrl-D as a terminal does — follows its resizes, and is put back however the command
    /// ends. Only where the plan's profile grants a terminal (`dev`); AGENT120 otherwise.
    #[arg(short = 't', long, conflicts_with = "receipt")]
    tty: bool,
    /// Start the command in the background and print its handle, for `mvm ps`, `mvm wait
    /// NAME --process HANDLE` (its status and the last 64 KiB of its output) and `mvm kill`.
    #[arg(short, long, conflicts_with_all = ["interactive", "receipt", "tty"])]
    detach: bool,
    /// The command; the plan's entrypoint when absent.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .filter(|(key, _)| !key.is_empty())
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
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
        tty: None,
    };
    if args.tty {
        return super::terminal::run(&args.name, request);
    }
    if args.detach {
        let mut client = connect(&args.name, Arc::default())?;
        return super::process::spawn(&mut client, request, out);
    }
    let input = args
        .interactive
        .then(|| Box::new(io::stdin()) as Box<dyn Read + Send>);
    run_in(&args.name, request, input, args.receipt.as_deref())
}

/// Runs `request` in the VM `name`, feeding it `input`; streams its output, writes its
/// receipt when asked, and returns its exit status.
pub fn run_in(
    name: &str,
    request: ExecRequest,
    input: Option<Box<dyn Read + Send>>,
    receipt: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let (named, mut client) = connected(name)?;
    run_on(&named, &mut client, request, input, receipt, &mut || {})
}

/// The VM `name` and a connection to it, which `SIGINT`, `SIGTERM` and `SIGHUP` interrupt:
/// the command running on it is then signalled, and its end still awaited.
pub(super) fn connected(name: &str) -> anyhow::Result<(NamedVm, AgentClient)> {
    let interrupt = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM, SIGHUP] {
        signal_hook::flag::register(signal, Arc::clone(&interrupt))?;
    }
    let named = named(name)?;
    let client = named.connect(interrupt).map_err(named_error)?;
    Ok((named, client))
}

/// Runs `request` over `client` in `named`, as [`run_in`] says; `settle` is called once the
/// command is over and before anything is said of it (a terminal session gives its terminal
/// back there, so that what is said is printed as usual).
pub(super) fn run_on(
    named: &NamedVm,
    client: &mut AgentClient,
    request: ExecRequest,
    input: Option<Box<dyn Read + Send>>,
    receipt: Option<&Path>,
    settle: &mut dyn FnMut(),
) -> anyhow::Result<ExitCode> {
    let ran = named.run(client, request, input, &mut StdStreams, receipt.is_some());
    settle();
    let ran = match ran {
        Ok(ran) => ran,
        Err(NamedVmError::Refused(refusal)) => {
            let error = LaunchError::CommandRefused(refusal);
            // The agent's code leads its message already.
            eprintln!(
                "mvm: error {}",
                printable(&error.to_string(), Newlines::Keep)
            );
            return Ok(ExitCode::from(error.exit_status()));
        }
        Err(NamedVmError::Channel(ClientError::Interrupted)) => {
            return Ok(ExitCode::from(exit::INTERRUPTED))
        }
        Err(e) => return Err(named_error(e)),
    };
    let reply = &ran.executed.reply;
    if reply.integrity == Integrity::Corrupted {
        eprintln!("mvm: error RUN020: dm-verity refused a block of the root while the command ran; its output cannot be trusted");
        return Ok(ExitCode::from(exit::INTEGRITY));
    }
    if let (Some(path), Some(signed)) = (receipt, &ran.receipt) {
        mvm_ir::fsutil::atomic_write(path, signed, 0o644)?;
    }
    Ok(ExitCode::from(exit::of_command(reply.status)))
}
