//! Carrying the connections the guest opens: each is judged and dialled by a [`Dialer`]
//! before anything leaves the machine, answered, then relayed byte for byte between the agent
//! channel and the far end on a thread of its own, until both directions end, either side
//! closes, or nothing moves for the idle timeout. Where the dialer asks to see the guest's
//! first bytes (a TLS ClientHello), none goes out before it has judged them.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mvm_protocol::{ErrorReply, FrameKind, OpenRequest, Response, Via};

use crate::mux::{Connection, ConnectionSender, Exchange, OpenHandler, BAD_OPEN, NOT_GRANTED};
use crate::secrets::egress::{is_bound, Blocked, GuestBytes};
use crate::secrets::tls::{GuestEnd, Terminator};
use crate::secrets::BoundSecret;

/// Bytes read from the far end at a time (one data frame at most).
const CHUNK: usize = 64 * 1024;
/// How often a relay whose guest side has ended looks whether the far side has too.
const POLL: Duration = Duration::from_millis(200);
/// The most of the guest's first bytes held back for [`Dialer::first_bytes`]: a ClientHello
/// is at most 16 KiB and its record header.
const MAX_HELD: usize = 16 * 1024 + 5;

/// Judges a connection the guest asked for and dials it: the only way a relay reaches out.
pub trait Dialer: Send + Sync {
    /// The far end's connected socket and its address, or why not.
    fn dial(&self, request: &OpenRequest) -> Result<(TcpStream, SocketAddr), Refusal>;

    /// Judges the guest's first bytes on a dialled connection before any goes out (all it
    /// has sent so far, up to 16 KiB): a TLS ClientHello's server name, say. Passes them by
    /// default.
    fn first_bytes(&self, request: &OpenRequest, bytes: &[u8]) -> Gate {
        let _ = (request, bytes);
        Gate::Pass
    }
}

/// The judgement of a connection's first bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// Not decided yet: hold them and wait for more.
    NeedMore,
    /// Let them, and everything after them, through.
    Pass,
    /// End the connection; nothing went out.
    Refuse(Refusal),
}

/// Why a connection was not made: the code the agent is answered with and the reason the
/// audit records (`not_granted`, `metadata`, `unreachable`, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// A stable error code.
    pub code: &'static str,
    /// The reason, a stable snake_case word.
    pub reason: &'static str,
    /// The addresses the host was judged by, when it came to addresses.
    pub addresses: Vec<IpAddr>,
}

impl Refusal {
    /// A refusal before any address was looked at.
    pub fn new(code: &'static str, reason: &'static str) -> Self {
        Self {
            code,
            reason,
            addresses: Vec::new(),
        }
    }
}

/// The relay's limits.
#[derive(Debug, Clone, Copy)]
pub struct RelayLimits {
    /// Connections open at once; one more is refused (`too_many_connections`).
    pub max_connections: usize,
    /// A connection on which nothing moved either way for this long is closed.
    pub idle_timeout: Duration,
}

/// What happened to a connection, for the audit and the counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEvent {
    /// Dialled and let through: `address` is where it goes. Recorded before the guest's first
    /// byte goes out; a connection whose allowance could not be recorded is ended.
    Allowed {
        /// The guest's request.
        request: OpenRequest,
        /// The address connected to.
        address: SocketAddr,
    },
    /// Refused before anything left the machine.
    Denied {
        /// The guest's request.
        request: OpenRequest,
        /// Why.
        refusal: Refusal,
    },
    /// An allowed connection ended.
    Closed {
        /// The guest's request.
        request: OpenRequest,
        /// Bytes from the guest to the far end.
        sent: u64,
        /// Bytes from the far end to the guest.
        received: u64,
    },
}

/// Records an event; `false` when it could not be recorded (the audit log failed).
pub type EventRecorder = Box<dyn Fn(RelayEvent) -> bool + Send + Sync>;

