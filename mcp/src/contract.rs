//! The agent tool contract: what `mvm tool run` reads on stdin and writes on stdout, and what
//! the MCP tool `sandbox_run_code` does. A request names a language, files to put in the
//! sandbox, a command, a timeout, the network it may use and what becomes of the sandbox
//! after; the response says what the command did, or why nothing ran, classed
//! ([`crate::FailureClass`]). `docs/mcp/` holds both JSON Schemas, generated from these types.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::params::Language;
use crate::ToolFailure;

/// The most files one request may give.
pub const MAX_FILES: usize = 64;
/// The most bytes of all its files together.
pub const MAX_FILES_BYTES: usize = 8 * 1024 * 1024;

/// A request of the agent tool contract (`mvm tool run`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolRequest {
    /// The language of the files (`python`, `node`, `shell`): with no `command`, the first
    /// file is run with its interpreter.
    pub language: Language,
    /// The image to start, `REFERENCE@sha256:<digest>`, one the host allows; the host's
    /// default image unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// Files to write before the command runs, each under `/tmp`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub files: Vec<ToolFile>,
    /// The command (no shell); none: the first file with the language's interpreter.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub command: Vec<String>,
    /// Seconds the command may run (60 unless given; the host's ceiling at most).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: Option<u64>,
    /// The network it may use: none unless given.
    #[serde(default)]
    pub network: ToolNetwork,
    /// What becomes of the sandbox after: destroyed unless given.
    #[serde(default)]
    pub state: ToolState,
}

/// A file to write in the sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolFile {
    /// Where, under `/tmp` (no `..`); a relative path is under `/tmp/work`, where the command
    /// runs. Its directories are made.
    #[schemars(length(min = 1, max = 1024))]
    pub path: String,
    /// Its content, UTF-8 text.
    pub content: String,
}

/// The network a request's sandbox may use.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolNetwork {
    /// `none` (the default) or `allowlist`.
    #[serde(default)]
    pub mode: NetworkMode,
    /// With `allowlist`: the hosts and ports it may reach.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub allow: Vec<AllowedHost>,
}

/// Whether a sandbox has network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    /// No network at all.
    #[default]
    None,
    /// Only the hosts of `allow`.
    Allowlist,
}

/// A host a sandbox may reach.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AllowedHost {
    /// Its name or address.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// Its port (443 unless given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
}

/// What becomes of a request's sandbox after its command.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolState {
    /// `destroy` (the default), `stop` or `cold`.
    #[serde(default)]
    pub retention: Retention,
}

/// What becomes of a sandbox after its command.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Retention {
    /// Removed.
    #[default]
    Destroy,
    /// Stopped, kept (`mvm ls`; `mvm rm` removes it).
    Stop,
    /// Saved to disk, to be woken with `sandbox_resume` or `mvm wake`.
    Cold,
}

/// The response to a request of the agent tool contract: what the command did, or why it
/// did not run.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ToolResponse {
    /// Whether the command ran (whatever its exit code).
    pub ok: bool,
    /// The sandbox it ran in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_id: Option<String>,
    /// Its exit code; 128 + the signal when a signal ended it; 124 when it timed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Its standard output (UTF-8, invalid bytes replaced), at most the host's cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
    /// Its standard error, likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
    /// Either stream was longer than the cap.
    #[serde(default)]
    pub truncated: bool,
    /// It ran past its timeout.
    #[serde(default)]
    pub timed_out: bool,
    /// The digest of its signed receipt, `sha256:<hex>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_id: Option<String>,
    /// What became of the sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    /// Why it did not run, or what failed after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ToolFailure>,
}

impl ToolResponse {
    /// The response of a request that failed with `failure`.
    pub fn failed(failure: ToolFailure) -> Self {
        Self {
            ok: false,
            sandbox_id: None,
            exit_code: None,
            stdout: None,
            stderr: None,
            truncated: false,
            timed_out: false,
            audit_id: None,
            retention: None,
            error: Some(failure),
        }
    }
}
