//! A real distribution image end to end: Debian bookworm made by `mmdebstrap` (minbase, `python3`
//! and `busybox`; `support::debian` makes it once and caches it), its tarball's device nodes and
//! all. `mvm build` skips the nodes and names them, in its output and in the signed provenance;
//! the image then boots once, as a named VM, and runs real programs: Python with its `ssl`,
//! `sqlite3`, `json` and `hashlib` modules, a shell pipeline through dash, grep, coreutils and
//! busybox, and Debian's own files and package database read back.
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
}
