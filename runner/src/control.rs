//! The control socket of a named VM (`vms/<name>/control.sock`, 0600 in a 0700 directory):
//! how `mvm exec`, `mvm stop` and the SDKs reach a VM that stays up. No HTTP, no daemon: the
//! runner that owns the VM serves it, speaking the agent's own [protocol] — a client sends
//! requests on its connection and gets the same frames back, relayed through the shared agent
//! channel ([`AgentMux`]). Exec requests get the plan's defaults (environment, working
//! directory, entrypoint) applied here, so a client cannot step outside the plan's policy.
//!
//! [protocol]: mvm_protocol

use std::collections::BTreeMap;
use std::io::{self, Read as _, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use mvm_ir::env::is_denied;
use mvm_ir::plan::LaunchPlan;
use mvm_ir::validate::is_env_name;
use mvm_protocol::{
    codes, encode, ErrorReply, ExecRequest, Frame, FrameDecoder, FrameKind, HelloReply, Integrity,
    Request, Response,
};
use serde_json::{json, Value};

use crate::backend::Pausable;
use crate::client::ClientError;
use crate::cold::ColdSaver;
use crate::mux::{AgentMux, Exchange, STALLED};
use crate::secrets::redact::{Redactions, Redactor};
use crate::state::Phase;
use mvm_ir::audit::HostAudit;

/// How often the accept loop and idle connections look at the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// How long a client may take to accept a write; then it gets no more output (the command's
/// answer is still recorded), so that a client that stops reading holds nothing for long.
const CLIENT_WRITE_LIMIT: Duration = Duration::from_secs(10);
/// The most clients served at once.
const MAX_CLIENTS: usize = 64;
/// Connections taken beyond [`MAX_CLIENTS`], each for one stop or kill, so that the VM's
/// owner can always stop it, however many clients are stuck on a silent agent; more wait in
/// the listen queue.
const RESERVED_CLIENTS: usize = 4;
/// How long a connection in a reserved slot has to send its request: the slot is soon free
/// for the next.
const RESERVED_REQUEST: Duration = Duration::from_secs(5);
/// The longest the agent may send nothing on an exchange whose request has no timeout of its
/// own: as long as the CLI's slowest such wait (`mvm fs`, 10 min).
const AGENT_QUIET: Duration = Duration::from_secs(600);
/// What the answer to a request with a timeout of its own (exec, wait) may take beyond it, as
/// the CLI allows.
const ANSWER_GRACE: Duration = Duration::from_secs(30);
/// How long the answer of a command whose client hung up (and which was killed for it) is
/// still waited for, to record how it ended.
const CANCEL_GRACE: Duration = Duration::from_secs(5);
/// The longest a command may be given, and what "no timeout" means (the agent clamps nothing
/// itself).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// The stable code of a request refused because the VM is paused, or a pause that failed.
pub const PAUSED: &str = crate::codes::RUN039;
/// The stable code of a save that failed or was refused (the VM runs on as it was).
pub const SAVE_FAILED: &str = crate::codes::RUN040;
/// The stable code of a request refused because every client slot is taken (stop and kill
/// are still served).
pub const CLIENTS_FULL: &str = crate::codes::RUN050;
/// How long the agent has to set its clock.
const CLOCK_ANSWER: Duration = Duration::from_secs(5);

/// The request that sets the guest's clock to the host's, now.
pub fn clock_now() -> Request {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Request::SetClock {
        unix_nanos: u64::try_from(now.as_nanos()).unwrap_or(u64::MAX),
    }
}

/// What every connection shares.
pub struct Shared {
    /// The agent channel (shared with the forwarded ports' threads).
    pub mux: Arc<AgentMux>,
    /// The admitted plan, for exec defaults.
    pub plan: LaunchPlan,
    /// The launch's variables (`mvm up --env`), under each command's own.
    pub launch_env: BTreeMap<String, String>,
    /// Whether a client may set a command's environment: the rule that says no if not.
    pub client_env: Result<(), String>,
    /// The launch's secret values: scrubbed from every command's output before a client
    /// sees it.
    pub redactions: Arc<Redactions>,
    /// The agent's hello, answered to clients that say hello.
    pub hello: HelloReply,
    /// Set by a client's power-off request (or a signal): the owner stops the VM.
    pub stop: Arc<AtomicBool>,
    /// Where every exec is recorded.
    pub audit: Arc<HostAudit>,
    /// The VM's id, for the audit entries.
    pub vm: String,
    /// Set when dm-verity reported a corrupted block: the root can no longer be trusted, so
    /// no further command runs and the VM stops as failed.
    pub corrupted: AtomicBool,
    /// The first audit entry that could not be written: the VM stops as failed.
    pub audit_failure: Mutex<Option<String>>,
    /// Pauses and resumes the VM.
    pub machine: Mutex<Box<dyn Pausable>>,
    /// Set while the VM is paused: nothing that needs the guest is sent.
    pub paused: AtomicBool,
    /// Records a change of phase in the VM's state file.
    pub phases: Box<dyn Fn(Phase) -> io::Result<()> + Send + Sync>,
    /// Saves the VM cold, or why it cannot be.
    pub cold: Result<ColdSaver, String>,
    /// Set once the VM was saved cold: its runner ends without powering it off.
    pub saved_cold: AtomicBool,
}

impl Shared {
    /// Pauses (`true`) or resumes the VM, recording the new phase and an audit entry; doing
    /// what is already done is not an error.
    pub fn set_paused(&self, pause: bool) -> Result<(), String> {
        let mut machine = self.machine.lock().unwrap_or_else(PoisonError::into_inner);
        if self.paused.load(Ordering::Relaxed) == pause {
            return Ok(());
        }
        let (outcome, phase, event) = match pause {
            true => (machine.pause(), Phase::Paused, "vm.paused"),
            false => (machine.resume(), Phase::Running, "vm.resumed"),
        };
        outcome.map_err(|e| e.to_string())?;
        self.paused.store(pause, Ordering::Relaxed);
        if !pause {
            self.set_guest_clock();
        }
        (self.phases)(phase).map_err(|e| e.to_string())?;
        self.record(event, json!({"vm": self.vm}));
        Ok(())
    }

    /// Sets the guest's clock to the host's: it stood still while the guest was stopped. A
    /// guest that does not take it runs on with its own (said in the runner's log).
    fn set_guest_clock(&self) {
        let set = self
            .mux
            .request(&clock_now())
            .ok()
            .and_then(|mut answer| answer.next_frame_within(CLOCK_ANSWER));
        let answered = set.is_some_and(|frame| {
            serde_json::from_slice::<Response>(&frame.payload).is_ok_and(|r| r == Response::Done)
        });
        if !answered {
            eprintln!("mvm-runner: the guest did not set its clock");
        }
    }

    /// Saves the VM cold and tells the runner to end: paused first, refused while requests
    /// are in flight (their answers would be lost), audited before the runner lets go.
    /// Background commands are kept: they are part of the guest's memory.
    pub fn save_cold(&self) -> Result<(), String> {
        let saver = self.cold.as_ref().map_err(Clone::clone)?;
        let mut machine = self.machine.lock().unwrap_or_else(PoisonError::into_inner);
        let was_paused = self.paused.swap(true, Ordering::Relaxed);
        if !was_paused {
            if let Err(e) = machine.pause() {
                self.paused.store(false, Ordering::Relaxed);
                return Err(format!("pausing: {e}"));
            }
        }
        let in_flight = self.mux.in_flight();
        let saved = match in_flight {
            0 => saver.save(machine.as_mut()).map_err(|e| e.to_string()),
            n => Err(format!(
                "{n} requests are in flight: wait for them to end (or stop them) first"
            )),
        };
        let manifest = match saved {
            Ok(manifest) => manifest,
            Err(message) => {
                if !was_paused && machine.resume().is_ok() {
                    self.paused.store(false, Ordering::Relaxed);
                }
                return Err(message);
            }
        };
        let fields = json!({"vm": self.vm, "memory_sha256": manifest.memory.sha256,
                            "memory_bytes": manifest.memory.bytes});
        if !self.record("vm.saved", fields) {
            // Unrecorded, not done: the VM is stopped instead (see `record`).
            let _ = crate::cold::discard(&saver.dir);
            return Err("its audit entry could not be written; the VM stops".into());
        }
        self.saved_cold.store(true, Ordering::Relaxed);
        self.stop.store(true, Ordering::Relaxed);
        (self.phases)(Phase::Cold).map_err(|e| e.to_string())
    }

    /// Records `event`; when that fails, the VM must stop (no command runs unrecorded).
    fn record(&self, event: &str, fields: Value) -> bool {
        match self.audit.append(event, fields) {
            Ok(_) => true,
            Err(e) => {
                let mut failure = self
                    .audit_failure
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                failure.get_or_insert(e.to_string());
                self.stop.store(true, Ordering::Relaxed);
                false
            }
        }
    }
}

/// Accepts connections until `shared.stop` is set or `keep_going` says no, each served on a
/// thread of its own. Only the runner's own user may connect. Once [`MAX_CLIENTS`] are
/// served, a few more connections are taken for a stop or a kill only
/// ([`serve_reserved`]); beyond those, connections wait in the listen queue.
pub fn serve(
    listener: &UnixListener,
    shared: &Arc<Shared>,
    mut keep_going: impl FnMut() -> bool,
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let uid = rustix::process::getuid();
    let clients = Arc::new(AtomicUsize::new(0));
    let reserved = Arc::new(AtomicUsize::new(0));
    while !shared.stop.load(Ordering::Relaxed) && keep_going() {
        let (slots, reserved_only) = if clients.load(Ordering::Relaxed) < MAX_CLIENTS {
            (&clients, false)
        } else if reserved.load(Ordering::Relaxed) < RESERVED_CLIENTS {
            (&reserved, true)
        } else {
            std::thread::sleep(POLL);
            continue;
        };
        match listener.accept() {
            Ok((connection, _)) => {
                let same_user = rustix::net::sockopt::socket_peercred(&connection)
                    .is_ok_and(|peer| peer.uid == uid);
                if !same_user {
                    continue;
                }
                let shared = Arc::clone(shared);
                let counted = Arc::clone(slots);
                counted.fetch_add(1, Ordering::Relaxed);
                let spawned = std::thread::Builder::new()
                    .name("control".into())
                    .spawn(move || {
                        let _ = match reserved_only {
                            true => serve_reserved(connection, &shared),
                            false => serve_client(connection, &shared),
                        };
                        counted.fetch_sub(1, Ordering::Relaxed);
                    });
                if spawned.is_err() {
                    slots.fetch_sub(1, Ordering::Relaxed);
                }
            }
            // Out of descriptors, memory or an aborted connection: this client is lost, not
            // the VM.
            Err(_) => std::thread::sleep(POLL),
        }
    }
    Ok(())
}

/// The reading half of a client connection.
struct ClientReader {
    stream: UnixStream,
    decoder: FrameDecoder,
}

/// What a read of the client brought.
enum Read {
    Frame(Frame),
    /// Nothing within [`POLL`].
    Idle,
    /// The client hung up, or sent bytes that are not frames (it has been told).
    Gone,
}

impl ClientReader {
    fn read(&mut self, writer: &ClientWriter) -> io::Result<Read> {
        match self.decoder.next_frame() {
            Ok(Some(frame)) => return Ok(Read::Frame(frame)),
            Ok(None) => {}
            Err(e) => {
                writer.error(0, codes::BAD_REQUEST, e.to_string())?;
                return Ok(Read::Gone);
            }
        }
        let mut buffer = [0; 64 * 1024];
        match self.stream.read(&mut buffer) {
            Ok(0) => Ok(Read::Gone),
            Ok(n) => {
                self.decoder.push(&buffer[..n]);
                Ok(Read::Idle)
            }
            // A signal ends a read with a timeout early (it is not restarted): not a hang-up.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(Read::Idle)
            }
            Err(e) => Err(e),
        }
    }
}

