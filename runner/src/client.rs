//! The host side of the agent channel: requests out, frames in, each exchange with a
//! deadline. One client speaks either straight to the agent (the runner of a one-shot run),
//! where it keeps the protocol's flow control, or to a VM's control socket, where the socket
//! itself paces the bytes and a command can be given input and signals.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mvm_ir::receipt::OutputDigest;
use mvm_protocol::flow::{self, SendWindow};
use mvm_protocol::{
    encode, ErrorReply, ExecReply, ExecRequest, FileDone, Frame, FrameDecoder, FrameError,
    FrameKind, FsWriteRequest, HelloReply, Request, Response, TtySize, PROTOCOL_VERSION,
};
use sha2::{Digest, Sha256};

/// How often a blocked read wakes up to look at its deadline.
const READ_SLICE: Duration = Duration::from_millis(100);
/// How long a request may take to be written: a guest that stops reading its port must not
/// hold the runner.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an exchange with the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The channel closed: the guest (or the VM process) went away.
    #[error("the agent channel closed")]
    Closed,
    /// The deadline passed without the answer.
    #[error("no answer from the agent within {0:?}")]
    Timeout(Duration),
    /// The agent gave no room for data on a stream within this deadline: it stopped taking
    /// the stream's bytes (RUN049, [`crate::mux::STALLED`]).
    #[error("the agent took no data on the stream within {0:?}")]
    NoRoom(Duration),
    /// The runner was told to stop (SIGINT, SIGTERM, SIGHUP) while waiting.
    #[error("interrupted")]
    Interrupted,
    /// The agent refused the request.
    #[error("{}: {}", .0.code, .0.message)]
    Refused(ErrorReply),
    /// The agent sent something that does not fit the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// A malformed frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Reading or writing the socket failed.
    #[error("agent channel: {0}")]
    Io(#[from] io::Error),
    /// The command's output could not be passed on (the reader of the runner's stdout went
    /// away, say): not the guest's failure.
    #[error("passing on the command's output: {0}")]
    Output(io::Error),
}

/// Where a command's output goes as it arrives.
pub trait OutputSink {
    /// Bytes the command wrote to its standard output.
    fn stdout(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Bytes the command wrote to its standard error.
    fn stderr(&mut self, bytes: &[u8]) -> io::Result<()>;
}

/// What the client is connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    /// The agent itself: data frames are paced by credit frames.
    Agent,
    /// A VM's control socket: one exchange at a time, paced by the socket.
    ControlSocket,
}

/// The signals an interrupt sends a command, by their Linux numbers (the wire's).
const SIGHUP: i32 = 1;
const SIGINT: i32 = 2;
const SIGKILL: i32 = 9;

/// A connected agent channel.
#[derive(Debug)]
pub struct AgentClient {
    stream: UnixStream,
    /// Every frame this client sends is written whole under this lock: a command's input
    /// (from a thread of its own) and signals ([`CommandSignals`]) share the socket.
    writer: Arc<Mutex<UnixStream>>,
    decoder: FrameDecoder,
    next_stream: u32,
    interrupt: Arc<AtomicBool>,
    peer: Peer,
    /// Room the agent gave for data on the exchange in progress.
    window: SendWindow,
    /// The stream of the command being waited for, which an interrupt signals.
    running_command: Option<u32>,
    /// What the first interrupt sends the command (the second sends SIGKILL).
    first_interrupt: i32,
}

impl AgentClient {
    /// Wraps the socket QEMU (or the VMM) connected with. Every wait ends early, with
    /// [`ClientError::Interrupted`], once `interrupt` is set.
    pub fn new(stream: UnixStream, interrupt: Arc<AtomicBool>) -> io::Result<Self> {
        Self::connected(stream, interrupt, Peer::Agent)
    }

    /// Wraps a connection to a VM's control socket. An interrupt during an exec is passed to
    /// the command as SIGINT (a second one as SIGKILL) rather than ending the wait.
    pub fn over_control_socket(stream: UnixStream, interrupt: Arc<AtomicBool>) -> io::Result<Self> {
        Self::connected(stream, interrupt, Peer::ControlSocket)
    }

    fn connected(stream: UnixStream, interrupt: Arc<AtomicBool>, peer: Peer) -> io::Result<Self> {
        stream.set_read_timeout(Some(READ_SLICE))?;
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        Ok(Self {
            writer: Arc::new(Mutex::new(stream.try_clone()?)),
            stream,
            decoder: FrameDecoder::new(),
            next_stream: 1,
            interrupt,
            peer,
            window: SendWindow::default(),
            running_command: None,
            first_interrupt: SIGINT,
        })
    }

