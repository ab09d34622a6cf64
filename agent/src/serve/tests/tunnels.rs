//! The egress proxy and forwarded ports, served over a socket pair: guest clients are TCP
//! clients of the proxy on a free loopback port, the host is the test.

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use mvm_protocol::{OpenRequest, Via, AGENT_STREAMS};

use super::*;
use crate::proxy::request::CONNECT_ESTABLISHED;
use crate::proxy::socks;

/// How long a guest client waits for the proxy before failing.
const CLIENT_PATIENCE: Duration = Duration::from_secs(20);

/// A loopback address nothing listens on (the port was free a moment ago).
fn free_address() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// An agent serving the proxy on a free port; the host and the proxy's address.
fn proxy_host() -> (Host, SocketAddr) {
    let address = free_address();
    let mut host = Host::start_with(ServeConfig {
        proxy_listen: address,
        ..ServeConfig::on_host()
    });
    host.send(1, &Request::ServeProxy);
    assert_eq!(host.exchange(1).2, Response::Done);
    (host, address)
}

fn client(proxy: SocketAddr) -> TcpStream {
    let client = TcpStream::connect(proxy).unwrap();
    client.set_read_timeout(Some(CLIENT_PATIENCE)).unwrap();
    client
}

/// Everything the client reads until the proxy closes.
fn read_to_end(client: &mut TcpStream) -> Vec<u8> {
    let mut bytes = Vec::new();
    client.read_to_end(&mut bytes).unwrap();
    bytes
}

fn read_exactly(client: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    client.read_exact(&mut bytes).unwrap();
    bytes
}

impl Host {
    /// The next open frame: its stream and request.
    fn opened_for(&mut self) -> (u32, OpenRequest) {
        let frame = self.frame();
        assert_eq!(frame.kind, FrameKind::Open, "{frame:?}");
        assert!(is_agent_stream(frame.stream));
        (
            frame.stream,
            serde_json::from_slice(&frame.payload).unwrap(),
        )
    }

    fn respond(&mut self, stream: u32, response: &Response) {
        let payload = serde_json::to_vec(response).unwrap();
        self.write(FrameKind::Response, stream, &payload);
    }

    fn write(&mut self, kind: FrameKind, stream: u32, payload: &[u8]) {
        self.stream
            .write_all(&encode(kind, stream, payload).unwrap())
            .unwrap();
    }

    /// Data frames on `stream` up to its empty one.
    fn data_until_end(&mut self, stream: u32) -> Vec<u8> {
        let mut bytes = Vec::new();
        loop {
            let frame = self.frame();
            assert_eq!((frame.kind, frame.stream), (FrameKind::Data, stream));
            if frame.payload.is_empty() {
                return bytes;
            }
            bytes.extend(frame.payload);
        }
    }

    /// Answers an echo: nothing else (no close, no stray data) came before it.
    fn nothing_pending(&mut self) {
        self.send(2, &Request::Echo);
        assert_eq!(self.exchange(2).2, Response::Echo);
    }
}

fn refused(code: &str) -> Response {
    Response::Error(ErrorReply {
        code: code.into(),
        message: "refused".into(),
    })
}

fn env_request(env: &[(&str, &str)]) -> Request {
    Request::Exec(ExecRequest {
        argv: vec!["env".into()],
        env: env
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
        cwd: None,
        timeout_ms: 10_000,
        stdin: false,
        user: None,
        tty: None,
    })
}

#[test]
fn serve_proxy_points_the_commands_started_after_it_at_the_proxy() {
    let address = free_address();
    let mut host = Host::start_with(ServeConfig {
        proxy_listen: address,
        ..ServeConfig::on_host()
    });
    host.send(3, &env_request(&[]));
    let (before, _, _, _) = host.exchange(3);
    assert!(!String::from_utf8(before).unwrap().contains("proxy"));

    host.send(1, &Request::ServeProxy);
    assert_eq!(host.exchange(1).2, Response::Done);
    host.send(1, &Request::ServeProxy);
    assert_eq!(host.exchange(1).2, Response::Done, "a no-op once serving");
    TcpStream::connect(address).expect("the proxy listens");

    host.send(4, &env_request(&[("HTTPS_PROXY", "http://mine:1")]));
    let (after, _, _, _) = host.exchange(4);
    let after = String::from_utf8(after).unwrap();
    for line in [
        "http_proxy=http://127.0.0.1:3128",
        "HTTP_PROXY=http://127.0.0.1:3128",
        "https_proxy=http://127.0.0.1:3128",
        "HTTPS_PROXY=http://mine:1",
        "ALL_PROXY=http://127.0.0.1:3128",
        "no_proxy=localhost,127.0.0.1,::1",
    ] {
        assert!(after.lines().any(|l| l == line), "{line} in {after}");
    }

    // Another agent cannot listen where this one does: AGENT116.
    let mut second = Host::start_with(ServeConfig {
        proxy_listen: address,
        ..ServeConfig::on_host()
    });
    second.send(1, &Request::ServeProxy);
    assert_eq!(error_code(&second.exchange(1).2), codes::PROXY_LISTEN);
    second.power_off();
    host.power_off();
}

