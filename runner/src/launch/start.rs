//! A launch up to a running VM process: the plan admitted, the VM's directory and private
//! files made, the backend started (QEMU, the own VMM, or the own VMM jailed).

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mvm_ir::admission::{NonceLedger, PlanAdmission, VerifiedPlan};
use mvm_ir::audit::HostAudit;
use mvm_ir::keys::KeyStore;
use mvm_ir::volume::VolumeError;
use mvm_ir::Coded;
use serde_json::json;

use super::restore;
use super::vm_dir::{Keep, VmDir};
use super::{Failure, Launch, LaunchError};
use crate::admission::host_policy::HostPolicy;
use crate::admission::{admit_bundle, AdmissionError};
use crate::backend::kvm::jailed::{self, Jail, JailError, JailedVm};
use crate::backend::kvm::{spec_for_plan, OwnVm, OwnVmFiles, VERSION as OWN_VMM_VERSION};
use crate::backend::qemu::{self, VmFiles};
use crate::backend::select::{self, Accel, Backend, HostError, HostFacts};
use crate::backend::VmProcess;
use crate::cold::{self, ColdError, ColdState};
use crate::disk::{LaunchDisk, VolumeSpec};
use crate::secrets::LaunchSecrets;
use mvm_vmm::{VmSpec, VmmError};

/// A launch up to a VM process running: the plan admitted, the VM's directory and private
/// files made, QEMU started, `vm.started` recorded.
pub(super) struct Started<T> {
    pub(super) audit: Arc<HostAudit>,
    pub(super) plan: VerifiedPlan,
    /// What the caller settled on the verified plan before it was used up.
    pub(super) settled: T,
    /// The launch's secrets, resolved from the host's store.
    pub(super) secrets: LaunchSecrets,
    pub(super) accel: Accel,
    pub(super) vm: String,
    pub(super) dir: VmDir,
    /// The socket QEMU connects the agent channel to (none for the own VMM).
    pub(super) listener: Option<UnixListener>,
    pub(super) socket: PathBuf,
    pub(super) vm_process: VmProcess,
    /// The key of the boot snapshot the VM was restored from (its guest must be renewed).
    pub(super) restored: Option<String>,
    /// The launch's disks and volumes (its own, then the plan's mounts), in the order the
    /// guest sees them.
    pub(super) disks: Vec<LaunchDisk>,
    /// The launch's disks, locked to this VM for as long as these are open.
    pub(super) disk_locks: Vec<File>,
}

/// Where a launch's VM comes from.
pub(super) enum Origin<'a> {
    /// A fresh boot, in a new directory that keeps what [`Keep`] says.
    Boot(Keep),
    /// A cold VM woken: its directory (locked) and its verified state (the own VMM restores
    /// from it as it starts; QEMU is streamed it once started).
    Wake(VmDir, &'a mut ColdState),
}

/// The most bytes of names and values a launch's environment may hold: a cold VM's manifest
/// keeps it, and a manifest is read back only up to its own bound.
const MAX_LAUNCH_ENV_BYTES: usize = 32 * 1024;

/// Refuses (RUN060) a launch's environment its plan's profile or the host's policy does not
/// let a client set, that names a denied variable, or that is larger than
/// [`MAX_LAUNCH_ENV_BYTES`].
fn launch_env_allowed(
    host_policy: &HostPolicy,
    plan: &VerifiedPlan,
    env: &std::collections::BTreeMap<String, String>,
) -> Result<(), AdmissionError> {
    let refuse = |reason: String| AdmissionError::NotRunnable {
        code: crate::codes::RUN060.into(),
        reason,
    };
    host_policy.client_env(&plan.plan).map_err(refuse)?;
    let bytes: usize = env
        .iter()
        .map(|(name, value)| name.len() + value.len())
        .sum();
    if bytes > MAX_LAUNCH_ENV_BYTES {
        return Err(refuse(format!(
            "the launch's environment holds {bytes} bytes; at most {MAX_LAUNCH_ENV_BYTES} are passed"
        )));
    }
    match env.keys().find(|name| !mvm_ir::validate::is_env_name(name) || mvm_ir::env::is_denied(name)) {
        Some(name) => Err(refuse(format!(
            "environment variable {name:?} is never passed to a workload (docs/ir.md#the-environment-denylist)"
        ))),
        None => Ok(()),
    }
}

