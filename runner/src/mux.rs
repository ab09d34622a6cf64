//! One agent channel shared by many exchanges: requests go out on fresh stream ids, and a
//! reader thread hands every frame that comes back to the exchange it belongs to.
//!
//! Flow control ([`mvm_protocol::flow`]) is kept here for every exchange: the agent may
//! have at most a window of data in flight per stream, so the reader never waits for a slow
//! exchange (one slow client cannot hold up the others) and what is buffered stays bounded;
//! an [`Exchange`] hands the room back as its frames are taken. Data sent to the agent waits
//! for the room the agent gives, up to a deadline.
//!
//! The agent may be compromised, so nothing it sends is queued without bound: an exchange
//! holds at most a window of data and its one response (see [`route_frames`]).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mvm_protocol::flow::{self, ReceiveWindow, SendWindow};
use mvm_protocol::{
    encode, is_agent_stream, ErrorReply, ExecRequest, Frame, FrameDecoder, FrameKind, OpenRequest,
    Request, Response,
};

use crate::client::{unexpected, ClientError, Counted, Executed, OutputSink};

/// The code of the answer that ends an exchange on which the agent sent a frame it never
/// sends.
pub const BROKEN_EXCHANGE: &str = crate::codes::RUN048;
/// The code of an exchange the agent held up past its deadline: no room for data given in
/// time ([`ClientError::NoRoom`]), or, on the control socket, no answer in time.
pub const STALLED: &str = crate::codes::RUN049;
/// The code of the answer to an outbound connection the plan does not grant.
pub const NOT_GRANTED: &str = crate::codes::RUN052;
/// The code of the answer to an open frame that is not an [`OpenRequest`].
pub const BAD_OPEN: &str = crate::codes::RUN053;

/// Takes over the connections the agent opens. It is called on the mux's reader thread, so
/// it hands the connection to a thread of its own and returns at once; dropping the
/// [`Connection`] ends it.
pub type OpenHandler = Arc<dyn Fn(Connection, OpenRequest) + Send + Sync>;
/// How long data waits for the agent to give room on its stream. A client of the control
/// socket gives up on a write after 30 s; past twice that, the agent has stopped taking the
/// stream's bytes, and the thread sending them is needed elsewhere.
const SEND_LIMIT: Duration = Duration::from_secs(60);
/// How often a command's wait looks at the interrupt flag.
const INTERRUPT_CHECK: Duration = Duration::from_millis(50);

/// One exchange's place in the table.
#[derive(Debug)]
struct Route {
    frames: Sender<Frame>,
    /// What the agent may still send on the stream.
    receive: ReceiveWindow,
    /// What the runner may still send on the stream.
    send: SendWindow,
}

/// Where frames go, by stream id; closed for good once the channel ends.
#[derive(Debug, Default)]
struct RouteTable {
    routes: HashMap<u32, Route>,
    closed: bool,
}

/// The table and the signal that a send window grew (or the channel closed).
#[derive(Debug, Default)]
struct Shared {
    table: Mutex<RouteTable>,
    room: Condvar,
}

/// The agent channel, shared.
#[derive(Debug)]
pub struct AgentMux {
    writer: Arc<Mutex<UnixStream>>,
    shared: Arc<Shared>,
    next_stream: AtomicU32,
    reader: Option<JoinHandle<()>>,
    /// How long [`AgentMux::send_data`] waits for room.
    send_limit: Duration,
}

/// The frames answering one request: data frames, then one response. Taking a data frame
/// hands its room back to the agent (the frame has been passed on by the time the next is
/// asked for). Dropping it stops caring: the rest of the answer is discarded as it comes.
#[derive(Debug)]
pub struct Exchange {
    stream: u32,
    frames: Receiver<Frame>,
    /// Room of the last data frame taken, returned when the next is asked for.
    owed: u64,
    writer: Arc<Mutex<UnixStream>>,
    shared: Arc<Shared>,
}

impl Exchange {
    /// The agent's stream id for this exchange.
    pub fn stream(&self) -> u32 {
        self.stream
    }

