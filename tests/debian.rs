//! A real distribution image end to end: Debian bookworm made by `mmdebstrap` (minbase, `python3`
//! and `busybox`; `support::debian` makes it once and caches it), its tarball's device nodes and
//! all. `mvm build` skips the nodes and names them, in its output and in the signed provenance;
//! the image then boots once, as a named VM, and runs real programs: Python with its `ssl`,
//! `sqlite3`, `json` and `hashlib` modules, a shell pipeline through dash, grep, coreutils and
//! busybox, and Debian's own files and package database read back. Two sandboxes restored
//! from the boot snapshot that launch made then each make a TLS handshake: no session secret
//! or client random is the same in both.
//!
//! Without mmdebstrap the test fails, saying how to install it: it is never skipped.

use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

mod support;

use support::{debian, describe, dsse_payload, guest, text};

/// The device nodes of mmdebstrap's tarball, in its order, each a character device.
const NODES: &[&str] = &[
    "/dev/console",
    "/dev/full",
    "/dev/null",
    "/dev/ptmx",
    "/dev/random",
    "/dev/tty",
    "/dev/urandom",
    "/dev/zero",
];

/// `mvm ARGS` in `home`, which must exit 0; its standard output.
fn ok(home: &Path, args: &[&str]) -> String {
    let out = guest::mvm(home, args);
    assert_eq!(out.status.code(), Some(0), "{args:?}: {}", describe(&out));
    text(&out.stdout)
}

/// Python's standard library on Debian's OpenSSL and SQLite: an in-memory database summed, a
/// TLS context made, a digest taken; the answers as JSON.
const PYTHON: &str = r#"
import hashlib, json, sqlite3, ssl
db = sqlite3.connect(":memory:")
db.execute("create table t (n integer)")
db.executemany("insert into t values (?)", [(i,) for i in range(1, 11)])
context = ssl.create_default_context()
print(json.dumps({
    "sum": db.execute("select sum(n) from t").fetchone()[0],
    "sqlite": sqlite3.sqlite_version,
    "openssl": ssl.OPENSSL_VERSION,
    "verify": context.verify_mode == ssl.CERT_REQUIRED,
    "sha256": hashlib.sha256(b"mvm").hexdigest(),
}))
"#;

/// A TLS handshake inside one Python — client and server over memory buffers, the server's
/// certificate and key in `argv[1]` — whose client logs its session secrets (the NSS key log
/// format: `LABEL CLIENT_RANDOM SECRET`); prints the protocol, then the log.
const TLS_KEYS: &str = r#"
import ssl, sys
open("/tmp/server.pem", "w").write(sys.argv[1])
server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
server.load_cert_chain("/tmp/server.pem")
client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
client.load_verify_locations("/tmp/server.pem")
client.keylog_filename = "/tmp/tls.keys"
to_server, to_client, c_out, s_out = (ssl.MemoryBIO() for _ in range(4))
c = client.wrap_bio(to_client, c_out, server_hostname="tls.example.com")
s = server.wrap_bio(to_server, s_out, server_side=True)
def step(end):
    try:
        end.do_handshake()
        return True
    except ssl.SSLWantReadError:
        return False
done = [False, False]
for _ in range(8):
    done[0] = done[0] or step(c)
    to_server.write(c_out.read())
    done[1] = done[1] or step(s)
    to_client.write(s_out.read())
    if all(done):
        break
assert all(done), done
print(c.version())
print(open("/tmp/tls.keys").read(), end="")
"#;

/// The secrets and client randoms of a TLS key log (after the protocol's line; `#` lines are
/// OpenSSL's comments).
fn tls_secrets(log: &str) -> Vec<String> {
    log.lines()
        .skip(1)
        .filter(|line| !line.starts_with('#'))
        .flat_map(|line| line.split(' ').skip(1).map(str::to_string))
        .collect()
}

