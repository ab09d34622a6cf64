//! The agent's serving loop over a socket pair on the host, commands run as the test's user.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::*;
use mvm_protocol::service::{
    Health, HealthSpec, Probe, Restart, ServiceSpec, ServiceState, ServicesReport, StartServices,
};
use mvm_protocol::{ExecRequest, ExitStatus, FileKind, Frame, TtySize};

/// How long the host waits for the agent to say something (or to end) before failing.
const SILENCE: Duration = Duration::from_secs(20);

struct Host {
    stream: UnixStream,
    decoder: FrameDecoder,
    agent: Option<JoinHandle<Result<Ended, ServeError>>>,
    /// Hand the room of every data frame back as soon as it arrives.
    auto_credit: bool,
    /// Frames read while waiting for credit, for `frame` to return first.
    queued: std::collections::VecDeque<Frame>,
}

impl Host {
    fn start() -> Self {
        Self::start_as(None)
    }

    /// An agent whose commands and file operations run as `user`.
    fn start_as(user: Option<Credentials>) -> Self {
        Self::start_with(ServeConfig {
            timings: BootTimings {
                agent_ms: 1,
                modules_ms: 2,
                verity_ms: 3,
                root_ms: 4,
                channel_ms: 5,
            },
            workload_user: user,
            ..ServeConfig::on_host()
        })
    }

