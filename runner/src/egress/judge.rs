//! The decision on one connection a guest asks for, made before any packet leaves the host.
//!
//! [`EgressPolicy::judge`] goes in this order and stops at the first refusal:
//!
//! 1. the requested host is parsed: a DNS name or an IP literal (`bad_authority`);
//! 2. a grant of the plan must match it ([`super::grant`]; `not_granted`);
//! 3. its addresses: an IP literal is its own; a name is the operator's pin if there is one,
//!    else looked up **once** through [`Resolve`] (`resolve_failed`, `no_address`) — and
//!    nothing is ever looked up again: the addresses judged are the addresses dialled;
//! 4. **every** address is judged ([`super::address`]). A public one passes. A loopback or
//!    private one passes only when the operator lists that `IP:PORT` in `allow_private` and
//!    the address came from the request itself (written literally) or from the operator's own
//!    pin of the name — never from a lookup, so a name that resolves (or is rebound) to
//!    internal space cannot reach it. The other kinds never pass. One address that
//!    does not pass denies the whole connection, with the reason of the worst such address.
//!
//! An allowed [`Decision`] carries the socket addresses to dial and nothing else. For a
//! `CONNECT` to a TLS port, [`judge_client_hello`] then compares the ClientHello's server name
//! with the authority before the first byte is forwarded. Every decision becomes one audit
//! entry, [`Decision::audit_fields`]: which VM, host, port and addresses, and the reason —
//! never a path, header or byte of the request.

use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use mvm_ir::workload::EgressGrant;
use serde_json::{json, Value};

use super::address::{classify, AddressClass, Reach};
use super::authority::{Authority, DnsName, Host};
use super::config::EgressConfig;
use super::grant::{Grant, GrantError};
use super::sni::{sni_matches, Peek};

/// The most bytes of a refused, unparsable host an audit entry keeps.
const MAX_AUDITED_HOST_BYTES: usize = 255;

/// Looks up a name's addresses. The host's resolver in production ([`SystemResolver`]); a
/// test gives its own answers.
pub trait Resolve {
    /// Every address `name` has now.
    fn resolve(&self, name: &DnsName) -> io::Result<Vec<IpAddr>>;
}

/// The host's own resolver (`getaddrinfo`: `/etc/hosts`, then DNS, as the host is
/// configured).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, name: &DnsName) -> io::Result<Vec<IpAddr>> {
        Ok((name.as_str(), 0)
            .to_socket_addrs()?
            .map(|addr| addr.ip())
            .collect())
    }
}

/// Why a connection is refused; [`DenyReason::code`] is what the audit entry says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DenyReason {
    /// The host is neither a DNS name nor an IP literal, or the port is 0.
    BadAuthority,
    /// No grant of the plan matches the host and port.
    NotGranted,
    /// The run narrowed the plan's grants (`--deny-host`) and this host is among those taken
    /// away.
    DeniedByRun,
    /// The name could not be looked up.
    ResolveFailed,
    /// The name has no address.
    NoAddress,
    /// An address is a cloud metadata service.
    Metadata,
    /// An address is unspecified (`0.0.0.0`, `::`).
    Unspecified,
    /// An address is the broadcast address.
    Broadcast,
    /// An address is multicast.
    Multicast,
    /// An address is link-local.
    LinkLocal,
    /// An address is in shared (CGNAT) space.
    Cgnat,
    /// An address is in reserved or special-purpose space.
    Reserved,
    /// An address is loopback, and not both written literally and listed by the operator.
    Loopback,
    /// An address is private, and not both written literally and listed by the operator.
    PrivateRange,
    /// The TLS server name is not the authority's name.
    SniMismatch,
    /// A `CONNECT` to a TLS port did not start with a well-formed TLS ClientHello.
    NotTls,
}

