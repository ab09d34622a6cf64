//! `mvm-runner`: boots one signed plan in a microVM and runs one command in it.
//!
//! Thin by design: the order of the launch and every rule live in the library
//! ([`mvm_runner::launch`]); this binary reads its arguments, turns signals into a clean stop,
//! and turns the result into the command's output, a report, a receipt and an exit status.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use mvm_ir::home::MvmHome;
use mvm_ir::terminal::{printable, Newlines};
use mvm_ir::Coded;
use mvm_runner::backend::kvm::jailed::{self, Jail};
use mvm_runner::backend::select::BackendChoice;
use mvm_runner::client::{OutputSink, StdStreams};
use mvm_runner::codes;
use mvm_runner::disk::{LaunchDisk, VolumeSpec};
use mvm_runner::egress::judge::Denial;
use mvm_runner::forward::PortSpec;
use mvm_runner::launch::{self, exit, Failure, Finished, Launch, LaunchError};
use mvm_runner::secrets::SecretRef;
use mvm_runner::state;
use serde_json::{json, Value};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

/// Boot a signed launch plan in a microVM, run one command in it, and power it off.
///
/// The plan (and the kernel and initramfs it pins) is verified before anything starts. The
/// command's output is streamed; the exit status is the command's own, or: 120 plan refused,
/// 121 integrity failure (dm-verity), 122 the VM failed to boot or died, 124 command timed out,
/// 125 runner error, 126 command not executable, 127 command not found, 130 interrupted.
#[derive(Debug, Parser)]
#[command(name = "mvm-runner", version)]
struct Args {
    /// The signed plan (`plan.dsse.json` in a bundle built by `mvm build`).
    #[arg(long, value_name = "FILE", required_unless_present = "wake")]
    plan: Option<PathBuf>,
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
    /// Write a signed run receipt here once the command has ended (see `mvm receipt verify`).
    #[arg(long, value_name = "FILE")]
    receipt: Option<PathBuf>,
    /// Keep the VM up as NAME instead of running one command: serve its control socket
    /// (`$MVM_HOME/vms/NAME/control.sock`) until told to stop. Prints one JSON line when it
    /// is ready, then writes to `vms/NAME/runner.log`. This is what `mvm up` starts.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["command", "json", "timeout", "receipt"])]
    name: Option<String>,
    /// Wake the cold VM NAME (saved by `mvm pause --cold`) and keep it up as --name does: its
    /// saved state and plan are verified again first. This is what `mvm resume` starts.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["plan", "name", "command", "json", "timeout", "receipt"])]
    wake: Option<String>,
    /// Run the VMM jailed, as Firecracker's jailer runs Firecracker: a child process in new
    /// mount, PID, IPC, network and UTS namespaces, its root a directory holding only the
    /// artifacts and `/dev/kvm`, as an unprivileged uid/gid with resource limits. Needs
    /// `--backend kvm` and root.
    #[arg(long)]
    jail: bool,
    /// The jailed VMM's uid (not 0).
    #[arg(long, requires = "jail", default_value_t = jailed::DEFAULT_ID, value_name = "UID")]
    jail_uid: u32,
    /// The jailed VMM's gid (not 0).
    #[arg(long, requires = "jail", default_value_t = jailed::DEFAULT_ID, value_name = "GID")]
    jail_gid: u32,
    /// Back guest RAM with 2 MiB huge pages from the host's pool (`/proc/sys/vm/nr_hugepages`,
    /// reserved as the VM starts: a pool too small fails the boot, VMM002). Needs
    /// `--backend kvm`; the memory size must be a whole number of 2 MiB.
    #[arg(long)]
    huge_pages: bool,
    /// Take HOST (any port) or HOST:PORT away from the plan's egress grants for this launch
    /// (repeatable; `*.SUFFIX` and IP literals too): a launch may narrow what its signed plan
    /// grants, never widen it.
    #[arg(long, value_name = "HOST[:PORT]", value_parser = parse_denial)]
    deny_host: Vec<Denial>,
    /// Print each egress decision to standard error as it is made.
    #[arg(long)]
    net_log: bool,
    /// Give the command (every command of a named VM) the secret NAME of this host's store as
    /// the variable ENV (NAME upper-cased, `-` and `.` as `_`, when absent); repeatable. A
    /// secret bound to hosts is a placeholder in the guest; an unbound one its value, where
    /// the plan's profile allows (RUN061). Its value is scrubbed from the output.
    #[arg(long, value_name = "NAME[:ENV]", value_parser = SecretRef::parse)]
    secret: Vec<SecretRef>,
    /// Give the secret NAME as the file /run/secrets/NAME in the guest (0400, the workload
    /// user's, in guest memory) rather than a variable; repeatable. As for --secret: a
    /// placeholder when bound, the value (any bytes) when unbound and the profile allows.
    #[arg(long, value_name = "NAME", value_parser = mvm_runner::secrets::parse_file_secret)]
    secret_file: Vec<String>,
    /// With --name: forward [ADDRESS:]HOST_PORT to GUEST_PORT on the guest's loopback
    /// (repeatable; ADDRESS is 127.0.0.1 unless given, and must be loopback unless `[ports]
    /// listen` in config.toml lists it; HOST_PORT 0 picks a free one).
    #[arg(long, requires = "name", value_name = "[ADDRESS:]HOST_PORT:GUEST_PORT", value_parser = PortSpec::parse)]
    port: Vec<PortSpec>,
    /// Attach FILE, a host file holding an ext4 filesystem, as a disk the guest mounts at
    /// PATH (`nosuid,nodev`; read-only with `:ro`); repeatable, up to 8. The file is locked to
    /// this VM while it runs. It is plain, not encrypted: the guest writes it, the host never
    /// mounts it.
    #[arg(long, value_name = "FILE:PATH[:ro]", value_parser = LaunchDisk::parse, conflicts_with = "wake")]
    disk: Vec<LaunchDisk>,
    /// Attach the encrypted volume NAME of this host's store (`mvm volume create`) at PATH
    /// (read-only with `:ro`); repeatable, up to 8 disks and volumes together. Its key is
    /// unsealed here and handed to the agent alone, which opens it with dm-crypt. Locked to
    /// this VM while it runs.
    #[arg(long, value_name = "NAME:PATH[:ro]", value_parser = VolumeSpec::parse, conflicts_with = "wake")]
    volume: Vec<VolumeSpec>,
    /// Boot the kernel even when this plan has a boot snapshot here, and make none: by
    /// default a plan's first launch boots it, saves it once its agent is ready (the boot
    /// snapshot, `$MVM_HOME/boot-snapshots`) and later launches restore that instead of
    /// booting (QEMU backend; not with --disk or a single-use plan).
    #[arg(long, conflicts_with = "prepare_snapshot")]
    cold_boot: bool,
    /// Make sure the plan has a boot snapshot here and check it, running no command: restore
    /// it (making it first when there is none, or the one there is does not verify), see the
    /// restored agent answer and take its renewal, power it off. Prints one JSON object: the
    /// snapshot's key, the plan's digest, the VM that checked it, its ready time. This is what
    /// `mvm snapshot make` starts.
    #[arg(long, conflicts_with_all = ["name", "wake", "command", "json", "timeout", "receipt", "disk", "jail"])]
    prepare_snapshot: bool,
    /// The command; the plan's entrypoint when absent.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

fn parse_denial(text: &str) -> Result<Denial, String> {
    Denial::parse(text).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    // The jailed VMM child (`--jail`): before anything else, while this process has one thread.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|arg| arg == jailed::CHILD_MODE)
    {
        return ExitCode::from(u8::try_from(jailed::child::child_main()).unwrap_or(exit::RUNNER));
    }
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
    let jail = match args
        .jail
        .then(|| {
            let euid = rustix::process::geteuid().as_raw();
            Jail::check(args.jail_uid, args.jail_gid, args.backend, euid)
        })
        .transpose()
    {
        Ok(jail) => jail,
        Err(e) => {
            eprintln!("mvm-runner: error {}: {e}", e.code());
            return ExitCode::from(exit::RUNNER);
        }
    };
    if args.huge_pages && args.backend != BackendChoice::Kvm {
        eprintln!(
            "mvm-runner: error {}: --huge-pages backs the own VMM's guest RAM: it needs --backend kvm (QEMU is not given huge pages)",
            codes::RUN047
        );
        return ExitCode::from(exit::RUNNER);
    }
    let env = match launch_env() {
        Ok(env) => env,
        Err(why) => {
            eprintln!("mvm-runner: error {}: {why}", codes::RUN060);
            return ExitCode::from(exit::RUNNER);
        }
    };
    // A signal stops the launch through its normal teardown (the VM killed, `vm.exited`
    // recorded, the state directory removed) instead of ending the runner on the spot.
    let interrupt = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM, SIGHUP] {
        if let Err(e) = signal_hook::flag::register(signal, Arc::clone(&interrupt)) {
            eprintln!(
                "mvm-runner: error {}: handling signal {signal}: {e}",
                codes::RUN026
            );
            return ExitCode::from(exit::RUNNER);
        }
    }
    if let Some(name) = args.name.clone() {
        return ExitCode::from(serve(args, &name, false, started, interrupt, jail, env));
    }
    if let Some(name) = args.wake.clone() {
        return ExitCode::from(serve(args, &name, true, started, interrupt, jail, env));
    }
    if args.prepare_snapshot {
        return ExitCode::from(prepare_snapshot(args, started, interrupt, env));
    }
    let json = args.json;
    let receipt = args.receipt.clone();
    let code = match run(args, started, interrupt, jail, env) {
        Ok((finished, output)) => match receipt.map(|path| write_receipt(&finished, &path)) {
            Some(Err(e)) => {
                eprintln!("mvm-runner: error {}: writing the receipt: {e}", e.code());
                exit::RUNNER
            }
            _ => report_finished(&finished, output, json),
        },
        Err(failure) => report_failure(&failure, json),
    };
    ExitCode::from(code)
}

