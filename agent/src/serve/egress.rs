//! The egress proxy in the serving loop: clients accepted on the guest's proxy port, their
//! requests read ([`crate::proxy`]), each carried to the host as an open frame on a stream of
//! the agent's own, unresolved; then, once the host has opened the connection, a [`Tunnel`] —
//! or the host's refusal told to the client, and the client closed.
//!
//! Bounds: at most [`MAX_CLIENTS`] connections at once, in whatever phase (one more is
//! answered `503` and closed); a client has [`REQUEST_TIME`] to complete its request; a client
//! refused is given [`FAREWELL_TIME`] to read its answer, while what it still sends is read
//! and dropped (closing a socket with unread bytes would reset the connection under the
//! answer). A request the proxy refuses itself (malformed) is answered by the proxy and
//! reported to the host in an open frame carrying the parser's code, for the host's audit; the
//! host's answer to it is consumed.
//!
//! The host's refusal codes are the runner's: RUN052 (not granted) becomes a `403` or SOCKS5
//! "not allowed by ruleset", RUN056 "connection refused", RUN057 "host unreachable", anything
//! else a general failure.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use rustix::event::PollFlags;

use mvm_protocol::{FrameKind, OpenRequest, Response, Via, AGENT_STREAMS};

use super::tunnel::{is_transient, Pumped, Tunnel};
use super::{write_frame, ServeError, SocketKey};
use crate::proxy::request::{Parsed, RequestReader, CONNECT_ESTABLISHED, MAX_HEAD};
use crate::proxy::{socks, Host, ProxyRequest, Refusal, Target};

/// Client connections served at once, in every phase.
pub const MAX_CLIENTS: usize = 128;
/// How long a client may take to complete its request.
pub const REQUEST_TIME: Duration = Duration::from_secs(30);
/// How long a refused client is given to read its answer before it is closed.
pub const FAREWELL_TIME: Duration = Duration::from_secs(2);

/// The runner's codes for an open it refused, as the client is told them.
const NOT_GRANTED: &str = "RUN052";
const CONNECTION_REFUSED: &str = "RUN056";
const UNREACHABLE: &str = "RUN057";

/// The proxy: its listener and its clients.
#[derive(Debug)]
pub struct Egress {
    listener: TcpListener,
    clients: Vec<Client>,
    next_client: u64,
    /// The next number to try for an agent stream (`AGENT_STREAMS | n`, `n` from 1).
    next_stream: u32,
    /// Streams on which a malformed request was reported, until the host has answered.
    audits: HashSet<u32>,
}

#[derive(Debug)]
struct Client {
    /// Its name in the poll's results.
    id: u64,
    phase: Phase,
}

#[derive(Debug)]
enum Phase {
    /// Its request is being read.
    Request(Reading),
    /// The host was asked to open a connection on `stream`; no answer yet.
    Opening {
        socket: TcpStream,
        stream: u32,
        asked: Asked,
    },
    /// The host opened it: bytes flow.
    Tunnel(Tunnel),
    /// The client is told why not, then closed.
    Farewell(Farewell),
    /// Over: removed at the end of the turn.
    Gone,
}

/// A request being read.
#[derive(Debug)]
struct Reading {
    socket: TcpStream,
    received: Vec<u8>,
    protocol: Protocol,
    deadline: Instant,
}

#[derive(Debug)]
enum Protocol {
    /// HTTP, or not known yet.
    Http(RequestReader),
    /// SOCKS5; after the greeting, how many bytes it took.
    Socks { greeting: Option<usize> },
}

/// A complete request.
#[derive(Debug)]
struct Asked {
    via: Via,
    target: Target,
    /// What goes to the host first once the connection is open: a forwarded request's head,
    /// and whatever the client sent behind its request.
    to_host: Vec<u8>,
}

/// What reading a request came to, for now.
enum Step {
    /// Nothing complete yet.
    Wait,
    /// The client went away or failed.
    Gone,
    Asked(Asked),
    /// The proxy refuses the request itself.
    Malformed {
        code: &'static str,
        reply: Vec<u8>,
        via: Via,
    },
}

/// An answer being written to a client before it is closed.
#[derive(Debug)]
struct Farewell {
    socket: TcpStream,
    reply: Vec<u8>,
    written: usize,
    until: Instant,
}

