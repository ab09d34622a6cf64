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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mvm_agent::protocol::{
    codes, encode, ErrorReply, ExecRequest, FrameDecoder, FrameKind, HelloReply, Request, Response,
};
use mvm_ir::plan::LaunchPlan;
use serde_json::{json, Value};

use crate::launch::Audit;
use crate::mux::AgentMux;

/// How often the accept loop and idle connections look at the stop flag.
const POLL: Duration = Duration::from_millis(50);

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
    while !shared.stop.load(Ordering::Relaxed) && keep_going() {
        match listener.accept() {
            Ok((connection, _)) => {
                let same_user = rustix::net::sockopt::socket_peercred(&connection)
                    .is_ok_and(|peer| peer.uid == uid);
                if !same_user {
                    continue;
                }
                let shared = Arc::clone(shared);
                std::thread::Builder::new()
                    .name("control".into())
                    .spawn(move || {
                        let _ = serve_client(connection, &shared);
                    })?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Serves one client until it hangs up.
fn serve_client(mut connection: UnixStream, shared: &Shared) -> io::Result<()> {
    connection.set_nonblocking(false)?;
    connection.set_read_timeout(Some(POLL))?;
    let mut decoder = FrameDecoder::new();
    let mut buffer = vec![0; 64 * 1024];
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
            Request::PowerOff => {
                shared.stop.store(true, Ordering::Relaxed);
                reply(&mut connection, client_stream, &Response::PowerOff)?;
            }
            Request::Exec(request) => {
                let request = with_plan_defaults(&shared.plan, request);
                // The command is recorded by digest only: argv values may hold secrets.
                let argv = serde_json::to_vec(&request.argv).map_err(io::Error::other)?;
                let argv_digest = mvm_ir::digest::sha256_prefixed(&argv);
                let outcome = relay(
                    &mut connection,
                    client_stream,
                    shared,
                    &Request::Exec(request),
                )?;
                let recorded = shared.audit.append(
                    "vm.exec",
                    json!({"vm": shared.vm, "argv_sha256": argv_digest, "outcome": outcome}),
                );
                if recorded.is_err() {
                    // mvm does not act without leaving evidence: no more commands.
                    shared.stop.store(true, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Sends `request` to the agent and passes every frame of the answer on to the client, on
/// the client's own stream id. Returns the outcome for the audit entry: the exit status, or
/// the error's code.
fn relay(
    connection: &mut UnixStream,
    client_stream: u32,
    shared: &Shared,
    request: &Request,
) -> io::Result<Value> {
    let frames = match shared.mux.request(request) {
        Ok(frames) => frames,
        Err(e) => {
            let message = format!("the agent channel: {e}");
            reply_error(connection, client_stream, codes::SPAWN_FAILED, message)?;
            return Ok(json!({"error": codes::SPAWN_FAILED}));
        }
    };
    for frame in frames {
        let bytes = encode(frame.kind, client_stream, &frame.payload).map_err(io::Error::other)?;
        // A client that went away does not stop the command; its answer is still recorded.
        let _ = connection.write_all(&bytes);
        if frame.kind == FrameKind::Response {
            return Ok(match serde_json::from_slice::<Response>(&frame.payload) {
                Ok(Response::Exec(reply)) => {
                    json!({"status": reply.status, "integrity": reply.integrity})
                }
                Ok(Response::Error(error)) => json!({"error": error.code}),
                _ => json!({"error": "unexpected answer"}),
            });
        }
    }
    let message = "the agent channel closed before the command ended".to_string();
    reply_error(connection, client_stream, codes::SPAWN_FAILED, message)?;
    Ok(json!({"error": "channel closed"}))
}

/// The plan's environment under the client's own variables (the client's win), `HOME=/tmp`
/// when neither sets it, the plan's working directory and entrypoint when the client gives
/// none.
pub fn with_plan_defaults(plan: &LaunchPlan, mut request: ExecRequest) -> ExecRequest {
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
    request
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