#[test]
fn a_debian_image_builds_with_its_device_nodes_skipped_and_runs_python() {
    let image = debian::bookworm();
    eprintln!(
        "debian image: {} in {:.1?}",
        if image.made { "made" } else { "cached" },
        image.took
    );
    let work = tempfile::tempdir().unwrap();
    let home = work.path().join("home");
    support::mvm_json(&home, &["kernel", "fetch"], 0);

    // The build: every device node skipped, said in one line, and each named in the provenance.
    let started = Instant::now();
    let bundle = work.path().join("bundle");
    let built = ok(
        &home,
        &[
            "build",
            "--image",
            &image.reference,
            "--out",
            bundle.to_str().unwrap(),
            "--agent",
            guest::static_agent().to_str().unwrap(),
        ],
    );
    eprintln!("mvm build: {:.1?}", started.elapsed());
    assert!(
        built.lines().any(|l| l
            .starts_with(&format!("skipped {} device nodes and FIFOs", NODES.len()))
            && l.ends_with(": /dev/console, /dev/full, /dev/null, /dev/ptmx, /dev/random, …")),
        "{built}"
    );
    let provenance = dsse_payload(&bundle.join("provenance.dsse.json"));
    let named: Vec<Value> = NODES
        .iter()
        .map(|path| json!({"path": path, "kind": "char"}))
        .collect();
    assert_eq!(
        provenance["predicate"]["buildDefinition"]["internalParameters"]["skipped_entries"],
        json!({"total": NODES.len(), "named": named})
    );

    // One boot serves every command.
    let started = Instant::now();
    let _cleanup = guest::RemoveOnDrop {
        home: &home,
        name: "debian",
    };
    let plan = bundle.join("plan.dsse.json");
    ok(
        &home,
        &["up", "--plan", plan.to_str().unwrap(), "--name", "debian"],
    );
    eprintln!("mvm up: {:.1?}", started.elapsed());
    let exec = |command: &[&str]| {
        let mut args = vec!["exec", "debian", "--"];
        args.extend_from_slice(command);
        ok(&home, &args)
    };

    let python: Value = serde_json::from_str(&exec(&["python3", "-c", PYTHON])).unwrap();
    assert_eq!(python["sum"], 55, "{python}");
    assert!(
        python["sqlite"].as_str().unwrap().starts_with("3."),
        "{python}"
    );
    assert!(
        python["openssl"]
            .as_str()
            .unwrap()
            .starts_with("OpenSSL 3."),
        "{python}"
    );
    assert_eq!(python["verify"], true, "{python}");
    assert_eq!(
        python["sha256"],
        format!("{:x}", Sha256::digest(b"mvm")),
        "{python}"
    );

    // A pipeline: dash, grep, coreutils' cut and busybox's tr.
    assert_eq!(
        exec(&[
            "sh",
            "-c",
            "grep '^VERSION_CODENAME=' /etc/os-release | cut -d= -f2 | busybox tr a-z A-Z"
        ]),
        "BOOKWORM\n"
    );
    let version = exec(&["cat", "/etc/debian_version"]);
    assert!(version.starts_with("12."), "{version}");
    let python3 = exec(&["dpkg-query", "--show", "--showformat=${Version}", "python3"]);
    assert!(python3.starts_with("3.11"), "{python3}");
    // The workload user, not root; /dev is the guest's own devtmpfs, its nodes working.
    assert_eq!(
        exec(&[
            "sh",
            "-c",
            "id -u; head -c 4 /dev/zero | od -An -tx1 | tr -d ' '"
        ]),
        "1000\n00000000\n"
    );
    ok(&home, &["rm", "--force", "debian"]);
    eprintln!("boot and commands: {:.1?}", started.elapsed());

    // Two sandboxes restored from the boot snapshot `up` made: a TLS handshake in each shares
    // no client random and no secret with the other's.
    support::openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=tls.example.com",
            "-addext",
            "subjectAltName=DNS:tls.example.com",
            "-keyout",
            "server.key",
            "-out",
            "server.crt",
        ],
        work.path(),
    );
    let pem = [
        std::fs::read_to_string(work.path().join("server.crt")).unwrap(),
        std::fs::read_to_string(work.path().join("server.key")).unwrap(),
    ]
    .concat();
    let handshake = || {
        let ran = support::mvm_json(
            &home,
            &[
                "run",
                "--plan",
                plan.to_str().unwrap(),
                "--",
                "python3",
                "-c",
                TLS_KEYS,
                &pem,
            ],
            0,
        );
        ran["stdout"].as_str().unwrap().to_string()
    };
    let (first, second) = (handshake(), handshake());
    let started_from: Vec<Value> = support::audit_events(&home)
        .into_iter()
        .filter(|e| e["event"] == "vm.started")
        .map(|e| e["fields"]["boot_snapshot"].clone())
        .collect();
    assert_eq!(started_from.len(), 3, "{started_from:?}");
    assert!(started_from[0].is_string(), "{started_from:?}");
    assert!(
        started_from.iter().all(|key| *key == started_from[0]),
        "up and both runs restored from one boot snapshot: {started_from:?}"
    );
    for log in [&first, &second] {
        assert!(log.starts_with("TLSv1.3\n"), "{log}");
        assert!(log.contains("CLIENT_TRAFFIC_SECRET_0 "), "{log}");
    }
    let (a, b) = (tls_secrets(&first), tls_secrets(&second));
    assert!(a.len() >= 10 && b.len() == a.len(), "{first}\n{second}");
    assert!(
        a.iter()
            .all(|value| value.len() >= 64 && !b.contains(value)),
        "two restored sandboxes share TLS secrets:\n{first}\n{second}"
    );
}