/// The writing half of a client connection, shared by the threads serving one exchange.
struct ClientWriter {
    stream: Mutex<UnixStream>,
    /// The same connection, watched for a hang-up while the agent is waited on (apart from
    /// `stream`, whose lock a slow write may hold).
    peer: UnixStream,
}

impl ClientWriter {
    fn frame(&self, kind: FrameKind, stream: u32, payload: &[u8]) -> io::Result<()> {
        let bytes = encode(kind, stream, payload).map_err(io::Error::other)?;
        self.stream
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write_all(&bytes)
    }

    /// Whether the client has closed its connection (one that only shut down its writing
    /// side still waits for the answer).
    fn hung_up(&self) -> bool {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let mut fds = [PollFd::new(&self.peer, PollFlags::empty())];
        poll(&mut fds, Some(&Timespec::default())).is_ok()
            && fds[0].revents().intersects(PollFlags::HUP | PollFlags::ERR)
    }

    fn reply(&self, stream: u32, response: &Response) -> io::Result<()> {
        let payload = serde_json::to_vec(response).map_err(io::Error::other)?;
        self.frame(FrameKind::Response, stream, &payload)
    }

    fn error(&self, stream: u32, code: &str, message: String) -> io::Result<()> {
        let error = ErrorReply {
            code: code.into(),
            message,
        };
        self.reply(stream, &Response::Error(error))
    }

