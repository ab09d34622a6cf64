//! The tools' work, blocking (a sandbox is built and booted, a command runs): the MCP server
//! runs each call on a blocking thread, `mvm tool run` on its own. Every check of a client's
//! input is made here, whatever the schemas said.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use mvm_api::error::ApiError;
use mvm_api::files::{self, Spool};
use mvm_api::model::{CreateSandbox, EntryList, Sandbox, Written};
use mvm_api::sandboxes::Sandboxes;
use mvm_api::Launcher;
use mvm_ir::audit::HostAudit;
use mvm_ir::home::MvmHome;
use mvm_protocol::{ExecRequest, ExitStatus, FileKind, Integrity, Request, Response};
use mvm_runner::client::OutputSink;
use mvm_runner::named_vm::{NamedVm, VmHome};

use crate::contract::{Retention, ToolFile, ToolRequest, ToolResponse};
use crate::failure::codes;
use crate::limits::call_timeout;
use crate::params::{
    check_argv, CreateParams, Encoding, ExecOutput, FileContent, RunCodeParams, SandboxInfo,
    MAX_ENTRIES, MAX_ENTRY_BYTES, MAX_HOSTS, MAX_PATH_BYTES,
};
use crate::{contract, FailureClass, Limits, ToolFailure, MCP_LABEL};

/// How long a file operation may take.
const FILE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long past its command's timeout a one-shot sandbox lives, should its caller vanish.
const ONE_SHOT_GRACE_S: u64 = 300;

/// The sandboxes a client may use, and the limits it may use them within.
pub struct Service {
    sandboxes: Sandboxes,
    home: MvmHome,
    limits: Limits,
    /// Held while the sandboxes are counted and one is made: the count holds.
    creating: Mutex<()>,
}

impl Service {
    /// Sandboxes of `home`, started through `launcher`, within `limits`.
    pub fn new(home: MvmHome, launcher: Box<dyn Launcher>, limits: Limits) -> Self {
        Self {
            sandboxes: Sandboxes::new(VmHome::new(home.clone()), launcher),
            home,
            limits,
            creating: Mutex::new(()),
        }
    }

    /// Its limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Records a call on the host's signed audit chain before it runs (`mcp.call`: the tool
    /// and the digest of its arguments, never their values); a call that cannot be recorded
    /// does not run.
    pub fn audit(&self, tool: &str, arguments: &impl serde::Serialize) -> Result<(), ToolFailure> {
        let digest = serde_json::to_vec(arguments)
            .map(|bytes| mvm_ir::digest::sha256_prefixed(&bytes))
            .map_err(|e| host_failure(e.to_string()))?;
        HostAudit::open(&self.home)
            .and_then(|audit| {
                audit.append(
                    "mcp.call",
                    serde_json::json!({"tool": tool, "arguments_sha256": digest}),
                )
            })
            .map(|_| ())
            .map_err(|e| host_failure(format!("the audit chain: {e}")))
    }

    /// Removes the sandboxes whose time is up.
    pub fn reap(&self) {
        let _ = self
            .sandboxes
            .reap(time::OffsetDateTime::now_utc().unix_timestamp());
    }

    /// Makes and starts a sandbox; returns once it is ready.
    pub fn create(&self, params: &CreateParams) -> Result<SandboxInfo, ToolFailure> {
        if !self.limits.allows(&params.image) {
            return Err(ToolFailure::new(
                FailureClass::Policy,
                codes::MCP002,
                format!(
                    "{} is not an image this server allows (mvm mcp --allow-image)",
                    params.image
                ),
            ));
        }
        check_entries("env", &params.env)?;
        check_entries("labels", &params.labels)?;
        if params.labels.contains_key(MCP_LABEL) {
            return Err(ToolFailure::invalid(format!(
                "the label {MCP_LABEL} is the server's own"
            )));
        }
        if params.allow_hosts.len() > MAX_HOSTS {
            return Err(ToolFailure::invalid(format!(
                "{} hosts: at most {MAX_HOSTS}",
                params.allow_hosts.len()
            )));
        }
        let mut metadata = params.labels.clone();
        metadata.insert(MCP_LABEL.into(), "true".into());
        let spec = CreateSandbox {
            image: Some(params.image.clone()),
            cpus: params.cpus,
            memory_mib: params.memory_mib,
            envs: params.env.clone(),
            allow_hosts: params.allow_hosts.clone(),
            metadata,
            timeout_s: params.timeout_seconds,
            cold_boot: params.cold_boot,
            ..CreateSandbox::default()
        };
        let _creating = self
            .creating
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let ours = self.list(&BTreeMap::new())?.len();
        if ours >= self.limits.max_sandboxes {
            return Err(ToolFailure::new(
                FailureClass::Policy,
                codes::MCP003,
                format!(
                    "{ours} sandboxes exist, this server's most (--max-sandboxes): remove one first"
                ),
            ));
        }
        Ok(info(self.sandboxes.create(&spec)?))
    }

