//! `mvm build`: a workload → a signed plan bundle.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use mvm_builder::builder_image::{BuilderImage, BuilderImageError, WORKER};
use mvm_builder::bundle::{assemble, image_argv, AssembleInput, BuilderVm};
use mvm_builder::erofs::Compression;
use mvm_builder::image_cache::{BuiltImage, BundleRecord, CacheLock, ImageCache};
use mvm_builder::kernel::KernelStore;
use mvm_builder::log_lines::LogSink;
use mvm_builder::nix_image::NixStore;
use mvm_builder::oci::{cached_image, resolve_tag, ImageRef, RegistryOptions, Transport};
use mvm_builder::rootfs::RootfsRequest;
use mvm_builder::vm_persona::{build_in_vm, JobEvent, NixJob};
use mvm_builder::worker::build_in_worker;
use mvm_ir::digest::sha256_prefixed;
use mvm_ir::dsse::Envelope;
use mvm_ir::fsutil::atomic_write;
use mvm_ir::keys::DEFAULT_KEY;
use mvm_ir::load::ir_digest;
use mvm_ir::plan::{Profile, Timestamp, MAX_ENVELOPE_BYTES};
use mvm_ir::provenance::SkippedEntries;
use mvm_ir::terminal::{printable, Newlines};
use mvm_ir::validate::validate;
use mvm_ir::workload::{
    App, Egress, EgressGrant, Entrypoint, Image, Network, NetworkMode, Resources, Workload,
    SCHEMA_VERSION,
};
use mvm_ir::{canonical, plan, provenance};
use serde_json::json;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use super::{coded, coded_as, Host};
use crate::output::Output;

/// Where the plan and provenance envelopes go in a bundle.
pub(crate) const PLAN_FILE: &str = "plan.dsse.json";
const PROVENANCE_FILE: &str = "provenance.dsse.json";

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Persona {
    /// A confined child process on this host (no_new_privs, Landlock, seccomp).
    Host,
    /// A builder VM (`mvm builder fetch`): the one `mvm dev up` started, else a fresh one;
    /// the image's blobs go in, the EROFS image comes back, and this host computes the verity
    /// tree and signs.
    Vm,
    /// The builder VM when `mvm dev up` has one running, else this host (with a notice).
    Auto,
}

