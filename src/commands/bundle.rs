//! The plan a command boots: one given with `--plan`, or the cached bundle of an image
//! (`$MVM_HOME/runs`), built by `mvm build` when none with a valid plan is there; and where
//! mvm's companion binaries (`mvm-runner`, `mvm-agent`) are.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use mvm_builder::image_cache::ImageCache;
use mvm_builder::kernel::KernelStore;
use mvm_ir::admission::verify_signed_plan;
use mvm_ir::digest::{sha256_hex, sha256_reader};
use mvm_ir::plan::{Profile, MAX_ENVELOPE_BYTES};
use serde_json::json;

use super::{coded_as, coded_io, Host};

/// A cached bundle is rebuilt when its plan expires sooner than this.
const MIN_VALIDITY_LEFT: time::Duration = time::Duration::minutes(10);

/// How an image is built into a bundle (`mvm run IMAGE`, `mvm up IMAGE`).
#[derive(Debug, Args)]
pub struct ImageOptions {
    /// Virtual CPUs (images only: a plan's resources are signed into it).
    #[arg(long, conflicts_with = "plan")]
    cpus: Option<u32>,
    /// Memory in MiB (images only: a plan's resources are signed into it).
    #[arg(long, conflicts_with = "plan", value_name = "MIB")]
    memory: Option<u32>,
    /// The guest agent for building an image (default: $MVM_AGENT, or mvm-agent next to mvm).
    #[arg(long, conflicts_with = "plan")]
    agent: Option<PathBuf>,
    /// The program that replaces the image's Entrypoint (its Cmd is then dropped too, as
    /// `docker run --entrypoint` does; `""` clears the Entrypoint). Images only.
    #[arg(long, conflicts_with = "plan", value_name = "PROGRAM")]
    entrypoint: Option<String>,
    /// Let the VM reach HOST on PORT (443 when absent) through the host's egress proxy;
    /// repeatable. HOST is a name, `*.SUFFIX` or an IP literal (IPv6 in brackets). Images
    /// only: the grants are signed into the image's plan (a signed --plan is never widened;
    /// narrow it with --deny-host).
    #[arg(long, conflicts_with = "plan", value_name = "HOST[:PORT]")]
    allow_host: Vec<String>,
    /// Take HOST (every port) or HOST:PORT away from the plan's egress grants for this run;
    /// repeatable.
    #[arg(long, value_name = "HOST[:PORT]")]
    deny_host: Vec<String>,
    /// Print each egress decision (allowed, denied, closed with its byte counts) to standard
    /// error as it is made.
    #[arg(long)]
    net_log: bool,
    /// The policy profile of the image's plan: restrictive, standard (the default), dev or
    /// permissive (docs/policy.md). Images only: a plan's profile is signed into it.
    #[arg(long, conflicts_with = "plan", value_name = "PROFILE", value_parser = super::build::parse_profile)]
    profile: Option<Profile>,
    /// Acknowledge that the permissive profile drops the guest's syscall filter.
    #[arg(long, conflicts_with = "plan")]
    ack_permissive: bool,
    /// Set NAME=VALUE in the environment of the command (of every command of a VM `mvm up`
    /// starts); repeatable. Refused (RUN060) for a denied name (`LD_PRELOAD`, `BASH_ENV`, …)
    /// or when the plan's profile or the host's policy lets no client set variables.
    #[arg(long = "env", value_name = "NAME=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Pass this host's variable NAME, exactly that name, to the command as --env would;
    /// repeatable. Nothing of the host's environment reaches a guest otherwise.
    #[arg(long, value_name = "NAME")]
    allow_env: Vec<String>,
    /// Give the command the secret NAME of this host's store (`mvm secret put`) as the variable
    /// ENV (NAME upper-cased when absent); repeatable. A secret bound to hosts (`mvm secret
    /// bind`) is only a placeholder in the guest, swapped for the value in requests to those
    /// hosts; an unbound one is its value. Values are scrubbed from the output (docs/secrets.md).
    #[arg(long, value_name = "NAME[:ENV]", value_parser = parse_secret)]
    secret: Vec<String>,
    /// Give the command the secret NAME as the file /run/secrets/NAME (0400, the workload
    /// user's, in guest memory) instead of a variable, for tools that read a credential from a
    /// file; repeatable. Bound: the placeholder; unbound: the value, any bytes.
    #[arg(long, value_name = "NAME", value_parser = mvm_runner::secrets::parse_file_secret)]
    secret_file: Vec<String>,
    /// Attach FILE, a host file holding an ext4 filesystem (`mkfs.ext4 FILE SIZE`), as a disk
    /// the guest mounts at PATH, `nosuid,nodev`, read-only with `:ro`; repeatable, up to 8.
    /// The guest writes it as it likes and the host never mounts it; it is plain, not
    /// encrypted. A disk serves one VM at a time (RUN062 for a second). `mvm dev up` keeps the
    /// builder's Nix store on one.
    #[arg(long, value_name = "FILE:PATH[:ro]", value_parser = mvm_runner::disk::LaunchDisk::parse)]
    disk: Vec<mvm_runner::disk::LaunchDisk>,
    /// Attach the encrypted volume NAME (`mvm volume create`) at PATH, read-only with `:ro`;
    /// repeatable, up to 8 disks and volumes together. Ciphertext on this host's disk, opened
    /// in the guest with dm-crypt under a key only the agent is given; one VM at a time
    /// (RUN062 for a second) (docs/volumes.md).
    #[arg(long, value_name = "NAME:PATH[:ro]", value_parser = mvm_runner::disk::VolumeSpec::parse)]
    volume: Vec<mvm_runner::disk::VolumeSpec>,
    /// Boot the kernel even when the plan has a boot snapshot here, and make none. By default
    /// a plan's first launch boots it and saves it once its agent is ready (the boot
    /// snapshot, signed by this host's key; `mvm snapshot ls`), and later launches restore
    /// that instead of booting — each restored guest's RNG reseeded with fresh host entropy,
    /// its hostname and clock its own, before anything runs (docs/boot-snapshots.md). QEMU
    /// backend; never with --disk or a single-use plan.
    #[arg(long)]
    cold_boot: bool,
}

