//! `mvm-runner`: boots one signed plan in a microVM and runs one command in it.
//!
//! Thin by design: the order of the launch and every rule live in the library
//! ([`mvm_runner::launch`]); this binary reads its arguments, picks the backend for this host,
//! and turns the result into the command's output, a report, and an exit status.

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use mvm_ir::home::MvmHome;
use mvm_runner::client::OutputSink;
use mvm_runner::host::BackendChoice;
use mvm_runner::launch::{self, exit, Failure, Finished, Launch, LaunchError};
use serde_json::{json, Value};

/// Boot a signed launch plan in a microVM, run one command in it, and power it off.
///
/// The plan (and the kernel and initramfs it pins) is verified before anything starts. The
/// command's output is streamed; the exit status is the command's own, or: 120 plan refused,
/// 121 integrity failure (dm-verity), 122 the VM failed to boot or died, 124 command timed out,
/// 125 runner error, 126 command not executable, 127 command not found.
#[derive(Debug, Parser)]
#[command(name = "mvm-runner", version)]
struct Args {
    /// The signed plan (`plan.dsse.json` in a bundle built by `mvm build`).
    #[arg(long, value_name = "FILE")]
    plan: PathBuf,
    /// auto: the best this host can do; qemu: a supervised QEMU microvm; kvm: mvm's own VMM.
    #[arg(long, default_value = "auto", value_name = "auto|qemu|kvm")]
    backend: BackendChoice,
    /// Kill the command (and everything it started) after this long, e.g. `30s`, `5m`.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    timeout: Option<Duration>,
    /// Give up when the guest is not ready after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s", value_name = "DURATION")]
    boot_timeout: Duration,
    /// Print one JSON report on stdout (with the command's output in it) instead of streaming.
    #[arg(long)]
    json: bool,
    /// The command; the plan's entrypoint when absent.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

fn main() -> ExitCode {
    let started = Instant::now();
    // Everything the runner creates (the VM's state directory, its sockets, its copies of the
    // kernel and initramfs) is for the runner alone.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(exit::RUNNER);
        }
    };
    let json = args.json;
    let code = match run(args, started) {
        Ok((finished, output)) => report_finished(&finished, output, json),
        Err(failure) => report_failure(&failure, json),
    };
    ExitCode::from(code)
}

fn run(args: Args, started: Instant) -> Result<(Finished, Option<Captured>), Box<Failure>> {
    let home = MvmHome::from_env().map_err(LaunchError::Audit)?;
    let request = Launch {
        envelope: args.plan,
        home,
        backend: args.backend,
        argv: args.command,
        timeout: args.timeout,
        boot_timeout: args.boot_timeout,
        started,
    };
    if args.json {
        let mut captured = Captured::default();
        let finished = launch::launch(&request, &mut captured)?;
        Ok((finished, Some(captured)))
    } else {
        let finished = launch::launch(&request, &mut Streamed)?;
        Ok((finished, None))
    }
}

fn report_finished(finished: &Finished, output: Option<Captured>, json: bool) -> u8 {
    let code = finished.exit_status();
    if let Some(output) = output.filter(|_| json) {
        let timings = finished.hello.timings;
        let report = json!({
            "vm": finished.vm,
            "plan_digest": finished.plan_digest,
            "accel": finished.accel.to_string(),
            "status": finished.status,
            "exit_status": code,
            "stdout": text_or_base64(&output.stdout),
            "stderr": text_or_base64(&output.stderr),
            "stdout_bytes": finished.stdout_bytes,
            "stderr_bytes": finished.stderr_bytes,
            "output_truncated": output.truncated,
            "timings_ms": {
                "ready": finished.ready_ms,
                "command": finished.command_ms,
                "guest": timings,
            },
        });
        println!("{report}");
    }
    code
}

fn report_failure(failure: &Failure, json: bool) -> u8 {
    let error = &failure.error;
    let code = error.exit_status();
    if json {
        let report = json!({"error": {
            "code": error.code(),
            "message": error.to_string(),
            "exit_status": code,
            "console_tail": failure.console_tail.as_deref().map(last_lines),
            "serial_log": failure.serial_log,
        }});
        println!("{report}");
        return code;
    }
    let mut stderr = io::stderr().lock();
    let _ = writeln!(stderr, "mvm-runner: error {}: {error}", error.code());
    if let Some(tail) = failure.console_tail.as_deref().filter(|t| !t.is_empty()) {
        let _ = writeln!(
            stderr,
            "--- guest console (last lines) ---\n{}",
            last_lines(tail)
        );
    }
    if let Some(log) = &failure.serial_log {
        let _ = writeln!(stderr, "console log kept at {}", log.display());
    }
    code
}

/// The last 20 lines of a console tail.
fn last_lines(tail: &str) -> String {
    let lines: Vec<&str> = tail.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Output as a JSON string when it is UTF-8, else as `{"base64": …}`.
fn text_or_base64(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(text) => Value::String(text.into()),
        Err(_) => {
            use base64::Engine;
            json!({"base64": base64::engine::general_purpose::STANDARD.encode(bytes)})
        }
    }
}

/// The command's output, straight to the runner's own stdout and stderr.
struct Streamed;

impl OutputSink for Streamed {
    fn stdout(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut out = io::stdout().lock();
        out.write_all(bytes)?;
        out.flush()
    }

    fn stderr(&mut self, bytes: &[u8]) -> io::Result<()> {
        io::stderr().lock().write_all(bytes)
    }
}

/// The most output of each kind kept for a JSON report.
const CAPTURE_LIMIT: usize = 16 << 20;

/// The command's output, kept for the JSON report (up to [`CAPTURE_LIMIT`] of each).
#[derive(Default)]
struct Captured {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    truncated: bool,
}

impl Captured {
    fn keep(into: &mut Vec<u8>, bytes: &[u8], truncated: &mut bool) {
        let room = CAPTURE_LIMIT.saturating_sub(into.len());
        into.extend_from_slice(&bytes[..bytes.len().min(room)]);
        *truncated |= bytes.len() > room;
    }
}

impl OutputSink for Captured {
    fn stdout(&mut self, bytes: &[u8]) -> io::Result<()> {
        Self::keep(&mut self.stdout, bytes, &mut self.truncated);
        Ok(())
    }

    fn stderr(&mut self, bytes: &[u8]) -> io::Result<()> {
        Self::keep(&mut self.stderr, bytes, &mut self.truncated);
        Ok(())
    }
}
