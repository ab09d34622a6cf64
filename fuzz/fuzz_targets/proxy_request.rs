//! The guest proxy's readers: any bytes a client could send, cut into reads of any size (the
//! first byte picks the read size), get the same answer as in one read — a request, a wait for
//! more, or a coded refusal — and never a panic. A forwarded head is checked to be one
//! well-formed HTTP head that ends where it says it does; a SOCKS5 handshake, greeting then
//! request, is read the same way.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mvm_agent::proxy::request::{Parsed, RequestError, RequestReader, MAX_HEAD};
use mvm_agent::proxy::{socks, ProxyRequest, Target};

fuzz_target!(|data: &[u8]| {
    let Some((&read_size, stream)) = data.split_first() else {
        return;
    };
    let read_size = usize::from(read_size).max(1);
    let whole = RequestReader::new().read(stream);
    let mut reader = RequestReader::new();
    let mut received = 0;
    let answer = loop {
        received = (received + read_size).min(stream.len());
        match reader.read(&stream[..received]) {
            Ok(Parsed::NeedMore) if received < stream.len() => {}
            answer => break answer,
        }
    };
    assert_eq!(answer, whole);
    match whole {
        Ok(Parsed::NeedMore) => assert!(stream.len() < MAX_HEAD),
        Ok(Parsed::Request { request, head_len }) => match request {
            ProxyRequest::Connect(_) => assert!(head_len <= MAX_HEAD),
            ProxyRequest::Forward { head, .. } => {
                assert!(head_len <= MAX_HEAD);
                check_forwarded(&head);
            }
            ProxyRequest::Socks => {
                assert_eq!(head_len, 0);
                let split: Vec<&[u8]> = stream.chunks(read_size).collect();
                assert_eq!(socks_handshake(&split), socks_handshake(&[stream]));
            }
        },
        Err(error) => {
            assert!(error.code().starts_with("PROXY"));
            assert!(error
                .response()
                .starts_with(b"HTTP/1.1 400 Bad Request\r\n"));
        }
    }
    // The request reader alone, whatever came before it.
    let split: Vec<&[u8]> = stream.chunks(read_size).collect();
    assert_eq!(socks_request(&split), socks_request(&[stream]));
});

/// A head written for an origin server: CRLF line ends only, no control characters, its one
/// empty line at its end, `Connection: close` last; read back, it is a well-formed head that
/// is no proxy request.
fn check_forwarded(head: &[u8]) {
    assert!(head.ends_with(b"\r\nConnection: close\r\n\r\n"));
    assert_eq!(
        head.windows(4).position(|w| w == b"\r\n\r\n"),
        Some(head.len() - 4)
    );
    for (i, &b) in head.iter().enumerate() {
        match b {
            b'\r' => assert_eq!(head.get(i + 1), Some(&b'\n')),
            b'\n' => assert_eq!(head[i - 1], b'\r'),
            b'\t' => {}
            _ => assert!(b >= 0x20 && b != 0x7f),
        }
    }
    let again = RequestReader::new().read(head);
    assert!(
        matches!(
            again,
            Err(RequestError::NotProxyRequest
                | RequestError::TooManyHeaders
                | RequestError::HeadTooLarge)
        ),
        "{again:?}"
    );
}

type Handshake = Result<Option<(Target, usize)>, socks::SocksError>;

/// Greeting, then request, over `reads` as they arrive.
fn socks_handshake(reads: &[&[u8]]) -> Handshake {
    let mut received = Vec::new();
    let mut greeting = None;
    for read in reads {
        received.extend_from_slice(read);
        let greeting_len = match greeting {
            Some(len) => len,
            None => match socks::read_greeting(&received).map_err(checked)? {
                Some(len) => *greeting.insert(len),
                None => continue,
            },
        };
        let request = socks::read_request(&received[greeting_len..]).map_err(checked)?;
        if let Some((target, len)) = request {
            return Ok(Some((target, greeting_len + len)));
        }
    }
    Ok(None)
}

/// A request alone, over `reads` as they arrive.
fn socks_request(reads: &[&[u8]]) -> Handshake {
    let mut received = Vec::new();
    for read in reads {
        received.extend_from_slice(read);
        if let Some(request) = socks::read_request(&received).map_err(checked)? {
            return Ok(Some(request));
        }
    }
    Ok(None)
}

/// A refusal has a code and a reply of the right size.
fn checked(error: socks::SocksError) -> socks::SocksError {
    assert!(error.code().starts_with("PROXY"));
    assert!(matches!(error.reply().len(), 2 | 10));
    error
}
