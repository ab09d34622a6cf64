//! A launch started from a boot snapshot ([`crate::boot_snapshot`]) instead of a boot: the
//! snapshot of this plan on this machine found and verified — or, the first time (or when the
//! one found is refused), a guest booted to its agent's hello with its RAM in the snapshot's
//! file, paused and its device state saved — then restored into the launch's QEMU: the RAM
//! file mapped copy-on-write, the device state hashed as it streams in and the guest let run
//! only when it matches. Once the agent says hello the guest is made a machine of its own
//! ([`renew`]) before anything else is asked of it.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Instant;

use mvm_ir::audit::HostAudit;
use mvm_protocol::{Request, SecretHex, RENEW_ENTROPY_BYTES};
use serde_json::json;

use super::vm_dir::VmDir;
use super::{agent_done, boot, Launch, LaunchError, SERIAL_LOG};
use crate::admission::BootArtifacts;
use crate::backend::qemu::qmp::Qmp;
use crate::backend::qemu::{self, command_line, migration};
use crate::backend::select::{Accel, QemuBinary};
use crate::backend::{Pausable, SavedMemory, VmProcess};
use crate::boot_snapshot::{BootSnapshot, BootSnapshotError, Shape, Store};
use crate::client::AgentClient;
use crate::cold;
use mvm_ir::admission::VerifiedPlan;

/// The shape of the boot snapshot this launch restores, or none when it boots: asked not to
/// (`--cold-boot`), a single-use plan (its snapshot could never be used again), or launch
/// disks or volumes, its own or its plan's (the saved machine has none of their devices).
pub(super) fn shape_for(
    launch: &Launch,
    plan: &VerifiedPlan,
    artifacts: &BootArtifacts,
    qemu: &QemuBinary,
    accel: Accel,
) -> Option<Shape> {
    let disks = !launch.disks.is_empty() || !plan.plan.policy.mounts.is_empty();
    if launch.cold_boot || plan.plan.single_use || disks {
        return None;
    }
    Some(Shape {
        plan_digest: plan.digest.clone(),
        kernel_sha256: mvm_ir::digest::sha256_prefixed(&artifacts.kernel),
        initramfs_sha256: mvm_ir::digest::sha256_prefixed(&artifacts.initramfs),
        backend: "qemu".into(),
        accel: accel.to_string(),
        backend_version: qemu.version.to_string(),
        vcpus: plan.plan.resources.cpu_cores,
        memory_mib: u64::from(plan.plan.resources.memory_mb),
    })
}

/// The VM's machine in QEMU's arguments, the way a boot snapshot is made and restored.
#[derive(Clone, Copy)]
pub(super) struct Machine<'a> {
    pub(super) qemu: &'a Path,
    pub(super) args: &'a [OsString],
    pub(super) listener: &'a UnixListener,
    pub(super) serial_log: &'a File,
}

/// A boot snapshot that could not be had: why, and the console's tail when a guest booted
/// for it.
pub(super) struct Unmade {
    pub(super) error: LaunchError,
    pub(super) console_tail: Option<String>,
}

impl<E: Into<LaunchError>> From<E> for Unmade {
    fn from(error: E) -> Self {
        Self {
            error: error.into(),
            console_tail: None,
        }
    }
}

/// The verified boot snapshot of `shape`; made first — by booting `machine` in `dir` to its
/// agent's hello and saving it — when there is none, or the one there is refused (which is
/// removed, and recorded). The console log of `machine` then tells of the boot: of the one
/// that made the snapshot, or (when it was found) of that boot, copied from the snapshot.
pub(super) fn snapshot_for(
    launch: &Launch,
    shape: &Shape,
    audit: &HostAudit,
    vm: &str,
    dir: &VmDir,
    machine: Machine<'_>,
) -> Result<BootSnapshot, Unmade> {
    let store = Store::of(&launch.home)?;
    match store.open(shape) {
        Ok(Some(snapshot)) => {
            let mut log = machine.serial_log;
            log.write_all(&snapshot.console)
                .and_then(|()| restored_line(log, &snapshot))
                .map_err(LaunchError::host("the console log"))?;
            return Ok(snapshot);
        }
        Ok(None) => {}
        Err(refused) => {
            let key = shape.key();
            audit
                .append(
                    "boot_snapshot.refused",
                    json!({"key": key, "vm": vm, "reason": refused.to_string()}),
                )
                .map_err(LaunchError::Audit)?;
            store.remove(&key)?;
        }
    }
    let booting = Instant::now();
    let snapshot = make(launch, shape, &store, vm, dir, machine)?;
    audit
        .append(
            "boot_snapshot.made",
            json!({"key": snapshot.manifest.key, "vm": vm, "plan_digest": shape.plan_digest,
                   "ram_bytes": snapshot.manifest.ram.bytes,
                   "state_bytes": snapshot.manifest.state.bytes,
                   "ms": booting.elapsed().as_millis() as u64}),
        )
        .map_err(LaunchError::Audit)?;
    restored_line(machine.serial_log, &snapshot).map_err(LaunchError::host("the console log"))?;
    Ok(snapshot)
}

/// Says in the console log where the boot above ends and the restored guest begins.
fn restored_line(mut log: &File, snapshot: &BootSnapshot) -> std::io::Result<()> {
    writeln!(
        log,
        "mvm-runner: restored from boot snapshot {}",
        snapshot.manifest.key
    )
}