/// The variable mvm hands a launch's environment in (`mvm run|up --env`, `--allow-env`): a
/// JSON object of names and values. Not arguments, which any user of the host can read in
/// `/proc/PID/cmdline`; a process's environment only its owner can.
const LAUNCH_ENV: &str = "MVM_LAUNCH_ENV";

/// The launch's environment from [`LAUNCH_ENV`], taken out of this process's own so that
/// nothing the runner starts inherits it. Called while the runner has one thread.
fn launch_env() -> Result<BTreeMap<String, String>, String> {
    let Some(text) = std::env::var_os(LAUNCH_ENV) else {
        return Ok(BTreeMap::new());
    };
    // The runner has started no thread yet: nothing reads the environment meanwhile.
    std::env::remove_var(LAUNCH_ENV);
    let text = text
        .into_string()
        .map_err(|_| format!("{LAUNCH_ENV} is not UTF-8"))?;
    serde_json::from_str(&text)
        .map_err(|e| format!("{LAUNCH_ENV} is not a JSON object of strings: {e}"))
}

/// The launch `args` ask for; its volumes' keys unsealed from `home`'s store.
fn launch_request(
    args: Args,
    home: MvmHome,
    started: Instant,
    interrupt: Arc<AtomicBool>,
    jail: Option<Jail>,
    env: BTreeMap<String, String>,
) -> Result<Launch, Box<Failure>> {
    let mut disks = args.disk;
    for volume in &args.volume {
        disks.push(volume.resolve(&home).map_err(LaunchError::from)?);
    }
    Ok(Launch {
        // Only a wake has none: its plan is the one its saved state names.
        envelope: args.plan.unwrap_or_default(),
        home,
        backend: args.backend,
        argv: args.command,
        timeout: args.timeout,
        boot_timeout: args.boot_timeout,
        started,
        interrupt,
        jail,
        huge_pages: args.huge_pages,
        deny: args.deny_host,
        net_log: args.net_log,
        ports: args.port,
        env,
        secrets: args.secret,
        secret_files: args.secret_file,
        disks,
        placeholders: BTreeMap::new(),
        cold_boot: args.cold_boot,
    })
}

