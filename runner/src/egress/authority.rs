//! The destination a guest asks for — a DNS name or an IP literal, and a port — brought into one
//! canonical form, so that grants, the operator's pins and a TLS server name are all compared
//! with the same thing: names in lower case without a trailing dot, addresses as addresses.
//!
//! A name is letters, digits and hyphens in dot-separated labels (1–63 bytes each, 253 in all),
//! ASCII only (an internationalised name arrives as its `xn--` form). A name whose last label
//! is a number (`127.1`, `2130706433`, `0x7f.1`, `0x`) is refused: a resolver would read it as an
//! IPv4 address, which would let a name stand in for a literal. A name may be a single label;
//! whether a plan may grant one is the plan's rule, not this module's.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

/// Why a host is neither a name nor an IP literal the runner accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    /// Empty, or only a dot.
    #[error("the host is empty")]
    Empty,
    /// Longer than 253 bytes.
    #[error("the name is longer than 253 bytes")]
    TooLong,
    /// A label that is empty, over 63 bytes, or has a byte outside `a-z 0-9 -`, or a leading
    /// or trailing hyphen.
    #[error("the name has an invalid label")]
    BadLabel,
    /// The last label is a number: a resolver would read the name as an IPv4 address.
    #[error("the name ends in a number, which a resolver reads as an IPv4 address")]
    Numeric,
    /// Brackets around something other than an IPv6 address.
    #[error("brackets around something other than an IPv6 address")]
    BadBrackets,
    /// Port 0.
    #[error("port 0")]
    ZeroPort,
}

/// A DNS name in canonical form: lower case, no trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DnsName(String);

impl DnsName {
    /// `text` as a name: case folded, one trailing dot dropped, every label checked.
    pub fn parse(text: &str) -> Result<Self, AuthorityError> {
        let text = text.strip_suffix('.').unwrap_or(text);
        if text.is_empty() {
            return Err(AuthorityError::Empty);
        }
        if text.len() > 253 {
            return Err(AuthorityError::TooLong);
        }
        let name = text.to_ascii_lowercase();
        let label_ok = |label: &str| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        if !name.split('.').all(label_ok) {
            return Err(AuthorityError::BadLabel);
        }
        let last = name.rsplit('.').next().unwrap_or_default();
        let hex = last
            .strip_prefix("0x")
            .is_some_and(|digits| digits.bytes().all(|b| b.is_ascii_hexdigit()));
        if hex || last.bytes().all(|b| b.is_ascii_digit()) {
            return Err(AuthorityError::Numeric);
        }
        Ok(Self(name))
    }

    /// The name, as a resolver is given it.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this name lies strictly below `suffix`, at any depth: `a.b.example.com` is below
    /// `example.com`, `example.com` itself is not.
    pub fn is_below(&self, suffix: &DnsName) -> bool {
        self.0
            .strip_suffix(suffix.as_str())
            .is_some_and(|head| head.len() > 1 && head.ends_with('.'))
    }
}

impl fmt::Display for DnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A host a guest asks for: a name, or an address written literally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A DNS name, resolved by the host (or pinned by the operator).
    Name(DnsName),
    /// An IP literal: dialled as it is, never resolved.
    Ip(IpAddr),
}

impl Host {
    /// `text` as an IP literal (IPv4 dotted quad, IPv6 bare or in brackets), else as a name.
    pub fn parse(text: &str) -> Result<Self, AuthorityError> {
        if let Some(inner) = text.strip_prefix('[') {
            let inner = inner.strip_suffix(']').ok_or(AuthorityError::BadBrackets)?;
            let ip: Ipv6Addr = inner.parse().map_err(|_| AuthorityError::BadBrackets)?;
            return Ok(Host::Ip(IpAddr::V6(ip)));
        }
        match text.parse::<IpAddr>() {
            Ok(ip) => Ok(Host::Ip(ip)),
            Err(_) => DnsName::parse(text).map(Host::Name),
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(name) => name.fmt(f),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(IpAddr::V4(ip)) => ip.fmt(f),
        }
    }
}

/// A host and a port a guest asks to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    /// The name or address.
    pub host: Host,
    /// The TCP port, never 0.
    pub port: u16,
}

impl Authority {
    /// The authority of a request for `host` (a name or an IP literal) and `port`.
    pub fn parse(host: &str, port: u16) -> Result<Self, AuthorityError> {
        if port == 0 {
            return Err(AuthorityError::ZeroPort);
        }
        Ok(Self {
            host: Host::parse(host)?,
            port,
        })
    }
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> DnsName {
        DnsName::parse(text).unwrap()
    }