    /// Tells the client its request could not reach the agent.
    fn channel_failed(&self, stream: u32, error: &crate::client::ClientError) -> io::Result<()> {
        let message = format!("the agent channel: {error}");
        self.error(stream, codes::SPAWN_FAILED, message)
    }
}

/// The two halves of a client connection.
fn open_client(connection: UnixStream) -> io::Result<(ClientReader, ClientWriter)> {
    connection.set_nonblocking(false)?;
    connection.set_read_timeout(Some(POLL))?;
    connection.set_write_timeout(Some(CLIENT_WRITE_LIMIT))?;
    let reader = ClientReader {
        stream: connection.try_clone()?,
        decoder: FrameDecoder::new(),
    };
    let writer = ClientWriter {
        peer: connection.try_clone()?,
        stream: Mutex::new(connection),
    };
    Ok((reader, writer))
}

/// Serves a connection taken while every client slot is busy: one request, served only if it
/// stops the VM or kills a process — what the VM's owner must always be able to do, however
/// many clients are stuck on a silent agent — and anything else refused ([`CLIENTS_FULL`]).
/// A connection that sends nothing in time is closed, so the slot is soon free again.
fn serve_reserved(connection: UnixStream, shared: &Shared) -> io::Result<()> {
    let (mut reader, writer) = open_client(connection)?;
    let deadline = Instant::now() + RESERVED_REQUEST;
    let frame = loop {
        match reader.read(&writer)? {
            Read::Frame(frame) => break frame,
            Read::Idle if Instant::now() < deadline => continue,
            Read::Idle | Read::Gone => return Ok(()),
        }
    };
    let request = match frame.kind {
        FrameKind::Request => serde_json::from_slice::<Request>(&frame.payload).ok(),
        _ => None,
    };
    match request {
        Some(request @ (Request::PowerOff | Request::Kill { .. })) => serve_request(
            &mut reader,
            &writer,
            shared,
            &mut None,
            frame.stream,
            request,
        ),
        _ => {
            let message = format!(
                "the VM serves {MAX_CLIENTS} clients already: only stop and kill are taken \
                 until one of them ends"
            );
            writer.error(frame.stream, CLIENTS_FULL, message)
        }
    }
}

/// Serves one client until it hangs up. A connection carries one exchange at a time (its
/// socket is its flow control); during an exec the client may send the command's input and
/// a `signal` for it.
fn serve_client(connection: UnixStream, shared: &Shared) -> io::Result<()> {
    let (mut reader, writer) = open_client(connection)?;
    let mut upload: Option<Upload> = None;
    let served = serve_frames(&mut reader, &writer, shared, &mut upload);
    // However the connection ended, an upload it left unfinished is given up.
    if let Some(current) = upload {
        current.abandon(shared);
    }
    served
}

