use super::*;

/// The result of a whole handshake: the greeting, then the request in the bytes after it.
type Handshake = Result<Option<(Target, usize)>, SocksError>;

/// Runs greeting and request over `bytes` as a server reading them as they come would: the
/// greeting from the start, then the request from where the greeting ended; the request's
/// length counts from the start of `bytes`.
fn handshake_over(reads: &[&[u8]]) -> Handshake {
    let mut received = Vec::new();
    let mut greeting = None;
    for read in reads {
        received.extend_from_slice(read);
        let greeting_len = match greeting {
            Some(len) => len,
            None => match read_greeting(&received)? {
                Some(len) => *greeting.insert(len),
                None => continue,
            },
        };
        if let Some((target, len)) = read_request(&received[greeting_len..])? {
            return Ok(Some((target, greeting_len + len)));
        }
    }
    Ok(None)
}

/// The handshake over `bytes` in one read, checked to be the same however they arrive: a
/// byte at a time, or in two reads cut anywhere.
fn handshake(bytes: &[u8]) -> Handshake {
    let whole = handshake_over(&[bytes]);
    let bytes_one_by_one: Vec<&[u8]> = bytes.chunks(1).collect();
    assert_eq!(handshake_over(&bytes_one_by_one), whole);
    for cut in 0..=bytes.len() {
        let (first, second) = bytes.split_at(cut);
        assert_eq!(handshake_over(&[first, second]), whole, "cut after {cut}");
    }
    whole
}

fn name(host: &str, port: u16) -> Target {
    Target {
        host: Host::Name(host.into()),
        port,
    }
}

fn ip(address: &str, port: u16) -> Target {
    Target {
        host: Host::Ip(address.parse().unwrap()),
        port,
    }
}

/// A greeting offering "no authentication", then a `CONNECT` with this address part.
fn request(address: &[u8]) -> Vec<u8> {
    [&[5, 1, 0][..], &[5, 1, 0], address].concat()
}

#[test]
fn curl_socks5h_sends_the_name_for_the_host_to_resolve() {
    let bytes = include_bytes!("../captured/curl_socks5h.socks");
    assert_eq!(
        handshake(bytes),
        Ok(Some((name("api.example.com", 80), bytes.len())))
    );
    // curl offers "no authentication" and username/password; only the first is taken.
    assert_eq!(read_greeting(bytes), Ok(Some(4)));
}

#[test]
fn curl_socks5_sends_addresses() {
    let bytes = include_bytes!("../captured/curl_socks5.socks");
    assert_eq!(
        handshake(bytes),
        Ok(Some((ip("127.0.0.1", 8080), bytes.len())))
    );
    let bytes = include_bytes!("../captured/curl_socks5_v6.socks");
    assert_eq!(handshake(bytes), Ok(Some((ip("::1", 8080), bytes.len()))));
}

#[test]
fn bytes_after_the_request_are_left_for_the_connection() {
    let bytes = [&request(b"\x03\x09a.example\x01\xbb")[..], b"\x16\x03\x01"].concat();
    assert_eq!(
        handshake(&bytes),
        Ok(Some((name("a.example", 443), bytes.len() - 3)))
    );
}

#[test]
fn names_are_checked_and_addresses_in_names_are_addresses() {
    assert_eq!(
        handshake(&request(b"\x03\x0910.0.0.1:\x00\x50")),
        Err(SocksError::Target(TargetError::NameSyntax))
    );
    let bytes = request(b"\x03\x0810.0.0.1\x00\x50");
    assert_eq!(
        handshake(&bytes),
        Ok(Some((ip("10.0.0.1", 80), bytes.len())))
    );
    let bytes = request(b"\x03\x04A.EX\x00\x50");
    assert_eq!(handshake(&bytes), Ok(Some((name("a.ex", 80), bytes.len()))));
    assert_eq!(
        handshake(&request(b"\x03\x0a2130706433\x00\x50")),
        Err(SocksError::Target(TargetError::NumericName))
    );
    assert_eq!(
        handshake(&request(b"\x03\x00\x00\x50")),
        Err(SocksError::Target(TargetError::EmptyHost))
    );
    assert_eq!(
        handshake(&request(b"\x03\x03a\0b\x00\x50")),
        Err(SocksError::Target(TargetError::NameSyntax))
    );
    let longest = [&[3, 255][..], &[b'a'; 255], &[0, 80]].concat();
    assert_eq!(
        handshake(&request(&longest)),
        Err(SocksError::Target(TargetError::NameTooLong))
    );
}

