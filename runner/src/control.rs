//! The control socket of a named VM (`vms/<name>/control.sock`, 0600 in a 0700 directory):
//! how `mvm exec`, `mvm stop` and the SDKs reach a VM that stays up. No HTTP, no daemon: the
//! runner that owns the VM serves it, speaking the agent's own [protocol] — a client sends
//! requests on its connection and gets the same frames back, relayed through the shared agent
//! channel ([`AgentMux`]). Exec requests get the plan's defaults (environment, working
//! directory, entrypoint) applied here, so a client cannot step outside the plan's policy.
//!
//! [protocol]: mvm_agent::protocol

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mvm_agent::protocol::{
    codes, encode, ErrorReply, ExecRequest, Frame, FrameDecoder, FrameKind, HelloReply, Integrity,
    Request, Response,
};
use mvm_ir::plan::LaunchPlan;
use mvm_ir::validate::{is_env_name, DENIED_ENV};
use serde_json::{json, Value};

use crate::launch::Audit;
use crate::mux::AgentMux;

/// How often the accept loop and idle connections look at the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// How long a client may take to accept a write; then it gets no more output (the command's
/// answer is still recorded), so that a client that stops reading holds nothing for long.
const CLIENT_WRITE_LIMIT: Duration = Duration::from_secs(10);
/// The most clients served at once; more wait in the listen queue.
const MAX_CLIENTS: usize = 64;
/// The longest a command may be given, and what "no timeout" means (the agent clamps nothing
/// itself).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// What every connection shares.
pub struct Shared {
    /// The agent channel.
    pub mux: AgentMux,
    /// The admitted plan, for exec defaults.
    pub plan: LaunchPlan,
    /// The agent's hello, answered to clients that say hello.
    pub hello: HelloReply,
    /// Set by a client's power-off request (or a signal): the owner stops the VM.
    pub stop: Arc<AtomicBool>,
    /// Where every exec is recorded.
    pub(crate) audit: Arc<Audit>,
    /// The VM's id, for the audit entries.
    pub vm: String,
    /// Set when dm-verity reported a corrupted block: the root can no longer be trusted, so
    /// no further command runs and the VM stops as failed.
    pub corrupted: AtomicBool,
    /// The first audit entry that could not be written: the VM stops as failed.
    pub audit_failure: Mutex<Option<String>>,
}

