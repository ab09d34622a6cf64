//! The server name a TLS client asks for, read from its ClientHello before a byte of it is
//! forwarded — so that a `CONNECT api.example.com:443` cannot carry a handshake for another
//! name (domain fronting through a shared front end).
//!
//! [`peek`] is given everything the client has sent so far and consumes nothing: the caller
//! keeps the bytes, calls again with more while the answer is [`Peek::NeedMore`], and forwards
//! them unchanged once the connection is allowed. It reads TLS records of type handshake
//! (a ClientHello may span several), the handshake header, then the ClientHello's legacy
//! version, random, session id, cipher suites and compression methods, and its extensions
//! for `server_name` (RFC 6066) — a single `host_name`. Only the first 16 KiB are ever looked
//! at: a hello not complete by then is refused. Every length is checked against what
//! encloses it, so hostile bytes end in [`Peek::Malformed`], never a panic; and once an
//! answer other than `NeedMore` is given, more bytes never change it.

use super::authority::DnsName;

/// The most bytes [`peek`] reads before it gives up on a ClientHello.
pub const MAX_CLIENT_HELLO_BYTES: usize = 16 * 1024;

/// TLS record content type `handshake`.
const HANDSHAKE: u8 = 22;
/// Handshake message type `client_hello`.
const CLIENT_HELLO: u8 = 1;
/// Extension `server_name`.
const SERVER_NAME: u16 = 0;
/// Server name type `host_name`.
const HOST_NAME: u8 = 0;
/// The largest TLS record fragment (RFC 8446, 5.1).
const MAX_FRAGMENT: usize = 1 << 14;

/// What the first bytes of a client's stream say about the server name it asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek {
    /// The bytes so far are the beginning of a ClientHello: read more.
    NeedMore,
    /// Not a TLS handshake at all.
    NotTls,
    /// A TLS handshake that is not a well-formed ClientHello, or one over 16 KiB.
    Malformed,
    /// A ClientHello without a server name.
    NoSni,
    /// The server name, as the client wrote it (printable ASCII).
    Sni(String),
}

/// What the client's first bytes say about the server name it asks for.
pub fn peek(bytes: &[u8]) -> Peek {
    let seen = &bytes[..bytes.len().min(MAX_CLIENT_HELLO_BYTES)];
    match client_hello(seen) {
        Some(Ok(body)) => parse_body(&body).unwrap_or(Peek::Malformed),
        Some(Err(refused)) => refused,
        None if bytes.len() >= MAX_CLIENT_HELLO_BYTES => Peek::Malformed,
        None => Peek::NeedMore,
    }
}

/// Whether the server name a client sent is the authority's name (in any case, with or
/// without a trailing dot).
pub fn sni_matches(authority: &DnsName, sni: &str) -> bool {
    DnsName::parse(sni).is_ok_and(|name| &name == authority)
}

/// The ClientHello's body, reassembled from the handshake records in `bytes`: `None` while
/// incomplete, `Err` once refused.
fn client_hello(bytes: &[u8]) -> Option<Result<Vec<u8>, Peek>> {
    let mut message = Vec::new();
    let mut rest = bytes;
    let mut first = true;
    loop {
        // Not TLS if the very first record is not a handshake of TLS's major version 3;
        // malformed if a later one is not.
        let wrong = if first { Peek::NotTls } else { Peek::Malformed };
        match rest {
            [kind, ..] if *kind != HANDSHAKE => return Some(Err(wrong)),
            [_, major, ..] if *major != 3 => return Some(Err(wrong)),
            [_, _, minor, ..] if *minor > 4 => return Some(Err(wrong)),
            _ => {}
        }
        let [_, _, _, high, low, after @ ..] = rest else {
            return None;
        };
        let length = usize::from(u16::from_be_bytes([*high, *low]));
        if length == 0 || length > MAX_FRAGMENT {
            return Some(Err(Peek::Malformed));
        }
        message.extend_from_slice(&after[..length.min(after.len())]);
        if let [kind, a, b, c, ..] = message[..] {
            let body_length = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
            if kind != CLIENT_HELLO || 4 + body_length > MAX_CLIENT_HELLO_BYTES {
                return Some(Err(Peek::Malformed));
            }
            if message.len() >= 4 + body_length {
                message.truncate(4 + body_length);
                message.drain(..4);
                return Some(Ok(message));
            }
        }
        if after.len() < length {
            return None;
        }
        rest = &after[length..];
        first = false;
    }
}

