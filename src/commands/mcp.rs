//! `mvm mcp` (the MCP server over stdio) and `mvm tool run` (the agent tool contract), on
//! `mvm_mcp`, with the CLI's way of building images and starting runners (as `mvm serve`).

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use mvm_mcp::contract::{ToolRequest, ToolResponse};
use mvm_mcp::{FailureClass, Limits, McpServer, Service, ToolFailure};

use super::serve::CliLauncher;
use super::{coded_as, Host};

/// The images and bounds a client of `mvm mcp` or `mvm tool run` works within.
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// An image clients may start, REFERENCE@sha256:DIGEST (repeatable). None is allowed
    /// unless named here or by --default-image.
    #[arg(long = "allow-image", value_name = "IMAGE")]
    allow_images: Vec<String>,
    /// The image a run starts when it names none (`sandbox_run_code` without a sandbox, a
    /// tool request without `image`); allowed too.
    #[arg(long, value_name = "IMAGE")]
    default_image: Option<String>,
    /// The most sandboxes made through this at once.
    #[arg(long, value_name = "N", default_value_t = 4)]
    max_sandboxes: usize,
    /// The longest a call may ask to run a command.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m", value_name = "DURATION")]
    max_timeout: Duration,
    /// How long a sandbox's guest has to become ready.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s", value_name = "DURATION")]
    boot_timeout: Duration,
}

/// Serve mvm's sandboxes as MCP tools over stdio (for Claude Desktop, Claude Code, Cursor
/// and any client on the official MCP SDKs; docs/mcp.md has their set-up). Tools:
/// sandbox_create, sandbox_run_code, sandbox_exec, sandbox_files_read|write|list,
/// sandbox_list, sandbox_pause, sandbox_resume, sandbox_stop, sandbox_remove. Clients start
/// only the images allowed here, and see only the sandboxes made through MCP. Every call is
/// audited (`mcp.call`), every command leaves a signed receipt.
#[derive(Debug, Args)]
pub struct McpArgs {
    #[command(flatten)]
    limits: LimitArgs,
    /// Print the tools as `tools/list` gives them (JSON) and exit.
    #[arg(long)]
    list_tools: bool,
}

#[derive(Debug, Subcommand)]
pub enum ToolCommand {
    /// Run one agent tool request: JSON on stdin (language, files, command, timeout_seconds,
    /// network, state.retention), one JSON response on stdout (sandbox_id, exit_code, stdout,
    /// stderr, timed_out, audit_id, retention, error{class, code, message}). Exit status 0
    /// when the command ran (whatever its exit code); else by the error's class: validation
    /// 65, policy 77, timeout 124, guest 70, transport 74, cleanup 75.
    Run {
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Print the contract's JSON Schema: the request's, or with --response the response's.
    Schema {
        /// The response's schema.
        #[arg(long)]
        response: bool,
    },
}

/// The largest request `mvm tool run` reads.
const MAX_REQUEST_BYTES: u64 = 16 << 20;

impl LimitArgs {
    fn limits(&self) -> anyhow::Result<Limits> {
        for image in self.allow_images.iter().chain(&self.default_image) {
            let pinned = image.rsplit_once('@').is_some_and(|(name, digest)| {
                !name.is_empty() && mvm_ir::digest::is_prefixed_sha256(digest)
            });
            if !pinned {
                return Err(coded_as(
                    "MCP001",
                    format!("{image} is not pinned: give REFERENCE@sha256:<digest>"),
                ));
            }
        }
        if self.max_sandboxes == 0 || self.max_timeout.is_zero() {
            return Err(coded_as(
                "MCP001",
                "--max-sandboxes and --max-timeout must be above zero",
            ));
        }
        Ok(Limits {
            allowed_images: self.allow_images.clone(),
            default_image: self.default_image.clone(),
            max_sandboxes: self.max_sandboxes,
            max_timeout: self.max_timeout,
            ..Limits::default()
        })
    }

    fn service(&self) -> anyhow::Result<Service> {
        let limits = self.limits()?;
        let host = Host::open()?;
        let launcher = CliLauncher::new(host.home.clone(), self.boot_timeout);
        Ok(Service::new(host.home, Box::new(launcher), limits))
    }
}

pub fn mcp(args: McpArgs) -> anyhow::Result<ExitCode> {
    let server = McpServer::new(args.limits.service()?);
    if args.list_tools {
        let tools = serde_json::json!({ "tools": server.tools() });
        println!("{}", serde_json::to_string_pretty(&tools)?);
        return Ok(ExitCode::SUCCESS);
    }
    mvm_mcp::run_stdio(server).map_err(|e| super::coded_io("MCP007", e))?;
    Ok(ExitCode::SUCCESS)
}

pub fn tool(cmd: ToolCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ToolCommand::Schema { response } => {
            let schema = match response {
                true => schemars::schema_for!(ToolResponse),
                false => schemars::schema_for!(ToolRequest),
            };
            println!("{}", serde_json::to_string_pretty(&schema)?);
            Ok(ExitCode::SUCCESS)
        }
        ToolCommand::Run { limits } => {
            let service = limits.service()?;
            let response = read_request()
                .and_then(|request| {
                    service.audit("tool.run", &request)?;
                    service.run_tool(&request)
                })
                .unwrap_or_else(ToolResponse::failed);
            let mut stdout = std::io::stdout().lock();
            serde_json::to_writer_pretty(&mut stdout, &response)?;
            writeln!(stdout)?;
            Ok(ExitCode::from(match (&response.error, response.ok) {
                (None, true) => 0,
                (Some(failure), _) => exit_status(failure.class),
                (None, false) => 70,
            }))
        }
    }
}

/// The request on stdin: one JSON document within its bound, no unknown field.
fn read_request() -> Result<ToolRequest, ToolFailure> {
    let mut bytes = Vec::new();
    std::io::stdin()
        .take(MAX_REQUEST_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ToolFailure::new(FailureClass::Transport, "MCP007", e.to_string()))?;
    if bytes.len() as u64 > MAX_REQUEST_BYTES {
        return Err(ToolFailure::invalid(format!(
            "the request is over {MAX_REQUEST_BYTES} bytes"
        )));
    }
    serde_json::from_slice(&bytes).map_err(|e| ToolFailure::invalid(format!("the request: {e}")))
}

/// `mvm tool run`'s exit status for a failure of `class`.
fn exit_status(class: FailureClass) -> u8 {
    match class {
        FailureClass::Validation => 65,
        FailureClass::Policy => 77,
        FailureClass::Timeout => 124,
        FailureClass::Guest => 70,
        FailureClass::Transport => 74,
        FailureClass::Cleanup => 75,
    }
}