    #[test]
    fn names_are_case_folded_and_lose_one_trailing_dot() {
        for (text, want) in [
            ("api.example.com", "api.example.com"),
            ("API.Example.COM", "api.example.com"),
            ("api.example.com.", "api.example.com"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("a-b.c1.example", "a-b.c1.example"),
            ("db", "db"),
            ("1password.com", "1password.com"),
            ("example.0xg", "example.0xg"),
            ("example.123a", "example.123a"),
        ] {
            assert_eq!(name(text).as_str(), want, "{text}");
        }
    }

    #[test]
    fn hosts_that_are_not_names_are_refused_with_the_reason() {
        let long_label = format!("{}.example.com", "a".repeat(64));
        let long_name = format!("{}.com", vec!["a".repeat(63); 4].join("."));
        for (text, want) in [
            ("", AuthorityError::Empty),
            (".", AuthorityError::Empty),
            ("api.example.com..", AuthorityError::BadLabel),
            (".example.com", AuthorityError::BadLabel),
            ("a..example.com", AuthorityError::BadLabel),
            ("-a.example.com", AuthorityError::BadLabel),
            ("a-.example.com", AuthorityError::BadLabel),
            ("a_b.example.com", AuthorityError::BadLabel),
            ("*.example.com", AuthorityError::BadLabel),
            ("api.example.com:443", AuthorityError::BadLabel),
            ("api example.com", AuthorityError::BadLabel),
            ("api.example.com\0.evil", AuthorityError::BadLabel),
            ("bücher.example", AuthorityError::BadLabel),
            ("user@api.example.com", AuthorityError::BadLabel),
            (&long_label, AuthorityError::BadLabel),
            (&long_name, AuthorityError::TooLong),
            ("127.1", AuthorityError::Numeric),
            ("2130706433", AuthorityError::Numeric),
            ("0x7f.1", AuthorityError::Numeric),
            ("0x7f000001", AuthorityError::Numeric),
            ("example.0x1f", AuthorityError::Numeric),
            ("example.0x", AuthorityError::Numeric),
            ("1.2.3.4.5", AuthorityError::Numeric),
            ("010.0.0.1.", AuthorityError::Numeric),
        ] {
            assert_eq!(DnsName::parse(text), Err(want), "{text:?}");
        }
    }

    #[test]
    fn a_suffix_covers_names_strictly_below_it_at_any_depth() {
        let suffix = name("example.com");
        for below in ["a.example.com", "a.b.example.com", "x-1.y.z.example.com"] {
            assert!(name(below).is_below(&suffix), "{below}");
        }
        for not_below in [
            "example.com",
            "badexample.com",
            "a.badexample.com",
            "example.com.evil.net",
            "com",
            "a.example.org",
        ] {
            assert!(!name(not_below).is_below(&suffix), "{not_below}");
        }
    }

    #[test]
    fn hosts_are_ip_literals_bare_or_bracketed_or_else_names() {
        for (text, want) in [
            ("192.0.2.1", "192.0.2.1"),
            ("::1", "[::1]"),
            ("[::1]", "[::1]"),
            ("[2001:DB8::1]", "[2001:db8::1]"),
            ("[::ffff:127.0.0.1]", "[::ffff:127.0.0.1]"),
            ("Api.Example.com.", "api.example.com"),
        ] {
            assert_eq!(Host::parse(text).unwrap().to_string(), want, "{text}");
        }
        for bad in [
            "[192.0.2.1]",
            "[::1",
            "[::1]:443",
            "[fe80::1%eth0]",
            "[]",
            "[api.example.com]",
        ] {
            assert_eq!(Host::parse(bad), Err(AuthorityError::BadBrackets), "{bad}");
        }
        // Leading zeros, octal and short forms are not IPv4 literals, and as names they end in
        // a number.
        for bad in ["192.0.2.01", "0177.0.0.1", "127.0.1", "1.2.3.256"] {
            assert_eq!(Host::parse(bad), Err(AuthorityError::Numeric), "{bad}");
        }
        assert!(Host::parse("fe80::1%eth0").is_err());
    }

    #[test]
    fn an_authority_needs_a_port() {
        assert_eq!(
            Authority::parse("api.example.com", 0),
            Err(AuthorityError::ZeroPort)
        );
        assert_eq!(
            Authority::parse("[2001:db8::1]", 8443).unwrap().to_string(),
            "[2001:db8::1]:8443"
        );
        assert_eq!(
            Authority::parse("API.example.com", 443)
                .unwrap()
                .to_string(),
            "api.example.com:443"
        );
    }
}