    /// This server's sandboxes carrying every one of `labels`.
    pub fn list(&self, labels: &BTreeMap<String, String>) -> Result<Vec<SandboxInfo>, ToolFailure> {
        check_entries("labels", labels)?;
        let mut wanted = labels.clone();
        wanted.insert(MCP_LABEL.into(), "true".into());
        Ok(self
            .sandboxes
            .list(&wanted, None)?
            .into_iter()
            .map(info)
            .collect())
    }

    /// The sandbox `id`, if it is this server's.
    pub fn get(&self, id: &str) -> Result<SandboxInfo, ToolFailure> {
        self.ours(id).map(info)
    }

    /// Pauses `id`; `cold` saves it to disk.
    pub fn pause(&self, id: &str, cold: bool) -> Result<SandboxInfo, ToolFailure> {
        self.ours(id)?;
        Ok(info(self.sandboxes.pause(id, cold)?))
    }

    /// Lets `id` run again, from paused or cold.
    pub fn resume(&self, id: &str) -> Result<SandboxInfo, ToolFailure> {
        self.ours(id)?;
        Ok(info(self.sandboxes.resume(id)?))
    }

    /// Stops `id`, keeping it (removed with [`Service::remove`]).
    pub fn stop(&self, id: &str) -> Result<SandboxInfo, ToolFailure> {
        self.ours(id)?;
        self.sandboxes.vm(id)?.stop()?;
        self.get(id)
    }

    /// Stops `id` if it runs and removes it.
    pub fn remove(&self, id: &str) -> Result<(), ToolFailure> {
        self.ours(id)?;
        Ok(self.sandboxes.kill(id)?)
    }

