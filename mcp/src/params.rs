//! The MCP tools' inputs and outputs. Their JSON Schemas (what `tools/list` shows) are derived
//! from these types: every input refuses unknown fields and states its bounds, which
//! [`crate::Service`] checks again (a schema is advice to the client, not a check).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ToolFailure;

/// The most environment variables or labels one call may give.
pub const MAX_ENTRIES: usize = 32;
/// The most bytes of one variable's or label's name and value together.
pub const MAX_ENTRY_BYTES: usize = 4096;
/// The most arguments of a command.
pub const MAX_ARGS: usize = 256;
/// The most bytes of a command's arguments together.
pub const MAX_ARGV_BYTES: usize = 64 * 1024;
/// The most bytes of a path in the sandbox.
pub const MAX_PATH_BYTES: usize = 1024;
/// The most hosts a sandbox may be granted.
pub const MAX_HOSTS: usize = 16;

/// A sandbox's id, as `sandbox_create` gave it.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxRef {
    /// The sandbox's id.
    #[schemars(length(min = 1, max = 63))]
    pub sandbox_id: String,
}

/// `sandbox_create`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateParams {
    /// The image, `REFERENCE@sha256:<digest>`: one this server allows.
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    /// Virtual CPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2))]
    pub cpus: Option<u32>,
    /// Memory in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 128, max = 4096))]
    pub memory_mib: Option<u32>,
    /// Environment variables every command in it gets.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub env: BTreeMap<String, String>,
    /// Hosts it may reach, `HOST[:PORT]`; none: no network at all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub allow_hosts: Vec<String>,
    /// Seconds it lives while running before it is removed: 300 unless given, 0 until
    /// `sandbox_remove`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86400))]
    pub timeout_seconds: Option<u64>,
    /// Labels to find it by in `sandbox_list`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub labels: BTreeMap<String, String>,
    /// Boot its kernel instead of restoring its plan's boot snapshot (made by the plan's first
    /// launch on this host, and restored in a fraction of a boot), and make none.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cold_boot: bool,
}

/// A sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct SandboxInfo {
    /// Its id.
    pub sandbox_id: String,
    /// `starting`, `running`, `paused`, `cold`, `stopped` or `failed`.
    pub state: String,
    /// The digest of the signed plan it runs.
    pub plan_digest: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// When it will be removed (RFC 3339), if its clock runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Why it stopped or failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The boot snapshot (its key) its guest was restored from; absent when it booted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_snapshot: Option<String>,
}

/// `sandbox_list`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Only those carrying every one of these labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub labels: BTreeMap<String, String>,
}

/// The sandboxes of this server.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct SandboxList {
    /// By id.
    pub sandboxes: Vec<SandboxInfo>,
}

/// `sandbox_pause`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PauseParams {
    /// The sandbox's id.
    #[schemars(length(min = 1, max = 63))]
    pub sandbox_id: String,
    /// Save it to disk too: it then holds no memory until resumed, and its clock stops.
    #[serde(default)]
    pub cold: bool,
}

/// What `sandbox_remove` did.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Removed {
    /// The sandbox removed.
    pub sandbox_id: String,
}

/// The language of a program `sandbox_run_code` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Language {
    /// `python3 FILE`.
    Python,
    /// `node FILE`.
    Node,
    /// `sh FILE`.
    Shell,
}

impl Language {
    /// The interpreter's argv for the program `file`.
    pub fn argv(self, file: &str) -> Vec<String> {
        let interpreter = match self {
            Language::Python => "python3",
            Language::Node => "node",
            Language::Shell => "sh",
        };
        vec![interpreter.to_string(), file.to_string()]
    }

    /// The extension of its files.
    pub fn extension(self) -> &'static str {
        match self {
            Language::Python => "py",
            Language::Node => "js",
            Language::Shell => "sh",
        }
    }
}