/// The launch's disks and volumes, then the volumes its plan mounts (the IR's `mounts`), each
/// unsealed from this host's volume store; at most [`crate::disk::MAX_DISKS`].
fn launch_disks(launch: &Launch, plan: &VerifiedPlan) -> Result<Vec<LaunchDisk>, LaunchError> {
    let mut disks = launch.disks.clone();
    for mount in &plan.plan.policy.mounts {
        if !mvm_protocol::is_mount_point(&mount.target) {
            let reason = format!(
                "the plan mounts a volume at {:?}, which cannot be one",
                mount.target
            );
            return Err(LaunchError::Disk(reason));
        }
        let spec = VolumeSpec {
            name: mount.volume.clone(),
            path: mount.target.clone(),
            read_only: mount.read_only,
        };
        let disk = spec.resolve(&launch.home).map_err(|e| match e {
            VolumeError::Unknown(_) => VolumeError::Unknown(format!(
                "the plan mounts volume {} at {}, which this host does not have: make it with \
                 `mvm volume create {} --size SIZE`",
                mount.volume, mount.target, mount.volume
            )),
            other => other,
        })?;
        disks.push(disk);
    }
    if disks.len() > crate::disk::MAX_DISKS {
        let reason = format!("at most {} disks and volumes", crate::disk::MAX_DISKS);
        return Err(LaunchError::Disk(reason));
    }
    Ok(disks)
}