/// `NAME[:ENV]` of `--secret`, checked here as the runner will.
fn parse_secret(text: &str) -> Result<String, String> {
    mvm_runner::secrets::SecretRef::parse(text).map(|_| text.to_string())
}

/// `NAME=VALUE` of `--env`: a valid name mvm passes to workloads.
fn parse_env(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=VALUE"))?;
    env_name_allowed(name)?;
    Ok((name.to_string(), value.to_string()))
}

/// Refuses a name that is not a variable name or that mvm never passes to a workload.
fn env_name_allowed(name: &str) -> Result<(), String> {
    if !mvm_ir::validate::is_env_name(name) {
        return Err(format!("{name:?} is not a variable name"));
    }
    if mvm_ir::env::is_denied(name) {
        return Err(format!(
            "{name} is never passed to a workload: loader, shell and interpreter variables can take over the programs they reach (docs/ir.md#the-environment-denylist)"
        ));
    }
    Ok(())
}

impl ImageOptions {
    /// The options of a sandbox created through the local API (its request checked already:
    /// a profile it names is one the API takes).
    pub fn for_sandbox(spec: &mvm_api::model::CreateSandbox) -> Self {
        ImageOptions {
            cpus: spec.cpus,
            memory: spec.memory_mib,
            agent: None,
            entrypoint: None,
            allow_host: spec.allow_hosts.clone(),
            deny_host: Vec::new(),
            net_log: false,
            profile: spec.profile.as_deref().and_then(Profile::from_name),
            ack_permissive: false,
            env: Vec::new(),
            allow_env: Vec::new(),
            secret: spec.secrets.clone(),
            secret_file: Vec::new(),
            disk: Vec::new(),
            // Each parsed already by the API (`check_spec`), which refuses the request
            // otherwise.
            volume: spec
                .volumes
                .iter()
                .filter_map(|volume| mvm_runner::disk::VolumeSpec::parse(volume).ok())
                .collect(),
            cold_boot: spec.cold_boot,
        }
    }