/// Build a workload's root filesystem, verity tree, kernel and initramfs into a signed plan
/// bundle: rootfs.erofs, rootfs.verity, vmlinuz, initramfs, plan.dsse.json,
/// provenance.dsse.json.
///
/// The same input builds the same image and verity root hash. Exit 0 built, 1 a digest or pin
/// did not match, 65 invalid workload or image, 74 I/O or registry failure.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The workload: a directory holding mvm.toml or workload.json, or the file itself.
    #[arg(default_value = ".")]
    path: PathBuf,
    /// The workload IR JSON file (the same as giving it as PATH).
    #[arg(long, conflicts_with = "image")]
    ir: Option<PathBuf>,
    /// Build an image without a declaration: REFERENCE@sha256:<digest> (registry, oci:DIR or
    /// oci-archive:FILE). The command after `--`, or the image's Entrypoint and Cmd, runs.
    #[arg(long)]
    image: Option<String>,
    /// With --image and --profile dev only: accept a tag, resolve it to the digest the registry
    /// serves now, and record that digest.
    #[arg(long, requires = "image")]
    allow_unpinned: bool,
    /// With --image: virtual CPUs for the VM (default 1).
    #[arg(long, requires = "image")]
    cpus: Option<u32>,
    /// With --image: memory for the VM in MiB (default 256).
    #[arg(long, requires = "image", value_name = "MIB")]
    memory: Option<u32>,
    /// With --image: the program that replaces the image's Entrypoint (its Cmd is then dropped
    /// too, as `docker run --entrypoint` does; `""` clears the Entrypoint).
    #[arg(long, requires = "image", value_name = "PROGRAM")]
    entrypoint: Option<String>,
    /// With --image: let the VM reach HOST on PORT (443 when absent) through the host's
    /// egress proxy; repeatable. HOST is a name, `*.SUFFIX` (every name below it) or an IP
    /// literal (IPv6 in brackets); signed into the plan, judged by the runner for every
    /// connection (docs/network.md).
    #[arg(long, requires = "image", value_name = "HOST[:PORT]", value_parser = parse_grant)]
    allow_host: Vec<EgressGrant>,
    /// The command for --image (after `--`): it replaces the image's Cmd and follows its
    /// Entrypoint, as `docker run IMAGE COMMAND…` does.
    #[arg(last = true, requires = "image")]
    command: Vec<String>,
    /// The app to build (needed when the workload has several).
    #[arg(long)]
    app: Option<String>,
    /// The bundle directory (replaced whole if it holds an older bundle).
    #[arg(short, long, default_value = "mvm-out")]
    out: PathBuf,
    /// The signing key (`default`, the host key, is generated on first use).
    #[arg(long, default_value = DEFAULT_KEY)]
    key: String,
    /// How long the plan stays valid (a reusable plan).
    #[arg(long, default_value = "30days", value_parser = humantime::parse_duration)]
    valid_for: Duration,
    /// The policy profile: restrictive, standard, dev or permissive (docs/policy.md). Default:
    /// the one a workload.nix names, else the app's threat tier's (standard; dev when trusted).
    #[arg(long, value_name = "PROFILE", value_parser = parse_profile)]
    profile: Option<Profile>,
    /// Acknowledge that the permissive profile drops the guest's syscall filter and widens
    /// every grant: without it a permissive plan is not built.
    #[arg(long)]
    ack_permissive: bool,
    /// Let clients run only the plan's entrypoint program (with any arguments) and change no
    /// file in the guest: `mvm exec` of another program, `mvm cp` in and `mvm fs mkdir|rm|mv`
    /// are refused (AGENT117, RUN029 for `mvm run -- CMD`). The builder VM's plan is built so:
    /// it is no shell. Needs an entrypoint (BUILD012).
    #[arg(long)]
    only_entrypoint: bool,
    /// The guest agent binary, `/init` of the initramfs (default: mvm-agent next to mvm).
    #[arg(long, env = "MVM_AGENT")]
    agent: Option<PathBuf>,
    /// The kernel release to use (default: the newest fetched; see `mvm kernel fetch`).
    #[arg(long)]
    kernel: Option<String>,
    /// Where the untrusted parsing runs.
    #[arg(long, value_enum, default_value = "host")]
    persona: Persona,
    /// For nix_packages images: the package set the attribute paths are looked up in —
    /// `<nixpkgs>`, or a Nix file (its value, or what it returns called with no arguments).
    #[arg(long, value_name = "SET", default_value = "<nixpkgs>")]
    nix_packages: String,
    /// For nix_packages images: the Nix store to realise in, as `nix-store --store DIR` (its
    /// files under DIR/nix/store); default the system's store.
    #[arg(long, value_name = "DIR")]
    nix_store: Option<PathBuf>,
    /// Compress the image's files: `lz4` (the default), `lz4hc` / `lz4hc,LEVEL` (1–12, default
    /// 9) for a smaller image that takes longer to build, or `none`. A file is stored
    /// compressed only where that takes fewer bytes; the guest kernel decompresses blocks
    /// after dm-verity has checked them.
    #[arg(long, value_name = "ALGORITHM", default_value = "lz4")]
    compress: Compression,
}

