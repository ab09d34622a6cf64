//! A named VM: booted (or woken from its cold state) and kept up, serving its control socket
//! until a client asks for a power-off or a cold save, or the VM dies.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mvm_ir::audit::HostAudit;
use mvm_ir::home::MvmHome;
use mvm_ir::plan::LaunchPlan;
use mvm_ir::Coded;
use mvm_protocol::Request;
use serde_json::json;

use super::egress::{egress_for, serve_proxy};
use super::start::{failure, start, Origin, Started};
use super::vm_dir::{Keep, VmDir};
use super::{
    boot, confine, mount_disks, put_secret_files, Booted, Failure, Launch, LaunchError,
    SHUTDOWN_GRACE,
};
use crate::admission::host_policy::HostPolicy;
use crate::backend::select::Accel;
use crate::backend::{Backend, Pausable, SavedMemory, VmProcess};
use crate::client::ClientError;
use crate::codes;
use crate::cold::{self, ColdError, ColdManifest, ColdSaver, ColdState};
use crate::control;
use crate::egress::judge::Denial;
use crate::egress::log::COUNTS_FILE;
use crate::forward::{self, PortSpec};
use crate::mux::{AgentMux, OpenHandler};
use crate::secrets::{LaunchSecrets, SecretRef};
use crate::state::{self, Phase, VmState};

/// Boots `launch` as the VM `name` and keeps it up, serving its control socket
/// (`vms/<name>/control.sock`) until a client asks for a power-off or a cold save, the runner
/// is told to stop (a signal), or the VM dies. `on_ready` is called once the agent has said
/// hello. The VM's directory keeps its state, console log and lock until `mvm rm`.
pub fn serve_named(
    launch: &Launch,
    name: &str,
    on_ready: &mut dyn FnMut(&VmState),
) -> Result<VmState, Box<Failure>> {
    let started = start(launch, Origin::Boot(Keep::Record(name.to_string())), |_| {
        Ok(())
    })?;
    serve_started(launch, name, started, None, on_ready)
}

/// Binds the VM's forwarded ports — the plan's (on loopback) and the launch's — and lists them
/// in its directory; a woken VM's launch holds them all already, on the host ports they got.
fn forwarded_ports(
    launch: &Launch,
    plan: &LaunchPlan,
    woken: bool,
    dir: &std::path::Path,
) -> Result<Vec<forward::Bound>, LaunchError> {
    let mut specs = launch.ports.clone();
    if !woken {
        let loopback = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
        specs.extend(plan.policy.ports.iter().map(|port| PortSpec {
            address: loopback,
            host: port.host.unwrap_or(0),
            guest: port.guest,
        }));
    }
    let bound = forward::bind(&launch.home, &specs).map_err(|e| {
        LaunchError::Refused(crate::admission::AdmissionError::NotRunnable {
            code: e.code().to_string(),
            reason: e.to_string(),
        })
    })?;
    forward::record(dir, &bound).map_err(LaunchError::host("recording the forwarded ports"))?;
    Ok(bound)
}

