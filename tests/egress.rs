//! Network egress and forwarded ports end to end: real guests (busybox here; the Debian image's
//! `curl` and `python3` over TLS in a network namespace when the tests run as root) whose
//! only way out is the agent's proxy, judged by the runner against the plan's grants and the
//! operator's `config.toml`, with HTTP servers the tests run themselves — on loopback, reached
//! through names the operator pins there, and on a private address inside a network
//! namespace the test makes (a veth pair: nothing leaves the machine).

mod support;

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use serde_json::{json, Value};

use support::upstream::Upstream;
use support::{describe, guest, text, Served};

/// Boots run one at a time: the hosts have two cores.
static TURN: Mutex<()> = Mutex::new(());

/// The busybox image every busybox test boots, and the home its kernel was fetched into.
struct Fixture {
    _dir: tempfile::TempDir,
    home: PathBuf,
    image: String,
    /// Served on a loopback port the operator lists (reached through pinned names).
    granted: Upstream,
    /// Served on another loopback port, granted to nobody.
    other: Upstream,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let (dir, home, image) = guest::home_and_busybox(&[
            "sh", "wget", "ls", "env", "cat", "echo", "mkdir", "httpd", "sleep",
        ]);
        let (granted, other) = (Upstream::start("granted"), Upstream::start("other"));
        fs::write(
            home.join("config.toml"),
            format!(
                "[egress]\nallow_private = [\"127.0.0.1:{port}\"]\n\
                 resolve = {{ \"web.svc.example\" = \"127.0.0.1\", \
                 \"api.svc.example\" = \"127.0.0.1\", \"other.svc.example\" = \"127.0.0.2\" }}\n",
                port = granted.port
            ),
        )
        .unwrap();
        Fixture {
            _dir: dir,
            home,
            image,
            granted,
            other,
        }
    })
}

/// The grants of the busybox tests: the exact name on the listed port, every name below
/// `svc.example` on it, and the cloud metadata address.
fn grants(f: &Fixture) -> Vec<String> {
    vec![
        format!("--allow-host=web.svc.example:{}", f.granted.port),
        format!("--allow-host=*.svc.example:{}", f.granted.port),
        "--allow-host=169.254.169.254:80".to_string(),
    ]
}

fn mvm(args: &[&str]) -> Output {
    guest::mvm(&fixture().home, args)
}

fn sh_in(name: &str, script: &str) -> Output {
    mvm(&["exec", name, "--", "sh", "-c", script])
}

fn audit_entries(home: &Path) -> Vec<Value> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(home.join("audit")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "jsonl") {
            for line in fs::read_to_string(path).unwrap().lines() {
                entries.push(serde_json::from_str(line).unwrap());
            }
        }
    }
    entries
}

/// The audit entries `event` for `host` (as the guest asked for it).
fn decisions(home: &Path, event: &str, host: &str) -> Vec<Value> {
    audit_entries(home)
        .into_iter()
        .filter(|e| e["event"] == event && e["fields"]["host"] == host)
        .map(|e| e["fields"].clone())
        .collect()
}

/// `wget -q -O- URL` in the VM: its output, or its error.
fn fetch(name: &str, url: &str) -> Result<String, String> {
    let out = sh_in(name, &format!("wget -q -O- {url}"));
    match out.status.code() {
        Some(0) => Ok(text(&out.stdout)),
        _ => Err(describe(&out)),
    }
}