pub fn run(args: BuildArgs, out: &Output) -> anyhow::Result<()> {
    let started = Timestamp::now();
    let host = Host::open()?;
    let flag_profile = args.profile;
    let target = match &args.image {
        Some(image) => Target::image(
            image,
            args.allow_unpinned,
            flag_profile.unwrap_or(Profile::Standard),
            &host,
        )?,
        None => Target::declaration(
            args.ir.as_deref().unwrap_or(&args.path),
            args.app.as_deref(),
        )?,
    };
    let store = KernelStore::at(&host.home.ensure("kernels")?);
    let kernel = match &args.kernel {
        Some(release) => store.open(release),
        None => store.latest(),
    }
    .map_err(coded)?;
    let agent = match args.agent {
        Some(path) => path,
        None => std::env::current_exe()?.with_file_name("mvm-agent"),
    };
    if !agent.is_file() {
        return Err(coded_as(
            "BUILD008",
            format!(
                "the guest agent {} was not found; build mvm-agent or pass --agent",
                agent.display()
            ),
        ));
    }

    // The signing key first: a missing or unsafe key fails the build before any work.
    let signer = if args.key == DEFAULT_KEY {
        host.keys.host_signer()?
    } else {
        host.keys.signer(&args.key)?
    };

    let in_vm = match args.persona {
        Persona::Host => false,
        Persona::Vm => true,
        Persona::Auto => {
            let running = super::dev::running_builder(&host).is_some();
            // The builder VM realises a package set file sent in, on its own store.
            let nix_on_host = target.nix_packages.is_some()
                && (args.nix_store.is_some() || !Path::new(&args.nix_packages).is_file());
            if !running {
                eprintln!(
                    "notice: no builder VM runs (`mvm dev up` starts one): building on this host"
                );
            } else if nix_on_host {
                eprintln!(
                    "notice: the builder VM realises only a package set file (--nix-packages FILE) \
                     on its own store: building on this host"
                );
            }
            running && !nix_on_host
        }
    };
    // A Nix image is realised by Nix here (the confined worker cannot start programs), the
    // worker then checking and staging the closure; or by the builder VM's own Nix, on its
    // store, from the package set's directory sent in with the job.
    let (host_realised, nix_job) = match &target.nix_packages {
        Some(_) if in_vm && args.nix_store.is_some() => {
            return Err(coded_as(
                "BUILD004",
                "--nix-store names a store of this host; the builder VM realises in its own",
            ))
        }
        Some(packages) if in_vm => {
            let job = NixJob {
                package_set: PathBuf::from(&args.nix_packages),
                attrs: packages.clone(),
            };
            (None, Some(job))
        }
        Some(packages) => {
            let store = args.nix_store.as_deref().map(absolute).transpose()?;
            let nix =
                NixStore::new(store, args.nix_packages.clone()).with_log(LogSink::new(|line| {
                    eprintln!("nix: {}", printable(line, Newlines::Escape))
                }));
            (Some(nix.closure(packages).map_err(coded)?), None)
        }
        None => (None, None),
    };
    let image_label = match &target.nix_packages {
        Some(packages) => format!("nix:{}#{}", args.nix_packages, packages.join(",")),
        None => target.requested.clone(),
    };

    // Build into a private directory beside the destination, then swap it in whole.
    let out_dir = absolute(&args.out)?;
    check_replaceable(&out_dir)?;
    let parent = out_dir
        .parent()
        .context("the output directory has no parent")?;
    fs::create_dir_all(parent)?;
    let staging = tempfile::Builder::new()
        .prefix(".mvm-build-")
        .tempdir_in(parent)?;
    let request = RootfsRequest {
        reference: target.reference.clone(),
        // A Nix image is named by its closure's digest, which the worker must give back
        // (the VM's closure is named once it is realised).
        digest: match &host_realised {
            Some(realised) => realised.closure.digest(),
            None => target.digest.clone(),
        },
        base_dir: target.base_dir.clone(),
        cache_dir: host.home.ensure("cache")?.join("blobs"),
        out_dir: staging.path().to_path_buf(),
        insecure_registries: insecure_registries(&host)?,
        progress: !out.is_json(),
        nix: host_realised
            .as_ref()
            .map(|realised| realised.closure.clone()),
        compression: args.compress,
    };
    // Held from the pull until the image's record is written: no prune removes its blobs
    // meanwhile.
    let cache = ImageCache::in_home(&host.home).map_err(coded)?;
    let cache_lock = cache.lock_shared().map_err(coded)?;
    let (report, sandbox, builder, realised) = if in_vm {
        let (launcher, builder) = builder_vm(&host)?;
        // Ctrl-C (or SIGTERM, SIGHUP) ends the job in the builder VM, then the build.
        let cancel = Arc::new(AtomicBool::new(false));
        for signal in [SIGINT, SIGTERM, SIGHUP] {
            signal_hook::flag::register(signal, Arc::clone(&cancel))?;
        }
        let built = build_in_vm(
            launcher,
            &request,
            nix_job.as_ref(),
            &mut print_job_event,
            &cancel,
        );
        if cancel.load(Ordering::Relaxed) {
            return Err(super::coded_io(
                "BUILD013",
                "cancelled: the job was ended in the builder VM, nothing was published",
            ));
        }
        let built = built.map_err(coded)?;
        (built.report, built.sandbox, Some(builder), built.nix)
    } else {
        let (report, sandbox) =
            build_in_worker(&std::env::current_exe()?, &["build-worker"], &request)
                .map_err(coded)?;
        (report, sandbox, None, host_realised)
    };
    let nix_closure = realised.as_ref().map(|realised| &realised.closure);

    let resources = Resources {
        cpu_cores: args.cpus.unwrap_or(1),
        memory_mb: args.memory.unwrap_or(256),
        rootfs_size_mb: None,
    };
    let argv = image_argv(
        &report.entrypoint,
        &report.cmd,
        args.entrypoint.as_deref(),
        &args.command,
    );
    let network = Network {
        mode: match args.allow_host.is_empty() {
            true => NetworkMode::None,
            false => NetworkMode::Allowlist,
        },
        egress: Egress {
            allowlist: args.allow_host.clone(),
        },
        ports: vec![],
    };
    let (workload, app_index) = target.workload(&argv, resources, network)?;
    let app = &workload.apps[app_index];
    let command = app.entrypoints[0].command();
    if args.only_entrypoint && command.is_empty() {
        return Err(coded_as(
            "BUILD012",
            "--only-entrypoint needs an entrypoint: the image's, or a command after `--`",
        ));
    }
    // The command line's profile, else the declaration's (a workload.nix may name one), else
    // the app's threat tier's.
    let profile = flag_profile
        .or(target.profile)
        .unwrap_or(app.threat_tier.default_profile());
    profile_allows(profile, app, args.ack_permissive)?;
    let digest = ir_digest(&workload)?;
    let now = time::OffsetDateTime::now_utc().replace_nanosecond(0)?;
    let valid_until = time::Duration::try_from(args.valid_for)
        .ok()
        .and_then(|d| now.checked_add(d))
        .ok_or_else(|| coded_as("BUILD010", "--valid-for is too long"))?;
    let bundle = assemble(&AssembleInput {
        workload_id: &workload.id,
        app,
        ir_digest: &digest,
        image: &image_label,
        rootfs: &report,
        nix: nix_closure,
        sandbox: &sandbox,
        builder_vm: builder.as_ref(),
        kernel: &kernel,
        agent: &agent,
        out_dir: staging.path(),
        profile,
        only_entrypoint: args.only_entrypoint,
        valid_from: Timestamp(now),
        valid_until: Timestamp(valid_until),
        started,
    })
    .map_err(coded)?;
    // What of the image's config is not honoured as written, said once (the build of `mvm run
    // IMAGE` and `mvm up IMAGE` too, whose stderr this is).
    for warning in &bundle.warnings {
        eprintln!("warning: {}", printable(warning, Newlines::Escape));
    }

    let payload = canonical::to_vec(&bundle.plan)?;
    let plan_digest = sha256_prefixed(&payload);
    let envelope = Envelope::sign(plan::PAYLOAD_TYPE, &payload, &signer);
    atomic_write(&staging.path().join(PLAN_FILE), &envelope.to_json(), 0o644)?;
    let statement = canonical::to_vec(&bundle.provenance)?;
    let envelope = Envelope::sign(provenance::PAYLOAD_TYPE, &statement, &signer);
    atomic_write(
        &staging.path().join(PROVENANCE_FILE),
        &envelope.to_json(),
        0o644,
    )?;

    host.audit(
        "build",
        json!({"workload_id": workload.id, "app": app.name, "ir_digest": digest, "plan_digest": plan_digest,
               "rootfs_digest": bundle.rootfs_digest, "root_hash": report.root_hash, "keyid": signer.keyid(),
               "image": report.image_digest, "sandbox": sandbox}),
    )?;
    swap_in(staging, &out_dir)?;
    if target.nix_packages.is_none() {
        let bundle = BundleRecord {
            path: out_dir.clone(),
            plan_digest: plan_digest.clone(),
        };
        if let Err(e) = record_image(&cache, &cache_lock, &target, bundle) {
            eprintln!(
                "warning: the image cache's record of {}: {e}",
                target.digest
            );
        }
    }
    drop(cache_lock);

    out.result(
        json!({"out": out_dir, "plan_digest": plan_digest, "rootfs_digest": bundle.rootfs_digest,
               "root_hash": report.root_hash, "image_size": report.image_size, "layers": report.layers.len(),
               "store_paths": nix_closure.map(|c| c.paths.len()),
               "nix_built": realised.as_ref().map(|r| r.built.len()),
               "kernel": kernel.manifest.release, "keyid": signer.keyid(), "sandbox": sandbox,
               "valid_until": bundle.plan.valid_until, "skipped_entries": report.skipped,
               "compression": report.compression, "warnings": bundle.warnings}),
        || {
            format!(
                "built {}/{} into {}\nrootfs {} ({} bytes, {}{})\n{}verity root {}\nplan {} signed by {}\nvalid until {}\nbuilder sandbox: no_new_privs, seccomp, landlock {}",
                workload.id,
                app.name,
                out_dir.display(),
                bundle.rootfs_digest,
                report.image_size,
                match &realised {
                    Some(realised) => format!(
                        "{} Nix store paths ({} outputs realised by this build)",
                        realised.closure.paths.len(),
                        realised.built.len()
                    ),
                    None => format!("{} layers", report.layers.len()),
                },
                match report.compression.compression {
                    Compression::None => String::new(),
                    compression => format!(
                        ", {compression}: {} files compressed",
                        report.compression.compressed_files
                    ),
                },
                skipped_line(&report.skipped),
                report.root_hash,
                plan_digest,
                signer.keyid(),
                bundle.plan.valid_until,
                sandbox.landlock
            )
        },
    );
    Ok(())
}