/// Bytes that differ from offset to offset, so a lost or repeated chunk shows.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 24) as u8
        })
        .collect()
}

/// What the host's reading side tells its writing side.
enum Note {
    /// The agent granted this much room.
    Granted(u64),
    /// Hand this much room back to the agent.
    Credit(u64),
}

#[test]
fn a_connect_tunnel_carries_megabytes_each_way_within_the_windows_and_half_closes() {
    const SIZE: usize = 3 * 1024 * 1024 + 12_345;
    let (mut host, proxy) = proxy_host();
    let mut client = client(proxy);
    client
        .write_all(
            b"CONNECT API.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n\r\nearly",
        )
        .unwrap();
    let open = host.frame();
    let stream = open.stream;
    assert_eq!(
        (open.kind, stream),
        (FrameKind::Open, AGENT_STREAMS | 1),
        "the first agent stream"
    );
    assert_eq!(
        String::from_utf8(open.payload).unwrap(),
        r#"{"host":"api.example.com","port":443,"via":"connect"}"#
    );
    host.respond(stream, &Response::Opened);
    assert_eq!(
        read_exactly(&mut client, CONNECT_ESTABLISHED.len()),
        CONNECT_ESTABLISHED
    );

    // The guest client writes its megabytes and half-closes, and reads the host's to the end.
    let upward = pattern(SIZE, 1);
    let downward = pattern(SIZE, 2);
    let mut client_writer = client.try_clone().unwrap();
    let sent = upward.clone();
    let writing = std::thread::spawn(move || {
        client_writer.write_all(&sent).unwrap();
        client_writer.shutdown(Shutdown::Write).unwrap();
    });
    let reading = std::thread::spawn(move || read_to_end(&mut client));

    // The host writes from a thread of its own, within the window the agent grants; its
    // reading side never writes, so neither side can block the other.
    let (notes, noted) = mpsc::channel();
    let down_sent = Arc::new(AtomicBool::new(false));
    let mut host_writer = host.stream.try_clone().unwrap();
    let to_send = downward.clone();
    let sent_all = Arc::clone(&down_sent);
    let host_writing = std::thread::spawn(move || {
        let mut window = flow::SendWindow::default();
        let mut chunks = to_send.chunks(64 * 1024).peekable();
        let mut write = |kind, payload: &[u8]| {
            host_writer
                .write_all(&encode(kind, stream, payload).unwrap())
                .unwrap()
        };
        loop {
            if !sent_all.load(Ordering::SeqCst) {
                match chunks.peek() {
                    Some(chunk) if window.fits(chunk.len()) => {
                        window.spend(chunk.len());
                        write(FrameKind::Data, chunk);
                        chunks.next();
                        continue;
                    }
                    None if window.fits(0) => {
                        write(FrameKind::Data, &[]);
                        sent_all.store(true, Ordering::SeqCst);
                        continue;
                    }
                    _ => {}
                }
            }
            match noted.recv_timeout(Duration::from_secs(20)) {
                Ok(Note::Granted(bytes)) => window.grant(bytes),
                Ok(Note::Credit(bytes)) => write(FrameKind::Credit, &flow::credit_payload(bytes)),
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Err(e) => panic!("the agent granted no room: {e}"),
            }
        }
    });

    // The host's reading side: every data frame within the window it gave; no credit at all
    // until the agent has stopped at a full window, then credit as frames arrive.
    host.stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut window = flow::ReceiveWindow::default();
    let mut withheld = 0u64;
    let mut withholding = true;
    let mut received = Vec::new();
    let mut upward_ended = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(upward_ended && down_sent.load(Ordering::SeqCst)) {
        assert!(Instant::now() < deadline, "the transfer took over a minute");
        let frame = match next_frame_or_silence(&mut host) {
            Some(frame) => frame,
            None if withholding => {
                assert!(
                    withheld > flow::WINDOW - 64 * 1024,
                    "the agent stopped at {withheld} bytes, short of its window"
                );
                withholding = false;
                window.restore(withheld);
                notes.send(Note::Credit(withheld)).unwrap();
                continue;
            }
            // The host's own bytes may still be on their way.
            None => continue,
        };
        match frame.kind {
            FrameKind::Credit => {
                let bytes = flow::parse_credit(&frame.payload).unwrap();
                notes.send(Note::Granted(bytes)).unwrap();
            }
            FrameKind::Data => {
                assert_eq!(frame.stream, stream);
                assert!(
                    window.take(frame.payload.len()),
                    "the agent sent past its window"
                );
                let cost = flow::cost(frame.payload.len());
                if withholding {
                    withheld += cost;
                } else {
                    window.restore(cost);
                    notes.send(Note::Credit(cost)).unwrap();
                }
                assert!(!upward_ended, "data after the end");
                upward_ended = frame.payload.is_empty();
                received.extend(frame.payload);
            }
            other => panic!("a {other:?} frame"),
        }
    }
    assert!(!withholding, "the agent sent it all without any credit");
    writing.join().unwrap();
    let delivered = reading.join().unwrap();
    assert_eq!(received.len(), SIZE + 5);
    assert!(received[..5] == *b"early" && received[5..] == upward[..]);
    assert!(delivered == downward, "{} of {SIZE} bytes", delivered.len());
    drop(notes);
    host_writing.join().unwrap();
    host.stream.set_read_timeout(Some(SILENCE)).unwrap();
    // Both directions ended: the tunnel is gone without a close frame.
    host.nothing_pending();
    host.power_off();
}

