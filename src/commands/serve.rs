//! `mvm serve`: the local API (`mvm_api`) for this user's mvm home, with the CLI's way of
//! building images into signed bundles and starting runners.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use clap::Args;
use mvm_api::error::ApiError;
use mvm_api::model::CreateSandbox;
use mvm_api::{Launcher, ServeOptions, Served};
use serde_json::json;

use super::bundle::{plan_to_boot, runner_command, BuildReport, ImageOptions};
use super::{CodedError, Host};
use crate::output::Output;

/// Serve the local API that the Python and TypeScript SDKs use: HTTP/1.1 and JSON on
/// $MVM_HOME/api.sock (mode 0600; only this user's connections are served), routes under /v1
/// (`mvm serve --openapi` prints them). Sandboxes are ordinary named VMs (`mvm ls` shows
/// them) and outlive the server. One server per mvm home: a second finds the first and
/// exits 0. The SDKs start it on demand with --idle-exit.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// End after this long with no client, no command running and no sandbox's timeout
    /// pending (`10m`); never when absent.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    idle_exit: Option<Duration>,
    /// The socket to listen on (default $MVM_HOME/api.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// How long a sandbox's guest has to become ready.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s", value_name = "DURATION")]
    boot_timeout: Duration,
    /// Print the API's OpenAPI 3.1 document and exit.
    #[arg(long)]
    openapi: bool,
}

pub fn serve(args: ServeArgs, out: &Output) -> anyhow::Result<ExitCode> {
    if args.openapi {
        println!(
            "{}",
            serde_json::to_string_pretty(&mvm_api::openapi::document())?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let host = Host::open()?;
    let options = ServeOptions {
        home: host.home,
        socket: args.socket,
        idle_exit: args.idle_exit,
    };
    let launcher = CliLauncher {
        boot_timeout: args.boot_timeout,
    };
    match mvm_api::serve(options, Box::new(launcher)).map_err(|e| super::coded_io(&e.code(), e))? {
        Served::AlreadyServing(socket) => {
            out.result(json!({"serving": socket, "already": true}), || {
                format!(
                    "a server serves this mvm home already on {}",
                    socket.display()
                )
            });
        }
        Served::Idle => eprintln!("mvm serve: idle: ended"),
        Served::Stopped => eprintln!("mvm serve: stopped"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Sandboxes start as `mvm up` starts VMs.
struct CliLauncher {
    boot_timeout: Duration,
}

impl Launcher for CliLauncher {
    fn runner_for(&self, id: &str, spec: &CreateSandbox) -> Result<Command, ApiError> {
        if spec
            .plan
            .as_deref()
            .is_some_and(|plan| !plan.starts_with('/'))
        {
            return Err(ApiError::BadRequest(
                "plan must be an absolute path on the host".into(),
            ));
        }
        let options =
            ImageOptions::for_sandbox(spec.cpus, spec.memory_mib, spec.allow_hosts.clone());
        let plan = plan_to_boot(
            spec.plan.as_deref().map(Path::new),
            spec.image.as_deref(),
            &options,
            &[],
            BuildReport::Captured,
        )
        .map_err(launch_error)?;
        let mut runner = runner_command(self.boot_timeout).map_err(launch_error)?;
        runner
            .arg("--plan")
            .arg(plan)
            .args(["--name", id, "--backend", "auto"]);
        Ok(runner)
    }

    fn waker(&self, id: &str) -> Result<Command, ApiError> {
        let mut runner = runner_command(self.boot_timeout).map_err(launch_error)?;
        runner.args(["--wake", id]);
        Ok(runner)
    }
}

/// A failed build or a missing runner, with its code.
fn launch_error(error: anyhow::Error) -> ApiError {
    let code = match error.downcast_ref::<CodedError>() {
        Some(coded) => coded.code.clone(),
        None => mvm_api::error::codes::API007.into(),
    };
    ApiError::Launch {
        code,
        message: format!("{error:#}"),
    }
}