/// Serves the frames of one client connection until it hangs up or the VM stops.
fn serve_frames(
    reader: &mut ClientReader,
    writer: &ClientWriter,
    shared: &Shared,
    upload: &mut Option<Upload>,
) -> io::Result<()> {
    loop {
        let frame = match reader.read(writer)? {
            Read::Frame(frame) => frame,
            Read::Idle if shared.stop.load(Ordering::Relaxed) => break,
            Read::Idle => continue,
            Read::Gone => break,
        };
        let client_stream = frame.stream;
        match frame.kind {
            FrameKind::Request => {}
            // The bytes of the upload in progress on this connection, passed on as the agent
            // takes them; when the last has gone, the agent's answer is passed back.
            FrameKind::Data => {
                let Some(mut current) = upload.take_if(|u| u.client_stream == client_stream) else {
                    continue;
                };
                let len = frame.payload.len() as u64;
                if len > current.remaining {
                    current.abandon(shared);
                    let message = "the upload's bytes do not fit what was announced".to_string();
                    writer.error(client_stream, codes::COPY_MISMATCH, message)?;
                    continue;
                }
                let sent = shared
                    .mux
                    .send_data(current.exchange.stream(), &frame.payload);
                current.remaining -= len;
                if let Err(ClientError::NoRoom(waited)) = sent {
                    // The agent takes no more of it: the client is told, nothing waits on it.
                    let message = format!(
                        "the agent took none of the upload's bytes for {}s",
                        waited.as_secs()
                    );
                    writer.error(client_stream, STALLED, message)?;
                    continue;
                }
                // Another failed send: the agent has answered already (a refusal) or the
                // channel closed. The client gets that answer; the rest of its bytes are
                // dropped.
                if sent.is_err() || current.remaining == 0 {
                    finish_copy(
                        writer,
                        shared,
                        client_stream,
                        current.exchange,
                        current.record,
                    )?;
                } else {
                    *upload = Some(current);
                }
                continue;
            }
            // Flow control is the socket's on this side.
            FrameKind::Credit => continue,
            kind => {
                let message = format!("a {kind:?} frame from a client");
                writer.error(client_stream, codes::BAD_REQUEST, message)?;
                continue;
            }
        }
        match serde_json::from_slice::<Request>(&frame.payload) {
            Ok(request) => serve_request(reader, writer, shared, upload, client_stream, request)?,
            Err(e) => writer.error(client_stream, codes::BAD_REQUEST, e.to_string())?,
        }
    }
    Ok(())
}

/// Serves one request of a client, on its stream `client_stream`.
fn serve_request(
    reader: &mut ClientReader,
    writer: &ClientWriter,
    shared: &Shared,
    upload: &mut Option<Upload>,
    client_stream: u32,
    request: Request,
) -> io::Result<()> {
    let needs_guest = !matches!(
        request,
        Request::Hello { .. }
            | Request::SetClock { .. }
            | Request::Renew { .. }
            | Request::ServeProxy
            | Request::TrustCa { .. }
            | Request::SecretFile { .. }
            | Request::Mount { .. }
            | Request::StartServices(_)
            | Request::Connect { .. }
            | Request::PowerOff
            | Request::Pause
            | Request::Resume
            | Request::Save
    );
    if needs_guest && shared.paused.load(Ordering::Relaxed) {
        let message = "the VM is paused: resume it first (`mvm resume`)".to_string();
        return writer.error(client_stream, PAUSED, message);
    }
    let changes_files = matches!(
        request,
        Request::FsWrite(_)
            | Request::FsMkdir { .. }
            | Request::FsRemove { .. }
            | Request::FsMove { .. }
    );
    if changes_files && !shared.plan.policy.grants.any_command {
        let message = "the plan lets clients change no file in the guest (it was built with \
                       --only-entrypoint)"
            .to_string();
        return writer.error(client_stream, codes::NOT_GRANTED, message);
    }
    match request {
        Request::Hello { .. } => {
            writer.reply(client_stream, &Response::Hello(shared.hello.clone()))
        }
        Request::Pause | Request::Resume => {
            match shared.set_paused(matches!(request, Request::Pause)) {
                Ok(()) => writer.reply(client_stream, &Response::Done),
                Err(message) => writer.error(client_stream, PAUSED, message),
            }
        }
        Request::SetClock { .. } | Request::Renew { .. } => {
            let message = "the guest's clock and identity are set by its runner".to_string();
            writer.error(client_stream, codes::BAD_REQUEST, message)
        }
        Request::ServeProxy
        | Request::TrustCa { .. }
        | Request::SecretFile { .. }
        | Request::Mount { .. }
        | Request::Connect { .. }
        | Request::StartServices(_) => {
            let message = "the proxy, forwarded ports, the VM's CA, secret files, disks and \
                           services are the VM's runner's to ask for: grant egress in the plan, \
                           forward ports with `mvm up --port`, give secrets with \
                           `--secret`/`--secret-file`, disks with `mvm up --disk`; services are \
                           the plan's"
                .to_string();
            writer.error(client_stream, codes::BAD_REQUEST, message)
        }
        Request::Save => match shared.save_cold() {
            Ok(()) => writer.reply(client_stream, &Response::Done),
            Err(message) => writer.error(client_stream, SAVE_FAILED, message),
        },
        Request::PowerOff => {
            shared.stop.store(true, Ordering::Relaxed);
            writer.reply(client_stream, &Response::PowerOff)
        }
        Request::FsWrite(request) => {
            let record = json!({
                "vm": shared.vm, "direction": "in",
                "path_sha256": mvm_ir::digest::sha256_prefixed(request.path.as_bytes()),
                "size": request.size, "sha256": request.sha256, "tar": request.tar,
            });
            if !shared.record("vm.copy.started", record.clone()) {
                return unrecorded(writer, client_stream);
            }
            let remaining = request.size;
            match shared.mux.request(&Request::FsWrite(request)) {
                Ok(exchange) if remaining == 0 => {
                    finish_copy(writer, shared, client_stream, exchange, record)
                }
                Ok(exchange) => {
                    *upload = Some(Upload {
                        client_stream,
                        exchange,
                        remaining,
                        record,
                    });
                    Ok(())
                }
                Err(e) => writer.channel_failed(client_stream, &e),
            }
        }
        Request::FsRead { path, tar } => {
            let record = json!({
                "vm": shared.vm, "direction": "out",
                "path_sha256": mvm_ir::digest::sha256_prefixed(path.as_bytes()),
                "tar": tar,
            });
            if !shared.record("vm.copy.started", record.clone()) {
                return unrecorded(writer, client_stream);
            }
            match shared.mux.request(&Request::FsRead { path, tar }) {
                Ok(exchange) => finish_copy(writer, shared, client_stream, exchange, record),
                Err(e) => writer.channel_failed(client_stream, &e),
            }
        }
        Request::Exec(_) | Request::Spawn(_) if !accepting(shared) => {
            let message = "the VM is stopping".to_string();
            writer.error(client_stream, codes::SPAWN_FAILED, message)
        }
        Request::Exec(request) => {
            let Some((request, argv_digest)) =
                admit_command(writer, shared, client_stream, request, "vm.exec.started")?
            else {
                return Ok(());
            };
            relay_exec(reader, writer, client_stream, shared, request, &argv_digest)
        }
        Request::Spawn(request) => {
            let Some((request, _)) =
                admit_command(writer, shared, client_stream, request, "vm.spawn")?
            else {
                return Ok(());
            };
            relay(writer, client_stream, shared, &Request::Spawn(request))
        }
        Request::Signal { .. } | Request::Resize { .. } => {
            let message = "no command of this connection is running".to_string();
            writer.error(client_stream, codes::NO_SUCH_PROCESS, message)
        }
        Request::Kill { handle, signal } => {
            let fields = json!({"vm": shared.vm, "handle": handle, "signal": signal});
            if !shared.record("vm.kill", fields) {
                return unrecorded(writer, client_stream);
            }
            relay(
                writer,
                client_stream,
                shared,
                &Request::Kill { handle, signal },
            )
        }
        request @ (Request::FsMkdir { .. } | Request::FsRemove { .. } | Request::FsMove { .. }) => {
            let (op, paths) = match &request {
                Request::FsMkdir { path, .. } => ("mkdir", vec![path]),
                Request::FsRemove { path, .. } => ("remove", vec![path]),
                Request::FsMove { from, to } => ("move", vec![from, to]),
                _ => ("", vec![]),
            };
            let paths: Vec<String> = paths
                .iter()
                .map(|p| mvm_ir::digest::sha256_prefixed(p.as_bytes()))
                .collect();
            let fields = json!({"vm": shared.vm, "op": op, "paths_sha256": paths});
            if !shared.record("vm.fs", fields) {
                return unrecorded(writer, client_stream);
            }
            relay(writer, client_stream, shared, &request)
        }
        request @ (Request::Echo
        | Request::Wait { .. }
        | Request::Services { .. }
        | Request::ServiceLog { .. }
        | Request::Ps
        | Request::FsList { .. }
        | Request::FsStat { .. }) => relay(writer, client_stream, shared, &request),
    }
}