/// Serves the connections the agent opens.
pub struct Relay {
    dialer: Box<dyn Dialer>,
    limits: RelayLimits,
    on_event: EventRecorder,
    open: AtomicUsize,
    /// The launch's bound secrets: put into requests to their hosts, and looked for
    /// everywhere else ([`crate::secrets::egress`]).
    secrets: Arc<Vec<BoundSecret>>,
    /// The TLS of the bound hosts, when there are any ([`crate::secrets::tls`]).
    tls: Option<Arc<Terminator>>,
}

impl Relay {
    /// A relay dialling through `dialer` and telling `on_event` every decision and end.
    pub fn new(dialer: Box<dyn Dialer>, limits: RelayLimits, on_event: EventRecorder) -> Arc<Self> {
        Self::with_secrets(dialer, limits, on_event, Arc::default(), None)
    }

    /// A relay that also carries the launch's bound secrets.
    pub fn with_secrets(
        dialer: Box<dyn Dialer>,
        limits: RelayLimits,
        on_event: EventRecorder,
        secrets: Arc<Vec<BoundSecret>>,
        tls: Option<Arc<Terminator>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            dialer,
            limits,
            on_event,
            open: AtomicUsize::new(0),
            secrets,
            tls,
        })
    }

    /// The handler the agent mux calls for each open: the connection goes to a thread of
    /// its own.
    pub fn handler(self: &Arc<Self>) -> OpenHandler {
        let relay = Arc::clone(self);
        Arc::new(move |connection, request| {
            let relay = Arc::clone(&relay);
            let spawned = std::thread::Builder::new()
                .name("egress".into())
                .spawn(move || relay.carry(connection, request));
            if let Err(e) = spawned {
                eprintln!("mvm-runner: no thread for a guest connection: {e}");
            }
        })
    }

    fn carry(&self, connection: Connection, request: OpenRequest) {
        let Connection { exchange, sender } = connection;
        if request.malformed.is_some() {
            // The agent refused the client itself; only the record is left to make.
            return self.refuse(&sender, request, Refusal::new(BAD_OPEN, "bad_request"));
        }
        if self.open.fetch_add(1, Ordering::SeqCst) >= self.limits.max_connections {
            self.open.fetch_sub(1, Ordering::SeqCst);
            let refusal = Refusal::new(NOT_GRANTED, "too_many_connections");
            return self.refuse(&sender, request, refusal);
        }
        match self.dialer.dial(&request) {
            Err(refusal) => self.refuse(&sender, request, refusal),
            Ok((far, address)) => self.carry_dialled(exchange, sender, far, address, request),
        }
        self.open.fetch_sub(1, Ordering::SeqCst);
    }

    /// Answers a dialled connection, lets the guest's first bytes pass the dialer's gate,
    /// records the allowance, then relays.
    fn carry_dialled(
        &self,
        mut exchange: Exchange,
        sender: ConnectionSender,
        far: TcpStream,
        address: SocketAddr,
        request: OpenRequest,
    ) {
        let held = match self.dialer.first_bytes(&request, &[]) {
            Gate::Pass => {
                // Nothing to look at first: the decision is recorded before the answer.
                if !self.allowed(&request, address) {
                    return self.refuse(&sender, request, Refusal::new(NOT_GRANTED, "unrecorded"));
                }
                if sender.answer(&Response::Opened).is_err() {
                    return;
                }
                Vec::new()
            }
            Gate::Refuse(refusal) => return self.refuse(&sender, request, refusal),
            Gate::NeedMore => {
                if sender.answer(&Response::Opened).is_err() {
                    return;
                }
                match self.hold_first_bytes(&mut exchange, &request) {
                    Ok(held) if self.allowed(&request, address) => held,
                    Ok(_) => return sender.close(),
                    Err(refusal) => {
                        (self.on_event)(RelayEvent::Denied { request, refusal });
                        return sender.close();
                    }
                }
            }
        };
        let tunnel = request.via != Via::Forward;
        let terminated = self.tls.as_ref().filter(|tls| {
            tunnel
                && tls.ends(&request.host)
                && is_bound(&self.secrets, &request.host, request.port)
        });
        let carried = match terminated {
            Some(tls) => {
                let filter = GuestBytes::for_terminated(&self.secrets, &request.host, request.port);
                let guest_end = GuestEnd {
                    exchange,
                    sender,
                    held: &held,
                };
                let (sent, received, blocked) = tls.carry(
                    guest_end,
                    far,
                    &request.host,
                    filter,
                    self.limits.idle_timeout,
                );
                Carried {
                    sent,
                    received,
                    blocked,
                }
            }
            None => {
                let mut filter =
                    GuestBytes::for_connection(&self.secrets, &request.host, request.port, !tunnel);
                relay(
                    exchange,
                    sender,
                    far,
                    &held,
                    &mut filter,
                    self.limits.idle_timeout,
                )
            }
        };
        if let Some(blocked) = carried.blocked {
            let refusal = Refusal::new(NOT_GRANTED, blocked.reason);
            let request = request.clone();
            (self.on_event)(RelayEvent::Denied { request, refusal });
        }
        (self.on_event)(RelayEvent::Closed {
            request,
            sent: carried.sent,
            received: carried.received,
        });
    }

    fn allowed(&self, request: &OpenRequest, address: SocketAddr) -> bool {
        (self.on_event)(RelayEvent::Allowed {
            request: request.clone(),
            address,
        })
    }

    /// The guest's first bytes, held until the dialer's gate passes them; the refusal when it
    /// does not, or when the guest ends, closes or idles before it decided.
    fn hold_first_bytes(
        &self,
        exchange: &mut Exchange,
        request: &OpenRequest,
    ) -> Result<Vec<u8>, Refusal> {
        let mut held = Vec::new();
        let deadline = Instant::now() + self.limits.idle_timeout;
        let incomplete = || Refusal::new(NOT_GRANTED, "not_tls");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = exchange.next_frame_within(left).ok_or_else(incomplete)?;
            match frame.kind {
                FrameKind::Data if !frame.payload.is_empty() => {
                    held.extend_from_slice(&frame.payload);
                }
                _ => return Err(incomplete()),
            }
            match self.dialer.first_bytes(request, &held) {
                Gate::Pass => return Ok(held),
                Gate::Refuse(refusal) => return Err(refusal),
                Gate::NeedMore if held.len() >= MAX_HELD => return Err(incomplete()),
                Gate::NeedMore => {}
            }
        }
    }

    /// Records the refusal, then answers it.
    fn refuse(&self, sender: &ConnectionSender, request: OpenRequest, refusal: Refusal) {
        let answer = Response::Error(ErrorReply {
            code: refusal.code.into(),
            message: refusal.reason.into(),
        });
        (self.on_event)(RelayEvent::Denied { request, refusal });
        let _ = sender.answer(&answer);
    }
}