fn run(
    args: Args,
    started: Instant,
    interrupt: Arc<AtomicBool>,
    jail: Option<Jail>,
    env: BTreeMap<String, String>,
) -> Result<(Finished, Option<Captured>), Box<Failure>> {
    let home = MvmHome::from_env().map_err(LaunchError::Audit)?;
    let json = args.json;
    let request = launch_request(args, home, started, interrupt, jail, env)?;
    if json {
        let mut captured = Captured::default();
        let finished = launch::launch(&request, &mut captured)?;
        Ok((finished, Some(captured)))
    } else {
        let finished = launch::launch(&request, &mut StdStreams)?;
        Ok((finished, None))
    }
}

/// `--prepare-snapshot`: the plan's boot snapshot made if need be and checked; 0 and its
/// JSON once it restored and answered.
fn prepare_snapshot(
    args: Args,
    started: Instant,
    interrupt: Arc<AtomicBool>,
    env: BTreeMap<String, String>,
) -> u8 {
    let home = match MvmHome::from_env() {
        Ok(home) => home,
        Err(e) => return report_failure(&Box::<Failure>::from(LaunchError::Audit(e)), true),
    };
    let request = match launch_request(args, home, started, interrupt, None, env) {
        Ok(request) => request,
        Err(failure) => return report_failure(&failure, true),
    };
    match launch::prepare(&request) {
        Ok(prepared) => {
            let report = json!({
                "key": prepared.key,
                "plan_digest": prepared.plan_digest,
                "vm": prepared.vm,
                "ready_ms": prepared.ready_ms,
            });
            println!("{report}");
            0
        }
        Err(failure) => report_failure(&failure, true),
    }
}