/// Whether commands may still start: not once the root was found corrupted or the VM is
/// stopping.
fn accepting(shared: &Shared) -> bool {
    !shared.corrupted.load(Ordering::Relaxed) && !shared.stop.load(Ordering::Relaxed)
}

/// Applies the plan's defaults to a command and records it — by digest only (argv values may
/// hold secrets) — before it runs: a command never runs unrecorded. `None` when it was
/// refused (the client has been told).
fn admit_command(
    writer: &ClientWriter,
    shared: &Shared,
    client_stream: u32,
    request: ExecRequest,
    event: &str,
) -> io::Result<Option<(ExecRequest, String)>> {
    let request = match with_plan_defaults(
        &shared.plan,
        &shared.launch_env,
        &shared.client_env,
        request,
    ) {
        Ok(request) => request,
        Err((code, message)) => {
            writer.error(client_stream, code, message)?;
            return Ok(None);
        }
    };
    let argv = serde_json::to_vec(&request.argv).map_err(io::Error::other)?;
    let argv_digest = mvm_ir::digest::sha256_prefixed(&argv);
    let mut fields = json!({"vm": shared.vm, "argv_sha256": argv_digest});
    if let Some(user) = &request.user {
        fields["user"] = user.as_str().into();
    }
    if request.tty.is_some() {
        fields["tty"] = true.into();
    }
    if !shared.record(event, fields) {
        unrecorded(writer, client_stream)?;
        return Ok(None);
    }
    Ok(Some((request, argv_digest)))
}

/// Refuses what could not be recorded first: mvm does not act without leaving evidence (and
/// the VM stops, see [`Shared::record`]).
fn unrecorded(writer: &ClientWriter, client_stream: u32) -> io::Result<()> {
    let message = "the audit log cannot be written".to_string();
    writer.error(client_stream, codes::SPAWN_FAILED, message)
}

/// A file being copied into the guest through this connection. Its exchange is not read
/// until the last byte has gone: what the agent sends on it meanwhile is held to a window and
/// one answer ([`AgentMux`]), and a send waits for room at most the mux's limit.
struct Upload {
    client_stream: u32,
    exchange: Exchange,
    remaining: u64,
    record: Value,
}

impl Upload {
    /// Tells the agent the client gave the upload up (an empty data frame before its last
    /// byte), so that its temporary file goes.
    fn abandon(&self, shared: &Shared) {
        let _ = shared.mux.send_data(self.exchange.stream(), &[]);
    }
}

/// Passes a copy's remaining frames (a read's data, the answer) on to the client and records
/// the copy with its outcome — before the client sees the answer.
fn finish_copy(
    writer: &ClientWriter,
    shared: &Shared,
    client_stream: u32,
    mut exchange: Exchange,
    mut record: Value,
) -> io::Result<()> {
    let mut waiting = AnswerWait::new(shared, writer, AGENT_QUIET, Duration::ZERO);
    loop {
        let frame = match waiting.next(&mut exchange) {
            Ok(frame) => frame,
            Err(why) => return why.tell(writer, client_stream),
        };
        if frame.kind != FrameKind::Response {
            writer.frame(frame.kind, client_stream, &frame.payload)?;
            continue;
        }
        record["outcome"] = match serde_json::from_slice::<Response>(&frame.payload) {
            Ok(Response::FsWrite(done) | Response::FsRead(done)) => {
                json!({"size": done.size, "sha256": done.sha256})
            }
            Ok(Response::Error(error)) => json!({"error": error.code}),
            _ => json!({"error": "unexpected answer"}),
        };
        shared.record("vm.copy", record);
        return writer.frame(FrameKind::Response, client_stream, &frame.payload);
    }
}

