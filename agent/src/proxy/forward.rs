//! Rewriting a proxy request (`GET http://host/path HTTP/1.1`) into the head an origin server
//! expects, following RFC 9110 §7.6.1.
//!
//! Each client connection carries one request: the rewritten head asks the origin server to
//! close after answering (`Connection: close`), and the proxy then only relays bytes. That is
//! the simplest model in which the proxy never has to parse a response, and a request body
//! passes through exactly as the client framed it — which is why the framing must be
//! unambiguous before anything is sent ([`FramingProblem`]).
//!
//! The rewritten head is written anew, with CRLF line ends, as
//! - the request line in origin form (`GET /path?query HTTP/1.1`), the client's method and
//!   version kept (a byte-relaying proxy must not promise HTTP/1.1 features such as a chunked
//!   response to an HTTP/1.0 client, so it does not send its own version);
//! - `Host`, naming the URI's authority: added first when the client sent none, replaced in
//!   place when it names the same host and port, and refused when it names another, which
//!   would reach another virtual host behind the granted address than the one judged;
//! - the client's other headers in order, except the connection's own: `Connection` and every
//!   header it names, `Proxy-Connection`, `Keep-Alive`, `TE`, `Upgrade` (RFC 9110 §7.6.1) and
//!   `Proxy-Authorization` (meant for the proxy, never for the origin). `Transfer-Encoding`,
//!   which RFC 9110 lists too, is kept: the body is relayed as it was framed. Repeated equal
//!   `Content-Length`s become one;
//! - `Connection: close`.
//!
//! No `Via` header is added: it would tell origin servers nothing they need, and some change
//! their answers for it (nginx stops compressing).

use super::request::{Field, FramingProblem, HostProblem, RequestError};
use super::target::Target;

/// The port of an `http://` URI without one.
pub const HTTP_PORT: u16 = 80;

/// Headers that belong to the client's connection to the proxy, never forwarded.
const CONNECTION_HEADERS: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "upgrade",
    "proxy-authorization",
];
/// Headers `Connection` may not name: removing them would change what the request means.
const PROTECTED_HEADERS: &[&str] = &["host", "content-length", "transfer-encoding"];

/// The head to send to the origin server for a request for `target`, `path` being the URI's
/// path and query (empty for `http://host`).
pub(super) fn origin_head(
    method: &[u8],
    path: &[u8],
    version: &[u8],
    target: &Target,
    fields: &[Field<'_>],
) -> Result<Vec<u8>, RequestError> {
    let named = connection_options(fields)?;
    let host_header = target.host_header(HTTP_PORT);
    let host_present = check_host(fields, target)?;
    let length = content_length(fields)?;
    check_transfer_encoding(fields, version, length)?;

    let mut head = Vec::with_capacity(1024);
    head.extend_from_slice(method);
    head.push(b' ');
    if !path.starts_with(b"/") {
        head.push(b'/');
    }
    head.extend_from_slice(path);
    head.push(b' ');
    head.extend_from_slice(version);
    head.extend_from_slice(b"\r\n");
    if !host_present {
        push_field(&mut head, "Host", host_header.as_bytes());
    }
    let mut length_written = false;
    for field in fields {
        let lowercase = field.name.to_ascii_lowercase();
        if CONNECTION_HEADERS.contains(&lowercase.as_str()) || named.contains(&lowercase) {
            continue;
        }
        match lowercase.as_str() {
            "host" => push_field(&mut head, field.name, host_header.as_bytes()),
            "content-length" if length_written => {}
            "content-length" => {
                let length = length.unwrap_or_default().to_string();
                push_field(&mut head, field.name, length.as_bytes());
                length_written = true;
            }
            _ => push_field(&mut head, field.name, field.value),
        }
    }
    head.extend_from_slice(b"Connection: close\r\n\r\n");
    Ok(head)
}

fn push_field(head: &mut Vec<u8>, name: &str, value: &[u8]) {
    head.extend_from_slice(name.as_bytes());
    head.extend_from_slice(b": ");
    head.extend_from_slice(value);
    head.extend_from_slice(b"\r\n");
}

/// The elements of a comma-separated header list, trimmed, empty ones left out.
fn list_elements(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(|element| element.trim_ascii())
        .filter(|element| !element.is_empty())
}

/// The header names every `Connection` header lists, lowercased.
fn connection_options(fields: &[Field<'_>]) -> Result<Vec<String>, RequestError> {
    let mut named = Vec::new();
    for field in fields.iter().filter(|f| f.is("connection")) {
        for option in list_elements(field.value) {
            let option = String::from_utf8_lossy(option).to_ascii_lowercase();
            if PROTECTED_HEADERS.contains(&option.as_str()) {
                return Err(RequestError::Framing(FramingProblem::ConnectionOption));
            }
            named.push(option);
        }
    }
    Ok(named)
}

/// Checks the `Host` header against the target; whether there is one.
fn check_host(fields: &[Field<'_>], target: &Target) -> Result<bool, RequestError> {
    let mut hosts = fields.iter().filter(|f| f.is("host"));
    let Some(host) = hosts.next() else {
        return Ok(false);
    };
    if hosts.next().is_some() {
        return Err(RequestError::Host(HostProblem::Repeated));
    }
    let named = Target::parse_authority(host.value, Some(HTTP_PORT))
        .map_err(|_| RequestError::Host(HostProblem::Malformed))?;
    if named != *target {
        return Err(RequestError::Host(HostProblem::Mismatch));
    }
    Ok(true)
}

/// The request's `Content-Length`, if it has one: every value, in every such header, the same
/// decimal number.
fn content_length(fields: &[Field<'_>]) -> Result<Option<u64>, RequestError> {
    let mut length = None;
    for field in fields.iter().filter(|f| f.is("content-length")) {
        let mut elements = 0;
        for element in list_elements(field.value) {
            elements += 1;
            let value = std::str::from_utf8(element)
                .ok()
                .filter(|digits| digits.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|digits| digits.parse::<u64>().ok())
                .ok_or(RequestError::Framing(FramingProblem::BadLength))?;
            if length.is_some_and(|length| length != value) {
                return Err(RequestError::Framing(FramingProblem::DifferingLengths));
            }
            length = Some(value);
        }
        if elements == 0 {
            return Err(RequestError::Framing(FramingProblem::BadLength));
        }
    }
    Ok(length)
}

/// Checks `Transfer-Encoding` (RFC 9112 §6.1, §6.3): only with HTTP/1.1, never with a
/// `Content-Length`, and `chunked` last and once.
fn check_transfer_encoding(
    fields: &[Field<'_>],
    version: &[u8],
    length: Option<u64>,
) -> Result<(), RequestError> {
    let mut codings = fields
        .iter()
        .filter(|f| f.is("transfer-encoding"))
        .peekable();
    if codings.peek().is_none() {
        return Ok(());
    }
    let framing = |problem| Err(RequestError::Framing(problem));
    if version == b"HTTP/1.0" {
        return framing(FramingProblem::TransferEncodingInHttp10);
    }
    if length.is_some() {
        return framing(FramingProblem::TransferEncodingWithLength);
    }
    let codings: Vec<&[u8]> = codings.flat_map(|f| list_elements(f.value)).collect();
    let chunked = |coding: &&[u8]| coding.eq_ignore_ascii_case(b"chunked");
    match codings.split_last() {
        Some((last, before)) if chunked(last) && !before.iter().any(chunked) => Ok(()),
        _ => framing(FramingProblem::NotChunked),
    }
}
