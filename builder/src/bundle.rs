//! Plan assembly: the trusted half of `mvm build`.
//!
//! Given the root filesystem the worker built, this adds the pinned kernel and an initramfs
//! (the guest agent as `/init` and the kernel modules it loads), hashes every file of the
//! bundle itself, resolves the policy from the workload, and produces the launch plan and the
//! provenance statement — unsigned: the caller signs them with a key the worker never sees.
//!
//! The guest learns its root filesystem's verity parameters from the kernel command line, which
//! the plan signs: `mvm.root_hash`, `mvm.salt`, `mvm.data_blocks`, `mvm.hash_offset`,
//! `mvm.block_size` (see `docs/guest-contract.md`). Device order: `/dev/vda` is the image,
//! `/dev/vdb` its hash tree.
//!
//! An image's own config is honoured as `docker run` honours it ([`image_argv`], [`image_env`],
//! [`ImageUser`]; `docs/run.md`), except that nothing runs as root and no loader, shell or
//! interpreter variable is taken from an image.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use serde::Serialize;
use serde_json::json;

use mvm_ir::digest::sha256_prefixed;
use mvm_ir::env::is_denied;
use mvm_ir::fsutil::atomic_write;
use mvm_ir::plan::{
    fresh_nonce, is_root_user, ArtifactPin, KernelPin, LaunchPlan, PlanEntrypoint, PlanResources,
    PlanService, Profile, ResolvedPolicy, RootfsPin, SecretBinding, Timestamp, VerityPin,
    SCHEMA_VERSION,
};
use mvm_ir::policy::Grants;
use mvm_ir::provenance::{
    BuildDefinition, Builder, Provenance, ResourceDescriptor, RunDetails, RunMetadata, Statement,
    BUILD_TYPE, PREDICATE_TYPE, STATEMENT_TYPE,
};
use mvm_ir::validate::{is_env_name, is_guest_path};
use mvm_ir::workload::{App, Entrypoint, EnvValue, NetworkMode, DEFAULT_MAX_RESTARTS};
use mvm_ir::{Coded, ErrorClass};

use crate::initramfs::Initramfs;
use crate::kernel::GuestKernel;
use crate::nix_image::NixClosure;
use crate::rootfs::{RootfsReport, ROOTFS_FILE, VERITY_FILE};
use crate::worker::SandboxReport;

/// File names in a bundle.
pub const KERNEL_FILE: &str = "vmlinuz";
/// The initramfs.
pub const INITRAMFS_FILE: &str = "initramfs";
/// Where the initramfs lists the modules to load, in order, one name a line.
pub const MODULE_LIST: &str = "etc/mvm/modules";

