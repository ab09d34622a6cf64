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