pub(super) fn start<T>(
    launch: &Launch,
    origin: Origin<'_>,
    settle: impl FnOnce(&VerifiedPlan) -> Result<T, AdmissionError>,
) -> Result<Started<T>, Box<Failure>> {
    let again = match &origin {
        Origin::Boot(_) => None,
        Origin::Wake(_, saved) => Some(saved.manifest.plan_digest.clone()),
    };
    let again = again.as_deref();
    let audit = Arc::new(HostAudit::open(&launch.home).map_err(LaunchError::Audit)?);
    let trust = KeyStore::new(launch.home.clone())
        .trust_store()
        .map_err(|e| LaunchError::Refused(e.into()))?;
    let ledger = NonceLedger::in_home(&launch.home).map_err(|e| LaunchError::Refused(e.into()))?;
    let admission = PlanAdmission::new(trust, ledger);
    // The command and the backend are settled on the verified plan, before a single-use plan
    // is used up; only then is `/dev/kvm` looked at or QEMU asked its version.
    let admitted = admit_bundle(
        &launch.envelope,
        &admission,
        time::OffsetDateTime::now_utc(),
        again,
        |verified| {
            let host_policy = HostPolicy::load(&launch.home)
                .and_then(|policy| policy.check(&verified.plan).map(|()| policy))
                .map_err(|e| AdmissionError::NotRunnable {
                    code: crate::codes::RUN059.into(),
                    reason: e.to_string(),
                })?;
            if !launch.env.is_empty() {
                launch_env_allowed(&host_policy, verified, &launch.env)?;
            }
            let wanted = crate::secrets::Wanted {
                env: &launch.secrets,
                files: &launch.secret_files,
                placeholders: &launch.placeholders,
            };
            let secrets = crate::secrets::resolve(&launch.home, &verified.plan, &wanted)?;
            let settled = settle(verified)?;
            let unavailable = |e: HostError| AdmissionError::NotRunnable {
                code: e.code().into(),
                reason: e.to_string(),
            };
            // One look at the host: the QEMU it found is the one that runs.
            let facts = HostFacts::detect();
            let selected = select::select(launch.backend, &facts).map_err(unavailable)?;
            let qemu = match selected.backend {
                Backend::Qemu => Some(facts.qemu.map_err(unavailable)?),
                Backend::Kvm => None,
            };
            Ok((settled, secrets, selected.accel, qemu))
        },
    );
    let (admitted, (settled, secrets, accel, qemu)) = match admitted {
        Ok(admitted) => admitted,
        Err(error) => {
            let fields = json!({"plan": launch.envelope, "code": error.code()});
            // The refusal stands whether or not it could be recorded.
            let _ = audit.append("plan.refused", fields);
            return Err(LaunchError::Refused(error).into());
        }
    };
    let plan = admitted.plan;
    let woken = again.is_some();
    let (vm, dir, saved) = match origin {
        Origin::Boot(keep) => {
            let vm = format!(
                "vm-{}",
                &mvm_ir::plan::fresh_nonce().map_err(LaunchError::Audit)?[..12]
            );
            let dir = VmDir::create(&launch.home, &vm, keep)?;
            (vm, dir, None)
        }
        Origin::Wake(dir, saved) => (saved.manifest.vm.clone(), dir, Some(saved)),
    };
    audit
        .append(
            match woken {
                true => "plan.readmitted",
                false => "plan.admitted",
            },
            json!({
                "vm": vm,
                "name": dir.name(),
                "plan_digest": plan.digest,
                "signer": plan.keyid,
                "workload": plan.plan.workload_id,
                "app": plan.plan.app,
                "single_use": plan.plan.single_use,
            }),
        )
        .map_err(LaunchError::Audit)?;

    let disks = launch_disks(launch, &plan)?;
    let disk_locks = disks
        .iter()
        .map(|disk| disk.lock().map_err(LaunchError::Disk))
        .collect::<Result<Vec<_>, _>>()?;
    for disk in &disks {
        if let Some(volume) = &disk.volume {
            let fields = json!({"vm": vm, "volume": volume.name, "path": disk.path,
                                "read_only": disk.read_only});
            audit
                .append("volume.attached", fields)
                .map_err(LaunchError::Audit)?;
        }
    }
    let kernel = dir.private_copy("kernel", &admitted.artifacts.kernel)?;
    let initramfs = dir.private_copy("initramfs", &admitted.artifacts.initramfs)?;
    let socket = dir.path.join("agent.sock");
    let serial_log = dir.serial_log(woken)?;
    let mut restored = None;
    let this = restore::ForLaunch {
        launch,
        audit: &audit,
        vm: &vm,
        dir: &dir,
        serial_log: &serial_log,
    };
    let (listener, vm_process) = match qemu {
        Some(qemu) => {
            let listener =
                UnixListener::bind(&socket).map_err(LaunchError::host("agent socket"))?;
            fs::set_permissions(&socket, fs::Permissions::from_mode(0o600))
                .map_err(LaunchError::host("agent socket"))?;
            listener
                .set_nonblocking(true)
                .map_err(LaunchError::host("agent socket"))?;
            let files = VmFiles {
                kernel: &kernel,
                initramfs: &initramfs,
                rootfs: &admitted.artifacts.rootfs,
                verity: &admitted.artifacts.verity,
                agent_socket: &socket,
                qmp_socket: &dir.path.join(qemu::QMP_SOCKET),
                disks: &disks,
            };
            let mut args = qemu::arguments(&plan.plan, &files, accel);
            let backend = restore::SnapshotBackend {
                name: "qemu",
                version: qemu.version.to_string(),
                accel,
            };
            let shape = match woken {
                true => None,
                false => restore::shape_for(launch, &plan, &admitted.artifacts, backend),
            };
            let snapshot = match shape {
                Some(shape) => {
                    let booting = restore::Booting::Qemu {
                        qemu: &qemu.path,
                        args: &args,
                        listener: &listener,
                    };
                    let found = restore::snapshot_for(this, &shape, |_| Ok(()), booting);
                    match found {
                        Ok((snapshot, ())) => Some(snapshot),
                        Err(unmade) => return Err(unmade.failure(dir)),
                    }
                }
                None => None,
            };
            match (&snapshot, &saved) {
                (Some(snapshot), _) => args.extend(restore::restore_arguments(snapshot, &dir)?),
                (None, Some(saved)) => {
                    // Restored from a boot snapshot before it was saved: its RAM is named so.
                    if saved.manifest.named_ram {
                        args.extend(qemu::command_line::named_ram_arguments(u64::from(
                            plan.plan.resources.memory_mb,
                        )));
                    }
                    let socket = dir.path.join(cold::WAKE_SOCKET);
                    let incoming = qemu::migration::incoming_argument(&socket)
                        .map_err(|e| ColdError::Wake(e.to_string()))
                        .map_err(LaunchError::from)?;
                    args.extend(["-incoming".into(), incoming.into()]);
                }
                (None, None) => {}
            }
            let mut vm_process =
                VmProcess::Qemu(qemu::spawn(&qemu.path, &args, serial_log).map_err(|e| {
                    LaunchError::Backend(format!("starting {}: {e}", qemu.path.display()))
                })?);
            if let Some(mut snapshot) = snapshot {
                if let Err(e) = restore::restore(launch, &dir, &mut vm_process, &mut snapshot) {
                    vm_process.kill();
                    return Err(failure(e, &vm_process, dir));
                }
                restored = Some(snapshot.manifest.key);
            }
            (Some(listener), vm_process)
        }
        None => {
            let files = OwnVmFiles {
                kernel: &kernel,
                initramfs: &initramfs,
                rootfs: &admitted.artifacts.rootfs,
                verity: &admitted.artifacts.verity,
                disks: &disks,
            };
            // `VmmError` is not `mvm_ir::Coded` (mvm-vmm depends on no other mvm crate, and
            // the orphan rule keeps the runner from implementing the trait for it): its
            // inherent code goes into the message of the RUN023 that carries it.
            let vmm_failed = |e: VmmError| LaunchError::Backend(format!("{}: {e}", e.code()));
            let spec = VmSpec {
                huge_pages: launch.huge_pages,
                ..spec_for_plan(&plan.plan, &files).map_err(vmm_failed)?
            };
            let backend = restore::SnapshotBackend {
                name: "kvm",
                version: OWN_VMM_VERSION.into(),
                accel,
            };
            let shape = match woken {
                true => None,
                false => restore::shape_for(launch, &plan, &admitted.artifacts, backend),
            };
            let vm = match (launch.jail, saved, shape) {
                (Some(_), Some(_), _) => {
                    let reason = "a jailed VM is never saved cold".to_string();
                    return Err(LaunchError::from(ColdError::Wake(reason)).into());
                }
                (Some(jail), None, _) => {
                    VmProcess::Jailed(boot_jailed(jail, &dir, &spec, serial_log)?)
                }
                (None, Some(saved), _) => VmProcess::Own(
                    OwnVm::restore(spec, serial_log, &mut saved.memory, &saved.manifest.memory)
                        .map_err(|e| LaunchError::from(ColdError::from(e)))?,
                ),
                (None, None, Some(shape)) => {
                    let booting = restore::Booting::Own(&spec);
                    let found =
                        restore::snapshot_for(this, &shape, restore::own_vmm_state, booting);
                    let (mut snapshot, state) = match found {
                        Ok(found) => found,
                        Err(unmade) => return Err(unmade.failure(dir)),
                    };
                    let restored_vm =
                        match restore::restore_own(launch, spec, serial_log, &mut snapshot, &state)
                        {
                            Ok(vm) => vm,
                            Err(error) => return Err(report(error, None, dir)),
                        };
                    restored = Some(snapshot.manifest.key);
                    restored_vm
                }
                (None, None, None) => {
                    VmProcess::Own(OwnVm::boot(spec, serial_log).map_err(vmm_failed)?)
                }
            };
            (None, vm)
        }
    };
    audit.append(
        "vm.started",
        json!({"vm": vm, "backend": vm_process.backend().to_string(), "accel": accel.to_string(),
               "pid": vm_process.pid(), "woken": woken, "boot_snapshot": restored,
               "jailed": matches!(vm_process, VmProcess::Jailed(_))}),
    ).map_err(LaunchError::Audit)?;
    Ok(Started {
        audit,
        plan,
        settled,
        secrets,
        accel,
        vm,
        dir,
        listener,
        socket,
        vm_process,
        restored,
        disks,
        disk_locks,
    })
}