    /// Runs `argv` in `id` to its end, within `timeout`, with `env` over the sandbox's own.
    pub fn exec(
        &self,
        id: &str,
        argv: Vec<String>,
        cwd: Option<String>,
        env: &BTreeMap<String, String>,
        timeout: Duration,
    ) -> Result<ExecOutput, ToolFailure> {
        self.ours(id)?;
        check_argv(&argv)?;
        check_entries("env", env)?;
        if cwd.as_ref().is_some_and(|cwd| cwd.len() > MAX_PATH_BYTES) {
            return Err(ToolFailure::invalid("cwd is too long"));
        }
        let vm = self.sandboxes.vm(id)?;
        let mut environment = self.sandboxes.envs(id)?;
        environment.extend(env.clone());
        let request = ExecRequest {
            argv,
            env: environment,
            cwd,
            timeout_ms: timeout.as_millis() as u64,
            stdin: false,
            user: None,
            tty: None,
        };
        if let Some(problem) = request.problem() {
            return Err(ToolFailure::invalid(problem));
        }
        let mut client = vm.connect(Arc::default())?;
        let mut output = Captured::new(self.limits.max_output_bytes);
        let ran = vm.run(&mut client, request, None, &mut output, true)?;
        let reply = &ran.executed.reply;
        if reply.integrity == Integrity::Corrupted {
            return Err(ToolFailure::new(
                FailureClass::Guest,
                "RUN020",
                "dm-verity refused a block of the root while the command ran; its output cannot be trusted",
            ));
        }
        let (exit_code, timed_out) = match reply.status {
            ExitStatus::Exited { code } => (code, false),
            ExitStatus::Signaled { signal } => (128 + signal, false),
            ExitStatus::TimedOut => (124, true),
        };
        let audit_id = ran
            .receipt
            .map(|receipt| mvm_ir::digest::sha256_prefixed(&receipt))
            .unwrap_or_default();
        Ok(ExecOutput {
            sandbox_id: id.into(),
            exit_code,
            truncated: output.truncated(),
            stdout: String::from_utf8_lossy(&output.stdout.kept).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr.kept).into_owned(),
            timed_out,
            audit_id,
        })
    }

    /// `sandbox_run_code`: the program in `id`, or in a one-shot sandbox of the default image
    /// (the contract's request of one file, destroyed after).
    pub fn run_code(&self, params: &RunCodeParams) -> Result<ExecOutput, ToolFailure> {
        let timeout = self.timeout(params.timeout_seconds)?;
        if params.code.len() > self.limits.max_file_bytes {
            return Err(ToolFailure::invalid(format!(
                "the program is {} bytes, over this server's {}",
                params.code.len(),
                self.limits.max_file_bytes
            )));
        }
        let Some(id) = &params.sandbox_id else {
            let request = ToolRequest {
                language: params.language,
                image: None,
                files: vec![ToolFile {
                    path: format!("main.{}", params.language.extension()),
                    content: params.code.clone(),
                }],
                command: vec![],
                timeout_seconds: Some(timeout.as_secs()),
                network: Default::default(),
                state: Default::default(),
            };
            let response = self.run_tool(&request)?;
            // A command that ran past its time is a result (`timed_out`), as in sandbox_exec.
            if let Some(failure) = response.error.filter(|f| f.class != FailureClass::Timeout) {
                return Err(failure);
            }
            return Ok(ExecOutput {
                sandbox_id: response.sandbox_id.unwrap_or_default(),
                exit_code: response.exit_code.unwrap_or_default(),
                stdout: response.stdout.unwrap_or_default(),
                stderr: response.stderr.unwrap_or_default(),
                truncated: response.truncated,
                timed_out: response.timed_out,
                audit_id: response.audit_id.unwrap_or_default(),
            });
        };
        self.ours(id)?;
        let nonce = mvm_ir::plan::fresh_nonce().map_err(|e| host_failure(e.to_string()))?;
        let file = format!(
            "/tmp/mvm-code-{}.{}",
            &nonce[..12],
            params.language.extension()
        );
        self.write_file(id, &file, params.code.as_bytes(), Some(0o600))?;
        self.exec(
            id,
            params.language.argv(&file),
            Some("/tmp".into()),
            &BTreeMap::new(),
            timeout,
        )
    }

    /// The agent tool contract: `request` run in a sandbox of its own, which then goes as
    /// it asks. A failure before the command ran removes the sandbox and is the response's
    /// error; one after (keeping the sandbox as asked) rides with the command's result.
    pub fn run_tool(&self, request: &ToolRequest) -> Result<ToolResponse, ToolFailure> {
        let checked = request.check(&self.limits)?;
        let timeout = checked.timeout;
        let created = self.create(&CreateParams {
            image: checked.image,
            cpus: None,
            memory_mib: None,
            env: BTreeMap::new(),
            allow_hosts: checked.allow_hosts,
            timeout_seconds: Some(timeout.as_secs() + ONE_SHOT_GRACE_S),
            labels: BTreeMap::new(),
            cold_boot: false,
        })?;
        let id = created.sandbox_id;
        let ran = self.prepare_and_run(&id, &checked.files, checked.argv, timeout);
        let output = match ran {
            Ok(output) => output,
            Err(failure) => {
                let _ = self.sandboxes.kill(&id);
                return Err(failure);
            }
        };
        let retention = request.state.retention;
        let kept = match retention {
            Retention::Destroy => self.sandboxes.kill(&id),
            Retention::Stop => self
                .sandboxes
                .vm(&id)
                .and_then(|vm| Ok(vm.stop().map(|_| ())?)),
            Retention::Cold => self.sandboxes.pause(&id, true).map(|_| ()),
        };
        let cleanup = kept.err().map(|e: ApiError| {
            ToolFailure::new(
                FailureClass::Cleanup,
                codes::MCP006,
                format!("the command ran, but its sandbox {id} was not left as asked: {e}"),
            )
        });
        let timed_out = output.timed_out.then(|| {
            ToolFailure::new(
                FailureClass::Timeout,
                codes::MCP005,
                format!(
                    "the command ran past its {} s and was killed with everything it started",
                    timeout.as_secs()
                ),
            )
        });
        let error = timed_out.or(cleanup);
        Ok(ToolResponse {
            ok: true,
            sandbox_id: Some(id),
            exit_code: Some(output.exit_code),
            stdout: Some(output.stdout),
            stderr: Some(output.stderr),
            truncated: output.truncated,
            timed_out: output.timed_out,
            audit_id: Some(output.audit_id),
            retention: Some(retention),
            error,
        })
    }

    /// Writes a request's files into `id` (their directories made), then runs `argv` in
    /// [`contract::WORK_DIR`].
    fn prepare_and_run(
        &self,
        id: &str,
        files: &[(String, &ToolFile)],
        argv: Vec<String>,
        timeout: Duration,
    ) -> Result<ExecOutput, ToolFailure> {
        let vm = self.sandboxes.vm(id)?;
        make_dir(&vm, contract::WORK_DIR)?;
        for (path, file) in files {
            if let Some((parent, _)) = path.rsplit_once('/') {
                make_dir(&vm, parent)?;
            }
            self.write_file(id, path, file.content.as_bytes(), Some(0o644))?;
        }
        self.exec(
            id,
            argv,
            Some(contract::WORK_DIR.into()),
            &BTreeMap::new(),
            timeout,
        )
    }

    /// Reads the file `path` of `id`, at most the server's file size.
    pub fn read_file(
        &self,
        id: &str,
        path: &str,
        encoding: Encoding,
    ) -> Result<FileContent, ToolFailure> {
        self.ours(id)?;
        let vm = self.sandboxes.vm(id)?;
        let entry = files::stat(&vm, path)?;
        if entry.kind != "file" {
            return Err(ToolFailure::invalid(format!(
                "{path} is a {}, not a file",
                entry.kind
            )));
        }
        if entry.size > self.limits.max_file_bytes as u64 {
            return Err(ToolFailure::invalid(format!(
                "{path} holds {} bytes, over this server's {}: read part of it with sandbox_exec",
                entry.size, self.limits.max_file_bytes
            )));
        }
        let mut read = Captured::new(self.limits.max_file_bytes);
        let mut client = vm.connect(Arc::default())?;
        client
            .fs_read(path, false, &mut read, FILE_TIMEOUT)
            .map_err(mvm_runner::named_vm::NamedVmError::from)?;
        if read.truncated() {
            return Err(ToolFailure::invalid(format!(
                "{path} grew past this server's {} bytes while it was read",
                self.limits.max_file_bytes
            )));
        }
        let bytes = read.stdout.kept;
        let size = bytes.len() as u64;
        let content = match encoding {
            Encoding::Base64 => base64::engine::general_purpose::STANDARD.encode(&bytes),
            Encoding::Text => String::from_utf8(bytes).map_err(|_| {
                ToolFailure::invalid(format!(
                    "{path} is not UTF-8 text: read it with encoding base64"
                ))
            })?,
        };
        Ok(FileContent {
            path: path.into(),
            encoding,
            content,
            size,
        })
    }

    /// Writes `bytes` to `path` in `id` with `mode` (0o644 unless given).
    pub fn write_file(
        &self,
        id: &str,
        path: &str,
        bytes: &[u8],
        mode: Option<u32>,
    ) -> Result<Written, ToolFailure> {
        self.ours(id)?;
        if bytes.len() > self.limits.max_file_bytes {
            return Err(ToolFailure::invalid(format!(
                "{} bytes: at most {} through this server",
                bytes.len(),
                self.limits.max_file_bytes
            )));
        }
        let mode = mode.unwrap_or(0o644);
        if mode > 0o777 {
            return Err(ToolFailure::invalid(format!(
                "mode {mode:o} is more than permission bits"
            )));
        }
        let vm = self.sandboxes.vm(id)?;
        let mut spool = Spool::new(self.home.root())?;
        spool.push(bytes)?;
        Ok(spool.write_to(&vm, path, mode, None)?)
    }

    /// Decodes a file's content as `encoding` says.
    pub fn decode(content: &str, encoding: Encoding) -> Result<Vec<u8>, ToolFailure> {
        match encoding {
            Encoding::Text => Ok(content.as_bytes().to_vec()),
            Encoding::Base64 => base64::engine::general_purpose::STANDARD
                .decode(content)
                .map_err(|e| ToolFailure::invalid(format!("content is not base64: {e}"))),
        }
    }

    /// Lists `path` of `id` to `depth` levels.
    pub fn list_files(&self, id: &str, path: &str, depth: u32) -> Result<EntryList, ToolFailure> {
        self.ours(id)?;
        if !(1..=4).contains(&depth) {
            return Err(ToolFailure::invalid(format!("depth {depth} is not 1-4")));
        }
        let vm = self.sandboxes.vm(id)?;
        Ok(files::list(&vm, path, depth)?)
    }

    /// A call's timeout within the server's ceiling.
    pub fn timeout(&self, asked: Option<u64>) -> Result<Duration, ToolFailure> {
        call_timeout(asked, self.limits.max_timeout).map_err(ToolFailure::invalid)
    }

    /// The sandbox `id`, when it exists and this server made it (MCP004 otherwise: a client
    /// learns nothing of the host's other VMs).
    fn ours(&self, id: &str) -> Result<Sandbox, ToolFailure> {
        let not_ours = || {
            ToolFailure::new(
                FailureClass::Validation,
                codes::MCP004,
                format!("no sandbox of this server has the id {id:?}"),
            )
        };
        let sandbox = self.sandboxes.get(id).map_err(|_| not_ours())?;
        match sandbox.metadata.get(MCP_LABEL).map(String::as_str) {
            Some("true") => Ok(sandbox),
            _ => Err(not_ours()),
        }
    }
}