/// Why a bundle could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The plan broke a plan rule (a bug if it happens: the IR was validated).
    #[error("assembled plan is invalid: {0}")]
    Plan(#[from] mvm_ir::Error),
    /// The initramfs could not be written.
    #[error(transparent)]
    Initramfs(#[from] crate::initramfs::InitramfsError),
}

impl Coded for BundleError {
    fn code(&self) -> &str {
        match self {
            BundleError::Io { .. } => "BUILD003",
            BundleError::Plan(e) => e.code(),
            BundleError::Initramfs(_) => "BUILD006",
        }
    }

    /// A bundle file that could not be written (BUILD003) is I/O; an `mvm_ir` error keeps its
    /// own class.
    fn class(&self) -> ErrorClass {
        match self {
            BundleError::Io { .. } => ErrorClass::Io,
            BundleError::Plan(e) => e.class(),
            BundleError::Initramfs(_) => ErrorClass::InvalidInput,
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Everything assembly needs.
pub struct AssembleInput<'a> {
    /// The workload's id.
    pub workload_id: &'a str,
    /// The app being built.
    pub app: &'a App,
    /// `sha256:` of the workload's canonical IR.
    pub ir_digest: &'a str,
    /// The image as the workload names it (for provenance).
    pub image: &'a str,
    /// What the worker built.
    pub rootfs: &'a RootfsReport,
    /// For a Nix image: the closure it holds (recorded as the resolved dependencies).
    pub nix: Option<&'a NixClosure>,
    /// How the worker was confined.
    pub sandbox: &'a SandboxReport,
    /// The builder VM the worker ran in (the VM persona); none for the host persona.
    pub builder_vm: Option<&'a BuilderVm>,
    /// The verified guest kernel.
    pub kernel: &'a GuestKernel,
    /// The guest agent binary, `/init` of the initramfs.
    pub agent: &'a Path,
    /// The bundle directory (holding the worker's two files already).
    pub out_dir: &'a Path,
    /// The policy profile.
    pub profile: Profile,
    /// Clients may run only the entrypoint's program and change no file
    /// ([`mvm_ir::policy::Grants::any_command`] taken away).
    pub only_entrypoint: bool,
    /// Validity window.
    pub valid_from: Timestamp,
    /// Validity window end.
    pub valid_until: Timestamp,
    /// When the build started.
    pub started: Timestamp,
}

/// The builder VM a build ran in, named in its provenance: its signed plan and its image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BuilderVm {
    /// `sha256:` of the builder's plan payload.
    pub plan_digest: String,
    /// The builder image's digest, when the builder runs the image fetched now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
}

/// An assembled, unsigned bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The launch plan.
    pub plan: LaunchPlan,
    /// The provenance; its plan subject is the digest of `plan`'s canonical JSON.
    pub provenance: Statement,
    /// `sha256:` of the root filesystem image.
    pub rootfs_digest: String,
    /// What of the image's config was not honoured as asked, one line each, for stderr: root
    /// mapped to the workload user, loader and interpreter variables dropped.
    pub warnings: Vec<String>,
}

/// The workload user, whom commands run as when nothing else is named.
pub const WORKLOAD_UID: u32 = 1000;

/// The argv of an image as `docker run` composes it: the Entrypoint (or `--entrypoint`, one
/// program, which also drops the image's Cmd; empty clears the Entrypoint) followed by the
/// command given after `--`, else the Cmd. Empty when there is nothing to run.
pub fn image_argv(
    entrypoint: &[String],
    cmd: &[String],
    entrypoint_flag: Option<&str>,
    command: &[String],
) -> Vec<String> {
    let (entrypoint, cmd): (Vec<String>, &[String]) = match entrypoint_flag {
        Some("") => (Vec::new(), &[]),
        Some(program) => (vec![program.to_string()], &[]),
        None => (entrypoint.to_vec(), cmd),
    };
    let args = if command.is_empty() { cmd } else { command };
    entrypoint.into_iter().chain(args.iter().cloned()).collect()
}

/// Whom the image's `User` makes the plan's commands run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageUser {
    /// No `User` (or an empty one): the workload user.
    Workload,
    /// This user, resolved in the guest from the image's `/etc/passwd`.
    As(String),
    /// Root (`root`, `0`, `0:0`): the workload user instead, said once.
    RootMapped,
    /// A user with root's group (`1001:0`): the user with its own primary group, said once.
    RootGroupDropped(String),
}

impl ImageUser {
    /// The image config's `User`, as mvm honours it: never root.
    pub fn of(spec: Option<&str>) -> Self {
        let Some(spec) = spec.filter(|s| !s.is_empty()) else {
            return ImageUser::Workload;
        };
        if !is_root_user(spec) {
            return ImageUser::As(spec.to_string());
        }
        match spec.split_once(':') {
            Some((user, _)) if !user.is_empty() && !is_root_user(user) => {
                ImageUser::RootGroupDropped(user.to_string())
            }
            _ => ImageUser::RootMapped,
        }
    }

    /// The plan's default user.
    pub fn plan_user(&self) -> Option<String> {
        match self {
            ImageUser::Workload | ImageUser::RootMapped => None,
            ImageUser::As(user) | ImageUser::RootGroupDropped(user) => Some(user.clone()),
        }
    }

    /// The line to say when the image's `User` is not honoured as written.
    pub fn warning(&self) -> Option<String> {
        match self {
            ImageUser::RootMapped => Some(format!(
                "the image runs as root; mvm runs it as the workload user {WORKLOAD_UID}"
            )),
            ImageUser::RootGroupDropped(user) => Some(format!(
                "the image runs as {user} in root's group; mvm runs it as {user} with its own group"
            )),
            ImageUser::Workload | ImageUser::As(_) => None,
        }
    }
}

