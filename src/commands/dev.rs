//! `mvm dev …`: the builder VM that stays up, which `mvm build --persona vm` (and `auto`)
//! builds in instead of booting a builder VM for each build.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::Context as _;
use clap::Subcommand;
use mvm_builder::builder_image::{BuilderImage, WORKER};
use mvm_builder::vm_persona::{collect_garbage_in_vm, probe_in_vm, store_in_vm};
use mvm_runner::disk::LaunchDisk;
use mvm_runner::named_vm::VmHome;
use mvm_runner::state::{Phase, VmState};
use serde_json::json;

use super::build::PLAN_FILE;
use super::builder::BUILDER_MEMORY_MIB;
use super::Host;
use crate::output::Output;

/// The builder VM's name among the named VMs (`mvm ls`).
pub const BUILDER_VM: &str = "mvm-builder";

/// The builder's Nix store: an ext4 filesystem in this file of the mvm home, mounted at
/// `/nix` in the builder VM; it outlives the VM (`mvm dev down`, `up`).
const STORE_DISK: &str = "builder/store.ext4";

/// The store disk's size when `mvm dev up` makes it (sparse: it takes what the store holds).
const DEFAULT_STORE_SIZE: u64 = 16 << 30;

#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Start the builder VM (`mvm builder fetch` first) from the builder's signed plan, as the
    /// named VM mvm-builder; returns once it is ready. `mvm build --persona vm` and `--persona
    /// auto` then build in it, without a boot for each build. A builder saved cold is woken.
    /// Its Nix store is a disk of the mvm home (builder/store.ext4), made on first use and
    /// kept across `down` and `up`: what one build realised, the next finds.
    Up {
        /// The store disk's size when it is made (sparse), e.g. 16G; an existing disk keeps
        /// its size (`mvm dev reset` to make it anew).
        #[arg(long, value_name = "SIZE", value_parser = super::vm::copy::parse_size)]
        store_size: Option<u64>,
        /// The builder's vCPUs (1 unless given; its restrictive profile allows 2). Another
        /// size than the fetched plan's is a plan of its own, built from the same image.
        #[arg(long, value_name = "N")]
        cpus: Option<u32>,
        /// The builder's memory in MiB (1024 unless given; its profile allows 2048).
        #[arg(long, value_name = "MIB")]
        memory: Option<u32>,
    },
    /// The builder VM's state, and the builder image it would start from.
    Status,
    /// Print the builder VM's console (the guest kernel's and the agent's lines).
    Logs {
        /// Keep printing new lines while it runs.
        #[arg(short, long)]
        follow: bool,
    },
    /// Stop the builder VM and remove it: the next `mvm build --persona vm` boots one of its
    /// own, `--persona auto` builds on the host. Its store disk stays.
    Down,
    /// List the valid paths of the running builder's Nix store, as its Nix says (sorted, one a
    /// line; `--json`: {"paths": […]}).
    Store,
    /// Collect the garbage of the running builder's Nix store: the builder keeps no roots, so
    /// every path goes (the next build realises what it needs again). Refused while a Nix
    /// build runs in it (BUILDER009).
    Gc,
    /// Remove the builder's store disk: the next `mvm dev up` starts with an empty Nix store.
    /// Refused while the builder VM exists (`mvm dev down` first).
    Reset,
}

/// `mvm exec -i` of the build worker in the running builder for the job directory `job`,
/// stopped after `timeout`.
pub fn exec_worker(mvm: &Path, timeout: &str, job: &str) -> Command {
    let mut command = mvm_ir::env::command(mvm);
    command
        .args(["exec", "--interactive", "--timeout", timeout])
        .args([BUILDER_VM, "--", WORKER, "--in-vm", job]);
    command
}

/// The builder VM `mvm dev up` started, when it is running.
pub fn running_builder(host: &Host) -> Option<VmState> {
    VmHome::new(host.home.clone())
        .get(BUILDER_VM)
        .ok()?
        .state()
        .ok()
        .filter(|state| state.phase == Phase::Running)
}

