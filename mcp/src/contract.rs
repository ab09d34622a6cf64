//! The agent tool contract: what `mvm tool run` reads on stdin and writes on stdout, and what
//! the MCP tool `sandbox_run_code` does. A request names a language, files to put in the
//! sandbox, a command, a timeout, the network it may use and what becomes of the sandbox
//! after; the response says what the command did, or why nothing ran, classed
//! ([`crate::FailureClass`]). `docs/mcp/` holds both JSON Schemas, generated from these types.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::failure::codes;
use crate::limits::call_timeout;
use crate::params::{check_argv, Language, MAX_HOSTS, MAX_PATH_BYTES};
use crate::{FailureClass, Limits, ToolFailure};

/// The most files one request may give.
pub const MAX_FILES: usize = 64;
/// The most bytes of all its files together.
pub const MAX_FILES_BYTES: usize = 8 * 1024 * 1024;
/// Where a request's relative paths are, and where its command runs.
pub const WORK_DIR: &str = "/tmp/work";

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

/// A request checked against the host's limits: all that is decided before a sandbox is
/// made, so that a request refused leaves nothing behind.
#[derive(Debug)]
pub struct CheckedRequest<'a> {
    /// Its files, each with its absolute path (under `/tmp`, no `..`).
    pub files: Vec<(String, &'a ToolFile)>,
    /// What runs.
    pub argv: Vec<String>,
    /// The hosts its sandbox may reach, `HOST:PORT`; none: no network.
    pub allow_hosts: Vec<String>,
    /// How long the command may run.
    pub timeout: Duration,
    /// The image its sandbox starts, one `limits` allows.
    pub image: String,
}

impl ToolRequest {
    /// Checks every part of the request against the contract's bounds and `limits`: its
    /// files' count, sizes and paths, its command, its network, its timeout and its image.
    pub fn check(&self, limits: &Limits) -> Result<CheckedRequest<'_>, ToolFailure> {
        let files = check_files(&self.files, limits.max_file_bytes)?;
        if !self.command.is_empty() {
            check_argv(&self.command)?;
        }
        let argv = match (self.command.is_empty(), files.first()) {
            (false, _) => self.command.clone(),
            (true, Some((path, _))) => self.language.argv(path),
            (true, None) => {
                return Err(ToolFailure::invalid(
                    "nothing to run: give a command, or a file to run",
                ))
            }
        };
        let allow_hosts = network_grants(&self.network)?;
        let timeout =
            call_timeout(self.timeout_seconds, limits.max_timeout).map_err(ToolFailure::invalid)?;
        let image = match self.image.as_ref().or(limits.default_image.as_ref()) {
            Some(image) if limits.allows(image) => image.clone(),
            Some(image) => {
                return Err(ToolFailure::new(
                    FailureClass::Policy,
                    codes::MCP002,
                    format!("{image} is not an image this host allows (--allow-image)"),
                ))
            }
            None => {
                return Err(ToolFailure::new(
                    FailureClass::Policy,
                    codes::MCP002,
                    "no image given and no default image (--default-image)",
                ))
            }
        };
        Ok(CheckedRequest {
            files,
            argv,
            allow_hosts,
            timeout,
            image,
        })
    }
}

/// A request's files with their absolute paths, within the contract's count and total size
/// and `max_file_bytes` each.
fn check_files(
    files: &[ToolFile],
    max_file_bytes: usize,
) -> Result<Vec<(String, &ToolFile)>, ToolFailure> {
    if files.len() > MAX_FILES {
        return Err(ToolFailure::invalid(format!(
            "{} files: at most {MAX_FILES}",
            files.len()
        )));
    }
    let total: usize = files.iter().map(|f| f.content.len()).sum();
    if total > MAX_FILES_BYTES {
        return Err(ToolFailure::invalid(format!(
            "the files hold {total} bytes: at most {MAX_FILES_BYTES}"
        )));
    }
    files
        .iter()
        .map(|file| match file.content.len() > max_file_bytes {
            true => Err(ToolFailure::invalid(format!(
                "{} holds {} bytes: at most {max_file_bytes}",
                file.path,
                file.content.len()
            ))),
            false => Ok((sandbox_path(&file.path)?, file)),
        })
        .collect()
}

/// The `allow_hosts` of a request's network: none for `none`, `HOST:PORT` for each host of an
/// allowlist.
fn network_grants(network: &ToolNetwork) -> Result<Vec<String>, ToolFailure> {
    match network.mode {
        NetworkMode::None if network.allow.is_empty() => Ok(vec![]),
        NetworkMode::None => Err(ToolFailure::invalid(
            "network.allow is given with mode none: say allowlist",
        )),
        NetworkMode::Allowlist if network.allow.is_empty() || network.allow.len() > MAX_HOSTS => {
            Err(ToolFailure::invalid(format!(
                "an allowlist names 1-{MAX_HOSTS} hosts"
            )))
        }
        NetworkMode::Allowlist => network
            .allow
            .iter()
            .map(|allowed| {
                let host = allowed.host.as_str();
                let port = allowed.port.unwrap_or(443);
                let fine = !host.is_empty()
                    && host.len() <= 253
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
                match (fine, port) {
                    (false, _) => Err(ToolFailure::invalid(format!(
                        "{host:?} is not a host name or address"
                    ))),
                    (true, 0) => Err(ToolFailure::invalid(format!("{host}: port 0"))),
                    (true, port) => Ok(format!("{host}:{port}")),
                }
            })
            .collect(),
    }
}