/// The plan's environment from the image's `Env` under the workload's `env` (which wins by
/// name; `taken` names the workload's secret variables, which win too), and the names dropped
/// because they change how the loader, a shell or an interpreter behaves (`LD_PRELOAD`, …):
/// an image never sets those for every command.
pub fn image_env(
    env: &mut BTreeMap<String, String>,
    taken: &[&str],
    image_env: &[String],
) -> Vec<String> {
    let mut dropped = Vec::new();
    for pair in image_env {
        let Some((name, value)) = pair.split_once('=') else {
            continue;
        };
        if env.contains_key(name) || taken.contains(&name) {
            continue;
        }
        if is_denied(name) {
            if !dropped.iter().any(|d| d == name) {
                dropped.push(name.to_string());
            }
        } else if is_env_name(name) && !value.contains('\0') {
            env.insert(name.to_string(), value.to_string());
        }
    }
    dropped
}

/// What kind of build produced a Nix image's subjects.
pub const NIX_BUILD_TYPE: &str = "https://mvm.dev/build/nix-rootfs/v1";

/// Writes the kernel and initramfs into the bundle and builds the plan and provenance.
pub fn assemble(input: &AssembleInput<'_>) -> Result<Bundle, BundleError> {
    let out = input.out_dir;
    let kernel_bytes = fs::read(input.kernel.path(&input.kernel.manifest.vmlinuz))
        .map_err(io(&input.kernel.dir))?;
    // The kernel was verified when its store opened it; hash what is copied, not what was.
    let kernel_digest = sha256_prefixed(&kernel_bytes);
    if kernel_digest != input.kernel.manifest.vmlinuz.digest {
        return Err(BundleError::Io {
            path: input.kernel.dir.display().to_string(),
            source: std::io::Error::other("the kernel changed after it was verified"),
        });
    }
    atomic_write(&out.join(KERNEL_FILE), &kernel_bytes, 0o644)?;

    let agent = fs::read(input.agent).map_err(io(input.agent))?;
    let agent_digest = sha256_prefixed(&agent);
    let mut initramfs = Initramfs::new();
    initramfs.add_file("init", 0o755, agent)?;
    let mut module_list = String::new();
    for module in &input.kernel.manifest.modules {
        let path = input.kernel.path(&module.file);
        let bytes = fs::read(&path).map_err(io(&path))?;
        if sha256_prefixed(&bytes) != module.file.digest {
            return Err(BundleError::Io {
                path: path.display().to_string(),
                source: std::io::Error::other("module changed after it was verified"),
            });
        }
        initramfs.add_file(&format!("lib/modules/{}.ko", module.name), 0o644, bytes)?;
        module_list.push_str(&module.name);
        module_list.push('\n');
    }
    initramfs.add_file(MODULE_LIST, 0o644, module_list.into_bytes())?;
    let mut initramfs_bytes = Vec::new();
    initramfs.write_gzip(&mut initramfs_bytes)?;
    atomic_write(&out.join(INITRAMFS_FILE), &initramfs_bytes, 0o644)?;
    let initramfs_digest = sha256_prefixed(&initramfs_bytes);

    let rootfs_digest = hash_file(&out.join(ROOTFS_FILE))?;
    let verity_digest = hash_file(&out.join(VERITY_FILE))?;
    let r = input.rootfs;
    let app = input.app;
    let egress = if app.network.mode == NetworkMode::Allowlist {
        app.network.egress.allowlist.clone()
    } else {
        Vec::new()
    };
    let grants = Grants {
        any_command: !input.only_entrypoint,
        ..input
            .profile
            .grants(!egress.is_empty() || !app.network.ports.is_empty())
    };
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 quiet mvm.root_hash={} mvm.salt={} mvm.data_blocks={} mvm.hash_offset={} mvm.block_size={} {}",
        r.root_hash, r.salt, r.data_blocks, r.hash_offset, r.data_block_size, grants.cmdline_word()
    );

    let mut env = BTreeMap::new();
    let mut secrets = Vec::new();
    for (name, value) in &app.env {
        match value {
            EnvValue::Literal { value } => {
                env.insert(name.clone(), value.clone());
            }
            EnvValue::SecretRef {
                name: secret,
                optional,
            } => secrets.push(SecretBinding {
                env: name.clone(),
                name: secret.clone(),
                optional: *optional,
            }),
        }
    }
    // The image's own environment (PATH above all) under the workload's: what the workload sets
    // wins, and loader, shell and interpreter variables are never taken from an image either.
    let secret_names: Vec<&str> = secrets.iter().map(|s| s.env.as_str()).collect();
    let dropped = image_env(&mut env, &secret_names, &r.env);
    let mut warnings = Vec::new();
    if !dropped.is_empty() {
        warnings.push(format!(
            "the image sets {}; mvm never passes loader, shell or interpreter variables to commands, so they are dropped",
            dropped.join(", ")
        ));
    }
    let user = ImageUser::of(r.user.as_deref());
    warnings.extend(user.warning());
    let (command, cwd) = (app.entrypoints[0].command(), app.entrypoints[0].cwd());
    // The image's WorkingDir when absolute (a relative one means `/`, the agent's default).
    let image_cwd = r.working_dir.clone().filter(|d| is_guest_path(d));
    let cwd = cwd.map(str::to_string).or_else(|| image_cwd.clone());
    let services: Vec<PlanService> = app
        .entrypoints
        .iter()
        .filter_map(|entrypoint| match entrypoint {
            Entrypoint::Service {
                name,
                command,
                cwd,
                restart,
                max_restarts,
            } => Some(PlanService {
                name: name.clone(),
                command: command.clone(),
                cwd: cwd.clone().or_else(|| image_cwd.clone()),
                restart: *restart,
                max_restarts: max_restarts.unwrap_or(DEFAULT_MAX_RESTARTS),
            }),
            Entrypoint::Command { .. } => None,
        })
        .collect();
    // Probed only where there is a service to probe (IR103 warns otherwise).
    let health_check = app.health_check.clone().filter(|_| !services.is_empty());
    let plan = LaunchPlan {
        schema_version: SCHEMA_VERSION.to_string(),
        workload_id: input.workload_id.to_string(),
        app: app.name.clone(),
        ir_digest: input.ir_digest.to_string(),
        kernel: KernelPin {
            path: KERNEL_FILE.into(),
            digest: kernel_digest.clone(),
            cmdline,
        },
        initramfs: ArtifactPin {
            path: INITRAMFS_FILE.into(),
            digest: initramfs_digest.clone(),
        },
        rootfs: RootfsPin {
            path: ROOTFS_FILE.into(),
            digest: rootfs_digest.clone(),
            verity: VerityPin {
                path: VERITY_FILE.into(),
                digest: verity_digest,
                root_hash: r.root_hash.clone(),
                salt: r.salt.clone(),
                hash_algorithm: "sha256".into(),
                data_block_size: r.data_block_size,
                hash_block_size: r.hash_block_size,
                data_blocks: r.data_blocks,
                hash_offset: r.hash_offset,
            },
        },
        resources: PlanResources {
            cpu_cores: app.resources.cpu_cores,
            memory_mb: app.resources.memory_mb,
        },
        policy: ResolvedPolicy {
            profile: input.profile,
            grants,
            network: app.network.mode,
            // Grants only take effect with an allowlist network (IR101 warns otherwise).
            egress,
            ports: app.network.ports.clone(),
            env,
            secrets,
            mounts: app.mounts.clone(),
        },
        entrypoint: PlanEntrypoint {
            command: command.to_vec(),
            cwd,
            user: user.plan_user(),
        },
        services,
        health_check,
        valid_from: input.valid_from,
        valid_until: input.valid_until,
        nonce: fresh_nonce()?,
        single_use: false,
    };
    plan.check()?;
    let plan_digest = sha256_prefixed(&mvm_ir::canonical::to_vec(&plan)?);

    let mut dependencies = match input.nix {
        None => oci_dependencies(input.image, r),
        Some(closure) => nix_dependencies(input.image, closure),
    };
    let package = &input.kernel.manifest.package;
    dependencies.push(ResourceDescriptor::sha256(
        Some(format!("kernel {}", input.kernel.manifest.release)),
        Some(format!(
            "pkg:deb/debian/{}@{}?arch=amd64",
            package.name, package.version
        )),
        &package.digest,
    ));
    dependencies.push(ResourceDescriptor::sha256(
        Some("mvm-agent".into()),
        None,
        &agent_digest,
    ));
    let persona = match input.builder_vm {
        Some(_) => "vm",
        None => "host",
    };
    let provenance = Statement {
        statement_type: STATEMENT_TYPE.into(),
        subject: vec![
            ResourceDescriptor::sha256(Some(ROOTFS_FILE.into()), None, &rootfs_digest),
            ResourceDescriptor::sha256(Some("plan".into()), None, &plan_digest),
            ResourceDescriptor::sha256(Some(INITRAMFS_FILE.into()), None, &initramfs_digest),
        ],
        predicate_type: PREDICATE_TYPE.into(),
        predicate: Provenance {
            build_definition: BuildDefinition {
                build_type: if input.nix.is_some() {
                    NIX_BUILD_TYPE.into()
                } else {
                    BUILD_TYPE.into()
                },
                external_parameters: json!({
                    "workload": input.workload_id,
                    "app": app.name,
                    "ir_digest": input.ir_digest,
                    "image": input.image,
                    "profile": input.profile,
                }),
                internal_parameters: json!({
                    "persona": persona,
                    "builder_vm": input.builder_vm,
                    "sandbox": input.sandbox,
                    "verity": {"root_hash": r.root_hash, "salt": r.salt},
                    "skipped_entries": r.skipped,
                    "compression": r.compression,
                }),
                resolved_dependencies: dependencies,
            },
            run_details: RunDetails {
                builder: Builder {
                    id: format!(
                        "https://mvm.dev/builder/{persona}@{}",
                        env!("CARGO_PKG_VERSION")
                    ),
                },
                metadata: RunMetadata {
                    invocation_id: plan.nonce.clone(),
                    started_on: input.started.to_string(),
                    finished_on: Timestamp::now().to_string(),
                },
            },
        },
    };
    Ok(Bundle {
        plan,
        provenance,
        rootfs_digest,
        warnings,
    })
}

