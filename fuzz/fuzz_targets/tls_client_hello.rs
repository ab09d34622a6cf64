//! The egress proxy's ClientHello peek: any bytes, however hostile, get an answer and never a
//! panic. The bytes after the first arrive in reads of the size the first byte picks, and
//! once the peek gives an answer other than "need more" for what has arrived, it gives the
//! same answer for all of it — more bytes never turn a refusal into a name, or one name into
//! another. A server name found is printable ASCII of at most 255 bytes, and it matches itself
//! as an authority whenever it is a valid name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mvm_runner::egress::authority::DnsName;
use mvm_runner::egress::sni::{peek, sni_matches, Peek, MAX_CLIENT_HELLO_BYTES};

fuzz_target!(|data: &[u8]| {
    let Some((&read_size, stream)) = data.split_first() else {
        return;
    };
    let whole = peek(stream);
    // At most 64 reads, so a long input stays quick.
    let read_size = usize::from(read_size).max(1).max(stream.len() / 64);
    let mut arrived = read_size;
    while arrived < stream.len() {
        let early = peek(&stream[..arrived]);
        if early != Peek::NeedMore {
            assert_eq!(early, whole, "after {arrived} bytes");
        }
        arrived += read_size;
    }
    match &whole {
        Peek::NeedMore => assert!(stream.len() < MAX_CLIENT_HELLO_BYTES),
        Peek::Sni(name) => {
            assert!(name.len() <= 255 && name.bytes().all(|b| b.is_ascii_graphic()));
            if let Ok(authority) = DnsName::parse(name) {
                assert!(sni_matches(&authority, name));
            }
        }
        Peek::NotTls | Peek::Malformed | Peek::NoSni => {}
    }
});