    /// An agent serving with `config`.
    fn start_with(config: ServeConfig) -> Self {
        let (host, mut agent_side) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(SILENCE)).unwrap();
        let agent = std::thread::spawn(move || serve(&mut agent_side, &config));
        Self {
            stream: host,
            decoder: FrameDecoder::new(),
            agent: Some(agent),
            auto_credit: true,
            queued: Default::default(),
        }
    }

    /// Reads `path` out (a directory as a tar stream): its bytes and the answer.
    fn download(&mut self, stream: u32, path: &str, tar: bool) -> (Vec<u8>, Response) {
        let path = path.to_string();
        self.send(stream, &Request::FsRead { path, tar });
        let mut bytes = Vec::new();
        loop {
            let frame = self.frame();
            match frame.kind {
                FrameKind::Data => bytes.extend(frame.payload),
                FrameKind::Response => {
                    return (bytes, serde_json::from_slice(&frame.payload).unwrap())
                }
                other => panic!("{other:?}"),
            }
        }
    }

    /// Closes a command's standard input.
    fn feed_end(&mut self, stream: u32) {
        self.stream
            .write_all(&encode(FrameKind::Data, stream, b"").unwrap())
            .unwrap();
    }

    fn credit(&mut self, stream: u32, bytes: u64) {
        self.stream
            .write_all(&encode(FrameKind::Credit, stream, &flow::credit_payload(bytes)).unwrap())
            .unwrap();
    }

    /// Sends `bytes` as data frames on `stream`, never past the window the agent gives.
    fn feed(&mut self, stream: u32, bytes: &[u8]) {
        let mut window = flow::SendWindow::default();
        for chunk in bytes.chunks(64 * 1024) {
            while !window.fits(chunk.len()) {
                let frame = self.next_from_channel();
                if frame.kind == FrameKind::Credit && frame.stream == stream {
                    window.grant(flow::parse_credit(&frame.payload).unwrap());
                } else if frame.kind != FrameKind::Credit {
                    self.queued.push_back(frame);
                }
            }
            window.spend(chunk.len());
            self.stream
                .write_all(&encode(FrameKind::Data, stream, chunk).unwrap())
                .unwrap();
        }
    }

    fn send(&mut self, stream: u32, request: &Request) {
        let payload = serde_json::to_vec(request).unwrap();
        self.stream
            .write_all(&encode(FrameKind::Request, stream, &payload).unwrap())
            .unwrap();
    }

    /// The next frame other than credit.
    fn frame(&mut self) -> Frame {
        if let Some(frame) = self.queued.pop_front() {
            return frame;
        }
        loop {
            let frame = self.next_from_channel();
            if frame.kind != FrameKind::Credit {
                return frame;
            }
        }
    }

    fn next_from_channel(&mut self) -> Frame {
        let frame = self.read_frame();
        if self.auto_credit && frame.is_data() {
            self.credit(frame.stream, flow::cost(frame.payload.len()));
        }
        frame
    }

    fn read_frame(&mut self) -> Frame {
        loop {
            if let Some(frame) = self.decoder.next_frame().unwrap() {
                return frame;
            }
            let mut buffer = [0; 4096];
            match self.stream.read(&mut buffer) {
                Ok(n) if n > 0 => self.decoder.push(&buffer[..n]),
                // A signal cut the wait short (a read with a timeout is not restarted).
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // Silence: the agent still serves, so it cannot be joined; say so and fail.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    panic!("the agent sent nothing for {SILENCE:?} ({e})")
                }
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
                kind => panic!("a {kind:?} frame"),
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
                stdin: false,
                user: None,
                tty: None,
            }),
        );
    }

    /// How serving ended, once it has; a test fails rather than waits on an agent that still
    /// serves after [`SILENCE`].
    fn ended(&mut self) -> Result<Ended, ServeError> {
        let agent = self.agent.take().expect("joined once");
        let deadline = Instant::now() + SILENCE;
        while !agent.is_finished() {
            assert!(
                Instant::now() < deadline,
                "the agent still serves {SILENCE:?} after it should have ended"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        agent.join().unwrap()
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
    host.send(
        1,
        &Request::Hello {
            version: PROTOCOL_VERSION,
        },
    );
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
fn what_a_command_leaves_in_its_cgroup_is_killed_when_it_ends_and_other_commands_run_on() {
    let parent = match super::cgroup::tests::host_cgroup() {
        Ok(parent) => parent,
        Err(why) => {
            eprintln!("skipped: {why}: commands' cgroups are shown in a guest only");
            return;
        }
    };
    let mut host = Host::start_with(ServeConfig {
        command_groups: Some(parent.path().into()),
        ..ServeConfig::on_host()
    });
    let command_groups = || {
        std::fs::read_dir(parent.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_type().unwrap().is_dir())
            .count()
    };
    // A background command, in a cgroup of its own, runs on through all of this.
    host.send(
        1,
        &Request::Spawn(ExecRequest {
            argv: vec!["sleep".into(), "30".into()],
            env: BTreeMap::new(),
            cwd: None,
            timeout_ms: 60_000,
            stdin: false,
            user: None,
            tty: None,
        }),
    );
    let Response::Spawned { handle, .. } = host.exchange(1).2 else {
        panic!("not spawned");
    };
    // Sixteen chains, each forking its successor into a new session and exiting, holding no
    // pipe of the command: nothing but the cgroup ties them to it.
    let heartbeat = tempfile::NamedTempFile::new().unwrap();
    let chain = "touch \"$0\"; sleep 0.05; setsid sh -c \"$1\" \"$0\" \"$1\" >/dev/null 2>&1 &";
    let script = format!(
        "for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16; do \
         setsid sh -c '{chain}' '{}' '{chain}' >/dev/null 2>&1 & done; sleep 0.3",
        heartbeat.path().display()
    );
    let beat = || {
        std::fs::metadata(heartbeat.path())
            .unwrap()
            .modified()
            .unwrap()
    };
    let created = beat();
    host.exec(2, &["sh", "-c", &script], 10_000);
    assert_eq!(
        exec_reply(host.exchange(2).2).status,
        ExitStatus::Exited { code: 0 }
    );
    assert!(beat() > created, "the chains ran");
    let deadline = Instant::now() + SILENCE;
    loop {
        let before = beat();
        std::thread::sleep(Duration::from_millis(400));
        if beat() == before && command_groups() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the chains still beat");
    }
    host.send(
        3,
        &Request::Wait {
            handle,
            timeout_ms: 0,
        },
    );
    let Response::Wait(info) = host.exchange(3).2 else {
        panic!("no wait answer");
    };
    assert_eq!(info.status, None, "the background command runs on");
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
            stdin: false,
            user: None,
            tty: None,
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
    host.send(
        1,
        &Request::Hello {
            version: PROTOCOL_VERSION,
        },
    );
    host.exchange(1);
    host.stream.shutdown(std::net::Shutdown::Both).unwrap();
    assert_eq!(host.ended().unwrap(), Ended::HostGone);
}

fn upload(host: &mut Host, stream: u32, path: &str, bytes: &[u8], sha256: &str) -> Response {
    host.send(
        stream,
        &Request::FsWrite(mvm_protocol::FsWriteRequest {
            path: path.into(),
            mode: 0o640,
            size: bytes.len() as u64,
            sha256: sha256.into(),
            tar: false,
        }),
    );
    host.feed(stream, bytes);
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
        Response::FsWrite(mvm_protocol::FileDone {
            size: bytes.len() as u64,
            sha256: sha256(&bytes)
        })
    );
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);

    let (read_back, answer) = host.download(2, &path, false);
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

    // An upload the host gives up (an empty data frame before its last byte) leaves nothing.
    host.send(
        4,
        &Request::FsWrite(mvm_protocol::FsWriteRequest {
            path: other.clone(),
            mode: 0o600,
            size: 1000,
            sha256: sha256(&[0; 1000]),
            tar: false,
        }),
    );
    host.feed(4, &[0; 100]);
    host.feed_end(4);
    let (_, _, abandoned, _) = host.exchange(4);
    assert_eq!(error_code(&abandoned), codes::COPY_MISMATCH);
    assert!(format!("{abandoned:?}").contains("after 100 of 1000 bytes"));
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "an abandoned upload left its temporary"
    );

    // The workload cannot block a copy by making its temporary's name first: the names are
    // not to be guessed (they once were `.mvm-copy-STREAM-PID`).
    for stream in 5..8 {
        let squatted = format!(".mvm-copy-{stream}-{}", std::process::id());
        std::fs::write(dir.path().join(squatted), b"the workload's").unwrap();
    }
    for stream in 5..8 {
        let done = upload(
            &mut host,
            stream,
            &other,
            b"still copied",
            &sha256(b"still copied"),
        );
        assert!(matches!(done, Response::FsWrite(_)), "{done:?}");
    }
    assert_eq!(std::fs::read(&other).unwrap(), b"still copied");
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
        host.send(
            stream,
            &Request::FsRead {
                path: path.clone(),
                tar: false,
            },
        );
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

fn request(argv: &[&str], stdin: bool) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|a| a.to_string()).collect(),
        env: BTreeMap::new(),
        cwd: None,
        timeout_ms: 60_000,
        stdin,
        user: None,
        tty: None,
    }
}