/// What a relay carried: the bytes sent to the far end and received from it, and why the
/// guest's bytes were stopped, if they were.
struct Carried {
    sent: u64,
    received: u64,
    blocked: Option<Blocked>,
}

/// Relays until both directions have ended or the connection is torn down, the guest's bytes
/// passed through `filter` on their way out.
fn relay(
    mut exchange: Exchange,
    sender: ConnectionSender,
    far: TcpStream,
    held: &[u8],
    filter: &mut GuestBytes,
    idle_timeout: Duration,
) -> Carried {
    let nothing = |blocked| Carried {
        sent: 0,
        received: 0,
        blocked,
    };
    let first = match filter.pass(held) {
        Ok(first) => first,
        Err(blocked) => {
            sender.close();
            return nothing(Some(blocked));
        }
    };
    if (&far).write_all(&first).is_err() {
        sender.close();
        return nothing(None);
    }
    let started = Instant::now();
    let last_moved = Arc::new(AtomicU64::new(0));
    let since_start = move || started.elapsed().as_millis() as u64;
    let far_reader = match far.try_clone() {
        Ok(reader) => reader,
        Err(_) => {
            sender.close();
            return nothing(None);
        }
    };
    let upstream = {
        let sender = sender.clone();
        let last_moved = Arc::clone(&last_moved);
        std::thread::spawn(move || far_to_guest(far_reader, &sender, &last_moved, since_start))
    };
    let mut far_writer = &far;
    let mut sent = first.len() as u64;
    let mut guest_done = false;
    let mut blocked = None;
    loop {
        if guest_done && upstream.is_finished() {
            break;
        }
        let idle_for = since_start().saturating_sub(last_moved.load(Ordering::Relaxed));
        let idle_left = idle_timeout.saturating_sub(Duration::from_millis(idle_for));
        if idle_left.is_zero() {
            sender.close();
            break;
        }
        let wait = if guest_done {
            idle_left.min(POLL)
        } else {
            idle_left
        };
        let Some(frame) = exchange.next_frame_within(wait) else {
            if sender.is_gone() {
                break;
            }
            // Idle, or the far side may have ended: both are looked at above.
            continue;
        };
        match frame.kind {
            FrameKind::Data if frame.payload.is_empty() => {
                if let Err(why) = filter.finish() {
                    blocked = Some(why);
                    sender.close();
                    break;
                }
                let _ = far.shutdown(Shutdown::Write);
                guest_done = true;
            }
            FrameKind::Data if !guest_done => {
                let bytes = match filter.pass(&frame.payload) {
                    Ok(bytes) => bytes,
                    Err(why) => {
                        blocked = Some(why);
                        sender.close();
                        break;
                    }
                };
                if far_writer.write_all(&bytes).is_err() {
                    sender.close();
                    break;
                }
                sent += bytes.len() as u64;
                last_moved.store(since_start(), Ordering::Relaxed);
            }
            // A close from the agent, or anything the protocol does not allow here.
            FrameKind::Close => break,
            _ => {
                sender.close();
                break;
            }
        }
    }
    let _ = far.shutdown(Shutdown::Both);
    let received = upstream.join().unwrap_or(0);
    drop(exchange);
    Carried {
        sent,
        received,
        blocked,
    }
}

