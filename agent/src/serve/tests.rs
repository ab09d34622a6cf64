//! The agent's serving loop over a socket pair on the host, commands run as the test's user.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::*;
use crate::protocol::{ExecRequest, ExitStatus, Frame};

struct Host {
    stream: UnixStream,
    decoder: FrameDecoder,
    agent: Option<JoinHandle<Result<Ended, ServeError>>>,
}

impl Host {
    fn start() -> Self {
        let (host, mut agent_side) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let agent = std::thread::spawn(move || {
            let config = ServeConfig {
                timings: BootTimings {
                    agent_ms: 1,
                    modules_ms: 2,
                    verity_ms: 3,
                    root_ms: 4,
                    channel_ms: 5,
                },
                ..ServeConfig::on_host()
            };
            serve(&mut agent_side, &config)
        });
        Self {
            stream: host,
            decoder: FrameDecoder::new(),
            agent: Some(agent),
        }
    }

    fn send(&mut self, stream: u32, request: &Request) {
        let payload = serde_json::to_vec(request).unwrap();
        self.stream
            .write_all(&encode(FrameKind::Request, stream, &payload).unwrap())
            .unwrap();
    }

    fn frame(&mut self) -> Frame {
        loop {
            if let Some(frame) = self.decoder.next_frame().unwrap() {
                return frame;
            }
            let mut buffer = [0; 4096];
            match self.stream.read(&mut buffer) {
                Ok(n) if n > 0 => self.decoder.push(&buffer[..n]),
                read => panic!(
                    "the channel closed ({read:?}); the agent ended with {:?}",
                    self.ended()
                ),
            }
        }
    }

    /// Frames up to and including the response on `stream`: (stdout, stderr, response,
    /// the times each data frame arrived).
    fn exchange(&mut self, stream: u32) -> (Vec<u8>, Vec<u8>, Response, Vec<Instant>) {
        let (mut stdout, mut stderr, mut arrivals) = (Vec::new(), Vec::new(), Vec::new());
        loop {
            let frame = self.frame();
            assert_eq!(frame.stream, stream);
            match frame.kind {
                FrameKind::Stdout => stdout.extend(&frame.payload),
                FrameKind::Stderr => stderr.extend(&frame.payload),
                FrameKind::Response => {
                    let response = serde_json::from_slice(&frame.payload).unwrap();
                    return (stdout, stderr, response, arrivals);
                }
                FrameKind::Request | FrameKind::Data => panic!("a {:?} frame", frame.kind),
            }
            arrivals.push(Instant::now());
        }
    }

    fn exec(&mut self, stream: u32, argv: &[&str], timeout_ms: u64) {
        self.send(
            stream,
            &Request::Exec(ExecRequest {
                argv: argv.iter().map(|a| a.to_string()).collect(),
                env: BTreeMap::new(),
                cwd: None,
                timeout_ms,
            }),
        );
    }

    fn ended(&mut self) -> Result<Ended, ServeError> {
        self.agent.take().expect("joined once").join().unwrap()
    }

    fn power_off(mut self) -> Ended {
        self.send(u32::MAX, &Request::PowerOff);
        let (_, _, response, _) = self.exchange(u32::MAX);
        assert_eq!(response, Response::PowerOff);
        self.ended().unwrap()
    }
}

fn error_code(response: &Response) -> &str {
    match response {
        Response::Error(e) => &e.code,
        other => panic!("not an error: {other:?}"),
    }
}

fn exec_reply(response: Response) -> ExecReply {
    match response {
        Response::Exec(reply) => reply,
        other => panic!("not an exec reply: {other:?}"),
    }
}

#[test]
fn hello_answers_with_the_version_and_boot_timings() {
    let mut host = Host::start();
    host.send(1, &Request::Hello { version: 1 });
    let (_, _, response, _) = host.exchange(1);
    let Response::Hello(hello) = response else {
        panic!("{response:?}")
    };
    assert_eq!(hello.version, PROTOCOL_VERSION);
    assert_eq!(hello.timings.channel_ms, 5);
    host.send(3, &Request::Echo);
    assert_eq!(host.exchange(3).2, Response::Echo);
    host.send(2, &Request::Hello { version: 99 });
    assert_eq!(error_code(&host.exchange(2).2), codes::VERSION);
    assert_eq!(host.power_off(), Ended::PowerOff);
}

