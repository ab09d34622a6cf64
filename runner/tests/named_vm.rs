//! A named VM as its clients reach it (`mvm_runner::named_vm`), served by the runner's own
//! control socket (`mvm_runner::control::serve`) in this process: the agent is the real one,
//! in-process on a socketpair (as `mux.rs`'s tests run it), the machine a fake that records
//! pauses and resumes, the VM's directory, state file, lock and audit chain real files in a
//! temporary mvm home. No VM boots: this is the control path, fast and exact.

mod support;

use std::io::{self, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mvm_agent::serve::{serve, ServeConfig};
use mvm_ir::audit::{AuditLog, HostAudit};
use mvm_ir::fsutil::ExclusiveLock;
use mvm_ir::home::MvmHome;
use mvm_protocol::{
    encode, BootTimings, ExecRequest, FrameDecoder, FrameKind, HelloReply, Integrity, Request,
    Response, PROTOCOL_VERSION,
};
use mvm_runner::backend::Pausable;
use mvm_runner::client::{AgentClient, ClientError, OutputSink};
use mvm_runner::control::{self, Shared};
use mvm_runner::mux::AgentMux;
use mvm_runner::named_vm::{NamedVmError, VmHome};
use mvm_runner::state::{self, Phase, VmState};

/// A machine that only records what it was asked.
struct FakeMachine(Arc<Mutex<Vec<&'static str>>>);

impl Pausable for FakeMachine {
    fn pause(&mut self) -> io::Result<()> {
        self.0.lock().unwrap().push("pause");
        Ok(())
    }

    fn resume(&mut self) -> io::Result<()> {
        self.0.lock().unwrap().push("resume");
        Ok(())
    }
}

/// What the runner of a named VM does, without a VM: holds the VM's lock, serves its control
/// socket over an in-process agent, and once told to stop, writes `stopped` and lets go.
struct FakeRunner {
    _home: tempfile::TempDir,
    vms: VmHome,
    mvm_home: MvmHome,
    dir: PathBuf,
    machine: Arc<Mutex<Vec<&'static str>>>,
    /// The runner's stop flag, for a test that failed before it could stop the VM.
    stop: Arc<AtomicBool>,
    served: Option<JoinHandle<()>>,
}

fn vm_state(name: &str, phase: Phase) -> VmState {
    VmState {
        name: name.into(),
        vm: format!("vm-{name}"),
        plan_digest: "sha256:00".into(),
        runner_pid: std::process::id(),
        phase,
        backend: None,
        reason: None,
        started_at: "2026-12-04T00:00:00Z".into(),
        boot_snapshot: None,
    }
}

impl FakeRunner {
    /// A home with the VM `name`, running, served by an agent whose root is intact.
    fn start(name: &str) -> Self {
        Self::start_with(name, ServeConfig::on_host())
    }

    /// A home with the VM `name`, running, served by an agent configured as `agent`.
    fn start_with(name: &str, agent: ServeConfig) -> Self {
        Self::start_serving(name, move |mut guest| {
            let _ = serve(&mut guest, &agent);
        })
    }

    /// A home with the VM `name`, running, whose agent channel's guest end `agent` serves.
    fn start_serving(name: &str, agent: impl FnOnce(UnixStream) + Send + 'static) -> Self {
        let home = tempfile::tempdir().unwrap();
        let mvm_home = MvmHome::at(home.path());
        let dir = mvm_home.ensure("vms").unwrap().join(name);
        std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        let lock = ExclusiveLock::try_acquire(&dir.join(state::LOCK_FILE))
            .unwrap()
            .unwrap();
        state::write(&dir, &vm_state(name, Phase::Running)).unwrap();
        let listener = UnixListener::bind(dir.join(state::CONTROL_SOCKET)).unwrap();
        let (host, guest) = UnixStream::pair().unwrap();
        std::thread::spawn(move || agent(guest));
        let machine = Arc::new(Mutex::new(Vec::new()));
        let phase_dir = dir.clone();
        let phase_name = name.to_string();
        let shared = Arc::new(Shared {
            mux: std::sync::Arc::new(AgentMux::new(host, 0).unwrap()),
            plan: support::plan_guest::test_plan(),
            launch_env: Default::default(),
            client_env: Ok(()),
            redactions: Default::default(),
            hello: HelloReply {
                version: PROTOCOL_VERSION,
                agent: "test".into(),
                timings: BootTimings::default(),
            },
            stop: Arc::new(AtomicBool::new(false)),
            audit: Arc::new(HostAudit::open(&mvm_home).unwrap()),
            vm: format!("vm-{name}"),
            corrupted: AtomicBool::new(false),
            audit_failure: Default::default(),
            machine: Mutex::new(Box::new(FakeMachine(Arc::clone(&machine)))),
            paused: AtomicBool::new(false),
            phases: Box::new(move |phase| {
                state::write(&phase_dir, &vm_state(&phase_name, phase)).map_err(io::Error::other)
            }),
            cold: Err("the test's fake machine is not saved".into()),
            saved_cold: AtomicBool::new(false),
        });
        let stop = Arc::clone(&shared.stop);
        let (stop_dir, stop_name) = (dir.clone(), name.to_string());
        let served = std::thread::spawn(move || {
            control::serve(&listener, &shared, || true).unwrap();
            // As the runner: the VM powered off, the state says so, then the lock goes.
            let mut stopped = vm_state(&stop_name, Phase::Stopped);
            stopped.reason = Some("stopped by a client".into());
            state::write(&stop_dir, &stopped).unwrap();
            drop(lock);
        });
        FakeRunner {
            vms: VmHome::new(mvm_home.clone()),
            mvm_home,
            _home: home,
            dir,
            machine,
            stop,
            served: Some(served),
        }
    }

    fn events(&self) -> Vec<String> {
        let log = AuditLog::in_home(&self.mvm_home).unwrap();
        log.tail(100)
            .unwrap()
            .into_iter()
            .map(|entry| entry.event)
            .collect()
    }
}

impl Drop for FakeRunner {
    fn drop(&mut self) {
        if let Some(served) = self.served.take() {
            if !served.is_finished() {
                // Tell it to stop, as `mvm stop` would; ignore a VM already gone. Should that
                // fail, it is told as a signal would.
                if let Ok(vm) = self.vms.get("box") {
                    let _ = vm.stop();
                }
                self.stop.store(true, Ordering::Relaxed);
            }
            let _ = served.join();
        }
    }
}

#[derive(Default)]
struct Collected(Vec<u8>);

impl OutputSink for Collected {
    fn stdout(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }

    fn stderr(&mut self, _: &[u8]) -> io::Result<()> {
        Ok(())
    }
}

fn exec(client: &mut AgentClient, script: &str) -> Result<Vec<u8>, NamedVmError> {
    exec_reply(client, script).map(|(stdout, _)| stdout)
}

/// Runs `sh -c script`: its standard output and what the agent said of the root.
fn exec_reply(
    client: &mut AgentClient,
    script: &str,
) -> Result<(Vec<u8>, Integrity), NamedVmError> {
    let request = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env: Default::default(),
        cwd: None,
        timeout_ms: 10_000,
        stdin: false,
        user: None,
        tty: None,
    };
    let mut out = Collected::default();
    let executed = client.exec(request, Duration::from_secs(20), &mut out)?;
    Ok((out.0, executed.reply.integrity))
}

fn code(error: &NamedVmError) -> &str {
    error.code().unwrap_or("none")
}

#[test]
fn a_named_vm_runs_commands_pauses_resumes_and_stops_through_its_control_socket() {
    let runner = FakeRunner::start("box");
    let vm = runner.vms.get("box").unwrap();
    assert_eq!(vm.state().unwrap().phase, Phase::Running);

    let mut client = vm.connect(Arc::default()).unwrap();
    assert_eq!(exec(&mut client, "echo hello").unwrap(), b"hello\n");

    client
        .call(&Request::Pause, Duration::from_secs(10), None)
        .unwrap();
    assert_eq!(vm.state().unwrap().phase, Phase::Paused);
    let refused = exec(&mut client, "true").unwrap_err();
    assert_eq!(code(&refused), "RUN039", "{refused}");
    client
        .call(&Request::Resume, Duration::from_secs(10), None)
        .unwrap();
    assert_eq!(vm.state().unwrap().phase, Phase::Running);
    assert_eq!(*runner.machine.lock().unwrap(), ["pause", "resume"]);
    assert_eq!(exec(&mut client, "echo again").unwrap(), b"again\n");
    drop(client);

    // Removing a live VM is refused without --force, and nothing is touched.
    let refused = vm.clone().remove(false).unwrap_err();
    assert_eq!(code(&refused), "RUN037", "{refused}");
    assert!(vm.dir().exists());

    let stopped = vm.stop().unwrap();
    assert_eq!(stopped.phase, Phase::Stopped);
    let refused = vm.connect(Arc::default()).unwrap_err();
    assert_eq!(code(&refused), "RUN036");
    assert!(
        refused.to_string().contains("stopped, not running"),
        "{refused}"
    );

    vm.clone().remove(false).unwrap();
    assert!(!runner.dir.exists());
    let missing = runner.vms.get("box").unwrap_err();
    assert_eq!(code(&missing), "RUN036");
    let events = runner.events();
    for event in ["vm.paused", "vm.resumed", "vm.removed"] {
        assert!(events.iter().any(|e| e == event), "{event}: {events:?}");
    }
    assert!(
        events.iter().filter(|e| *e == "vm.exec.started").count() >= 2,
        "{events:?}"
    );
}

#[test]
fn names_states_and_waits_are_checked_before_anything_is_done() {
    let home = tempfile::tempdir().unwrap();
    let mvm_home = MvmHome::at(home.path());
    let vms = VmHome::new(mvm_home.clone());
    assert_eq!(code(&vms.get("Bad Name").unwrap_err()), "RUN035");
    assert_eq!(code(&vms.get("none").unwrap_err()), "RUN036");
    assert!(vms.list(|_, e| panic!("{e}")).is_empty());

    // A live state whose runner is gone (nobody holds the lock) is seen as failed.
    let dir = vms.dir("orphan").unwrap();
    std::fs::create_dir(&dir).unwrap();
    state::write(&dir, &vm_state("orphan", Phase::Running)).unwrap();
    assert_eq!(code(&vms.check_free("orphan").unwrap_err()), "RUN034");
    let orphan = vms.get("orphan").unwrap();
    assert_eq!(orphan.state().unwrap().phase, Phase::Failed);
    let refused = orphan.connect(Arc::default()).unwrap_err();
    assert!(
        refused.to_string().contains("failed, not running"),
        "{refused}"
    );
    // The wait gives up at its deadline with the last state it saw.
    let waited = orphan
        .wait_until(Duration::from_millis(200), |s| s.phase == Phase::Running)
        .unwrap();
    assert_eq!(waited.unwrap_err().phase, Phase::Failed);

    // A cold VM is not connected to; stopping it discards its state, audited.
    let cold_dir = vms.dir("sleeper").unwrap();
    std::fs::create_dir_all(cold_dir.join("cold")).unwrap();
    state::write(&cold_dir, &vm_state("sleeper", Phase::Cold)).unwrap();
    let sleeper = vms.get("sleeper").unwrap();
    let refused = sleeper.connect(Arc::default()).unwrap_err();
    assert!(refused.to_string().contains("is cold"), "{refused}");
    let stopped = sleeper.discard_cold().unwrap();
    assert_eq!(stopped.phase, Phase::Stopped);
    assert!(!cold_dir.join("cold").exists());
    assert_eq!(sleeper.state().unwrap().phase, Phase::Stopped);

    let names: Vec<_> = vms
        .list(|_, e| panic!("{e}"))
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["orphan", "sleeper"]);
    let events: Vec<_> = AuditLog::in_home(&mvm_home)
        .unwrap()
        .tail(10)
        .unwrap()
        .into_iter()
        .map(|e| e.event)
        .collect();
    assert_eq!(events, ["vm.discarded"]);
}