/// How long a build in the builder VM may take before the VM is stopped and the build fails:
/// a hung builder must not hold `mvm build` for ever.
const BUILDER_VM_TIMEOUT: &str = "1h";

/// The command that runs the worker in a builder VM for a job directory (`--in-vm DIR`).
type Launcher = Box<dyn FnOnce(&str) -> std::process::Command>;

/// How this build reaches a builder VM: `mvm exec -i` in the builder `mvm dev up` started
/// when it runs, else `mvm run -i` of the builder's signed plan (a fresh VM for the build, the
/// plan verified before it boots); with what the provenance names the builder by.
/// Prints what the builder VM's job says while it runs to stderr: its steps, and its log
/// lines made printable (they are the builder's bytes).
fn print_job_event(event: JobEvent) {
    match event {
        JobEvent::Received { bytes } => {
            eprintln!("builder: the job is in ({} KiB)", bytes.div_ceil(1024))
        }
        JobEvent::Realising { packages } => eprintln!(
            "builder: realising {}",
            printable(&packages.join(", "), Newlines::Escape)
        ),
        JobEvent::Building => eprintln!("builder: building the image"),
        JobEvent::Log { line } => eprintln!("builder: {}", printable(&line, Newlines::Escape)),
    }
}

fn builder_vm(host: &Host) -> anyhow::Result<(Launcher, BuilderVm)> {
    let dir = host.home.root().join("builder");
    let image = BuilderImage::open(&dir.join("image")).map_err(coded)?;
    let plan_digest = |plan: &Path| -> anyhow::Result<String> {
        let payload = mvm_ir::fsutil::read_capped(plan, MAX_ENVELOPE_BYTES, "plan envelope")
            .and_then(|bytes| Envelope::parse(&bytes))
            .and_then(|envelope| envelope.decode_payload())
            .map_err(|e| {
                coded(BuilderImageError::Mismatch {
                    path: plan.display().to_string(),
                    reason: e.to_string(),
                })
            })?;
        Ok(sha256_prefixed(&payload))
    };
    let plan = dir.join("bundle").join(PLAN_FILE);
    let fetched_plan = plan_digest(&plan)?;
    let mvm = std::env::current_exe()?;
    if let Some(running) = super::dev::running_builder(host) {
        // The image is the one fetched now only when the running builder was started from a
        // plan of it (the fetched one, or one of another size `mvm dev up` built from it).
        let current = super::dev::builder_plans(host, &image)
            .iter()
            .any(|plan| plan_digest(plan).is_ok_and(|digest| digest == running.plan_digest));
        let image_digest = current.then_some(image.manifest.image_digest);
        if image_digest.is_none() {
            eprintln!(
                "notice: the running builder ({}) was started from an earlier builder plan; \
                 `mvm dev down && mvm dev up` starts the one fetched now",
                super::dev::BUILDER_VM
            );
        }
        let launcher: Launcher =
            Box::new(move |job: &str| super::dev::exec_worker(&mvm, BUILDER_VM_TIMEOUT, job));
        let builder = BuilderVm {
            plan_digest: running.plan_digest,
            image_digest,
        };
        return Ok((launcher, builder));
    }
    let launcher: Launcher = Box::new(move |job: &str| {
        let mut command = mvm_ir::env::command(mvm);
        command
            .args([
                "run",
                "--interactive",
                "--timeout",
                BUILDER_VM_TIMEOUT,
                "--plan",
            ])
            .arg(&plan)
            .args(["--", WORKER, "--in-vm", job]);
        command
    });
    let builder = BuilderVm {
        plan_digest: fetched_plan,
        image_digest: Some(image.manifest.image_digest),
    };
    Ok((launcher, builder))
}

