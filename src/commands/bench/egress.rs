//! `mvm bench egress`: a guest's HTTP through its egress proxy — the agent's proxy in the
//! guest, the agent channel, the runner's relay, a host socket — against the same fetch
//! without the proxy path, alternately in one run.
//!
//! The bench serves the HTTP itself, on the granted address: `/small` answers [`SMALL`],
//! `/bulk` the run's size in zero bytes. Each round times, on one control-socket connection:
//!
//! - `/small` fetched by a guest command (`busybox wget -Y on -O /dev/null`) through the
//!   proxy; the same command (`-Y off`) fetching the same bytes from `busybox httpd` the bench
//!   starts on the guest's loopback — the same exec, fork and HTTP without the proxy path, so
//!   the difference is what the proxy path adds; and the host fetching `/small` directly;
//! - `/bulk` fetched by the guest's wget through the proxy; the same number of bytes as a
//!   command's standard output (`busybox dd if=/dev/zero`, discarded: the raw agent channel);
//!   and the host fetching `/bulk` directly.
//!
//! busybox wget reads `http_proxy` and ignores `no_proxy`, so `-Y` says which path it takes.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mvm_ir::terminal::{printable, Newlines};
use mvm_protocol::{ExecRequest, Request, Response};
use mvm_runner::client::{AgentClient, OutputSink};
use serde_json::{json, Value};

use super::copy::{run, run_into};
use super::exec::{percentile, Discard};
use crate::commands::vm::{agent_error, connect};

/// What `/small` answers, from the bench's server and from the guest's own alike.
const SMALL: &str = "mvm bench egress\n";
/// The guest's own server, on its loopback (the baseline of the small fetch).
const GUEST_ADDRESS: &str = "127.0.0.1:8089";
/// Its document root, in guest memory.
const GUEST_ROOT: &str = "/tmp/mvm-bench-egress";
/// How long the guest's server may run at most, should the bench never stop it.
const GUEST_SERVER_LIMIT: Duration = Duration::from_secs(3600);
/// How long the guest's server may take to answer once started.
const GUEST_SERVER_START: Duration = Duration::from_secs(10);
/// Untimed rounds of the small fetches first: the first fork of wget, the first connections.
const WARM_UP: usize = 3;
/// How long a small fetch, or a request head to the bench's server, may take.
const SMALL_LIMIT: Duration = Duration::from_secs(60);
/// Request heads the bench's server reads, at most.
const MAX_HEAD: usize = 16 << 10;
/// Output of a failed guest command kept for its error.
const KEPT_OUTPUT: usize = 4 << 10;