#[test]
fn a_runner_is_started_until_its_ready_line_or_its_failure() {
    let home = tempfile::tempdir().unwrap();
    let vms = VmHome::new(MvmHome::at(home.path()));
    let ready = serde_json::json!({"ready": vm_state("up", Phase::Running)});
    let mut runner = Command::new("sh");
    runner.args(["-c", &format!("echo '{ready}'; exec sleep 2")]);
    let state = vms.start(runner).unwrap();
    assert_eq!(state, vm_state("up", Phase::Running));

    let mut failing = Command::new("sh");
    failing.args(["-c", "echo 'mvm-runner: error RUN013: no kvm' >&2; exit 3"]);
    match vms.start(failing) {
        Err(NamedVmError::RunnerFailed { status, stderr }) => {
            assert_eq!(status, 3);
            assert!(stderr.contains("RUN013"), "{stderr}");
        }
        other => panic!("{other:?}"),
    }

    // A runner that says something else is not left running.
    let mut strange = Command::new("sh");
    strange.args(["-c", "echo not-json; exec sleep 30"]);
    let started = std::time::Instant::now();
    match vms.start(strange) {
        Err(NamedVmError::RunnerFailed { status, .. }) => assert_eq!(status, 125),
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_corrupted_root_is_answered_then_the_vm_stops_and_runs_nothing_more() {
    let runner = FakeRunner::start_with(
        "box",
        ServeConfig {
            integrity: || Integrity::Corrupted,
            ..ServeConfig::on_host()
        },
    );
    let vm = runner.vms.get("box").unwrap();
    let mut client = vm.connect(Arc::default()).unwrap();
    // The client that ran the command gets its answer, corruption said, before the VM stops.
    let (stdout, integrity) = exec_reply(&mut client, "echo read").unwrap();
    assert_eq!(stdout, b"read\n");
    assert_eq!(integrity, Integrity::Corrupted);
    let stopped = vm
        .wait_until(Duration::from_secs(10), |s| !s.phase.is_live())
        .unwrap()
        .unwrap();
    assert_eq!(stopped.phase, Phase::Stopped);
    // Nothing more runs: the open connection's next command is refused or finds it closed.
    assert!(exec(&mut client, "echo again").is_err());
    assert_eq!(code(&vm.connect(Arc::default()).unwrap_err()), "RUN036");
    let events = runner.events();
    assert!(events.iter().any(|e| e == "vm.exec.ended"), "{events:?}");
}

/// Connects to the VM's control socket and asks for its processes, as a client that may
/// hang up at any moment.
fn ask_ps(runner: &FakeRunner) -> UnixStream {
    let mut stream = UnixStream::connect(runner.dir.join(state::CONTROL_SOCKET)).unwrap();
    let request = serde_json::to_vec(&Request::Ps).unwrap();
    stream
        .write_all(&encode(FrameKind::Request, 1, &request).unwrap())
        .unwrap();
    stream
}

/// The code of the error that answers a request sent by [`ask_ps`], within 10 s.
fn error_code(mut stream: UnixStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut decoder = FrameDecoder::new();
    let mut buffer = vec![0; 4096];
    loop {
        if let Some(frame) = decoder.next_frame().unwrap() {
            match serde_json::from_slice(&frame.payload).unwrap() {
                Response::Error(error) => return error.code,
                other => panic!("{other:?}"),
            }
        }
        let n = stream.read(&mut buffer).expect("no answer within 10 s");
        assert_ne!(n, 0, "the connection closed unanswered");
        decoder.push(&buffer[..n]);
    }
}

#[test]
fn a_vm_stops_while_every_client_is_stuck_on_a_silent_agent() {
    // An agent that reads every request and answers none, counting them.
    let asked = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&asked);
    let runner = FakeRunner::start_serving("box", move |mut guest| {
        let mut decoder = FrameDecoder::new();
        let mut buffer = vec![0; 64 * 1024];
        while let Ok(n @ 1..) = guest.read(&mut buffer) {
            decoder.push(&buffer[..n]);
            while let Ok(Some(frame)) = decoder.next_frame() {
                if frame.kind == FrameKind::Request {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    let vm = runner.vms.get("box").unwrap();
    let until_asked = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while asked.load(Ordering::Relaxed) < n {
            assert!(
                Instant::now() < deadline,
                "the agent was asked {asked:?} times"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // Every client slot is taken, each by a request the agent will never answer.
    let mut stuck: Vec<UnixStream> = (0..64).map(|_| ask_ps(&runner)).collect();
    until_asked(64);

    // Any other request is refused at once, with its code.
    let mut other = vm.connect(Arc::default()).unwrap();
    let refused = other.call(&Request::Ps, Duration::from_secs(10), None);
    let refused = NamedVmError::from(refused.unwrap_err());
    assert_eq!(code(&refused), "RUN050", "{refused}");
    // A kill still reaches the agent (which does not answer it either).
    let mut killing = vm.connect(Arc::default()).unwrap();
    let kill = Request::Kill {
        handle: 1,
        signal: 9,
    };
    assert!(killing.call(&kill, Duration::from_secs(1), None).is_err());
    until_asked(65);
    drop(killing);

    // A client that hangs up gives its slot back: a request reaches the agent again.
    drop(stuck.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut client = vm.connect(Arc::default()).unwrap();
        match client.call(&Request::Ps, Duration::from_millis(500), None) {
            // Served, and not answered by this agent.
            Err(ClientError::Timeout(_)) => break,
            Err(ClientError::Refused(error))
                if error.code == "RUN050" && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            other => panic!("{other:?}"),
        }
    }
    until_asked(66);

    // And a stop works; the stuck clients are then told, not left waiting out their own
    // deadline.
    let stopped = vm.stop().unwrap();
    assert_eq!(stopped.phase, Phase::Stopped);
    for client in stuck {
        assert_eq!(error_code(client), "AGENT103");
    }
}

/// Makes the audit log of `runner`'s home unwritable (a directory where its file was).
fn break_audit(runner: &FakeRunner) {
    let log = AuditLog::in_home(&runner.mvm_home).unwrap();
    let _ = std::fs::remove_file(log.path());
    std::fs::create_dir(log.path()).unwrap();
}

#[test]
fn a_command_kill_or_copy_that_cannot_be_recorded_first_is_not_done() {
    let runner = FakeRunner::start("box");
    let vm = runner.vms.get("box").unwrap();
    let mut client = vm.connect(Arc::default()).unwrap();
    let spawn = Request::Spawn(ExecRequest {
        argv: vec!["sleep".into(), "30".into()],
        env: Default::default(),
        cwd: None,
        timeout_ms: 60_000,
        stdin: false,
        user: None,
        tty: None,
    });
    let Ok(Response::Spawned { handle, pid }) = client.call(&spawn, Duration::from_secs(10), None)
    else {
        panic!("not spawned");
    };
    break_audit(&runner);
    let kill = Request::Kill { handle, signal: 9 };
    match client.call(&kill, Duration::from_secs(10), None) {
        Err(ClientError::Refused(error)) => {
            assert_eq!(error.code, "AGENT103", "{error:?}");
            assert!(error.message.contains("audit"), "{error:?}");
        }
        other => panic!("the kill was not refused: {other:?}"),
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let state = stat.rsplit(')').next().unwrap().split_whitespace().next();
    assert_ne!(state, Some("Z"), "the unrecorded kill was sent");
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();

    // A copy into the VM, likewise: refused before a byte reaches the guest.
    let runner = FakeRunner::start("box");
    let vm = runner.vms.get("box").unwrap();
    let mut client = vm.connect(Arc::default()).unwrap();
    break_audit(&runner);
    let target = tempfile::tempdir_in("/tmp").unwrap();
    let path = target.path().join("copied");
    let bytes = b"never copied";
    let request = mvm_protocol::FsWriteRequest {
        path: path.to_str().unwrap().into(),
        mode: 0o600,
        size: bytes.len() as u64,
        sha256: mvm_ir::digest::sha256_prefixed(bytes),
        tar: false,
    };
    let copied = client.fs_write(request, &mut &bytes[..], Duration::from_secs(10));
    assert!(
        matches!(&copied, Err(ClientError::Refused(e)) if e.message.contains("audit")),
        "{copied:?}"
    );
    assert!(!path.exists(), "the unrecorded copy was made");

    // And a command.
    let runner = FakeRunner::start("box");
    let vm = runner.vms.get("box").unwrap();
    let mut client = vm.connect(Arc::default()).unwrap();
    break_audit(&runner);
    let marker = target.path().join("ran");
    let script = format!("touch {}", marker.display());
    match exec_reply(&mut client, &script) {
        Err(NamedVmError::Refused(error)) => {
            assert!(error.message.contains("audit"), "{error:?}")
        }
        other => panic!("the unrecorded command was not refused: {other:?}"),
    }
    assert!(!marker.exists(), "the unrecorded command ran");
}