/// Sends `request` to the agent and passes every frame of the answer on to the client, on
/// the client's own stream id.
fn relay(
    writer: &ClientWriter,
    client_stream: u32,
    shared: &Shared,
    request: &Request,
) -> io::Result<()> {
    let mut exchange = match shared.mux.request(request) {
        Ok(exchange) => exchange,
        Err(e) => return writer.channel_failed(client_stream, &e),
    };
    let quiet = match request {
        Request::Wait { timeout_ms, .. }
        | Request::Services { timeout_ms, .. }
        | Request::ServiceLog { timeout_ms, .. } => with_grace(*timeout_ms),
        _ => AGENT_QUIET,
    };
    let mut waiting = AnswerWait::new(shared, writer, quiet, Duration::ZERO);
    let mut output = ScrubbedOutput::new(&shared.redactions);
    loop {
        let frame = match waiting.next(&mut exchange) {
            Ok(frame) => frame,
            Err(why) => return why.tell(writer, client_stream),
        };
        if frame.kind == FrameKind::Response {
            output.finish(writer, client_stream)?;
            return match output.recounted(&frame.payload) {
                Ok(Some(answer)) => writer.frame(frame.kind, client_stream, &answer),
                Ok(None) => writer.frame(frame.kind, client_stream, &frame.payload),
                Err(message) => writer.error(client_stream, crate::codes::RUN025, message),
            };
        }
        output.pass(writer, client_stream, &frame)?;
    }
}

/// A command's output frames on their way to a client, scrubbed of the launch's secrets
/// ([`crate::secrets::redact`]); other frames pass as they are.
///
/// Scrubbing changes the output's length, so the runner checks the byte counts in the
/// agent's answer against what the agent sent, and gives the client the counts of what it
/// passed on instead ([`ScrubbedOutput::recounted`]).
struct ScrubbedOutput<'a> {
    stdout: Redactor<'a>,
    stderr: Redactor<'a>,
    /// Bytes of stdout and stderr from the agent.
    received: (u64, u64),
    /// Bytes of stdout and stderr passed on.
    sent: (u64, u64),
}

impl<'a> ScrubbedOutput<'a> {
    fn new(redactions: &'a Redactions) -> Self {
        Self {
            stdout: redactions.redactor(),
            stderr: redactions.redactor(),
            received: (0, 0),
            sent: (0, 0),
        }
    }

    fn pass(&mut self, writer: &ClientWriter, stream: u32, frame: &Frame) -> io::Result<()> {
        let received = frame.payload.len() as u64;
        let scrubbed = match frame.kind {
            FrameKind::Stdout => {
                self.received.0 += received;
                self.stdout.push(&frame.payload)
            }
            FrameKind::Stderr => {
                self.received.1 += received;
                self.stderr.push(&frame.payload)
            }
            kind => return writer.frame(kind, stream, &frame.payload),
        };
        self.send(writer, frame.kind, stream, &scrubbed)
    }

    /// What was held back, before the answer.
    fn finish(&mut self, writer: &ClientWriter, stream: u32) -> io::Result<()> {
        let stdout = self.stdout.finish();
        self.send(writer, FrameKind::Stdout, stream, &stdout)?;
        let stderr = self.stderr.finish();
        self.send(writer, FrameKind::Stderr, stream, &stderr)
    }

    fn send(
        &mut self,
        writer: &ClientWriter,
        kind: FrameKind,
        stream: u32,
        bytes: &[u8],
    ) -> io::Result<()> {
        match kind {
            FrameKind::Stdout => self.sent.0 += bytes.len() as u64,
            _ => self.sent.1 += bytes.len() as u64,
        }
        write_chunks(writer, kind, stream, bytes)
    }

    /// A command's answer with the byte counts of what was passed on (`None`: `answer` is
    /// not a command's, or nothing was scrubbed, and goes as it is); an error when the agent
    /// counted other than it sent.
    fn recounted(&self, answer: &[u8]) -> Result<Option<Vec<u8>>, String> {
        if self.received == self.sent {
            return Ok(None);
        }
        let Ok(Response::Exec(mut reply)) = serde_json::from_slice::<Response>(answer) else {
            return Ok(None);
        };
        if (reply.stdout_bytes, reply.stderr_bytes) != self.received {
            return Err(format!(
                "the agent counted {}/{} bytes of stdout/stderr, {}/{} arrived",
                reply.stdout_bytes, reply.stderr_bytes, self.received.0, self.received.1
            ));
        }
        (reply.stdout_bytes, reply.stderr_bytes) = self.sent;
        serde_json::to_vec(&Response::Exec(reply))
            .map(Some)
            .map_err(|e| e.to_string())
    }
}

/// Writes `bytes` as frames of at most a data frame's size (a scrubbed frame can be longer
/// than the one it came in); nothing when empty.
fn write_chunks(
    writer: &ClientWriter,
    kind: FrameKind,
    stream: u32,
    bytes: &[u8],
) -> io::Result<()> {
    for chunk in bytes.chunks(64 * 1024) {
        writer.frame(kind, stream, chunk)?;
    }
    Ok(())
}

/// A request's own timeout (clamped to [`MAX_TIMEOUT`]) and the grace its answer has beyond.
fn with_grace(timeout_ms: u64) -> Duration {
    Duration::from_millis(timeout_ms).min(MAX_TIMEOUT) + ANSWER_GRACE
}

