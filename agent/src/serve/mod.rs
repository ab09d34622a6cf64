//! Serving the host: the agent's side of the [protocol](crate::protocol) over one channel.
//!
//! One thread, one `poll` over the channel and every running command's pipes and pidfd.
//! Commands run concurrently, each on the stream id of its request (up to [`MAX_COMMANDS`];
//! one more is answered `AGENT104`, busy). Output is forwarded as it arrives, each stream in
//! its own frames; a command's final response follows once it has ended and its pipes are
//! drained.

pub mod channel;
pub mod exec;
pub mod files;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::WaitOptions;

use crate::protocol::{
    codes, encode, BootTimings, ErrorReply, ExecReply, FileDone, Frame, FrameDecoder, FrameError,
    FrameKind, HelloReply, Integrity, Request, Response, PROTOCOL_VERSION,
};
use exec::{Credentials, Running};
use files::Upload;

/// Bytes read from a pipe or the channel at a time; also the largest data frame sent.
const CHUNK: usize = 64 * 1024;
/// Commands that may run at once; one more is refused as busy (`AGENT104`).
pub const MAX_COMMANDS: usize = 32;
/// How long to wait for the host to connect before looking again.
const NOT_CONNECTED_PAUSE: Duration = Duration::from_millis(20);

/// How the agent serves.
pub struct ServeConfig {
    /// Who commands run as; `None` runs them as the agent itself (only for tests on a host).
    pub workload_user: Option<Credentials>,
    /// Reap every child that ends (PID 1 inherits every orphan in the guest), not only the
    /// commands it started.
    pub reap_orphans: bool,
    /// The boot timings for the hello.
    pub timings: BootTimings,
    /// Reads whether the verified root has seen a corrupted block.
    pub integrity: fn() -> Integrity,
}

impl ServeConfig {
    /// Serving on a host rather than as the guest's PID 1 (tests, and tools driving the loop
    /// over a socket pair): commands run as the caller, only the agent's own children are
    /// reaped, no boot timings, and a root that is always intact.
    pub fn on_host() -> Self {
        Self {
            workload_user: None,
            reap_orphans: false,
            timings: BootTimings::default(),
            integrity: || Integrity::Intact,
        }
    }
}

/// Why serving ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The host asked for a power-off (and got its answer).
    PowerOff,
    /// The host closed the channel.
    HostGone,
}

/// Why serving failed: the channel broke or carried bytes that are not frames.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A malformed frame header.
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// Reading or writing the channel failed.
    #[error("agent channel: {0}")]
    Io(#[from] io::Error),
}

impl ServeError {
    /// The stable code of this error: the frame error's, or `AGENT009` for the channel.
    pub fn code(&self) -> &'static str {
        match self {
            ServeError::Frame(e) => e.code(),
            ServeError::Io(_) => "AGENT009",
        }
    }
}

/// Serves requests on `channel` until the host asks for a power-off or goes away.
pub fn serve<C: Read + Write + AsFd>(
    channel: &mut C,
    config: &ServeConfig,
) -> Result<Ended, ServeError> {
    let mut decoder = FrameDecoder::new();
    let mut running: Vec<Running> = Vec::new();
    let mut uploads: HashMap<u32, Upload> = HashMap::new();
    let mut heard_from_host = false;
    let mut buffer = vec![0; CHUNK];
    loop {
        let (channel_events, pipe_events) = wait(channel, &running)?;

        if channel_events.contains(PollFlags::IN) {
            let n = match channel.read(&mut buffer) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            if n == 0 && heard_from_host {
                return Ok(Ended::HostGone);
            }
            if n == 0 {
                std::thread::sleep(NOT_CONNECTED_PAUSE);
            }
            heard_from_host |= n > 0;
            decoder.push(&buffer[..n]);
            while let Some(frame) = decoder.next_frame()? {
                if let Some(ended) = handle(channel, frame, &mut running, &mut uploads, config)? {
                    return Ok(ended);
                }
            }
        } else if channel_events.intersects(PollFlags::HUP | PollFlags::ERR) {
            // A virtio-console port reports a hang-up while no host is connected.
            if heard_from_host {
                return Ok(Ended::HostGone);
            }
            std::thread::sleep(NOT_CONNECTED_PAUSE);
        }

        if config.reap_orphans {
            reap_all(&mut running)?;
        }
        let now = Instant::now();
        for (command, events) in running.iter_mut().zip(&pipe_events) {
            forward_output(channel, command, events, &mut buffer)?;
            if events.exited && !config.reap_orphans {
                command.reap()?;
            }
            command.enforce_deadline(now);
        }
        let mut index = 0;
        while index < running.len() {
            let command = &running[index];
            let Some(status) = command.status.filter(|_| command.finished(now)) else {
                index += 1;
                continue;
            };
            let command = running.swap_remove(index);
            command.kill_leftovers();
            // The workload user's strays (those that left the process group) go once no
            // command of theirs is still running.
            if let Some(user) = config.workload_user.filter(|_| running.is_empty()) {
                exec::kill_user_processes(user.uid);
            }
            let reply = ExecReply {
                status,
                integrity: (config.integrity)(),
                stdout_bytes: command.stdout_bytes,
                stderr_bytes: command.stderr_bytes,
                duration_ms: command.elapsed_ms(),
            };
            send(channel, command.stream, &Response::Exec(reply))?;
        }
    }
}