impl Shared {
    /// Records `event`; when that fails, the VM must stop (no command runs unrecorded).
    fn record(&self, event: &str, fields: Value) -> bool {
        match self.audit.append(event, fields) {
            Ok(()) => true,
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
/// thread of its own. Only the runner's own user may connect.
pub fn serve(
    listener: &UnixListener,
    shared: &Arc<Shared>,
    mut keep_going: impl FnMut() -> bool,
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let uid = rustix::process::getuid();
    let clients = Arc::new(AtomicUsize::new(0));
    while !shared.stop.load(Ordering::Relaxed) && keep_going() {
        if clients.load(Ordering::Relaxed) >= MAX_CLIENTS {
            std::thread::sleep(POLL);
            continue;
        }
        match listener.accept() {
            Ok((connection, _)) => {
                let same_user = rustix::net::sockopt::socket_peercred(&connection)
                    .is_ok_and(|peer| peer.uid == uid);
                if !same_user {
                    continue;
                }
                let shared = Arc::clone(shared);
                let counted = Arc::clone(&clients);
                counted.fetch_add(1, Ordering::Relaxed);
                let spawned = std::thread::Builder::new()
                    .name("control".into())
                    .spawn(move || {
                        let _ = serve_client(connection, &shared);
                        counted.fetch_sub(1, Ordering::Relaxed);
                    });
                if spawned.is_err() {
                    clients.fetch_sub(1, Ordering::Relaxed);
                }
            }
            // Out of descriptors, memory or an aborted connection: this client is lost, not
            // the VM.
            Err(_) => std::thread::sleep(POLL),
        }
    }
    Ok(())
}

/// Serves one client until it hangs up.
fn serve_client(mut connection: UnixStream, shared: &Shared) -> io::Result<()> {
    connection.set_nonblocking(false)?;
    connection.set_read_timeout(Some(POLL))?;
    connection.set_write_timeout(Some(CLIENT_WRITE_LIMIT))?;
    let mut decoder = FrameDecoder::new();
    let mut buffer = vec![0; 64 * 1024];
    let mut upload: Option<Upload> = None;
    loop {
        let frame = match decoder.next_frame() {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                match connection.read(&mut buffer) {
                    Ok(0) => return Ok(()),
                    Ok(n) => decoder.push(&buffer[..n]),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        if shared.stop.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                    }
                    Err(e) => return Err(e),
                }
                continue;
            }
            Err(e) => {
                reply_error(&mut connection, 0, codes::BAD_REQUEST, e.to_string())?;
                return Ok(());
            }
        };
        let client_stream = frame.stream;
        if frame.kind == FrameKind::Data {
            // The bytes of the upload in progress on this connection, passed on as they come;
            // when the last has gone, the agent's answer is passed back.
            let Some(mut current) = upload.take_if(|u| u.client_stream == client_stream) else {
                continue;
            };
            let len = frame.payload.len() as u64;
            if len > current.remaining
                || shared
                    .mux
                    .send_data(current.agent_stream, &frame.payload)
                    .is_err()
            {
                let message = "the upload's bytes do not fit what was announced".to_string();
                reply_error(
                    &mut connection,
                    client_stream,
                    codes::COPY_MISMATCH,
                    message,
                )?;
                continue;
            }
            current.remaining -= len;
            if current.remaining == 0 {
                finish_copy(
                    &mut connection,
                    shared,
                    current.client_stream,
                    current.frames,
                    current.record,
                )?;
            } else {
                upload = Some(current);
            }
            continue;
        }
        let request = match (
            frame.kind,
            serde_json::from_slice::<Request>(&frame.payload),
        ) {
            (FrameKind::Request, Ok(request)) => request,
            (_, Err(e)) => {
                reply_error(
                    &mut connection,
                    client_stream,
                    codes::BAD_REQUEST,
                    e.to_string(),
                )?;
                continue;
            }
            (kind, Ok(_)) => {
                let message = format!("a {kind:?} frame from a client");
                reply_error(&mut connection, client_stream, codes::BAD_REQUEST, message)?;
                continue;
            }
        };
        match request {
            Request::Hello { .. } => reply(
                &mut connection,
                client_stream,
                &Response::Hello(shared.hello.clone()),
            )?,
            Request::Echo => {
                relay(&mut connection, client_stream, shared, &Request::Echo)?;
            }
            Request::FsWrite(request) => {
                let record = json!({
                    "vm": shared.vm, "direction": "in",
                    "path_sha256": mvm_ir::digest::sha256_prefixed(request.path.as_bytes()),
                    "size": request.size, "sha256": request.sha256,
                });
                let remaining = request.size;
                match shared.mux.request_on_stream(&Request::FsWrite(request)) {
                    Ok((_, frames)) if remaining == 0 => {
                        finish_copy(&mut connection, shared, client_stream, frames, record)?;
                    }
                    Ok((agent_stream, frames)) => {
                        upload = Some(Upload {
                            client_stream,
                            agent_stream,
                            remaining,
                            frames,
                            record,
                        });
                    }
                    Err(e) => channel_failed(&mut connection, client_stream, &e)?,
                }
            }
            Request::FsRead { path } => {
                let record = json!({
                    "vm": shared.vm, "direction": "out",
                    "path_sha256": mvm_ir::digest::sha256_prefixed(path.as_bytes()),
                });
                match shared.mux.request(&Request::FsRead { path }) {
                    Ok(frames) => {
                        finish_copy(&mut connection, shared, client_stream, frames, record)?
                    }
                    Err(e) => channel_failed(&mut connection, client_stream, &e)?,
                }
            }
            Request::PowerOff => {
                shared.stop.store(true, Ordering::Relaxed);
                reply(&mut connection, client_stream, &Response::PowerOff)?;
            }
            Request::Exec(request) => {
                let request = match with_plan_defaults(&shared.plan, request) {
                    Ok(request) => request,
                    Err(message) => {
                        reply_error(&mut connection, client_stream, codes::BAD_REQUEST, message)?;
                        continue;
                    }
                };
                if shared.corrupted.load(Ordering::Relaxed) || shared.stop.load(Ordering::Relaxed) {
                    let message = "the VM is stopping".to_string();
                    reply_error(&mut connection, client_stream, codes::SPAWN_FAILED, message)?;
                    continue;
                }
                // Recorded before it runs, by digest only (argv values may hold secrets): a
                // command never runs unrecorded.
                let argv = serde_json::to_vec(&request.argv).map_err(io::Error::other)?;
                let argv_digest = mvm_ir::digest::sha256_prefixed(&argv);
                let fields = json!({"vm": shared.vm, "argv_sha256": argv_digest});
                if !shared.record("vm.exec.started", fields) {
                    let message = "the audit log cannot be written".to_string();
                    reply_error(&mut connection, client_stream, codes::SPAWN_FAILED, message)?;
                    continue;
                }
                relay_exec(
                    &mut connection,
                    client_stream,
                    shared,
                    request,
                    &argv_digest,
                )?;
            }
        }
    }
}

/// A file being copied into the guest through this connection.
struct Upload {
    client_stream: u32,
    agent_stream: u32,
    remaining: u64,
    frames: Receiver<Frame>,
    record: Value,
}

/// Passes a copy's remaining frames (a read's data, the answer) on to the client and records
/// the copy with its outcome — before the client sees the answer.
fn finish_copy(
    connection: &mut UnixStream,
    shared: &Shared,
    client_stream: u32,
    frames: Receiver<Frame>,
    mut record: Value,
) -> io::Result<()> {
    for frame in frames {
        if frame.kind != FrameKind::Response {
            let bytes =
                encode(frame.kind, client_stream, &frame.payload).map_err(io::Error::other)?;
            connection.write_all(&bytes)?;
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
        let bytes =
            encode(FrameKind::Response, client_stream, &frame.payload).map_err(io::Error::other)?;
        return connection.write_all(&bytes);
    }
    let message = "the agent channel closed before the copy ended".to_string();
    reply_error(connection, client_stream, codes::SPAWN_FAILED, message)
}

/// Sends `request` to the agent and passes every frame of the answer on to the client, on
/// the client's own stream id.
fn relay(
    connection: &mut UnixStream,
    client_stream: u32,
    shared: &Shared,
    request: &Request,
) -> io::Result<()> {
    let frames = match shared.mux.request(request) {
        Ok(frames) => frames,
        Err(e) => return channel_failed(connection, client_stream, &e),
    };
    for frame in frames {
        let bytes = encode(frame.kind, client_stream, &frame.payload).map_err(io::Error::other)?;
        connection.write_all(&bytes)?;
        if frame.kind == FrameKind::Response {
            return Ok(());
        }
    }
    let message = "the agent channel closed".to_string();
    reply_error(connection, client_stream, codes::SPAWN_FAILED, message)
}

/// Runs a command through the agent and passes its output on to the client as it comes. A
/// client that stops reading gets no more output, but the command's end is still recorded —
/// before the client sees its answer — and a corrupted root stops the VM.
fn relay_exec(
    connection: &mut UnixStream,
    client_stream: u32,
    shared: &Shared,
    request: ExecRequest,
    argv_digest: &str,
) -> io::Result<()> {
    let mut client_reads = true;
    let mut forward = |connection: &mut UnixStream, kind, payload: &[u8]| {
        if client_reads {
            let bytes = encode(kind, client_stream, payload).map_err(io::Error::other)?;
            client_reads = connection.write_all(&bytes).is_ok();
        }
        Ok::<_, io::Error>(())
    };
    let frames = shared.mux.request(&Request::Exec(request));
    let mut outcome = json!({"error": "the agent channel closed"});
    let mut answer = None;
    if let Ok(frames) = frames {
        for frame in frames {
            if frame.kind != FrameKind::Response {
                forward(connection, frame.kind, &frame.payload)?;
                continue;
            }
            outcome = match serde_json::from_slice::<Response>(&frame.payload) {
                Ok(Response::Exec(reply)) => {
                    if reply.integrity == Integrity::Corrupted {
                        shared.corrupted.store(true, Ordering::Relaxed);
                        shared.stop.store(true, Ordering::Relaxed);
                    }
                    json!({"status": reply.status, "integrity": reply.integrity})
                }
                Ok(Response::Error(error)) => json!({"error": error.code}),
                _ => json!({"error": "unexpected answer"}),
            };
            answer = Some(frame.payload);
            break;
        }
    }
    shared.record(
        "vm.exec.ended",
        json!({"vm": shared.vm, "argv_sha256": argv_digest, "outcome": outcome}),
    );
    match answer {
        Some(payload) => forward(connection, FrameKind::Response, &payload),
        None => {
            let message = "the agent channel closed before the command ended".to_string();
            reply_error(connection, client_stream, codes::SPAWN_FAILED, message)
        }
    }
}

/// The plan's environment under the client's own variables (the client's win), `HOME=/tmp`
/// when neither sets it, the plan's working directory and entrypoint when the client gives
/// none, the timeout clamped to a week. A client variable that is not a valid name, or that
/// the IR refuses everywhere (`LD_PRELOAD` and the like), is refused.
pub fn with_plan_defaults(
    plan: &LaunchPlan,
    mut request: ExecRequest,
) -> Result<ExecRequest, String> {
    for name in request.env.keys() {
        if !is_env_name(name) || DENIED_ENV.contains(&name.as_str()) {
            return Err(format!("environment variable {name:?} is not allowed"));
        }
    }
    request.timeout_ms = request.timeout_ms.min(MAX_TIMEOUT.as_millis() as u64);
    let mut env = plan.policy.env.clone();
    env.append(&mut request.env);
    env.entry("HOME".into()).or_insert_with(|| "/tmp".into());
    request.env = env;
    if request.argv.is_empty() {
        request.argv = plan.entrypoint.command.clone();
    }
    if request.cwd.is_none() {
        request.cwd = plan.entrypoint.cwd.clone();
    }
    Ok(request)
}

/// Tells the client its request could not reach the agent.
fn channel_failed(
    connection: &mut UnixStream,
    stream: u32,
    error: &crate::client::ClientError,
) -> io::Result<()> {
    let message = format!("the agent channel: {error}");
    reply_error(connection, stream, codes::SPAWN_FAILED, message)
}

fn reply(connection: &mut UnixStream, stream: u32, response: &Response) -> io::Result<()> {
    let payload = serde_json::to_vec(response).map_err(io::Error::other)?;
    let bytes = encode(FrameKind::Response, stream, &payload).map_err(io::Error::other)?;
    connection.write_all(&bytes)
}

fn reply_error(
    connection: &mut UnixStream,
    stream: u32,
    code: &str,
    message: String,
) -> io::Result<()> {
    let error = ErrorReply {
        code: code.into(),
        message,
    };
    reply(connection, stream, &Response::Error(error))
}