#[test]
fn a_vm_reaches_exactly_what_its_plan_grants_and_serves_a_forwarded_port() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let f = fixture();
    let name = "egress";
    let mut args = vec!["up", f.image.as_str(), "--name", name, "--port", "0:8080"];
    let grants = grants(f);
    args.extend(grants.iter().map(String::as_str));
    args.extend(["--", "sleep", "1"]);
    let up = mvm(&args);
    let _vm = guest::RemoveOnDrop {
        home: &f.home,
        name,
    };
    assert_eq!(up.status.code(), Some(0), "{}", describe(&up));
    let (a, b) = (f.granted.port, f.other.port);

    // The commands see the proxy; the guest has no network device but loopback.
    let env = sh_in(name, "env");
    assert!(text(&env.stdout).contains("http_proxy=http://127.0.0.1:3128"));
    assert_eq!(text(&sh_in(name, "ls /sys/class/net").stdout).trim(), "lo");
    // Around the proxy there is no way out: no route to anything.
    let direct = sh_in(
        name,
        "env -u http_proxy -u HTTP_PROXY wget -q -O- http://192.0.2.1/ 2>&1",
    );
    assert_ne!(direct.status.code(), Some(0));
    assert!(
        text(&direct.stdout).contains("unreachable"),
        "{}",
        describe(&direct)
    );

    // The exact grant, through the operator's pin of the name to a loopback port they list.
    assert_eq!(
        fetch(name, &format!("http://web.svc.example:{a}/exact")).unwrap(),
        "hello from granted /exact\n"
    );
    // The same name on another port: not granted, and nothing reaches that server.
    let refused = fetch(name, &format!("http://web.svc.example:{b}/")).unwrap_err();
    assert!(refused.contains("403"), "{refused}");
    assert!(f.other.request_lines().is_empty());
    // A name below the wildcard, pinned to the listed address.
    assert_eq!(
        fetch(name, &format!("http://api.svc.example:{a}/wild")).unwrap(),
        "hello from granted /wild\n"
    );
    // A name below the wildcard the operator pinned to loopback they did not list.
    assert!(fetch(name, &format!("http://other.svc.example:{a}/"))
        .unwrap_err()
        .contains("403"));
    // A name below the wildcard nobody pinned: the host's own resolver is asked, once (here
    // it has no answer: nothing is dialled).
    assert!(fetch(name, &format!("http://nowhere.svc.example:{a}/"))
        .unwrap_err()
        .contains("403"));
    // Cloud metadata, granted literally: never.
    assert!(fetch(name, "http://169.254.169.254/latest/meta-data/")
        .unwrap_err()
        .contains("403"));
    // The granted requests arrived, rewritten for the origin (origin form, HTTP/1.1).
    let served = f.granted.request_lines();
    for request in ["GET /exact HTTP/1.1", "GET /wild HTTP/1.1"] {
        assert!(served.iter().any(|r| r == request), "{served:?}");
    }

    // The evidence: an entry per decision, with the reason; the counts in `mvm ls`.
    let home = &f.home;
    let allowed = decisions(home, "egress.allowed", "web.svc.example");
    assert_eq!(allowed.len(), 1, "{allowed:?}");
    assert_eq!(allowed[0]["address"], format!("127.0.0.1:{a}"));
    assert_eq!(allowed[0]["via"], "forward");
    for (host, port, reason) in [
        ("web.svc.example", b, "not_granted"),
        ("other.svc.example", a, "loopback"),
        ("169.254.169.254", 80, "metadata"),
        ("nowhere.svc.example", a, "resolve_failed"),
    ] {
        let denied: Vec<Value> = decisions(home, "egress.denied", host)
            .into_iter()
            .filter(|d| d["port"] == port)
            .collect();
        assert_eq!(denied.len(), 1, "{host}:{port}: {denied:?}");
        assert_eq!(denied[0]["reason"], reason, "{host}");
    }
    let closed = decisions(home, "egress.closed", "api.svc.example");
    assert!(closed[0]["received"].as_u64().unwrap() > 0, "{closed:?}");
    let vm = guest::listed(home, name);
    assert_eq!(vm["egress"]["allowed"], 2, "{vm}");
    assert_eq!(vm["egress"]["denied"], 4, "{vm}");
    assert!(vm["egress"]["bytes_received"].as_u64().unwrap() > 0);

    // A forwarded port: a server in the guest, reached from the host.
    let spawned = mvm(&[
        "exec",
        name,
        "--detach",
        "--",
        "sh",
        "-c",
        "mkdir -p /tmp/www && echo served from the guest > /tmp/www/index.html && \
         exec httpd -f -p 127.0.0.1:8080 -h /tmp/www",
    ]);
    assert_eq!(spawned.status.code(), Some(0), "{}", describe(&spawned));
    let ports = guest::mvm_json(home, &["port", "ls", name], 0);
    assert_eq!(ports["ports"][0]["guest"], 8080, "{ports}");
    assert_eq!(ports["ports"][0]["address"], "127.0.0.1");
    let host_port = ports["ports"][0]["host"].as_u64().unwrap() as u16;
    let mut response = String::new();
    for _ in 0..50 {
        response.clear();
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, host_port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream
            .write_all(b"GET /index.html HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let _ = stream.read_to_string(&mut response);
        if response.contains("served from the guest") {
            break;
        }
        // httpd may not listen yet.
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(response.ends_with("served from the guest\n"), "{response}");
    assert!(audit_entries(home)
        .iter()
        .any(|e| e["event"] == "port.accepted" && e["fields"]["guest_port"] == 8080));

    // The listener ends with its VM.
    let stopped = mvm(&["stop", name]);
    assert_eq!(stopped.status.code(), Some(0), "{}", describe(&stopped));
    assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, host_port)).is_err());
}