impl Egress {
    /// Listens on `address`.
    pub fn listen(address: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(address)?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener,
            clients: Vec::new(),
            next_client: 1,
            next_stream: 1,
            audits: HashSet::new(),
        })
    }

    /// The sockets to poll, with what for.
    pub fn interests(&self) -> Vec<(SocketKey, BorrowedFd<'_>, PollFlags)> {
        let mut interests = vec![(SocketKey::Listener, self.listener.as_fd(), PollFlags::IN)];
        for client in &self.clients {
            let (fd, flags) = match &client.phase {
                Phase::Request(reading) => (reading.socket.as_fd(), PollFlags::IN),
                Phase::Tunnel(tunnel) => (tunnel.fd(), tunnel.interest()),
                Phase::Farewell(farewell) => (farewell.socket.as_fd(), farewell.interest()),
                Phase::Opening { .. } | Phase::Gone => continue,
            };
            if !flags.is_empty() {
                interests.push((SocketKey::Client(client.id), fd, flags));
            }
        }
        interests
    }

    /// When a client's time runs out next.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.clients
            .iter()
            .filter_map(|client| match &client.phase {
                Phase::Request(reading) => Some(reading.deadline),
                Phase::Farewell(farewell) => Some(farewell.until),
                _ => None,
            })
            .min()
    }

    /// Accepts new clients, reads requests, moves tunnels' bytes, writes farewells and closes
    /// what is over or out of time.
    pub fn progress<C: Write>(
        &mut self,
        channel: &mut C,
        ready: &HashMap<SocketKey, PollFlags>,
        now: Instant,
        buffer: &mut [u8],
    ) -> Result<(), ServeError> {
        if ready.contains_key(&SocketKey::Listener) {
            self.accept(now);
        }
        for at in 0..self.clients.len() {
            let flags = ready
                .get(&SocketKey::Client(self.clients[at].id))
                .copied()
                .unwrap_or_else(PollFlags::empty);
            let phase = std::mem::replace(&mut self.clients[at].phase, Phase::Gone);
            let phase = self.advance(channel, phase, flags, now, buffer)?;
            self.clients[at].phase = phase;
        }
        self.clients.retain(|c| !matches!(c.phase, Phase::Gone));
        Ok(())
    }

    /// The host's answer to an open on `stream`.
    pub fn answer<C: Write>(
        &mut self,
        channel: &mut C,
        stream: u32,
        payload: &[u8],
    ) -> Result<(), ServeError> {
        if self.audits.remove(&stream) {
            return Ok(());
        }
        let Some(client) = self.clients.iter_mut().find(
            |c| matches!(&c.phase, Phase::Opening { stream: opening, .. } if *opening == stream),
        ) else {
            return Ok(());
        };
        let Phase::Opening { socket, asked, .. } =
            std::mem::replace(&mut client.phase, Phase::Gone)
        else {
            return Ok(());
        };
        client.phase = match serde_json::from_slice::<Response>(payload) {
            Ok(Response::Opened) => {
                let greeting: &[u8] = match asked.via {
                    Via::Connect => CONNECT_ESTABLISHED,
                    Via::Forward => &[],
                    Via::Socks => &socks::success(),
                };
                Phase::Tunnel(Tunnel::new(stream, socket, greeting, asked.to_host))
            }
            Ok(Response::Error(error)) => {
                Farewell::phase(socket, refusal_reply(asked.via, refusal(&error.code)))
            }
            // Not an answer to an open: the stream is given up.
            _ => {
                write_frame(channel, FrameKind::Close, stream, &[])?;
                Farewell::phase(socket, refusal_reply(asked.via, Refusal::Failed))
            }
        };
        Ok(())
    }

    /// A data frame from the host on `stream`.
    pub fn receive<C: Write>(
        &mut self,
        channel: &mut C,
        stream: u32,
        bytes: &[u8],
    ) -> Result<(), ServeError> {
        let violated = self
            .tunnel(stream)
            .is_some_and(|tunnel| tunnel.receive(bytes).is_err());
        if violated {
            self.tear_down(channel, stream)?;
        }
        Ok(())
    }

    /// Room the host handed back on `stream`.
    pub fn grant(&mut self, stream: u32, bytes: u64) {
        if let Some(tunnel) = self.tunnel(stream) {
            tunnel.grant(bytes);
        }
    }

    /// The host closed `stream`: its client is dropped at once.
    pub fn close(&mut self, stream: u32) {
        self.clients.retain(|c| c.stream() != Some(stream));
    }

    /// The host broke the protocol on `stream`: the stream is closed, its client dropped.
    pub fn tear_down<C: Write>(&mut self, channel: &mut C, stream: u32) -> Result<(), ServeError> {
        if self.clients.iter().any(|c| c.stream() == Some(stream)) {
            self.close(stream);
            write_frame(channel, FrameKind::Close, stream, &[])?;
        }
        Ok(())
    }

    fn tunnel(&mut self, stream: u32) -> Option<&mut Tunnel> {
        self.clients.iter_mut().find_map(|c| match &mut c.phase {
            Phase::Tunnel(tunnel) if tunnel.stream() == stream => Some(tunnel),
            _ => None,
        })
    }

    /// Takes every connection waiting; past [`MAX_CLIENTS`], answers `503` and closes.
    fn accept(&mut self, now: Instant) {
        loop {
            let socket = match self.listener.accept() {
                Ok((socket, _)) => socket,
                // Nothing more waiting, or nothing to be done about it now.
                Err(_) => return,
            };
            if socket.set_nonblocking(true).is_err() {
                continue;
            }
            if self.clients.len() >= MAX_CLIENTS {
                // A fresh socket's buffer takes the short answer whole.
                let _ = (&socket).write(&crate::proxy::busy_response());
                let _ = socket.shutdown(Shutdown::Write);
                continue;
            }
            self.clients.push(Client {
                id: self.next_client,
                phase: Phase::Request(Reading {
                    socket,
                    received: Vec::new(),
                    protocol: Protocol::Http(RequestReader::new()),
                    deadline: now + REQUEST_TIME,
                }),
            });
            self.next_client += 1;
        }
    }

    /// One client's turn.
    fn advance<C: Write>(
        &mut self,
        channel: &mut C,
        phase: Phase,
        ready: PollFlags,
        now: Instant,
        buffer: &mut [u8],
    ) -> Result<Phase, ServeError> {
        let woken = ready.intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR);
        Ok(match phase {
            Phase::Request(reading) if now >= reading.deadline => Phase::Gone,
            Phase::Request(mut reading) if woken => match reading.step() {
                Step::Wait => Phase::Request(reading),
                Step::Gone => Phase::Gone,
                Step::Asked(asked) => {
                    let stream = self.fresh_stream();
                    let open = OpenRequest {
                        host: host_text(&asked.target.host),
                        port: asked.target.port,
                        via: asked.via,
                        malformed: None,
                    };
                    send_open(channel, stream, &open)?;
                    Phase::Opening {
                        socket: reading.socket,
                        stream,
                        asked,
                    }
                }
                Step::Malformed { code, reply, via } => {
                    let stream = self.fresh_stream();
                    let open = OpenRequest {
                        host: String::new(),
                        port: 0,
                        via,
                        malformed: Some(code.into()),
                    };
                    send_open(channel, stream, &open)?;
                    self.audits.insert(stream);
                    Farewell::phase(reading.socket, reply)
                }
            },
            Phase::Tunnel(mut tunnel) => match tunnel.pump(channel, ready, buffer)? {
                Pumped::Open => Phase::Tunnel(tunnel),
                Pumped::Ended => Phase::Gone,
                Pumped::Failed(_) => {
                    write_frame(channel, FrameKind::Close, tunnel.stream(), &[])?;
                    Phase::Gone
                }
            },
            Phase::Farewell(farewell) if now >= farewell.until => Phase::Gone,
            Phase::Farewell(mut farewell) => match farewell.pump(ready, buffer) {
                true => Phase::Farewell(farewell),
                false => Phase::Gone,
            },
            phase => phase,
        })
    }

    /// An agent stream id not in use: `AGENT_STREAMS | n`, `n` counting up from 1 and around.
    fn fresh_stream(&mut self) -> u32 {
        loop {
            let stream = AGENT_STREAMS | self.next_stream;
            self.next_stream = match self.next_stream {
                n if n == !AGENT_STREAMS => 1,
                n => n + 1,
            };
            let in_use = self.audits.contains(&stream)
                || self.clients.iter().any(|c| c.stream() == Some(stream));
            if !in_use {
                return stream;
            }
        }
    }
}