/// Records the image a build used, its blobs and the bundle built, in the image cache.
fn record_image(
    cache: &ImageCache,
    lock: &CacheLock,
    target: &Target,
    bundle: BundleRecord,
) -> anyhow::Result<()> {
    let image =
        ImageRef::new(&target.reference, &target.digest, &target.base_dir).map_err(coded)?;
    // An archive is unpacked by the worker, never cached: recorded without blobs.
    let pulled = match image.transport {
        Transport::Archive(_) => None,
        _ => Some(cached_image(&target.digest, cache.blobs()).map_err(coded)?),
    };
    let built = BuiltImage {
        reference: target.reference.clone(),
        pulled,
        digest: target.digest.clone(),
        bundle,
    };
    cache.record_build(lock, &built).map_err(coded)
}

/// The line saying which device nodes and FIFOs the image left out (the first few by name; the
/// provenance lists them), or nothing when there were none.
fn skipped_line(skipped: &SkippedEntries) -> String {
    const SHOWN: usize = 5;
    if skipped.total == 0 {
        return String::new();
    }
    let mut names: Vec<String> = skipped
        .named
        .iter()
        .take(SHOWN)
        .map(|e| printable(&e.path, Newlines::Escape).into_owned())
        .collect();
    if skipped.total > names.len() as u64 {
        names.push("…".into());
    }
    let what = if skipped.total == 1 {
        "device node or FIFO"
    } else {
        "device nodes and FIFOs"
    };
    format!(
        "skipped {} {what} (the guest's devtmpfs provides /dev; listed in the provenance): {}\n",
        skipped.total,
        names.join(", ")
    )
}

