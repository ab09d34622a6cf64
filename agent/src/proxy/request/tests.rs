use super::*;
use crate::proxy::Host;

/// Reads `bytes` in one read, and checks that every other way they could arrive — a byte at a
/// time, or in two reads cut anywhere — gives the same answer.
fn read(bytes: &[u8]) -> Result<Parsed, RequestError> {
    let whole = RequestReader::new().read(bytes);
    assert_eq!(byte_at_a_time(bytes), whole);
    for cut in 0..=bytes.len() {
        let mut reader = RequestReader::new();
        let first = reader.read(&bytes[..cut]);
        let answer = match first {
            Ok(Parsed::NeedMore) => reader.read(bytes),
            done => done,
        };
        assert_eq!(answer, whole, "cut after {cut} bytes");
    }
    whole
}

/// Reads `bytes` as a client sending one byte at a time would deliver them.
fn byte_at_a_time(bytes: &[u8]) -> Result<Parsed, RequestError> {
    let mut reader = RequestReader::new();
    for end in 0..bytes.len() {
        match reader.read(&bytes[..end]) {
            Ok(Parsed::NeedMore) => {}
            done => return done,
        }
    }
    reader.read(bytes)
}

fn name(host: &str, port: u16) -> Target {
    Target {
        host: Host::Name(host.into()),
        port,
    }
}

/// The forwarded target and head of a request that must be forwarded, and its head length.
fn forwarded(bytes: &[u8]) -> (Target, String, usize) {
    match read(bytes) {
        Ok(Parsed::Request {
            request: ProxyRequest::Forward { target, head },
            head_len,
        }) => (target, String::from_utf8(head).unwrap(), head_len),
        other => panic!("not forwarded: {other:?}"),
    }
}

/// The target of a request that must be a `CONNECT`, and its head length.
fn connect(bytes: &[u8]) -> (Target, usize) {
    match read(bytes) {
        Ok(Parsed::Request {
            request: ProxyRequest::Connect(target),
            head_len,
        }) => (target, head_len),
        other => panic!("not a CONNECT: {other:?}"),
    }
}

fn refused(bytes: &[u8]) -> RequestError {
    match read(bytes) {
        Err(error) => error,
        other => panic!("not refused: {other:?}"),
    }
}

/// A `GET` for `http://a.example/` with these header lines.
fn get_with(headers: &str) -> Vec<u8> {
    format!("GET http://a.example/ HTTP/1.1\r\n{headers}\r\n").into_bytes()
}

// Requests recorded from real clients (see captured/README.md).

#[test]
fn curl_get_is_forwarded_in_origin_form() {
    let bytes = include_bytes!("../captured/curl_get.http");
    let (target, head, head_len) = forwarded(bytes);
    assert_eq!(target, name("api.example.com", 80));
    assert_eq!(head_len, bytes.len());
    assert_eq!(
        head,
        "GET /x?q=1 HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: curl/7.88.1\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n"
    );
}

#[test]
fn curl_post_leaves_its_body_to_the_connection() {
    let bytes = include_bytes!("../captured/curl_post.http");
    let (target, head, head_len) = forwarded(bytes);
    assert_eq!(target, name("api.example.com", 8080));
    assert_eq!(&bytes[head_len..], b"a=b");
    assert_eq!(
        head,
        "POST /form HTTP/1.1\r\nHost: api.example.com:8080\r\nUser-Agent: curl/7.88.1\r\n\
         Accept: */*\r\nContent-Length: 3\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nConnection: close\r\n\r\n"
    );
}

#[test]
fn curl_connect_names_its_target() {
    let bytes = include_bytes!("../captured/curl_connect.http");
    assert_eq!(connect(bytes), (name("api.example.com", 443), bytes.len()));
}