/// Latency of a small fetch and MB/s of a bulk one by the running VM `name` through its
/// egress proxy to `host` (served here), against the same without the proxy path.
pub fn egress(
    name: &str,
    host: SocketAddr,
    runs: usize,
    size_mib: u64,
) -> anyhow::Result<(Value, String)> {
    if host.port() == 0 {
        bail!("--host {host}: name the port the VM is granted, not 0");
    }
    let size = size_mib << 20;
    let server = Server::start(host, size)?;
    let mut client = connect(name, Default::default())?;
    let urls = [
        format!("http://{host}/small"),
        format!("http://{host}/bulk"),
    ];
    let (small_proxied, bulk_proxied) = (wget("on", &urls[0]), wget("on", &urls[1]));
    let guest_url = format!("http://{GUEST_ADDRESS}/small");
    let small_guest = wget("off", &guest_url);
    let count = format!("count={size_mib}");
    let raw = ["busybox", "dd", "if=/dev/zero", "bs=1M", &count];
    let bulk_limit = SMALL_LIMIT + Duration::from_secs(size_mib);

    // The grant first: the fetch must succeed, and through the proxy to this server (a VM
    // without grants has no proxy: its wget would try the guest's own loopback).
    let before = server.small_served.load(Ordering::Relaxed);
    let mut output = Kept::default();
    run_into(&mut client, &small_proxied, None, SMALL_LIMIT, &mut output).with_context(|| {
        format!(
            "{name} could not fetch {} through its egress proxy ({}); start it with a grant \
             of {host} (`mvm up … --allow-host {host}`), which the operator lists in \
             `[egress] allow_private` of $MVM_HOME/config.toml when it is a loopback or \
             private address",
            urls[0],
            output.text()
        )
    })?;
    if server.small_served.load(Ordering::Relaxed) == before {
        bail!(
            "{name} fetched {} without reaching this host's server on {host}: the VM has no \
             egress proxy (start it with `--allow-host {host}`)",
            urls[0]
        );
    }

    let guest = GuestServer::start(&mut client, &small_guest)?;
    let mut small: [Vec<f64>; 3] = Default::default();
    let mut bulk: [Vec<f64>; 3] = Default::default();
    let mb = size as f64 / 1e6;
    let mut measure = |client: &mut AgentClient| -> anyhow::Result<()> {
        for round in 0..WARM_UP + runs {
            let started = Instant::now();
            run(client, &small_proxied, None, SMALL_LIMIT)?;
            let proxy = started.elapsed();
            let started = Instant::now();
            run(client, &small_guest, None, SMALL_LIMIT)?;
            let guest = started.elapsed();
            let started = Instant::now();
            server.fetch_directly("/small", SMALL.len() as u64)?;
            let direct = started.elapsed();
            if round < WARM_UP {
                continue;
            }
            for (samples, took) in small.iter_mut().zip([proxy, guest, direct]) {
                samples.push(took.as_secs_f64() * 1000.0);
            }

            let started = Instant::now();
            run(client, &bulk_proxied, None, bulk_limit)?;
            bulk[0].push(mb / started.elapsed().as_secs_f64());
            let started = Instant::now();
            run(client, &raw, None, bulk_limit)?;
            bulk[1].push(mb / started.elapsed().as_secs_f64());
            let started = Instant::now();
            server.fetch_directly("/bulk", size)?;
            bulk[2].push(mb / started.elapsed().as_secs_f64());
        }
        Ok(())
    };
    let measured = measure(&mut client);
    let stopped = guest.stop(&mut client);
    measured?;
    stopped?;

    let p = |samples: &[f64]| (percentile(samples, 50), percentile(samples, 99));
    let [(proxy_p50, proxy_p99), (guest_p50, guest_p99), (direct_p50, direct_p99)] =
        small.each_ref().map(|s| p(s));
    let [bulk_proxy, bulk_raw, bulk_direct] = bulk.each_ref().map(|s| percentile(s, 50));
    let (added, ratio) = (proxy_p50 - guest_p50, proxy_p50 / guest_p50);
    let (ratio_raw, ratio_direct) = (bulk_proxy / bulk_raw, bulk_proxy / bulk_direct);
    let value = json!({
        "vm": name,
        "host": host.to_string(),
        "runs": runs,
        "warm_up": WARM_UP,
        "size_mib": size_mib,
        "small_ms": {
            "proxy": {"p50": proxy_p50, "p99": proxy_p99},
            "guest_loopback": {"p50": guest_p50, "p99": guest_p99},
            "host_direct": {"p50": direct_p50, "p99": direct_p99},
            "added_p50": added,
            "ratio_p50": ratio,
        },
        "bulk_mb_s": {
            "proxy": bulk_proxy,
            "raw_channel": bulk_raw,
            "host_direct": bulk_direct,
            "ratio_raw": ratio_raw,
            "ratio_host": ratio_direct,
        },
    });
    let small_bytes = SMALL.len();
    let text = format!(
        "egress of {name} to {host}, {runs} rounds after {WARM_UP} warm-up, alternately:\n\
         /small ({small_bytes} bytes), a guest command's round trip (busybox wget):\n\
         \x20 through the proxy:                    p50 {proxy_p50:.2} ms, p99 {proxy_p99:.2} ms\n\
         \x20 from busybox httpd on guest loopback: p50 {guest_p50:.2} ms, p99 {guest_p99:.2} ms\n\
         \x20 the proxy path adds {added:.2} ms (p50), ratio {ratio:.2}\n\
         /small fetched by the host directly:      p50 {direct_p50:.3} ms, p99 {direct_p99:.3} ms\n\
         /bulk ({size_mib} MiB), medians:\n\
         \x20 guest wget through the proxy:         {bulk_proxy:.1} MB/s\n\
         \x20 raw agent channel (dd to stdout):     {bulk_raw:.1} MB/s, proxy/raw {ratio_raw:.2}\n\
         \x20 the host fetching it directly:        {bulk_direct:.1} MB/s, proxy/host {ratio_direct:.3}"
    );
    Ok((value, text))
}