fn hash_file(path: &Path) -> Result<String, BundleError> {
    let file = fs::File::open(path).map_err(io(path))?;
    Ok(mvm_ir::digest::sha256_reader(file).map_err(io(path))?.0)
}

/// An OCI image's dependencies: the image, its platform manifest, its layers.
fn oci_dependencies(image: &str, r: &RootfsReport) -> Vec<ResourceDescriptor> {
    let mut described = ResourceDescriptor::sha256(
        Some("image".into()),
        Some(format!("oci:{image}")),
        &r.image_digest,
    );
    // What the image says of itself, recorded, never acted on: its labels and the ports it
    // declares (nothing is forwarded unless the workload grants it).
    if !r.labels.is_empty() {
        described
            .annotations
            .insert("labels".into(), json!(r.labels));
    }
    if !r.exposed_ports.is_empty() {
        described
            .annotations
            .insert("exposed_ports".into(), json!(r.exposed_ports));
    }
    let mut dependencies = vec![described];
    if r.manifest_digest != r.image_digest {
        dependencies.push(ResourceDescriptor::sha256(
            Some("image manifest (linux/amd64)".into()),
            None,
            &r.manifest_digest,
        ));
    }
    for layer in &r.layers {
        dependencies.push(ResourceDescriptor::sha256(
            Some(format!("layer {}", layer.media_type)),
            None,
            &layer.digest,
        ));
    }
    dependencies
}

