//! Where a proxied connection goes: a host, as a DNS name or an IP address, and a port.
//!
//! The guest resolves no names: a name travels to the host as the client wrote it, and the
//! host's policy judges it (and what it resolves to). So a name is checked here only for
//! shape, strictly enough that the host never has to guess what it means: letters, digits,
//! `-` and `_` in dot-separated labels, lowercased, without the trailing dot of a fully
//! qualified name. A name whose last label is numeric (`127.1`, `2130706433`, `0x7f.1`) is
//! refused: C resolvers read such names as IPv4 addresses, so the name a grant was checked
//! against and the address connected to could differ. An address is kept as an address,
//! whichever way it came (`[::1]`, `127.0.0.1` written as a name).

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

/// The longest host name accepted (DNS's limit, without the trailing dot).
pub const MAX_NAME: usize = 253;
/// The longest label of a host name (DNS's limit).
const MAX_LABEL: usize = 63;
/// The most digits a port can have.
const MAX_PORT_DIGITS: usize = 5;

/// A host as a client named it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name, lowercased, for the host to resolve.
    Name(String),
    /// An IP address literal.
    Ip(IpAddr),
}

/// A host and a port: what a client asked to reach, for the host to judge.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// The host, as a name or an address.
    pub host: Host,
    /// The port, never 0.
    pub port: u16,
}

/// Why a host or a port was refused. The messages never repeat the client's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// No host at all (`http://:80/`, a SOCKS5 name of length 0).
    #[error("the host is empty")]
    EmptyHost,
    /// A name over 253 characters, or with a label over 63.
    #[error("the host name is too long")]
    NameTooLong,
    /// A character outside letters, digits, `-`, `_` and `.`, or an empty label.
    #[error("the host is neither a DNS name nor an IP address")]
    NameSyntax,
    /// A name whose last label is a number, which resolvers would read as an IPv4 address.
    #[error("the host name ends in a numeric label (an IPv4 address in disguise)")]
    NumericName,
    /// A bracketed literal that is not an IPv6 address (or carries a zone id).
    #[error("malformed IPv6 address literal")]
    Ipv6,
    /// User information (`user:password@`) in front of the host.
    #[error("the target carries user information")]
    Userinfo,
    /// No port where one is required (`CONNECT`).
    #[error("the port is missing")]
    MissingPort,
    /// A port that is not a number from 1 to 65535.
    #[error("the port is not a number from 1 to 65535")]
    Port,
}

impl Host {
    /// Reads a host written without brackets: an IPv4 address, or a DNS name.
    pub fn parse_name(text: &[u8]) -> Result<Host, TargetError> {
        if text.is_empty() {
            return Err(TargetError::EmptyHost);
        }
        let text = std::str::from_utf8(text).map_err(|_| TargetError::NameSyntax)?;
        if let Ok(address) = text.parse::<std::net::Ipv4Addr>() {
            return Ok(Host::Ip(IpAddr::V4(address)));
        }
        let name = text.strip_suffix('.').unwrap_or(text);
        if name.len() > MAX_NAME {
            return Err(TargetError::NameTooLong);
        }
        let mut last = "";
        for label in name.split('.') {
            if label.is_empty()
                || !label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(TargetError::NameSyntax);
            }
            if label.len() > MAX_LABEL {
                return Err(TargetError::NameTooLong);
            }
            last = label;
        }
        let hex = last
            .strip_prefix("0x")
            .or_else(|| last.strip_prefix("0X"))
            .is_some_and(|digits| digits.bytes().all(|b| b.is_ascii_hexdigit()));
        if hex || last.bytes().all(|b| b.is_ascii_digit()) {
            return Err(TargetError::NumericName);
        }
        Ok(Host::Name(name.to_ascii_lowercase()))
    }

    /// Reads the host of a URI authority: `[IPv6]`, an IPv4 address or a DNS name.
    fn parse_uri_host(text: &[u8]) -> Result<Host, TargetError> {
        match text.strip_prefix(b"[") {
            Some(bracketed) => {
                let inner = bracketed.strip_suffix(b"]").ok_or(TargetError::Ipv6)?;
                std::str::from_utf8(inner)
                    .ok()
                    .and_then(|inner| inner.parse::<Ipv6Addr>().ok())
                    .map(|address| Host::Ip(IpAddr::V6(address)))
                    .ok_or(TargetError::Ipv6)
            }
            None => Host::parse_name(text),
        }
    }
}