/// Carries the far end's bytes to the guest until it ends (an empty data frame says so) or
/// fails (a close). Returns the bytes carried.
fn far_to_guest(
    mut far: TcpStream,
    sender: &ConnectionSender,
    last_moved: &AtomicU64,
    now: impl Fn() -> u64,
) -> u64 {
    let mut buffer = vec![0u8; CHUNK];
    let mut received = 0u64;
    loop {
        match far.read(&mut buffer) {
            Ok(0) => {
                let _ = sender.send(&[]);
                return received;
            }
            Ok(n) => {
                if sender.send(&buffer[..n]).is_err() {
                    let _ = far.shutdown(Shutdown::Both);
                    return received;
                }
                received += n as u64;
                last_moved.store(now(), Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                sender.close();
                return received;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mux::AgentMux;
    use mvm_protocol::{encode, flow, Frame, FrameDecoder, Via, AGENT_STREAMS};
    use std::collections::HashMap;
    use std::net::TcpListener;
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc::{self, Receiver};
    use std::sync::{Condvar, Mutex};

    const PATIENCE: Duration = Duration::from_secs(30);

    /// Dials the names it maps, refuses the rest.
    struct MapDialer(HashMap<String, SocketAddr>);

    impl Dialer for MapDialer {
        fn dial(&self, request: &OpenRequest) -> Result<(TcpStream, SocketAddr), Refusal> {
            let refused = Refusal::new(NOT_GRANTED, "not_granted");
            let address = *self.0.get(&request.host).ok_or(refused.clone())?;
            let stream = TcpStream::connect(address).map_err(|_| refused)?;
            Ok((stream, address))
        }
    }

    /// The agent's end of the channel, speaking raw frames and keeping its send window.
    struct Guest {
        writer: Arc<Mutex<UnixStream>>,
        frames: Mutex<Receiver<Frame>>,
        room: Arc<(Mutex<u64>, Condvar)>,
    }

    impl Guest {
        /// Frames from the host go to `frames`; data frames are credited back at once, and
        /// credits from the host open the guest's own window.
        fn start(stream: UnixStream) -> Self {
            let (sender, frames) = mpsc::channel();
            let room = Arc::new((Mutex::new(flow::WINDOW), Condvar::new()));
            let mut reading = stream.try_clone().unwrap();
            // Credits go through the same lock as data, so frames never interleave.
            let writer = Arc::new(Mutex::new(stream));
            let crediting = Arc::clone(&writer);
            let reader_room = Arc::clone(&room);
            std::thread::spawn(move || {
                let mut decoder = FrameDecoder::new();
                let mut buffer = vec![0; 64 * 1024];
                while let Ok(n @ 1..) = reading.read(&mut buffer) {
                    decoder.push(&buffer[..n]);
                    while let Ok(Some(frame)) = decoder.next_frame() {
                        match frame.kind {
                            FrameKind::Credit => {
                                let bytes = flow::parse_credit(&frame.payload).unwrap();
                                *reader_room.0.lock().unwrap() += bytes;
                                reader_room.1.notify_all();
                            }
                            kind => {
                                if kind == FrameKind::Data {
                                    let credit =
                                        flow::credit_payload(flow::cost(frame.payload.len()));
                                    let bytes =
                                        encode(FrameKind::Credit, frame.stream, &credit).unwrap();
                                    crediting.lock().unwrap().write_all(&bytes).unwrap();
                                }
                                if sender.send(frame).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                }
            });
            Self {
                writer,
                frames: Mutex::new(frames),
                room,
            }
        }

        fn send(&self, kind: FrameKind, stream: u32, payload: &[u8]) {
            if kind == FrameKind::Data {
                let (room, grown) = &*self.room;
                let mut room = room.lock().unwrap();
                while *room < flow::cost(payload.len()) {
                    room = grown.wait(room).unwrap();
                }
                *room -= flow::cost(payload.len());
            }
            let bytes = encode(kind, stream, payload).unwrap();
            self.writer.lock().unwrap().write_all(&bytes).unwrap();
        }

        fn open(&self, stream: u32, host: &str) -> Response {
            self.open_request(stream, host, None)
        }

        fn open_request(&self, stream: u32, host: &str, malformed: Option<&str>) -> Response {
            let request = OpenRequest {
                host: host.into(),
                port: 7,
                via: Via::Connect,
                malformed: malformed.map(str::to_string),
            };
            self.send(
                FrameKind::Open,
                stream,
                &serde_json::to_vec(&request).unwrap(),
            );
            let answer = self.next();
            assert_eq!((answer.kind, answer.stream), (FrameKind::Response, stream));
            serde_json::from_slice(&answer.payload).unwrap()
        }

        fn next(&self) -> Frame {
            self.frames
                .lock()
                .unwrap()
                .recv_timeout(PATIENCE)
                .expect("a frame from the host")
        }
    }

    /// A loopback server echoing each connection until its client ends it; it counts
    /// connections.
    fn echo_server() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&accepted);
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                counted.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let mut reader = stream.try_clone().unwrap();
                    let _ = io::copy(&mut reader, &mut stream);
                    let _ = stream.shutdown(Shutdown::Write);
                });
            }
        });
        (address, accepted)
    }

    fn setup(
        limits: RelayLimits,
    ) -> (
        AgentMux,
        Guest,
        Arc<AtomicUsize>,
        Arc<Mutex<Vec<RelayEvent>>>,
    ) {
        let (address, accepted) = echo_server();
        let events = Arc::new(Mutex::new(Vec::new()));
        let recorded = Arc::clone(&events);
        let relay = Relay::new(
            Box::new(MapDialer(HashMap::from([(
                "echo.example.com".to_string(),
                address,
            )]))),
            limits,
            Box::new(move |event| {
                recorded.lock().unwrap().push(event);
                true
            }),
        );
        let (host, guest) = UnixStream::pair().unwrap();
        let mux = AgentMux::serving(host, 0, Some(relay.handler())).unwrap();
        (mux, Guest::start(guest), accepted, events)
    }

    const LIMITS: RelayLimits = RelayLimits {
        max_connections: 8,
        idle_timeout: Duration::from_secs(60),
    };

    #[test]
    fn a_granted_connection_carries_bytes_both_ways_under_flow_control() {
        let (mux, guest, _, events) = setup(LIMITS);
        let stream = AGENT_STREAMS | 1;
        assert_eq!(guest.open(stream, "echo.example.com"), Response::Opened);

        // Three windows' worth each way: the echo sends it all back while it still arrives.
        let sent: Vec<u8> = (0..3 * flow::WINDOW as usize)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for chunk in sent.chunks(60_000) {
                    guest.send(FrameKind::Data, stream, chunk);
                }
                guest.send(FrameKind::Data, stream, &[]);
            });
            let mut received = Vec::new();
            loop {
                let frame = guest.next();
                assert_eq!((frame.kind, frame.stream), (FrameKind::Data, stream));
                if frame.payload.is_empty() {
                    break;
                }
                received.extend_from_slice(&frame.payload);
            }
            assert!(received == sent, "{} bytes back", received.len());
        });

        // Both directions ended: the connection is gone from the channel.
        let deadline = Instant::now() + PATIENCE;
        while mux.in_flight() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(mux.in_flight(), 0);
        while events.lock().unwrap().len() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let total = sent.len() as u64;
        let events = events.lock().unwrap().clone();
        assert!(
            matches!(&events[0], RelayEvent::Allowed { request, .. } if request.host == "echo.example.com")
        );
        assert!(
            matches!(&events[1], RelayEvent::Closed { sent, received, .. } if *sent == total && *received == total),
            "{events:?}"
        );
    }

    #[test]
    fn a_connection_not_granted_is_refused_and_nothing_is_dialled() {
        let (_mux, guest, accepted, events) = setup(LIMITS);
        match guest.open(AGENT_STREAMS | 3, "other.example.com") {
            Response::Error(error) => {
                assert_eq!(
                    (error.code.as_str(), error.message.as_str()),
                    ("RUN052", "not_granted")
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 0);
        assert!(matches!(
            &events.lock().unwrap()[0],
            RelayEvent::Denied { refusal, .. } if refusal.reason == "not_granted"
        ));
    }

    #[test]
    fn a_request_the_guest_proxy_refused_is_recorded_and_never_dialled() {
        let (_mux, guest, accepted, events) = setup(LIMITS);
        match guest.open_request(AGENT_STREAMS | 5, "echo.example.com", Some("PROXY006")) {
            Response::Error(error) => {
                assert_eq!(
                    (error.code.as_str(), error.message.as_str()),
                    ("RUN053", "bad_request")
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 0);
        assert!(matches!(
            &events.lock().unwrap()[0],
            RelayEvent::Denied { request, refusal }
                if refusal.reason == "bad_request" && request.malformed.as_deref() == Some("PROXY006")
        ));
    }

    #[test]
    fn closes_from_the_guest_idle_connections_and_the_connection_limit() {
        let (mux, guest, accepted, _) = setup(RelayLimits {
            max_connections: 2,
            idle_timeout: Duration::from_millis(300),
        });
        let (first, second, third) = (AGENT_STREAMS | 1, AGENT_STREAMS | 2, AGENT_STREAMS | 3);
        assert_eq!(guest.open(first, "echo.example.com"), Response::Opened);
        assert_eq!(guest.open(second, "echo.example.com"), Response::Opened);
        // Two are open: a third is refused.
        match guest.open(third, "echo.example.com") {
            Response::Error(error) => assert_eq!(error.message, "too_many_connections"),
            other => panic!("{other:?}"),
        }
        let deadline = Instant::now() + PATIENCE;
        while accepted.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "the third was never dialled"
        );

        // The guest closes the first; the second, idle, is closed by the host.
        guest.send(FrameKind::Close, first, &[]);
        let closed = guest.next();
        assert_eq!((closed.kind, closed.stream), (FrameKind::Close, second));
        let deadline = Instant::now() + PATIENCE;
        while mux.in_flight() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(mux.in_flight(), 0);
        // Room again.
        assert_eq!(guest.open(third, "echo.example.com"), Response::Opened);
    }
}
