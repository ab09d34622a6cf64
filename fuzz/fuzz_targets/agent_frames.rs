//! The agent channel's decoder: any bytes, cut into reads of any size (the first byte picks
//! the read size), are split into frames or refused with a code, never a panic; every request
//! frame's payload goes through the request parser and the exec checks, and every frame that
//! decodes encodes back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mvm_protocol::{flow, FrameDecoder, FrameKind, OpenRequest, Request, Response};

fuzz_target!(|data: &[u8]| {
    let Some((&read_size, stream)) = data.split_first() else {
        return;
    };
    let mut decoder = FrameDecoder::new();
    for read in stream.chunks(usize::from(read_size).max(1)) {
        decoder.push(read);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    let bytes = frame.encode().expect("a decoded frame encodes");
                    let mut again = FrameDecoder::new();
                    again.push(&bytes);
                    assert_eq!(again.next_frame().unwrap(), Some(frame.clone()));
                    match frame.kind {
                        FrameKind::Request => {
                            if let Ok(Request::Exec(exec) | Request::Spawn(exec)) =
                                serde_json::from_slice::<Request>(&frame.payload)
                            {
                                let _ = exec.problem();
                            }
                        }
                        FrameKind::Response => {
                            let _ = serde_json::from_slice::<Response>(&frame.payload);
                        }
                        FrameKind::Credit => {
                            if let Ok(bytes) = flow::parse_credit(&frame.payload) {
                                assert_eq!(flow::credit_payload(bytes)[..], frame.payload[..]);
                            }
                        }
                        FrameKind::Open => {
                            let _ = serde_json::from_slice::<OpenRequest>(&frame.payload);
                        }
                        FrameKind::Stdout
                        | FrameKind::Stderr
                        | FrameKind::Data
                        | FrameKind::Close => {}
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    assert!(error.code().starts_with("PROTO"));
                    return;
                }
            }
        }
    }
});
