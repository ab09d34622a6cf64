//! The production [`Dialer`]: the plan's grants and the operator's configuration judge each
//! connection ([`EgressPolicy::judge`]), and only the addresses that judgement checked are
//! dialled — the name is never looked up a second time. A `CONNECT` to a TLS port is let
//! through only once its ClientHello names the host the guest asked for.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use mvm_protocol::{OpenRequest, Via};

use super::judge::{judge_client_hello, Decision, EgressPolicy, Resolve};
use super::relay::{Dialer, Gate, Refusal};
use super::sni::{peek, Peek};
use crate::codes;
use crate::mux::NOT_GRANTED;

/// How long one address may take to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Ports on which a `CONNECT` must start with a TLS ClientHello naming its host: HTTPS, and
/// the TLS ports of mail, LDAP, DNS and the usual alternative HTTPS port.
pub const TLS_PORTS: &[u16] = &[443, 465, 636, 853, 993, 995, 8443];

/// Dials what an [`EgressPolicy`] allows, resolving names with `R`.
pub struct PolicyDialer<R> {
    policy: EgressPolicy,
    resolver: R,
}

impl<R: Resolve> PolicyDialer<R> {
    /// A dialer judging by `policy`, looking names up with `resolver`.
    pub fn new(policy: EgressPolicy, resolver: R) -> Self {
        Self { policy, resolver }
    }
}

impl<R: Resolve + Send + Sync> Dialer for PolicyDialer<R> {
    fn dial(&self, request: &OpenRequest) -> Result<(TcpStream, SocketAddr), Refusal> {
        let dial = match self
            .policy
            .judge(&request.host, request.port, &self.resolver)
        {
            Decision::Allowed { dial } => dial,
            Decision::Denied { reason, addresses } => {
                return Err(Refusal {
                    code: NOT_GRANTED,
                    reason: reason.code(),
                    addresses,
                })
            }
        };
        let mut refused = false;
        for address in &dial {
            match TcpStream::connect_timeout(address, CONNECT_TIMEOUT) {
                Ok(stream) => return Ok((stream, *address)),
                Err(e) => refused |= e.kind() == io::ErrorKind::ConnectionRefused,
            }
        }
        let addresses = dial.iter().map(SocketAddr::ip).collect();
        Err(match refused {
            true => Refusal {
                code: codes::RUN056,
                reason: "connection_refused",
                addresses,
            },
            false => Refusal {
                code: codes::RUN057,
                reason: "unreachable",
                addresses,
            },
        })
    }