    /// The next frame, waiting at most `timeout` (the agent may never answer); `None` when
    /// the time ran out, or once the channel closed before the answer.
    pub fn next_frame_within(&mut self, timeout: Duration) -> Option<Frame> {
        self.settle();
        let frame = self.frames.recv_timeout(timeout).ok()?;
        self.owe(&frame);
        Some(frame)
    }

    fn owe(&mut self, frame: &Frame) {
        if frame.is_data() {
            self.owed = flow::cost(frame.payload.len());
        }
    }

    /// Hands back the room of the frame taken last.
    fn settle(&mut self) {
        if self.owed == 0 {
            return;
        }
        let bytes = std::mem::take(&mut self.owed);
        let still_routed = match lock(&self.shared).routes.get_mut(&self.stream) {
            Some(route) => {
                route.receive.restore(bytes);
                true
            }
            None => false,
        };
        if still_routed {
            let _ = write_credit(&self.writer, self.stream, bytes);
        }
    }
}

impl Drop for Exchange {
    /// The route stays until the agent's answer (the reader then drops it), but every frame
    /// that still comes is handed back at once, so the agent is never left waiting on room.
    fn drop(&mut self) {
        self.settle();
        let mut table = lock(&self.shared);
        if is_agent_stream(self.stream) {
            // A connection ends with its exchange: nothing more is routed to it.
            table.routes.remove(&self.stream);
            self.shared.room.notify_all();
        } else if let Some(route) = table.routes.get_mut(&self.stream) {
            let (discard, _) = mpsc::channel();
            route.frames = discard;
        }
        drop(table);
        // Frames already queued are returned too.
        let queued: u64 = self
            .frames
            .try_iter()
            .filter(Frame::is_data)
            .map(|f| flow::cost(f.payload.len()))
            .sum();
        if queued > 0 {
            let _ = write_credit(&self.writer, self.stream, queued);
        }
    }
}

impl AgentMux {
    /// Takes over a channel on which the hello is done (nothing more is expected on it
    /// unasked). Stream ids start above `first_stream`, the last one used on it.
    pub fn new(stream: UnixStream, first_stream: u32) -> io::Result<Self> {
        Self::serving(stream, first_stream, None)
    }

    /// [`AgentMux::new`] that hands the connections the agent opens to `opener`; without one
    /// they are refused ([`NOT_GRANTED`]).
    pub fn serving(
        stream: UnixStream,
        first_stream: u32,
        opener: Option<OpenHandler>,
    ) -> io::Result<Self> {
        stream.set_read_timeout(None)?;
        let reading = stream.try_clone()?;
        let writer = Arc::new(Mutex::new(stream));
        let shared: Arc<Shared> = Arc::default();
        let reader = {
            let sender = ConnectionSender {
                stream: 0,
                shared: Arc::clone(&shared),
                writer: Arc::clone(&writer),
                send_limit: SEND_LIMIT,
            };
            std::thread::Builder::new()
                .name("agent-mux".into())
                .spawn(move || route_frames(reading, &sender, opener.as_ref()))?
        };
        Ok(Self {
            writer,
            shared,
            next_stream: AtomicU32::new(first_stream.wrapping_add(1).max(1)),
            reader: Some(reader),
            send_limit: SEND_LIMIT,
        })
    }

