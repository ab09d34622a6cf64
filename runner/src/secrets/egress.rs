//! Bound secrets on the way out: what the relay does to the bytes a guest sends on a
//! connection, when the launch has bound secrets.
//!
//! - A plain HTTP request the guest's proxy forwards (one per connection, its head written
//!   anew by the agent, [`mvm_protocol::Via::Forward`]) to a host and port a secret is bound to
//!   gets the value in its head ([`HeadRewrite`]): in place of the placeholder in any header
//!   value, or as the header the binding names (`header:NAME`, `bearer`, `basic`), replacing one
//!   the guest sent. The body is passed as the guest framed it.
//! - Everywhere else ([`LeakScan`]) a placeholder of this launch in the guest's bytes — in a
//!   request line, a header toward a host the secret is not bound to, a body — ends the
//!   connection before those bytes leave: a guest cannot send a placeholder somewhere it
//!   could be swapped for the value later, and the attempt is recorded.
//!
//! A value that holds a CR, LF or NUL never goes into a head (it would split it); the request
//! is refused instead.

use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use mvm_ir::secrets::Inject;

use super::BoundSecret;

/// The longest request head held while it is rewritten.
const MAX_HEAD: usize = 64 * 1024;

/// Why a connection was ended: the reason its audit entry records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// A stable snake_case word.
    pub reason: &'static str,
    /// The secret whose placeholder was seen, if one was.
    pub secret: Option<String>,
}

/// What the relay does with the bytes a guest sends on one connection.
pub enum GuestBytes {
    /// Passed as they come.
    Pass,
    /// Scanned for placeholders.
    Scan(LeakScan),
    /// A request head rewritten with the values, then the body scanned.
    Rewrite(HeadRewrite),
}

impl GuestBytes {
    /// The filter for a connection to `host:port` asked for `via`.
    pub fn for_connection(
        secrets: &Arc<Vec<BoundSecret>>,
        host: &str,
        port: u16,
        plain_http: bool,
    ) -> Self {
        if secrets.is_empty() {
            return GuestBytes::Pass;
        }
        match plain_http && is_bound(secrets, host, port) {
            true => Self::rewrite(secrets, host, port, false),
            false => GuestBytes::Scan(LeakScan::new(Arc::clone(secrets))),
        }
    }

    /// The filter of the plaintext inside a TLS connection to a bound host the runner
    /// terminates ([`super::tls`]): its one request's head gets the values and
    /// `Connection: close`.
    pub fn for_terminated(secrets: &Arc<Vec<BoundSecret>>, host: &str, port: u16) -> Self {
        Self::rewrite(secrets, host, port, true)
    }

    fn rewrite(secrets: &Arc<Vec<BoundSecret>>, host: &str, port: u16, close: bool) -> Self {
        GuestBytes::Rewrite(HeadRewrite {
            secrets: Arc::clone(secrets),
            host: normal(host),
            port,
            head: Vec::new(),
            sent: false,
            close,
        })
    }

    /// What of `bytes` goes out now.
    pub fn pass(&mut self, bytes: &[u8]) -> Result<Vec<u8>, Blocked> {
        match self {
            GuestBytes::Pass => Ok(bytes.to_vec()),
            GuestBytes::Scan(scan) => scan.pass(bytes).map(|()| bytes.to_vec()),
            GuestBytes::Rewrite(rewrite) => rewrite.pass(bytes),
        }
    }

    /// Whether the guest's side may end now (a head still being held may not).
    pub fn finish(&mut self) -> Result<(), Blocked> {
        match self {
            GuestBytes::Rewrite(rewrite) if !rewrite.sent => Err(Blocked {
                reason: "incomplete_head",
                secret: None,
            }),
            _ => Ok(()),
        }
    }
}