    fn first_bytes(&self, request: &OpenRequest, bytes: &[u8]) -> Gate {
        if request.via != Via::Connect || !TLS_PORTS.contains(&request.port) {
            return Gate::Pass;
        }
        match peek(bytes) {
            Peek::NeedMore => Gate::NeedMore,
            hello => match judge_client_hello(&request.host, &hello) {
                Ok(()) => Gate::Pass,
                Err(reason) => Gate::Refuse(Refusal::new(NOT_GRANTED, reason.code())),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, TcpListener};
    use std::path::Path;

    use mvm_ir::workload::EgressGrant;

    use super::*;
    use crate::egress::config::EgressConfig;
    use crate::egress::judge::{Denial, SystemResolver};

    fn dialer(grants: &[(&str, u16)], config: &str) -> PolicyDialer<SystemResolver> {
        let grants: Vec<EgressGrant> = grants
            .iter()
            .map(|(host, port)| EgressGrant {
                host: host.to_string(),
                port: *port,
            })
            .collect();
        let config = EgressConfig::parse(config, Path::new("config.toml")).unwrap();
        PolicyDialer::new(EgressPolicy::new(&grants, config).unwrap(), SystemResolver)
    }

    fn open(host: &str, port: u16, via: Via) -> OpenRequest {
        OpenRequest {
            host: host.into(),
            port,
            via,
            malformed: None,
        }
    }

    fn recorded(hex: &str) -> Vec<u8> {
        let hex: String = hex.split_whitespace().collect();
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn only_the_judged_address_is_dialled_and_a_closed_port_is_refused_not_unreachable() {
        let open_port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = open_port.local_addr().unwrap().port();
        let closed_port = {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            listener.local_addr().unwrap().port()
        };
        let config = format!(
            "[egress]\nallow_private = [\"127.0.0.1:{port}\", \"127.0.0.1:{closed_port}\"]\n"
        );
        let grants = [("127.0.0.1", port), ("127.0.0.1", closed_port)];
        let listed = dialer(&grants, &config);

        let (stream, address) = listed.dial(&open("127.0.0.1", port, Via::Connect)).unwrap();
        assert_eq!(address, SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        assert_eq!(stream.peer_addr().unwrap(), address);

        let refused = listed
            .dial(&open("127.0.0.1", closed_port, Via::Connect))
            .unwrap_err();
        assert_eq!(
            (refused.code, refused.reason),
            ("RUN056", "connection_refused")
        );
        assert_eq!(refused.addresses, [IpAddr::from(Ipv4Addr::LOCALHOST)]);

        // Another port of the same address is not granted: nothing is dialled.
        let other = listed
            .dial(&open(
                "127.0.0.1",
                port.wrapping_add(1).max(1),
                Via::Connect,
            ))
            .unwrap_err();
        assert_eq!((other.code, other.reason), ("RUN052", "not_granted"));
        assert!(other.addresses.is_empty());
        // Granted, but not listed by the operator: loopback refused before any dial.
        let unlisted = dialer(&grants, "");
        let loopback = unlisted
            .dial(&open("127.0.0.1", port, Via::Connect))
            .unwrap_err();
        assert_eq!((loopback.code, loopback.reason), ("RUN052", "loopback"));
    }

    #[test]
    fn a_connect_to_a_tls_port_passes_only_a_client_hello_naming_its_host() {
        let dialer = dialer(&[("api.example.com", 443), ("x.example.com", 443)], "");
        let hello = recorded(include_str!("testdata/curl.hex"));
        let asked = open("api.example.com", 443, Via::Connect);
        assert_eq!(dialer.first_bytes(&asked, &[]), Gate::NeedMore);
        assert_eq!(dialer.first_bytes(&asked, &hello[..20]), Gate::NeedMore);
        assert_eq!(dialer.first_bytes(&asked, &hello), Gate::Pass);
        // The same hello through a tunnel to another granted host.
        let elsewhere = open("x.example.com", 443, Via::Connect);
        match dialer.first_bytes(&elsewhere, &hello) {
            Gate::Refuse(refusal) => assert_eq!(refusal.reason, "sni_mismatch"),
            other => panic!("{other:?}"),
        }
        match dialer.first_bytes(&asked, b"GET / HTTP/1.1\r\n\r\n") {
            Gate::Refuse(refusal) => assert_eq!(refusal.reason, "not_tls"),
            other => panic!("{other:?}"),
        }
        // Not a TLS port, or not a tunnel: nothing is held back.
        let plain = open("api.example.com", 80, Via::Connect);
        assert_eq!(dialer.first_bytes(&plain, &[]), Gate::Pass);
        let forwarded = open("api.example.com", 443, Via::Forward);
        assert_eq!(dialer.first_bytes(&forwarded, &[]), Gate::Pass);
    }

    #[test]
    fn a_launch_narrows_its_grants_with_denials_and_never_widens_them() {
        let grants = [("*.example.com", 443), ("api.example.com", 8443)];
        let narrowed = |denied: &[&str]| {
            let config = EgressConfig::parse("", Path::new("config.toml")).unwrap();
            let grants: Vec<EgressGrant> = grants
                .iter()
                .map(|(host, port)| EgressGrant {
                    host: host.to_string(),
                    port: *port,
                })
                .collect();
            let denied = denied.iter().map(|d| Denial::parse(d).unwrap()).collect();
            PolicyDialer::new(
                EgressPolicy::new(&grants, config).unwrap().narrowed(denied),
                SystemResolver,
            )
        };
        let reason = |dialer: &PolicyDialer<SystemResolver>, host: &str, port| {
            dialer
                .dial(&open(host, port, Via::Connect))
                .map(|_| ())
                .unwrap_err()
                .reason
        };
        // Every port of the name, one port of it, everything below a suffix.
        let dialer = narrowed(&["api.example.com"]);
        assert_eq!(reason(&dialer, "api.example.com", 443), "denied_by_run");
        assert_eq!(reason(&dialer, "api.example.com", 8443), "denied_by_run");
        let dialer = narrowed(&["api.example.com:8443"]);
        assert_eq!(reason(&dialer, "api.example.com", 8443), "denied_by_run");
        let dialer = narrowed(&["*.example.com"]);
        assert_eq!(reason(&dialer, "www.example.com", 443), "denied_by_run");
        // A denial grants nothing.
        let dialer = narrowed(&["other.example.org:443"]);
        assert_eq!(reason(&dialer, "other.example.org", 443), "not_granted");
        for text in [
            "api.example.com",
            "api.example.com:8443",
            "*.example.com",
            "[::1]:80",
            "10.0.0.1",
        ] {
            assert_eq!(Denial::parse(text).unwrap().to_string(), text);
        }
        assert!(Denial::parse("api.123").is_err());
    }
}