    /// Sends `SIGHUP` instead of `SIGINT` on the first interrupt: what a command on a terminal
    /// gets when its terminal goes (a shell ignores `SIGINT`, and ends on `SIGHUP`).
    pub fn interrupt_as_hangup(&mut self) {
        self.first_interrupt = SIGHUP;
    }

    /// The socket and the last stream id used, for sharing the channel once this client's
    /// exchanges are done (see [`crate::mux::AgentMux`]). Refused while a frame is half read.
    pub fn into_stream(self) -> io::Result<(UnixStream, u32)> {
        if self.decoder.buffered() != 0 {
            return Err(io::Error::other("the agent sent more than was asked"));
        }
        Ok((self.stream, self.next_stream.wrapping_sub(1)))
    }

    /// Says hello and waits for the agent's answer: it comes once the guest has booted, so
    /// `timeout` is the boot timeout.
    pub fn hello(&mut self, timeout: Duration) -> Result<HelloReply, ClientError> {
        let stream = self.send(&Request::Hello {
            version: PROTOCOL_VERSION,
        })?;
        match self.response(stream, Instant::now() + timeout, timeout, None)? {
            Response::Hello(hello) => Ok(hello),
            other => Err(unexpected(&other)),
        }
    }

    /// Runs a command, passing its output to `sink` as it arrives. The byte counts in the
    /// agent's answer must match what arrived; the digests are the host's own.
    pub fn exec(
        &mut self,
        request: ExecRequest,
        timeout: Duration,
        sink: &mut dyn OutputSink,
    ) -> Result<Executed, ClientError> {
        self.exec_with_input(request, None, timeout, sink)
    }

    /// [`AgentClient::exec`], feeding `input` to the command's standard input (until its end,
    /// which closes it) from a thread of its own. Only over a control socket.
    pub fn exec_with_input(
        &mut self,
        mut request: ExecRequest,
        input: Option<Box<dyn Read + Send>>,
        timeout: Duration,
        sink: &mut dyn OutputSink,
    ) -> Result<Executed, ClientError> {
        if input.is_some() && self.peer != Peer::ControlSocket {
            return Err(ClientError::Protocol(
                "a command's input goes through a VM's control socket".into(),
            ));
        }
        request.stdin = input.is_some();
        let stream = self.send(&Request::Exec(request))?;
        if let Some(input) = input {
            let writer = Arc::clone(&self.writer);
            // Not joined: it may be blocked reading a terminal when the command ends.
            std::thread::Builder::new()
                .name("stdin".into())
                .spawn(move || pump_input(input, writer, stream))?;
        }
        let mut counted = Counted::new(sink);
        self.running_command = Some(stream);
        let answer = self.response(
            stream,
            Instant::now() + timeout,
            timeout,
            Some(&mut counted),
        );
        self.running_command = None;
        match answer? {
            Response::Exec(reply) => counted.finish(reply),
            other => Err(unexpected(&other)),
        }
    }

    /// Writes `size` bytes from `source` to `path` in the guest, announced with their
    /// `sha256` (the guest keeps the file only if they match).
    pub fn fs_write(
        &mut self,
        request: FsWriteRequest,
        source: &mut dyn Read,
        timeout: Duration,
    ) -> Result<FileDone, ClientError> {
        let size = request.size;
        let stream = self.send(&Request::FsWrite(request))?;
        let deadline = Instant::now() + timeout;
        let mut chunk = vec![0; 64 * 1024];
        let mut sent = 0u64;
        while sent < size {
            if self.peer == Peer::Agent {
                self.wait_for_room(stream, chunk.len(), deadline, timeout)?;
            }
            let want = chunk.len().min((size - sent) as usize);
            let n = source
                .read(&mut chunk[..want])
                .map_err(ClientError::Output)?;
            if n == 0 {
                return Err(ClientError::Output(io::Error::other(
                    "the source ended early",
                )));
            }
            self.write(&encode(FrameKind::Data, stream, &chunk[..n])?)?;
            self.window.spend(n);
            sent += n as u64;
        }
        match self.response(stream, deadline, timeout, None)? {
            Response::FsWrite(done) => Ok(done),
            other => Err(unexpected(&other)),
        }
    }