/// Answers one frame from the host; `Some` when serving ends.
fn handle<C: Write>(
    channel: &mut C,
    frame: Frame,
    running: &mut Vec<Running>,
    uploads: &mut HashMap<u32, Upload>,
    config: &ServeConfig,
) -> Result<Option<Ended>, ServeError> {
    if frame.kind == FrameKind::Data {
        // The bytes of an upload; those of one already refused or failed are dropped (the host
        // streams them without waiting for the answer).
        return receive(channel, frame, uploads).map(|()| None);
    }
    if frame.kind != FrameKind::Request {
        let message = format!("a {:?} frame from the host", frame.kind);
        send_error(channel, frame.stream, codes::BAD_REQUEST, message)?;
        return Ok(None);
    }
    let request = match serde_json::from_slice::<Request>(&frame.payload) {
        Ok(request) => request,
        Err(e) => {
            send_error(channel, frame.stream, codes::BAD_REQUEST, e.to_string())?;
            return Ok(None);
        }
    };
    match request {
        Request::Hello { version } if version == PROTOCOL_VERSION => {
            let hello = Response::Hello(HelloReply {
                version: PROTOCOL_VERSION,
                agent: env!("CARGO_PKG_VERSION").into(),
                timings: config.timings,
            });
            send(channel, frame.stream, &hello)?;
        }
        Request::Hello { version } => {
            let message =
                format!("the host speaks protocol {version}, this agent {PROTOCOL_VERSION}");
            send_error(channel, frame.stream, codes::VERSION, message)?;
        }
        Request::Echo => send(channel, frame.stream, &Response::Echo)?,
        Request::FsWrite(_) if uploads.contains_key(&frame.stream) => {
            let message = format!("stream {} already has a copy going", frame.stream);
            send_error(channel, frame.stream, codes::BAD_REQUEST, message)?;
        }
        Request::FsWrite(request) => {
            match files::Upload::start(frame.stream, request, config.workload_user) {
                Ok(upload) if upload.complete() => {
                    let done = upload.finish();
                    answer_upload(channel, frame.stream, done)?;
                }
                Ok(upload) => {
                    uploads.insert(frame.stream, upload);
                }
                Err(error) => send(channel, frame.stream, &Response::Error(error))?,
            }
        }
        Request::FsRead { path } => match files::open_for_reading(&path, config.workload_user) {
            Ok((file, _)) => {
                let mut chunk = vec![0; CHUNK];
                let sent = files::send_file(file, &mut chunk, |bytes| {
                    write_frame(channel, FrameKind::Data, frame.stream, bytes)
                        .map_err(|e| io::Error::other(e.to_string()))
                });
                match sent {
                    Ok(done) => send(channel, frame.stream, &Response::FsRead(done))?,
                    Err(e) => send_error(channel, frame.stream, codes::FILE_IO, e.to_string())?,
                }
            }
            Err(error) => send(channel, frame.stream, &Response::Error(error))?,
        },
        Request::Exec(_) if running.iter().any(|c| c.stream == frame.stream) => {
            let message = format!("stream {} already has a command running", frame.stream);
            send_error(channel, frame.stream, codes::BAD_REQUEST, message)?;
        }
        Request::Exec(_) if running.len() >= MAX_COMMANDS => {
            let message = format!("{MAX_COMMANDS} commands are already running");
            send_error(channel, frame.stream, codes::BUSY, message)?;
        }
        Request::Exec(request) => {
            match Running::start(frame.stream, &request, config.workload_user) {
                Ok(started) => running.push(started),
                Err(error) => send(channel, frame.stream, &Response::Error(error))?,
            }
        }
        Request::PowerOff => {
            for command in running.drain(..) {
                command.kill_leftovers();
            }
            if let Some(user) = config.workload_user {
                exec::kill_user_processes(user.uid);
            }
            send(channel, frame.stream, &Response::PowerOff)?;
            return Ok(Some(Ended::PowerOff));
        }
    }
    Ok(None)
}

/// Hands a data frame to the upload on its stream; answers once the file is whole (or the
/// upload failed, which ends it).
fn receive<C: Write>(
    channel: &mut C,
    frame: Frame,
    uploads: &mut HashMap<u32, Upload>,
) -> Result<(), ServeError> {
    let Some(upload) = uploads.get_mut(&frame.stream) else {
        return Ok(());
    };
    if let Err(error) = upload.write(&frame.payload) {
        uploads.remove(&frame.stream);
        return send(channel, frame.stream, &Response::Error(error));
    }
    if upload.complete() {
        if let Some(upload) = uploads.remove(&frame.stream) {
            answer_upload(channel, frame.stream, upload.finish())?;
        }
    }
    Ok(())
}