#[test]
fn exec_keeps_stdout_and_stderr_apart_and_reports_the_exit_code() {
    let mut host = Host::start();
    host.exec(
        3,
        &[
            "sh",
            "-c",
            "echo out; echo err >&2; printf '\\0\\377'; exit 7",
        ],
        10_000,
    );
    let (stdout, stderr, response, _) = host.exchange(3);
    assert_eq!(stdout, b"out\n\0\xff");
    assert_eq!(stderr, b"err\n");
    let reply = exec_reply(response);
    assert_eq!(reply.status, ExitStatus::Exited { code: 7 });
    assert_eq!((reply.stdout_bytes, reply.stderr_bytes), (6, 4));
    assert_eq!(reply.integrity, Integrity::Intact);

    host.exec(4, &["sh", "-c", "kill -TERM $$"], 10_000);
    let reply = exec_reply(host.exchange(4).2);
    assert_eq!(reply.status, ExitStatus::Signaled { signal: 15 });
    host.power_off();
}

#[test]
fn output_is_streamed_while_the_command_runs() {
    let mut host = Host::start();
    host.exec(1, &["sh", "-c", "echo first; sleep 1; echo second"], 10_000);
    let (stdout, _, response, arrivals) = host.exchange(1);
    assert_eq!(stdout, b"first\nsecond\n");
    exec_reply(response);
    assert_eq!(
        arrivals.len(),
        2,
        "one frame per line written a second apart"
    );
    assert!(arrivals[1] - arrivals[0] >= Duration::from_millis(500));
    host.power_off();
}

#[test]
fn a_command_past_its_timeout_is_killed_with_what_it_started() {
    let mut host = Host::start();
    let started = Instant::now();
    host.exec(1, &["sh", "-c", "sleep 30 & sleep 30"], 300);
    let reply = exec_reply(host.exchange(1).2);
    assert_eq!(reply.status, ExitStatus::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(10));

    // Leftovers holding the pipes do not hold up the answer either.
    let started = Instant::now();
    host.exec(2, &["sh", "-c", "sleep 30 & echo started"], 60_000);
    let (stdout, _, response, _) = host.exchange(2);
    assert_eq!(stdout, b"started\n");
    assert_eq!(exec_reply(response).status, ExitStatus::Exited { code: 0 });
    assert!(started.elapsed() < Duration::from_secs(10));
    host.power_off();
}

#[test]
fn bad_requests_get_their_codes_and_the_channel_goes_on() {
    let mut host = Host::start();
    host.exec(1, &["/nonexistent/program"], 1000);
    assert_eq!(error_code(&host.exchange(1).2), codes::NOT_FOUND);
    host.exec(2, &["/etc"], 1000);
    assert_eq!(error_code(&host.exchange(2).2), codes::NOT_EXECUTABLE);
    host.exec(3, &[], 1000);
    assert_eq!(error_code(&host.exchange(3).2), codes::BAD_REQUEST);
    host.send(
        4,
        &Request::Exec(ExecRequest {
            argv: vec!["true".into()],
            env: BTreeMap::new(),
            cwd: Some("/nonexistent".into()),
            timeout_ms: 1000,
        }),
    );
    assert_eq!(error_code(&host.exchange(4).2), codes::NO_CWD);
    host.stream
        .write_all(&encode(FrameKind::Request, 5, b"{not json").unwrap())
        .unwrap();
    assert_eq!(error_code(&host.exchange(5).2), codes::BAD_REQUEST);
    host.stream
        .write_all(&encode(FrameKind::Stdout, 6, b"data").unwrap())
        .unwrap();
    assert_eq!(error_code(&host.exchange(6).2), codes::BAD_REQUEST);
    // Data for no upload is dropped without an answer: the next exchange is answered first.
    host.stream
        .write_all(&encode(FrameKind::Data, 6, b"stray").unwrap())
        .unwrap();

    host.power_off();
}