impl Client {
    /// The agent stream it holds, once it has one.
    fn stream(&self) -> Option<u32> {
        match &self.phase {
            Phase::Opening { stream, .. } => Some(*stream),
            Phase::Tunnel(tunnel) => Some(tunnel.stream()),
            _ => None,
        }
    }
}

impl Reading {
    /// Reads what the client sent (it was reported readable) and looks for a complete request.
    fn step(&mut self) -> Step {
        let start = self.received.len();
        let room = MAX_HEAD.saturating_sub(start);
        if room == 0 {
            return Step::Gone;
        }
        self.received.resize(start + room, 0);
        let read = self.socket.read(&mut self.received[start..]);
        self.received.truncate(start + *read.as_ref().unwrap_or(&0));
        match read {
            Ok(0) => Step::Gone,
            Ok(_) => self.parse(),
            Err(e) if is_transient(&e) => Step::Wait,
            Err(_) => Step::Gone,
        }
    }

    /// Reads the request out of what was received so far; a SOCKS5 client's greeting is
    /// answered on the way.
    fn parse(&mut self) -> Step {
        loop {
            match &mut self.protocol {
                Protocol::Http(reader) => match reader.read(&self.received) {
                    Ok(Parsed::NeedMore) => return Step::Wait,
                    Ok(Parsed::Request { request, head_len }) => {
                        let rest = &self.received[head_len..];
                        let (via, target, to_host) = match request {
                            ProxyRequest::Forward { target, mut head } => {
                                head.extend_from_slice(rest);
                                (Via::Forward, target, head)
                            }
                            ProxyRequest::Connect(target) => (Via::Connect, target, rest.to_vec()),
                            ProxyRequest::Socks => {
                                self.protocol = Protocol::Socks { greeting: None };
                                continue;
                            }
                        };
                        return Step::Asked(Asked {
                            via,
                            target,
                            to_host,
                        });
                    }
                    Err(e) => {
                        return Step::Malformed {
                            code: e.code(),
                            reply: e.response(),
                            via: Via::Connect,
                        }
                    }
                },
                Protocol::Socks { greeting: None } => match socks::read_greeting(&self.received) {
                    Ok(None) => return Step::Wait,
                    Ok(Some(len)) => {
                        // Nothing was written to the socket before: its buffer takes two bytes.
                        if self.socket.write_all(&socks::METHOD_SELECTED).is_err() {
                            return Step::Gone;
                        }
                        self.protocol = Protocol::Socks {
                            greeting: Some(len),
                        };
                    }
                    Err(e) => return socks_malformed(e),
                },
                Protocol::Socks {
                    greeting: Some(greeting),
                } => {
                    let greeting = *greeting;
                    return match socks::read_request(&self.received[greeting..]) {
                        Ok(None) => Step::Wait,
                        Ok(Some((target, len))) => Step::Asked(Asked {
                            via: Via::Socks,
                            target,
                            to_host: self.received[greeting + len..].to_vec(),
                        }),
                        Err(e) => socks_malformed(e),
                    };
                }
            }
        }
    }
}

