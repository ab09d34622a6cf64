//! HTTPS to a host a secret is bound to: the runner ends the guest's TLS itself, puts the
//! value into the request, and opens TLS of its own to the real host.
//!
//! **The per-VM CA.** At launch, when the launch has bound secrets, the runner makes a CA of
//! its own (ECDSA P-256) whose certificate is *name-constrained* (RFC 5280 §4.2.1.10) to the
//! bound names, and one leaf certificate per bound name signed by it. The CA's key lives only
//! in this runner's memory and dies with it: it is never written anywhere. The guest is given
//! the CA's certificate ([`mvm_protocol::Request::TrustCa`]), so that its clients accept the
//! leaves; a client that checks name constraints rejects a certificate from this CA for any
//! other name, and the runner terminates no other name anyway.
//!
//! **Which connections.** Only a `CONNECT` (or SOCKS5) to a bound host *name* and port, whose
//! ClientHello named that host (checked before, [`crate::egress::sni`]). Every other TLS
//! connection is relayed end to end, untouched — a secret bound to an address is put into
//! plain HTTP only (a client names no host in its ClientHello for an address).
//!
//! **The far end.** The runner's own TLS client checks the real host's certificate against
//! the system's CAs (`/etc/ssl/certs/ca-certificates.crt`) and the operator's `[egress]
//! tls_trust`: a host that cannot prove its name gets no value. Both sides speak HTTP/1.1
//! (ALPN), one request per connection: the request's head gets the value
//! ([`super::egress::HeadRewrite`]) and `Connection: close`; the rest is relayed as it comes.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, GeneralSubtree, IsCa, KeyPair,
    KeyUsagePurpose, NameConstraints,
};
use rustls::crypto::ring::default_provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::ResolvesServerCertUsingSni;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

use super::egress::{Blocked, GuestBytes};
use super::BoundSecret;
use crate::mux::{ConnectionSender, Exchange};
use mvm_protocol::FrameKind;

/// The system's CA bundle on Debian and its derivatives.
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Bytes read from the far end at a time.
const CHUNK: usize = 32 * 1024;

/// The TLS both ways of a launch's bound hosts.
pub struct Terminator {
    /// The bound DNS names (an address has no name to put in a certificate a client checks).
    names: Vec<String>,
    ca_pem: String,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl std::fmt::Debug for Terminator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Terminator")
    }
}

impl Terminator {
    /// The CA and leaves for `secrets`' bound names, and the client trusting the system's
    /// CAs and `trust` (PEM files); `None` when nothing is bound.
    pub fn new(
        secrets: &[BoundSecret],
        trust: &[std::path::PathBuf],
    ) -> Result<Option<Self>, String> {
        let mut names: Vec<String> = secrets
            .iter()
            .flat_map(|s| s.bindings.iter().map(|b| b.host.clone()))
            .filter(|host| host.parse::<std::net::IpAddr>().is_err())
            .collect();
        names.sort();
        names.dedup();
        if names.is_empty() {
            return Ok(None);
        }
        fn failed(what: &'static str) -> impl Fn(rcgen::Error) -> String {
            move |e| format!("{what}: {e}")
        }
        let ca_key = KeyPair::generate().map_err(failed("the VM's CA key"))?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(failed("the VM's CA"))?;
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, "mvm per-VM egress CA");
        ca.distinguished_name = subject;
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.name_constraints = Some(NameConstraints {
            permitted_subtrees: names.iter().cloned().map(GeneralSubtree::DnsName).collect(),
            excluded_subtrees: Vec::new(),
        });
        let ca_cert = ca.self_signed(&ca_key).map_err(failed("the VM's CA"))?;