#[test]
fn output_stops_at_the_window_without_starving_other_streams() {
    let mut host = Host::start();
    host.auto_credit = false;
    // 4 MiB of output, none of it acknowledged.
    host.exec(1, &["head", "-c", "4194304", "/dev/zero"], 60_000);
    let mut held = 0u64;
    let mut frames = 0;
    while held + flow::cost(64 * 1024) <= flow::WINDOW {
        let frame = host.frame();
        assert_eq!((frame.kind, frame.stream), (FrameKind::Stdout, 1));
        held += flow::cost(frame.payload.len());
        frames += 1;
    }
    // The window is (nearly) used up: no more output comes, yet another stream is answered.
    host.send(2, &Request::Echo);
    let mut before_echo = Vec::new();
    let echo = loop {
        let frame = host.frame();
        if frame.stream == 2 {
            break frame;
        }
        before_echo.push(frame);
    };
    assert_eq!(echo.kind, FrameKind::Response);
    let spilled: u64 = before_echo
        .iter()
        .map(|f| flow::cost(f.payload.len()))
        .sum();
    assert!(
        held + spilled <= flow::WINDOW,
        "the agent sent {} bytes past the window",
        held + spilled - flow::WINDOW
    );
    assert!(frames >= 8);
    // Handing the room back lets the rest through, all of it.
    host.auto_credit = true;
    host.credit(1, held + spilled);
    let (stdout, _, response, _) = host.exchange(1);
    let received = stdout.len() as u64
        + before_echo
            .iter()
            .map(|f| f.payload.len() as u64)
            .sum::<u64>()
        + held
        - frames * flow::cost(0);
    assert_eq!(received, 4 * 1024 * 1024);
    assert_eq!(exec_reply(response).stdout_bytes, 4 * 1024 * 1024);
    host.power_off();
}

#[test]
fn an_end_of_input_after_all_input_was_written_closes_it() {
    let mut host = Host::start();
    let script = "read line; echo got $line; cat";
    host.send(1, &Request::Exec(request(&["sh", "-c", script], true)));
    host.feed(1, b"one\n");
    // Its first line written and read before the end arrives: nothing is left to write.
    let first = loop {
        let frame = host.frame();
        if frame.kind == FrameKind::Stdout {
            break frame.payload;
        }
    };
    assert_eq!(first, b"got one\n");
    host.feed_end(1);
    let reply = exec_reply(host.exchange(1).2);
    assert_eq!(reply.status, ExitStatus::Exited { code: 0 });
    host.power_off();
}