/// The server name of a complete ClientHello body; `None` where it is malformed.
fn parse_body(body: &[u8]) -> Option<Peek> {
    let mut hello = Reader(body);
    let [major, _minor] = hello.array()?;
    if major != 3 {
        return None;
    }
    hello.take(32)?; // random
    let session_id = hello.vector8()?;
    let ciphers = hello.vector16()?;
    let compression = hello.vector8()?;
    if session_id.len() > 32 || ciphers.is_empty() || ciphers.len() % 2 != 0 {
        return None;
    }
    if compression.is_empty() {
        return None;
    }
    if hello.is_empty() {
        // A TLS 1.2 hello may end here, with no extensions.
        return Some(Peek::NoSni);
    }
    let mut extensions = Reader(hello.vector16()?);
    if !hello.is_empty() {
        return None;
    }
    let mut name = None;
    while !extensions.is_empty() {
        let kind = u16::from_be_bytes(extensions.array()?);
        let data = extensions.vector16()?;
        if kind == SERVER_NAME {
            if name.is_some() {
                return None; // the extension twice
            }
            name = Some(host_name(data)?);
        }
    }
    Some(name.map_or(Peek::NoSni, Peek::Sni))
}

/// The one `host_name` of a `server_name` extension's data.
fn host_name(data: &[u8]) -> Option<String> {
    let mut data = Reader(data);
    let mut list = Reader(data.vector16()?);
    if !data.is_empty() {
        return None;
    }
    let [kind] = list.array()?;
    let name = list.vector16()?;
    // Only `host_name` is defined, and at most one name of a type may be sent.
    if kind != HOST_NAME || !list.is_empty() || name.is_empty() || name.len() > 255 {
        return None;
    }
    if !name.iter().all(u8::is_ascii_graphic) {
        return None;
    }
    String::from_utf8(name.to_vec()).ok()
}