/// A Nix image's dependencies: the closure as a whole, each package's derivation, and every
/// store path of the closure with the sha256 of its NAR (as `nix-store -q --hash` gives it).
fn nix_dependencies(image: &str, closure: &NixClosure) -> Vec<ResourceDescriptor> {
    let mut dependencies = vec![ResourceDescriptor::sha256(
        Some("nix closure".into()),
        Some(image.to_string()),
        &closure.digest(),
    )];
    for package in &closure.packages {
        dependencies.push(ResourceDescriptor::sha256(
            Some(format!("nix package {}", package.attr)),
            Some(package.drv.clone()),
            &package.drv_sha256,
        ));
    }
    for path in &closure.paths {
        dependencies.push(ResourceDescriptor::sha256(
            Some(path.path.clone()),
            None,
            &path.nar_sha256,
        ));
    }
    dependencies
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    /// `docker run IMAGE`: Entrypoint then Cmd; `docker run IMAGE ARGS`: ARGS replace Cmd.
    #[test]
    fn argv_is_entrypoint_then_command_or_cmd() {
        let entrypoint = strings(&["/bin/sh", "-c"]);
        let cmd = strings(&["echo default"]);
        assert_eq!(
            image_argv(&entrypoint, &cmd, None, &[]),
            strings(&["/bin/sh", "-c", "echo default"])
        );
        assert_eq!(
            image_argv(&entrypoint, &cmd, None, &strings(&["echo replaced"])),
            strings(&["/bin/sh", "-c", "echo replaced"])
        );
        // No Entrypoint: the command, or the Cmd, is the whole argv.
        assert_eq!(
            image_argv(&[], &strings(&["/bin/sh"]), None, &strings(&["ls", "/"])),
            strings(&["ls", "/"])
        );
        assert_eq!(
            image_argv(&[], &strings(&["/bin/sh"]), None, &[]),
            strings(&["/bin/sh"])
        );
        // Nothing at all: nothing to run (the build refuses with BUILD007).
        assert!(image_argv(&[], &[], None, &[]).is_empty());
    }

    /// `docker run --entrypoint X IMAGE [ARGS]`: X replaces the Entrypoint and the image's Cmd
    /// is dropped; `--entrypoint ""` clears the Entrypoint.
    #[test]
    fn entrypoint_flag_replaces_entrypoint_and_drops_cmd() {
        let entrypoint = strings(&["/bin/sh", "-c"]);
        let cmd = strings(&["echo default"]);
        assert_eq!(
            image_argv(&entrypoint, &cmd, Some("/bin/echo"), &[]),
            strings(&["/bin/echo"])
        );
        assert_eq!(
            image_argv(
                &entrypoint,
                &cmd,
                Some("/bin/echo"),
                &strings(&["hi", "there"])
            ),
            strings(&["/bin/echo", "hi", "there"])
        );
        assert_eq!(
            image_argv(&entrypoint, &cmd, Some(""), &strings(&["/bin/id"])),
            strings(&["/bin/id"])
        );
        assert!(image_argv(&entrypoint, &cmd, Some(""), &[]).is_empty());
    }

    /// The image's Env is the base; the workload's variables and secrets win by name; loader,
    /// shell and interpreter variables are dropped and named once.
    #[test]
    fn image_env_is_the_base_and_denied_names_are_dropped() {
        let mut env = BTreeMap::from([("MODE".to_string(), "workload".to_string())]);
        let dropped = image_env(
            &mut env,
            &["TOKEN"],
            &strings(&[
                "PATH=/usr/bin:/bin",
                "MODE=image",
                "TOKEN=from-image",
                "GREETING=a=b",
                "LD_PRELOAD=/evil.so",
                "NODE_OPTIONS=--require /evil.js",
                "LD_PRELOAD=/again.so",
                "NOEQUALS",
                "bad name=x",
            ]),
        );
        assert_eq!(dropped, strings(&["LD_PRELOAD", "NODE_OPTIONS"]));
        assert_eq!(
            env,
            BTreeMap::from([
                ("GREETING".to_string(), "a=b".to_string()),
                ("MODE".to_string(), "workload".to_string()),
                ("PATH".to_string(), "/usr/bin:/bin".to_string()),
            ])
        );
    }

    /// `USER name`, `uid`, `uid:gid`, `name:gid` become the plan's default user; root, by
    /// name or number, is mapped to the workload user and said; root's group is dropped.
    #[test]
    fn image_user_is_the_default_and_never_root() {
        for spec in ["app", "2000", "2000:2001", "app:2001"] {
            let user = ImageUser::of(Some(spec));
            assert_eq!(user.plan_user().as_deref(), Some(spec));
            assert_eq!(user.warning(), None);
        }
        for spec in [None, Some("")] {
            assert_eq!(ImageUser::of(spec), ImageUser::Workload);
            assert_eq!(ImageUser::of(spec).plan_user(), None);
        }
        for spec in ["root", "0", "0:0", "root:root", "0:2000", "000"] {
            let user = ImageUser::of(Some(spec));
            assert_eq!(user, ImageUser::RootMapped, "{spec}");
            assert_eq!(user.plan_user(), None);
            assert_eq!(
                user.warning().unwrap(),
                "the image runs as root; mvm runs it as the workload user 1000"
            );
        }
        for (spec, kept) in [("1001:0", "1001"), ("app:root", "app")] {
            let user = ImageUser::of(Some(spec));
            assert_eq!(user.plan_user().as_deref(), Some(kept));
            assert!(user.warning().unwrap().contains("root's group"));
        }
    }
}