/// What a build builds: one app of a declared workload, or an image given on the command line
/// (a workload is then made for it once the image's own command is known).
struct Target {
    /// The image reference as the workload spells it (no tag).
    reference: String,
    /// Its pinned (or, for unpinned dev builds, resolved) digest.
    digest: String,
    /// What the user named, for provenance (a tag, for unpinned dev builds).
    requested: String,
    /// Base for relative `oci:` paths.
    base_dir: PathBuf,
    /// The declared workload and the app's index, or none for an image.
    declared: Option<(Workload, usize)>,
    /// A nix_packages image's attribute paths (then `reference` and `digest` are empty).
    nix_packages: Option<Vec<String>>,
    /// The profile the declaration names (a workload.nix may).
    profile: Option<Profile>,
}

impl Target {
    fn declaration(path: &Path, app: Option<&str>) -> anyhow::Result<Self> {
        let declaration = find_declaration(path)?;
        let parent = declaration
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let base_dir = fs::canonicalize(parent)?;
        let declared = super::declaration::load(&declaration)?;
        let workload = declared.workload;
        let index = match (app, workload.apps.as_slice()) {
            (Some(name), apps) => apps
                .iter()
                .position(|a| a.name == name)
                .ok_or_else(|| coded_as("BUILD007", format!("the workload has no app {name:?}")))?,
            (None, [_]) => 0,
            (None, apps) => {
                let names: Vec<&str> = apps.iter().map(|a| a.name.as_str()).collect();
                return Err(coded_as(
                    "BUILD007",
                    format!(
                        "the workload has several apps; pick one with --app ({})",
                        names.join(", ")
                    ),
                ));
            }
        };
        let (reference, digest, nix_packages) = match &workload.apps[index].image {
            Image::OciBase { reference, digest } => (reference.clone(), digest.clone(), None),
            Image::NixPackages { packages } => {
                (String::new(), String::new(), Some(packages.clone()))
            }
        };
        Ok(Self {
            requested: reference.clone(),
            reference,
            digest,
            base_dir,
            declared: Some((workload, index)),
            nix_packages,
            profile: declared.profile,
        })
    }