#[test]
fn nothing_is_decided_before_a_message_is_complete() {
    assert_eq!(read_greeting(b""), Ok(None));
    assert_eq!(read_greeting(b"\x05"), Ok(None));
    assert_eq!(read_greeting(b"\x05\x02\x02"), Ok(None));
    assert_eq!(read_request(b""), Ok(None));
    assert_eq!(read_request(b"\x05\x01\x00"), Ok(None));
    assert_eq!(read_request(b"\x05\x01\x00\x03"), Ok(None));
    assert_eq!(read_request(b"\x05\x01\x00\x03\x01a\x00"), Ok(None));
    assert_eq!(
        read_request(b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00"),
        Ok(None)
    );
}

#[test]
fn a_greeting_without_no_authentication_gets_no_acceptable_method() {
    for greeting in [&b"\x05\x01\x02"[..], b"\x05\x00", b"\x05\x03\x01\x02\x80"] {
        assert_eq!(
            handshake(greeting),
            Err(SocksError::NoAcceptableMethod),
            "{greeting:?}"
        );
    }
    assert_eq!(SocksError::NoAcceptableMethod.reply(), [5, 0xFF]);
    assert_eq!(read_greeting(b"\x05\x03\x02\x01\x00"), Ok(Some(5)));
    assert_eq!(read_greeting(b"\x04\x01\x00"), Err(SocksError::Version));
}

#[test]
fn faults_in_a_request_get_their_reply_codes() {
    for (bytes, error, reply) in [
        (
            &[4u8, 1, 0, 1][..],
            SocksError::Version,
            Reply::GeneralFailure,
        ),
        (
            &[5, 2, 0, 1],
            SocksError::Command,
            Reply::CommandNotSupported,
        ),
        (
            &[5, 3, 0, 1],
            SocksError::Command,
            Reply::CommandNotSupported,
        ),
        (&[5, 1, 1, 1], SocksError::Reserved, Reply::GeneralFailure),
        (
            &[5, 1, 0, 2],
            SocksError::AddressType,
            Reply::AddressTypeNotSupported,
        ),
        (
            &[5, 1, 0, 0],
            SocksError::AddressType,
            Reply::AddressTypeNotSupported,
        ),
        (
            &[5, 1, 0, 1, 10, 0, 0, 1, 0, 0],
            SocksError::Target(TargetError::Port),
            Reply::GeneralFailure,
        ),
    ] {
        let greeted = [&[5, 1, 0][..], bytes].concat();
        assert_eq!(handshake(&greeted), Err(error), "{bytes:?}");
        assert_eq!(error.reply(), reply.encode());
    }
    // A fault shows as soon as its byte arrives.
    assert_eq!(read_request(b"\x05\x02"), Err(SocksError::Command));
}

#[test]
fn replies_carry_their_code_and_an_empty_bound_address() {
    assert_eq!(success(), [5, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for (refusal, code) in [
        (Refusal::Denied, 0x02),
        (Refusal::Unreachable, 0x04),
        (Refusal::ConnectionRefused, 0x05),
        (Refusal::Failed, 0x01),
    ] {
        assert_eq!(
            Reply::from(refusal).encode(),
            [5, code, 0, 1, 0, 0, 0, 0, 0, 0]
        );
    }
    assert_eq!(Reply::CommandNotSupported.encode()[1], 0x07);
    assert_eq!(Reply::AddressTypeNotSupported.encode()[1], 0x08);
}

#[test]
fn every_fault_has_a_proxy_code() {
    for error in [
        SocksError::NoAcceptableMethod,
        SocksError::Command,
        SocksError::AddressType,
        SocksError::Version,
        SocksError::Reserved,
        SocksError::Target(TargetError::Port),
    ] {
        assert!(error.code().starts_with("PROXY"), "{error}");
    }
}