fn answer_upload<C: Write>(
    channel: &mut C,
    stream: u32,
    done: Result<FileDone, ErrorReply>,
) -> Result<(), ServeError> {
    match done {
        Ok(done) => send(channel, stream, &Response::FsWrite(done)),
        Err(error) => send(channel, stream, &Response::Error(error)),
    }
}

/// What `poll` reported for one running command's descriptors.
#[derive(Debug, Default)]
struct PipeEvents {
    stdout: bool,
    stderr: bool,
    exited: bool,
}

/// Waits until the channel, a pipe or a pidfd is ready, or the next deadline of a command;
/// returns the channel's events and each command's, in the order of `running`.
fn wait(
    channel: &impl AsFd,
    running: &[Running],
) -> Result<(PollFlags, Vec<PipeEvents>), ServeError> {
    let mut fds = vec![PollFd::new(channel, PollFlags::IN)];
    // Where each command's descriptors are in `fds`: stdout, stderr, pidfd.
    let mut positions = Vec::with_capacity(running.len());
    for command in running {
        let descriptors = [
            command.stdout.as_ref().map(AsFd::as_fd),
            command.stderr.as_ref().map(AsFd::as_fd),
            command.pidfd().map(AsFd::as_fd),
        ];
        positions.push(descriptors.map(|fd| {
            fd.map(|fd| {
                fds.push(PollFd::from_borrowed_fd(fd, PollFlags::IN));
                fds.len() - 1
            })
        }));
    }
    let timeout = running
        .iter()
        .map(Running::next_deadline)
        .min()
        .map(|deadline| {
            let left = deadline.saturating_duration_since(Instant::now());
            Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: i64::from(left.subsec_nanos()),
            }
        });
    let none = || running.iter().map(|_| PipeEvents::default()).collect();
    match rustix::event::poll(&mut fds, timeout.as_ref()) {
        Ok(_) => {}
        Err(rustix::io::Errno::INTR) => return Ok((PollFlags::empty(), none())),
        Err(e) => return Err(ServeError::Io(e.into())),
    }
    let ready = |at: Option<usize>| {
        at.is_some_and(|i| {
            fds[i]
                .revents()
                .intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR)
        })
    };
    let events = positions
        .iter()
        .map(|[stdout, stderr, pidfd]| PipeEvents {
            stdout: ready(*stdout),
            stderr: ready(*stderr),
            exited: ready(*pidfd),
        })
        .collect();
    Ok((fds[0].revents(), events))
}

/// Forwards what the command's pipes have, each as its own kind of data frame.
fn forward_output<C: Write>(
    channel: &mut C,
    command: &mut Running,
    events: &PipeEvents,
    buffer: &mut [u8],
) -> Result<(), ServeError> {
    if events.stdout {
        if let Some(pipe) = command.stdout.as_mut() {
            match exec::read_available(pipe, buffer) {
                Some(n) => {
                    write_frame(channel, FrameKind::Stdout, command.stream, &buffer[..n])?;
                    command.stdout_bytes += n as u64;
                }
                None => command.stdout = None,
            }
        }
    }
    if events.stderr {
        if let Some(pipe) = command.stderr.as_mut() {
            match exec::read_available(pipe, buffer) {
                Some(n) => {
                    write_frame(channel, FrameKind::Stderr, command.stream, &buffer[..n])?;
                    command.stderr_bytes += n as u64;
                }
                None => command.stderr = None,
            }
        }
    }
    Ok(())
}

/// Reaps every child that has ended, recording a command's status when it is one.
fn reap_all(running: &mut [Running]) -> Result<(), ServeError> {
    loop {
        // `wait`, not `waitpid(None, …)`: that one waits only for the agent's own process
        // group, and every command runs in a group of its own.
        match rustix::process::wait(WaitOptions::NOHANG) {
            Ok(Some((pid, status))) => {
                if let Some(command) = running.iter_mut().find(|c| c.pid() == pid) {
                    command.exited(status);
                }
            }
            Ok(None) | Err(rustix::io::Errno::CHILD) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(ServeError::Io(e.into())),
        }
    }
}

fn send<C: Write>(channel: &mut C, stream: u32, response: &Response) -> Result<(), ServeError> {
    let payload = serde_json::to_vec(response).map_err(io::Error::other)?;
    write_frame(channel, FrameKind::Response, stream, &payload)
}

fn send_error<C: Write>(
    channel: &mut C,
    stream: u32,
    code: &str,
    message: String,
) -> Result<(), ServeError> {
    let error = ErrorReply {
        code: code.into(),
        message,
    };
    send(channel, stream, &Response::Error(error))
}

fn write_frame<C: Write>(
    channel: &mut C,
    kind: FrameKind,
    stream: u32,
    payload: &[u8],
) -> Result<(), ServeError> {
    channel.write_all(&encode(kind, stream, payload)?)?;
    Ok(())
}

#[cfg(test)]
mod tests;