#[test]
fn a_run_narrows_its_grants_logs_each_decision_and_signs_them_into_its_receipt() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let f = fixture();
    let a = f.granted.port;
    let receipt = f.home.join("egress-receipt.json");
    let script = format!(
        "wget -q -O- http://web.svc.example:{a}/narrowed; \
         wget -q -O- http://api.svc.example:{a}/run"
    );
    let mut args = vec!["run".to_string(), f.image.clone()];
    args.extend(grants(f));
    args.extend([
        format!("--deny-host=web.svc.example:{a}"),
        "--net-log".into(),
        "--receipt".into(),
        receipt.to_str().unwrap().into(),
        "--".into(),
        "sh".into(),
        "-c".into(),
        script,
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = mvm(&args);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(text(&out.stdout), "hello from granted /run\n");
    let log = text(&out.stderr);
    assert!(
        log.contains(&format!(
            "mvm: egress denied web.svc.example:{a}: denied_by_run"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "mvm: egress allowed api.svc.example:{a} -> 127.0.0.1:{a}"
        )),
        "{log}"
    );

    let verified = guest::mvm_json(
        &f.home,
        &["receipt", "verify", receipt.to_str().unwrap()],
        0,
    );
    let signed = &verified["receipt"];
    assert_eq!(
        signed["egress"],
        json!([
            {"host": "web.svc.example", "port": a, "allowed": false, "reason": "denied_by_run"},
            {"host": "api.svc.example", "port": a, "allowed": true,
             "address": format!("127.0.0.1:{a}")},
        ]),
        "{verified}"
    );
    assert_eq!(signed["egress_counts"]["allowed"], 1);
    assert_eq!(signed["egress_counts"]["denied"], 1);
    assert!(signed["egress_counts"]["bytes_received"].as_u64().unwrap() > 0);

    // A plan that grants nothing: no proxy, no name resolution, no way out.
    let out = mvm(&[
        "run",
        &f.image,
        "--",
        "sh",
        "-c",
        &format!("env; wget -q -O- http://web.svc.example:{a}/ 2>&1"),
    ]);
    assert_ne!(out.status.code(), Some(0), "{}", describe(&out));
    let said = text(&out.stdout);
    assert!(!said.to_lowercase().contains("proxy"), "{said}");
    assert!(!f
        .granted
        .request_lines()
        .iter()
        .any(|r| r.contains("GET / ")));
}

/// A network namespace with one end of a veth pair at `10.213.N.2`, the host's end at
/// `10.213.N.1`: a private address nothing outside the machine can see. Removed on drop.
struct Namespace {
    name: String,
    address: String,
}

impl Namespace {
    fn make() -> Self {
        let n = std::process::id() % 250 + 1;
        let name = format!("mvm-egress-{n}");
        let (host_end, ns_end) = (format!("mvmh{n}"), format!("mvmn{n}"));
        let address = format!("10.213.{n}.2");
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .output();
        let namespace = Self {
            name: name.clone(),
            address: address.clone(),
        };
        for args in [
            vec!["netns", "add", &name],
            vec![
                "link", "add", &host_end, "type", "veth", "peer", "name", &ns_end,
            ],
            vec!["link", "set", &ns_end, "netns", &name],
            vec!["addr", "add", &format!("10.213.{n}.1/30"), "dev", &host_end],
            vec!["link", "set", &host_end, "up"],
        ] {
            ip(&args);
        }
        for args in [
            vec!["addr", "add", &format!("{address}/30"), "dev", &ns_end],
            vec!["link", "set", &ns_end, "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            let mut inside = vec!["netns", "exec", &name, "ip"];
            inside.extend(args);
            ip(&inside);
        }
        namespace
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        // The veth pair goes with it.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "ip {args:?}: {}", describe(&out));
}

/// HTTP on :80 and HTTPS on :443 (a certificate for `tls.svc.example`), inside the namespace;
/// every server name a TLS client sends is written to `names`.
const SERVERS: &str = r#"
import http.server, ssl, sys, threading
address, cert, key, names = sys.argv[1:5]
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("hello over %s %s\n" % (self.server.kind, self.path)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
def serve(port, kind, context=None):
    server = http.server.ThreadingHTTPServer((address, port), Hello)
    server.kind = kind
    if context:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
def named(sock, name, context):
    with open(names, "a") as f:
        f.write("%s\n" % name)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
context.sni_callback = named
serve(80, "veth")
serve(443, "tls", context)
print("ready", flush=True)
threading.Event().wait()
"#;

/// A CONNECT to the granted name, then a TLS handshake naming another.
const MISMATCH: &str = r#"
import socket, ssl
s = socket.create_connection(("127.0.0.1", 3128))
s.sendall(b"CONNECT tls.svc.example:443 HTTP/1.1\r\nHost: tls.svc.example:443\r\n\r\n")
head = s.recv(4096)
assert b" 200 " in head, head
context = ssl.create_default_context()
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
try:
    context.wrap_socket(s, server_hostname="evil.example")
    print("handshake completed")
except (ssl.SSLError, OSError) as e:
    print("refused", type(e).__name__)
"#;

#[test]
fn a_debian_guest_reaches_a_private_address_and_tls_only_as_granted() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: a network namespace and its veth pair need root");
        return;
    }
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let image = support::debian::bookworm();
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let home = work.path().join("home");
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(&f.home)
        .arg(&home)
        .output()
        .unwrap();
    assert!(copied.status.success(), "{}", describe(&copied));

    let namespace = Namespace::make();
    let private = namespace.address.clone();
    let (cert, key, names) = (
        work.path().join("cert.pem"),
        work.path().join("key.pem"),
        work.path().join("names.txt"),
    );
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=tls.svc.example"])
        .args(["-addext", "subjectAltName=DNS:tls.svc.example"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", describe(&made));
    let (_servers, ready) = Served::start(
        std::process::Command::new("ip")
            .args(["netns", "exec", &namespace.name, "python3", "-c", SERVERS])
            .arg(&private)
            .args([&cert, &key, &names]),
    );
    assert_eq!(ready, "ready\n");

    fs::write(
        home.join("config.toml"),
        format!(
            "[egress]\nallow_private = [\"{private}:80\", \"{private}:443\"]\n\
             resolve = {{ \"tls.svc.example\" = \"{private}\" }}\n"
        ),
    )
    .unwrap();
    let name = "debian-egress";
    let _vm = guest::RemoveOnDrop { home: &home, name };
    let up = guest::mvm(
        &home,
        &[
            "up",
            &image.reference,
            "--name",
            name,
            &format!("--allow-host={private}:80"),
            &format!("--allow-host={private}:8080"),
            "--allow-host=tls.svc.example",
            "--",
            "sleep",
            "1",
        ],
    );
    assert_eq!(up.status.code(), Some(0), "{}", describe(&up));
    let run = |command: &[&str]| {
        let mut args = vec!["exec", name, "--"];
        args.extend_from_slice(command);
        guest::mvm(&home, &args)
    };
    let ok = |command: &[&str]| {
        let out = run(command);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{command:?}: {}",
            describe(&out)
        );
        text(&out.stdout)
    };

    // The private address, granted literally and listed by the operator: curl and Python.
    assert_eq!(
        ok(&["curl", "-s", &format!("http://{private}/curl")]),
        "hello over veth /curl\n"
    );
    let python = format!(
        "import urllib.request; print(urllib.request.urlopen('http://{private}/py').read().decode(), end='')"
    );
    assert_eq!(ok(&["python3", "-c", &python]), "hello over veth /py\n");
    // Another port of it, granted but not listed: a private address stays private.
    let status = ok(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://{private}:8080/"),
    ]);
    assert_eq!(status, "403");

    // HTTPS to the pinned name: the tunnel's ClientHello names it.
    let copy = guest::mvm(
        &home,
        &["cp", cert.to_str().unwrap(), &format!("{name}:/tmp/ca.pem")],
    );
    assert_eq!(copy.status.code(), Some(0), "{}", describe(&copy));
    assert_eq!(
        ok(&[
            "curl",
            "-s",
            "--cacert",
            "/tmp/ca.pem",
            "https://tls.svc.example/tls"
        ]),
        "hello over tls /tls\n"
    );
    // The same tunnel with another server name: nothing reaches the server.
    assert_eq!(
        ok(&["python3", "-c", MISMATCH]).split(' ').next(),
        Some("refused")
    );
    let seen = fs::read_to_string(&names).unwrap();
    assert_eq!(
        seen, "tls.svc.example\n",
        "the server saw only the granted name"
    );

    let denied = |host: &str, port: u16| {
        audit_entries(&home)
            .into_iter()
            .filter(|e| {
                e["event"] == "egress.denied"
                    && e["fields"]["host"] == host
                    && e["fields"]["port"] == port
            })
            .map(|e| e["fields"]["reason"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(denied(&private, 8080), [json!("private_range")]);
    assert_eq!(denied("tls.svc.example", 443), [json!("sni_mismatch")]);
    // Raw sockets find no route: the guest has loopback alone.
    assert_eq!(ok(&["ls", "/sys/class/net"]).trim(), "lo");
    let direct = run(&[
        "curl",
        "-s",
        "--noproxy",
        "*",
        &format!("http://{private}/"),
    ]);
    assert_eq!(direct.status.code(), Some(7), "{}", describe(&direct));
}