/// The guest command fetching `url` to /dev/null, through the proxy or not (`-Y on|off`).
fn wget<'a>(proxy: &'a str, url: &'a str) -> [&'a str; 8] {
    ["busybox", "wget", "-q", "-Y", proxy, "-O", "/dev/null", url]
}

/// The bench's HTTP/1.0 server on the granted address: `/small` answers [`SMALL`], `/bulk`
/// `bulk` zero bytes, anything else 404; a thread per connection. It serves until the
/// process ends.
struct Server {
    address: SocketAddr,
    /// `/small` requests it has answered.
    small_served: Arc<AtomicU64>,
}

impl Server {
    fn start(address: SocketAddr, bulk: u64) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(address)
            .with_context(|| format!("cannot serve HTTP on {address} (is the port taken?)"))?;
        let address = listener.local_addr()?;
        let small_served = Arc::new(AtomicU64::new(0));
        let served = Arc::clone(&small_served);
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let served = Arc::clone(&served);
                std::thread::spawn(move || answer(client, bulk, &served));
            }
        });
        Ok(Self {
            address,
            small_served,
        })
    }

    /// `GET path` from this server as a host client, checking that `length` bytes came.
    fn fetch_directly(&self, path: &str, length: u64) -> anyhow::Result<()> {
        let fetched = || -> io::Result<(String, u64)> {
            let stream = TcpStream::connect(self.address)?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(SMALL_LIMIT))?;
            let request = format!("GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", self.address);
            (&stream).write_all(request.as_bytes())?;
            let mut response = BufReader::new(stream);
            let mut status = String::new();
            response.read_line(&mut status)?;
            let mut header = String::new();
            while response.read_line(&mut header)? > 2 {
                header.clear();
            }
            Ok((status, io::copy(&mut response, &mut io::sink())?))
        };
        let (status, body) =
            fetched().with_context(|| format!("fetching http://{}{path}", self.address))?;
        if !status.starts_with("HTTP/1.0 200 ") || body != length {
            bail!(
                "fetching http://{}{path}: {:?} and {body} bytes, not 200 and {length}",
                self.address,
                status.trim_end()
            );
        }
        Ok(())
    }
}

/// Answers one request on `client`.
fn answer(mut client: TcpStream, bulk: u64, small_served: &AtomicU64) -> io::Result<()> {
    client.set_nodelay(true)?;
    client.set_read_timeout(Some(SMALL_LIMIT))?;
    // The whole head is read: a socket closed with bytes unread would reset the connection,
    // and the answer with it.
    let mut head = Vec::new();
    let mut buffer = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return Err(io::ErrorKind::InvalidData.into());
        }
        let read = client.read(&mut buffer)?;
        if read == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&buffer[..read]);
    }
    let header = |status: &str, length: u64| {
        format!("HTTP/1.0 {status}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n")
    };
    match head.split(|&b| b == b' ').nth(1).unwrap_or_default() {
        b"/small" => {
            small_served.fetch_add(1, Ordering::Relaxed);
            let response = header("200 OK", SMALL.len() as u64) + SMALL;
            client.write_all(response.as_bytes())
        }
        b"/bulk" => {
            client.write_all(header("200 OK", bulk).as_bytes())?;
            let block = [0u8; 64 << 10];
            let mut left = bulk;
            while left > 0 {
                let now = left.min(block.len() as u64);
                client.write_all(&block[..now as usize])?;
                left -= now;
            }
            Ok(())
        }
        _ => client.write_all(header("404 Not Found", 0).as_bytes()),
    }
}

/// The baseline's server: `busybox httpd` serving [`SMALL`] on the guest's loopback, a
/// background command of the agent.
struct GuestServer {
    handle: u64,
}

