//! The server on a real socket, without a VM: its routing, its refusals with their codes and
//! statuses, one server per home, its socket's mode, and its end when idle. (Sandboxes
//! themselves are driven end to end by the SDK suites: `tests/sdk.rs`.)

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mvm_api::error::ApiError;
use mvm_api::model::CreateSandbox;
use mvm_api::{serve, Launcher, ServeOptions, Served};
use mvm_ir::home::MvmHome;
use serde_json::Value;

/// Launches nothing: every image fails to build, with the code a build would give.
struct NoBuilds;

impl Launcher for NoBuilds {
    fn runner_for(&self, _: &str, spec: &CreateSandbox) -> Result<Command, ApiError> {
        Err(ApiError::Launch {
            code: "OCI002".into(),
            message: format!("no such image {:?}", spec.image),
        })
    }

    fn waker(&self, _: &str) -> Result<Command, ApiError> {
        Err(ApiError::Host("no wakes here".into()))
    }
}

fn start(home: &Path, idle_exit: Option<Duration>) -> std::thread::JoinHandle<Served> {
    let options = ServeOptions {
        home: MvmHome::at(home),
        socket: None,
        idle_exit,
    };
    let server = std::thread::spawn(move || serve(options, Box::new(NoBuilds)).unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(home.join("api.sock")).is_err() {
        assert!(Instant::now() < deadline, "the server did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

/// One request, `Connection: close`: the status and the parsed body (Null when empty).
fn ask(socket: &PathBuf, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let mut stream = UnixStream::connect(socket).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: mvm\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    // A body over the limit is refused before it is all read: the write may then fail.
    let _ = stream.write_all(body);
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let text = String::from_utf8_lossy(&answer).to_string();
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

#[test]
fn requests_are_routed_and_refused_with_codes_and_one_server_serves_a_home() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let server = start(&home, None);
    let socket = home.join("api.sock");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let (status, health) = ask(&socket, "GET", "/v1/health", b"");
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    assert_eq!(health["pid"], std::process::id());
    let (status, document) = ask(&socket, "GET", "/v1/openapi.json", b"");
    assert_eq!((status, document["openapi"].as_str()), (200, Some("3.1.0")));

    let refusals: &[(&str, &str, &[u8], u16, &str)] = &[
        ("GET", "/v1/nothing", b"", 404, "API002"),
        ("PATCH", "/v1/sandboxes", b"", 405, "API003"),
        ("POST", "/v1/sandboxes", b"{\"image\": 1}", 400, "API001"),
        ("POST", "/v1/sandboxes", b"{\"imag\": \"x\"}", 400, "API001"),
        ("POST", "/v1/sandboxes", b"{}", 400, "API001"),
        ("GET", "/v1/sandboxes/nobody", b"", 404, "RUN036"),
        ("GET", "/v1/sandboxes/Not%20a%20name", b"", 400, "RUN035"),
        ("DELETE", "/v1/sandboxes/nobody", b"", 404, "RUN036"),
        (
            "GET",
            "/v1/sandboxes/nobody/commands/1/events",
            b"",
            404,
            "API005",
        ),
        (
            "GET",
            "/v1/sandboxes/nobody/commands/x/events",
            b"",
            400,
            "API001",
        ),
        ("GET", "/v1/sandboxes/nobody/files", b"", 400, "API001"),
        (
            "GET",
            "/v1/sandboxes/nobody/files?path=rel",
            b"",
            400,
            "API001",
        ),
        ("GET", "/v1/sandboxes?label=novalue", b"", 400, "API001"),
        ("GET", "/v1/receipts/not-hex", b"", 400, "API001"),
        (
            "GET",
            &*format!("/v1/receipts/{}", "0".repeat(64)),
            b"",
            404,
            "API005",
        ),
        (
            "POST",
            "/v1/sandboxes",
            b"{\"image\": \"oci:/x@sha256:00\", \"timeout_s\": 86401}",
            400,
            "API001",
        ),
        // What the launcher says, with its code.
        (
            "POST",
            "/v1/sandboxes",
            b"{\"image\": \"oci:/x@sha256:00\"}",
            422,
            "OCI002",
        ),
    ];
    for (method, path, body, status, wanted) in refusals {
        let (got, answer) = ask(&socket, method, path, body);
        assert_eq!(
            (got, code(&answer)),
            (*status, *wanted),
            "{method} {path}: {answer}"
        );
        assert!(!answer["error"]["message"].as_str().unwrap_or("").is_empty());
    }
    let large = vec![b' '; (1 << 20) + 1];
    let (status, answer) = ask(&socket, "POST", "/v1/sandboxes", &large);
    assert_eq!((status, code(&answer)), (413, "API004"));
    let (status, listed) = ask(&socket, "GET", "/v1/sandboxes", b"");
    assert_eq!(
        (status, listed["sandboxes"].as_array().map(Vec::len)),
        (200, Some(0))
    );

    // A second server finds the first.
    let second = ServeOptions {
        home: MvmHome::at(&home),
        socket: None,
        idle_exit: None,
    };
    assert_eq!(
        serve(second, Box::new(NoBuilds)).unwrap(),
        Served::AlreadyServing(socket.clone())
    );
    drop(server);
}

#[test]
fn an_idle_server_ends_and_takes_its_socket_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().to_path_buf();
    let server = start(&home, Some(Duration::from_secs(1)));
    let (status, _) = ask(&home.join("api.sock"), "GET", "/v1/health", b"");
    assert_eq!(status, 200);
    assert_eq!(server.join().unwrap(), Served::Idle);
    assert!(!home.join("api.sock").exists());
}