    /// Gives the runner the options that apply at launch: the egress narrowing as arguments,
    /// the environment (`--env`, `--allow-env`) in its own environment, which only this user
    /// can read (arguments every user of the host can).
    pub fn configure_runner(&self, runner: &mut Command) -> anyhow::Result<()> {
        runner.args(
            self.deny_host
                .iter()
                .map(|host| format!("--deny-host={host}")),
        );
        if self.net_log {
            runner.arg("--net-log");
        }
        runner.args(
            self.secret
                .iter()
                .map(|secret| format!("--secret={secret}")),
        );
        runner.args(
            self.secret_file
                .iter()
                .map(|name| format!("--secret-file={name}")),
        );
        runner.args(self.disk.iter().map(|disk| format!("--disk={disk}")));
        runner.args(self.volume.iter().map(|volume| {
            let ro = if volume.read_only { ":ro" } else { "" };
            format!("--volume={}:{}{ro}", volume.name, volume.path)
        }));
        if self.cold_boot {
            runner.arg("--cold-boot");
        }
        let mut env: std::collections::BTreeMap<String, String> =
            self.env.iter().cloned().collect();
        for name in &self.allow_env {
            env_name_allowed(name)
                .map_err(|why| coded_as("RUN060", format!("--allow-env {why}")))?;
            let value = std::env::var(name).map_err(|_| {
                coded_as(
                    "RUN060",
                    format!("--allow-env {name}: this process has no such variable (or it is not UTF-8)"),
                )
            })?;
            env.insert(name.clone(), value);
        }
        if !env.is_empty() {
            runner.env(LAUNCH_ENV, serde_json::to_string(&env)?);
        }
        Ok(())
    }
}

/// Where the runner takes a launch's environment from (`mvm-runner` reads and removes it).
const LAUNCH_ENV: &str = "MVM_LAUNCH_ENV";

/// Where a build's report goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildReport {
    /// To this process's standard error, as it comes (a command's own stdout stays the
    /// command's).
    Stderr,
    /// Kept, and on failure its error line made the error (the local API, whose client is
    /// not at this terminal).
    Captured,
}

/// The plan a command boots: the one given, or the cached bundle's for the image (built when
/// needed, with `command` as its entrypoint).
pub fn plan_to_boot(
    plan: Option<&Path>,
    image: Option<&str>,
    options: &ImageOptions,
    command: &[String],
    report: BuildReport,
) -> anyhow::Result<PathBuf> {
    match (plan, image) {
        (Some(plan), _) => Ok(plan.to_path_buf()),
        (None, Some(image)) => {
            Ok(cached_bundle(image, options, command, report)?.join("plan.dsse.json"))
        }
        (None, None) => Err(coded_as("RUN029", "give an image or --plan")),
    }
}

