//! The server side of a SOCKS5 handshake (RFC 1928), read incrementally.
//!
//! A client greets with the authentication methods it offers; only "no authentication"
//! (`0x00`) is accepted — the proxy listens on the guest's loopback for the workload alone,
//! and the host judges every target anyway — and a client that does not offer it is answered
//! `05 FF`. Its request must be `CONNECT` (`0x01`; `BIND` and `UDP ASSOCIATE` are answered
//! "command not supported") to an IPv4 address, an IPv6 address or a domain name — remote
//! resolution: the name goes to the host as it came, checked for shape only (see
//! [`super::target`]). Once the host has answered, the client gets [`success`] or the
//! [`Reply`] for the [`Refusal`].
//!
//! Each reader takes the bytes received since the previous step and reports how many its
//! message took, so a client that sends its request right behind its greeting loses nothing.
//! Faults are found as soon as the byte that shows them arrives, in the order the bytes come.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::target::{Host, Target, TargetError};
use super::Refusal;

/// The protocol version, first byte of every SOCKS5 message.
const VERSION: u8 = 5;
/// The one authentication method accepted: none.
const NO_AUTHENTICATION: u8 = 0x00;
/// "No acceptable methods", in the method selection reply.
const NO_ACCEPTABLE_METHOD: u8 = 0xFF;
/// The one command served.
const CONNECT: u8 = 0x01;
const ADDRESS_IPV4: u8 = 0x01;
const ADDRESS_NAME: u8 = 0x03;
const ADDRESS_IPV6: u8 = 0x04;

/// How a request names its target.
enum AddressType {
    Ipv4,
    Ipv6,
    /// A domain name of this many bytes.
    Name(usize),
}

/// What a client whose greeting was accepted is answered: version 5, no authentication.
pub const METHOD_SELECTED: [u8; 2] = [VERSION, NO_AUTHENTICATION];

/// The reply codes (RFC 1928 §6) the proxy sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    /// The connection is open.
    Succeeded = 0x00,
    /// General SOCKS server failure; also a malformed request.
    GeneralFailure = 0x01,
    /// Connection not allowed by ruleset: the host's egress policy denied it.
    NotAllowed = 0x02,
    /// Host unreachable.
    HostUnreachable = 0x04,
    /// Connection refused.
    ConnectionRefused = 0x05,
    /// Command not supported (anything but `CONNECT`).
    CommandNotSupported = 0x07,
    /// Address type not supported.
    AddressTypeNotSupported = 0x08,
}

impl Reply {
    /// The reply message. The bound address is always `0.0.0.0:0`: the connection is made by
    /// the host, whose addresses are none of the guest's business.
    pub fn encode(self) -> [u8; 10] {
        [VERSION, self as u8, 0, ADDRESS_IPV4, 0, 0, 0, 0, 0, 0]
    }
}

impl From<Refusal> for Reply {
    fn from(refusal: Refusal) -> Reply {
        match refusal {
            Refusal::Denied => Reply::NotAllowed,
            Refusal::Unreachable => Reply::HostUnreachable,
            Refusal::ConnectionRefused => Reply::ConnectionRefused,
            Refusal::Failed => Reply::GeneralFailure,
        }
    }
}

/// The reply once the host has opened the connection.
pub fn success() -> [u8; 10] {
    Reply::Succeeded.encode()
}

/// A SOCKS5 handshake the proxy refuses; the client gets [`SocksError::reply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SocksError {
    /// The greeting does not offer "no authentication" (or offers no method at all).
    #[error("SOCKS5: no acceptable authentication method (only none is served)")]
    NoAcceptableMethod,
    /// A command other than `CONNECT`.
    #[error("SOCKS5: only CONNECT is served")]
    Command,
    /// An address type other than IPv4, domain name and IPv6.
    #[error("SOCKS5: unknown address type")]
    AddressType,
    /// A message whose version is not 5.
    #[error("SOCKS5: wrong version")]
    Version,
    /// The reserved byte of a request is not 0.
    #[error("SOCKS5: reserved byte set")]
    Reserved,
    /// The target's name or port.
    #[error("SOCKS5: {0}")]
    Target(#[from] TargetError),
}