/// `--name` (or `--wake`): boots (wakes) and keeps the VM up; 0 once it stopped or was saved
/// cold on request.
fn serve(
    args: Args,
    name: &str,
    wake: bool,
    started: Instant,
    interrupt: Arc<AtomicBool>,
    jail: Option<Jail>,
    env: BTreeMap<String, String>,
) -> u8 {
    if !state::valid_name(name) {
        eprintln!(
            "mvm-runner: error {}: {name:?} cannot name a VM: use 1-63 of a-z 0-9 _ . -, starting with a letter or digit",
            codes::RUN035
        );
        return exit::RUNNER;
    }
    let home = match MvmHome::from_env() {
        Ok(home) => home,
        Err(e) => {
            eprintln!("mvm-runner: error {}: {e}", e.code());
            return exit::RUNNER;
        }
    };
    let log = home.root().join("vms").join(name).join(state::RUNNER_LOG);
    let request = match launch_request(args, home, started, interrupt, jail, env) {
        Ok(request) => request,
        Err(failure) => return report_failure(&failure, false),
    };
    let mut on_ready = |state: &state::VmState| {
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "{}", json!({"ready": state}));
        let _ = out.flush();
        drop(out);
        // Nobody reads the terminal from here on: what the runner still has to say goes to
        // the VM's runner log.
        if let Ok(file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log)
        {
            let _ = rustix::stdio::dup2_stdout(&file);
            let _ = rustix::stdio::dup2_stderr(&file);
        }
    };
    let served = match wake {
        true => launch::wake_named(&request, name, &mut on_ready),
        false => launch::serve_named(&request, name, &mut on_ready),
    };
    match served {
        Ok(_) => 0,
        Err(failure) => report_failure(&failure, false),
    }
}

/// Signs the run's receipt with the host key, on the host's receipt chain, and writes it.
fn write_receipt(finished: &Finished, path: &std::path::Path) -> Result<(), mvm_ir::Error> {
    let home = MvmHome::from_env()?;
    let signer = mvm_ir::keys::KeyStore::new(home.clone()).host_signer()?;
    mvm_ir::receipt::issue(&home, finished.receipt(), &signer, |bytes| {
        mvm_ir::fsutil::atomic_write(path, bytes, 0o644)
    })
    .map(drop)
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
            "stdout": text_or_base64(&output.stdout.bytes),
            "stderr": text_or_base64(&output.stderr.bytes),
            "stdout_bytes": finished.stdout.bytes,
            "stderr_bytes": finished.stderr.bytes,
            "stdout_sha256": finished.stdout.sha256,
            "stderr_sha256": finished.stderr.sha256,
            "stdout_truncated": output.stdout.truncated,
            "stderr_truncated": output.stderr.truncated,
            "egress": finished.egress_counts,
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
    // The message may quote the agent, and the tail is the guest's: shown, not obeyed.
    let shown = |text: &str| printable(text, Newlines::Keep).into_owned();
    let mut stderr = io::stderr().lock();
    let message = shown(&error.to_string());
    let _ = writeln!(stderr, "mvm-runner: error {}: {message}", error.code());
    if let Some(tail) = failure.console_tail.as_deref().filter(|t| !t.is_empty()) {
        let _ = writeln!(
            stderr,
            "--- guest console (last lines) ---\n{}",
            shown(&last_lines(tail))
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

/// The most output of each kind kept for a JSON report.
const CAPTURE_LIMIT: usize = 16 << 20;

/// One stream of the command's output, kept for the JSON report up to [`CAPTURE_LIMIT`].
#[derive(Default)]
struct Kept {
    bytes: Vec<u8>,
    truncated: bool,
}

impl Kept {
    fn keep(&mut self, bytes: &[u8]) {
        let room = CAPTURE_LIMIT.saturating_sub(self.bytes.len());
        if bytes.len() <= room {
            self.bytes.extend_from_slice(bytes);
            return;
        }
        if self.truncated {
            return;
        }
        self.bytes.extend_from_slice(&bytes[..room]);
        self.truncated = true;
        // A cut through the last character would turn UTF-8 text into base64: cut before it.
        if let Err(e) = std::str::from_utf8(&self.bytes) {
            if e.error_len().is_none() {
                self.bytes.truncate(e.valid_up_to());
            }
        }
    }
}

/// The command's output, kept for the JSON report.
#[derive(Default)]
struct Captured {
    stdout: Kept,
    stderr: Kept,
}

impl OutputSink for Captured {
    fn stdout(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stdout.keep(bytes);
        Ok(())
    }

    fn stderr(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stderr.keep(bytes);
        Ok(())
    }
}