    fn image(
        image: &str,
        allow_unpinned: bool,
        profile: Profile,
        host: &Host,
    ) -> anyhow::Result<Self> {
        let base_dir = std::env::current_dir()?;
        if let Some((reference, digest)) = image.rsplit_once('@') {
            ImageRef::new(reference, digest, &base_dir).map_err(coded)?;
            return Ok(Self {
                reference: reference.to_string(),
                digest: digest.to_string(),
                requested: image.to_string(),
                base_dir,
                declared: None,
                nix_packages: None,
                profile: None,
            });
        }
        if !allow_unpinned || profile != Profile::Dev {
            return Err(coded_as(
                "OCI001",
                format!("{image:?} is not pinned: write REFERENCE@sha256:<digest> (or, for development, --allow-unpinned --profile dev)"),
            ));
        }
        let unpinned = || {
            coded_as(
                "OCI001",
                format!("{image:?} is not REGISTRY/REPOSITORY:TAG"),
            )
        };
        let (name, tag) = image
            .rsplit_once(':')
            .filter(|(_, tag)| !tag.contains('/'))
            .ok_or_else(unpinned)?;
        let (registry, repository) = name.split_once('/').ok_or_else(unpinned)?;
        let options = RegistryOptions {
            insecure_registries: insecure_registries(host)?,
            progress: false,
        };
        let digest = resolve_tag(registry, repository, tag, &options).map_err(coded)?;
        Ok(Self {
            reference: name.to_string(),
            digest,
            requested: image.to_string(),
            base_dir,
            declared: None,
            nix_packages: None,
            profile: None,
        })
    }

    /// The workload to record: the declared one, or one made for the image, running `command`
    /// (the image's Entrypoint and Cmd as `docker run` composes them with the command line's).
    fn workload(
        &self,
        command: &[String],
        resources: Resources,
        network: Network,
    ) -> anyhow::Result<(Workload, usize)> {
        if let Some(declared) = &self.declared {
            return Ok(declared.clone());
        }
        if command.is_empty() {
            return Err(coded_as(
                "BUILD007",
                "the image has no Entrypoint or Cmd: give the command after --",
            ));
        }
        let name: String = self
            .reference
            .rsplit(['/', ':'])
            .next()
            .unwrap_or_default()
            .chars()
            .map(|c| c.to_ascii_lowercase())
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            .take(63)
            .collect();
        let id = if name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            name
        } else {
            "image".into()
        };
        let workload = Workload {
            schema_version: SCHEMA_VERSION.into(),
            id,
            apps: vec![App {
                name: "main".into(),
                source: None,
                image: Image::OciBase {
                    reference: self.reference.clone(),
                    digest: self.digest.clone(),
                },
                resources,
                entrypoints: vec![Entrypoint::Command {
                    command: command.to_vec(),
                    cwd: None,
                }],
                env: Default::default(),
                network,
                mounts: vec![],
                files: vec![],
                health_check: None,
                threat_tier: Default::default(),
            }],
            volumes: vec![],
        };
        let report = validate(&workload);
        if report.has_errors() {
            return Err(mvm_ir::Error::InvalidWorkload(report).into());
        }
        Ok((workload, 0))
    }
}

/// Reads `--allow-host HOST[:PORT]`: a name, `*.SUFFIX` or IP literal (an IPv6 one in
/// brackets when a port follows), port 443 when none is given. The IR's validation judges the
/// host itself.
/// A profile's name, for `--profile`.
pub fn parse_profile(name: &str) -> Result<Profile, String> {
    Profile::from_name(name).ok_or_else(|| {
        format!("{name:?} is not a profile: restrictive, standard, dev or permissive")
    })
}

/// Refuses (BUILD011) an app its profile does not allow, before any work: network under
/// `restrictive`, resources over the profile's ceilings, `permissive` without its
/// acknowledgement.
fn profile_allows(profile: Profile, app: &App, acknowledged: bool) -> anyhow::Result<()> {
    let refuse = |why: String| Err(coded_as("BUILD011", why));
    if profile.needs_acknowledgement() && !acknowledged {
        return refuse(
            "the permissive profile drops the guest's syscall filter and widens every grant; \
             pass --ack-permissive to build it"
                .into(),
        );
    }
    let networked = (app.network.mode == NetworkMode::Allowlist
        && !app.network.egress.allowlist.is_empty())
        || !app.network.ports.is_empty();
    if networked && !profile.allows_network() {
        return refuse(format!(
            "app {}: the {profile} profile grants no egress and forwards no ports; \
             build with --profile standard or drop the app's network grants",
            app.name
        ));
    }
    let most = profile.ceilings();
    if app.resources.cpu_cores > most.cpu_cores || app.resources.memory_mb > most.memory_mb {
        return refuse(format!(
            "app {} asks for {} vCPUs and {} MiB; the {profile} profile allows at most {} and {} MiB",
            app.name, app.resources.cpu_cores, app.resources.memory_mb, most.cpu_cores, most.memory_mb
        ));
    }
    Ok(())
}

