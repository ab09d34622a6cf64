//! The guest's egress proxy, as bytes: what a client inside the guest asks for, and what it is
//! answered.
//!
//! The guest has no network interface. A workload reaches the outside only through the proxy
//! the agent serves on [`LISTEN`]: an HTTP proxy (`CONNECT` tunnels and plain `http://`
//! forwarding) and, on the same port, SOCKS5 with remote name resolution. Each connection's
//! first bytes tell which ([`request::RequestReader`]); the client's request is read into a
//! [`ProxyRequest`] naming a [`Target`] — a host name or address, and a port — which the agent
//! carries to the host over its channel, unresolved: the host's policy decides, and its
//! answer comes back to the client as a success or a [`Refusal`].
//!
//! Everything here is pure parsing and encoding, bounded and incremental: it is fed whatever
//! the client has sent so far, asks for more until a request is complete, and gives the same
//! answer however the bytes were split. What it refuses, each with a code of its own, is in
//! [`request::RequestError`] and [`socks::SocksError`]; the refused client gets a `400`, or the
//! SOCKS5 reply for the fault, and never an echo of its own bytes.
//!
//! Commands see the proxy through the usual environment variables ([`environment`]).

pub mod forward;
pub mod request;
pub mod socks;
pub mod target;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

pub use target::{Host, Target, TargetError};

/// Where the proxy listens, inside the guest: `127.0.0.1:3128`.
pub const LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 3128));

/// What a client asked of the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyRequest {
    /// `CONNECT host:port`: a tunnel to the target; the client is answered
    /// [`request::CONNECT_ESTABLISHED`] once it is open, and every byte after the request head
    /// (a pipelined TLS ClientHello) belongs to the tunnel.
    Connect(Target),
    /// A request for an `http://` URI, to be sent to the target as `head` (the request
    /// rewritten for the origin server, see [`forward`]), followed by every byte the client
    /// sends after its own head.
    Forward {
        /// Where the request goes.
        target: Target,
        /// The request head to send to the origin server, up to its empty line.
        head: Vec<u8>,
    },
    /// A SOCKS5 client: the handshake in [`socks`] reads its bytes from the first one on.
    Socks,
}

/// Why the host did not open a connection to a target, as the client is told it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The egress policy does not grant the target.
    Denied,
    /// The host could not resolve or reach the target.
    Unreachable,
    /// The target refused the connection.
    ConnectionRefused,
    /// Anything else went wrong.
    Failed,
}

impl Refusal {
    /// The response an HTTP client gets: `403` for a denial (retrying will not help), `502`
    /// for the rest; the body is fixed text, with `Connection: close`.
    pub fn http_response(self) -> Vec<u8> {
        let (status, body) = match self {
            Refusal::Denied => (
                "403 Forbidden",
                "the egress policy does not grant this target",
            ),
            Refusal::Unreachable => ("502 Bad Gateway", "the target could not be reached"),
            Refusal::ConnectionRefused => ("502 Bad Gateway", "the target refused the connection"),
            Refusal::Failed => ("502 Bad Gateway", "the connection to the target failed"),
        };
        text_response(status, &format!("mvm proxy: {body}\n"))
    }
}

/// What a client gets while the proxy serves as many connections as it takes: `503`, closing.
pub fn busy_response() -> Vec<u8> {
    text_response(
        "503 Service Unavailable",
        "mvm proxy: too many connections at once\n",
    )
}

/// A complete HTTP/1.1 response with a plain-text body, closing the connection.
fn text_response(status: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The environment that points a workload's commands at the proxy, both spellings of each
/// variable: curl reads the lowercase `http_proxy` only, and busybox wget reads only the
/// lowercase ones; Python, pip and Go read both.
///
/// Every variable names the HTTP proxy, `ALL_PROXY` too: `socks5h://` there would give
/// tools that use `ALL_PROXY` alone remote name resolution, but httpx (and so the OpenAI and
/// many other Python clients) fails to create any client at all when `ALL_PROXY` has a SOCKS
/// scheme and the optional `socksio` package is missing. SOCKS5 is served on the same port for
/// tools told so explicitly (`socks5h://127.0.0.1:3128`). `NO_PROXY` keeps loopback out of the
/// proxy: the host would refuse it anyway.
pub fn environment() -> Vec<(&'static str, &'static str)> {
    const HTTP: &str = "http://127.0.0.1:3128";
    const NO_PROXY: &str = "localhost,127.0.0.1,::1";
    vec![
        ("http_proxy", HTTP),
        ("HTTP_PROXY", HTTP),
        ("https_proxy", HTTP),
        ("HTTPS_PROXY", HTTP),
        ("all_proxy", HTTP),
        ("ALL_PROXY", HTTP),
        ("no_proxy", NO_PROXY),
        ("NO_PROXY", NO_PROXY),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_names_the_listening_proxy_in_both_spellings() {
        let env = environment();
        for name in ["http_proxy", "https_proxy", "all_proxy", "no_proxy"] {
            let lower = env.iter().find(|(n, _)| *n == name).unwrap().1;
            let upper = env
                .iter()
                .find(|(n, _)| *n == name.to_ascii_uppercase())
                .unwrap()
                .1;
            assert_eq!(lower, upper, "{name}");
            if name != "no_proxy" {
                assert_eq!(lower, format!("http://{LISTEN}"));
            }
        }
        assert_eq!(env.len(), 8);
    }

    #[test]
    fn refusals_are_complete_responses_that_close() {
        for (refusal, status) in [
            (Refusal::Denied, "403"),
            (Refusal::Unreachable, "502"),
            (Refusal::ConnectionRefused, "502"),
            (Refusal::Failed, "502"),
        ] {
            let response = String::from_utf8(refusal.http_response()).unwrap();
            let (head, body) = response.split_once("\r\n\r\n").unwrap();
            assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{head}");
            assert!(head.contains("\r\nConnection: close"));
            assert!(head.contains(&format!("\r\nContent-Length: {}", body.len())));
        }
    }
}