impl Target {
    /// Reads an authority, `host[:port]` (RFC 3986 §3.2, without user information): the
    /// request target of `CONNECT`, the authority of an `http://` URI, a `Host` header.
    /// `default_port` is used when no port is written; `None` makes the port required.
    pub fn parse_authority(text: &[u8], default_port: Option<u16>) -> Result<Target, TargetError> {
        if text.contains(&b'@') {
            return Err(TargetError::Userinfo);
        }
        // A bracketed IPv6 literal holds colons of its own: the port follows its `]`.
        let host_end = match text.first() {
            Some(b'[') => text
                .iter()
                .position(|&b| b == b']')
                .map(|close| close + 1)
                .ok_or(TargetError::Ipv6)?,
            _ => text.iter().position(|&b| b == b':').unwrap_or(text.len()),
        };
        let (host, port) = text.split_at(host_end);
        let host = Host::parse_uri_host(host)?;
        let port = match port.strip_prefix(b":") {
            Some(digits) => parse_port(digits)?,
            None if port.is_empty() => default_port.ok_or(TargetError::MissingPort)?,
            None => return Err(TargetError::Ipv6),
        };
        Ok(Target { host, port })
    }

    /// The authority as a `Host` header carries it: the port left out when it is
    /// `default_port`.
    pub fn host_header(&self, default_port: u16) -> String {
        if self.port == default_port {
            match &self.host {
                Host::Ip(IpAddr::V6(address)) => format!("[{address}]"),
                Host::Ip(address) => address.to_string(),
                Host::Name(name) => name.clone(),
            }
        } else {
            self.to_string()
        }
    }
}

/// `host:port`, an IPv6 address in brackets.
impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Name(name) => write!(f, "{name}:{}", self.port),
            Host::Ip(IpAddr::V4(address)) => write!(f, "{address}:{}", self.port),
            Host::Ip(IpAddr::V6(address)) => write!(f, "[{address}]:{}", self.port),
        }
    }
}

