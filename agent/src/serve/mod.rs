//! Serving the host: the agent's side of the [protocol](crate::protocol) over one channel.
//!
//! One thread, one `poll` over the channel and the running command's pipes and pidfd. Output
//! is forwarded as it arrives, each stream in its own frames; the final response follows once
//! the command has ended and its pipes are drained. One command runs at a time for now: an
//! `exec` while another runs is answered `AGENT104` (busy).

pub mod channel;
pub mod exec;

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::WaitOptions;

use crate::protocol::{
    codes, encode, BootTimings, ErrorReply, ExecReply, FrameDecoder, FrameError, FrameKind,
    HelloReply, Integrity, Request, Response, PROTOCOL_VERSION,
};
use exec::{Credentials, Running};

/// Bytes read from a pipe or the channel at a time; also the largest data frame sent.
const CHUNK: usize = 64 * 1024;
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
    let mut running: Option<Running> = None;
    let mut heard_from_host = false;
    let mut buffer = vec![0; CHUNK];
    loop {
        let (channel_events, pipe_events) = wait(channel, running.as_ref())?;

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
                if frame.kind != FrameKind::Request {
                    let message = format!("a {:?} frame from the host", frame.kind);
                    send_error(channel, frame.stream, codes::BAD_REQUEST, message)?;
                    continue;
                }
                let request = match serde_json::from_slice::<Request>(&frame.payload) {
                    Ok(request) => request,
                    Err(e) => {
                        send_error(channel, frame.stream, codes::BAD_REQUEST, e.to_string())?;
                        continue;
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
                        let message = format!(
                            "the host speaks protocol {version}, this agent {PROTOCOL_VERSION}"
                        );
                        send_error(channel, frame.stream, codes::VERSION, message)?;
                    }
                    Request::Exec(_) if running.is_some() => {
                        let message = "a command is already running".to_string();
                        send_error(channel, frame.stream, codes::BUSY, message)?;
                    }
                    Request::Exec(request) => {
                        match Running::start(frame.stream, &request, config.workload_user) {
                            Ok(started) => running = Some(started),
                            Err(error) => send(channel, frame.stream, &Response::Error(error))?,
                        }
                    }
                    Request::PowerOff => {
                        if let Some(command) = running.take() {
                            command.kill_leftovers();
                        }
                        if let Some(user) = config.workload_user {
                            exec::kill_user_processes(user.uid);
                        }
                        send(channel, frame.stream, &Response::PowerOff)?;
                        return Ok(Ended::PowerOff);
                    }
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
            reap_all(running.as_mut())?;
        }
        let Some(command) = running.as_mut() else {
            continue;
        };
        forward_output(channel, command, &pipe_events, &mut buffer)?;
        if pipe_events.exited && !config.reap_orphans {
            command.reap()?;
        }
        let now = Instant::now();
        command.enforce_deadline(now);
        if let Some(status) = command.status.filter(|_| command.finished(now)) {
            command.kill_leftovers();
            if let Some(user) = config.workload_user {
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
            running = None;
        }
    }
}

/// What `poll` reported for the running command's descriptors.
#[derive(Debug, Default)]
struct PipeEvents {
    stdout: bool,
    stderr: bool,
    exited: bool,
}

/// Waits until the channel, a pipe or the pidfd is ready, or the command's next deadline.
fn wait(
    channel: &impl AsFd,
    running: Option<&Running>,
) -> Result<(PollFlags, PipeEvents), ServeError> {
    let mut fds = vec![PollFd::new(channel, PollFlags::IN)];
    let (mut stdout_at, mut stderr_at, mut pidfd_at) = (None, None, None);
    if let Some(command) = running {
        if let Some(stdout) = &command.stdout {
            stdout_at = Some(fds.len());
            fds.push(PollFd::new(stdout, PollFlags::IN));
        }
        if let Some(stderr) = &command.stderr {
            stderr_at = Some(fds.len());
            fds.push(PollFd::new(stderr, PollFlags::IN));
        }
        if let Some(pidfd) = command.pidfd() {
            pidfd_at = Some(fds.len());
            fds.push(PollFd::new(pidfd, PollFlags::IN));
        }
    }
    let timeout = running.map(|command| {
        let left = command
            .next_deadline()
            .saturating_duration_since(Instant::now());
        Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        }
    });
    match rustix::event::poll(&mut fds, timeout.as_ref()) {
        Ok(_) => {}
        Err(rustix::io::Errno::INTR) => return Ok((PollFlags::empty(), PipeEvents::default())),
        Err(e) => return Err(ServeError::Io(e.into())),
    }
    let ready = |at: Option<usize>| {
        at.is_some_and(|i| {
            fds[i]
                .revents()
                .intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR)
        })
    };
    let events = PipeEvents {
        stdout: ready(stdout_at),
        stderr: ready(stderr_at),
        exited: ready(pidfd_at),
    };
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

/// Reaps every child that has ended, recording the command's own status when it is one.
fn reap_all(mut command: Option<&mut Running>) -> Result<(), ServeError> {
    loop {
        // `wait`, not `waitpid(None, …)`: that one waits only for the agent's own process
        // group, and every command runs in a group of its own.
        match rustix::process::wait(WaitOptions::NOHANG) {
            Ok(Some((pid, status))) => {
                if let Some(command) = command.as_mut().filter(|c| c.pid() == pid) {
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