/// Why the rest of an answer is not waited for.
#[derive(Debug, Clone, Copy, thiserror::Error)]
enum NoAnswer {
    /// The agent channel closed.
    #[error("the agent channel closed")]
    Closed,
    /// The agent sent nothing on the exchange for this long.
    #[error("the agent sent nothing on this exchange for {}s", .0.as_secs())]
    Silent(Duration),
    /// The VM is stopping.
    #[error("the VM is stopping")]
    Stopping,
    /// The client hung up: nobody waits for the answer.
    #[error("the client hung up")]
    HungUp,
}

impl NoAnswer {
    /// Tells the client why its answer will not come (one that hung up is not told).
    fn tell(self, writer: &ClientWriter, client_stream: u32) -> io::Result<()> {
        let code = match self {
            NoAnswer::HungUp => return Ok(()),
            NoAnswer::Silent(_) => STALLED,
            NoAnswer::Closed | NoAnswer::Stopping => codes::SPAWN_FAILED,
        };
        writer.error(client_stream, code, self.to_string())
    }
}

/// The wait for the agent's answer on one exchange. It gives up — rather than hold its
/// thread and its client's slot for ever on a compromised or hung agent — once the agent has
/// sent nothing on the exchange for `quiet`, the VM is stopping, or the client has been gone
/// for `after_hang_up`.
struct AnswerWait<'a> {
    shared: &'a Shared,
    writer: &'a ClientWriter,
    quiet: Duration,
    after_hang_up: Duration,
    hung_up_at: Option<Instant>,
}

impl<'a> AnswerWait<'a> {
    fn new(
        shared: &'a Shared,
        writer: &'a ClientWriter,
        quiet: Duration,
        after_hang_up: Duration,
    ) -> Self {
        Self {
            shared,
            writer,
            quiet,
            after_hang_up,
            hung_up_at: None,
        }
    }

    /// The next frame of the answer, or why there will be none.
    fn next(&mut self, exchange: &mut Exchange) -> Result<Frame, NoAnswer> {
        let silent_until = Instant::now() + self.quiet;
        loop {
            if let Some(frame) = exchange.next_frame_within(POLL) {
                return Ok(frame);
            }
            // The frames of an exchange stop coming only when the channel closed.
            if self.shared.mux.is_closed() {
                return Err(NoAnswer::Closed);
            }
            if self.shared.stop.load(Ordering::Relaxed) {
                return Err(NoAnswer::Stopping);
            }
            let now = Instant::now();
            if self.hung_up_at.is_none() && self.writer.hung_up() {
                self.hung_up_at = Some(now);
            }
            if self
                .hung_up_at
                .is_some_and(|at| now >= at + self.after_hang_up)
            {
                return Err(NoAnswer::HungUp);
            }
            if now >= silent_until {
                return Err(NoAnswer::Silent(self.quiet));
            }
        }
    }
}

/// Runs a command through the agent and passes its output on to the client as it comes,
/// while a second thread passes the client's input (and `signal` requests for the command)
/// the other way. A client that hangs up cancels its command (SIGKILL to its process group);
/// one that stops reading gets no more output. Either way the command's end is recorded —
/// before the client sees its answer — and a corrupted root stops the VM once that answer is
/// sent.
fn relay_exec(
    reader: &mut ClientReader,
    writer: &ClientWriter,
    client_stream: u32,
    shared: &Shared,
    request: ExecRequest,
    argv_digest: &str,
) -> io::Result<()> {
    let takes_input = request.stdin;
    let quiet = with_grace(request.timeout_ms);
    let exchange = shared.mux.request(&Request::Exec(request));
    let mut outcome = json!({"error": NoAnswer::Closed.to_string()});
    let mut answer = Err(NoAnswer::Closed);
    if let Ok(mut exchange) = exchange {
        let agent_stream = exchange.stream();
        let ended = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let input = scope.spawn(|| {
                pass_input(
                    reader,
                    writer,
                    shared,
                    (client_stream, agent_stream),
                    takes_input,
                    &ended,
                )
            });
            // A client that hangs up has its command killed (`pass_input`): its end is still
            // waited for a moment, to be recorded.
            let mut waiting = AnswerWait::new(shared, writer, quiet, CANCEL_GRACE);
            let mut client_reads = true;
            let mut output = ScrubbedOutput::new(&shared.redactions);
            loop {
                let frame = match waiting.next(&mut exchange) {
                    Ok(frame) => frame,
                    Err(why) => {
                        outcome = json!({"error": why.to_string()});
                        answer = Err(why);
                        break;
                    }
                };
                if frame.kind != FrameKind::Response {
                    if client_reads {
                        client_reads = output.pass(writer, client_stream, &frame).is_ok();
                    }
                    continue;
                }
                if client_reads {
                    // What was held back goes before the answer (a client that stopped
                    // reading gets neither).
                    let _ = output.finish(writer, client_stream);
                }
                outcome = match serde_json::from_slice::<Response>(&frame.payload) {
                    Ok(Response::Exec(reply)) => {
                        if reply.integrity == Integrity::Corrupted {
                            // No command starts from here on; the VM stops once this
                            // client has its answer (below), not before.
                            shared.corrupted.store(true, Ordering::Relaxed);
                        }
                        json!({"status": reply.status, "integrity": reply.integrity})
                    }
                    Ok(Response::Error(error)) => json!({"error": error.code}),
                    _ => json!({"error": "unexpected answer"}),
                };
                answer = Ok(match output.recounted(&frame.payload) {
                    Ok(recounted) => recounted.unwrap_or(frame.payload),
                    Err(message) => {
                        outcome = json!({"error": crate::codes::RUN025});
                        let error = ErrorReply {
                            code: crate::codes::RUN025.into(),
                            message,
                        };
                        serde_json::to_vec(&Response::Error(error)).map_err(io::Error::other)?
                    }
                });
                break;
            }
            ended.store(true, Ordering::Relaxed);
            input.join().unwrap_or(Ok(()))
        })?;
    }
    shared.record(
        "vm.exec.ended",
        json!({"vm": shared.vm, "argv_sha256": argv_digest, "outcome": outcome}),
    );
    let answered = match answer {
        Ok(payload) => writer.frame(FrameKind::Response, client_stream, &payload),
        Err(why) => why.tell(writer, client_stream),
    };
    if shared.corrupted.load(Ordering::Relaxed) {
        // The root cannot be trusted any more: the VM stops as failed.
        shared.stop.store(true, Ordering::Relaxed);
    }
    answered
}