/// The bundle for `image` with these resources, agent and kernel under `$MVM_HOME/runs`,
/// built (by `mvm build`) unless one with a valid plan is there.
fn cached_bundle(
    image: &str,
    options: &ImageOptions,
    command: &[String],
    report: BuildReport,
) -> anyhow::Result<PathBuf> {
    let host = Host::open()?;
    let agent = match &options.agent {
        Some(agent) => agent.clone(),
        None => sibling("MVM_AGENT", "mvm-agent")?,
    };
    let agent_digest = std::fs::File::open(&agent)
        .and_then(sha256_reader)
        .map_err(|e| {
            coded_as(
                "BUILD008",
                format!(
                    "the guest agent {}: {e}; build mvm-agent or pass --agent",
                    agent.display()
                ),
            )
        })?;
    let kernel = KernelStore::at(&host.home.ensure("kernels")?)
        .latest()
        .map_err(super::coded)?;
    // Everything the bundle is made from: the command too, since the build signs it into the
    // plan as the entrypoint a run without a command uses.
    let key = json!({
        "image": image,
        "cpus": options.cpus,
        "memory": options.memory,
        "command": command,
        "entrypoint": options.entrypoint,
        "allow_host": options.allow_host,
        "profile": options.profile,
        "agent": agent_digest.0,
        "kernel": kernel.manifest.vmlinuz.digest,
        "modules": kernel.manifest.modules.iter().map(|m| &m.file.digest).collect::<Vec<_>>(),
    });
    let dir = host
        .home
        .ensure("runs")?
        .join(&sha256_hex(key.to_string().as_bytes())[..16]);
    if still_valid(&host, &dir.join("plan.dsse.json")) {
        // Used now: `mvm image prune --all --older-than` keeps it.
        if let Some((_, digest)) = image.rsplit_once('@') {
            let touched = ImageCache::in_home(&host.home).and_then(|cache| cache.touch(digest));
            if let Err(e) = touched {
                eprintln!("warning: the image cache's record of {digest}: {e}");
            }
        }
        return Ok(dir);
    }
    let mvm = std::env::current_exe()?;
    let mut build = mvm_ir::env::command(mvm);
    build
        .args(["build", "--image", image, "--out"])
        .arg(&dir)
        .arg("--agent")
        .arg(&agent);
    if let Some(cpus) = options.cpus {
        build.args(["--cpus", &cpus.to_string()]);
    }
    if let Some(memory) = options.memory {
        build.args(["--memory", &memory.to_string()]);
    }
    if let Some(entrypoint) = &options.entrypoint {
        build.arg(format!("--entrypoint={entrypoint}"));
    }
    for host in &options.allow_host {
        build.arg(format!("--allow-host={host}"));
    }
    if let Some(profile) = options.profile {
        build.arg(format!("--profile={profile}"));
    }
    if options.ack_permissive {
        build.arg("--ack-permissive");
    }
    if !command.is_empty() {
        build.arg("--").args(command);
    }
    if report == BuildReport::Captured {
        let built = build.output().context("starting mvm build")?;
        if !built.status.success() {
            let said = String::from_utf8_lossy(&built.stderr);
            // Its own error line, `error[CODE]: …`, with its code.
            let (code, message) = said
                .lines()
                .rev()
                .find_map(|line| line.strip_prefix("error[")?.split_once("]: "))
                .filter(|(code, _)| mvm_ir::is_code(code))
                .unwrap_or(("RUN032", said.trim()));
            return Err(coded_io(
                code,
                format!("building {image} failed: {message}"),
            ));
        }
        return Ok(dir);
    }
    // The build's report goes to stderr: stdout is the command's.
    let status = build
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .context("starting mvm build")?;
    if !status.success() {
        return Err(coded_io(
            "RUN032",
            format!("building {image} failed ({status}); see the build's error above"),
        ));
    }
    Ok(dir)
}

/// Whether the plan at `envelope` verifies now and stays valid a while longer.
pub(super) fn still_valid(host: &Host, envelope: &Path) -> bool {
    let Ok(bytes) = mvm_ir::fsutil::read_capped(envelope, MAX_ENVELOPE_BYTES, "plan envelope")
    else {
        return false;
    };
    let Ok(trust) = host.keys.trust_store() else {
        return false;
    };
    let now = time::OffsetDateTime::now_utc();
    verify_signed_plan(&bytes, &trust, now)
        .is_ok_and(|verified| verified.plan.valid_until.0 - MIN_VALIDITY_LEFT > now)
}

/// `$VARIABLE`, or the file `name` next to the mvm executable.
pub fn sibling(variable: &str, name: &str) -> anyhow::Result<PathBuf> {
    match std::env::var_os(variable) {
        Some(path) => Ok(PathBuf::from(path)),
        None => Ok(std::env::current_exe()?.with_file_name(name)),
    }
}

/// `mvm-runner` with the arguments every VM-serving runner gets.
pub fn runner_command(boot_timeout: Duration) -> anyhow::Result<Command> {
    let mut command = mvm_ir::env::command(sibling("MVM_RUNNER", "mvm-runner")?);
    command
        .arg("--boot-timeout")
        .arg(humantime::format_duration(boot_timeout).to_string());
    Ok(command)
}