    /// Sends `request` on a new stream and returns the frames that will answer it.
    pub fn request(&self, request: &Request) -> Result<Exchange, ClientError> {
        let stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let payload =
            serde_json::to_vec(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let bytes = encode(FrameKind::Request, stream, &payload)?;
        let (sender, receiver) = mpsc::channel();
        {
            let mut table = lock(&self.shared);
            if table.closed {
                return Err(ClientError::Closed);
            }
            let route = Route {
                frames: sender,
                receive: ReceiveWindow::default(),
                send: SendWindow::default(),
            };
            table.routes.insert(stream, route);
        }
        self.write(&bytes)?;
        Ok(Exchange {
            stream,
            frames: receiver,
            owed: 0,
            writer: Arc::clone(&self.writer),
            shared: Arc::clone(&self.shared),
        })
    }

    /// Sends a data frame on `stream` (file bytes, a command's input; empty ends the input),
    /// once the agent has given room for it. Fails if the exchange ended first, or with
    /// [`ClientError::NoRoom`] if the agent gave no room within the send limit (60 s): a
    /// compromised agent must not hold the sending thread for ever.
    pub fn send_data(&self, stream: u32, bytes: &[u8]) -> Result<(), ClientError> {
        send_data(&self.shared, &self.writer, self.send_limit, stream, bytes)
    }

    fn write(&self, bytes: &[u8]) -> Result<(), ClientError> {
        write_frame(&self.shared, &self.writer, bytes)
    }

    /// Runs a command, passing its output to `sink` as it arrives, as
    /// [`crate::client::AgentClient::exec`] does on a channel of its own: the byte counts in
    /// the agent's answer must match what arrived, the digests are the host's own. Gives up
    /// after `timeout`, or once `interrupt` is set.
    pub fn exec(
        &self,
        request: ExecRequest,
        timeout: Duration,
        interrupt: &AtomicBool,
        sink: &mut dyn OutputSink,
    ) -> Result<Executed, ClientError> {
        let mut exchange = self.request(&Request::Exec(request))?;
        let mut counted = Counted::new(sink);
        let deadline = Instant::now() + timeout;
        loop {
            if interrupt.load(Ordering::Relaxed) {
                return Err(ClientError::Interrupted);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout(timeout));
            }
            let Some(frame) = exchange.next_frame_within(left.min(INTERRUPT_CHECK)) else {
                if self.is_closed() {
                    return Err(ClientError::Closed);
                }
                continue;
            };
            match frame.kind {
                FrameKind::Stdout => counted.stdout(&frame.payload),
                FrameKind::Stderr => counted.stderr(&frame.payload),
                FrameKind::Response => {
                    let response: Response = serde_json::from_slice(&frame.payload)
                        .map_err(|e| ClientError::Protocol(format!("response: {e}")))?;
                    return match response {
                        Response::Exec(reply) => counted.finish(reply),
                        Response::Error(error) => Err(ClientError::Refused(error)),
                        other => Err(unexpected(&other)),
                    };
                }
                kind => {
                    let message = format!("an unexpected {kind:?} frame");
                    return Err(ClientError::Protocol(message));
                }
            }
            .map_err(ClientError::Output)?;
        }
    }

    /// How many exchanges are still open: requests whose answer has not been passed on.
    pub fn in_flight(&self) -> usize {
        lock(&self.shared).routes.len()
    }

    /// Whether the channel has ended (the guest went away or a write broke it).
    pub fn is_closed(&self) -> bool {
        lock(&self.shared).closed
    }
}