/// `sandbox_run_code`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunCodeParams {
    /// The sandbox to run it in; none: a fresh one of the server's default image, removed
    /// after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub sandbox_id: Option<String>,
    /// Its language.
    pub language: Language,
    /// The program's text.
    #[schemars(length(min = 1, max = 1048576))]
    pub code: String,
    /// Seconds it may run (60 unless given; the server's ceiling at most).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: Option<u64>,
}

/// `sandbox_exec`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecParams {
    /// The sandbox's id.
    #[schemars(length(min = 1, max = 63))]
    pub sandbox_id: String,
    /// Program and arguments (no shell: give `["sh", "-c", "…"]` for one).
    #[schemars(length(min = 1, max = 256))]
    pub command: Vec<String>,
    /// Its working directory, absolute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub cwd: Option<String>,
    /// Environment variables, over the sandbox's own.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub env: BTreeMap<String, String>,
    /// Seconds it may run (60 unless given; the server's ceiling at most).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: Option<u64>,
}

/// What a command did.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ExecOutput {
    /// The sandbox it ran in (removed already when `sandbox_run_code` made it).
    pub sandbox_id: String,
    /// Its exit code; 128 + the signal when a signal ended it; 124 when it timed out.
    pub exit_code: i32,
    /// Its standard output (UTF-8, invalid bytes replaced), at most the server's cap.
    pub stdout: String,
    /// Its standard error, likewise.
    pub stderr: String,
    /// Either stream was longer than the cap: only its start is here.
    pub truncated: bool,
    /// It ran past its timeout and was killed with everything it started.
    pub timed_out: bool,
    /// The digest of its signed receipt, `sha256:<hex>`
    /// (`$MVM_HOME/receipts/<hex>.json` on the host).
    pub audit_id: String,
}

/// How a file's content is given or wanted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// UTF-8 text.
    #[default]
    Text,
    /// Base64 of the bytes.
    Base64,
}

/// `sandbox_files_read`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FilesReadParams {
    /// The sandbox's id.
    #[schemars(length(min = 1, max = 63))]
    pub sandbox_id: String,
    /// The file, under `/tmp`.
    #[schemars(length(min = 1, max = 1024))]
    pub path: String,
    /// `text` (the default: the file must be UTF-8) or `base64`.
    #[serde(default)]
    pub encoding: Encoding,
}

/// A file's content.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct FileContent {
    /// The file.
    pub path: String,
    /// How `content` is given.
    pub encoding: Encoding,
    /// The content.
    pub content: String,
    /// Its size in bytes.
    pub size: u64,
}

/// `sandbox_files_write`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FilesWriteParams {
    /// The sandbox's id.
    #[schemars(length(min = 1, max = 63))]
    pub sandbox_id: String,
    /// The file, under `/tmp` (its directory must exist); a file there is replaced.
    #[schemars(length(min = 1, max = 1024))]
    pub path: String,
    /// The content, as `encoding` says.
    #[schemars(length(max = 1398104))]
    pub content: String,
    /// `text` (the default) or `base64`.
    #[serde(default)]
    pub encoding: Encoding,
    /// Permission bits (0o644 unless given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 511))]
    pub mode: Option<u32>,
}

/// `sandbox_files_list`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FilesListParams {
    /// The sandbox's id.
    #[schemars(length(min = 1, max = 63))]
    pub sandbox_id: String,
    /// The directory, under `/tmp`.
    #[schemars(length(min = 1, max = 1024))]
    pub path: String,
    /// Levels to list (1, its entries, unless given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4))]
    pub depth: Option<u32>,
}

/// Refuses a command of no arguments, or of more than [`MAX_ARGS`] or [`MAX_ARGV_BYTES`].
pub(crate) fn check_argv(argv: &[String]) -> Result<(), ToolFailure> {
    let bytes: usize = argv.iter().map(String::len).sum();
    if argv.is_empty() || argv.len() > MAX_ARGS || bytes > MAX_ARGV_BYTES {
        return Err(ToolFailure::invalid(format!(
            "a command is 1-{MAX_ARGS} arguments of {MAX_ARGV_BYTES} bytes together"
        )));
    }
    Ok(())
}