        let provider = Arc::new(default_provider());
        let mut resolver = ResolvesServerCertUsingSni::new();
        for name in &names {
            let key = KeyPair::generate().map_err(failed("a leaf key"))?;
            let leaf = CertificateParams::new(vec![name.clone()])
                .and_then(|params| params.signed_by(&key, &ca_cert, &ca_key))
                .map_err(failed("a leaf certificate"))?;
            let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            let signing = provider
                .key_provider
                .load_private_key(der)
                .map_err(|e| format!("a leaf key: {e}"))?;
            let chain = vec![leaf.der().clone()];
            resolver
                .add(name, CertifiedKey::new(chain, signing))
                .map_err(|e| format!("{name}: {e}"))?;
        }
        let mut server = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver));
        server.alpn_protocols = vec![b"http/1.1".to_vec()];

        let mut roots = RootCertStore::empty();
        let mut files: Vec<&std::path::Path> = trust.iter().map(|p| p.as_path()).collect();
        let system = std::path::Path::new(SYSTEM_BUNDLE);
        if system.exists() {
            files.push(system);
        }
        for file in files {
            let certs = CertificateDer::pem_file_iter(file)
                .map_err(|e| format!("{}: {e}", file.display()))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("{}: {e}", file.display()))?;
                // A bundle may hold a certificate webpki cannot use; the others still count.
                let _ = roots.add(cert);
            }
        }
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(Self {
            names,
            ca_pem: ca_cert.pem(),
            server: Arc::new(server),
            client: Arc::new(client),
        }))
    }

    /// Whether TLS to `host` is ended here: it is a bound name.
    pub fn ends(&self, host: &str) -> bool {
        self.names.iter().any(|name| name == host)
    }

    /// The CA's certificate, for the guest's trust store.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Carries one connection to `host`: the guest's TLS ended here, the request's head given
    /// the values by `filter`, TLS of our own to `far`. Returns the plaintext bytes sent and
    /// received, and why it was stopped, if it was.
    pub fn carry(
        &self,
        guest_end: GuestEnd<'_>,
        far: TcpStream,
        host: &str,
        mut filter: GuestBytes,
        idle_timeout: Duration,
    ) -> (u64, u64, Option<Blocked>) {
        let GuestEnd {
            mut exchange,
            sender,
            held,
        } = guest_end;
        let stop = |reason| {
            Some(Blocked {
                reason,
                secret: None,
            })
        };
        let guest = ServerConnection::new(Arc::clone(&self.server));
        let name = ServerName::try_from(host.to_string());
        let (Ok(guest), Ok(name)) = (guest, name) else {
            sender.close();
            return (0, 0, stop("tls_setup"));
        };
        let Ok(upstream) = ClientConnection::new(Arc::clone(&self.client), name) else {
            sender.close();
            return (0, 0, stop("tls_setup"));
        };
        let _ = far.set_read_timeout(Some(idle_timeout));
        let pair = Arc::new(Mutex::new(Pair {
            guest,
            upstream,
            sent: 0,
            received: 0,
        }));
        let Ok(far_reader) = far.try_clone() else {
            sender.close();
            return (0, 0, None);
        };
        let upstream_thread = {
            let (pair, sender) = (Arc::clone(&pair), sender.clone());
            let far = far.try_clone();
            std::thread::spawn(move || match far {
                Ok(far) => far_to_guest(&pair, &sender, far_reader, &far),
                Err(_) => Some(Blocked {
                    reason: "tls_setup",
                    secret: None,
                }),
            })
        };
        let mut blocked = feed_guest(&pair, &sender, &far, held, &mut filter).err();
        let mut guest_ended = false;
        while blocked.is_none() {
            let Some(frame) = exchange.next_frame_within(idle_timeout) else {
                // Idle, or the guest's side is gone.
                break;
            };
            let fed = match frame.kind {
                FrameKind::Data if frame.payload.is_empty() => {
                    let mut pair = lock(&pair);
                    pair.upstream.send_close_notify();
                    let _ = flush(&mut pair, &sender, &far);
                    let _ = far.shutdown(Shutdown::Write);
                    guest_ended = true;
                    break;
                }
                FrameKind::Data => feed_guest(&pair, &sender, &far, &frame.payload, &mut filter),
                _ => break,
            };
            if let Err(why) = fed {
                blocked = Some(why);
            }
        }
        if blocked.is_some() || !guest_ended {
            sender.close();
            let _ = far.shutdown(Shutdown::Both);
        }
        let far_blocked = upstream_thread.join().unwrap_or(None);
        let _ = far.shutdown(Shutdown::Both);
        drop(exchange);
        let pair = lock(&pair);
        (pair.sent, pair.received, blocked.or(far_blocked))
    }
}