/// A request's file path in the sandbox: relative ones under [`WORK_DIR`]; every one under
/// `/tmp`, no `.` or `..` component, no NUL, no empty component.
fn sandbox_path(path: &str) -> Result<String, ToolFailure> {
    let absolute = match path.starts_with('/') {
        true => path.to_string(),
        false => format!("{WORK_DIR}/{path}"),
    };
    let components: Vec<&str> = absolute[1..].split('/').collect();
    let fine = absolute.len() <= MAX_PATH_BYTES
        && !absolute.contains('\0')
        && components.len() >= 2
        && components[0] == "tmp"
        && components
            .iter()
            .all(|c| !c.is_empty() && *c != "." && *c != "..");
    match fine {
        true => Ok(absolute),
        false => Err(ToolFailure::new(
            FailureClass::Policy,
            codes::MCP001,
            format!("{path:?} is not a file under /tmp (no `..`, no empty or `.` parts)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_paths_stay_under_tmp() {
        assert_eq!(sandbox_path("main.py").unwrap(), "/tmp/work/main.py");
        assert_eq!(sandbox_path("src/a.py").unwrap(), "/tmp/work/src/a.py");
        assert_eq!(sandbox_path("/tmp/x/y").unwrap(), "/tmp/x/y");
        for bad in [
            "/etc/passwd",
            "../../etc/passwd",
            "/tmp/../etc/passwd",
            "/tmp",
            "/tmp/",
            "a//b",
            "./a",
            "/tmp/a\0b",
            "/tmpx/a",
        ] {
            let refused = sandbox_path(bad).unwrap_err();
            assert_eq!(refused.class, FailureClass::Policy, "{bad}");
        }
        assert!(sandbox_path(&format!("/tmp/{}", "a".repeat(MAX_PATH_BYTES))).is_err());
    }

    #[test]
    fn network_is_none_unless_an_allowlist_names_hosts() {
        let request = |mode, allow: Vec<AllowedHost>| ToolNetwork { mode, allow };
        let host = |host: &str, port| AllowedHost {
            host: host.into(),
            port,
        };
        assert!(network_grants(&request(NetworkMode::None, vec![]))
            .unwrap()
            .is_empty());
        assert_eq!(
            network_grants(&request(
                NetworkMode::Allowlist,
                vec![host("api.example.com", None), host("10.0.0.2", Some(8080))]
            ))
            .unwrap(),
            ["api.example.com:443", "10.0.0.2:8080"]
        );
        for refused in [
            request(NetworkMode::None, vec![host("api.example.com", None)]),
            request(NetworkMode::Allowlist, vec![]),
            request(NetworkMode::Allowlist, vec![host("a b", None)]),
            request(NetworkMode::Allowlist, vec![host("x:1", None)]),
            request(
                NetworkMode::Allowlist,
                vec![host("api.example.com", Some(0))],
            ),
        ] {
            assert_eq!(
                network_grants(&refused).unwrap_err().class,
                FailureClass::Validation
            );
        }
    }

    #[test]
    fn a_request_is_checked_whole_before_anything_starts() {
        let image = format!("oci:img@sha256:{}", "a".repeat(64));
        let limits = Limits {
            default_image: Some(image.clone()),
            ..Limits::default()
        };
        let request: ToolRequest = serde_json::from_value(serde_json::json!({
            "language": "python",
            "files": [{"path": "main.py", "content": "print(1)"}, {"path": "/tmp/in", "content": ""}],
            "timeout_seconds": 5,
            "network": {"mode": "allowlist", "allow": [{"host": "api.example.com"}]}
        }))
        .unwrap();
        let checked = request.check(&limits).unwrap();
        assert_eq!(checked.argv, ["python3", "/tmp/work/main.py"]);
        assert_eq!(checked.files[1].0, "/tmp/in");
        assert_eq!(checked.allow_hosts, ["api.example.com:443"]);
        assert_eq!(checked.timeout, Duration::from_secs(5));
        assert_eq!(checked.image, image);

        let refused = |request: serde_json::Value, limits: &Limits| {
            let request: ToolRequest = serde_json::from_value(request).unwrap();
            let failure = request.check(limits).unwrap_err();
            (failure.class, failure.code)
        };
        let other = format!("oci:other@sha256:{}", "b".repeat(64));
        assert_eq!(
            refused(
                serde_json::json!({"language": "shell", "command": ["true"], "image": other}),
                &limits
            ),
            (FailureClass::Policy, codes::MCP002.to_string())
        );
        assert_eq!(
            refused(
                serde_json::json!({"language": "shell", "command": ["true"]}),
                &Limits::default()
            ),
            (FailureClass::Policy, codes::MCP002.to_string())
        );
        assert_eq!(
            refused(
                serde_json::json!({"language": "shell", "command": ["true"], "timeout_seconds": 601}),
                &limits
            ),
            (FailureClass::Validation, codes::MCP001.to_string())
        );
        let big = "x".repeat(limits.max_file_bytes + 1);
        assert_eq!(
            refused(
                serde_json::json!({"language": "shell", "files": [{"path": "a", "content": big}]}),
                &limits
            ),
            (FailureClass::Validation, codes::MCP001.to_string())
        );
    }
}