/// Wakes the cold VM `name` and keeps it up as [`serve_named`] does. Its saved state is
/// verified first (see [`cold`]) and its plan admitted again from the envelope its manifest
/// names (`launch.envelope` is not used); a VM that cannot be woken stays cold, its saved
/// state untouched.
pub fn wake_named(
    launch: &Launch,
    name: &str,
    on_ready: &mut dyn FnMut(&VmState),
) -> Result<VmState, Box<Failure>> {
    // Its lock says no runner has it; its saved state says it is cold (even if the runner of
    // an earlier attempt to wake it was killed before it could say so).
    let dir = VmDir::reopen(&launch.home, name)?;
    if !cold::is_saved(&dir.path) {
        let message = format!("{name} was not saved cold");
        return Err(LaunchError::from(ColdError::Wake(message)).into());
    }
    let mut saved = cold::open(&dir.path, name, &launch.home).map_err(LaunchError::from)?;
    // The backend that saved it wakes it: QEMU's state and the own VMM's differ.
    let backend = saved.manifest.backend.parse().map_err(|_| {
        let reason = format!(
            "it was saved by an unknown backend {}",
            saved.manifest.backend
        );
        LaunchError::from(ColdError::Wake(reason))
    })?;
    // What its first launch took away stays taken away.
    let mut deny = launch.deny.clone();
    for text in &saved.manifest.deny_hosts {
        let denial = Denial::parse(text).map_err(|e| {
            LaunchError::from(ColdError::Unverified(format!(
                "its manifest's --deny-host {text:?}: {e}"
            )))
        })?;
        deny.push(denial);
    }
    let mut secrets = Vec::new();
    for text in &saved.manifest.secrets {
        let secret = SecretRef::parse(text).map_err(|e| {
            LaunchError::from(ColdError::Unverified(format!(
                "its manifest's --secret {text:?}: {e}"
            )))
        })?;
        secrets.push(secret);
    }
    let mut env = saved.manifest.env.clone();
    env.extend(launch.env.clone());
    secrets.extend(launch.secrets.iter().cloned());
    let mut secret_files = saved.manifest.secret_files.clone();
    secret_files.extend(launch.secret_files.iter().cloned());
    let launch = Launch {
        envelope: saved.manifest.envelope.clone(),
        backend,
        deny,
        // The plan's ports are among them, on the host ports they got.
        ports: saved.manifest.ports.clone(),
        // What its first launch gave every command, it gives again.
        env,
        secrets,
        secret_files,
        placeholders: saved.manifest.placeholders.clone(),
        ..launch.clone()
    };
    let started = start(&launch, Origin::Wake(dir, &mut saved), |_| Ok(()))?;
    serve_started(&launch, name, started, Some(saved), on_ready)
}

/// Writes a VM's new phase to its state file.
pub(super) type PhaseRecorder = Box<dyn Fn(Phase) -> io::Result<()> + Send + Sync>;

/// How a named VM's serving ended without a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Served {
    /// Powered off on request.
    Stopped,
    /// Saved cold on request: its state is in its directory.
    Cold,
}