/// The guest's side of a carried connection.
pub struct GuestEnd<'a> {
    /// The frames the guest sends on the connection.
    pub exchange: Exchange,
    /// Frames toward the guest.
    pub sender: ConnectionSender,
    /// The first bytes the guest sent, held while its request was judged.
    pub held: &'a [u8],
}

/// Both TLS connections of one carried connection.
struct Pair {
    guest: ServerConnection,
    upstream: ClientConnection,
    sent: u64,
    received: u64,
}

fn lock(pair: &Mutex<Pair>) -> std::sync::MutexGuard<'_, Pair> {
    pair.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Sends what either connection has to send: records to the guest, records to the far end.
fn flush(pair: &mut Pair, sender: &ConnectionSender, far: &TcpStream) -> io::Result<()> {
    let mut to_guest = Vec::new();
    while pair.guest.wants_write() {
        pair.guest.write_tls(&mut to_guest)?;
    }
    for chunk in to_guest.chunks(CHUNK) {
        sender.send(chunk).map_err(io::Error::other)?;
    }
    let mut to_far = Vec::new();
    while pair.upstream.wants_write() {
        pair.upstream.write_tls(&mut to_far)?;
    }
    (&*far).write_all(&to_far)
}

/// Takes the guest's TLS bytes: handshake, then its plaintext through `filter` to the far end.
fn feed_guest(
    pair: &Mutex<Pair>,
    sender: &ConnectionSender,
    far: &TcpStream,
    bytes: &[u8],
    filter: &mut GuestBytes,
) -> Result<(), Blocked> {
    let tls_failed = |reason| Blocked {
        reason,
        secret: None,
    };
    let mut pair = lock(pair);
    let mut rest = bytes;
    let mut plain = Vec::new();
    while !rest.is_empty() {
        pair.guest
            .read_tls(&mut rest)
            .map_err(|_| tls_failed("guest_tls"))?;
        if pair.guest.process_new_packets().is_err() {
            let _ = flush(&mut pair, sender, far);
            return Err(tls_failed("guest_tls"));
        }
        drain(pair.guest.reader(), &mut plain);
    }
    if !plain.is_empty() {
        let out = filter.pass(&plain)?;
        pair.sent += out.len() as u64;
        pair.upstream
            .writer()
            .write_all(&out)
            .map_err(|_| tls_failed("far_tls"))?;
    }
    flush(&mut pair, sender, far).map_err(|_| tls_failed("far_closed"))
}

/// Carries the far end's TLS, decrypted and encrypted again for the guest, until it ends.
fn far_to_guest(
    pair: &Mutex<Pair>,
    sender: &ConnectionSender,
    mut far_reader: TcpStream,
    far: &TcpStream,
) -> Option<Blocked> {
    let mut buffer = vec![0u8; CHUNK];
    loop {
        let n = match far_reader.read(&mut buffer) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        let mut pair = lock(pair);
        let mut rest = &buffer[..n];
        let mut plain = Vec::new();
        loop {
            if pair.upstream.read_tls(&mut rest).is_err()
                || pair.upstream.process_new_packets().is_err()
            {
                sender.close();
                // The far end could not prove its name, or broke TLS: nothing went to it that
                // it could read unless it did.
                return Some(Blocked {
                    reason: "far_tls",
                    secret: None,
                });
            }
            drain(pair.upstream.reader(), &mut plain);
            if rest.is_empty() {
                break;
            }
        }
        if !plain.is_empty() {
            pair.received += plain.len() as u64;
            if pair.guest.writer().write_all(&plain).is_err() {
                sender.close();
                return None;
            }
        }
        if n == 0 {
            pair.guest.send_close_notify();
            let _ = flush(&mut pair, sender, far);
            let _ = sender.send(&[]);
            return None;
        }
        if flush(&mut pair, sender, far).is_err() {
            sender.close();
            return None;
        }
    }
}

/// Reads every plaintext byte a connection has now into `out`.
fn drain(mut reader: rustls::Reader<'_>, out: &mut Vec<u8>) {
    let mut buffer = [0u8; 4096];
    loop {
        match reader.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(n) => out.extend_from_slice(&buffer[..n]),
        }
    }
}
