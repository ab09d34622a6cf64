//! A launch started from a boot snapshot ([`crate::boot_snapshot`]) instead of a boot: the
//! snapshot of this plan on this machine found and verified — or, the first time (or when the
//! one found is refused), a guest booted to its agent's hello with its RAM in the snapshot's
//! file, paused and its device state saved — then restored, its RAM file mapped
//! copy-on-write: into the launch's QEMU, the device state hashed as it streams in and the
//! guest let run only when it matches; or into the own VMM, the device state hashed as it is
//! read and parsed only when it matches. Once the agent says hello the guest is made a
//! machine of its own ([`renew`]) before anything else is asked of it.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Instant;

use mvm_ir::audit::HostAudit;
use mvm_protocol::{Request, SecretHex, RENEW_ENTROPY_BYTES};
use serde_json::json;

use super::vm_dir::VmDir;
use super::{agent_done, boot, Failure, Launch, LaunchError, SERIAL_LOG};
use crate::admission::BootArtifacts;
use crate::backend::kvm::OwnVm;
use crate::backend::qemu::qmp::Qmp;
use crate::backend::qemu::{self, command_line, migration};
use crate::backend::select::Accel;
use crate::backend::{Pausable, SavedMemory, VmProcess};
use crate::boot_snapshot::{BootSnapshot, BootSnapshotError, Budget, Shape, Store};
use crate::client::AgentClient;
use crate::cold;
use mvm_ir::admission::VerifiedPlan;
use mvm_vmm::snapshot::SavedVm;
use mvm_vmm::{VmSpec, VmmError};

/// The backend a boot snapshot is made and restored by, as its [`Shape`] names it.
pub(super) struct SnapshotBackend {
    /// `qemu` or `kvm`.
    pub(super) name: &'static str,
    /// Its version: a saved state loads only into its own.
    pub(super) version: String,
    /// Its accelerator.
    pub(super) accel: Accel,
}

/// The shape of the boot snapshot this launch restores, or none when it boots: asked not to
/// (`--cold-boot`), a single-use plan (its snapshot could never be used again), launch
/// disks or volumes, its own or its plan's (the saved machine has none of their devices), or
/// a jailed or huge-page VMM (a jailed VM is never saved; a snapshot's RAM is a file, not
/// huge pages).
pub(super) fn shape_for(
    launch: &Launch,
    plan: &VerifiedPlan,
    artifacts: &BootArtifacts,
    backend: SnapshotBackend,
) -> Option<Shape> {
    let disks = !launch.disks.is_empty() || !plan.plan.policy.mounts.is_empty();
    let vmm_options = launch.jail.is_some() || launch.huge_pages;
    if launch.cold_boot || plan.plan.single_use || disks || vmm_options {
        return None;
    }
    Some(Shape {
        plan_digest: plan.digest.clone(),
        kernel_sha256: mvm_ir::digest::sha256_prefixed(&artifacts.kernel),
        initramfs_sha256: mvm_ir::digest::sha256_prefixed(&artifacts.initramfs),
        backend: backend.name.into(),
        accel: backend.accel.to_string(),
        backend_version: backend.version,
        vcpus: plan.plan.resources.cpu_cores,
        memory_mib: u64::from(plan.plan.resources.memory_mb),
    })
}

/// How the guest a boot snapshot is made of boots.
#[derive(Clone, Copy)]
pub(super) enum Booting<'a> {
    /// QEMU with the launch's arguments `args` (the RAM file's are added), its agent channel
    /// accepted on `listener`.
    Qemu {
        qemu: &'a Path,
        args: &'a [OsString],
        listener: &'a UnixListener,
    },
    /// The own VMM, booting `spec`.
    Own(&'a VmSpec),
}

/// A boot snapshot that could not be had: why, and the console's tail when a guest booted
/// for it.
pub(super) struct Unmade {
    pub(super) error: LaunchError,
    pub(super) console_tail: Option<String>,
}

impl Unmade {
    /// The launch's failure report ([`super::start::report`]).
    pub(super) fn failure(self, dir: VmDir) -> Box<Failure> {
        super::start::report(self.error, self.console_tail, dir)
    }
}

impl<E: Into<LaunchError>> From<E> for Unmade {
    fn from(error: E) -> Self {
        Self {
            error: error.into(),
            console_tail: None,
        }
    }
}

/// The launch a boot snapshot is found or made for.
#[derive(Clone, Copy)]
pub(super) struct ForLaunch<'a> {
    pub(super) launch: &'a Launch,
    pub(super) audit: &'a HostAudit,
    /// The launch's VM.
    pub(super) vm: &'a str,
    pub(super) dir: &'a VmDir,
    /// Its console log.
    pub(super) serial_log: &'a File,
}