#[test]
fn standard_input_is_fed_from_data_frames_within_the_window() {
    let mut host = Host::start();
    host.send(1, &Request::Exec(request(&["sha256sum"], true)));
    let input: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    host.feed(1, &input);
    host.feed_end(1);
    let (stdout, _, response, _) = host.exchange(1);
    let expected = sha256(&input);
    assert_eq!(
        String::from_utf8(stdout).unwrap().split_whitespace().next(),
        expected.strip_prefix("sha256:")
    );
    assert_eq!(exec_reply(response).status, ExitStatus::Exited { code: 0 });

    // A command that reads nothing still ends; its input is dropped, not held.
    host.send(2, &Request::Exec(request(&["true"], true)));
    host.feed(2, &[7; 200_000]);
    let reply = exec_reply(host.exchange(2).2);
    assert_eq!(reply.status, ExitStatus::Exited { code: 0 });

    // Data past the window ends the exchange with one answer, and the command with it.
    host.send(3, &Request::Exec(request(&["sleep", "30"], true)));
    for _ in 0..17 {
        host.stream
            .write_all(&encode(FrameKind::Data, 3, &[0; 64 * 1024]).unwrap())
            .unwrap();
    }
    assert_eq!(error_code(&host.exchange(3).2), codes::FLOW);
    host.send(
        4,
        &Request::Signal {
            stream: 3,
            signal: 9,
        },
    );
    assert_eq!(error_code(&host.exchange(4).2), codes::NO_SUCH_PROCESS);
    host.send(5, &Request::Ps);
    assert_eq!(host.exchange(5).2, Response::Ps { processes: vec![] });
    host.power_off();
}

#[test]
fn a_running_command_can_be_signalled_by_its_stream() {
    let mut host = Host::start();
    host.exec(1, &["sleep", "30"], 60_000);
    std::thread::sleep(Duration::from_millis(100));
    host.send(
        2,
        &Request::Signal {
            stream: 1,
            signal: 15,
        },
    );
    assert_eq!(host.exchange(2).2, Response::Done);
    let reply = exec_reply(host.exchange(1).2);
    assert_eq!(reply.status, ExitStatus::Signaled { signal: 15 });
    host.send(
        3,
        &Request::Signal {
            stream: 1,
            signal: 15,
        },
    );
    assert_eq!(error_code(&host.exchange(3).2), codes::NO_SUCH_PROCESS);
    host.send(
        4,
        &Request::Signal {
            stream: 4,
            signal: 99,
        },
    );
    assert_eq!(error_code(&host.exchange(4).2), codes::NO_SUCH_PROCESS);
    host.power_off();
}

#[test]
fn a_command_on_a_terminal_has_it_for_its_own_and_follows_resizes() {
    let mut host = Host::start();
    let script = "tty; stty size; read line; stty size; echo got-$line; exit 4";
    let mut asked = request(&["sh", "-c", script], true);
    asked.tty = Some(TtySize {
        rows: 30,
        cols: 100,
    });
    host.send(1, &Request::Exec(asked));
    let mut shown = Vec::new();
    while !String::from_utf8_lossy(&shown).contains("30 100") {
        let frame = host.frame();
        assert_eq!((frame.stream, frame.kind), (1, FrameKind::Stdout));
        shown.extend(frame.payload);
    }
    host.send(
        2,
        &Request::Resize {
            stream: 1,
            size: TtySize {
                rows: 50,
                cols: 200,
            },
        },
    );
    assert_eq!(host.exchange(2).2, Response::Done);
    // Typed as at a terminal: a carriage return ends the line.
    host.feed(1, b"go\r");
    let (rest, stderr, response, _) = host.exchange(1);
    shown.extend(rest);
    let shown = String::from_utf8_lossy(&shown);
    assert!(shown.starts_with("/dev/pts/"), "{shown}");
    assert!(shown.contains("50 200"), "{shown}");
    assert!(shown.contains("got-go"), "{shown}");
    assert!(stderr.is_empty(), "everything comes through the terminal");
    assert_eq!(exec_reply(response).status, ExitStatus::Exited { code: 4 });

    // A resize of a command without a terminal, a terminal for a background command.
    host.send(3, &Request::Exec(request(&["sleep", "30"], false)));
    host.send(
        4,
        &Request::Resize {
            stream: 3,
            size: TtySize {
                rows: 50,
                cols: 200,
            },
        },
    );
    assert_eq!(error_code(&host.exchange(4).2), codes::TERMINAL_FAILED);
    host.send(
        5,
        &Request::Signal {
            stream: 3,
            signal: 9,
        },
    );
    assert_eq!(host.exchange(5).2, Response::Done);
    host.exchange(3);
    let mut background = request(&["true"], true);
    background.tty = Some(TtySize { rows: 24, cols: 80 });
    host.send(6, &Request::Spawn(background));
    assert_eq!(error_code(&host.exchange(6).2), codes::BAD_REQUEST);
    host.power_off();
}