/// Starts the own VMM jailed as `jail` in the VM's directory, the runner's own binary
/// re-executed as the child (which gets the artifacts as descriptors the runner opened: the
/// jail's uid needs no access to them).
pub(super) fn boot_jailed(
    jail: Jail,
    dir: &VmDir,
    spec: &VmSpec,
    serial_log: File,
) -> Result<JailedVm, LaunchError> {
    let jail_failed = |e: JailError| LaunchError::Backend(format!("{}: {e}", e.code()));
    let root = dir.path.join(jailed::JAIL_DIR);
    JailedVm::boot(Path::new("/proc/self/exe"), jail, &root, spec, serial_log).map_err(jail_failed)
}

/// The failure report for `error`: the console's tail of `vm`, and its log kept unless the
/// run was stopped on purpose.
pub(super) fn failure(error: LaunchError, vm: &VmProcess, dir: VmDir) -> Box<Failure> {
    report(error, Some(vm.console().tail()), dir)
}

/// The failure report for `error` with `console_tail` (none when no VM ran), the console log
/// of the VM's directory `dir` kept unless the run was stopped on purpose.
pub(super) fn report(error: LaunchError, console_tail: Option<String>, dir: VmDir) -> Box<Failure> {
    let serial_log = match error {
        LaunchError::Interrupted => None,
        _ => dir.keep_log(),
    };
    Box::new(Failure {
        error,
        console_tail,
        serial_log,
    })
}