/// Reads a port: one to five digits, 1 to 65535.
fn parse_port(digits: &[u8]) -> Result<u16, TargetError> {
    if digits.is_empty() || digits.len() > MAX_PORT_DIGITS || !digits.iter().all(u8::is_ascii_digit)
    {
        return Err(TargetError::Port);
    }
    let port = digits
        .iter()
        .fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'));
    match u16::try_from(port) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(TargetError::Port),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn name(text: &str) -> Host {
        Host::Name(text.into())
    }

    #[test]
    fn names_are_lowercased_and_lose_the_trailing_dot() {
        assert_eq!(
            Host::parse_name(b"API.Example.COM."),
            Ok(name("api.example.com"))
        );
        assert_eq!(
            Host::parse_name(b"my_host-1.internal"),
            Ok(name("my_host-1.internal"))
        );
        assert_eq!(Host::parse_name(b"localhost"), Ok(name("localhost")));
    }

    #[test]
    fn an_ipv4_address_written_as_a_name_is_an_address() {
        assert_eq!(
            Host::parse_name(b"127.0.0.1"),
            Ok(Host::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)))
        );
    }

    #[test]
    fn names_an_ipv4_parser_would_read_as_addresses_are_refused() {
        for text in [
            &b"2130706433"[..],
            b"127.1",
            b"0x7f.1",
            b"0X7F000001",
            b"1.2.3.04",
            b"example.123",
        ] {
            assert_eq!(
                Host::parse_name(text),
                Err(TargetError::NumericName),
                "{text:?}"
            );
        }
        // A numeric label elsewhere is an ordinary name.
        assert_eq!(Host::parse_name(b"1e100.net"), Ok(name("1e100.net")));
        assert_eq!(Host::parse_name(b"123.example"), Ok(name("123.example")));
    }

    #[test]
    fn malformed_names_are_refused() {
        assert_eq!(Host::parse_name(b""), Err(TargetError::EmptyHost));
        for text in [
            &b"a..b"[..],
            b".a",
            b".",
            b"a b",
            b"a\0b",
            b"exa\xc3\xa9mple.com",
            b"a/b",
            b"a%2eb",
            b"::1",
        ] {
            assert_eq!(
                Host::parse_name(text),
                Err(TargetError::NameSyntax),
                "{text:?}"
            );
        }
        let label = "a".repeat(64);
        assert_eq!(
            Host::parse_name(label.as_bytes()),
            Err(TargetError::NameTooLong)
        );
        assert!(Host::parse_name("a".repeat(63).as_bytes()).is_ok());
        let long = format!("{}.com", ["a"; 125].join("."));
        assert_eq!(long.len(), 253);
        assert!(Host::parse_name(long.as_bytes()).is_ok());
        let longer = format!("a{long}");
        assert_eq!(
            Host::parse_name(longer.as_bytes()),
            Err(TargetError::NameTooLong)
        );
    }

    #[test]
    fn authorities_with_and_without_ports() {
        let parse = |text: &[u8]| Target::parse_authority(text, Some(80));
        assert_eq!(
            parse(b"example.com"),
            Ok(Target {
                host: name("example.com"),
                port: 80
            })
        );
        assert_eq!(
            parse(b"example.com:8080"),
            Ok(Target {
                host: name("example.com"),
                port: 8080
            })
        );
        assert_eq!(
            parse(b"[::1]:443"),
            Ok(Target {
                host: Host::Ip("::1".parse().unwrap()),
                port: 443
            })
        );
        assert_eq!(
            parse(b"[2001:db8::1]"),
            Ok(Target {
                host: Host::Ip("2001:db8::1".parse().unwrap()),
                port: 80
            })
        );
        assert_eq!(
            Target::parse_authority(b"example.com", None),
            Err(TargetError::MissingPort)
        );
    }

    #[test]
    fn malformed_authorities_are_refused() {
        let parse = |text: &[u8]| Target::parse_authority(text, None);
        assert_eq!(parse(b":443"), Err(TargetError::EmptyHost));
        assert_eq!(
            parse(b"user:pw@example.com:443"),
            Err(TargetError::Userinfo)
        );
        assert_eq!(parse(b"example.com:"), Err(TargetError::Port));
        assert_eq!(parse(b"example.com:0"), Err(TargetError::Port));
        assert_eq!(parse(b"example.com:65536"), Err(TargetError::Port));
        assert_eq!(parse(b"example.com:000443"), Err(TargetError::Port));
        assert_eq!(parse(b"example.com:+443"), Err(TargetError::Port));
        assert_eq!(parse(b"example.com:443:1"), Err(TargetError::Port));
        assert_eq!(parse(b"example.com:https"), Err(TargetError::Port));
        assert_eq!(parse(b"[::1"), Err(TargetError::Ipv6));
        assert_eq!(parse(b"[::1]443"), Err(TargetError::Ipv6));
        assert_eq!(parse(b"[fe80::1%25eth0]:443"), Err(TargetError::Ipv6));
        assert_eq!(parse(b"[example.com]:443"), Err(TargetError::Ipv6));
        assert_eq!(parse(b"::1:443"), Err(TargetError::EmptyHost));
        assert_eq!(
            Target::parse_authority(b"example.com:65535", None).map(|t| t.port),
            Ok(65535)
        );
    }

    #[test]
    fn targets_print_as_authorities() {
        let target = |text: &[u8]| Target::parse_authority(text, None).unwrap();
        assert_eq!(target(b"Example.com:443").to_string(), "example.com:443");
        assert_eq!(target(b"[::1]:443").to_string(), "[::1]:443");
        assert_eq!(target(b"10.0.0.1:80").host_header(80), "10.0.0.1");
        assert_eq!(target(b"[::1]:80").host_header(80), "[::1]");
        assert_eq!(target(b"[::1]:8080").host_header(80), "[::1]:8080");
        assert_eq!(
            target(b"example.com:8080").host_header(80),
            "example.com:8080"
        );
    }
}