/// The next frame, or `None` after the host's read timeout of silence.
fn next_frame_or_silence(host: &mut Host) -> Option<Frame> {
    loop {
        if let Some(frame) = host.decoder.next_frame().unwrap() {
            return Some(frame);
        }
        let mut buffer = [0; 64 * 1024];
        match host.stream.read(&mut buffer) {
            Ok(n) if n > 0 => host.decoder.push(&buffer[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
            read => panic!("the channel closed: {read:?}"),
        }
    }
}

#[test]
fn refusals_reach_the_client_as_http_statuses() {
    let (mut host, proxy) = proxy_host();
    for (code, status) in [
        ("RUN052", "HTTP/1.1 403 "),
        ("RUN056", "HTTP/1.1 502 "),
        ("RUN053", "HTTP/1.1 502 "),
    ] {
        let mut client = client(proxy);
        client
            .write_all(b"CONNECT 10.1.2.3:22 HTTP/1.1\r\n\r\n")
            .unwrap();
        let (stream, open) = host.opened_for();
        assert_eq!((open.host.as_str(), open.port), ("10.1.2.3", 22));
        host.respond(stream, &refused(code));
        let answer = String::from_utf8(read_to_end(&mut client)).unwrap();
        assert!(answer.starts_with(status), "{code}: {answer}");
    }
    host.nothing_pending();
    host.power_off();
}

#[test]
fn a_socks5_client_names_its_target_and_a_host_close_tears_it_down() {
    let (mut host, proxy) = proxy_host();
    let mut client = client(proxy);
    client.write_all(&[5, 1, 0]).unwrap();
    assert_eq!(read_exactly(&mut client, 2), socks::METHOD_SELECTED);
    let mut request = vec![5, 1, 0, 3, 11];
    request.extend_from_slice(b"Example.ORG");
    request.extend_from_slice(&8443u16.to_be_bytes());
    client.write_all(&request).unwrap();
    let (stream, open) = host.opened_for();
    assert_eq!(
        open,
        OpenRequest {
            host: "example.org".into(),
            port: 8443,
            via: Via::Socks,
            malformed: None,
        }
    );
    host.respond(stream, &Response::Opened);
    assert_eq!(read_exactly(&mut client, 10), socks::success());
    client.write_all(b"ping").unwrap();
    let frame = host.frame();
    assert_eq!((frame.kind, frame.stream), (FrameKind::Data, stream));
    assert_eq!(frame.payload, b"ping");
    host.write(FrameKind::Data, stream, b"pong");
    assert_eq!(read_exactly(&mut client, 4), b"pong");

    host.write(FrameKind::Close, stream, &[]);
    let mut rest = Vec::new();
    let ended = client.read_to_end(&mut rest);
    assert!(
        rest.is_empty() && ended.is_ok() || ended.is_err(),
        "the socket ends at once: {ended:?} {rest:?}"
    );
    // Nothing is sent for the stream once the host closed it.
    host.write(FrameKind::Data, stream, b"late");
    host.nothing_pending();

    // An IPv6 literal travels without brackets; a refusal is the SOCKS5 reply for it.
    let mut client = self::client(proxy);
    let mut request = vec![5, 1, 0, 5, 1, 0, 4];
    request.extend_from_slice(
        &"2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    request.extend_from_slice(&443u16.to_be_bytes());
    client.write_all(&request).unwrap();
    assert_eq!(read_exactly(&mut client, 2), socks::METHOD_SELECTED);
    let (stream, open) = host.opened_for();
    assert_eq!((open.host.as_str(), open.via), ("2001:db8::1", Via::Socks));
    host.respond(stream, &refused("RUN057"));
    assert_eq!(
        read_to_end(&mut client),
        socks::Reply::HostUnreachable.encode()
    );
    host.power_off();
}

#[test]
fn a_plain_http_request_goes_to_the_host_rewritten_for_the_origin() {
    let (mut host, proxy) = proxy_host();
    let mut client = client(proxy);
    client
        .write_all(
            b"POST http://example.com/submit?x=1 HTTP/1.1\r\nHost: example.com\r\n\
              Proxy-Connection: keep-alive\r\nContent-Length: 4\r\n\r\nbody",
        )
        .unwrap();
    let (stream, open) = host.opened_for();
    assert_eq!(
        (open.host.as_str(), open.port, open.via),
        ("example.com", 80, Via::Forward)
    );
    host.respond(stream, &Response::Opened);
    let first = host.frame();
    assert_eq!((first.kind, first.stream), (FrameKind::Data, stream));
    assert_eq!(
        first.payload,
        b"POST /submit?x=1 HTTP/1.1\r\nHost: example.com\r\nContent-Length: 4\r\n\
          Connection: close\r\n\r\nbody"
    );
    let response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
    host.write(FrameKind::Data, stream, response);
    host.write(FrameKind::Data, stream, &[]);
    assert_eq!(read_to_end(&mut client), response);
    drop(client);
    assert_eq!(host.data_until_end(stream), b"");
    host.nothing_pending();
    host.power_off();
}

#[test]
fn a_malformed_request_is_answered_by_the_proxy_and_reported_for_the_audit() {
    let (mut host, proxy) = proxy_host();
    let mut client = client(proxy);
    client.write_all(b"GET /path HTTP/1.1\r\n\r\n").unwrap();
    let answer = String::from_utf8(read_to_end(&mut client)).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("PROXY003"), "{answer}");
    let (stream, open) = host.opened_for();
    assert_eq!(
        open,
        OpenRequest {
            host: String::new(),
            port: 0,
            via: Via::Connect,
            malformed: Some("PROXY003".into()),
        }
    );
    // The host's answer is consumed, nothing more happens on the stream.
    host.respond(stream, &refused("RUN053"));

    let mut client = self::client(proxy);
    client.write_all(&[5, 1, 2]).unwrap();
    assert_eq!(read_to_end(&mut client), [5, 0xff]);
    let (next, open) = host.opened_for();
    assert_ne!(next, stream);
    assert_eq!(
        (open.via, open.malformed.as_deref()),
        (Via::Socks, Some("PROXY010"))
    );
    host.respond(next, &refused("RUN053"));
    host.nothing_pending();
    host.power_off();
}

#[test]
fn a_host_sending_past_the_window_gets_the_connection_closed() {
    let (mut host, proxy) = proxy_host();
    let mut client = client(proxy);
    client
        .write_all(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
        .unwrap();
    let (stream, _) = host.opened_for();
    host.respond(stream, &Response::Opened);
    assert_eq!(
        read_exactly(&mut client, CONNECT_ESTABLISHED.len()),
        CONNECT_ESTABLISHED
    );
    // The client reads nothing more; the host sends without waiting for credit, from a
    // thread (the agent's frames are read meanwhile), until the socket's buffers and then the
    // window are full, whatever their sizes on this machine.
    let mut flood = host.stream.try_clone().unwrap();
    let closed = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&closed);
    let flooding = std::thread::spawn(move || {
        let frame = encode(FrameKind::Data, stream, &[7; 64 * 1024]).unwrap();
        while !seen.load(Ordering::SeqCst) {
            flood.write_all(&frame).unwrap();
        }
    });
    loop {
        let frame = host.frame();
        assert_eq!(frame.stream, stream);
        if frame.kind == FrameKind::Close {
            closed.store(true, Ordering::SeqCst);
            break;
        }
    }
    flooding.join().unwrap();
    host.nothing_pending();
    host.power_off();
}

#[test]
fn past_the_client_limit_a_client_gets_a_503() {
    let (mut host, proxy) = proxy_host();
    let mut clients: Vec<TcpStream> = (0..super::egress::MAX_CLIENTS)
        .map(|_| client(proxy))
        .collect();
    let mut one_more = client(proxy);
    let answer = String::from_utf8(read_to_end(&mut one_more)).unwrap();
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");

    // A client that leaves makes room for the next.
    drop(clients.pop());
    let deadline = Instant::now() + CLIENT_PATIENCE;
    loop {
        let mut next = client(proxy);
        next.write_all(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
            .unwrap();
        next.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut status = [0; 12];
        match next.read_exact(&mut status) {
            // Refused as one too many: the room was not made yet.
            Ok(()) => {
                assert_eq!(&status, b"HTTP/1.1 503");
                assert!(Instant::now() < deadline, "no room was made");
            }
            Err(_) => break,
        }
    }
    let (_, open) = host.opened_for();
    assert_eq!(open.host, "example.com");
    drop(clients);
    host.power_off();
}

#[test]
fn a_forwarded_port_carries_bytes_both_ways_and_is_answered_when_both_end() {
    let mut host = Host::start();
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let serving = std::thread::spawn(move || {
        let (mut socket, _) = server.accept().unwrap();
        socket.write_all(b"hello from the guest").unwrap();
        let mut heard = Vec::new();
        socket.read_to_end(&mut heard).unwrap();
        // Its own end after the host's.
        socket.shutdown(Shutdown::Write).unwrap();
        (heard, server)
    });
    host.send(5, &Request::Connect { port });
    let mut greeting = Vec::new();
    while greeting.len() < 20 {
        let frame = host.frame();
        assert_eq!((frame.kind, frame.stream), (FrameKind::Data, 5));
        greeting.extend(frame.payload);
    }
    assert_eq!(greeting, b"hello from the guest");
    // The stream is taken while the connection is open.
    host.send(5, &Request::Connect { port });
    host.write(FrameKind::Data, 5, b"hello from the host");
    host.write(FrameKind::Data, 5, &[]);
    let (heard, server) = serving.join().unwrap();
    assert_eq!(heard, b"hello from the host");
    let mut answers = Vec::new();
    while answers.len() < 2 {
        let frame = host.frame();
        assert_eq!(frame.stream, 5);
        match frame.kind {
            FrameKind::Data => assert!(frame.payload.is_empty(), "the guest's end"),
            FrameKind::Response => answers.push(serde_json::from_slice(&frame.payload).unwrap()),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(error_code(&answers[0]), codes::BAD_REQUEST);
    assert_eq!(answers[1], Response::Done);

    // A close from the host tears the connection down, answered too.
    host.send(6, &Request::Connect { port });
    let (mut socket, _) = server.accept().unwrap();
    host.nothing_pending();
    host.write(FrameKind::Close, 6, &[]);
    assert_eq!(host.exchange(6).2, Response::Done);
    socket.set_read_timeout(Some(CLIENT_PATIENCE)).unwrap();
    assert_eq!(read_to_end(&mut socket), b"");

    // Nothing listens: AGENT115.
    drop(server);
    host.send(7, &Request::Connect { port });
    assert_eq!(error_code(&host.exchange(7).2), codes::CONNECT_FAILED);
    host.power_off();
}