fn spawn(host: &mut Host, stream: u32, script: &str) -> u64 {
    host.send(
        stream,
        &Request::Spawn(request(&["sh", "-c", script], false)),
    );
    match host.exchange(stream).2 {
        Response::Spawned { handle, pid } => {
            assert!(pid > 1);
            handle
        }
        other => panic!("{other:?}"),
    }
}

fn wait_for(host: &mut Host, stream: u32, handle: u64, timeout_ms: u64) -> (Vec<u8>, Response) {
    host.send(stream, &Request::Wait { handle, timeout_ms });
    let (stdout, _, response, _) = host.exchange(stream);
    (stdout, response)
}

#[test]
fn spawned_commands_are_listed_waited_for_and_killed() {
    let mut host = Host::start();
    let sleeper = spawn(&mut host, 1, "echo started; exec sleep 30");
    let quick = spawn(&mut host, 2, "echo done; echo oops >&2; exit 3");
    assert_ne!(sleeper, quick);

    // A wait that times out says it still runs.
    let (_, response) = wait_for(&mut host, 3, sleeper, 200);
    let Response::Wait(info) = response else {
        panic!("{response:?}")
    };
    assert_eq!((info.handle, info.status), (Some(sleeper), None));

    // Both are listed, by program only; an exec command too, while it runs.
    host.exec(4, &["sleep", "2"], 60_000);
    host.send(5, &Request::Ps);
    let Response::Ps { processes } = host.exchange(5).2 else {
        panic!()
    };
    let handles: Vec<_> = processes.iter().map(|p| p.handle).collect();
    assert!(handles.contains(&Some(sleeper)) && handles.contains(&Some(quick)));
    assert!(handles.contains(&None), "the exec command is listed");
    assert!(processes
        .iter()
        .all(|p| p.program == "sh" || p.program == "sleep"));
    exec_reply(host.exchange(4).2);

    // A spawned command was answered: its stream is free for the next exchange (the ids of a
    // woken VM's new runner start over).
    host.exec(1, &["true"], 60_000);
    assert_eq!(
        exec_reply(host.exchange(1).2).status,
        ExitStatus::Exited { code: 0 }
    );

    // The quick one ended: its output and status, once; then the handle is gone.
    let (stdout, response) = wait_for(&mut host, 6, quick, 5000);
    assert_eq!(stdout, b"done\n");
    let Response::Wait(info) = response else {
        panic!()
    };
    assert_eq!(info.status, Some(ExitStatus::Exited { code: 3 }));
    assert_eq!(
        error_code(&wait_for(&mut host, 7, quick, 0).1),
        codes::NO_SUCH_PROCESS
    );

    // A wait pending when the command is killed is answered with its end.
    host.send(
        8,
        &Request::Wait {
            handle: sleeper,
            timeout_ms: 30_000,
        },
    );
    host.send(
        9,
        &Request::Kill {
            handle: sleeper,
            signal: 9,
        },
    );
    let mut answers = HashMap::new();
    while answers.len() < 2 {
        let frame = host.frame();
        if frame.kind == FrameKind::Response {
            let response: Response = serde_json::from_slice(&frame.payload).unwrap();
            answers.insert(frame.stream, response);
        }
    }
    assert_eq!(answers[&9], Response::Done);
    let Response::Wait(info) = &answers[&8] else {
        panic!("{:?}", answers[&8])
    };
    assert_eq!(info.status, Some(ExitStatus::Signaled { signal: 9 }));
    host.send(
        10,
        &Request::Kill {
            handle: sleeper,
            signal: 9,
        },
    );
    assert_eq!(error_code(&host.exchange(10).2), codes::NO_SUCH_PROCESS);
    host.power_off();
}

#[test]
fn a_readable_file_in_a_directory_the_user_may_not_enter_is_not_copied_out() {
    use std::os::unix::fs::PermissionsExt;
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: not root, so the agent cannot take another user's credentials");
        return;
    }
    let nobody = Credentials {
        uid: 65534,
        gid: 65534,
    };
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let private = dir.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    for file in [private.join("open.txt"), dir.path().join("open.txt")] {
        std::fs::write(&file, b"anyone may read this file").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let mut host = Host::start_as(Some(nobody));
    let hidden = private.join("open.txt");
    let (bytes, refused) = host.download(1, hidden.to_str().unwrap(), false);
    assert_eq!(error_code(&refused), codes::PATH_REFUSED, "{refused:?}");
    assert!(bytes.is_empty());
    // Nor is one written into a directory beyond it, however open that one is.
    let inner = private.join("inner");
    std::fs::create_dir(&inner).unwrap();
    std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o777)).unwrap();
    let target = inner.join("dropped");
    let written = upload(&mut host, 3, target.to_str().unwrap(), b"x", &sha256(b"x"));
    assert_eq!(error_code(&written), codes::PATH_REFUSED, "{written:?}");
    assert!(!target.exists());
    let open = dir.path().join("open.txt");
    let (bytes, read) = host.download(2, open.to_str().unwrap(), false);
    assert!(matches!(read, Response::FsRead(_)), "{read:?}");
    assert_eq!(bytes, b"anyone may read this file");
    host.power_off();
}

