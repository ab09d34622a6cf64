//! One TCP connection carried over the agent channel, both ways, in data frames on one stream:
//! a proxied egress connection (on a stream of the agent's) and a forwarded port's (on the
//! host's request stream) alike.
//!
//! Socket to host: the socket is read only while the stream's send window has room, so a host
//! that does not take the bytes holds the socket's peer up (back-pressure), never the agent's
//! memory; its end of file becomes an empty data frame. Host to socket: the host's bytes wait
//! here — at most a window's worth, which the host may not exceed — until the socket takes
//! them, and only then is their room handed back; the host's empty data frame shuts the
//! socket's writing side once everything before it is written. The tunnel has ended when both
//! directions have. Nothing blocks: the socket is nonblocking and the serving loop polls it
//! for [`Tunnel::interest`].

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};

use rustix::event::PollFlags;

use mvm_protocol::flow::{self, ReceiveWindow, SendWindow};
use mvm_protocol::FrameKind;

use super::{send_credit, write_frame, ServeError, CHUNK};

/// A connection and its stream.
#[derive(Debug)]
pub struct Tunnel {
    stream: u32,
    socket: TcpStream,
    /// Bytes for the host that go before anything read from the socket (a forwarded request's
    /// head, what a client sent behind its request).
    to_host: VecDeque<u8>,
    /// Room left to send to the host.
    send: SendWindow,
    /// Bytes for the socket not written yet.
    to_socket: VecDeque<u8>,
    /// How many bytes at the front of `to_socket` are the agent's own (a proxy's answer to its
    /// client), which the host never sent and gets no credit for.
    own: usize,
    /// What the host may still send.
    receive: ReceiveWindow,
    /// Room to hand back to the host with the next credit frame.
    owed: u64,
    /// The socket's end of file was sent on (the empty data frame).
    socket_ended: bool,
    /// The host's empty data frame arrived.
    host_ended: bool,
    /// The socket's writing side was shut.
    write_shut: bool,
}

/// Where a tunnel stands after [`Tunnel::pump`].
#[derive(Debug)]
pub enum Pumped {
    /// Bytes may still move.
    Open,
    /// Both directions have ended.
    Ended,
    /// The socket failed: the connection is over, the host must be told.
    Failed(io::Error),
}

/// The host broke the stream's flow control: the connection must be torn down.
#[derive(Debug, thiserror::Error)]
pub enum Violation {
    /// Data past the window.
    #[error("data past the stream's {}-byte window", flow::WINDOW)]
    Overrun,
    /// Data after the host's own empty data frame.
    #[error("data after the host ended its direction")]
    AfterEnd,
}

impl Tunnel {
    /// A tunnel for `socket` (nonblocking) on `stream`, which writes `greeting` to the socket
    /// and sends `to_host` to the host before anything else.
    pub fn new(stream: u32, socket: TcpStream, greeting: &[u8], to_host: Vec<u8>) -> Self {
        Self {
            stream,
            socket,
            to_host: to_host.into(),
            send: SendWindow::default(),
            to_socket: greeting.iter().copied().collect(),
            own: greeting.len(),
            receive: ReceiveWindow::default(),
            owed: 0,
            socket_ended: false,
            host_ended: false,
            write_shut: false,
        }
    }

    /// The stream it is carried on.
    pub fn stream(&self) -> u32 {
        self.stream
    }

    /// The socket, to poll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// What to poll the socket for: readable while its bytes can be sent on, writable while
    /// bytes wait for it. Empty when neither: the socket is then not polled at all (a peer
    /// that hung up is found at the next read or write), so a hang-up cannot spin the loop.
    pub fn interest(&self) -> PollFlags {
        let mut flags = PollFlags::empty();
        if self.to_host.is_empty() && !self.socket_ended && self.send.room() > 0 {
            flags |= PollFlags::IN;
        }
        if !self.to_socket.is_empty() {
            flags |= PollFlags::OUT;
        }
        flags
    }

    /// Room the host handed back.
    pub fn grant(&mut self, bytes: u64) {
        self.send.grant(bytes);
    }

    /// Takes a data frame from the host (an empty one ends its direction).
    pub fn receive(&mut self, bytes: &[u8]) -> Result<(), Violation> {
        if self.host_ended {
            return Err(Violation::AfterEnd);
        }
        if !self.receive.take(bytes.len()) {
            return Err(Violation::Overrun);
        }
        self.host_ended = bytes.is_empty();
        self.to_socket.extend(bytes);
        // The header's room at once, the bytes' once the socket took them.
        self.owed += flow::cost(0);
        Ok(())
    }

    /// Moves what can move: bytes for the host as its window allows (reading the socket once
    /// when `ready` says it is readable), bytes for the socket as it takes them, the room they
    /// freed back to the host, and each direction's end.
    pub fn pump<C: Write>(
        &mut self,
        channel: &mut C,
        ready: PollFlags,
        buffer: &mut [u8],
    ) -> Result<Pumped, ServeError> {
        self.send_queued(channel)?;
        let woken = PollFlags::IN | PollFlags::HUP | PollFlags::ERR;
        if ready.intersects(woken) && self.interest().contains(PollFlags::IN) {
            let limit = self.send.room().min(buffer.len());
            match self.socket.read(&mut buffer[..limit]) {
                Ok(n) => {
                    // End of file goes on as an empty frame.
                    write_frame(channel, FrameKind::Data, self.stream, &buffer[..n])?;
                    self.send.spend(n);
                    self.socket_ended = n == 0;
                }
                Err(e) if is_transient(&e) => {}
                Err(e) => return Ok(Pumped::Failed(e)),
            }
        }
        if let Err(e) = self.write_socket() {
            return Ok(Pumped::Failed(e));
        }
        if self.owed > 0 && !self.host_ended {
            send_credit(channel, self.stream, self.owed)?;
            self.receive.restore(self.owed);
            self.owed = 0;
        }
        Ok(
            if self.socket_ended && self.host_ended && self.to_socket.is_empty() {
                Pumped::Ended
            } else {
                Pumped::Open
            },
        )
    }

    /// Sends the bytes queued for the host, as far as the window allows.
    fn send_queued<C: Write>(&mut self, channel: &mut C) -> Result<(), ServeError> {
        while !self.to_host.is_empty() && self.send.room() > 0 {
            let len = self.to_host.len().min(self.send.room()).min(CHUNK);
            let chunk: Vec<u8> = self.to_host.drain(..len).collect();
            write_frame(channel, FrameKind::Data, self.stream, &chunk)?;
            self.send.spend(len);
        }
        Ok(())
    }

    /// Writes what the socket takes; shuts its writing side once the host has ended and all
    /// is written.
    fn write_socket(&mut self) -> io::Result<()> {
        while !self.to_socket.is_empty() {
            let (front, _) = self.to_socket.as_slices();
            let n = match self.socket.write(front) {
                Ok(n) => n,
                Err(e) if is_transient(&e) => break,
                Err(e) => return Err(e),
            };
            self.to_socket.drain(..n);
            let own = n.min(self.own);
            self.own -= own;
            self.owed += (n - own) as u64;
        }
        if self.host_ended && self.to_socket.is_empty() && !self.write_shut {
            self.write_shut = true;
            self.socket.shutdown(Shutdown::Write)?;
        }
        Ok(())
    }
}

/// Whether a nonblocking socket call only has to be tried again later.
pub fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}
