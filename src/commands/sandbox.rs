//! `mvm sandbox`: the local API's sandboxes from the shell — their labels and time left,
//! which `mvm ls` does not show, and their timeouts. The same objects as the API's (the
//! `mvm_api` library, not a request to a server), so the two never disagree.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use clap::Subcommand;
use mvm_api::error::ApiError;
use mvm_api::model::Sandbox;
use mvm_api::sandboxes::Sandboxes;
use mvm_ir::ErrorClass;
use mvm_runner::named_vm::VmHome;
use serde_json::json;
use time::OffsetDateTime;

use super::serve::CliLauncher;
use super::Host;
use crate::output::Output;

/// How long a sandbox's guest has to become ready (for the launcher the library is given;
/// none of these verbs starts one).
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// List sandboxes (every named VM) with their labels and the time each has left.
    Ls {
        /// Only those with this label (repeat for several; all must match).
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = label)]
        labels: Vec<(String, String)>,
        /// Only those in this state (running, paused, cold, stopped, failed).
        #[arg(long)]
        state: Option<String>,
    },
    /// Stop a sandbox and remove it.
    Kill {
        /// The sandbox's id (its VM's name).
        id: String,
    },
    /// Give a sandbox this long from now before it is removed (`10m`, `1h`; `0`: never).
    /// A cold sandbox's clock starts when it is resumed. The API server ends sandboxes whose
    /// time is up; one is started (`mvm serve --idle-exit 10m`) if none serves this home.
    SetTimeout {
        /// The sandbox's id (its VM's name).
        id: String,
        /// How long (at most a day).
        #[arg(value_parser = timeout)]
        timeout: Duration,
    },
}

fn label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

fn timeout(text: &str) -> Result<Duration, String> {
    match text {
        "0" => Ok(Duration::ZERO),
        text => humantime::parse_duration(text).map_err(|e| e.to_string()),
    }
}

pub fn run(command: SandboxCommand, out: &Output) -> anyhow::Result<()> {
    let host = Host::open()?;
    let sandboxes = Sandboxes::new(
        VmHome::new(host.home.clone()),
        Box::new(CliLauncher::new(host.home, BOOT_TIMEOUT)),
    );
    match command {
        SandboxCommand::Ls { labels, state } => {
            let labels: BTreeMap<String, String> = labels.into_iter().collect();
            let listed = sandboxes
                .list(&labels, state.as_deref())
                .map_err(api_error)?;
            out.result(json!({ "sandboxes": listed }), || table(&listed));
        }
        SandboxCommand::Kill { id } => {
            sandboxes.kill(&id).map_err(api_error)?;
            out.result(json!({ "killed": id }), || format!("{id}: killed"));
        }
        SandboxCommand::SetTimeout { id, timeout } => {
            let set = sandboxes
                .set_timeout(&id, timeout.as_secs())
                .map_err(api_error)?;
            if set.expires_at.is_some() {
                start_server()?;
            }
            let said = match &set.expires_at {
                Some(at) => format!("{id}: removed at {at} unless extended"),
                None if set.state == "cold" => {
                    format!("{id}: {}s from when it is resumed", timeout.as_secs())
                }
                None => format!("{id}: no timeout"),
            };
            out.result(json!(set), || said);
        }
    }
    Ok(())
}

/// Starts the API server for this home, detached, to end the sandbox when its time is up; a
/// server already serving makes the new one exit at once.
fn start_server() -> anyhow::Result<()> {
    let me = std::env::current_exe()?;
    mvm_ir::env::command(me)
        .args(["serve", "--idle-exit", "10m"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| super::coded_io("API006", format!("starting mvm serve: {e}")))?;
    Ok(())
}

/// The sandboxes as a table: id, state, time left, labels.
fn table(listed: &[Sandbox]) -> String {
    let now = OffsetDateTime::now_utc();
    let mut text = format!("{:<20} {:<9} {:<10} LABELS", "ID", "STATE", "EXPIRES");
    for sandbox in listed {
        let left = sandbox
            .expires_at
            .as_deref()
            .and_then(|at| {
                OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).ok()
            })
            .map_or_else(
                || "-".to_string(),
                |at| {
                    let left = (at - now).whole_seconds().max(0) as u64;
                    format!(
                        "in {}",
                        humantime::format_duration(Duration::from_secs(left))
                    )
                },
            );
        let labels: Vec<String> = sandbox
            .metadata
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        text.push_str(&format!(
            "\n{:<20} {:<9} {:<10} {}",
            sandbox.id,
            sandbox.state,
            left,
            labels.join(",")
        ));
    }
    text
}

/// The library's error with its code: a VM's as `mvm` reports it elsewhere, a request that
/// cannot be taken as invalid input, the rest as the host's failure.
fn api_error(error: ApiError) -> anyhow::Error {
    match error {
        ApiError::Vm(error) => super::vm::named_error(error),
        error => {
            let class = match error.status().is_client_error() {
                true => ErrorClass::InvalidInput,
                false => ErrorClass::Io,
            };
            super::coded_with(&error.code(), class, &error)
        }
    }
}
