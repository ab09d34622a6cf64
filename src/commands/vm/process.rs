//! Background commands in a running VM: `mvm exec --detach` starts one, `mvm ps` lists them,
//! `mvm wait NAME --process HANDLE` collects one's end, `mvm kill` signals one.

use mvm_ir::terminal::{printable, Newlines};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use mvm_protocol::{ExecRequest, ExitStatus, ProcessInfo, Request, Response};
use mvm_runner::client::{AgentClient, StdStreams};
use mvm_runner::launch::exit;
use serde_json::json;

use super::{agent_error, connect};
use crate::commands::{coded_as, coded_io};
use crate::output::Output;

/// How long a quick request to the agent may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// List the commands running in a VM (and background ones that ended, until waited for).
#[derive(Debug, Args)]
pub struct PsArgs {
    /// The VM.
    name: String,
}

/// Send a signal to a background command (and everything in its process group).
#[derive(Debug, Args)]
pub struct KillArgs {
    /// The VM.
    name: String,
    /// The handle `mvm exec --detach` printed.
    handle: u64,
    /// The signal: a number or a name (TERM, KILL, INT, HUP, QUIT, USR1, USR2, STOP, CONT).
    #[arg(short, long, default_value = "TERM", value_parser = parse_signal)]
    signal: i32,
}

fn parse_signal(text: &str) -> Result<i32, String> {
    let name = text.trim_start_matches("SIG").to_ascii_uppercase();
    let number = match name.as_str() {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "TERM" => 15,
        "CONT" => 18,
        "STOP" => 19,
        _ => text
            .parse()
            .map_err(|_| format!("{text:?} is not a signal"))?,
    };
    (1..=31)
        .contains(&number)
        .then_some(number)
        .ok_or_else(|| format!("{text:?} is not a signal (1-31)"))
}

/// Starts `request` in the background and prints its handle.
pub fn spawn(
    client: &mut AgentClient,
    request: ExecRequest,
    out: &Output,
) -> anyhow::Result<ExitCode> {
    match call(client, &Request::Spawn(request))? {
        Response::Spawned { handle, pid } => {
            out.result(json!({"handle": handle, "pid": pid}), || handle.to_string());
            Ok(ExitCode::SUCCESS)
        }
        other => Err(unexpected(&other)),
    }
}

pub fn ps(args: PsArgs, out: &Output) -> anyhow::Result<()> {
    let mut client = connect(&args.name, Arc::default())?;
    let Response::Ps { processes } = call(&mut client, &Request::Ps)? else {
        return Err(coded_io("RUN025", "unexpected answer to ps"));
    };
    out.result(json!({"processes": processes}), || {
        let mut text = format!(
            "{:<8} {:<8} {:<10} {:<16} PROGRAM",
            "HANDLE", "PID", "RUNNING", "STATE"
        );
        for process in &processes {
            text.push_str(&format!(
                "\n{:<8} {:<8} {:<10} {:<16} {}",
                process.handle.map_or("exec".into(), |h| h.to_string()),
                process.pid,
                format!("{:.1}s", process.running_ms as f64 / 1000.0),
                state(process),
                printable(&process.program, Newlines::Escape)
            ));
        }
        text
    });
    Ok(())
}

fn state(process: &ProcessInfo) -> String {
    match process.status {
        None => "running".into(),
        Some(ExitStatus::Exited { code }) => format!("exited {code}"),
        Some(ExitStatus::Signaled { signal }) => format!("killed by {signal}"),
        Some(ExitStatus::TimedOut) => "timed out".into(),
    }
}

pub fn kill(args: KillArgs, out: &Output) -> anyhow::Result<()> {
    let mut client = connect(&args.name, Arc::default())?;
    let request = Request::Kill {
        handle: args.handle,
        signal: args.signal,
    };
    call(&mut client, &request)?;
    out.result(
        json!({"handle": args.handle, "signal": args.signal}),
        || format!("sent signal {} to {}", args.signal, args.handle),
    );
    Ok(())
}

/// Waits for the background command `handle` to end; prints the last of its output and exits
/// with its status.
pub fn wait(name: &str, handle: u64, timeout: Duration, out: &Output) -> anyhow::Result<ExitCode> {
    let mut client = connect(name, Arc::default())?;
    let request = Request::Wait {
        handle,
        timeout_ms: timeout.as_millis() as u64,
    };
    let answer = client
        .call(&request, timeout + REQUEST_TIMEOUT, Some(&mut StdStreams))
        .map_err(agent_error)?;
    let Response::Wait(process) = answer else {
        return Err(unexpected(&answer));
    };
    let Some(status) = process.status else {
        return Err(coded_as(
            "RUN036",
            format!(
                "{handle} still runs after {}",
                humantime::format_duration(timeout)
            ),
        ));
    };
    if out.is_json() {
        out.result(json!({"process": process}), String::new);
    }
    Ok(ExitCode::from(exit::of_command(status)))
}

fn call(client: &mut AgentClient, request: &Request) -> anyhow::Result<Response> {
    client
        .call(request, REQUEST_TIMEOUT, None)
        .map_err(agent_error)
}

fn unexpected(response: &Response) -> anyhow::Error {
    coded_io("RUN025", format!("unexpected answer {response:?}"))
}