#[test]
fn file_operations_run_with_the_workload_users_rights() {
    use std::os::unix::fs::PermissionsExt;
    let nobody = Credentials {
        uid: 65534,
        gid: 65534,
    };
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let base = dir.path().to_str().unwrap().to_string();
    let owned = format!("{base}/owned");
    std::fs::create_dir(&owned).unwrap();
    std::os::unix::fs::chown(&owned, Some(nobody.uid), Some(nobody.gid)).unwrap();
    std::fs::write(format!("{base}/roots"), b"root's").unwrap();
    std::os::unix::fs::symlink("/etc", format!("{owned}/etc")).unwrap();
    let mut host = Host::start_as(Some(nobody));
    let mut ask = |stream: u32, request: Request| {
        host.send(stream, &request);
        host.exchange(stream).2
    };

    let made = ask(
        1,
        Request::FsMkdir {
            path: format!("{owned}/a"),
            mode: 0o750,
        },
    );
    assert_eq!(made, Response::Done);
    let meta = std::fs::metadata(format!("{owned}/a")).unwrap();
    assert_eq!(
        (
            meta.permissions().mode() & 0o777,
            std::os::unix::fs::MetadataExt::uid(&meta)
        ),
        (0o750, 65534)
    );
    std::fs::write(format!("{owned}/a/f"), b"12345").unwrap();
    let moved = ask(
        2,
        Request::FsMove {
            from: format!("{owned}/a/f"),
            to: format!("{owned}/g"),
        },
    );
    // The file is root's in a directory nobody owns: renaming it is nobody's right.
    assert_eq!(moved, Response::Done);
    let Response::FsStat(info) = ask(
        3,
        Request::FsStat {
            path: format!("{owned}/g"),
        },
    ) else {
        panic!()
    };
    assert_eq!(
        (info.name.as_str(), info.kind, info.size),
        ("g", FileKind::File, 5)
    );
    let Response::FsList { entries, truncated } = ask(
        4,
        Request::FsList {
            path: owned.clone(),
        },
    ) else {
        panic!()
    };
    let names: Vec<_> = entries.iter().map(|e| (e.name.as_str(), e.kind)).collect();
    assert_eq!(
        names,
        [
            ("a", FileKind::Directory),
            ("etc", FileKind::Symlink),
            ("g", FileKind::File)
        ]
    );
    assert!(!truncated);

    // The kernel refuses what nobody may not do; paths outside the root and through
    // symlinks are refused before that.
    let refusals = [
        (
            Request::FsMkdir {
                path: format!("{base}/x"),
                mode: 0o700,
            },
            codes::PATH_REFUSED,
        ),
        (
            Request::FsRemove {
                path: format!("{base}/roots"),
                recursive: false,
            },
            codes::PATH_REFUSED,
        ),
        (
            Request::FsList {
                path: "/etc".into(),
            },
            codes::PATH_REFUSED,
        ),
        (
            Request::FsList {
                path: format!("{owned}/etc"),
            },
            codes::PATH_REFUSED,
        ),
        (
            Request::FsStat {
                path: format!("{owned}/etc/passwd"),
            },
            codes::PATH_REFUSED,
        ),
        (
            Request::FsMove {
                from: format!("{owned}/g"),
                to: "/var/g".into(),
            },
            codes::PATH_REFUSED,
        ),
        (
            Request::FsRemove {
                path: format!("{owned}/a/missing"),
                recursive: false,
            },
            codes::FILE_STATE,
        ),
        (
            Request::FsMkdir {
                path: format!("{owned}/a"),
                mode: 0o700,
            },
            codes::FILE_STATE,
        ),
    ];
    for (stream, (request, code)) in (10..).zip(refusals) {
        let what = format!("{request:?}");
        assert_eq!(error_code(&ask(stream, request)), code, "{what}");
    }
    assert!(std::path::Path::new(&format!("{base}/roots")).exists());

    // A recursive remove takes the tree, and removes the symlink without following it.
    std::fs::create_dir_all(format!("{owned}/a/b/c")).unwrap();
    std::os::unix::fs::chown(format!("{owned}/a/b"), Some(65534), None).unwrap();
    std::os::unix::fs::chown(format!("{owned}/a/b/c"), Some(65534), None).unwrap();
    let not_empty = ask(
        30,
        Request::FsRemove {
            path: format!("{owned}/a"),
            recursive: false,
        },
    );
    assert_eq!(error_code(&not_empty), codes::FILE_STATE);
    assert_eq!(
        ask(
            31,
            Request::FsRemove {
                path: format!("{owned}/a"),
                recursive: true
            }
        ),
        Response::Done
    );
    assert_eq!(
        ask(
            32,
            Request::FsRemove {
                path: format!("{owned}/etc"),
                recursive: true
            }
        ),
        Response::Done
    );
    assert!(std::path::Path::new("/etc/passwd").exists());
    let Response::FsList { entries, .. } = ask(
        33,
        Request::FsList {
            path: owned.clone(),
        },
    ) else {
        panic!()
    };
    assert_eq!(entries.len(), 1);
    host.power_off();
}