impl DenyReason {
    /// The stable snake_case code the audit entry carries.
    pub fn code(self) -> &'static str {
        match self {
            DenyReason::BadAuthority => "bad_authority",
            DenyReason::NotGranted => "not_granted",
            DenyReason::DeniedByRun => "denied_by_run",
            DenyReason::ResolveFailed => "resolve_failed",
            DenyReason::NoAddress => "no_address",
            DenyReason::Metadata => "metadata",
            DenyReason::Unspecified => "unspecified",
            DenyReason::Broadcast => "broadcast",
            DenyReason::Multicast => "multicast",
            DenyReason::LinkLocal => "link_local",
            DenyReason::Cgnat => "cgnat",
            DenyReason::Reserved => "reserved",
            DenyReason::Loopback => "loopback",
            DenyReason::PrivateRange => "private_range",
            DenyReason::SniMismatch => "sni_mismatch",
            DenyReason::NotTls => "not_tls",
        }
    }

    /// The reason an address of `class` is refused; `None` for a public one.
    fn of_class(class: AddressClass) -> Option<Self> {
        Some(match class {
            AddressClass::Public => return None,
            AddressClass::Metadata => DenyReason::Metadata,
            AddressClass::Unspecified => DenyReason::Unspecified,
            AddressClass::Broadcast => DenyReason::Broadcast,
            AddressClass::Multicast => DenyReason::Multicast,
            AddressClass::LinkLocal => DenyReason::LinkLocal,
            AddressClass::Cgnat => DenyReason::Cgnat,
            AddressClass::Reserved => DenyReason::Reserved,
            AddressClass::Loopback => DenyReason::Loopback,
            AddressClass::Private => DenyReason::PrivateRange,
        })
    }
}

/// The decision on one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Dial these, and only these: every address of the host, each judged.
    Allowed {
        /// The addresses with the requested port, in the resolver's order.
        dial: Vec<SocketAddr>,
    },
    /// Refused.
    Denied {
        /// Why.
        reason: DenyReason,
        /// The addresses that were judged (empty when it never came to addresses).
        addresses: Vec<IpAddr>,
    },
}

impl Decision {
    fn denied(reason: DenyReason) -> Self {
        Decision::Denied {
            reason,
            addresses: Vec::new(),
        }
    }

    /// The audit event: `egress.allowed` or `egress.denied`.
    pub fn event(&self) -> &'static str {
        match self {
            Decision::Allowed { .. } => "egress.allowed",
            Decision::Denied { .. } => "egress.denied",
        }
    }

    /// The fields of the decision's audit entry for a request by `vm` for `host` (as the guest
    /// sent it) and `port`: the host in canonical form when it parses (else its first 255
    /// bytes), the addresses judged, and the reason of a refusal. Nothing of the request
    /// itself — no path, header or body — is given to this function, so none can be written.
    pub fn audit_fields(&self, vm: &str, host: &str, port: u16) -> Value {
        let shown = shown_host(host);
        let (addresses, reason): (Vec<IpAddr>, Option<&str>) = match self {
            Decision::Allowed { dial } => (dial.iter().map(SocketAddr::ip).collect(), None),
            Decision::Denied { reason, addresses } => (addresses.clone(), Some(reason.code())),
        };
        let addresses: Vec<String> = addresses.iter().map(ToString::to_string).collect();
        let mut fields = json!({"vm": vm, "host": shown, "port": port, "addresses": addresses});
        if let Some(reason) = reason {
            fields["reason"] = json!(reason);
        }
        fields
    }
}

impl std::fmt::Display for Denial {
    /// As [`Denial::parse`] reads it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = self.grant.to_string();
        match self.any_port {
            // The grant is written `host:port`; every port is the host alone.
            true => match shown.rsplit_once(':') {
                Some((host, _)) => f.write_str(host),
                None => f.write_str(&shown),
            },
            false => f.write_str(&shown),
        }
    }
}

/// The plan's grants and the operator's configuration: everything a decision depends on,
/// besides what the resolver answers.
#[derive(Debug, Clone)]
pub struct EgressPolicy {
    grants: Vec<Grant>,
    denied: Vec<Denial>,
    config: EgressConfig,
}

/// A destination a run takes away from its plan's grants (`--deny-host HOST[:PORT]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// The host, suffix or address, with the port denied.
    pub grant: Grant,
    /// Every port of it, not only `grant.port`.
    pub any_port: bool,
}