/// The verified boot snapshot of `shape` and what `usable` makes of it; made first — by
/// booting a guest as `booting` in the launch's VM directory to its agent's hello and
/// saving it — when there is none, or the one there is refused or not `usable` (which is
/// removed, and recorded). The launch's console log then tells of the boot: of the one that
/// made the snapshot, or (when it was found) of that boot, copied from the snapshot.
pub(super) fn snapshot_for<T>(
    this: ForLaunch<'_>,
    shape: &Shape,
    usable: impl Fn(&mut BootSnapshot) -> Result<T, String>,
    booting: Booting<'_>,
) -> Result<(BootSnapshot, T), Unmade> {
    let ForLaunch {
        launch,
        audit,
        vm,
        dir,
        serial_log,
    } = this;
    let store = Store::of(&launch.home)?;
    let found = store.open(shape).and_then(|found| match found {
        Some(mut snapshot) => match usable(&mut snapshot) {
            Ok(used) => Ok(Some((snapshot, used))),
            Err(why) => Err(BootSnapshotError::Refused(why)),
        },
        None => Ok(None),
    });
    match found {
        Ok(Some((snapshot, used))) => {
            let mut log = serial_log;
            log.write_all(&snapshot.console)
                .and_then(|()| restored_line(log, &snapshot))
                .map_err(LaunchError::host("the console log"))?;
            return Ok((snapshot, used));
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
    // Read before a guest boots for it: a malformed budget fails the launch at once.
    let budget = Budget::load(&launch.home)?;
    let started = Instant::now();
    let mut snapshot = make(launch, shape, &store, vm, dir, serial_log, booting)?;
    let used = match usable(&mut snapshot) {
        Ok(used) => used,
        Err(why) => {
            discard(launch, &mut snapshot);
            return Err(BootSnapshotError::Make(why).into());
        }
    };
    audit
        .append(
            "boot_snapshot.made",
            json!({"key": snapshot.manifest.key, "vm": vm, "plan_digest": shape.plan_digest,
                   "ram_bytes": snapshot.manifest.ram.bytes,
                   "state_bytes": snapshot.manifest.state.bytes,
                   "ms": started.elapsed().as_millis() as u64}),
        )
        .map_err(LaunchError::Audit)?;
    // The store over its budget is no reason to fail the launch: said in the runner's log.
    match store.trim(budget, &snapshot.manifest.key) {
        Ok(evicted) => {
            for (key, bytes) in evicted {
                let fields =
                    json!({"key": key, "bytes": bytes, "max_bytes": budget.max_bytes, "vm": vm});
                audit
                    .append("boot_snapshot.evicted", fields)
                    .map_err(LaunchError::Audit)?;
            }
        }
        Err(e) => eprintln!("mvm-runner: keeping the boot snapshots to their budget: {e}"),
    }
    restored_line(serial_log, &snapshot).map_err(LaunchError::host("the console log"))?;
    Ok((snapshot, used))
}

/// Says in the console log where the boot above ends and the restored guest begins.
fn restored_line(mut log: &File, snapshot: &BootSnapshot) -> std::io::Result<()> {
    writeln!(
        log,
        "mvm-runner: restored from boot snapshot {}",
        snapshot.manifest.key
    )
}

/// Boots a guest as `booting` to its agent's hello — its RAM in the snapshot being made, or
/// written there when saved — pauses it and saves its device state into the store; the VM
/// that booted ends either way.
fn make(
    launch: &Launch,
    shape: &Shape,
    store: &Store,
    vm: &str,
    dir: &VmDir,
    serial_log: &File,
    booting: Booting<'_>,
) -> Result<BootSnapshot, Unmade> {
    let making = store.making(shape)?;
    let log = serial_log
        .try_clone()
        .map_err(LaunchError::host("the console log"))?;
    let (mut vm_process, listener) = match booting {
        Booting::Qemu {
            qemu,
            args,
            listener,
        } => {
            let mut args = args.to_vec();
            args.extend(command_line::ram_file_arguments(
                &making.ram_path(),
                shape.memory_mib,
                true,
            ));
            let spawned = qemu::spawn(qemu, &args, log)
                .map_err(|e| LaunchError::Backend(format!("starting {}: {e}", qemu.display())))?;
            (VmProcess::Qemu(spawned), Some(listener))
        }
        Booting::Own(spec) => {
            let booted = OwnVm::boot(spec.clone(), log)
                .map_err(|e| LaunchError::Backend(format!("{}: {e}", e.code())))?;
            (VmProcess::Own(booted), None)
        }
    };
    let made = boot(launch, listener, &mut vm_process, None).and_then(|booted| {
        let saving = |e: std::io::Error| BootSnapshotError::Make(format!("saving the guest: {e}"));
        let mut machine = vm_process
            .boot_snapshot_machine(&dir.path, &making.ram_path())
            .map_err(saving)?;
        machine.pause().map_err(saving)?;
        // What the boot printed, for the logs of the VMs restored from it.
        let console = fs::read(dir.path.join(SERIAL_LOG)).unwrap_or_default();
        // The channel stays open while the state is saved: the guest is saved connected,
        // as a restored one will be.
        let saved = making.finish(vm, machine.as_mut(), &dir.path, &console);
        drop(booted);
        Ok(saved?)
    });
    vm_process.kill();
    // The restoring QEMU makes its own.
    let _ = fs::remove_file(dir.path.join(qemu::QMP_SOCKET));
    made.map_err(|error| Unmade {
        error,
        console_tail: Some(vm_process.console().tail()),
    })
}

/// The own VMM's saved state in `snapshot`, read from its verified file and checked once
/// more against its manifest as it is read (what is parsed is what was signed), then parsed.
pub(super) fn own_vmm_state(snapshot: &mut BootSnapshot) -> Result<SavedVm, String> {
    let mut bytes = Vec::new();
    (&mut snapshot.state)
        .take(mvm_vmm::snapshot::MAX_STATE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("its state: {e}"))?;
    let read = SavedMemory {
        sha256: mvm_ir::digest::sha256_prefixed(&bytes),
        bytes: bytes.len() as u64,
    };
    read.check(&snapshot.manifest.state)
        .map_err(|e| format!("its state: {e}"))?;
    mvm_vmm::snapshot::parse(&bytes).map_err(|e| format!("{}: {e}", e.code()))
}

/// Restores `snapshot` (its state `saved`) into the own VMM as `spec`, its console logged
/// into `serial_log`, and lets it run. A snapshot whose state the VMM refuses is removed: the
/// next launch makes it anew. A failure of the host (memory, KVM, threads) is the backend's
/// and leaves the snapshot be.
pub(super) fn restore_own(
    launch: &Launch,
    spec: VmSpec,
    serial_log: File,
    snapshot: &mut BootSnapshot,
    saved: &SavedVm,
) -> Result<VmProcess, LaunchError> {
    match OwnVm::from_boot_snapshot(spec, serial_log, &snapshot.ram_file, saved) {
        Ok(own) => {
            let mut machine = own.machine();
            let mut vm = VmProcess::Own(own);
            // The guest booted before it was saved: nothing it prints from here is a boot
            // report.
            vm.console().boot_is_over();
            if let Err(e) = machine.resume() {
                vm.kill();
                return Err(LaunchError::Backend(format!(
                    "letting the restored guest run: {e}"
                )));
            }
            Ok(vm)
        }
        Err(refused @ (VmmError::Snapshot(_) | VmmError::DeviceState { .. })) => {
            discard(launch, snapshot);
            Err(BootSnapshotError::Refused(format!("{}: {refused}", refused.code())).into())
        }
        Err(e) => Err(LaunchError::Backend(format!("{}: {e}", e.code()))),
    }
}

/// Removes `snapshot` from the store: it turned out not to restore. The next launch makes
/// it anew.
fn discard(launch: &Launch, snapshot: &mut BootSnapshot) {
    snapshot.release();
    if let Ok(store) = Store::of(&launch.home) {
        let _ = store.remove(&snapshot.manifest.key);
    }
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
        discard(launch, snapshot);
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

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::os::unix::fs::{FileExt, PermissionsExt};

    use mvm_ir::home::MvmHome;

    use super::*;
    use crate::backend::fake::FakeMachine;

    /// The own VMM's snapshot of a test shape made in a fresh home with `state` as its state,
    /// and opened as a launch opens it.
    fn opened(state: &[u8]) -> (tempfile::TempDir, BootSnapshot) {
        let home = tempfile::tempdir().unwrap();
        let store = Store::of(&MvmHome::at(home.path())).unwrap();
        let shape = Shape {
            plan_digest: format!("sha256:{}", "a".repeat(64)),
            kernel_sha256: format!("sha256:{}", "b".repeat(64)),
            initramfs_sha256: format!("sha256:{}", "c".repeat(64)),
            backend: "kvm".into(),
            accel: "kvm".into(),
            backend_version: crate::backend::kvm::VERSION.into(),
            vcpus: 1,
            memory_mib: 64,
        };
        let making = store.making(&shape).unwrap();
        fs::write(making.ram_path(), b"ram").unwrap();
        let mut machine = FakeMachine {
            state: state.to_vec(),
            broken: false,
        };
        drop(
            making
                .finish("vm-0", &mut machine, home.path(), b"")
                .unwrap(),
        );
        let snapshot = store.open(&shape).unwrap().unwrap();
        (home, snapshot)
    }

    #[test]
    fn the_own_vmms_state_is_hashed_as_read_and_parsed_only_when_it_is_what_was_signed() {
        // What the VMM did not write: refused by its parser.
        let (_home, mut snapshot) = opened(b"{\"not\": \"a saved VM\"}");
        let refused = own_vmm_state(&mut snapshot).unwrap_err();
        assert!(refused.starts_with("VMM010"), "{refused}");

        // Changed after it was opened and checked (its seal held then): the bytes read do
        // not hash to the manifest's, and are not parsed.
        let (_home, mut snapshot) = opened(b"{\"not\": \"a saved VM\"}");
        let path = snapshot.ram.with_file_name("state");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(b"[", 0).unwrap();
        let refused = own_vmm_state(&mut snapshot).unwrap_err();
        assert!(refused.starts_with("its state:"), "{refused}");
        assert!(refused.contains("manifest"), "{refused}");
    }
}