/// Boots `machine` to its agent's hello — its RAM a shared file in the snapshot being made —
/// pauses it and saves its device state into the store; the QEMU that booted ends either way.
fn make(
    launch: &Launch,
    shape: &Shape,
    store: &Store,
    vm: &str,
    dir: &VmDir,
    machine: Machine<'_>,
) -> Result<BootSnapshot, Unmade> {
    let making = store.making(shape)?;
    let mut args = machine.args.to_vec();
    args.extend(command_line::ram_file_arguments(
        &making.ram_path(),
        shape.memory_mib,
        true,
    ));
    let serial_log = machine
        .serial_log
        .try_clone()
        .map_err(LaunchError::host("the console log"))?;
    let mut booting =
        VmProcess::Qemu(qemu::spawn(machine.qemu, &args, serial_log).map_err(|e| {
            LaunchError::Backend(format!("starting {}: {e}", machine.qemu.display()))
        })?);
    let made = boot(launch, Some(machine.listener), &mut booting, None).and_then(|booted| {
        let mut qmp = Qmp::connect(&dir.path.join(qemu::QMP_SOCKET))
            .map_err(|e| LaunchError::Backend(format!("QMP: {e}")))?;
        let saving = |e: std::io::Error| BootSnapshotError::Make(format!("saving the guest: {e}"));
        qmp.pause().map_err(saving)?;
        // Its RAM is in the file already: the state leaves it out.
        migration::set_ignore_shared(&mut qmp, true).map_err(saving)?;
        // What the boot printed, for the logs of the VMs restored from it.
        let console = fs::read(dir.path.join(SERIAL_LOG)).unwrap_or_default();
        // The channel stays open while the state is saved: the guest is saved connected,
        // as a restored one will be.
        let saved = making.finish(vm, &mut qmp, &dir.path, &console);
        drop(booted);
        Ok(saved?)
    });
    booting.kill();
    // The restoring QEMU makes its own.
    let _ = fs::remove_file(dir.path.join(qemu::QMP_SOCKET));
    made.map_err(|error| Unmade {
        error,
        console_tail: Some(booting.console().tail()),
    })
}

/// Streams the state of `snapshot` into the QEMU started with `-incoming` on the VM
/// directory's wake socket and its RAM mapped from the snapshot ([`restore_arguments`]),
/// checks what was streamed against the manifest and only then lets the guest run. A
/// snapshot whose state turns out changed is removed: the next launch makes it anew.
pub(super) fn restore(
    launch: &Launch,
    dir: &VmDir,
    vm: &mut VmProcess,
    snapshot: &mut BootSnapshot,
) -> Result<(), LaunchError> {
    // The guest booted before it was saved: nothing it prints from here is a boot report.
    vm.console().boot_is_over();
    let (mut qmp, streamed) = stream_in(vm, dir, &mut snapshot.state, true)
        .map_err(|e| LaunchError::Backend(format!("restoring the boot snapshot: {e}")))?;
    if let Err(changed) = streamed.check(&snapshot.manifest.state) {
        if let Ok(store) = Store::of(&launch.home) {
            let _ = store.remove(&snapshot.manifest.key);
        }
        return Err(BootSnapshotError::Refused(changed.to_string()).into());
    }
    qmp.resume()
        .map_err(|e| LaunchError::Backend(format!("letting the restored guest run: {e}")))
}

/// Streams the saved state `state` into the QEMU of `vm`, started with `-incoming` on the VM
/// directory's wake socket ([`migration::load`]); a failure says what QEMU printed.
pub(super) fn stream_in(
    vm: &VmProcess,
    dir: &VmDir,
    state: &mut File,
    ignore_shared: bool,
) -> Result<(Qmp, SavedMemory), String> {
    let wake_socket = dir.path.join(cold::WAKE_SOCKET);
    let loaded = migration::load(
        &wake_socket,
        state,
        &dir.path.join(qemu::QMP_SOCKET),
        ignore_shared,
    );
    let _ = fs::remove_file(&wake_socket);
    loaded.map_err(|e| match vm.stderr() {
        stderr if stderr.is_empty() => e.to_string(),
        stderr => format!("{e}; QEMU: {stderr}"),
    })
}

/// QEMU's arguments beyond the launch's for a restore of `snapshot`: its RAM mapped privately
/// from the snapshot's RAM file, its state taken from the VM directory's wake socket.
pub(super) fn restore_arguments(
    snapshot: &BootSnapshot,
    dir: &VmDir,
) -> Result<Vec<OsString>, LaunchError> {
    let mut args =
        command_line::ram_file_arguments(&snapshot.ram, snapshot.manifest.shape.memory_mib, false);
    let incoming = migration::incoming_argument(&dir.path.join(cold::WAKE_SOCKET))
        .map_err(LaunchError::host("the wake socket"))?;
    args.extend(["-incoming".into(), incoming.into()]);
    Ok(args)
}

/// Makes a guest restored from a boot snapshot a machine of its own, before anything else is
/// asked of it: fresh host entropy for its kernel's RNG, its own hostname (the VM's id), and
/// the host's clock.
pub(super) fn renew(client: &mut AgentClient, vm: &str) -> Result<(), LaunchError> {
    let mut entropy = String::with_capacity(RENEW_ENTROPY_BYTES * 2);
    while entropy.len() < RENEW_ENTROPY_BYTES * 2 {
        entropy.push_str(&mvm_ir::plan::fresh_nonce().map_err(LaunchError::Audit)?);
    }
    entropy.truncate(RENEW_ENTROPY_BYTES * 2);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let request = Request::Renew {
        entropy: SecretHex(entropy),
        hostname: vm.to_string(),
        unix_nanos: u64::try_from(now.as_nanos()).unwrap_or(u64::MAX),
    };
    agent_done(
        client,
        &request,
        "make the restored guest a machine of its own",
    )
}