#[test]
fn directories_travel_as_tar_streams() {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let source = dir.path().join("source");
    std::fs::create_dir_all(source.join("sub")).unwrap();
    std::fs::write(source.join("a.txt"), b"alpha").unwrap();
    std::fs::write(source.join("sub/b.bin"), vec![9u8; 100_000]).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", source.join("link")).unwrap();
    let mut host = Host::start();

    // Out: the directory as a tar stream, the symlink as a symlink.
    let (archive, answer) = host.download(1, source.to_str().unwrap(), true);
    assert!(matches!(answer, Response::FsRead(done) if done.sha256 == sha256(&archive)));
    let mut entries: Vec<(String, tar::EntryType)> = tar::Archive::new(&archive[..])
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.path().unwrap().display().to_string(),
                e.header().entry_type(),
            )
        })
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let names: Vec<_> = entries
        .iter()
        .map(|(n, _)| n.trim_start_matches("./"))
        .collect();
    assert_eq!(names, ["a.txt", "link", "sub", "sub/b.bin"]);
    assert_eq!(entries[1].1, tar::EntryType::Symlink);

    // In: the same stream unpacked into a new directory, only once its digest matches.
    let copy = dir.path().join("copy").to_str().unwrap().to_string();
    let request = mvm_protocol::FsWriteRequest {
        path: copy.clone(),
        mode: 0o755,
        size: archive.len() as u64,
        sha256: sha256(&archive),
        tar: true,
    };
    host.send(2, &Request::FsWrite(request.clone()));
    host.feed(2, &archive);
    assert!(matches!(host.exchange(2).2, Response::FsWrite(_)));
    assert_eq!(std::fs::read(format!("{copy}/a.txt")).unwrap(), b"alpha");
    assert_eq!(
        std::fs::read(format!("{copy}/sub/b.bin")).unwrap().len(),
        100_000
    );
    assert_eq!(
        std::fs::read_link(format!("{copy}/link")).unwrap(),
        std::path::Path::new("/etc/passwd")
    );
    // Not over an existing directory, and not from a stream with `..` in it.
    host.send(3, &Request::FsWrite(request));
    assert_eq!(error_code(&host.exchange(3).2), codes::FILE_STATE);
    let mut evil = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(4);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.as_gnu_mut().unwrap().name[..14].copy_from_slice(b"../escaped.txt");
    header.set_cksum();
    evil.append(&header, &b"evil"[..]).unwrap();
    let evil = evil.into_inner().unwrap();
    let target = dir.path().join("evil").to_str().unwrap().to_string();
    host.send(
        4,
        &Request::FsWrite(mvm_protocol::FsWriteRequest {
            path: target,
            mode: 0o755,
            size: evil.len() as u64,
            sha256: sha256(&evil),
            tar: true,
        }),
    );
    host.feed(4, &evil);
    let _ = host.exchange(4);
    assert!(!dir.path().join("escaped.txt").exists());
    host.power_off();
}

mod homes;
mod policy;
mod tunnels;

/// The report a `services` request gets, waiting up to `timeout_ms` past `since`.
fn services(host: &mut Host, stream: u32, since: Option<u64>, timeout_ms: u64) -> ServicesReport {
    let request = Request::Services {
        changed_since: since,
        timeout_ms,
    };
    host.send(stream, &request);
    match host.exchange(stream).2 {
        Response::Services(report) => report,
        other => panic!("{other:?}"),
    }
}

