//! Forwarded ports: a host socket carried to a port inside the guest.
//!
//! The guest has no network device, so a forwarded port is the runner's: it listens on the
//! host (loopback unless the operator's `[ports] listen` in `$MVM_HOME/config.toml` names
//! another address), and carries each connection it accepts as a `connect` exchange on the
//! agent channel, to which the agent answers by connecting to `127.0.0.1:GUEST_PORT` inside
//! the guest. The listeners are bound before the runner confines itself and live on threads
//! that end with the VM: a listener never outlives its VM.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use mvm_ir::audit::HostAudit;
use mvm_ir::home::MvmHome;
use mvm_ir::{Coded, ErrorClass};
use mvm_protocol::{FrameKind, Request};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::codes;
use crate::mux::AgentMux;

/// The file in a named VM's directory listing its forwarded ports (`mvm port ls`).
pub const PORTS_FILE: &str = "ports.json";
/// How often an idle listener looks whether its VM still runs.
const ACCEPT_POLL: Duration = Duration::from_millis(100);
/// How long a connection waits for the guest's side to take its bytes.
const READ_SLICE: Duration = Duration::from_secs(1);

/// One forwarded port: `[ADDRESS:]HOST_PORT:GUEST_PORT` on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    /// Where the host listens.
    pub address: IpAddr,
    /// The host port; 0 picks a free one.
    pub host: u16,
    /// The guest's port, on its loopback.
    pub guest: u16,
}

impl PortSpec {
    /// Reads `[ADDRESS:]HOST_PORT:GUEST_PORT` (an IPv6 address in brackets); the address is
    /// `127.0.0.1` when absent.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (rest, guest) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("{text:?} is not [ADDRESS:]HOST_PORT:GUEST_PORT"))?;
        let (address, host) = match rest.rsplit_once(':') {
            Some((address, host)) => {
                let address = address.trim_start_matches('[').trim_end_matches(']');
                let address = address
                    .parse()
                    .map_err(|_| format!("{address:?} is not an IP address"))?;
                (address, host)
            }
            None => (IpAddr::V4(Ipv4Addr::LOCALHOST), rest),
        };
        let port = |text: &str| {
            text.parse::<u16>()
                .map_err(|_| format!("{text:?} is not a port"))
        };
        let guest = port(guest)?;
        if guest == 0 {
            return Err("the guest port cannot be 0".into());
        }
        Ok(Self {
            address,
            host: port(host)?,
            guest,
        })
    }
}

/// Why a port could not be forwarded (RUN058): the VM does not start.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The address is not loopback and the operator does not list it.
    #[error("{0} is not a loopback address and `[ports] listen` in config.toml does not list it")]
    NotAllowed(IpAddr),
    /// The operator's `[ports]` section is malformed.
    #[error("config.toml [ports]: {0}")]
    Config(String),
    /// The host port could not be listened on.
    #[error("listening on {address}: {source}")]
    Bind {
        /// The address and port.
        address: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
}

impl Coded for ForwardError {
    fn code(&self) -> &str {
        codes::RUN058
    }

    fn class(&self) -> ErrorClass {
        match self {
            ForwardError::Bind { .. } => ErrorClass::Io,
            _ => ErrorClass::InvalidInput,
        }
    }
}

/// A listening forwarded port.
#[derive(Debug)]
pub struct Bound {
    listener: TcpListener,
    /// What it forwards, with the host port it got.
    pub spec: PortSpec,
}

/// Binds every spec's host socket, refusing an address that is not loopback unless the
/// operator lists it (`[ports] listen = ["0.0.0.0"]` in `$MVM_HOME/config.toml`).
pub fn bind(home: &MvmHome, specs: &[PortSpec]) -> Result<Vec<Bound>, ForwardError> {
    if specs.is_empty() {
        return Ok(Vec::new());
    }
    let allowed = listen_addresses(home)?;
    specs
        .iter()
        .map(|spec| {
            if !spec.address.is_loopback() && !allowed.contains(&spec.address) {
                return Err(ForwardError::NotAllowed(spec.address));
            }
            let address = SocketAddr::new(spec.address, spec.host);
            let bind_error = |source| ForwardError::Bind { address, source };
            let listener = TcpListener::bind(address).map_err(bind_error)?;
            listener.set_nonblocking(true).map_err(bind_error)?;
            let host = listener.local_addr().map_err(bind_error)?.port();
            Ok(Bound {
                listener,
                spec: PortSpec { host, ..*spec },
            })
        })
        .collect()
}