impl SocksError {
    /// The stable code, for the audit entry.
    pub fn code(&self) -> &'static str {
        match self {
            SocksError::NoAcceptableMethod => "PROXY010",
            SocksError::Command => "PROXY011",
            SocksError::AddressType => "PROXY012",
            SocksError::Version | SocksError::Reserved | SocksError::Target(_) => "PROXY013",
        }
    }

    /// What the client is sent before the connection closes: `05 FF` for a greeting, the
    /// failure reply for a request.
    pub fn reply(&self) -> Vec<u8> {
        let reply = match self {
            SocksError::NoAcceptableMethod => {
                return vec![VERSION, NO_ACCEPTABLE_METHOD];
            }
            SocksError::Command => Reply::CommandNotSupported,
            SocksError::AddressType => Reply::AddressTypeNotSupported,
            SocksError::Version | SocksError::Reserved | SocksError::Target(_) => {
                Reply::GeneralFailure
            }
        };
        reply.encode().to_vec()
    }
}

/// Reads the greeting (`VER NMETHODS METHODS…`) from the start of `received`: `None` until it
/// is complete, then how many bytes it took; answer [`METHOD_SELECTED`].
pub fn read_greeting(received: &[u8]) -> Result<Option<usize>, SocksError> {
    match received {
        [] => Ok(None),
        [version, ..] if *version != VERSION => Err(SocksError::Version),
        [_] => Ok(None),
        [_, 0, ..] => Err(SocksError::NoAcceptableMethod),
        [_, count, methods @ ..] => {
            let Some(methods) = methods.get(..usize::from(*count)) else {
                return Ok(None);
            };
            if methods.contains(&NO_AUTHENTICATION) {
                Ok(Some(2 + methods.len()))
            } else {
                Err(SocksError::NoAcceptableMethod)
            }
        }
    }
}

/// Reads the request (`VER CMD RSV ATYP DST.ADDR DST.PORT`) from the start of `received` —
/// the bytes after the greeting: `None` until it is complete, then the target and how many
/// bytes it took. Bytes after it belong to the connection.
pub fn read_request(received: &[u8]) -> Result<Option<(Target, usize)>, SocksError> {
    let header = |at: usize| received.get(at).copied();
    if header(0).is_some_and(|b| b != VERSION) {
        return Err(SocksError::Version);
    }
    if header(1).is_some_and(|b| b != CONNECT) {
        return Err(SocksError::Command);
    }
    if header(2).is_some_and(|b| b != 0) {
        return Err(SocksError::Reserved);
    }
    let address_type = match header(3) {
        None => return Ok(None),
        Some(ADDRESS_IPV4) => AddressType::Ipv4,
        Some(ADDRESS_IPV6) => AddressType::Ipv6,
        Some(ADDRESS_NAME) => match header(4) {
            None => return Ok(None),
            Some(0) => return Err(TargetError::EmptyHost.into()),
            Some(len) => AddressType::Name(usize::from(len)),
        },
        Some(_) => return Err(SocksError::AddressType),
    };
    let (address_start, address_len) = match address_type {
        AddressType::Ipv4 => (4, 4),
        AddressType::Ipv6 => (4, 16),
        AddressType::Name(len) => (5, len),
    };
    let port_start = address_start + address_len;
    let (Some(address), Some(&[high, low])) = (
        received.get(address_start..port_start),
        received.get(port_start..port_start + 2),
    ) else {
        return Ok(None);
    };
    let mut octets = [0; 16];
    let host = match address_type {
        AddressType::Name(_) => Host::parse_name(address)?,
        AddressType::Ipv4 => {
            octets[..4].copy_from_slice(address);
            Host::Ip(IpAddr::V4(Ipv4Addr::new(
                octets[0], octets[1], octets[2], octets[3],
            )))
        }
        AddressType::Ipv6 => {
            octets.copy_from_slice(address);
            Host::Ip(IpAddr::V6(Ipv6Addr::from(octets)))
        }
    };
    let port = u16::from_be_bytes([high, low]);
    if port == 0 {
        return Err(TargetError::Port.into());
    }
    Ok(Some((Target { host, port }, port_start + 2)))
}

#[cfg(test)]
mod tests;