/// The VM of `started`, woken from `saved` when given, served until it ends.
pub(super) fn serve_started(
    launch: &Launch,
    name: &str,
    started: Started<()>,
    mut saved: Option<ColdState>,
    on_ready: &mut dyn FnMut(&VmState),
) -> Result<VmState, Box<Failure>> {
    let Started {
        audit,
        plan,
        secrets,
        accel,
        vm,
        dir,
        listener,
        socket,
        mut vm_process,
        restored,
        disks,
        // Held until the VM is gone.
        disk_locks: _disk_locks,
        ..
    } = started;
    let mut state = VmState {
        name: name.to_string(),
        vm: vm.clone(),
        plan_digest: plan.digest.clone(),
        runner_pid: std::process::id(),
        phase: Phase::Starting,
        backend: Some(vm_process.backend()),
        reason: None,
        started_at: mvm_ir::plan::Timestamp::now()
            .0
            .replace_nanosecond(0)
            .map(|t| mvm_ir::plan::Timestamp(t).to_string())
            .unwrap_or_default(),
        boot_snapshot: restored.clone(),
    };
    let record = |state: &VmState| {
        state::write(&dir.path, state).map_err(|e| LaunchError::Host {
            what: "writing the VM's state".into(),
            source: io::Error::other(e.to_string()),
        })
    };
    record(&state)?;

    // QEMU's RAM named as a boot snapshot's guest names it, which a cold save must wake into
    // (the own VMM's RAM has no name).
    let named_ram = vm_process.backend() == Backend::Qemu
        && (restored.is_some() || saved.as_ref().is_some_and(|saved| saved.manifest.named_ram));
    // A woken guest gets its saved state before the agent channel is awaited; it runs only
    // once what QEMU read hashed to the manifest's digest.
    let woken = match saved.as_mut() {
        Some(saved) => wake(&launch.home, &dir, &mut vm_process, saved, accel).map(Some),
        None => Ok(None),
    };
    let counts = dir.path.join(COUNTS_FILE);
    let booted = woken.and_then(|machine| {
        let egress = egress_for(launch, &plan.plan, &audit, &vm, Some(counts), &secrets)?;
        let ports = forwarded_ports(launch, &plan.plan, saved.is_some(), &dir.path)?;
        let renew_as = restored.as_ref().map(|_| vm.as_str());
        let mut booted = boot(launch, listener.as_ref(), &mut vm_process, renew_as)?;
        // None when woken: a VM with disks is never saved cold. Before the secret files: a
        // disk mounted after them could hide them.
        mount_disks(&mut booted.client, &disks)?;
        put_secret_files(&mut booted.client, &secrets)?;
        if let Some(egress) = &egress {
            // Before anyone is told the VM is ready: every command it runs sees the proxy.
            serve_proxy(&mut booted.client, egress)?;
        }
        // A woken guest's services run on in its memory.
        let launch_env = launch.env.clone().into_iter().chain(secrets.env.clone());
        let services = super::services::start_request(&plan.plan, &launch_env.collect());
        if let Some(services) = services.filter(|_| saved.is_none()) {
            let names: Vec<&str> = services.services.iter().map(|s| s.name.as_str()).collect();
            audit
                .append("vm.services.started", json!({"vm": vm, "services": names}))
                .map_err(LaunchError::Audit)?;
            let request = Request::StartServices(services);
            super::agent_done(&mut booted.client, &request, "start the services")?;
        }
        // Every process the runner starts has been started: from here it runs filtered.
        confine(egress.is_some())?;
        Ok((booted, machine, egress, ports))
    });
    drop(listener);
    let _ = fs::remove_file(&socket);
    let outcome = booted.and_then(|(mut booted, machine, egress, ports)| {
        // The control socket is there before anyone is told the VM is ready.
        let control_path = dir.path.join(state::CONTROL_SOCKET);
        let control =
            UnixListener::bind(&control_path).map_err(LaunchError::host("control socket"))?;
        fs::set_permissions(&control_path, fs::Permissions::from_mode(0o600))
            .map_err(LaunchError::host("control socket"))?;
        let machine = match machine {
            Some(machine) => machine,
            None => vm_process
                .machine(&dir.path)
                .map_err(|e| LaunchError::Backend(format!("QMP: {e}")))?,
        };
        if saved.take().is_some() {
            // Its clock stood still while it was cold.
            let set = booted
                .client
                .call(&control::clock_now(), Duration::from_secs(5), None);
            if !matches!(set, Ok(mvm_protocol::Response::Done)) {
                eprintln!("mvm-runner: the woken guest did not set its clock");
            }
            // It runs again: its saved state is stale from here on.
            cold::discard(&dir.path).map_err(LaunchError::host("removing the cold state"))?;
            audit
                .append("vm.woken", json!({"vm": vm, "name": name}))
                .map_err(LaunchError::Audit)?;
        }
        state.phase = Phase::Running;
        record(&state)?;
        on_ready(&state);
        let phases = {
            let (dir, state) = (dir.path.clone(), state.clone());
            move |phase| {
                let state = VmState {
                    phase,
                    ..state.clone()
                };
                state::write(&dir, &state).map_err(|e| io::Error::other(e.to_string()))
            }
        };
        // A jailed VMM is not saved: its state would have to leave the jail.
        let jailed = matches!(vm_process, VmProcess::Jailed(_));
        let backend = vm_process.backend();
        let saver = ColdSaver {
            dir: dir.path.clone(),
            home: launch.home.clone(),
            manifest: ColdManifest {
                schema_version: String::new(),
                name: name.to_string(),
                vm: vm.clone(),
                plan_digest: plan.digest.clone(),
                // Absolute: `mvm resume` may run from anywhere.
                envelope: fs::canonicalize(&launch.envelope)
                    .unwrap_or_else(|_| launch.envelope.clone()),
                accel: accel.to_string(),
                backend: backend.to_string(),
                memory: SavedMemory {
                    sha256: String::new(),
                    bytes: 0,
                },
                generation: 0,
                deny_hosts: launch.deny.iter().map(ToString::to_string).collect(),
                ports: ports.iter().map(|port| port.spec).collect(),
                env: launch.env.clone(),
                secrets: launch.secrets.iter().map(ToString::to_string).collect(),
                secret_files: launch.secret_files.clone(),
                placeholders: secrets
                    .bound
                    .iter()
                    .map(|secret| (secret.name.clone(), secret.placeholder.clone()))
                    .collect(),
                named_ram,
                saved_at: mvm_ir::plan::Timestamp::now(),
            },
        };
        // A disk is locked to its runner, which a cold VM no longer has: another VM could
        // mount it under the filesystem the saved guest holds in its memory.
        let saver = match (jailed, disks.is_empty()) {
            (true, _) => Err("a jailed VM is never saved cold".to_string()),
            (false, false) => Err("a VM with disks (--disk) is not saved cold".to_string()),
            (false, true) => Ok(saver),
        };
        let serving = keep_serving(
            launch,
            control,
            &plan.plan,
            &mut vm_process,
            (booted, egress.map(|egress| egress.handler), ports),
            (&audit, &vm, &secrets),
            (machine, Box::new(phases), saver),
        );
        let _ = fs::remove_file(&control_path);
        serving
    });
    vm_process.kill();
    // A VM that could not be woken keeps its saved state: it is cold still.
    let still_cold = saved.is_some();
    let (reason, phase) = match &outcome {
        Ok(Served::Cold) => ("saved cold".to_string(), Phase::Cold),
        Ok(Served::Stopped) => ("stopped on request".to_string(), Phase::Stopped),
        Err(error) if still_cold => (error.code().to_string(), Phase::Cold),
        Err(LaunchError::Interrupted) => (codes::RUN033.to_string(), Phase::Stopped),
        Err(error) => (error.code().to_string(), Phase::Failed),
    };
    state.phase = phase;
    state.reason = Some(match &outcome {
        Ok(_) => reason.clone(),
        Err(error) if still_cold => format!("waking failed: {}: {error}", error.code()),
        Err(error) => format!("{}: {error}", error.code()),
    });
    record(&state)?;
    audit
        .append(
            "vm.exited",
            json!({"vm": vm, "name": name, "reason": reason,
               "duration_ms": launch.started.elapsed().as_millis() as u64}),
        )
        .map_err(LaunchError::Audit)?;
    match outcome {
        Ok(_) | Err(LaunchError::Interrupted) => Ok(state),
        Err(error) => Err(failure(error, &vm_process, dir)),
    }
}