impl Denial {
    /// Reads `HOST`, `HOST:PORT`, `*.SUFFIX[:PORT]` or an IP literal (an IPv6 one with a port
    /// in brackets): without a port, every port is denied.
    pub fn parse(text: &str) -> Result<Self, GrantError> {
        let bracketed = text.starts_with('[');
        let (host, port) = match text.rsplit_once(':') {
            Some((host, port))
                if port.chars().all(|c| c.is_ascii_digit())
                    && !port.is_empty()
                    && (bracketed || !host.contains(':')) =>
            {
                (host, port.parse::<u16>().ok())
            }
            _ => (text, None),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let grant = Grant::from_plan(&EgressGrant {
            host: host.to_string(),
            // Any port but 0 stands in when every port is denied.
            port: port.unwrap_or(1),
        })?;
        Ok(Self {
            grant,
            any_port: port.is_none(),
        })
    }

    fn matches(&self, authority: &Authority) -> bool {
        let port = match self.any_port {
            true => authority.port,
            false => self.grant.port,
        };
        Grant {
            port,
            ..self.grant.clone()
        }
        .matches(authority)
    }
}

impl EgressPolicy {
    /// The policy of a plan's `grants` on a host configured with `config`.
    pub fn new(grants: &[EgressGrant], config: EgressConfig) -> Result<Self, GrantError> {
        let grants = grants
            .iter()
            .map(Grant::from_plan)
            .collect::<Result<_, _>>()?;
        Ok(Self {
            grants,
            denied: Vec::new(),
            config,
        })
    }

    /// This policy with `denied` taken away from its grants: a run may narrow what its signed
    /// plan grants, never widen it.
    pub fn narrowed(mut self, denied: Vec<Denial>) -> Self {
        self.denied.extend(denied);
        self
    }

    /// Whether any destination is granted at all (after narrowing, grants may be left that
    /// only a denial covers; those still count: the decision is per connection).
    pub fn grants_anything(&self) -> bool {
        !self.grants.is_empty()
    }

    /// The operator's configuration: the limits the proxy applies.
    pub fn config(&self) -> &EgressConfig {
        &self.config
    }

    /// The decision on a guest's request to connect to `host` (a name or an IP literal, an
    /// IPv6 literal bare or in brackets) and `port`.
    pub fn judge(&self, host: &str, port: u16, resolver: &impl Resolve) -> Decision {
        let Ok(authority) = Authority::parse(host, port) else {
            return Decision::denied(DenyReason::BadAuthority);
        };
        if !self.grants.iter().any(|grant| grant.matches(&authority)) {
            return Decision::denied(DenyReason::NotGranted);
        }
        if self.denied.iter().any(|denial| denial.matches(&authority)) {
            return Decision::denied(DenyReason::DeniedByRun);
        }
        let (addresses, operator_given) = match &authority.host {
            Host::Ip(ip) => (vec![*ip], true),
            // The operator's pin is as much the operator's word as a listed address.
            Host::Name(name) => match self.config.resolve.get(name) {
                Some(pinned) => (pinned.clone(), true),
                None => match resolver.resolve(name) {
                    Ok(found) => (unique(found), false),
                    Err(_) => return Decision::denied(DenyReason::ResolveFailed),
                },
            },
        };
        if addresses.is_empty() {
            return Decision::denied(DenyReason::NoAddress);
        }
        let refused = addresses
            .iter()
            .filter_map(|ip| {
                let class = classify(*ip);
                let listed =
                    operator_given && self.config.allows_private(SocketAddr::new(*ip, port));
                match class.reach() {
                    Reach::Granted => None,
                    Reach::OperatorListed if listed => None,
                    _ => DenyReason::of_class(class),
                }
            })
            .min();
        match refused {
            Some(reason) => Decision::Denied { reason, addresses },
            None => Decision::Allowed {
                dial: addresses
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, port))
                    .collect(),
            },
        }
    }
}

/// The check of a `CONNECT` to a TLS port, once the client's first bytes are in: the
/// ClientHello's server name must be the authority's name. A request for an IP literal
/// must send no server name (TLS names only hosts by name), and a request for a name must
/// send exactly that name — a hello without one is refused too, as a front end would then
/// choose the site by something the host cannot see.
pub fn judge_client_hello(host: &str, hello: &Peek) -> Result<(), DenyReason> {
    let host = Host::parse(host).map_err(|_| DenyReason::BadAuthority)?;
    match (hello, &host) {
        (Peek::NotTls | Peek::Malformed | Peek::NeedMore, _) => Err(DenyReason::NotTls),
        (Peek::NoSni, Host::Ip(_)) => Ok(()),
        (Peek::Sni(sni), Host::Name(name)) if sni_matches(name, sni) => Ok(()),
        _ => Err(DenyReason::SniMismatch),
    }
}

