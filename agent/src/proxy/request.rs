//! Reading the first request of a client connection, incrementally and within bounds.
//!
//! The first byte tells the protocol: `0x05` is a SOCKS5 greeting (handed to
//! [`super::socks`] untouched), an HTTP method's first character is HTTP/1.0 or 1.1, anything
//! else is refused at once. An HTTP request head is read up to its empty line, which must come
//! within [`MAX_HEAD`] bytes. Lines end in CRLF; a bare LF is accepted as well (RFC 9112 §2.2
//! allows it, hand-written clients send it), which is safe because nothing the client wrote
//! is forwarded as it was: a forwarded head is written anew with CRLF (see
//! [`super::forward`]). A bare CR is refused wherever it stands.
//!
//! The request line is `method SP target SP version`, single spaces, version `HTTP/1.1` or
//! `HTTP/1.0`. Two targets are served: `CONNECT host:port` (authority form, the port
//! required) and an `http://` absolute URI with any other method. An origin-form target
//! (`GET /path`) is not a proxy request; an `https://` URI is refused (a client must tunnel
//! with `CONNECT`), so is every other scheme. Header lines are `name: value`, the name an HTTP
//! token with nothing between it and the colon, the value free of control characters, no
//! line folded; at most [`MAX_HEADERS`] of them. Every head is checked whole before it is
//! acted on, and the bytes after it — a pipelined TLS ClientHello, a request body — are left
//! to the connection: the reader reports where the head ended.

use super::forward;
use super::target::{Target, TargetError};
use super::{text_response, ProxyRequest};

/// The largest request head, its empty line included.
pub const MAX_HEAD: usize = 16 * 1024;
/// The most header lines a request may carry.
pub const MAX_HEADERS: usize = 100;
/// What a `CONNECT` client is told once its tunnel is open.
pub const CONNECT_ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";
/// The first byte of a SOCKS5 greeting (its version).
const SOCKS5: u8 = 0x05;

/// How far the reader got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// The request is not complete yet: read more and call again.
    NeedMore,
    /// A complete request; the client's first `head_len` bytes were its head (0 for SOCKS5,
    /// whose handshake reads from the first byte).
    Request {
        /// What the client asked for.
        request: ProxyRequest,
        /// How many of the client's bytes the request took.
        head_len: usize,
    },
}

/// A request the proxy refuses; the client gets [`RequestError::response`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No empty line within [`MAX_HEAD`] bytes.
    #[error("the request head is over {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// The first byte is neither SOCKS5's version nor the start of an HTTP method.
    #[error("neither an HTTP request nor a SOCKS5 greeting")]
    NotHttp,
    /// A request line that is not `method SP target SP HTTP/1.x`.
    #[error("malformed request line")]
    RequestLine,
    /// A version other than HTTP/1.0 and HTTP/1.1.
    #[error("unsupported HTTP version")]
    Version,
    /// An origin-form (`/path`), asterisk-form or otherwise scheme-less target: a request
    /// for a server, not for a proxy.
    #[error("not a proxy request (no absolute http:// URI, no CONNECT)")]
    NotProxyRequest,
    /// An `https://` URI: the client must tunnel with `CONNECT`.
    #[error("https:// URIs are not forwarded; use CONNECT")]
    Https,
    /// A URI scheme other than `http` and `https`.
    #[error("unsupported URI scheme")]
    Scheme,
    /// The target's host or port.
    #[error("bad request target: {0}")]
    Target(#[from] TargetError),
    /// A fragment (`#…`) in the request target, which HTTP never sends.
    #[error("bad request target: a fragment")]
    Fragment,
    /// A header line that is not `name: value`.
    #[error("malformed header line: {0}")]
    Header(HeaderProblem),
    /// More than [`MAX_HEADERS`] header lines.
    #[error("more than {MAX_HEADERS} header lines")]
    TooManyHeaders,
    /// Message framing the origin server could read differently than the proxy.
    #[error("ambiguous message framing: {0}")]
    Framing(FramingProblem),
    /// The `Host` header does not name the URI's authority.
    #[error("Host header: {0}")]
    Host(HostProblem),
}

/// What is wrong with a header line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderProblem {
    /// No colon.
    #[error("no colon")]
    NoColon,
    /// Nothing before the colon.
    #[error("empty name")]
    EmptyName,
    /// Space or tab between the name and the colon (RFC 9112 §5.1 requires a 400).
    #[error("whitespace before the colon")]
    SpaceBeforeColon,
    /// A name character outside the HTTP token characters.
    #[error("a character not allowed in a name")]
    NameCharacter,
    /// NUL, CR, LF or another control character in the value.
    #[error("a control character in the value")]
    ValueCharacter,
    /// A line starting with space or tab continues the previous one (obsolete line folding).
    #[error("obsolete line folding")]
    ObsFold,
}

