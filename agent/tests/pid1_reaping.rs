//! The serving loop as PID 1 runs it: reaping every child that ends, not only its own
//! commands. Alone in its test binary, so that reaping every child of the process cannot take
//! another test's children.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use mvm_agent::protocol::{encode, ExitStatus, FrameDecoder, FrameKind, Request, Response};
use mvm_agent::serve::{serve, Ended, ServeConfig};

fn request(stream: &mut UnixStream, id: u32, request: &Request) {
    let payload = serde_json::to_vec(request).unwrap();
    stream
        .write_all(&encode(FrameKind::Request, id, &payload).unwrap())
        .unwrap();
}

fn response(stream: &mut UnixStream, decoder: &mut FrameDecoder) -> (Vec<u8>, Response) {
    let mut stdout = Vec::new();
    loop {
        while let Some(frame) = decoder.next_frame().unwrap() {
            match frame.kind {
                FrameKind::Stdout => stdout.extend(frame.payload),
                FrameKind::Response => {
                    return (stdout, serde_json::from_slice(&frame.payload).unwrap())
                }
                _ => {}
            }
        }
        let mut buffer = [0; 4096];
        let n = stream.read(&mut buffer).unwrap();
        assert!(n > 0, "the agent closed the channel");
        decoder.push(&buffer[..n]);
    }
}

#[test]
fn commands_in_their_own_process_groups_are_reaped_by_the_agent() {
    let (mut host, mut guest) = UnixStream::pair().unwrap();
    host.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let agent = std::thread::spawn(move || {
        let config = ServeConfig {
            reap_orphans: true,
            ..ServeConfig::on_host()
        };
        serve(&mut guest, &config)
    });
    let mut decoder = FrameDecoder::new();
    for (id, script, code) in [(1, "echo one", 0), (2, "sleep 30 & echo two; exit 3", 3)] {
        let exec = mvm_agent::protocol::ExecRequest {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            env: BTreeMap::new(),
            cwd: None,
            timeout_ms: 10_000,
            stdin: false,
            user: None,
        };
        request(&mut host, id, &Request::Exec(exec));
        let (stdout, reply) = response(&mut host, &mut decoder);
        let Response::Exec(reply) = reply else {
            panic!("{reply:?}")
        };
        assert_eq!(reply.status, ExitStatus::Exited { code }, "{script}");
        assert!(!stdout.is_empty());
    }
    request(&mut host, 9, &Request::PowerOff);
    response(&mut host, &mut decoder);
    assert_eq!(agent.join().unwrap().unwrap(), Ended::PowerOff);
}