/// A service's log from `offset`: its bytes and the slice.
fn service_log(
    host: &mut Host,
    stream: u32,
    name: &str,
    offset: u64,
    timeout_ms: u64,
) -> (Vec<u8>, Response) {
    let request = Request::ServiceLog {
        name: name.into(),
        offset,
        timeout_ms,
    };
    host.send(stream, &request);
    let (stdout, _, response, _) = host.exchange(stream);
    (stdout, response)
}

#[test]
fn services_are_restarted_by_their_policy_logged_and_probed() {
    let mut host = Host::start();
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("ready");
    let script = format!(
        "echo run; [ -e {flag} ] && exec sleep 60; touch {flag}; echo failing >&2; exit 4",
        flag = flag.display()
    );
    let probe = format!("test -e {}", dir.path().join("healthy").display());
    let start = StartServices {
        services: vec![
            ServiceSpec {
                name: "web".into(),
                exec: request(&["sh", "-c", &script], false),
                restart: Restart::OnFailure,
                max_restarts: 3,
            },
            ServiceSpec {
                name: "once".into(),
                exec: request(&["sh", "-c", "echo bye"], false),
                restart: Restart::OnFailure,
                max_restarts: 3,
            },
        ],
        health: Some(HealthSpec {
            probe: Probe::Command {
                exec: request(&["sh", "-c", &probe], false),
            },
            interval_ms: 1000,
            timeout_ms: 1000,
            retries: 1,
            start_period_ms: 0,
        }),
    };
    host.send(1, &Request::StartServices(start.clone()));
    assert_eq!(host.exchange(1).2, Response::Done);
    host.send(2, &Request::StartServices(start));
    assert_eq!(error_code(&host.exchange(2).2), codes::NO_SUCH_SERVICE);

    // `web` fails once, is started again a second later and then runs; `once` exits 0 and
    // stays stopped.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut report = services(&mut host, 3, None, 0);
    while report.services[0].state != ServiceState::Running || report.services[0].restarts == 0 {
        assert!(Instant::now() < deadline, "{report:?}");
        report = services(&mut host, 3, Some(report.generation), 5000);
    }
    assert_eq!(
        report.services[0].last_exit,
        Some(ExitStatus::Exited { code: 4 })
    );
    let once = &report.services[1];
    assert_eq!((once.state, once.restarts), (ServiceState::Stopped, 0));
    let (log, _) = service_log(&mut host, 4, "web", 0, 0);
    let log = String::from_utf8(log).unwrap();
    for line in ["run\n", "failing\n", "exited with 4; starting again in 1 s"] {
        assert!(log.contains(line), "{log}");
    }
    let Response::ServiceLog(slice) = service_log(&mut host, 5, "once", 0, 0).1 else {
        panic!()
    };
    assert!(slice.ended);

    // The probe fails until the file is there (one failure is unhealthy), then passes.
    while report.health.as_ref().unwrap().status != Health::Unhealthy {
        assert!(Instant::now() < deadline, "{report:?}");
        report = services(&mut host, 6, Some(report.generation), 5000);
    }
    std::fs::write(dir.path().join("healthy"), b"").unwrap();
    let report = services(&mut host, 7, Some(report.generation), 5000);
    assert_eq!(report.health.unwrap().status, Health::Healthy);

    // A log read at its end waits for output; the service's handle is listed by `ps` (the
    // probe's never) and killing it restarts it, which the waiting read sees.
    let Response::ServiceLog(slice) = service_log(&mut host, 8, "web", 0, 0).1 else {
        panic!()
    };
    let handle = report.services[0].handle.unwrap();
    host.send(9, &Request::Ps);
    let Response::Ps { processes } = host.exchange(9).2 else {
        panic!()
    };
    let handles: Vec<_> = processes.iter().filter_map(|p| p.handle).collect();
    assert_eq!(handles, [handle]);
    assert_eq!(
        error_code(&wait_for(&mut host, 10, handle, 0).1),
        codes::NO_SUCH_PROCESS
    );
    host.send(11, &Request::Kill { handle, signal: 9 });
    assert_eq!(host.exchange(11).2, Response::Done);
    let (more, _) = service_log(&mut host, 12, "web", slice.next_offset, 10_000);
    let more = String::from_utf8(more).unwrap();
    assert!(more.contains("killed by signal 9"), "{more}");
    assert_eq!(
        error_code(&service_log(&mut host, 13, "nope", 0, 0).1),
        codes::NO_SUCH_SERVICE
    );
    host.power_off();
}