#[test]
fn curl_ipv6_literals_are_addresses() {
    let (target, head, _) = forwarded(include_bytes!("../captured/curl_ipv6.http"));
    assert_eq!(
        target,
        Target {
            host: Host::Ip("::1".parse().unwrap()),
            port: 8080
        }
    );
    assert!(
        head.starts_with("GET /x HTTP/1.1\r\nHost: [::1]:8080\r\n"),
        "{head}"
    );
    let (target, _) = connect(include_bytes!("../captured/curl_connect_ipv6.http"));
    assert_eq!(
        target,
        Target {
            host: Host::Ip("2001:db8::1".parse().unwrap()),
            port: 443
        }
    );
}

#[test]
fn busybox_wget_is_forwarded() {
    let (target, head, _) = forwarded(include_bytes!("../captured/busybox_wget.http"));
    assert_eq!(target, name("api.example.com", 80));
    assert_eq!(
        head,
        "GET /x HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: Wget\r\nConnection: close\r\n\r\n"
    );
}

#[test]
fn gnu_wget_loses_its_keep_alive() {
    let (_, head, _) = forwarded(include_bytes!("../captured/gnu_wget.http"));
    assert_eq!(
        head,
        "GET /x HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: Wget/1.21.3\r\nAccept: */*\r\n\
         Accept-Encoding: identity\r\nConnection: close\r\n\r\n"
    );
}

#[test]
fn python_urllib_is_forwarded_with_its_header_order() {
    let (_, head, _) = forwarded(include_bytes!("../captured/py_urllib.http"));
    assert_eq!(
        head,
        "GET /x HTTP/1.1\r\nAccept-Encoding: identity\r\nHost: api.example.com\r\n\
         User-Agent: Python-urllib/3.11\r\nConnection: close\r\n\r\n"
    );
}

#[test]
fn python_and_pip_tunnel_with_http_1_0_and_no_host() {
    let (target, _) = connect(include_bytes!("../captured/py_urllib_https.http"));
    assert_eq!(target, name("api.example.com", 443));
    let (target, _) = connect(include_bytes!("../captured/pip_connect.http"));
    assert_eq!(target, name("pypi.org", 443));
}

#[test]
fn a_pipelined_client_hello_is_left_for_the_tunnel() {
    let head = include_bytes!("../captured/curl_connect.http");
    let hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
    let bytes = [&head[..], hello].concat();
    assert_eq!(connect(&bytes), (name("api.example.com", 443), head.len()));
}

// How a head is read.

#[test]
fn nothing_is_decided_before_the_empty_line() {
    assert_eq!(read(b""), Ok(Parsed::NeedMore));
    assert_eq!(
        read(b"GET http://a.example/ HTTP/1.1\r\n"),
        Ok(Parsed::NeedMore)
    );
    assert_eq!(
        read(b"GET http://a.example/ HTTP/1.1\r\nHost: a\r\n\r"),
        Ok(Parsed::NeedMore)
    );
    // A malformed head is refused only once it is complete.
    assert_eq!(read(b"GET nonsense\r\n"), Ok(Parsed::NeedMore));
}

