//! The plan's egress grants, as the host matches them against what a guest asks for.
//!
//! A grant is one of three shapes, always with its port (a plan's grant carries one; the
//! declaration's default of 443 is filled in before the plan is signed):
//!
//! - an exact name, `api.example.com` — matches that name only, in any case, with or without
//!   a trailing dot;
//! - a wildcard, `*.example.com` — matches every name strictly below `example.com`, at any depth
//!   (`a.example.com`, `a.b.example.com`), but not `example.com` itself: a grant for the apex
//!   is written separately, so a wildcard never widens to a name nobody wrote;
//! - an IP literal, `192.0.2.10`, `2001:db8::1` or `[2001:db8::1]` — matches a request that
//!   writes the same address literally (an IPv4-mapped IPv6 form is the same address), never a
//!   name that resolves to it.
//!
//! A name never matches an IP grant and an address never matches a name grant, so which
//! addresses a name may reach is decided by the address rules alone ([`super::judge`]).

use std::fmt;
use std::net::IpAddr;

use mvm_ir::workload::EgressGrant;
use mvm_ir::{Coded, ErrorClass};

use super::authority::{Authority, AuthorityError, DnsName, Host};
use crate::codes;

/// A plan's grant the host cannot read (RUN055): the plan's own validation accepts a few
/// hosts the runner refuses, such as a name ending in a number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("egress grant {host}:{port}: {reason}")]
pub struct GrantError {
    /// The grant's host, as the plan wrote it.
    pub host: String,
    /// The grant's port.
    pub port: u16,
    /// What is wrong with it.
    pub reason: AuthorityError,
}

impl Coded for GrantError {
    fn code(&self) -> &str {
        codes::RUN055
    }

    fn class(&self) -> ErrorClass {
        ErrorClass::InvalidInput
    }
}

/// What a grant names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantHost {
    /// Exactly this name.
    Name(DnsName),
    /// Every name strictly below this suffix (written `*.suffix`).
    Below(DnsName),
    /// This address, written literally.
    Ip(IpAddr),
}

/// One destination a plan grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The name, suffix or address.
    pub host: GrantHost,
    /// The TCP port.
    pub port: u16,
}

impl Grant {
    /// The grant a plan's `{host, port}` describes.
    pub fn from_plan(grant: &EgressGrant) -> Result<Self, GrantError> {
        let error = |reason| GrantError {
            host: grant.host.clone(),
            port: grant.port,
            reason,
        };
        if grant.port == 0 {
            return Err(error(AuthorityError::ZeroPort));
        }
        let host = match grant.host.strip_prefix("*.") {
            Some(suffix) => GrantHost::Below(DnsName::parse(suffix).map_err(error)?),
            None => match Host::parse(&grant.host).map_err(error)? {
                Host::Name(name) => GrantHost::Name(name),
                Host::Ip(ip) => GrantHost::Ip(ip),
            },
        };
        Ok(Self {
            host,
            port: grant.port,
        })
    }