/// While a command runs: the client's data frames become its input (when it has one), a
/// `signal` request for it is passed to the agent, and a hang-up kills it.
fn pass_input(
    reader: &mut ClientReader,
    writer: &ClientWriter,
    shared: &Shared,
    (client_stream, agent_stream): (u32, u32),
    takes_input: bool,
    ended: &AtomicBool,
) -> io::Result<()> {
    let mut input_open = takes_input;
    while !ended.load(Ordering::Relaxed) {
        let frame = match reader.read(writer)? {
            Read::Frame(frame) => frame,
            Read::Idle => continue,
            Read::Gone => {
                let cancel = Request::Signal {
                    stream: agent_stream,
                    signal: 9,
                };
                let _ = shared.mux.request(&cancel);
                return Ok(());
            }
        };
        match frame.kind {
            FrameKind::Data if frame.stream == client_stream && input_open => {
                // An empty frame closes the input; a command that has ended takes no more.
                input_open = !frame.payload.is_empty()
                    && shared.mux.send_data(agent_stream, &frame.payload).is_ok();
                if frame.payload.is_empty() {
                    let _ = shared.mux.send_data(agent_stream, &[]);
                }
            }
            FrameKind::Data | FrameKind::Credit => {}
            FrameKind::Request => {
                let asked = serde_json::from_slice::<Request>(&frame.payload);
                match asked {
                    Ok(Request::Signal { stream, signal }) if stream == client_stream => {
                        let signal = Request::Signal {
                            stream: agent_stream,
                            signal,
                        };
                        relay(writer, frame.stream, shared, &signal)?;
                    }
                    Ok(Request::Resize { stream, size }) if stream == client_stream => {
                        let resize = Request::Resize {
                            stream: agent_stream,
                            size,
                        };
                        relay(writer, frame.stream, shared, &resize)?;
                    }
                    _ => {
                        let message =
                            "a connection carries one exchange at a time; only `signal` and \
                             `resize` for the running command are taken"
                                .to_string();
                        writer.error(frame.stream, codes::BUSY, message)?;
                    }
                }
            }
            kind => {
                let message = format!("a {kind:?} frame from a client");
                writer.error(frame.stream, codes::BAD_REQUEST, message)?;
            }
        }
    }
    Ok(())
}

/// The environment every command of the plan starts from: the plan's variables, the launch's
/// over them (its `--env` and secrets), and `HOME=/tmp` unless one of them sets it.
pub fn plan_environment(
    plan: &LaunchPlan,
    launch_env: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut env = plan.policy.env.clone();
    env.extend(launch_env.clone());
    env.entry("HOME".into()).or_insert_with(|| "/tmp".into());
    env
}

/// The plan's environment under the launch's (`--env`) under the client's own variables (the
/// client's win), `HOME=/tmp` when none sets it, the plan's working directory, entrypoint and
/// user (the image's `User`) when the client gives none, the timeout clamped to a week. A
/// client variable that is not a valid name, or that the IR refuses everywhere (`LD_PRELOAD`
/// and the like), is refused ([`codes::BAD_REQUEST`]); so is any client variable when the
/// plan's profile or the host's policy lets no client set one ([`codes::NOT_GRANTED`], the
/// rule in `client_env`), and a terminal where the plan's profile grants none
/// ([`codes::NO_TERMINAL`]).
pub fn with_plan_defaults(
    plan: &LaunchPlan,
    launch_env: &BTreeMap<String, String>,
    client_env: &Result<(), String>,
    mut request: ExecRequest,
) -> Result<ExecRequest, (&'static str, String)> {
    for name in request.env.keys() {
        if !is_env_name(name) || is_denied(name) {
            let message = format!("environment variable {name:?} is not allowed");
            return Err((codes::BAD_REQUEST, message));
        }
    }
    if !request.env.is_empty() {
        client_env
            .clone()
            .map_err(|rule| (codes::NOT_GRANTED, rule))?;
    }
    request.timeout_ms = request.timeout_ms.min(MAX_TIMEOUT.as_millis() as u64);
    let mut env = plan_environment(plan, launch_env);
    env.append(&mut request.env);
    request.env = env;
    if request.argv.is_empty() {
        request.argv = plan.entrypoint.command.clone();
    }
    if !plan.policy.grants.any_command && request.argv.first() != plan.entrypoint.command.first() {
        let program = plan.entrypoint.command.first().map_or("", String::as_str);
        let message = format!(
            "the plan lets clients run only its entrypoint's program, {program} (it was built \
             with --only-entrypoint)"
        );
        return Err((codes::NOT_GRANTED, message));
    }
    if request.tty.is_some() && !plan.policy.grants.terminal {
        let message = format!(
            "the plan's profile ({}) grants no terminal: one is given under `dev`, or where the \
             plan was built with the terminal grant",
            plan.policy.profile
        );
        return Err((codes::NO_TERMINAL, message));
    }
    if request.cwd.is_none() {
        request.cwd = plan.entrypoint.cwd.clone();
    }
    if request.user.is_none() {
        request.user = plan.entrypoint.user.clone();
    }
    Ok(request)
}