#[test]
fn a_bare_lf_ends_lines_too_and_the_forwarded_head_uses_crlf() {
    let bytes = b"GET http://a.example/x HTTP/1.1\nHost: a.example\r\nAccept: */*\n\nbody";
    let (_, head, head_len) = forwarded(bytes);
    assert_eq!(&bytes[head_len..], b"body");
    assert_eq!(
        head,
        "GET /x HTTP/1.1\r\nHost: a.example\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    let bytes = b"CONNECT a.example:443 HTTP/1.1\n\r\nX";
    let (_, head_len) = connect(bytes);
    assert_eq!(head_len, bytes.len() - 1);
}

#[test]
fn socks5_is_recognised_by_its_first_byte() {
    for bytes in [&b"\x05"[..], b"\x05\x01\x00", b"\x05\x02\x00\x01\x05\x01"] {
        assert_eq!(
            read(bytes),
            Ok(Parsed::Request {
                request: ProxyRequest::Socks,
                head_len: 0
            })
        );
    }
}

/// A `GET` whose head, empty line included, is exactly `len` bytes.
fn head_of_len(len: usize) -> Vec<u8> {
    let start = b"GET http://a.example/ HTTP/1.1\r\nX-Fill: ";
    let end = b"\r\n\r\n";
    let fill = vec![b'a'; len - start.len() - end.len()];
    [&start[..], &fill, end].concat()
}

#[test]
fn a_head_of_16_kib_is_read_and_one_byte_more_is_refused() {
    let at = head_of_len(MAX_HEAD);
    let body = b"and a body";
    let bytes = [&at[..], body].concat();
    // Cut at every byte would read 16 KiB 16 thousand times: a byte at a time is the test.
    let answer = byte_at_a_time(&bytes);
    assert_eq!(answer, RequestReader::new().read(&bytes));
    let Ok(Parsed::Request { head_len, .. }) = answer else {
        panic!("{answer:?}");
    };
    assert_eq!(head_len, MAX_HEAD);

    let over = head_of_len(MAX_HEAD + 1);
    assert_eq!(byte_at_a_time(&over), Err(RequestError::HeadTooLarge));
    assert_eq!(
        RequestReader::new().read(&over),
        Err(RequestError::HeadTooLarge)
    );
    // Refused as soon as 16 KiB have come without an empty line.
    assert_eq!(
        RequestReader::new().read(&over[..MAX_HEAD]),
        Err(RequestError::HeadTooLarge)
    );
    assert_eq!(
        RequestReader::new().read(&over[..MAX_HEAD - 1]),
        Ok(Parsed::NeedMore)
    );
}

#[test]
fn a_hundred_headers_are_read_and_one_more_is_refused() {
    let headers = |count: usize| {
        let lines: String = (0..count).map(|i| format!("X-{i}: {i}\r\n")).collect();
        get_with(&lines)
    };
    let (_, head, _) = forwarded(&headers(MAX_HEADERS));
    assert!(head.contains("X-99: 99\r\n"));
    assert_eq!(
        RequestReader::new().read(&headers(MAX_HEADERS + 1)),
        Err(RequestError::TooManyHeaders)
    );
}

// Forwarding.

#[test]
fn connection_headers_are_removed_and_end_to_end_ones_kept_in_order() {
    let (_, head, _) = forwarded(&get_with(
        "Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nX-Keep: 2\r\n\
         Proxy-Authorization: Basic dTpw\r\nproxy-connection: keep-alive\r\nKeep-Alive: 300\r\n\
         TE: trailers\r\nUpgrade: websocket\r\nTrailer: X-Checksum\r\n\
         Transfer-Encoding: gzip, chunked\r\nExpect: 100-continue\r\n",
    ));
    assert_eq!(
        head,
        "GET / HTTP/1.1\r\nHost: a.example\r\nX-Keep: 2\r\nTrailer: X-Checksum\r\n\
         Transfer-Encoding: gzip, chunked\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    );
}

#[test]
fn a_matching_host_is_written_as_the_target_authority() {
    let (_, head, _) = forwarded(&get_with("Accept: */*\r\nHost: A.Example:80\r\n"));
    assert_eq!(
        head,
        "GET / HTTP/1.1\r\nAccept: */*\r\nHost: a.example\r\nConnection: close\r\n\r\n"
    );
    let (_, head, _) =
        forwarded(b"PUT HTTP://10.0.0.1:8080?a=b HTTP/1.0\r\nhost: 10.0.0.1:8080\r\n\r\n");
    assert_eq!(
        head,
        "PUT /?a=b HTTP/1.0\r\nhost: 10.0.0.1:8080\r\nConnection: close\r\n\r\n"
    );
}

#[test]
fn only_the_start_of_a_target_is_its_scheme() {
    // Found by the fuzz target: the forwarded path must not read as a URI again.
    let (target, head, _) = forwarded(b"GET http://[::1]:80/p://80/x HTTP/1.1\r\n\r\n");
    assert_eq!(target.to_string(), "[::1]:80");
    assert!(
        head.starts_with("GET /p://80/x HTTP/1.1\r\nHost: [::1]\r\n"),
        "{head}"
    );
    assert_eq!(
        RequestReader::new().read(head.as_bytes()),
        Err(RequestError::NotProxyRequest)
    );
}

#[test]
fn equal_content_lengths_become_one() {
    let (_, head, _) = forwarded(&get_with(
        "Content-Length: 5\r\nX: y\r\ncontent-length: 5, 5\r\n",
    ));
    assert_eq!(
        head,
        "GET / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\nX: y\r\n\
         Connection: close\r\n\r\n"
    );
}

#[test]
fn header_values_lose_surrounding_whitespace_and_keep_obs_text() {
    let (_, head, _) = forwarded(&get_with("X-A:\t v a l \t\r\nX-B:\r\nX-C: caf\u{e9}\r\n"));
    assert!(
        head.contains("\r\nX-A: v a l\r\nX-B: \r\nX-C: caf\u{e9}\r\n"),
        "{head}"
    );
}

// Refusals, one by one.

#[test]
fn what_is_not_http_is_refused_at_the_first_byte() {
    for bytes in [
        &b"\x16\x03\x01"[..],
        b"\x04\x01\x00\x50",
        b"\r\n",
        b"\n",
        b" GET",
    ] {
        assert_eq!(read(bytes), Err(RequestError::NotHttp), "{bytes:?}");
        assert_eq!(
            RequestReader::new().read(&bytes[..1]),
            Err(RequestError::NotHttp)
        );
    }
}

#[test]
fn malformed_request_lines_are_refused() {
    for line in [
        "GET  http://a.example/ HTTP/1.1",
        "GET http://a.example/  HTTP/1.1",
        "GET\thttp://a.example/ HTTP/1.1",
        "GET http://a.example/HTTP/1.1",
        "GET http://a.example/ HTTP/1.1 x",
        "GET http://a.example/ HTTP/1.1 ",
        "GET",
        "G(T http://a.example/ HTTP/1.1",
        "GET http://a.example/\u{e9} HTTP/1.1",
        "GET http://a.example/\0 HTTP/1.1",
        "GET http://a.example/\r HTTP/1.1",
    ] {
        let bytes = format!("{line}\r\n\r\n");
        assert_eq!(
            read(bytes.as_bytes()),
            Err(RequestError::RequestLine),
            "{line:?}"
        );
    }
    for version in ["HTTP/2.0", "HTTP/1.2", "http/1.1", "HTTP/0.9", "HTTP/1.1\r"] {
        let bytes = format!("GET http://a.example/ {version}\r\n\r\n");
        assert_eq!(
            read(bytes.as_bytes()),
            Err(RequestError::Version),
            "{version:?}"
        );
    }
}

#[test]
fn requests_for_a_server_rather_than_a_proxy_are_refused() {
    for target in [
        "/",
        "/x?y",
        "/p://80/x",
        "*",
        "a.example:80",
        "a.example/x",
        "://a.example/",
        "1http://a.example/",
        "a.example/x://y",
    ] {
        let bytes = format!("GET {target} HTTP/1.1\r\nHost: a.example\r\n\r\n");
        assert_eq!(
            read(bytes.as_bytes()),
            Err(RequestError::NotProxyRequest),
            "{target}"
        );
    }
}

#[test]
fn only_http_uris_are_forwarded() {
    assert_eq!(
        refused(b"GET https://a.example/ HTTP/1.1\r\n\r\n"),
        RequestError::Https
    );
    assert_eq!(
        refused(b"GET HTTPS://a.example/ HTTP/1.1\r\n\r\n"),
        RequestError::Https
    );
    for scheme in ["ftp", "ws", "file", "httpx", "git+ssh"] {
        let bytes = format!("GET {scheme}://a.example/ HTTP/1.1\r\n\r\n");
        assert_eq!(
            read(bytes.as_bytes()),
            Err(RequestError::Scheme),
            "{scheme}"
        );
    }
}

#[test]
fn bad_targets_are_refused() {
    let target = |e| RequestError::Target(e);
    for (line, error) in [
        ("GET http:///x HTTP/1.1", target(TargetError::EmptyHost)),
        ("GET http://:80/ HTTP/1.1", target(TargetError::EmptyHost)),
        (
            "GET http://u:p@a.example/ HTTP/1.1",
            target(TargetError::Userinfo),
        ),
        (
            "GET http://a.example:99999/ HTTP/1.1",
            target(TargetError::Port),
        ),
        (
            "GET http://a.example:0/ HTTP/1.1",
            target(TargetError::Port),
        ),
        (
            "GET http://a.example:x/ HTTP/1.1",
            target(TargetError::Port),
        ),
        ("GET http://a.example:/ HTTP/1.1", target(TargetError::Port)),
        (
            "GET http://a!b.example/ HTTP/1.1",
            target(TargetError::NameSyntax),
        ),
        (
            "GET http://a%2eb/ HTTP/1.1",
            target(TargetError::NameSyntax),
        ),
        (
            "GET http://2130706433/ HTTP/1.1",
            target(TargetError::NumericName),
        ),
        ("GET http://[::1/ HTTP/1.1", target(TargetError::Ipv6)),
        (
            "GET http://a.example/x#top HTTP/1.1",
            RequestError::Fragment,
        ),
        (
            "CONNECT a.example HTTP/1.1",
            target(TargetError::MissingPort),
        ),
        ("CONNECT [::1] HTTP/1.1", target(TargetError::MissingPort)),
        (
            "CONNECT a.example:443/x HTTP/1.1",
            target(TargetError::Port),
        ),
        ("CONNECT a.example:0 HTTP/1.1", target(TargetError::Port)),
        ("CONNECT :443 HTTP/1.1", target(TargetError::EmptyHost)),
        (
            "CONNECT u@a.example:443 HTTP/1.1",
            target(TargetError::Userinfo),
        ),
        (
            "CONNECT http://a.example:443 HTTP/1.1",
            target(TargetError::Port),
        ),
    ] {
        let bytes = format!("{line}\r\n\r\n");
        assert_eq!(read(bytes.as_bytes()), Err(error), "{line}");
    }
}

#[test]
fn malformed_header_lines_are_refused() {
    for (line, problem) in [
        ("X-Foo", HeaderProblem::NoColon),
        (": v", HeaderProblem::EmptyName),
        ("Host : a.example", HeaderProblem::SpaceBeforeColon),
        ("Host\t: a.example", HeaderProblem::SpaceBeforeColon),
        ("X(y): v", HeaderProblem::NameCharacter),
        (" X: v", HeaderProblem::ObsFold),
        ("X: a\0b", HeaderProblem::ValueCharacter),
        ("X: a\rb", HeaderProblem::ValueCharacter),
        ("X: a\x7fb", HeaderProblem::ValueCharacter),
        ("X: a\x1bb", HeaderProblem::ValueCharacter),
        ("X\0: v", HeaderProblem::NameCharacter),
    ] {
        assert_eq!(
            read(&get_with(&format!("{line}\r\n"))),
            Err(RequestError::Header(problem)),
            "{line:?}"
        );
    }
    // A folded line after a good one.
    assert_eq!(
        read(&get_with("X: a\r\n\tb\r\n")),
        Err(RequestError::Header(HeaderProblem::ObsFold))
    );
    // The headers of a CONNECT are checked too, though never forwarded.
    assert_eq!(
        read(b"CONNECT a.example:443 HTTP/1.1\r\nHost : a.example\r\n\r\n"),
        Err(RequestError::Header(HeaderProblem::SpaceBeforeColon))
    );
}

#[test]
fn ambiguous_framing_is_refused() {
    let framing = |problem| Err(RequestError::Framing(problem));
    for (headers, problem) in [
        (
            "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
            FramingProblem::TransferEncodingWithLength,
        ),
        (
            "Content-Length: 3\r\nContent-Length: 4\r\n",
            FramingProblem::DifferingLengths,
        ),
        ("Content-Length: 3, 4\r\n", FramingProblem::DifferingLengths),
        ("Content-Length: abc\r\n", FramingProblem::BadLength),
        ("Content-Length: -1\r\n", FramingProblem::BadLength),
        ("Content-Length: +3\r\n", FramingProblem::BadLength),
        ("Content-Length: 3 3\r\n", FramingProblem::BadLength),
        ("Content-Length:\r\n", FramingProblem::BadLength),
        (
            "Content-Length: 99999999999999999999\r\n",
            FramingProblem::BadLength,
        ),
        ("Transfer-Encoding: gzip\r\n", FramingProblem::NotChunked),
        (
            "Transfer-Encoding: chunked, gzip\r\n",
            FramingProblem::NotChunked,
        ),
        (
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            FramingProblem::NotChunked,
        ),
        ("Transfer-Encoding:\r\n", FramingProblem::NotChunked),
        (
            "Transfer-Encoding: xchunked\r\n",
            FramingProblem::NotChunked,
        ),
        (
            "Connection: close, Content-Length\r\nContent-Length: 3\r\n",
            FramingProblem::ConnectionOption,
        ),
        (
            "Connection: Transfer-Encoding\r\n",
            FramingProblem::ConnectionOption,
        ),
        ("Connection: host\r\n", FramingProblem::ConnectionOption),
    ] {
        assert_eq!(read(&get_with(headers)), framing(problem), "{headers:?}");
    }
    assert_eq!(
        read(b"POST http://a.example/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
        framing(FramingProblem::TransferEncodingInHttp10)
    );
    // Chunked last, split over two headers, is fine.
    let (_, head, _) = forwarded(&get_with(
        "Transfer-Encoding: gzip\r\nTransfer-Encoding: Chunked\r\n",
    ));
    assert!(head.contains("Transfer-Encoding: gzip\r\nTransfer-Encoding: Chunked\r\n"));
}

#[test]
fn a_host_header_naming_another_authority_is_refused() {
    let host = |problem| Err(RequestError::Host(problem));
    for (headers, problem) in [
        ("Host: b.example\r\n", HostProblem::Mismatch),
        ("Host: a.example:8080\r\n", HostProblem::Mismatch),
        ("Host: 127.0.0.1\r\n", HostProblem::Mismatch),
        ("Host:\r\n", HostProblem::Malformed),
        ("Host: a.example, b.example\r\n", HostProblem::Malformed),
        ("Host: u@a.example\r\n", HostProblem::Malformed),
        (
            "Host: a.example\r\nHost: a.example\r\n",
            HostProblem::Repeated,
        ),
    ] {
        assert_eq!(read(&get_with(headers)), host(problem), "{headers:?}");
    }
}

#[test]
fn refusals_are_400s_that_name_their_code_and_echo_nothing() {
    let marker = "zzmarkerzz";
    for bytes in [
        format!("GET http://a.example/ HTTP/1.1\r\nHost: {marker}.example\r\n\r\n"),
        format!("GET http://{marker}!/ HTTP/1.1\r\n\r\n"),
        format!("GET http://a.example/ HTTP/1.1\r\n{marker}\r\n\r\n"),
        format!("GET /{marker} HTTP/1.1\r\n\r\n"),
        format!("{marker} {marker} {marker}\r\n\r\n"),
    ] {
        let error = refused(bytes.as_bytes());
        let response = String::from_utf8(error.response()).unwrap();
        assert!(
            response.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{response}"
        );
        assert!(response.contains("\r\nConnection: close\r\n"));
        assert!(response.contains(error.code()));
        assert!(!response.contains(marker), "{response}");
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())));
    }
}

#[test]
fn every_refusal_has_a_proxy_code() {
    let errors = [
        RequestError::HeadTooLarge,
        RequestError::NotHttp,
        RequestError::RequestLine,
        RequestError::Version,
        RequestError::NotProxyRequest,
        RequestError::Https,
        RequestError::Scheme,
        RequestError::Target(TargetError::Port),
        RequestError::Fragment,
        RequestError::Header(HeaderProblem::NoColon),
        RequestError::TooManyHeaders,
        RequestError::Framing(FramingProblem::BadLength),
        RequestError::Host(HostProblem::Mismatch),
    ];
    let codes: std::collections::BTreeSet<_> = errors.iter().map(|e| e.code()).collect();
    assert_eq!(codes.len(), 9);
    assert!(codes.iter().all(|code| code.starts_with("PROXY")));
}