pub fn parse_grant(text: &str) -> Result<EgressGrant, String> {
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') || host.ends_with(']') => {
            let port = port
                .parse::<u16>()
                .ok()
                .filter(|port| *port != 0)
                .ok_or_else(|| format!("{port:?} is not a port (1-65535)"))?;
            (host, port)
        }
        _ => (text, 443),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err("no host".into());
    }
    Ok(EgressGrant {
        host: host.to_string(),
        port,
    })
}

/// The declaration a build path names: the file itself, or `mvm.toml` / `workload.json` in a
/// directory.
fn find_declaration(path: &Path) -> anyhow::Result<PathBuf> {
    if path.is_dir() {
        for name in super::declaration::FILE_NAMES {
            let candidate = path.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
        return Err(coded_as(
            "BUILD007",
            format!(
                "{} holds no mvm.toml, workload.json or workload.nix",
                path.display()
            ),
        ));
    }
    Ok(path.to_path_buf())
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    Ok(if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    })
}

/// A build replaces only an older bundle (or an empty directory), never other files.
fn check_replaceable(out: &Path) -> anyhow::Result<()> {
    if !out.exists() {
        return Ok(());
    }
    let is_bundle = out.join(PLAN_FILE).is_file();
    let is_empty = out.is_dir() && fs::read_dir(out)?.next().is_none();
    if is_bundle || is_empty {
        return Ok(());
    }
    Err(coded_as(
        "BUILD009",
        format!(
            "{} exists and is not a plan bundle; refusing to replace it",
            out.display()
        ),
    ))
}

/// Moves the finished staging directory to `out`, exchanging it with an older bundle there, so
/// `out` is always a whole bundle.
fn swap_in(staging: tempfile::TempDir, out: &Path) -> anyhow::Result<()> {
    let built = staging.keep();
    fs::set_permissions(&built, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    if out.exists() {
        // One atomic exchange: `out` is the old bundle, then the new one, never missing.
        use rustix::fs::{renameat_with, RenameFlags, CWD};
        renameat_with(CWD, &built, CWD, out, RenameFlags::EXCHANGE)
            .with_context(|| format!("replacing {}", out.display()))?;
        fs::remove_dir_all(&built)?;
    } else {
        fs::rename(&built, out)?;
    }
    Ok(())
}

/// Registries listed as reachable over plain HTTP in `$MVM_HOME/config.toml`:
/// `[registries] insecure = ["host:port"]`.
pub(super) fn insecure_registries(host: &Host) -> anyhow::Result<Vec<String>> {
    #[derive(serde::Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct Config {
        #[serde(default)]
        registries: Registries,
        /// The runner's (`mvm_runner::egress::config`), which checks it.
        #[serde(default, rename = "egress")]
        _egress: Option<toml::Value>,
        /// The runner's (`mvm_runner::forward`), which checks it.
        #[serde(default, rename = "ports")]
        _ports: Option<toml::Value>,
        /// `mvm serve`'s E2B template names (`commands::serve`), which it checks.
        #[serde(default, rename = "e2b")]
        _e2b: Option<toml::Value>,
        /// The host's ceilings (`mvm_runner::admission::host_policy`), which check them.
        #[serde(default, rename = "policy")]
        _policy: Option<toml::Value>,
    }
    #[derive(serde::Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct Registries {
        #[serde(default)]
        insecure: Vec<String>,
    }
    let path = host.home.root().join("config.toml");
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| path.display().to_string()),
    };
    let config: Config = toml::from_str(&text)
        .map_err(|e| coded_as("INPUT003", format!("{}: {}", path.display(), e.message())))?;
    Ok(config.registries.insecure)
}