    /// Reads `path` out of the guest into `sink` (through its stdout), checking the size and
    /// digest the agent reports against the bytes that arrived. With `tar`, `path` is a
    /// directory and the bytes are its tar stream.
    pub fn fs_read(
        &mut self,
        path: &str,
        tar: bool,
        sink: &mut dyn OutputSink,
        timeout: Duration,
    ) -> Result<FileDone, ClientError> {
        let stream = self.send(&Request::FsRead {
            path: path.into(),
            tar,
        })?;
        let mut counted = Counted::new(sink);
        let done = match self.response(
            stream,
            Instant::now() + timeout,
            timeout,
            Some(&mut counted),
        )? {
            Response::FsRead(done) => done,
            other => return Err(unexpected(&other)),
        };
        let [arrived, _] = counted.digests.finish();
        if (done.size, &done.sha256) != (arrived.bytes, &arrived.sha256) {
            return Err(ClientError::Protocol(format!(
                "the agent sent {} bytes hashing to {}, {} bytes hashing to {} arrived",
                done.size, done.sha256, arrived.bytes, arrived.sha256
            )));
        }
        Ok(done)
    }

    /// Sends any other request and waits for its answer, passing data frames (a `wait`'s
    /// kept output) to `sink`. An error answer is [`ClientError::Refused`].
    pub fn call(
        &mut self,
        request: &Request,
        timeout: Duration,
        sink: Option<&mut dyn OutputSink>,
    ) -> Result<Response, ClientError> {
        let stream = self.send(request)?;
        self.response(stream, Instant::now() + timeout, timeout, sink)
    }

    /// Reads frames until the agent has given room for `len` bytes on `stream`.
    fn wait_for_room(
        &mut self,
        stream: u32,
        len: usize,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), ClientError> {
        while !self.window.fits(len) {
            let frame = self.frame(deadline, timeout)?;
            match (frame.kind, frame.stream == stream) {
                (FrameKind::Credit, true) => self.window.grant(flow::parse_credit(&frame.payload)?),
                (FrameKind::Response, true) => {
                    let response: Response = serde_json::from_slice(&frame.payload)
                        .map_err(|e| ClientError::Protocol(format!("response: {e}")))?;
                    return Err(match response {
                        Response::Error(error) => ClientError::Refused(error),
                        other => unexpected(&other),
                    });
                }
                _ => {
                    return Err(ClientError::Protocol(format!(
                        "a {:?} frame for stream {} while waiting for room on {stream}",
                        frame.kind, frame.stream
                    )))
                }
            }
        }
        Ok(())
    }