/// The addresses besides loopback the operator lets forwarded ports listen on.
fn listen_addresses(home: &MvmHome) -> Result<Vec<IpAddr>, ForwardError> {
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        ports: Option<Section>,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Section {
        #[serde(default)]
        listen: Vec<IpAddr>,
    }
    let path = home.root().join("config.toml");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ForwardError::Config(e.to_string())),
    };
    let file: File =
        toml::from_str(&text).map_err(|e| ForwardError::Config(e.message().to_string()))?;
    Ok(file.ports.map(|s| s.listen).unwrap_or_default())
}

/// Writes the forwarded ports to the VM's directory, for `mvm port ls`.
pub fn record(dir: &Path, bound: &[Bound]) -> io::Result<()> {
    let specs: Vec<PortSpec> = bound.iter().map(|b| b.spec).collect();
    let bytes = serde_json::to_vec(&specs).map_err(io::Error::other)?;
    mvm_ir::fsutil::atomic_write(&dir.join(PORTS_FILE), &bytes, 0o600)
        .map_err(|e| io::Error::other(e.to_string()))
}

/// The forwarded ports a VM's directory lists.
pub fn recorded(dir: &Path) -> Vec<PortSpec> {
    mvm_ir::fsutil::read_capped(&dir.join(PORTS_FILE), 1024 * 1024, "ports")
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

/// The listeners' threads: stopped (and joined) when dropped.
pub struct Forwarding {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Serves each bound port on a thread of its own until the returned [`Forwarding`] is
/// dropped or the agent channel closes; each accepted connection is recorded
/// (`port.accepted`) and carried on a thread of its own.
pub fn serve(
    bound: Vec<Bound>,
    mux: &Arc<AgentMux>,
    audit: &Arc<HostAudit>,
    vm: &str,
) -> io::Result<Forwarding> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for port in bound {
        let (mux, audit, stop) = (Arc::clone(mux), Arc::clone(audit), Arc::clone(&stop));
        let vm = vm.to_string();
        threads.push(
            std::thread::Builder::new()
                .name("port".into())
                .spawn(move || accept_loop(port, &mux, &audit, &vm, &stop))?,
        );
    }
    Ok(Forwarding { stop, threads })
}

fn accept_loop(port: Bound, mux: &Arc<AgentMux>, audit: &HostAudit, vm: &str, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) && !mux.is_closed() {
        let (client, peer) = match port.listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
            Err(_) => {
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
        };
        let entry = json!({
            "vm": vm, "host_port": port.spec.host, "guest_port": port.spec.guest,
            "peer": peer.to_string(),
        });
        if audit.append("port.accepted", entry).is_err() {
            // No evidence, no connection.
            continue;
        }
        let mux = Arc::clone(mux);
        let guest = port.spec.guest;
        let _ = std::thread::Builder::new()
            .name("port-conn".into())
            .spawn(move || carry(client, guest, &mux));
    }
}

/// Carries one accepted connection to the guest's port until both directions end or either
/// side fails.
fn carry(client: TcpStream, guest: u16, mux: &AgentMux) {
    let Ok(mut exchange) = mux.request(&Request::Connect { port: guest }) else {
        return;
    };
    let stream = exchange.stream();
    let Ok(mut reading) = client.try_clone() else {
        return;
    };
    let _ = client.set_read_timeout(None);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut buffer = vec![0; 64 * 1024];
            loop {
                match reading.read(&mut buffer) {
                    Ok(0) => {
                        let _ = mux.send_data(stream, &[]);
                        return;
                    }
                    Ok(n) => {
                        if mux.send_data(stream, &buffer[..n]).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        });
        let mut writing = &client;
        loop {
            let Some(frame) = exchange.next_frame_within(READ_SLICE) else {
                if mux.is_closed() {
                    break;
                }
                continue;
            };
            match frame.kind {
                FrameKind::Data if frame.payload.is_empty() => {
                    let _ = client.shutdown(Shutdown::Write);
                }
                FrameKind::Data => {
                    if writing.write_all(&frame.payload).is_err() {
                        break;
                    }
                }
                // The answer: the guest's side has ended (or never connected).
                _ => break,
            }
        }
        // Ends the reading side too.
        let _ = client.shutdown(Shutdown::Both);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_specs_read_as_docker_writes_them() {
        let spec = |text| PortSpec::parse(text);
        assert_eq!(
            spec("8080:80").unwrap(),
            PortSpec {
                address: IpAddr::V4(Ipv4Addr::LOCALHOST),
                host: 8080,
                guest: 80
            }
        );
        assert_eq!(spec("0.0.0.0:0:80").unwrap().address.to_string(), "0.0.0.0");
        assert_eq!(spec("[::1]:8080:80").unwrap().address.to_string(), "::1");
        for bad in ["80", "x:80", "8080:0", "1.2.3:8080:80", "8080:70000"] {
            assert!(spec(bad).is_err(), "{bad}");
        }
    }
}
