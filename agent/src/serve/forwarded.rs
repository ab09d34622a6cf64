//! Forwarded ports: connections the host makes to a TCP port inside the guest (`connect`),
//! each a [`Tunnel`] on its request's stream.
//!
//! The agent connects to `127.0.0.1:port` in the guest — on loopback a connection is made or
//! refused at once, so a short blocking connect costs the loop nothing — and carries the bytes
//! both ways. The exchange's one answer ends it: `done` once both directions have ended or
//! after the host's close frame, AGENT115 when the connection could not be made or failed,
//! AGENT111 when the host broke the stream's window.

use std::collections::HashMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::BorrowedFd;
use std::time::Duration;

use rustix::event::PollFlags;

use mvm_protocol::{codes, ErrorReply, Response};

use super::tunnel::{Pumped, Tunnel};
use super::{send, send_error, ServeError, SocketKey};

/// Forwarded connections open at once; one more is refused as busy (`AGENT104`).
pub const MAX_FORWARDED: usize = 128;
/// How long a connect may take (on loopback it never takes long).
const CONNECT_TIME: Duration = Duration::from_secs(1);

/// The forwarded connections open.
#[derive(Debug, Default)]
pub struct ForwardedPorts {
    tunnels: Vec<Tunnel>,
}

impl ForwardedPorts {
    /// Whether a forwarded connection is carried on `stream`.
    pub fn holds(&self, stream: u32) -> bool {
        self.tunnels.iter().any(|t| t.stream() == stream)
    }

    /// Connects to `port` on the guest's loopback for the request on `stream`.
    pub fn connect(&mut self, stream: u32, port: u16) -> Result<(), ErrorReply> {
        if self.tunnels.len() >= MAX_FORWARDED {
            return Err(ErrorReply {
                code: codes::BUSY.into(),
                message: format!("{MAX_FORWARDED} forwarded connections are open already"),
            });
        }
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let failed = |e: std::io::Error| ErrorReply {
            code: codes::CONNECT_FAILED.into(),
            message: format!("connecting to {address} in the guest: {e}"),
        };
        let socket = TcpStream::connect_timeout(&address, CONNECT_TIME).map_err(failed)?;
        socket.set_nonblocking(true).map_err(failed)?;
        self.tunnels
            .push(Tunnel::new(stream, socket, &[], Vec::new()));
        Ok(())
    }

    /// The sockets to poll, with what for.
    pub fn interests(&self) -> impl Iterator<Item = (SocketKey, BorrowedFd<'_>, PollFlags)> {
        self.tunnels
            .iter()
            .map(|t| (SocketKey::Forwarded(t.stream()), t.fd(), t.interest()))
            .filter(|(_, _, flags)| !flags.is_empty())
    }

    /// Room the host handed back on `stream`.
    pub fn grant(&mut self, stream: u32, bytes: u64) {
        if let Some(tunnel) = self.tunnels.iter_mut().find(|t| t.stream() == stream) {
            tunnel.grant(bytes);
        }
    }

    /// A data frame from the host on `stream`; past the window, the exchange ends with
    /// AGENT111.
    pub fn receive<C: Write>(
        &mut self,
        channel: &mut C,
        stream: u32,
        bytes: &[u8],
    ) -> Result<(), ServeError> {
        let Some(at) = self.tunnels.iter().position(|t| t.stream() == stream) else {
            return Ok(());
        };
        if let Err(violation) = self.tunnels[at].receive(bytes) {
            self.tunnels.swap_remove(at);
            send_error(channel, stream, codes::FLOW, violation.to_string())?;
        }
        Ok(())
    }

    /// The host closed `stream`: the connection is dropped at once, and the exchange answered.
    pub fn close<C: Write>(&mut self, channel: &mut C, stream: u32) -> Result<(), ServeError> {
        self.tunnels.retain(|t| t.stream() != stream);
        send(channel, stream, &Response::Done)
    }

    /// Moves every connection's bytes; answers the ones that ended or failed.
    pub fn progress<C: Write>(
        &mut self,
        channel: &mut C,
        ready: &HashMap<SocketKey, PollFlags>,
        buffer: &mut [u8],
    ) -> Result<(), ServeError> {
        let mut at = 0;
        while at < self.tunnels.len() {
            let stream = self.tunnels[at].stream();
            let flags = ready
                .get(&SocketKey::Forwarded(stream))
                .copied()
                .unwrap_or_else(PollFlags::empty);
            match self.tunnels[at].pump(channel, flags, buffer)? {
                Pumped::Open => at += 1,
                Pumped::Ended => {
                    self.tunnels.swap_remove(at);
                    send(channel, stream, &Response::Done)?;
                }
                Pumped::Failed(e) => {
                    self.tunnels.swap_remove(at);
                    let message = format!("the forwarded connection failed: {e}");
                    send_error(channel, stream, codes::CONNECT_FAILED, message)?;
                }
            }
        }
        Ok(())
    }

    /// Drops every connection (the guest powers off).
    pub fn clear(&mut self) {
        self.tunnels.clear();
    }
}