/// Streams a cold VM's saved state into the QEMU started to wake it, checks the digest of
/// what was streamed, makes the state stale ([`cold::consume`]) and only then lets the guest
/// run; returns the machine controls.
pub(super) fn wake(
    home: &MvmHome,
    dir: &VmDir,
    vm: &mut VmProcess,
    saved: &mut ColdState,
    accel: Accel,
) -> Result<Box<dyn Pausable>, LaunchError> {
    // The guest booted before it was saved: nothing it prints from here is a boot report.
    vm.console().boot_is_over();
    if saved.manifest.accel != accel.to_string() {
        return Err(ColdError::Wake(format!(
            "it was saved under {}, this host runs {accel}",
            saved.manifest.accel
        ))
        .into());
    }
    let VmProcess::Qemu(_) = vm else {
        // The own VMM restored it as it started, its state verified then; it waits paused.
        let mut machine = vm
            .machine(&dir.path)
            .map_err(|e| ColdError::Wake(e.to_string()))?;
        let_run(home, &saved.manifest, machine.as_mut())?;
        return Ok(machine);
    };
    // Its state carries its RAM, whichever memory backend held it.
    let (mut qmp, streamed) =
        super::restore::stream_in(vm, dir, &mut saved.memory, false).map_err(ColdError::Wake)?;
    cold::check_memory(&saved.manifest, &streamed)?;
    let_run(home, &saved.manifest, &mut qmp)?;
    Ok(Box::new(qmp))
}