    /// One echo round trip: the channel's own latency.
    pub fn echo(&mut self, timeout: Duration) -> Result<(), ClientError> {
        let stream = self.send(&Request::Echo)?;
        match self.response(stream, Instant::now() + timeout, timeout, None)? {
            Response::Echo => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Asks the agent to power the guest off, and waits for its acknowledgement.
    pub fn power_off(&mut self, timeout: Duration) -> Result<(), ClientError> {
        let stream = self.send(&Request::PowerOff)?;
        match self.response(stream, Instant::now() + timeout, timeout, None)? {
            Response::PowerOff => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    fn send(&mut self, request: &Request) -> Result<u32, ClientError> {
        self.window = SendWindow::default();
        let stream = self.next_stream;
        self.next_stream = self.next_stream.wrapping_add(1).max(1);
        let payload =
            serde_json::to_vec(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.write(&encode(FrameKind::Request, stream, &payload)?)?;
        Ok(stream)
    }

    /// Writes one whole frame.
    fn write(&self, frame: &[u8]) -> io::Result<()> {
        write_frame(&self.writer, frame)
    }

    /// How to signal the command the next request starts (an exec over a control socket)
    /// from another thread while this client waits for its end.
    pub fn signals_for_next(&self) -> CommandSignals {
        CommandSignals {
            writer: Arc::clone(&self.writer),
            stream: self.next_stream,
        }
    }

    /// Reads frames until the response on `stream`, passing data frames to `sink`.
    fn response(
        &mut self,
        stream: u32,
        deadline: Instant,
        timeout: Duration,
        mut sink: Option<&mut dyn OutputSink>,
    ) -> Result<Response, ClientError> {
        let mut signals_sent = 0;
        loop {
            let frame = match self.frame(deadline, timeout) {
                // Over a control socket, a command is interrupted like a local one: SIGINT,
                // then SIGKILL; its answer still comes.
                Err(ClientError::Interrupted)
                    if self.peer == Peer::ControlSocket
                        && self.running_command == Some(stream)
                        && signals_sent < 2 =>
                {
                    self.interrupt.store(false, Ordering::Relaxed);
                    signals_sent += 1;
                    let signal = if signals_sent == 1 {
                        self.first_interrupt
                    } else {
                        SIGKILL
                    };
                    self.send_on(
                        stream.wrapping_add(1 << 31),
                        &Request::Signal { stream, signal },
                    )?;
                    continue;
                }
                frame => frame?,
            };
            if frame.stream == stream.wrapping_add(1 << 31) || frame.kind == FrameKind::Credit {
                // The answer to a signal sent above, or room for data.
                if frame.kind == FrameKind::Credit && frame.stream == stream {
                    self.window.grant(flow::parse_credit(&frame.payload)?);
                }
                continue;
            }
            if frame.stream != stream {
                return Err(ClientError::Protocol(format!(
                    "a frame for stream {} while waiting on {stream}",
                    frame.stream
                )));
            }
            match (frame.kind, sink.as_deref_mut()) {
                (FrameKind::Response, _) => {
                    let response: Response = serde_json::from_slice(&frame.payload)
                        .map_err(|e| ClientError::Protocol(format!("response: {e}")))?;
                    return match response {
                        Response::Error(error) => Err(ClientError::Refused(error)),
                        response => Ok(response),
                    };
                }
                (FrameKind::Stdout | FrameKind::Data, Some(sink)) => {
                    sink.stdout(&frame.payload).map_err(ClientError::Output)?;
                    self.credit(&frame)?;
                }
                (FrameKind::Stderr, Some(sink)) => {
                    sink.stderr(&frame.payload).map_err(ClientError::Output)?;
                    self.credit(&frame)?;
                }
                (kind, _) => {
                    return Err(ClientError::Protocol(format!(
                        "an unexpected {kind:?} frame"
                    )))
                }
            }
        }
    }

    /// Hands a data frame's room back to the agent once it has been passed on.
    fn credit(&mut self, frame: &Frame) -> Result<(), ClientError> {
        if self.peer == Peer::Agent {
            let bytes = flow::credit_payload(flow::cost(frame.payload.len()));
            self.write(&encode(FrameKind::Credit, frame.stream, &bytes)?)?;
        }
        Ok(())
    }

    fn send_on(&mut self, stream: u32, request: &Request) -> Result<(), ClientError> {
        let payload =
            serde_json::to_vec(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.write(&encode(FrameKind::Request, stream, &payload)?)?;
        Ok(())
    }

    fn frame(&mut self, deadline: Instant, timeout: Duration) -> Result<Frame, ClientError> {
        let mut buffer = [0; 64 * 1024];
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(frame);
            }
            if self.interrupt.load(Ordering::Relaxed) {
                return Err(ClientError::Interrupted);
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Timeout(timeout));
            }
            match self.stream.read(&mut buffer) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => self.decoder.push(&buffer[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(ClientError::Closed)
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A command's output, straight to this process's own stdout (flushed as it comes) and
/// stderr.
pub struct StdStreams;

impl OutputSink for StdStreams {
    fn stdout(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut out = io::stdout().lock();
        out.write_all(bytes)?;
        out.flush()
    }

    fn stderr(&mut self, bytes: &[u8]) -> io::Result<()> {
        io::stderr().lock().write_all(bytes)
    }
}

/// A command's answer, with its output's digests as the host received it.
#[derive(Debug, Clone)]
pub struct Executed {
    /// The agent's answer.
    pub reply: ExecReply,
    /// Standard output, hashed on the host.
    pub stdout: OutputDigest,
    /// Standard error, hashed on the host.
    pub stderr: OutputDigest,
}

/// The sizes and SHA-256 digests of a command's stdout and stderr, as they pass.
#[derive(Default)]
pub(crate) struct Digests {
    stdout: (Sha256, u64),
    stderr: (Sha256, u64),
}

impl Digests {
    /// Counts `bytes` of stdout.
    pub(crate) fn stdout(&mut self, bytes: &[u8]) {
        self.stdout.0.update(bytes);
        self.stdout.1 += bytes.len() as u64;
    }

    /// Counts `bytes` of stderr.
    pub(crate) fn stderr(&mut self, bytes: &[u8]) {
        self.stderr.0.update(bytes);
        self.stderr.1 += bytes.len() as u64;
    }

    /// Bytes of stdout and of stderr so far.
    fn sizes(&self) -> (u64, u64) {
        (self.stdout.1, self.stderr.1)
    }

    /// The digests of stdout and of stderr.
    pub(crate) fn finish(self) -> [OutputDigest; 2] {
        [self.stdout, self.stderr].map(|(hash, bytes)| OutputDigest {
            sha256: format!("sha256:{}", hex::encode(hash.finalize())),
            bytes,
        })
    }
}

/// A sink that counts and digests what passes to the one it wraps.
pub(crate) struct Counted<'a> {
    sink: &'a mut dyn OutputSink,
    digests: Digests,
}

impl<'a> Counted<'a> {
    pub(crate) fn new(sink: &'a mut dyn OutputSink) -> Self {
        Self {
            sink,
            digests: Digests::default(),
        }
    }
}

impl Counted<'_> {
    /// The command's answer with the digests of what passed through; refused when the byte
    /// counts the agent reports differ from what arrived.
    pub(crate) fn finish(self, reply: ExecReply) -> Result<Executed, ClientError> {
        let (stdout, stderr) = self.digests.sizes();
        if (reply.stdout_bytes, reply.stderr_bytes) != (stdout, stderr) {
            return Err(ClientError::Protocol(format!(
                "the agent counted {}/{} bytes of stdout/stderr, {stdout}/{stderr} arrived",
                reply.stdout_bytes, reply.stderr_bytes
            )));
        }
        let [stdout, stderr] = self.digests.finish();
        Ok(Executed {
            stdout,
            stderr,
            reply,
        })
    }
}

impl OutputSink for Counted<'_> {
    fn stdout(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.digests.stdout(bytes);
        self.sink.stdout(bytes)
    }

    fn stderr(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.digests.stderr(bytes);
        self.sink.stderr(bytes)
    }
}

/// Signals one command over a VM's control socket, from any thread, while its exec waits.
#[derive(Debug, Clone)]
pub struct CommandSignals {
    writer: Arc<Mutex<UnixStream>>,
    stream: u32,
}

impl CommandSignals {
    /// Sends `signal` to the command (and its process group). Its answer is read, and
    /// dropped, by the exec waiting for the command's end.
    pub fn send(&self, signal: i32) -> io::Result<()> {
        self.request(&Request::Signal {
            stream: self.stream,
            signal,
        })
    }

    /// Resizes the command's terminal (one it was started with, `ExecRequest::tty`). Its
    /// answer is read, and dropped, as a signal's.
    pub fn resize(&self, size: TtySize) -> io::Result<()> {
        self.request(&Request::Resize {
            stream: self.stream,
            size,
        })
    }

    /// Sends `request` about the command, on the stream its answers are dropped from.
    fn request(&self, request: &Request) -> io::Result<()> {
        let payload = serde_json::to_vec(request).map_err(io::Error::other)?;
        let frame = encode(
            FrameKind::Request,
            self.stream.wrapping_add(1 << 31),
            &payload,
        )
        .map_err(io::Error::other)?;
        write_frame(&self.writer, &frame)
    }
}

/// Writes `frame` whole under the writer's lock.
fn write_frame(writer: &Mutex<UnixStream>, frame: &[u8]) -> io::Result<()> {
    let mut writer = writer
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    writer.write_all(frame)
}

/// Copies `input` to the command's standard input as data frames on `stream`, then the empty
/// frame that closes it. Stops quietly when the connection goes (the command has ended).
fn pump_input(mut input: Box<dyn Read + Send>, writer: Arc<Mutex<UnixStream>>, stream: u32) {
    let mut chunk = vec![0; 64 * 1024];
    loop {
        let n = match input.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        let Ok(frame) = encode(FrameKind::Data, stream, &chunk[..n]) else {
            return;
        };
        if write_frame(&writer, &frame).is_err() || n == 0 {
            return;
        }
    }
}

pub(crate) fn unexpected(response: &Response) -> ClientError {
    ClientError::Protocol(format!("an unexpected answer {response:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvm_agent::serve::{serve, ServeConfig};
    use mvm_protocol::Integrity;
    use std::collections::BTreeMap;

    #[derive(Default)]
    struct Collected(Vec<u8>, Vec<u8>);

    impl OutputSink for Collected {
        fn stdout(&mut self, bytes: &[u8]) -> io::Result<()> {
            self.0.extend_from_slice(bytes);
            Ok(())
        }
        fn stderr(&mut self, bytes: &[u8]) -> io::Result<()> {
            self.1.extend_from_slice(bytes);
            Ok(())
        }
    }

    /// The client against the real agent loop over a socket pair (commands run as the test's
    /// user): the two halves of the protocol agree.
    #[test]
    fn the_client_and_the_agent_agree() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let agent = std::thread::spawn(move || serve(&mut guest, &ServeConfig::on_host()));
        let mut client = AgentClient::new(host, Arc::default()).unwrap();
        let hello = client.hello(Duration::from_secs(10)).unwrap();
        assert_eq!(hello.version, PROTOCOL_VERSION);
        let mut output = Collected::default();
        let request = ExecRequest {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "echo $GREETING; echo no >&2; exit 3".into(),
            ],
            env: BTreeMap::from([("GREETING".to_string(), "hi".to_string())]),
            cwd: Some("/".into()),
            timeout_ms: 10_000,
            stdin: false,
            user: None,
            tty: None,
        };
        let executed = client
            .exec(request.clone(), Duration::from_secs(10), &mut output)
            .unwrap();
        assert_eq!(
            executed.stdout.sha256,
            mvm_ir::digest::sha256_prefixed(b"hi\n")
        );
        let reply = executed.reply;
        assert_eq!(
            (output.0.as_slice(), output.1.as_slice()),
            (&b"hi\n"[..], &b"no\n"[..])
        );
        assert_eq!(reply.status, mvm_protocol::ExitStatus::Exited { code: 3 });
        let missing = ExecRequest {
            argv: vec!["/no/such/program".into()],
            ..request
        };
        match client.exec(missing, Duration::from_secs(10), &mut output) {
            Err(ClientError::Refused(error)) => assert_eq!(error.code, "AGENT101"),
            other => panic!("{other:?}"),
        }
        client.power_off(Duration::from_secs(10)).unwrap();
        agent.join().unwrap().unwrap();
        assert!(matches!(
            client.hello(Duration::from_secs(1)),
            Err(ClientError::Closed | ClientError::Io(_))
        ));
    }

    #[test]
    fn a_silent_agent_times_out() {
        let (host, _guest) = UnixStream::pair().unwrap();
        let mut client = AgentClient::new(host, Arc::default()).unwrap();
        let started = Instant::now();
        assert!(matches!(
            client.hello(Duration::from_millis(300)),
            Err(ClientError::Timeout(_))
        ));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn an_interrupt_ends_a_wait() {
        let (host, _guest) = UnixStream::pair().unwrap();
        let interrupt = Arc::new(AtomicBool::new(false));
        let mut client = AgentClient::new(host, Arc::clone(&interrupt)).unwrap();
        let setter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            interrupt.store(true, Ordering::Relaxed);
        });
        let started = Instant::now();
        assert!(matches!(
            client.hello(Duration::from_secs(60)),
            Err(ClientError::Interrupted)
        ));
        assert!(started.elapsed() < Duration::from_secs(5));
        setter.join().unwrap();
    }

    /// An agent that claims more output than it sent is caught.
    #[test]
    fn output_counts_must_match_what_arrived() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let agent = std::thread::spawn(move || {
            let mut decoder = FrameDecoder::new();
            let mut buffer = [0; 4096];
            let frame = loop {
                if let Some(frame) = decoder.next_frame().unwrap() {
                    break frame;
                }
                let n = guest.read(&mut buffer).unwrap();
                decoder.push(&buffer[..n]);
            };
            let reply = Response::Exec(ExecReply {
                status: mvm_protocol::ExitStatus::Exited { code: 0 },
                integrity: Integrity::Intact,
                stdout_bytes: 10,
                stderr_bytes: 0,
                duration_ms: 1,
            });
            guest
                .write_all(&encode(FrameKind::Stdout, frame.stream, b"short").unwrap())
                .unwrap();
            let payload = serde_json::to_vec(&reply).unwrap();
            guest
                .write_all(&encode(FrameKind::Response, frame.stream, &payload).unwrap())
                .unwrap();
            guest
        });
        let mut client = AgentClient::new(host, Arc::default()).unwrap();
        let request = ExecRequest {
            argv: vec!["x".into()],
            env: BTreeMap::new(),
            cwd: None,
            timeout_ms: 1000,
            stdin: false,
            user: None,
            tty: None,
        };
        let mut output = Collected::default();
        let result = client.exec(request, Duration::from_secs(10), &mut output);
        assert!(
            matches!(result, Err(ClientError::Protocol(_))),
            "{result:?}"
        );
        drop(agent.join().unwrap());
    }
}