/// How a request's framing is ambiguous (RFC 9112 §6): each is a known request-smuggling
/// vector, so none is guessed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingProblem {
    /// Both `Transfer-Encoding` and `Content-Length`.
    #[error("Transfer-Encoding with Content-Length")]
    TransferEncodingWithLength,
    /// `Content-Length` values that differ.
    #[error("differing Content-Length values")]
    DifferingLengths,
    /// A `Content-Length` that is not a decimal number.
    #[error("Content-Length is not a number")]
    BadLength,
    /// A `Transfer-Encoding` whose last coding is not `chunked`, or that applies it twice.
    #[error("Transfer-Encoding does not end in a single chunked")]
    NotChunked,
    /// `Transfer-Encoding` in an HTTP/1.0 request (RFC 9112 §6.1: faulty framing).
    #[error("Transfer-Encoding in an HTTP/1.0 request")]
    TransferEncodingInHttp10,
    /// `Connection` naming `Host`, `Content-Length` or `Transfer-Encoding`, which the proxy
    /// would then have to remove.
    #[error("Connection names Host or a framing header")]
    ConnectionOption,
}

/// What is wrong with the `Host` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostProblem {
    /// More than one (RFC 9112 §3.2 requires a 400).
    #[error("repeated")]
    Repeated,
    /// Not an authority.
    #[error("malformed")]
    Malformed,
    /// Another host or port than the URI's.
    #[error("names another host or port than the request target")]
    Mismatch,
}

impl RequestError {
    /// The stable code, for the audit entry and the client's `400`.
    pub fn code(&self) -> &'static str {
        match self {
            RequestError::HeadTooLarge => "PROXY001",
            RequestError::NotHttp | RequestError::RequestLine | RequestError::Version => "PROXY002",
            RequestError::NotProxyRequest => "PROXY003",
            RequestError::Https | RequestError::Scheme => "PROXY004",
            RequestError::Target(_) | RequestError::Fragment => "PROXY005",
            RequestError::Header(_) => "PROXY006",
            RequestError::TooManyHeaders => "PROXY007",
            RequestError::Framing(_) => "PROXY008",
            RequestError::Host(_) => "PROXY009",
        }
    }

    /// The `400 Bad Request` the client gets: the code and this error's fixed text, nothing
    /// of the client's own bytes, and `Connection: close`.
    pub fn response(&self) -> Vec<u8> {
        text_response(
            "400 Bad Request",
            &format!("mvm proxy: {} {self}\n", self.code()),
        )
    }
}

/// Reads the first request of one client connection.
///
/// Give [`RequestReader::read`] everything the client has sent so far, the same bytes
/// growing from call to call; it remembers how far it has looked, so a head read a byte at a
/// time costs no more than one read at once.
#[derive(Debug, Default)]
pub struct RequestReader {
    /// Where the line being scanned starts.
    line_start: usize,
    /// How many bytes have been looked at.
    scanned: usize,
}

impl RequestReader {
    /// A reader for a new connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads `received` — everything the client has sent so far — into a request, or asks for
    /// more.
    pub fn read(&mut self, received: &[u8]) -> Result<Parsed, RequestError> {
        match received.first() {
            None => return Ok(Parsed::NeedMore),
            Some(&SOCKS5) => {
                return Ok(Parsed::Request {
                    request: ProxyRequest::Socks,
                    head_len: 0,
                })
            }
            Some(&first) if !is_token_char(first) => return Err(RequestError::NotHttp),
            Some(_) => {}
        }
        let Some(head_len) = self.head_end(received)? else {
            return Ok(Parsed::NeedMore);
        };
        let request = parse_head(&received[..head_len])?;
        Ok(Parsed::Request { request, head_len })
    }

    /// Where the head ends (just after its empty line), once it has.
    fn head_end(&mut self, received: &[u8]) -> Result<Option<usize>, RequestError> {
        let window = &received[..received.len().min(MAX_HEAD)];
        while let Some(&byte) = window.get(self.scanned) {
            if byte == b'\n' {
                if matches!(&window[self.line_start..self.scanned], b"" | b"\r") {
                    return Ok(Some(self.scanned + 1));
                }
                self.line_start = self.scanned + 1;
            }
            self.scanned += 1;
        }
        if received.len() >= MAX_HEAD {
            Err(RequestError::HeadTooLarge)
        } else {
            Ok(None)
        }
    }
}