/// A sandbox as a client sees it: without the server's own label.
fn info(sandbox: Sandbox) -> SandboxInfo {
    let mut labels = sandbox.metadata;
    labels.remove(MCP_LABEL);
    SandboxInfo {
        sandbox_id: sandbox.id,
        state: sandbox.state,
        plan_digest: sandbox.plan_digest,
        started_at: sandbox.started_at,
        labels,
        expires_at: sandbox.expires_at,
        reason: sandbox.reason,
        boot_snapshot: sandbox.boot_snapshot,
    }
}

/// Makes `dir` (an absolute path under `/tmp`) and its parents in `vm`, where missing.
fn make_dir(vm: &NamedVm, dir: &str) -> Result<(), ToolFailure> {
    let mut at = String::new();
    for component in dir.trim_start_matches('/').split('/') {
        at.push('/');
        at.push_str(component);
        if at == "/tmp" {
            continue;
        }
        match files::ask(vm, Request::FsStat { path: at.clone() }) {
            Ok(Response::FsStat(info)) if info.kind == FileKind::Directory => continue,
            _ => {}
        }
        files::ask(
            vm,
            Request::FsMkdir {
                path: at.clone(),
                mode: 0o755,
            },
        )?;
    }
    Ok(())
}

fn check_entries(what: &str, entries: &BTreeMap<String, String>) -> Result<(), ToolFailure> {
    mvm_api::sandboxes::entries_within(what, entries, MAX_ENTRIES, MAX_ENTRY_BYTES)
        .map_err(ToolFailure::invalid)
}