#[test]
fn commands_run_side_by_side_each_on_its_own_stream() {
    let mut host = Host::start();
    host.exec(7, &["sh", "-c", "sleep 1; echo seven"], 10_000);
    host.exec(8, &["sh", "-c", "echo eight"], 10_000);
    host.exec(7, &["true"], 10_000);
    // The same stream twice is refused; the later, quicker command answers first.
    let mut answers = Vec::new();
    let mut output: std::collections::HashMap<u32, Vec<u8>> = Default::default();
    while answers.len() < 3 {
        let frame = host.frame();
        match frame.kind {
            FrameKind::Stdout => output
                .entry(frame.stream)
                .or_default()
                .extend(frame.payload),
            FrameKind::Response => answers.push((
                frame.stream,
                serde_json::from_slice::<Response>(&frame.payload).unwrap(),
            )),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(answers[0].0, 7);
    assert_eq!(error_code(&answers[0].1), codes::BAD_REQUEST);
    assert_eq!(answers[1].0, 8);
    assert_eq!(answers[2].0, 7);
    assert_eq!(output[&7], b"seven\n");
    assert_eq!(output[&8], b"eight\n");

    // Past the limit: busy.
    for stream in 100..100 + MAX_COMMANDS as u32 {
        host.exec(stream, &["sleep", "2"], 10_000);
    }
    host.exec(999, &["true"], 10_000);
    let mut busy = None;
    let mut finished = 0;
    while finished < MAX_COMMANDS || busy.is_none() {
        let frame = host.frame();
        let response: Response = serde_json::from_slice(&frame.payload).unwrap();
        if frame.stream == 999 {
            busy = Some(error_code(&response).to_string());
        } else {
            exec_reply(response);
            finished += 1;
        }
    }
    assert_eq!(busy.as_deref(), Some(codes::BUSY));
    host.power_off();
}

#[test]
fn a_malformed_frame_ends_serving_and_a_closed_channel_is_the_host_gone() {
    let mut host = Host::start();
    host.stream.write_all(&[0xff; 12]).unwrap();
    let error = host.ended().unwrap_err();
    assert_eq!(error.code(), "PROTO001");

    let mut host = Host::start();
    host.send(1, &Request::Hello { version: 1 });
    host.exchange(1);
    host.stream.shutdown(std::net::Shutdown::Both).unwrap();
    assert_eq!(host.ended().unwrap(), Ended::HostGone);
}

fn upload(host: &mut Host, stream: u32, path: &str, bytes: &[u8], sha256: &str) -> Response {
    host.send(
        stream,
        &Request::FsWrite(crate::protocol::FsWriteRequest {
            path: path.into(),
            mode: 0o640,
            size: bytes.len() as u64,
            sha256: sha256.into(),
        }),
    );
    for chunk in bytes.chunks(100_000) {
        host.stream
            .write_all(&encode(FrameKind::Data, stream, chunk).unwrap())
            .unwrap();
    }
    let (_, _, response, _) = host.exchange(stream);
    response
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

#[test]
fn files_are_copied_in_and_out_whole_and_checked() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let path = dir.path().join("data.bin").to_str().unwrap().to_string();
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut host = Host::start();

    let done = upload(&mut host, 1, &path, &bytes, &sha256(&bytes));
    assert_eq!(
        done,
        Response::FsWrite(crate::protocol::FileDone {
            size: bytes.len() as u64,
            sha256: sha256(&bytes)
        })
    );
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);

    host.send(2, &Request::FsRead { path: path.clone() });
    let mut read_back = Vec::new();
    let answer = loop {
        let frame = host.frame();
        match frame.kind {
            FrameKind::Data => read_back.extend(frame.payload),
            FrameKind::Response => {
                break serde_json::from_slice::<Response>(&frame.payload).unwrap()
            }
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(read_back, bytes);
    assert!(matches!(answer, Response::FsRead(done) if done.sha256 == sha256(&bytes)));

    // Bytes that do not match what was announced are not kept, and nothing is left behind.
    let other = dir.path().join("other.bin").to_str().unwrap().to_string();
    let refused = upload(&mut host, 3, &other, b"tampered", &sha256(b"original"));
    assert_eq!(error_code(&refused), codes::COPY_MISMATCH);
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "a temporary was left"
    );
    host.power_off();
}

#[test]
fn copies_stay_under_the_copy_root_and_follow_no_symlink() {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    std::os::unix::fs::symlink("/etc", dir.path().join("etc")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", dir.path().join("hostname")).unwrap();
    let base = dir.path().to_str().unwrap();
    let mut host = Host::start();
    for (stream, path) in [
        (1, "/etc/hostname".to_string()),
        (2, "/tmp/../etc/hostname".to_string()),
        (3, format!("{base}/./x")),
        (4, format!("{base}//x")),
        (5, format!("{base}/etc/hostname")),
        (6, format!("{base}/hostname")),
        (7, "tmp/relative".to_string()),
    ] {
        host.send(stream, &Request::FsRead { path: path.clone() });
        assert_eq!(
            error_code(&host.exchange(stream).2),
            codes::PATH_REFUSED,
            "{path}"
        );
    }
    let refused = upload(
        &mut host,
        8,
        &format!("{base}/etc/evil"),
        b"x",
        &sha256(b"x"),
    );
    assert_eq!(error_code(&refused), codes::PATH_REFUSED);
    assert!(!std::path::Path::new("/etc/evil").exists());
    host.power_off();
}