impl GuestServer {
    /// Starts it, and waits until `fetch` (a guest command) gets its answer.
    fn start(client: &mut AgentClient, fetch: &[&str]) -> anyhow::Result<Self> {
        let script = r#"busybox mkdir -p "$0" && printf %s "$1" > "$0/small""#;
        run(
            client,
            &["busybox", "sh", "-c", script, GUEST_ROOT, SMALL],
            None,
            SMALL_LIMIT,
        )
        .context("writing the guest server's file")?;
        let argv = [
            "busybox",
            "httpd",
            "-f",
            "-p",
            GUEST_ADDRESS,
            "-h",
            GUEST_ROOT,
        ];
        let request = ExecRequest {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            env: Default::default(),
            cwd: None,
            timeout_ms: GUEST_SERVER_LIMIT.as_millis() as u64,
            stdin: false,
            user: None,
            tty: None,
        };
        let handle = match client
            .call(&Request::Spawn(request), SMALL_LIMIT, None)
            .map_err(agent_error)?
        {
            Response::Spawned { handle, .. } => handle,
            other => bail!("unexpected answer to starting {argv:?}: {other:?}"),
        };
        let server = Self { handle };
        // It may not listen yet; it ends at once when it cannot.
        let deadline = Instant::now() + GUEST_SERVER_START;
        let mut output = Kept::default();
        let state = loop {
            if run(client, fetch, None, SMALL_LIMIT).is_ok() {
                return Ok(server);
            }
            let look = Request::Wait {
                handle,
                timeout_ms: 0,
            };
            match client.call(&look, SMALL_LIMIT, Some(&mut output)) {
                Ok(Response::Wait(info)) => match info.status {
                    Some(status) => break format!("ended ({status:?})"),
                    None if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(100))
                    }
                    None => break "runs but does not answer".to_string(),
                },
                Ok(other) => break format!("is unknown to the agent ({other:?})"),
                Err(e) => break format!("is unknown to the agent ({e})"),
            }
        };
        let _ = server.stop(client);
        bail!(
            "the guest's own server for the baseline ({argv:?}, fetched with {fetch:?}) {state} \
             ({}); the image needs busybox with httpd and wget, and {GUEST_ADDRESS} free",
            output.text()
        )
    }

    /// Stops it and removes its file.
    fn stop(self, client: &mut AgentClient) -> anyhow::Result<()> {
        const SIGTERM: i32 = 15;
        let handle = self.handle;
        // It may have ended already; the wait tells.
        let kill = Request::Kill {
            handle,
            signal: SIGTERM,
        };
        let _ = client.call(&kill, SMALL_LIMIT, None);
        let wait = Request::Wait {
            handle,
            timeout_ms: 10_000,
        };
        let waited = match client.call(&wait, SMALL_LIMIT, Some(&mut Discard)) {
            Ok(Response::Wait(info)) if info.status.is_some() => Ok(()),
            Ok(other) => Err(anyhow::anyhow!(
                "the guest's busybox httpd did not stop: {other:?}"
            )),
            Err(e) => Err(agent_error(e)),
        };
        let removed = run(
            client,
            &["busybox", "rm", "-rf", GUEST_ROOT],
            None,
            SMALL_LIMIT,
        );
        waited.and(removed)
    }
}

/// The first [`KEPT_OUTPUT`] bytes of a command's output, both streams, for an error.
#[derive(Default)]
struct Kept(Vec<u8>);

impl Kept {
    fn text(&self) -> String {
        let text = String::from_utf8_lossy(&self.0);
        match text.trim() {
            "" => "no output".into(),
            text => printable(text, Newlines::Escape).into_owned(),
        }
    }
}

impl OutputSink for Kept {
    fn stdout(&mut self, bytes: &[u8]) -> io::Result<()> {
        let room = KEPT_OUTPUT.saturating_sub(self.0.len());
        self.0.extend_from_slice(&bytes[..bytes.len().min(room)]);
        Ok(())
    }

    fn stderr(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stdout(bytes)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::atomic::Ordering;

    use super::{Server, SMALL};

    #[test]
    fn the_server_answers_small_and_bulk_and_counts_small() {
        let bulk = (3 << 20) + 5;
        let server = Server::start((Ipv4Addr::LOCALHOST, 0).into(), bulk).unwrap();
        server.fetch_directly("/small", SMALL.len() as u64).unwrap();
        server.fetch_directly("/bulk", bulk).unwrap();
        assert_eq!(server.small_served.load(Ordering::Relaxed), 1);
        // A short body, or any other path, is an error.
        assert!(server.fetch_directly("/bulk", bulk + 1).is_err());
        assert!(server.fetch_directly("/other", 0).is_err());
        // The address is taken now.
        assert!(Server::start(server.address, bulk).is_err());
    }
}