/// Lets a woken guest run, its saved state consumed first; given back if it could not run.
fn let_run(
    home: &MvmHome,
    manifest: &ColdManifest,
    machine: &mut dyn Pausable,
) -> Result<(), ColdError> {
    cold::consume(home, manifest)?;
    machine.resume().map_err(|e| {
        let _ = cold::unconsume(home, manifest);
        ColdError::Wake(format!("letting the guest run: {e}"))
    })
}

/// Serves the control socket of a booted VM until it should stop; then powers it off, unless
/// it was saved cold. Returns how it ended.
pub(super) fn keep_serving(
    launch: &Launch,
    control: UnixListener,
    plan: &LaunchPlan,
    vm: &mut VmProcess,
    (booted, opener, ports): (Booted, Option<OpenHandler>, Vec<forward::Bound>),
    (audit, vm_id, secrets): (&Arc<HostAudit>, &str, &LaunchSecrets),
    (machine, phases, cold): (Box<dyn Pausable>, PhaseRecorder, Result<ColdSaver, String>),
) -> Result<Served, LaunchError> {
    let (stream, last_stream) = booted
        .client
        .into_stream()
        .map_err(LaunchError::host("agent channel"))?;
    let mux = Arc::new(
        AgentMux::serving(stream, last_stream, opener)
            .map_err(LaunchError::host("agent channel"))?,
    );
    // Stopped when this returns: no listener outlives its VM.
    let _forwarding =
        forward::serve(ports, &mux, audit, vm_id).map_err(LaunchError::host("forwarded ports"))?;
    let shared = Arc::new(control::Shared {
        mux,
        plan: plan.clone(),
        // The secrets' variables over the launch's.
        launch_env: launch
            .env
            .clone()
            .into_iter()
            .chain(secrets.env.clone())
            .collect(),
        redactions: Arc::clone(&secrets.redactions),
        client_env: HostPolicy::load(&launch.home)
            .map_err(|e| e.to_string())
            .and_then(|policy| policy.client_env(plan)),
        hello: booted.hello,
        stop: Arc::new(AtomicBool::new(false)),
        audit: Arc::clone(audit),
        vm: vm_id.to_string(),
        corrupted: AtomicBool::new(false),
        audit_failure: Default::default(),
        machine: Mutex::new(machine),
        paused: AtomicBool::new(false),
        phases,
        cold,
        saved_cold: AtomicBool::new(false),
    });
    let mut vm_exited = false;
    let mut channel_closed = false;
    control::serve(&control, &shared, || {
        vm_exited = !matches!(vm.try_wait(), Ok(None));
        channel_closed = shared.mux.is_closed();
        !vm_exited && !channel_closed && !launch.interrupt.load(Ordering::Relaxed)
    })
    .map_err(LaunchError::host("control socket"))?;
    drop(control);
    if shared.saved_cold.load(Ordering::Relaxed) {
        // Its state is on disk; the guest must not run another instruction.
        return Ok(Served::Cold);
    }
    if channel_closed && !vm_exited {
        return Err(LaunchError::Channel(ClientError::Closed));
    }
    if vm_exited {
        return Err(LaunchError::Backend(format!(
            "the VM exited while serving: {}",
            vm.stderr()
        )));
    }
    // Stop: a paused guest runs again to hear it, the agent is asked to power off and given
    // the grace, then the caller kills QEMU.
    let _ = shared.set_paused(false);
    if let Ok(mut answer) = shared.mux.request(&Request::PowerOff) {
        let _ = answer.next_frame_within(SHUTDOWN_GRACE);
    }
    let _ = vm.wait_for_exit(SHUTDOWN_GRACE);
    if shared.corrupted.load(Ordering::Relaxed) {
        return Err(LaunchError::Integrity(
            "dm-verity refused a block of the root while a command ran; the VM was stopped".into(),
        ));
    }
    let audit_failure = shared
        .audit_failure
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    if let Some(failure) = audit_failure {
        return Err(LaunchError::AuditFailed(failure));
    }
    if launch.interrupt.load(Ordering::Relaxed) {
        return Err(LaunchError::Interrupted);
    }
    Ok(Served::Stopped)
}