impl Drop for AgentMux {
    fn drop(&mut self) {
        let writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = writer.shutdown(std::net::Shutdown::Both);
        drop(writer);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// Sends a data frame on `stream` once the agent has given room for it (see
/// [`AgentMux::send_data`]).
fn send_data(
    shared: &Shared,
    writer: &Mutex<UnixStream>,
    send_limit: Duration,
    stream: u32,
    bytes: &[u8],
) -> Result<(), ClientError> {
    let frame = encode(FrameKind::Data, stream, bytes)?;
    let deadline = Instant::now() + send_limit;
    {
        let mut table = lock(shared);
        loop {
            if table.closed {
                return Err(ClientError::Closed);
            }
            let Some(route) = table.routes.get_mut(&stream) else {
                return Err(ClientError::Protocol(format!("stream {stream} has ended")));
            };
            if route.send.fits(bytes.len()) {
                route.send.spend(bytes.len());
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::NoRoom(send_limit));
            }
            table = match shared.room.wait_timeout(table, left) {
                Ok((table, _)) => table,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
    write_frame(shared, writer, &frame)
}

/// Writes one whole frame; a failed write ends the channel for every exchange.
fn write_frame(
    shared: &Shared,
    writer: &Mutex<UnixStream>,
    bytes: &[u8],
) -> Result<(), ClientError> {
    let mut writer = writer.lock().unwrap_or_else(PoisonError::into_inner);
    if let Err(e) = writer.write_all(bytes) {
        // Part of a frame may have gone out: nothing after it could be read as frames.
        close(shared);
        let _ = writer.shutdown(std::net::Shutdown::Both);
        return Err(e.into());
    }
    Ok(())
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, RouteTable> {
    shared.table.lock().unwrap_or_else(PoisonError::into_inner)
}

fn write_credit(writer: &Mutex<UnixStream>, stream: u32, bytes: u64) -> io::Result<()> {
    let frame = encode(FrameKind::Credit, stream, &flow::credit_payload(bytes))
        .map_err(io::Error::other)?;
    writer
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .write_all(&frame)
}

/// Ends every exchange still waiting, and refuses new ones.
fn close(shared: &Shared) {
    let mut table = lock(shared);
    table.closed = true;
    table.routes.clear();
    shared.room.notify_all();
}

/// Reads frames until the channel closes or breaks, handing each to its exchange; a response
/// ends its exchange. When the channel ends, every exchange still waiting is disconnected.
///
/// What an exchange queues is bounded by kind, as the protocol has it: the agent answers a
/// request with data frames, which count against the stream's window (an agent that sends
/// past it has broken the protocol: the channel is closed), then exactly one response, which
/// ends the exchange; credit frames are taken here. The agent never sends a request, so one
/// on an exchange ends that exchange with [`BROKEN_EXCHANGE`] rather than being queued: an
/// exchange never holds more than a window of data and one response, whatever the agent
/// sends.
fn route_frames(mut stream: UnixStream, channel: &ConnectionSender, opener: Option<&OpenHandler>) {
    let (shared, writer) = (&*channel.shared, &*channel.writer);
    let mut decoder = FrameDecoder::new();
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let n = match stream.read(&mut buffer) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        decoder.push(&buffer[..n]);
        loop {
            let frame = match decoder.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(_) => {
                    close(shared);
                    return;
                }
            };
            if frame.kind == FrameKind::Open && is_agent_stream(frame.stream) {
                open_connection(frame, channel, opener);
                continue;
            }
            let mut table = lock(shared);
            let Some(route) = table.routes.get_mut(&frame.stream) else {
                continue;
            };
            match frame.kind {
                FrameKind::Credit => {
                    if let Ok(bytes) = flow::parse_credit(&frame.payload) {
                        route.send.grant(bytes);
                        shared.room.notify_all();
                    }
                }
                // The agent ends a connection it opened (anything but data and credit on one
                // does); its relay sees the close.
                FrameKind::Close | FrameKind::Request | FrameKind::Open | FrameKind::Response
                    if is_agent_stream(frame.stream) =>
                {
                    if let Some(route) = table.routes.remove(&frame.stream) {
                        let _ = route.frames.send(Frame {
                            kind: FrameKind::Close,
                            stream: frame.stream,
                            payload: Vec::new(),
                        });
                    }
                    shared.room.notify_all();
                }
                FrameKind::Response => {
                    if let Some(route) = table.routes.remove(&frame.stream) {
                        let _ = route.frames.send(frame);
                    }
                    shared.room.notify_all();
                }
                FrameKind::Request | FrameKind::Open | FrameKind::Close => {
                    if let Some(route) = table.routes.remove(&frame.stream) {
                        let _ = route.frames.send(broken_exchange(frame.stream, frame.kind));
                    }
                    shared.room.notify_all();
                }
                FrameKind::Stdout | FrameKind::Stderr | FrameKind::Data
                    if !route.receive.take(frame.payload.len()) =>
                {
                    drop(table);
                    close(shared);
                    let _ = writer
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .shutdown(std::net::Shutdown::Both);
                    return;
                }
                FrameKind::Stdout | FrameKind::Stderr | FrameKind::Data => {
                    let len = frame.payload.len();
                    let stream_id = frame.stream;
                    if route.frames.send(frame).is_err() {
                        // Nobody takes this exchange's frames any more: return the room.
                        route.receive.restore(flow::cost(len));
                        drop(table);
                        let _ = write_credit(writer, stream_id, flow::cost(len));
                    }
                }
            }
        }
    }
    close(shared);
}

/// Takes the agent's [`FrameKind::Open`]: a route for its stream and the connection to
/// `opener`, or a refusal — the plan grants no egress ([`NOT_GRANTED`]), or the payload is not
/// an [`OpenRequest`] ([`BAD_OPEN`]). An open on a stream already in use ends that
/// connection: the agent broke the protocol on it.
fn open_connection(frame: Frame, channel: &ConnectionSender, opener: Option<&OpenHandler>) {
    let sender = ConnectionSender {
        stream: frame.stream,
        ..channel.clone()
    };
    let refuse = |code: &str, message: String| {
        let _ = sender.answer(&Response::Error(ErrorReply {
            code: code.into(),
            message,
        }));
    };
    let request = match serde_json::from_slice::<OpenRequest>(&frame.payload) {
        Ok(request) => request,
        Err(e) => return refuse(BAD_OPEN, format!("bad_request: {e}")),
    };
    let Some(opener) = opener else {
        return refuse(
            NOT_GRANTED,
            "not_granted: the plan grants no network egress".into(),
        );
    };
    let (frames, receiver) = mpsc::channel();
    {
        let mut table = lock(&channel.shared);
        if table.closed {
            return;
        }
        if let Some(route) = table.routes.remove(&frame.stream) {
            let _ = route.frames.send(Frame {
                kind: FrameKind::Close,
                stream: frame.stream,
                payload: Vec::new(),
            });
            drop(table);
            sender.close();
            return;
        }
        let route = Route {
            frames,
            receive: ReceiveWindow::default(),
            send: SendWindow::default(),
        };
        table.routes.insert(frame.stream, route);
    }
    let exchange = Exchange {
        stream: frame.stream,
        frames: receiver,
        owed: 0,
        writer: Arc::clone(&channel.writer),
        shared: Arc::clone(&channel.shared),
    };
    opener(Connection { exchange, sender }, request);
}

/// A connection the agent opened: its frames from the agent (data, an empty one ending that
/// direction, or a close), and the way to answer and send on it. Dropping its exchange ends
/// it: nothing more is routed to it.
#[derive(Debug)]
pub struct Connection {
    /// What the agent sends on the connection.
    pub exchange: Exchange,
    /// Answers and sends on it.
    pub sender: ConnectionSender,
}

/// The sending half of a [`Connection`], for the thread that carries the far end's bytes to
/// the agent.
#[derive(Debug, Clone)]
pub struct ConnectionSender {
    stream: u32,
    shared: Arc<Shared>,
    writer: Arc<Mutex<UnixStream>>,
    send_limit: Duration,
}

impl ConnectionSender {
    /// Answers the open: [`Response::Opened`] or a refusal.
    pub fn answer(&self, response: &Response) -> Result<(), ClientError> {
        let payload =
            serde_json::to_vec(response).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let frame = encode(FrameKind::Response, self.stream, &payload)?;
        write_frame(&self.shared, &self.writer, &frame)
    }

    /// Sends bytes of the connection once the agent has room for them; empty ends this
    /// direction.
    pub fn send(&self, bytes: &[u8]) -> Result<(), ClientError> {
        send_data(
            &self.shared,
            &self.writer,
            self.send_limit,
            self.stream,
            bytes,
        )
    }

    /// Whether the connection has ended: torn down by either side, or the channel closed.
    pub fn is_gone(&self) -> bool {
        let table = lock(&self.shared);
        table.closed || !table.routes.contains_key(&self.stream)
    }

    /// Tears the connection down: a close frame to the agent, and nothing more routed to it.
    pub fn close(&self) {
        if let Ok(frame) = encode(FrameKind::Close, self.stream, &[]) {
            let _ = write_frame(&self.shared, &self.writer, &frame);
        }
        if let Some(route) = lock(&self.shared).routes.remove(&self.stream) {
            let _ = route.frames.send(Frame {
                kind: FrameKind::Close,
                stream: self.stream,
                payload: Vec::new(),
            });
        }
        self.shared.room.notify_all();
    }
}

/// The answer that ends an exchange on which the agent sent a frame of `kind`, which it never
/// sends.
fn broken_exchange(stream: u32, kind: FrameKind) -> Frame {
    let error = Response::Error(ErrorReply {
        code: BROKEN_EXCHANGE.into(),
        message: format!("the agent sent a {kind:?} frame on this exchange, outside the protocol"),
    });
    Frame {
        kind: FrameKind::Response,
        stream,
        payload: serde_json::to_vec(&error).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvm_agent::serve::{serve, ServeConfig};
    use mvm_protocol::{
        ExecRequest, FsWriteRequest, OpenRequest, Response, Via, AGENT_STREAMS, MAX_PAYLOAD,
    };
    use std::collections::BTreeMap;

    /// How long a test waits for a frame the real agent sends.
    const PATIENCE: Duration = Duration::from_secs(60);

    fn exec(script: &str) -> Request {
        Request::Exec(ExecRequest {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            env: BTreeMap::new(),
            cwd: None,
            timeout_ms: 10_000,
            stdin: false,
            user: None,
            tty: None,
        })
    }

    /// Frames until the response: (stdout, response).
    fn collect(mut exchange: Exchange) -> (Vec<u8>, Response) {
        let mut stdout = Vec::new();
        loop {
            let frame = exchange
                .next_frame_within(PATIENCE)
                .expect("the channel closed");
            match frame.kind {
                FrameKind::Stdout => stdout.extend(frame.payload),
                FrameKind::Response => {
                    return (stdout, serde_json::from_slice(&frame.payload).unwrap())
                }
                _ => {}
            }
        }
    }

    #[test]
    fn exchanges_share_the_channel_and_each_gets_its_own_frames() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let agent = std::thread::spawn(move || serve(&mut guest, &ServeConfig::on_host()));
        let mux = Arc::new(AgentMux::new(host, 0).unwrap());
        let workers: Vec<_> = (0..8)
            .map(|i| {
                let mux = Arc::clone(&mux);
                std::thread::spawn(move || {
                    let exchange = mux
                        .request(&exec(&format!("for n in 1 2 3; do echo {i}-$n; done")))
                        .unwrap();
                    collect(exchange)
                })
            })
            .collect();
        for (i, worker) in workers.into_iter().enumerate() {
            let (stdout, response) = worker.join().unwrap();
            assert_eq!(stdout, format!("{i}-1\n{i}-2\n{i}-3\n").as_bytes());
            assert!(matches!(response, Response::Exec(_)), "{response:?}");
        }
        let (_, response) = collect(mux.request(&Request::PowerOff).unwrap());
        assert_eq!(response, Response::PowerOff);
        agent.join().unwrap().unwrap();
        // The agent is gone: a new exchange is refused or ends disconnected, never hangs.
        if let Ok(mut exchange) = mux.request(&exec("true")) {
            assert!(exchange.next_frame_within(PATIENCE).is_none());
        }
    }

    #[test]
    fn an_exchange_nobody_reads_holds_up_no_other_and_input_waits_for_room() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let agent = std::thread::spawn(move || serve(&mut guest, &ServeConfig::on_host()));
        let mux = AgentMux::new(host, 0).unwrap();
        // 8 MiB of output that nobody reads for now.
        let mut flood = mux.request(&exec("head -c 8388608 /dev/zero")).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        for i in 0..5 {
            let (stdout, response) = collect(mux.request(&exec(&format!("echo {i}"))).unwrap());
            assert_eq!(stdout, format!("{i}\n").as_bytes());
            assert!(matches!(response, Response::Exec(_)));
        }
        // Input larger than the window goes through as the command reads it.
        let input = vec![b'x'; 3 * 1024 * 1024 + 5];
        let mut request = ExecRequest {
            argv: vec!["wc".into(), "-c".into()],
            env: BTreeMap::new(),
            cwd: None,
            timeout_ms: 10_000,
            stdin: true,
            user: None,
            tty: None,
        };
        request.env.insert("PATH".into(), "/usr/bin:/bin".into());
        let counting = mux.request(&Request::Exec(request)).unwrap();
        for chunk in input.chunks(100_000) {
            mux.send_data(counting.stream(), chunk).unwrap();
        }
        mux.send_data(counting.stream(), &[]).unwrap();
        let (stdout, _) = collect(counting);
        assert_eq!(
            String::from_utf8(stdout).unwrap().trim(),
            input.len().to_string()
        );
        // The flood was held at its window meanwhile, and comes whole once read.
        let mut received = 0;
        while let Some(frame) = flood.next_frame_within(PATIENCE) {
            if frame.kind == FrameKind::Response {
                break;
            }
            received += frame.payload.len();
        }
        assert_eq!(received, 8 * 1024 * 1024);
        let (_, response) = collect(mux.request(&Request::PowerOff).unwrap());
        assert_eq!(response, Response::PowerOff);
        agent.join().unwrap().unwrap();
    }

    #[test]
    fn uploads_and_commands_share_the_channel_under_load() {
        use mvm_protocol::FsWriteRequest;
        use sha2::{Digest, Sha256};
        let (host, mut guest) = UnixStream::pair().unwrap();
        let agent = std::thread::spawn(move || serve(&mut guest, &ServeConfig::on_host()));
        let mux = Arc::new(AgentMux::new(host, 0).unwrap());
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let workers: Vec<_> = (0..6)
            .map(|i| {
                let mux = Arc::clone(&mux);
                let path = dir
                    .path()
                    .join(format!("f{i}"))
                    .to_str()
                    .unwrap()
                    .to_string();
                std::thread::spawn(move || {
                    if i % 2 == 0 {
                        let (stdout, _) =
                            collect(mux.request(&exec("head -c 3000000 /dev/zero")).unwrap());
                        assert_eq!(stdout.len(), 3_000_000);
                        return;
                    }
                    let bytes: Vec<u8> = (0..4_000_000u32).map(|n| (n % 251) as u8).collect();
                    let request = Request::FsWrite(FsWriteRequest {
                        path,
                        mode: 0o600,
                        size: bytes.len() as u64,
                        sha256: format!("sha256:{}", hex::encode(Sha256::digest(&bytes))),
                        tar: false,
                    });
                    let exchange = mux.request(&request).unwrap();
                    for chunk in bytes.chunks(64 * 1024) {
                        mux.send_data(exchange.stream(), chunk).unwrap();
                    }
                    let (_, response) = collect(exchange);
                    assert!(matches!(response, Response::FsWrite(_)), "{response:?}");
                })
            })
            .collect();
        for worker in workers {
            worker.join().unwrap();
        }
        let (_, response) = collect(mux.request(&Request::PowerOff).unwrap());
        assert_eq!(response, Response::PowerOff);
        agent.join().unwrap().unwrap();
    }

    /// A fake agent on `guest`: hands every request the host sends to `answer`, with the
    /// channel to write on, until the host hangs up.
    fn fake_agent(
        mut guest: UnixStream,
        mut answer: impl FnMut(&Frame, &mut UnixStream) + Send + 'static,
    ) -> JoinHandle<()> {
        std::thread::spawn(move || {
            let mut decoder = FrameDecoder::new();
            let mut buffer = vec![0; 64 * 1024];
            while let Ok(n @ 1..) = guest.read(&mut buffer) {
                decoder.push(&buffer[..n]);
                while let Ok(Some(frame)) = decoder.next_frame() {
                    if frame.kind == FrameKind::Request {
                        answer(&frame, &mut guest);
                    }
                }
            }
        })
    }

    #[test]
    fn frames_the_agent_never_sends_end_their_exchange_and_queue_no_more_than_a_window() {
        let (host, guest) = UnixStream::pair().unwrap();
        let agent = fake_agent(guest, |request, guest| {
            let stream = request.stream;
            let mut bytes = Vec::new();
            match serde_json::from_slice::<Request>(&request.payload).unwrap() {
                // A window's worth of output, then 10 MiB of frames the agent never sends.
                Request::Ps => {
                    for _ in 0..15 {
                        bytes.extend(encode(FrameKind::Stdout, stream, &[7; 65536]).unwrap());
                    }
                    for _ in 0..10_000 {
                        bytes.extend(encode(FrameKind::Request, stream, &[b'{'; 1024]).unwrap());
                    }
                }
                // Answered after the flood: by then every frame of it has been routed.
                _ => {
                    let echo = serde_json::to_vec(&Response::Echo).unwrap();
                    bytes.extend(encode(FrameKind::Response, stream, &echo).unwrap());
                }
            }
            guest.write_all(&bytes).unwrap();
        });
        let mux = AgentMux::new(host, 0).unwrap();
        let flooded = mux.request(&Request::Ps).unwrap();
        let (_, echoed) = collect(mux.request(&Request::Echo).unwrap());
        assert_eq!(echoed, Response::Echo);

        // Nothing has been taken from the flooded exchange: all it holds is its window of
        // data and the answer that ended it.
        let queued: Vec<Frame> = flooded.frames.try_iter().collect();
        let bytes: u64 = queued.iter().map(|f| flow::cost(f.payload.len())).sum();
        assert!(bytes <= flow::WINDOW, "{bytes} bytes queued");
        assert_eq!(queued.len(), 16);
        let answer = queued.last().unwrap();
        assert_eq!(answer.kind, FrameKind::Response);
        match serde_json::from_slice(&answer.payload).unwrap() {
            Response::Error(error) => assert_eq!(error.code, "RUN048", "{}", error.message),
            other => panic!("{other:?}"),
        }
        assert_eq!(mux.in_flight(), 0);
        assert!(!mux.is_closed(), "one exchange ends, not the channel");
        drop(flooded);
        drop(mux);
        agent.join().unwrap();
    }

    #[test]
    fn connections_the_agent_opens_are_refused_while_no_egress_is_served() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        guest.set_read_timeout(Some(PATIENCE)).unwrap();
        let mux = AgentMux::new(host, 0).unwrap();
        let open = serde_json::to_vec(&OpenRequest {
            host: "api.example.com".into(),
            port: 443,
            via: Via::Connect,
            malformed: None,
        })
        .unwrap();
        let stream = AGENT_STREAMS | 7;
        guest
            .write_all(&encode(FrameKind::Open, stream, &open).unwrap())
            .unwrap();
        let mut decoder = FrameDecoder::new();
        let mut buffer = [0u8; 4096];
        let answer = loop {
            if let Some(frame) = decoder.next_frame().unwrap() {
                break frame;
            }
            let n = guest.read(&mut buffer).unwrap();
            assert!(n > 0, "the runner hung up");
            decoder.push(&buffer[..n]);
        };
        assert_eq!((answer.kind, answer.stream), (FrameKind::Response, stream));
        match serde_json::from_slice(&answer.payload).unwrap() {
            Response::Error(error) => assert_eq!(error.code, "RUN052", "{}", error.message),
            other => panic!("{other:?}"),
        }
        assert!(!mux.is_closed(), "the channel serves on");
        assert_eq!(mux.in_flight(), 0);
    }

    #[test]
    fn data_waits_for_room_no_longer_than_the_send_limit() {
        let (host, guest) = UnixStream::pair().unwrap();
        // Takes every byte, but gives no room back and never answers.
        let agent = fake_agent(guest, |_, _| {});
        let mut mux = AgentMux::new(host, 0).unwrap();
        mux.send_limit = Duration::from_secs(1);
        let mux = Arc::new(mux);
        let upload = mux
            .request(&Request::FsWrite(FsWriteRequest {
                path: "/tmp/f".into(),
                mode: 0o600,
                size: 4 * MAX_PAYLOAD as u64,
                sha256: format!("sha256:{}", "0".repeat(64)),
                tar: false,
            }))
            .unwrap();
        let chunk = vec![0; MAX_PAYLOAD];
        // Three chunks fit the window; the fourth waits for room that never comes.
        for _ in 0..3 {
            mux.send_data(upload.stream(), &chunk).unwrap();
        }
        let (done, finished) = mpsc::channel();
        let sending = {
            let (mux, stream) = (Arc::clone(&mux), upload.stream());
            std::thread::spawn(move || {
                let started = Instant::now();
                let sent = mux.send_data(stream, &chunk);
                let _ = done.send((sent, started.elapsed()));
            })
        };
        let (sent, waited) = finished
            .recv_timeout(Duration::from_secs(10))
            .expect("send_data did not return by its deadline");
        assert!(matches!(sent, Err(ClientError::NoRoom(_))), "{sent:?}");
        assert!(waited >= Duration::from_secs(1), "{waited:?}");
        assert_eq!(STALLED, "RUN049");
        sending.join().unwrap();
        drop(upload);
        drop(Arc::into_inner(mux));
        agent.join().unwrap();
    }
}