/// Bytes read front to back; every read that would run past the end is `None`.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.0.split_at_checked(n)?;
        self.0 = tail;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    /// A vector with a one-byte length.
    fn vector8(&mut self) -> Option<&'a [u8]> {
        let [n] = self.array()?;
        self.take(usize::from(n))
    }

    /// A vector with a two-byte length.
    fn vector16(&mut self) -> Option<&'a [u8]> {
        let n = u16::from_be_bytes(self.array()?);
        self.take(usize::from(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(hex: &str) -> Vec<u8> {
        hex::decode(hex.split_whitespace().collect::<String>()).unwrap()
    }

    fn openssl_tls13() -> Vec<u8> {
        recorded(include_str!("testdata/openssl_tls13.hex"))
    }

    fn sni(name: &str) -> Peek {
        Peek::Sni(name.into())
    }

    /// A ClientHello built from RFC 8446's structure, with `extensions` as given, in one
    /// record.
    fn hello(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend([7; 32]); // random
        body.extend([32]);
        body.extend([9; 32]); // session id
        body.extend([0, 6, 0x13, 0x01, 0x13, 0x02, 0x13, 0x03]); // cipher suites
        body.extend([1, 0]); // compression: null
        let mut block = Vec::new();
        for (kind, data) in extensions {
            block.extend(kind.to_be_bytes());
            block.extend((data.len() as u16).to_be_bytes());
            block.extend(data);
        }
        body.extend((block.len() as u16).to_be_bytes());
        body.extend(block);
        record(&body)
    }

    /// `body` as a ClientHello handshake message in one record.
    fn record(body: &[u8]) -> Vec<u8> {
        let mut message = vec![CLIENT_HELLO];
        message.extend(&(body.len() as u32).to_be_bytes()[1..]);
        message.extend(body);
        let mut bytes = vec![HANDSHAKE, 3, 1];
        bytes.extend((message.len() as u16).to_be_bytes());
        bytes.extend(message);
        bytes
    }

    /// A `server_name` extension's data for these (type, name) entries.
    fn names(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (kind, name) in entries {
            list.push(*kind);
            list.extend((name.len() as u16).to_be_bytes());
            list.extend(*name);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend(list);
        data
    }

    /// `bytes` cut into records of at most `size` bytes of handshake each.
    fn fragmented(bytes: &[u8], size: usize) -> Vec<u8> {
        let message = &bytes[5..];
        let mut out = Vec::new();
        for chunk in message.chunks(size) {
            out.extend([HANDSHAKE, 3, 1]);
            out.extend((chunk.len() as u16).to_be_bytes());
            out.extend(chunk);
        }
        out
    }

    #[test]
    fn real_client_hellos_give_their_server_names() {
        for (file, want) in [
            (
                include_str!("testdata/openssl_tls13.hex"),
                sni("x.example.com"),
            ),
            (
                include_str!("testdata/openssl_tls12.hex"),
                sni("old.example.com"),
            ),
            (include_str!("testdata/openssl_nosni.hex"), Peek::NoSni),
            (
                include_str!("testdata/openssl_frag.hex"),
                sni("api.example.com"),
            ),
            (include_str!("testdata/curl.hex"), sni("api.example.com")),
        ] {
            let bytes = recorded(file);
            assert_eq!(peek(&bytes), want);
            // Whatever follows the hello changes nothing.
            let mut more = bytes.clone();
            more.extend([0x17, 3, 3, 0, 1, 0]);
            assert_eq!(peek(&more), want);
        }
    }

    #[test]
    fn the_multi_record_recording_really_spans_three_records() {
        let bytes = recorded(include_str!("testdata/openssl_frag.hex"));
        let lengths: Vec<usize> = {
            let mut at = 0;
            let mut lengths = Vec::new();
            while at < bytes.len() {
                let length = usize::from(u16::from_be_bytes([bytes[at + 3], bytes[at + 4]]));
                lengths.push(length);
                at += 5 + length;
            }
            lengths
        };
        assert_eq!(lengths, [512, 512, 198]);
    }

    #[test]
    fn every_prefix_of_a_hello_needs_more_and_every_split_reads_the_same() {
        for file in [
            include_str!("testdata/openssl_tls13.hex"),
            include_str!("testdata/openssl_frag.hex"),
            include_str!("testdata/curl.hex"),
        ] {
            let bytes = recorded(file);
            let want = peek(&bytes);
            for end in 1..bytes.len() {
                assert_eq!(
                    peek(&bytes[..end]),
                    Peek::NeedMore,
                    "{end} of {}",
                    bytes.len()
                );
            }
            // The same hello in records of any size reads the same.
            let single = {
                let mut message: Vec<u8> = Vec::new();
                let mut at = 0;
                while at < bytes.len() {
                    let length = usize::from(u16::from_be_bytes([bytes[at + 3], bytes[at + 4]]));
                    message.extend(&bytes[at + 5..at + 5 + length]);
                    at += 5 + length;
                }
                let mut single = vec![HANDSHAKE, 3, 1];
                single.extend((message.len() as u16).to_be_bytes());
                single.extend(message);
                single
            };
            for size in [1, 2, 3, 4, 5, 37, 100, 512, 4096] {
                assert_eq!(peek(&fragmented(&single, size)), want, "records of {size}");
            }
        }
    }

    #[test]
    fn a_hand_built_hello_gives_its_one_host_name() {
        let bytes = hello(&[
            (0x000a, vec![0, 2, 0, 0x1d]),
            (SERVER_NAME, names(&[(HOST_NAME, b"API.Example.com")])),
            (0x002b, vec![2, 3, 4]),
        ]);
        assert_eq!(peek(&bytes), sni("API.Example.com"));
        assert_eq!(peek(&hello(&[(0x000a, vec![0, 2, 0, 0x1d])])), Peek::NoSni);
        assert_eq!(peek(&hello(&[])), Peek::NoSni);
        // A TLS 1.2 hello without an extensions block.
        let mut body = vec![3, 3];
        body.extend([0; 32]);
        body.extend([0, 0, 2, 0, 0x2f, 1, 0]);
        assert_eq!(peek(&record(&body)), Peek::NoSni);
    }

    #[test]
    fn what_is_not_a_tls_handshake_is_said_at_once() {
        for bytes in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"G",
            b"\x80\x2e\x01\x00\x02", // an SSLv2-compatible hello
            b"\x17\x03\x03\x00\x10", // application data
            b"\x15\x03\x03\x00\x02", // an alert
            b"\x16\x02",             // not TLS's major version
            b"\x16\x03\x05",         // a minor version TLS does not have
            b"\x00",
        ] {
            assert_eq!(peek(bytes), Peek::NotTls, "{bytes:?}");
        }
        assert_eq!(peek(b""), Peek::NeedMore);
        assert_eq!(peek(b"\x16"), Peek::NeedMore);
        assert_eq!(peek(b"\x16\x03\x01\x02"), Peek::NeedMore);
    }

    #[test]
    fn malformed_hellos_are_refused() {
        let good = openssl_tls13();
        let sni_ext = |entries: &[(u8, &[u8])]| hello(&[(SERVER_NAME, names(entries))]);
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("server_name twice", {
                hello(&[
                    (SERVER_NAME, names(&[(HOST_NAME, b"a.example.com")])),
                    (SERVER_NAME, names(&[(HOST_NAME, b"b.example.com")])),
                ])
            }),
            (
                "two host names",
                sni_ext(&[(HOST_NAME, b"a.example.com"), (HOST_NAME, b"b.example.com")]),
            ),
            ("an unknown name type", sni_ext(&[(1, b"a.example.com")])),
            ("an empty name", sni_ext(&[(HOST_NAME, b"")])),
            (
                "a NUL in the name",
                sni_ext(&[(HOST_NAME, b"a.example.com\0.evil")]),
            ),
            (
                "a space in the name",
                sni_ext(&[(HOST_NAME, b"a example.com")]),
            ),
            (
                "a non-ASCII name",
                sni_ext(&[(HOST_NAME, "bücher.example".as_bytes())]),
            ),
            (
                "a name over 255 bytes",
                sni_ext(&[(HOST_NAME, &[b'a'; 256])]),
            ),
            ("an empty name list", hello(&[(SERVER_NAME, vec![0, 0])])),
            ("empty server_name data", hello(&[(SERVER_NAME, vec![])])),
            (
                "a list longer than its extension",
                hello(&[(SERVER_NAME, vec![0, 9, 0])]),
            ),
            ("bytes after the name list", {
                let mut data = names(&[(HOST_NAME, b"a.example.com")]);
                data.push(0);
                hello(&[(SERVER_NAME, data)])
            }),
            ("a handshake that is not a ClientHello", {
                let mut bytes = good.clone();
                bytes[5] = 2;
                bytes
            }),
            ("a hello version that is not 3.x", {
                let mut bytes = good.clone();
                bytes[9] = 2;
                bytes
            }),
            ("a zero-length record", b"\x16\x03\x01\x00\x00".to_vec()),
            ("a record over 16 KiB", b"\x16\x03\x01\x40\x01".to_vec()),
            (
                "a hello over 16 KiB",
                b"\x16\x03\x01\x00\x04\x01\x00\x40\x00".to_vec(),
            ),
            ("an alert in the middle of a hello", {
                let mut bytes = fragmented(&good, 100);
                bytes[105] = 21;
                bytes
            }),
            ("no cipher suites", {
                let mut body = vec![3, 3];
                body.extend([0; 32]);
                body.extend([0, 0, 0, 1, 0]);
                record(&body)
            }),
            ("an odd cipher suites length", {
                let mut body = vec![3, 3];
                body.extend([0; 32]);
                body.extend([0, 0, 3, 0, 0x2f, 0, 1, 0]);
                record(&body)
            }),
            ("no compression method", {
                let mut body = vec![3, 3];
                body.extend([0; 32]);
                body.extend([0, 0, 2, 0, 0x2f, 0]);
                record(&body)
            }),
            ("a session id over 32 bytes", {
                let mut body = vec![3, 3];
                body.extend([0; 32]);
                body.push(33);
                body.extend([0; 33]);
                body.extend([0, 2, 0, 0x2f, 1, 0]);
                record(&body)
            }),
            ("bytes after the extensions", {
                let mut body = vec![3, 3];
                body.extend([0; 32]);
                body.extend([0, 0, 2, 0, 0x2f, 1, 0, 0, 0, 0xff]);
                record(&body)
            }),
            ("a truncated extension", {
                let mut body = vec![3, 3];
                body.extend([0; 32]);
                body.extend([0, 0, 2, 0, 0x2f, 1, 0, 0, 3, 0, 0, 0]);
                record(&body)
            }),
            ("a body shorter than its random", record(&[3, 3, 1, 2, 3])),
        ];
        // A handshake length longer than the record says, with the rest never coming: an
        // incomplete hello up to 16 KiB, then refused.
        let mut padded = good.clone();
        padded[8] = padded[8].wrapping_add(1);
        assert_eq!(peek(&padded), Peek::NeedMore);
        padded.resize(MAX_CLIENT_HELLO_BYTES, 0x16);
        cases.push(("a hello not complete within 16 KiB", padded));
        for (what, bytes) in cases {
            assert_eq!(peek(&bytes), Peek::Malformed, "{what}");
        }
    }

    #[test]
    fn a_hello_up_to_16_kib_is_read_and_no_byte_past_it_is() {
        // A 15 KiB padding extension before the name, in two records.
        let big = hello(&[
            (0x0015, vec![0; 15 * 1024]),
            (SERVER_NAME, names(&[(HOST_NAME, b"api.example.com")])),
        ]);
        assert!(big.len() < MAX_CLIENT_HELLO_BYTES);
        assert_eq!(peek(&fragmented(&big, 8192)), sni("api.example.com"));
        let too_big = hello(&[
            (0x0015, vec![0; 16 * 1024]),
            (SERVER_NAME, names(&[(HOST_NAME, b"api.example.com")])),
        ]);
        assert_eq!(peek(&fragmented(&too_big, 8192)), Peek::Malformed);
        // 16 KiB of valid-looking records that never finish a hello.
        let mut endless = b"\x16\x03\x01\x00\x04\x01\x00\x3f\xf0".to_vec();
        while endless.len() < MAX_CLIENT_HELLO_BYTES {
            endless.extend(b"\x16\x03\x01\x00\x01\x00");
        }
        assert_eq!(peek(&endless[..MAX_CLIENT_HELLO_BYTES - 1]), Peek::NeedMore);
        assert_eq!(peek(&endless), Peek::Malformed);
    }

    #[test]
    fn a_server_name_matches_the_authority_in_any_case_with_or_without_its_dot() {
        let authority = DnsName::parse("api.example.com").unwrap();
        for same in ["api.example.com", "API.Example.COM", "api.example.com."] {
            assert!(sni_matches(&authority, same), "{same}");
        }
        for other in [
            "x.api.example.com",
            "example.com",
            "api.example.co",
            "api.example.com..",
            "*.example.com",
            "",
            "192.0.2.1",
        ] {
            assert!(!sni_matches(&authority, other), "{other}");
        }
    }
}