    /// Whether this grant lets a guest ask for `authority`.
    pub fn matches(&self, authority: &Authority) -> bool {
        self.port == authority.port
            && match (&self.host, &authority.host) {
                (GrantHost::Name(granted), Host::Name(asked)) => granted == asked,
                (GrantHost::Below(suffix), Host::Name(asked)) => asked.is_below(suffix),
                (GrantHost::Ip(granted), Host::Ip(asked)) => {
                    granted.to_canonical() == asked.to_canonical()
                }
                _ => false,
            }
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            GrantHost::Name(name) => write!(f, "{name}:{}", self.port),
            GrantHost::Below(suffix) => write!(f, "*.{suffix}:{}", self.port),
            GrantHost::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            GrantHost::Ip(IpAddr::V4(ip)) => write!(f, "{ip}:{}", self.port),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(host: &str, port: u16) -> Grant {
        Grant::from_plan(&EgressGrant {
            host: host.into(),
            port,
        })
        .unwrap()
    }

    fn asks(host: &str, port: u16) -> Authority {
        Authority::parse(host, port).unwrap()
    }

    #[test]
    fn grants_are_read_in_their_three_shapes() {
        for (host, port, shown) in [
            ("api.example.com", 443, "api.example.com:443"),
            ("API.Example.com.", 443, "api.example.com:443"),
            ("*.example.com", 8443, "*.example.com:8443"),
            ("*.Example.COM.", 443, "*.example.com:443"),
            ("192.0.2.10", 80, "192.0.2.10:80"),
            ("2001:db8::1", 443, "[2001:db8::1]:443"),
            ("[2001:db8::1]", 443, "[2001:db8::1]:443"),
            ("127.0.0.1", 11434, "127.0.0.1:11434"),
        ] {
            assert_eq!(grant(host, port).to_string(), shown, "{host}");
        }
    }

    #[test]
    fn grants_the_host_cannot_read_are_refused_with_run053() {
        for (host, port, reason) in [
            ("*.*.example.com", 443, AuthorityError::BadLabel),
            ("*example.com", 443, AuthorityError::BadLabel),
            ("a.*.example.com", 443, AuthorityError::BadLabel),
            ("*.", 443, AuthorityError::Empty),
            ("*.192.0.2.1", 443, AuthorityError::Numeric),
            ("api.123", 443, AuthorityError::Numeric),
            ("[192.0.2.1]", 443, AuthorityError::BadBrackets),
            ("api.example.com", 0, AuthorityError::ZeroPort),
            ("*.example.com", 0, AuthorityError::ZeroPort),
        ] {
            let error = Grant::from_plan(&EgressGrant {
                host: host.into(),
                port,
            })
            .unwrap_err();
            assert_eq!(error.reason, reason, "{host}:{port}");
            assert_eq!(error.code(), "RUN055");
        }
    }

    #[test]
    fn an_exact_name_matches_itself_in_any_case_and_on_its_port_only() {
        let g = grant("api.example.com", 443);
        assert!(g.matches(&asks("api.example.com", 443)));
        assert!(g.matches(&asks("API.EXAMPLE.COM", 443)));
        assert!(g.matches(&asks("api.example.com.", 443)));
        assert!(!g.matches(&asks("api.example.com", 80)));
        assert!(!g.matches(&asks("a.api.example.com", 443)));
        assert!(!g.matches(&asks("example.com", 443)));
        assert!(!g.matches(&asks("api.example.co", 443)));
    }

    #[test]
    fn a_wildcard_matches_names_strictly_below_its_suffix_at_any_depth() {
        let g = grant("*.example.com", 443);
        assert!(g.matches(&asks("a.example.com", 443)));
        assert!(g.matches(&asks("a.b.example.com", 443)));
        assert!(g.matches(&asks("A.Example.Com.", 443)));
        assert!(!g.matches(&asks("example.com", 443)));
        assert!(!g.matches(&asks("badexample.com", 443)));
        assert!(!g.matches(&asks("example.com.evil.net", 443)));
        assert!(!g.matches(&asks("a.example.com", 444)));
    }

    #[test]
    fn an_ip_grant_matches_the_same_address_written_literally_never_a_name() {
        let v4 = grant("192.0.2.10", 443);
        assert!(v4.matches(&asks("192.0.2.10", 443)));
        assert!(v4.matches(&asks("[::ffff:192.0.2.10]", 443)));
        assert!(!v4.matches(&asks("192.0.2.11", 443)));
        assert!(!v4.matches(&asks("192.0.2.10", 80)));
        assert!(!v4.matches(&asks("[64:ff9b::c000:20a]", 443)));
        let v6 = grant("2001:db8::1", 443);
        assert!(v6.matches(&asks("[2001:db8:0::1]", 443)));
        assert!(v6.matches(&asks("2001:DB8::1", 443)));
        assert!(!v6.matches(&asks("[2001:db8::2]", 443)));
        // A name never matches an IP grant, nor an address a name grant.
        assert!(!grant("api.example.com", 443).matches(&asks("192.0.2.10", 443)));
        assert!(!grant("*.example.com", 443).matches(&asks("192.0.2.10", 443)));
    }
}