fn socks_malformed(e: socks::SocksError) -> Step {
    Step::Malformed {
        code: e.code(),
        reply: e.reply(),
        via: Via::Socks,
    }
}

impl Farewell {
    fn phase(socket: TcpStream, reply: Vec<u8>) -> Phase {
        Phase::Farewell(Farewell {
            socket,
            reply,
            written: 0,
            until: Instant::now() + FAREWELL_TIME,
        })
    }

    fn interest(&self) -> PollFlags {
        if self.written < self.reply.len() {
            PollFlags::OUT
        } else {
            PollFlags::IN
        }
    }

    /// Writes the answer, then shuts the writing side and drops what the client still sends
    /// until it closes; `false` once the client is to be dropped.
    fn pump(&mut self, ready: PollFlags, buffer: &mut [u8]) -> bool {
        if self.written < self.reply.len() {
            match self.socket.write(&self.reply[self.written..]) {
                Ok(n) => self.written += n,
                Err(e) if is_transient(&e) => return true,
                Err(_) => return false,
            }
            if self.written < self.reply.len() {
                return true;
            }
            return self.socket.shutdown(Shutdown::Write).is_ok();
        }
        if !ready.intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR) {
            return true;
        }
        match self.socket.read(buffer) {
            Ok(0) => false,
            Ok(_) => true,
            Err(e) => is_transient(&e),
        }
    }
}

/// How the host's refusal code reads to the client.
fn refusal(code: &str) -> Refusal {
    match code {
        NOT_GRANTED => Refusal::Denied,
        CONNECTION_REFUSED => Refusal::ConnectionRefused,
        UNREACHABLE => Refusal::Unreachable,
        _ => Refusal::Failed,
    }
}

/// What a client that asked `via` is told of a refusal.
fn refusal_reply(via: Via, refusal: Refusal) -> Vec<u8> {
    match via {
        Via::Socks => socks::Reply::from(refusal).encode().to_vec(),
        Via::Connect | Via::Forward => refusal.http_response(),
    }
}

/// A host as the open request carries it: a name, or an address (IPv6 without brackets).
fn host_text(host: &Host) -> String {
    match host {
        Host::Name(name) => name.clone(),
        Host::Ip(address) => address.to_string(),
    }
}

fn send_open<C: Write>(channel: &mut C, stream: u32, open: &OpenRequest) -> Result<(), ServeError> {
    let payload = serde_json::to_vec(open).map_err(io::Error::other)?;
    write_frame(channel, FrameKind::Open, stream, &payload)
}
