//! `mvm serve`: the local API (`mvm_api`) for this user's mvm home, with the CLI's way of
//! building images into signed bundles and starting runners.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use clap::Args;
use mvm_api::error::ApiError;
use mvm_api::model::CreateSandbox;
use mvm_api::{Launcher, ServeOptions, Served};
use mvm_ir::home::MvmHome;
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
    let launcher = CliLauncher::new(host.home.clone(), args.boot_timeout);
    let options = ServeOptions {
        home: host.home,
        socket: args.socket,
        idle_exit: args.idle_exit,
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
pub(super) struct CliLauncher {
    boot_timeout: Duration,
    home: MvmHome,
}

impl CliLauncher {
    /// Sandboxes of `home` whose guests have `boot_timeout` to become ready.
    pub(super) fn new(home: MvmHome, boot_timeout: Duration) -> Self {
        CliLauncher { boot_timeout, home }
    }
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
        let options = ImageOptions::for_sandbox(spec);
        let image = match &spec.template {
            Some(template) => Some(template_image(&self.home, template)?),
            None => spec.image.clone(),
        };
        let plan = plan_to_boot(
            spec.plan.as_deref().map(Path::new),
            image.as_deref(),
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
        // The secrets and the volumes; nothing else of the options is for a sandbox's launch.
        options
            .configure_runner(&mut runner)
            .map_err(launch_error)?;
        Ok(runner)
    }

    fn waker(&self, id: &str) -> Result<Command, ApiError> {
        let mut runner = runner_command(self.boot_timeout).map_err(launch_error)?;
        runner.args(["--wake", id]);
        Ok(runner)
    }
}

/// The image `[e2b.templates]` in `$MVM_HOME/config.toml` maps `template` to: digest-pinned,
/// so that a template name always means the same bytes.
fn template_image(home: &MvmHome, template: &str) -> Result<String, ApiError> {
    let unmapped = |why: String| ApiError::Launch {
        code: mvm_api::error::codes::API008.into(),
        message: format!("the template {template:?}: {why}"),
    };
    let path = home.root().join("config.toml");
    let text = match mvm_ir::fsutil::read_capped(&path, 1 << 20, "config.toml") {
        Ok(bytes) => {
            String::from_utf8(bytes).map_err(|_| unmapped("config.toml is not UTF-8".into()))?
        }
        Err(e) => return Err(unmapped(format!("no [e2b.templates] to map it ({e})"))),
    };
    let config: toml::Table = text
        .parse()
        .map_err(|e| unmapped(format!("config.toml: {e}")))?;
    let image = config
        .get("e2b")
        .and_then(|e2b| e2b.get("templates"))
        .and_then(|templates| templates.get(template))
        .ok_or_else(|| {
            unmapped(format!(
                "[e2b.templates] in {} does not map it",
                path.display()
            ))
        })?
        .as_str()
        .ok_or_else(|| unmapped("its image is not a string".into()))?;
    match image.rsplit_once("@sha256:") {
        Some((_, digest)) if mvm_ir::digest::is_sha256_hex(digest) => Ok(image.to_string()),
        _ => Err(unmapped(format!(
            "it maps to {image:?}, which is not pinned (REFERENCE@sha256:<digest>)"
        ))),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_map_to_pinned_images_only() {
        let dir = tempfile::tempdir().unwrap();
        let home = MvmHome::at(dir.path());
        let code = |result: Result<String, ApiError>| result.unwrap_err().code();
        assert_eq!(code(template_image(&home, "base")), "API008");
        let pinned = format!("oci:/srv/base@sha256:{}", "a".repeat(64));
        std::fs::write(
            dir.path().join("config.toml"),
            format!("[e2b.templates]\nbase = \"{pinned}\"\nloose = \"oci:/srv/base:latest\"\n"),
        )
        .unwrap();
        assert_eq!(template_image(&home, "base").unwrap(), pinned);
        assert_eq!(code(template_image(&home, "loose")), "API008");
        assert_eq!(code(template_image(&home, "other")), "API008");
    }
}