fn host_failure(message: String) -> ToolFailure {
    ToolFailure::new(FailureClass::Transport, codes::MCP007, message)
}

/// A command's output as it passes: the first `cap` bytes of each stream kept, the rest
/// counted.
struct Captured {
    stdout: Stream,
    stderr: Stream,
}

#[derive(Default)]
struct Stream {
    kept: Vec<u8>,
    seen: u64,
    cap: usize,
}

impl Stream {
    fn take(&mut self, bytes: &[u8]) {
        self.seen += bytes.len() as u64;
        let room = self.cap.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
}

impl Captured {
    fn new(cap: usize) -> Self {
        let stream = || Stream {
            cap,
            ..Stream::default()
        };
        Self {
            stdout: stream(),
            stderr: stream(),
        }
    }

    fn truncated(&self) -> bool {
        [&self.stdout, &self.stderr]
            .iter()
            .any(|s| s.seen > s.kept.len() as u64)
    }
}

impl OutputSink for Captured {
    fn stdout(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stdout.take(bytes);
        Ok(())
    }

    fn stderr(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stderr.take(bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::{MAX_ARGS, MAX_ARGV_BYTES};

    #[test]
    fn output_past_the_cap_is_counted_not_kept() {
        let mut captured = Captured::new(4);
        captured.stdout(b"abc").unwrap();
        captured.stdout(b"def").unwrap();
        captured.stderr(b"ok").unwrap();
        assert_eq!(captured.stdout.kept, b"abcd");
        assert_eq!(captured.stdout.seen, 6);
        assert!(captured.truncated());
        let mut fits = Captured::new(4);
        fits.stdout(b"abcd").unwrap();
        assert!(!fits.truncated());
    }

    #[test]
    fn entries_and_commands_are_bounded() {
        let many: BTreeMap<String, String> = (0..=MAX_ENTRIES)
            .map(|i| (format!("K{i}"), "v".into()))
            .collect();
        assert!(check_entries("env", &many).is_err());
        let bad = BTreeMap::from([("A=B".to_string(), "v".to_string())]);
        assert!(check_entries("env", &bad).is_err());
        assert!(check_argv(&[]).is_err());
        assert!(check_argv(&vec!["x".to_string(); MAX_ARGS + 1]).is_err());
        assert!(check_argv(&["x".repeat(MAX_ARGV_BYTES + 1)]).is_err());
        assert!(check_argv(&["echo".into(), "hi".into()]).is_ok());
    }
}