/// `host` as bindings name it: lowercase, no trailing dot.
fn normal(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether a secret is bound to `host:port`.
pub fn is_bound(secrets: &[BoundSecret], host: &str, port: u16) -> bool {
    let host = normal(host);
    secrets
        .iter()
        .any(|s| s.bindings.iter().any(|b| b.host == host && b.port == port))
}

/// Looks for this launch's placeholders in a byte stream, across the points where it is cut.
/// Nothing is held back: the bytes before a placeholder's last one may have gone already,
/// which gives away a placeholder's start, never a value.
pub struct LeakScan {
    secrets: Arc<Vec<BoundSecret>>,
    /// The end of what went before, as long as a placeholder less one byte.
    context: Vec<u8>,
}

impl LeakScan {
    fn new(secrets: Arc<Vec<BoundSecret>>) -> Self {
        Self {
            secrets,
            context: Vec::new(),
        }
    }

    /// Passes `bytes` unless they complete a placeholder.
    pub fn pass(&mut self, bytes: &[u8]) -> Result<(), Blocked> {
        let mut window = std::mem::take(&mut self.context);
        window.extend_from_slice(bytes);
        if let Some(secret) = find_placeholder(&self.secrets, &window) {
            return Err(Blocked {
                reason: "secret_placeholder",
                secret: Some(secret.name.clone()),
            });
        }
        let longest = self
            .secrets
            .iter()
            .map(|s| s.placeholder.len())
            .max()
            .unwrap_or(0);
        let keep = longest.saturating_sub(1).min(window.len());
        self.context = window[window.len() - keep..].to_vec();
        Ok(())
    }
}

fn find_placeholder<'a>(secrets: &'a [BoundSecret], bytes: &[u8]) -> Option<&'a BoundSecret> {
    secrets.iter().find(|s| {
        let needle = s.placeholder.as_bytes();
        bytes.windows(needle.len()).any(|w| w == needle)
    })
}

/// The head of one plain HTTP request to a bound destination, held until whole, then sent
/// with the values in it. The body after it goes as the guest framed it: a placeholder there
/// is not swapped, so it reaches only the bound host, as a placeholder.
pub struct HeadRewrite {
    secrets: Arc<Vec<BoundSecret>>,
    host: String,
    port: u16,
    head: Vec<u8>,
    /// Whether the head went.
    sent: bool,
    /// Whether the head is made to ask for `Connection: close` (a terminated connection
    /// carries one request, whose head alone gets the values).
    close: bool,
}

impl HeadRewrite {
    fn pass(&mut self, bytes: &[u8]) -> Result<Vec<u8>, Blocked> {
        if self.sent {
            return Ok(bytes.to_vec());
        }
        self.head.extend_from_slice(bytes);
        let Some(end) = find(&self.head, b"\r\n\r\n") else {
            if self.head.len() > MAX_HEAD {
                return Err(Blocked {
                    reason: "head_too_large",
                    secret: None,
                });
            }
            return Ok(Vec::new());
        };
        let head_end = end + 4;
        let mut out = self.rewrite(&self.head[..head_end])?;
        out.extend_from_slice(&self.head[head_end..]);
        self.head.clear();
        self.sent = true;
        Ok(out)
    }