pub fn run(cmd: DevCommand, out: &Output) -> anyhow::Result<ExitCode> {
    let host = Host::open()?;
    let vms = VmHome::new(host.home.clone());
    let builder = vms.get(BUILDER_VM).ok();
    let state = builder.as_ref().and_then(|vm| vm.state().ok());
    match cmd {
        DevCommand::Up {
            store_size,
            cpus,
            memory,
        } => {
            let image = BuilderImage::open(&host.home.root().join("builder/image"))
                .map_err(super::coded)?;
            let plan = builder_plan(&host, &image, cpus, memory)?;
            let store = host.home.root().join(STORE_DISK);
            let mut mvm = mvm_ir::env::command(std::env::current_exe()?);
            if out.is_json() {
                mvm.arg("--json");
            }
            match state.map(|s| s.phase) {
                Some(Phase::Running) => {
                    if cpus.is_some() || memory.is_some() || store_size.is_some() {
                        eprintln!("notice: {BUILDER_VM} is running as it was: `mvm dev down` first to change it");
                    }
                    out.result(json!({"vm": BUILDER_VM, "started": false}), || {
                        format!("{BUILDER_VM} is running already")
                    });
                    return Ok(ExitCode::SUCCESS);
                }
                Some(Phase::Cold | Phase::Paused) => {
                    if cpus.is_some() || memory.is_some() || store_size.is_some() {
                        eprintln!("notice: {BUILDER_VM} is resumed as it was: `mvm dev down` first to change it");
                    }
                    mvm.args(["resume", BUILDER_VM])
                }
                Some(_) => {
                    // Stopped or failed: it goes, and a new one starts.
                    if let Some(vm) = builder {
                        vm.remove(true).map_err(super::vm::named_error)?;
                    }
                    start_builder(&mut mvm, &plan, &store, store_size)?
                }
                None => start_builder(&mut mvm, &plan, &store, store_size)?,
            };
            passthrough(mvm)
        }
        DevCommand::Status => {
            let image = BuilderImage::open(&host.home.root().join("builder/image")).ok();
            let image_digest = image.as_ref().map(|i| i.manifest.image_digest.clone());
            let store = host.home.root().join(STORE_DISK);
            let disk = fs::metadata(&store).ok().map(
                |meta| json!({"path": store, "size": meta.len(), "allocated": meta.blocks() * 512}),
            );
            // The running builder's worker says what it takes and what its store holds.
            let mvm = std::env::current_exe()?;
            let worker = match &state {
                Some(s) if s.phase == Phase::Running => {
                    Some(probe_in_vm(|job| exec_worker(&mvm, "1m", job)).map_err(super::coded)?)
                }
                _ => None,
            };
            out.result(
                json!({"vm": state, "image_digest": image_digest, "store_disk": disk, "worker": worker}),
                || {
                    let vm = match &state {
                        Some(s) => format!(
                            "{BUILDER_VM} is {} (plan {})",
                            s.phase.name(),
                            s.plan_digest
                        ),
                        None => format!("{BUILDER_VM} is not started (`mvm dev up`)"),
                    };
                    let image = image_digest
                        .as_deref()
                        .unwrap_or("none (`mvm builder fetch`)");
                    let disk = match &disk {
                        Some(disk) => format!(
                            "store disk {} ({} MiB, {} MiB in use on this host)",
                            store.display(),
                            disk["size"].as_u64().unwrap_or(0) >> 20,
                            disk["allocated"].as_u64().unwrap_or(0) >> 20
                        ),
                        None => "no store disk yet (`mvm dev up` makes it)".into(),
                    };
                    let worker = match &worker {
                        Some(w) => format!(
                            "\nworker: job version {}, takes {}; {}; {} store paths; {} jobs running",
                            w.version,
                            w.jobs.join(", "),
                            w.nix,
                            w.store_paths,
                            w.jobs_running
                        ),
                        None => String::new(),
                    };
                    format!("{vm}\nbuilder image {image}\n{disk}{worker}")
                },
            );
            Ok(ExitCode::SUCCESS)
        }
        DevCommand::Store => {
            running(&state)?;
            let mvm = std::env::current_exe()?;
            let listing = store_in_vm(|job| exec_worker(&mvm, "5m", job)).map_err(super::coded)?;
            out.result(json!({"paths": listing.paths}), || listing.paths.join("\n"));
            Ok(ExitCode::SUCCESS)
        }
        DevCommand::Gc => {
            running(&state)?;
            let mvm = std::env::current_exe()?;
            let collected =
                collect_garbage_in_vm(|job| exec_worker(&mvm, "30m", job)).map_err(super::coded)?;
            out.result(json!(collected), || {
                format!(
                    "deleted {} store paths; {} left",
                    collected.deleted, collected.left
                )
            });
            Ok(ExitCode::SUCCESS)
        }
        DevCommand::Logs { follow } => {
            let mut mvm = mvm_ir::env::command(std::env::current_exe()?);
            mvm.args(["logs", BUILDER_VM]);
            if follow {
                mvm.arg("--follow");
            }
            passthrough(mvm)
        }
        DevCommand::Down => {
            let vm = vms.get(BUILDER_VM).map_err(super::vm::named_error)?;
            vm.remove(true).map_err(super::vm::named_error)?;
            out.result(json!({"removed": BUILDER_VM}), || {
                format!("removed {BUILDER_VM}")
            });
            Ok(ExitCode::SUCCESS)
        }
        DevCommand::Reset => {
            if builder.is_some() {
                return Err(super::coded_as(
                    "BUILDER007",
                    format!("{BUILDER_VM} exists: `mvm dev down` first, then reset its store"),
                ));
            }
            let store = host.home.root().join(STORE_DISK);
            let removed = match fs::symlink_metadata(&store) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                Err(e) => return Err(anyhow::Error::new(e).context(store.display().to_string())),
                Ok(_) => {
                    // Held while it goes: no VM has it attached (`mvm up --disk` of it).
                    let _held = store_disk(&store).lock().map_err(|why| {
                        super::coded_as("BUILDER007", format!("the store disk: {why}"))
                    })?;
                    fs::remove_file(&store).with_context(|| store.display().to_string())?;
                    true
                }
            };
            out.result(
                json!({"store_disk": store, "removed": removed}),
                || match removed {
                    true => format!("removed the store disk {}", store.display()),
                    false => "there is no store disk".to_string(),
                },
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Refuses (BUILDER008) unless the builder VM runs.
fn running(state: &Option<VmState>) -> anyhow::Result<()> {
    match state.as_ref().map(|s| s.phase) {
        Some(Phase::Running) => Ok(()),
        _ => Err(super::coded_as(
            "BUILDER008",
            format!("{BUILDER_VM} is not running: `mvm dev up` first"),
        )),
    }
}

/// Where the builder's plans are: the one `mvm builder fetch` signed, and one per other size
/// `mvm dev up` was asked for, under `sized/<image>-<cpus>x<memory>` (the image's digest, 12
/// hex, so that a plan of an earlier image is never taken for the current one's).
pub fn builder_plans(host: &Host, image: &BuilderImage) -> Vec<PathBuf> {
    let builder = host.home.root().join("builder");
    let prefix = format!("{}-", image_tag(image));
    let sized = fs::read_dir(builder.join("sized"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with(&prefix))
        .map(|entry| entry.path().join(PLAN_FILE));
    std::iter::once(builder.join("bundle").join(PLAN_FILE))
        .chain(sized)
        .collect()
}

fn image_tag(image: &BuilderImage) -> String {
    let digest = &image.manifest.image_digest;
    digest
        .strip_prefix("sha256:")
        .unwrap_or(digest)
        .chars()
        .take(12)
        .collect()
}

/// The builder plan of `cpus` and `memory` (the fetched one's when neither is given or they
/// are its own), built from `image` the first time it is asked for.
fn builder_plan(
    host: &Host,
    image: &BuilderImage,
    cpus: Option<u32>,
    memory: Option<u32>,
) -> anyhow::Result<PathBuf> {
    let builder = host.home.root().join("builder");
    let (cpus, memory) = (cpus.unwrap_or(1), memory.unwrap_or(BUILDER_MEMORY_MIB));
    if (cpus, memory) == (1, BUILDER_MEMORY_MIB) {
        return Ok(builder.join("bundle").join(PLAN_FILE));
    }
    let sized = builder
        .join("sized")
        .join(format!("{}-{cpus}x{memory}", image_tag(image)));
    if !sized.join(PLAN_FILE).is_file() {
        let agent = super::bundle::sibling("MVM_AGENT", "mvm-agent")?;
        super::builder::build(image, &sized, &agent, cpus, memory)?;
    }
    Ok(sized.join(PLAN_FILE))
}

/// `mvm up` of the builder's plan as the named builder VM, its store disk (made first when
/// there is none) at `/nix`.
fn start_builder<'a>(
    mvm: &'a mut Command,
    plan: &Path,
    store: &Path,
    size: Option<u64>,
) -> anyhow::Result<&'a mut Command> {
    match fs::metadata(store) {
        Ok(meta) => {
            if size.is_some_and(|size| size != meta.len()) {
                eprintln!(
                    "notice: the store disk {} keeps its size ({} MiB); `mvm dev reset` makes it anew",
                    store.display(),
                    meta.len() >> 20
                );
            }
        }
        Err(_) => make_store_disk(store, size.unwrap_or(DEFAULT_STORE_SIZE))?,
    }
    Ok(mvm
        .args(["up", "--name", BUILDER_VM, "--plan"])
        .arg(plan)
        .arg("--disk")
        .arg(store_disk(store).to_string()))
}

/// The store disk as the builder VM has it: at `/nix`, writable.
fn store_disk(store: &Path) -> LaunchDisk {
    LaunchDisk {
        file: store.to_path_buf(),
        path: "/nix".into(),
        read_only: false,
        volume: None,
    }
}

/// Makes the store disk: a sparse file of `size` bytes holding an empty ext4 filesystem
/// (`mkfs.ext4`, no blocks reserved for root), put in place whole.
fn make_store_disk(store: &Path, size: u64) -> anyhow::Result<()> {
    let dir = store.parent().context("the store disk has no directory")?;
    fs::create_dir_all(dir)?;
    let staged = tempfile::Builder::new()
        .prefix(".store-")
        .tempfile_in(dir)?;
    staged.as_file().set_len(size)?;
    let mkfs = mkfs_ext4().ok_or_else(|| {
        super::coded_io(
            "BUILDER006",
            "mkfs.ext4 was not found (install e2fsprogs): it makes the builder's store disk",
        )
    })?;
    let made = mvm_ir::env::command(&mkfs)
        .args(["-q", "-F", "-m", "0", "-L", "mvm-store"])
        .arg(staged.path())
        .output()
        .with_context(|| format!("starting {}", mkfs.display()))?;
    if !made.status.success() {
        return Err(super::coded_io(
            "BUILDER006",
            format!(
                "{} failed: {}",
                mkfs.display(),
                String::from_utf8_lossy(&made.stderr).trim()
            ),
        ));
    }
    // Never over a disk another `mvm dev up` made meanwhile.
    staged.persist_noclobber(store)?;
    Ok(())
}

/// `mkfs.ext4` on `PATH`, or in the sbin directories a user's `PATH` often lacks.
pub(crate) fn mkfs_ext4() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("mkfs.ext4"))
        .find(|candidate| candidate.is_file())
}

/// Runs `mvm …` with this process's streams; its exit status.
fn passthrough(mut mvm: std::process::Command) -> anyhow::Result<ExitCode> {
    let status = mvm.status().context("starting mvm")?;
    Ok(ExitCode::from(
        status
            .code()
            .and_then(|c| u8::try_from(c).ok())
            .unwrap_or(1),
    ))
}