/// A host as the guest sent it, fit for the record: its canonical form when it parses, else
/// its first 255 bytes.
pub fn shown_host(host: &str) -> String {
    match Host::parse(host) {
        Ok(parsed) => parsed.to_string(),
        Err(_) => truncated(host, MAX_AUDITED_HOST_BYTES).to_string(),
    }
}

/// `found` without repeats, in its order (a resolver lists an address once per socket type).
fn unique(found: Vec<IpAddr>) -> Vec<IpAddr> {
    let mut addresses = Vec::with_capacity(found.len());
    for ip in found {
        if !addresses.contains(&ip) {
            addresses.push(ip);
        }
    }
    addresses
}

/// At most `max` bytes of `text`, cut at a character boundary.
fn truncated(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};
    use std::collections::BTreeMap;

    use super::*;
    use crate::egress::sni::peek;

    /// A resolver with fixed answers, which counts its lookups.
    #[derive(Default)]
    struct FakeResolver {
        answers: BTreeMap<String, Vec<&'static str>>,
        asked: RefCell<Vec<String>>,
    }

    impl FakeResolver {
        fn with(answers: &[(&str, &[&'static str])]) -> Self {
            Self {
                answers: answers
                    .iter()
                    .map(|(name, ips)| (name.to_string(), ips.to_vec()))
                    .collect(),
                asked: RefCell::default(),
            }
        }

        fn asked(&self) -> Vec<String> {
            self.asked.borrow().clone()
        }
    }

    impl Resolve for FakeResolver {
        fn resolve(&self, name: &DnsName) -> io::Result<Vec<IpAddr>> {
            self.asked.borrow_mut().push(name.to_string());
            match self.answers.get(name.as_str()) {
                Some(ips) => Ok(ips.iter().map(|ip| ip.parse().unwrap()).collect()),
                None => Err(io::Error::other("no such name")),
            }
        }
    }

    fn policy(grants: &[(&str, u16)], config: &str) -> EgressPolicy {
        let grants: Vec<EgressGrant> = grants
            .iter()
            .map(|(host, port)| EgressGrant {
                host: host.to_string(),
                port: *port,
            })
            .collect();
        let config = EgressConfig::parse(config, std::path::Path::new("config.toml")).unwrap();
        EgressPolicy::new(&grants, config).unwrap()
    }

    fn dial(addrs: &[&str]) -> Decision {
        Decision::Allowed {
            dial: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    fn denied(reason: DenyReason, addresses: &[&str]) -> Decision {
        Decision::Denied {
            reason,
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    const NO_CONFIG: &str = "";
    const OLLAMA: &str =
        "[egress]\nallow_private = [\"127.0.0.1:11434\", \"[::1]:11434\", \"10.0.0.5:5432\"]\n";

    #[test]
    fn a_host_that_is_not_a_name_or_an_address_is_a_bad_authority() {
        let p = policy(&[("api.example.com", 443)], NO_CONFIG);
        let resolver = FakeResolver::default();
        for host in [
            "",
            "a b.example.com",
            "[192.0.2.1]",
            "127.1",
            "api.example.com:443",
            "*.example.com",
        ] {
            assert_eq!(
                p.judge(host, 443, &resolver),
                denied(DenyReason::BadAuthority, &[]),
                "{host:?}"
            );
        }
        assert_eq!(
            p.judge("api.example.com", 0, &resolver),
            denied(DenyReason::BadAuthority, &[])
        );
        assert!(resolver.asked().is_empty());
    }

    #[test]
    fn what_no_grant_matches_is_not_granted_and_never_looked_up() {
        let p = policy(
            &[
                ("api.example.com", 443),
                ("*.cdn.example.com", 443),
                ("192.0.2.10", 443),
            ],
            NO_CONFIG,
        );
        let resolver = FakeResolver::with(&[("api.example.com", &["93.184.215.14"])]);
        for (host, port) in [
            ("api.example.com", 80),
            ("www.example.com", 443),
            ("cdn.example.com", 443),
            ("192.0.2.11", 443),
            ("93.184.215.14", 443),
            ("[::ffff:192.0.2.10]", 80),
        ] {
            assert_eq!(
                p.judge(host, port, &resolver),
                denied(DenyReason::NotGranted, &[]),
                "{host}:{port}"
            );
        }
        assert!(resolver.asked().is_empty());
    }

    #[test]
    fn a_granted_name_is_looked_up_once_and_exactly_its_addresses_are_dialled() {
        let p = policy(&[("api.example.com", 443)], NO_CONFIG);
        let resolver = FakeResolver::with(&[(
            "api.example.com",
            &[
                "93.184.215.14",
                "2606:2800:21f:cb07:6820:80da:af6b:8b2c",
                "93.184.215.14",
            ],
        )]);
        assert_eq!(
            p.judge("API.example.com.", 443, &resolver),
            dial(&[
                "93.184.215.14:443",
                "[2606:2800:21f:cb07:6820:80da:af6b:8b2c]:443"
            ])
        );
        assert_eq!(resolver.asked(), ["api.example.com"]);
    }

    #[test]
    fn a_wildcard_name_reaches_public_addresses_only() {
        let p = policy(&[("*.example.com", 443)], OLLAMA);
        let resolver = FakeResolver::with(&[
            ("a.b.example.com", &["93.184.215.14"]),
            ("internal.example.com", &["127.0.0.1"]),
            ("db.example.com", &["10.0.0.5"]),
        ]);
        assert_eq!(
            p.judge("a.b.example.com", 443, &resolver),
            dial(&["93.184.215.14:443"])
        );
        assert_eq!(
            p.judge("internal.example.com", 443, &resolver),
            denied(DenyReason::Loopback, &["127.0.0.1"])
        );
        assert_eq!(
            p.judge("db.example.com", 443, &resolver),
            denied(DenyReason::PrivateRange, &["10.0.0.5"])
        );
        assert_eq!(
            p.judge("example.com", 443, &resolver),
            denied(DenyReason::NotGranted, &[])
        );
    }

    #[test]
    fn one_address_that_may_not_be_reached_denies_the_whole_name_with_the_worst_reason() {
        let p = policy(&[("*.example.com", 443)], OLLAMA);
        for (answer, reason) in [
            (&["93.184.215.14", "10.1.2.3"][..], DenyReason::PrivateRange),
            (&["10.1.2.3", "93.184.215.14"], DenyReason::PrivateRange),
            (
                &["93.184.215.14", "127.0.0.1", "10.1.2.3"],
                DenyReason::Loopback,
            ),
            (
                &["10.1.2.3", "169.254.169.254", "127.0.0.1"],
                DenyReason::Metadata,
            ),
            (
                &["93.184.215.14", "::ffff:169.254.169.254"],
                DenyReason::Metadata,
            ),
            (&["2606:4700::1111", "fd00:ec2::254"], DenyReason::Metadata),
            (&["93.184.215.14", "0.0.0.0"], DenyReason::Unspecified),
            (&["93.184.215.14", "255.255.255.255"], DenyReason::Broadcast),
            (&["93.184.215.14", "224.0.0.251"], DenyReason::Multicast),
            (&["93.184.215.14", "fe80::1"], DenyReason::LinkLocal),
            (&["93.184.215.14", "100.64.1.1"], DenyReason::Cgnat),
            (&["93.184.215.14", "198.18.0.1"], DenyReason::Reserved),
            (
                &["93.184.215.14", "64:ff9b::a00:1"],
                DenyReason::PrivateRange,
            ),
            (&["93.184.215.14", "2002:7f00:1::1"], DenyReason::Loopback),
            (&["::1"], DenyReason::Loopback),
        ] {
            let resolver = FakeResolver::with(&[("api.example.com", answer)]);
            assert_eq!(
                p.judge("api.example.com", 443, &resolver),
                denied(reason, answer),
                "{answer:?}"
            );
        }
    }

    #[test]
    fn a_failed_or_empty_lookup_is_denied() {
        let p = policy(&[("*.example.com", 443)], NO_CONFIG);
        let resolver = FakeResolver::with(&[("empty.example.com", &[])]);
        assert_eq!(
            p.judge("gone.example.com", 443, &resolver),
            denied(DenyReason::ResolveFailed, &[])
        );
        assert_eq!(
            p.judge("empty.example.com", 443, &resolver),
            denied(DenyReason::NoAddress, &[])
        );
    }

    #[test]
    fn a_rebound_name_is_judged_on_what_this_lookup_said_and_dialled_at_exactly_that() {
        /// Public the first time, loopback after: a rebinding attacker's DNS.
        struct Rebinding(Cell<u32>);
        impl Resolve for Rebinding {
            fn resolve(&self, _: &DnsName) -> io::Result<Vec<IpAddr>> {
                self.0.set(self.0.get() + 1);
                let ip = if self.0.get() == 1 {
                    "93.184.215.14"
                } else {
                    "127.0.0.1"
                };
                Ok(vec![ip.parse().unwrap()])
            }
        }
        let p = policy(&[("rebind.example.com", 11434)], OLLAMA);
        let resolver = Rebinding(Cell::new(0));
        assert_eq!(
            p.judge("rebind.example.com", 11434, &resolver),
            dial(&["93.184.215.14:11434"])
        );
        assert_eq!(resolver.0.get(), 1);
        assert_eq!(
            p.judge("rebind.example.com", 11434, &resolver),
            denied(DenyReason::Loopback, &["127.0.0.1"])
        );
        assert_eq!(resolver.0.get(), 2);
    }

    #[test]
    fn a_public_ip_literal_is_dialled_as_written_without_a_lookup() {
        let p = policy(
            &[("93.184.215.14", 443), ("2606:4700::1111", 443)],
            NO_CONFIG,
        );
        let resolver = FakeResolver::default();
        assert_eq!(
            p.judge("93.184.215.14", 443, &resolver),
            dial(&["93.184.215.14:443"])
        );
        assert_eq!(
            p.judge("[2606:4700::1111]", 443, &resolver),
            dial(&["[2606:4700::1111]:443"])
        );
        assert_eq!(
            p.judge("2606:4700::1111", 443, &resolver),
            dial(&["[2606:4700::1111]:443"])
        );
        assert!(resolver.asked().is_empty());
    }

    #[test]
    fn loopback_and_private_need_a_literal_grant_and_the_operators_listing() {
        let grants = [
            ("127.0.0.1", 11434),
            ("::1", 11434),
            ("127.0.0.1", 8080),
            ("10.0.0.5", 5432),
            ("::ffff:127.0.0.1", 11434),
            ("local.example.com", 11434),
        ];
        let resolver = FakeResolver::with(&[("local.example.com", &["127.0.0.1"])]);
        // Granted but not listed.
        let unlisted = policy(&grants, NO_CONFIG);
        assert_eq!(
            unlisted.judge("127.0.0.1", 11434, &resolver),
            denied(DenyReason::Loopback, &["127.0.0.1"])
        );
        assert_eq!(
            unlisted.judge("10.0.0.5", 5432, &resolver),
            denied(DenyReason::PrivateRange, &["10.0.0.5"])
        );
        // Granted and listed.
        let listed = policy(&grants, OLLAMA);
        assert_eq!(
            listed.judge("127.0.0.1", 11434, &resolver),
            dial(&["127.0.0.1:11434"])
        );
        assert_eq!(
            listed.judge("[::1]", 11434, &resolver),
            dial(&["[::1]:11434"])
        );
        assert_eq!(
            listed.judge("10.0.0.5", 5432, &resolver),
            dial(&["10.0.0.5:5432"])
        );
        assert_eq!(
            listed.judge("[::ffff:127.0.0.1]", 11434, &resolver),
            dial(&["[::ffff:127.0.0.1]:11434"])
        );
        // Granted, but that port is not listed.
        assert_eq!(
            listed.judge("127.0.0.1", 8080, &resolver),
            denied(DenyReason::Loopback, &["127.0.0.1"])
        );
        // Listed, but through a name: never.
        assert_eq!(
            listed.judge("local.example.com", 11434, &resolver),
            denied(DenyReason::Loopback, &["127.0.0.1"])
        );
        // Listed, but not granted.
        assert_eq!(
            policy(&[], OLLAMA).judge("127.0.0.1", 11434, &resolver),
            denied(DenyReason::NotGranted, &[])
        );
    }

    #[test]
    fn never_reachable_addresses_stay_so_whatever_the_grant() {
        let literals = [
            ("169.254.169.254", DenyReason::Metadata),
            ("169.254.170.2", DenyReason::Metadata),
            ("100.100.100.200", DenyReason::Metadata),
            ("fd00:ec2::254", DenyReason::Metadata),
            ("::ffff:169.254.169.254", DenyReason::Metadata),
            ("64:ff9b::a9fe:a9fe", DenyReason::Metadata),
            ("169.254.1.1", DenyReason::LinkLocal),
            ("fe80::1", DenyReason::LinkLocal),
            ("0.0.0.0", DenyReason::Unspecified),
            ("::", DenyReason::Unspecified),
            ("255.255.255.255", DenyReason::Broadcast),
            ("239.1.2.3", DenyReason::Multicast),
            ("ff02::1", DenyReason::Multicast),
            ("100.64.0.1", DenyReason::Cgnat),
            ("240.0.0.1", DenyReason::Reserved),
        ];
        let grants: Vec<(&str, u16)> = literals.iter().map(|(ip, _)| (*ip, 80)).collect();
        let p = policy(&grants, OLLAMA);
        let resolver = FakeResolver::default();
        for (ip, reason) in literals {
            assert_eq!(p.judge(ip, 80, &resolver), denied(reason, &[ip]), "{ip}");
        }
    }

    #[test]
    fn a_pinned_name_is_not_looked_up_and_its_pins_are_judged_like_any_address() {
        let config = "[egress]\nallow_private = [\"10.0.0.5:443\"]\nresolve = { \"api.example.com\" = [\"93.184.215.14\", \"2606:4700::1111\"], \"svc.internal\" = \"10.0.0.5\", \"db.internal\" = \"10.0.0.6\" }\n";
        let p = policy(
            &[
                ("api.example.com", 443),
                ("svc.internal", 443),
                ("svc.internal", 8443),
                ("db.internal", 443),
                ("other.example.com", 443),
            ],
            config,
        );
        let resolver = FakeResolver::with(&[
            ("api.example.com", &["8.8.8.8"]),
            ("other.example.com", &["8.8.4.4"]),
        ]);
        assert_eq!(
            p.judge("api.example.com", 443, &resolver),
            dial(&["93.184.215.14:443", "[2606:4700::1111]:443"])
        );
        // Pinned by the operator to a private address the operator lists: reached; on a port
        // not listed, or pinned to an address not listed, refused.
        assert_eq!(
            p.judge("svc.internal", 443, &resolver),
            dial(&["10.0.0.5:443"])
        );
        assert_eq!(
            p.judge("svc.internal", 8443, &resolver),
            denied(DenyReason::PrivateRange, &["10.0.0.5"])
        );
        assert_eq!(
            p.judge("db.internal", 443, &resolver),
            denied(DenyReason::PrivateRange, &["10.0.0.6"])
        );
        assert!(resolver.asked().is_empty());
        assert_eq!(
            p.judge("other.example.com", 443, &resolver),
            dial(&["8.8.4.4:443"])
        );
        assert_eq!(resolver.asked(), ["other.example.com"]);
    }

    #[test]
    fn the_hosts_own_resolver_finds_localhost_on_loopback_which_a_name_never_reaches() {
        let addresses = SystemResolver
            .resolve(&DnsName::parse("localhost").unwrap())
            .unwrap();
        assert!(!addresses.is_empty());
        assert!(addresses.iter().all(|ip| ip.is_loopback()), "{addresses:?}");
        let listed = "[egress]\nallow_private = [\"127.0.0.1:11434\", \"[::1]:11434\"]\n";
        for config in [NO_CONFIG, listed] {
            let p = policy(&[("localhost", 11434)], config);
            match p.judge("localhost", 11434, &SystemResolver) {
                Decision::Denied {
                    reason: DenyReason::Loopback,
                    addresses: judged,
                } => {
                    assert_eq!(judged, unique(addresses.clone()));
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn the_audit_fields_name_the_vm_host_port_addresses_and_reason_only() {
        let allowed = dial(&["93.184.215.14:443", "[2606:4700::1111]:443"]);
        assert_eq!(allowed.event(), "egress.allowed");
        assert_eq!(
            allowed.audit_fields("vm-1", "API.Example.com.", 443),
            json!({"vm": "vm-1", "host": "api.example.com", "port": 443,
                   "addresses": ["93.184.215.14", "2606:4700::1111"]})
        );
        let refused = denied(DenyReason::Metadata, &["93.184.215.14", "169.254.169.254"]);
        assert_eq!(refused.event(), "egress.denied");
        assert_eq!(
            refused.audit_fields("vm-1", "api.example.com", 443),
            json!({"vm": "vm-1", "host": "api.example.com", "port": 443,
                   "addresses": ["93.184.215.14", "169.254.169.254"], "reason": "metadata"})
        );
        assert_eq!(
            denied(DenyReason::NotGranted, &[]).audit_fields("vm-1", "2001:DB8::1", 80),
            json!({"vm": "vm-1", "host": "[2001:db8::1]", "port": 80, "addresses": [], "reason": "not_granted"})
        );
        // A host that does not parse is kept to its first 255 bytes.
        let hostile = format!("é{}", "x".repeat(100_000));
        let fields = denied(DenyReason::BadAuthority, &[]).audit_fields("vm-1", &hostile, 443);
        let host = fields["host"].as_str().unwrap();
        assert!(host.len() <= 255 && host.starts_with('é'), "{}", host.len());
        assert_eq!(fields["reason"], "bad_authority");
    }

    #[test]
    fn deny_reason_codes_are_distinct_snake_case() {
        let all = [
            DenyReason::BadAuthority,
            DenyReason::NotGranted,
            DenyReason::ResolveFailed,
            DenyReason::NoAddress,
            DenyReason::Metadata,
            DenyReason::Unspecified,
            DenyReason::Broadcast,
            DenyReason::Multicast,
            DenyReason::LinkLocal,
            DenyReason::Cgnat,
            DenyReason::Reserved,
            DenyReason::Loopback,
            DenyReason::PrivateRange,
            DenyReason::SniMismatch,
            DenyReason::NotTls,
        ];
        let codes: std::collections::BTreeSet<&str> = all.iter().map(|r| r.code()).collect();
        assert_eq!(codes.len(), all.len());
        assert!(codes
            .iter()
            .all(|c| c.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')));
    }

    #[test]
    fn a_tls_connect_must_name_the_authority_in_its_client_hello() {
        let hello = |name: &[u8]| {
            let bytes = hex::decode(
                include_str!("testdata/openssl_tls13.hex")
                    .split_whitespace()
                    .collect::<String>(),
            )
            .unwrap();
            // The recording names x.example.com; put another name of the same length in.
            let at = bytes
                .windows(13)
                .position(|w| w == b"x.example.com")
                .unwrap();
            let mut bytes = bytes;
            bytes[at..at + 13].copy_from_slice(name);
            peek(&bytes)
        };
        assert_eq!(
            judge_client_hello("x.example.com", &hello(b"x.example.com")),
            Ok(())
        );
        assert_eq!(
            judge_client_hello("X.EXAMPLE.COM.", &hello(b"X.Example.com")),
            Ok(())
        );
        assert_eq!(
            judge_client_hello("x.example.com", &hello(b"y.example.com")),
            Err(DenyReason::SniMismatch)
        );
        assert_eq!(
            judge_client_hello("93.184.215.14", &hello(b"x.example.com")),
            Err(DenyReason::SniMismatch)
        );
        assert_eq!(
            judge_client_hello("x.example.com", &Peek::NoSni),
            Err(DenyReason::SniMismatch)
        );
        assert_eq!(judge_client_hello("93.184.215.14", &Peek::NoSni), Ok(()));
        assert_eq!(
            judge_client_hello("[2606:4700::1111]", &Peek::NoSni),
            Ok(())
        );
        for not_tls in [Peek::NotTls, Peek::Malformed, Peek::NeedMore] {
            assert_eq!(
                judge_client_hello("x.example.com", &not_tls),
                Err(DenyReason::NotTls)
            );
        }
        assert_eq!(
            judge_client_hello("x y", &Peek::NoSni),
            Err(DenyReason::BadAuthority)
        );
        assert_eq!(
            judge_client_hello("x.example.com", &peek(b"GET / HTTP/1.1\r\n")),
            Err(DenyReason::NotTls)
        );
    }
}