    /// The head with the values in: placeholders in header values swapped, injected headers
    /// set; refused when a placeholder is anywhere else or a value cannot be a header's.
    fn rewrite(&self, head: &[u8]) -> Result<Vec<u8>, Blocked> {
        let text = &head[..head.len() - 4];
        let mut lines = text
            .split(|b| *b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
        let request_line = lines.next().unwrap_or_default();
        if let Some(secret) = find_placeholder(&self.secrets, request_line) {
            return Err(Blocked {
                reason: "secret_placeholder",
                secret: Some(secret.name.clone()),
            });
        }
        let here: Vec<(&BoundSecret, &Inject)> = self
            .secrets
            .iter()
            .flat_map(|s| {
                s.bindings
                    .iter()
                    .filter(|b| b.host == self.host && b.port == self.port)
                    .map(move |b| (s, &b.inject))
            })
            .collect();
        let injected: Vec<(String, Vec<u8>, &BoundSecret)> = here
            .iter()
            .filter_map(|(secret, inject)| {
                let value: &[u8] = &secret.value;
                match inject {
                    Inject::Placeholder => None,
                    Inject::Header { name } => Some((name.clone(), value.to_vec(), *secret)),
                    Inject::Bearer => {
                        let mut v = b"Bearer ".to_vec();
                        v.extend_from_slice(value);
                        Some(("Authorization".into(), v, *secret))
                    }
                    Inject::Basic => {
                        let v = format!("Basic {}", STANDARD.encode(value)).into_bytes();
                        Some(("Authorization".into(), v, *secret))
                    }
                }
            })
            .collect();
        let mut out = Vec::with_capacity(head.len() + 256);
        out.extend_from_slice(request_line);
        out.extend_from_slice(b"\r\n");
        for line in lines {
            let name = line.split(|b| *b == b':').next().unwrap_or_default();
            let replaced = injected
                .iter()
                .any(|(header, _, _)| header.as_bytes().eq_ignore_ascii_case(name));
            let connection = self.close
                && [&b"connection"[..], b"keep-alive"]
                    .iter()
                    .any(|h| h.eq_ignore_ascii_case(name.trim_ascii()));
            if replaced || connection {
                continue;
            }
            let mut line = line.to_vec();
            for (secret, inject) in &here {
                if **inject == Inject::Placeholder {
                    line = replace(&line, secret.placeholder.as_bytes(), &header_value(secret)?);
                }
            }
            if let Some(secret) = find_placeholder(&self.secrets, &line) {
                return Err(Blocked {
                    reason: "secret_placeholder",
                    secret: Some(secret.name.clone()),
                });
            }
            out.extend_from_slice(&line);
            out.extend_from_slice(b"\r\n");
        }
        for (header, value, secret) in injected {
            header_value(secret)?;
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(&value);
            out.extend_from_slice(b"\r\n");
        }
        if self.close {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        Ok(out)
    }
}

/// The value, if it can stand in a header.
fn header_value(secret: &BoundSecret) -> Result<Vec<u8>, Blocked> {
    if secret.value.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
        return Err(Blocked {
            reason: "secret_not_a_header_value",
            secret: Some(secret.name.clone()),
        });
    }
    Ok(secret.value.to_vec())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn replace(line: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = find(rest, from) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(to);
        rest = &rest[at + from.len()..];
    }
    out.extend_from_slice(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvm_ir::secrets::Binding;
    use zeroize::Zeroizing;

    const PLACEHOLDER: &str = "MVM_SECRET_0123456789abcdef0123456789abcdef";

    fn secrets(inject: Inject) -> Arc<Vec<BoundSecret>> {
        Arc::new(vec![BoundSecret {
            name: "api-token".into(),
            placeholder: PLACEHOLDER.into(),
            value: Zeroizing::new(b"real-value-42".to_vec()),
            bindings: vec![Binding {
                host: "api.example.com".into(),
                port: 80,
                inject,
            }],
        }])
    }

    fn head(auth: &str) -> Vec<u8> {
        format!("GET /v1 HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\nBODY").into_bytes()
    }

    #[test]
    fn the_placeholder_becomes_the_value_toward_the_bound_host_only() {
        let secrets = secrets(Inject::Placeholder);
        let mut bound = GuestBytes::for_connection(&secrets, "API.example.com.", 80, true);
        let sent = head(&format!("Bearer {PLACEHOLDER}"));
        // Cut anywhere, the head goes once whole.
        let (a, b) = sent.split_at(20);
        let mut out = bound.pass(a).unwrap();
        assert!(out.is_empty());
        out.extend(bound.pass(b).unwrap());
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.contains("Authorization: Bearer real-value-42\r\n"),
            "{out}"
        );
        assert!(
            out.ends_with("\r\n\r\nBODY") && !out.contains(PLACEHOLDER),
            "{out}"
        );
        bound.finish().unwrap();

        for (host, port, http) in [
            ("other.example.com", 80, true),
            ("api.example.com", 8080, true),
            ("api.example.com", 80, false),
        ] {
            let mut elsewhere = GuestBytes::for_connection(&secrets, host, port, http);
            let blocked = elsewhere.pass(&sent).unwrap_err();
            assert_eq!(blocked.reason, "secret_placeholder", "{host}:{port}");
            assert_eq!(blocked.secret.as_deref(), Some("api-token"));
        }
    }

    #[test]
    fn a_terminated_request_asks_for_the_connection_to_close() {
        let secrets = secrets(Inject::Placeholder);
        let mut bound = GuestBytes::for_terminated(&secrets, "api.example.com", 80);
        let sent = format!("GET / HTTP/1.1\r\nHost: api.example.com\r\nConnection: keep-alive\r\nX: {PLACEHOLDER}\r\n\r\n");
        let out = String::from_utf8(bound.pass(sent.as_bytes()).unwrap()).unwrap();
        assert!(
            out.ends_with("X: real-value-42\r\nConnection: close\r\n\r\n"),
            "{out}"
        );
        assert!(!out.contains("keep-alive"), "{out}");
    }

    #[test]
    fn a_placeholder_in_the_url_is_refused_even_toward_the_bound_host() {
        let secrets = secrets(Inject::Placeholder);
        let mut bound = GuestBytes::for_connection(&secrets, "api.example.com", 80, true);
        let sent = format!("GET /?key={PLACEHOLDER} HTTP/1.1\r\nHost: api.example.com\r\n\r\n");
        assert_eq!(
            bound.pass(sent.as_bytes()).unwrap_err().reason,
            "secret_placeholder"
        );
    }

    #[test]
    fn injected_headers_replace_the_guests() {
        for (inject, expected) in [
            (Inject::Bearer, "Authorization: Bearer real-value-42"),
            (Inject::Basic, "Authorization: Basic cmVhbC12YWx1ZS00Mg=="),
            (
                Inject::Header {
                    name: "X-Api-Key".into(),
                },
                "X-Api-Key: real-value-42",
            ),
        ] {
            let secrets = secrets(inject);
            let mut bound = GuestBytes::for_connection(&secrets, "api.example.com", 80, true);
            let out = String::from_utf8(bound.pass(&head("Bearer guest-made")).unwrap()).unwrap();
            assert!(out.contains(expected), "{out}");
            assert_eq!(
                out.matches("real-value-42").count() + out.matches("cmVhbC12YWx1ZS00Mg").count(),
                1,
                "{out}"
            );
        }
    }

    #[test]
    fn a_placeholder_split_between_chunks_is_still_caught() {
        let secrets = secrets(Inject::Placeholder);
        let text = format!("POST / HTTP/1.1\r\n\r\nfield={PLACEHOLDER}&x=1");
        for cut in 1..text.len() {
            let mut scan = GuestBytes::for_connection(&secrets, "other.example.com", 80, true);
            let first = scan.pass(&text.as_bytes()[..cut]);
            let second = first.and_then(|_| scan.pass(&text.as_bytes()[cut..]));
            assert!(second.is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn a_value_that_would_split_the_head_is_refused() {
        let secrets = Arc::new(vec![BoundSecret {
            value: Zeroizing::new(b"evil\r\nX-Injected: 1".to_vec()),
            ..Arc::try_unwrap(secrets(Inject::Placeholder))
                .unwrap()
                .remove(0)
        }]);
        let mut bound = GuestBytes::for_connection(&secrets, "api.example.com", 80, true);
        let blocked = bound.pass(&head(PLACEHOLDER)).unwrap_err();
        assert_eq!(blocked.reason, "secret_not_a_header_value");
    }
}