/// One header line, split; `value` without the whitespace around it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Field<'a> {
    pub(super) name: &'a str,
    pub(super) value: &'a [u8],
}

impl Field<'_> {
    /// Whether this header is called `name` (names are case-insensitive).
    pub(super) fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }
}

/// Reads a complete head (its empty line included) into a request.
fn parse_head(head: &[u8]) -> Result<ProxyRequest, RequestError> {
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line));
    let RequestLine {
        method,
        target,
        version,
    } = request_line(lines.next().unwrap_or_default())?;
    let fields = lines
        .take_while(|line| !line.is_empty())
        .map(parse_field)
        .collect::<Result<Vec<_>, _>>()?;
    if fields.len() > MAX_HEADERS {
        return Err(RequestError::TooManyHeaders);
    }
    if method == b"CONNECT" {
        return Ok(ProxyRequest::Connect(Target::parse_authority(
            target, None,
        )?));
    }
    if target.contains(&b'#') {
        return Err(RequestError::Fragment);
    }
    let Some((scheme, rest)) = split_scheme(target) else {
        return Err(RequestError::NotProxyRequest);
    };
    if scheme.eq_ignore_ascii_case(b"https") {
        return Err(RequestError::Https);
    }
    if !scheme.eq_ignore_ascii_case(b"http") {
        return Err(RequestError::Scheme);
    }
    let authority_end = rest
        .iter()
        .position(|&b| b == b'/' || b == b'?')
        .unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let target = Target::parse_authority(authority, Some(forward::HTTP_PORT))?;
    let head = forward::origin_head(method, path, version, &target, &fields)?;
    Ok(ProxyRequest::Forward { target, head })
}

/// Splits `scheme://rest` where the target starts with a scheme (RFC 3986 §3.1: a letter,
/// then letters, digits, `+`, `-`, `.`); `None` for any other target, `/p://x` included.
fn split_scheme(target: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = target.iter().position(|&b| b == b':')?;
    let (scheme, rest) = (&target[..colon], target[colon..].strip_prefix(b"://")?);
    let (first, others) = scheme.split_first()?;
    let scheme_char = |b: &u8| b.is_ascii_alphanumeric() || b"+-.".contains(b);
    (first.is_ascii_alphabetic() && others.iter().all(scheme_char)).then_some((scheme, rest))
}

/// A request line's three parts.
struct RequestLine<'a> {
    method: &'a [u8],
    target: &'a [u8],
    version: &'a [u8],
}

/// Splits a request line into method, target and version, each checked for its characters.
fn request_line(line: &[u8]) -> Result<RequestLine<'_>, RequestError> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(RequestError::RequestLine);
    };
    if method.is_empty()
        || !method.iter().copied().all(is_token_char)
        || target.is_empty()
        || !target.iter().all(u8::is_ascii_graphic)
    {
        return Err(RequestError::RequestLine);
    }
    if version != b"HTTP/1.1" && version != b"HTTP/1.0" {
        return Err(RequestError::Version);
    }
    Ok(RequestLine {
        method,
        target,
        version,
    })
}

/// Splits a header line into its name and value.
fn parse_field(line: &[u8]) -> Result<Field<'_>, RequestError> {
    let problem = |problem| Err(RequestError::Header(problem));
    if line.starts_with(b" ") || line.starts_with(b"\t") {
        return problem(HeaderProblem::ObsFold);
    }
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return problem(HeaderProblem::NoColon);
    };
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    match name.last() {
        None => return problem(HeaderProblem::EmptyName),
        Some(b' ' | b'\t') => return problem(HeaderProblem::SpaceBeforeColon),
        Some(_) if !name.iter().copied().all(is_token_char) => {
            return problem(HeaderProblem::NameCharacter)
        }
        Some(_) => {}
    }
    // Visible characters, space, tab and obs-text (RFC 9110 §5.5); never NUL, CR or LF.
    if !value
        .iter()
        .all(|&b| b == b' ' || b == b'\t' || b.is_ascii_graphic() || b >= 0x80)
    {
        return problem(HeaderProblem::ValueCharacter);
    }
    let is_space = |b: &u8| *b == b' ' || *b == b'\t';
    let start = value
        .iter()
        .position(|b| !is_space(b))
        .unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !is_space(b))
        .map_or(start, |i| i + 1);
    Ok(Field {
        // Token characters are ASCII.
        name: std::str::from_utf8(name).unwrap_or_default(),
        value: &value[start..end],
    })
}

/// Whether `b` may appear in an HTTP token (a method, a header name; RFC 9110 §5.6.2).
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests;
